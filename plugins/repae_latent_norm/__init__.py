"""Latent normalisers (kind ``normalizer``, recipe slot ``latent_norm``): how tokenizer latents are mapped to the space
the denoiser works in, and back before decoding.

- ``batchnorm``: the non-affine latent BatchNorm of REPA-E (Leng et al., 2025, arXiv 2504.10483): batch statistics of
  the global batch in training mode, running statistics otherwise, de-normalisation with the running statistics;
- ``fixed-scale``: one global scale and shift, ``(z - shift) * scale`` (the SD-VAE ``0.18215`` of LDM/DiT/SiT/REPA);
- ``channel-stats``: fixed per-channel statistics, ``(z - mean) / std * multiplier`` (LightningDiT).

This module only declares configs and registers them; it imports no torch. The modules live in
:mod:`repae_latent_norm.normalizers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from repae import BuildContext, FieldError, hookimpl, option

__all__ = ["BatchNormConfig", "ChannelStatsConfig", "FixedScaleConfig"]

_CHANNELS_DOC = "latent channels; derived from the tokenizer (or a latent cache) unless set"


def _derive_channels(context: BuildContext) -> Mapping[str, Any]:
    channels = context.latent_channels()
    return {"channels": channels} if channels is not None else {}


@dataclass(kw_only=True)
class BatchNormConfig:
    """Config of ``batchnorm``: ``BatchNorm2d(C, eps, momentum, affine=False)`` with REPA-E's initialisation."""

    channels: int = option(4, doc=_CHANNELS_DOC)
    eps: float = option(1e-4, doc="added to the variance when normalising (not when de-normalising, as in REPA-E)")
    momentum: float = option(0.1, doc="running = (1 - momentum) * running + momentum * batch statistic")
    init: Literal["auto", "tokenizer", "denoiser-checkpoint", "none"] = option(
        "auto",
        doc="initial running stats: the denoiser checkpoint's bn.* buffers, else (auto) the tokenizer's latent "
        "statistics, else mean 0 / var 1",
    )
    sync: bool = option(True, doc="under torch.distributed, statistics of the global batch (SyncBatchNorm)")

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise FieldError("channels", f"must be >= 1, got {self.channels}")
        if self.eps <= 0:
            raise FieldError("eps", f"must be > 0, got {self.eps}")
        if not 0.0 < self.momentum <= 1.0:
            raise FieldError("momentum", f"must be in (0, 1], got {self.momentum}")

    def derive(self, context: BuildContext) -> Mapping[str, Any]:
        """``channels`` from the latents (see :func:`repae.BuildContext.latent_shape`)."""
        return _derive_channels(context)


@dataclass(kw_only=True)
class FixedScaleConfig:
    """Config of ``fixed-scale``: ``normalize(z) = (z - shift) * scale``, ``denormalize(x) = x / scale + shift``."""

    scale: float = option(0.18215, doc="global scale (0.18215: SD-VAE as in LDM, DiT, SiT and REPA)")
    shift: float = option(0.0, doc="global shift subtracted before scaling")

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise FieldError("scale", "must not be 0")


@dataclass(kw_only=True)
class ChannelStatsConfig:
    """Config of ``channel-stats``: ``normalize(z) = (z - mean) / std * multiplier`` per channel, no updates."""

    mean: list[float] | None = option(None, doc="per-channel mean; null: from the tokenizer's latent statistics")
    std: list[float] | None = option(None, doc="per-channel std; null: the std of the tokenizer's latent statistics")
    multiplier: float = option(1.0, doc="applied after standardising (LightningDiT latent_multiplier)")

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both mean and std, or neither (then the tokenizer's latent statistics are used)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise ValueError(f"mean and std need the same, non-zero length; got {len(self.mean)} and "
                                 f"{len(self.std)}")
            if any(s <= 0 for s in self.std):
                raise ValueError("every std must be > 0")
        if self.multiplier == 0:
            raise FieldError("multiplier", "must not be 0")


_MODULE = "repae_latent_norm.normalizers"


@hookimpl
def register_components(register: Any) -> None:
    """Register the three latent normalisers."""
    register(
        "normalizer",
        "batchnorm",
        summary="REPA-E latent BatchNorm: non-affine, global-batch statistics, running stats de-normalise samples",
        config=BatchNormConfig,
        factory=f"{_MODULE}:build_batchnorm",
    )
    register(
        "normalizer",
        "fixed-scale",
        summary="one global scale and shift, (z - shift) * scale (0.18215 for SD-VAE, as in DiT/SiT/REPA)",
        config=FixedScaleConfig,
        factory=f"{_MODULE}:build_fixed_scale",
    )
    register(
        "normalizer",
        "channel-stats",
        summary="fixed per-channel standardisation from the tokenizer's latent statistics (LightningDiT)",
        config=ChannelStatsConfig,
        factory=f"{_MODULE}:build_channel_stats",
    )
