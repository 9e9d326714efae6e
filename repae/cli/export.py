"""``repae export``: a run's tokenizer as a diffusers ``AutoencoderKL`` folder or LDM-layout safetensors, or its
denoisers in the official SiT layout (see :mod:`repae.export` and docs/analysis.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from repae.cli._common import plain_table, stdout, user_errors

RUN_ARG = typer.Argument(
    ..., help="Run directory (its latest checkpoint) or one checkpoint folder.", metavar="RUN_OR_CHECKPOINT",
    show_default=False,
)


def export(
    run_path: Path = RUN_ARG,
    fmt: str = typer.Option(
        ..., "--format", "-f", help="diffusers (AutoencoderKL folder), ldm (VAE + latent stats safetensors) or "
        "safetensors (denoiser and EMA denoiser, official layout, plus the tokenizer).", show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (must be empty or new).", show_default=False),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty --out (files of the same names are replaced)."
    ),
) -> None:
    """Export a run's trained models with their latent statistics and an export.json manifest (sha256 per file)."""
    from repae.export import export_run

    console = stdout()
    with user_errors():
        manifest = export_run(run_path, out, fmt, force=force)
        table = plain_table(title=f"{fmt} export of step {manifest['step']} -> {out}")
        for column in ("file", "bytes", "sha256"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for name, info in manifest["files"].items():
            table.add_row(name, f"{info['bytes']:,}", info["sha256"][:16])
        console.print(table)
        latents = manifest["latents"]
        console.print(f"latent statistics: {latents['source']} (scaling_factor {latents['scaling_factor']})")
