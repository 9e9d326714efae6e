"""DiT denoiser plugin (registry name ``dit``): the class-conditional diffusion transformer of Peebles & Xie,
"Scalable Diffusion Models with Transformers", 2023 (arXiv 2212.09748).

Torch-free registration only; the model is :mod:`repae_dit.model` and shares its layers with ``sit``
(:mod:`repae_sit.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repae_sit import TransformerConfig, size_presets

from repae import FieldError, Release, hookimpl, option

__all__ = ["DIT_PRESETS", "DiTConfig"]

DIT_PRESETS = size_presets({"depth": 3, "hidden_size": 64, "num_heads": 4, "patch_size": 2})
"""``size`` presets of ``dit``: S/B/L/XL x patch 1/2/4/8, and ``tiny`` (the golden test architecture, 3 blocks)."""


@dataclass(kw_only=True)
class DiTConfig(TransformerConfig):
    """Config of the ``dit`` denoiser: the SiT trunk (:class:`repae_sit.TransformerConfig`) with DiT's interface.

    The time input is whatever the diffusion process uses: the integer DDPM step 0..999 for the official weights
    (embedded as is, no rescaling). The official release has no REPA projector (``encoder_dims`` derived from a
    recipe without encoders is ``[]``).
    """

    learn_sigma: bool = option(True, doc="output 2*C channels: noise prediction, then variance interpolation values")
    cfg_channels: int | None = option(
        3, doc="channels forward_with_cfg guides (3 as the DiT reference; null: all)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise FieldError("cfg_channels", f"must be >= 1 or null, got {self.cfg_channels}")

    def releases(self) -> tuple[Release, ...]:
        from repae_sit.releases import DIT_RELEASES

        return DIT_RELEASES


@hookimpl
def register_components(register: Any) -> None:
    register(
        "denoiser",
        "dit",
        summary="DiT class-conditional diffusion transformer (DDPM steps, learned sigma, 3-channel CFG)",
        config=DiTConfig,
        factory="repae_dit.model:build_dit",
        presets=DIT_PRESETS,
    )
