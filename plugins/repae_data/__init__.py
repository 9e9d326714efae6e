"""Datasets as repae components: ``synthetic``, ``image-folder``, ``image-shards`` and ``latent-cache``.

Data preparation follows REPA-E (Leng et al., 2025, arXiv 2504.10483), which takes it from ADM (Dhariwal & Nichol,
2021, arXiv 2105.05233): ImageNet train images, RGB, ADM centre crop, no augmentation; frozen-tokenizer trainings
read latents cached once as the posterior mean and standard deviation.

Every dataset is a ``torch.utils.data.Dataset`` with ``num_classes``, ``resolution`` and ``kind`` (``"images"``:
items are ``(uint8 [3, H, W], label)``; ``"latents"``: items are ``(float32 [2C, h, w] = mean ‖ std, label)``), and
``set_epoch(epoch)``. Items are a pure function of (config, index, epoch); sharding and shuffling are the engine's.

This module only declares configs and registers them; it imports neither torch nor PIL. The implementations live in
:mod:`repae_data.synthetic`, :mod:`repae_data.image_folder`, :mod:`repae_data.shards` (images written once by
``repae prepare-data``, read through memory maps) and :mod:`repae_data.cache` (latents cached by
``repae cache-latents``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from repae import FieldError, hookimpl, option

__all__ = ["SYNTHETIC_SHAPES", "ImageFolderConfig", "ImageShardsConfig", "LatentCacheConfig", "SyntheticConfig"]

SYNTHETIC_SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "stripes", "half-disc")
"""The shapes of the ``synthetic`` dataset (:data:`repae_data.synthetic.SHAPES`), in the order classes cycle through
them by default."""


@dataclass(kw_only=True)
class SyntheticConfig:
    """Procedurally generated class-conditional images: no files, deterministic from ``seed`` and the index."""

    num_classes: int = option(10, doc="number of classes (each has its own colours, shape and orientation)")
    resolution: int = option(32, doc="image side in pixels")
    num_images: int = option(1024, doc="number of images (labels cycle through the classes: balanced)")
    seed: int = option(0, doc="seed of the per-image randomness (placement, scale, noise); 0 in every recipe")
    shapes: list[str] = option(
        default_factory=lambda: list(SYNTHETIC_SHAPES),
        doc="shapes the classes cycle through, in order (any of disc, square, triangle, ring, cross, diamond, "
        "stripes, half-disc); fewer or simpler shapes make the classes easier to learn",
    )
    offset: float = option(0.35, doc="largest shift of a shape's centre from the image centre (image half-width = 1)")
    scale: tuple[float, float] = option((0.35, 0.6), doc="range of a shape's size (image half-width = 1)")
    rotation: float = option(0.15, doc="standard deviation of a shape's rotation about its class's angle (radians)")
    noise: float = option(0.03, doc="standard deviation of the per-pixel noise (intensities in [0, 1])")

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise FieldError("num_classes", f"must be >= 1, got {self.num_classes}")
        if self.resolution < 8:
            raise FieldError("resolution", f"must be >= 8, got {self.resolution}")
        if self.num_images < 1:
            raise FieldError("num_images", f"must be >= 1, got {self.num_images}")
        if self.seed < 0:
            raise FieldError("seed", f"must be >= 0, got {self.seed}")
        unknown = [s for s in self.shapes if s not in SYNTHETIC_SHAPES]
        if not self.shapes or unknown:
            raise FieldError("shapes", f"must be one or more of {', '.join(SYNTHETIC_SHAPES)}, got "
                             f"{unknown or self.shapes}")
        if not 0.0 <= self.offset <= 1.0:
            raise FieldError("offset", f"must be in [0, 1], got {self.offset}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise FieldError("scale", f"must be [low, high] with 0 < low <= high <= 1, got {list(self.scale)}")
        if not 0.0 <= self.rotation:
            raise FieldError("rotation", f"must be >= 0, got {self.rotation}")
        if not 0.0 <= self.noise <= 1.0:
            raise FieldError("noise", f"must be in [0, 1], got {self.noise}")


@dataclass(kw_only=True)
class ImageFolderConfig:
    """An ImageNet-train style folder ``root/<class>/<image>``; labels = class folders in sorted order."""

    root: str = option(doc="folder holding one sub-folder per class, e.g. data/imagenet/train")
    resolution: int = option(256, doc="side of the ADM centre crop (BOX-halve, BICUBIC short side, centre crop)")
    hflip: bool = option(False, doc="random horizontal flip, a function of (seed, index, epoch); REPA-E has none")
    seed: int = option(0, doc="seed of the flips")
    num_classes: int | None = option(
        None, doc="expected number of class folders (null: whatever root holds); a mismatch is an error"
    )
    on_unreadable: Literal["error", "skip"] = option(
        "error", doc="an image file that cannot be decoded: `error` stops with its name (one line); `skip` warns "
        "once and uses the next readable image in its place (counted: the dataset's `skipped`)"
    )
    scan: bool = option(
        False, doc="decode every file when the run starts (up to 8 processes) and report all unreadable ones at once"
    )

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise FieldError("resolution", f"must be >= 1, got {self.resolution}")
        if self.seed < 0:
            raise FieldError("seed", f"must be >= 0, got {self.seed}")
        if self.num_classes is not None and self.num_classes < 1:
            raise FieldError("num_classes", f"must be >= 1 or null, got {self.num_classes}")


@dataclass(kw_only=True)
class ImageShardsConfig:
    """Images prepared once by ``repae prepare-data`` (decoded, ADM centre crop, uint8 shards read through memory
    maps): the same items as the ``image-folder`` they were made from, without decoding a JPEG per access."""

    root: str = option(doc="shards folder written by `repae prepare-data IMAGE_FOLDER --out ROOT` (manifest.json)")
    hflip: bool = option(False, doc="random horizontal flip, a function of (seed, index, epoch) as in image-folder")
    seed: int = option(0, doc="seed of the flips")
    resolution: int | None = option(
        None, doc="expected image side (null: the shards'); a mismatch is an error. Needed for a dry run without "
        "the shards"
    )
    num_classes: int | None = option(
        None, doc="expected number of classes (null: the shards'); a mismatch is an error"
    )

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise FieldError("seed", f"must be >= 0, got {self.seed}")
        if self.resolution is not None and self.resolution < 1:
            raise FieldError("resolution", f"must be >= 1 or null, got {self.resolution}")
        if self.num_classes is not None and self.num_classes < 1:
            raise FieldError("num_classes", f"must be >= 1 or null, got {self.num_classes}")


@dataclass(kw_only=True)
class LatentCacheConfig:
    """Latents cached by ``repae cache-latents``: the tokenizer's posterior mean and std of every image."""

    root: str = option(doc="cache folder written by `repae cache-latents` (holds index.json and shards)")


@hookimpl
def register_components(register) -> None:
    """Register the four built-in datasets."""
    register(
        "dataset",
        "synthetic",
        summary="procedural class-conditional images (coloured shapes), no files; quickstart and tests",
        config=SyntheticConfig,
        factory="repae_data.synthetic:build_synthetic",
    )
    register(
        "dataset",
        "image-folder",
        summary="ImageNet-train style folder root/<class>/<image>, ADM centre crop (REPA-E preprocessing)",
        config=ImageFolderConfig,
        factory="repae_data.image_folder:build_image_folder",
    )
    register(
        "dataset",
        "image-shards",
        summary="image-folder items prepared once by `repae prepare-data` (uint8 shards read through memory maps)",
        config=ImageShardsConfig,
        factory="repae_data.shards:build_image_shards",
    )
    register(
        "dataset",
        "latent-cache",
        summary="posterior mean and std cached by `repae cache-latents` (frozen-tokenizer trainings)",
        config=LatentCacheConfig,
        factory="repae_data.cache:build_latent_cache",
    )
