"""Checks a command makes from files and metadata alone, before torch, timm or torchvision are imported.

A mistake in what the user typed (a path, a format, a number) is reported in about a second, not after the heavy
imports and the components' build (``repae export RUN --format onnx`` used to say "unknown export format" after
rebuilding the run's models). A run that already reached its last step is recognised without building anything
(:func:`finished_run`).

Nothing here imports torch (``tests/test_fail_fast.py`` checks ``sys.modules`` after each refused command).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from repae.errors import UserError

__all__ = ["INPUT_RECORD", "check_positive", "finished_run", "record_run_input"]

INPUT_RECORD = ".recipe-input.json"
"""A run directory's record of the recipe ``repae run`` resolved before deriving its fields (a digest of it, of the
``recipe.yaml`` it produced and of the plugins' versions): what lets a later ``repae run`` of the same recipe see,
without building anything, that ``recipe.yaml`` is what it would write (:func:`finished_run`)."""


def check_positive(**values: int) -> None:
    """``--batch-size must be >= 1, got 0`` for the first value below 1 (keyword: the option, ``_`` for ``-``)."""
    for name, value in values.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _data_state(resolved: Any) -> list[Any]:
    """What the dataset's folders look like (each path a dataset field names: its modification time and its entries'),
    since fields are derived from what a dataset finds there (an image folder's classes, a latent cache's shape): a
    changed folder means the run is built and checked again."""
    import dataclasses

    state: list[Any] = []
    for spec in resolved.get("dataset"):
        for f in dataclasses.fields(spec.config):
            value = getattr(spec.config, f.name)
            if not isinstance(value, str) or not value or "\n" in value:
                continue
            path = Path(value).expanduser()
            try:
                entries = sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir()) if path.is_dir() else []
                state.append([f.name, path.stat().st_mtime_ns if path.exists() else None, entries])
            except OSError:
                state.append([f.name, "unreadable"])
    return state


def _input_digest(resolved: Any) -> str:
    """A digest of a resolved recipe before its fields are derived: its YAML and, per component, which fields the
    recipe sets (derivation fills only the others) and which were derived already; and the dataset's folders."""
    explicit = {spec.label: sorted(spec.explicit) for spec in resolved.components}
    derived = {spec.label: sorted(spec.derived) for spec in resolved.components}
    return _sha256(json.dumps({"yaml": resolved.to_yaml(), "explicit": explicit, "derived": derived,
                               "data": _data_state(resolved)}, sort_keys=True))


def _plugins(resolved: Any) -> dict[str, Any]:
    from repae import __version__

    plugins = {name: [p.distribution, p.version] for name, p in sorted(resolved.plugins.items())}
    return {"repae": __version__, "plugins": plugins}


def record_run_input(resolved: Any, written: Any, run_dir: Path) -> None:
    """After ``repae run`` trained ``written`` (``resolved`` with its fields derived) in ``run_dir``: record that
    ``resolved`` gives ``run_dir``'s ``recipe.yaml``, when the file holds exactly ``written`` (else nothing)."""
    from repae.fileio import atomic_write, holds, json_text
    from repae.rundir import RECIPE_FILE

    text = written.to_yaml()
    if not holds(run_dir / RECIPE_FILE, text):
        return
    record = {"input_sha256": _input_digest(resolved), "recipe_sha256": _sha256(text), **_plugins(resolved)}
    path = run_dir / INPUT_RECORD
    if not holds(path, json_text(record)):
        try:
            atomic_write(path, json_text(record))
        except OSError:  # only a shortcut for the next run: never a failure of this one
            pass


def finished_run(resolved: Any, run_dir: Path) -> str | None:
    """The message for a run of ``resolved`` in ``run_dir`` that has nothing left to do, else ``None``.

    Only when it is provably the same run: ``run_dir`` records (:data:`INPUT_RECORD`) that this very resolved recipe
    (YAML, explicit fields, the dataset's folders as they were), with the same repae and plugin versions, gave its
    ``recipe.yaml``, unchanged since, and
    its latest checkpoint is at or past that recipe's ``trainer.steps``. In any doubt (no record, another recipe, a
    longer ``trainer.steps``, a changed cadence, an unreadable file) ``None``: the command builds and decides as
    always (continuing, or refusing a different recipe)."""
    from repae.rundir import RECIPE_FILE
    from repae.runs import checkpoint_step, latest_checkpoint

    try:
        record = json.loads((run_dir / INPUT_RECORD).read_text(encoding="utf-8"))
        text = (run_dir / RECIPE_FILE).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("recipe_sha256") != _sha256(text) \
            or record.get("input_sha256") != _input_digest(resolved) \
            or {k: record.get(k) for k in ("repae", "plugins")} != _plugins(resolved):
        return None
    import yaml

    try:
        trainer = (yaml.safe_load(text) or {}).get("trainer")
    except yaml.YAMLError:
        return None
    steps = trainer.get("steps") if isinstance(trainer, dict) else None
    checkpoint = latest_checkpoint(run_dir)
    step = checkpoint_step(checkpoint) if checkpoint is not None else None
    if not isinstance(steps, int) or isinstance(steps, bool) or step is None or step < steps:
        return None
    return (f"{run_dir} is finished (step {step}/{steps}); nothing to do. Raise trainer.steps to train longer, or "
            "pass another --out.")
