"""Choice-like options and arguments, and shell completion (``repae --install-completion``).

Two kinds of choices:

- **fixed sets** (``--device``, ``--labels``, ``--launcher``, ``--on-unreadable``, a component kind, ...):
  :func:`choice` gives an option the keyword arguments that make ``--help`` show the set as its metavar
  (``--labels [balanced|random]``), the parser reject any other value with the valid ones and a "did you mean"
  (exit code 2, before the command runs or imports anything heavy), and the shell complete it. A set may include a
  pattern (``cuda:N``). These are plain ``str`` options with a callback rather than ``Enum`` types: the callback
  allows patterns and "did you mean", and works the same from typer 0.12 (click's own classes) to the releases that
  vendor click.
- **sets that plugins provide** (``--sampler``, ``--metrics``, ``--dataset``, a component's name): the registry's
  entries are metadata only, so :func:`component_names` completes them without importing torch or any plugin
  module, and the command checks the value first thing with :func:`check_component` (did you mean, the names
  available). ``--help`` names the built-in ones and the ``repae list KIND`` that lists them all: a help text (and
  docs/cli-reference.md, generated from it) must not depend on which plugins are installed. ``repae export
  --format``'s formats are those the run's components declare: checked against the run's recipe.yaml and the
  components' configs (``EXPORT_FORMATS``, :mod:`repae.export`) before anything is built.

Completion callbacks stay light: no torch, nothing printed, never an exception (a failure completes nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import typer

from repae.errors import UserError, did_you_mean

__all__ = ["DEVICE", "DEVICE_OPTION", "choice", "check_component", "component_names"]


def _listing(values: Sequence[str]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def choice(values: Sequence[str], *, patterns: Iterable[tuple[str, str]] = (), completions: Sequence[str] = (),
           lowercase: bool = True, metavar: str | None = None, explain: str = "",
           suggest: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``typer.Option`` / ``typer.Argument`` of type ``str`` (or ``Optional[str]``) whose value
    is one of ``values`` or matches one of ``patterns`` (``(display, regex)``, e.g. ``("cuda:N", r"cuda:\\d+")``).

    ``--help`` shows ``[a|b|display]`` (an argument: pass its ``metavar``, e.g. ``"KIND"``, and list the values in
    its help: the metavar also names it in messages); any other value is a usage error (exit code 2) naming the
    valid ones and the closest; the shell completes ``values`` plus ``completions``. With ``lowercase`` the value is
    matched and returned in lower case (``--device CPU`` is ``cpu``). ``explain`` ends the error message (what a
    pattern means); ``suggest`` maps words people write to the value they mean (``gpu`` -> ``cuda``), which the
    message proposes instead of the closest spelling.
    """
    values = tuple(values)
    compiled = [(display, re.compile(regex)) for display, regex in patterns]
    shown = [*values, *(display for display, _ in compiled)]
    candidates = [*values, *completions]

    def check(ctx: Any, param: Any, value: Any) -> Any:
        if value is None:
            return None
        text = value.strip().lower() if lowercase else value
        if text in values or any(regex.fullmatch(text) for _, regex in compiled):
            return text
        hint = f" Did you mean {suggest[text]!r}?" if suggest and text in suggest else did_you_mean(text, candidates)
        raise typer.BadParameter(f"{value!r}.{hint} Choose from {_listing(shown)}"
                                 + (f" ({explain})." if explain else "."))

    def complete(incomplete: str) -> list[str]:
        return [v for v in candidates if v.startswith(incomplete)]

    return {"metavar": metavar or "[" + "|".join(shown) + "]", "callback": check, "autocompletion": complete}


DEVICE = choice(("auto", "cpu", "cuda"), patterns=[("cuda:N", r"cuda:\d+")], completions=("cuda:0",),
                suggest={"gpu": "cuda", "cuda0": "cuda:0", "nvidia": "cuda"})
"""``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
DEVICE_OPTION: Any = typer.Option(
    "auto", "--device", help="auto: CUDA when available, else the CPU; cuda under torchrun: each process's GPU.",
    **DEVICE,
)
"""The ``--device`` option of every command that computes."""


def _registry() -> Any:
    """The registry of the installed plugins, loaded quietly (for completion: nothing may reach the terminal)."""
    import contextlib
    import io

    from repae.plugins import load_plugins

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return load_plugins().registry


def component_names(kind: str | None, *, also: Sequence[str] = (), separator: str | None = None
                    ) -> Callable[..., list[str]]:
    """A completion callback: the registered names of ``kind`` (every kind when ``None``) plus ``also``; with a
    ``separator`` (``","``) it completes the last item of a list (``fid,sf`` -> ``fid,sfid``)."""

    def complete(incomplete: str) -> list[str]:
        head, sep, last = incomplete.rpartition(separator) if separator else ("", "", incomplete)
        try:
            names = [*_registry().names(kind), *also]
        except Exception:  # noqa: BLE001 - a broken plugin setup completes nothing; the command will say why
            return []
        done = set(head.split(separator)) if separator and head else set()
        return [head + sep + name for name in dict.fromkeys(names) if name.startswith(last) and name not in done]

    return complete


def check_component(registry: Any, kind: str, name: str, option: str) -> str:
    """``name`` when ``registry`` has a ``kind`` of that name (plain or qualified); otherwise a :class:`UserError`
    naming the option, the closest names and every available one. Called first thing by the commands whose options
    name a component, before anything heavy is imported."""
    from repae.errors import UnknownComponentError

    try:
        registry.get(kind, name)
    except UnknownComponentError:
        known = registry.names(kind)
        available = ", ".join(known) if known else f"none (no plugin registers a {kind}; see `repae plugins`)"
        raise UserError(f"{option} {name}: unknown {kind}.{did_you_mean(name, known)} Available: {available} "
                        f"(`repae list {kind}` describes them)") from None
    return name
