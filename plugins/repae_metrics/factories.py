"""Factories of the ``repae-metrics`` components: configs -> :mod:`repae.evaluate.metrics` objects."""

from __future__ import annotations

from typing import Any

from repae.evaluate.metrics import FrechetDistance, InceptionScore, PrecisionRecall
from repae_metrics import FrechetConfig, InceptionScoreConfig, PrecisionRecallConfig


def build_fid(config: FrechetConfig, context: Any) -> FrechetDistance:
    return FrechetDistance("fid", "pool", "fid", use_reference_stats=config.use_reference_stats)


def build_sfid(config: FrechetConfig, context: Any) -> FrechetDistance:
    return FrechetDistance("sfid", "spatial", "sfid", use_reference_stats=config.use_reference_stats)


def build_inception_score(config: InceptionScoreConfig, context: Any) -> InceptionScore:
    return InceptionScore(splits=config.splits)


def build_precision_recall(config: PrecisionRecallConfig, context: Any) -> PrecisionRecall:
    device = getattr(context, "device", "cpu")
    return PrecisionRecall(k=config.k, batch_size=config.batch_size, dtype=config.distance_dtype,
                           device="cpu" if device == "meta" else device)
