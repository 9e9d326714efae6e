"""SiT denoiser plugin (registry name ``sit``): the REPA / REPA-E latent diffusion transformer.

SiT: "Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers", Ma et al., 2024
(arXiv 2401.08740); REPA projectors: Yu et al., 2024 (arXiv 2410.06940); REPA-E: Leng et al., 2025
(arXiv 2504.10483).

This module only declares the config, the presets and the registration; it imports neither torch nor the model code
(``repae list`` stays fast). The model lives in :mod:`repae_sit.model`, the layers it shares with DiT in
:mod:`repae_sit.layers`, the checkpoint adapters in :mod:`repae_sit.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from repae import BuildContext, FieldError, Release, architecture_mismatch, hookimpl, option, release_of_source

__all__ = ["SIZES", "SIT_PRESETS", "SiTConfig", "TransformerConfig", "size_presets"]

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

_DERIVED = "; derived from the dataset and the tokenizer unless set"


@dataclass(kw_only=True)
class TransformerConfig:
    """The trunk SiT and DiT share (patch embedding, adaLN-Zero blocks, REPA projectors) and how it is shaped.

    ``size`` fills depth/width/heads/patch (fields set explicitly win). ``input_size`` and ``in_channels`` are derived
    from the components built before the denoiser unless set: the latent shape of the dataset and the tokenizer
    (``dataset.resolution // tokenizer.downsample``, ``tokenizer.latent_channels``, or a latent cache's shape), and
    ``encoder_dims`` from the encoders (one projector per encoder, its output width the encoder's ``embed_dim``).
    """

    EXPORT_FORMATS = ("official",)
    """`repae export`'s formats (the built model's ``export_formats``), declared to be checked before building."""

    size: str = option("XL/2", doc="preset: S/B/L/XL x patch 1/2/4/8 (e.g. XL/2), or tiny for tests")
    depth: int = option(28, doc="number of transformer blocks")
    hidden_size: int = option(1152, doc="token width")
    num_heads: int = option(16, doc="attention heads per block")
    patch_size: int = option(2, doc="latent patch size (tokens = (input_size / patch_size)^2)")
    mlp_ratio: float = option(4.0, doc="MLP hidden width / token width")
    input_size: int = option(32, doc="latent height = width (32: 256 px, f8)" + _DERIVED)
    in_channels: int = option(4, doc="latent channels (4: SD-VAE)" + _DERIVED)
    num_classes: int = option(1000, doc="number of classes; label num_classes is the null (CFG) label")
    class_dropout_prob: float = option(
        0.1, doc="label dropout in training mode; > 0 adds the null row to the label table"
    )
    encoder_dims: list[int] = option(
        default_factory=list, doc="output width of each REPA projector; derived from the encoders unless set"
    )
    projector_dim: int = option(2048, doc="hidden width of the REPA projector MLPs")
    qk_norm: bool = option(False, doc="LayerNorm on queries and keys in attention")
    learn_sigma: bool = option(False, doc="the final layer predicts 2*C channels (the second C: variance values)")
    pos_embed: Literal["fixed", "learned"] = option(
        "fixed", doc="positional table: fixed (sin-cos buffer, never trained; SiT, DiT, REPA) or learned (a parameter "
        "initialised to the same sin-cos table and trained, as the official REPA-E end-to-end step does)"
    )
    weights: str | None = option(None, doc="checkpoint: local file/folder or hf://org/repo/file; null: random init")
    weights_key: str | None = option(
        "ema", doc="entry of a training checkpoint (.pt with model/ema) to load; a plain state dict ignores it"
    )

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "num_classes", "input_size", "in_channels",
                     "projector_dim"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise FieldError("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise FieldError("class_dropout_prob", f"must be in [0, 1), got {self.class_dropout_prob}")
        if self.input_size % self.patch_size:
            raise FieldError("input_size", f"{self.input_size} is not divisible by patch_size {self.patch_size} (the "
                             "latents must tile into patches: change the image resolution or the size's patch)")
        if any(d < 1 for d in self.encoder_dims):
            raise FieldError("encoder_dims", f"must be >= 1 each, got {self.encoder_dims}")
        from repae_sit.releases import ARCHITECTURE_FIELDS, DERIVED_FIELDS, SHAPE_FREE_FIELDS, architecture_of
        from repae_sit.releases import compared_fields

        release = release_of_source(self.weights, self.releases())  # weights naming a release: its architecture
        if release is not None:
            arch = architecture_of(self)
            fields = [f for f in ARCHITECTURE_FIELDS if f not in DERIVED_FIELDS]
            problem = architecture_mismatch(arch, release.architecture, preset=release.preset,
                                            fields=compared_fields(arch, release.architecture, fields),
                                            shape_free=SHAPE_FREE_FIELDS,
                                            what=f"the {release.name} release ({self.weights})")
            if problem is not None:
                raise FieldError(problem.field, problem.message)

    def releases(self) -> tuple[Release, ...]:
        """The published checkpoints of this denoiser (:class:`repae.Release`) its weights are checked against
        (:mod:`repae_sit.releases`)."""
        return ()

    def derive(self, context: BuildContext) -> Mapping[str, Any]:
        """``input_size`` / ``in_channels`` from the latent shape the dataset and tokenizer give, ``encoder_dims``
        from the encoders (see the class docstring); the core applies them to the fields a recipe leaves unset."""
        out: dict[str, Any] = {"encoder_dims": [int(e.embed_dim) for e in context.encoders]}
        channels, shape = context.latent_channels(), context.latent_shape()
        if channels is not None:
            out["in_channels"] = channels
        if shape is not None:
            out["input_size"] = shape[1]
        return out


@dataclass(kw_only=True)
class SiTConfig(TransformerConfig):
    """Config of the ``sit`` denoiser (velocity prediction, continuous time ``t`` in ``[0, 1]``, 1 = noise)."""

    time_convention: Literal["noise-at-1", "data-at-1"] = option(
        "noise-at-1", doc="time the weights were trained with: noise-at-1 (REPA/REPA-E) or data-at-1 (willisma/SiT)"
    )

    def releases(self) -> tuple[Release, ...]:
        from repae_sit.releases import SIT_RELEASES

        return SIT_RELEASES


@hookimpl
def register_components(register: Any) -> None:
    register(
        "denoiser",
        "sit",
        summary="SiT latent diffusion transformer with REPA projectors (REPA / REPA-E), velocity prediction",
        config=SiTConfig,
        factory="repae_sit.model:build_sit",
        presets=SIT_PRESETS,
    )
