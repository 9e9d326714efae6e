"""Checkpoints: safetensors for every tensor, JSON for everything else; written atomically; the last N kept.

Layout of ``RUN/checkpoints/step-0001000/``::

    model-<name>.safetensors        one per model (denoiser, ema-denoiser, tokenizer, discriminator, latent_norm, ...)
    optimizer-<part>.safetensors    the optimizer's tensors (exp_avg, exp_avg_sq, step) by parameter index
    state.json                      step, optimizer param groups, grad-scaler state, recipe digest, versions

No pickles are written or read. A checkpoint appears under its final name only once complete (written to a temporary
folder, then renamed), so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from repae.errors import UserError

__all__ = ["Checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step-(\d{7,})$")


class Checkpoint(dict):
    """What :func:`load_checkpoint` returns: ``models[name]``, ``optimizers[part]`` (state dicts) and ``state``."""

    @property
    def models(self) -> dict[str, dict[str, torch.Tensor]]:
        return self["models"]

    @property
    def optimizers(self) -> dict[str, dict[str, Any]]:
        return self["optimizers"]

    @property
    def state(self) -> dict[str, Any]:
        return self["state"]


def _tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _optimizer_split(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return _tensors(tensors), {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    models: Mapping[str, Mapping[str, torch.Tensor]],
    optimizers: Mapping[str, Mapping[str, Any]],
    state: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the ``keep`` latest. Returns its folder."""
    from repae.fileio import atomic_path

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    meta: dict[str, Any] = {"step": step, **state, "optimizers": {}}
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for name, tensors in models.items():
            save_file(_tensors(tensors), str(tmp / f"model-{name}.safetensors"))
        for part, opt_state in optimizers.items():
            tensors, opt_meta = _optimizer_split(opt_state)
            save_file(tensors, str(tmp / f"optimizer-{part}.safetensors"))
            meta["optimizers"][part] = opt_meta
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (``RUN/checkpoints/step-NNNNNNN``), ``None`` when none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on CPU)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable repae checkpoint ({exc}); delete it or pass another run") from None
    models = {
        f.name[len("model-") : -len(".safetensors")]: load_file(str(f))
        for f in sorted(path.glob("model-*.safetensors"))
    }
    optimizers = {
        part: _optimizer_join(load_file(str(path / f"optimizer-{part}.safetensors")), opt_meta)
        for part, opt_meta in meta.pop("optimizers", {}).items()
    }
    return Checkpoint(models=models, optimizers=optimizers, state=meta)
