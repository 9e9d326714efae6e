"""The ``repae`` command line. One module per command group; this module only assembles them."""

from __future__ import annotations

import typer

from repae.cli import (
    analyze,
    bench,
    cache,
    compare,
    components,
    export,
    plugins,
    prepare,
    recipe,
    run,
    sample,
    sweep,
)
from repae.cli import eval as eval_cli

app = typer.Typer(
    name="repae",
    help="Train latent diffusion transformers with representation alignment (REPA-E, REPA, vanilla) from recipes.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from repae import __version__

        typer.echo(f"repae {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """repae: recipes and plugins for REPA-E, REPA and vanilla latent diffusion."""


app.command("list")(components.list_components)
app.command("show")(components.show_component)
app.command("plugins")(plugins.list_plugins)
app.add_typer(recipe.app, name="recipe")
app.command("run")(run.run)
app.command("bench")(bench.bench)
app.command("cache-latents")(cache.cache_latents)
app.command("prepare-data")(prepare.prepare_data)
app.command("sample")(sample.sample)
app.command("eval")(eval_cli.evaluate)
app.command("analyze")(analyze.analyze)
app.command("export")(export.export)
app.command("sweep")(sweep.sweep)
app.command("compare")(compare.compare)


def main() -> None:
    """Console-script entry point (``repae`` and ``python -m repae``): the CPU thread choice of
    :mod:`repae._threads` (before torch loads), then the command."""
    from repae._threads import configure_cpu_threads
    from repae.errors import UserError

    try:
        configure_cpu_threads()
    except UserError as exc:
        from repae.cli._common import print_user_error

        print_user_error(exc)
        raise SystemExit(2) from None
    app()
