"""YAML recipes: loading with ``extends:``, command-line overrides, and validation against component configs.

A recipe is a mapping whose component *slots* (:data:`SLOTS`) name registered components and configure them::

    extends: _base/sit_xl.yaml          # one path or a list, relative to this file
    tokenizer: {name: sd-vae, weights: hf://REPA-E/sdvae}
    encoders:
      - {name: dinov2, variant: vit-b14}
    denoiser: {name: sit, size: XL/2}

Merging: later layers win; mappings merge key by key, lists are replaced whole, and ``null`` deletes a key (so the
component's default applies). A section that names a different component than the one it extends replaces it whole
(the other component's keys would not fit). Overrides ``a.b.c=value`` (value parsed as YAML; list items by index, ``encoders.0.x``)
are applied last, in order. Every problem (syntax, unknown keys, wrong types, unknown components, bad overrides) is
collected and raised at once as a :class:`repae.errors.RecipeError` naming file, line and key path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.nodes import MappingNode, SequenceNode

from repae.config import config_to_dict
from repae.errors import Problem, RecipeError, UserError, did_you_mean
from repae.registry import ComponentEntry, PluginInfo, Registry

__all__ = [
    "ComponentSpec",
    "RecipeSource",
    "ResolvedRecipe",
    "SLOTS",
    "Slot",
    "apply_overrides",
    "diff_keys",
    "flatten_recipe",
    "load_recipe",
    "load_source",
    "parse_override",
    "read_recipe",
    "resolve_recipe",
]

Path_ = tuple[Any, ...]  # a key path: strings for mapping keys, ints for list indices


MAX_RECIPE_BYTES = 1 << 20
"""The largest recipe file read (1 MiB; the shipped recipes are about 1 KiB)."""
MAX_DEPTH = 64
"""The deepest nesting of mappings and lists a recipe (or an override's value) may have."""
MAX_VALUES = 100_000
"""The most keys, list items and values a recipe file may expand to (YAML aliases repeat what they point at)."""


class _TooDeep(yaml.YAMLError):
    def __init__(self, mark: Any) -> None:
        super().__init__()
        self.problem = f"nested more than {MAX_DEPTH} levels deep (mappings and lists within each other)"
        self.problem_mark = mark


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a float (YAML 1.2) instead of a string (YAML 1.1), and refusing
    nesting deeper than :data:`MAX_DEPTH` before it recurses (PyYAML composes nested nodes recursively)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class Slot:
    """A top-level recipe key holding components of one kind.

    ``arity``: ``one`` (a mapping with ``name``, or just the name), ``list`` (a list of those) or ``named`` (a
    mapping from labels of your choice to those, e.g. ``losses: {repa: {name: repa, weight: 0.5}}``).
    """

    key: str
    kind: str
    arity: Literal["one", "list", "named"]
    doc: str


SLOTS: tuple[Slot, ...] = (
    Slot("dataset", "dataset", "one", "where images (or cached latents) come from"),
    Slot("tokenizer", "tokenizer", "one", "the VAE mapping images to latents and back"),
    Slot("encoders", "encoder", "list", "frozen representation encoders giving REPA targets"),
    Slot("latent_norm", "normalizer", "one", "normalisation of latents before the denoiser"),
    Slot("denoiser", "denoiser", "one", "the diffusion transformer"),
    Slot("losses", "loss", "named", "loss components by label"),
    Slot("sampler", "sampler", "one", "how samples are drawn during and after training"),
    Slot("metrics", "metric", "list", "evaluation metrics"),
    Slot("trackers", "tracker", "list", "experiment trackers that also receive the run's metrics, recipe and samples"),
    Slot("trainer", "trainer", "one", "the training loop and its settings"),
)
"""Component slots in build order."""

SCALARS: Mapping[str, tuple[type, str]] = {
    "description": (str, "free text describing the recipe"),
    "seed": (int, "global random seed (default 0)"),
}
"""Top-level keys that are plain values, with their type and meaning."""

_SLOT_BY_KEY = {s.key: s for s in SLOTS}
_TOP_LEVEL = [s.key for s in SLOTS] + list(SCALARS) + ["extends"]
_KEY = re.compile(r"^[A-Za-z_][\w\-/]*$|^\d+$")


# ---------------------------------------------------------------------------------------------------------------------
# Loading YAML with the line of every key
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class RecipeSource:
    """A recipe's raw data after extends and overrides, with where every key was set."""

    data: dict[str, Any]
    origins: dict[Path_, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    path: Path | None = None

    def where(self, path: Path_) -> str:
        """The file:line (or command-line override) that set ``path`` or its closest parent; when overrides changed
        keys inside ``path`` (a problem blamed on a whole section), those overrides too."""
        path = tuple(path)
        found = str(self.path) if self.path else "recipe"
        for n in range(len(path), -1, -1):
            if path[:n] in self.origins:
                found = self.origins[path[:n]]
                break
        if found.startswith("command line") or not path:
            return found
        inside = sorted({w for p, w in self.origins.items()
                         if len(p) > len(path) and p[: len(path)] == path and w.startswith("command line")})
        return f"{found}, changed by {', '.join(inside)}" if inside else found


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


class _TooBig(Exception):
    def __init__(self, mark: Any) -> None:
        super().__init__()
        self.mark = mark


def _parse_yaml(text: str, label: str, problems: list[Problem]) -> tuple[Any, dict[Path_, str]]:
    """Parse YAML text, recording ``label:line`` for every mapping key and list item."""
    origins: dict[Path_, str] = {}
    try:
        loader = RecipeLoader(text)  # reads ahead: a character YAML does not allow is an error here already
    except yaml.YAMLError as exc:
        position = getattr(exc, "position", None)
        where = f"{label}:{text.count(chr(10), 0, position) + 1}" if isinstance(position, int) else label
        reason = getattr(exc, "reason", None) or str(exc).replace("\n", " ")
        character = getattr(exc, "character", None)
        shown = f" (character U+{ord(character):04X})" if isinstance(character, str) and character else ""
        problems.append(Problem(where, "", f"not valid YAML: {reason}{shown}",
                                "remove the character; a recipe is plain YAML text"))
        return {}, {}
    count = [0]
    try:
        root = loader.get_single_node()

        def build(node: Any, path: Path_) -> Any:
            count[0] += 1
            if count[0] > MAX_VALUES:
                raise _TooBig(node.start_mark)
            tag = str(node.tag or "")
            if not tag.startswith("tag:yaml.org,2002:") or tag.startswith("tag:yaml.org,2002:python/"):
                shown = "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag
                problems.append(Problem(f"{label}:{node.start_mark.line + 1}", _dotted(path),
                                        f"the YAML tag {shown} is not allowed: a recipe holds plain data (mappings, "
                                        "lists, strings, numbers), never Python objects, imports or code",
                                        "remove the tag"))
                return None
            if isinstance(node, MappingNode):
                loader.flatten_mapping(node)
                out: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
                    where = f"{label}:{key_node.start_mark.line + 1}"
                    if not isinstance(key, (str, int)):
                        problems.append(Problem(where, _dotted(path), f"keys must be strings, got {key!r}"))
                        continue
                    if key in out:
                        problems.append(Problem(where, _dotted(path + (key,)), "key appears twice in this mapping"))
                    origins[path + (key,)] = where
                    out[key] = build(value_node, path + (key,))
                return out
            if isinstance(node, SequenceNode):
                items = []
                for i, item in enumerate(node.value):
                    origins[path + (i,)] = f"{label}:{item.start_mark.line + 1}"
                    items.append(build(item, path + (i,)))
                return items
            return loader.construct_object(node, deep=True)

        data = build(root, ()) if root is not None else None
    except _TooBig as exc:
        problems.append(Problem(f"{label}:{exc.mark.line + 1}", "", f"not a recipe: it expands to more than "
                                f"{MAX_VALUES} keys and values (YAML aliases `*name` repeat what their anchor holds)",
                                "write the values out, or use fewer aliases"))
        return {}, {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark else label
        reason = getattr(exc, "problem", None) or str(exc)
        problems.append(Problem(where, "", f"not valid YAML: {reason}"))
        return {}, {}
    except RecursionError:  # a safety net: MAX_DEPTH stops deep nesting well before Python's recursion limit
        problems.append(Problem(label, "", f"not a recipe: nested too deeply (at most {MAX_DEPTH} levels)"))
        return {}, {}
    finally:
        loader.dispose()
    return data, origins


# ---------------------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------------------


def _drop_origins(origins: dict[Path_, str], prefix: Path_) -> None:
    for p in [p for p in origins if p[: len(prefix)] == prefix]:
        del origins[p]


def _merge(dst: dict, src: Mapping, path: Path_, origins: dict[Path_, str], src_origins: Mapping[Path_, str]) -> None:
    """Deep-merge ``src`` into ``dst`` in place (lists replaced, ``None`` deletes), carrying origins along."""
    for key, value in src.items():
        here = path + (key,)
        if value is None:
            dst.pop(key, None)
            _drop_origins(origins, here)
        elif isinstance(value, Mapping) and isinstance(dst.get(key), dict) and not _switches_component(dst[key], value):
            if here in src_origins:
                origins[here] = src_origins[here]
            _merge(dst[key], value, here, origins, src_origins)
        else:
            dst[key] = copy.deepcopy(value)
            _drop_origins(origins, here)
            origins.update({p: w for p, w in src_origins.items() if p[: len(here)] == here})


def _switches_component(base: Mapping, layer: Mapping) -> bool:
    """A layer that names a different component replaces the section: the base's keys belong to another config."""
    return "name" in layer and "name" in base and layer["name"] != base["name"]


_SAVE_AS_UTF8 = "recipes are UTF-8 text: save the file as UTF-8 (in most editors: Save with Encoding > UTF-8)"


def _read_text(path: Path, label: str, problems: list[Problem]) -> str | None:
    """The text of a recipe file, or ``None`` with a problem appended: any bytes are handled (too large, compressed,
    binary, UTF-16, not UTF-8, NUL characters), each named with the file, the line where known, and the fix."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        problems.append(Problem(label, "", f"cannot read recipe: {exc.strerror or exc}"))
        return None
    if len(raw) > MAX_RECIPE_BYTES:
        problems.append(Problem(label, "", f"not a recipe: the file is larger than {MAX_RECIPE_BYTES >> 20} MiB",
                                "a recipe is a short YAML file; check that this is the file you meant"))
        return None
    if raw.startswith(b"\x1f\x8b"):
        problems.append(Problem(label, "", "not a recipe: the file is gzip-compressed", "decompress it (gunzip)"))
        return None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) >= 4 and b"\x00" in raw[:4] and raw[:4] != b"\x00" * 4):
        problems.append(Problem(label, "", "not a recipe: the file is UTF-16 (or UTF-32) text", _SAVE_AS_UTF8))
        return None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte order mark
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        sample = raw[:4096]
        binary = sum(b < 9 or 13 < b < 32 for b in sample) > len(sample) // 20
        what = ("a binary file" if binary else
                f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}, column {column}; latin-1 or "
                "Windows-1252, perhaps)")
        problems.append(Problem(f"{label}:{line}", "", f"not a recipe: {what}", _SAVE_AS_UTF8))
        return None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        problems.append(Problem(f"{label}:{line}", "", "not a recipe: the file holds a NUL character (byte 0)",
                                "remove it; a recipe is plain YAML text"))
        return None
    return text


def _load_file(path: Path, stack: list[Path], problems: list[Problem], files: list[Path]) -> RecipeSource:
    label = _display(path)
    text = _read_text(path, label, problems)
    if text is None:
        return RecipeSource({}, {}, files, path)
    files.append(path)
    before = len(problems)
    data, origins = _parse_yaml(text, label, problems)
    if data is None and len(problems) == before:
        problems.append(Problem(label, "", "not a recipe: the file is empty (or holds only comments)",
                                "a recipe maps keys to values, e.g. `extends: quickstart.yaml` then the keys to change"))
        return RecipeSource({}, {}, files, path)
    if not isinstance(data, dict):
        if len(problems) == before:
            problems.append(Problem(label, "", f"not a recipe: a recipe must be a mapping of keys to values, not "
                                    f"{'a list' if isinstance(data, list) else type(data).__name__}"))
        return RecipeSource({}, {}, files, path)
    extends = data.pop("extends", None)
    extends_where = origins.get(("extends",), label)
    _drop_origins(origins, ("extends",))
    merged: dict[str, Any] = {}
    merged_origins: dict[Path_, str] = {}
    bases = [extends] if isinstance(extends, str) else extends
    if extends is not None and not (
        isinstance(bases, list) and all(isinstance(b, str) for b in bases)
    ):
        problems.append(Problem(extends_where, "extends", "must be a path or a list of paths (relative to this file)"))
        bases = []
    for base in bases or []:
        try:
            base_path = (path.parent / Path(base).expanduser()).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL character, a symlink loop, ...
            problems.append(Problem(extends_where, "extends", f"{base!r} is not a usable path ({exc})",
                                    "paths are relative to the file that extends them"))
            continue
        if base_path in stack or base_path == path:
            chain = " -> ".join(_display(p) for p in [*stack, path, base_path])
            problems.append(Problem(extends_where, "extends", f"cycle: {chain}", "remove one of these extends"))
            continue
        if not base_path.is_file():
            what = "is a folder, not a recipe file" if base_path.is_dir() else "file not found"
            problems.append(
                Problem(extends_where, "extends", f"{what}: {base} (looked for {_display(base_path)})",
                        "paths are relative to the file that extends them")
            )
            continue
        layer = _load_file(base_path, [*stack, path], problems, files)
        _merge(merged, layer.data, (), merged_origins, layer.origins)
    _merge(merged, data, (), merged_origins, origins)
    return RecipeSource(merged, merged_origins, files, path)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[Path_, Any]:
    """Parse ``a.b.0.c=value`` into a key path and a YAML-parsed value; raises ``ValueError`` with the reason."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError("expected KEY.PATH=VALUE (no '=' found)")
    if not key:
        raise ValueError("the key before '=' is empty")
    parts = key.split(".")
    for part in parts:
        if not part or not _KEY.match(part):
            raise ValueError(f"{key!r} is not a valid key path (dot-separated names or list indices)")
    value = None
    if raw.strip():
        try:
            loader = RecipeLoader(raw)
        except yaml.YAMLError as exc:
            raise ValueError(f"value {_short(raw)} is not valid YAML ({exc}); quote it".replace("\n", " ")) from None
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, MAX_VALUES) > MAX_VALUES:
                raise ValueError(f"the value expands to more than {MAX_VALUES} items (YAML aliases)")
            value = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or "cannot be parsed"
            raise ValueError(f"value {_short(raw)} is not valid YAML ({reason}); quote it") from None
        finally:
            loader.dispose()
    return tuple(int(p) if p.isdigit() else p for p in parts), value


def _expanded_size(node: Any, limit: int) -> int:
    """How many nodes ``node`` stands for with every alias expanded, counting no further than just past ``limit``."""
    count, todo = 0, [node]
    while todo and count <= limit:
        n = todo.pop()
        count += 1
        if isinstance(n, MappingNode):
            for k, v in n.value:
                todo.extend((k, v))
        elif isinstance(n, SequenceNode):
            todo.extend(n.value)
    return count


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def apply_overrides(source: RecipeSource, overrides: Sequence[str], problems: list[Problem]) -> None:
    """Apply ``key.path=value`` overrides in order (in place); problems are appended, not raised."""
    for text in overrides:
        where = f"command line `{text}`"
        try:
            path, value = parse_override(text)
        except ValueError as exc:
            problems.append(Problem(where, "", f"bad override: {exc}", "write KEY.PATH=VALUE, e.g. denoiser.depth=12"))
            continue
        node: Any = source.data
        ok = True
        for i, part in enumerate(path[:-1]):
            prefix = path[: i + 1]
            if isinstance(node, dict):
                if part not in node or node[part] is None:
                    node[part] = {}
                    source.origins[prefix] = where  # a key the override creates comes from the command line
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int):
                if part >= len(node):
                    problems.append(Problem(where, _dotted(prefix), f"index {part} is out of range (list has "
                                                                    f"{len(node)} item(s))"))
                    ok = False
                    break
                node = node[part]
            else:
                problems.append(Problem(where, _dotted(path[:i]), f"is {_article(type(node).__name__)}; it has no key {part!r}"))
                ok = False
                break
        if not ok:
            continue
        last = path[-1]
        if isinstance(node, dict):
            if value is None:
                node.pop(last, None)
            else:
                node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        else:
            problems.append(Problem(where, _dotted(path[:-1]), f"is {_article(type(node).__name__)}; it has no key {last!r}"))
            continue
        _drop_origins(source.origins, path)
        source.origins[path] = where


def load_source(
    path: str | Path, overrides: Sequence[str] = (), *, problems: list[Problem] | None = None
) -> RecipeSource:
    """Read a recipe file with its ``extends`` chain and apply overrides.

    Raises :class:`RecipeError` with every problem found; when a ``problems`` list is given, problems in the file's
    content and the overrides are appended to it instead (a missing file still raises).
    """
    collect = problems is not None
    problems = problems if problems is not None else []
    file = Path(path).expanduser()
    if not file.is_file():
        hint = "check the path; recipes shipped with repae are under recipes/"
        raise RecipeError([Problem(str(file), "", "recipe file not found", hint)], title="cannot load recipe")
    source = _load_file(file.resolve(), [], problems, [])
    source.path = file
    apply_overrides(source, overrides, problems)
    if problems and not collect:
        raise RecipeError(problems)
    return source


_UNREADABLE = ("not valid YAML", "not a recipe", "cannot read recipe")
"""How the problems that leave a file's content unknown begin (validating the rest would only add noise)."""


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), *, registry: Registry | None = None, check: bool = False
) -> ResolvedRecipe:
    """The resolved recipe at ``path`` with ``overrides`` (``["denoiser.depth=12", ...]``): ``extends`` merged, every
    section validated against its component's config, defaults and presets filled in. With ``check`` the components
    are also built on ``meta`` and checked against each other (:func:`repae.compose.compose_recipe`), and the recipe
    returned holds the derived fields. Raises :class:`RecipeError` listing every problem. ``registry`` defaults to
    the installed plugins."""
    if registry is None:
        from repae.build import default_registry

        registry = default_registry()
    resolved = read_recipe(path, overrides, registry)
    if check:
        from repae.compose import compose_recipe

        resolved = compose_recipe(resolved).recipe
    return resolved


def read_recipe(path: str | Path, overrides: Sequence[str], registry: Registry) -> ResolvedRecipe:
    """Load, override and validate in one go, reporting the problems of all three stages together."""
    problems: list[Problem] = []
    source = load_source(path, overrides, problems=problems)
    if any(p.message.startswith(_UNREADABLE) or p.path == "extends" for p in problems):
        raise RecipeError(problems)  # the content is incomplete: validating it would only add noise
    return resolve_recipe(source, registry, problems=problems)


# ---------------------------------------------------------------------------------------------------------------------
# Validation against the registry
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentSpec:
    """One validated component of a recipe."""

    slot: str
    key: str | int | None
    """Index in a ``list`` slot, label in a ``named`` slot, ``None`` in a ``one`` slot."""
    entry: ComponentEntry
    config: Any
    explicit: frozenset[str] = frozenset()
    """Config fields the recipe (or the selected preset) sets; the others hold defaults, which a config may derive
    from the components built before it (:meth:`repae.build.BuildContext`, ``derive``)."""
    requested: str | None = None
    """The name as the recipe wrote it (a qualified ``DISTRIBUTION:NAME`` stays qualified)."""
    derived: frozenset[str] = frozenset()
    """Fields whose values were derived from other components (set by :func:`repae.compose.compose_recipe`)."""

    @property
    def kind(self) -> str:
        return self.entry.kind

    @property
    def name(self) -> str:
        return self.requested or self.entry.name

    @property
    def label(self) -> str:
        return self.slot if self.key is None else f"{self.slot}.{self.key}"

    @property
    def path(self) -> tuple[Any, ...]:
        """The key path of this component's section (``("encoders", 0)``, ``("losses", "repa")``)."""
        return (self.slot,) if self.key is None else (self.slot, self.key)


@dataclass
class ResolvedRecipe:
    """A recipe checked against the registry: every component's config validated and filled with defaults."""

    source: RecipeSource
    components: list[ComponentSpec]
    seed: int = 0
    description: str = ""

    def get(self, slot: str) -> list[ComponentSpec]:
        return [c for c in self.components if c.slot == slot]

    def spec(self, label: str) -> ComponentSpec | None:
        """The component with slot label ``label`` (``denoiser``, ``encoders.0``, ``losses.repa``)."""
        return next((c for c in self.components if c.label == label), None)

    def replace(self, components: list[ComponentSpec]) -> ResolvedRecipe:
        """The same recipe with other component specs (e.g. derived configs)."""
        return ResolvedRecipe(self.source, components, seed=self.seed, description=self.description)

    @property
    def plugins(self) -> dict[str, PluginInfo]:
        """Plugins providing the components used, by plugin name."""
        return {c.entry.plugin.name: c.entry.plugin for c in self.components}

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe: every key explicit (defaults and preset values filled in)."""
        out: dict[str, Any] = {}
        if self.description:
            out["description"] = self.description
        out["seed"] = self.seed
        for slot in SLOTS:
            specs = self.get(slot.key)
            if not specs:
                continue
            sections = [{"name": s.name, **config_to_dict(s.config)} for s in specs]
            if slot.arity == "one":
                out[slot.key] = sections[0]
            elif slot.arity == "list":
                out[slot.key] = sections
            else:
                out[slot.key] = {s.key: section for s, section in zip(specs, sections)}
        return out

    def to_yaml(self) -> str:
        """:meth:`to_dict` as YAML; byte-identical for the same recipe, overrides and plugin versions."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


def _sections(slot: Slot, value: Any, src: RecipeSource, problems: list[Problem]) -> Iterable[tuple[Any, Path_, Any]]:
    """Yield (key, path, section) for each component in a slot, reporting shape problems."""
    base: Path_ = (slot.key,)
    if slot.arity == "one":
        yield None, base, value
    elif slot.arity == "list":
        if not isinstance(value, list):
            problems.append(Problem(src.where(base), slot.key, f"must be a list of components, e.g. "
                                                               f"`{slot.key}: [{{name: ...}}]`"))
            return
        for i, item in enumerate(value):
            yield i, base + (i,), item
    else:
        if not isinstance(value, dict):
            problems.append(Problem(src.where(base), slot.key, f"must map labels to components, e.g. "
                                                               f"`{slot.key}: {{my_label: {{name: ...}}}}`"))
            return
        for label, item in value.items():
            yield label, base + (label,), item


def resolve_recipe(
    source: RecipeSource, registry: Registry, *, problems: Sequence[Problem] = ()
) -> ResolvedRecipe:
    """Validate a loaded recipe against the registry. Raises :class:`RecipeError` listing every problem (after any
    ``problems`` found earlier)."""
    problems = list(problems)
    data = source.data
    for key in data:
        if key not in _TOP_LEVEL:
            hint = did_you_mean(str(key), _TOP_LEVEL).strip() or f"top-level keys: {', '.join(_TOP_LEVEL)}"
            problems.append(Problem(source.where((key,)), str(key), "unknown top-level key", hint))
    scalars: dict[str, Any] = {}
    for key, (tp, _doc) in SCALARS.items():
        if key in data:
            value = data[key]
            if not isinstance(value, tp) or isinstance(value, bool):
                problems.append(Problem(source.where((key,)), key, f"expected {tp.__name__}, got {value!r}"))
            else:
                scalars[key] = value
    components: list[ComponentSpec] = []
    for slot in SLOTS:
        if slot.key not in data:
            continue
        for key, path, section in _sections(slot, data[slot.key], source, problems):
            spec = _resolve_section(slot, key, path, section, source, registry, problems)
            if spec is not None:
                components.append(spec)
    if problems:
        raise RecipeError(problems)
    return ResolvedRecipe(source, components, seed=scalars.get("seed", 0), description=scalars.get("description", ""))


def _resolve_section(
    slot: Slot, key: Any, path: Path_, section: Any, src: RecipeSource, registry: Registry, problems: list[Problem]
) -> ComponentSpec | None:
    where = src.where(path)
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        problems.append(Problem(where, _dotted(path), f"expected a mapping with a `name` key, got {section!r}"))
        return None
    name = section.get("name")
    if not isinstance(name, str):
        known = ", ".join(registry.names(slot.kind)) or "none installed"
        misspelt = did_you_mean("name", [str(k) for k in section if k != "name"]).strip()
        problems.append(Problem(where, _dotted(path + ("name",)), f"missing the {slot.kind} `name` (available: {known})",
                                misspelt.replace("Did you mean", "a misspelt key? Did you mean `name` for") if misspelt
                                else ""))
        return None
    try:
        entry = registry.get(slot.kind, name)
    except UserError as exc:  # unknown or contested name
        problems.append(Problem(src.where(path + ("name",)), _dotted(path + ("name",)), str(exc)))
        return None
    config, issues = entry.parse({k: v for k, v in section.items() if k != "name"})
    for issue in issues:
        sub = tuple(int(p) if p.isdigit() else p for p in issue.path.split(".")) if issue.path else ()
        full = path + sub
        problems.append(Problem(src.where(full), _dotted(full), issue.message, issue.hint))
    if config is None:
        return None
    explicit = entry.explicit_fields({k: v for k, v in section.items() if k != "name"})
    return ComponentSpec(slot.key, key, entry, config, explicit, requested=name)


# ---------------------------------------------------------------------------------------------------------------------
# Comparing recipes
# ---------------------------------------------------------------------------------------------------------------------


def flatten_recipe(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key paths of a nested recipe (or any JSON-like data) -> values: the paths an override names.

    Mappings are flattened by key and lists of mappings by index (``encoders.0.name``); a list of plain values is one
    value (``losses.diffusion.updates``: ``[denoiser, tokenizer]``), as it is one setting. An empty mapping stays one
    value (``{}``).
    """
    if isinstance(data, Mapping):
        if not data and prefix:
            return {prefix.rstrip("."): {}}
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten_recipe(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(v, Mapping) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten_recipe(value, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): data}


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted key paths (:func:`flatten_recipe`) whose values differ between two recipes, added and removed keys
    included."""
    a, b = flatten_recipe(old), flatten_recipe(new)
    missing = object()
    return sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))


def _article(noun: str) -> str:
    return f"an {noun}" if noun[:1] in "aeiou" else f"a {noun}"
