"""``image-folder``: an ImageNet-train style folder with the ADM centre crop, as REPA-E prepares its data.

Layout: ``root/<class>/<image>`` (any depth of sub-folders is *not* searched: one folder per class, images inside).
Labels are the indices of the class folders in sorted order, as REPA-E's preprocessing assigns them; images inside a
class are taken in sorted file-name order. Each image is converted to RGB and centre-cropped the ADM way (Dhariwal &
Nichol, 2021, arXiv 2105.05233; used by REPA-E, arXiv 2504.10483, and REPA): halve with a BOX filter while the short
side is at least twice the target, resize with BICUBIC so that the short side equals the target, then cut the centre
square. REPA-E uses no augmentation; an optional horizontal flip is a function of ``(seed, index, epoch)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from repae import IMAGE_SUFFIXES, UnreadableImage, UserError, decode_image, describe_unreadable, scan_images

if TYPE_CHECKING:
    from repae import BuildContext
    from repae_data import ImageFolderConfig

__all__ = ["ImageFolderDataset", "build_image_folder", "center_crop_adm", "flip_decision",
           "read_array", "read_image", "scan_image_folder"]


def center_crop_adm(image: Image.Image, resolution: int) -> np.ndarray:
    """The ADM centre crop of a PIL image: uint8 ``[resolution, resolution, C]``.

    While the short side is at least ``2 * resolution``, halve both sides (integer division) with a BOX filter; then
    resize with BICUBIC by ``resolution / short side`` (sides rounded with Python's ``round``); then take the
    centre ``resolution`` square, its offset rounded down.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def read_array(path: str | os.PathLike[str], resolution: int) -> np.ndarray:
    """One image file as REPA-E prepares it: RGB (:func:`repae.decode_image`: every PIL mode, EXIF orientation), ADM
    centre crop: uint8 ``[resolution, resolution, 3]``. :class:`~repae.UnreadableImage` naming the file when it cannot
    be read."""
    return center_crop_adm(Image.fromarray(decode_image(path)), resolution)


def read_image(path: str | os.PathLike[str], resolution: int) -> torch.Tensor:
    """:func:`read_array` as a tensor: ``uint8 [3, resolution, resolution]``."""
    return torch.from_numpy(np.ascontiguousarray(read_array(path, resolution).transpose(2, 0, 1)))


def flip_decision(seed: int, index: int, epoch: int) -> bool:
    """Whether item ``index`` is flipped in ``epoch``: a fair coin that depends on nothing else."""
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)  # any case: ImageNet's .JPEG counts


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def scan_image_folder(root: str | os.PathLike[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, samples)`` of ``root/<class>/<image>``: class folder names sorted, ``(path, label)`` per image.

    Raises :class:`UserError` naming the folder and the fix when root is missing, holds no class folders, or some
    class folder holds no images.
    """
    root = Path(root).expanduser()
    layout = "expected one sub-folder per class holding its images (root/<class>/<image>, as ImageNet's train/)"
    if not root.exists():
        raise UserError(f"dataset folder {root} does not exist; set dataset.root to the folder of class folders "
                        f"({layout})")
    if not root.is_dir():
        raise UserError(f"dataset.root {root} is a file, not a folder; {layout}")
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
        classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if not classes:
        if loose:
            raise UserError(f"{root} holds {len(loose)} image(s) but no class folders; {layout}. Move the images "
                            f"into one folder per class (for a single class: {root}/0/).")
        raise UserError(f"{root} holds no class folders and no images; {layout}")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        folder = root / name
        with os.scandir(folder) as it:
            files = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
        if not files:
            empty.append(name)
        samples.extend((str(folder / f), label) for f in files)
    if empty:
        raise UserError(
            f"{len(empty)} class folder(s) of {root} hold no images ({_listing(empty)}); labels are the positions of "
            f"the class folders in sorted order, so every class folder needs images. Remove the empty folders or add "
            f"images (endings read: {', '.join(IMAGE_SUFFIXES)}, any case)."
        )
    return classes, samples


_FIX = ("replace or remove the file, set dataset.on_unreadable: skip to train without it, or dataset.scan: true to "
        "list every unreadable file before training")


def _scan_workers() -> int:
    return min(8, os.cpu_count() or 1)


class ImageFolderDataset(Dataset):
    """Images of ``root/<class>/<image>`` centre-cropped to ``resolution``; items ``(uint8 [3, H, W], label)``.

    ``classes`` are the class folder names (label = position), ``samples`` the ``(path, label)`` pairs in item order.
    Implements :class:`repae.Dataset` and :class:`repae.ReadsImages` (:meth:`load_image`).

    Unreadable files (:class:`repae.UnreadableImage`): with ``on_unreadable="error"`` reading one raises its one-line
    error; with ``"skip"`` item ``i`` whose file is unreadable is the next readable item (``i + 1``, ``i + 2``, ...,
    wrapping; its image and label), a warning names the file once per process, and :attr:`skipped` lists the files
    found unreadable so far by every process reading this dataset (DataLoader workers included: the flags live in
    shared memory). ``scan=True`` decodes every file when the dataset is made and reports the unreadable ones at once.
    """

    kind = "images"
    latent_shape = None

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        resolution: int = 256,
        hflip: bool = False,
        seed: int = 0,
        num_classes: int | None = None,
        scan: bool = True,
        on_unreadable: str = "error",
        check_files: bool = False,
    ) -> None:
        if on_unreadable not in ("error", "skip"):
            raise UserError(f"dataset.on_unreadable must be 'error' or 'skip', got {on_unreadable!r}")
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0
        self.scanned = scan
        if scan:
            self.classes, self.samples = scan_image_folder(self.root)
            if num_classes is not None and num_classes != len(self.classes):
                raise UserError(
                    f"{self.root} holds {len(self.classes)} class folders but dataset.num_classes is {num_classes}; "
                    f"check dataset.root (ImageNet-1k train has 1000) or set num_classes to null"
                )
        else:  # a dry run on `meta`: do not touch the disk
            self.classes, self.samples = [], []
        self.num_classes = len(self.classes) if scan else (num_classes or 0)
        self.on_unreadable = on_unreadable
        # one flag per item, 1 = its file is unreadable; shared memory, so that workers' findings reach this process
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.uint8)
        if on_unreadable == "skip" and len(self.samples):
            self._unreadable.share_memory_()
        self._warned: set[int] = set()
        if check_files and self.samples:
            self.check_files()

    def check_files(self, workers: int | None = None) -> list[tuple[str, str]]:
        """Decode every file (``workers`` processes, default up to 8); returns ``(path, reason)`` of the unreadable
        ones. With ``on_unreadable="error"`` any is a :class:`UserError` listing them (one line); with ``"skip"``
        they are flagged (:attr:`skipped`) and named in one warning."""
        paths = [path for path, _ in self.samples]
        bad = scan_images(paths, workers=_scan_workers() if workers is None else workers,
                          label=f"scan {self.root}")
        if bad and self.on_unreadable == "error":
            raise UserError(f"{self.root}: {describe_unreadable(bad)}. Replace or remove them, or set "
                            "dataset.on_unreadable: skip to train without them")
        if bad:
            position = {path: i for i, path in enumerate(paths)}
            for path, _ in bad:
                self._unreadable[position[path]] = 1
                self._warned.add(position[path])
            if len(bad) == len(paths):
                raise UserError(f"no image of {self.root} is readable: {describe_unreadable(bad, limit=3)}")
            warnings.warn(f"{self.root}: {describe_unreadable(bad)}; each is replaced by the next readable image "
                          "(dataset.on_unreadable: skip)", UserWarning, stacklevel=2)
        return bad

    @property
    def skipped(self) -> list[str]:
        """Files found unreadable so far (by the scan or by reading, in any process), in item order."""
        return [self.samples[int(i)][0] for i in torch.nonzero(self._unreadable).flatten()]

    @property
    def num_skipped(self) -> int:
        """``len(skipped)``, cheaply (a sum over one byte per item)."""
        return int(self._unreadable.sum()) if len(self._unreadable) else 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips :meth:`__getitem__` applies (no effect without ``hflip``)."""
        self.epoch = int(epoch)

    def load(self, index: int) -> np.ndarray:
        """Read, convert to RGB and crop image ``index``: uint8 ``[H, W, 3]``, not flipped."""
        return read_array(self.samples[index][0], self.resolution)

    def load_image(self, path: Path) -> torch.Tensor:
        """:class:`repae.ReadsImages`: any image file prepared as the items are (RGB, ADM crop), not flipped."""
        return read_image(path, self.resolution)

    def _load_readable(self, index: int) -> tuple[int, np.ndarray]:
        """``(j, image)`` of the item that stands for ``index``: ``index`` itself, or with ``on_unreadable="skip"``
        the next readable one."""
        count = len(self.samples)
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} images")
        for step in range(count):
            j = (index + step) % count
            if self._unreadable[j]:
                continue
            try:
                return j, self.load(j)
            except UnreadableImage as exc:
                if self.on_unreadable == "error":
                    raise UnreadableImage.of(self.samples[j][0], exc.reason, _FIX) from None
                self._unreadable[j] = 1
                if j not in self._warned:
                    self._warned.add(j)
                    warnings.warn(f"skipping unreadable image {self.samples[j][0]}: {exc.reason} (dataset."
                                  "on_unreadable: skip; it is replaced by the next readable image)", UserWarning,
                                  stacklevel=2)
        raise UserError(f"no image of {self.root} is readable ({count} tried); check dataset.root")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        source, array = self._load_readable(index)
        if self.hflip and flip_decision(self.seed, index, self.epoch):
            array = array[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return image, self.samples[source][1]

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, items={len(self)}, num_classes={self.num_classes}, "
                f"resolution={self.resolution}, hflip={self.hflip}, on_unreadable={self.on_unreadable!r})")


def build_image_folder(config: ImageFolderConfig, context: BuildContext) -> ImageFolderDataset:
    """Factory of ``image-folder``. On ``meta`` (dry runs) the folder is not read: the dataset is an empty
    placeholder whose ``num_classes`` is the config's (0 when null)."""
    return ImageFolderDataset(
        config.root,
        resolution=config.resolution,
        hflip=config.hflip,
        seed=config.seed,
        num_classes=config.num_classes,
        scan=not context.dry_run,
        on_unreadable=config.on_unreadable,
        check_files=config.scan and not context.dry_run,
    )
