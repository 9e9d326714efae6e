"""Samplers (kind ``sampler``): noise at ``t = 1`` to latents at ``t = 0`` with a velocity denoiser, in the normalised
latent space (de-normalise with the latent normaliser, then decode).

- ``euler``: the probability-flow ODE integrated with Euler steps (REPA / REPA-E ``euler_sampler``);
- ``heun``: the same with Heun's second-order correction (``euler_sampler(heun=True)``).

Both use classifier-free guidance (Ho & Salimans, 2022, arXiv 2207.12598) restricted to a time interval
(Kynkäänniemi et al., 2024, arXiv 2404.07724), as REPA-E (Leng et al., 2025, arXiv 2504.10483) samples.

A built sampler is called as ``sampler(denoiser, noise, labels, *, cfg_scale=None, guidance=None)``; see
:class:`repae_samplers.base.Sampler`. This module only declares configs and registers them; it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repae import hookimpl, option

__all__ = ["GuidanceConfig", "ODESamplerConfig"]


@dataclass(kw_only=True)
class GuidanceConfig:
    """Classifier-free guidance options shared by every sampler."""

    cfg_scale: float = option(1.0, doc="guidance scale s: v = v_uncond + s (v_cond - v_uncond); 1 = no guidance")
    guidance_low: float = option(0.0, doc="guidance only at times t >= guidance_low (t = 1 is noise)")
    guidance_high: float = option(1.0, doc="guidance only at times t <= guidance_high (REPA-E: 0.65 to 0.825)")
    cfg_channels: int | None = option(
        None, doc="guide only the first N latent channels, the rest from the conditional pass (DiT/SiT: 3); null: all"
    )

    def __post_init__(self) -> None:
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"guidance_low {self.guidance_low} is above guidance_high {self.guidance_high}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels must be >= 1 or null, got {self.cfg_channels}")


@dataclass(kw_only=True)
class ODESamplerConfig(GuidanceConfig):
    """Config of the ODE samplers ``euler`` and ``heun``: ``steps`` intervals of ``linspace(1, 0, steps + 1)``."""

    steps: int = option(50, doc="integration steps (Heun: 2 * steps - 1 model evaluations, doubled where guided)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


_MODULE = "repae_samplers.ode"


@hookimpl
def register_components(register: Any) -> None:
    """Register the ODE samplers."""
    register(
        "sampler",
        "euler",
        summary="probability-flow ODE, Euler steps on linspace(1, 0), interval classifier-free guidance",
        config=ODESamplerConfig,
        factory=f"{_MODULE}:build_euler",
    )
    register(
        "sampler",
        "heun",
        summary="probability-flow ODE, Heun steps (last step Euler), interval classifier-free guidance",
        config=ODESamplerConfig,
        factory=f"{_MODULE}:build_heun",
    )
