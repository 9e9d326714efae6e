"""``repae plugins``: which plugins loaded, their versions, what each registered, and load errors."""

from __future__ import annotations

import typer

from repae.cli._common import load_host, plain_table, print_json, stdout, user_errors


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
        print_json({"plugins": [_plugin_json(p) for p in plugins], "failures": [vars(f) for f in host.failures],
                    "clashes": [{"kind": c.kind, "name": c.name, "kept_by": c.winner.qualified_name,
                                 "others": [e.qualified_name for e in c.others]} for c in host.clashes]})
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
    for column in ("plugin", "distribution", "hooks", "components"):  # names whole (a hook a line); lists wrap
        table.add_column(column, overflow="fold", no_wrap=column != "components")
    for p in plugins:
        table.add_row(
            p.info.name,
            p.info.label if p.info.distribution else "(in-process)",
            "\n".join(p.hooks),
            _components_by_kind(p.components) or "-",
        )
    console.print(table)
    if host.clashes:
        clashes = plain_table(title="name clashes (the first plugin keeps the plain name)", header_style="bold")
        for column in ("kind", "name", "plain name means", "also reachable as"):
            clashes.add_column(column, overflow="fold", no_wrap=column == "kind")
        for c in host.clashes:
            clashes.add_row(c.kind, c.name, c.winner.qualified_name, ", ".join(e.qualified_name for e in c.others))
        console.print(clashes)
    if host.failures:
        failed = plain_table(title="failed to load", header_style="bold red")
        for column in ("plugin", "distribution", "stage", "error"):
            failed.add_column(column, overflow="fold", no_wrap=column in ("plugin", "stage"))
        for f in host.failures:
            failed.add_row(f.name, " ".join(filter(None, (f.distribution, f.version))) or "-", f.stage, f.error)
        console.print(failed)


def _components_by_kind(components) -> str:
    """``"dataset: synthetic, image-folder; loss: kl"``: each kind once, so the column stays narrow."""
    grouped: dict[str, list[str]] = {}
    for kind, name in components:
        grouped.setdefault(kind, []).append(name)
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in grouped.items())
