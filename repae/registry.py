"""The component registry: what plugins registered, looked up by kind and name.

An entry is metadata plus a *lazy* factory: listing, showing and validating read only the entry and its config class
(plain dataclasses), so ``repae list`` never imports torch or a model module. The factory is imported on the first
build. A :class:`Registry` is an ordinary object built by :func:`repae.plugins.load_plugins`; there is no module-level
registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from repae.config import ConfigIssue, parse_config
from repae.errors import DuplicateComponentError, PluginError, UnknownComponentError, did_you_mean

__all__ = ["KINDS", "ComponentEntry", "PluginInfo", "Registry", "validate_entry"]

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
        "trainer": "training loops that run a recipe",
    }
)
"""Every component kind, with what it is for. Registering any other kind is an error."""

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-._][a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginInfo:
    """Who provided a component: the plugin (entry-point) name and the distribution it came from."""

    name: str
    distribution: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        """``"repae 0.1.0"`` for an installed distribution, the plugin name for an in-process one."""
        if self.distribution:
            return f"{self.distribution} {self.version}" if self.version else self.distribution
        return self.name


@dataclass(frozen=True)
class ComponentEntry:
    """One registered component.

    ``factory`` is either a callable ``factory(config, context) -> component`` or an import path
    ``"package.module:function"`` resolved on first use. ``presets`` maps a preset name (``"XL/2"``) to field values;
    the value of the config field ``preset_field`` selects one, and keys the user sets explicitly win over it.
    """

    kind: str
    name: str
    summary: str
    config: type
    factory: Callable[..., Any] | str
    plugin: PluginInfo
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    preset_field: str | None = None

    @property
    def qualified_name(self) -> str:
        return f"{self.kind}:{self.name}"

    def load_factory(self) -> Callable[..., Any]:
        """Import (if needed) and return the factory. A broken import names the component and plugin."""
        if callable(self.factory):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"{self.kind} '{self.name}' (plugin {self.plugin.label}) could not load its factory "
                f"{self.factory!r}: {type(exc).__name__}: {exc}"
            ) from exc
        return obj

    def default_preset(self) -> str | None:
        if not self.preset_field:
            return None
        f = {f.name: f for f in dataclasses.fields(self.config)}[self.preset_field]
        return f.default if f.default is not dataclasses.MISSING else None

    def parse(self, section: Mapping[str, Any]) -> tuple[Any, list[ConfigIssue]]:
        """Validate a recipe section (without its ``name`` key) into a config instance, presets applied."""
        data = dict(section)
        if self.preset_field:
            preset = data.get(self.preset_field, self.default_preset())
            if preset is not None:
                if preset not in self.presets:
                    hint = did_you_mean(str(preset), self.presets).strip() or (
                        f"presets: {', '.join(self.presets)}; see `repae show {self.name}`"
                    )
                    return None, [ConfigIssue(self.preset_field, f"unknown preset {preset!r}", hint)]
                data = {**self.presets[preset], **data}
        return parse_config(self.config, data)


def validate_entry(entry: ComponentEntry) -> None:
    """Check what a plugin registered; raise ``PluginError`` with the problem and its fix."""
    who = f"plugin {entry.plugin.label} registered {entry.kind} '{entry.name}'"
    if entry.kind not in KINDS:
        raise PluginError(f"{who} with unknown kind.{did_you_mean(entry.kind, KINDS)} Kinds: {', '.join(KINDS)}")
    if not _NAME.match(entry.name):
        raise PluginError(f"{who}: names are lower-case words joined by '-', '.' or '_' (like 'sd-vae')")
    if not entry.summary or "\n" in entry.summary.strip():
        raise PluginError(f"{who} without a one-line summary")
    if not (isinstance(entry.config, type) and dataclasses.is_dataclass(entry.config)):
        raise PluginError(f"{who}: config must be a dataclass type, got {entry.config!r}")
    if not (callable(entry.factory) or (isinstance(entry.factory, str) and ":" in entry.factory)):
        raise PluginError(f"{who}: factory must be a callable or a 'module:function' string, got {entry.factory!r}")
    names = {f.name for f in dataclasses.fields(entry.config)}
    if "name" in names:
        raise PluginError(f"{who}: its config has a field called 'name', which recipes use to pick the component")
    if entry.preset_field is not None and entry.preset_field not in names:
        raise PluginError(f"{who}: preset_field {entry.preset_field!r} is not a field of {entry.config.__name__}")
    if entry.presets and entry.preset_field is None:
        raise PluginError(f"{who} with presets but no preset_field naming the config field that selects them")
    for preset, values in entry.presets.items():
        unknown = sorted(set(values) - names)
        if unknown:
            raise PluginError(f"{who}: preset {preset!r} sets unknown field(s) {unknown}")


class Registry:
    """Components by ``(kind, name)``. Built by the plugin host; usable on its own in tests."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], ComponentEntry] = {}
        self._conflicts: dict[tuple[str, str], list[ComponentEntry]] = {}

    # -- writing ---------------------------------------------------------------------------------------------------
    def add(self, entry: ComponentEntry) -> None:
        """Add a validated entry. A name already taken raises ``DuplicateComponentError`` naming both providers,
        and the name stays unusable (no silent choice between the two) until one provider is removed."""
        validate_entry(entry)
        key = (entry.kind, entry.name)
        if key in self._conflicts:
            self._conflicts[key].append(entry)
            raise self._duplicate_error(key)
        if key in self._entries:
            self._conflicts[key] = [self._entries.pop(key), entry]
            raise self._duplicate_error(key)
        self._entries[key] = entry

    def remove_plugin(self, plugin_name: str) -> list[ComponentEntry]:
        """Remove everything a plugin registered (used when unregistering in-process plugins)."""
        removed = [e for e in self._entries.values() if e.plugin.name == plugin_name]
        for e in removed:
            del self._entries[(e.kind, e.name)]
        for key, entries in list(self._conflicts.items()):
            kept = [e for e in entries if e.plugin.name != plugin_name]
            if len(kept) == 1:
                del self._conflicts[key]
                self._entries[key] = kept[0]
            else:
                self._conflicts[key] = kept
        return removed

    def _duplicate_error(self, key: tuple[str, str]) -> DuplicateComponentError:
        providers = " and ".join(f"plugin '{e.plugin.name}' ({e.plugin.label})" for e in self._conflicts[key])
        return DuplicateComponentError(
            f"{key[0]} '{key[1]}' is registered twice, by {providers}. Uninstall one, or leave one out with "
            f"REPAE_DISABLE_PLUGINS=<plugin name>."
        )

    # -- reading ---------------------------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> ComponentEntry:
        """The entry for ``(kind, name)``; unknown names raise with the closest names and the command to list."""
        key = (kind, name)
        if key in self._entries:
            return self._entries[key]
        if key in self._conflicts:
            raise self._duplicate_error(key)
        raise UnknownComponentError(kind, name, self.names(kind))

    def find(self, name: str, kind: str | None = None) -> list[ComponentEntry]:
        """Every entry called ``name`` (of ``kind`` if given); raises ``UnknownComponentError`` when there is none."""
        hits = [e for (k, n), e in self._entries.items() if n == name and (kind is None or k == kind)]
        if not hits:
            conflicted = [key for key in self._conflicts if key[1] == name and (kind is None or key[0] == kind)]
            if conflicted:
                raise self._duplicate_error(conflicted[0])
            raise UnknownComponentError(kind, name, self.names(kind))
        return sorted(hits, key=lambda e: (list(KINDS).index(e.kind), e.name))

    def names(self, kind: str | None = None) -> list[str]:
        return sorted({n for (k, n) in self._entries if kind is None or k == kind})

    def entries(self, kind: str | None = None) -> list[ComponentEntry]:
        """Entries sorted by kind (in :data:`KINDS` order) then name."""
        order = list(KINDS)
        chosen = [e for e in self._entries.values() if kind is None or e.kind == kind]
        return sorted(chosen, key=lambda e: (order.index(e.kind), e.name))

    @property
    def conflicts(self) -> Mapping[tuple[str, str], list[ComponentEntry]]:
        return MappingProxyType(self._conflicts)

    def __iter__(self) -> Iterator[ComponentEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
