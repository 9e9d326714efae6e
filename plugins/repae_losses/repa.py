"""REPA representation alignment: Yu et al., "Representation Alignment for Generation: Training Diffusion
Transformers Is Easier Than You Think", arXiv 2410.06940; used end to end by REPA-E (arXiv 2504.10483).

The hidden tokens after block ``depth`` go through the denoiser's projector MLPs (one per encoder) and are compared,
token by token, with the encoders' patch tokens: per sample the mean over tokens of ``-cos``, summed over samples and
encoders and divided by ``num_encoders * B``. The value lies in ``[-1, 1]``; negative numbers are normal.

In REPA-E the same loss (one entry, ``updates: [denoiser, tokenizer]``) updates the tokenizer (weight 1.5) through
the frozen denoiser, whose latent normaliser then uses its running statistics, and the denoiser (weight 0.5) on the
detached latent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from repae import BuildContext, Loss, StepContext, UserError
from repae_losses import RepaConfig

__all__ = ["RepaLoss", "build_repa", "negative_cosine"]


def negative_cosine(projected: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """REPA's alignment loss between projected tokens and encoder tokens, pairwise per encoder (float32 scalar).

    Both lists hold ``[B, N, D_k]`` tensors; tokens are L2-normalised on the last dimension.
    """
    if len(projected) != len(targets):
        raise UserError(f"repa: the denoiser has {len(projected)} projector(s) but {len(targets)} encoder(s) give "
                        "targets: build the denoiser with one projector per encoder (encoder_dims: null)")
    if not projected:
        raise UserError("repa: no representation encoder is configured; add one under `encoders` or drop the loss")
    batch = projected[0].shape[0]
    total = projected[0].new_zeros((), dtype=torch.float32)
    for k, (z_tilde, z) in enumerate(zip(projected, targets)):
        if z_tilde.shape != z.shape:
            raise UserError(
                f"repa: the projected denoiser tokens {tuple(z_tilde.shape)} and the tokens of encoder {k} "
                f"{tuple(z.shape)} differ (batch, tokens, width): match the token counts through the image "
                "resolution, the denoiser's patch size or the encoder's resolution, and the width through the "
                "denoiser's encoder_dims"
            )
        cos = (F.normalize(z.float(), dim=-1) * F.normalize(z_tilde.float(), dim=-1)).sum(dim=-1)
        total = total + (-cos).mean(dim=-1).sum()
    return total / (len(projected) * batch)


class RepaLoss(Loss):
    """The REPA alignment term (reads ``ctx.denoised.hidden[depth]``, ``ctx.denoiser.project`` and ``ctx.targets``).

    Terms: ``loss``; with several encoders also ``encoder_<k>`` (each encoder's own value).
    """

    needs_targets = True

    def __init__(self, config: RepaConfig) -> None:
        super().__init__(config)
        self.depth = config.depth
        self.feature_depths = (config.depth,)

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        hidden = ctx.denoised.hidden[self.depth]
        projected = list(ctx.denoiser.project(hidden))
        targets = list(ctx.targets)
        terms = {"loss": negative_cosine(projected, targets)}
        if len(projected) > 1:
            for k, (z_tilde, z) in enumerate(zip(projected, targets)):
                terms[f"encoder_{k}"] = negative_cosine([z_tilde.detach()], [z])
        return terms

    def extra_repr(self) -> str:
        return f"depth={self.depth}, {super().extra_repr()}"


def build_repa(config: RepaConfig, context: BuildContext) -> RepaLoss:
    """Registry factory of ``repa`` (its depth is checked against the denoiser's with the whole recipe)."""
    return RepaLoss(config)
