"""``repae analyze``: the paper's latent diagnostics of a trained run on a batch of images (see docs/analysis.md and
:mod:`repae.analysis`).

Writes ``analysis.json`` (spatial variance and total variation of the latents, CKNNA between the denoiser's hidden
tokens and the encoder's tokens, PSNR of reconstructions, rFID when the evaluation package can compute it) and two
pictures: ``latent_pca.png`` (inputs over the latents' first three principal components as RGB) and
``reconstructions.png`` (inputs over reconstructions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from repae.cli._choices import DEVICE_OPTION
from repae.cli._common import load_host, plain_table, print_json, stdout, user_errors
from repae.cli._pickle import TRUST_PICKLE_OPTION, pickle_trust

RUN_ARG = typer.Argument(
    ..., help="Run directory (its latest checkpoint) or one checkpoint folder.", metavar="RUN_OR_CHECKPOINT",
    show_default=False,
)


def analyze(
    run_path: Path = RUN_ARG,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN/analysis/step-NNNNNNN); files in it are replaced."
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Folder of images to analyse instead of the run's dataset (prepared as the dataset "
        "prepares its images)."
    ),
    num_images: int = typer.Option(256, "--num-images", "-n", help="Images analysed (spread over the set: one drawn in each of N equal strides)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per forward pass."),
    t: float = typer.Option(0.5, "--t", help="Diffusion time of the CKNNA features (1 = noise)."),
    k: int = typer.Option(10, "--k", help="Nearest neighbours of CKNNA (capped at images - 1)."),
    depth: Optional[int] = typer.Option(
        None, "--depth", help="Denoiser block whose tokens CKNNA uses (default: the depth the run's losses align)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the diffusion noise of the CKNNA features."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA denoiser and latent normaliser (default)."),
    device: str = DEVICE_OPTION,
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights", help="Inception weights for the rFID (default: as `repae eval` finds them, "
        "never downloaded here); without them rfid is null."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print analysis.json's content as JSON instead of the table (alone on standard output)."
    ),
    trust_pickle: bool = TRUST_PICKLE_OPTION,
) -> None:
    """Latent diagnostics of a run: spatial variance, total variation, CKNNA, PSNR (rFID), PCA picture."""
    from repae.analysis import AnalysisSettings, analyze_run

    console = stdout()
    with user_errors(), pickle_trust(trust_pickle):
        settings = AnalysisSettings(num_images=num_images, images=str(images) if images is not None else None, t=t,
                                    k=k, depth=depth, seed=seed, ema=ema)
        from repae.cli._preflight import check_positive
        from repae.errors import UserError
        from repae.runs import run_recipe_path

        check_positive(batch_size=batch_size)
        run_recipe_path(run_path)  # the run, its checkpoint and recipe.yaml, before torch is imported
        if images is not None and not images.is_dir():
            raise UserError(f"--images {images}: not a folder; pass a folder holding image files")
        result = analyze_run(run_path, settings, out=out, batch_size=batch_size, device=device,
                             inception_weights=inception_weights, registry=load_host().registry)
        if as_json:
            print_json(result)
            return
        table = plain_table(title=f"analysis of step {result['step']} ({result['num_images']} images)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("spatial_variance", "total_variation", "cknna", "psnr", "rfid"):
            value = result[key]
            table.add_row(key, "-" if value is None else f"{value:.4g}")
        console.print(table)
        for key in ("cknna", "rfid"):
            if result[key] is None and result.get(f"{key}_reason"):
                reason = result[f"{key}_reason"].split(". ")[0]
                console.print(f"[dim]{key} not computed: {reason} (see {key}_reason in analysis.json)[/]",
                              markup=True, highlight=False)
        console.print(f"wrote {result['files']['analysis']} and its pictures")
