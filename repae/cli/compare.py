"""``repae compare``: runs side by side, the recipe keys that differ beside their metrics."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from repae.cli._common import plain_table, stdout, user_errors


def compare(
    runs: List[Path] = typer.Argument(..., show_default=False,
                                      help="Run directories (a `repae sweep` directory stands for its points)."),
    metric: Optional[List[str]] = typer.Option(
        None, "--metric", "-m", help="Metric columns, glob patterns (repeatable): 'denoiser/*', 'eval/fid', "
        "'*grad_norm'. Default: the loss terms, eval/* and analysis/*."
    ),
    all_keys: bool = typer.Option(False, "--all-keys", help="Show every recipe key, not only those that differ."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown to FILE."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write the table as CSV (full precision) to FILE."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw training curves to FILE.png."),
    curve: Optional[List[str]] = typer.Option(
        None, "--curve", help="Terms to plot (repeatable; default denoiser/diffusion and denoiser/repa)."
    ),
) -> None:
    """Tabulate runs: the recipe keys that differ, the last logged step, the last loss values, eval.json (FID, IS,
    ...) and analysis.json (latent diagnostics); optionally as Markdown, CSV and a PNG of the training curves."""
    from repae.compare import DEFAULT_CURVES, compare_runs, plot_curves

    console = stdout()
    with user_errors():
        comparison = compare_runs(runs, metrics=metric or [], all_keys=all_keys)
        console.print(_table(comparison, console.width))
        if len(comparison.runs) > 1 and not comparison.keys and not all_keys:
            console.print("[dim]the runs' recipes are identical[/]")
        for path, text in ((markdown, comparison.to_markdown), (csv, comparison.to_csv)):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text(), encoding="utf-8")
                console.print(f"wrote {path}", markup=False)
        if plot is not None:
            plot_curves(comparison.runs, curve or list(DEFAULT_CURVES), plot)
            console.print(f"wrote {plot}", markup=False)


def _table(comparison, width: int):
    """One row per run when that fits the terminal, else one column per run (a field per row)."""
    header, rows = comparison.header, comparison.rows()
    natural = sum(max(len(c) for c in column) + 3 for column in zip(header, *rows)) + 1
    table = plain_table(title=f"{len(rows)} run(s)", header_style="bold")
    if natural <= width:
        for i, column in enumerate(header):
            table.add_column(column, justify="right" if i > len(comparison.keys) else "left", overflow="fold")
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("", style="bold", overflow="fold")
    for row in rows:
        table.add_column(row[0], justify="right", overflow="fold")
    for i, field in enumerate(header[1:], 1):
        table.add_row(field, *(row[i] for row in rows), end_section=i in (len(comparison.keys), len(comparison.keys) + 1))
    return table
