"""``repae sample``: images from a trained run, as PNG files and an ADM-format ``samples.npz`` (see
:mod:`repae.sampling`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Optional, Tuple

import typer

from repae.cli._choices import DEVICE_OPTION, check_component, choice, component_names
from repae.cli._common import load_host, print_json, stderr, stdout, user_errors
from repae.cli._pickle import TRUST_PICKLE_OPTION, pickle_trust
from repae.generate import LABEL_MODES


def sample(
    run_path: Path = typer.Argument(
        ..., metavar="RUN_OR_CHECKPOINT",
        help="A run directory (its latest checkpoint) or one of its checkpoints/step-* folders.",
    ),
    num: int = typer.Option(
        50_000, "--num", "-n", "--num-samples",
        help="Number of samples. The default, 50,000, is the 50K of the paper's evaluation (FID-50K): a long job (hours; "
        "about a day on a CPU for an XL model); the count and, after the first batch, an estimate of the time are printed on stderr "
        "(-n 64 for a look). Under torchrun write -n or --num-samples (torchrun takes --num).",
    ),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampler steps (default: the sampler's config)."),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", metavar="NAME", autocompletion=component_names("sampler"), show_default=False,
        help="A registered sampler with its defaults (built in: euler, heun, euler-maruyama, ddpm; `repae list "
        "sampler` lists all). Default: the run's recipe sampler and its settings.",
    ),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (1 = none)."),
    guidance_interval: Optional[Tuple[float, float]] = typer.Option(
        None, "--guidance-interval", metavar="LOW HIGH",
        help="Guide only at times LOW <= t <= HIGH (t = 1 is noise; REPA-E SD-VAE: 0 0.65).",
    ),
    cfg_channels: Optional[str] = typer.Option(
        None, "--cfg-channels", help="Guide only the first N latent channels (3: the DiT/SiT convention), or all.",
        show_default=False,
        **choice(("all",), patterns=[("N", r"[1-9][0-9]*")], explain="N: a number of channels, >= 1"),
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output directory (default: RUN/samples/<checkpoint>_<sampler>_<settings>).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Samples per batch, per process."),
    seed: int = typer.Option(0, "--seed", help="Seed of the labels and of every sample's noise."),
    labels: str = typer.Option(
        "balanced", "--labels", help="balanced: equal count per class, shuffled; random: uniform draws.",
        **choice(LABEL_MODES),
    ),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw denoiser (and normaliser) weights, not the EMA."),
    device: str = DEVICE_OPTION,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (rank 0)."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the output folder, its files and sampling.json's content as one JSON object "
        "(alone on standard output; notes and progress go to stderr)."
    ),
    trust_pickle: bool = TRUST_PICKLE_OPTION,
) -> None:
    """Generate samples from a run: PNGs plus DIR/samples.npz (ADM format); torchrun shards them; reruns resume."""
    from repae.sampling import SamplingSettings, sample_run

    with user_errors(), pickle_trust(trust_pickle):
        host = load_host()
        if sampler is not None:
            check_component(host.registry, "sampler", sampler, "--sampler")
        settings = SamplingSettings(
            num=num, seed=seed, labels=labels, ema=not no_ema, sampler=sampler, steps=steps,
            cfg_scale=cfg, cfg_channels=_channels(cfg_channels),
            guidance_interval=(float(guidance_interval[0]), float(guidance_interval[1]))
            if guidance_interval is not None else None,
        )
        from repae.cli._preflight import check_positive
        from repae.runs import run_recipe_path

        check_positive(batch_size=batch_size)
        run_recipe_path(run_path)  # the run, its checkpoint and recipe.yaml, before torch is imported
        console = stderr() if as_json else stdout()
        console.soft_wrap = True  # paths stay whole (copy-pasteable)
        folder = sample_run(run_path, settings, out=out, batch_size=batch_size, device=device, progress=progress,
                            registry=host.registry, echo=lambda text: console.print(text, markup=False))
        if as_json and os.environ.get("RANK", "0") == "0":  # under torchrun process 0 speaks for all
            print_json(_summary(folder))


def _summary(folder: Path) -> dict:
    """``repae sample --json``: what ``sampling.json`` records, with its file names as paths, and the folder."""
    from repae.sampling import SETTINGS_FILE

    record = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
    paths = {key: str(folder / record[key]) for key in ("npz", "images", "contact_sheet") if key in record}
    return {"out": str(folder), "sampling_json": str(folder / SETTINGS_FILE), **record, **paths}


def _channels(value: str | None) -> int | Literal["all"] | None:
    """``--cfg-channels`` as the parser checked it: ``None``, ``"all"`` or a number of channels."""
    if value is None:
        return None
    return "all" if value == "all" else int(value)


