"""The ``repae-metrics`` components: :class:`repae.Metric` objects over Inception features, made of repae's public
ADM formulas (:func:`repae.frechet_distance_to_features`, :func:`repae.inception_score`,
:func:`repae.precision_recall`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from repae import (
    BuildContext,
    ReferenceFeatures,
    feature_statistics,
    frechet_distance_to_features,
    inception_score,
    precision_recall,
)
from repae_metrics import FrechetConfig, InceptionScoreConfig, PrecisionRecallConfig

__all__ = ["FrechetDistance", "InceptionScore", "PrecisionRecall", "build_fid", "build_inception_score",
           "build_precision_recall", "build_sfid"]

Feature = Literal["pool", "spatial", "logits"]


class FrechetDistance:
    """FID (``feature="pool"``) or sFID (``feature="spatial"``) against the reference's statistics."""

    def __init__(self, name: str, feature: Feature, output: str, *, use_reference_stats: bool = True) -> None:
        self.name, self.feature, self.outputs = name, feature, (output,)
        self.use_reference_stats = use_reference_stats

    def reference_features(self, stored_stats: Mapping[str, object]) -> set[str]:
        return set() if self.use_reference_stats and self.feature in stored_stats else {self.feature}

    def compute(self, samples: Mapping[str, Any], reference: ReferenceFeatures) -> dict[str, float]:
        if self.use_reference_stats and self.feature in reference.stats:
            ref_mu, ref_sigma = reference.stats[self.feature]
        else:
            ref_mu, ref_sigma = feature_statistics(reference.features[self.feature])
        return {self.outputs[0]: frechet_distance_to_features(samples[self.feature], ref_mu, ref_sigma)}

    def __repr__(self) -> str:
        return f"FrechetDistance({self.name})"


class InceptionScore:
    """Inception Score of the samples over ``splits`` unshuffled splits."""

    feature: Feature = "logits"
    outputs = ("inception_score",)

    def __init__(self, name: str = "inception-score", *, splits: int = 10) -> None:
        self.name, self.splits = name, splits

    def reference_features(self, stored_stats: Mapping[str, object]) -> set[str]:
        return set()

    def compute(self, samples: Mapping[str, Any], reference: ReferenceFeatures) -> dict[str, float]:
        return {"inception_score": inception_score(samples["logits"], self.splits)}

    def __repr__(self) -> str:
        return f"InceptionScore({self.name})"


class PrecisionRecall:
    """Improved precision and recall on pool_3 features against the reference images' features."""

    feature: Feature = "pool"
    outputs = ("precision", "recall")

    def __init__(self, name: str = "precision-recall", *, k: int = 3, batch_size: int = 10000, device: str = "cpu",
                 dtype: str = "float32") -> None:
        self.name = name
        self.k, self.batch_size, self.device, self.dtype = k, batch_size, device, dtype

    def reference_features(self, stored_stats: Mapping[str, object]) -> set[str]:
        return {"pool"}

    def compute(self, samples: Mapping[str, Any], reference: ReferenceFeatures) -> dict[str, float]:
        precision, recall = precision_recall(samples["pool"], reference.features["pool"], k=self.k,
                                             batch_size=self.batch_size, device=self.device, dtype=self.dtype)
        return {"precision": precision, "recall": recall}

    def __repr__(self) -> str:
        return f"PrecisionRecall({self.name})"


def build_fid(config: FrechetConfig, context: BuildContext) -> FrechetDistance:
    return FrechetDistance("fid", "pool", "fid", use_reference_stats=config.use_reference_stats)


def build_sfid(config: FrechetConfig, context: BuildContext) -> FrechetDistance:
    return FrechetDistance("sfid", "spatial", "sfid", use_reference_stats=config.use_reference_stats)


def build_inception_score(config: InceptionScoreConfig, context: BuildContext) -> InceptionScore:
    return InceptionScore(splits=config.splits)


def build_precision_recall(config: PrecisionRecallConfig, context: BuildContext) -> PrecisionRecall:
    device = "cpu" if context.dry_run else context.device
    return PrecisionRecall(k=config.k, batch_size=config.batch_size, dtype=config.distance_dtype, device=device)
