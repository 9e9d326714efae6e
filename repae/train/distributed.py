"""torch.distributed in one place: one code path for one CPU process, one GPU, many GPUs and many nodes.

``repae run`` started by ``torchrun`` finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment and joins the
process group (NCCL on CUDA, gloo on CPU); started plainly it is a world of one and every collective here is a no-op.
Gradients are averaged by :func:`all_reduce_mean_` over flattened buckets after the backward passes of a step, which
keeps the phase structure of REPA-E (parts frozen and unfrozen within a step) free of DDP's reducer bookkeeping.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Topology",
    "all_reduce_mean_",
    "barrier",
    "broadcast_object",
    "init",
    "is_distributed",
    "rank",
    "resolve_device",
    "shutdown",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True)
class Topology:
    """Where this process sits: global rank, world size, local rank, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; asking for CUDA on a machine without it is a clear error."""
    from repae.errors import UserError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def init(device: str = "auto") -> Topology:
    """Join the process group described by torchrun's environment (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(resolve_device(device))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Topology(rank(), world_size(), local_rank, target)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


BUCKET_BYTES = 64 * 2**20


def all_reduce_mean_(tensors: Iterable[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average tensors over all processes, in place: flattened all-reduces of at most ``bucket_bytes`` each, per
    dtype/device group (bounded extra memory, few collectives)."""
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size()
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                _reduce_bucket(bucket, world)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket, world)


def _reduce_bucket(bucket: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` as process ``src`` has it, on every process (e.g. which checkpoint to resume from)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (a new tensor; differentiable through its local term)."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return tensor + (total - tensor.detach())
