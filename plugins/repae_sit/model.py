"""SiT: Scalable Interpolant Transformer (Ma et al., 2024, arXiv 2401.08740) with the REPA projectors (Yu et al.,
2024, arXiv 2410.06940) used by REPA-E (Leng et al., 2025, arXiv 2504.10483).

Time convention of repae: ``t`` in ``[0, 1]``, ``t = 1`` is pure noise, ``x_t = (1 - t) x + t eps`` and the
prediction is the velocity ``eps - x``. ``t`` is embedded as is (no x1000). Weights trained with the opposite
convention (the willisma/SiT release: ``t = 1`` is data, velocity ``x - eps``) are served through
``time_convention: data-at-1``, which feeds ``1 - t`` and negates the prediction.

The latent BatchNorm of REPA-E is *not* part of this module (see :mod:`repae_sit.checkpoint`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from repae import ARCHITECTURE_METADATA, BuildContext, DenoiserOutput, ExportContext, UserError, write_safetensors
from repae_sit import SiTConfig, TransformerConfig
from repae_sit.checkpoint import load_configured_weights, to_official
from repae_sit.layers import DiffusionTransformer

__all__ = ["SiT", "build_denoiser", "build_sit"]

_Model = TypeVar("_Model", bound=DiffusionTransformer)

OFFICIAL_FORMAT = "official"


class SiT(DiffusionTransformer):
    """SiT velocity model implementing :class:`repae.Denoiser` (and :class:`repae.Exportable`: the official layout).

    Built from :class:`repae_sit.SiTConfig` by :func:`build_sit`; ``loaded_weights`` and ``latent_norm_state`` record
    what was loaded (empty / ``None`` for a random init).
    """

    def __init__(self, *, time_convention: str = "noise-at-1", **trunk: Any) -> None:
        if time_convention not in ("noise-at-1", "data-at-1"):
            raise ValueError(f"time_convention must be 'noise-at-1' or 'data-at-1', got {time_convention!r}")
        super().__init__(**trunk)
        self.time_convention = time_convention

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        feature_depths: Sequence[int] = (),
        features_only: bool = False,
        force_drop: Tensor | None = None,
    ) -> DenoiserOutput:
        """Velocity ``eps - x`` at noisy latents ``x`` ``[B, C, H, W]``, times ``t`` ``[B]`` (1 = noise), labels ``y``.

        ``hidden[d]`` holds the tokens after block ``d`` (1-based) for each ``d`` in ``feature_depths``; with
        ``features_only`` the pass stops after the deepest of them and ``prediction`` is ``None``. ``force_drop``
        (bool ``[B]``) replaces labels by the null label instead of the random training-mode dropout.
        """
        flipped = self.time_convention == "data-at-1"
        out = self.run(
            x,
            1 - t if flipped else t,
            y,
            feature_depths=feature_depths,
            features_only=features_only,
            force_drop=force_drop,
        )
        if out.prediction is not None:
            pred = out.prediction[:, : self.in_channels] if self.learn_sigma else out.prediction
            out.prediction = -pred if flipped else pred
        return out


def export_official(model: DiffusionTransformer, fmt: str, folder: Path, context: ExportContext) -> dict[str, str]:
    """:meth:`repae.Exportable.export` of SiT and DiT: ``<stem>.safetensors`` in the official layout (the repae state
    dict is the official one) with the latent BatchNorm buffers as ``bn.*`` when the run has a BatchNorm normaliser,
    as REPA-E's checkpoints hold them; loads back through ``weights:``."""
    if fmt != OFFICIAL_FORMAT:
        raise UserError(f"{type(model).__name__} exports only the format {OFFICIAL_FORMAT!r}, not {fmt!r}")
    norm = dict(context.normalizer_state or {})
    batchnorm = "running_mean" in norm and "running_var" in norm
    name = f"{context.stem}.safetensors"
    metadata = {**(context.metadata or {}), ARCHITECTURE_METADATA: json.dumps(model.architecture)}
    write_safetensors(folder / name, to_official(model, norm if batchnorm else None), metadata=metadata)
    what = f"{type(model).__name__} ({context.stem}), official layout" + (
        ", latent BatchNorm buffers as bn.*" if batchnorm else "")
    return {name: what}


def build_denoiser(cls: type[_Model], config: TransformerConfig, context: BuildContext, **specific: Any) -> _Model:
    """Build ``cls`` (a :class:`DiffusionTransformer`) from a SiT/DiT config, then load ``config.weights`` unless
    ``context.load_weights`` is false. ``specific`` holds the constructor arguments of ``cls`` beyond the shared
    ones. (The core derives ``input_size``, ``in_channels`` and ``encoder_dims`` before calling the factory.)"""
    model = cls(
        input_size=config.input_size,
        in_channels=config.in_channels,
        learn_sigma=config.learn_sigma,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        class_dropout_prob=config.class_dropout_prob,
        qk_norm=config.qk_norm,
        pos_embed=config.pos_embed,
        encoder_dims=config.encoder_dims,
        projector_dim=config.projector_dim,
        **specific,
    )
    load_configured_weights(model, config, context)
    return model


def build_sit(config: SiTConfig, context: BuildContext) -> SiT:
    """Registry factory of ``sit``: build, then load ``config.weights`` unless ``context.load_weights`` is false."""
    return build_denoiser(SiT, config, context, time_convention=config.time_convention)
