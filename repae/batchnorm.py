"""Batch normalisation whose training statistics are those of the global batch: one primitive for every BatchNorm that
needs it (REPA-E's latent BatchNorm, the PatchGAN discriminator's BatchNorms).

Under ``torch.distributed`` each process holds a shard of the global batch; with :class:`GlobalBatchNorm` the mean and
variance are computed over all shards (sums all-reduced in float64, two passes: mean, then centred squares), and the
gradient through them is all-reduced as well, so N processes with B/N samples each compute exactly what one process
with B samples does (the engine's exactness guarantee; ``tests/test_train_engine.py`` checks 2 processes = 1). In a
single process, or in eval mode, it is ``torch.nn.functional.batch_norm`` (bitwise ``nn.BatchNorm2d``).

Why not ``nn.SyncBatchNorm``: it needs CUDA and works on ``[B, C, ...]`` only inside DDP-wrapped modules; this runs on
the gloo backend too (CPU tests) and anywhere in a step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GlobalBatchNorm", "all_reduce_sum_autograd"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too (the gradient of a sum that
    every process uses)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce_sum_autograd(x: Tensor) -> Tensor:
    """``x`` summed over all processes (itself in a single process), differentiable: the gradient is summed over
    processes too."""
    return _AllReduceSum.apply(x) if _distributed() else x  # type: ignore[no-any-return]


class GlobalBatchNorm(nn.Module):
    """``BatchNorm`` over every dimension but the second (``[B, C, ...]``), statistics of the global batch.

    - training mode: normalise with the batch mean and biased variance, then ``running <- (1 - momentum) * running +
      momentum * batch`` (unbiased variance for ``running_var``), ``num_batches_tracked += 1``; distributed with
      ``sync``: the batch is the global batch;
    - eval mode: normalise with the running statistics.

    Computed in float32 at least (float64 stays float64); the output has the input's dtype. Buffers and parameters
    carry ``nn.BatchNorm2d``'s names (``weight``, ``bias`` when ``affine``; ``running_mean``, ``running_var``,
    ``num_batches_tracked``), so its state dicts load as they are.
    """

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, sync: bool = True
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.sync = sync
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.running_mean: Tensor
        self.running_var: Tensor
        self.num_batches_tracked: Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected [B, {self.num_features}, ...], got {tuple(x.shape)}")
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        if not self.training:
            out = F.batch_norm(h, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        elif self.sync and _distributed():
            out = self._global(h, weight, bias)
        else:
            self.num_batches_tracked.add_(1)
            out = F.batch_norm(h, self.running_mean, self.running_var, weight, bias, True, self.momentum, self.eps)
        return out.to(x.dtype)

    def _global(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        dims = [0, *range(2, x.ndim)]
        shape = (1, -1, *([1] * (x.ndim - 2)))
        # every process holds an equal shard of the global batch (the engine's step order), so the global count is
        # known on the host: no device-to-host synchronisation
        n = float(x.numel() // x.shape[1] * dist.get_world_size())
        mean = (_AllReduceSum.apply(x.sum(dims).double()) / n).to(x.dtype)
        centred = x - mean.view(shape)
        var = (_AllReduceSum.apply(centred.square().sum(dims).double()) / n).to(x.dtype)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if weight is not None and bias is not None:
            out = out * weight.view(shape) + bias.view(shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            unbiased = var.detach() * (n / max(n - 1.0, 1.0))
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"sync={self.sync}")
