"""Shared pieces of the CLI: consoles, plugin loading, turning user errors into exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from repae.errors import RecipeError, StopRequested, UserError, unwrap_worker_error

EXIT_USER_ERROR = 2


def stdout() -> Console:
    return Console(soft_wrap=False, highlight=False)


def stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def load_host(*, warn: bool = True):
    """Load plugins (honouring REPAE_PLUGINS / REPAE_DISABLE_PLUGINS / REPAE_STRICT_PLUGINS); warn about failures."""
    from repae.plugins import load_plugins

    host = load_plugins()
    if warn and (host.failures or host.clashes):
        err = stderr()
        for failure in host.failures:
            err.print("[yellow]warning:[/] ", end="")
            err.print(str(failure), markup=False, highlight=False)
        for clash in host.clashes:
            err.print("[yellow]note:[/] ", end="")
            err.print(str(clash), markup=False, highlight=False)
        err.print("[dim](run `repae plugins` for details; REPAE_STRICT_PLUGINS=1 makes failures errors)[/]")
    return host


def print_user_error(exc: UserError) -> None:
    err = stderr()
    if isinstance(exc, RecipeError):
        err.print(f"[bold red]error:[/] {exc.title}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            err.print("  - " + str(problem), markup=False)
    elif isinstance(exc, StopRequested):  # not a failure; under torchrun process 0 speaks for all
        if os.environ.get("RANK", "0") == "0":
            err.print("[bold yellow]stopped:[/] ", end="")
            err.print(str(exc), markup=False)
    else:
        err.print("[bold red]error:[/] ", end="")
        err.print(str(exc), markup=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a :class:`UserError` as a message (no traceback) and exit with code 2; also one that a DataLoader worker
    raised, which torch re-raises with the worker's traceback (:func:`repae.errors.unwrap_worker_error`)."""
    try:
        yield
    except UserError as exc:
        print_user_error(unwrap_worker_error(exc) or exc)
        raise typer.Exit(getattr(exc, "exit_code", EXIT_USER_ERROR)) from None
    except RuntimeError as exc:  # torch's fallback type for a worker's error it cannot rebuild
        unwrapped = unwrap_worker_error(exc)
        if unwrapped is None:
            raise
        print_user_error(unwrapped)
        raise typer.Exit(EXIT_USER_ERROR) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")



def plain_table(**kwargs: Any):
    """A rich table whose string cells are plain text: plugin-provided strings may contain '[...]', which must not be
    read as console markup.

    Tables fit 80 columns: columns holding names and numbers are added with ``no_wrap=True`` (never cut while others
    can give way), free text either wraps (``show``'s docs) or is cut to one line with :func:`one_line` (``list``'s
    summaries; the full text is in ``repae show`` and ``--json``)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    class PlainTable(Table):
        def add_row(self, *values: Any, **kw: Any) -> None:
            super().add_row(*(Text(v) if isinstance(v, str) else v for v in values), **kw)

    for key, value in (("box", box.SIMPLE_HEAD), ("show_edge", False), ("pad_edge", False), ("collapse_padding", True)):
        kwargs.setdefault(key, value)  # no rules but the header's: 80 columns hold more text
    return PlainTable(**kwargs)


def one_line(value: str):
    """A table cell cut to one line with an ellipsis when its column is narrower than the text (the column still
    gives way to the others: it must not be added with ``no_wrap``)."""
    from rich.text import Text

    return Text(" ".join(value.split()), no_wrap=True, overflow="ellipsis")


def wrap_lines(text: str, width: int) -> str:
    """``text`` with each line longer than ``width`` wrapped between words; a continuation starts under the value of
    a ``label:   value`` line, else 4 columns in from its line (the dry run's step plan at 80 columns)."""
    import re
    import textwrap

    out = []
    for line in text.splitlines():
        if len(line) <= width:
            out.append(line)
            continue
        label = re.match(r"^(\s*[^:\s][^:]{0,30}:\s+)\S", line)
        indent = len(label.group(1)) if label else len(line) - len(line.lstrip()) + 4
        out.extend(textwrap.wrap(line, max(width, indent + 20), subsequent_indent=" " * min(indent, width // 2),
                                 break_long_words=False, break_on_hyphens=False) or [line])
    return "\n".join(out)


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; CUDA asked for on a machine without it is a clear error."""
    from repae.train.distributed import resolve_device

    return resolve_device(device)


def announce_output(console: Console, out: Path, *, checking: str, starting: str,
                    resuming: Callable[[Path], str] | None = None) -> None:
    """Say what a resumable folder writer (:mod:`repae.partial_folder`) is about to do with ``out``: ``"OUT exists:
    checking <checking>"`` when it exists; ``resuming(OUT.partial)`` when that unfinished folder exists (if given);
    else ``starting``."""
    from repae.partial_folder import partial_dir

    partial = partial_dir(out)
    if out.exists():
        console.print(f"{out} exists: checking {checking}")
    elif resuming is not None and partial.is_dir():
        console.print(resuming(partial))
    else:
        console.print(starting)
