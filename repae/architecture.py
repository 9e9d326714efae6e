"""Weights and configuration agree: published releases, the field-by-field check, and what a weights file states
about itself (torch-free).

Strict loading catches every architecture field that changes a parameter shape, but not the others (a GroupNorm's
number of groups, an attention's number of heads, which way time runs): weights load into such a config without an
error and compute something else. A component that loads weights of a known release therefore compares its config
with the release, field by field, with :func:`architecture_mismatch`, and reports one problem naming each differing
field, both values, whether it changes no parameter shape, and the preset to use:

- by name, in the config check (``repae recipe validate`` names the key): ``weights`` naming a :class:`Release`
  (:func:`release_of_source`: a hub repository, a release file name or an exact source);
- by what a file states (:func:`declared_architecture`: the :data:`ARCHITECTURE_METADATA` that ``repae export``
  writes) or by its key layout (:func:`safetensors_shapes`, read from the header alone, so also on ``meta``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHITECTURE_METADATA",
    "ArchitectureMismatch",
    "Release",
    "architecture_mismatch",
    "declared_architecture",
    "hub_repository",
    "layout_mismatch",
    "release_of_source",
    "safetensors_header",
    "safetensors_shapes",
    "same_value",
]

ARCHITECTURE_METADATA = "repae.architecture"
"""safetensors metadata key under which repae's exports state the architecture (JSON of the config's fields)."""

_MAX_HEADER = 100_000_000
"""The largest safetensors header accepted (the format's own limit)."""


@dataclass(frozen=True)
class Release:
    """A published set of weights: its name, the preset that builds its architecture, that architecture (config
    fields), and the names it goes by (any of them identifies it, see :func:`release_of_source`)."""

    name: str
    preset: str
    architecture: Mapping[str, Any]
    repositories: tuple[str, ...] = ()
    """Hugging Face repositories (``org/name``) holding it: ``hf://org/name[/file][@revision]`` names it."""
    files: tuple[str, ...] = ()
    """File names it is published under (matched at the end of a path, URL or hub source)."""
    sources: tuple[str, ...] = ()
    """Exact sources (a URL, ``hf://org/name/file``); an ``hf://`` prefix of one (its repository folder) names it too."""
    subfolder: str | None = None
    """The folder of the weights inside its repositories (a diffusers pipeline's ``vae``), when not the top."""

    def matches(self, source: str | None) -> bool:
        """Whether the ``weights`` source ``source`` names this release."""
        if not source:
            return False
        text = source.split("@")[0].rstrip("/") if source.startswith("hf://") else source.rstrip("/")
        repo = hub_repository(source)
        if repo is not None and repo.lower() in (r.lower() for r in self.repositories):
            return True
        if text.replace("\\", "/").rsplit("/", 1)[-1] in self.files:
            return True
        return any(text == s or (text.startswith("hf://") and s.startswith(text + "/")) for s in self.sources)


def hub_repository(source: str | None) -> str | None:
    """``org/name`` of an ``hf://org/name[/path][@revision]`` source, else ``None``."""
    if not source or not source.startswith("hf://"):
        return None
    parts = [p for p in source[len("hf://"):].split("@")[0].split("/") if p]
    return "/".join(parts[:2]) if len(parts) >= 2 else None


def release_of_source(source: str | None, releases: Iterable[Release]) -> Release | None:
    """The first of ``releases`` that the ``weights`` source ``source`` names (:meth:`Release.matches`), else
    ``None``."""
    return next((r for r in releases if r.matches(source)), None)


def same_value(a: Any, b: Any) -> bool:
    """Whether two config values are the same: lists and tuples alike, numbers within rounding (``1`` and ``1.0``),
    ``True`` never equal to ``1``."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return bool(a == b)


def _shown(value: Any) -> Any:
    return [_shown(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class ArchitectureMismatch:
    """What :func:`architecture_mismatch` found: the differing fields (config keys, first one first) and the one
    message that names each with both values, the shape-free ones, and the fix. ``raise FieldError(m.field,
    m.message)`` in a config check, ``raise UserError(str(m))`` when loading."""

    field: str
    fields: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return self.message


def architecture_mismatch(config: Mapping[str, Any], weights: Mapping[str, Any], *, what: str,
                          fields: Sequence[str] | None = None, shape_free: Collection[str] = (),
                          preset: str | None = None) -> ArchitectureMismatch | None:
    """Compare the architecture fields of a config (``config``) with those of the weights it loads (``weights``: a
    :class:`Release`'s ``architecture``, or what a file states), over ``fields`` (default: every field of
    ``weights``; a field either side lacks is skipped), and return the mismatch, or ``None`` when they agree.

    ``what`` says what the weights are ("the SD-VAE f8d4 release (hf://REPA-E/sdvae)"); ``shape_free`` lists the
    fields that change no parameter shape (strict loading cannot catch them: the message says so); ``preset`` is the
    ``size`` that builds the weights' architecture (the fix names it; ``None``: the fix sets the fields).
    """
    names = list(weights) if fields is None else list(fields)
    diffs = [f for f in names if f in weights and f in config and not same_value(config[f], weights[f])]
    if not diffs:
        return None
    listed = ", ".join(f"{f} {_shown(config[f])} (the weights: {_shown(weights[f])})" for f in diffs)
    free = [f for f in diffs if f in shape_free]
    silent = (f"; {' and '.join(free)} {'change' if len(free) > 1 else 'changes'} no parameter shape, so these "
              "weights would load without an error and compute something else") if free else ""
    values = ", ".join(f"{f}: {_shown(weights[f])}" for f in diffs)
    fix = (f"use the preset `size: {preset}` (and leave {', '.join(diffs)} unset), or set {values}" if preset
           else f"set {values}")
    return ArchitectureMismatch(diffs[0], tuple(diffs),
                                f"the weights are {what}; the config differs from them in {listed}{silent}. Fix: {fix}")


def layout_mismatch(config: Mapping[str, Any], release: Release | None, *, source: str,
                    file_shapes: Mapping[str, Any] | None, model_shapes: Mapping[str, Any],
                    shape_free: Collection[str]) -> ArchitectureMismatch | None:
    """The check for a weights file that states no architecture: when its keys and shapes (``file_shapes``, e.g.
    :func:`safetensors_shapes`, in the model's own key names) are exactly those of the model built from ``config``
    (``model_shapes``: its ``state_dict()``, or keys to shapes), and that layout is ``release``'s (the plugin finds the
    release by layout), the config must also agree with the release in ``shape_free``, the fields that change no
    parameter shape: the :func:`architecture_mismatch` naming them and ``release.preset``, else ``None``.

    ``None`` too when ``release`` is ``None`` (no release has this layout), ``file_shapes`` is ``None`` (unknown: not
    a safetensors file) or the shapes differ (strict loading names those keys). Values of either mapping are shapes
    (sequences of ints) or tensors (their ``.shape``); no tensor is read. Source: the shared step of repae's VAE,
    SiT/DiT and encoder plugins."""
    if release is None or file_shapes is None:
        return None

    def shapes(mapping: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(int(n) for n in getattr(v, "shape", v)) for k, v in mapping.items()}

    if shapes(file_shapes) != shapes(model_shapes):
        return None
    fields = list(shape_free) if isinstance(shape_free, Sequence) else sorted(shape_free)  # a set: a fixed order
    return architecture_mismatch(config, release.architecture, fields=fields, shape_free=shape_free,
                                 preset=release.preset,
                                 what=f"{source!r}, whose key layout is that of the {release.name} release")


def safetensors_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]] | None:
    """``(keys and shapes, metadata)`` of a safetensors file, read from its header alone (no tensor, no torch);
    ``None`` for a file that is not one (another suffix, missing, unreadable, not the format)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return shapes, {str(k): str(v) for k, v in dict(metadata).items()}


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Keys and shapes of a safetensors file from its header (:func:`safetensors_header`), else ``None``."""
    header = safetensors_header(path)
    return header[0] if header is not None else None


def declared_architecture(path: str | Path) -> dict[str, Any] | None:
    """The architecture a safetensors file states in its :data:`ARCHITECTURE_METADATA` metadata (repae's exports),
    from the header alone; ``None`` when it states none (or the file is no safetensors file)."""
    header = safetensors_header(path)
    stated = header[1].get(ARCHITECTURE_METADATA) if header is not None else None
    if not stated:
        return None
    try:
        value = json.loads(stated)
    except ValueError:
        return None
    return dict(value) if isinstance(value, dict) else None
