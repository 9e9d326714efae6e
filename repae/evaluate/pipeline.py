"""Samples + reference + metrics -> :class:`~repae.evaluate.report.EvalReport` (what ``repae eval`` runs)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ContextManager

from repae.errors import UserError
from repae.evaluate.inputs import (
    STAT_KEYS,
    open_reference,
    open_samples,
    write_reference_npz,
)
from repae.evaluate.metrics import feature_statistics
from repae.evaluate.report import EvalReport
from repae.interfaces import Metric, ReferenceFeatures

__all__ = ["Progress", "evaluate"]

Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]
"""``progress(description, total)`` -> a context manager yielding ``advance(n)``."""


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def evaluate(
    samples: str | os.PathLike[str],
    reference: str | os.PathLike[str],
    metrics: Sequence[Metric],
    *,
    inception_weights: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    skip_unavailable: bool = False,
    save_reference: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> EvalReport:
    """Compute ``metrics`` for the images at ``samples`` against ``reference`` (see :mod:`repae.evaluate.inputs`).

    Inception features are computed once per image set, for every feature some metric needs. A metric the
    reference cannot support (precision/recall against statistics without images) raises
    :class:`~repae.errors.UserError`, or is listed in ``report.skipped`` when ``skip_unavailable``.
    ``save_reference`` also writes the reference's statistics (and images) as an ADM reference batch.
    """
    from repae.evaluate.features import (
        EXTRACTOR_NAME,
        extract_features,
        find_inception_weights,
        load_inception,
    )

    if not metrics:
        raise UserError("no metrics to compute")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    progress = progress or _no_progress
    start = time.perf_counter()
    source = open_samples(samples)
    ref = open_reference(reference)
    report = EvalReport(samples=str(source.path), num_samples=len(source), reference=str(ref.path),
                        num_reference_images=len(ref.images) if ref.images is not None else None,
                        device=device, batch_size=batch_size)

    active: list[Metric] = []
    ref_needed: dict[str, None] = {}
    for metric in metrics:
        need = metric.reference_features(ref.stats)
        if need and ref.images is None:
            stats = [STAT_KEYS[name] for name in sorted(need) if name in STAT_KEYS and name not in ref.stats]
            short = "the reference has no images (arr_0)"
            if stats and metric.feature in STAT_KEYS:
                short = f"the reference has neither {'/'.join(stats[0])} nor images (arr_0)"
            held = ", ".join(k for name in ref.stats for k in STAT_KEYS[name])
            if not skip_unavailable:
                raise UserError(f"{metric.name} needs reference images, but {ref.path} holds only statistics "
                                f"({held}) and no arr_0; use a reference batch with arr_0 or a folder of images")
            report.skipped.update({key: short for key in metric.outputs})
            continue
        active.append(metric)
        ref_needed.update(dict.fromkeys(sorted(need)))
    if save_reference is not None:
        for name in STAT_KEYS:
            if name not in ref.stats:
                if ref.images is None:
                    raise UserError(f"--save-ref: {ref.path} has neither {'/'.join(STAT_KEYS[name])} nor images")
                ref_needed[name] = None
    if not active and save_reference is None:
        raise UserError("none of the requested metrics can be computed with this reference: "
                        + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()))

    sample_needed = dict.fromkeys(m.feature for m in active)
    features = list(dict.fromkeys([*sample_needed, *ref_needed]))
    weights = find_inception_weights(inception_weights)
    extractor = load_inception(weights, features, device=device)
    report.inception_weights, report.inception_sha256 = str(weights), extractor.weights_sha256
    report.feature_extractor = EXTRACTOR_NAME

    with progress("samples", len(source)) as advance:
        sample_features = extract_features(source.batches(batch_size), extractor, progress=advance)
    reference_data = ReferenceFeatures(stats=ref.stats)
    if ref_needed:
        assert ref.images is not None  # checked above: metrics that need reference images were skipped or refused
        with progress("reference", len(ref.images)) as advance:
            reference_data.features = extract_features(ref.images.batches(batch_size), extractor, progress=advance)
    stored = [m.feature for m in active if m.feature in ref.stats and not m.reference_features(ref.stats)]
    report.reference_stats = [key for name in dict.fromkeys(stored) for key in STAT_KEYS[name]]

    with progress(f"metrics ({', '.join(m.name for m in active)})", len(active)) as advance:
        for metric in active:
            report.metrics.update(metric.compute(sample_features, reference_data))
            advance(1)

    if save_reference is not None:
        saved = {name: ref.stats.get(name) or feature_statistics(reference_data.features[name]) for name in STAT_KEYS}
        images = ref.images.batches(batch_size) if ref.images is not None else None
        write_reference_npz(Path(save_reference), saved, images)
    report.seconds = round(time.perf_counter() - start, 3)
    return report
