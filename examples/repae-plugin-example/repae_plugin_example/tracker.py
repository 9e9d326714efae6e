"""The ``run-summary`` tracker: ``RUN_DIR/summary.json`` holds the last logged step, its values and the sample grids.

A tracker is the smallest kind to write: four methods (:class:`repae.Tracker`), no torch. This one keeps what a
dashboard's "summary" shows, in a file a script can read while the run trains.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repae import BuildContext, TrackerRun, atomic_write

from repae_plugin_example import RunSummaryConfig


class RunSummaryTracker:
    """Rewrites ``RUN_DIR/<file>`` (atomically) at every logged step."""

    def __init__(self, config: RunSummaryConfig) -> None:
        self.config = config
        self.path: Path | None = None
        self.summary: dict[str, Any] = {}

    def start(self, run: TrackerRun) -> None:
        self.path = run.run_dir / self.config.file
        held = json.loads(self.path.read_text()) if self.path.is_file() else {}
        # resuming: the grids saved after the checkpoint are made again by this process
        samples = {k: v for k, v in held.get("samples", {}).items() if int(k) <= run.resume_step}
        self.summary = {"run": run.name, "description": run.recipe.get("description", ""), "step": run.resume_step,
                        "values": {}, "samples": samples}

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.summary["step"] = step
        self.summary["values"] = {k: v for k, v in scalars.items() if not self.config.keys or k in self.config.keys}
        self._write()

    def log_image(self, step: int, key: str, path: Path) -> None:
        self.summary["samples"][str(step)] = str(path)
        self._write()

    def finish(self, *, ok: bool = True) -> None:
        if self.path is not None:
            self.summary["finished"] = "ok" if ok else "failed"
            self._write()

    def _write(self) -> None:
        assert self.path is not None, "start() first"
        # allow_nan: a non-finite loss is written as NaN (metrics.jsonl writes null)
        atomic_write(self.path, json.dumps(self.summary, indent=1) + "\n")


def build_run_summary(config: RunSummaryConfig, context: BuildContext) -> RunSummaryTracker:
    return RunSummaryTracker(config)  # opens nothing: `repae recipe validate` builds it too
