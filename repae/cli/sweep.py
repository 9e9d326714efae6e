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


def _point_state(point) -> str:
    if point.status in ("failed", "interrupted"):
        return point.status
    if point.step is None:
        return "new" if point.status == "pending" else point.status
    if point.steps is not None and point.step >= point.steps:
        return f"done ({point.step})"
    return f"step {point.step}/{point.steps if point.steps is not None else '?'}"


def _points_table(plan):
    """The sweep's points: one column per swept key when that fits the console, else one wrapping
    ``settings`` column of ``key=value`` pairs with the point's number (its folder is ``OUT/<number>-...``)."""
    from rich.measure import Measurement
    from rich.text import Text

    title = f"sweep of {plan.recipe}: {len(plan.points)} point(s) in {plan.out}/"
    keys = [a.key for a in plan.args.axes]
    wide = plain_table(title=Text(title), header_style="bold")
    for column in ("point", *keys, "state"):
        wide.add_column(column, no_wrap=True)
    for point in plan.points:
        wide.add_row(point.name, *(point.texts[k] for k in keys), _point_state(point))
    console = stdout()
    if Measurement.get(console, console.options.update(max_width=10**6), wide).maximum <= console.width:
        return wide
    narrow = plain_table(title=Text(title), header_style="bold", caption=Text(f"folders: {plan.out}/<point>-..."))
    narrow.add_column("point", no_wrap=True)
    narrow.add_column("state", no_wrap=True)
    narrow.add_column("settings", overflow="fold")
    for point in plan.points:
        narrow.add_row(point.name.split("-", 1)[0], _point_state(point),
                       "  ".join(f"{k}={point.texts[k]}" for k in keys) or "(the recipe as it is)")
    return narrow
