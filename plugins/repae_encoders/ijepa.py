"""I-JEPA ViT-H/14 context encoder as a frozen REPA target encoder (built with timm).

I-JEPA: Assran et al., 2023 (arXiv 2301.08243).

As in REPA: ImageNet normalisation, then bicubic resize to 224 px (at 256 px); I-JEPA has no CLS token, so every
output token is a patch token, taken after the final LayerNorm. The 16 x 16 position embedding is resampled on the
fly for other token grids (448 px at 512).

Checkpoint layouts: timm's ``vit_huge_patch14_gap_224`` keys, bare or as Meta's release stores them (the
``encoder`` entry of ``IN1K-vit.h.14-300e.pth.tar``, keys prefixed with ``module.``; the default, downloaded once
into ``$TORCH_HOME/hub/checkpoints`` since it has no Hugging Face copy).
"""

from __future__ import annotations

from repae import BuildContext
from repae_encoders import IJEPAConfig
from repae_encoders.common import TimmViTEncoder, build_encoder

__all__ = ["IJEPAEncoder", "build_ijepa"]


class IJEPAEncoder(TimmViTEncoder):
    """I-JEPA backbone (timm ``VisionTransformer`` without class token) returning final-norm'ed patch tokens."""

    def __init__(
        self, *, embed_dim: int, depth: int, num_heads: int, image_size: int = 224, token_stride: int = 16
    ) -> None:
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            image_size=image_size,
            token_stride=token_stride,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
        )


def build_ijepa(config: IJEPAConfig, context: BuildContext) -> IJEPAEncoder:
    """Factory of the ``ijepa`` encoder."""
    return build_encoder(IJEPAEncoder, config, context, family="ijepa")
