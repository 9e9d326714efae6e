"""The component registry: what plugins registered, looked up by kind and name.

An entry is metadata plus a *lazy* factory: listing, showing and validating read only the entry and its config class
(plain dataclasses), so ``repae list`` never imports torch or a model module. The factory is imported on the first
build. A :class:`Registry` is an ordinary object built by :func:`repae.plugins.load_plugins`; there is no module-level
registry.

Names and clashes
-----------------
A component is found by ``(kind, name)``. When two plugins register the same name, both stay reachable: the plain name
keeps meaning the component of the plugin that was there first (repae's own distribution first, then the distribution
installed earliest), so installing a plugin never changes what an existing recipe builds; the newcomer's component is
reachable by its *qualified name* ``DISTRIBUTION:NAME`` (or ``PLUGIN:NAME`` for a plugin without a distribution), and
the clash is reported against the newcomer (:attr:`Registry.clashes`, ``repae plugins``).

Presets
-------
A component may register named presets (``{"XL/2": {"depth": 28, ...}}``). They are selected by the config field
:data:`PRESET_FIELD` (``size``), the one selector name of every component; the values of a preset fill the fields a
recipe does not set explicitly.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from repae.config import (
    ConfigIssue,
    _coerce,
    _hints,
    check_config_class,
    parse_config,
    type_name,
)
from repae.errors import PluginError, UnknownComponentError, did_you_mean

__all__ = ["KINDS", "PRESET_FIELD", "Clash", "ComponentEntry", "PluginInfo", "Registry", "validate_entry"]

KINDS: Mapping[str, str] = MappingProxyType(
    {
        "tokenizer": "image <-> latent autoencoders (encode to a posterior, decode latents)",
        "denoiser": "diffusion transformers predicting velocity / noise from noisy latents",
        "encoder": "frozen representation encoders giving REPA alignment targets",
        "normalizer": "latent normalisation between tokenizer and denoiser",
        "loss": "loss components returning named terms and the parts they may update",
        "dataset": "image / latent datasets",
        "sampler": "samplers turning noise into latents with a denoiser",
        "metric": "evaluation metrics over generated images",
        "tracker": "experiment trackers receiving a run's metrics, recipe and sample grids (TensorBoard, W&B)",
        "trainer": "training loops that run a recipe",
    }
)
"""Every component kind, with what it is for. Registering any other kind is an error."""

PRESET_FIELD = "size"
"""The config field that selects a component's preset (``size: XL/2``, ``size: f8d4``, ``size: vit-b14``)."""

BUILTIN_DISTRIBUTION = "repae"
"""The distribution whose plugins are repae's own; its components keep their plain names in a clash."""

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-._][a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginInfo:
    """Who provided a component: the plugin (entry-point) name and the distribution it came from.

    ``installed`` orders plugins in a name clash: the smaller value keeps the plain name (``-inf`` for repae's own
    distribution, the install time of the distribution otherwise, ``inf`` for plugins added in-process).
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    installed: float = math.inf

    @property
    def label(self) -> str:
        """``"repae 0.1.0"`` for an installed distribution, the plugin name for an in-process one."""
        if self.distribution:
            return f"{self.distribution} {self.version}" if self.version else self.distribution
        return self.name

    @property
    def qualifier(self) -> str:
        """What qualifies this plugin's component names: the distribution, else the plugin name."""
        return self.distribution or self.name

    def precedence(self) -> tuple[float, str, str]:
        return (self.installed, self.qualifier, self.name)


@dataclass(frozen=True)
class ComponentEntry:
    """One registered component.

    ``factory`` is either a callable ``factory(config, context) -> component`` or an import path
    ``"package.module:function"`` resolved on first use. ``presets`` maps a preset name (``"XL/2"``) to field values,
    selected by the config field :data:`PRESET_FIELD`; keys a recipe sets explicitly win over the preset.
    """

    kind: str
    name: str
    summary: str
    config: type
    factory: Callable[..., Any] | str
    plugin: PluginInfo
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def qualified_name(self) -> str:
        """``DISTRIBUTION:NAME``: reaches this very component even when another plugin uses the same name."""
        return f"{self.plugin.qualifier}:{self.name}"

    def load_factory(self) -> Callable[..., Any]:
        """Import (if needed) and return the factory. A broken import names the component and plugin."""
        if callable(self.factory):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"{self.kind} '{self.name}' (plugin {self.plugin.label}) could not load its factory "
                f"{self.factory!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(obj):
            raise PluginError(f"{self.kind} '{self.name}' (plugin {self.plugin.label}): its factory {self.factory!r} "
                              f"is a {type(obj).__name__}, not a callable")
        return obj  # type: ignore[no-any-return]

    def default_preset(self) -> str | None:
        if not self.presets:
            return None
        f = {f.name: f for f in dataclasses.fields(self.config)}[PRESET_FIELD]
        return f.default if isinstance(f.default, str) else None

    def with_preset(self, section: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[ConfigIssue]]:
        """The section with the selected preset's values filled in under the keys it does not set."""
        data = dict(section)
        if not self.presets:
            return data, []
        preset = data.get(PRESET_FIELD, self.default_preset())
        if preset is None:
            return data, []
        if not isinstance(preset, str) or preset not in self.presets:
            hint = did_you_mean(str(preset), self.presets).strip() or (
                f"presets: {', '.join(self.presets)}; see `repae show {self.name}`"
            )
            return None, [ConfigIssue(PRESET_FIELD, f"unknown preset {preset!r}", hint)]
        return {**self.presets[preset], **data}, []

    def parse(self, section: Mapping[str, Any]) -> tuple[Any, list[ConfigIssue]]:
        """Validate a recipe section (without its ``name`` key) into a config instance, presets applied."""
        data, preset_issues = self.with_preset(section)
        if data is None:  # an unknown preset: still report what else is wrong with the section
            _, issues = parse_config(self.config, {k: v for k, v in section.items() if k != PRESET_FIELD})
            return None, [*preset_issues, *issues]
        config, issues = parse_config(self.config, data)
        if issues and self.presets and "variant" in section:
            issues = [ConfigIssue(i.path, i.message, f"presets are selected by `{PRESET_FIELD}` (renamed from "
                                  f"`variant`): write `{PRESET_FIELD}: {section['variant']}`")
                      if i.path == "variant" else i for i in issues]
        return config, issues

    def explicit_fields(self, section: Mapping[str, Any]) -> frozenset[str]:
        """The config fields a recipe section fixes: its own keys and those of its preset (the rest are defaults,
        which a component may derive from the components built before it; see :class:`repae.build.BuildContext`)."""
        data, _ = self.with_preset(section)
        return frozenset(data or section)


def validate_entry(entry: ComponentEntry) -> None:
    """Check what a plugin registered; raise ``PluginError`` with the problem and its fix."""
    who = f"plugin {entry.plugin.label} registered {entry.kind} '{entry.name}'"
    if entry.kind not in KINDS:
        raise PluginError(f"{who} with unknown kind.{did_you_mean(entry.kind, KINDS)} Kinds: {', '.join(KINDS)}")
    if not _NAME.match(entry.name):
        raise PluginError(f"{who}: names are lower-case words joined by '-', '.' or '_' (like 'sd-vae')")
    if not isinstance(entry.summary, str) or not entry.summary or "\n" in entry.summary.strip():
        raise PluginError(f"{who} without a one-line summary")
    if not (isinstance(entry.config, type) and dataclasses.is_dataclass(entry.config)):
        raise PluginError(f"{who}: config must be a dataclass type, got {entry.config!r}")
    if not (callable(entry.factory) or (isinstance(entry.factory, str) and ":" in entry.factory)):
        raise PluginError(f"{who}: factory must be a callable or a 'module:function' string, got {entry.factory!r}")
    fields = {f.name: f for f in dataclasses.fields(entry.config) if f.init}
    if "name" in fields:
        raise PluginError(f"{who}: its config has a field called 'name', which recipes use to pick the component")
    problems = check_config_class(entry.config)
    if problems:
        raise PluginError(f"{who} with config {entry.config.__name__}, which " + "; ".join(problems))
    if entry.presets:
        if PRESET_FIELD not in fields:
            raise PluginError(f"{who} with presets but its config {entry.config.__name__} has no field "
                              f"'{PRESET_FIELD}' to select them (add `{PRESET_FIELD}: str = option(<default preset>)`)")
        default = entry.default_preset()
        if default is not None and default not in entry.presets:
            raise PluginError(f"{who}: the default {PRESET_FIELD} {default!r} is not one of its presets "
                              f"({', '.join(entry.presets)})")
    hints = _hints(entry.config)
    for preset, values in entry.presets.items():
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise PluginError(f"{who}: preset {preset!r} sets unknown field(s) {unknown}")
        for key, value in values.items():
            issues: list[ConfigIssue] = []
            _coerce(value, hints[key], key, issues)
            if issues:
                raise PluginError(f"{who}: preset {preset!r} sets {key} to {value!r}, which is not "
                                  f"{type_name(hints[key])}")
        if not any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in values
                   for name, f in fields.items()):
            _, issues = entry.parse({PRESET_FIELD: preset})
            if issues:
                raise PluginError(f"{who}: preset {preset!r} fails the config's checks: "
                                  + "; ".join(f"{i.path}: {i.message}" for i in issues))


@dataclass(frozen=True)
class Clash:
    """Several plugins registered the same ``(kind, name)``: ``winner`` keeps the plain name, ``others`` are reachable
    by their qualified names."""

    kind: str
    name: str
    winner: ComponentEntry
    others: tuple[ComponentEntry, ...]

    def __str__(self) -> str:
        who = ", ".join(f"plugin '{e.plugin.name}' ({e.plugin.label})" for e in self.others)
        reach = ", ".join(f"'{e.qualified_name}'" for e in self.others)
        return (f"{who} also registers {self.kind} '{self.name}', which plugin '{self.winner.plugin.name}' "
                f"({self.winner.plugin.label}) already provides: recipes naming '{self.name}' keep using that one; "
                f"name {reach} to use the newcomer")


class Registry:
    """Components by ``(kind, name)``. Built by the plugin host; usable on its own in tests."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[ComponentEntry]] = {}

    # -- writing ---------------------------------------------------------------------------------------------------
    def add(self, entry: ComponentEntry) -> Clash | None:
        """Add a validated entry. A name another plugin registered before keeps its owner (the one that comes first
        by :meth:`PluginInfo.precedence`); the clash is returned (and listed in :attr:`clashes`)."""
        validate_entry(entry)
        key = (entry.kind, entry.name)
        same = self._entries.setdefault(key, [])
        if any(e.plugin.name == entry.plugin.name for e in same):
            raise PluginError(f"plugin {entry.plugin.label} registers {entry.kind} '{entry.name}' twice")
        same.append(entry)
        same.sort(key=lambda e: e.plugin.precedence())
        return self._clash(key)

    def remove_plugin(self, plugin_name: str) -> list[ComponentEntry]:
        """Remove everything a plugin registered (used when unregistering in-process plugins)."""
        removed: list[ComponentEntry] = []
        for key, entries in list(self._entries.items()):
            kept = [e for e in entries if e.plugin.name != plugin_name]
            removed.extend(e for e in entries if e.plugin.name == plugin_name)
            if kept:
                self._entries[key] = kept
            else:
                del self._entries[key]
        return removed

    def _clash(self, key: tuple[str, str]) -> Clash | None:
        entries = self._entries.get(key, [])
        return Clash(key[0], key[1], entries[0], tuple(entries[1:])) if len(entries) > 1 else None

    # -- reading ---------------------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> ComponentEntry:
        """The entry for ``(kind, name)``; ``name`` may be qualified (``DISTRIBUTION:NAME`` or ``PLUGIN:NAME``).
        Unknown names raise with the closest names and the command to list."""
        qualifier, sep, plain = name.rpartition(":")
        entries = self._entries.get((kind, plain if sep else name), [])
        if not sep:
            if entries:
                return entries[0]
            raise UnknownComponentError(kind, name, self.names(kind))
        for entry in entries:
            if qualifier in (entry.plugin.distribution, entry.plugin.name):
                return entry
        if entries:
            known = ", ".join(e.qualified_name for e in entries)
            raise UnknownComponentError(kind, name, [e.qualified_name for e in entries],
                                        detail=f"{kind} '{plain}' is provided by {known}")
        raise UnknownComponentError(kind, name, self.names(kind))

    def find(self, name: str, kind: str | None = None) -> list[ComponentEntry]:
        """Every entry called ``name`` (of ``kind`` if given; a qualified name picks one plugin's); raises
        ``UnknownComponentError`` when there is none."""
        kinds = [kind] if kind is not None else list(KINDS)
        hits = []
        for k in kinds:
            try:
                hits.append(self.get(k, name))
            except UnknownComponentError:
                continue
        if not hits:
            raise UnknownComponentError(kind, name, self.names(kind))
        return hits

    def names(self, kind: str | None = None) -> list[str]:
        """Plain names (and the qualified names of components that lost a clash)."""
        out = set()
        for (k, n), entries in self._entries.items():
            if kind is None or k == kind:
                out.add(n)
                out.update(e.qualified_name for e in entries[1:])
        return sorted(out)

    def entries(self, kind: str | None = None, *, shadowed: bool = True) -> list[ComponentEntry]:
        """Entries sorted by kind (in :data:`KINDS` order) then name; with ``shadowed`` also those reachable only by
        their qualified name (after the one owning the plain name)."""
        order = list(KINDS)
        chosen = [e for (k, _), entries in self._entries.items() if kind is None or k == kind
                  for e in (entries if shadowed else entries[:1])]
        return sorted(chosen, key=lambda e: (order.index(e.kind), e.name, e.plugin.precedence()))

    def is_shadowed(self, entry: ComponentEntry) -> bool:
        """Whether ``entry`` lost a name clash (it is reachable only by its qualified name)."""
        entries = self._entries.get((entry.kind, entry.name), [])
        return bool(entries) and entries[0] is not entry and entry in entries

    @property
    def clashes(self) -> list[Clash]:
        return [c for key in sorted(self._entries) if (c := self._clash(key)) is not None]

    def __iter__(self) -> Iterator[ComponentEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def __contains__(self, key: object) -> bool:
        return key in self._entries
