"""The result of an evaluation: metric values plus everything needed to reproduce them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["METRIC_LABELS", "EvalReport"]

METRIC_LABELS = {
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "Inception Score",
    "precision": "Precision",
    "recall": "Recall",
}
"""Output keys -> the names ADM's evaluator prints."""


@dataclass
class EvalReport:
    """Metric values (``fid``, ``sfid``, ``inception_score``, ``precision``, ``recall``, ...) and their provenance."""

    samples: str
    num_samples: int
    reference: str
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Metrics not computed -> why (e.g. precision-recall without reference images)."""
    num_reference_images: int | None = None
    reference_stats: list[str] = field(default_factory=list)
    """ADM statistics keys taken from the reference file (``mu``, ``sigma``, ``mu_s``, ``sigma_s``)."""
    inception_weights: str = ""
    inception_sha256: str = ""
    feature_extractor: str = ""
    device: str = "cpu"
    batch_size: int = 64
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``; ``metrics`` keeps the order the metrics were requested in."""
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows for a table, ADM's names and precision (4 significant decimals)."""
        rows = [(METRIC_LABELS.get(key, key), f"{value:.4f}") for key, value in self.metrics.items()]
        rows += [(METRIC_LABELS.get(key, key), f"skipped: {why}") for key, why in self.skipped.items()]
        return rows
