"""Generate ``docs/cli-reference.md`` from the live command line: every command's and sub-command's ``--help``.

Regenerate after changing any command, option or help text::

    python -m repae.cli.reference            # writes docs/cli-reference.md
    python -m repae.cli.reference --check    # exit 1 (and say so) when the file differs from the live help

``tests/test_docs.py`` runs the check, so the reference cannot drift from the code. Each block is click's plain
rendering of the help (what ``TYPER_USE_RICH=0 repae COMMAND --help`` prints in a terminal of 80 columns or more):
the default, rich rendering shows the same text in panels, but its layout depends on the terminal and on rich's
version, the plain one only on the text. This module is a developer tool, not a ``repae`` command: the CLI never
imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_OUT", "REGENERATE", "commands", "main", "render"]

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "cli-reference.md"
"""``docs/cli-reference.md`` of the checkout this module belongs to."""
REGENERATE = "python -m repae.cli.reference"
"""The command that rewrites the reference (run at the repository root, in the project's environment)."""
WIDTH = 78
"""Help width: what click uses in any terminal of 80 columns or more (``min(columns, 80) - 2``)."""

_HEADER = f"""\
# Command-line reference

Generated from the live `--help` of every command by `{REGENERATE}` (do not edit by hand);
`tests/test_docs.py` fails when this file differs from what the code prints, and names the command that regenerates
it. Each block is the plain rendering of `repae COMMAND --help` (as `TYPER_USE_RICH=0 repae COMMAND --help` prints it):
the default rendering shows the same text in panels. [cli.md](cli.md) is the overview, with links to each command's
guide.
"""


# Commands and contexts are typed Any: typer builds them on click's classes, which recent typer versions vendor
# (``typer._click``) and older ones import from click itself; only click's public methods are used.


def _context(command: Any, name: str, parent: Any = None) -> Any:
    settings = {**(command.context_settings or {}), "terminal_width": WIDTH, "max_content_width": WIDTH}
    return command.context_class(command, info_name=name, parent=parent, **settings)


def _commands(command: Any, ctx: Any) -> Iterator[tuple[Any, Any]]:
    """``command`` and every visible sub-command below it, depth first, in the order ``--help`` lists them."""
    yield command, ctx
    if hasattr(command, "list_commands"):  # a group
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            yield from _commands(sub, _context(sub, name, ctx))


def _plain_help(command: Any, ctx: Any) -> str:
    """The plain (click) help of ``command`` at :data:`WIDTH` columns: typer renders plainly when a command's
    ``rich_markup_mode`` is None, as with ``TYPER_USE_RICH=0`` (the command objects are this render's own)."""
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    formatter = ctx.make_formatter()
    command.format_help(ctx, formatter)
    return "\n".join(line.rstrip() for line in formatter.getvalue().rstrip("\n").splitlines())


def commands() -> dict[str, tuple[Any, Any]]:
    """Every visible command of the live CLI by its path (``"repae"``, ``"repae run"``, ``"repae recipe show"``, ...):
    ``(command, context)``, in the order ``--help`` lists them. Click objects: ``command.params`` are its arguments and
    options (``opts``, ``secondary_opts``, ``nargs``, ``is_flag``)."""
    import typer

    from repae.cli import app

    root = typer.main.get_command(app)
    return {ctx.command_path: (command, ctx) for command, ctx in _commands(root, _context(root, "repae"))}


def render() -> str:
    """The whole reference: a contents list, then one section per command with its help in a ``text`` block."""
    entries = list(commands().values())
    toc, sections = [], []
    for command, ctx in entries:
        path = ctx.command_path
        anchor = path.replace(" ", "-")
        summary = command.get_short_help_str(limit=120) if ctx.parent is not None else "the program"
        toc.append(f"- [`{path}`](#{anchor}) — {summary}")
        sections.append(f"## {path}\n\n```text\n{_plain_help(command, ctx)}\n```\n")
    return _HEADER + "\n" + "\n".join(toc) + "\n\n" + "\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m repae.cli.reference [--check] [--out FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m repae.cli.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="file to write or check (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    if args.check:
        if current == text:
            print(f"{args.out} is up to date")
            return 0
        print(f"{args.out} differs from the live --help; regenerate it with `{REGENERATE}`", file=sys.stderr)
        return 1
    if current != text:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(f"{args.out} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
