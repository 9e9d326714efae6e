"""``repae export``: a run's models in a format one of its components declares (the built-in VAEs: ``diffusers``,
``ldm``; SiT/DiT: ``official``) or repae's own ``safetensors`` (see :mod:`repae.export` and docs/analysis.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from repae.cli._common import load_host, plain_table, stdout, user_errors
from repae.cli._pickle import TRUST_PICKLE_OPTION, pickle_trust

RUN_ARG = typer.Argument(
    ..., help="Run directory (its latest checkpoint) or one checkpoint folder.", metavar="RUN_OR_CHECKPOINT",
    show_default=False,
)


def export(
    run_path: Path = RUN_ARG,
    fmt: str = typer.Option(
        ..., "--format", "-f", help="A format the run's components declare (built-in VAEs: diffusers, ldm; SiT/DiT: "
        "official) or safetensors (every model's state dict); an unknown one lists the run's formats.",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (must be empty or new).", show_default=False),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty --out (files of the same names are replaced)."
    ),
    trust_pickle: bool = TRUST_PICKLE_OPTION,
) -> None:
    """Export a run's trained models with their latent statistics and an export.json manifest (sha256 per file)."""
    from repae.export import export_run

    console = stdout()
    with user_errors(), pickle_trust(trust_pickle):
        # export_run checks the request first, from files alone (check_export_request: torch-free, nothing built)
        manifest = export_run(run_path, out, fmt, force=force, registry=load_host().registry)
        table = plain_table(title=f"{fmt} export of step {manifest['step']} -> {out}")
        for column in ("file", "bytes", "sha256"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for name, info in manifest["files"].items():
            table.add_row(name, f"{info['bytes']:,}", info["sha256"][:16])
        console.print(table)
        latents = manifest["latents"]
        console.print(f"latent statistics: {latents['source']} (scaling_factor {latents['scaling_factor']})",
                      markup=False)
