"""Run directories: the resolved recipe and the versions of everything that produced a run.

``DIR/recipe.yaml``   the fully resolved recipe (byte-identical for the same recipe, overrides and plugin versions);
``DIR/versions.json`` repae, Python and the plugins (distribution and version) providing the recipe's components.
"""

from __future__ import annotations

import contextlib
import platform
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from repae.errors import UserError
from repae.fileio import atomic_write, holds, json_text
from repae.recipe import diff_keys

__all__ = ["RECIPE_FILE", "VERSIONS_FILE", "RunDirPlan", "check_out_folder", "check_run_dir", "prepare_run_dir",
           "remove_stale_temporaries", "run_lock", "undo_recipe_change", "versions", "write_run_dir"]

RECIPE_FILE = "recipe.yaml"
VERSIONS_FILE = "versions.json"


def versions(plugins: Mapping[str, Any]) -> dict[str, Any]:
    """Versions of repae, Python, torch, timm, open_clip and the given plugins (name -> PluginInfo)."""
    from repae import __version__

    info: dict[str, Any] = {
        "repae": __version__,
        "python": platform.python_version(),
    }
    for dist in ("torch", "timm", "open-clip-torch"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["plugins"] = {
        name: {"distribution": p.distribution, "version": p.version} for name, p in sorted(plugins.items())
    }
    return info


CONTINUABLE = ("trainer.steps", "trainer.num_workers", "trainer.log_every", "trainer.checkpoint_every",
               "trainer.keep_checkpoints", "trainer.sample_every", "trainer.sample_count", "trainer.tensorboard",
               "trackers")
"""Recipe keys a run may change and still continue without ``--allow-recipe-change``: training for longer, and
settings that do not change what is trained (data workers, logging, checkpoint and sample cadence, the trackers: any
key under ``trackers``). ``trainer.tensorboard`` is the key of earlier versions (now ``trackers: [tensorboard]``):
their run directories hold it."""


def continuable(key: str) -> bool:
    """Whether a changed recipe key (a :func:`repae.recipe.diff_keys` path) lets a run continue: a key of
    :data:`CONTINUABLE` or one under it (``trackers.0.project``)."""
    return any(key == k or key.startswith(f"{k}.") for k in CONTINUABLE)


LOCK_FILE = ".lock"
_OWN_TEMPORARY = re.compile(r"^\.(recipe\.yaml|recipe\.previous-\d+\.yaml|versions\.json|weights\.json|metrics\.jsonl|"
                            r"step-\d{7,}|step-\d{7,}\.png|wandb-run\.json)\.tmp-\d+$")
"""Temporaries repae's atomic writes leave in a run directory when killed (``.<name>.tmp-<pid>``), and nothing else."""


@dataclass
class RunDirPlan:
    """What :func:`check_run_dir` found: the recipe text to write and the old recipe to keep (if it changed)."""

    run_dir: Path
    text: str
    previous: str | None = None
    changed: list[str] = field(default_factory=list)
    kept: Path | None = None
    """Where :func:`write_run_dir` kept the previous recipe (``recipe.previous-N.yaml``), if it did."""


def recipe_change(run_dir: Path, text: str) -> tuple[list[str], list[str]] | None:
    """How ``text`` (a resolved recipe) differs from the recipe of the run in ``run_dir``: ``(changed, blocking)``,
    the differing key paths with the ones that block continuing (not :func:`continuable`) first, and those blocking
    ones alone; ``None`` when the folder holds no run or the same recipe. The one rule of ``repae run`` and
    ``repae sweep``."""
    existing = Path(run_dir) / RECIPE_FILE
    if not existing.is_file():
        return None
    old_text = existing.read_text(encoding="utf-8", errors="replace")
    if old_text == text:
        return None
    try:
        changed = diff_keys(yaml.safe_load(old_text) or {}, yaml.safe_load(text) or {})
    except yaml.YAMLError:
        changed = ["(unreadable recipe.yaml)"]
    blocking = [key for key in changed if not continuable(key)]  # named first: those need a decision
    return blocking + [key for key in changed if continuable(key)], blocking


def describe_keys(keys: list[str], limit: int = 10) -> str:
    """``"a, b, c and 4 more"``: key paths for a message."""
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_out_folder(run_dir: Path) -> None:
    """What :func:`check_run_dir` refuses of the folder itself (torch-free, so the command checks it first): a file,
    or a folder holding files that are not a repae run's (no ``recipe.yaml``, and more than the lock and temporaries
    of an interrupted start). ``--out`` never overwrites or appends to a user's files."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder; pass a new or empty folder for the run")
    if run_dir.is_dir() and not (run_dir / RECIPE_FILE).is_file():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE and not _OWN_TEMPORARY.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError(f"--out {run_dir} holds files that are not a repae run's ({shown}); repae writes only "
                            f"into a new folder, an empty one, or a run directory it made. Pass another --out.")


def check_run_dir(resolved: Any, run_dir: Path, *, allow_recipe_change: bool = False) -> RunDirPlan:
    """Check, without writing anything, that ``run_dir`` can hold a run of ``resolved``.

    Refused: a path that is a file; an existing folder with files that are not a repae run's (``--out`` never
    overwrites or appends to them); a folder holding a run of a *different* recipe (naming the keys that differ),
    unless only keys of :data:`CONTINUABLE` changed (``trainer.steps``: training for longer; workers, logging) or
    ``allow_recipe_change``, in which cases the old recipe is kept as ``recipe.previous-N.yaml``."""
    run_dir = Path(run_dir)
    text = resolved.to_yaml()
    check_out_folder(run_dir)
    plan = RunDirPlan(run_dir, text)
    change = recipe_change(run_dir, text)
    if change is not None:
        changed, blocking = change
        if not allow_recipe_change and blocking:
            raise UserError(
                f"{run_dir} already holds a run of a different recipe (differing keys: {describe_keys(changed)}). "
                f"Pass another --out directory, or --allow-recipe-change to continue it with the new recipe."
            )
        plan.previous = (run_dir / RECIPE_FILE).read_text(encoding="utf-8", errors="replace")
        plan.changed = changed
    return plan


def undo_recipe_change(plan: RunDirPlan) -> bool:
    """Put the previous recipe back after a continuation that failed before writing a checkpoint (an optimizer state
    that does not fit the new recipe, a missing weights file): the folder then holds what it held before, and the
    old command works again. Returns whether there was something to undo."""
    if plan.previous is None or plan.kept is None:
        return False
    try:
        atomic_write(plan.run_dir / RECIPE_FILE, plan.previous)
        plan.kept.unlink(missing_ok=True)
    except OSError:
        return False  # the run's own error is the one to report
    plan.kept = None
    return True


def write_run_dir(plan: RunDirPlan, resolved: Any) -> Path:
    """Write what :func:`check_run_dir` planned: the recipe (keeping a changed one as ``recipe.previous-N.yaml``) and
    the versions."""
    run_dir = plan.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan.previous is not None:
            n = 1
            while (run_dir / f"recipe.previous-{n}.yaml").exists():
                n += 1
            plan.kept = run_dir / f"recipe.previous-{n}.yaml"
            atomic_write(plan.kept, plan.previous)
        for path, text in ((run_dir / RECIPE_FILE, plan.text),
                           (run_dir / VERSIONS_FILE, json_text(versions(resolved.plugins)))):
            if not holds(path, text):
                atomic_write(path, text)
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir} ({exc.strerror or exc}: "
                        f"{exc.filename or run_dir}); free space or fix its permissions, then run the same command"
                        ) from None
    return run_dir


def prepare_run_dir(resolved: Any, run_dir: Path, *, allow_recipe_change: bool = False) -> Path:
    """:func:`check_run_dir` then :func:`write_run_dir`."""
    return write_run_dir(check_run_dir(resolved, run_dir, allow_recipe_change=allow_recipe_change), resolved)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock (an advisory ``flock`` on ``run_dir/.lock``, released by the system when the process
    ends, even by ``kill -9``) while training; a second process on the same folder gets a :class:`UserError` naming
    the holder. Then remove temporaries an interrupted write left (``.*.tmp-*``: nobody else writes here)."""
    import errno
    import fcntl
    import os
    import socket
    import time

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this file system
                import warnings

                warnings.warn(f"cannot lock {path} ({exc.strerror}): the file system has no flock (e.g. Lustre "
                              "without -o flock); nothing stops a second run on this folder", stacklevel=2)
                yield
                return
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir} is in use by {holder}: two runs cannot share a run directory. Wait for it "
                            f"to finish (or stop it), or pass another --out.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"repae pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        remove_stale_temporaries(run_dir)
        yield
    finally:
        handle.close()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporaries of interrupted atomic writes (``.<name>.tmp-<pid>`` files and folders) in ``run_dir``
    and its ``checkpoints``/``samples`` folders; returns them. Only safe while holding :func:`run_lock`."""
    import shutil

    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _OWN_TEMPORARY.match(path.name):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed
