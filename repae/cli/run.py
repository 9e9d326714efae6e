"""``repae run``: resolve a recipe, build its components, and hand them to the recipe's trainer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from repae.cli._common import pick_device, plain_table, load_host, stdout, user_errors
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
        False, "--dry-run", help="Resolve, validate and build every component on the meta device; write nothing."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<recipe name>)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu, cuda, cuda:N."),
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change", help="Resume a run directory even though its recipe differs (the old recipe "
        "is kept as recipe.previous-N.yaml)."
    ),
) -> None:
    """Run a recipe. With --dry-run: check it and build every component on `meta` (even XL models in seconds)."""
    from repae.build import build_recipe
    from repae.recipe import read_recipe
    from repae.rundir import prepare_run_dir

    console = stdout()
    with user_errors():
        host = load_host()
        resolved = read_recipe(recipe, overrides or [], host.registry)
        if dry_run:
            start = time.perf_counter()
            built = build_recipe(resolved, device="meta")
            seconds = time.perf_counter() - start
            console.out(resolved.to_yaml(), end="", highlight=False)
            table = plain_table(title=f"components (built on meta in {seconds:.2f} s)", header_style="bold")
            for column in ("slot", "component", "plugin", "parameters", "trainable"):
                table.add_column(column, justify="right" if column in ("parameters", "trainable") else "left")
            trainer = built[-1].component if built and built[-1].slot == "trainer" else None
            for b in built:
                trainable = _trainable(b.component, trainer)
                table.add_row(b.label, f"{b.entry.kind} {b.entry.name}", b.entry.plugin.label,
                              _format_count(b.num_parameters), _format_count(trainable))
            console.print(table)
            console.print("[dim]dry run: nothing was written or trained[/]")
            return

        if not host.registry.entries("trainer"):
            run_dir = prepare_run_dir(resolved, out or Path("runs") / recipe.stem,
                                      allow_recipe_change=allow_recipe_change)
            device = pick_device(device)
            start = time.perf_counter()
            built = build_recipe(resolved, device=device)
            console.print(
                f"Built {len(built)} component(s) on {device} in {time.perf_counter() - start:.1f} s; wrote the "
                f"resolved recipe and versions to {run_dir}/."
            )
            console.print(
                "[yellow]No trainer is registered[/], so nothing was trained: no installed plugin provides the "
                "'trainer' kind yet (training arrives with the training engine). `repae list` shows what is "
                "installed."
            )
            return
        if not resolved.get("trainer"):
            names = ", ".join(host.registry.names("trainer"))
            raise UserError(f"{recipe} names no trainer. Add `trainer: {{name: ...}}` (available: {names}).")
        _train(resolved, out or Path("runs") / recipe.stem, device, allow_recipe_change)


def _train(resolved, run_dir: Path, device: str, allow_recipe_change: bool) -> None:
    import os

    from repae.train.launch import train_recipe

    train_recipe(resolved, run_dir, device=device, allow_recipe_change=allow_recipe_change)
    if os.environ.get("RANK", "0") == "0":
        stdout().print(f"done: {run_dir}")


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

