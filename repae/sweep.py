"""Sweeps: a recipe trained over the Cartesian product of override values, one run directory per point.

``repae sweep RECIPE key=a,b,c key2=x,y other.key=v`` turns every argument whose value holds a comma *at bracket
depth 0* into an axis; the others are plain overrides applied to every point::

    trainer.optimizers.default.lr=1.0e-3,2.0e-3       an axis of two values
    losses.diffusion.updates=[denoiser,tokenizer]     ONE value (the comma is inside brackets)
    losses.diffusion.updates=[denoiser],[denoiser,tokenizer]   an axis of two lists
    description='a, b'                                ONE value (the comma is inside quotes)

Each value is read as YAML, exactly as an override of ``repae run``. Points are the product of the axes in the
order given (the last axis varies fastest); every point's overrides are the arguments in the order given with each
axis replaced by that point's value. A point's directory is named by its index and the values that vary, made safe
for file systems: ``001-trainer.optimizers.default.lr=2.0e-3``.

``OUT/sweep.json`` indexes the sweep (recipe, axes, points, status). Running the same sweep again skips finished
points (latest checkpoint at the trainer's final step) and resumes unfinished ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repae.errors import Problem, RecipeError, UserError

__all__ = [
    "SWEEP_FILE",
    "Axis",
    "Sweep",
    "SweepPoint",
    "parse_sweep_args",
    "plan_sweep",
    "point_name",
    "point_progress",
    "run_sweep",
    "split_values",
    "torchrun_command",
]

SWEEP_FILE = "sweep.json"
LAUNCHERS = ("in-process", "torchrun")
_MAX_SLUG = 120
_OPEN, _CLOSE = "[{(", "]})"


# ---------------------------------------------------------------------------------------------------------------------
# Parsing the command line
# ---------------------------------------------------------------------------------------------------------------------


def split_values(raw: str) -> list[str]:
    """Split ``raw`` on the commas outside brackets (``[]``, ``{}``, ``()``) and outside quotes (``'...'``, ``"..."``).

    ``"1,2"`` -> ``["1", "2"]``; ``"[a,b],[c]"`` -> ``["[a,b]", "[c]"]``; ``"'a, b'"`` -> ``["'a, b'"]``. Pieces are
    stripped of surrounding blanks.
    """
    pieces: list[str] = []
    depth, quote, start = 0, "", 0
    for i, char in enumerate(raw):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            pieces.append(raw[start:i].strip())
            start = i + 1
    pieces.append(raw[start:].strip())
    return pieces


@dataclass(frozen=True)
class Axis:
    """One swept key: its values as typed (``texts``) and as parsed YAML (``values``)."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]
    position: int
    """Index of the argument that declared it (points keep the arguments' order)."""


@dataclass(frozen=True)
class SweepArgs:
    """The command line split into plain overrides (applied to every point) and axes."""

    args: tuple[str, ...]
    axes: tuple[Axis, ...]

    @property
    def fixed(self) -> list[str]:
        swept = {a.position for a in self.axes}
        return [a for i, a in enumerate(self.args) if i not in swept]


def parse_sweep_args(args: Sequence[str]) -> SweepArgs:
    """Split ``key=value`` arguments into plain overrides and axes (``key=a,b,...``); raises :class:`RecipeError`
    listing every malformed argument (bad key path, a value that is not YAML, an empty value, a key swept twice)."""
    from repae.recipe import parse_override

    problems: list[Problem] = []
    axes: list[Axis] = []
    keys: dict[str, list[int]] = {}
    for position, arg in enumerate(args):
        where = f"command line `{arg}`"
        key, sep, raw = arg.partition("=")
        key = key.strip()
        try:
            if not sep:
                raise ValueError("expected KEY.PATH=VALUE (no '=' found)")
            parse_override(f"{key}=null")  # the key path alone; a plain override's value is checked by read_recipe
        except ValueError as exc:
            problems.append(Problem(where, "", f"bad override: {exc}", "write KEY.PATH=VALUE or KEY.PATH=A,B,C"))
            continue
        keys.setdefault(key, []).append(position)
        pieces = split_values(raw)
        if len(pieces) < 2:
            continue
        values: list[Any] = []
        for piece in pieces:
            if not piece:
                problems.append(Problem(where, key, "an empty value in the list of values",
                                        "write null for a missing value; quote a value that contains commas"))
                continue
            try:
                values.append(parse_override(f"{key}={piece}")[1])
            except ValueError as exc:
                problems.append(Problem(where, key, f"value {piece!r}: {exc}"))
        if len(values) == len(pieces):
            axes.append(Axis(key, tuple(pieces), tuple(values), position))
    for axis in axes:
        others = [args[p] for p in keys[axis.key] if p != axis.position]
        if others:
            problems.append(Problem(f"command line `{args[axis.position]}`", axis.key,
                                    "is swept but also set by " + ", ".join(f"`{a}`" for a in others),
                                    "give the key once, with its list of values"))
    if problems:
        raise RecipeError(problems, title="invalid sweep arguments")
    return SweepArgs(tuple(args), tuple(axes))


def _slug(text: str) -> str:
    """``[denoiser, tokenizer]`` -> ``denoiser+tokenizer``, ``XL/2`` -> ``XL-2``, ``{name: x}`` -> ``name-x``."""
    text = re.sub(r"[\[\]{}()'\"]", "", text.strip())
    text = re.sub(r"\s*:\s*", "-", text)
    text = re.sub(r"\s*,\s*|\s+", "+", text)
    text = re.sub(r"[^A-Za-z0-9._=+\-]+", "-", text)
    return re.sub(r"-{2,}", "-", text).strip("-+") or "_"


def point_name(index: int, assignment: Sequence[tuple[str, str]]) -> str:
    """``NNN-key=value__key2=value2``: the point's index and its swept values, reduced to characters that are safe
    in file names on every system (letters, digits, ``.`` ``_`` ``=`` ``+`` ``-``); long names end in a hash."""
    text = "__".join(f"{key}={value}" for key, value in assignment)
    slug = "__".join(f"{_slug(key)}={_slug(value)}" for key, value in assignment).lstrip(".") or "point"
    if len(slug) > _MAX_SLUG:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug[:_MAX_SLUG - 9].rstrip('-+.')}-{digest}"
    return f"{index:03d}-{slug}"


# ---------------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """One point of the grid: its overrides, its run directory, and what happened to it."""

    index: int
    name: str
    values: dict[str, Any]
    """Swept key -> parsed value."""
    texts: dict[str, str]
    """Swept key -> the value as typed."""
    overrides: list[str]
    run_dir: Path
    resolved: Any = None
    status: str = "pending"
    """pending, running, done, failed or interrupted."""
    step: int | None = None
    """Step of the latest checkpoint, when there is one."""
    steps: int | None = None
    """The trainer's final step (``trainer.steps``), when the trainer has one."""
    error: str | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "dir": str(self.run_dir), "values": self.values,
            "overrides": self.overrides, "status": self.status, "step": self.step, "steps": self.steps,
            "error": self.error, "seconds": None if self.seconds is None else round(self.seconds, 1),
        }


@dataclass
class Sweep:
    """A planned (and possibly run) sweep: the recipe, the parsed arguments, the points and their problems."""

    recipe: Path
    args: SweepArgs
    out: Path
    points: list[SweepPoint]
    problems: list[Problem] = field(default_factory=list)
    launcher: str = "in-process"
    allow_recipe_change: bool = False
    """Continue points whose directory holds another recipe (the old one kept as ``recipe.previous-N.yaml``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": str(self.recipe),
            "args": list(self.args.args),
            "fixed": self.args.fixed,
            "axes": [{"key": a.key, "values": list(a.values), "texts": list(a.texts)} for a in self.args.axes],
            "launcher": self.launcher,
            "points": [p.to_json() for p in self.points],
        }

    def write_index(self) -> Path:
        """Write ``OUT/sweep.json`` atomically."""
        from repae.fileio import write_json

        return write_json(self.out / SWEEP_FILE, self.to_json())


def point_progress(point: SweepPoint) -> tuple[int | None, int | None]:
    """``(latest checkpoint step or None, trainer.steps or None)`` of a point's run directory."""
    from repae.train.checkpoint import latest_checkpoint

    steps = None
    if point.resolved is not None:
        trainers = point.resolved.get("trainer")
        steps = getattr(trainers[0].config, "steps", None) if trainers else None
    found = latest_checkpoint(point.run_dir) if point.run_dir.is_dir() else None
    step = None
    if found is not None:
        try:
            step = int(json.loads((found / "state.json").read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = None
    return step, steps if isinstance(steps, int) else None


def _is_finished(point: SweepPoint) -> bool:
    return point.step is not None and point.steps is not None and point.step >= point.steps


def plan_sweep(recipe: str | Path, args: Sequence[str], registry: Any, out: str | Path | None = None, *,
               allow_recipe_change: bool = False) -> Sweep:
    """Expand the grid and resolve every point against ``registry``.

    Every point is checked whole (:func:`repae.compose.compose_recipe`: its components built on ``meta`` and checked
    against each other). Problems of all points are collected in :attr:`Sweep.problems` (a problem shared by several
    points is reported once, naming them), as are run directories that already hold a different recipe (unless
    ``allow_recipe_change``). Argument errors and a missing recipe file raise :class:`RecipeError` at once.
    """
    from repae.compose import compose_recipe
    from repae.recipe import read_recipe
    from repae.rundir import describe_keys, recipe_change

    recipe = Path(recipe)
    if not recipe.is_file():
        raise RecipeError([Problem(str(recipe), "", "recipe file not found", "check the path")],
                          title="cannot load recipe")
    parsed = parse_sweep_args(args)
    out = Path(out) if out is not None else Path("runs") / f"{recipe.stem}-sweep"
    axes = parsed.axes
    by_position = {a.position: a for a in axes}
    points: list[SweepPoint] = []
    found: dict[str, list[str]] = {}
    first: dict[str, Problem] = {}
    for index, choice in enumerate(itertools.product(*(range(len(a.values)) for a in axes))):
        pick = {a.position: i for a, i in zip(axes, choice)}
        overrides = [f"{by_position[p].key}={by_position[p].texts[pick[p]]}" if p in pick else arg
                     for p, arg in enumerate(parsed.args)]
        texts = {a.key: a.texts[i] for a, i in zip(axes, choice)}
        name = point_name(index, list(texts.items())) if axes else "000-recipe"
        point = SweepPoint(index, name, {a.key: a.values[i] for a, i in zip(axes, choice)}, texts, overrides,
                           out / name)
        points.append(point)
        problems: list[Problem] = []
        try:
            point.resolved = compose_recipe(read_recipe(recipe, overrides, registry)).recipe
        except RecipeError as exc:
            problems.extend(exc.problems)
        if point.resolved is not None:
            point.step, point.steps = point_progress(point)
            # The rule of `repae run`: keys that do not change what is trained (steps, cadence, trackers) may differ.
            change = recipe_change(point.run_dir, point.resolved.to_yaml())
            if change is not None and change[1] and not allow_recipe_change:
                problems.append(Problem(str(point.run_dir), "", f"already holds a run of a different recipe "
                                        f"(differing keys: {describe_keys(change[0])})",
                                        "pass another --out, or --allow-recipe-change to continue it"))
        for problem in problems:
            found.setdefault(str(problem), []).append(name)
            first.setdefault(str(problem), problem)
    merged = []
    for text, names in found.items():
        problem = first[text]
        who = "every point" if len(names) == len(points) > 1 else "point " + ", ".join(names)
        merged.append(Problem(f"[{who}] {problem.where}", problem.path, problem.message, problem.hint))
    return Sweep(recipe, parsed, out, points, merged, allow_recipe_change=allow_recipe_change)


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def torchrun_command(recipe: Path, point: SweepPoint, *, nproc_per_node: int, torchrun_args: Sequence[str] = (),
                     device: str = "auto", allow_recipe_change: bool = False) -> list[str]:
    """The argv that trains one point as its own torchrun job: ``python -m torch.distributed.run ... -m repae run``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node),
               *torchrun_args, "-m", "repae", "run", str(recipe), *point.overrides, "--out", str(point.run_dir)]
    if device != "auto":
        command += ["--device", device]
    if allow_recipe_change:
        command.append("--allow-recipe-change")
    return command


def run_sweep(
    sweep: Sweep,
    *,
    launcher: str = "in-process",
    nproc_per_node: int = 1,
    torchrun_args: Sequence[str] | str = (),
    device: str = "auto",
    keep_going: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Sweep:
    """Train every point that is not finished, one after another, updating ``OUT/sweep.json`` as it goes.

    ``in-process`` trains here (as ``repae run`` does); ``torchrun`` starts ``python -m torch.distributed.run
    --nproc-per-node N [torchrun_args] -m repae run RECIPE OVERRIDES --out POINT_DIR`` per point. A failing point
    stops the sweep (its error re-raised) unless ``keep_going``; its status is ``failed`` either way. Raises
    :class:`RecipeError` (before training anything) when the plan has problems.
    """
    import os

    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher}: unknown launcher; use one of {', '.join(LAUNCHERS)}")
    if launcher != "torchrun" and nproc_per_node != 1:
        raise UserError("--nproc-per-node needs --launcher torchrun (in-process points run in this one process)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("do not start `repae sweep` under torchrun; run it plainly with --launcher torchrun "
                        "--nproc-per-node N, which starts one torchrun job per point")
    if sweep.problems:
        raise RecipeError(sweep.problems, title=f"invalid sweep ({len(sweep.points)} point(s))")
    if isinstance(torchrun_args, str):
        torchrun_args = shlex.split(torchrun_args)
    sweep.launcher = launcher
    sweep.write_index()
    total = len(sweep.points)
    for n, point in enumerate(sweep.points, 1):
        if _is_finished(point):
            point.status = "done"
            echo(f"[{n}/{total}] {point.name}: finished (step {point.step}); skipped")
            continue
        resume = f", resuming from step {point.step}" if point.step is not None else ""
        echo(f"[{n}/{total}] {point.name}: training{resume}")
        point.status, point.error = "running", None
        sweep.write_index()
        started = time.perf_counter()
        try:
            if launcher == "torchrun":
                command = torchrun_command(sweep.recipe, point, nproc_per_node=nproc_per_node,
                                           torchrun_args=list(torchrun_args), device=device,
                                           allow_recipe_change=sweep.allow_recipe_change)
                code = subprocess.run(command, check=False).returncode
                if code in (130, 143):  # the launched run was stopped by SIGINT/SIGTERM after a checkpoint
                    from repae.errors import StopRequested

                    raise StopRequested(f"point {point.name}: `{shlex.join(command)}` was stopped (exit code {code}); "
                                        "run the sweep again to resume", exit_code=code)
                if code != 0:
                    raise UserError(f"point {point.name}: `{shlex.join(command)}` exited with code {code}")
            else:
                from repae.train.launch import train_recipe

                train_recipe(point.resolved, point.run_dir, device=device, progress=progress,
                             allow_recipe_change=sweep.allow_recipe_change)
        except BaseException as exc:
            from repae.errors import StopRequested

            stopped = isinstance(exc, (KeyboardInterrupt, StopRequested))  # preemption: the sweep stops here
            point.status = "interrupted" if stopped else "failed"
            point.error = str(exc) if isinstance(exc, UserError) else "".join(
                traceback.format_exception_only(type(exc), exc)).strip()
            point.seconds = time.perf_counter() - started
            point.step, _ = point_progress(point)
            sweep.write_index()
            if keep_going and isinstance(exc, Exception) and not stopped:
                echo(f"[{n}/{total}] {point.name}: failed: {point.error}")
                if not isinstance(exc, UserError):
                    traceback.print_exc()
                continue
            raise
        point.seconds = time.perf_counter() - started
        point.step, _ = point_progress(point)
        point.status = "done"
        sweep.write_index()
    return sweep
