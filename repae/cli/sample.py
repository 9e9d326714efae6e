"""``repae sample``: images from a trained run, as PNG files and an ADM-format ``samples.npz`` (see
:mod:`repae.sampling`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Tuple

import typer

from repae.cli._common import load_host, stdout, user_errors
from repae.cli._pickle import TRUST_PICKLE_OPTION, pickle_trust
from repae.errors import UserError


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
    trust_pickle: bool = TRUST_PICKLE_OPTION,
) -> None:
    """Generate samples from a run: PNGs plus DIR/samples.npz (ADM format); torchrun shards them; reruns resume."""
    from repae.sampling import SamplingSettings, sample_run

    with user_errors(), pickle_trust(trust_pickle):
        host = load_host()
        settings = SamplingSettings(
            num=num, seed=seed, labels=labels, ema=not no_ema, sampler=sampler, steps=steps,
            cfg_scale=cfg, cfg_channels=_parse_channels(cfg_channels) if cfg_channels is not None else None,
            guidance_interval=(float(guidance_interval[0]), float(guidance_interval[1]))
            if guidance_interval is not None else None,
        )
        console = stdout()
        sample_run(run_path, settings, out=out, batch_size=batch_size, device=device, progress=progress,
                   registry=host.registry, echo=lambda text: console.print(text, markup=False))


def _parse_channels(value: str) -> int | Literal["all"]:
    if value.strip().lower() in ("all", "none", "null"):
        return "all"
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--cfg-channels {value}: give a number of channels (e.g. 3) or 'all'") from None


