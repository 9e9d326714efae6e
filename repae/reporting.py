"""Progress reporting: one progress bar for every long task (training, sampling, evaluation, latent caching, analysis).

    with progress("sample", total=len(todo), unit="img") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

The bar goes to stderr (standard output stays for results), shows done/total, the rate in ``unit``/s, the elapsed
and remaining time, and a free text (``bar.advance(n, text="loss=0.31")``). Disabled (``enabled=False``), it costs
nothing and prints nothing. When stderr is not a terminal (``nohup``, SLURM log files, a pipe), it prints plain lines
instead: one at every update that sets a text (training: every ``log_every`` steps), otherwise at most one every
30 seconds, and a last one when the task ends having done something (also for a ``transient`` bar: a log keeps what
was done and how fast), each ``description done/total (percent) rate elapsed ETA text``, never cut to a width.

Commands print their results on standard output (``--json``: nothing else there), so progress is shown with
``--json`` too: it never mixes with the result.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ProgressBar", "progress"]


class ProgressBar:
    """Handle of a running :func:`progress` bar."""

    def __init__(self, bar: Any, task: Any, unit: str, completed: int, *, plain: tuple[str, int | None] | None = None,
                 elapsed: float = 0.0) -> None:
        self._bar, self._task, self.unit = bar, task, unit
        self.completed = completed
        self._started = time.perf_counter()
        self._elapsed_before = elapsed
        self._first = completed
        self._plain = plain  # (description, total) when printing plain lines
        self._last_line = self._started
        self._printed = completed

    def advance(self, n: int = 1, *, text: str | None = None) -> None:
        """``n`` more items done; ``text`` replaces the free text after the bar."""
        self.update(self.completed + n, text=text)

    def update(self, completed: int, *, text: str | None = None) -> None:
        """Set the number of items done (and the free text)."""
        self.completed = completed
        if self._plain is not None:
            self._plain_line(completed, text)
            return
        if self._bar is None:
            return
        seconds = max(time.perf_counter() - self._started, 1e-9)
        rate = (completed - self._first) / seconds
        fields: dict[str, Any] = {"rate": f"{rate:.2f} {self.unit}/s" if completed > self._first else ""}
        if text is not None:
            fields["text"] = text
        self._bar.update(self._task, completed=completed, **fields)


    def _plain_line(self, completed: int, text: str | None, *, final: bool = False) -> None:
        now = time.perf_counter()
        if text is None and not final and now - self._last_line < PLAIN_INTERVAL_S:
            return
        if final and completed == self._printed:
            return
        self._last_line, self._printed = now, completed
        assert self._plain is not None
        description, total = self._plain
        seconds = max(now - self._started, 1e-9)
        rate = (completed - self._first) / seconds
        parts = [f"{description} {completed}" + (f"/{total} ({100 * completed / total:.0f}%)" if total else "")]
        if completed > self._first:
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_clock(seconds + self._elapsed_before)}")
        if total and completed > self._first and completed < total:
            parts.append(f"ETA {_clock((total - completed) / rate)}")
        if text:
            parts.append(text)
        sys.stderr.write("  ".join(parts) + "\n")
        sys.stderr.flush()


PLAIN_INTERVAL_S = 30.0
"""Seconds between plain progress lines that carry no new text (when stderr is not a terminal)."""


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def progress(
    description: str,
    total: int | None,
    *,
    completed: int = 0,
    unit: str = "it",
    enabled: bool = True,
    transient: bool = False,
    elapsed: float = 0.0,
) -> Iterator[ProgressBar]:
    """A progress bar over ``total`` items (``None``: unknown) on stderr, starting at ``completed`` (after ``elapsed``
    seconds of earlier work, which plain lines count in); ``transient`` removes a terminal's bar when done."""
    if not enabled:
        yield ProgressBar(None, None, unit, completed)
        return
    if not sys.stderr.isatty():
        handle = ProgressBar(None, None, unit, completed, plain=(description, total), elapsed=elapsed)
        yield handle
        if handle.completed != completed:
            handle._plain_line(handle.completed, None, final=True)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[text]}"),
        console=Console(stderr=True), transient=transient,
    )
    task = bar.add_task(description, total=total, completed=completed, rate="", text="")
    with bar:
        yield ProgressBar(bar, task, unit, completed)
