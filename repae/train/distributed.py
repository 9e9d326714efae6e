"""torch.distributed in one place: one code path for one CPU process, one GPU, many GPUs and many nodes.

``repae run`` started by ``torchrun`` finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment and joins the
process group (NCCL on CUDA, gloo on CPU); started plainly it is a world of one and every collective here is a no-op.
Gradients are averaged by torch's ``DistributedDataParallel`` (:func:`replicate`): each trainable part is wrapped
so that the whole objective of its phase is one DDP forward (:class:`PhaseForward`), which keeps REPA-E's phase
structure (parts frozen and unfrozen within a step, a part's gradients reduced once per step) and overlaps the
all-reduce of gradient buckets with the backward pass.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "PhaseForward",
    "Topology",
    "all_reduce_mean_values",
    "any_process",
    "barrier",
    "broadcast_object",
    "quiet_stride_warnings",
    "init",
    "is_distributed",
    "rank",
    "replicate",
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
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?|meta", device):
        raise UserError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N")
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
    global _CONTROL
    _CONTROL = dist.new_group(backend="gloo") if is_distributed() else None
    return Topology(rank(), world_size(), local_rank, target)


_CONTROL: Any = None  # a gloo group for host-side decisions (no device synchronisation)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (e.g. a signal received by one), agreed by all of them: a one-integer
    all-reduce on the CPU (a gloo group), so that deciding costs no device synchronisation. Every process must call
    it at the same point."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(value.item())


def shutdown() -> None:
    global _CONTROL
    _CONTROL = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class PhaseForward(nn.Module):
    """A trainable part seen by torch's data-parallel wrappers through one ``forward``: the whole objective of the
    part's phase (every loss, however it reaches the part: ``tokenizer.encode``/``decode``, a loss's own
    discriminator, the denoiser's features and prediction) runs as ``forward(objective)``, so that
    ``DistributedDataParallel`` arms its reducer once per phase and all-reduces the part's gradient buckets while the
    backward pass is still running. The part itself is :attr:`module`; its state-dict keys are unchanged."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, objective: Callable[[], torch.Tensor]) -> torch.Tensor:
        return objective()


def replicate(module: nn.Module, device: torch.device, *, bucket_mb: float = 25.0,
              unused: str = "static") -> DistributedDataParallel:
    """``module`` (a trainable part) wrapped for data parallelism by torch's ``DistributedDataParallel`` around
    :class:`PhaseForward`: call ``wrapped(objective)`` inside the part's phase and ``.backward()`` the result;
    gradients arrive averaged over processes. Under gradient accumulation, all but the last micro-batch of the phase
    run inside ``wrapped.no_sync()``.

    ``unused`` says how DDP learns which parameters the phase's objective leaves without gradient (e.g. a decoder no
    loss of the phase reaches): ``static`` (DDP's ``static_graph``: found at the first step, the same set every step
    after; not usable with ``no_sync``), ``every-step`` (``find_unused_parameters``: an autograd-graph search at every
    step, for losses that switch on later), ``none`` (every parameter must get a gradient at every step; the caller
    checks). Buffers are not broadcast at every forward (each process keeps its own, as a plain single-process run
    would); parameters are broadcast from process 0 once, at construction. Gradients are views of the communication
    buckets (no second copy).
    """
    if unused not in ("static", "every-step", "none"):
        raise ValueError(f"unused must be static, every-step or none, got {unused!r}")
    kwargs: dict[str, Any] = {"bucket_cap_mb": bucket_mb, "gradient_as_bucket_view": True,
                              "static_graph": unused == "static", "find_unused_parameters": unused == "every-step"}
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in accepted:  # torch >= 2.14 renamed broadcast_buffers
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(PhaseForward(module), **kwargs)


@contextlib.contextmanager
def quiet_stride_warnings(active: bool = True) -> Iterator[None]:
    """Silence, inside the block only, DDP's "Grad strides do not match bucket view strides": the gradient of a 1x1
    convolution's weight ``[O, I, 1, 1]`` may come back with strides ``(I, 1, I, I)`` where the parameter has
    ``(I, 1, 1, 1)``, the same memory layout (only size-1 dims differ), which DDP's literal comparison reports."""
    if not active:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        yield


def all_reduce_mean_values(values: dict[str, Any]) -> None:
    """Replace each tensor of ``values`` (scalars, the same keys in every process) by its mean over the processes,
    in one all-reduce (a no-op in one process)."""
    if not is_distributed() or not values:
        return
    keys = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[k]).float().reshape(()) for k in keys])
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    for key, value in zip(keys, stacked):
        values[key] = value


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
