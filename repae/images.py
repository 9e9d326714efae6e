"""Reading image files: one function, :func:`decode_image`, for every dataset, ``repae eval`` and ``repae analyze``.

A file becomes uint8 RGB ``[H, W, 3]`` by these rules (docs/data.md, "Decoding images", has the table):

- ``RGB``: as stored. ``L`` (8-bit grey) and ``1`` (bilevel): the grey value in all three channels (``1`` -> 0 or 255).
- ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit grey: PNG, TIFF, PGM): ``round(v / 257)``, the inverse of the
  8 -> 16 bit expansion ``v * 257`` (65535 -> 255, 32768 -> 128); ``I`` (32-bit integer grey, which Pillow also uses
  for some 16-bit files) is read the same way after clipping to ``[0, 65535]``.
- ``F`` (32-bit float grey): values in ``[0, 1]`` (the float convention of scientific imaging), ``round(v * 255)``
  after clipping; NaN -> 0.
- Transparency (``RGBA``, ``LA``, ``PA``, a ``P``/``L``/``RGB`` image with a ``transparency`` entry, the premultiplied
  ``RGBa``/``La``): composited on :data:`BACKGROUND` (white, as viewers and browsers show such images):
  ``(c * a + 255 * (255 - a) + 127) // 255`` per channel. A 16-bit grey image's transparent value becomes white too.
- ``LAB`` (CIELAB TIFF): Pillow's LAB -> RGB conversion, after moving a*, b* from the signed storage of Pillow's
  decoders to the offset-128 storage its conversion expects (Pillow alone turns neutral grey cyan).
- ``P`` (palette) without transparency, ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``: Pillow's conversion to RGB
  (for CMYK ``R = round((255 - C) * (255 - K) / 255)``, likewise G and B, as ``Image.convert("RGB")`` in REPA-E's
  preprocessing; embedded ICC profiles are not applied).
- EXIF orientation is applied (``ImageOps.exif_transpose``), so a photo stored sideways with an orientation tag is
  read upright (an uncompressed TIFF with orientation 5-8, which Pillow decodes scrambled, is refused as unreadable).
  Of an animated or multi-page file, the first frame.

A file that cannot be read raises :class:`UnreadableImage` (a :class:`~repae.UserError`) whose one-line message names
the file, the reason and the fix: not an image, a header claiming more than :data:`MAX_PIXELS` pixels (a
decompression bomb, checked before any pixel is decoded), a truncated file (also when some other code set Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES``), scan data the decoder rejects. What cannot be detected: compressed data that is
damaged but still syntactically valid (flipped bits, zeroed runs inside a JPEG's entropy-coded data) decodes to wrong
pixels; libjpeg only warns about it ("Corrupt JPEG data: ...") and Pillow does not pass its warnings on.

:func:`check_image` tells whether a file decodes (JPEGs decoded at 1/8 scale: every byte of their data is still
read); :func:`scan_images` checks many files, optionally in processes, and returns the unreadable ones with reasons.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from repae.errors import UserError, describe_exception

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["BACKGROUND", "MAX_PIXELS", "StorageError", "UnreadableImage", "check_image", "decode_image", "describe_unreadable",
           "scan_images",
           "to_rgb_array"]

MAX_PIXELS = 1 << 27
"""Largest image (width x height) read: 134,217,728 pixels, e.g. 16384 x 8192, above any camera's 100 MP; its
decoded RGB takes 384 MiB. A header claiming more is an unreadable file (a decompression bomb), refused before its
pixels are decoded."""

BACKGROUND = 255
"""Grey level (in every channel: white) that transparent pixels are composited on."""

_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImage(UserError):
    """An image file that cannot be decoded; ``path`` and ``reason`` are kept for listings (:func:`scan_images`)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.reason = reason

    @classmethod
    def of(cls, path: str | os.PathLike[str], reason: str, fix: str = "replace or remove the file") -> UnreadableImage:
        """The error for ``path``: ``cannot read image PATH: REASON; FIX`` (one line)."""
        reason = " ".join(reason.split())
        return cls(f"cannot read image {path}: {reason}; {fix}", path=path, reason=reason)


def _composite(rgba: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 4]`` -> RGB ``[H, W, 3]`` on :data:`BACKGROUND`, rounded to nearest."""
    colour = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    return ((colour * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def to_rgb_array(image: PILImage.Image) -> np.ndarray:
    """A loaded PIL image as uint8 RGB ``[H, W, 3]`` by the rules of the module docstring (orientation not applied:
    :func:`decode_image` does that)."""
    mode = image.mode
    if mode in _GREY16:
        raw = np.asarray(image)
        values = np.clip(raw.astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):
            grey = np.where(raw == transparent, np.uint8(BACKGROUND), grey)
        return _grey(grey)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return _grey(np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    if mode == "LAB":  # decoders store a*, b* signed; Pillow's LAB -> RGB conversion expects them offset by 128
        lab = np.array(image, dtype=np.uint8)
        lab[..., 1:] ^= 128
        from PIL import Image

        return np.asarray(Image.fromarray(lab, mode="LAB").convert("RGB"), dtype=np.uint8)
    if mode in _ALPHA or "transparency" in image.info:
        return _composite(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(path: Path, *, draft: bool) -> PILImage.Image:
    """Open, check the claimed size, decode and orient ``path``; any failure becomes :class:`UnreadableImage`."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise UnreadableImage.of(path, "no such file" if not path.exists() else "not a file",
                                 "check the path")
    truncated_ok, pillow_limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is checked below
            ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, whatever other code set
            Image.MAX_IMAGE_PIXELS = None  # opening reads only the header; MAX_PIXELS is checked before decoding
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise UnreadableImage.of(
                        path, f"its header claims {width}x{height} = {width * height:,} pixels, more than "
                        f"repae.images.MAX_PIXELS = {MAX_PIXELS:,} (a damaged header or a decompression bomb)")
                if width < 1 or height < 1:
                    raise UnreadableImage.of(path, f"its header claims an empty image ({width}x{height})")
                if (image.format == "TIFF" and image.info.get("compression") == "raw"
                        and getattr(image, "tag_v2", {}).get(0x0112) in (5, 6, 7, 8)):
                    raise UnreadableImage.of(
                        path, "an uncompressed TIFF with an EXIF orientation that swaps its sides (5-8), which "
                        "Pillow decodes scrambled", "re-save it compressed (e.g. LZW) or upright without the tag")
                if draft and image.format == "JPEG":
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
                oriented = ImageOps.exif_transpose(image)
                if oriented is image:
                    oriented = image.copy()
                return oriented
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage.of(path, f"its header claims an absurd size ({exc})") from None
    except UnidentifiedImageError:
        raise UnreadableImage.of(path, "not an image file Pillow recognises (unknown format or damaged header)"
                                 ) from None
    except MemoryError:
        raise UnreadableImage.of(path, "decoding it ran out of memory") from None
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:  # the file system failed, not the image: not a bad file, not skipped
            raise StorageError(
                f"cannot read {path}: the storage failed ({exc.strerror}; errno {errno.errorcode.get(exc.errno or 0)}), "
                "not the image. Check the file system and run the same command again (training resumes from its "
                "last checkpoint)") from None
        raise UnreadableImage.of(path, describe_exception(exc)) from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise UnreadableImage.of(path, describe_exception(exc)) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = truncated_ok, pillow_limit


def decode_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one image file as uint8 RGB ``[H, W, 3]`` (rules: module docstring); :class:`UnreadableImage` naming the
    file and the reason when it cannot be read. An I/O error of the storage (EIO, ESTALE, a timeout: network file
    systems) is retried twice (0.5 s, then 1 s later) and then raised as :class:`StorageError`, which is not an
    unreadable file (``on_unreadable: skip`` does not skip it)."""
    for attempt in range(_STORAGE_ATTEMPTS):
        try:
            return _decode(Path(path))
        except StorageError:
            if attempt == _STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


_STORAGE_ATTEMPTS = 3
_STORAGE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ESTALE", "ETIMEDOUT", "EAGAIN", "EINTR", "EMFILE", "ENFILE", "ENOLINK", "ECOMM", "EREMOTEIO", "EHOSTDOWN",
    "ECONNRESET") if hasattr(errno, name))
"""Errors of the file system rather than of the file's content."""


class StorageError(UserError):
    """Reading an image failed in the storage (an I/O error, a stale network handle), not in its content."""


def _decode(path: Path) -> np.ndarray:
    with _open(path, draft=False) as image:
        try:
            return to_rgb_array(image)
        except (OSError, ValueError) as exc:  # e.g. a mode Pillow cannot convert
            raise UnreadableImage.of(path, f"mode {image.mode}: {describe_exception(exc)}") from None


def check_image(path: str | os.PathLike[str]) -> str | None:
    """``None`` when ``path`` decodes, else the reason (the same failures :func:`decode_image` reports; JPEGs are
    decoded at 1/8 scale, which still reads and entropy-decodes all their data, at half the cost)."""
    path = Path(path)
    try:
        with _open(path, draft=True) as image:
            to_rgb_array(image)
    except UnreadableImage as exc:
        return exc.reason
    except (OSError, ValueError) as exc:
        return describe_exception(exc)
    return None


def _check_many(paths: Sequence[str]) -> list[str | None]:
    return [check_image(p) for p in paths]


def scan_images(paths: Sequence[str | os.PathLike[str]], *, workers: int = 0, show_progress: bool = True,
                label: str = "scan images") -> list[tuple[str, str]]:
    """Decode every file of ``paths``; returns ``(path, reason)`` of the unreadable ones, in the order given.
    ``workers`` > 0 checks in that many processes (chunks of 64 files)."""
    from repae.reporting import progress

    names = [str(p) for p in paths]
    chunks = [names[i : i + 64] for i in range(0, len(names), 64)]
    results: Iterator[list[str | None]]
    bad: list[tuple[str, str]] = []
    with progress(label, len(names), unit="img", enabled=show_progress) as bar:
        if workers > 0 and len(chunks) > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.imap(_check_many, chunks)
                for chunk, reasons in zip(chunks, results):
                    bad.extend((p, r) for p, r in zip(chunk, reasons) if r is not None)
                    bar.advance(len(chunk))
        else:
            for chunk in chunks:
                bad.extend((p, r) for p, r in zip(chunk, _check_many(chunk)) if r is not None)
                bar.advance(len(chunk))
    return bad


def describe_unreadable(bad: Sequence[tuple[str, str]], limit: int = 20) -> str:
    """``N unreadable image(s): path (reason); ...`` with at most ``limit`` named (the rest counted)."""
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} unreadable image(s): {shown}{more}"
