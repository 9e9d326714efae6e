"""ODE samplers for flow-matching models (SiT, Ma et al., 2024, arXiv 2401.08740; as sampled by REPA, arXiv
2410.06940, and REPA-E, arXiv 2504.10483).

With the linear path ``x_t = (1 - t) x_0 + t eps`` the denoiser predicts the velocity ``dx/dt = eps - x_0``; samples
solve ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` on the grid ``linspace(1, 0, steps + 1)`` (float64).

- Euler: ``x <- x + (t_next - t_cur) v(x, t_cur)``: ``steps`` evaluations.
- Heun: the Euler predictor, then ``x <- x + dt (v(x, t_cur) + v(x_euler, t_next)) / 2`` on every step but the last
  (which stays Euler, avoiding an evaluation at ``t = 0``): ``2 steps - 1`` evaluations. The corrector evaluation
  uses the guidance decision of ``t_cur``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repae import BuildContext
from repae_samplers import ODESamplerConfig
from repae_samplers.base import NoiseSource, Sampler, VelocityField

__all__ = ["EulerSampler", "HeunSampler", "build_euler", "build_heun", "time_grid"]


def time_grid(steps: int, device: torch.device | str | None = None) -> Tensor:
    """``linspace(1, 0, steps + 1)`` in float64."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)


class EulerSampler(Sampler):
    """Euler integration of the probability-flow ODE (registry name ``euler``)."""

    def integrate(self, field: VelocityField, x: Tensor, noise: NoiseSource | None = None) -> Tensor:
        t = time_grid(self.config.steps, x.device)
        for t_cur, t_next in zip(t[:-1], t[1:]):
            x = x + (t_next - t_cur) * field(x, t_cur, field.guided_at(t_cur))
        return x


class HeunSampler(Sampler):
    """Heun (trapezoidal predictor-corrector) integration, last step Euler (registry name ``heun``)."""

    def integrate(self, field: VelocityField, x: Tensor, noise: NoiseSource | None = None) -> Tensor:
        t = time_grid(self.config.steps, x.device)
        last = self.config.steps - 1
        for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
            guided = field.guided_at(t_cur)
            d_cur = field(x, t_cur, guided)
            x_next = x + (t_next - t_cur) * d_cur
            if i < last:
                d_next = field(x_next, t_next, guided)
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
        return x


def build_euler(config: ODESamplerConfig, context: BuildContext) -> EulerSampler:
    """Registry factory of ``euler``."""
    return EulerSampler(config)


def build_heun(config: ODESamplerConfig, context: BuildContext) -> HeunSampler:
    """Registry factory of ``heun``."""
    return HeunSampler(config)
