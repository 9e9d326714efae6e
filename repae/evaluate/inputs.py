"""What ``repae eval`` reads: generated samples and the reference they are compared with.

Samples (``SAMPLES``):

- an ADM sample batch: ``.npz`` with ``arr_0``, uint8 ``[N, H, W, 3]`` (what DiT, SiT, REPA and REPA-E's
  ``generate.py`` write); read in batches, never whole;
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``; searched recursively, sorted by path);
- a ``repae sample`` output folder: its ``samples.npz`` (an unfinished one, with ``sampling.json`` but no
  ``samples.npz``, is refused); any other folder: its only ``.npz`` holding ``arr_0``, else its images.

Reference (``--ref``):

- an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): ``mu``, ``sigma`` (pool_3 statistics), ``mu_s``,
  ``sigma_s`` (spatial statistics) and ``arr_0`` (10,000 images, for precision/recall). As in ADM's evaluator, the
  stored statistics are used for FID / sFID when present, and the images otherwise;
- a folder of images (statistics and features computed from them).

:func:`write_reference_npz` writes the same format (streaming the images), so a folder's statistics are computed once
and the file also works with ADM's TensorFlow evaluator.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from repae.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "STAT_KEYS",
    "FolderImages",
    "ImageSource",
    "NpzImages",
    "Reference",
    "check_inputs",
    "open_reference",
    "open_samples",
    "write_reference_npz",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
"""File endings read as images everywhere in repae (compared case-insensitively: ImageNet's ``.JPEG`` counts)."""
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
"""repae feature name -> the (mean, covariance) keys of an ADM reference batch."""


class ImageSource:
    """A sized collection of RGB images read in uint8 NHWC batches."""

    path: Path

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive uint8 ``[b, H, W, 3]`` batches (``b <= batch_size``; a folder with images of several sizes
        starts a new batch where the size changes)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


# -- .npz ----------------------------------------------------------------------------------------------------------
class NpzImages(ImageSource):
    """``arr_0`` of an ``.npz`` file, read member-streamed (stored or deflated) without loading it whole."""

    def __init__(self, path: str | os.PathLike[str], key: str = "arr_0") -> None:
        self.path = Path(path)
        self.key = key
        with self._open() as fh:
            self.shape, self.fortran, self.dtype = _read_npy_header(fh, self.path)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise UserError(
                f"{self.path}: {key} is {self.dtype} {list(self.shape)}; expected uint8 images [N, H, W, 3] "
                "(ADM layout: np.savez(path, arr_0=images))"
            )
        if self.fortran:
            raise UserError(f"{self.path}: {key} is stored in Fortran order; save it with np.ascontiguousarray")

    @contextlib.contextmanager
    def _open(self) -> Iterator[IO[bytes]]:
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{self.path} is not a readable .npz file: {exc}") from None
        with archive:
            member = f"{self.key}.npy"
            if member not in archive.namelist():
                keys = ", ".join(n.removesuffix(".npy") for n in archive.namelist())
                raise UserError(f"{self.path} holds no '{self.key}' array (arrays: {keys or 'none'})")
            with archive.open(member) as handle:
                yield handle

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:]))
        with self._open() as fh:
            _read_npy_header(fh, self.path)
            done = 0
            while done < len(self):
                count = min(batch_size, len(self) - done)
                data = fh.read(count * per_image)
                if len(data) != count * per_image:
                    raise UserError(f"{self.path}: {self.key} is truncated after {done} images")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])
                done += count

    def describe(self) -> str:
        n, h, w, _ = self.shape
        return f"{self.path} ({self.key}: {n} images, {h}x{w})"


def _read_npy_header(fh, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        raise UserError(f"{path}: not a NumPy array member ({exc})") from None


# -- folders -------------------------------------------------------------------------------------------------------
class FolderImages(ImageSource):
    """Image files under a folder (recursive, sorted by relative path), decoded to 8-bit RGB by
    :func:`repae.images.decode_image`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise UserError(f"{self.path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no samples.npz")

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> np.ndarray:
        from repae.images import decode_image

        return decode_image(path)  # every PIL mode to 8-bit RGB; UnreadableImage (one line) naming the file

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        for path in self.files:
            image = self._read(path)
            if pending and (len(pending) == batch_size or pending[0].shape != image.shape):
                yield np.stack(pending)
                pending = []
            pending.append(image)
        if pending:
            yield np.stack(pending)

    def describe(self) -> str:
        return f"{self.path} ({len(self)} image files)"


def check_inputs(samples: str | os.PathLike[str], reference: str | os.PathLike[str]) -> None:
    """What :func:`open_samples` and :func:`open_reference` refuse of the paths themselves (missing, or a file that is
    not an ``.npz``), checked without reading them: ``repae eval`` calls it before torch is imported."""
    _check_samples_path(Path(samples))
    _check_reference_path(Path(reference))


def _check_samples_path(path: Path) -> None:
    if path.is_file():
        if path.suffix != ".npz":
            raise UserError(f"{path}: samples must be an .npz (ADM layout, arr_0) or a folder of images")
    elif not path.is_dir():
        raise UserError(f"samples not found: {path}")


def _check_reference_path(path: Path) -> None:
    if path.is_dir():
        return
    if not path.is_file():
        raise UserError(
            f"reference not found: {path}. Use the ADM reference batch (VIRTUAL_imagenet256_labeled.npz for ImageNet "
            "256x256; see docs/evaluation.md) or a folder of reference images"
        )
    if path.suffix != ".npz":
        raise UserError(f"{path}: a reference must be an ADM .npz (mu, sigma, mu_s, sigma_s, arr_0) or a folder")


def open_samples(path: str | os.PathLike[str]) -> ImageSource:
    """The generated images at ``path``: an ``.npz`` with ``arr_0``, a folder of images or a ``repae sample`` folder."""
    path = Path(path)
    _check_samples_path(path)
    if path.is_file():
        return NpzImages(path)
    if (path / "samples.npz").is_file():
        return NpzImages(path / "samples.npz")
    if (path / "sampling.json").is_file():
        raise UserError(f"{path} is a `repae sample` folder without samples.npz: its sampling has not finished (rerun "
                        "the same `repae sample` command to complete it)")
    npz = [p for p in sorted(path.glob("*.npz")) if "arr_0.npy" in _members(p)]
    if len(npz) == 1:
        return NpzImages(npz[0])
    if len(npz) > 1:
        names = ", ".join(p.name for p in npz)
        raise UserError(f"{path} holds several sample batches ({names}); pass the one to evaluate")
    return FolderImages(path)


def _members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


# -- reference -----------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """A reference set: precomputed statistics (per feature, ``(mu, sigma)``) and/or images."""

    path: Path
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    images: ImageSource | None = None

    def describe(self) -> str:
        parts = []
        if self.stats:
            parts.append("statistics " + ", ".join(k for name in self.stats for k in STAT_KEYS[name]))
        if self.images is not None:
            parts.append(f"{len(self.images)} images")
        return f"{self.path} ({'; '.join(parts)})"


def open_reference(path: str | os.PathLike[str]) -> Reference:
    """An ADM reference batch (``.npz``) or a folder of reference images."""
    path = Path(path)
    _check_reference_path(path)
    if path.is_dir():
        return Reference(path, images=FolderImages(path))
    members = _members(path)
    if not members:
        raise UserError(f"{path} is not a readable .npz file")
    keys = {m.removesuffix(".npy") for m in members}
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for name, (mu_key, sigma_key) in STAT_KEYS.items():
            if mu_key in keys and sigma_key in keys:
                mu, sigma = np.asarray(data[mu_key], np.float64), np.asarray(data[sigma_key], np.float64)
                if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
                    raise UserError(f"{path}: {mu_key} {list(mu.shape)} and {sigma_key} {list(sigma.shape)} are not a "
                                    "mean vector and its covariance matrix")
                stats[name] = (mu, sigma)
    images = NpzImages(path) if "arr_0" in keys else None
    if not stats and images is None:
        raise UserError(f"{path} holds neither statistics (mu, sigma, mu_s, sigma_s) nor images (arr_0); "
                        f"arrays: {', '.join(sorted(keys))}")
    return Reference(path, stats=stats, images=images)


def write_reference_npz(
    path: str | os.PathLike[str],
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    images: Iterable[np.ndarray] | None = None,
) -> Path:
    """Write an ADM-format reference batch: ``mu``/``sigma`` and ``mu_s``/``sigma_s`` from ``stats`` (repae feature
    name -> (mean, covariance)), plus ``arr_0`` streamed from uint8 NHWC ``images`` batches when given.

    The file is what ``np.savez`` would write (readable by ``np.load`` and ADM's evaluator). Written to a temporary
    name and renamed, so a failure never leaves a half-written reference behind.
    """
    from repae.fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, (mu, sigma) in stats.items():
                for key, value in zip(STAT_KEYS[name], (mu, sigma)):
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as fh:
                        np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)
            if images is not None:
                _write_streamed(archive, "arr_0.npy", images)
    return path


def _write_streamed(archive: zipfile.ZipFile, member: str, batches: Iterable[np.ndarray]) -> None:
    """Write uint8 NHWC batches as one ``.npy`` member; the count is known only at the end, so the batches are first
    spooled to a temporary file."""
    import tempfile

    count, shape = 0, None
    with tempfile.TemporaryFile() as spool:
        for batch in batches:
            batch = np.ascontiguousarray(batch, dtype=np.uint8)
            if shape is None:
                shape = batch.shape[1:]
            elif batch.shape[1:] != shape:
                raise UserError(f"reference images have different sizes ({list(shape)} and {list(batch.shape[1:])}); "
                                "an ADM reference batch holds images of one size")
            spool.write(batch.tobytes())
            count += len(batch)
        if shape is None:
            return
        spool.seek(0)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (count, *shape)}
        with archive.open(member, "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            for chunk in iter(lambda: spool.read(1 << 24), b""):
                fh.write(chunk)
