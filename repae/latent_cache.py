"""Latent caches for frozen-tokenizer trainings: the format, the writer behind ``repae cache-latents`` and the reader
(:class:`LatentCache`) that the built-in ``latent-cache`` dataset wraps.

As in REPA-E's ``cache_latents.py`` (arXiv 2504.10483), each image is mapped to ``[-1, 1]`` and encoded once, and the
posterior *parameters* are stored, not a sample: ``concat([mean, std], dim=channels)``, float32, ``[2C, h, w]`` per
image. No flips and no scaling: sampling ``z = mean + std * eps`` and normalisation happen at training time.

Layout of a cache folder::

    index.json                  what the cache holds (see below) and which tokenizer wrote it
    shard-00000.safetensors     "latents" float32 [n, 2C, h, w], "labels" int64 [n]; n = shard_size but in the last
    shard-00001.safetensors     ...

``index.json`` records the format and version, ``num_items``, ``num_classes``, ``resolution``, ``latent_shape``,
``shard_size``, the shards, the dataset it was made from and the tokenizer (name, config, plugin, latent channels,
downsampling factor and the sha256 of its weights and latent statistics), so that training on a cache written by
another tokenizer can be detected (:meth:`LatentCache.check_tokenizer`). The tokenizer is used through its contract
only (:class:`repae.interfaces.Tokenizer`: ``encode`` -> posterior ``mean`` / ``std``; ``latent_channels``,
``downsample``; the optional :class:`~repae.interfaces.RecordsWeights` for the sha256 of its files), so any
plugin's tokenizer can be cached.

Writing is atomic: shards go to ``<out>.partial/`` (each one written to a temporary file, then renamed) and the
folder is renamed to ``<out>`` once complete. An interrupted run resumes from the finished shards when rerun with the
same dataset and tokenizer; a different unfinished or finished cache is never overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from repae.errors import UserError
from repae.fileio import atomic_path
from repae.interfaces import RecordsWeights, supports
from repae.partial_folder import FolderFormat, partial_dir, plain
from repae.reporting import progress

__all__ = [
    "FORMAT",
    "INDEX_FILE",
    "VERSION",
    "LatentCache",
    "describe_tokenizer",
    "read_index",
    "write_latent_cache",
]

FORMAT = "repae-latent-cache"
VERSION = 1
INDEX_FILE = "index.json"
IDENTITY = ("format", "version", "num_items", "num_classes", "resolution", "shard_size", "dataset", "tokenizer")
"""The index keys that identify a cache: a rerun with the same values continues or finds it done."""
_FOLDER = FolderFormat(FORMAT, INDEX_FILE, IDENTITY, different="a different latent cache",
                       unfinished="an unfinished cache of another dataset or tokenizer")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def describe_tokenizer(
    tokenizer: Any, *, name: str | None = None, config: Mapping[str, Any] | None = None, plugin: str | None = None
) -> dict[str, Any]:
    """What a cache records about the tokenizer that wrote it: ``name``, ``config``, ``plugin`` (as given), and from
    the tokenizer itself ``latent_channels``, ``downsample`` and ``weights``: ``{role: {source, sha256}}`` of the files
    it loaded (:class:`~repae.interfaces.RecordsWeights`; empty for random weights or a tokenizer that does not
    record them)."""
    loaded = tokenizer.loaded_weights if supports(tokenizer, RecordsWeights) else {}
    return {
        "name": name,
        "config": dict(config) if config is not None else None,
        "plugin": plugin,
        "latent_channels": int(tokenizer.latent_channels),
        "downsample": int(tokenizer.downsample),
        "weights": {role: {"source": info.source, "sha256": info.sha256} for role, info in sorted(loaded.items())},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _check_dataset(dataset: Any) -> None:
    kind = getattr(dataset, "kind", None)
    if kind != "images":
        raise UserError(f"only an image dataset can be cached; this one gives {kind!r} items (a latent cache cannot "
                        f"be cached again: point the recipe's dataset at the images)")
    if len(dataset) == 0:
        raise UserError("the dataset is empty: there is nothing to cache")
    # Items must not depend on the epoch (the contract allows seeded augmentation, e.g. flips): a cache would freeze
    # one epoch's. Compare a few items across two epochs (deterministic: items are a function of index and epoch).
    probe = range(min(len(dataset), 16))
    dataset.set_epoch(0)
    first = [dataset[i][0] for i in probe]
    dataset.set_epoch(1)
    changed = [i for i, a in zip(probe, first) if not torch.equal(torch.as_tensor(a), torch.as_tensor(dataset[i][0]))]
    dataset.set_epoch(0)
    if changed:
        raise UserError(f"the dataset's items change from one epoch to the next (item {changed[0]} differs between "
                        "epochs 0 and 1: random augmentation such as dataset.hflip=true), so a cache would freeze one "
                        "epoch's. Turn the augmentation off for caching (REPA-E caches unflipped images).")


def _finished_shards(partial: Path, sizes: list[int]) -> set[int]:
    """Shards of an interrupted run that are complete (present, readable, with the expected number of items)."""
    done = set()
    for shard, size in enumerate(sizes):
        path = partial / shard_name(shard)
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.get_slice("latents").get_shape()[0] == size and f.get_slice("labels").get_shape()[0] == size:
                    done.add(shard)
        except Exception:  # a damaged shard is simply written again
            continue
    return done


def write_latent_cache(
    dataset: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    tokenizer_info: Mapping[str, Any] | None = None,
    dataset_info: Mapping[str, Any] | None = None,
    shard_size: int = 4096,
    num_workers: int = 0,
    show_progress: bool = True,
) -> Path:
    """Encode every image of ``dataset`` with ``tokenizer`` and write the posterior mean and std to ``out_dir``.

    ``dataset`` gives ``(uint8 [3, H, W], label)`` items; images become ``x / 127.5 - 1`` and the stored latent is
    ``concat([posterior.mean, posterior.std], 1)`` in float32 (the tokenizer runs in eval mode, without gradients, on
    ``device``). ``tokenizer_info`` is recorded in the index (default: :func:`describe_tokenizer` of the tokenizer);
    ``dataset_info`` too (e.g. the dataset's recipe section). Returns ``out_dir``.

    Resumable and atomic (see the module docstring). Raises :class:`UserError` if ``out_dir`` holds anything but this
    very cache, or ``<out_dir>.partial`` an unfinished different one.
    """
    if batch_size < 1 or shard_size < 1:
        raise UserError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    _check_dataset(dataset)
    out_dir = Path(out_dir).expanduser()
    num_items = len(dataset)
    info = dict(tokenizer_info) if tokenizer_info is not None else describe_tokenizer(tokenizer)
    header = plain({
        "format": FORMAT,
        "version": VERSION,
        "num_items": num_items,
        "num_classes": int(dataset.num_classes),
        "resolution": int(dataset.resolution),
        "shard_size": shard_size,
        "dataset": dict(dataset_info) if dataset_info is not None else {"repr": repr(dataset)},
        "tokenizer": info,
    })

    partial = _FOLDER.open(out_dir, header)
    if partial is None:
        return out_dir  # already written by an identical run
    sizes = [min(shard_size, num_items - start) for start in range(0, num_items, shard_size)]
    done = _finished_shards(partial, sizes)
    batches = [
        list(range(start, min(start + batch_size, shard * shard_size + size)))
        for shard, size in enumerate(sizes)
        if shard not in done
        for start in range(shard * shard_size, shard * shard_size + size, batch_size)
    ]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)

    if isinstance(tokenizer, torch.nn.Module):
        tokenizer.to(device).eval()
    latent_shape = _latent_shape_from_done(partial, done)
    pending_latents: list[torch.Tensor] = []
    pending_labels: list[torch.Tensor] = []
    pending = 0
    shards_todo = iter([s for s in range(len(sizes)) if s not in done])
    shard = next(shards_todo, None)
    with progress("cache latents", num_items, completed=sum(sizes[s] for s in done), unit="img",
                  enabled=show_progress) as bar, torch.inference_mode():
        for images, labels in loader:
            x = images.to(device, non_blocking=True).float() / 127.5 - 1.0
            posterior = tokenizer.encode(x)
            latents = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu()
            if latent_shape is None:
                latent_shape = list(latents.shape[1:])
            elif list(latents.shape[1:]) != latent_shape:
                raise UserError(f"the tokenizer gave latents of shape {list(latents.shape[1:])} after "
                                f"{latent_shape}: every image of a cache must have the same size")
            pending_latents.append(latents)
            pending_labels.append(torch.as_tensor(labels, dtype=torch.int64))
            pending += len(latents)
            bar.advance(len(latents))
            if shard is not None and pending == sizes[shard]:
                _write_shard(partial / shard_name(shard), torch.cat(pending_latents), torch.cat(pending_labels))
                pending_latents, pending_labels, pending = [], [], 0
                shard = next(shards_todo, None)
    if shard is not None or pending or latent_shape is None:
        raise RuntimeError("latent cache writer: the batches did not fill the shards")  # a bug, not a user error

    index = {
        **header,
        "latent_shape": latent_shape,
        "latent_channels": latent_shape[0] // 2,
        "dtype": "float32",
        "layout": "latents = concat([posterior.mean, posterior.std], dim=0) per item",
        "shards": [{"file": shard_name(s), "num_items": n} for s, n in enumerate(sizes)],
    }
    return _FOLDER.finish(partial, out_dir, index)


def _latent_shape_from_done(partial: Path, done: set[int]) -> list[int] | None:
    for shard in sorted(done):
        with safe_open(str(partial / shard_name(shard)), framework="pt") as f:
            return list(f.get_slice("latents").get_shape()[1:])
    return None


def _write_shard(path: Path, latents: torch.Tensor, labels: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous(), "labels": labels.contiguous()}, str(tmp),
                  metadata={"format": FORMAT, "version": str(VERSION)})


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def read_index(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``index.json`` of the cache at ``root``, checked; :class:`UserError` naming the problem and the fix."""
    root = Path(root).expanduser()
    write_hint = f"write one with `repae cache-latents RECIPE --out {root}`"
    if not root.is_dir():
        partial = partial_dir(root)
        if partial.is_dir():
            raise UserError(f"the latent cache {root} is unfinished ({partial} exists): rerun the `repae "
                            f"cache-latents` command that started it to finish it")
        raise UserError(f"no latent cache at {root}; {write_hint}")
    try:
        index = json.loads((root / INDEX_FILE).read_text())
    except OSError:
        raise UserError(f"{root} is not a latent cache (no {INDEX_FILE}); {write_hint}") from None
    except ValueError as exc:
        raise UserError(f"{root / INDEX_FILE} is not valid JSON ({exc}); write the cache again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{root / INDEX_FILE} is not a repae latent-cache index; {write_hint}")
    if index.get("version") != VERSION:
        raise UserError(f"{root} is a latent cache of format version {index.get('version')}, this repae reads "
                        f"version {VERSION}; write the cache again with this version")
    missing = [s["file"] for s in index["shards"] if not (root / s["file"]).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"the latent cache {root} is incomplete: missing {shown}; copy the whole folder or write it "
                        f"again")
    return index


class LatentCache:
    """Reads a cache written by :func:`write_latent_cache`: item ``i`` is ``(float32 [2C, h, w], label)``, the
    posterior mean and std concatenated along channels. ``index`` is the parsed ``index.json``; ``latent_shape`` is
    ``(C, h, w)`` of the latents (half the stored channels). Safe to use from forked ``DataLoader`` workers."""

    def __init__(self, root: str | os.PathLike[str], *, index: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.index = dict(index) if index is not None else read_index(self.root)
        self.num_classes = int(self.index["num_classes"])
        self.resolution = int(self.index["resolution"])
        stored = list(self.index.get("latent_shape") or [])
        self.latent_shape: tuple[int, int, int] | None = (
            (stored[0] // 2, stored[1], stored[2]) if len(stored) == 3 else None
        )
        self.shard_size = int(self.index["shard_size"])
        self.tokenizer_info: dict[str, Any] = dict(self.index.get("tokenizer") or {})
        self._files = [self.root / s["file"] for s in self.index["shards"]]
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.index["num_items"])

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own files
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
        return handle

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} items")
        shard, offset = divmod(index, self.shard_size)
        handle = self._handle(shard)
        latents = handle.get_slice("latents")[offset : offset + 1][0]
        label = int(handle.get_slice("labels")[offset : offset + 1][0])
        return latents.float(), label

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def check_tokenizer(self, tokenizer: Any) -> bool:
        """Check that ``tokenizer`` is the one that wrote this cache, as far as the cache can tell.

        Raises :class:`UserError` on a certain mismatch (latent channels, downsampling factor, the sha256 of its weight
        files); returns ``True`` when the weights matched and ``False`` when there was nothing to compare (random
        weights on both sides).
        """
        info = self.tokenizer_info
        if not info:
            return False
        for key in ("latent_channels", "downsample"):
            mine, theirs = getattr(tokenizer, key, None), info.get(key)
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                raise UserError(f"the latent cache {self.root} was written by a tokenizer with {key}={theirs}, the "
                                f"recipe's tokenizer has {key}={mine}; cache the latents again with this tokenizer, "
                                "or use the tokenizer that wrote them")
        stored = info.get("weights") or {}
        now = describe_tokenizer(tokenizer)["weights"]
        cached = {role: w.get("sha256") for role, w in stored.items()}
        current = {role: w["sha256"] for role, w in now.items()}
        if cached != current:
            def name(files: Mapping[str, Mapping[str, Any]]) -> str:
                return ", ".join(f"{role} {w.get('source')} (sha256 {str(w.get('sha256'))[:12]}…)"
                                 for role, w in files.items()) or "random weights"

            raise UserError(
                f"the latent cache {self.root} was written by a tokenizer with {name(stored)}, the recipe's tokenizer "
                f"has {name(now)}; cache the latents again (`repae cache-latents`) or set the tokenizer's weights "
                "to the ones that wrote the cache"
            )
        return bool(cached)

    def __repr__(self) -> str:
        name = self.tokenizer_info.get("name")
        return (f"LatentCache(root={str(self.root)!r}, items={len(self)}, latent_shape={self.latent_shape}, "
                f"num_classes={self.num_classes}, tokenizer={name!r})")
