"""Opening a finished (or running) training run: its recipe, its components, the weights of one checkpoint.

``repae sample``, ``repae analyze`` and ``repae export`` take a run directory or one of its checkpoint folders::

    run = open_run("runs/quickstart")                      # latest checkpoint
    run = open_run("runs/quickstart/checkpoints/step-0000300")
    run.denoiser        # EMA weights by default (use_ema=False for the raw ones)
    run.normalizer      # the EMA'd latent normaliser when the run has one
    run.tokenizer       # the end-to-end-tuned weights when the tokenizer trained, else the recipe's
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repae.errors import UserError

__all__ = ["OpenedRun", "checkpoint_step", "latest_checkpoint", "list_checkpoints", "open_run", "resolve_run_path",
           "run_recipe_path"]


_STEP_DIR = re.compile(r"^step-(\d{7,})$")
"""A checkpoint folder's name (:mod:`repae.train.checkpoint`: ``step-NNNNNNN``)."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run (``RUN/checkpoints/step-NNNNNNN`` holding ``state.json``), oldest
    first. Torch-free: commands check their arguments with it before anything heavy is loaded
    (:mod:`repae.train.checkpoint` re-exports it)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (:func:`list_checkpoints`), ``None`` when none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(checkpoint: str | Path) -> int | None:
    """The step a checkpoint folder's ``state.json`` records (torch-free); ``None`` when it is unreadable."""
    try:
        state = json.loads((Path(checkpoint) / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def resolve_run_path(path: str | Path) -> tuple[Path, Path]:
    """``(run_dir, checkpoint_dir)`` for a run directory (its latest checkpoint) or a checkpoint folder. Torch-free:
    ``repae sample``, ``analyze`` and ``export`` check their argument with it first."""
    path = Path(path)
    if (path / "state.json").is_file() and path.parent.name == "checkpoints":
        return path.parent.parent, path
    if path.is_file():
        from repae.weights import describe_file

        raise UserError(
            f"{path} is {describe_file(path)}, not a run: pass a run directory (from `repae run --out`) or one of its "
            "checkpoints/step-* folders. A weights file is given to a component through its `weights:` option in a "
            "recipe (for example denoiser: {name: sit, weights: " + str(path) + "})"
        )
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass a run directory (from `repae run --out`) or a checkpoint folder")
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(f"{path} holds no checkpoint (checkpoints/step-*/state.json); has its training saved one?")
    return path, found


def run_recipe_path(path: str | Path) -> tuple[Path, Path, Path]:
    """``(run_dir, checkpoint_dir, recipe.yaml)`` of a run or checkpoint folder (:func:`resolve_run_path`), refusing
    a run without its ``recipe.yaml``. Torch-free."""
    from repae.rundir import RECIPE_FILE

    run_dir, checkpoint_dir = resolve_run_path(path)
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise UserError(f"{run_dir} has no {RECIPE_FILE}; it was not written by `repae run`")
    return run_dir, checkpoint_dir, recipe_path


@dataclass
class OpenedRun:
    """A run's resolved recipe, built components with the checkpoint's weights, and where they came from."""

    run_dir: Path
    checkpoint: Path
    step: int
    recipe: Any
    components: dict[str, Any] = field(default_factory=dict)
    use_ema: bool = True
    models: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's state dicts by model name (``denoiser``, ``ema-denoiser``, ...), when :func:`open_run` was
    asked to keep them (``keep_models``); empty otherwise."""

    @property
    def denoiser(self) -> Any:
        return self.components.get("denoiser")

    @property
    def tokenizer(self) -> Any:
        return self.components.get("tokenizer")

    @property
    def normalizer(self) -> Any:
        return self.components.get("latent_norm")

    @property
    def encoders(self) -> list[Any]:
        return [v for k, v in sorted(self.components.items()) if k.startswith("encoders.")]

    @property
    def sampler(self) -> Any:
        return self.components.get("sampler")

    @property
    def dataset(self) -> Any:
        return self.components.get("dataset")

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the denoiser's latents (:class:`repae.Denoiser`: ``in_channels``, ``input_size``)."""
        denoiser = self.denoiser
        if denoiser is None:
            raise UserError(f"{self.run_dir}: the recipe has no denoiser")
        return int(denoiser.in_channels), int(denoiser.input_size), int(denoiser.input_size)

    @property
    def losses(self) -> dict[str, Any]:
        """The recipe's losses by label, when ``open_run`` built them (``slots`` with ``losses``; built on ``meta``:
        for what they declare, such as ``transport`` and ``feature_depths``)."""
        return {k.split(".", 1)[1]: v for k, v in self.components.items() if k.startswith("losses.")}

    def transport(self) -> Any:
        """The diffusion process of the run: the transport of the loss that defines it (``None`` without one)."""
        return next((loss.transport for loss in self.losses.values()
                     if getattr(loss, "transport", None) is not None), None)

    def alignment_depth(self) -> int | None:
        """The hidden-state depth the run aligns (``feature_depths`` of its losses; the deepest when several)."""
        depths = {int(d) for loss in self.losses.values() for d in getattr(loss, "feature_depths", ())}
        return max(depths) if depths else None


def open_run(
    path: str | Path,
    *,
    device: str = "cpu",
    use_ema: bool = True,
    slots: tuple[str, ...] = ("tokenizer", "encoders", "latent_norm", "denoiser", "sampler", "dataset"),
    registry: Any = None,
    meta_slots: tuple[str, ...] = ("losses",),
    keep_models: bool = False,
) -> OpenedRun:
    """Rebuild a run's components from its ``recipe.yaml`` and load checkpoint weights into them (EMA by default).

    Only ``slots`` are built (losses and the trainer are not needed to use a trained model). Those also in
    ``meta_slots`` are built on ``meta``, for what they declare (a loss's ``transport`` and ``feature_depths``; a
    dataset's image preprocessing without reading its data). Pretrained weights the recipe names are not loaded for
    parts the checkpoint holds (it overrides them). ``registry`` defaults to the installed plugins. With
    ``keep_models`` the checkpoint's state dicts stay available as :attr:`OpenedRun.models` (read once).
    """
    import torch

    from repae.build import RecipeBuild, default_registry
    from repae.recipe import read_recipe
    from repae.train.checkpoint import load_checkpoint
    from repae.weights import check_state_dict, load_into

    run_dir, checkpoint_dir, recipe_path = run_recipe_path(path)
    resolved = read_recipe(recipe_path, [], registry if registry is not None else default_registry())
    checkpoint = load_checkpoint(checkpoint_dir, optimizers=False)
    models = checkpoint.models
    fix = (f"the checkpoint does not match {recipe_path} (edited after training?) or the file was replaced: restore "
           "the recipe.yaml the run was trained with, or the file")
    assembly = RecipeBuild(resolved, device=device)
    components: dict[str, Any] = {}
    for spec in resolved.components:
        if spec.slot not in slots:
            continue
        names = _held_names(spec.slot, models, use_ema=use_ema, where=checkpoint_dir)
        on = "meta" if spec.slot in meta_slots else device
        one = assembly.build(spec, device=on, load_weights=not names)
        component = one.component
        if names and isinstance(component, torch.nn.Module):
            expected = {k: v.shape for k, v in component.state_dict().items()}
            for name in names[1:]:  # every copy the checkpoint holds of this part fits it (export writes them all)
                check_state_dict(expected, models[name], what=f"{checkpoint_dir}/model-{name}.safetensors: the "
                                 f"{name} weights", fix=fix, model=type(component).__name__)
            load_into(component, models[names[0]], what=f"{checkpoint_dir}/model-{names[0]}.safetensors: the "
                      f"{names[0]} weights", fix=fix)
        elif names:
            component.load_state_dict(models[names[0]], strict=True)
        if isinstance(component, torch.nn.Module) and on != "meta":
            component.to(device).eval().requires_grad_(False)
        components[spec.label] = component
        assembly.add(spec, one)
    return OpenedRun(run_dir, checkpoint_dir, int(checkpoint.state["step"]), resolved, components, use_ema,
                     models=dict(models) if keep_models else {})


_HELD = {"tokenizer": ("tokenizer", "ema-tokenizer"), "denoiser": ("denoiser", "ema-denoiser"),
         "latent_norm": ("latent_norm", "ema-latent_norm")}
"""Slots whose weights a checkpoint holds: the raw model name and its EMA copy's."""


def _held_names(slot: str, models: dict[str, Any], *, use_ema: bool, where: Path) -> list[str]:
    """The checkpoint's models of ``slot``, the one to load first: ``[]`` when the checkpoint holds none (the part was
    not trained: the recipe's weights are used). A part held only in the other copy (EMA asked for, raw held, or the
    reverse) is an error rather than a silent fall back on the recipe's initial weights."""
    if slot not in _HELD:
        return []
    raw, ema = _HELD[slot]
    if slot == "tokenizer":  # no tokenizer EMA by default: the tuned weights are the raw ones
        return [raw] + ([ema] if ema in models else []) if raw in models else []
    wanted, other = (ema, raw) if use_ema else (raw, ema)
    if wanted in models:
        return [wanted] + ([other] if other in models else [])
    if other in models:
        flag = "without --no-ema (EMA weights)" if other == ema else "with --no-ema (the raw weights)"
        raise UserError(f"{where} holds the {slot} as model-{other}.safetensors but not model-{wanted}.safetensors, "
                        f"which was asked for: run the command {flag}, or restore the missing file")
    if slot == "denoiser":
        raise UserError(f"{where} holds no denoiser weights (model-denoiser.safetensors, model-ema-denoiser"
                        ".safetensors): it is not a checkpoint of a trained denoiser. Restore the files or pass another "
                        "checkpoint")
    return []
