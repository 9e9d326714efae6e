"""Train a resolved recipe in this process: the body of ``repae run`` (also used by ``repae sweep``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from repae.errors import UserError

__all__ = ["train_recipe"]


def train_recipe(resolved: Any, run_dir: Path, *, device: str = "auto", allow_recipe_change: bool = False,
                 progress: bool = True) -> Path:
    """Join the process group (under torchrun), write the run directory on rank 0, build the components on this
    process's device and run the recipe's trainer (resuming from the run directory's latest checkpoint).

    ``resolved`` should be checked whole first (:func:`repae.compose.compose_recipe`): its ``recipe`` holds the
    derived fields, which the run directory records."""
    from repae.build import build_recipe
    from repae.rundir import prepare_run_dir
    from repae.train import distributed

    distributed.resolve_device(device)  # fail before writing anything when the device does not exist
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") == "0":
        prepare_run_dir(resolved, run_dir, allow_recipe_change=allow_recipe_change)
    topology = distributed.init(device)
    try:
        distributed.barrier()
        built = build_recipe(resolved, device=str(topology.device))
        trainer = built[-1].component if built and built[-1].slot == "trainer" else None
        if trainer is None:
            raise UserError("the recipe names no trainer: add `trainer: {name: default}`")
        from repae.interfaces import Trainer, require

        spec = resolved.get("trainer")[0]
        require(trainer, Trainer, what=f"trainer '{spec.name}' (plugin {spec.entry.plugin.label})",
                needed_for="repae run")
        trainer.run(run_dir, progress=progress)
    finally:
        distributed.shutdown()
    return run_dir
