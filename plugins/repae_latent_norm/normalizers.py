"""Latent normalisers implementing :class:`repae.interfaces.LatentNormalizer`.

REPA-E (Leng et al., 2025, arXiv 2504.10483) normalises the latents of the VAE it trains end to end with a non-affine
``BatchNorm2d(C, eps=1e-4, momentum=0.1)``: batch statistics while the denoiser trains (so the normalisation follows
the changing latent distribution), running statistics otherwise, and the (EMA of the) running statistics to map
samples back to the VAE's latent space. The two fixed alternatives are the global scale of LDM (Rombach et al., 2022)
used by DiT, SiT and REPA, and the per-channel statistics of LightningDiT (Yao et al., 2025, arXiv 2501.01423).

All three are ``nn.Module``: ``forward`` is ``normalize``. Latents are ``[B, C, ...]`` (channels second).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from repae.errors import UserError
from repae_latent_norm import BatchNormConfig, ChannelStatsConfig, FixedScaleConfig

__all__ = [
    "ChannelStats",
    "FixedScale",
    "LatentBatchNorm",
    "build_batchnorm",
    "build_channel_stats",
    "build_fixed_scale",
]

_STATE_PREFIX = "bn."
"""Prefix of the latent BatchNorm buffers in REPA-E SiT checkpoints."""


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """A ``[C]`` tensor shaped to broadcast over ``[B, C, ...]`` of ``ndim`` dimensions."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are applied in at least float32 (float64 inputs stay float64)."""
    return torch.promote_types(dtype, torch.float32)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too (the gradient of a sum
    that every process uses), so that gradients through global-batch statistics match one big batch."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


class LatentBatchNorm(nn.Module):
    """Non-affine latent BatchNorm (REPA-E), numerically ``nn.BatchNorm2d(C, eps, momentum, affine=False)``.

    Buffers ``running_mean``, ``running_var`` and ``num_batches_tracked`` carry the names of ``BatchNorm2d`` (and of
    the ``bn.*`` entries of REPA-E SiT checkpoints), so those load as they are.

    - training mode: normalise with the batch mean and biased variance over every dimension but channels, then
      ``running <- (1 - momentum) * running + momentum * batch`` (unbiased variance for ``running_var``). Under
      ``torch.distributed`` with ``sync`` the statistics are those of the global batch (sums all-reduced, like
      ``SyncBatchNorm``; gradients through them are all-reduced as well), so ``N`` processes with ``B/N`` samples each
      equal one process with ``B``;
    - eval mode: normalise with the running statistics;
    - :meth:`denormalize`: ``x * sqrt(running_var) + running_mean``, without ``eps``, exactly as REPA-E decodes its
      samples (``eps = 1e-4`` against variances of order 1 to 100 changes the result by < 5e-5 relative).
    """

    def __init__(
        self, channels: int, *, eps: float = 1e-4, momentum: float = 0.1, sync: bool = True, init: str = "auto"
    ) -> None:
        super().__init__()
        self.num_features = channels
        self.eps = eps
        self.momentum = momentum
        self.sync = sync
        self.init = init
        self.init_source = "none"
        """Where the running statistics came from: ``none``, ``tokenizer``, ``denoiser-checkpoint`` or ``state``."""
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    # -- the interface ---------------------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> Tensor:
        return self.normalize(z)

    def normalize(self, z: Tensor) -> Tensor:
        """Latents ``[B, C, ...]`` to the normalised space (batch statistics in training mode)."""
        self._check(z)
        x = z.to(self.running_mean.dtype) if z.dtype != self.running_mean.dtype else z
        if not self.training:
            out = F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        elif self.sync and _distributed():
            out = self._global_batch_norm(x)
        else:
            self.num_batches_tracked.add_(1)
            out = F.batch_norm(
                x, self.running_mean, self.running_var, training=True, momentum=self.momentum, eps=self.eps
            )
        return out.to(z.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """``x * sqrt(running_var) + running_mean`` (no ``eps``, as REPA-E): normalised samples back to latents."""
        self._check(x)
        dtype = _compute_dtype(x.dtype)
        std = _per_channel(self.running_var.to(dtype).sqrt(), x.ndim)
        mean = _per_channel(self.running_mean.to(dtype), x.ndim)
        return (x.to(dtype) * std + mean).to(x.dtype)

    # -- global batch ----------------------------------------------------------------------------------------------
    def _global_batch_norm(self, x: Tensor) -> Tensor:
        """Training-mode BatchNorm over the batches of all processes (two passes: mean, then centred squares)."""
        dims = [0, *range(2, x.ndim)]
        # every process holds an equal shard of the global batch (the engine's step order), so the global count is
        # known on the host: no device-to-host sync
        n_float = float(x.numel() // x.shape[1] * dist.get_world_size())
        n = n_float
        total = _AllReduceSum.apply(x.sum(dims).double())
        mean = (total / n).to(x.dtype)
        centred = x - _per_channel(mean, x.ndim)
        var = (_AllReduceSum.apply(centred.square().sum(dims).double()) / n).to(x.dtype)
        out = centred * _per_channel(torch.rsqrt(var + self.eps), x.ndim)
        with torch.no_grad():
            unbiased = var.detach() * (n_float / max(n_float - 1.0, 1.0))
            m = self.momentum
            self.running_mean.copy_(m * mean.detach() + (1 - m) * self.running_mean)
            self.running_var.copy_(m * unbiased + (1 - m) * self.running_var)
            self.num_batches_tracked.add_(1)
        return out

    # -- initialisation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_stats(self, mean: Tensor, scale: Tensor, *, source: str = "tokenizer") -> None:
        """REPA-E's ``init_bn``: ``running_mean = mean``, ``running_var = (1 / scale)^2``, counter reset.

        ``mean`` and ``scale`` are the tokenizer's latent statistics (``normalized = (z - mean) * scale``), any
        shape with ``C`` elements."""
        if mean.numel() != self.num_features or scale.numel() != self.num_features:
            raise UserError(
                f"latent statistics have {mean.numel()} / {scale.numel()} channels (mean / scale) but the latent "
                f"BatchNorm has {self.num_features}: set latent_norm.channels or use the tokenizer's statistics"
            )
        self.running_mean.copy_(mean.detach().reshape(-1))
        self.running_var.copy_(scale.detach().reshape(-1).double().reciprocal().square())
        self.num_batches_tracked.zero_()
        self.init_source = source

    def load_latent_norm_state(
        self, state: Mapping[str, Tensor], *, what: str = "latent BatchNorm state", source: str = "state"
    ) -> None:
        """Load ``running_mean``/``running_var``/``num_batches_tracked`` (optionally prefixed ``bn.``, as in REPA-E
        SiT checkpoints). A missing, unexpected or mis-shaped key raises an error naming it. Values are copied (and
        cast: REPA-E checkpoints may hold other float dtypes)."""
        from repae.weights import load_into

        stripped = {k[len(_STATE_PREFIX):] if k.startswith(_STATE_PREFIX) else k: v for k, v in state.items()}
        if "num_batches_tracked" not in stripped:  # optional in some exports
            stripped["num_batches_tracked"] = self.num_batches_tracked.new_zeros(())
        load_into(self, stripped, strict=True, what=what)
        self.init_source = source

    def init_from_denoiser(self, denoiser: Any) -> bool:
        """Adopt the ``bn.*`` buffers a denoiser loaded from a REPA-E checkpoint (its ``latent_norm_state``).

        The recipe builds the normaliser before the denoiser, so the trainer (or a sampling script) calls this once
        both exist, before the EMA copy is taken. Returns whether the state was used: with ``init: auto`` or
        ``denoiser-checkpoint`` when the denoiser has one; ``init: denoiser-checkpoint`` without one is an error."""
        if self.init not in ("auto", "denoiser-checkpoint"):
            return False
        state = getattr(denoiser, "latent_norm_state", None)
        if not state:
            if self.init == "denoiser-checkpoint":
                raise UserError(
                    "latent_norm.init is 'denoiser-checkpoint' but the denoiser loaded no bn.* buffers (its weights "
                    "are not a REPA-E checkpoint, or none were loaded): set latent_norm.init to 'tokenizer' or 'auto'"
                )
            return False
        source = getattr(denoiser, "weights_source", None) or "the denoiser checkpoint"
        self.load_latent_norm_state(state, what=f"latent BatchNorm buffers of {source}", source="denoiser-checkpoint")
        return True

    def _check(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[1] != self.num_features:
            raise ValueError(f"expected latents [B, {self.num_features}, ...], got {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}, "
                f"init={self.init_source}")


class FixedScale(nn.Module):
    """``normalize(z) = (z - shift) * scale``; ``denormalize(x) = x / scale + shift``. No state."""

    def __init__(self, scale: float = 0.18215, shift: float = 0.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.shift = float(shift)

    def forward(self, z: Tensor) -> Tensor:
        return self.normalize(z)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.shift) * self.scale

    def denormalize(self, x: Tensor) -> Tensor:
        return x / self.scale + self.shift

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"


class ChannelStats(nn.Module):
    """``normalize(z) = (z - mean) / std * multiplier`` per channel; ``denormalize`` is the inverse. The statistics
    are fixed (buffers ``mean`` and ``std``, saved with checkpoints); training and eval mode behave the same."""

    def __init__(self, mean: Tensor, std: Tensor, *, multiplier: float = 1.0) -> None:
        super().__init__()
        if mean.numel() != std.numel():
            raise ValueError(f"mean has {mean.numel()} channels, std {std.numel()}")
        self.multiplier = float(multiplier)
        self.register_buffer("mean", mean.detach().reshape(-1).float().clone())
        self.register_buffer("std", std.detach().reshape(-1).float().clone())

    @property
    def num_features(self) -> int:
        return self.mean.numel()

    def forward(self, z: Tensor) -> Tensor:
        return self.normalize(z)

    def normalize(self, z: Tensor) -> Tensor:
        self._check(z)
        dtype = _compute_dtype(z.dtype)
        mean, std = _per_channel(self.mean.to(dtype), z.ndim), _per_channel(self.std.to(dtype), z.ndim)
        return ((z.to(dtype) - mean) / std * self.multiplier).to(z.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        self._check(x)
        dtype = _compute_dtype(x.dtype)
        mean, std = _per_channel(self.mean.to(dtype), x.ndim), _per_channel(self.std.to(dtype), x.ndim)
        return (x.to(dtype) / self.multiplier * std + mean).to(x.dtype)

    def _check(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[1] != self.num_features:
            raise ValueError(f"expected latents [B, {self.num_features}, ...], got {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return f"{self.num_features}, multiplier={self.multiplier}"


# ---------------------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------------------


def _latent_channels(channels: int | None, context: Any, name: str) -> int:
    if channels is not None:
        return channels
    tokenizer = (getattr(context, "built", None) or {}).get("tokenizer")
    if tokenizer is None or not hasattr(tokenizer, "latent_channels"):
        raise UserError(f"normalizer '{name}': channels is null and no tokenizer was built to take latent_channels "
                        "from: set latent_norm.channels (e.g. 4 for SD-VAE)")
    return int(tokenizer.latent_channels)


def _tokenizer_stats(context: Any) -> Any:
    tokenizer = (getattr(context, "built", None) or {}).get("tokenizer")
    return getattr(tokenizer, "latent_stats", None) if tokenizer is not None else None


def build_batchnorm(config: BatchNormConfig, context: Any) -> LatentBatchNorm:
    """Registry factory of ``batchnorm``. Initial running statistics, by ``config.init``:

    - ``auto``: the ``latent_norm_state`` of an already built denoiser, else the tokenizer's latent statistics, else
      mean 0 / variance 1 (a denoiser built later is adopted through :meth:`LatentBatchNorm.init_from_denoiser`);
    - ``tokenizer``: the tokenizer's latent statistics (an error when it has none);
    - ``denoiser-checkpoint``: the denoiser's ``bn.*`` buffers (through ``init_from_denoiser``);
    - ``none``: mean 0 / variance 1.

    Nothing is initialised when ``context.load_weights`` is false (``meta`` dry runs).
    """
    norm = LatentBatchNorm(
        _latent_channels(config.channels, context, "batchnorm"),
        eps=config.eps,
        momentum=config.momentum,
        sync=config.sync,
        init=config.init,
    )
    if not getattr(context, "load_weights", True) or config.init == "none":
        return norm
    denoiser = (getattr(context, "built", None) or {}).get("denoiser")
    if denoiser is not None and norm.init_from_denoiser(denoiser):
        return norm
    if config.init in ("auto", "tokenizer"):
        stats = _tokenizer_stats(context)
        if stats is not None:
            norm.init_from_stats(stats.mean, stats.scale)
        elif config.init == "tokenizer":
            raise UserError(
                "latent_norm.init is 'tokenizer' but the tokenizer has no latent statistics: give the tokenizer a "
                "latent_stats file (tokenizer.latent_stats), or set latent_norm.init to 'auto' or 'none'"
            )
    return norm


def build_fixed_scale(config: FixedScaleConfig, context: Any) -> FixedScale:
    """Registry factory of ``fixed-scale``."""
    return FixedScale(config.scale, config.shift)


def build_channel_stats(config: ChannelStatsConfig, context: Any) -> ChannelStats:
    """Registry factory of ``channel-stats``: statistics from the config, else from the tokenizer
    (``std = 1 / scale``). On ``meta`` dry runs without statistics the shape comes from the tokenizer."""
    if config.mean is not None and config.std is not None:
        mean, std = torch.tensor(config.mean, dtype=torch.float32), torch.tensor(config.std, dtype=torch.float32)
        tokenizer = (getattr(context, "built", None) or {}).get("tokenizer")
        channels = getattr(tokenizer, "latent_channels", None)
        if channels is not None and int(channels) != mean.numel():
            raise UserError(f"latent_norm.mean/std have {mean.numel()} channels but the tokenizer has {channels} "
                            "latent channels: give one value per latent channel")
        return ChannelStats(mean, std, multiplier=config.multiplier)
    stats = _tokenizer_stats(context)
    if stats is None:
        if not getattr(context, "load_weights", True):  # dry run: shapes only
            c = _latent_channels(None, context, "channel-stats")
            return ChannelStats(torch.zeros(c), torch.ones(c), multiplier=config.multiplier)
        raise UserError(
            "normalizer 'channel-stats' needs per-channel statistics: set latent_norm.mean and latent_norm.std, or "
            "give the tokenizer a latent_stats file (tokenizer.latent_stats)"
        )
    return ChannelStats(stats.mean, stats.scale.double().reciprocal().float(), multiplier=config.multiplier)
