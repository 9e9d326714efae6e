"""SiT denoiser plugin (registry name ``sit``): the REPA / REPA-E latent diffusion transformer.

SiT: "Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers", Ma et al., 2024
(arXiv 2401.08740); REPA projectors: Yu et al., 2024 (arXiv 2410.06940); REPA-E: Leng et al., 2025
(arXiv 2504.10483).

This module only declares the config, the presets and the registration; it imports neither torch nor the model code
(``repae list`` stays fast). The model lives in :mod:`repae_sit.model`, the layers it shares with DiT in
:mod:`repae_sit.layers`, the checkpoint adapters in :mod:`repae_sit.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from repae import hookimpl, option

__all__ = ["SIZES", "SIT_PRESETS", "SiTConfig", "SizedConfig", "check_shape_fields", "size_presets"]

SIZES: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
"""Backbone sizes shared by SiT and DiT (the DiT paper's table)."""


def size_presets(tiny: dict[str, Any], **extra: Any) -> dict[str, dict[str, Any]]:
    """``{"S/1": {...}, ..., "XL/8": {...}, "tiny": tiny}``: every size at patch 1, 2, 4 and 8 (plus ``extra``)."""
    presets: dict[str, dict[str, Any]] = {
        f"{size}/{patch}": {**dims, "patch_size": patch, **extra}
        for size, dims in SIZES.items()
        for patch in (1, 2, 4, 8)
    }
    presets["tiny"] = dict(tiny)
    return presets


SIT_PRESETS = size_presets(
    {"depth": 4, "hidden_size": 64, "num_heads": 4, "patch_size": 2, "projector_dim": 64}, projector_dim=2048
)
"""``size`` presets of ``sit``. ``tiny`` is the architecture of the golden test vectors (4 blocks of width 64)."""


def check_shape_fields(config: Any) -> None:
    """Cross-field checks shared by the SiT and DiT configs (``ValueError`` becomes a recipe problem)."""
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
    for name in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 0.0 <= config.class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {config.class_dropout_prob}")
    if config.input_size is not None and config.input_size % config.patch_size:
        raise ValueError(f"input_size {config.input_size} is not divisible by patch_size {config.patch_size}")


_Config = TypeVar("_Config", bound="SizedConfig")


class SizedConfig:
    """What the SiT and DiT configs share: the cross-field checks, :meth:`from_preset` over ``PRESETS``, ``replace``."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        check_shape_fields(self)

    @classmethod
    def from_preset(cls: type[_Config], size: str = "XL/2", **overrides: Any) -> _Config:
        """The config of preset ``size`` with ``overrides`` on top (what a recipe section resolves to)."""
        if size not in cls.PRESETS:
            family = cls.__name__.removesuffix("Config")
            raise ValueError(f"unknown {family} preset {size!r}; presets: {', '.join(cls.PRESETS)}")
        return cls(**{"size": size, **cls.PRESETS[size], **overrides})

    def replace(self: _Config, **changes: Any) -> _Config:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class SiTConfig(SizedConfig):
    """Config of the ``sit`` denoiser. ``size`` fills depth/width/heads/patch; fields set explicitly win.

    ``input_size``, ``in_channels`` and ``encoder_dims`` left to ``null`` are taken from the components built before
    the denoiser: the tokenizer (``resolution // downsample``, ``latent_channels``) and the encoders (``embed_dim``
    of each, one projector per encoder). Explicit values always win.
    """

    PRESETS = SIT_PRESETS

    size: str = option("XL/2", doc="preset: S/B/L/XL x patch 1/2/4/8 (e.g. XL/2), or tiny for tests")
    depth: int = option(28, doc="number of transformer blocks")
    hidden_size: int = option(1152, doc="token width")
    num_heads: int = option(16, doc="attention heads per block")
    patch_size: int = option(2, doc="latent patch size (tokens = (input_size / patch_size)^2)")
    mlp_ratio: float = option(4.0, doc="MLP hidden width / token width")
    input_size: int | None = option(None, doc="latent height = width; null: resolution // tokenizer.downsample")
    resolution: int = option(256, doc="image resolution in pixels; used only to derive a null input_size")
    in_channels: int | None = option(None, doc="latent channels; null: tokenizer.latent_channels")
    num_classes: int = option(1000, doc="number of classes; label num_classes is the null (CFG) label")
    class_dropout_prob: float = option(
        0.1, doc="label dropout in training mode; > 0 adds the null row to the label table"
    )
    encoder_dims: list[int] | None = option(
        None, doc="output width of each REPA projector; null: embed_dim of each built encoder; [] for none"
    )
    projector_dim: int = option(2048, doc="hidden width of the REPA projector MLPs")
    qk_norm: bool = option(False, doc="LayerNorm on queries and keys in attention")
    learn_sigma: bool = option(
        False, doc="final layer predicts 2*C channels and the first C are used (willisma/SiT release)"
    )
    time_convention: Literal["noise-at-1", "data-at-1"] = option(
        "noise-at-1", doc="time the weights were trained with: noise-at-1 (REPA/REPA-E) or data-at-1 (willisma/SiT)"
    )
    weights: str | None = option(None, doc="checkpoint: local file/folder or hf://org/repo/file; null: random init")
    weights_key: str | None = option(
        "ema", doc="entry of a training checkpoint (.pt with model/ema) to load; a plain state dict ignores it"
    )


@hookimpl
def register_components(register: Any) -> None:
    register(
        "denoiser",
        "sit",
        summary="SiT latent diffusion transformer with REPA projectors (REPA / REPA-E), velocity prediction",
        config=SiTConfig,
        factory="repae_sit.model:build_sit",
        presets=SIT_PRESETS,
        preset_field="size",
    )
