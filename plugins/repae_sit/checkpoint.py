"""State-dict adapters between the official SiT / REPA / REPA-E / DiT checkpoints and the repae denoisers.

The denoiser modules use the official parameter names, so the adapter only has to

- unwrap training artefacts: a ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix on every key;
- split off the REPA-E latent BatchNorm (``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``): in repae
  latent normalisation is its own component, so these buffers are returned separately (keys without ``bn.``, the
  names of ``BatchNorm2d`` buffers) and kept on the built denoiser as ``latent_norm_state``.

Loading is strict: a missing, unexpected or mis-shaped key raises :class:`repae.errors.WeightsMismatchError` naming
the keys and the config field that most likely needs changing. :func:`to_official` goes back to the official layout
(``bn.*`` included when given), so a repae denoiser can be saved for the reference code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from repae import WeightsInfo, load_into, load_weights

if TYPE_CHECKING:
    from repae import BuildContext
    from repae_sit.layers import DiffusionTransformer

__all__ = [
    "LATENT_NORM_PREFIX",
    "from_official",
    "load_configured_weights",
    "load_official_weights",
    "load_strict",
    "to_official",
]

LATENT_NORM_PREFIX = "bn."
"""Prefix of the REPA-E latent BatchNorm buffers in official SiT checkpoints."""

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def from_official(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an official SiT/REPA/REPA-E/DiT state dict into ``(denoiser_state, latent_norm_state)``.

    ``latent_norm_state`` holds the ``bn.*`` buffers without their prefix (empty when the checkpoint has none, as
    for SiT, REPA and DiT releases). ``module.``/``_orig_mod.`` prefixes are removed.
    """
    denoiser: dict[str, Tensor] = {}
    latent_norm: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = _strip_wrappers(key)
        if key.startswith(LATENT_NORM_PREFIX):
            latent_norm[key[len(LATENT_NORM_PREFIX) :]] = value
        else:
            denoiser[key] = value
    return denoiser, latent_norm


def to_official(
    denoiser_state: Mapping[str, Tensor] | nn.Module, latent_norm_state: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The official layout of a denoiser state dict (or module), with ``bn.*`` added from ``latent_norm_state``."""
    out = dict(denoiser_state.state_dict() if isinstance(denoiser_state, nn.Module) else denoiser_state)
    for key, value in (latent_norm_state or {}).items():
        out[LATENT_NORM_PREFIX + key] = value
    return out


def _hints(missing: list[str], unexpected: list[str], mismatched: dict[str, tuple]) -> list[str]:
    hints = []
    miss_proj = [k for k in missing if k.startswith("projectors.")]
    extra_proj = sorted({k.split(".")[1] for k in unexpected if k.startswith("projectors.")})
    if miss_proj and not any(k.startswith("projectors.") for k in unexpected):
        hints.append("the checkpoint has fewer REPA projectors than the config: set encoder_dims to [] (none) or to "
                     "the checkpoint's projector widths")
    if extra_proj:
        hints.append(f"the checkpoint has REPA projector(s) {extra_proj}: set encoder_dims to their output widths")
    if "final_layer.linear.weight" in mismatched:
        got, want = mismatched["final_layer.linear.weight"]
        if got[0] == 2 * want[0]:
            hints.append("the checkpoint predicts 2*C channels (learned sigma): set learn_sigma: true")
        elif 2 * got[0] == want[0]:
            hints.append("the checkpoint predicts C channels: set learn_sigma: false")
    if "y_embedder.embedding_table.weight" in mismatched:
        hints.append("the label table has num_classes rows, plus a null row when class_dropout_prob > 0: check "
                     "num_classes and class_dropout_prob")
    if "pos_embed" in mismatched or "x_embedder.proj.weight" in mismatched:
        hints.append("check input_size, in_channels, patch_size and size (e.g. XL/2 vs XL/1)")
    if any(k.startswith("blocks.") for k in missing + unexpected) or any(k.endswith(".adaLN_modulation.1.weight")
                                                                         for k in mismatched):
        hints.append("check size / depth / hidden_size")
    if any(k.startswith(LATENT_NORM_PREFIX) for k in unexpected):
        hints.append("bn.* are latent-normalisation buffers: pass the state dict through from_official() first")
    return hints


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, what: str = "checkpoint") -> None:
    """Load strictly; a mismatch raises :class:`repae.WeightsMismatchError` naming every offending key and the config
    field that most likely needs changing."""
    load_into(module, state_dict, strict=True, what=what, hints=_hints)


def check_release(module: nn.Module, config: Any, path: Path, source: str,
                  shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Refuse weights that ``config`` disagrees with in a field strict loading cannot see (:mod:`repae_sit.releases`):
    the architecture the file states (repae's export metadata), else the release whose key layout it has.
    ``shapes``: the file's denoiser keys and shapes (``bn.*`` split off; ``None``: unknown, then only a stated
    architecture is checked). Raises :class:`repae.UserError` naming the fields, both values and the preset."""
    from repae import ARCHITECTURE_METADATA, UserError, architecture_mismatch, declared_architecture, layout_mismatch
    from repae_sit.releases import ARCHITECTURE_FIELDS, SHAPE_FREE_FIELDS, architecture_of, compared_fields
    from repae_sit.releases import release_of_layout

    arch = architecture_of(config)
    declared = declared_architecture(path)
    if declared is not None:
        problem = architecture_mismatch(arch, declared, fields=compared_fields(arch, declared, ARCHITECTURE_FIELDS),
                                        shape_free=SHAPE_FREE_FIELDS, preset=None,
                                        what=f"{source!r}, with the architecture its {ARCHITECTURE_METADATA} "
                                             "metadata states")
    else:
        problem = layout_mismatch(arch, release_of_layout(arch, config.releases()), source=source,
                                  file_shapes=shapes, model_shapes=module.state_dict(), shape_free=SHAPE_FREE_FIELDS)
    if problem is not None:
        raise UserError(f"{type(module).__name__}: {problem}")


def load_official_weights(
    module: nn.Module, source: str, *, key: str | None = "ema", config: Any = None
) -> tuple[WeightsInfo, dict[str, Tensor]]:
    """Resolve ``source`` (local file/folder or ``hf://``), read it, adapt it and load it strictly into ``module``.

    ``key`` picks the entry of a training checkpoint (``ema`` or ``model`` of the REPA / REPA-E ``.pt`` files); a
    plain state dict (SiT and DiT releases, safetensors exports) is loaded as is. With the module's ``config``, the
    weights are first checked against it (:func:`check_release`). Returns what was read and the split-off latent
    BatchNorm buffers (``{}`` when the checkpoint has none).
    """
    raw, info = load_weights(source, key=key, missing_key="whole")
    denoiser_state, latent_norm = from_official(raw)
    if config is not None:
        check_release(module, config, Path(info.path), source, {k: tuple(v.shape) for k, v in denoiser_state.items()})
    load_strict(module, denoiser_state, what=f"weights {source!r}" + (f" [{info.entry}]" if info.entry else ""))
    return info, latent_norm


def _check_before_loading(module: DiffusionTransformer, config: Any) -> None:
    """On ``meta`` (``repae recipe validate``, ``--dry-run``): :func:`check_release` for a local safetensors file
    from its header alone (hub sources and ``.pt`` files are checked when loaded)."""
    from repae import local_weights, safetensors_shapes

    source = config.weights
    path = local_weights(source)
    if path is None:
        return  # a hub source or URL, or a missing file (reported by the recipe check)
    shapes = safetensors_shapes(path)
    if shapes is not None:
        shapes = {_strip_wrappers(k): v for k, v in shapes.items()}
        shapes = {k: v for k, v in shapes.items() if not k.startswith(LATENT_NORM_PREFIX)}
    check_release(module, config, path, source, shapes)


def load_configured_weights(module: DiffusionTransformer, config: Any, context: BuildContext) -> None:
    """Load ``config.weights`` (entry ``config.weights_key``) into a freshly built denoiser, unless the config names
    none or ``context.load_weights`` is false (``meta`` builds). Records ``loaded_weights`` (:class:`repae.
    RecordsWeights`) and ``latent_norm_state`` (:class:`repae.CarriesLatentNormState`) on the module."""
    if not config.weights:
        return
    if not context.load_weights:
        _check_before_loading(module, config)
        return
    info, latent_norm = load_official_weights(module, config.weights, key=config.weights_key, config=config)
    module.loaded_weights = {"weights": info}
    module.latent_norm_state = latent_norm or None
