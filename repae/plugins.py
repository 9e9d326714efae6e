"""The plugin host: find plugins through entry points, load each on its own, collect what they register.

Every plugin, built-in or third-party, is an entry point in the ``repae`` group. Loading one never stops the others:
a plugin that fails to import, implements an unknown (misspelled) hook, or registers something invalid is recorded as
a :class:`PluginFailure` and reported by ``repae plugins`` (and on stderr by the CLI). Environment variables:

``REPAE_PLUGINS``
    Comma-separated plugin (entry-point) or distribution names to load; every other plugin is left out. Set it to the
    empty string to load none. Unset: load all. Use it for reproducible runs.
``REPAE_DISABLE_PLUGINS``
    Comma-separated plugin or distribution names never to load.
``REPAE_STRICT_PLUGINS``
    ``1`` turns every plugin failure into an error (:class:`repae.errors.PluginError`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Protocol

import pluggy

from repae import hookspecs
from repae.errors import PluginError, RepaeError, did_you_mean
from repae.registry import (
    BUILTIN_DISTRIBUTION,
    Clash,
    ComponentEntry,
    PluginInfo,
    Registry,
    validate_entry,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "LoadedPlugin",
    "PluginFailure",
    "PluginHost",
    "Register",
    "load_plugins",
]

ENTRY_POINT_GROUP = "repae"
ENV_SELECT = "REPAE_PLUGINS"
ENV_DISABLE = "REPAE_DISABLE_PLUGINS"
ENV_STRICT = "REPAE_STRICT_PLUGINS"


class Register(Protocol):
    """The callback a ``register_components`` hook receives."""

    def __call__(
        self,
        kind: str,
        name: str,
        *,
        summary: str,
        config: type,
        factory: Callable[..., Any] | str,
        presets: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why."""

    name: str
    distribution: str | None
    version: str | None
    stage: str
    """``import``, ``hooks`` (unknown/misspelled hook, bad signature) or ``register``."""
    error: str

    def __str__(self) -> str:
        where = f" ({' '.join(filter(None, (self.distribution, self.version)))})" if self.distribution else ""
        return f"plugin '{self.name}'{where} failed at {self.stage}: {self.error}"


@dataclass
class LoadedPlugin:
    """A plugin that loaded, with the hooks it implements and the components it registered."""

    info: PluginInfo
    hooks: list[str] = field(default_factory=list)
    components: list[tuple[str, str]] = field(default_factory=list)


def _env_names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _strict_from_env() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() in {"1", "true", "yes", "on"}


class PluginHost:
    """Owns one pluggy ``PluginManager`` and the :class:`Registry` its plugins fill."""

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, LoadedPlugin] = {}
        self.failures: list[PluginFailure] = []
        self._in_process = 0

    # -- loading ---------------------------------------------------------------------------------------------------
    def load_entry_points(
        self,
        entry_points: Iterable[metadata.EntryPoint] | None = None,
        *,
        select: set[str] | None = None,
        disable: set[str] | None = None,
    ) -> None:
        """Load plugins from entry points (default: the installed ``repae`` group), one at a time."""
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        seen: set[tuple[str, str]] = set()
        available: list[metadata.EntryPoint] = []
        for ep in entry_points:
            if (ep.name, ep.value) not in seen:  # the same distribution found twice on sys.path
                seen.add((ep.name, ep.value))
                available.append(ep)
        disable = disable or set()

        def dist_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
            dist = getattr(ep, "dist", None)
            return (dist.metadata["Name"], dist.version) if dist is not None else (None, None)

        def installed(ep: metadata.EntryPoint, dist_name: str | None) -> float:
            """When the distribution was installed (its metadata folder's time): earlier plugins keep plain names
            in a clash; repae's own distribution always comes first."""
            if dist_name == BUILTIN_DISTRIBUTION:
                return -math.inf
            path = getattr(getattr(ep, "dist", None), "_path", None)  # importlib.metadata.PathDistribution
            try:
                return os.stat(path).st_mtime if path is not None else math.inf
            except OSError:
                return math.inf

        if select is not None:
            known = {ep.name for ep in available} | {d for ep in available if (d := dist_of(ep)[0])}
            for missing in sorted(select - known):
                self._fail(
                    PluginFailure(
                        missing, None, None, "import",
                        f"{ENV_SELECT} names it, but no installed plugin or distribution is called so."
                        f"{did_you_mean(missing, known)}",
                    )
                )
        for ep in sorted(available, key=lambda e: e.name):
            dist_name, dist_version = dist_of(ep)
            names = {ep.name, dist_name}
            if select is not None and not names & select:
                continue
            if names & disable:
                continue
            info = PluginInfo(ep.name, dist_name, dist_version, installed(ep, dist_name))
            if ep.name in self.plugins:
                self._fail(PluginFailure(ep.name, dist_name, dist_version, "import",
                                         f"another plugin is already loaded under the name '{ep.name}'"))
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import-time error of a third-party plugin
                self._fail(PluginFailure(ep.name, dist_name, dist_version, "import", f"{type(exc).__name__}: {exc}"))
                continue
            self.add_plugin(module, info)

    def add_plugin(self, plugin: object, info: PluginInfo | str) -> LoadedPlugin | None:
        """Register one plugin object (a module or any object with ``@hookimpl`` functions) and its components.

        Returns ``None`` (and records a failure) when the plugin is rejected. Tests use this with in-process plugins
        and undo it with :meth:`remove_plugin`.
        """
        if isinstance(info, str):
            self._in_process += 1
            info = PluginInfo(info, installed=1e300 + self._in_process)  # after every installed one, in order
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            self._fail(PluginFailure(info.name, info.distribution, info.version, "hooks", str(exc)))
            return None
        except ValueError as exc:  # already registered
            self._fail(PluginFailure(info.name, info.distribution, info.version, "hooks", str(exc)))
            return None
        unknown = [caller.name for caller in self.pm.get_hookcallers(plugin) or [] if not caller.has_spec()]
        if unknown:
            self.pm.unregister(plugin)
            specs = [name for name in dir(hookspecs) if callable(getattr(hookspecs, name, None))
                     and hasattr(getattr(hookspecs, name), "repae_spec")]
            msgs = [f"'{hook}' is not a repae hook.{did_you_mean(hook, specs)}" for hook in unknown]
            self._fail(PluginFailure(info.name, info.distribution, info.version, "hooks",
                                     " ".join(msgs) + f" Hooks: {', '.join(specs)}."))
            return None
        loaded = LoadedPlugin(info, hooks=sorted(c.name for c in self.pm.get_hookcallers(plugin) or []))
        try:
            self._register_components(plugin, loaded)
        except Exception as exc:  # a plugin's register hook may raise anything
            if getattr(exc, "repae_recorded", False):
                raise
            self.pm.unregister(plugin)
            self.registry.remove_plugin(info.name)
            message = str(exc) if isinstance(exc, RepaeError) else f"{type(exc).__name__}: {exc}"
            self._fail(PluginFailure(info.name, info.distribution, info.version, "register", message))
            return None
        self.plugins[info.name] = loaded
        return loaded

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and everything it registered."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.registry.remove_plugin(name)
        self.plugins.pop(name, None)

    def _register_components(self, plugin: object, loaded: LoadedPlugin) -> None:
        staged: list[ComponentEntry] = []

        def register(
            kind: str,
            name: str,
            *,
            summary: str,
            config: type,
            factory: Callable[..., Any] | str,
            presets: Mapping[str, Mapping[str, Any]] | None = None,
        ) -> None:
            entry = ComponentEntry(
                kind=kind, name=name, summary=summary.strip() if isinstance(summary, str) else summary,
                config=config, factory=factory, plugin=loaded.info, presets=dict(presets or {}),
            )
            validate_entry(entry)
            staged.append(entry)

        for impl in self.pm.hook.register_components.get_hookimpls():
            if impl.plugin is plugin:
                kwargs = {"register": register}
                impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        added: list[ComponentEntry] = []
        try:
            for entry in staged:
                self.registry.add(entry)
                added.append(entry)
        except PluginError:
            for entry in added:
                self.registry.remove_plugin(entry.plugin.name)
            raise
        loaded.components.extend((entry.kind, entry.name) for entry in staged)

    @property
    def clashes(self) -> list[Clash]:
        """Names several plugins registered: who keeps the plain name and how to reach the others."""
        return self.registry.clashes

    def _fail(self, failure: PluginFailure) -> None:
        self.failures.append(failure)
        if self.strict:
            error = PluginError(f"{failure}\n(unset {ENV_STRICT} to load the other plugins and report this one)")
            error.repae_recorded = True  # type: ignore[attr-defined]
            raise error


def load_plugins(
    *,
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    select: Iterable[str] | None = None,
    disable: Iterable[str] | None = None,
    strict: bool | None = None,
) -> PluginHost:
    """Discover and load plugins, returning a :class:`PluginHost` whose ``registry`` holds their components.

    Arguments left as ``None`` come from the environment (``REPAE_PLUGINS``, ``REPAE_DISABLE_PLUGINS``,
    ``REPAE_STRICT_PLUGINS``); see the module docstring.
    """
    host = PluginHost(strict=_strict_from_env() if strict is None else strict)
    chosen = set(select) if select is not None else _env_names(os.environ.get(ENV_SELECT))
    blocked = set(disable) if disable is not None else (_env_names(os.environ.get(ENV_DISABLE)) or set())
    host.load_entry_points(entry_points, select=chosen, disable=blocked)
    return host
