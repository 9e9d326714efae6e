"""Errors that are part of repae's API.

Every mistake a user can make (a typo in a recipe, an unknown component, a broken plugin) raises a subclass of
:class:`UserError`. The CLI prints those as a short message and exits with code 2; it never shows a traceback for
them. Anything else is a bug in repae or in a plugin and keeps its traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CapabilityError",
    "ComponentBuildError",
    "PluginError",
    "Problem",
    "RecipeError",
    "RepaeError",
    "StopRequested",
    "UnknownComponentError",
    "UserError",
    "WeightsMismatchError",
    "closest",
    "describe_exception",
    "first_line",
    "sort_problems",
    "unwrap_worker_error",
]


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none): for messages that quote
    an error from torch, a plugin or a library without its whole text."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def describe_exception(exc: BaseException) -> str:
    """``"TypeName: first line"`` (:func:`first_line`), or the type's name alone for an empty message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc)}" if text else type(exc).__name__


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``word``, best first (for "did you mean" hints)."""
    pool = sorted(set(candidates))
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in pool), key=lambda x: -x[0])
    best = scored[0][0] if scored else 0.0
    hits = [c for ratio, c in scored if ratio >= max(0.5, best - 0.1)][:n]
    if not hits:
        lowered = word.lower()
        hits = [c for c in pool if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    return hits


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` or the empty string."""
    hits = closest(word, candidates)
    if not hits:
        return ""
    return " Did you mean " + " or ".join(repr(h) for h in hits) + "?"


class RepaeError(Exception):
    """Base class of every error repae raises on purpose."""


class UserError(RepaeError):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""


class StopRequested(UserError):
    """Training stopped on request (SIGTERM, SIGINT) after writing a checkpoint: not a failure of the run. The CLI
    prints the message and exits with :attr:`exit_code` (128 + the signal's number, as a shell reports it)."""

    def __init__(self, message: str, *, exit_code: int = 143) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Problem:
    """One problem found in a recipe: where it is, what is wrong, and what to do about it."""

    where: str
    """File (and line, when known) the offending value came from, or ``command line``."""
    path: str
    """Dotted key path inside the recipe, e.g. ``denoiser.depth``; empty for the whole file."""
    message: str
    hint: str = ""

    def __str__(self) -> str:
        location = f"{self.where}: {self.path}" if self.path else self.where
        text = f"{location}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


_LOCATION = re.compile(r"(?P<file>.*?):(?P<line>\d+)(?=$|[,;) ])")


def _problem_key(problem: Problem) -> tuple[int, str, int, str]:
    if problem.where.startswith("command line"):
        return (1, "", 0, "")  # overrides after the files, in the order they were typed (a stable sort)
    match = _LOCATION.match(problem.where)
    if match is None:
        return (0, problem.where, 0, problem.path)  # the whole file (no line): before its lines
    return (0, match.group("file"), int(match.group("line")), problem.path)


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    """Problems in reading order: by file, then line (numerically; a problem of the whole file first), then key path;
    problems of command-line overrides last, in the order the overrides were typed."""
    return sorted(problems, key=_problem_key)


class RecipeError(UserError):
    """A recipe (or its overrides) is invalid. Holds *every* problem found, not just the first, sorted by file and
    line (:func:`sort_problems`)."""

    def __init__(self, problems: Sequence[Problem], title: str = "invalid recipe") -> None:
        self.problems = sort_problems(problems)
        self.title = title
        lines = [f"{title}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class UnknownComponentError(UserError, KeyError):
    """A component name that no loaded plugin registered."""

    def __init__(self, kind: str | None, name: str, known: Iterable[str], *, detail: str = "") -> None:
        self.kind, self.name = kind, name
        what = f"{kind} '{name}'" if kind else f"component '{name}'"
        listing = f"repae list {kind}" if kind else "repae list"
        detail = f" ({detail})" if detail else ""
        super().__init__(
            f"unknown {what}{detail}.{did_you_mean(name, known)} Run `{listing}` to see what is available."
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(UserError):
    """A plugin failed to load or register (raised only in strict mode; otherwise recorded and reported)."""


class WeightsMismatchError(UserError):
    """A checkpoint's keys or shapes do not match the module built from the config."""


class ComponentBuildError(UserError):
    """A component's factory rejected its (validated) configuration."""


class CapabilityError(UserError):
    """A command needs an optional capability (see :mod:`repae.interfaces`) that a component does not declare."""


_WORKER_PREFIX = re.compile(r"\ACaught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def unwrap_worker_error(exc: BaseException) -> UserError | None:
    """The :class:`UserError` that a DataLoader worker raised, as a one-line error again, or ``None``.

    torch re-raises an exception from a worker as ``Caught NAME in DataLoader worker process N.`` followed by the
    worker's whole traceback, as the same type when it can be built from that text, else as ``RuntimeError``. When
    ``exc`` is such a wrapper of a :class:`UserError` (of any subclass, also one torch fell back to ``RuntimeError``
    for), this returns an error of that type (or :class:`UserError`) holding only the original message; otherwise
    ``None``. The CLI calls it in :func:`repae.cli._common.user_errors`.
    """
    import sys

    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    match = _WORKER_PREFIX.match(text)
    if match is None:
        return None
    name = match.group(1)
    # The traceback ends with "module.Name: message" (possibly several lines): the last line starting so.
    found = None
    for m in re.finditer(rf"^((?:[\w]+\.)*){re.escape(name)}: ", text, flags=re.MULTILINE):
        found = m
    if found is None:
        return None
    message = text[found.end():].strip()
    module = found.group(1).rstrip(".")
    cls: type | None = type(exc) if isinstance(exc, UserError) else None
    if cls is None:
        candidate = getattr(sys.modules.get(module or "builtins"), name, None)
        cls = candidate if isinstance(candidate, type) and issubclass(candidate, UserError) else None
    if cls is None:
        return None
    try:
        error = cls(message)
    except Exception:  # noqa: BLE001 - a subclass with another signature: the message is what matters
        error = UserError(message)
    return error if isinstance(error, UserError) else UserError(message)
