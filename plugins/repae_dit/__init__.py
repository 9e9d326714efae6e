"""DiT denoiser plugin (registry name ``dit``): the class-conditional diffusion transformer of Peebles & Xie,
"Scalable Diffusion Models with Transformers", 2023 (arXiv 2212.09748).

Torch-free registration only; the model is :mod:`repae_dit.model` and shares its layers with ``sit``
(:mod:`repae_sit.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repae import hookimpl, option
from repae_sit import SizedConfig, size_presets

__all__ = ["DIT_PRESETS", "DiTConfig"]

DIT_PRESETS = size_presets({"depth": 3, "hidden_size": 64, "num_heads": 4, "patch_size": 2})
"""``size`` presets of ``dit``: S/B/L/XL x patch 1/2/4/8, and ``tiny`` (the golden test architecture, 3 blocks)."""


@dataclass(kw_only=True)
class DiTConfig(SizedConfig):
    """Config of the ``dit`` denoiser. ``size`` fills depth/width/heads/patch; fields set explicitly win.

    The time input is whatever the diffusion process uses: the integer DDPM step 0..999 for the official weights
    (embedded as is, no rescaling). ``input_size``/``in_channels``/``encoder_dims`` set to ``null`` are taken from the
    tokenizer and encoders built before the denoiser; explicit values win.
    """

    PRESETS = DIT_PRESETS

    size: str = option("XL/2", doc="preset: S/B/L/XL x patch 1/2/4/8 (e.g. XL/2), or tiny for tests")
    depth: int = option(28, doc="number of transformer blocks")
    hidden_size: int = option(1152, doc="token width")
    num_heads: int = option(16, doc="attention heads per block")
    patch_size: int = option(2, doc="latent patch size")
    mlp_ratio: float = option(4.0, doc="MLP hidden width / token width")
    input_size: int | None = option(None, doc="latent height = width; null: resolution // tokenizer.downsample")
    resolution: int = option(256, doc="image resolution in pixels; used only to derive a null input_size")
    in_channels: int | None = option(None, doc="latent channels; null: tokenizer.latent_channels")
    num_classes: int = option(1000, doc="number of classes; label num_classes is the null (CFG) label")
    class_dropout_prob: float = option(
        0.1, doc="label dropout in training mode; > 0 adds the null row to the label table"
    )
    learn_sigma: bool = option(True, doc="output 2*C channels: noise prediction, then variance interpolation values")
    cfg_channels: int | None = option(
        3, doc="channels forward_with_cfg guides (3 as the DiT reference; null: all)"
    )
    encoder_dims: list[int] | None = option(
        default_factory=list, doc="REPA projector output widths ([] as the DiT release; null: one per built encoder)"
    )
    projector_dim: int = option(2048, doc="hidden width of the REPA projector MLPs")
    qk_norm: bool = option(False, doc="LayerNorm on queries and keys in attention")
    weights: str | None = option(None, doc="checkpoint: local file/folder or hf://org/repo/file; null: random init")
    weights_key: str | None = option(
        "ema", doc="entry of a training checkpoint (.pt with model/ema) to load; a plain state dict ignores it"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise ValueError(f"cfg_channels must be >= 1 or null, got {self.cfg_channels}")


@hookimpl
def register_components(register: Any) -> None:
    register(
        "denoiser",
        "dit",
        summary="DiT class-conditional diffusion transformer (DDPM steps, learned sigma, 3-channel CFG)",
        config=DiTConfig,
        factory="repae_dit.model:build_dit",
        presets=DIT_PRESETS,
        preset_field="size",
    )
