"""``image-shards``: images prepared once by ``repae prepare-data``, read through memory maps (:class:`repae.ImageShards`).

Decoding a JPEG and cropping it costs milliseconds per image, on every access, in every epoch. ``repae prepare-data``
does it once and stores the ``uint8 [3, H, W]`` items in raw shards (the format and the writer are repae's own,
:mod:`repae.image_shards`); this dataset maps them and copies items out. For shards made from an ``image-folder``,
item ``i`` is exactly that dataset's item ``i`` (same sorted order, same ADM centre crop, same label), and the
optional flip is the same function of ``(seed, index, epoch)``: the two datasets are interchangeable in a recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from repae import ImageShards, UserError
from repae_data.image_folder import flip_decision, read_image

if TYPE_CHECKING:
    from repae import BuildContext
    from repae_data import ImageShardsConfig

__all__ = ["ImageShardsDataset", "build_image_shards"]


class ImageShardsDataset(Dataset):
    """Items ``(uint8 [3, H, W], label)`` of a shards folder written by ``repae prepare-data``; ``classes`` are the
    class names (label = position). Implements :class:`repae.Dataset` and :class:`repae.ReadsImages` (image files get
    the ADM centre crop to ``resolution``, as the shards' items got it from ``image-folder``).

    The memory maps are opened lazily in each process, so ``DataLoader`` workers (fork or spawn) map the files
    themselves; pickling the dataset carries no maps.
    """

    kind = "images"
    latent_shape = None

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        hflip: bool = False,
        seed: int = 0,
        resolution: int | None = None,
        num_classes: int | None = None,
        shards: ImageShards | None = None,
    ) -> None:
        self.shards = shards if shards is not None else ImageShards(root)
        self.root = self.shards.root
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.classes = self.shards.classes
        self.num_classes = self.shards.num_classes
        self.resolution = self.shards.resolution
        for key, expected, found in (("resolution", resolution, self.resolution),
                                     ("num_classes", num_classes, self.num_classes)):
            if expected is not None and expected != found:
                raise UserError(f"the image shards {self.root} hold {key}={found} but dataset.{key} is {expected}; "
                                f"set dataset.{key} to {found} (or null), or prepare shards with {key}={expected}")

    @classmethod
    def placeholder(cls, root: str | os.PathLike[str], *, resolution: int, num_classes: int | None,
                    hflip: bool = False, seed: int = 0) -> ImageShardsDataset:
        """An empty stand-in for shards that are not there (dry runs on ``meta``): ``len 0``, the given resolution,
        ``num_classes`` or 0."""
        manifest = {"num_items": 0, "num_classes": num_classes or 0, "classes": [], "resolution": resolution,
                    "shard_size": 1, "shards": []}
        return cls(root, hflip=hflip, seed=seed, shards=ImageShards(root, manifest=manifest))

    def __len__(self) -> int:
        return len(self.shards)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips :meth:`__getitem__` applies (no effect without ``hflip``)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        image = self.shards.image(index)  # a read-only view into the memory map
        if self.hflip and flip_decision(self.seed, index, self.epoch):
            image = image[:, :, ::-1]
        return torch.from_numpy(image.copy()), self.shards.label(index)  # copy: C order, writable, off the map

    def load_image(self, path: Path) -> torch.Tensor:
        """:class:`repae.ReadsImages`: any image file prepared as the items were (RGB, ADM crop), not flipped."""
        return read_image(path, self.resolution)

    def __repr__(self) -> str:
        return (f"ImageShardsDataset(root={str(self.root)!r}, items={len(self)}, num_classes={self.num_classes}, "
                f"resolution={self.resolution}, hflip={self.hflip})")


def build_image_shards(config: ImageShardsConfig, context: BuildContext) -> ImageShardsDataset:
    """Factory of ``image-shards``. On ``meta`` (dry runs) no image is read, only ``manifest.json`` and the files'
    sizes; when ``root`` does not exist the dataset is an empty placeholder of ``dataset.resolution`` (which must then
    be set: the denoiser's input size derives from it) and ``dataset.num_classes`` (or 0)."""
    if context.dry_run and not Path(config.root).expanduser().exists():
        if config.resolution is None:
            raise UserError(f"no image shards at {config.root} to read the resolution from; for a dry run without "
                            "them set dataset.resolution (the side they are prepared at), or prepare them with "
                            "`repae prepare-data`")
        return ImageShardsDataset.placeholder(config.root, resolution=config.resolution,
                                              num_classes=config.num_classes, hflip=config.hflip, seed=config.seed)
    return ImageShardsDataset(config.root, hflip=config.hflip, seed=config.seed, resolution=config.resolution,
                              num_classes=config.num_classes)
