"""DINOv2 ViT-S/B/L/G-14, with or without registers, as a frozen REPA target encoder (built with timm).

DINOv2: Oquab et al., 2023 (arXiv 2304.07193); registers: Darcet et al., 2023 (arXiv 2309.16588).

As in REPA: ImageNet normalisation, then bicubic resize to 224 px (at 256 px), patch tokens after the final
LayerNorm with the CLS and register tokens dropped. The position embedding keeps its trained 37 x 37 grid (518 px) and
is resampled to the token grid on the fly (bicubic, antialiased: the same operation REPA applies once to the
parameter), so one module serves every resolution and loads the official checkpoints strictly.

Checkpoint layouts: timm's (``hf://timm/vit_*_patch14_*dinov2.lvd142m``, the default) and Meta's torch.hub release
(``dinov2_vit*14*_pretrain.pth``: ``mask_token``, ``register_tokens``, SwiGLU ``w12``/``w3``), converted on load.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from repae import BuildContext
from repae_encoders import DINOv2Config
from repae_encoders.common import TimmViTEncoder, build_encoder

__all__ = ["DINOv2Encoder", "build_dinov2", "from_meta_layout"]


class DINOv2Encoder(TimmViTEncoder):
    """DINOv2 backbone (timm ``VisionTransformer`` with LayerScale) returning final-norm'ed patch tokens."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp: str = "gelu",
        registers: int = 0,
        image_size: int = 518,
        token_stride: int = 16,
    ) -> None:
        from timm.layers import SwiGLUPacked

        vit: dict[str, Any] = {"init_values": 1e-5}
        if mlp == "swiglu":  # ViT-G: SwiGLU with 4096 hidden units per branch, packed as one 8192-wide fc1
            vit.update(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        elif mlp != "gelu":
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {mlp!r}")
        if registers:  # registers carry no position embedding; the CLS position is folded into cls_token
            vit.update(reg_tokens=registers, no_embed_class=True)
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            image_size=image_size,
            token_stride=token_stride,
            **vit,
        )


def from_meta_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta's torch.hub DINOv2 state dict to timm's layout (other layouts pass through unchanged)."""
    if "mask_token" not in state and "register_tokens" not in state:
        return state
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    renamed = {}
    for k, v in out.items():
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        renamed[k] = v
    return renamed


def build_dinov2(config: DINOv2Config, context: BuildContext) -> DINOv2Encoder:
    """Factory of the ``dinov2`` encoder."""
    return build_encoder(DINOv2Encoder, config, context, family="dinov2", convert=from_meta_layout)
