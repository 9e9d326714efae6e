"""The loss contract: :class:`Loss`, the one base class every loss component subclasses.

A loss is registered under the kind ``loss`` with a config subclassing :class:`repae.LossConfig` (``weight``,
``updates``). The engine calls it once in the phase of every part listed in ``updates`` with the step's
:class:`repae.StepContext` and adds ``weight(part) * terms["loss"]`` to that phase's objective::

    @dataclass(kw_only=True)
    class MyLossConfig(repae.LossConfig):
        scale: float = repae.option(1.0, doc="...")

    class MyLoss(repae.Loss):
        needs_prediction = True                       # reads ctx.denoised.prediction

        def __init__(self, config: MyLossConfig) -> None:
            super().__init__(config)
            self.scale = config.scale

        def forward(self, ctx: repae.StepContext) -> dict[str, Tensor]:
            error = (ctx.denoised.prediction - ctx.target).square().mean()
            return {"loss": self.scale * error}       # plus any other terms worth logging

What the engine plans from the class attributes (all optional): :attr:`Loss.feature_depths`,
:attr:`Loss.needs_prediction`, :attr:`Loss.needs_recon`, :attr:`Loss.needs_targets`, :attr:`Loss.transport` and
:meth:`Loss.parts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from repae.interfaces import LossConfig, Transport

if TYPE_CHECKING:
    from repae.train.context import StepContext

__all__ = ["Loss"]


class Loss(nn.Module):
    """Base class of loss components (an ``nn.Module``: a loss may own trainable parts, like a discriminator).

    Subclasses call ``super().__init__(config)`` and implement :meth:`forward`. Class attributes tell the engine what
    the loss reads, so a step computes only what some loss needs.
    """

    feature_depths: tuple[int, ...] = ()
    """1-based denoiser blocks whose hidden tokens this loss reads from ``ctx.denoised.hidden`` (REPA: ``(8,)``).
    Each must be ``<= denoiser.depth`` (checked before training)."""
    needs_prediction: bool = False
    """Whether this loss reads ``ctx.denoised.prediction`` (a pass without it stops after the deepest feature)."""
    needs_recon: bool = False
    """Whether this loss reads ``ctx.recon`` (decoding is skipped when no loss needs it)."""
    needs_targets: bool = False
    """Whether this loss reads ``ctx.targets``: the encoders run only then, and the denoiser needs one projector per
    encoder (checked before training)."""
    transport: Transport | None = None
    """A diffusion objective provides the forward process of the step (time sampling, ``x_t``, the target); exactly
    one loss of a training that runs the denoiser must."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.updates: tuple[str, ...] = tuple(config.updates)

    def weight(self, part: str) -> float:
        """The coefficient of this loss in ``part``'s objective (``config.weight``: one number, or one per part)."""
        return self.config.weight_of(part)

    def parts(self) -> Mapping[str, nn.Module]:
        """Trainable modules this loss owns, by part name (a GAN loss owns its ``discriminator``); each is trained in
        its own phase with its own optimizer (``trainer.optimizers.<part>``)."""
        return {}

    def forward(self, ctx: StepContext) -> Mapping[str, Tensor]:
        """Terms of this loss in phase ``ctx.phase``: a scalar ``loss`` (what is weighted and back-propagated) plus
        any others worth logging (logged as ``<phase>/<label>.<term>``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(ctx)")

    def extra_repr(self) -> str:
        return f"updates={list(self.updates)}, weight={self.config.weight}"
