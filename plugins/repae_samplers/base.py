"""What every sampler shares: the call interface, the guided velocity field, the model dtype and modes.

A sampler subclass implements only :meth:`Sampler.integrate`, a loop over its time grid that asks a
:class:`VelocityField` for (guided) velocities. The field calls the denoiser in the model's dtype and returns float64;
the state of the integration stays float64 (as in the REPA / REPA-E samplers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from repae.errors import UserError

__all__ = ["Sampler", "VelocityField", "model_dtype"]


def model_dtype(denoiser: Any, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the denoiser's first floating-point parameter (``fallback`` without one)."""
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return fallback


def _has_null_label(denoiser: Any) -> bool:
    """False only when the label table visibly lacks the null row (a model trained without label dropout)."""
    table = getattr(getattr(denoiser, "y_embedder", None), "embedding_table", None)
    rows = getattr(table, "num_embeddings", None)
    return rows is None or rows > int(denoiser.num_classes)


@contextlib.contextmanager
def _eval_mode(denoiser: Any) -> Iterator[None]:
    """Eval mode (no label dropout) for the duration, then the previous mode back."""
    training = getattr(denoiser, "training", False)
    if training:
        denoiser.eval()
    try:
        yield
    finally:
        if training:
            denoiser.train(True)


class VelocityField:
    """``v(x, t)`` of a velocity denoiser with classifier-free guidance, float64 in and out.

    Where guided, the batch is doubled ``[x; x]`` with labels ``[y; null]`` (null = ``denoiser.num_classes``) and
    ``v = v_uncond + s (v_cond - v_uncond)`` on the first ``channels`` channels (all when ``None``); the other
    channels keep the conditional prediction. Predictions with more channels than ``x`` (learned sigma) are cut to
    the first ``C``. ``calls`` counts the denoiser evaluations.
    """

    def __init__(
        self,
        denoiser: Any,
        labels: Tensor,
        *,
        scale: float,
        interval: tuple[float, float],
        channels: int | None,
        dtype: torch.dtype,
    ) -> None:
        self.denoiser = denoiser
        self.labels = labels
        self.null = torch.full_like(labels, int(denoiser.num_classes))
        self.scale = float(scale)
        self.low, self.high = (float(v) for v in interval)
        self.channels = channels
        self.dtype = dtype
        self.calls = 0

    def guided_at(self, t: float | Tensor) -> bool:
        """Whether guidance applies at time ``t``: ``scale != 1`` and ``low <= t <= high``."""
        return self.scale != 1.0 and self.low <= float(t) <= self.high

    def __call__(self, x: Tensor, t: Tensor, guided: bool) -> Tensor:
        """Velocity at state ``x`` (float64 ``[B, C, ...]``) and time ``t`` (a float64 scalar tensor)."""
        if guided:
            x_in, y_in = torch.cat([x, x]), torch.cat([self.labels, self.null])
        else:
            x_in, y_in = x, self.labels
        t_in = torch.ones(x_in.shape[0], dtype=torch.float64, device=x.device) * t
        out = self.denoiser(x_in.to(self.dtype), t_in.to(self.dtype), y_in)
        v = out.prediction[:, : x.shape[1]].to(torch.float64)
        self.calls += 1
        if not guided:
            return v
        cond, uncond = v.chunk(2)
        mixed = uncond + self.scale * (cond - uncond)
        k = self.channels
        if k is None or k >= x.shape[1]:
            return mixed
        return torch.cat([mixed[:, :k], cond[:, k:]], dim=1)


class Sampler:
    """Base of the samplers: ``sampler(denoiser, noise, labels, *, cfg_scale=None, guidance=None) -> latents``.

    ``noise`` is the state at ``t = 1`` in the normalised latent space ``[B, C, h, w]``; ``labels`` are class indices
    ``[B]``. ``cfg_scale`` and ``guidance = (low, high)`` override the config's values for this call. The denoiser runs
    in eval mode without gradients (its mode is restored afterwards) and in the dtype of its parameters; the
    integration runs in float64 and the result is returned in the dtype of ``noise``.
    """

    def __init__(self, config: Any) -> None:
        self.config = config

    def __call__(
        self,
        denoiser: Any,
        noise: Tensor,
        labels: Tensor,
        *,
        cfg_scale: float | None = None,
        guidance: tuple[float, float] | None = None,
    ) -> Tensor:
        scale = self.config.cfg_scale if cfg_scale is None else float(cfg_scale)
        low, high = (self.config.guidance_low, self.config.guidance_high) if guidance is None else guidance
        if low > high:
            raise UserError(f"guidance interval ({low}, {high}): low is above high")
        if noise.ndim < 2 or labels.shape != noise.shape[:1]:
            raise UserError(f"noise [B, C, ...] and labels [B] do not match: {tuple(noise.shape)} and "
                            f"{tuple(labels.shape)}")
        if scale != 1.0 and low <= 1.0 and high >= 0.0 and not _has_null_label(denoiser):
            raise UserError(
                f"classifier-free guidance (cfg_scale {scale}) needs the null label {denoiser.num_classes}, but the "
                "denoiser's label table has no null row (it was built with class_dropout_prob 0): set cfg_scale to 1"
            )
        field = VelocityField(
            denoiser,
            labels.to(noise.device),
            scale=scale,
            interval=(low, high),
            channels=self.config.cfg_channels,
            dtype=model_dtype(denoiser, noise.dtype if noise.dtype != torch.float64 else torch.float32),
        )
        with torch.no_grad(), _eval_mode(denoiser):
            x = self.integrate(field, noise.to(torch.float64))
        self.last_calls = field.calls
        return x.to(noise.dtype)

    def integrate(self, field: VelocityField, x: Tensor) -> Tensor:
        """From ``x`` (float64, at ``t = 1``) to the sample at ``t = 0``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
