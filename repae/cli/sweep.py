"""``repae sweep``: train a recipe over a grid of override values, one run directory per point."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from repae.cli._choices import DEVICE_OPTION, choice
from repae.cli._common import load_host, plain_table, stdout, user_errors
from repae.cli.recipe import RECIPE_ARG
from repae.errors import RecipeError
from repae.sweep import LAUNCHERS

SWEEP_ARGS = typer.Argument(
    None, show_default=False,
    help="KEY.PATH=A,B,C (an axis: values split on commas outside brackets and quotes, each read as YAML) or "
         "KEY.PATH=VALUE (applied to every point).",
)


def sweep(
    recipe: Path = RECIPE_ARG,
    args: Optional[List[str]] = SWEEP_ARGS,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep directory (default: runs/<recipe>-sweep)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the points and validate every one; train nothing."),
    launcher: str = typer.Option(
        "in-process", "--launcher", help="in-process: the points one after another in this process; torchrun: one "
        "`torchrun ... -m repae run` job per point.", **choice(LAUNCHERS),
    ),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Processes per point (with --launcher torchrun)."),
    torchrun_args: str = typer.Option(
        "", "--torchrun-args", help="More torchrun options, one string, e.g. '--nnodes 2 --rdzv-endpoint host:29500'."
    ),
    device: str = DEVICE_OPTION,
    keep_going: bool = typer.Option(False, "--keep-going", help="Go on with the next point when one fails."),
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change", help="Continue points whose directory holds another recipe (e.g. more "
        "trainer.steps); the old recipe is kept as recipe.previous-N.yaml."
    ),
) -> None:
    """Train RECIPE at every point of a grid: `repae sweep RECIPE key=a,b,c key2=x,y key3=v`. Run it again to
    skip finished points and resume unfinished ones; `repae compare OUT` tabulates the results."""
    from repae.sweep import plan_sweep, run_sweep

    console = stdout()
    with user_errors():
        host = load_host()
        plan = plan_sweep(recipe, args or [], host.registry, out, allow_recipe_change=allow_recipe_change)
        if dry_run:
            console.print(_points_table(plan))
            if plan.problems:
                raise RecipeError(plan.problems, title=f"invalid sweep ({len(plan.points)} point(s))")
            console.print(f"[green]ok[/] {len(plan.points)} point(s) valid; they would be written under {plan.out}/ "
                          f"[dim](dry run: nothing was written or trained)[/]")
            return
        try:
            run_sweep(plan, launcher=launcher, nproc_per_node=nproc_per_node, torchrun_args=torchrun_args,
                      device=device, keep_going=keep_going, echo=lambda text: console.print(text, markup=False))
        finally:
            if any(p.status != "pending" for p in plan.points):
                console.print(_points_table(plan))
        failed = [p.name for p in plan.points if p.status != "done"]
        if failed:
            console.print(f"[red]{len(failed)} point(s) failed[/]: {', '.join(failed)} (errors in {plan.out}/sweep.json)")
            raise typer.Exit(1)
        console.print(f"done: {plan.out}  (compare them: repae compare {plan.out})")


def _points_table(plan):
    table = plain_table(title=f"sweep of {plan.recipe}: {len(plan.points)} point(s) in {plan.out}/",
                        header_style="bold")
    for column in ("point", *(a.key for a in plan.args.axes), "state"):
        table.add_column(column, overflow="fold")
    for point in plan.points:
        if point.status in ("failed", "interrupted"):
            state = point.status
        elif point.step is None:
            state = "new" if point.status == "pending" else point.status
        elif point.steps is not None and point.step >= point.steps:
            state = f"done ({point.step})"
        else:
            state = f"step {point.step}/{point.steps if point.steps is not None else '?'}"
        table.add_row(point.name, *(point.texts[a.key] for a in plan.args.axes), state)
    return table
