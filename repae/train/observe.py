"""What a run leaves behind: ``metrics.jsonl``, sample grids, and what the recipe's trackers receive (its progress
bar is :func:`repae.reporting.progress`)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "Trackers", "save_grid", "summarize"]


class Trackers:
    """The recipe's trackers (:class:`repae.interfaces.Tracker`) in process 0: started with the run directory, the
    resume step and the run's resolved recipe (``RUN_DIR/recipe.yaml``), then given what ``metrics.jsonl`` and the
    sample grids get. A tracker that fails to start stops the run before step 1 (a :class:`UserError` naming its key
    path); one that fails while logging is reported once and left out from then on (``metrics.jsonl`` keeps
    everything)."""

    def __init__(self, trackers: Sequence[tuple[str, str, Any]]) -> None:
        """``trackers``: ``(key path, registered name, tracker)`` in recipe order (``("trackers.0", "wandb", t)``)."""
        self._waiting = list(trackers)
        self._active: list[tuple[str, str, Any]] = []

    def __bool__(self) -> bool:
        return bool(self._waiting or self._active)

    def start(self, run_dir: Path, resume_step: int) -> None:
        import yaml

        from repae.errors import UserError, describe_exception
        from repae.interfaces import TrackerRun

        path = Path(run_dir) / "recipe.yaml"
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        recipe = yaml.safe_load(text) if text else {}
        for label, name, tracker in self._waiting:
            run = TrackerRun(run_dir=Path(run_dir), resume_step=resume_step,
                             recipe=recipe if isinstance(recipe, Mapping) else {}, recipe_text=text, label=label)
            try:
                tracker.start(run)
            except Exception as exc:  # noqa: BLE001 - a plugin's tracker: reported with its key path
                self.finish(ok=False)  # those started already
                detail = str(exc) if isinstance(exc, UserError) else describe_exception(exc)
                raise UserError(f"{label} (tracker '{name}') could not start: {detail}") from None
            self._active.append((label, name, tracker))
        self._waiting = []

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        floats = {key: float(value) for key, value in values.items()
                  if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self._call("log_scalars", step, floats)

    def image(self, step: int, key: str, path: Path) -> None:
        self._call("log_image", step, key, Path(path))

    def finish(self, *, ok: bool = True) -> None:
        active, self._active = self._active, []
        for label, name, tracker in active:
            try:
                tracker.finish(ok=ok)
            except Exception as exc:  # noqa: BLE001 - the run's own files are written; say what was not
                _warn(f"{label} (tracker '{name}') failed to finish: {_describe(exc)}")

    def _call(self, method: str, *args: Any) -> None:
        for entry in list(self._active):
            label, name, tracker = entry
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - one tracker failing must not stop a training
                self._active.remove(entry)
                _warn(f"{label} (tracker '{name}') failed in {method} at step {args[0]} ({_describe(exc)}); it gets "
                      "nothing more in this run (metrics.jsonl keeps every value)")
                try:
                    tracker.finish(ok=False)
                except Exception:  # noqa: BLE001, S110 - it failed already; said above
                    pass


def _describe(exc: BaseException) -> str:
    from repae.errors import UserError, describe_exception

    return str(exc) if isinstance(exc, UserError) else describe_exception(exc)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class MetricsLog:
    """Append-only JSONL (one object per logged step); what it writes also goes to the run's :class:`Trackers`."""

    def __init__(self, path: Path, *, resume_step: int = 0, trackers: Trackers | None = None) -> None:
        """``resume_step``: the step training resumes from; lines of later steps (logged after that checkpoint by
        the interrupted run) are dropped, so every step appears once. ``trackers`` (started) get every line too."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._drop_after(resume_step)
        self.trackers = trackers if trackers is not None else Trackers(())
        self._file = self.path.open("a", encoding="utf-8")

    def _drop_after(self, step: int) -> None:
        from repae.fileio import atomic_write

        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                logged = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: dropped
            if logged <= step:
                kept.append(line)
        if len(kept) != len(lines):
            try:
                atomic_write(self.path, "".join(f"{line}\n" for line in kept))
            except OSError as exc:
                from repae.errors import UserError

                raise UserError(f"cannot rewrite {self.path} ({exc.strerror or exc}); free space or fix its "
                                "permissions, then run the same command") from None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            from repae.errors import UserError

            raise UserError(f"cannot append to {self.path} ({exc.strerror or exc}); free space or fix its "
                            "permissions, then run the same command to resume from the last checkpoint") from None
        self.trackers.scalars(step, values)

    def image(self, step: int, key: str, path: Path) -> None:
        """A saved sample grid (PNG), for the trackers."""
        self.trackers.image(step, key, path)

    def close(self, *, ok: bool = True) -> None:
        self._file.close()
        self.trackers.finish(ok=ok)


def save_grid(images: torch.Tensor, path: Path, *, labels: Sequence[int] | None = None,
              nrow: int | None = None) -> Path:
    """Save uint8 ``[N, 3, H, W]`` images as one PNG picture (atomically) at least
    :data:`repae.sampling.GRID_MIN_WIDTH` pixels wide: :func:`repae.sampling.image_grid`, the contact sheet's layout
    (small tiles scaled up by a whole factor, nearest neighbour, so every pixel stays a sharp square).

    With ``labels`` (the class of each image, more than one class) the picture has one row per class, in class order,
    each labelled ``class N`` and holding that class's images in index order; otherwise the images fill ``nrow``
    columns (default: a square)."""
    from repae.fileio import atomic_path
    from repae.sampling import contact_sheet_rows, image_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiles = list(images.detach().to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy())
    n = len(tiles)
    if labels is not None and len(labels) != n:
        raise ValueError(f"save_grid: {len(labels)} labels for {n} images")
    if labels is not None and len(set(labels)) > 1:
        classes = len({int(label) for label in labels})
        grouped = contact_sheet_rows(labels, classes, classes=classes, per_class=n)  # every image, class by class
        picture = image_grid([[tiles[i] for i in indices] for _, indices in grouped],
                             labels=[f"class {c}" for c, _ in grouped])
    else:
        columns = nrow or max(1, int(math.ceil(math.sqrt(n))))
        picture = image_grid([tiles[i:i + columns] for i in range(0, n, columns)], min_columns=columns)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def summarize(values: Mapping[str, Any]) -> dict[str, float]:
    """Scalars (tensors on any device, or numbers) to floats with a single host transfer."""
    keys = list(values)
    if not keys:
        return {}
    tensors = [torch.as_tensor(values[k]).detach().float().reshape(()) for k in keys]
    device = tensors[0].device
    stacked = torch.stack([t.to(device) for t in tensors]).cpu()
    return dict(zip(keys, stacked.tolist()))
