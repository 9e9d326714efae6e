"""Euler–Maruyama SDE sampler for flow-matching models (SiT, Ma et al., 2024, arXiv 2401.08740), as REPA (arXiv
2410.06940) and REPA-E (arXiv 2504.10483) evaluate: their ``euler_maruyama_sampler``.

On the linear path ``x_t = (1 - t) x_0 + t eps`` (``t = 1`` noise) the reverse SDE with diffusion ``g(t)^2 = 2 t``
(SiT's ``diffusion_form = "sigma"``) has the drift ``d = v - (g^2 / 2) s`` where the score comes from the velocity:
``s = (alpha / alpha' v - x) / (sigma^2 - alpha / alpha' sigma' sigma)`` with ``alpha = 1 - t``, ``sigma = t``, i.e.
``s = (-(1 - t) v - x) / t`` (``= -eps_hat / t``, so ``d = v + eps_hat``).

Grid: ``linspace(1, last_step, steps)`` then ``0`` (float64). On each of the first ``steps - 1`` intervals
``x <- x + dt d(x, t_cur) + sqrt(g^2(t_cur)) sqrt(|dt|) eps``; the last interval (``last_step -> 0``) is
deterministic, ``x <- x + dt d`` (the mean, no noise). Guidance mixes the velocity, which equals mixing the drift
(the drift is affine in ``v`` at fixed ``x`` and ``t``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from repae import BuildContext
from repae_samplers import SDESamplerConfig
from repae_samplers.base import NoiseSource, Sampler, VelocityField

__all__ = ["EulerMaruyamaSampler", "build_euler_maruyama", "linear_drift", "sde_time_grid"]


def sde_time_grid(steps: int, last_step: float = 0.04, device: torch.device | str | None = None) -> Tensor:
    """``linspace(1, last_step, steps)`` followed by ``0``, float64 (``steps + 1`` times)."""
    grid = torch.linspace(1.0, last_step, steps, dtype=torch.float64, device=device)
    return torch.cat([grid, grid.new_zeros(1)])


def linear_drift(v: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """Drift ``v - (g^2 / 2) score`` of the reverse SDE on the linear path, ``g^2 = 2 t``, score from the velocity."""
    alpha, d_alpha, sigma, d_sigma = 1.0 - t, -1.0, t, 1.0
    ratio = alpha / d_alpha
    score = (ratio * v - x) / (sigma * sigma - ratio * d_sigma * sigma)
    diffusion = 2.0 * t
    return v - 0.5 * diffusion * score


class EulerMaruyamaSampler(Sampler):
    """Euler–Maruyama integration of the reverse SDE, mean-only last step (registry name ``euler-maruyama``)."""

    stochastic = True

    def integrate(self, field: VelocityField, x: Tensor, noise: NoiseSource) -> Tensor:
        t = sde_time_grid(self.config.steps, self.config.last_step, x.device)
        last = len(t) - 2
        for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
            dt = t_next - t_cur
            drift = linear_drift(field(x, t_cur, field.guided_at(t_cur)), x, t_cur)
            if i < last:
                x = x + drift * dt + torch.sqrt(2.0 * t_cur) * torch.sqrt(dt.abs()) * noise.draw()
            else:
                x = x + dt * drift
        return x


def build_euler_maruyama(config: SDESamplerConfig, context: BuildContext) -> EulerMaruyamaSampler:
    """Registry factory of ``euler-maruyama``."""
    return EulerMaruyamaSampler(config)
