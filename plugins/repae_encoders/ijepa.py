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

from typing import Any

from torch import Tensor

from repae_encoders import OFFICIAL_WEIGHTS, IJEPAConfig
from repae_encoders.common import IMAGENET_MEAN, IMAGENET_STD, FrozenEncoder, build_frozen

__all__ = ["IJEPAEncoder", "build_ijepa"]


class IJEPAEncoder(FrozenEncoder):
    """I-JEPA backbone (timm ``VisionTransformer`` without class token) returning final-norm'ed patch tokens."""

    def __init__(
        self, *, embed_dim: int, depth: int, num_heads: int, image_size: int = 224, token_stride: int = 16
    ) -> None:
        super().__init__(
            embed_dim=embed_dim, mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize_first=True, token_stride=token_stride
        )
        from timm.models.vision_transformer import VisionTransformer

        self.backbone = VisionTransformer(
            img_size=image_size,
            patch_size=self.patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            class_token=False,
            global_pool="avg",
            fc_norm=False,
            num_classes=0,
            dynamic_img_size=True,
        )

    def forward_tokens(self, x: Tensor) -> Tensor:
        return self.backbone.forward_features(x)  # no prefix tokens


def build_ijepa(config: IJEPAConfig, context: Any) -> IJEPAEncoder:
    """Factory of the ``ijepa`` encoder."""
    cfg = config.resolved()

    def make() -> IJEPAEncoder:
        return IJEPAEncoder(
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            image_size=cfg.image_size,
            token_stride=cfg.token_stride,
        )

    return build_frozen(
        make,
        context=context,
        weights=cfg.weights,
        official=OFFICIAL_WEIGHTS["ijepa"].get(cfg.variant),
        weights_key=cfg.weights_key,
        what=f"ijepa {cfg.variant} weights",
    )
