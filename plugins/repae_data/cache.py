"""``latent-cache``: the dataset of a latent cache written by ``repae cache-latents`` (:class:`repae.LatentCache`).

As in REPA-E's ``cache_latents.py`` (arXiv 2504.10483), a cache holds each image's posterior *parameters*
(``concat([mean, std])``, float32 ``[2C, h, w]``), not a sample: sampling ``z = mean + std * eps`` and normalisation
happen at training time. The format and the writer are repae's own (:mod:`repae.latent_cache`); this component reads
a cache for training and refuses a tokenizer other than the one that wrote it (:class:`repae.ChecksTokenizer`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset

from repae import BuildContext, LatentCache, UserError
from repae_data import LatentCacheConfig

__all__ = ["LatentCacheDataset", "build_latent_cache"]


class LatentCacheDataset(Dataset):
    """Items ``(float32 [2C, h, w], label)`` of a latent cache: the posterior mean and std concatenated along
    channels. ``latent_shape`` is ``(C, h, w)``; ``None`` for a placeholder (a dry run without the cache)."""

    kind = "latents"

    def __init__(self, root: str | os.PathLike[str], *, cache: LatentCache | None = None) -> None:
        self.cache = cache if cache is not None else LatentCache(root)
        self.root = self.cache.root
        self.num_classes = self.cache.num_classes
        self.resolution = self.cache.resolution
        self.latent_shape = self.cache.latent_shape
        self.tokenizer_info: dict[str, Any] = self.cache.tokenizer_info

    @classmethod
    def placeholder(cls, root: str | os.PathLike[str]) -> LatentCacheDataset:
        """An empty stand-in for a cache that is not there (dry runs on ``meta``)."""
        index = {"num_items": 0, "num_classes": 0, "resolution": 0, "latent_shape": [], "shard_size": 1,
                 "shards": [], "tokenizer": {}}
        return cls(root, cache=LatentCache(root, index=index))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.cache[index]

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch; present for the dataset contract."""

    def check_tokenizer(self, tokenizer: Any) -> None:
        """:class:`repae.ChecksTokenizer`: refuse a tokenizer other than the one that wrote the cache."""
        self.cache.check_tokenizer(tokenizer)

    def __repr__(self) -> str:
        return repr(self.cache).replace("LatentCache(", "LatentCacheDataset(", 1)


def build_latent_cache(config: LatentCacheConfig, context: BuildContext) -> LatentCacheDataset:
    """Factory of ``latent-cache``. On ``meta`` (dry runs) a missing cache gives an empty placeholder instead of an
    error (its ``index.json`` is read when present: it is small)."""
    if context.dry_run:
        try:
            return LatentCacheDataset(config.root)
        except UserError:
            return LatentCacheDataset.placeholder(config.root)
    return LatentCacheDataset(config.root)
