"""Typed component configs: plain dataclasses whose fields carry a default and a one-line doc.

A component declares its config as a keyword-only dataclass::

    @dataclass(kw_only=True)
    class SiTConfig:
        size: str = option("XL/2", doc="preset: S/B/L/XL x patch 1/2/4/8")
        depth: int = option(28, doc="number of transformer blocks")

:func:`parse_config` turns the mapping a recipe holds into such an instance, checking every key and type and
reporting *all* problems at once; :func:`describe_config` lists the fields for ``repae show``; :func:`config_to_dict`
goes back to plain data for the resolved recipe. Only the standard library is imported here, so reading configs
never pulls in torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union

from repae.errors import did_you_mean

__all__ = [
    "ConfigIssue",
    "FieldError",
    "FieldInfo",
    "check_config_class",
    "config_to_dict",
    "describe_config",
    "option",
    "parse_config",
    "type_name",
]

_DOC = "repae_doc"


def option(default: Any = MISSING, *, doc: str = "", default_factory: Any = MISSING) -> Any:
    """A config field with a default (or ``default_factory``) and a one-line ``doc`` shown by ``repae show``.

    Omit both defaults for a required field.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("use default_factory= for a mutable default")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_DOC: doc})


class FieldError(ValueError):
    """Raise it from a config's ``__post_init__`` to blame one field: the problem is then reported at that field's key
    path (``losses.repa.weight``) instead of the whole section. A plain ``ValueError`` blames the section."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ConfigIssue:
    """A problem in one key of a component section; ``path`` is relative to the section."""

    path: str
    message: str
    hint: str = ""


@dataclass(frozen=True)
class FieldInfo:
    """What ``repae show`` prints for one config field."""

    name: str
    type: str
    default: Any
    required: bool
    doc: str


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """A short, human readable name of a type annotation (``int``, ``list[str]``, ``'a' | 'b'``)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict, set) or origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    kind = "null" if value is None else type(value).__name__
    return f"{kind} {text}" if value is not None else "null"


def _coerce(value: Any, tp: Any, path: str, issues: list[ConfigIssue]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (converted where lossless, e.g. int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad() -> None:
        issues.append(ConfigIssue(path, f"expected {type_name(tp)}, got {_describe_value(value)}"))

    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            bad()
        return value
    if origin in (Union, types.UnionType):
        finite: list[ConfigIssue] = []
        for arg in args:
            trial: list[ConfigIssue] = []
            converted = _coerce(value, arg, path, trial)
            if not trial:
                return converted
            finite.extend(i for i in trial if i.message.startswith("must be a finite number"))
        if finite:  # the right type, but not finite: say so rather than "expected float | null"
            issues.append(finite[0])
        else:
            bad()
        return value
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args if a == value):
            choices = ", ".join(repr(a) for a in args)
            hint = did_you_mean(str(value), [str(a) for a in args]).strip()
            issues.append(ConfigIssue(path, f"expected one of {choices}, got {_describe_value(value)}", hint))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad()
            return value
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):
            issues.append(ConfigIssue(path, f"must be a finite number, got {_describe_value(value)}",
                                      "YAML reads .nan, .inf and numbers beyond 1.8e308 as not finite"))
            return value
        return number
    if tp is str:
        if not isinstance(value, str):
            bad()
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            bad()
            return value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                issues.append(ConfigIssue(path, f"expected {len(args)} items ({type_name(tp)}), got {len(value)}"))
                return value
            return tuple(_coerce(v, a, f"{path}.{i}", issues) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}.{i}", issues) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            bad()
            return value
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            _coerce(k, key_tp, f"{path}.{k}", issues)
            out[k] = _coerce(v, val_tp, f"{path}.{k}", issues)
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            bad()
            return value
        return _parse(tp, value, path + ".", issues)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            bad()
        return value
    return value  # an annotation we do not understand: accept as is


def _parse(cls: type, data: Mapping[str, Any], prefix: str, issues: list[ConfigIssue]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    before = len(issues)
    kwargs: dict[str, Any] = {}
    removed: Mapping[str, tuple[Any, str]] = getattr(cls, "REMOVED_KEYS", None) or {}
    for key, value in data.items():
        if key not in fields and key in removed:
            inert, fix = removed[key]
            if not (type(value) is type(inert) and value == inert):  # the old default (recorded runs hold it): ignored
                issues.append(ConfigIssue(f"{prefix}{key}", "was removed", fix))
            continue
        if key not in fields:
            hint = did_you_mean(str(key), fields).strip() or f"valid keys: {', '.join(fields)}"
            issues.append(ConfigIssue(f"{prefix}{key}", "unknown key", hint))
            continue
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", issues)
    for name, f in fields.items():
        if name not in data and f.default is MISSING and f.default_factory is MISSING:
            issues.append(ConfigIssue(f"{prefix}{name}", f"required key is missing (type {type_name(hints[name])})"))
    if len(issues) > before:
        return None
    try:
        return cls(**kwargs)
    except FieldError as exc:  # __post_init__ blaming one field
        issues.append(ConfigIssue(f"{prefix}{exc.field}", exc.message))
        return None
    except (TypeError, ValueError) as exc:  # __post_init__ checks across fields
        issues.append(ConfigIssue(prefix.rstrip("."), str(exc)))
        return None


def _unsupported(tp: Any) -> str | None:
    """Why annotation ``tp`` cannot be a config field's type (``None`` when it can). Supported: ``int``, ``float``,
    ``str``, ``bool``, ``None`` in unions, ``Literal`` of those, ``list[T]``, ``tuple[T, ...]``, ``tuple[T1, T2]``,
    ``dict[str, T]`` and nested config dataclasses: what a YAML recipe can hold and :func:`parse_config` checks."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in (int, float, str, bool, type(None)):
        return None
    if origin is Literal:
        bad = [a for a in args if not isinstance(a, (int, float, str, bool, type(None)))]
        return f"Literal values must be plain scalars, got {bad!r}" if bad else None
    if origin in (Union, types.UnionType):
        for arg in args:
            reason = _unsupported(arg)
            if reason:
                return reason
        return None
    if origin is list:
        return _unsupported(args[0]) if args else "give the item type: list[int], list[str], ..."
    if origin is tuple:
        if not args:
            return "give the item types: tuple[float, float] or tuple[int, ...]"
        items = args[:1] if len(args) == 2 and args[1] is Ellipsis else args
        for arg in items:
            reason = _unsupported(arg)
            if reason:
                return reason
        return None
    if origin is dict:
        if not args:
            return "give the key and value types: dict[str, float]"
        if args[0] is not str:
            return f"dict keys must be str (recipe keys are strings), got {type_name(args[0])}"
        return _unsupported(args[1])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return None
    return (f"{type_name(tp)} is not a supported config type (use int, float, str, bool, None, Literal, list, tuple, "
            "dict[str, ...] or a nested dataclass)")


def check_config_class(cls: type) -> list[str]:
    """Problems with a config dataclass as a plugin declares it, one line each (empty when it is fine).

    Every field needs a supported type (see :func:`parse_config`); every default (or ``default_factory`` value) must
    be of its field's type; a nested dataclass is checked the same way; and when every field has a default, the
    default config must pass its own ``__post_init__`` checks. Run at registration, so that a wrong default is the
    plugin's error, not the user's.
    """
    problems: list[str] = []
    try:
        hints = _hints(cls)
    except Exception as exc:  # noqa: BLE001 - an annotation that does not resolve (a typo, a missing import)
        return [f"its field annotations do not resolve ({type(exc).__name__}: {exc})"]
    complete = True
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        reason = _unsupported(tp)
        if reason:
            problems.append(f"field {f.name!r}: {reason}")
            continue
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            problems.extend(f"field {f.name!r}: {p}" for p in check_config_class(tp))
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            try:
                default = f.default_factory()
            except Exception as exc:  # noqa: BLE001 - a broken default_factory
                problems.append(f"field {f.name!r}: default_factory failed ({type(exc).__name__}: {exc})")
                continue
        else:
            complete = False
            continue
        default = _plain(default)
        issues: list[ConfigIssue] = []
        _coerce(default, tp, f.name, issues)
        if issues:
            problems.append(f"field {f.name!r}: its default {f.default if f.default is not MISSING else default!r} "
                            f"is not {type_name(tp)} ({issues[0].message})")
    if complete and not problems:
        try:
            cls()
        except (TypeError, ValueError) as exc:
            problems.append(f"its default values fail its own checks: {exc}")
    return problems


def parse_config(cls: type, data: Mapping[str, Any]) -> tuple[Any, list[ConfigIssue]]:
    """Validate ``data`` against the dataclass ``cls``.

    Returns ``(instance, [])`` on success, or ``(None, issues)`` listing every unknown key, missing required key and
    wrong type. A ``__post_init__`` that raises ``ValueError``/``TypeError`` becomes an issue too.

    A config class may name keys it no longer has in a class attribute ``REMOVED_KEYS: ClassVar[Mapping[str,
    tuple[object, str]]]`` (key -> (its old default, what to do instead)): such a key holding its old default is
    ignored (the resolved recipes of earlier runs hold it), any other value is an issue "was removed" with the fix.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    issues: list[ConfigIssue] = []
    instance = _parse(cls, data, "", issues)
    return (None, issues) if issues else (instance, [])


def describe_config(cls: type) -> list[FieldInfo]:
    """The fields of config class ``cls`` with their types, defaults and docs, in declaration order."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not MISSING:
            default, required = f.default, False
        elif f.default_factory is not MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        out.append(FieldInfo(f.name, type_name(hints[f.name]), default, required, f.metadata.get(_DOC, "")))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config instance as plain data (lists for tuples, dicts for nested configs), in field order."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
