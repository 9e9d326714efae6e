"""What every sampler shares: the call interface, the guided prediction field, the noise source, dtypes and modes.

A sampler subclass implements only :meth:`Sampler.integrate`, a loop over its time grid that asks a
:class:`VelocityField` for (guided) predictions and, if it is stochastic, a :class:`NoiseSource` for Gaussian draws.
The field calls the denoiser in the model's dtype and returns float64; the state of the integration stays float64
(as in the REPA / REPA-E samplers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from repae import UserError

__all__ = ["GeneratorArg", "NoiseSource", "Sampler", "VelocityField", "model_dtype"]

GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]
"""What a sampler call accepts as ``generator``: one generator for the batch, one per sample, or ``None``."""

DEFAULT_SEED = 0
"""Seed of the generator a stochastic sampler uses when the call passes none."""


def model_dtype(denoiser: Any, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the denoiser's first floating-point parameter (``fallback`` without one)."""
    params = getattr(denoiser, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return fallback


def _has_null_label(denoiser: Any) -> bool:
    """Whether the denoiser has the null label row (:class:`repae.Denoiser`: ``class_dropout_prob > 0``)."""
    return float(denoiser.class_dropout_prob) > 0


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
    """``v(x, t)`` of a denoiser with classifier-free guidance, float64 in and out.

    Where guided, the batch is doubled ``[x; x]`` with labels ``[y; null]`` (null = ``denoiser.num_classes``) and
    ``v = v_uncond + s (v_cond - v_uncond)`` on the first ``channels`` channels (all ``C`` latent channels when
    ``None``); the other channels keep the conditional prediction. Predictions with more channels than ``x`` (learned
    sigma) are cut to the first ``C``, unless ``keep_extra`` (the DDPM sampler reads the variance channels; they are
    never guided). ``calls`` counts the denoiser evaluations.
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
        keep_extra: bool = False,
    ) -> None:
        self.denoiser = denoiser
        self.labels = labels
        self.null = torch.full_like(labels, int(denoiser.num_classes))
        self.scale = float(scale)
        self.low, self.high = (float(v) for v in interval)
        self.channels = channels
        self.dtype = dtype
        self.keep_extra = keep_extra
        self.calls = 0

    def guided_at(self, t: float | Tensor) -> bool:
        """Whether guidance applies at time ``t``: ``scale != 1`` and ``low <= t <= high``."""
        return self.scale != 1.0 and self.low <= float(t) <= self.high

    def __call__(self, x: Tensor, t: Tensor, guided: bool) -> Tensor:
        """Prediction at state ``x`` (float64 ``[B, C, ...]``) and model time ``t`` (a float64 scalar tensor)."""
        if guided:
            x_in, y_in = torch.cat([x, x]), torch.cat([self.labels, self.null])
        else:
            x_in, y_in = x, self.labels
        t_in = torch.ones(x_in.shape[0], dtype=torch.float64, device=x.device) * t
        out = self.denoiser(x_in.to(self.dtype), t_in.to(self.dtype), y_in)
        v = out.prediction if self.keep_extra else out.prediction[:, : x.shape[1]]
        v = v.to(torch.float64)
        self.calls += 1
        if not guided:
            return v
        cond, uncond = v.chunk(2)
        k = x.shape[1] if self.channels is None else min(self.channels, x.shape[1])
        mixed = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        if k == v.shape[1]:
            return mixed
        return torch.cat([mixed, cond[:, k:]], dim=1)


class NoiseSource:
    """Gaussian draws ``[B, C, ...]`` for the stochastic samplers, from one generator or one per sample.

    With one generator per sample, sample ``i``'s draws come from its own generator only, so they do not depend on
    which other samples share the batch (sharded generation gives every sample the same noise whatever the number of
    processes). Draws are made in float32 on each generator's device, then cast to float64 and moved to ``device``.
    ``generator=None`` uses a CPU generator seeded with :data:`DEFAULT_SEED` (reproducible, the same for every call).
    """

    def __init__(self, generator: GeneratorArg, shape: Sequence[int], device: torch.device) -> None:
        self.shape = tuple(shape)
        self.device = device
        self.draws = 0
        if generator is None:
            generator = torch.Generator().manual_seed(DEFAULT_SEED)
        if isinstance(generator, torch.Generator):
            self.generators: list[torch.Generator] | None = None
            self.generator = generator
        else:
            self.generators = list(generator)
            if len(self.generators) != self.shape[0]:
                raise UserError(f"{len(self.generators)} generators for a batch of {self.shape[0]} samples; pass one "
                                "generator, or one per sample")

    def draw(self) -> Tensor:
        """The next standard normal draw, float64 ``[B, C, ...]`` on ``device``."""
        self.draws += 1
        if self.generators is None:
            g = self.generator
            eps = torch.randn(self.shape, generator=g, device=g.device, dtype=torch.float32)
        else:
            eps = torch.stack([torch.randn(self.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                               for g in self.generators]).to(self.device)
        return eps.to(self.device, torch.float64)


class Sampler:
    """Base of the samplers: ``sampler(denoiser, noise, labels, *, cfg_scale=None, guidance=None, generator=None)``.

    ``noise`` is the state at ``t = 1`` in the normalised latent space ``[B, C, h, w]``; ``labels`` are class indices
    ``[B]``. ``cfg_scale`` and ``guidance = (low, high)`` override the config's values for this call. ``generator``
    feeds the draws of stochastic samplers (see :class:`NoiseSource`; deterministic samplers ignore it). The denoiser
    runs in eval mode without gradients (its mode is restored afterwards) and in the dtype of its parameters; the
    integration runs in float64 and the result is returned in the dtype of ``noise``.

    Subclasses set :attr:`stochastic` when they draw noise and :attr:`keep_extra_channels` when they read prediction
    channels beyond the latent's (learned variance).
    """

    stochastic: bool = False
    keep_extra_channels: bool = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.last_calls = 0
        self.last_draws = 0

    def __call__(
        self,
        denoiser: Any,
        noise: Tensor,
        labels: Tensor,
        *,
        cfg_scale: float | None = None,
        guidance: tuple[float, float] | None = None,
        generator: GeneratorArg = None,
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
            keep_extra=self.keep_extra_channels,
        )
        source = NoiseSource(generator, noise.shape, noise.device)
        with torch.no_grad(), _eval_mode(denoiser):
            x = self.integrate(field, noise.to(torch.float64), source)
        self.last_calls = field.calls
        self.last_draws = source.draws
        return x.to(noise.dtype)

    def integrate(self, field: VelocityField, x: Tensor, noise: NoiseSource) -> Tensor:
        """From ``x`` (float64, at ``t = 1``) to the sample at ``t = 0``; ``noise.draw()`` gives Gaussian draws."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
