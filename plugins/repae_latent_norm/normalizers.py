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

import torch
from torch import Tensor, nn

from repae import (
    BuildContext,
    GlobalBatchNorm,
    HasLatentStatistics,
    LatentStatistics,
    UserError,
    adopt_latent_norm_state,
    load_into,
    supports,
)
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


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------


class LatentBatchNorm(GlobalBatchNorm):
    """Non-affine latent BatchNorm (REPA-E): :class:`repae.GlobalBatchNorm` with ``affine=False``, numerically
    ``nn.BatchNorm2d(C, eps, momentum, affine=False)`` in one process and the global batch's statistics under
    ``torch.distributed`` (``sync``).

    Buffers ``running_mean``, ``running_var`` and ``num_batches_tracked`` carry the names of ``BatchNorm2d`` (and of
    the ``bn.*`` entries of REPA-E SiT checkpoints), so those load as they are.

    - training mode: batch statistics, running statistics updated; eval mode: running statistics;
    - :meth:`denormalize`: ``x * sqrt(running_var) + running_mean``, without ``eps``, exactly as REPA-E decodes its
      samples (``eps = 1e-4`` against variances of order 1 to 100 changes the result by < 5e-5 relative).

    Capabilities: :class:`repae.AffineNormalizer` (:meth:`latent_statistics`) and :class:`repae.LoadsLatentNormState`
    (:meth:`adopt_latent_norm_state`: a REPA-E denoiser checkpoint's ``bn.*``).
    """

    def __init__(
        self, channels: int, *, eps: float = 1e-4, momentum: float = 0.1, sync: bool = True, init: str = "auto"
    ) -> None:
        super().__init__(channels, eps=eps, momentum=momentum, affine=False, sync=sync)
        self.init = init
        self.init_source = "none"
        """Where the running statistics came from: ``none``, ``tokenizer``, ``denoiser-checkpoint`` or ``state``."""

    # -- the contract ----------------------------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        """:attr:`repae.LatentNormalizer.channels` (``num_features`` of the BatchNorm)."""
        return self.num_features

    def normalize(self, z: Tensor) -> Tensor:
        """Latents ``[B, C, ...]`` to the normalised space (batch statistics in training mode)."""
        return self(z)

    def denormalize(self, x: Tensor) -> Tensor:
        """``x * sqrt(running_var) + running_mean`` (no ``eps``, as REPA-E): normalised samples back to latents."""
        self._check(x)
        dtype = _compute_dtype(x.dtype)
        std = _per_channel(self.running_var.to(dtype).sqrt(), x.ndim)
        mean = _per_channel(self.running_mean.to(dtype), x.ndim)
        return (x.to(dtype) * std + mean).to(x.dtype)

    def latent_statistics(self) -> LatentStatistics:
        """:class:`repae.AffineNormalizer`: mean ``running_mean``, std ``sqrt(running_var)`` (as REPA-E's
        ``save_vae_weights.py``), scaling factor 1."""
        return LatentStatistics(self.running_mean.float().clone(), self.running_var.float().sqrt(),
                                source="latent BatchNorm (running_mean, sqrt(running_var))")

    # -- initialisation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_stats(self, mean: Tensor, std: Tensor, *, source: str = "tokenizer") -> None:
        """REPA-E's ``init_bn``: ``running_mean = mean``, ``running_var = std^2``, counter reset.

        ``mean`` and ``std`` are the tokenizer's latent statistics (``normalized = (z - mean) / std``), any shape with
        ``C`` elements."""
        if mean.numel() != self.num_features or std.numel() != self.num_features:
            raise UserError(
                f"latent statistics have {mean.numel()} / {std.numel()} channels (mean / std) but the latent "
                f"BatchNorm has {self.num_features}: set latent_norm.channels or use the tokenizer's statistics"
            )
        self.running_mean.copy_(mean.detach().reshape(-1))
        self.running_var.copy_(std.detach().reshape(-1).double().square())
        self.num_batches_tracked.zero_()
        self.init_source = source

    def load_latent_norm_state(
        self, state: Mapping[str, Tensor], *, what: str = "latent BatchNorm state", source: str = "state"
    ) -> None:
        """Load ``running_mean``/``running_var``/``num_batches_tracked`` (optionally prefixed ``bn.``, as in REPA-E
        SiT checkpoints). A missing, unexpected or mis-shaped key raises an error naming it. Values are copied (and
        cast: REPA-E checkpoints may hold other float dtypes)."""
        stripped = {k[len(_STATE_PREFIX):] if k.startswith(_STATE_PREFIX) else k: v for k, v in state.items()}
        if "num_batches_tracked" not in stripped:  # optional in some exports
            stripped["num_batches_tracked"] = self.num_batches_tracked.new_zeros(())
        load_into(self, stripped, strict=True, what=what)
        self.init_source = source

    def adopt_latent_norm_state(self, state: Mapping[str, Tensor], *, source: str) -> bool:
        """:class:`repae.LoadsLatentNormState`: adopt the ``bn.*`` buffers a denoiser loaded from a REPA-E checkpoint.

        The recipe builds the normaliser before the denoiser, so the trainer calls this (through
        :func:`repae.adopt_latent_norm_state`) once both exist, before the EMA copy is taken. Returns whether the state was used: with ``init: auto`` or
        ``denoiser-checkpoint`` when there is one; ``init: denoiser-checkpoint`` without one is an error."""
        if self.init not in ("auto", "denoiser-checkpoint"):
            return False
        if not state:
            if self.init == "denoiser-checkpoint":
                raise UserError(
                    "latent_norm.init is 'denoiser-checkpoint' but the denoiser loaded no bn.* buffers (its weights "
                    "are not a REPA-E checkpoint, or none were loaded): set latent_norm.init to 'tokenizer' or 'auto'"
                )
            return False
        self.load_latent_norm_state(state, what=f"latent BatchNorm buffers of {source}", source="denoiser-checkpoint")
        return True

    def _check(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[1] != self.num_features:
            raise ValueError(f"expected latents [B, {self.num_features}, ...], got {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}, "
                f"init={self.init_source}")


class FixedScale(nn.Module):
    """``normalize(z) = (z - shift) * scale``; ``denormalize(x) = x / scale + shift``. No state; any channels."""

    channels = None

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

    def latent_statistics(self) -> LatentStatistics:
        """:class:`repae.AffineNormalizer`: a global scale (``scaling_factor``) and shift (``shift_factor``)."""
        return LatentStatistics(None, None, self.scale, self.shift or None, source="latent normaliser fixed-scale")

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
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", mean.detach().reshape(-1).float().clone())
        self.register_buffer("std", std.detach().reshape(-1).float().clone())

    @property
    def channels(self) -> int:
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

    def latent_statistics(self) -> LatentStatistics:
        """:class:`repae.AffineNormalizer`: the fixed per-channel mean and std, ``scaling_factor`` the multiplier."""
        return LatentStatistics(self.mean.float().clone(), self.std.float().clone(), self.multiplier,
                                source="latent normaliser channel-stats")

    def _check(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[1] != self.channels:
            raise ValueError(f"expected latents [B, {self.channels}, ...], got {tuple(z.shape)}")

    def extra_repr(self) -> str:
        return f"{self.channels}, multiplier={self.multiplier}"


# ---------------------------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------------------------


def _tokenizer_stats(context: BuildContext) -> LatentStatistics | None:
    """The tokenizer's latent statistics as per-channel ``mean``/``std`` (``normalized = (z - mean) / std``): a
    ``scaling_factor`` is folded into ``std``, and a global ``shift_factor``/``scaling_factor`` (FLUX's and SD3.5's
    VAEs) is spread over the tokenizer's channels."""
    tokenizer = context.tokenizer
    stats = tokenizer.latent_stats if supports(tokenizer, HasLatentStatistics) else None
    if stats is None or stats.is_empty or stats.scaling_factor == 1.0 and stats.mean is not None:
        return stats
    scale = float(stats.scaling_factor)
    if stats.mean is not None and stats.std is not None:
        return LatentStatistics(stats.mean, stats.std / scale, source=stats.source)
    channels = int(tokenizer.latent_channels)
    return LatentStatistics(torch.full((channels,), float(stats.shift_factor or 0.0)),
                            torch.full((channels,), 1.0 / scale), source=stats.source)


def build_batchnorm(config: BatchNormConfig, context: BuildContext) -> LatentBatchNorm:
    """Registry factory of ``batchnorm``. Initial running statistics, by ``config.init``:

    - ``auto``: the ``latent_norm_state`` of an already built denoiser, else the tokenizer's latent statistics, else
      mean 0 / variance 1 (a denoiser built later is adopted through :meth:`LatentBatchNorm.adopt_latent_norm_state`);
    - ``tokenizer``: the tokenizer's latent statistics (an error when it has none);
    - ``denoiser-checkpoint``: the denoiser's ``bn.*`` buffers (adopted once the denoiser is built);
    - ``none``: mean 0 / variance 1.

    Nothing is initialised when ``context.load_weights`` is false (``meta`` dry runs).
    """
    norm = LatentBatchNorm(config.channels, eps=config.eps, momentum=config.momentum, sync=config.sync,
                           init=config.init)
    if not context.load_weights or config.init == "none":
        return norm
    if context.denoiser is not None and adopt_latent_norm_state(norm, context.denoiser):
        return norm
    if config.init in ("auto", "tokenizer"):
        stats = _tokenizer_stats(context)
        if stats is not None and stats.mean is not None and stats.std is not None:
            norm.init_from_stats(stats.mean, stats.std)
        elif config.init == "tokenizer":
            raise UserError(
                "latent_norm.init is 'tokenizer' but the tokenizer has no latent statistics: give the tokenizer a "
                "latent_stats file (tokenizer.latent_stats), or set latent_norm.init to 'auto' or 'none'"
            )
    return norm


def build_fixed_scale(config: FixedScaleConfig, context: BuildContext) -> FixedScale:
    """Registry factory of ``fixed-scale``."""
    return FixedScale(config.scale, config.shift)


def build_channel_stats(config: ChannelStatsConfig, context: BuildContext) -> ChannelStats:
    """Registry factory of ``channel-stats``: statistics from the config, else from the tokenizer. On ``meta`` dry
    runs without statistics the shape comes from the tokenizer."""
    tokenizer = context.tokenizer
    if config.mean is not None and config.std is not None:
        mean, std = torch.tensor(config.mean, dtype=torch.float32), torch.tensor(config.std, dtype=torch.float32)
        channels = getattr(tokenizer, "latent_channels", None) if tokenizer is not None else None
        if channels is not None and int(channels) != mean.numel():
            raise UserError(f"latent_norm.mean/std have {mean.numel()} channels but the tokenizer has {channels} "
                            "latent channels: give one value per latent channel")
        return ChannelStats(mean, std, multiplier=config.multiplier)
    stats = _tokenizer_stats(context)
    if stats is None or stats.mean is None or stats.std is None:
        if not context.load_weights and tokenizer is not None:  # dry run: shapes only
            c = int(tokenizer.latent_channels)
            return ChannelStats(torch.zeros(c), torch.ones(c), multiplier=config.multiplier)
        raise UserError(
            "normalizer 'channel-stats' needs per-channel statistics: set latent_norm.mean and latent_norm.std, or "
            "give the tokenizer a latent_stats file (tokenizer.latent_stats)"
        )
    return ChannelStats(stats.mean, stats.std, multiplier=config.multiplier)
