"""Comparing runs: the recipe keys that differ beside the metrics, as a table, Markdown, CSV and a PNG of curves.

What is read from each run directory (all but ``recipe.yaml`` optional):

``recipe.yaml``     the resolved recipe; flattened to dotted keys (lists of mappings by index, ``encoders.0.name``;
                    lists of plain values stay one value, ``losses.diffusion.updates``)
``metrics.jsonl``   the training log: the last value of every term and its curve over the steps
``eval.json``       evaluation results, one JSON object (``repae eval --json > RUN/eval.json``: ``fid``, ``sfid``,
                    ``inception_score``, ``precision``, ``recall``, under ``metrics`` or at the top level)
``analysis.json``   latent diagnostics, one JSON object (``spatial_variance``, ``total_variation``, ``cknna``,
                    ``psnr``, ``rfid``); ``RUN/analysis.json``, else the latest ``RUN/analysis/step-*/analysis.json``
                    that ``repae analyze`` writes

Every number in ``eval.json`` / ``analysis.json`` becomes a metric ``eval/<key>`` / ``analysis/<key>`` (nested
objects flattened with dots, ``eval/cfg-1.5.fid``; the entries of a ``metrics`` object taken as top-level keys);
other values are ignored. The :data:`HEADLINE` ones are shown by default, the others on request. A directory holding
``sweep.json`` stands for the points of that sweep.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repae.errors import UserError
from repae.recipe import flatten_recipe

__all__ = [
    "Comparison",
    "DEFAULT_CURVES",
    "EXTRA_FILES",
    "RunRecord",
    "compare_runs",
    "expand_run_dirs",
    "flatten_recipe",
    "load_run",
    "plot_curves",
]

EXTRA_FILES = {"eval": "eval.json", "analysis": "analysis.json"}
"""Metric prefix -> file name: ``RUN/<name>``, else the latest ``RUN/<prefix>/step-*/<name>`` (``repae analyze``)."""
HEADLINE = {
    "eval": ("fid", "sfid", "inception_score", "is", "precision", "recall"),
    "analysis": ("spatial_variance", "total_variation", "cknna", "psnr", "rfid"),
}
"""The numbers of each file shown by default (when a file has none of them: all its top-level numbers)."""
DEFAULT_CURVES = ("denoiser/diffusion", "denoiser/repa")
_LOSS_TERM = re.compile(r"^[^/]+/[^/.]+$")


@dataclass
class RunRecord:
    """What one run directory holds, read for comparison."""

    path: Path
    label: str
    recipe: dict[str, Any]
    """Flattened resolved recipe: dotted key -> value."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    """Last value of every logged term, then ``eval/*`` and ``analysis/*``; ``None`` when not finite."""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Logged term -> (step, value), finite values only, one per step (the latest logged wins after a resume)."""
    step: int | None = None
    """Last logged step."""
    headline: list[str] = field(default_factory=list)
    """The ``eval/*`` and ``analysis/*`` metrics shown by default."""
    files: dict[str, Path] = field(default_factory=dict)
    """Prefix (``eval``, ``analysis``) -> the file its metrics were read from."""


def _numbers(data: Any, prefix: str, sep: str = "") -> dict[str, float | None]:
    """Every number in a JSON value, by dotted key after ``prefix`` (``eval/`` -> ``eval/fid``, ``eval/cfg.fid``)."""
    if isinstance(data, Mapping):
        out: dict[str, float | None] = {}
        for key, value in data.items():
            out.update(_numbers(value, f"{prefix}{sep}{key}", "."))
        return out
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        return {}
    return {prefix: float(data) if math.isfinite(data) else None}


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories named: a sweep directory (``sweep.json``, no ``recipe.yaml``) expands to its points."""
    from repae.sweep import SWEEP_FILE

    out: list[Path] = []
    for path in map(Path, paths):
        index = path / SWEEP_FILE
        if index.is_file() and not (path / "recipe.yaml").is_file():
            try:
                points = json.loads(index.read_text(encoding="utf-8"))["points"]
                names = [str(p["name"]) for p in points]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is not a sweep index written by `repae sweep` ({exc})") from None
            found = [path / n for n in names if (path / n / "recipe.yaml").is_file()]
            if not found:
                raise UserError(f"{path} is a sweep whose points have not started; run the sweep first")
            out.extend(found)
        else:
            out.append(path)
    return out


def load_run(path: str | Path, label: str | None = None) -> RunRecord:
    """Read a run directory's recipe, metrics log and optional ``eval.json`` / ``analysis.json``."""
    import yaml

    path = Path(path)
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file():
        what = "does not exist" if not path.exists() else "has no recipe.yaml"
        raise UserError(f"{path} {what}; pass run directories written by `repae run` (or a `repae sweep` directory)")
    try:
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{recipe_file} is not valid YAML ({exc})") from None
    record = RunRecord(path, label or path.name, flatten_recipe(recipe))
    log = path / "metrics.jsonl"
    if log.is_file():
        curves: dict[str, dict[int, float]] = {}
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                step = int(entry.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut short by a killed run, or not a log record
            record.step = step
            for key, value in entry.items():
                if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                    continue
                if value is not None and math.isfinite(value):
                    record.metrics[key] = float(value)
                    curves.setdefault(key, {})[step] = float(value)
                else:
                    record.metrics[key] = None
                    curves.setdefault(key, {}).pop(step, None)
        record.curves = {k: sorted(v.items()) for k, v in curves.items()}
    for prefix in EXTRA_FILES:
        extra = _extra_file(path, prefix)
        if extra is None:
            continue
        try:
            data = json.loads(extra.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserError(f"{extra} is not valid JSON ({exc})") from None
        if not isinstance(data, Mapping):
            raise UserError(f"{extra} must hold one JSON object (key -> value), not {type(data).__name__}")
        if isinstance(data.get("metrics"), Mapping):  # `repae eval --json`: the values are under "metrics"
            data = {**{k: v for k, v in data.items() if k != "metrics"}, **data["metrics"]}
        numbers = _numbers(data, f"{prefix}/")
        record.metrics.update(numbers)
        record.files[prefix] = extra
        known = [f"{prefix}/{k}" for k in HEADLINE[prefix] if f"{prefix}/{k}" in numbers]
        record.headline += known or [k for k in numbers if "." not in k[len(prefix) + 1:]]
    return record


def _extra_file(run_dir: Path, prefix: str) -> Path | None:
    direct = run_dir / EXTRA_FILES[prefix]
    if direct.is_file():
        return direct
    nested = [p for p in run_dir.glob(f"{prefix}/step-*/{EXTRA_FILES[prefix]}") if p.parent.name[5:].isdigit()]
    return max(nested, key=lambda p: int(p.parent.name[5:]), default=None)


def _order(key: str) -> tuple[int, int]:
    """eval before analysis, each in :data:`HEADLINE` order; other keys keep their place (the sort is stable)."""
    prefix, _, name = key.partition("/")
    names = HEADLINE.get(prefix, ())
    source = list(EXTRA_FILES).index(prefix) if prefix in EXTRA_FILES else len(EXTRA_FILES)
    return source, names.index(name) if name in names else len(names)


def _cell(value: Any) -> str:
    """A recipe value as compact YAML (``null``, ``true``, ``[denoiser, tokenizer]``)."""
    import yaml

    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return str(value)


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"


@dataclass
class Comparison:
    """Runs side by side: the recipe keys that differ, the last logged step and the chosen metrics."""

    runs: list[RunRecord]
    keys: list[str]
    metrics: list[str]

    @property
    def header(self) -> list[str]:
        return ["run", *self.keys, "step", *self.metrics]

    def rows(self) -> list[list[str]]:
        """Display text: recipe values as compact YAML, metrics to 4 significant digits, ``-`` where missing."""
        rows = []
        for run in self.runs:
            keys = [_cell(run.recipe[k]) if k in run.recipe else "-" for k in self.keys]
            step = "-" if run.step is None else str(run.step)
            values = [_number(run.metrics[m]) if m in run.metrics else "-" for m in self.metrics]
            rows.append([run.label, *keys, step, *values])
        return rows

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        header = self.header
        aligns = ["---"] * (1 + len(self.keys)) + ["---:"] * (1 + len(self.metrics))
        return "\n".join([line(header), "|" + "|".join(aligns) + "|", *map(line, self.rows())]) + "\n"

    def to_csv(self) -> str:
        """CSV with full-precision metrics, empty cells where missing, and the run directory's path."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*self.header, "path"])
        for run in self.runs:
            keys = [_cell(run.recipe[k]) if k in run.recipe else "" for k in self.keys]
            values = [("nan" if run.metrics[m] is None else repr(run.metrics[m])) if m in run.metrics else ""
                      for m in self.metrics]
            writer.writerow([run.label, *keys, "" if run.step is None else run.step, *values, str(run.path)])
        return buffer.getvalue()


def compare_runs(paths: Sequence[str | Path], *, metrics: Sequence[str] = (), all_keys: bool = False) -> Comparison:
    """Read runs (sweep directories expanded) and choose the columns.

    ``metrics``: glob patterns (``denoiser/*``, ``eval/fid``) matched against every metric; by default the loss terms
    (``phase/label``, gradient norms left out), then all of ``eval/*`` and ``analysis/*`` first. ``all_keys`` shows
    every recipe key, not only those that differ.
    """
    dirs = expand_run_dirs(paths)
    if not dirs:
        raise UserError("no run directories given")
    names = [d.name for d in dirs]
    runs = [load_run(d, d.name if names.count(d.name) == 1 else str(d)) for d in dirs]
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.recipe))
    missing = object()
    if not all_keys:
        keys = {k: None for k in keys
                if len({json.dumps(r.recipe.get(k, missing), sort_keys=True, default=repr) for r in runs}) > 1}
    available: dict[str, None] = {}
    for run in runs:
        available.update(dict.fromkeys(run.metrics))
    if metrics:
        chosen: dict[str, None] = {}
        for pattern in metrics:
            hits = [k for k in available if fnmatch.fnmatchcase(k, pattern)]
            if not hits:
                shown = ", ".join(available) or "none (no metrics.jsonl, eval.json or analysis.json)"
                raise UserError(f"--metric {pattern}: matches no metric of these runs; they have: {shown}")
            chosen.update(dict.fromkeys(hits))
        columns = list(chosen)
    else:
        headline: dict[str, None] = {}
        for run in runs:
            headline.update(dict.fromkeys(run.headline))
        extras = tuple(f"{p}/" for p in EXTRA_FILES)
        losses = [k for k in available
                  if _LOSS_TERM.match(k) and not k.endswith("grad_norm") and not k.startswith(extras)]
        columns = sorted(headline, key=_order) + losses
    return Comparison(runs, list(keys), columns)


# ---------------------------------------------------------------------------------------------------------------------
# Training curves as a PNG (drawn with Pillow, which torchvision already requires; no plotting library needed)
# ---------------------------------------------------------------------------------------------------------------------

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def plot_curves(runs: Sequence[RunRecord], terms: Sequence[str], path: str | Path, *,
                panel: tuple[int, int] = (560, 400)) -> Path:
    """Draw one panel per term (one line per run, a shared legend below) and save it as a PNG at ``path``.

    Terms that no run logged are left out; when none was logged, :class:`UserError` names the terms there are.
    """
    from PIL import Image, ImageDraw

    terms = [t for t in terms if any(r.curves.get(t) for r in runs)]
    if not terms:
        logged = sorted({k for r in runs for k, v in r.curves.items() if v})
        raise UserError("none of the curves asked for was logged by these runs; choose with --curve from: "
                        + (", ".join(logged) or "nothing (no metrics.jsonl)"))
    width, height = panel
    font, small = _font(14), _font(12)
    legend_height = 12 + 20 * len(runs)
    image = Image.new("RGB", (width * len(terms), height + legend_height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 72, 16, 34, 44
    for p, term in enumerate(terms):
        x0, x1, y0, y1 = p * width + left, (p + 1) * width - right, top, height - bottom
        points = [pt for r in runs for pt in r.curves.get(term, [])]
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        sx_lo, sx_hi = min(steps), max(steps)
        if sx_hi == sx_lo:
            sx_lo, sx_hi = sx_lo - 1, sx_hi + 1
        vy_lo, vy_hi = min(values), max(values)
        pad = (vy_hi - vy_lo) * 0.05 or max(abs(vy_hi) * 0.1, 1e-3)
        vy_lo, vy_hi = vy_lo - pad, vy_hi + pad

        def at(step: float, value: float) -> tuple[float, float]:
            return (x0 + (step - sx_lo) / (sx_hi - sx_lo) * (x1 - x0),
                    y1 - (value - vy_lo) / (vy_hi - vy_lo) * (y1 - y0))

        for tick in _ticks(vy_lo, vy_hi):
            _, y = at(sx_lo, tick)
            draw.line([(x0, y), (x1, y)], fill="#e6e6e6")
            label = f"{tick:.4g}"
            box = draw.textbbox((0, 0), label, font=small)
            draw.text((x0 - 6 - (box[2] - box[0]), y - (box[3] - box[1]) / 2 - box[1]), label, fill="black",
                      font=small)
        for tick in [t for t in _ticks(sx_lo, sx_hi) if float(t).is_integer()]:  # steps are whole numbers
            x, _ = at(tick, vy_lo)
            draw.line([(x, y0), (x, y1)], fill="#e6e6e6")
            label = str(int(tick))
            box = draw.textbbox((0, 0), label, font=small)
            draw.text((x - (box[2] - box[0]) / 2, y1 + 6), label, fill="black", font=small)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        box = draw.textbbox((0, 0), term, font=font)
        draw.text(((x0 + x1) / 2 - (box[2] - box[0]) / 2, 10), term, fill="black", font=font)
        draw.text(((x0 + x1) / 2 - 12, height - 20), "step", fill="black", font=small)
        for i, run in enumerate(runs):
            curve = [at(s, v) for s, v in run.curves.get(term, [])]
            color = _COLORS[i % len(_COLORS)]
            if len(curve) > 1:
                draw.line(curve, fill=color, width=2, joint="curve")
            for x, y in curve if len(curve) <= 1 else []:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for i, run in enumerate(runs):
        y = height + 6 + 20 * i
        draw.line([(left, y + 8), (left + 28, y + 8)], fill=_COLORS[i % len(_COLORS)], width=3)
        draw.text((left + 36, y), run.label, fill="black", font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
