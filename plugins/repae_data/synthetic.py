"""``synthetic``: procedurally generated class-conditional images, for the quickstart and the tests.

No files and no downloads: image ``i`` is drawn from a generator seeded with ``(seed, i)``, so any process gets the
same image for the same index. Its label is ``i % num_classes`` (balanced classes). A class fixes what a small model
can learn in a minute: a foreground hue (classes spread evenly around the colour wheel), a darker complementary
background, one of eight shapes (or of the config's ``shapes``) and a base orientation. An image varies the placement
(``offset``), size (``scale``), a small rotation (``rotation``), a background gradient, the brightness and pixel noise
(``noise``); the quickstart narrows these to make its classes learnable in a minute.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from repae_data import SYNTHETIC_SHAPES
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from pathlib import Path

    from repae import BuildContext
    from repae_data import SyntheticConfig

__all__ = ["SHAPES", "ClassStyle", "SyntheticDataset", "build_synthetic", "class_style", "render"]

SHAPES: tuple[str, ...] = SYNTHETIC_SHAPES
"""The shapes, in the order classes cycle through them by default."""


@dataclass(frozen=True)
class ClassStyle:
    """What is fixed for a class: colours (RGB in [0, 1]), shape and base orientation (radians)."""

    foreground: tuple[float, float, float]
    background: tuple[float, float, float]
    shape: str
    angle: float

    @property
    def description(self) -> str:
        r, g, b = (round(255 * x) for x in self.foreground)
        return f"{self.shape} #{r:02x}{g:02x}{b:02x} at {math.degrees(self.angle):.0f} deg"


def class_style(label: int, num_classes: int, shapes: Sequence[str] = SHAPES) -> ClassStyle:
    """The style of class ``label`` among ``num_classes``, its shape cycling through ``shapes``."""
    hue = label / num_classes
    foreground = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    background = colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5, 0.3)
    shape = shapes[label % len(shapes)]
    angle = (label // len(shapes)) * 0.7 % math.pi  # classes sharing a shape differ in orientation (and hue)
    return ClassStyle(foreground, background, shape, angle)


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) of a unit-sized shape in its own coordinates."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if shape == "triangle":  # apex up, centroid at the origin
        return np.maximum(-v - 0.5, 0.5 * math.sqrt(3) * np.abs(u) + 0.5 * v - 0.5)
    if shape == "ring":
        return np.abs(r - 0.75) - 0.25
    if shape == "cross":
        arm_u = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3)
        arm_v = np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0)
        return np.minimum(arm_u, arm_v)
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - 1.0) / math.sqrt(2)
    if shape == "stripes":  # three bars inside a square
        bars = (np.abs(np.mod(1.5 * u + 0.5, 1.0) - 0.5) - 0.25) / 1.5
        return np.maximum(np.maximum(np.abs(u), np.abs(v)) - 0.9, bars)
    if shape == "half-disc":
        return np.maximum(r - 1.0, -v)
    raise ValueError(f"unknown shape {shape!r}")


def render(style: ClassStyle, resolution: int, rng: np.random.Generator, *, offset: float = 0.35,
           scale_range: tuple[float, float] = (0.35, 0.6), rotation: float = 0.15, noise: float = 0.03) -> np.ndarray:
    """One image of a class as uint8 ``[H, W, 3]``, its variations drawn from ``rng``: centre within ``offset`` of the
    image centre, size in ``scale_range``, rotation of standard deviation ``rotation`` (radians), pixel noise of
    standard deviation ``noise`` (coordinates: the image spans [-1, 1])."""
    coords = (np.arange(resolution) + 0.5) / resolution * 2.0 - 1.0  # pixel centres in [-1, 1]
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = rng.uniform(-offset, offset, size=2)
    scale = rng.uniform(*scale_range)
    angle = style.angle + rng.normal(0.0, rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    u = (dx * cos + dy * sin) / scale
    v = (dy * cos - dx * sin) / scale
    pixel = 2.0 / resolution / scale  # one pixel in shape units: anti-aliased edges
    mask = np.clip(0.5 - _shape_sdf(style.shape, u, v) / pixel, 0.0, 1.0)[..., None]

    direction = rng.uniform(0.0, 2.0 * math.pi)
    gradient = 1.0 + 0.2 * (xx * math.cos(direction) + yy * math.sin(direction))[..., None]
    background = np.asarray(style.background) * gradient
    image = background * (1.0 - mask) + np.asarray(style.foreground) * mask
    image = image * rng.uniform(0.9, 1.1) + rng.normal(0.0, noise, size=image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


class SyntheticDataset(Dataset):
    """``num_images`` generated images of ``resolution`` pixels over ``num_classes`` classes; items ``(uint8 [3, H, W],
    label)``. Implements :class:`repae.Dataset` and :class:`repae.ReadsImages` (image files get the ADM centre crop
    to ``resolution``, as the ``image-folder`` dataset prepares them). ``shapes``, ``offset``, ``scale``,
    ``rotation`` and ``noise`` are those of :class:`repae_data.SyntheticConfig` (see :func:`render`)."""

    kind = "images"
    latent_shape = None

    def __init__(self, *, num_classes: int = 10, resolution: int = 32, num_images: int = 1024, seed: int = 0,
                 shapes: Sequence[str] = SHAPES, offset: float = 0.35, scale: tuple[float, float] = (0.35, 0.6),
                 rotation: float = 0.15, noise: float = 0.03) -> None:
        unknown = [s for s in shapes if s not in SHAPES]
        if not shapes or unknown:
            raise ValueError(f"shapes must be one or more of {', '.join(SHAPES)}, got {unknown or list(shapes)}")
        self.num_classes = num_classes
        self.resolution = resolution
        self.num_images = num_images
        self.seed = seed
        self.shapes = tuple(shapes)
        self.offset, self.scale, self.rotation, self.noise = (float(offset), (float(scale[0]), float(scale[1])),
                                                              float(rotation), float(noise))
        self.styles = [class_style(c, num_classes, self.shapes) for c in range(num_classes)]
        self.classes = [s.description for s in self.styles]
        """A readable name per class (shape, colour, orientation)."""

    def __len__(self) -> int:
        return self.num_images

    def label(self, index: int) -> int:
        """The label of item ``index`` (without rendering it)."""
        return index % self.num_classes

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch (no augmentation); present for the dataset interface."""

    def load_image(self, path: Path) -> torch.Tensor:
        """:class:`repae.ReadsImages`: an image file, RGB, ADM centre crop to ``resolution``."""
        from repae_data.image_folder import read_image

        return read_image(path, self.resolution)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for a synthetic dataset of {self.num_images} images")
        label = self.label(index)
        rng = np.random.default_rng([self.seed, index])
        image = render(self.styles[label], self.resolution, rng, offset=self.offset, scale_range=self.scale,
                       rotation=self.rotation, noise=self.noise)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), label

    def __repr__(self) -> str:
        return (f"SyntheticDataset(num_classes={self.num_classes}, resolution={self.resolution}, num_images={self.num_images}, "
                f"seed={self.seed}, shapes={list(self.shapes)}, offset={self.offset}, scale={list(self.scale)}, "
                f"rotation={self.rotation}, noise={self.noise})")


def build_synthetic(config: SyntheticConfig, context: BuildContext) -> SyntheticDataset:
    """Factory of the ``synthetic`` dataset (nothing to load, the same on every device)."""
    return SyntheticDataset(
        num_classes=config.num_classes, resolution=config.resolution, num_images=config.num_images, seed=config.seed,
        shapes=config.shapes, offset=config.offset, scale=config.scale, rotation=config.rotation, noise=config.noise,
    )
