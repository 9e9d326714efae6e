"""The order in which a run sees its data: a pure function of (seed, step), whatever the number of processes.

Each epoch is a seeded permutation of the dataset (the last incomplete global batch is dropped). The global batch of
step ``s`` is the slice ``[s' * B, (s' + 1) * B)`` of its epoch's permutation; it is cut into ``grad_accum``
micro-batches, and each micro-batch into one equal slice per process. So a run on 2 processes sees exactly the
samples a run on 1 process sees, and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from repae.errors import UserError

__all__ = ["StepOrder", "step_generator"]


def step_generator(seed: int, step: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` for step ``step`` of a run seeded ``seed`` (``stream`` separates independent uses).
    The same seed gives different numbers on a CUDA generator than on the CPU one."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))


@functools.lru_cache(maxsize=2)
def _epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: computed once, not once per step."""
    return torch.randperm(size, generator=step_generator(seed, epoch, stream=1))


@dataclass(frozen=True)
class StepOrder:
    """Which dataset indices each (step, micro-batch, rank) reads."""

    dataset_size: int
    batch_size: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        if self.batch_size > self.dataset_size:
            raise UserError(
                f"the global batch ({self.batch_size}) is larger than the dataset ({self.dataset_size} items); "
                "lower trainer.batch_size or use a larger dataset"
            )
        if self.batch_size % (self.grad_accum * self.world_size):
            raise UserError(
                f"trainer.batch_size {self.batch_size} must be divisible by grad_accum ({self.grad_accum}) x "
                f"processes ({self.world_size})"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.batch_size

    @property
    def local_micro_batch(self) -> int:
        return self.batch_size // (self.grad_accum * self.world_size)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        return _epoch_permutation(self.dataset_size, self.seed, epoch)

    def global_batch(self, step: int) -> torch.Tensor:
        """Indices of the whole global batch of ``step`` (every process can compute it)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def local_slice(self, micro: int) -> slice:
        """This process's positions inside the global batch for micro-batch ``micro``."""
        micro_size = self.batch_size // self.grad_accum
        start = micro * micro_size + self.rank * self.local_micro_batch
        return slice(start, start + self.local_micro_batch)

    def local_batches(self, start_step: int, end_step: int) -> Iterator[list[int]]:
        """Index lists of this process's micro-batches for steps ``start_step`` .. ``end_step - 1``, in order."""
        for step in range(start_step, end_step):
            indices = self.global_batch(step)
            for micro in range(self.grad_accum):
                yield indices[self.local_slice(micro)].tolist()
