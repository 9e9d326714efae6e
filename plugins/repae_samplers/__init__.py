"""Samplers (kind ``sampler``): noise at ``t = 1`` to latents at ``t = 0`` with a denoiser, in the normalised latent
space (de-normalise with the latent normaliser, then decode; :func:`repae.generate.decode_latents`).

- ``euler``: the probability-flow ODE integrated with Euler steps (REPA / REPA-E ``euler_sampler``);
- ``heun``: the same with Heun's second-order correction (``euler_sampler(heun=True)``);
- ``euler-maruyama``: the SDE REPA and REPA-E evaluate with (``euler_maruyama_sampler``; SiT, Ma et al., 2024,
  arXiv 2401.08740): 250 steps on ``t = 1 .. 0.04``, then a deterministic last step to ``t = 0``;
- ``ddpm``: DiT's ancestral sampler (Ho et al., 2020, arXiv 2006.11239; learned variance of Nichol & Dhariwal,
  2021, arXiv 2102.09672) over the respaced 1000-step linear schedule, for epsilon-predicting denoisers (``dit``).

All use classifier-free guidance (Ho & Salimans, 2022, arXiv 2207.12598) restricted to a time interval
(Kynkäänniemi et al., 2024, arXiv 2404.07724), as REPA-E (Leng et al., 2025, arXiv 2504.10483) samples.

A built sampler is called as ``sampler(denoiser, noise, labels, *, cfg_scale=None, guidance=None, generator=None)``;
see :class:`repae_samplers.base.Sampler`. This module only declares configs and registers them; it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from repae import FieldError, hookimpl, option

__all__ = ["DDPMSamplerConfig", "GuidanceConfig", "ODESamplerConfig", "SDESamplerConfig"]


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
        for name in ("guidance_low", "guidance_high"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FieldError(name, f"must be in [0, 1] (a time t; t = 1 is noise), got {getattr(self, name)}")
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"guidance_low {self.guidance_low} is above guidance_high {self.guidance_high}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise FieldError("cfg_channels", f"must be >= 1 or null, got {self.cfg_channels}")


@dataclass(kw_only=True)
class ODESamplerConfig(GuidanceConfig):
    """Config of the ODE samplers ``euler`` and ``heun``: ``steps`` intervals of ``linspace(1, 0, steps + 1)``."""

    steps: int = option(50, doc="integration steps (Heun: 2 * steps - 1 model evaluations, doubled where guided)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise FieldError("steps", f"must be >= 1, got {self.steps}")


@dataclass(kw_only=True)
class SDESamplerConfig(GuidanceConfig):
    """Config of ``euler-maruyama``: ``steps - 1`` stochastic steps on ``linspace(1, last_step, steps)``, then one
    deterministic step from ``last_step`` to 0: ``steps`` model evaluations (doubled where guided)."""

    steps: int = option(250, doc="model evaluations: steps - 1 Euler-Maruyama steps, then the deterministic last step")
    last_step: float = option(0.04, doc="time where the stochastic grid ends; the step to t = 0 takes the mean only")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise FieldError("steps", f"must be >= 1, got {self.steps}")
        if not 0.0 < self.last_step < 1.0:
            raise FieldError("last_step", f"must be in (0, 1), got {self.last_step}")


@dataclass(kw_only=True)
class DDPMSamplerConfig(GuidanceConfig):
    """Config of ``ddpm``: ancestral sampling over ``steps`` of the ``num_timesteps``-step linear schedule (ADM
    respacing), for a denoiser predicting the noise (and, with ``2C`` output channels, the variance)."""

    steps: int = option(250, doc="sampling steps, respaced evenly over the num_timesteps training steps (DiT: 250)")
    num_timesteps: int = option(1000, doc="training diffusion steps T (as the ddpm loss)")
    beta_start: float = option(1e-4, doc="first beta for T = 1000 (scaled by 1000 / T, as the ddpm loss)")
    beta_end: float = option(0.02, doc="last beta for T = 1000 (scaled by 1000 / T, as the ddpm loss)")
    variance: Literal["auto", "learned", "fixed-large", "fixed-small"] = option(
        "auto", doc="learned (2C output channels, DiT), fixed-large (beta), fixed-small (posterior); auto: learned "
        "when the prediction has 2C channels, else fixed-large"
    )
    cfg_channels: int | None = option(
        3, doc="guide only the first N latent channels (3: the DiT convention); null: all latent channels"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_timesteps < 2:
            raise FieldError("num_timesteps", f"must be >= 2, got {self.num_timesteps}")
        if not 1 <= self.steps <= self.num_timesteps:
            raise FieldError("steps", f"must be in 1..num_timesteps ({self.num_timesteps}), got {self.steps}")
        if not 0 < self.beta_start < self.beta_end or self.beta_end * 1000 / self.num_timesteps >= 1:
            raise ValueError(f"need 0 < beta_start < beta_end and beta_end * 1000 / num_timesteps < 1, got "
                             f"{self.beta_start}, {self.beta_end}")


_MODULE = "repae_samplers.ode"


@hookimpl
def register_components(register: Any) -> None:
    """Register the ODE, SDE and DDPM samplers."""
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
    register(
        "sampler",
        "euler-maruyama",
        summary="SDE, Euler-Maruyama steps on linspace(1, 0.04) then a deterministic last step (REPA-E evaluation)",
        config=SDESamplerConfig,
        factory="repae_samplers.sde:build_euler_maruyama",
    )
    register(
        "sampler",
        "ddpm",
        summary="DiT's ancestral DDPM sampler: respaced linear schedule, learned variance, 3-channel guidance",
        config=DDPMSamplerConfig,
        factory="repae_samplers.ddpm:build_ddpm_sampler",
    )
