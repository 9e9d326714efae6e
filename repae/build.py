"""Building components: from a validated config (a recipe section, or keyword arguments to :func:`create`).

A factory is called as ``factory(config, context)``. The :class:`BuildContext` tells it where to build (``meta`` for
dry runs: no memory, no weights, no data), whether to load pretrained weights, and which components were built before
it. It never sees the recipe. Build order is the order of the recipe's component slots
(:data:`repae.recipe.SLOTS`): dataset, tokenizer, encoders, latent_norm, denoiser, losses, sampler, metrics, trackers,
trainer.

**Derived fields.** Values that follow from other components are derived unless the recipe sets them: a config class
may define ``derive(self, context) -> Mapping[str, object]``, returning values for its fields computed from the
components built before it (the denoiser's ``input_size`` from the dataset's resolution and the tokenizer's
downsampling, its ``in_channels`` from the tokenizer, its projector widths from the encoders; a normaliser's
``channels``). The core applies those for the fields the recipe left unset (:attr:`repae.recipe.ComponentSpec.explicit`)
before calling the factory, checks them like recipe values, and records them in the run's resolved recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repae.config import ConfigIssue, _coerce, _hints, config_to_dict, type_name
from repae.errors import ComponentBuildError, Problem, RecipeError, UserError

if TYPE_CHECKING:
    from repae.recipe import ComponentSpec, ResolvedRecipe
    from repae.registry import ComponentEntry, Registry

__all__ = [
    "BuildContext",
    "BuiltComponent",
    "build_component",
    "build_recipe",
    "component_seed",
    "count_parameters",
    "create",
    "current_build",
    "derive_config",
    "latent_shape",
]


@dataclass
class BuildContext:
    """What a factory (and a config's ``derive``) may know besides its own config.

    The components built before it are in :attr:`built` by recipe slot and through the typed accessors below
    (``None`` / empty when the recipe has none).
    """

    device: str = "cpu"
    """Target device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"meta"`` (shape-only, for dry runs)."""
    load_weights: bool = True
    """Load pretrained weights named in the config. Always false on ``meta``."""
    built: Mapping[str, Any] = field(default_factory=dict)
    """Components built earlier, by slot: ``dataset``, ``tokenizer``, ``encoders`` (a list), ``latent_norm``,
    ``denoiser``, ``losses`` (a dict by label), ``sampler``, ``metrics`` (a list), ``trackers`` (a list)."""
    seed: int = 0
    """The recipe's seed."""
    names: Mapping[str, str] = field(default_factory=dict)
    """The registered (or qualified) name of each component built so far, by slot label (``losses.repa``: ``repa``):
    for messages and plans."""

    def __post_init__(self) -> None:
        if self.device == "meta":
            self.load_weights = False

    @property
    def dry_run(self) -> bool:
        """Shape-only build (``meta``): touch no weights and no data (a dataset may read a small index)."""
        return self.device == "meta"

    @property
    def dataset(self) -> Any:
        return self.built.get("dataset")

    @property
    def tokenizer(self) -> Any:
        return self.built.get("tokenizer")

    @property
    def encoders(self) -> list[Any]:
        encoders = self.built.get("encoders") or []
        return list(encoders.values()) if isinstance(encoders, Mapping) else list(encoders)

    @property
    def normalizer(self) -> Any:
        return self.built.get("latent_norm")

    @property
    def denoiser(self) -> Any:
        return self.built.get("denoiser")

    @property
    def losses(self) -> dict[str, Any]:
        return dict(self.built.get("losses") or {})

    @property
    def sampler(self) -> Any:
        return self.built.get("sampler")

    def describe(self) -> str:
        """What the components built so far say about shapes, for messages about derived fields."""
        parts = []
        dataset, tokenizer = self.dataset, self.tokenizer
        if dataset is not None:
            if getattr(dataset, "kind", None) == "latents":
                parts.append(f"the latent cache's latents {list(getattr(dataset, 'latent_shape', None) or [])}")
            else:
                parts.append(f"dataset.resolution {getattr(dataset, 'resolution', '?')} px")
        if tokenizer is not None:
            parts.append(f"the tokenizer's downsampling {tokenizer.downsample} and {tokenizer.latent_channels} latent "
                         "channels")
        if self.encoders:
            parts.append(f"the encoders' widths {[int(e.embed_dim) for e in self.encoders]}")
        return ", ".join(parts) or "no component"

    def latent_shape(self) -> tuple[int, int, int] | None:
        """``(C, h, w)`` of the latents the denoiser will see, from the components built so far
        (:func:`latent_shape`)."""
        return latent_shape(self.dataset, self.tokenizer)

    def latent_channels(self) -> int | None:
        """``C`` of the latents: :meth:`latent_shape`'s, else the tokenizer's ``latent_channels`` (known even when the
        resolution does not tile); ``None`` without either."""
        shape = self.latent_shape()
        if shape is not None:
            return shape[0]
        return int(self.tokenizer.latent_channels) if self.tokenizer is not None else None


def latent_shape(dataset: Any, tokenizer: Any) -> tuple[int, int, int] | None:
    """``(C, h, w)`` of the latents a denoiser trains on, from the contracts of the dataset and the tokenizer (no data
    is read): a latents dataset's ``latent_shape``, else the tokenizer's ``latent_channels`` and the dataset's
    ``resolution`` divided by the tokenizer's ``downsample``. ``None`` when they do not tell (no dataset, a cache that
    is not there, or a resolution that the factor does not divide: :mod:`repae.compose` reports those)."""
    if dataset is not None and getattr(dataset, "kind", None) == "latents":
        shape = getattr(dataset, "latent_shape", None)
        return (int(shape[0]), int(shape[1]), int(shape[2])) if shape else None
    resolution = getattr(dataset, "resolution", None) if dataset is not None else None
    if tokenizer is None or not resolution:
        return None
    f, channels = int(tokenizer.downsample), int(tokenizer.latent_channels)
    if f < 1 or resolution % f:
        return None
    return channels, resolution // f, resolution // f


@dataclass
class BuiltComponent:
    """A built component with where it came from (slot, label, registry entry, the config it was built with)."""

    slot: str
    label: str
    entry: Any
    config: Any
    component: Any
    derived: frozenset[str] = frozenset()

    @property
    def num_parameters(self) -> int | None:
        return count_parameters(self.component)


def count_parameters(component: Any) -> int | None:
    """Total number of parameters of an ``nn.Module`` (``None`` for anything without ``parameters()``)."""
    params = getattr(component, "parameters", None)
    if not callable(params):
        return None
    return sum(p.numel() for p in params())


def component_seed(seed: int, label: str) -> int:
    """The seed a component's random initialisation uses: a function of the recipe seed and the component's slot
    label only, so that adding or removing one component leaves the initial weights of the others unchanged."""
    return (seed * 1_000_003 + zlib.crc32(label.encode())) % (2**63 - 1)


def derive_config(config: Any, explicit: Iterable[str], context: BuildContext, *, what: str) -> tuple[Any, frozenset[str]]:
    """``config`` with the values its ``derive(context)`` proposes for the fields not in ``explicit``; returns the new
    config and the fields derived (every one proposed, whether or not it differs from the default). A proposal that
    is not of its field's type is the plugin's bug (:class:`ComponentBuildError`); a derived config that fails its
    own checks is the user's (the message names the fields that were derived)."""
    derive = getattr(config, "derive", None)
    if not callable(derive):
        return config, frozenset()
    proposals = dict(derive(context) or {})
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    explicit = set(explicit)
    changes: dict[str, Any] = {}
    derived: set[str] = set()
    hints = _hints(type(config))
    for name, value in proposals.items():
        if name not in fields:
            raise ComponentBuildError(f"{what}: its config's derive() proposes {name!r}, which is not a field")
        if name in explicit:
            continue
        issues: list[ConfigIssue] = []
        value = _coerce(value, hints[name], name, issues)
        if issues:
            raise ComponentBuildError(f"{what}: derive() proposes {name}={value!r}, which is not {type_name(hints[name])}")
        derived.add(name)  # derived even when it equals the default: the value came from the context
        if getattr(config, name) != value:
            changes[name] = value
    if not changes:
        return config, frozenset(derived)
    try:
        return dataclasses.replace(config, **changes), frozenset(derived)
    except (TypeError, ValueError) as exc:
        values = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        raise ComponentBuildError(
            f"{what}: {exc}. The values {values} were derived from {context.describe()}: change those (e.g. "
            f"dataset.resolution), or set the field(s) in the recipe"
        ) from exc


def build_component(
    entry: ComponentEntry,
    config: Any,
    context: BuildContext,
    *,
    label: str | None = None,
    explicit: Iterable[str] | None = None,
) -> Any:
    """Build ``entry`` with ``config`` under ``context.device`` (the default device for new tensors). With
    ``explicit`` (the fields a recipe sets), the config's other fields are first derived (:func:`derive_config`);
    with ``label`` the global torch RNG is seeded from (recipe seed, label), so random initialisation is
    reproducible. A ``ValueError`` from the factory becomes a :class:`ComponentBuildError` naming the component."""
    return _build(entry, config, context, label=label, explicit=explicit)[0]


_BUILDING: ContextVar[tuple[str, Any] | None] = ContextVar("repae_building", default=None)


def current_build() -> tuple[str, Any] | None:
    """``(label, config)`` of the component whose factory is running (``("tokenizer", config)``,
    ``("encoders.0", config)``, ``("losses.gan", config)``; :func:`create` labels by kind), ``None`` outside a
    factory. Set by the core around every factory call, so that what a factory calls can name the recipe key to
    change: :func:`repae.weights.resolve_weights` names ``<label>.<option>`` in its messages."""
    return _BUILDING.get()


@contextlib.contextmanager
def _building(label: str | None, config: Any) -> Iterator[None]:
    token = _BUILDING.set((label, config) if label is not None else None)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def _build(entry: ComponentEntry, config: Any, context: BuildContext, *, label: str | None,
           explicit: Iterable[str] | None) -> tuple[Any, Any, frozenset[str]]:
    what = f"{entry.kind} '{entry.name}'" + (f" ({label})" if label and label != entry.kind else "")
    derived: frozenset[str] = frozenset()
    if explicit is not None:
        config, derived = derive_config(config, explicit, context, what=what)
    factory = entry.load_factory()
    try:
        import torch

        if label is not None:
            torch.manual_seed(component_seed(context.seed, label))
        with torch.device(context.device), _building(label, config):
            component = factory(config, context)
    except UserError:
        raise
    except ValueError as exc:
        raise ComponentBuildError(f"{what} rejected its config: {exc}") from exc
    return component, config, derived


class RecipeBuild:
    """The components of a recipe as they are built one after the other: the :class:`BuildContext` each one gets
    (``context.built`` holds those built before it: the component for a ``one`` slot, a list for a ``list`` slot, a
    dict by label for a ``named`` slot) and the :class:`BuiltComponent` records. Used by :func:`build_recipe` and by
    the meta build of :func:`repae.compose.compose_recipe`."""

    def __init__(self, recipe: ResolvedRecipe, *, device: str = "cpu", load_weights: bool | None = None) -> None:
        self.recipe, self.device, self.load_weights = recipe, device, load_weights
        self.built: list[BuiltComponent] = []
        self._context_built: dict[str, Any] = {}
        self._names: dict[str, str] = {}

    def build(self, spec: ComponentSpec, *, device: str | None = None, load_weights: bool | None = None
              ) -> BuiltComponent:
        """Build ``spec`` in the context of the components added so far (not added itself: see :meth:`add`), on
        ``device`` and with ``load_weights`` when given (else the build's own)."""
        load = self.load_weights if load_weights is None else load_weights
        context = BuildContext(device=device or self.device, built=dict(self._context_built), seed=self.recipe.seed,
                               names=dict(self._names), **({} if load is None else {"load_weights": load}))
        component, config, derived = _build(spec.entry, spec.config, context, label=spec.label,
                                            explicit=spec.explicit)
        return BuiltComponent(spec.slot, spec.label, spec.entry, config, component, derived | spec.derived)

    def add(self, spec: ComponentSpec, built: BuiltComponent) -> None:
        """Make ``built`` visible to the components built after it."""
        self.built.append(built)
        self._names[spec.label] = spec.name
        if spec.key is None:
            self._context_built[spec.slot] = built.component
        elif isinstance(spec.key, int):
            self._context_built.setdefault(spec.slot, []).append(built.component)
        else:
            self._context_built.setdefault(spec.slot, {})[spec.key] = built.component


def build_recipe(
    recipe: ResolvedRecipe, *, device: str = "cpu", slots: Sequence[str] | None = None,
    load_weights: bool | None = None, progress: str | None = None,
) -> list[BuiltComponent]:
    """Build the components of a resolved recipe (those of ``slots`` only, when given), in slot order, each with its
    own seeded initialisation and its unset fields derived from the components built before it (see
    :class:`RecipeBuild`). ``progress``: the command's name, for progress lines on stderr naming the component
    being built and counting those built (loading a large model's weights takes a while), written only once building
    has taken 5 s; ``None``: silent."""
    from repae.reporting import progress as progress_bar

    run = RecipeBuild(recipe, device=device, load_weights=load_weights)
    specs = [spec for spec in recipe.components if slots is None or spec.slot in slots]
    # plain lines even in a terminal: a component may draw its own bar while it builds (a download's, an image scan's)
    with progress_bar(f"{progress}: build the components", len(specs), unit="component",
                      enabled=progress is not None, quiet_s=5.0, plain=True) as bar:
        for spec in specs:
            bar.update(bar.completed, text=f"building {spec.label}")
            run.add(spec, run.build(spec))
            bar.advance(1)
    return run.built


def with_built_configs(recipe: ResolvedRecipe, built: Sequence[BuiltComponent]) -> ResolvedRecipe:
    """``recipe`` whose component configs are the ones the components were built with (derived fields filled in and
    marked explicit, so that building it again derives nothing and its YAML records the values)."""
    by_label = {b.label: b for b in built}
    specs: list[ComponentSpec] = []
    for spec in recipe.components:
        b = by_label.get(spec.label)
        if b is None or not b.derived:
            specs.append(spec)
            continue
        specs.append(dataclasses.replace(spec, config=b.config, explicit=spec.explicit | b.derived,
                                         derived=spec.derived | b.derived))
    return recipe.replace(specs)


def create(
    kind: str,
    name: str,
    /,
    *,
    device: str = "cpu",
    load_weights: bool = True,
    built: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
    fields: Mapping[str, Any] | None = None,
    **more_fields: Any,
) -> Any:
    """Build one component as a recipe section ``{name: NAME, **fields}`` would be built: presets (``size=``),
    validation of every field (a :class:`~repae.errors.RecipeError` listing the problems), derived fields from
    ``built`` (components it depends on, by slot: ``{"tokenizer": vae}``), weights unless ``load_weights`` is false,
    under ``device``; its random initialisation is seeded as a recipe's with seed 0 would seed it. ``registry``
    defaults to the installed plugins (``REPAE_PLUGINS`` etc. honoured). Config fields are keyword arguments, or the
    mapping ``fields`` for one whose name is taken by an argument of ``create`` (``device``, ``built``, ...)::

        sit = repae.create("denoiser", "sit", size="S/2")
        vae = repae.create("tokenizer", "sd-vae", size="tiny")
        sit = repae.create("denoiser", "sit", size="S/2", built={"tokenizer": vae})   # in_channels from the VAE
    """
    fields = {**(fields or {}), **more_fields}
    from repae.registry import KINDS

    if kind not in KINDS:
        from repae.errors import did_you_mean

        raise UserError(f"unknown kind {kind!r}.{did_you_mean(kind, KINDS)} Kinds: {', '.join(KINDS)}")
    registry = registry if registry is not None else default_registry()
    entry = registry.get(kind, name)
    config, issues = entry.parse(fields)
    if issues:
        raise RecipeError([Problem(f"create({kind!r}, {name!r})", i.path, i.message, i.hint) for i in issues],
                          title=f"invalid fields for {kind} '{name}'")
    context = BuildContext(device=device, load_weights=load_weights, built=dict(built or {}))
    return build_component(entry, config, context, label=kind, explicit=entry.explicit_fields(fields))


def list_components(kind: str | None = None, *, registry: Registry | None = None) -> list[ComponentEntry]:
    """The registered components (of ``kind`` if given), sorted by kind and name: each entry has ``kind``, ``name``,
    ``qualified_name``, ``summary``, ``config`` (its dataclass), ``presets`` and ``plugin``."""
    from repae.registry import KINDS

    if kind is not None and kind not in KINDS:
        from repae.errors import did_you_mean

        raise UserError(f"unknown kind {kind!r}.{did_you_mean(kind, KINDS)} Kinds: {', '.join(KINDS)}")
    return (registry if registry is not None else default_registry()).entries(kind)


_HOSTS: dict[tuple[str | None, ...], Any] = {}


def default_registry() -> Registry:
    """The registry of the installed plugins, loaded once per selection (``REPAE_PLUGINS``,
    ``REPAE_DISABLE_PLUGINS``, ``REPAE_STRICT_PLUGINS``)."""
    import os

    from repae.plugins import ENV_DISABLE, ENV_SELECT, ENV_STRICT, load_plugins

    key = tuple(os.environ.get(name) for name in (ENV_SELECT, ENV_DISABLE, ENV_STRICT))
    if key not in _HOSTS:
        _HOSTS[key] = load_plugins()
    return _HOSTS[key].registry  # type: ignore[no-any-return]


def describe_derived(built: Sequence[BuiltComponent]) -> list[str]:
    """``["denoiser.input_size = 32", ...]``: the values derived while building, for messages and the dry run."""
    lines: list[str] = []
    for b in built:
        values = config_to_dict(b.config)
        lines.extend(f"{b.label}.{name} = {values[name]!r}" for name in sorted(b.derived))
    return lines
