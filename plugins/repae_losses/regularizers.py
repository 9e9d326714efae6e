"""Tokenizer regularisers of REPA-E (arXiv 2504.10483, after the LDM autoencoder losses of Rombach et al.,
arXiv 2112.10752): pixel reconstruction and the KL of the posterior to N(0, I).

Both run in float32 with autocast off. The reference divides the reconstruction term by ``exp(logvar)`` with a
frozen ``logvar = 0``, i.e. by 1; that factor is left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from repae import BuildContext, Loss, StepContext
from repae_losses import KLConfig, ReconstructionConfig
from repae_losses.common import full_precision, need

__all__ = ["KLLoss", "ReconstructionLoss", "build_kl", "build_reconstruction", "gaussian_kl"]

_NO_RECON = "it trains on cached latents or no tokenizer decodes; train the tokenizer from images"


class ReconstructionLoss(Loss):
    """Mean over every pixel of ``|x - recon|`` (``kind: l1``) or ``(x - recon)^2`` (``kind: mse``). Terms: ``loss``."""

    needs_recon = True

    def __init__(self, config: ReconstructionConfig) -> None:
        super().__init__(config)
        self.kind = config.kind

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        images = need(ctx.images, "images", "reconstruction", _NO_RECON)
        recon = need(ctx.recon, "reconstructions", "reconstruction", _NO_RECON)
        with full_precision(recon.device):
            images, recon = images.float(), recon.float()
            loss = F.l1_loss(recon, images) if self.kind == "l1" else F.mse_loss(recon, images)
        return {"loss": loss}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {super().extra_repr()}"


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dimension, in float32: ``[B]``."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=tuple(range(1, mean.ndim)))


class KLLoss(Loss):
    """``sum_b KL_b / B`` with ``KL_b = 0.5 sum_{C,H,W} (mu^2 + sigma^2 - 1 - log sigma^2)``. Terms: ``loss``.

    Uses the posterior's ``kl()``; a posterior in reduced precision is evaluated from its ``mean`` and ``logvar`` in
    float32 instead.
    """

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        posterior = need(ctx.posterior, "the tokenizer posterior", "kl", "it trains on cached latents; train the "
                         "tokenizer from images or drop the kl loss")
        mean = getattr(posterior, "mean", None)
        with full_precision(mean.device if mean is not None else "cpu"):
            if mean is not None and mean.dtype != torch.float32 and hasattr(posterior, "logvar"):
                kl = gaussian_kl(mean, posterior.logvar)
            else:
                kl = posterior.kl().float()
        return {"loss": kl.sum() / kl.shape[0]}


def build_reconstruction(config: ReconstructionConfig, context: BuildContext) -> ReconstructionLoss:
    """Registry factory of ``reconstruction``."""
    return ReconstructionLoss(config)


def build_kl(config: KLConfig, context: BuildContext) -> KLLoss:
    """Registry factory of ``kl``."""
    return KLLoss(config)
