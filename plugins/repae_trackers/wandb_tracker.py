"""The ``wandb`` tracker: one Weights & Biases run per run directory.

The run's id is kept in ``RUN_DIR/wandb-run.json`` with the last step logged to it, so a resumed training continues
the same W&B run (``resume="allow"``). W&B cannot delete what it holds: the steps an interrupted process logged after
its last checkpoint stay (exact resume recomputes the same losses; the timings are the interrupted process's) and
this process skips them, so every step appears once. Offline runs (``mode: offline`` or ``WANDB_MODE=offline``) need
no network; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads them, in order, to that one run.

Logged: the scalars of ``metrics.jsonl`` (same keys and steps), the resolved recipe as the run's config, sample grids
as ``wandb.Image`` under ``samples``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repae import TrackerRun, UserError, atomic_write, check_package, require_package

from repae_trackers import WandbConfig

if TYPE_CHECKING:
    from repae import BuildContext

PACKAGE_USER = "the wandb tracker"
PACKAGE_INSTEAD = "remove wandb from `trackers`"

__all__ = ["RUN_FILE", "WandbTracker", "build_wandb"]

RUN_FILE = "wandb-run.json"
"""In the run directory: ``{"id": W&B run id, "last_step": the last step logged to it}``."""


class WandbTracker:
    """:class:`repae.Tracker` logging to a W&B run."""

    def __init__(self, config: WandbConfig) -> None:
        self.config = config
        self.run: Any = None
        self._wandb: Any = None
        self._state: Path | None = None
        self._id = ""
        self._skip_through = 0
        self._last = 0

    def start(self, run: TrackerRun) -> None:
        wandb = require_package("wandb", extra="wandb", what=PACKAGE_USER, instead=PACKAGE_INSTEAD)
        self._wandb = wandb
        self._state = run.run_dir / RUN_FILE
        held = _read_state(self._state)
        self._id = held.get("id") or _new_id()
        self._skip_through = self._last = int(held.get("last_step") or 0)  # already in the W&B run
        self._save_state()
        cfg = self.config
        folder = Path(cfg.dir or os.environ.get("WANDB_DIR") or run.run_dir).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {folder} for wandb's files ({exc.strerror or exc}); set "
                            f"{run.label}.dir") from None
        options: dict[str, Any] = {
            "project": cfg.project or os.environ.get("WANDB_PROJECT") or "repae",
            "entity": cfg.entity, "name": cfg.run_name or run.name, "group": cfg.group, "tags": list(cfg.tags) or None,
            "notes": cfg.notes, "dir": str(folder), "id": self._id, "resume": "allow",
        }
        if cfg.mode != "auto":
            options["mode"] = cfg.mode
        try:
            self.run = wandb.init(**options)
            self.run.config.update(dict(run.recipe), allow_val_change=True)
        except Exception as exc:  # noqa: BLE001 - wandb raises its own errors (no login, no network, ...)
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise UserError(
                f"wandb could not start the run ({type(exc).__name__}: {lines[0] if lines else ''}). Online mode "
                f"needs network and `wandb login` (or WANDB_API_KEY); without network set {run.label}.mode=offline "
                "(or WANDB_MODE=offline) and upload later with `wandb sync`") from None

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if step <= self._skip_through:
            return
        self.run.log({key: float(value) for key, value in scalars.items()}, step=step)
        self._logged(step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if step <= self._skip_through:
            return
        self.run.log({key: self._wandb.Image(str(path), caption=f"step {step}")}, step=step)
        self._logged(step)

    def finish(self, *, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None

    def _logged(self, step: int) -> None:
        if step > self._last:
            self._last = step
            self._save_state()

    def _save_state(self) -> None:
        assert self._state is not None
        try:
            atomic_write(self._state, json.dumps({"id": self._id, "last_step": self._last}) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {self._state} ({exc.strerror or exc}); free space or fix its "
                            "permissions") from None


def _new_id() -> str:
    """A W&B run id: 8 lower-case letters and digits, as wandb makes them."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_state(path: Path) -> dict[str, Any]:
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); it holds the W&B run id this run logs to: delete it to start "
                        "a new W&B run") from None
    if not isinstance(held, dict) or not isinstance(held.get("id"), str) or not isinstance(held.get("last_step"), int):
        raise UserError(f"{path} does not hold a W&B run id and step ({held!r}); delete it to start a new W&B run")
    return held


def build_wandb(config: WandbConfig, context: BuildContext) -> WandbTracker:
    """Factory of ``wandb``: checks that wandb is installed (when the recipe is validated), imports nothing."""
    check_package("wandb", extra="wandb", what=PACKAGE_USER, instead=PACKAGE_INSTEAD)
    return WandbTracker(config)
