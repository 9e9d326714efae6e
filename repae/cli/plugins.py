"""``repae plugins``: which plugins loaded, their versions, what each registered, and load errors."""

from __future__ import annotations

import typer

from repae.cli._common import plain_table, load_host, print_json, stdout, user_errors


def list_plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {plugins: [...], failures: [...]}."),
) -> None:
    """Show loaded plugins and the components each registered, then any plugin that failed to load.

    Exits with code 1 when a plugin failed, so that it can serve as a health check.
    """
    with user_errors():
        host = load_host(warn=False)
    plugins = sorted(host.plugins.values(), key=lambda p: p.info.name)
    if as_json:
        print_json({"plugins": [_plugin_json(p) for p in plugins], "failures": [vars(f) for f in host.failures]})
    else:
        _print_tables(host, plugins)
    if host.failures:
        raise typer.Exit(1)


def _plugin_json(plugin) -> dict:
    return {
        "name": plugin.info.name,
        "distribution": plugin.info.distribution,
        "version": plugin.info.version,
        "hooks": plugin.hooks,
        "components": [f"{kind}:{name}" for kind, name in plugin.components],
    }


def _print_tables(host, plugins) -> None:
    console = stdout()
    table = plain_table(title="plugins", header_style="bold")
    for column in ("plugin", "distribution", "hooks", "components"):
        table.add_column(column, overflow="fold")
    for p in plugins:
        table.add_row(
            p.info.name,
            p.info.label if p.info.distribution else "(in-process)",
            ", ".join(p.hooks),
            ", ".join(f"{kind}:{name}" for kind, name in p.components) or "-",
        )
    console.print(table)
    if host.failures:
        failed = plain_table(title="failed to load", header_style="bold red")
        for column in ("plugin", "distribution", "stage", "error"):
            failed.add_column(column, overflow="fold")
        for f in host.failures:
            failed.add_row(f.name, " ".join(filter(None, (f.distribution, f.version))) or "-", f.stage, f.error)
        console.print(failed)
