"""DiT's sampler: ancestral DDPM sampling (Ho et al., 2020, arXiv 2006.11239) with the learned variance of improved
DDPM (Nichol & Dhariwal, 2021, arXiv 2102.09672), over a respaced schedule, as DiT (Peebles & Xie, 2023, arXiv
2212.09748) samples with ``create_diffusion("250")``.

The training schedule is the ``ddpm`` loss's (:mod:`repae_losses.ddpm`: ``num_timesteps`` linear betas). Respacing
keeps ``steps`` of its steps, evenly strided from the first to the last (stride ``(T - 1) / (steps - 1)``, positions
accumulated and rounded half-to-even, ADM's rule), and derives the betas of the shorter chain from the kept
cumulative products: ``beta'_j = 1 - abar[k_j] / abar[k_{j-1}]`` (``abar[k_{-1}] = 1``). The denoiser sees the
original step ``k_j``.

Step ``j = steps-1 .. 0``: the prediction ``[eps, v]`` gives ``x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps`` (not
clipped, as DiT on latents), the posterior mean of ``q(x_{j-1} | x_j, x0)``, and the log-variance
``f log beta'_j + (1 - f) log beta~'_j`` with ``f = (v + 1) / 2``; then ``x <- mean + exp(logvar / 2) eps`` except
at ``j = 0`` (the mean). Guidance (when ``t = k_j / (T - 1)`` lies in the interval; ``t = 1`` is the noisiest step)
mixes the first ``cfg_channels`` channels of the noise prediction (3 by default, the DiT convention); the other noise
channels and the variance channels come from the conditional pass.
"""

from __future__ import annotations

import torch
from repae_losses.ddpm import DDPMTransport
from torch import Tensor

from repae import BuildContext, UserError
from repae_samplers import DDPMSamplerConfig
from repae_samplers.base import NoiseSource, Sampler, VelocityField

__all__ = ["DDPMSampler", "RespacedSchedule", "build_ddpm_sampler", "respaced_steps"]


def respaced_steps(num_timesteps: int, steps: int) -> list[int]:
    """The ``steps`` training steps kept by respacing, ascending: 0 first, ``num_timesteps - 1`` last (steps >= 2)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    stride = 1.0 if steps == 1 else (num_timesteps - 1) / (steps - 1)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


class RespacedSchedule(DDPMTransport):
    """A :class:`~repae_losses.ddpm.DDPMTransport` over the kept steps of a longer linear schedule.

    The base schedule and the posterior / learned-variance formulas (:meth:`q_posterior`, :meth:`p_mean_logvar`) are
    the ``ddpm`` loss's; only the tables are re-derived from the respaced betas. Index ``j`` of the tables is the
    ``j``-th kept step; :attr:`timesteps` maps it to the training step the denoiser sees.
    """

    def __init__(self, num_timesteps: int, steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__(num_timesteps, beta_start, beta_end)
        self.base_timesteps = num_timesteps
        self.timesteps = respaced_steps(num_timesteps, steps)
        kept = self.alphas_cumprod[self.timesteps]
        previous = torch.cat([kept.new_ones(1), kept[:-1]])
        self._set_betas(1.0 - kept / previous)

    def _set_betas(self, betas: Tensor) -> None:
        """The tables :meth:`q_posterior` and :meth:`p_mean_logvar` read, from a (respaced) beta sequence."""
        self.num_timesteps = len(betas)
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_recip_alphas_cumprod = torch.rsqrt(self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        posterior = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior[1:2], posterior[1:]])) \
            if len(betas) > 1 else torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / one_minus
        # fixed-large variance: beta, with the first entry replaced by the posterior variance of step 1 (ADM)
        large = torch.cat([posterior[1:2], betas[1:]]) if len(betas) > 1 else betas
        self.fixed_large_log_variance = torch.log(large)

    def __repr__(self) -> str:
        return f"RespacedSchedule({self.num_timesteps} of {self.base_timesteps} steps)"


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling over a respaced schedule (registry name ``ddpm``)."""

    stochastic = True
    keep_extra_channels = True

    def __init__(self, config: DDPMSamplerConfig) -> None:
        super().__init__(config)
        self.schedule = RespacedSchedule(config.num_timesteps, config.steps, config.beta_start, config.beta_end)

    def time_of(self, timestep: int) -> float:
        """The guidance-interval time of training step ``timestep``: ``timestep / (T - 1)`` (1 = noisiest)."""
        return timestep / (self.config.num_timesteps - 1)

    def integrate(self, field: VelocityField, x: Tensor, noise: NoiseSource) -> Tensor:
        schedule, channels = self.schedule, x.shape[1]
        for j in reversed(range(len(schedule.timesteps))):
            k = schedule.timesteps[j]
            pred = field(x, torch.tensor(float(k), dtype=torch.float64), field.guided_at(self.time_of(k)))
            eps, var_values = pred[:, :channels], pred[:, channels:]
            mode = self.variance_mode(pred.shape[1], channels)
            index = torch.full((x.shape[0],), j, dtype=torch.long)
            if mode == "learned":
                mean, logvar = schedule.p_mean_logvar(eps, var_values, x, index)
            else:
                mean, _ = schedule.p_mean_logvar(eps, torch.zeros_like(eps), x, index)
                table = schedule.fixed_large_log_variance if mode == "fixed-large" \
                    else schedule.posterior_log_variance_clipped
                logvar = schedule.lookup(table, index, x)
            x = mean if j == 0 else mean + torch.exp(0.5 * logvar) * noise.draw()
        return x

    def variance_mode(self, predicted: int, channels: int) -> str:
        """``learned``, ``fixed-large`` or ``fixed-small`` for a prediction of ``predicted`` channels."""
        mode = self.config.variance
        if predicted not in (channels, 2 * channels):
            raise UserError(f"ddpm sampler: expected a prediction with {channels} (noise) or {2 * channels} (noise "
                            f"and variance) channels, got {predicted}")
        if mode == "learned" and predicted != 2 * channels:
            raise UserError(f"ddpm sampler: variance 'learned' needs {2 * channels} prediction channels (noise and "
                            f"variance), got {predicted}; set sampler.variance to fixed-large or fixed-small, or use "
                            "a denoiser with learn_sigma: true")
        if mode == "auto":
            return "learned" if predicted == 2 * channels else "fixed-large"
        return mode


def build_ddpm_sampler(config: DDPMSamplerConfig, context: BuildContext) -> DDPMSampler:
    """Registry factory of ``ddpm``."""
    return DDPMSampler(config)
