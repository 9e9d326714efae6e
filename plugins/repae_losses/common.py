"""Helpers shared by the loss implementations: full-precision regions and clear errors for missing inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from repae import UserError

__all__ = ["full_precision", "need", "per_sample_mean"]


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Autocast off on ``device`` (the tokenizer regularisers and the discriminator run in float32, as REPA-E)."""
    kind = torch.device(device).type
    if kind in ("cpu", "cuda"):
        with torch.autocast(device_type=kind, enabled=False):
            yield
    else:
        yield


def need(value: Any, what: str, loss: str, fix: str) -> Any:
    """``value``, or a :class:`~repae.errors.UserError` saying that ``loss`` needs ``what`` and how to get it."""
    if value is None:
        raise UserError(f"loss '{loss}' needs {what}, which this training does not compute: {fix}")
    return value


def per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first (``mean_flat``): ``[B, ...] -> [B]``."""
    return x.mean(dim=tuple(range(1, x.ndim)))
