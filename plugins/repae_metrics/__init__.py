"""Sample-quality metrics (kind ``metric``) of the ADM evaluation suite, on Inception-v3 features.

- ``fid``: Fréchet Inception Distance on pool_3 features (Heusel et al., 2017, arXiv 1706.08500);
- ``sfid``: the same on the spatial ``mixed_6/conv`` features (Nash et al., 2021, arXiv 2103.03841);
- ``inception-score``: Inception Score over unshuffled splits (Salimans et al., 2016, arXiv 1606.03498);
- ``precision-recall``: improved precision and recall, k-NN manifolds (Kynkäänniemi et al., 2019, arXiv 1904.06991).

As computed by ADM's evaluator (Dhariwal & Nichol, 2021, arXiv 2105.05233), which REPA-E (arXiv 2504.10483) reports.
``repae eval`` runs them (``--metrics fid,sfid,is,pr``); the math lives in :mod:`repae.evaluate.metrics`. This module
only declares configs and registers them; it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from repae import FieldError, hookimpl, option

__all__ = ["FrechetConfig", "InceptionScoreConfig", "PrecisionRecallConfig"]


@dataclass(kw_only=True)
class FrechetConfig:
    """Config of ``fid`` and ``sfid``."""

    use_reference_stats: bool = option(
        True, doc="use the reference batch's stored mu/sigma (mu_s/sigma_s) when present, as ADM; false: recompute "
        "them from its images"
    )


@dataclass(kw_only=True)
class InceptionScoreConfig:
    """Config of ``inception-score``."""

    splits: int = option(10, doc="consecutive, unshuffled splits; the score is their mean (ADM: 5,000-sample "
                         "splits, i.e. 10 for 50K samples)")

    def __post_init__(self) -> None:
        if self.splits < 1:
            raise FieldError("splits", f"must be >= 1, got {self.splits}")


@dataclass(kw_only=True)
class PrecisionRecallConfig:
    """Config of ``precision-recall``."""

    k: int = option(3, doc="neighbourhood size: a ball reaches a point's k-th nearest neighbour (ADM: 3)")
    batch_size: int = option(10000, doc="rows and columns per block of pairwise distances (ADM: 10000)")
    distance_dtype: Literal["float32", "float16", "float64"] = option(
        "float32", doc="dtype of the squared distances (ADM: float16 on the GPU, float32 where that overflows)"
    )

    def __post_init__(self) -> None:
        if self.k < 1:
            raise FieldError("k", f"must be >= 1, got {self.k}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"must be >= 1, got {self.batch_size}")


_MODULE = "repae_metrics.factories"


@hookimpl
def register_components(register: Any) -> None:
    """Register FID, sFID, Inception Score and precision/recall."""
    register("metric", "fid", summary="Fréchet Inception Distance on pool_3 (2048-d) features, as ADM's evaluator",
             config=FrechetConfig, factory=f"{_MODULE}:build_fid")
    register("metric", "sfid", summary="spatial FID on mixed_6/conv features (17x17x7 = 2023-d), as ADM's evaluator",
             config=FrechetConfig, factory=f"{_MODULE}:build_sfid")
    register("metric", "inception-score", summary="Inception Score, unshuffled splits, logits without bias (ADM)",
             config=InceptionScoreConfig, factory=f"{_MODULE}:build_inception_score")
    register("metric", "precision-recall", summary="improved precision and recall, k-NN manifolds of pool_3 features",
             config=PrecisionRecallConfig, factory=f"{_MODULE}:build_precision_recall")
