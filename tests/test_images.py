"""One image decoder (:func:`repae.decode_image`) for every dataset and for ``repae eval`` / ``analyze``: every PIL mode
a real folder holds, checked mode by mode against 8-bit RGB values worked out by hand; unreadable files named in one
line; ``image-folder``'s ``on_unreadable`` / ``scan`` switches; a DataLoader worker's error unwrapped to one line."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from repae.errors import UserError, unwrap_worker_error
from repae.images import MAX_PIXELS, UnreadableImage, check_image, decode_image, scan_images


def _png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> Path:
    """A PNG written byte by byte (for what Pillow cannot write: 16-bit colour, absurd headers)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _rgb(*pixels: tuple[int, int, int]) -> np.ndarray:
    """One row of RGB pixels, uint8 [1, N, 3]."""
    return np.array([pixels], dtype=np.uint8)


def _grey(*values: int) -> np.ndarray:
    return _rgb(*((v, v, v) for v in values))


def _old_read(path: Path) -> np.ndarray:
    """What repae did before: Pillow's ``convert("RGB")``."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# -- modes ---------------------------------------------------------------------------------------------------------
def test_rgb_and_8_bit_grey_and_bilevel(tmp_path):
    Image.fromarray(_rgb((255, 0, 0), (1, 2, 3), (250, 128, 7))).save(tmp_path / "rgb.png")
    assert np.array_equal(decode_image(tmp_path / "rgb.png"), _rgb((255, 0, 0), (1, 2, 3), (250, 128, 7)))
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(tmp_path / "l.png")
    assert Image.open(tmp_path / "l.png").mode == "L"
    assert np.array_equal(decode_image(tmp_path / "l.png"), _grey(0, 77, 255))
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    bilevel.save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert np.array_equal(decode_image(tmp_path / "b.png"), _grey(0, 255))


# 16-bit value -> round(v / 257): 257 -> 1, 32767 -> 127.498 -> 127, 32768 -> 127.502 -> 128, 65280 -> 254.0,
# 128 -> 0.498 -> 0, 129 -> 0.502 -> 1.
SIXTEEN = [0, 128, 129, 257, 32767, 32768, 65280, 65535]
SIXTEEN_8 = [0, 0, 1, 1, 127, 128, 254, 255]


def test_16_bit_grey_png_is_not_white(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([SIXTEEN], np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.array_equal(decode_image(path), _grey(*SIXTEEN_8))
    # the bug this replaces: Pillow clips 16-bit values at 255, so a real 16-bit photo is white
    assert _old_read(path)[0, :, 0].tolist() == [0, 128, 129, 255, 255, 255, 255, 255]


def test_16_bit_big_endian_tiff_and_pgm(tmp_path):
    big = Image.frombytes("I;16B", (len(SIXTEEN), 1), np.array(SIXTEEN, ">u2").tobytes())
    big.save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    assert np.array_equal(decode_image(tmp_path / "g16b.tif"), _grey(*SIXTEEN_8))
    pgm = tmp_path / "g16.pgm"  # a 16-bit PGM (maxval 65535), big-endian samples
    pgm.write_bytes(f"P5\n{len(SIXTEEN)} 1\n65535\n".encode() + np.array(SIXTEEN, ">u2").tobytes())
    assert Image.open(pgm).mode in ("I;16B", "I")
    assert np.array_equal(decode_image(pgm), _grey(*SIXTEEN_8))


def test_32_bit_integer_grey_is_read_as_16_bit(tmp_path):
    Image.fromarray(np.array([[-5, 0, 257, 32768, 65535, 70000]], np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert np.array_equal(decode_image(tmp_path / "i32.tif"), _grey(0, 0, 1, 128, 255, 255))


def test_float_grey_is_zero_to_one(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan, 0.2]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    # round(v * 255) after clipping to [0, 1]: 0.5 -> 127.5 -> 128, 0.2 -> 51.0000008 -> 51; NaN -> 0
    assert np.array_equal(decode_image(tmp_path / "f.tif"), _grey(0, 128, 255, 255, 0, 0, 51))


def test_alpha_is_composited_on_white(tmp_path):
    # (c * a + 255 * (255 - a) + 127) // 255
    Image.fromarray(np.array([[[200, 0], [200, 128], [200, 255]]], np.uint8), mode="LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    # a = 128: (200 * 128 + 255 * 127 + 127) // 255 = 58112 // 255 = 227
    assert np.array_equal(decode_image(tmp_path / "la.png"), _grey(255, 227, 200))
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 51], [10, 20, 30, 255]]], np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    # (0, 0, 255) at a = 51: red/green (255 * 204 + 127) // 255 = 204, blue 255
    assert np.array_equal(decode_image(tmp_path / "rgba.png"),
                          _rgb((255, 255, 255), (255, 0, 0), (204, 204, 255), (10, 20, 30)))
    # the old path kept the colour of fully transparent pixels
    assert _old_read(tmp_path / "rgba.png")[0, 0].tolist() == [255, 0, 0]


def _palette() -> Image.Image:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.putdata([0, 1, 2])
    return image


def test_palette_with_and_without_transparency(tmp_path):
    _palette().save(tmp_path / "p.png")
    assert np.array_equal(decode_image(tmp_path / "p.png"), _rgb((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    _palette().save(tmp_path / "p.gif")
    assert np.array_equal(decode_image(tmp_path / "p.gif"), _rgb((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    _palette().save(tmp_path / "pt.png", transparency=1)  # index 1 transparent
    assert Image.open(tmp_path / "pt.png").mode == "P"
    assert np.array_equal(decode_image(tmp_path / "pt.png"), _rgb((255, 0, 0), (255, 255, 255), (0, 0, 255)))
    assert _old_read(tmp_path / "pt.png")[0, 1].tolist() == [0, 255, 0]
    _palette().save(tmp_path / "pt.gif", transparency=1)
    assert np.array_equal(decode_image(tmp_path / "pt.gif"), _rgb((255, 0, 0), (255, 255, 255), (0, 0, 255)))
    # per-entry alpha (PNG tRNS): 255, 100, 0; green at a = 100: red/blue (255 * 155 + 127) // 255 = 155
    _palette().save(tmp_path / "pa.png", transparency=bytes([255, 100, 0]))
    assert np.array_equal(decode_image(tmp_path / "pa.png"), _rgb((255, 0, 0), (155, 255, 155), (255, 255, 255)))


def test_grey_and_rgb_with_a_transparent_colour(tmp_path):
    Image.fromarray(np.array([[0, 90, 200]], np.uint8)).save(tmp_path / "lt.png", transparency=90)
    assert np.array_equal(decode_image(tmp_path / "lt.png"), _grey(0, 255, 200))
    Image.fromarray(_rgb((1, 2, 3), (4, 5, 6))).save(tmp_path / "rgbt.png", transparency=(4, 5, 6))
    assert np.array_equal(decode_image(tmp_path / "rgbt.png"), _rgb((1, 2, 3), (255, 255, 255)))


def test_cmyk(tmp_path):
    # R = round((255 - C) * (255 - K) / 255), likewise G (M) and B (Y): Pillow's (and so REPA-E's) conversion;
    # C = K = 100: 155 * 155 / 255 = 94.2
    cmyk = Image.frombytes("CMYK", (4, 1), bytes([0, 255, 0, 0, 0, 0, 0, 255, 51, 0, 0, 0, 100, 0, 0, 100]))
    cmyk.save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    assert np.array_equal(decode_image(tmp_path / "c.tif"),
                          _rgb((255, 0, 255), (0, 0, 0), (204, 255, 255), (94, 155, 155)))
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)  # Adobe (inverted) CMYK JPEG
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert np.abs(decode_image(tmp_path / "c.jpg").astype(int) - [255, 0, 255]).max() <= 2


def test_ycbcr_lab_hsv(tmp_path):
    ycc = Image.frombytes("YCbCr", (2, 1), bytes([100, 128, 128, 235, 128, 128]))  # neutral chroma: grey = Y
    ycc.save(tmp_path / "y.tif")
    assert Image.open(tmp_path / "y.tif").mode == "YCbCr"
    assert np.array_equal(decode_image(tmp_path / "y.tif"), _grey(100, 235))
    # a CIELAB TIFF (a*, b* signed in the file): L* 100, 0 and 50 with a* = b* = 0 (grey: sRGB 255, 0, 119); then
    # L* 50 with a* = +60: red above green and blue
    lab = Image.frombytes("LAB", (4, 1), bytes([255, 128, 128, 0, 128, 128, 128, 128, 128, 128, 188, 128]))
    lab.save(tmp_path / "lab.tif")
    assert Image.open(tmp_path / "lab.tif").mode == "LAB"
    rgb = decode_image(tmp_path / "lab.tif").astype(int)
    assert np.abs(rgb[:, :3] - _grey(255, 0, 119)).max() <= 1
    assert rgb[0, 3, 0] > rgb[0, 3, 1] + 60 and rgb[0, 3, 0] > rgb[0, 3, 2] + 60
    assert _old_read(tmp_path / "lab.tif")[0, 0].tolist() == [0, 255, 255]  # Pillow alone: white became cyan


def test_16_bit_colour_png_keeps_the_high_byte(tmp_path):
    """Pillow reads 16-bit-per-channel PNGs as 8-bit RGB itself (high byte: at most one level below rounding)."""
    samples = np.array([[[65535, 32768, 0], [0x80FF, 257, 0x1234]]], ">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in samples)  # filter byte 0 per row
    path = _png(tmp_path / "rgb16.png", 2, 1, 16, 2, raw)
    assert np.array_equal(decode_image(path), _rgb((255, 128, 0), (0x80, 1, 0x12)))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)  # 2 rows, 3 columns as stored
    expected = {
        1: [[10, 20, 30], [40, 50, 60]],
        3: [[60, 50, 40], [30, 20, 10]],  # rotated 180
        6: [[40, 10], [50, 20], [60, 30]],  # shown rotated 90 degrees clockwise
        8: [[30, 60], [20, 50], [10, 40]],  # shown rotated 90 degrees counter-clockwise
        2: [[30, 20, 10], [60, 50, 40]],  # mirrored
    }
    for orientation, want in expected.items():
        image = Image.fromarray(pixels)
        exif = image.getexif()
        exif[0x0112] = orientation
        for suffix, options in (("png", {}), ("tif", {"compression": "tiff_lzw"}), ("webp", {"lossless": True})):
            path = tmp_path / f"o{orientation}.{suffix}"
            image.save(path, exif=exif, **options)
            want_rgb = np.repeat(np.array(want, np.uint8)[..., None], 3, axis=2)
            assert np.array_equal(decode_image(path), want_rgb), (orientation, suffix)
    # Pillow decodes an uncompressed TIFF rotated by 90 degrees scrambled: refused, not read wrong
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "raw6.tif", exif=exif)
    with pytest.raises(UnreadableImage, match="re-save it compressed"):
        decode_image(tmp_path / "raw6.tif")
    # and a photo: a JPEG whose left half is black, right half white, stored with orientation 6
    photo = np.zeros((16, 32), np.uint8)
    photo[:, 16:] = 255
    image = Image.fromarray(photo)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    upright = decode_image(tmp_path / "photo.jpg")
    assert upright.shape == (32, 16, 3)  # now portrait: the white half at the bottom
    assert upright[:12].max() <= 8 and upright[20:].min() >= 247


def test_multi_frame_reads_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (2, 2), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.array_equal(decode_image(tmp_path / "anim.gif"), np.full((2, 2, 3), [255, 0, 0], np.uint8))


# -- unreadable files ----------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "replace or remove the file" in message
    assert exc.value.path == str(path)
    return message


def test_absurd_header_sizes(tmp_path):
    huge = _png(tmp_path / "huge.png", 30000, 30000, 8, 2, b"\x00" * 100)  # above Pillow's own bomb limit
    with pytest.raises(UnreadableImage) as exc:
        decode_image(huge)
    assert "30000x30000" in _one_line(exc, huge) and "MAX_PIXELS" in str(exc.value)
    side = int(MAX_PIXELS**0.5) + 1  # above MAX_PIXELS, below Pillow's error: refused before decoding
    big = _png(tmp_path / "big.png", side, side, 8, 0, b"\x00" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(UnreadableImage) as exc:
            decode_image(big)
    assert "MAX_PIXELS" in _one_line(exc, big)
    assert isinstance(exc.value, UserError)


def test_truncated_garbled_and_non_images(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    scan = data.find(b"\xff\xda")
    cases = {
        "truncated.jpg": data[: len(data) // 2],
        # scan data holding a marker libjpeg rejects (0xFF37), as random garbage often does
        "garbled.jpg": data[: scan + 200] + b"\xff\x37" + data[scan + 202:],
        "empty.png": b"",
        "text.jpg": b"not an image at all\n",
    }
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    cases["truncated.png"] = (tmp_path / "ok.png").read_bytes()[:-400]
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it: still an error
    for name in cases:
        with pytest.raises(UnreadableImage) as exc:
            decode_image(tmp_path / name)
        _one_line(exc, tmp_path / name)
        assert check_image(tmp_path / name) is not None
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    assert "truncated" in check_image(tmp_path / "truncated.jpg")
    assert decode_image(tmp_path / "ok.jpg").shape == (64, 64, 3) and check_image(tmp_path / "ok.jpg") is None
    with pytest.raises(UnreadableImage, match="no such file"):
        decode_image(tmp_path / "missing.png")
    bad = scan_images(sorted(tmp_path.iterdir()), show_progress=False)
    assert [Path(p).name for p, _ in bad] == sorted(cases)


# -- the dataset: on_unreadable, scan ------------------------------------------------------------------------------
def _folder(root: Path) -> Path:
    """Two classes of three 8x8 images; a/1.png is 16-bit grey, b/0.png truncated, b/2.png not an image."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (10 * i, 100 if cls == "a" else 200, 0)).save(root / cls / f"{i}.png")
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "a" / "1.png")
    (root / "b" / "0.png").write_bytes((root / "b" / "1.png").read_bytes()[:40])
    (root / "b" / "2.png").write_bytes(b"nope")
    return root


def test_image_folder_decodes_with_the_one_function(tmp_path):
    from repae import create

    dataset = create("dataset", "image-folder", root=str(_folder(tmp_path / "d")), resolution=8)
    image, label = dataset[1]
    assert label == 0 and image.unique().tolist() == [128]  # the 16-bit image, not white
    with pytest.raises(UnreadableImage) as exc:
        dataset[3]
    message = str(exc.value)
    assert "\n" not in message and "b/0.png" in message and "on_unreadable: skip" in message


def test_skip_replaces_by_the_next_readable_and_counts(tmp_path):
    from repae import create

    dataset = create("dataset", "image-folder", root=str(_folder(tmp_path / "d")), resolution=8,
                     on_unreadable="skip")
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*b/0\.png"):
        image, label = dataset[3]
    assert label == 1 and np.array_equal(image.numpy(), dataset[4][0].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named once per file
        dataset[3]
    with pytest.warns(UserWarning, match=r"b/2\.png"):
        assert np.array_equal(dataset[5][0].numpy(), dataset[0][0].numpy())  # wraps to item 0
    assert [Path(p).name for p in dataset.skipped] == ["0.png", "2.png"] and dataset.num_skipped == 2


def test_scan_lists_every_unreadable_file_up_front(tmp_path):
    from repae import create

    root = _folder(tmp_path / "d")
    with pytest.raises(UserError) as exc:
        create("dataset", "image-folder", root=str(root), resolution=8, scan=True)
    message = str(exc.value)
    assert "\n" not in message and "2 unreadable image(s)" in message
    assert "b/0.png (" in message and "b/2.png (" in message and "on_unreadable: skip" in message
    with pytest.warns(UserWarning, match="2 unreadable image"):
        dataset = create("dataset", "image-folder", root=str(root), resolution=8, scan=True, on_unreadable="skip")
    assert dataset.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already named by the scan
        assert dataset[5][1] == 0


def test_worker_counts_and_one_line_errors(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from repae import create

    root = _folder(tmp_path / "d")
    dataset = create("dataset", "image-folder", root=str(root), resolution=8, on_unreadable="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(dataset, batch_size=6, num_workers=1))
    assert batches[0][1].tolist() == [0, 0, 0, 1, 1, 0] and dataset.num_skipped == 2  # seen by the worker
    failing = create("dataset", "image-folder", root=str(root), resolution=8)
    with pytest.raises(Exception) as exc:
        list(DataLoader(failing, batch_size=6, num_workers=1))
    assert "Original Traceback" in str(exc.value)
    unwrapped = unwrap_worker_error(exc.value)
    assert isinstance(unwrapped, UnreadableImage)
    assert str(unwrapped).startswith(f"cannot read image {root / 'b' / '0.png'}: ") and "\n" not in str(unwrapped)
    assert unwrap_worker_error(ValueError("plain")) is None
    assert unwrap_worker_error(UserError("plain")) is None
    # torch falls back to RuntimeError for errors it cannot rebuild from the text; a non-user error stays as it is
    wrapped = ("Caught PluginError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nrepae.errors.PluginError: plugin acme failed\n')
    assert str(unwrap_worker_error(RuntimeError(wrapped))) == "plugin acme failed"
    assert unwrap_worker_error(RuntimeError(wrapped.replace("PluginError", "ZeroDivisionError"))) is None
    assert torch.utils.data.get_worker_info() is None


def test_prepare_data_scan_and_skip(tmp_path):
    from conftest import cli

    root = _folder(tmp_path / "d")
    result = cli("prepare-data", root, "--out", tmp_path / "s", "--resolution", 8, "--scan", code=2)
    assert "2 unreadable image(s)" in result.output and "0.png" in result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
    result = cli("prepare-data", root, "--out", tmp_path / "s", "--resolution", 8, "--workers", 1, code=2)
    assert "cannot read image" in result.output and "Caught" not in result.output  # one line, no worker traceback
    result = cli("prepare-data", root, "--out", tmp_path / "k", "--resolution", 8, "--on-unreadable", "skip")
    assert "2 unreadable image(s) replaced" in result.output


def test_eval_folder_reads_through_the_one_function(tmp_path):
    from repae.evaluate.inputs import FolderImages

    Image.fromarray(np.array([SIXTEEN], np.uint16)).save(tmp_path / "g16.png")
    (tmp_path / "bad.png").write_bytes(b"x")
    images = FolderImages(tmp_path)
    assert np.array_equal(images._read(tmp_path / "g16.png"), _grey(*SIXTEEN_8))
    with pytest.raises(UnreadableImage, match=r"bad\.png"):
        list(images.batches(4))


def test_damage_that_libjpeg_only_warns_about_is_not_detected(tmp_path):
    """The limit of what can be detected (docs/data.md): zeroed entropy-coded data is still a valid JPEG stream;
    libjpeg warns ("Corrupt JPEG data: premature end of data segment") but Pillow does not pass warnings on."""
    gradient = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    Image.fromarray(gradient).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    scan = data.find(b"\xff\xda")
    (tmp_path / "zeroed.jpg").write_bytes(data[: scan + 100] + bytes(200) + data[scan + 300:])
    assert check_image(tmp_path / "zeroed.jpg") is None  # decodes (to wrong pixels)


def test_storage_errors_are_retried_and_not_taken_for_unreadable_files(tmp_path, monkeypatch):
    """An I/O error of the file system (EIO, a stale NFS handle) is not a bad image: retried, then a StorageError
    (which `on_unreadable: skip` does not skip), never an UnreadableImage that would mark the file bad for the run."""
    import errno

    from PIL import Image

    import repae.images as images

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 3), (10, 20, 30)).save(path)
    real_open, failures = Image.open, []
    monkeypatch.setattr(images.time, "sleep", lambda s: None)

    def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OSError(errno.EIO, "Input/output error")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", flaky)
    assert images.decode_image(path)[0, 0].tolist() == [10, 20, 30] and len(failures) == 2

    def broken(*args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")

    monkeypatch.setattr(Image, "open", broken)
    with pytest.raises(images.StorageError, match=r"the storage failed \(Stale file handle; errno ESTALE\), not the "):
        images.decode_image(path)
    assert not issubclass(images.StorageError, images.UnreadableImage)
