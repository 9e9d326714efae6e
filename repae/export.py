"""Export a trained run's models for other code: ``repae export RUN --format FORMAT --out DIR``.

Formats come from the run's components (:class:`repae.Exportable`): a component lists the formats it can write in
``export_formats`` and writes them in ``export(fmt, folder, context)``; the built-in KL-VAE tokenizers declare
``diffusers`` (an ``AutoencoderKL`` folder) and ``ldm`` (REPA-E's layout with its latent-statistics file), SiT and
DiT declare ``official`` (their official layout, the latent BatchNorm as ``bn.*``, raw and EMA weights). One format
is repae's own and works for every run: ``safetensors``, the state dict of every model of the checkpoint
(``<name>.safetensors``, the names of the checkpoint: ``denoiser``, ``ema-denoiser``, ``tokenizer``,
``latent_norm``, ...), which is what the components' ``weights:`` options read back.

**Declaring formats without building.** A tokenizer's or denoiser's config class declares the formats its component
exports as the class attribute ``EXPORT_FORMATS`` (a tuple of names: ``KLVAEConfig.EXPORT_FORMATS = ("diffusers",
"ldm")``), the same names as the built component's ``export_formats``; ``repae export`` then refuses a format no
component of the run declares in about a second, from the run's ``recipe.yaml`` and the registry's entries alone
(:func:`check_export_request`, torch-free). A component whose config declares nothing is asked after building, as
before.

Every model is checked against the component the run's recipe builds before anything is written (:func:`repae.runs.open_run`
checks each copy the checkpoint holds, raw and EMA: keys and shapes). Every export writes ``export.json``: what was exported, from which run, checkpoint and step, and the sha256 of each
file. The latent statistics handed to the components (``ExportContext.statistics``) come from the run's latent
normaliser (its EMA copy; :class:`repae.AffineNormalizer`), else from the tokenizer
(:class:`repae.HasLatentStatistics`), else there are none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repae.errors import CapabilityError, UserError, did_you_mean
from repae.interfaces import (
    AffineNormalizer,
    Exportable,
    ExportContext,
    HasLatentStatistics,
    LatentStatistics,
    supports,
)

if TYPE_CHECKING:
    from repae.runs import OpenedRun

__all__ = ["GENERIC_FORMAT", "available_formats", "check_export_request", "declared_formats", "export_run",
           "latent_statistics"]

GENERIC_FORMAT = "safetensors"
"""repae's own format: every model of the checkpoint as its state dict."""
MANIFEST = "export.json"
_EXPORTABLE_SLOTS = ("tokenizer", "denoiser")


def latent_statistics(normalizer: Any, tokenizer: Any) -> LatentStatistics:
    """The run's latent statistics: its normaliser's (:class:`repae.AffineNormalizer`), else the tokenizer's
    (:class:`repae.HasLatentStatistics`), else empty."""
    if normalizer is not None and supports(normalizer, AffineNormalizer):
        return normalizer.latent_statistics()
    if tokenizer is not None and supports(tokenizer, HasLatentStatistics) and tokenizer.latent_stats is not None:
        return tokenizer.latent_stats
    return LatentStatistics()


def available_formats(run: OpenedRun) -> dict[str, list[str]]:
    """``{format: [slots that write it]}`` for a run: :data:`GENERIC_FORMAT` and every format its components
    declare."""
    out: dict[str, list[str]] = {GENERIC_FORMAT: ["checkpoint"]}
    for slot in _EXPORTABLE_SLOTS:
        component = run.components.get(slot)
        if component is not None and supports(component, Exportable):
            for fmt in component.export_formats:
                out.setdefault(fmt, []).append(slot)
    return out


def declared_formats(entry: Any) -> tuple[str, ...] | None:
    """The export formats a registry entry's config class declares (``EXPORT_FORMATS``), ``None`` when it declares
    none (then only its built component tells)."""
    formats = getattr(getattr(entry, "config", None), "EXPORT_FORMATS", None)
    if formats is None:
        return None
    return (formats,) if isinstance(formats, str) else tuple(str(f) for f in formats)


def _unknown_format(run_dir: Path, fmt: str, declared: list[tuple[str, tuple[str, ...]]]) -> CapabilityError:
    formats = list(dict.fromkeys([GENERIC_FORMAT, *(f for _, fs in declared for f in fs)]))
    listing = "; ".join(f"{what} declares {', '.join(fs) or 'none'}" for what, fs in declared)
    return CapabilityError(f"no component of {run_dir} exports the format {fmt!r} ({listing})."
                           f"{did_you_mean(fmt, formats)} Formats of this run: {', '.join(formats)} "
                           f"(`{GENERIC_FORMAT}`: every model's state dict)")


def check_export_request(path: str | Path, out: str | Path, fmt: str, *, force: bool = False,
                         registry: Any = None) -> None:
    """What :func:`export_run` would refuse, checked from files and metadata alone (no torch, nothing built): the
    run or checkpoint folder, its ``recipe.yaml``, ``--out``, and a format that no component of the run declares
    (when every exportable component's config declares its formats: ``EXPORT_FORMATS``)."""
    from repae.build import default_registry
    from repae.recipe import read_recipe
    from repae.runs import run_recipe_path

    run_dir, _, recipe_path = run_recipe_path(path)
    if fmt != GENERIC_FORMAT:
        resolved = read_recipe(recipe_path, [], registry if registry is not None else default_registry())
        declared: list[tuple[str, tuple[str, ...]]] = []
        for spec in resolved.components:
            if spec.slot in _EXPORTABLE_SLOTS and spec.key is None:
                formats = declared_formats(spec.entry)
                if formats is None:
                    break  # this component tells only once built: export_run decides
                declared.append((f"{spec.slot} '{spec.name}' (plugin {spec.entry.plugin.label})", formats))
        else:
            if not any(fmt in formats for _, formats in declared):
                raise _unknown_format(run_dir, fmt, declared)
    _check_out(Path(out), force)


def _describe(run: OpenedRun, slot: str) -> str:
    spec = next((s for s in run.recipe.components if s.label == slot), None)
    return f"{slot} '{spec.name}' (plugin {spec.entry.plugin.label})" if spec is not None else slot


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; pass an empty or new folder, or --force to write into it "
                        "(files of the same names are replaced, others are left alone)")


def export_run(path: str | Path, out: str | Path, fmt: str, *, force: bool = False,
               registry: Any = None) -> dict[str, Any]:
    """Export the models of a run (its latest checkpoint) or of one checkpoint folder in format ``fmt`` into ``out``;
    returns the manifest written to ``out/export.json``. A format no component of the run declares is a
    :class:`~repae.errors.CapabilityError` listing the formats this run has."""
    from repae import __version__
    from repae.fileio import write_json, write_safetensors
    from repae.runs import open_run
    from repae.weights import file_sha256, load_into

    out = Path(out)
    check_export_request(path, out, fmt, force=force, registry=registry)
    run = open_run(path, device="cpu", use_ema=True, slots=("tokenizer", "latent_norm", "denoiser"),
                   registry=registry, keep_models=True)
    formats = available_formats(run)
    if fmt not in formats:
        raise _unknown_format(run.run_dir, fmt, [
            (_describe(run, slot), tuple(run.components[slot].export_formats)
             if supports(run.components[slot], Exportable) else ())
            for slot in _EXPORTABLE_SLOTS if run.components.get(slot) is not None])
    out.mkdir(parents=True, exist_ok=True)
    models = run.models
    metadata = {"format": "pt", "repae_version": __version__, "step": str(run.step), "checkpoint": str(run.checkpoint)}
    stats = latent_statistics(run.normalizer, run.tokenizer)
    if "ema-latent_norm" in models and stats.source.startswith("latent"):  # open_run loaded the normaliser's EMA
        stats = dataclasses.replace(stats, source="EMA " + stats.source)
    files: dict[str, str] = {}
    if fmt == GENERIC_FORMAT:
        for name, state in sorted(models.items()):
            write_safetensors(out / f"{name}.safetensors", state, metadata=metadata)
            files[f"{name}.safetensors"] = f"the state dict of the checkpoint's {name}, repae layout"
    else:
        for slot in formats[fmt]:
            component = run.components[slot]
            if slot == "denoiser":
                for stem, weights, norm in (("ema-denoiser", "ema-denoiser", "ema-latent_norm"),
                                            ("denoiser", "denoiser", "latent_norm")):
                    if weights not in models:
                        continue
                    load_into(component, models[weights],  # checked by open_run already: keys and shapes
                              what=f"{run.checkpoint}/model-{weights}.safetensors: the {weights} weights")
                    context = ExportContext(stem, stats, models.get(norm), metadata)
                    files.update(component.export(fmt, out, context))
            else:
                files.update(component.export(fmt, out, ExportContext(slot, stats, None, metadata)))
    if not files:
        raise UserError(f"the export wrote no file (format {fmt!r}, checkpoint {run.checkpoint})")
    specs = {spec.slot: spec for spec in run.recipe.components if spec.key is None}
    manifest: dict[str, Any] = {
        "format": fmt,
        "run": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "repae_version": __version__,
        "components": {slot: _component(specs.get(slot), trained=slot in models)
                       for slot in (_EXPORTABLE_SLOTS if fmt == GENERIC_FORMAT else formats[fmt]) if slot in specs},
        "latents": _describe_stats(stats),
        "files": {
            name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size, "what": what}
            for name, what in files.items()
        },
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _describe_stats(stats: LatentStatistics) -> dict[str, Any]:
    return {
        "source": stats.source,
        "mean": None if stats.mean is None else [float(v) for v in stats.mean.flatten()],
        "std": None if stats.std is None else [float(v) for v in stats.std.flatten()],
        "scaling_factor": stats.scaling_factor,
        "shift_factor": stats.shift_factor,
    }


def _component(spec: Any, *, trained: bool) -> dict[str, Any] | None:
    from repae.config import config_to_dict

    if spec is None:
        return None
    return {"name": spec.name, "plugin": spec.entry.plugin.label, "config": config_to_dict(spec.config),
            "trained_in_run": trained}
