"""The released SiT / REPA / REPA-E / DiT checkpoints, and the check that a config loading one agrees with it field by
field (torch-free).

Strict loading catches every field that changes a parameter shape. Two do not: ``num_heads`` (the fused ``qkv``
projection is ``3·D × D`` however it is split into heads) and SiT's ``time_convention`` (which way ``t`` runs). A
config that loads weights is checked against the release those weights are:

- by name, in the config check (``repae recipe validate`` names the key): ``weights`` naming a released repository
  (``hf://REPA-E/sit-repae-sdvae/...``) or release file (``DiT-XL-2-256x256.pt``, ``SiT-XL-2-256x256.pt``) must come
  with the release's architecture (the fields derived from the other components, ``input_size``, ``in_channels`` and
  ``encoder_dims``, are left to strict loading);
- by layout, before the tensors are copied (on ``meta`` too, for a local safetensors file, from its header): a file
  whose key layout is a release's must come with the release's ``num_heads`` (and ``time_convention``), unless the
  file states its own architecture (the ``repae.architecture`` metadata that ``repae export`` writes): then it is
  checked against that statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from repae import Release

__all__ = [
    "ARCHITECTURE_FIELDS",
    "DERIVED_FIELDS",
    "DIT_RELEASES",
    "SHAPE_FREE_FIELDS",
    "SIT_RELEASES",
    "architecture_of",
    "compared_fields",
    "release_of_layout",
]

ARCHITECTURE_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "input_size", "in_channels",
                       "num_classes", "encoder_dims", "projector_dim", "qk_norm", "learn_sigma", "time_convention")
"""Every field of a SiT/DiT config that describes the network or what its weights compute."""
SHAPE_FREE_FIELDS = ("num_heads", "time_convention")
"""The fields that change no parameter shape (strict loading cannot catch them)."""
DERIVED_FIELDS = ("input_size", "in_channels", "encoder_dims")
"""Fields usually derived from the other components (the config check leaves them to strict loading)."""


_XL = {"depth": 28, "hidden_size": 1152, "num_heads": 16, "mlp_ratio": 4.0, "num_classes": 1000, "qk_norm": False,
       "projector_dim": 2048}
SIT_RELEASES: tuple[Release, ...] = (
    Release("REPA-E / REPA SiT-XL/2 (SD-VAE latents, one projector to DINOv2-B)", "XL/2",
            {**_XL, "patch_size": 2, "input_size": 32, "in_channels": 4, "encoder_dims": [768], "learn_sigma": False,
             "time_convention": "noise-at-1"}, repositories=("REPA-E/sit-repae-sdvae",)),
    Release("REPA-E SiT-XL/1 (f16d32 latents, one projector to DINOv2-B)", "XL/1",
            {**_XL, "patch_size": 1, "input_size": 16, "in_channels": 32, "encoder_dims": [768], "learn_sigma": False,
             "time_convention": "noise-at-1"},
            repositories=("REPA-E/sit-repae-invae", "REPA-E/sit-repae-vavae", "REPA-E/sit-ldm-e2e-vavae")),
    Release("SiT-XL/2 of willisma/SiT (SiT-XL-2-256x256.pt, trained with t = 1 as data)", "XL/2",
            {**_XL, "patch_size": 2, "input_size": 32, "in_channels": 4, "encoder_dims": [], "learn_sigma": True,
             "time_convention": "data-at-1"}, files=("SiT-XL-2-256x256.pt",)),
)
DIT_RELEASES: tuple[Release, ...] = tuple(
    Release(f"DiT-XL/2 {px}x{px} (facebookresearch/DiT)", "XL/2",
            {**_XL, "patch_size": 2, "input_size": px // 8, "in_channels": 4, "encoder_dims": [], "learn_sigma": True},
            files=(f"DiT-XL-2-{px}x{px}.pt",))
    for px in (256, 512)
)


def _value(arch: Mapping[str, Any], name: str) -> Any:
    value = arch[name]
    return list(value) if isinstance(value, (list, tuple)) else value


def architecture_of(config: Any) -> dict[str, Any]:
    """The architecture fields of a SiT/DiT config (those it has)."""
    return {f: _value(vars(config), f) for f in ARCHITECTURE_FIELDS if hasattr(config, f)}


def layout(arch: Mapping[str, Any]) -> tuple[Any, ...]:
    """What fixes the key layout and every shape (equal layouts: interchangeable state dicts). The label table's null
    row is part of it but only through ``class_dropout_prob``, which the releases all have (> 0)."""
    encoders = tuple(_value(arch, "encoder_dims"))
    return (arch["depth"], arch["hidden_size"], arch["patch_size"], int(arch["hidden_size"] * arch["mlp_ratio"]),
            arch["input_size"], arch["in_channels"], arch["num_classes"], encoders,
            arch["projector_dim"] if encoders else None, bool(arch["qk_norm"]), bool(arch["learn_sigma"]))


def release_of_layout(arch: Mapping[str, Any], releases: Sequence[Release]) -> Release | None:
    """The release whose key layout ``arch`` has (``None``: none has it)."""
    return next((r for r in releases if layout(r.architecture) == layout(arch)), None)


def compared_fields(arch: Mapping[str, Any], expected: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    """The ``fields`` to compare with :func:`repae.architecture_mismatch`: ``projector_dim`` only when both have
    projectors (without one its width is no weight)."""
    if not arch.get("encoder_dims") or not expected.get("encoder_dims"):
        return [f for f in fields if f != "projector_dim"]
    return list(fields)
