"""Image shards: a dataset of images decoded and centre-cropped once, read back through memory maps.

``repae prepare-data ROOT --out DIR`` writes them (:func:`write_image_shards`), the built-in ``image-shards`` dataset
reads them (through :class:`ImageShards`). Decoding a JPEG and cropping it costs milliseconds per image on every
access; a memory-mapped shard gives the same ``uint8 [3, H, W]`` array for the cost of a copy. The items are those of
the dataset the shards were made from, in the same order (for ``image-folder``: sorted class folders, sorted file
names, the ADM centre crop), so the two datasets are interchangeable in a recipe.

Layout of a shards folder::

    manifest.json               what the folder holds (see below), with the size and sha256 of every file
    images-00000.u8             raw uint8 [n, 3, H, W], C order, no header (``numpy.memmap`` opens it); n = shard_size
    labels-00000.npy            int64 [n] (``numpy.save``)                                     but in the last shard
    images-00001.u8             ...

``manifest.json`` records the format and version, ``num_items``, ``num_classes``, the class names, ``resolution``,
``shard_size``, per shard its item count and each file's size and sha256, the source (e.g. the image folder), the
dataset section it was made from, the creation time and the repae version.

Writing is atomic and resumable: shards go to ``<out>.partial/`` (each file written to a temporary sibling, then
renamed; a small ``shard-NNNNN.json`` record marks a shard finished) and the folder is renamed to ``<out>`` once
complete. Rerunning the same command after an interruption verifies the finished shards (size and sha256), keeps the
good ones, writes the rest; a different unfinished or finished output is never overwritten.

Opening (:class:`ImageShards`) checks that every file is there with its recorded size (cheap: one ``stat`` each);
:meth:`ImageShards.verify` re-reads every byte against the sha256s (``repae prepare-data ... --verify``).

This module imports neither torch nor PIL at import time; the writer imports torch for its ``DataLoader``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from repae.errors import UserError
from repae.fileio import atomic_path, atomic_write, write_json
from repae.partial_folder import FolderFormat, partial_dir, plain
from repae.reporting import progress

__all__ = [
    "FORMAT",
    "MANIFEST_FILE",
    "VERSION",
    "ImageShards",
    "read_manifest",
    "write_image_shards",
]

FORMAT = "repae-image-shards"
VERSION = 1
MANIFEST_FILE = "manifest.json"
IDENTITY = ("format", "version", "num_items", "num_classes", "classes", "resolution", "shard_size", "source",
            "dataset")
"""The manifest keys that identify a shards folder: a rerun with the same values continues or finds it done."""
_FOLDER = FolderFormat(FORMAT, MANIFEST_FILE, IDENTITY, different="different image shards",
                       unfinished="unfinished shards of another dataset", pronoun="them")
DEFAULT_SHARD_SIZE = 1024
"""Items per shard: 192 MiB of images per shard at 256 px (1252 shards for ImageNet-1k train)."""
_CHUNK = 1 << 20


def images_name(shard: int) -> str:
    """File name of shard ``shard``'s images: ``images-00000.u8``."""
    return f"images-{shard:05d}.u8"


def labels_name(shard: int) -> str:
    """File name of shard ``shard``'s labels: ``labels-00000.npy``."""
    return f"labels-{shard:05d}.npy"


def _record_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _check_dataset(dataset: Any) -> None:
    kind = getattr(dataset, "kind", None)
    if kind != "images":
        raise UserError(f"only an image dataset can be sharded; this one gives {kind!r} items (point --dataset at a "
                        "dataset of kind 'images', e.g. image-folder)")
    if len(dataset) == 0:
        raise UserError("the dataset is empty: there is nothing to shard")
    # Shards freeze the items: they must not depend on the epoch (the contract allows seeded augmentation, e.g. flips;
    # image-shards applies its own flips at reading time). Items are a function of (index, epoch): compare a few.
    probe = range(min(len(dataset), 16))
    dataset.set_epoch(0)
    first = [np.asarray(dataset[i][0]) for i in probe]
    dataset.set_epoch(1)
    changed = [i for i, a in zip(probe, first) if not np.array_equal(a, np.asarray(dataset[i][0]))]
    dataset.set_epoch(0)
    if changed:
        raise UserError(f"the dataset's items change from one epoch to the next (item {changed[0]} differs between "
                        "epochs 0 and 1: random augmentation such as hflip=true), so shards would freeze one epoch's. "
                        "Turn the augmentation off for preparing; image-shards flips at reading time (hflip: true).")


def _shard_record(partial: Path, shard: int, size: int, item_bytes: int) -> dict[str, Any] | None:
    """The record of a finished shard of an interrupted run if its files still match it (size and sha256)."""
    try:
        record = json.loads((partial / _record_name(shard)).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("num_items") != size or record.get("images") != images_name(shard):
        return None
    if _shard_problem(partial, record, item_bytes, check_sha256=True) is not None:
        return None
    return record


def _shard_problem(root: Path, record: Mapping[str, Any], item_bytes: int, *, check_sha256: bool) -> str | None:
    """What is wrong with one shard's files (missing, wrong size, wrong sha256), or ``None``."""
    for key in ("images", "labels"):
        name = str(record[key])
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        want = int(record["num_items"]) * item_bytes if key == "images" else int(record[f"{key}_bytes"])
        if size != want:
            return f"{name} has {size} bytes, {want} expected"
        if check_sha256 and file_sha256(path) != record.get(f"{key}_sha256"):
            return f"{name} does not match its sha256 in the manifest (the file is damaged)"
    return None


def _class_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "classes", None)
    if isinstance(names, Sequence) and not isinstance(names, str) and len(names) == int(dataset.num_classes):
        return [str(n) for n in names]
    return [str(c) for c in range(int(dataset.num_classes))]


def write_image_shards(
    dataset: Any,
    out_dir: str | os.PathLike[str],
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    num_workers: int = 0,
    source: str | None = None,
    dataset_info: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Write every item of ``dataset`` to memory-mappable shards in ``out_dir``; returns ``out_dir``.

    ``dataset`` is an image dataset (:class:`repae.Dataset` of kind ``"images"``): items ``(uint8 [3, H, W], label)``
    with ``H = W = dataset.resolution`` and ``0 <= label < dataset.num_classes``, the same at every epoch. Items are
    read in index order by a ``torch.utils.data.DataLoader`` with ``num_workers`` processes, ``batch_size`` at a
    time; ``shard_size`` items go in a shard. ``source`` (e.g. the image folder) and ``dataset_info`` (the dataset's
    recipe section) are recorded in the manifest and identify the output together with the shape of the data.

    Resumable and atomic (see the module docstring): a finished shard of an interrupted run is kept when its size and
    sha256 still match its record. Raises :class:`UserError` if ``out_dir`` holds anything but these very shards, or
    ``<out_dir>.partial`` unfinished different ones, or the dataset is not an image dataset with fixed items.
    """
    if batch_size < 1 or shard_size < 1 or num_workers < 0:
        raise UserError(f"batch_size and shard_size must be >= 1 and num_workers >= 0, got {batch_size}, "
                        f"{shard_size} and {num_workers}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; --out must name a folder to create. Choose another --out.")
    _check_dataset(dataset)
    num_items = len(dataset)
    resolution = int(dataset.resolution)
    header = plain({
        "format": FORMAT,
        "version": VERSION,
        "num_items": num_items,
        "num_classes": int(dataset.num_classes),
        "classes": _class_names(dataset),
        "resolution": resolution,
        "shard_size": shard_size,
        "source": source,
        "dataset": dict(dataset_info) if dataset_info is not None else {"repr": repr(dataset)},
    })

    partial = _FOLDER.open(out_dir, header)
    if partial is None:
        return out_dir  # already written by an identical run
    item_bytes = 3 * resolution * resolution
    sizes = [min(shard_size, num_items - start) for start in range(0, num_items, shard_size)]
    records: dict[int, dict[str, Any]] = {}
    with progress("verify finished shards", len(sizes), unit="shard",
                  enabled=show_progress and any((partial / _record_name(s)).exists() for s in range(len(sizes)))
                  ) as bar:
        for shard, size in enumerate(sizes):
            if (partial / _record_name(shard)).exists():
                record = _shard_record(partial, shard, size, item_bytes)
                if record is not None:
                    records[shard] = record
                else:  # damaged: written again below
                    (partial / _record_name(shard)).unlink()
            bar.advance(1)
    todo = [s for s in range(len(sizes)) if s not in records]
    if todo:
        _write_shards(dataset, partial, todo, sizes, shard_size=shard_size, batch_size=batch_size,
                      num_workers=num_workers, resolution=resolution, records=records,
                      completed=sum(sizes[s] for s in records), show_progress=show_progress)

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "channels": 3,
        "dtype": "uint8",
        "layout": "images-NNNNN.u8: raw uint8 [n, 3, resolution, resolution], C order; labels-NNNNN.npy: int64 [n]",
        "shards": [records[s] for s in range(len(sizes))],
    }
    return _FOLDER.finish(partial, out_dir, manifest,
                          leftovers=[partial / _record_name(shard) for shard in range(len(sizes))])


def _write_shards(dataset: Any, partial: Path, todo: list[int], sizes: list[int], *, shard_size: int,
                  batch_size: int, num_workers: int, resolution: int, records: dict[int, dict[str, Any]],
                  completed: int, show_progress: bool) -> None:
    from torch.utils.data import DataLoader

    def shard_batches(shard: int) -> list[list[int]]:
        first, end = shard * shard_size, shard * shard_size + sizes[shard]
        return [list(range(start, min(start + batch_size, end))) for start in range(first, end, batch_size)]

    batches = [b for shard in todo for b in shard_batches(shard)]
    loader = iter(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers))
    shape = (3, resolution, resolution)
    num_classes = int(dataset.num_classes)
    with progress("prepare data", sum(sizes), completed=completed, unit="img", enabled=show_progress) as bar:
        for shard in todo:
            labels: list[np.ndarray] = []
            digest = hashlib.sha256()
            with atomic_path(partial / images_name(shard)) as tmp, open(tmp, "wb") as f:
                for batch in shard_batches(shard):
                    images, batch_labels = next(loader)
                    array = np.asarray(images)
                    first = batch[0]
                    if array.dtype != np.uint8 or tuple(array.shape[1:]) != shape:
                        raise UserError(f"item {first} of the dataset is {array.dtype} {list(array.shape[1:])}, "
                                        f"image shards hold uint8 {list(shape)} (the dataset's resolution); the "
                                        "dataset breaks the image contract (repae.Dataset)")
                    label_array = np.asarray(batch_labels, dtype=np.int64).reshape(-1)
                    bad = np.flatnonzero((label_array < 0) | (label_array >= num_classes))
                    if bad.size:
                        raise UserError(f"item {first + int(bad[0])} has label {int(label_array[bad[0]])}, outside "
                                        f"0..{num_classes - 1} (the dataset's num_classes)")
                    data = np.ascontiguousarray(array).tobytes()
                    digest.update(data)
                    f.write(data)
                    labels.append(label_array)
                    bar.advance(len(array))
            buffer = io.BytesIO()
            np.save(buffer, np.concatenate(labels))
            label_bytes = buffer.getvalue()
            atomic_write(partial / labels_name(shard), label_bytes)
            record = {
                "images": images_name(shard),
                "labels": labels_name(shard),
                "num_items": sizes[shard],
                "images_bytes": sizes[shard] * 3 * resolution * resolution,
                "images_sha256": digest.hexdigest(),
                "labels_bytes": len(label_bytes),
                "labels_sha256": hashlib.sha256(label_bytes).hexdigest(),
            }
            write_json(partial / _record_name(shard), record)
            records[shard] = record


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike[str], *, check_files: bool = True) -> dict[str, Any]:
    """The ``manifest.json`` of the shards at ``root``, checked: format and version, and with ``check_files`` that
    every shard file is there with its recorded size (one ``stat`` per file, no reading). :class:`UserError` naming
    the problem, the path and the fix."""
    root = Path(root).expanduser()
    write_hint = f"write them with `repae prepare-data IMAGE_FOLDER --out {root}`"
    if not root.is_dir():
        partial = partial_dir(root)
        if partial.is_dir():
            raise UserError(f"the image shards {root} are unfinished ({partial} exists): rerun the `repae "
                            f"prepare-data` command that started them to finish them")
        if root.exists():
            raise UserError(f"dataset.root {root} is a file, not a folder of image shards; {write_hint}")
        raise UserError(f"no image shards at {root}; {write_hint}")
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except OSError:
        raise UserError(f"{root} holds no image shards (no {MANIFEST_FILE}); {write_hint}") from None
    except ValueError as exc:
        raise UserError(f"{root / MANIFEST_FILE} is not valid JSON ({exc}); prepare the shards again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{root / MANIFEST_FILE} is not a repae image-shards manifest; {write_hint}")
    if manifest.get("version") != VERSION:
        raise UserError(f"{root} holds image shards of format version {manifest.get('version')}, this repae reads "
                        f"version {VERSION}; prepare the shards again with this version")
    if check_files:
        item_bytes = 3 * int(manifest["resolution"]) ** 2
        problems = [p for record in manifest["shards"]
                    if (p := _shard_problem(root, record, item_bytes, check_sha256=False)) is not None]
        if problems:
            raise UserError(f"the image shards {root} are incomplete or damaged: {_listing(problems)}; copy the whole "
                            f"folder again, or delete it and run `repae prepare-data` again")
    return manifest


class ImageShards:
    """Reads a folder written by :func:`write_image_shards`: item ``i`` is ``(uint8 [3, H, W] numpy array, label)``,
    a copy out of a memory-mapped shard (``H = W = resolution``).

    Opening reads ``manifest.json`` and checks every file's size (see :func:`read_manifest`); :meth:`verify` checks
    the sha256s. The memory maps are opened on first access to a shard, separately in each process (safe in forked
    or spawned ``DataLoader`` workers; pickling drops them). ``manifest`` is the parsed ``manifest.json``;
    ``classes`` the class names (label = position).
    """

    def __init__(self, root: str | os.PathLike[str], *, manifest: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.manifest = dict(manifest) if manifest is not None else read_manifest(self.root)
        self.num_classes = int(self.manifest["num_classes"])
        self.classes: list[str] = list(self.manifest.get("classes") or [])
        self.resolution = int(self.manifest["resolution"])
        self.shard_size = int(self.manifest["shard_size"])
        self._shards: list[dict[str, Any]] = list(self.manifest["shards"])
        self._images: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def _open(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():  # a forked DataLoader worker maps the files itself
            self._images, self._labels, self._pid = {}, {}, os.getpid()
        images = self._images.get(shard)
        if images is None:
            record = self._shards[shard]
            n, side = int(record["num_items"]), self.resolution
            images = self._images[shard] = np.memmap(self.root / record["images"], dtype=np.uint8, mode="r",
                                                     shape=(n, 3, side, side))
            self._labels[shard] = np.load(self.root / record["labels"])
        return images, self._labels[shard]

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, offset)`` of item ``index``; ``IndexError`` outside ``0 .. len - 1``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for image shards of {len(self)} items")
        return divmod(index, self.shard_size)

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as a read-only view into its shard's memory map: uint8 ``[3, H, W]`` (copy it to keep or
        write it)."""
        shard, offset = self.locate(index)
        return self._open(shard)[0][offset]

    def label(self, index: int) -> int:
        """The label of item ``index``."""
        shard, offset = self.locate(index)
        return int(self._open(shard)[1][offset])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        shard, offset = self.locate(index)
        images, labels = self._open(shard)
        return np.array(images[offset]), int(labels[offset])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"], state["_labels"] = {}, {}
        return state

    def verify(self, *, show_progress: bool = False) -> None:
        """Re-read every file and compare its size and sha256 with the manifest; :class:`UserError` naming every
        damaged or missing file and the fix."""
        item_bytes = 3 * self.resolution ** 2
        problems: list[str] = []
        with progress("verify shards", len(self._shards), unit="shard", enabled=show_progress) as bar:
            for record in self._shards:
                problem = _shard_problem(self.root, record, item_bytes, check_sha256=True)
                if problem is not None:
                    problems.append(problem)
                bar.advance(1)
        if problems:
            raise UserError(f"the image shards {self.root} are damaged: {_listing(problems)}. Restore the folder from "
                            f"a good copy, or delete {self.root} and run `repae prepare-data` again")

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (f"ImageShards(root={str(self.root)!r}, items={len(self)}, num_classes={self.num_classes}, "
                f"resolution={self.resolution}, shards={len(self._shards)})")
