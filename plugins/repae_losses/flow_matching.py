"""Flow matching with velocity prediction, in the time convention of REPA / REPA-E (t = 1 is pure noise).

SiT: Ma et al., "Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers",
arXiv 2401.08740; REPA: Yu et al., arXiv 2410.06940 (the ``linear``/``cosine`` paths and the ``lognormal`` time
weighting used by REPA-E).

Path ``x_t = alpha_t x0 + sigma_t eps``; the target is the velocity ``alpha'_t x0 + sigma'_t eps`` (``eps - x0`` on
the linear path). Loss: per-sample mean over C, H, W of ``(v_pred - v)^2``, averaged over the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from repae import BuildContext, Loss, StepContext
from repae_losses import FlowMatchingConfig
from repae_losses.common import per_sample_mean

__all__ = ["FlowMatchingLoss", "FlowMatchingTransport", "build_flow_matching", "velocity_mse"]


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device)


class FlowMatchingTransport:
    """:class:`repae.Transport` of flow matching: time sampling, ``x_t`` and the velocity target. The one linear-flow
    transport of repae (the ``linear`` path is SiT's / REPA-E's).

    ``t`` is float ``[B]`` in ``[0, 1]``; the denoiser receives it unchanged (no x1000).
    """

    discrete_steps: int | None = None

    def __init__(self, path: str = "linear", time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> None:
        if path not in ("linear", "cosine"):
            raise ValueError(f"unknown path {path!r}: linear or cosine")
        if time_sampling not in ("uniform", "logit-normal"):
            raise ValueError(f"unknown time_sampling {time_sampling!r}: uniform or logit-normal")
        self.path = path
        self.time_sampling = time_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)

    def sample_time(self, batch: int, *, generator: torch.Generator) -> Tensor:
        """``t`` ``[batch]`` on the generator's device: ``U[0, 1)``, or ``s = exp(mean + std N(0,1))`` mapped to ``s/(1+s)`` (linear)
        or ``2/pi atan(s)`` (cosine)."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=generator.device)
        s = torch.exp(self.logit_mean + self.logit_std * torch.randn(batch, generator=generator, device=generator.device))
        return s / (1 + s) if self.path == "linear" else (2 / math.pi) * torch.atan(s)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt`` (same shape as ``t``)."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        alpha, sigma, _, _ = self.coefficients(_expand(t, x0))
        return alpha * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        _, _, d_alpha, d_sigma = self.coefficients(_expand(t, x0))
        return d_alpha * x0 + d_sigma * noise

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def __repr__(self) -> str:
        extra = f", logit_mean={self.logit_mean}, logit_std={self.logit_std}" if self.time_sampling != "uniform" else ""
        return f"FlowMatchingTransport(path={self.path!r}, time_sampling={self.time_sampling!r}{extra})"


def velocity_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean over C, H, W of ``(prediction - target)^2`` in float32: ``[B]``.

    A prediction with twice the target's channels (a denoiser with learned sigma) is compared on its first half,
    as SiT does.
    """
    if prediction.shape[1] == 2 * target.shape[1]:
        prediction = prediction[:, : target.shape[1]]
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return per_sample_mean((prediction.float() - target.float()).square())


class FlowMatchingLoss(Loss):
    """The flow-matching objective; provides the step's :attr:`transport`. Terms: ``loss``."""

    needs_prediction = True

    def __init__(self, config: FlowMatchingConfig) -> None:
        super().__init__(config)
        self.transport = FlowMatchingTransport(config.path, config.time_sampling, config.logit_mean, config.logit_std)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        per_sample = velocity_mse(ctx.prediction, ctx.target)
        return {"loss": per_sample.mean()}

    def extra_repr(self) -> str:
        return f"{self.transport!r}, {super().extra_repr()}"


def build_flow_matching(config: FlowMatchingConfig, context: BuildContext) -> FlowMatchingLoss:
    """Registry factory of ``flow-matching``."""
    return FlowMatchingLoss(config)
