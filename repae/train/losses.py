"""The contract of loss components, and the base class built-in losses derive from.

A loss component is an ``nn.Module`` registered under the kind ``loss``. Every loss config has ``weight`` and
``updates``; the engine calls the loss once in the phase of every part listed in ``updates`` (``tokenizer``,
``denoiser``, or a part the loss owns, like ``discriminator``) and adds ``weight(part) * terms["loss"]`` to that
phase's objective. During that phase every other part is frozen, so the loss's gradient reaches no part it does not
list: this is how a recipe states REPA-E's stop-gradient (the diffusion loss lists ``[denoiser]`` only) and how the
paper's "no stop-gradient" ablation is one line (``updates: [denoiser, tokenizer]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from repae.config import option

if TYPE_CHECKING:
    from torch import Tensor, nn

    from repae.interfaces import Transport
    from repae.train.context import StepContext

__all__ = ["LossBase", "LossOptions", "PARTS"]

PARTS = ("tokenizer", "denoiser")
"""Parts every training knows; losses may add their own (e.g. ``discriminator``)."""


@dataclass(kw_only=True)
class LossOptions:
    """Fields every loss config has. Subclass it for a loss's own config."""

    weight: float = option(1.0, doc="coefficient of this loss in the objective of each part it updates")
    updates: list[str] = option(
        default_factory=lambda: ["denoiser"],
        doc="trainable parts this loss's gradient may update (tokenizer, denoiser, or a part it owns)",
    )

    def __post_init__(self) -> None:
        if not self.updates:
            raise ValueError("updates must name at least one part")
        if len(set(self.updates)) != len(self.updates):
            raise ValueError(f"updates lists a part twice: {self.updates}")


class LossBase:
    """Mixin with the defaults of the loss contract; combine with ``torch.nn.Module``::

        class MyLoss(LossBase, nn.Module):
            def __init__(self, config):
                nn.Module.__init__(self)
                LossBase.__init__(self, config)
            def forward(self, ctx):
                return {"loss": ...}
    """

    feature_depths: tuple[int, ...] = ()
    """Depths (1-based blocks) whose hidden tokens this loss reads from ``ctx.denoised.hidden``."""
    needs_prediction: bool = False
    """Whether this loss reads ``ctx.denoised.prediction`` (a pass with only features can stop early)."""
    needs_recon: bool = False
    """Whether this loss reads ``ctx.recon`` (decoding is skipped when no loss needs it)."""
    needs_targets: bool = False
    """Whether this loss reads ``ctx.targets`` (the representation encoders run only then)."""
    transport: Transport | None = None
    """A diffusion objective provides the forward process (time sampling, noising, target) of the step."""

    def __init__(self, config: LossOptions) -> None:
        self.config = config
        self.updates: tuple[str, ...] = tuple(config.updates)

    def weight(self, part: str) -> float:
        """The coefficient of this loss in ``part``'s objective (the same for every part unless overridden)."""
        return self.config.weight

    def parts(self) -> Mapping[str, nn.Module]:
        """Trainable modules this loss owns, by part name (a GAN loss owns its ``discriminator``)."""
        return {}

    def forward(self, ctx: StepContext) -> Mapping[str, Tensor]:  # pragma: no cover - the contract
        """Terms of this loss in phase ``ctx.phase``: a scalar ``loss`` plus any others worth logging."""
        raise NotImplementedError


def check_updates(loss: Any, known_parts: set[str], label: str) -> None:
    """Raise ``ValueError`` when a loss lists a part that the training does not have."""
    unknown = [p for p in loss.updates if p not in known_parts]
    if unknown:
        raise ValueError(
            f"loss '{label}' lists updates {unknown}, but the parts of this training are {sorted(known_parts)}"
        )
