"""The released KL-VAEs and the check that a config loading one of them agrees with it field by field (torch-free).

Strict loading catches every field that changes a parameter shape; ``norm_groups`` changes none (a GroupNorm's
weight has one entry per channel whatever the grouping), so the SD-VAE weights load into ``norm_groups: 4`` without a
word and then compute another function. A config that loads weights is therefore checked against the release those
weights are:

- by name, in the config check (``repae recipe validate`` names the key): ``weights`` naming a released repository
  (``hf://REPA-E/sdvae``, ``hf://stabilityai/sd-vae-ft-ema``, ...) must come with that release's architecture;
- by layout, before the tensors are copied (``repae recipe validate`` too, for a local file): a file whose key layout is
  a release's (the config's shape fields equal the release's, and strict loading demands the file's equal the
  config's) must come with the release's ``norm_groups``, unless the file states its own architecture (a diffusers
  ``config.json`` next to it, or the ``repae.architecture`` metadata that ``repae export`` writes): then it is checked
  against that statement.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHITECTURE_FIELDS",
    "ARCHITECTURE_METADATA",
    "RELEASES",
    "Release",
    "architecture_problem",
    "declared_architecture",
    "release_of_layout",
    "release_of_source",
]

ARCHITECTURE_FIELDS = ("latent_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                       "norm_groups")
"""Every field of a KL-VAE config that describes the network (the rest: where the weights come from)."""
SHAPE_FREE_FIELDS = ("norm_groups",)
"""The architecture fields that change no parameter shape (strict loading cannot catch them)."""
ARCHITECTURE_METADATA = "repae.architecture"
"""safetensors metadata key under which repae's exports state the architecture (JSON of the fields above)."""


@dataclass(frozen=True)
class Release:
    """A published set of weights: its name, the preset that builds its architecture, and where it is published."""

    name: str
    preset: str
    architecture: Mapping[str, Any]
    repositories: tuple[str, ...]
    """Hugging Face repositories (``org/name``) holding it (LDM ``.pt`` or diffusers folders)."""


def _f8d4() -> dict[str, Any]:
    from repae_vae import F8D4

    return dict(F8D4)


def _f16d32() -> dict[str, Any]:
    from repae_vae import F16D32

    return dict(F16D32)


RELEASES: tuple[Release, ...] = (
    Release("SD-VAE f8d4 (REPA-E sdvae / e2e-sdvae, stabilityai sd-vae-ft-ema / -mse)", "f8d4", _f8d4(),
            ("REPA-E/sdvae", "REPA-E/e2e-sdvae", "REPA-E/e2e-sdvae-hf", "REPA-E/sit-repae-sdvae",
             "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")),
    Release("f16d32 (REPA-E invae / vavae / e2e-invae / e2e-vavae, LightningDiT VA-VAE)", "f16d32", _f16d32(),
            ("REPA-E/invae", "REPA-E/vavae", "REPA-E/e2e-invae", "REPA-E/e2e-vavae", "REPA-E/e2e-invae-hf",
             "REPA-E/e2e-vavae-hf", "REPA-E/sit-repae-invae", "REPA-E/sit-repae-vavae",
             "hustvl/vavae-imagenet256-f16d32-dinov2")),
)


def _repository(source: str | None) -> str | None:
    if not source or not source.startswith("hf://"):
        return None
    parts = source[len("hf://"):].split("@")[0].strip("/").split("/")
    return "/".join(parts[:2]) if len(parts) >= 2 else None


def release_of_source(source: str | None) -> Release | None:
    """The release a ``weights`` source names (an ``hf://`` repository listed in :data:`RELEASES`), else ``None``."""
    repo = _repository(source)
    return next((r for r in RELEASES if repo is not None and repo.lower() in (x.lower() for x in r.repositories)),
                None)


def _attention_levels(arch: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(i for i in range(len(arch["ch_mult"])) if arch["resolution"] // 2**i in arch["attn_resolutions"])


def layout(arch: Mapping[str, Any]) -> tuple[Any, ...]:
    """What fixes the key layout and every shape: equal layouts, interchangeable state dicts."""
    return (arch["latent_channels"], arch["ch"], tuple(arch["ch_mult"]), arch["num_res_blocks"],
            _attention_levels(arch))


def release_of_layout(arch: Mapping[str, Any]) -> Release | None:
    """The release whose key layout ``arch`` has (``None``: no release has it)."""
    return next((r for r in RELEASES if layout(r.architecture) == layout(arch)), None)


def _value(arch: Mapping[str, Any], name: str) -> Any:
    return list(arch[name]) if isinstance(arch[name], (list, tuple)) else arch[name]


def architecture_problem(arch: Mapping[str, Any], expected: Mapping[str, Any], *, what: str, fields: Sequence[str],
                         preset: str | None) -> tuple[str, str] | None:
    """``(first differing field, message)`` when ``arch`` (the config's) differs from ``expected`` (the weights') in
    any of ``fields``, else ``None``. ``what`` says what the weights are; the message names every differing field
    with both values, and the preset to use."""
    fields = [f for f in fields if f in expected]
    if _attention_levels(arch) == _attention_levels({**arch, **expected}):  # they only say where attention lands
        fields = [f for f in fields if f not in ("attn_resolutions", "resolution")]
    diffs = [f for f in fields if _value(arch, f) != _value(expected, f)]
    if not diffs:
        return None
    listed = ", ".join(f"{f} {_value(arch, f)} (the weights: {_value(expected, f)})" for f in diffs)
    shape_free = [f for f in diffs if f in SHAPE_FREE_FIELDS]
    silent = (f"; {' and '.join(shape_free)} changes no parameter shape, so these weights would load without an error "
              "and compute something else") if shape_free else ""
    fix = ", ".join(f"{f}: {_value(expected, f)}" for f in diffs)
    fix = f"use the preset `size: {preset}` (and leave {', '.join(diffs)} unset), or set {fix}" if preset else f"set {fix}"
    return diffs[0], f"the weights are {what}; the config differs from them in {listed}{silent}. Fix: {fix}"


def declared_architecture(path: Path) -> tuple[dict[str, Any], str] | None:
    """The architecture a weights file states about itself, with where it says so: the ``repae.architecture``
    metadata of a safetensors file (repae's exports) or the diffusers ``config.json`` next to a diffusers weights file.
    Reads only that metadata (the header), never the tensors. ``None`` when the file states nothing."""
    from repae_vae.convert import architecture_from_diffusers

    if path.suffix == ".safetensors" and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                stated = (f.metadata() or {}).get(ARCHITECTURE_METADATA)
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
            stated = None
        if stated:
            try:
                return dict(json.loads(stated)), f"its {ARCHITECTURE_METADATA} metadata states"
            except ValueError:
                pass
    config = path.parent / "config.json"
    if path.name.startswith("diffusion_pytorch_model") and config.is_file():
        try:
            return architecture_from_diffusers(json.loads(config.read_text())), f"its diffusers {config} states"
        except (ValueError, TypeError, AttributeError):
            return None
    return None
