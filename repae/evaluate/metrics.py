"""The metrics of the ADM evaluation suite, on Inception features.

- Fréchet distance (Heusel et al., 2017, arXiv 1706.08500): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, on the
  pool_3 features (FID) or the ``mixed_6/conv`` spatial features (sFID; Nash et al., 2021, arXiv 2103.03841);
- Inception Score (Salimans et al., 2016, arXiv 1606.03498): ``exp E_x KL(p(y|x) || p(y))`` per split, averaged over
  10 consecutive, unshuffled splits as ADM does (for 50,000 samples: its 5,000-sample splits);
- improved precision and recall (Kynkäänniemi et al., 2019, arXiv 1904.06991): a k-NN ball (k = 3) around every
  feature of one set; precision is the fraction of samples inside some reference ball, recall the fraction of
  reference features inside some sample ball. Distances in batches of 10,000 rows and columns, as ADM.

The functions take NumPy arrays and are public (``repae.frechet_distance`` ...): the ``repae-metrics`` plugin's
components (``fid``, ``sfid``, ``inception-score``, ``precision-recall``; :class:`repae.Metric`) and the rFID of
``repae analyze`` are made of them.
"""

from __future__ import annotations

import numpy as np

from repae.errors import UserError

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_to_features",
    "inception_score",
    "precision_recall",
]


# -- the formulas ----------------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``np.cov(rowvar=False)``) of ``[N, D]`` features, accumulated in float64."""
    n = len(features)
    if n < 2:
        raise UserError(f"statistics need at least 2 images, got {n}")
    mu = np.zeros(features.shape[1], np.float64)
    for start in range(0, n, chunk):
        mu += features[start:start + chunk].sum(0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((features.shape[1],) * 2, np.float64)
    for start in range(0, n, chunk):
        centred = features[start:start + chunk].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def _psd_eigenvalues(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a positive semi-definite matrix with round-off removed: values below ``dim * eps * max`` are
    zero (their square roots would otherwise add noise of order ``sqrt(eps)``)."""
    floor = len(values) * np.finfo(np.float64).eps * max(float(values.max(initial=0.0)), 0.0)
    return np.where(values > floor, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_psd_eigenvalues(values))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    ``tr((S1 S2)^(1/2))`` is computed as ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``: the matrix is symmetric positive
    semi-definite, so a symmetric eigensolver applies and no complex round-off appears (ADM uses
    ``scipy.linalg.sqrtm(S1 S2)`` and discards an imaginary part; torch-fidelity ``sqrt(eigvals(S1 S2))``; the three
    agree in exact arithmetic). Rank-deficient covariances (fewer samples than dimensions) are fine.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise UserError(
            f"statistics do not match: mu {list(mu1.shape)} / {list(mu2.shape)}, sigma {list(sigma1.shape)} / "
            f"{list(sigma2.shape)} (were both made with the same network and layer?)"
        )
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_to_features(
    features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, chunk: int = 4096
) -> float:
    """:func:`frechet_distance` between the statistics of ``features`` (``[N, D]``) and ``N(mu, sigma)``.

    With fewer samples than dimensions the covariance of ``features`` is ``A^T A / (N - 1)`` (``A``: the centred
    features) and the non-zero eigenvalues of ``S1 S2`` are those of the ``N x N`` matrix ``A S2 A^T / (N - 1)``, so
    the trace term needs an ``N x N`` instead of two ``D x D`` eigen-decompositions (same value, much faster for small
    sets). Otherwise this is :func:`frechet_distance` of the two sets of statistics.
    """
    mu1, sigma1 = feature_statistics(features, chunk)
    n, dim = features.shape
    if n >= dim:
        return frechet_distance(mu1, sigma1, mu, sigma)
    mu2, sigma2 = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu2.shape != mu1.shape or sigma2.shape != sigma1.shape:
        raise UserError(f"statistics do not match: features have {dim} dimensions, the reference mu {list(mu2.shape)} "
                        f"and sigma {list(sigma2.shape)} (were both made with the same network and layer?)")
    centred = features.astype(np.float64) - mu1
    inner = centred @ sigma2 @ centred.T / (n - 1)
    tr_covmean = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """Mean over ``splits`` consecutive (unshuffled) splits of ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``.

    ``logits``: ``[N, C]`` class logits (ADM: pool_3 times the logit weights, no bias, 1008 classes); split ``i``
    holds rows ``[i N / splits, (i + 1) N / splits)``. Float64 throughout.
    """
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if splits < 1 or n < splits:
        raise UserError(f"the Inception Score needs at least {splits} samples for {splits} splits, got {n}")
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(0))
        kl = (p * (part - log_marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_distances(a, b, a_norms, b_norms):
    d = (a_norms[:, None] + b_norms[None, :] - 2.0 * (a @ b.T)).clamp_min_(0)
    if not d.isfinite().all():  # float16 overflow: redo the block in float32, as ADM does
        a, b = a.float(), b.float()
        d = ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0)
    return d


def _radii(points, norms, k: int, batch_size: int):
    """Squared distance of every point to its k-th nearest neighbour (the point itself is the 0-th)."""
    import torch

    out = []
    for start in range(0, len(points), batch_size):
        rows, row_norms = points[start:start + batch_size], norms[start:start + batch_size]
        best: torch.Tensor | None = None
        for col in range(0, len(points), batch_size):
            d = _squared_distances(rows, points[col:col + batch_size], row_norms, norms[col:col + batch_size])
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        assert best is not None, "no points"
        out.append(best[:, k])
    return torch.cat(out)


def _inside_any_ball(points, norms, centres, centre_norms, radii, batch_size: int):
    """For every point: whether it lies within ``radii[j]`` (squared) of some centre ``j``."""
    import torch

    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for start in range(0, len(points), batch_size):
        rows, row_norms = points[start:start + batch_size], norms[start:start + batch_size]
        for col in range(0, len(centres), batch_size):
            d = _squared_distances(rows, centres[col:col + batch_size], row_norms, centre_norms[col:col + batch_size])
            inside[start:start + len(rows)] |= (d <= radii[None, col:col + batch_size]).any(1)
    return inside


def precision_recall(
    samples: np.ndarray, reference: np.ndarray, *, k: int = 3, batch_size: int = 10000, device: str = "cpu",
    dtype: str = "float32",
) -> tuple[float, float]:
    """Improved precision and recall of ``samples`` against ``reference`` (both ``[N, D]`` features).

    A point's ball has the radius of its ``k``-th nearest neighbour within its own set (itself excluded, i.e. the
    ``k + 1``-th smallest distance counting itself, as ADM's ``ManifoldEstimator(nhood_sizes=(3,))``); a point on a
    ball's boundary is inside. Squared Euclidean distances ``|a|^2 + |b|^2 - 2 a.b`` in ``dtype`` (ADM: float16 on the
    GPU) over ``batch_size x batch_size`` blocks, on ``device``.
    """
    import torch

    for name, x in (("samples", samples), ("reference", reference)):
        if len(x) <= k:
            raise UserError(f"precision/recall with k={k} need more than {k} {name}, got {len(x)}")
    torch_dtype = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}[dtype]
    with torch.inference_mode():
        fake = torch.as_tensor(np.asarray(samples), device=device).to(torch_dtype)
        real = torch.as_tensor(np.asarray(reference), device=device).to(torch_dtype)
        fake_norms, real_norms = (fake * fake).sum(1), (real * real).sum(1)
        real_radii = _radii(real, real_norms, k, batch_size)
        fake_radii = _radii(fake, fake_norms, k, batch_size)
        precision = _inside_any_ball(fake, fake_norms, real, real_norms, real_radii, batch_size)
        recall = _inside_any_ball(real, real_norms, fake, fake_norms, fake_radii, batch_size)
        return float(precision.double().mean()), float(recall.double().mean())
