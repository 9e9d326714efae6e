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

__all__ = ["SHAPE_FREE_FIELDS", "architecture_problem", "release_of_layout", "release_of_source"]

SHAPE_FREE_FIELDS = ("num_heads",)
"""The architecture fields that change no parameter shape (strict loading cannot catch them)."""


def _family_presets(family: str) -> Mapping[str, Mapping[str, Any]]:
    from repae_encoders import CLIP_PRESETS, DINOV2_PRESETS, IJEPA_PRESETS

    return {"dinov2": DINOV2_PRESETS, "clip": CLIP_PRESETS, "ijepa": IJEPA_PRESETS}[family]


def _releases(family: str) -> dict[str, tuple[Mapping[str, Any], str]]:
    """``{size: (preset fields, official source)}`` of the sizes that have released weights."""
    from repae_encoders import OFFICIAL_WEIGHTS

    presets = _family_presets(family)
    return {size: (presets[size], source) for size, (source, _) in OFFICIAL_WEIGHTS[family].items()}


def release_of_source(family: str, size: str, weights: str | None) -> tuple[str, Mapping[str, Any], str] | None:
    """``(size, preset fields, source)`` of the release the config loads: its size's official weights when
    ``weights`` is null, else the release whose official source ``weights`` names; ``None`` otherwise."""
    releases = _releases(family)
    if weights is None:
        return (size, *releases[size]) if size in releases else None
    text = weights.split("@")[0].rstrip("/")
    for name, (preset, source) in releases.items():
        if text == source or (text.startswith("hf://") and source.startswith(text + "/")):
            return name, preset, source
    return None


def release_of_layout(family: str, arch: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """``(size, preset fields)`` of the release whose key layout ``arch`` has: every preset field equal but the
    shape-free ones; ``None`` when no release has it."""
    for size, (preset, _) in _releases(family).items():
        if all(arch.get(f) == v for f, v in preset.items() if f not in SHAPE_FREE_FIELDS):
            return size, preset
    return None


def architecture_problem(arch: Mapping[str, Any], preset: Mapping[str, Any], *, what: str, size: str,
                         fields: tuple[str, ...] | None = None) -> tuple[str, str] | None:
    """``(first differing field, message)`` when the config's ``arch`` differs from the release's ``preset`` in any
    of ``fields`` (default: all the preset sets), else ``None``; the message names both values and the preset."""
    diffs = [f for f in (fields or tuple(preset)) if f in preset and arch.get(f) != preset[f]]
    if not diffs:
        return None
    listed = ", ".join(f"{f} {arch.get(f)} (the weights: {preset[f]})" for f in diffs)
    shape_free = [f for f in diffs if f in SHAPE_FREE_FIELDS]
    silent = (f"; {' and '.join(shape_free)} changes no parameter shape, so these weights would load without an "
              "error and compute other features") if shape_free else ""
    fix = ", ".join(f"{f}: {preset[f]}" for f in diffs)
    return diffs[0], (f"the weights are {what}; the config differs from them in {listed}{silent}. Fix: use the preset "
                      f"`size: {size}` (and leave {', '.join(diffs)} unset), or set {fix}")
