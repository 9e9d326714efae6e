"""The released encoder weights and the check that a config loading them agrees with them field by field
(torch-free).

Each size preset with an entry in :data:`repae_encoders.OFFICIAL_WEIGHTS` is a release (timm's DINOv2 and CLIP hub
copies, Meta's I-JEPA). Strict loading catches every architecture field but one: ``num_heads`` (the fused ``qkv``
projection is ``3·D × D`` however it is split into heads), so ``{name: dinov2, size: vit-b14, num_heads: 6}`` would
load DINOv2-B and compute other features. Checked:

- in the config check (``repae recipe validate`` names the key): ``weights: null`` (the size's release) or ``weights``
  naming a release's source must come with every architecture field of that release;
- when a file is loaded (and on ``meta`` from a local safetensors header): a file with a release's key layout must
  come with the release's ``num_heads``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from repae import Release
from repae import release_of_source as release_named_by

__all__ = ["SHAPE_FREE_FIELDS", "release_of_layout", "release_of_source", "releases"]

SHAPE_FREE_FIELDS = ("num_heads",)
"""The architecture fields that change no parameter shape (strict loading cannot catch them)."""


def _family_presets(family: str) -> Mapping[str, Mapping[str, Any]]:
    from repae_encoders import CLIP_PRESETS, DINOV2_PRESETS, IJEPA_PRESETS

    return {"dinov2": DINOV2_PRESETS, "clip": CLIP_PRESETS, "ijepa": IJEPA_PRESETS}[family]


def releases(family: str) -> tuple[Release, ...]:
    """The sizes of ``family`` that have released weights, as :class:`repae.Release` (named ``"{family} {size}"``,
    preset: the size, source: the official one)."""
    from repae_encoders import OFFICIAL_WEIGHTS

    presets = _family_presets(family)
    return tuple(Release(f"{family} {size}", size, presets[size], sources=(source,))
                 for size, (source, _) in OFFICIAL_WEIGHTS[family].items())


def release_of_source(family: str, size: str, weights: str | None) -> Release | None:
    """The release the config loads: its size's official weights when ``weights`` is null, else the release whose
    official source ``weights`` names (:func:`repae.release_of_source`); ``None`` otherwise."""
    if weights is None:
        return next((r for r in releases(family) if r.preset == size), None)
    return release_named_by(weights, releases(family))


def release_of_layout(family: str, arch: Mapping[str, Any]) -> Release | None:
    """The release whose key layout ``arch`` has: every preset field equal but the shape-free ones; ``None`` when no
    release has it."""
    return next((r for r in releases(family) if all(arch.get(f) == v for f, v in r.architecture.items()
                                                    if f not in SHAPE_FREE_FIELDS)), None)
