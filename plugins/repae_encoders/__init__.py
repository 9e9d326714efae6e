"""Frozen representation encoders (registry names ``dinov2``, ``clip``, ``ijepa``): the REPA alignment targets.

- DINOv2: "DINOv2: Learning Robust Visual Features without Supervision", Oquab et al., 2023 (arXiv 2304.07193);
  with registers: "Vision Transformers Need Registers", Darcet et al., 2023 (arXiv 2309.16588).
- CLIP: "Learning Transferable Visual Models From Natural Language Supervision", Radford et al., 2021
  (arXiv 2103.00020).
- I-JEPA: "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture", Assran et al., 2023
  (arXiv 2301.08243).
- Their use as targets: REPA, Yu et al., 2024 (arXiv 2410.06940); REPA-E, Leng et al., 2025 (arXiv 2504.10483).

Each encoder takes raw ``uint8`` images and owns REPA's preprocessing (normalisation constants, bicubic resize to
224 px at 256 px), returns the patch tokens (CLS and register tokens dropped) and runs frozen in eval mode.

This module only declares configs, presets and the registration; it imports neither torch, timm nor open_clip
(``repae list`` stays fast). The models live in :mod:`repae_encoders.dinov2`, :mod:`repae_encoders.clip` and
:mod:`repae_encoders.ijepa`, what they share in :mod:`repae_encoders.common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from repae import FieldError, architecture_mismatch, hookimpl, option

__all__ = [
    "CLIP_PRESETS",
    "DINOV2_PRESETS",
    "IJEPA_PRESETS",
    "OFFICIAL_WEIGHTS",
    "CLIPConfig",
    "DINOv2Config",
    "EncoderConfig",
    "IJEPAConfig",
]

# -- presets ---------------------------------------------------------------------------------------------------------
_DINOV2_SIZES: dict[str, dict[str, Any]] = {
    "vit-s14": {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp": "gelu", "image_size": 518},
    "vit-b14": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp": "gelu", "image_size": 518},
    "vit-l14": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp": "gelu", "image_size": 518},
    "vit-g14": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp": "swiglu", "image_size": 518},
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp": "gelu", "image_size": 56},
}
DINOV2_PRESETS: dict[str, dict[str, Any]] = {
    **{name: {**dims, "registers": 0} for name, dims in _DINOV2_SIZES.items()},
    **{f"{name}-reg": {**dims, "registers": 4} for name, dims in _DINOV2_SIZES.items()},
}
"""``size`` presets of ``dinov2``: ViT-S/B/L/G with patch 14, ``-reg`` = with 4 registers; ``tiny``/``tiny-reg``
have random weights (tests, quickstart)."""

CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "vit-l14": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "output_dim": 768, "image_size": 224},
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "output_dim": 16, "image_size": 56},
}
"""``size`` presets of ``clip``: the vision tower of OpenAI CLIP ViT-L/14; ``tiny`` has random weights."""

IJEPA_PRESETS: dict[str, dict[str, Any]] = {
    "vit-h14": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "image_size": 224},
    "vit-h14-in22k": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "image_size": 224},
    "tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2, "image_size": 56},
}
"""``size`` presets of ``ijepa``: the ViT-H/14 context encoder trained on ImageNet-1k (REPA's choice) or on
ImageNet-22k; ``tiny`` has random weights."""

OFFICIAL_WEIGHTS: dict[str, dict[str, tuple[str, str | None]]] = {
    "dinov2": {
        **{
            f"vit-{s}14": (f"hf://timm/vit_{size}_patch14_dinov2.lvd142m/model.safetensors", None)
            for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        },
        **{
            f"vit-{s}14-reg": (f"hf://timm/vit_{size}_patch14_reg4_dinov2.lvd142m/model.safetensors", None)
            for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        },
    },
    "clip": {"vit-l14": ("hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors", None)},
    "ijepa": {
        "vit-h14": ("https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar", "encoder"),
        "vit-h14-in22k": ("https://dl.fbaipublicfiles.com/ijepa/IN22K-vit.h.14-900e.pth.tar", "encoder"),
    },
}
"""Where ``weights: null`` loads from, per encoder and size: (source, checkpoint entry). The hub copies are timm's
and open_clip's own; the I-JEPA checkpoints exist only as Meta's URLs (cached under ``$TORCH_HOME/hub/checkpoints``)."""

_WEIGHTS_DOC = (
    "local file/folder, hf://org/repo/file or https:// URL; null = the size's official weights (random for tiny); "
    "'random' = random init"
)
_KEY_DOC = "entry of a checkpoint holding several state dicts (model, ema, encoder, ...); null = the only one"
_STRIDE_DOC = (
    "image pixels per output token side: H x W images are resized (bicubic) to 14*H/stride x 14*W/stride, giving "
    "(H/stride)*(W/stride) tokens; 16 = REPA (224 px at 256, 448 px at 512)"
)


@dataclass(kw_only=True)
class EncoderConfig:
    """What the encoder configs share: the preset selector, the weights and the token grid (REPA's preprocessing)."""

    size: str = option("vit-b14", doc="preset (see `repae show <encoder>`)")
    weights: str | None = option(None, doc=_WEIGHTS_DOC)
    weights_key: str | None = option(None, doc=_KEY_DOC)
    token_stride: int = option(16, doc=_STRIDE_DOC)
    embed_dim: int = option(768, doc="token width")
    depth: int = option(12, doc="transformer blocks")
    num_heads: int = option(12, doc="attention heads")
    image_size: int = option(518, doc="image size the position embedding was trained at")

    def __post_init__(self) -> None:
        for name in ("token_stride", "embed_dim", "depth", "num_heads", "image_size"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        family = self.family()
        if family is not None:  # the release the weights are (null: the size's): every architecture field
            from repae_encoders.releases import SHAPE_FREE_FIELDS, release_of_source

            release = release_of_source(family, self.size, self.weights)
            if release is not None:
                problem = architecture_mismatch(vars(self), release.architecture, preset=release.preset,
                                                shape_free=SHAPE_FREE_FIELDS,
                                                what=f"the {release.name} release ({release.sources[0]})")
                if problem is not None:
                    raise FieldError(problem.field, problem.message)

    def family(self) -> str | None:
        """The registry name whose releases (``OFFICIAL_WEIGHTS``) the weights are checked against."""
        return None


@dataclass(kw_only=True)
class DINOv2Config(EncoderConfig):
    """Config of the ``dinov2`` encoder. ``size`` fills the architecture fields; fields set explicitly win."""

    size: str = option("vit-b14", doc="preset: vit-s14, vit-b14, vit-l14, vit-g14, each also -reg; tiny, tiny-reg")
    mlp: Literal["gelu", "swiglu"] = option("gelu", doc="block MLP (swiglu for ViT-G)")
    registers: int = option(0, doc="register tokens (dropped from the output)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.registers < 0:
            raise FieldError("registers", f"must be >= 0, got {self.registers}")

    def family(self) -> str | None:
        return "dinov2"


@dataclass(kw_only=True)
class CLIPConfig(EncoderConfig):
    """Config of the ``clip`` encoder (the vision tower only). ``size`` fills the architecture fields."""

    size: str = option("vit-l14", doc="preset: vit-l14 (OpenAI CLIP ViT-L/14), tiny")
    embed_dim: int = option(1024, doc="token width of the vision transformer")
    depth: int = option(24, doc="transformer blocks")
    num_heads: int = option(16, doc="attention heads")
    output_dim: int = option(768, doc="width of the (unused) image projection")
    image_size: int = option(224, doc="image size of the position embedding")

    def family(self) -> str | None:
        return "clip"


@dataclass(kw_only=True)
class IJEPAConfig(EncoderConfig):
    """Config of the ``ijepa`` encoder (the context encoder). ``size`` fills the architecture fields."""

    size: str = option("vit-h14", doc="preset: vit-h14 (ImageNet-1k, as REPA), vit-h14-in22k, tiny")
    weights_key: str | None = option(None, doc=_KEY_DOC + "; the official checkpoint uses 'encoder'")
    embed_dim: int = option(1280, doc="token width")
    depth: int = option(32, doc="transformer blocks")
    num_heads: int = option(16, doc="attention heads")
    image_size: int = option(224, doc="image size of the position embedding")

    def family(self) -> str | None:
        return "ijepa"


@hookimpl
def register_components(register: Any) -> None:
    register(
        "encoder", "dinov2",
        summary="DINOv2 ViT-S/B/L/G-14 (optionally with registers), frozen; REPA's default target",
        config=DINOv2Config, factory="repae_encoders.dinov2:build_dinov2",
        presets=DINOV2_PRESETS,
    )
    register(
        "encoder", "clip",
        summary="OpenAI CLIP ViT-L/14 vision tower (open_clip), frozen; tokens before ln_post as in REPA",
        config=CLIPConfig, factory="repae_encoders.clip:build_clip",
        presets=CLIP_PRESETS,
    )
    register(
        "encoder", "ijepa",
        summary="I-JEPA ViT-H/14 context encoder, frozen",
        config=IJEPAConfig, factory="repae_encoders.ijepa:build_ijepa",
        presets=IJEPA_PRESETS,
    )
