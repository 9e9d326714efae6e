"""Sampling a trained run to files: PNGs and an ADM-format ``samples.npz`` (what ``repae sample`` runs).

Sample ``i`` always gets the same label and noise (from the seed and ``i`` alone), so the result does not depend on
the batch size or the number of processes. Under ``torchrun`` rank ``r`` of ``W`` makes the indices ``i = r mod W``.
PNGs are written as they are made (``DIR/images/000000.png`` ...); a rerun skips those that decode, so an interrupted
run resumes. At the end rank 0 assembles ``DIR/samples.npz`` (``arr_0``: uint8 ``N x H x W x 3`` in index order,
streamed to disk), draws ``DIR/contact_sheet.png`` (the first samples at a glance, one row per class:
:func:`contact_sheet_rows`) and records :class:`SamplingSettings` with what they resolved to in ``DIR/sampling.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from repae.errors import UserError
from repae.fileio import atomic_path, write_json, write_png

if TYPE_CHECKING:
    from repae.runs import OpenedRun

__all__ = ["CONTACT_SHEET", "NPZ_FILE", "SETTINGS_FILE", "SamplingSettings", "build_sampler", "contact_sheet_rows",
           "default_dirname", "image_grid", "sample_run", "write_contact_sheet", "write_npz"]

SETTINGS_FILE = "sampling.json"
NPZ_FILE = "samples.npz"
CONTACT_SHEET = "contact_sheet.png"
SHEET_CLASSES = 8
"""Rows of a class-conditional contact sheet: the first 8 classes (by id) that have samples."""
SHEET_PER_CLASS = 8
"""Samples per row: the first 8 of each class (an unconditional model: the first 64 samples, 8 per row)."""
GRID_MIN_WIDTH = 512
"""Pictures narrower than this are scaled up by a whole factor, nearest neighbour (a 32-px tile stays sharp)."""
IMAGES_DIR = "images"
SLOTS = ("tokenizer", "latent_norm", "denoiser", "sampler")
"""What sampling builds (no dataset, no encoders: the run's recipe holds the denoiser's derived shapes)."""
LABEL_MODES = ("balanced", "random")


@dataclass(frozen=True)
class SamplingSettings:
    """What decides a set of samples (written to ``sampling.json``; a rerun into the same folder must match).

    ``sampler`` names a registered sampler used with its defaults (``None``: the run's recipe sampler and its
    settings); ``steps``, ``cfg_scale``, ``guidance_interval`` (``(low, high)``, guidance at ``low <= t <= high``,
    ``t = 1`` noise) and ``cfg_channels`` (an int, or ``"all"``) override the sampler's config when given.
    """

    num: int = 50_000
    """Number of samples (50,000 for FID-50K)."""
    seed: int = 0
    """Seed of the labels and of every sample's noise."""
    labels: str = "balanced"
    """``balanced``: every class equally often, shuffled (REPA-E's ``--label-sampling equal``); ``random``: uniform."""
    ema: bool = True
    """Use the EMA denoiser and normaliser (the raw weights otherwise)."""
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    cfg_channels: int | Literal["all"] | None = None

    def __post_init__(self) -> None:
        if self.num < 1:
            raise UserError(f"--num must be >= 1, got {self.num}")
        if self.labels not in LABEL_MODES:
            raise UserError(f"--labels {self.labels}: use one of {', '.join(LABEL_MODES)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if isinstance(self.cfg_channels, int) and self.cfg_channels < 1:
            raise UserError(f"--cfg-channels must be >= 1 or 'all', got {self.cfg_channels}")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.guidance_interval is not None:
            data["guidance_interval"] = list(self.guidance_interval)
        return data


def build_sampler(run: OpenedRun, settings: SamplingSettings, *, device: str = "cpu", registry: Any = None
                  ) -> tuple[str, Any]:
    """``(name, sampler)``: ``settings.sampler`` with its defaults, or the run's recipe sampler, with the settings'
    overrides (``steps``, ``cfg_scale``, ``guidance_interval``, ``cfg_channels``) applied to its config."""
    from repae.build import BuildContext, build_component, default_registry
    from repae.config import config_to_dict

    if settings.sampler is None:
        specs = run.recipe.get("sampler")
        if not specs:
            raise UserError("the run's recipe names no sampler: pass --sampler (euler-maruyama, the REPA-E evaluation "
                            "sampler, for SiT; ddpm for DiT; `repae list sampler` shows all)")
        entry, section = specs[0].entry, config_to_dict(specs[0].config)
    else:
        entry, section = (registry if registry is not None else default_registry()).get("sampler", settings.sampler), {}
    fields = {f.name for f in dataclasses.fields(entry.config) if f.init}
    changes: dict[str, Any] = {}
    if settings.steps is not None:
        changes["steps"] = settings.steps
    if settings.cfg_scale is not None:
        changes["cfg_scale"] = settings.cfg_scale
    if settings.guidance_interval is not None:
        changes["guidance_low"], changes["guidance_high"] = (float(v) for v in settings.guidance_interval)
    if settings.cfg_channels is not None:
        changes["cfg_channels"] = None if settings.cfg_channels == "all" else settings.cfg_channels
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise UserError(f"sampler {entry.name} has no setting {', '.join(unknown)} (its settings: "
                        f"{', '.join(sorted(fields))})")
    config, issues = entry.parse({**section, **changes})
    if issues:
        listed = "; ".join(f"{i.path}: {i.message}" for i in issues)
        raise UserError(f"sampler {entry.name}: {listed}")
    return entry.name, build_component(entry, config, BuildContext(device=device))


def resolved_settings(run: OpenedRun, settings: SamplingSettings, name: str, sampler: Any) -> dict[str, Any]:
    """What the settings resolve to for this run (compared when resuming): the settings themselves, plus checkpoint,
    step, the sampler's name and whole config (``sampler_config``; ``sampler`` is the settings' field) and the latent
    shape."""
    from repae.config import config_to_dict

    config = config_to_dict(sampler.config) if dataclasses.is_dataclass(getattr(sampler, "config", None)) else {}
    return {
        **settings.to_json(),
        "checkpoint": str(Path(run.checkpoint).resolve()),
        "step": run.step,
        "sampler_config": {"name": name, **config},
        "latent_shape": list(run.latent_shape()),
    }


def default_dirname(run: OpenedRun, name: str, config: Any, settings: SamplingSettings) -> str:
    """``<checkpoint>_<sampler>-<steps>_cfg<scale>[-<low>-<high>]_seed<seed>[_raw]``."""
    steps = getattr(config, "steps", None)
    parts = [Path(run.checkpoint).name, name if steps is None else f"{name}-{steps}"]
    scale = getattr(config, "cfg_scale", None)
    if scale is not None:
        low, high = getattr(config, "guidance_low", 0.0), getattr(config, "guidance_high", 1.0)
        parts.append(f"cfg{scale:g}" + ("" if (low, high) == (0.0, 1.0) else f"-{low:g}-{high:g}"))
    parts.append(f"seed{settings.seed}")
    if not settings.ema:
        parts.append("raw")
    return "_".join(parts)


def sample_run(
    run_path: str | Path,
    settings: SamplingSettings,
    *,
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    registry: Any = None,
    echo: Any = print,
) -> Path:
    """Make the samples ``settings`` describe from a run directory (its latest checkpoint) or a checkpoint folder;
    returns the output folder (default ``RUN/samples/<checkpoint>_<sampler>_<settings>``)."""
    import torch

    from repae.generate import generate, make_labels
    from repae.reporting import progress as progress_bar
    from repae.runs import open_run
    from repae.train import distributed

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if device != "auto":
        distributed.resolve_device(device)  # a clear error for CUDA on a machine without it

    topology = distributed.init(device)
    try:
        with progress_bar("sample: open the run", 1, unit="run", enabled=progress and topology.is_main,
                          transient=True) as opening:  # loading the checkpoint: seconds to minutes
            run = open_run(run_path, device=str(topology.device), use_ema=settings.ema, slots=SLOTS,
                           registry=registry)
            opening.advance(1)
        name, chosen = build_sampler(run, settings, device=str(topology.device), registry=registry)
        num_classes = int(getattr(run.denoiser, "num_classes", 1) or 1)
        resolved = resolved_settings(run, settings, name, chosen)
        folder = Path(out) if out is not None else run.run_dir / "samples" / default_dirname(run, name, chosen.config,
                                                                                               settings)
        _check_resumable(folder, resolved)
        distributed.barrier()
        if topology.is_main:
            (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            if not (folder / SETTINGS_FILE).is_file():
                write_json(folder / SETTINGS_FILE, {"settings": resolved, "status": "running",
                                                    "world_size": topology.world_size, "batch_size": batch_size})
        distributed.barrier()

        channels, h, w = run.latent_shape()
        f = int(run.tokenizer.downsample)
        size = (h * f, w * f)
        width = max(6, len(str(settings.num - 1)))

        def png(i: int) -> Path:
            return folder / IMAGES_DIR / f"{i:0{width}d}.png"

        mine = range(topology.rank, settings.num, topology.world_size)
        todo = [i for i in mine if not _valid_png(png(i), size)]
        all_labels = make_labels(settings.num, num_classes, mode=settings.labels, seed=settings.seed)
        label = "sample" if topology.world_size == 1 else f"sample (rank 0 of {topology.world_size})"
        started = time.perf_counter()
        if topology.is_main and todo:  # before a long job: how many, then (after the first batch) how long
            _note(_announce(settings.num, len(mine) - len(todo), len(todo), size, batch_size, topology.world_size))
        with progress_bar(label, len(mine), completed=len(mine) - len(todo), unit="img",
                          enabled=progress and topology.is_main and bool(todo)) as bar:
            for n, (batch, images) in enumerate(generate(run, all_labels, indices=todo, seed=settings.seed,
                                                         sampler=chosen, batch_size=batch_size,
                                                         device=topology.device)):
                for i, image in zip(batch, images):
                    write_png(image, png(i))
                bar.advance(len(batch))
                if n == 0 and topology.is_main and len(batch) < len(todo):
                    _note(_estimate(len(batch), time.perf_counter() - started, len(todo) - len(batch)))
        seconds = time.perf_counter() - started
        made = int(distributed.all_reduce_sum(torch.tensor([len(todo)], device=topology.device)).item())
        distributed.barrier()
        if topology.is_main:
            note = _finish(folder, resolved, [png(i) for i in range(settings.num)], size, made=made, seconds=seconds,
                           world=topology.world_size, batch_size=batch_size)
            echo(note)
            sheet = folder / CONTACT_SHEET
            rows = contact_sheet_rows(all_labels.tolist(), num_classes)
            if made or not sheet.is_file():
                write_contact_sheet(sheet, rows, png)
            echo(f"contact sheet: {sheet} ({_describe_sheet(rows)})")
        distributed.barrier()
        return folder
    finally:
        distributed.shutdown()


def _note(text: str) -> None:
    """A note on stderr (standard output holds the results; a terminal's progress bar stays below it)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _announce(num: int, made: int, todo: int, size: tuple[int, int], batch_size: int, world: int) -> str:
    share = f" ({todo:,} on this process of {world})" if world > 1 else ""
    already = f", {made:,} already made" if made else ""
    return (f"{num:,} samples of {size[0]}x{size[1]} px{already}{share}, in batches of {batch_size}: the time "
            "left is estimated after the first batch")


def _estimate(first: int, seconds: float, left: int) -> str:
    """The time the ``left`` samples will take at the first batch's pace (``first`` samples in ``seconds``; it
    includes warm-up, so the estimate errs long)."""
    return (f"first batch: {first} samples in {_duration(seconds)}; the remaining {left:,} need about "
            f"{_duration(seconds / first * left)} at this pace")


def _duration(seconds: float) -> str:
    """``"21 h 04 min"``, ``"3 min 20 s"``, ``"12.3 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes} min {int(round(seconds)) % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


# -- files -----------------------------------------------------------------------------------------------------------


def _check_resumable(out: Path, settings: dict[str, Any]) -> None:
    from repae.recipe import diff_keys, flatten_recipe

    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{path} is unreadable; delete it (and {out}/{IMAGES_DIR}) or choose another --out") from None
    if previous != settings:
        old, new = flatten_recipe(previous or {}), flatten_recipe(settings)
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff_keys(previous or {}, settings))
        raise UserError(f"{out} holds samples made with other settings ({changes}); choose another --out, or delete "
                        "the directory to start over")


def _valid_png(path: Path, size: tuple[int, int]) -> bool:
    """Whether ``path`` is an RGB PNG of ``size = (H, W)`` that decodes."""
    if not path.is_file():
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.format == "PNG" and image.mode == "RGB" and image.size == (size[1], size[0])
    except Exception:  # noqa: BLE001 - any decoding failure means: make this sample again
        return False


def _read_png(path: Path, size: tuple[int, int]) -> Any:
    from repae.images import UnreadableImage, decode_image

    try:
        array = decode_image(path)
    except UnreadableImage as exc:
        raise UnreadableImage.of(path, exc.reason, "delete it and rerun to make it again") from None
    if array.shape != (size[0], size[1], 3):
        raise UserError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected {size[1]}x{size[0]}; delete it and "
                        "rerun to make it again")
    return array


def write_npz(path: Path, images: Iterable[Any], shape: tuple[int, ...]) -> Path:
    """Write ``arr_0`` (uint8 ``shape``) to ``path`` as ``np.savez`` does (uncompressed zip, ZIP64), streaming the
    ``[H, W, 3]`` arrays of ``images`` in order instead of holding all of them (50,000 at 256 px are 9.8 GB)."""
    import zipfile

    import numpy as np

    count = 0
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                         "shape": tuple(shape)})
                for array in images:
                    f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
                    count += 1
        if count != shape[0]:
            raise RuntimeError(f"wrote {count} images for an array of {shape[0]}")
    return path


def _finish(out: Path, settings: dict[str, Any], pngs: list[Path], size: tuple[int, int], *, made: int,
            seconds: float, world: int, batch_size: int) -> str:
    """Rank 0: assemble samples.npz (unless it is complete and nothing new was made) and close sampling.json."""
    npz = out / NPZ_FILE
    meta_path = out / SETTINGS_FILE
    previous = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    missing = [p.name for p in pngs if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} sample(s) are missing in {out / IMAGES_DIR} (e.g. {missing[0]}); rerun the "
                        "command to make them")
    if made or not npz.is_file() or previous.get("status") != "done":
        write_npz(npz, _read_pngs(pngs, size), (len(pngs), size[0], size[1], 3))
        note = f"wrote {npz} ({len(pngs)} x {size[0]} x {size[1]} x 3)"
    else:
        note = f"nothing to do: {npz} is complete"
    write_json(meta_path, {"settings": settings, "status": "done", "npz": NPZ_FILE, "images": IMAGES_DIR,
                           "contact_sheet": CONTACT_SHEET,
                           "made_this_time": made, "world_size": world, "batch_size": batch_size,
                           "seconds_rank0": round(seconds, 3)})
    return f"{note}; settings in {meta_path}"


def _read_pngs(pngs: list[Path], size: tuple[int, int]) -> Iterator[Any]:
    for p in pngs:
        yield _read_png(p, size)


# -- the contact sheet -----------------------------------------------------------------------------------------------


def contact_sheet_rows(labels: Sequence[int], num_classes: int, *, classes: int = SHEET_CLASSES,
                       per_class: int = SHEET_PER_CLASS) -> list[tuple[int | None, list[int]]]:
    """The sample indices a contact sheet shows, row by row, as ``(class, [indices])``.

    Class-conditional (``num_classes > 1``): one row for each of the first ``classes`` classes, by id, that have
    samples, holding the first ``per_class`` samples of that class in index order (the same seed shows the same
    samples in the same places, checkpoint after checkpoint; with fewer samples of a class its row is shorter).
    Unconditional: the first ``classes * per_class`` samples, ``per_class`` to a row, class ``None``.
    """
    if num_classes <= 1:
        first = list(range(min(len(labels), classes * per_class)))
        return [(None, first[i:i + per_class]) for i in range(0, len(first), per_class)]
    rows: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        row = rows.setdefault(int(label), [])
        if len(row) < per_class:
            row.append(index)
    return [(label, rows[label]) for label in sorted(rows)[:classes]]


def _describe_sheet(rows: Sequence[tuple[int | None, list[int]]]) -> str:
    count = sum(len(indices) for _, indices in rows)
    if not rows or rows[0][0] is None:
        return f"the first {count} samples"
    first, last = rows[0][0], rows[-1][0]
    return f"{count} samples: one row for each of the classes {first}..{last}" if len(rows) > 1 else \
        f"{count} samples of class {first}"


def image_grid(rows: Sequence[Sequence[Any]], *, labels: Sequence[str] | None = None,
               min_width: int = GRID_MIN_WIDTH, min_columns: int = 1, padding: int = 2, background: int = 255) -> Any:
    """A PIL image of uint8 ``[H, W, 3]`` arrays laid out in ``rows`` (all of one size) on ``max(longest row,
    min_columns)`` columns (short rows leave their last cells empty), each row labelled on the left with ``labels[r]``
    when given. Tiles are scaled up by the smallest whole factor that makes the columns at least ``min_width`` pixels
    wide (nearest neighbour: pixels stay sharp; tiles that wide already are left as they are)."""
    import numpy as np
    from PIL import Image, ImageFont

    nearest = getattr(Image, "Resampling", Image).NEAREST  # Pillow >= 9.1 (Image.NEAREST before)
    tiles = [np.asarray(t, dtype=np.uint8) for row in rows for t in row]
    if not tiles:
        raise ValueError("image_grid: no images")
    h, w = tiles[0].shape[:2]
    columns = max(min_columns, *(len(row) for row in rows))
    scale = max(1, -(-min_width // (columns * w)))  # ceil
    th, tw = h * scale, w * scale
    text_scale = max(1, min(4, th // 40))
    font = ImageFont.load_default()
    rendered = [_text(label, text_scale, font, nearest) for label in labels] if labels is not None else []
    margin = max((r.width for r in rendered), default=0) + (2 * padding * text_scale if rendered else 0)
    sheet = Image.new("RGB", (margin + padding + columns * (tw + padding), padding + len(rows) * (th + padding)),
                      (background,) * 3)
    for r, row in enumerate(rows):
        top = padding + r * (th + padding)
        for c, tile in enumerate(row):
            image = Image.fromarray(np.asarray(tile, dtype=np.uint8))
            if scale > 1:
                image = image.resize((tw, th), nearest)
            sheet.paste(image, (margin + padding + c * (tw + padding), top))
        if rendered:
            text = rendered[r]
            sheet.paste((0, 0, 0), (padding * text_scale, top + (th - text.height) // 2), mask=text)
    return sheet


def _text(label: str, scale: int, font: Any, nearest: Any) -> Any:
    """``label`` as a mask (mode L, text 255) in ``font``, scaled up ``scale`` times (nearest neighbour)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), label, font=font)
    mask = Image.new("L", (max(1, int(right - left)), max(1, int(bottom - top))), 0)
    ImageDraw.Draw(mask).text((-left, -top), label, fill=255, font=font)
    return mask.resize((mask.width * scale, mask.height * scale), nearest) if scale > 1 else mask


def write_contact_sheet(path: Path, rows: Sequence[tuple[int | None, list[int]]], png: Any) -> Path:
    """Draw the :func:`contact_sheet_rows` of a sample folder (``png(i)``: the file of sample ``i``) to ``path``
    (atomically): one row per class, labelled ``class N``, scaled up to at least :data:`GRID_MIN_WIDTH` pixels."""
    from repae.images import decode_image

    grid = [[decode_image(png(i)) for i in indices] for _, indices in rows]
    labels = None if not rows or rows[0][0] is None else [f"class {label}" for label, _ in rows]
    picture = image_grid(grid, labels=labels, min_columns=SHEET_PER_CLASS)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path
