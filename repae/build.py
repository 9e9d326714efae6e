"""Building components from a validated recipe.

A factory is called as ``factory(config, context)``. The :class:`BuildContext` tells it where to build (``meta``
for dry runs: no memory, no weights), whether to load pretrained weights, and which components were built before it
(a denoiser reads the latent channels of the tokenizer and the embedding sizes of the encoders from there when its
config leaves them to ``null``). It never sees the recipe.

Build order is the order of the recipe's component slots (:data:`repae.recipe.SLOTS`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from repae.errors import ComponentBuildError, UserError

if TYPE_CHECKING:
    from repae.recipe import ResolvedRecipe

__all__ = [
    "BuildContext",
    "BuiltComponent",
    "build_component",
    "build_recipe",
    "component_seed",
    "count_parameters",
]


@dataclass
class BuildContext:
    """What a factory may know besides its own config."""

    device: str = "cpu"
    """Target device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"meta"`` (shape-only, for dry runs)."""
    load_weights: bool = True
    """Load pretrained weights named in the config. Always false on ``meta``."""
    built: Mapping[str, Any] = field(default_factory=dict)
    """Components built earlier in this build, by slot: ``tokenizer``, ``encoders`` (a list), ``denoiser``, ..."""
    seed: int = 0
    """The recipe's seed."""

    def __post_init__(self) -> None:
        if self.device == "meta":
            self.load_weights = False


@dataclass
class BuiltComponent:
    """A built component with where it came from (slot, label, registry entry)."""

    slot: str
    label: str
    entry: Any
    config: Any
    component: Any

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


def build_component(entry: Any, config: Any, context: BuildContext, *, label: str | None = None) -> Any:
    """Call an entry's factory under ``context.device`` (as the default device for new tensors). With ``label`` the
    global torch RNG is seeded from (recipe seed, label) first, so random initialisation is reproducible."""
    factory = entry.load_factory()
    try:
        import torch

        if label is not None:
            torch.manual_seed(component_seed(context.seed, label))
        with torch.device(context.device):
            return factory(config, context)
    except UserError:
        raise
    except ValueError as exc:
        raise ComponentBuildError(f"{entry.kind} '{entry.name}' rejected its config: {exc}") from exc


def build_recipe(recipe: ResolvedRecipe, *, device: str = "cpu") -> list[BuiltComponent]:
    """Build every component of a resolved recipe, in slot order, each with its own seeded initialisation.

    ``context.built`` grows as components are built: ``built[slot]`` is the component for a ``one`` slot, a list for
    a ``list`` slot and a dict by label for a ``named`` slot.
    """
    built: dict[str, Any] = {}
    out: list[BuiltComponent] = []
    for spec in recipe.components:
        context = BuildContext(device=device, built=dict(built), seed=recipe.seed)
        component = build_component(spec.entry, spec.config, context, label=spec.label)
        out.append(BuiltComponent(spec.slot, spec.label, spec.entry, spec.config, component))
        if spec.key is None:
            built[spec.slot] = component
        elif isinstance(spec.key, int):
            built.setdefault(spec.slot, []).append(component)
        else:
            built.setdefault(spec.slot, {})[spec.key] = component
    return out
