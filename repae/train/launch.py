"""Train a resolved recipe in this process: the body of ``repae run`` (also used by ``repae sweep``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from repae.errors import UserError

__all__ = ["train_recipe"]


def train_recipe(resolved: Any, run_dir: Path, *, device: str = "auto", allow_recipe_change: bool = False,
                 progress: bool = True) -> Path:
    """Join the process group (under torchrun), build the components on this process's device, then (process 0,
    holding the run directory's lock) write the run directory and run the recipe's trainer (resuming from the run
    directory's latest checkpoint).

    Nothing is written before the components have built (a failed weights download leaves no folder behind); whether
    ``run_dir`` can take this recipe is checked before building and again under the lock. ``resolved`` should be
    checked whole first (:func:`repae.compose.compose_recipe`): its ``recipe`` holds the derived fields, which the run
    directory records."""
    from repae.build import build_recipe
    from repae.rundir import check_run_dir, run_lock, undo_recipe_change, write_run_dir
    from repae.train.checkpoint import latest_checkpoint
    from repae.train import distributed

    distributed.resolve_device(device)  # fail before any work when the device does not exist
    run_dir = Path(run_dir)
    is_main = os.environ.get("RANK", "0") == "0"
    if is_main:
        check_run_dir(resolved, run_dir, allow_recipe_change=allow_recipe_change)
    topology = distributed.init(device)
    try:
        built = build_recipe(resolved, device=str(topology.device), progress="run" if progress and is_main else None)
        trainer = built[-1].component if built and built[-1].slot == "trainer" else None
        if trainer is None:
            raise UserError("the recipe names no trainer: add `trainer: {name: default}`")
        from repae.interfaces import Trainer, require

        spec = resolved.get("trainer")[0]
        require(trainer, Trainer, what=f"trainer '{spec.name}' (plugin {spec.entry.plugin.label})",
                needed_for="repae run")
        plan = None
        with run_lock(run_dir) if is_main else contextlib.nullcontext():
            if is_main:
                plan = check_run_dir(resolved, run_dir, allow_recipe_change=allow_recipe_change)
                write_run_dir(plan, resolved)
                from repae.weights import write_weights_record

                write_weights_record(run_dir, built)  # weights.json: source, revision, sha256 of every loaded file
                if plan.changed:
                    _say(f"{run_dir}: continuing with a changed recipe ({', '.join(plan.changed[:10])}); the old "
                         "one is kept as recipe.previous-N.yaml")
            distributed.barrier()
            before = latest_checkpoint(run_dir) if is_main else None
            try:
                trainer.run(run_dir, progress=progress)
            except BaseException:
                # A continuation with a changed recipe that failed before its first checkpoint (its optimizer state
                # does not fit, say) leaves the folder as it was: the previous recipe goes back.
                if plan is not None and plan.previous is not None and latest_checkpoint(run_dir) == before \
                        and undo_recipe_change(plan):
                    _say(f"{run_dir}: nothing was trained with the changed recipe; its previous recipe.yaml is back")
                raise
    finally:
        distributed.shutdown()
    return run_dir


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)
