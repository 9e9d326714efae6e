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
    """Load, override and validate a recipe against the installed plugins."""
    from repae.recipe import read_recipe

    host = load_host()
    return read_recipe(recipe, overrides or [], host.registry)


@app.command("show")
def show(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    raw: bool = typer.Option(False, "--raw", help="Print the merged recipe before validation and defaults."),
) -> None:
    """Print the fully resolved recipe (extends merged, overrides applied, defaults filled in) as YAML."""
    with user_errors():
        if raw:
            from repae.recipe import load_recipe

            source = load_recipe(recipe, overrides or [])
            text = yaml.safe_dump(source.data, sort_keys=False, default_flow_style=False, width=100)
        else:
            text = resolve(recipe, overrides).to_yaml()
        stdout().out(text, end="", highlight=False)


@app.command("validate")
def validate(recipe: Path = RECIPE_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Check a recipe against the installed components; report every problem at once (exit code 2)."""
    with user_errors():
        resolved = resolve(recipe, overrides)
        parts = ", ".join(f"{c.label}={c.name}" for c in resolved.components) or "no components"
        stdout().print(f"[green]ok[/] {recipe}: {parts}")
