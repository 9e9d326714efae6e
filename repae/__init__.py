"""repae: latent diffusion transformers with representation alignment (REPA-E, REPA, vanilla), from plugins and
YAML recipes.

This namespace is the public API (timm-style: every public name is re-exported here; the modules behind it are
internal and may change). Plugin authors import only from ``repae``; the built-in plugins do too (a test checks).

- Python API: :func:`create` (one component, as a recipe section would build it), :func:`list_components`,
  :func:`load_recipe`, :func:`compose_recipe` (check a recipe whole on ``meta``), :func:`open_run` (a trained run's
  components), :func:`load_plugins`.
- Writing a plugin: :data:`hookimpl`, :func:`option`, :class:`BuildContext`; the contract of every kind and its
  optional capabilities (:class:`Tokenizer`, :class:`Denoiser`, ..., :class:`Tracker`, :class:`Exportable`,
  :func:`require`); a loss
  subclasses :class:`Loss` with a :class:`LossConfig` and reads a :class:`StepContext`; a trainer may subclass
  :class:`PhasedTrainer`.
- What plugins share with the core: weights (:func:`resolve_weights`, :func:`load_state_dict`, :func:`load_into`,
  ...), weights and configuration agreeing (:class:`Release`, :func:`architecture_mismatch`,
  :func:`safetensors_shapes`), optional packages (:func:`require_package`), :class:`GlobalBatchNorm`,
  :class:`DiagonalGaussian` (the KL autoencoders' posterior), atomic writes,
  :func:`progress`, latent caches, image shards, image decoding, the ADM metric formulas, errors.

Importing :mod:`repae` does not import torch: names are loaded on first use.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from repae.config import option
from repae.hookspecs import hookimpl

try:
    __version__ = version("repae")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

_EXPORTS: dict[str, tuple[str, ...]] = {
    "repae.build": ("BuildContext", "create", "list_components"),
    "repae.recipe": ("load_recipe",),
    "repae.compose": ("compose_recipe",),
    "repae.plugins": ("Register", "load_plugins"),
    "repae.runs": ("open_run",),
    "repae.registry": ("KINDS", "PRESET_FIELD", "ComponentEntry"),
    "repae.config": ("FieldError",),
    "repae.interfaces": (
        "AffineNormalizer", "CarriesLatentNormState", "ChecksTokenizer", "Dataset", "Denoiser", "DenoiserOutput",
        "ExportContext", "Exportable", "HasBlocks", "HasLatentStatistics", "LatentNormalizer", "LatentStatistics",
        "LoadsLatentNormState", "LossConfig", "Metric", "PhasePlan", "Posterior", "ReadsImages", "RecordsWeights",
        "ReferenceFeatures", "RepresentationEncoder", "Sampler", "StepPlan", "Tokenizer", "Tracker", "TrackerRun",
        "Trainer", "Transport", "WeightsInfo", "adopt_latent_norm_state", "require", "supports",
    ),
    "repae.loss": ("Loss",),
    "repae.train.context": ("StepContext", "StepInputs"),
    "repae.train.config": ("OptimizerConfig", "TrainerConfig"),
    "repae.train.engine": ("PhasedTrainer",),
    "repae.train.checkpoint": ("latest_checkpoint", "load_checkpoint", "save_checkpoint"),
    "repae.weights": ("file_sha256", "load_into", "load_state_dict", "load_weights", "local_weights", "read_checkpoint",
                      "resolve_weights", "select_entry"),
    "repae.batchnorm": ("GlobalBatchNorm",),
    "repae.posterior": ("DiagonalGaussian",),
    "repae.fileio": ("atomic_path", "atomic_write", "write_json", "write_safetensors"),
    "repae.reporting": ("progress",),
    "repae.generate": ("decode_latents", "to_uint8"),
    "repae.latent_cache": ("LatentCache", "write_latent_cache"),
    "repae.image_shards": ("ImageShards", "write_image_shards"),
    "repae.evaluate.inputs": ("IMAGE_SUFFIXES",),
    "repae.images": ("UnreadableImage", "decode_image", "describe_unreadable", "scan_images"),
    "repae.evaluate.metrics": ("feature_statistics", "frechet_distance", "frechet_distance_to_features",
                               "inception_score", "precision_recall"),
    "repae.errors": ("CapabilityError", "ComponentBuildError", "PluginError", "Problem", "RecipeError",
                     "UnknownComponentError", "UserError", "WeightsMismatchError", "did_you_mean"),
    "repae.architecture": ("ARCHITECTURE_METADATA", "ArchitectureMismatch", "Release", "architecture_mismatch",
                           "declared_architecture", "layout_mismatch", "release_of_source", "safetensors_header", "safetensors_shapes",
                           "same_value"),
    "repae.packages": ("check_package", "require_package"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(["__version__", "hookimpl", "option", *_WHERE])


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'repae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from repae.architecture import (
        ARCHITECTURE_METADATA,
        ArchitectureMismatch,
        Release,
        architecture_mismatch,
        declared_architecture,
        layout_mismatch,
        release_of_source,
        safetensors_header,
        safetensors_shapes,
        same_value,
    )
    from repae.batchnorm import GlobalBatchNorm
    from repae.build import BuildContext, create, list_components
    from repae.compose import compose_recipe
    from repae.config import FieldError
    from repae.errors import (
        CapabilityError,
        ComponentBuildError,
        PluginError,
        Problem,
        RecipeError,
        UnknownComponentError,
        UserError,
        WeightsMismatchError,
        did_you_mean,
    )
    from repae.evaluate.inputs import IMAGE_SUFFIXES
    from repae.images import UnreadableImage, decode_image, describe_unreadable, scan_images
    from repae.evaluate.metrics import (
        feature_statistics,
        frechet_distance,
        frechet_distance_to_features,
        inception_score,
        precision_recall,
    )
    from repae.fileio import atomic_path, atomic_write, write_json, write_safetensors
    from repae.generate import decode_latents, to_uint8
    from repae.interfaces import (
        AffineNormalizer,
        CarriesLatentNormState,
        ChecksTokenizer,
        Dataset,
        Denoiser,
        DenoiserOutput,
        Exportable,
        ExportContext,
        HasBlocks,
        HasLatentStatistics,
        LatentNormalizer,
        LatentStatistics,
        LoadsLatentNormState,
        LossConfig,
        Metric,
        PhasePlan,
        Posterior,
        ReadsImages,
        RecordsWeights,
        ReferenceFeatures,
        RepresentationEncoder,
        Sampler,
        StepPlan,
        Tokenizer,
        Tracker,
        TrackerRun,
        Trainer,
        Transport,
        WeightsInfo,
        adopt_latent_norm_state,
        require,
        supports,
    )
    from repae.image_shards import ImageShards, write_image_shards
    from repae.latent_cache import LatentCache, write_latent_cache
    from repae.loss import Loss
    from repae.packages import check_package, require_package
    from repae.posterior import DiagonalGaussian
    from repae.plugins import Register, load_plugins
    from repae.recipe import load_recipe
    from repae.registry import KINDS, PRESET_FIELD, ComponentEntry
    from repae.reporting import progress
    from repae.runs import open_run
    from repae.train.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from repae.train.config import OptimizerConfig, TrainerConfig
    from repae.train.context import StepContext, StepInputs
    from repae.train.engine import PhasedTrainer
    from repae.weights import (
        file_sha256,
        load_into,
        load_state_dict,
        load_weights,
        read_checkpoint,
        resolve_weights,
        select_entry,
    )
