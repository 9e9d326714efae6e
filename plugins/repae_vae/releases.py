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
from pathlib import Path
from typing import Any

from repae import ARCHITECTURE_METADATA, Release
from repae import declared_architecture as stated_architecture

__all__ = [
    "ARCHITECTURE_FIELDS",
    "RELEASES",
    "SHAPE_FREE_FIELDS",
    "compared_fields",
    "declared_architecture",
    "release_of_layout",
]

ARCHITECTURE_FIELDS = ("latent_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                       "norm_groups")
"""Every field of a KL-VAE config that describes the network (the rest: where the weights come from)."""
SHAPE_FREE_FIELDS = ("norm_groups",)
"""The architecture fields that change no parameter shape (strict loading cannot catch them)."""


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
"""The released KL-VAEs (:class:`repae.Release`), named by their hub repositories."""


def _attention_levels(arch: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(i for i in range(len(arch["ch_mult"])) if arch["resolution"] // 2**i in arch["attn_resolutions"])


def layout(arch: Mapping[str, Any]) -> tuple[Any, ...]:
    """What fixes the key layout and every shape: equal layouts, interchangeable state dicts."""
    return (arch["latent_channels"], arch["ch"], tuple(arch["ch_mult"]), arch["num_res_blocks"],
            _attention_levels(arch))


def release_of_layout(arch: Mapping[str, Any]) -> Release | None:
    """The release whose key layout ``arch`` has (``None``: no release has it)."""
    return next((r for r in RELEASES if layout(r.architecture) == layout(arch)), None)


def compared_fields(arch: Mapping[str, Any], expected: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    """The ``fields`` to compare with :func:`repae.architecture_mismatch`: ``attn_resolutions`` and ``resolution``
    only say where attention lands, so they are left out when both put it at the same levels."""
    if _attention_levels(arch) == _attention_levels({**arch, **expected}):
        return [f for f in fields if f not in ("attn_resolutions", "resolution")]
    return list(fields)


def declared_architecture(path: Path) -> tuple[dict[str, Any], str] | None:
    """The architecture a weights file states about itself, with where it says so: the ``repae.architecture``
    metadata of a safetensors file (repae's exports, :func:`repae.declared_architecture`) or the diffusers
    ``config.json`` next to a diffusers weights file. Reads only that metadata (the header), never the tensors.
    ``None`` when the file states nothing."""
    from repae_vae.convert import architecture_from_diffusers

    stated = stated_architecture(path)
    if stated is not None:
        return stated, f"its {ARCHITECTURE_METADATA} metadata states"
    config = path.parent / "config.json"
    if path.name.startswith("diffusion_pytorch_model") and config.is_file():
        try:
            return architecture_from_diffusers(json.loads(config.read_text())), f"its diffusers {config} states"
        except (ValueError, TypeError, AttributeError):
            return None
    return None
