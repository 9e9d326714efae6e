"""``repae sample``: images from a trained run, as PNG files and an ADM-format ``samples.npz``.

Sample ``i`` always gets the same label and noise (from ``--seed`` and ``i`` alone), so the result does not depend on
the batch size or the number of processes. Under ``torchrun`` rank ``r`` of ``W`` makes the indices ``i = r mod W``.
PNGs are written as they are made (``DIR/images/000000.png`` ...); a rerun skips those that decode, so an
interrupted run resumes. At the end rank 0 assembles ``DIR/samples.npz`` (``arr_0``: uint8 ``N x H x W x 3`` in index
order, streamed to disk) and records the settings in ``DIR/sampling.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import typer

from repae.cli._common import pick_device, stdout, user_errors
from repae.errors import UserError

SETTINGS_FILE = "sampling.json"
NPZ_FILE = "samples.npz"
IMAGES_DIR = "images"
SLOTS = ("tokenizer", "encoders", "latent_norm", "denoiser", "sampler")
"""What sampling builds (encoders only because a denoiser may take its projector widths from them; no dataset)."""


def sample(
    run_path: Path = typer.Argument(
        ..., metavar="RUN_OR_CHECKPOINT",
        help="A run directory (its latest checkpoint) or one of its checkpoints/step-* folders.",
    ),
    num: int = typer.Option(
        50_000, "--num", "-n", "--num-samples",
        help="Number of samples (50,000 for FID-50K). Under torchrun write -n or --num-samples (torchrun takes --num).",
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the sampler's config)."),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", help="A registered sampler (euler, heun, euler-maruyama, ddpm) with its defaults; "
        "default: the run's recipe sampler and its settings.",
    ),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (1 = none)."),
    guidance_interval: Optional[Tuple[float, float]] = typer.Option(
        None, "--guidance-interval", metavar="LOW HIGH",
        help="Guide only at times LOW <= t <= HIGH (t = 1 is noise; REPA-E SD-VAE: 0 0.65).",
    ),
    cfg_channels: Optional[str] = typer.Option(
        None, "--cfg-channels", help="Guide only the first N latent channels (3: the DiT/SiT convention), or 'all'.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output directory (default: RUN/samples/<checkpoint>_<sampler>_<settings>).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per batch, per process."),
    seed: int = typer.Option(0, "--seed", help="Seed of the labels and of every sample's noise."),
    labels: str = typer.Option(
        "balanced", "--labels", help="balanced (equal count per class, shuffled) or random (uniform draws).",
    ),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw denoiser (and normaliser) weights, not the EMA."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu, cuda, cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (rank 0)."),
) -> None:
    """Generate samples from a run: PNGs plus DIR/samples.npz (ADM format); torchrun shards them; reruns resume."""
    with user_errors():
        sample_run(
            run_path, num=num, steps=steps, sampler=sampler, cfg=cfg, guidance_interval=guidance_interval,
            cfg_channels=cfg_channels, out=out, batch_size=batch_size, seed=seed, labels=labels, use_ema=not no_ema,
            device=device, progress=progress,
        )


def sample_run(
    run_path: Path,
    *,
    num: int = 50_000,
    steps: int | None = None,
    sampler: str | None = None,
    cfg: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: str | int | None = None,
    out: Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
    labels: str = "balanced",
    use_ema: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """``repae sample`` without the Typer layer; returns the output directory."""
    import torch

    from repae.generate import LABEL_MODES, generate, make_labels
    from repae.runs import open_run
    from repae.train import distributed

    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if labels not in LABEL_MODES:
        raise UserError(f"--labels {labels}: use one of {', '.join(LABEL_MODES)}")
    if device != "auto":
        pick_device(device)  # a clear error for CUDA on a machine without it

    topology = distributed.init(device)
    try:
        run = open_run(run_path, device=str(topology.device), use_ema=use_ema, slots=SLOTS)
        name, chosen = build_sampler(run, sampler, steps=steps, cfg=cfg, guidance_interval=guidance_interval,
                                     cfg_channels=cfg_channels, device=str(topology.device))
        num_classes = int(getattr(run.denoiser, "num_classes", 1) or 1)
        settings = sampling_settings(run, name, chosen, num=num, seed=seed, labels=labels, use_ema=use_ema)
        out = Path(out) if out is not None else run.run_dir / "samples" / default_dirname(run, name, chosen.config,
                                                                                            seed, use_ema)
        _check_resumable(out, settings)
        distributed.barrier()
        if topology.is_main:
            (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
            if not (out / SETTINGS_FILE).is_file():
                _write_json(out / SETTINGS_FILE, {"settings": settings, "status": "running",
                                                  "world_size": topology.world_size, "batch_size": batch_size})
        distributed.barrier()

        channels, h, w = run.latent_shape()
        f = int(getattr(run.tokenizer, "downsample", 1))
        size = (h * f, w * f)
        width = max(6, len(str(num - 1)))
        png = lambda i: out / IMAGES_DIR / f"{i:0{width}d}.png"  # noqa: E731
        mine = range(topology.rank, num, topology.world_size)
        todo = [i for i in mine if not _valid_png(png(i), size)]
        all_labels = make_labels(num, num_classes, mode=labels, seed=seed)

        bar = _Bar(len(mine), len(mine) - len(todo), enabled=progress and topology.is_main,
                   world=topology.world_size)
        started = time.perf_counter()
        try:
            for batch, images in generate(run, all_labels, indices=todo, seed=seed, sampler=chosen,
                                          batch_size=batch_size, device=topology.device):
                for i, image in zip(batch, images):
                    _save_png(image, png(i))
                bar.advance(len(batch))
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        made = int(distributed.all_reduce_sum(torch.tensor([len(todo)], device=topology.device)).item())
        distributed.barrier()
        if topology.is_main:
            _finish(out, settings, [png(i) for i in range(num)], size, made=made, seconds=seconds,
                    world=topology.world_size, batch_size=batch_size)
        distributed.barrier()
        return out
    finally:
        distributed.shutdown()


# -- the sampler -----------------------------------------------------------------------------------------------------


def build_sampler(
    run: Any,
    name: str | None,
    *,
    steps: int | None = None,
    cfg: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cfg_channels: str | int | None = None,
    device: str = "cpu",
) -> tuple[str, Any]:
    """``(name, sampler)``: ``name`` with its defaults, or the run's recipe sampler, with the command-line values."""
    import dataclasses

    from repae.build import BuildContext, build_component
    from repae.config import config_to_dict
    from repae.plugins import load_plugins

    if name is None:
        specs = run.recipe.get("sampler")
        if not specs:
            raise UserError("the run's recipe names no sampler: pass --sampler (euler-maruyama, the REPA-E evaluation "
                            "sampler, for SiT; ddpm for DiT; `repae list sampler` shows all)")
        entry, section = specs[0].entry, config_to_dict(specs[0].config)
    else:
        entry, section = load_plugins().registry.get("sampler", name), {}
    fields = {f.name for f in dataclasses.fields(entry.config) if f.init}
    changes: dict[str, Any] = {}
    if steps is not None:
        changes["steps"] = steps
    if cfg is not None:
        changes["cfg_scale"] = cfg
    if guidance_interval is not None:
        changes["guidance_low"], changes["guidance_high"] = (float(v) for v in guidance_interval)
    if cfg_channels is not None:
        changes["cfg_channels"] = _parse_channels(cfg_channels)
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise UserError(f"sampler {entry.name} has no setting {', '.join(unknown)} (its settings: "
                        f"{', '.join(sorted(fields))})")
    config, issues = entry.parse({**section, **changes})
    if issues:
        listed = "; ".join(f"{i.path}: {i.message}" for i in issues)
        raise UserError(f"sampler {entry.name}: {listed}")
    return entry.name, build_component(entry, config, BuildContext(device=device))


def _parse_channels(value: str | int) -> int | None:
    if isinstance(value, int):
        return value
    if value.strip().lower() in ("all", "none", "null"):
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--cfg-channels {value}: give a number of channels (e.g. 3) or 'all'") from None


def sampling_settings(run: Any, name: str, sampler: Any, *, num: int, seed: int, labels: str,
                      use_ema: bool) -> dict[str, Any]:
    """What decides the samples (compared when resuming): checkpoint, weights, sampler, count, labels, seed."""
    from repae.config import config_to_dict

    config = config_to_dict(sampler.config) if hasattr(sampler, "config") else {}
    return {
        "checkpoint": str(Path(run.checkpoint).resolve()),
        "step": run.step,
        "ema": use_ema,
        "sampler": {"name": name, **config},
        "cfg_scale": config.get("cfg_scale"),
        "guidance_interval": [config.get("guidance_low"), config.get("guidance_high")],
        "num": num,
        "labels": labels,
        "seed": seed,
        "latent_shape": list(run.latent_shape()),
    }


def default_dirname(run: Any, name: str, config: Any, seed: int, use_ema: bool) -> str:
    """``<checkpoint>_<sampler>-<steps>_cfg<scale>[-<low>-<high>]_seed<seed>[_raw]``."""
    steps = getattr(config, "steps", None)
    parts = [Path(run.checkpoint).name, name if steps is None else f"{name}-{steps}"]
    scale = getattr(config, "cfg_scale", None)
    if scale is not None:
        low, high = getattr(config, "guidance_low", 0.0), getattr(config, "guidance_high", 1.0)
        parts.append(f"cfg{scale:g}" + ("" if (low, high) == (0.0, 1.0) else f"-{low:g}-{high:g}"))
    parts.append(f"seed{seed}")
    if not use_ema:
        parts.append("raw")
    return "_".join(parts)


# -- files -----------------------------------------------------------------------------------------------------------


def _check_resumable(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{path} is unreadable; delete it (and {out}/{IMAGES_DIR}) or choose another --out") from None
    if previous != settings:
        old, new = _flatten(previous or {}), _flatten(settings)
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
        raise UserError(f"{out} holds samples made with other settings ({changes}); choose another --out, or delete "
                        "the directory to start over")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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


def _save_png(image: Any, path: Path) -> None:
    """A uint8 ``[3, H, W]`` tensor to ``path``, atomically (a partial file never carries the final name)."""
    from PIL import Image

    array = image.permute(1, 2, 0).contiguous().numpy()
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array, mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


def _read_png(path: Path, size: tuple[int, int]) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.shape != (size[0], size[1], 3):
        raise UserError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected {size[1]}x{size[0]}; delete it and "
                        "rerun to make it again")
    return array


def write_npz(path: Path, images: Any, shape: tuple[int, ...]) -> Path:
    """Write ``arr_0`` (uint8 ``shape``) to ``path`` as ``np.savez`` does (uncompressed zip, ZIP64), streaming the
    ``[H, W, 3]`` arrays of ``images`` in order instead of holding all of them (50,000 at 256 px are 9.8 GB)."""
    import zipfile

    import numpy as np

    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
            for array in images:
                f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
                count += 1
    if count != shape[0]:
        tmp.unlink()
        raise RuntimeError(f"wrote {count} images for an array of {shape[0]}")
    os.replace(tmp, path)
    return path


def _finish(out: Path, settings: dict[str, Any], pngs: List[Path], size: tuple[int, int], *, made: int,
            seconds: float, world: int, batch_size: int) -> None:
    """Rank 0: assemble samples.npz (unless it is complete and nothing new was made) and close sampling.json."""
    npz = out / NPZ_FILE
    meta_path = out / SETTINGS_FILE
    previous = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    missing = [p.name for p in pngs if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} sample(s) are missing in {out / IMAGES_DIR} (e.g. {missing[0]}); rerun the "
                        "command to make them")
    console = stdout()
    if made or not npz.is_file() or previous.get("status") != "done":
        write_npz(npz, (_read_png(p, size) for p in pngs), (len(pngs), size[0], size[1], 3))
        note = f"wrote {npz} ({len(pngs)} x {size[0]} x {size[1]} x 3)"
    else:
        note = f"nothing to do: {npz} is complete"
    _write_json(meta_path, {"settings": settings, "status": "done", "npz": NPZ_FILE, "images": IMAGES_DIR,
                            "made_this_time": made, "world_size": world, "batch_size": batch_size,
                            "seconds_rank0": round(seconds, 3)})
    console.print(f"{note}; settings in {meta_path}")


class _Bar:
    """A rich progress bar over this rank's share (rank 0 only), with images per second."""

    def __init__(self, total: int, done: int, *, enabled: bool, world: int) -> None:
        self.enabled = enabled and total > done
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        label = "sample" if world == 1 else f"sample (rank 0 of {world})"
        self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                             transient=False)
        self._task = self._bar.add_task(label, total=total, completed=done, speed="")
        self._started, self._made = time.perf_counter(), 0
        self._bar.start()

    def advance(self, n: int) -> None:
        if self.enabled:
            self._made += n
            rate = self._made / max(time.perf_counter() - self._started, 1e-9)
            self._bar.update(self._task, advance=n, speed=f"{rate:.2f} img/s")

    def close(self) -> None:
        if self.enabled:
            self._bar.stop()
