"""``repae list`` and ``repae show``: discover and inspect registered components."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from repae.cli._choices import choice, component_names
from repae.cli._common import load_host, one_line, plain_table, print_json, stdout, user_errors
from repae.config import describe_config
from repae.registry import KINDS, PRESET_FIELD

KIND = choice(tuple(KINDS))
"""A component kind (:data:`repae.registry.KINDS`)."""


def list_components(
    kind: Optional[str] = typer.Argument(None, help=f"Only this kind: {', '.join(KINDS)}.", show_default=False,
                                         **choice(tuple(KINDS), metavar="KIND")),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {kind, name, summary, plugin}."),
) -> None:
    """List registered components: kind, name, summary and the plugin that provides them."""
    with user_errors():
        host = load_host()
        entries = host.registry.entries(kind)
        if as_json:
            print_json(
                [
                    {
                        "kind": e.kind,
                        "name": e.qualified_name if host.registry.is_shadowed(e) else e.name,
                        "qualified_name": e.qualified_name,
                        "summary": e.summary,
                        "plugin": e.plugin.name,
                        "distribution": e.plugin.distribution,
                        "version": e.plugin.version,
                        "presets": list(e.presets),
                    }
                    for e in entries
                ]
            )
            return
        table = plain_table(show_lines=False, header_style="bold")
        for column in ("kind", "name", "summary", "plugin"):  # one line per component: summaries are cut to fit
            table.add_column(column, overflow="fold", no_wrap=column != "summary", min_width=12 * (column == "summary"))
        for e in entries:
            name = e.qualified_name if host.registry.is_shadowed(e) else e.name
            table.add_row(e.kind, name, one_line(e.summary), e.plugin.label)
        console = stdout()
        if entries:
            console.print(table)
        else:
            what = f"{kind} components" if kind else "components"
            console.print(f"No {what} registered. Run `repae plugins` to see which plugins loaded.")


def show_component(
    name: str = typer.Argument(..., help="Component name, e.g. sit (qualified: DISTRIBUTION:NAME).",
                               autocompletion=component_names(None)),
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="Disambiguate when several kinds use the name.",
                                       show_default=False, **KIND),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a component's config fields (type, default, doc) and presets."""
    with user_errors():
        host = load_host()
        entries = host.registry.find(name, kind)
        if as_json:
            print_json([_entry_json(e) for e in entries])
            return
        console = stdout()
        for entry in entries:
            console.print(f"[bold]{entry.kind} {escape(entry.name)}[/] - {escape(entry.summary)}")
            console.print(escape(f"plugin: {entry.plugin.label} ({entry.plugin.name}); qualified name: "
                                 f"{entry.qualified_name}; config: {entry.config.__name__}"))
            console.print(_fields_table(entry, console.width))
            if entry.presets:
                presets = plain_table(title=f"presets (select with `{PRESET_FIELD}:`)", header_style="bold")
                presets.add_column(PRESET_FIELD)
                presets.add_column("sets")
                default = entry.default_preset()
                for preset, values in entry.presets.items():
                    label = f"{preset} (default)" if preset == default else preset
                    presets.add_row(label, ", ".join(f"{k}={v!r}" for k, v in values.items()))
                console.print(presets)


WIDE = 120
"""Consoles at least this wide show a config's fields as four columns (field, type, default, doc); narrower ones as
two, the doc under the type and default, so that the docs keep most of the width (80 columns: 56)."""


def _fields_table(entry, width: int):
    from rich.text import Text

    table = plain_table(header_style="bold")
    fields = describe_config(entry.config)
    if width >= WIDE:
        table.add_column("field", no_wrap=True)
        table.add_column("type", overflow="fold", max_width=28)
        table.add_column("default", overflow="fold", max_width=24)
        table.add_column("doc")
        for f in fields:
            table.add_row(f.name, f.type, "(required)" if f.required else repr(f.default), f.doc)
        return table
    table.add_column("field", no_wrap=True)
    table.add_column("type = default; doc", overflow="fold")
    for f in fields:
        default = "(required)" if f.required else repr(f.default)
        table.add_row(f.name, Text.assemble(f.type, " = ", default, "\n", (f.doc, "dim")))
    return table


def _entry_json(entry) -> dict:
    return {
        "kind": entry.kind,
        "name": entry.name,
        "qualified_name": entry.qualified_name,
        "summary": entry.summary,
        "plugin": entry.plugin.name,
        "distribution": entry.plugin.distribution,
        "version": entry.plugin.version,
        "config": [
            {"name": f.name, "type": f.type, "default": f.default, "required": f.required, "doc": f.doc}
            for f in describe_config(entry.config)
        ],
        "preset_field": PRESET_FIELD if entry.presets else None,
        "presets": {k: dict(v) for k, v in entry.presets.items()},
    }
