"""Sample-quality evaluation as in the ADM suite: gFID, sFID, Inception Score, precision and recall.

Modules, one concern each:

- :mod:`repae.evaluate.inputs`: sample batches (ADM ``.npz``, image folders, ``repae sample`` output) and reference
  batches (ADM ``mu``/``sigma``/``mu_s``/``sigma_s``/``arr_0``, or a folder); writing ADM reference batches;
- :mod:`repae.evaluate.features`: Inception-v3 features through torch-fidelity's port, with the ADM sFID features
  added by a registered torch-fidelity feature extractor; finding the weights offline;
- :mod:`repae.evaluate.metrics`: the formulas (Fréchet distance, Inception Score, improved precision/recall); the
  metric components that use them are registered by the ``repae_metrics`` plugin;
- :mod:`repae.evaluate.report`: the result and its provenance;
- :mod:`repae.evaluate.pipeline`: :func:`evaluate`, tying them together (``repae eval``).

Importing this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from repae.evaluate.report import EvalReport

__all__ = ["evaluate"]


def evaluate(*args: Any, **kwargs: Any) -> EvalReport:
    """See :func:`repae.evaluate.pipeline.evaluate`."""
    from repae.evaluate.pipeline import evaluate as run

    return run(*args, **kwargs)
