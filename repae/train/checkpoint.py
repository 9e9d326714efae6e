"""Checkpoints: safetensors for every tensor, JSON for everything else; written atomically; the last N kept.

Layout of ``RUN/checkpoints/step-0001000/``::

    model-<name>.safetensors        one per model (denoiser, ema-denoiser, tokenizer, discriminator, latent_norm, ...)
    optimizer-<part>.safetensors    the optimizer's tensors (exp_avg, exp_avg_sq, step) by parameter index
    state.json                      step, optimizer param groups, grad-scaler state, the models it holds, recipe digest
                                    (sha256 of RUN/recipe.yaml), versions (repae, python, torch, safetensors)

No pickles are written or read. Reading checks every file: a missing, empty, truncated or corrupt part is a
:class:`~repae.errors.UserError` naming the file and the fix; :func:`restore_model` and :func:`restore_optimizer` put a
part into a module or optimizer through :func:`repae.weights.check_state_dict` (keys and shapes named).

A checkpoint appears under its final name only once complete (written to a temporary
folder, then renamed), so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from repae.errors import UserError, first_line
from repae.runs import latest_checkpoint, list_checkpoints  # torch-free; re-exported here, where checkpoints are written

__all__ = ["RESUME_FIX", "Checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "restore_model",
           "restore_optimizer", "save_checkpoint"]

RESUME_FIX = ("a recipe that adds, removes or resizes a trained part cannot continue this run: go back to the recipe "
              "the run was started with (its recipe.yaml), or start a new run with another --out")
"""The fix a resume gives when a checkpoint does not fit the recipe's parts."""


class Checkpoint(dict):
    """What :func:`load_checkpoint` returns: ``models[name]``, ``optimizers[part]`` (state dicts) and ``state``;
    :attr:`path` is the folder it was read from (for messages)."""

    path: Path | None = None

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

    from safetensors import SafetensorError

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    meta: dict[str, Any] = {"step": step, **state, "optimizers": {}, "models": sorted(models),
                            **_provenance(Path(run_dir))}
    try:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            for name, tensors in models.items():
                save_file(_tensors(tensors), str(tmp / f"model-{name}.safetensors"))
            for part, opt_state in optimizers.items():
                tensors, opt_meta = _optimizer_split(opt_state)
                save_file(tensors, str(tmp / f"optimizer-{part}.safetensors"))
                meta["optimizers"][part] = opt_meta
            (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            _fsync_folder(tmp, files=True)  # on disk before the rename: a node crash cannot leave empty files
    except (OSError, SafetensorError) as exc:  # a full disk, a quota, a read-only or vanished folder
        previous = latest_checkpoint(Path(run_dir))
        kept = f"the previous checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint"
        raise UserError(f"cannot write checkpoint {final} ({type(exc).__name__}: {exc}); {kept}. Free space on "
                        f"{root} (or fix its permissions) and run the same command to resume.") from None
    _fsync_folder(root)  # the rename itself
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_folder(folder: Path, *, files: bool = False) -> None:
    """Flush ``folder``'s entries (and with ``files`` every file in it) to disk."""
    import os

    if files:
        for file in folder.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint(path: Path, *, optimizers: bool = True) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on CPU); ``optimizers=False`` reads the
    models only (sampling, analysis and export need no optimizer state).

    Every model its ``state.json`` lists and every optimizer file read must be there and readable: a missing, empty,
    truncated or corrupt file is a :class:`~repae.errors.UserError` naming it, with the checkpoint to fall back on."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable repae checkpoint ({exc}); delete it or pass another run") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{path / 'state.json'} is not a repae checkpoint's state (no integer 'step'); delete "
                        f"{path} or pass another run")
    listed = meta.pop("models", None)
    found = [f.name[len("model-") : -len(".safetensors")] for f in sorted(path.glob("model-*.safetensors"))]
    names = list(dict.fromkeys([*(listed or []), *found]))
    models = {name: _read_part(path, f"model-{name}.safetensors", f"{name} weights") for name in names}
    opt_metas = meta.pop("optimizers", {})
    states = {
        part: _optimizer_join(_read_part(path, f"optimizer-{part}.safetensors", f"{part} optimizer state"), opt_meta)
        for part, opt_meta in opt_metas.items()
    } if optimizers else {}
    checkpoint = Checkpoint(models=models, optimizers=states, state=meta)
    checkpoint.path = path
    return checkpoint


def _fallback(folder: Path) -> str:
    """How to get past a broken checkpoint folder: the run's previous checkpoint, when there is one."""
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else None
    earlier = [p for p in list_checkpoints(run_dir) if p.name < folder.name] if run_dir is not None else []
    if earlier:
        return (f"restore the file, or fall back on the previous checkpoint {earlier[-1]}: delete {folder} and the "
                f"run resumes from it (pass {earlier[-1]} to repae sample/analyze/export)")
    return f"restore the file, or delete {folder} (no earlier checkpoint: the run then starts again from step 0)"


def _read_part(folder: Path, name: str, what: str) -> dict[str, torch.Tensor]:
    file = folder / name
    if not file.is_file():
        raise UserError(f"{file} is missing: the checkpoint lacks its {what} (an incomplete copy?). Fix: "
                        f"{_fallback(folder)}")
    if file.stat().st_size == 0:
        raise UserError(f"{file} is empty (0 bytes): the checkpoint's {what} were not written or not copied. Fix: "
                        f"{_fallback(folder)}")
    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError: truncated, corrupt or unreadable
        raise UserError(f"{file} cannot be read as safetensors ({first_line(exc)}): the checkpoint's {what} are "
                        f"truncated or corrupt. Fix: {_fallback(folder)}") from None


def _where(checkpoint: Mapping[str, Any]) -> str:
    path = getattr(checkpoint, "path", None)
    return str(path) if path is not None else "the checkpoint"


def restore_model(checkpoint: Mapping[str, Any], name: str, module: torch.nn.Module, *, fix: str = RESUME_FIX) -> None:
    """Load the checkpoint's model ``name`` into ``module`` after :func:`repae.weights.check_state_dict`: a part the
    checkpoint lacks, or one whose keys or shapes differ, is a :class:`~repae.errors.UserError` naming the file, the
    part, the first keys with both shapes and ``fix``. Never leaves a part at its initial weights."""
    from repae.weights import load_into

    where = _where(checkpoint)
    models = checkpoint["models"]
    if name not in models:
        held = ", ".join(sorted(models)) or "none"
        raise UserError(f"{where} holds no {name} weights (model-{name}.safetensors; it holds: {held}), which this "
                        f"recipe needs. Fix: {fix}")
    load_into(module, models[name], what=f"{where}/model-{name}.safetensors: the {name} weights", fix=fix)


def restore_optimizer(checkpoint: Mapping[str, Any], part: str, optimizer: torch.optim.Optimizer, *,
                      fix: str = RESUME_FIX) -> None:
    """Load the checkpoint's optimizer state of ``part`` into ``optimizer`` after checking its parameter groups and
    the shape of every state tensor (``exp_avg``, ...) against the parameters: a missing part or a mismatch is a
    :class:`~repae.errors.UserError` naming the file, the part, the first parameter with both shapes and ``fix``."""
    where = _where(checkpoint)
    file = f"{where}/optimizer-{part}.safetensors"
    saved = checkpoint["optimizers"].get(part)
    if saved is None:
        held = ", ".join(sorted(checkpoint["optimizers"])) or "none"
        raise UserError(f"{where} holds no optimizer state for {part} (optimizer-{part}.safetensors; it holds: "
                        f"{held}), which this recipe trains. Fix: {fix}")
    groups, current = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(current):
        raise UserError(f"{file}: the {part} optimizer state has {len(groups)} parameter group(s), the {part} being "
                        f"trained has {len(current)}. Fix: {fix}")
    params: dict[int, torch.Tensor] = {}
    for g, (old, new) in enumerate(zip(groups, current)):
        if len(old["params"]) != len(new["params"]):
            raise UserError(f"{file}: the {part} optimizer state holds {len(old['params'])} parameter(s) in group {g}, "
                            f"the {part} being trained has {len(new['params'])}. Fix: {fix}")
        params.update(zip((int(i) for i in old["params"]), new["params"]))
    mismatched = [
        f"parameter {index} {key}: file {list(value.shape)} vs model {list(params[int(index)].shape)}"
        for index, values in sorted(saved["state"].items(), key=lambda kv: int(kv[0]))
        for key, value in values.items()
        if isinstance(value, torch.Tensor) and value.dim() > 0 and int(index) in params
        and tuple(value.shape) != tuple(params[int(index)].shape)
    ]
    unknown = sorted(int(i) for i in saved["state"] if int(i) not in params)
    if mismatched or unknown:
        first = mismatched[0] if mismatched else f"state for parameter {unknown[0]}, which the {part} does not have"
        more = f" ({len(mismatched)} shape mismatch(es) in all)" if len(mismatched) > 1 else ""
        raise UserError(f"{file}: the {part} optimizer state does not fit the {part} being trained ({first}){more}. "
                        f"Fix: {fix}")
    optimizer.load_state_dict(saved)


def _provenance(run_dir: Path) -> dict[str, Any]:
    """What state.json records beside the state: the sha256 of the run's recipe.yaml and the versions writing it."""
    import hashlib
    import platform
    from importlib import metadata

    from repae import __version__

    versions: dict[str, Any] = {"repae": __version__, "python": platform.python_version()}
    for dist in ("torch", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    recipe = run_dir / "recipe.yaml"
    digest = hashlib.sha256(recipe.read_bytes()).hexdigest() if recipe.is_file() else None
    return {"recipe_sha256": digest, "versions": versions}
