"""Progress reporting: one progress bar for every long task (training, sampling, evaluation, latent caching, analysis).

    with progress("sample", total=len(todo), unit="img") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

The bar goes to stderr (standard output stays for results), shows done/total, the rate in ``unit``/s, the elapsed
and remaining time, and a free text (``bar.advance(n, text="loss=0.31")``). Disabled (``enabled=False``), it costs
nothing and prints nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ProgressBar", "progress"]


class ProgressBar:
    """Handle of a running :func:`progress` bar."""

    def __init__(self, bar: Any, task: Any, unit: str, completed: int) -> None:
        self._bar, self._task, self.unit = bar, task, unit
        self.completed = completed
        self._started = time.perf_counter()
        self._first = completed

    def advance(self, n: int = 1, *, text: str | None = None) -> None:
        """``n`` more items done; ``text`` replaces the free text after the bar."""
        self.update(self.completed + n, text=text)

    def update(self, completed: int, *, text: str | None = None) -> None:
        """Set the number of items done (and the free text)."""
        self.completed = completed
        if self._bar is None:
            return
        seconds = max(time.perf_counter() - self._started, 1e-9)
        rate = (completed - self._first) / seconds
        fields: dict[str, Any] = {"rate": f"{rate:.2f} {self.unit}/s" if completed > self._first else ""}
        if text is not None:
            fields["text"] = text
        self._bar.update(self._task, completed=completed, **fields)


@contextlib.contextmanager
def progress(
    description: str,
    total: int | None,
    *,
    completed: int = 0,
    unit: str = "it",
    enabled: bool = True,
    transient: bool = False,
) -> Iterator[ProgressBar]:
    """A progress bar over ``total`` items (``None``: unknown) on stderr, starting at ``completed``; ``transient``
    removes it when done."""
    if not enabled:
        yield ProgressBar(None, None, unit, completed)
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
