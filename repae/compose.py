"""A recipe checked whole before step 1: every component built on ``meta``, the shapes propagated through one step.

:func:`compose_recipe` is what ``repae recipe validate``, ``repae run --dry-run`` and ``repae run`` (before it reads
any data) do with a resolved recipe:

1. build every component on the ``meta`` device in slot order (no memory, no weights, no data), deriving the fields
   the recipe leaves unset from the components built before (the denoiser's input size from the dataset resolution
   and the tokenizer's downsampling, its channels and projector widths; see :mod:`repae.build`);
2. check how the components fit, through their contracts (:mod:`repae.interfaces`): image size and downsampling,
   latent channels between tokenizer, normaliser and denoiser, the denoiser's input size, projectors and token grids
   against the encoders, labels against the denoiser's classes and null class, alignment depths against the
   denoiser's depth, the parts losses update, one diffusion process;
3. build the trainer and let it run one step's forward passes on ``meta`` (:meth:`repae.interfaces.Trainer.check_step`),
   which catches what the contracts cannot see (a third-party component's own shapes).

Every problem is collected and raised at once as a :class:`~repae.errors.RecipeError` naming both components, both
key paths (with the file and line that set them) and the fix; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from repae.build import BuiltComponent, RecipeBuild, with_built_configs
from repae.errors import Problem, RecipeError, UserError, describe_exception, first_line
from repae.interfaces import StepPlan
from repae.recipe import ResolvedRecipe

__all__ = ["Composition", "check_composition", "compose_recipe", "weights_problems"]


@dataclass
class Composition:
    """A recipe whose components fit: the recipe with derived fields filled in, the components built on ``meta``,
    the trainer's step plan (when the recipe has a trainer) and how long it took."""

    recipe: ResolvedRecipe
    built: list[BuiltComponent]
    plan: StepPlan | None = None
    seconds: float = 0.0
    derived: list[str] = field(default_factory=list)

    @property
    def trainer(self) -> Any:
        return next((b.component for b in self.built if b.slot == "trainer"), None)


def compose_recipe(recipe: ResolvedRecipe, *, check_step: bool = True) -> Composition:
    """Build ``recipe`` on ``meta``, derive unset fields, check the composition and (with ``check_step``) one step's
    shapes. Returns the :class:`Composition`; raises :class:`RecipeError` with every problem found."""
    from repae.build import describe_derived

    start = time.perf_counter()
    problems: list[Problem] = []
    assembly = RecipeBuild(recipe, device="meta")
    built = assembly.built
    for spec in recipe.components:
        if spec.slot == "trainer":
            problems.extend(check_composition(recipe, built) if not problems else [])
            if problems:
                break  # the trainer would only repeat what is already wrong
        try:
            one = assembly.build(spec)
        except UserError as exc:
            problems.append(_problem(recipe, spec.path, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a plugin's factory failing on meta is reported, not raised
            problems.append(_problem(recipe, spec.path, f"{spec.kind} '{spec.name}' failed to build on meta: "
                                                        f"{describe_exception(exc)}"))
            continue
        missing = contract_problems(spec.kind, one.component)
        if missing:
            problems.append(_problem(recipe, spec.path, f"{spec.kind} '{spec.name}' (plugin {spec.entry.plugin.label}) "
                                     f"does not implement the {spec.kind} contract: {missing}",
                                     f"see repae.interfaces (docs/plugins.md) for what a {spec.kind} provides"))
            continue
        assembly.add(spec, one)
    if not problems and not recipe.get("trainer"):
        problems.extend(check_composition(recipe, built))
    composition = Composition(with_built_configs(recipe, built), built, derived=describe_derived(built))
    trainer = composition.trainer
    if not problems and trainer is not None:
        plan = getattr(trainer, "plan", None)
        try:
            composition.plan = plan() if callable(plan) else None
            if check_step and callable(getattr(trainer, "check_step", None)):
                trainer.check_step()
        except RecipeError as exc:
            problems.extend(exc.problems)
        except UserError as exc:
            problems.append(_problem(recipe, ("trainer",), str(exc)))
        except Exception as exc:  # noqa: BLE001 - a component failing the one-step check on meta is reported
            problems.append(_problem(
                recipe, ("trainer",), f"one training step on meta tensors failed: {describe_exception(exc)}",
                "the components passed their own checks but do not run together: the message "
                "names the operation that failed; report it to the plugin whose component raised it"))
    composition.seconds = time.perf_counter() - start
    problems = weights_problems(recipe) + problems
    if problems:
        raise RecipeError(_unique(problems), title="the recipe's components do not fit together")
    return composition


_WEIGHT_FIELDS = ("weights", "latent_stats")


def weights_problems(recipe: ResolvedRecipe) -> list[Problem]:
    """Weights sources in the recipe that cannot be right, found without reading them: a local file or folder that
    does not exist, an ``hf://`` source that names no repository (whether it is in the hub cache is checked when it is
    loaded). Config fields named ``weights``, ``*_weights`` and ``latent_stats`` (``auto`` aside) are sources."""
    import os
    from pathlib import Path

    from repae.weights import parse_hf_source

    problems: list[Problem] = []
    for spec in recipe.components:
        for name, value in vars(spec.config).items() if hasattr(spec.config, "__dict__") else ():
            if not (name in _WEIGHT_FIELDS or name.endswith("_weights")) or not isinstance(value, str):
                continue
            text = value.strip()
            if name == "latent_stats" and text == "auto":
                continue
            path = (*spec.path, name)
            if not text:
                problems.append(_problem(recipe, path, "is empty", "give a local path or hf://org/repo/file, or null"))
            elif text.startswith("hf://"):
                try:
                    parse_hf_source(text)
                except UserError as exc:
                    problems.append(_problem(recipe, path, str(exc)))
            elif text.startswith(("https://", "http://")):
                continue
            else:
                try:
                    exists = Path(text).expanduser().exists()
                except (OSError, ValueError):
                    exists = False
                if not exists:
                    problems.append(_problem(
                        recipe, path, f"weights file not found: {text!r} (looked in {os.getcwd()} for a relative path)",
                        "give an existing local file or folder, hf://org/repo/file (the Hugging Face hub cache), "
                        "or null for random initial weights"))
    return problems


def contract_problems(kind: str, component: Any) -> str:
    """What ``component`` lacks of its kind's contract (:mod:`repae.interfaces`), as text; empty when nothing."""
    from repae import interfaces

    if kind == "loss":
        from repae.loss import Loss

        return "" if isinstance(component, Loss) else f"it is a {type(component).__name__}, not a repae.Loss"
    protocol = {
        "tokenizer": interfaces.Tokenizer, "denoiser": interfaces.Denoiser, "encoder": interfaces.RepresentationEncoder,
        "normalizer": interfaces.LatentNormalizer, "dataset": interfaces.Dataset, "sampler": interfaces.Sampler,
        "metric": interfaces.Metric, "tracker": interfaces.Tracker, "trainer": interfaces.Trainer,
    }.get(kind)
    if protocol is None or isinstance(component, protocol):
        return ""
    absent = [m for m in interfaces._members(protocol) if not hasattr(component, m)]
    return f"{type(component).__name__} has no {', '.join(absent)}" if absent else ""


def _unique(problems: Sequence[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out



def _problem(recipe: ResolvedRecipe, path: tuple[Any, ...], message: str, hint: str = "") -> Problem:
    return Problem(recipe.source.where(path), ".".join(str(p) for p in path), message, hint)


# ---------------------------------------------------------------------------------------------------------------------
# The composition checks, through the contracts
# ---------------------------------------------------------------------------------------------------------------------


class _Recipe:
    """Key paths, origins and how a value came about, for messages that name both sides."""

    def __init__(self, recipe: ResolvedRecipe, built: Sequence[BuiltComponent]) -> None:
        self.recipe = recipe
        self.by_label = {b.label: b for b in built}
        self.specs = {s.label: s for s in recipe.components}

    def component(self, label: str) -> Any:
        b = self.by_label.get(label)
        return b.component if b is not None else None

    def config(self, label: str) -> Any:
        b = self.by_label.get(label)
        return b.config if b is not None else None

    def key(self, label: str, field_name: str | None = None) -> str:
        """``denoiser.in_channels = 4 (recipes/x.yaml:12)``, ``... = 4 (derived)`` or ``... = 4 (default)``."""
        spec = self.specs[label]
        name = f"{label}.{field_name}" if field_name else label
        if field_name is None:
            return f"{label} '{spec.name}' ({self.where(spec.path)})"
        value = getattr(self.config(label), field_name, None)
        if field_name in spec.explicit or field_name not in self.by_label[label].derived:
            origin = self.where((*spec.path, field_name)) if field_name in spec.explicit else "default"
        else:
            origin = "derived"
        return f"{name} = {value!r} ({origin})"

    def where(self, path: tuple[Any, ...]) -> str:
        return self.recipe.source.where(path)

    def problem(self, label: str, field_name: str | None, message: str, hint: str = "") -> Problem:
        spec = self.specs[label]
        path = (*spec.path, field_name) if field_name else spec.path
        return Problem(self.where(path), ".".join(str(p) for p in path), message, hint)

    def has_field(self, label: str, field_name: str) -> bool:
        config = self.config(label)
        return config is not None and hasattr(config, field_name)

    def ref(self, label: str, field_name: str, value: Any) -> str:
        """The other side of a mismatch: ``tokenizer.latent_channels = 8 (recipes/x.yaml:3)`` when the component's
        config has the field, else ``tokenizer 'name' (its latent_channels: 8)``."""
        if self.has_field(label, field_name):
            return self.key(label, field_name)
        spec = self.specs[label]
        return f"{label} '{spec.name}' (its {field_name}: {value})"

    def field(self, label: str, field_name: str) -> str | None:
        """``field_name`` when the component's config has it (so a problem points at that key), else ``None``."""
        return field_name if self.has_field(label, field_name) else None

    def noted(self, label: str, field_name: str) -> str:
        """`` (set at recipes/x.yaml:12)`` / `` (derived)`` / `` (the default)``; empty when the config lacks it."""
        return f" ({self.origin(label, field_name)})" if self.has_field(label, field_name) else ""

    def origin(self, label: str, field_name: str) -> str:
        """``set at recipes/x.yaml:12`` / ``derived`` / ``the default`` for a field of a component."""
        spec, b = self.specs[label], self.by_label[label]
        if field_name in spec.explicit and field_name not in b.derived and field_name not in spec.derived:
            return f"set at {self.where((*spec.path, field_name))}"
        return "derived" if field_name in b.derived or field_name in spec.derived else "the default"


def check_composition(recipe: ResolvedRecipe, built: Sequence[BuiltComponent]) -> list[Problem]:
    """The problems between the components of ``recipe`` built as ``built`` (on any device), through their
    contracts; empty when they fit."""
    r = _Recipe(recipe, built)
    problems: list[Problem] = []
    dataset, tokenizer = r.component("dataset"), r.component("tokenizer")
    normalizer, denoiser = r.component("latent_norm"), r.component("denoiser")
    encoders = [(b.label, b.component) for b in built if b.slot == "encoders"]
    losses = [(b.label, b.component) for b in built if b.slot == "losses"]
    sampler = r.component("sampler")

    kind = getattr(dataset, "kind", None)
    resolution = int(getattr(dataset, "resolution", 0) or 0) if dataset is not None else 0
    latent: tuple[int, ...] | None = None  # (C, h, w) the denoiser will see, with where it comes from
    latent_from = ""
    if kind == "images" and tokenizer is not None and resolution:
        f = int(tokenizer.downsample)
        if resolution % f:
            below, above = resolution // f * f, (resolution // f + 1) * f
            problems.append(r.problem(
                "dataset", r.field("dataset", "resolution"),
                f"{resolution} px images are not a multiple of the tokenizer's downsampling factor {f} "
                f"({r.key('tokenizer')})",
                f"set dataset.resolution to a multiple of {f} (e.g. {below or above} or {above})"))
        else:
            latent = (int(tokenizer.latent_channels), resolution // f, resolution // f)
            latent_from = (f"{r.ref('tokenizer', 'latent_channels', latent[0])}, downsampling by {f}, on "
                           f"{r.key('dataset', 'resolution') if r.has_field('dataset', 'resolution') else resolution}"
                           " px images")
    elif kind == "latents":
        shape = getattr(dataset, "latent_shape", None)
        if not shape:
            root = getattr(r.config("dataset"), "root", None)
            problems.append(r.problem(
                "dataset", "root" if root is not None else None,
                f"no latent cache at {root}: the shape of the latents the denoiser trains on is unknown",
                "write the cache first (`repae cache-latents RECIPE --out DIR`), then point dataset.root at it"))
        else:
            latent = tuple(int(v) for v in shape)
            latent_from = f"the latent cache {getattr(r.config('dataset'), 'root', '')} (latents {list(latent)})"
            if tokenizer is not None and int(tokenizer.latent_channels) != latent[0]:
                problems.append(r.problem(
                    "tokenizer", None,
                    f"the latent cache (dataset.root) holds {latent[0]}-channel latents but {r.key('tokenizer')} has "
                    f"{tokenizer.latent_channels} latent channels",
                    "use the tokenizer that wrote the cache, or cache the latents again with this one"))

    if normalizer is not None:
        channels = getattr(normalizer, "channels", None)
        c = latent[0] if latent else (int(tokenizer.latent_channels) if tokenizer is not None else None)
        if channels is not None and c is not None and int(channels) != c:
            problems.append(r.problem(
                "latent_norm", r.field("latent_norm", "channels"),
                f"the latent normaliser is built for {channels} channels"
                f"{r.noted('latent_norm', 'channels')}, but the latents have {c} "
                f"({r.ref('tokenizer', 'latent_channels', c) if tokenizer is not None else 'the latent cache'})",
                f"remove latent_norm.channels (it is derived from the tokenizer) or set it to {c}"))

    if denoiser is not None and latent is not None:
        c, h, w = latent
        if int(denoiser.in_channels) != c:
            problems.append(r.problem(
                "denoiser", r.field("denoiser", "in_channels"),
                f"the denoiser takes {denoiser.in_channels}-channel latents"
                f"{r.noted('denoiser', 'in_channels')}, but the latents have {c} "
                f"channels: {latent_from}",
                f"remove denoiser.in_channels (it is derived) or set it to {c}; or use a tokenizer with "
                f"{denoiser.in_channels} latent channels"))
        if int(denoiser.input_size) != h or h != w:
            problems.append(r.problem(
                "denoiser", r.field("denoiser", "input_size"),
                f"the denoiser takes {denoiser.input_size}x{denoiser.input_size} latents"
                f"{r.noted('denoiser', 'input_size')}, but the latents are {h}x{w}: "
                f"{latent_from}",
                f"remove denoiser.input_size (it is derived from dataset.resolution and the tokenizer) or set it to "
                f"{h}; or set dataset.resolution to {int(denoiser.input_size) * (resolution // h if h else 1)}"))

    reads_targets = [(label, loss) for label, loss in losses if getattr(loss, "needs_targets", False)]
    if reads_targets and kind == "latents":
        for label, _ in reads_targets:
            problems.append(r.problem(
                label, None, f"{r.key(label)} aligns the denoiser to the encoders' features of the training images, "
                f"but {r.key('dataset')} yields cached latents, not images: there is nothing to encode",
                "train from images (an image dataset such as `image-folder`; the tokenizer encodes them on the fly), "
                "or remove this loss for latent-only training"))
    elif denoiser is not None and reads_targets:
        dims = list(getattr(denoiser, "encoder_dims", []))
        if not encoders:
            for label, _ in reads_targets:
                problems.append(r.problem(label, None, f"{r.key(label)} aligns the denoiser to encoder tokens, but "
                                          "the recipe has no encoders", "add one under `encoders` (e.g. "
                                          "`encoders: [{name: dinov2, size: vit-b14}]`) or remove this loss"))
        elif len(dims) != len(encoders):
            problems.append(r.problem(
                "denoiser", r.field("denoiser", "encoder_dims"),
                f"the denoiser has {len(dims)} REPA projector(s) {dims}"
                f"{r.noted('denoiser', 'encoder_dims')} but the recipe has "
                f"{len(encoders)} encoder(s) ({', '.join(r.key(label) for label, _ in encoders)})",
                "remove denoiser.encoder_dims (one projector per encoder is derived) or give one width per encoder"))
        else:
            for k, ((label, encoder), width) in enumerate(zip(encoders, dims)):
                if int(encoder.embed_dim) != int(width):
                    problems.append(r.problem(
                        "denoiser", r.field("denoiser", "encoder_dims"),
                        f"projector {k} of the denoiser outputs {width}-wide tokens but "
                        f"{r.ref(label, 'embed_dim', encoder.embed_dim)} gives {encoder.embed_dim}-wide ones",
                        f"remove denoiser.encoder_dims (derived from the encoders) or set item {k} to "
                        f"{encoder.embed_dim}"))
        if resolution and kind == "images" and latent is not None:
            for label, encoder in encoders:
                try:
                    tokens = int(encoder.num_tokens(resolution))
                except Exception as exc:  # noqa: BLE001 - a plugin's num_tokens rejecting the resolution
                    problems.append(r.problem(label, None, f"{r.key(label)} cannot encode {resolution} px images: "
                                              f"{first_line(exc)}"))
                    continue
                if tokens != int(denoiser.num_tokens):
                    problems.append(r.problem(
                        label, None,
                        f"the encoder gives {tokens} tokens per {resolution} px image, but the denoiser has "
                        f"{denoiser.num_tokens} tokens per sample ({r.key('denoiser')}: {denoiser.input_size}x"
                        f"{denoiser.input_size} latents in patches); REPA aligns them token by token",
                        "make the token grids equal: the encoder's token stride (e.g. token_stride), the denoiser's "
                        "patch size (size: .../1, /2, /4) or dataset.resolution"))

    if denoiser is not None and dataset is not None:
        classes = int(getattr(dataset, "num_classes", 0) or 0)
        if classes > int(denoiser.num_classes):
            problems.append(r.problem(
                "denoiser", r.field("denoiser", "num_classes"),
                f"the denoiser has {denoiser.num_classes} classes"
                f"{r.noted('denoiser', 'num_classes')}, but "
                f"{r.ref('dataset', 'num_classes', classes)} has {classes} (labels 0..{classes - 1})",
                f"set denoiser.num_classes to {classes} (or more)"))
    if denoiser is not None and sampler is not None:
        scale = getattr(getattr(sampler, "config", None), "cfg_scale", 1.0)
        null_row = float(getattr(denoiser, "class_dropout_prob", 0.0) or 0.0) > 0
        if scale not in (None, 1.0) and not null_row:
            problems.append(r.problem(
                "sampler", "cfg_scale",
                f"classifier-free guidance with scale {scale} ({r.origin('sampler', 'cfg_scale')}) needs the null "
                f"class, but the denoiser has no null label row "
                f"({r.ref('denoiser', 'class_dropout_prob', 0.0)})",
                "set sampler.cfg_scale=1.0, or denoiser.class_dropout_prob > 0 (trains the null class)"))

    depth = int(getattr(denoiser, "depth", 0) or 0) if denoiser is not None else 0
    parts = {"denoiser"} if denoiser is not None else set()
    if tokenizer is not None and kind != "latents":
        parts.add("tokenizer")
    for label, loss in losses:
        parts.update(loss.parts())
    transports = []
    for label, loss in losses:
        spec = r.specs[label]
        for d in getattr(loss, "feature_depths", ()):
            if denoiser is not None and not 1 <= int(d) <= depth:
                field_name = r.field(label, "depth")
                problems.append(r.problem(
                    label, field_name, f"the loss reads the hidden states after block {d}, but the denoiser has "
                    f"{depth} blocks ({r.ref('denoiser', 'depth', depth)})",
                    f"set {'.'.join(map(str, spec.path))}.depth to 1..{depth}"))
        unknown = [p for p in loss.updates if p not in parts]
        if unknown:
            why = ""
            if "tokenizer" in unknown and kind == "latents":
                why = " (the recipe trains from cached latents, so the tokenizer is frozen)"
            elif "tokenizer" in unknown and tokenizer is None:
                why = " (the recipe has no tokenizer)"
            problems.append(r.problem(
                label, "updates", f"the loss updates part(s) {unknown} that this training does not have{why}; its "
                f"parts are {sorted(parts)}", "list only those parts"))
        if getattr(loss, "transport", None) is not None:
            transports.append(label)
    if len(transports) > 1:
        problems.append(r.problem(transports[1], None, f"several losses define the diffusion process: "
                                  f"{', '.join(transports)}", "keep one diffusion objective"))
    needs_pass = [label for label, loss in losses if getattr(loss, "feature_depths", ())
                  or getattr(loss, "needs_prediction", False)]
    if needs_pass and not transports:
        problems.append(r.problem(needs_pass[0], None, f"{', '.join(needs_pass)} run(s) the denoiser on noisy "
                                  "latents, but no loss defines the diffusion process (how t is drawn and x_t made)",
                                  "add a diffusion objective, e.g. `diffusion: {name: flow-matching}`"))
    return problems
