"""Export a trained run's models for other code: ``repae export RUN --format diffusers|ldm|safetensors --out DIR``.

- ``diffusers``: the (end-to-end tuned) tokenizer as a diffusers ``AutoencoderKL`` folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) that ``AutoencoderKL.from_pretrained(DIR)`` loads, with the latent
  statistics in its config;
- ``ldm``: the tokenizer in the LDM layout (REPA-E's ``.pt`` key names) as ``vae.safetensors``, plus REPA-E's
  ``vae-latents-stats.safetensors`` (``latents_bias``, ``latents_scale``, shapes ``[1, C, 1, 1]``); a recipe loads it
  back with ``tokenizer: {name: sd-vae, weights: DIR/vae.safetensors}`` (the statistics are found next to it);
- ``safetensors``: the denoiser and the EMA denoiser in the official SiT/DiT layout with the latent BatchNorm buffers as
  ``bn.*`` (as REPA-E's checkpoints hold them), and the tokenizer (LDM layout) with its statistics.

Every export writes ``export.json``: what was exported, from which run, checkpoint and step, and the sha256 of each
file. Latent statistics (normalised = ``(z - mean) * scaling_factor / std``) come from, in this order: the run's latent
BatchNorm (the EMA copy: ``mean = running_mean``, ``std = sqrt(running_var)``, as REPA-E's ``save_vae_weights.py``),
a fixed per-channel normaliser (``channel-stats``), a fixed scale (``fixed-scale``: ``scaling_factor`` and
``shift_factor``), the tokenizer's own ``latent_stats``; else none.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repae.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["FORMATS", "LatentStatistics", "export_diffusers", "export_ldm", "export_run", "export_safetensors",
           "latent_statistics"]

FORMATS = ("diffusers", "ldm", "safetensors")
MANIFEST = "export.json"


@dataclass(frozen=True)
class LatentStatistics:
    """How latents are normalised for the denoiser: ``(z - mean) * scaling_factor / std`` per channel when ``mean``
    and ``std`` are set, else ``(z - shift_factor) * scaling_factor``."""

    mean: Tensor | None
    std: Tensor | None
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    source: str = "none"

    def repae_e(self, channels: int) -> dict[str, Tensor] | None:
        """REPA-E's ``latents_bias`` / ``latents_scale`` (``[1, C, 1, 1]``, normalised = ``(z - bias) * scale``);
        ``None`` when there are no statistics at all."""
        import torch

        if self.mean is not None and self.std is not None:
            bias, scale = self.mean.float(), self.scaling_factor / self.std.float()
        elif self.source != "none":
            bias = torch.full((channels,), float(self.shift_factor or 0.0))
            scale = torch.full((channels,), float(self.scaling_factor))
        else:
            return None
        return {"latents_bias": bias.reshape(1, -1, 1, 1).contiguous(),
                "latents_scale": scale.reshape(1, -1, 1, 1).contiguous()}

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (for ``export.json``)."""
        return {
            "source": self.source,
            "mean": None if self.mean is None else [float(v) for v in self.mean.flatten()],
            "std": None if self.std is None else [float(v) for v in self.std.flatten()],
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }


def latent_statistics(
    normalizer: Any, tokenizer: Any, *, normalizer_label: str = "latent BatchNorm"
) -> LatentStatistics:
    """The latent statistics of a run, from its normaliser (BatchNorm running statistics, channel statistics or a
    fixed scale), else from the tokenizer's ``latent_stats``; see the module docstring for the order."""
    state = normalizer.state_dict() if callable(getattr(normalizer, "state_dict", None)) else {}
    if "running_mean" in state and "running_var" in state:
        return LatentStatistics(state["running_mean"].float().clone(), state["running_var"].float().sqrt(),
                                source=f"{normalizer_label} (running_mean, sqrt(running_var))")
    if "mean" in state and "std" in state:
        return LatentStatistics(state["mean"].float().clone(), state["std"].float().clone(),
                                float(getattr(normalizer, "multiplier", 1.0)), source="latent normaliser channel-stats")
    if normalizer is not None and isinstance(getattr(normalizer, "scale", None), float):
        shift = float(getattr(normalizer, "shift", 0.0))
        return LatentStatistics(None, None, normalizer.scale, shift or None, source="latent normaliser fixed-scale")
    stats = getattr(tokenizer, "latent_stats", None)
    if stats is not None:
        return LatentStatistics(stats.mean.float().clone(), 1.0 / stats.scale.float(), source="tokenizer latent_stats")
    return LatentStatistics(None, None)


# ---------------------------------------------------------------------------------------------------------------------
# The three formats: each writes its files into `folder` and returns {file name: what it holds}
# ---------------------------------------------------------------------------------------------------------------------


def _cpu(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def export_diffusers(tokenizer: Any, folder: Path, stats: LatentStatistics) -> dict[str, str]:
    """Write ``tokenizer`` (a :class:`repae_vae.autoencoder.KLAutoencoder`) as a diffusers ``AutoencoderKL`` folder.

    ``config.json`` gets ``latents_mean`` / ``latents_std`` and ``scaling_factor`` so that diffusers' convention
    ``(z - latents_mean) * scaling_factor / latents_std`` (the SDXL pipelines') is the run's normalisation: with
    per-channel statistics ``scaling_factor`` is 1 (the multiplier of ``channel-stats``); with a fixed scale there are
    no per-channel statistics and ``scaling_factor`` / ``shift_factor`` carry it.
    """
    from repae_vae.convert import save_diffusers

    if not hasattr(tokenizer, "architecture"):
        raise UserError(f"the diffusers format needs a KL autoencoder tokenizer (sd-vae, in-vae, va-vae), got "
                        f"{type(tokenizer).__name__}; use --format safetensors")
    save_diffusers(tokenizer, folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["latents_mean"] = None if stats.mean is None else [float(v) for v in stats.mean.flatten()]
    config["latents_std"] = None if stats.std is None else [float(v) for v in stats.std.flatten()]
    config["scaling_factor"] = stats.scaling_factor
    config["shift_factor"] = stats.shift_factor
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return {"config.json": "diffusers AutoencoderKL config with the latent statistics",
            "diffusion_pytorch_model.safetensors": "the tokenizer, diffusers AutoencoderKL layout"}


def export_ldm(tokenizer: Any, folder: Path, stats: LatentStatistics, *, name: str = "vae",
               metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write the tokenizer's state dict (LDM layout) as ``<name>.safetensors`` and, when there are statistics,
    REPA-E's ``<name>-latents-stats.safetensors`` (``latents_bias``, ``latents_scale``, ``[1, C, 1, 1]``)."""
    from safetensors.torch import save_file

    files = {}
    save_file(_cpu(tokenizer.state_dict()), str(folder / f"{name}.safetensors"), metadata=dict(metadata or {}))
    files[f"{name}.safetensors"] = "the tokenizer, LDM layout (REPA-E / latent-diffusion key names)"
    channels = int(getattr(tokenizer, "latent_channels", 0) or 0)
    repae_e = stats.repae_e(channels)
    if repae_e is not None:
        save_file(repae_e, str(folder / f"{name}-latents-stats.safetensors"), metadata=dict(metadata or {}))
        files[f"{name}-latents-stats.safetensors"] = ("REPA-E latent statistics: latents_bias, latents_scale "
                                                      "[1, C, 1, 1]; normalised = (z - bias) * scale")
    return files


def export_safetensors(
    models: Mapping[str, Mapping[str, Tensor]],
    tokenizer: Any,
    folder: Path,
    stats: LatentStatistics,
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write the checkpoint's denoiser and EMA denoiser in the official layout (``repae_sit.checkpoint.to_official``)
    with the matching latent BatchNorm buffers as ``bn.*``, plus the tokenizer (:func:`export_ldm`)."""
    from safetensors.torch import save_file

    from repae_sit.checkpoint import to_official

    files = {}
    for name, norm_name in (("denoiser", "latent_norm"), ("ema-denoiser", "ema-latent_norm")):
        if name not in models:
            continue
        norm_state = models.get(norm_name) or {}
        batchnorm = "running_mean" in norm_state and "running_var" in norm_state
        state = to_official(_cpu(models[name]), _cpu(norm_state) if batchnorm else None)
        save_file(state, str(folder / f"{name}.safetensors"), metadata=dict(metadata or {}))
        what = "EMA denoiser" if name.startswith("ema") else "denoiser (raw, not EMA)"
        files[f"{name}.safetensors"] = (f"{what}, official SiT/DiT layout"
                                        + (f", latent BatchNorm ({norm_name}) as bn.*" if batchnorm else ""))
    if not files:
        raise UserError("the checkpoint holds no denoiser weights (model-denoiser / model-ema-denoiser)")
    files.update(export_ldm(tokenizer, folder, stats, name="tokenizer", metadata=metadata))
    return files


# ---------------------------------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------------------------------


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; pass an empty or new folder, or --force to write into it "
                        "(files of the same names are replaced, others are left alone)")


def export_run(path: str | Path, out: str | Path, fmt: str, *, force: bool = False) -> dict[str, Any]:
    """Export the models of a run (its latest checkpoint) or of one checkpoint folder in format ``fmt`` into ``out``;
    returns the manifest written to ``out/export.json``."""
    from repae import __version__
    from repae.runs import open_run
    from repae.train.checkpoint import load_checkpoint
    from repae.weights import file_sha256

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out, force)
    run = open_run(path, device="cpu", use_ema=True, slots=("tokenizer", "latent_norm"))
    if run.tokenizer is None:
        raise UserError(f"{run.run_dir}: the recipe has no tokenizer to export")
    models = load_checkpoint(run.checkpoint).models
    norm_label = "EMA latent BatchNorm" if "ema-latent_norm" in models else "latent BatchNorm"
    stats = latent_statistics(run.normalizer, run.tokenizer, normalizer_label=norm_label)
    metadata = {"format": "pt", "repae_version": __version__, "step": str(run.step), "checkpoint": str(run.checkpoint)}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "diffusers":
        files = export_diffusers(run.tokenizer, out, stats)
    elif fmt == "ldm":
        files = export_ldm(run.tokenizer, out, stats, metadata=metadata)
    else:
        files = export_safetensors(models, run.tokenizer, out, stats, metadata=metadata)
    specs = {spec.slot: spec for spec in run.recipe.components if spec.key is None}
    manifest: dict[str, Any] = {
        "format": fmt,
        "run": str(run.run_dir),
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "repae_version": __version__,
        "tokenizer": _component(specs.get("tokenizer"), trained="tokenizer" in models),
        "latents": stats.describe(),
        "files": {
            name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size, "what": what}
            for name, what in files.items()
        },
    }
    if fmt == "safetensors":
        manifest["denoiser"] = _component(specs.get("denoiser"), trained=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _component(spec: Any, *, trained: bool) -> dict[str, Any] | None:
    from repae.config import config_to_dict

    if spec is None:
        return None
    return {"name": spec.name, "config": config_to_dict(spec.config), "trained_in_run": trained}

