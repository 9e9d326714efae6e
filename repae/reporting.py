"""Progress reporting: one progress bar for every long task (training, sampling, evaluation, latent caching, analysis).

    with progress("sample", total=len(todo), unit="img") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))

The bar goes to stderr (standard output stays for results), shows done/total, the rate in ``unit``/s, the elapsed
and remaining time, and a free text (``bar.advance(n, text="12.4 img/s  loss=0.31")``). In a terminal it is one line
that fits the terminal's width (:func:`render_line`): when the line is too long, the free text's terms (separated by
two spaces) go first, from the last one to the second (training: the loss terms), then the bar, the elapsed time and
the rate (when the free text has a first term to show instead: training's img/s), then the description is shortened;
done/total, the ETA and the free text's first term stay. Disabled (``enabled=False``), it costs nothing and prints
nothing. When stderr is not a terminal (``nohup``, SLURM log files, a pipe), it prints plain lines instead: one at
every update that sets a text (training: every ``log_every`` steps), otherwise at most one every 30 seconds, and a
last one when the task ends having done something (also for a ``transient`` bar: a log keeps what was done and how
fast), each ``description done/total (percent) rate elapsed ETA text`` (what matters first), never cut to a width.

Commands print their results on standard output (``--json``: nothing else there), so progress is shown with
``--json`` too: it never mixes with the result.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["ProgressBar", "progress", "render_line"]

TERM_SEPARATOR = "  "
"""What separates the terms of a progress text (``"12.4 img/s  loss=0.31"``)."""

_BAR_MIN, _BAR_MAX = 6, 40


class ProgressBar:
    """Handle of a running :func:`progress` bar."""

    def __init__(self, live: Any, unit: str, completed: int, *, description: str = "", total: int | None = None,
                 plain: bool = False, elapsed: float = 0.0, quiet_s: float = 0.0) -> None:
        self._live, self.unit = live, unit
        self._quiet_s = quiet_s
        self.description, self.total = description, total
        self.completed = completed
        self.text = ""
        self._started = time.perf_counter()
        self._elapsed_before = elapsed
        self._first = completed
        self._rate: float | None = None
        self._rate_at = self._started
        self._plain = plain
        self._last_line = self._started
        self._printed = completed

    def advance(self, n: int = 1, *, text: str | None = None) -> None:
        """``n`` more items done; ``text`` replaces the free text after the bar."""
        self.update(self.completed + n, text=text)

    def update(self, completed: int, *, text: str | None = None) -> None:
        """Set the number of items done (and the free text)."""
        self.completed = completed
        if self._plain:
            self._plain_line(completed, text)
            return
        if self._live is None:
            return
        now = time.perf_counter()
        if completed > self._first:
            self._rate, self._rate_at = (completed - self._first) / max(now - self._started, 1e-9), now
        if text is not None:
            self.text = text  # drawn at the next refresh (4 per second)

    def line(self, width: int) -> Any:
        """The terminal's line now, fitted to ``width`` columns (:func:`render_line`)."""
        now = time.perf_counter()
        eta = None
        if self.total and self._rate:
            eta = max((self.total - self.completed) / self._rate - (now - self._rate_at), 0.0)
        return render_line(width, description=self.description, completed=self.completed, total=self.total,
                           rate=self._rate, unit=self.unit, elapsed=now - self._started + self._elapsed_before,
                           eta=eta, text=self.text)

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        yield self.line(options.max_width)

    def _plain_line(self, completed: int, text: str | None, *, final: bool = False) -> None:
        now = time.perf_counter()
        if now - self._started < self._quiet_s:
            return
        if text is None and not final and now - self._last_line < PLAIN_INTERVAL_S:
            return
        if final and completed == self._printed:
            return
        self._last_line, self._printed = now, completed
        description, total = self.description, self.total
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


def render_line(width: int, *, description: str, completed: int, total: int | None, rate: float | None = None,
                unit: str = "it", elapsed: float = 0.0, eta: float | None = None, text: str = "") -> Any:
    """A progress line as a rich ``Text`` of at most ``width`` cells:
    ``description bar done/total rate elapsed ETA term1  term2 ...``.

    When it does not fit, parts go in this order: the terms of ``text`` (split at two spaces) from the last to the
    second, the bar, the elapsed time, the rate (only when ``text`` has a first term, which then shows the speed),
    then the description is shortened (with an ellipsis); done/total, the ETA and ``text``'s first term go last (the
    line is then cut).
    """
    from rich.cells import cell_len
    from rich.text import Text

    terms = [" ".join(t.split()) for t in text.split(TERM_SEPARATOR) if t.strip()] if text else []  # one line
    count = f"{completed}/{total}" if total else str(completed)
    speed = f"{rate:.3g} {unit}/s" if rate else ""
    clock = _clock(elapsed)
    if total:
        remaining = _clock(eta) if eta is not None else ("0:00:00" if completed >= total else "-:--:--")
        remaining = f"ETA {remaining}"
    else:
        remaining = ""
    keep = {"bar": bool(total), "elapsed": True, "rate": bool(speed)}
    shown = len(terms)

    def parts(bar_width: int, name: str) -> list[tuple[str, str]]:
        out = [(name, "bold")]
        if keep["bar"]:
            out.append(("\0bar", str(bar_width)))
        out.append((count, "green"))
        if keep["rate"]:
            out.append((speed, ""))
        if keep["elapsed"]:
            out.append((clock, "yellow"))
        if remaining:
            out.append((remaining, "cyan"))
        if shown:
            out.append((TERM_SEPARATOR.join(terms[:shown]), ""))
        return [(s, style) for s, style in out if s]

    def length(items: list[tuple[str, str]]) -> int:
        return sum(int(style) if s == "\0bar" else cell_len(s) for s, style in items) + len(items) - 1

    name = " ".join(description.split())
    # what goes, in order: terms from the last to the second, the bar, elapsed, rate (when a first term shows speed)
    steps: list[str] = ["term"] * max(len(terms) - 1, 0) + ["bar", "elapsed"] + (["rate"] if terms else [])
    while length(parts(_BAR_MIN, name)) > width and steps:
        step = steps.pop(0)
        if step == "term":
            shown -= 1
        else:
            keep[step] = False
    overflow = length(parts(_BAR_MIN, name)) - width
    if overflow > 0 and len(name) > 1:  # shorten the description, keeping at least one character and the ellipsis
        cut = max(len(name) - overflow - 1, 1)
        name = name[:cut] + "…"
    bar_width = min(max(width - length(parts(0, name)), _BAR_MIN), _BAR_MAX) if keep["bar"] else 0
    line = Text(no_wrap=True, overflow="ellipsis", end="")
    for i, (s, style) in enumerate(parts(bar_width, name)):
        if i:
            line.append(" ")
        if s == "\0bar":
            line.append_text(_bar(bar_width, completed, total or 1))
        else:
            line.append(s, style=style or None)
    line.truncate(width, overflow="ellipsis")
    return line


def _bar(width: int, completed: int, total: int) -> Any:
    from rich.text import Text

    done = min(max(completed / total, 0.0), 1.0)
    filled = int(round(width * done))
    bar = Text()
    bar.append("━" * filled, style="bar.finished" if done >= 1 else "bar.complete")
    bar.append("━" * (width - filled), style="bar.back")
    return bar


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
    quiet_s: float = 0.0,
    plain: bool = False,
) -> Iterator[ProgressBar]:
    """A progress bar over ``total`` items (``None``: unknown) on stderr, starting at ``completed`` (after ``elapsed``
    seconds of earlier work, which plain lines count in); ``transient`` removes a terminal's bar when done.
    ``quiet_s``: in plain lines (stderr is no terminal, or ``plain``), none is written in the first ``quiet_s``
    seconds, so a stage that is usually quick leaves nothing. ``plain``: plain lines in a terminal too, for a stage
    during which other code may draw its own bar (a download's), which a live bar would garble."""
    if not enabled:
        yield ProgressBar(None, unit, completed)
        return
    if plain or not sys.stderr.isatty():
        handle = ProgressBar(None, unit, completed, description=description, total=total, plain=True,
                             elapsed=elapsed, quiet_s=quiet_s)
        yield handle
        if handle.completed != completed:
            handle._plain_line(handle.completed, None, final=True)
        return
    from rich.console import Console
    from rich.live import Live

    handle = ProgressBar(None, unit, completed, description=description, total=total, elapsed=elapsed)
    with Live(handle, console=Console(stderr=True), transient=transient, refresh_per_second=4) as live:
        handle._live = live
        yield handle
