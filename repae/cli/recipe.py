"""``repae recipe show`` and ``repae recipe validate``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
import yaml

from repae.cli._common import load_host, stdout, user_errors

app = typer.Typer(help="Inspect and check recipes.", no_args_is_help=True)

RECIPE_ARG = typer.Argument(..., help="Recipe YAML file.", show_default=False)
OVERRIDES_ARG = typer.Argument(None, help="Overrides KEY.PATH=VALUE (value parsed as YAML).", show_default=False)


def resolve(recipe: Path, overrides: Optional[List[str]]):
    """Load, override and validate a recipe against the installed plugins (each section against its config)."""
    from repae.recipe import read_recipe

    host = load_host()
    return read_recipe(recipe, overrides or [], host.registry)


@app.command("show")
def show(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    raw: bool = typer.Option(False, "--raw", help="Print the merged recipe before validation and defaults."),
) -> None:
    """Print the fully resolved recipe (extends merged, overrides applied, defaults filled in, fields that follow from
    other components derived) as YAML: what `repae run` writes to the run directory."""
    with user_errors():
        if raw:
            from repae.recipe import load_source

            source = load_source(recipe, overrides or [])
            text = yaml.safe_dump(source.data, sort_keys=False, default_flow_style=False, width=100)
        else:
            from repae.compose import compose_recipe

            text = compose_recipe(resolve(recipe, overrides), check_step=False).recipe.to_yaml()
        stdout().out(text, end="", highlight=False)


@app.command("validate")
def validate(recipe: Path = RECIPE_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Check a recipe whole: every section against its component, then the components against each other (built on
    `meta`, shapes propagated through one training step). Reports every problem at once (exit code 2)."""
    from repae.compose import compose_recipe

    with user_errors():
        composition = compose_recipe(resolve(recipe, overrides))
        parts = ", ".join(f"{c.label}={c.name}" for c in composition.recipe.components) or "no components"
        console = stdout()
        console.print(f"[green]ok[/] {recipe}: ", end="")
        console.print(parts, markup=False, highlight=False)
        if composition.derived:
            console.print("derived: " + ", ".join(composition.derived), markup=False, highlight=False)
