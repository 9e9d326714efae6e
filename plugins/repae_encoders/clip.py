"""OpenAI CLIP ViT-L/14 vision tower as a frozen REPA target encoder (built with open_clip).

CLIP: Radford et al., 2021 (arXiv 2103.00020).

As in REPA: bicubic resize to 224 px (at 256 px), then CLIP's normalisation; the forward is patch embedding -> class
token -> position embedding -> ``ln_pre`` -> transformer, and the output drops the class token. REPA does **not**
apply ``ln_post`` nor the image projection, so neither is used here (both stay in the module so that checkpoints
load strictly). The 16 x 16 position embedding is resampled (bicubic, antialiased) for other token grids.

Checkpoint layouts: open_clip's (``visual.*`` keys of a whole CLIP model, as in
``hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors``, the default; the text tower is ignored)
or the vision tower alone (``conv1.weight``, ``transformer.resblocks.*``, ...). OpenAI's own ``ViT-L-14.pt`` is a
TorchScript archive and is refused: use the safetensors file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repae import BuildContext
from repae_encoders import CLIPConfig
from repae_encoders.common import CLIP_MEAN, CLIP_STD, FrozenEncoder, build_encoder

__all__ = ["CLIPEncoder", "build_clip", "from_open_clip_layout"]


class CLIPEncoder(FrozenEncoder):
    """open_clip ``VisionTransformer`` (QuickGELU, as OpenAI trained it) returning pre-``ln_post`` patch tokens."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        output_dim: int,
        image_size: int = 224,
        token_stride: int = 16,
    ) -> None:
        super().__init__(
            embed_dim=embed_dim, mean=CLIP_MEAN, std=CLIP_STD, normalize_first=False, token_stride=token_stride
        )
        from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

        self.backbone = VisionTransformer(
            image_size=image_size,
            patch_size=self.patch_size,
            width=embed_dim,
            layers=depth,
            heads=num_heads,
            mlp_ratio=4.0,
            output_dim=output_dim,
            act_layer=QuickGELU,
            norm_layer=LayerNorm,
        )

    def forward_tokens(self, x: Tensor) -> Tensor:
        from timm.layers import resample_abs_pos_embed

        v = self.backbone
        x = v.conv1(x)  # [B, D, gh, gw]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = resample_abs_pos_embed(
            v.positional_embedding.unsqueeze(0), new_size=grid, old_size=v.grid_size, num_prefix_tokens=1
        )
        x = v.ln_pre(x + pos.to(x.dtype))
        x = v.transformer(x)
        return x[:, 1:]


def from_open_clip_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the vision tower of a whole open_clip / OpenAI CLIP state dict (``visual.*``), without the prefix."""
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return state


def build_clip(config: CLIPConfig, context: BuildContext) -> CLIPEncoder:
    """Factory of the ``clip`` encoder."""
    return build_encoder(CLIPEncoder, config, context, family="clip", convert=from_open_clip_layout)
