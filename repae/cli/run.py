"""``repae run``: resolve a recipe, build its components, and hand them to the recipe's trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from repae.cli._choices import DEVICE_OPTION
from repae.cli._common import load_host, plain_table, stdout, user_errors, wrap_lines
from repae.cli._pickle import TRUST_PICKLE_OPTION, pickle_trust
from repae.cli.recipe import OVERRIDES_ARG, RECIPE_ARG
from repae.errors import UserError


def _format_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve and check the recipe whole: build every component on the meta device, "
        "propagate one step's shapes, print the resolved recipe, the components and the step plan; write nothing."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<recipe name>)."),
    device: str = DEVICE_OPTION,
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change", help="Resume a run directory even though its recipe differs (the old recipe "
        "is kept as recipe.previous-N.yaml)."
    ),
    trust_pickle: bool = TRUST_PICKLE_OPTION,
) -> None:
    """Run a recipe. With --dry-run: check it and build every component on `meta` (even XL models in seconds)."""
    from repae.recipe import read_recipe

    console = stdout()
    with user_errors(), pickle_trust(trust_pickle):
        host = load_host()
        resolved = read_recipe(recipe, overrides or [], host.registry)
        if not dry_run and not resolved.get("trainer"):
            names = ", ".join(host.registry.names("trainer")) or "none installed"
            raise UserError(f"{recipe} names no trainer. Add `trainer: {{name: default}}` (available: {names}).")
        run_dir = out or Path("runs") / recipe.stem
        if not dry_run:  # from files alone, before torch: a folder that cannot take the run, a finished run
            from repae.cli._preflight import finished_run
            from repae.rundir import check_out_folder

            check_out_folder(run_dir)
            finished = finished_run(resolved, run_dir)
            if finished is not None:
                if os.environ.get("RANK", "0") == "0":
                    console.print(finished, markup=False)
                return
        from repae.compose import compose_recipe

        composition = compose_recipe(resolved)
        if dry_run:
            _print_dry_run(console, composition)
            return
        _train(composition.recipe, run_dir, device, allow_recipe_change, resolved)


def _print_dry_run(console, composition) -> None:
    console.out(composition.recipe.to_yaml(), end="", highlight=False)
    from rich import box

    table = plain_table(title=f"components (built on meta and checked in {composition.seconds:.2f} s)",
                        header_style="bold", show_footer=True, box=box.SIMPLE)  # SIMPLE: a rule above the total
    totals = [0, 0]
    columns = ("slot", "component", "plugin", "parameters", "trained")
    trainer = composition.trainer
    rows = []
    for b in composition.built:
        trainable = _trainable(b.component, trainer)
        totals[0] += b.num_parameters or 0
        totals[1] += trainable or 0
        rows.append((b.label, f"{b.entry.kind} {b.entry.name}", b.entry.plugin.label,
                     _format_count(b.num_parameters), _format_count(trainable)))
    footer = {"slot": "total", "parameters": _format_count(totals[0]), "trained": _format_count(totals[1])}
    for column in columns:  # one line per component at 80 columns: slots and names whole, a long plugin label wraps
        table.add_column(column, footer=footer.get(column, ""), no_wrap=column != "plugin",
                         justify="right" if column in ("parameters", "trained") else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if composition.derived:
        console.print("derived from other components: " + ", ".join(composition.derived), markup=False,
                      highlight=False)  # wrapped between values at the console's width
    if composition.plan is not None:
        console.out(wrap_lines(composition.plan.describe(), console.width), highlight=False)
    console.print("[dim]dry run: nothing was written or trained[/]")


def _train(resolved, run_dir: Path, device: str, allow_recipe_change: bool, source) -> None:
    from repae.train.launch import train_recipe

    train_recipe(resolved, run_dir, device=device, allow_recipe_change=allow_recipe_change)
    if os.environ.get("RANK", "0") == "0":
        from repae.cli._preflight import record_run_input

        record_run_input(source, resolved, run_dir)  # lets the same command, run again, see it is finished (torch-free)
        stdout().print(f"done: {run_dir}", markup=False)


def _trainable(component, trainer=None) -> int | None:
    """Parameters the recipe will train: the trainer's parts (when the recipe has a trainer), else requires_grad."""
    params = getattr(component, "parameters", None)
    if not callable(params):
        return None
    parts = getattr(trainer, "parts", None)
    if parts is None:
        return sum(p.numel() for p in params() if p.requires_grad)
    if any(component is part for part in parts.values()):
        return sum(p.numel() for p in params())
    owned = component.parts() if callable(getattr(component, "parts", None)) else {}
    return sum(p.numel() for module in owned.values() for p in module.parameters())
