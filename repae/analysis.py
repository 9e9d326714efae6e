"""Latent-space diagnostics of REPA-E (Leng et al., 2025, arXiv 2504.10483) for ``repae analyze``.

- Table 1: spatial variance and total variation of the latents. Both take latents ``[B, C, H, W]`` (the tokenizer
  posterior's mean, un-normalised). A latent space collapsed by the diffusion loss (REPA-E without the stop-gradient)
  has both near zero: a constant latent is trivially easy to denoise.
- Fig. 3b: CKNNA (Huh et al., 2024, "The Platonic Representation Hypothesis", arXiv 2405.07987), the alignment between
  the denoiser's hidden tokens and a pretrained encoder's tokens.
- Fig. 2a: the latents' first three principal components shown as RGB.
- Reconstruction quality: PSNR.

The metric functions are pure (torch only); :func:`analyze_batch` runs a trained run's models on a batch of images;
:func:`analyze_run` (what ``repae analyze`` runs) opens a run, picks the images, and writes ``analysis.json`` (the
:class:`AnalysisSettings` and the results) and the pictures. Everything a run's components must provide for it is in
their contracts: the tokenizer's ``encode``/``decode``; for CKNNA the denoiser's hidden states, the encoders' tokens,
the alignment depth and the diffusion process its losses declare (``feature_depths``, ``transport``); for
``--images`` the dataset's :class:`repae.ReadsImages`.
"""

from __future__ import annotations

import contextlib
import collections
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repae.errors import UserError, describe_exception, first_line
from repae.generate import to_uint8  # the one [-1, 1] -> uint8 conversion (sampling uses it too)

if TYPE_CHECKING:
    from torch import Tensor

    from repae.runs import OpenedRun

__all__ = [
    "ANALYSIS_FILE",
    "AnalysisSettings",
    "BatchAnalysis",
    "analyze_batch",
    "analyze_run",
    "cknna",
    "denoiser_features",
    "labelled_rows",
    "latent_pca_rgb",
    "psnr",
    "spatial_variance",
    "spatial_variance_per_channel",
    "spread_indices",
    "to_uint8",
    "total_variation",
    "total_variation_per_channel",
]


# ---------------------------------------------------------------------------------------------------------------------
# Table 1: spatial variance and total variation
# ---------------------------------------------------------------------------------------------------------------------


def spatial_variance(z: Tensor) -> float:
    """Variance over spatial positions, per channel, averaged over channels and images."""
    return z.float().var(dim=(2, 3)).mean().item()


def spatial_variance_per_channel(z: Tensor) -> list[float]:
    """Variance over spatial positions of each channel, averaged over images: ``C`` values (their mean is
    :func:`spatial_variance`)."""
    return z.float().var(dim=(2, 3)).mean(dim=0).tolist()


def _abs_differences(z: Tensor) -> Tensor:
    """Per image and channel: summed absolute differences of vertically and horizontally adjacent pixels ``[B, C]``."""
    z = z.float()
    vertical = (z[:, :, 1:, :] - z[:, :, :-1, :]).abs().sum(dim=(2, 3))
    horizontal = (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().sum(dim=(2, 3))
    return vertical + horizontal


def total_variation(z: Tensor) -> float:
    """Sum of absolute differences between vertically and horizontally adjacent latent pixels over all channels,
    averaged over images (anisotropic total variation)."""
    return _abs_differences(z).sum(dim=1).mean().item()


def total_variation_per_channel(z: Tensor) -> list[float]:
    """:func:`total_variation` of each channel alone, averaged over images: ``C`` values (they sum to it)."""
    return _abs_differences(z).mean(dim=0).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# CKNNA
# ---------------------------------------------------------------------------------------------------------------------


def _knn_mask(kernel: Tensor, k: int) -> Tensor:
    """bool ``[n, n]``: ``mask[i, j]`` when ``j != i`` is among the ``k`` nearest neighbours of ``i`` (largest
    kernel values)."""
    import torch

    n = kernel.shape[0]
    scores = kernel.clone()
    scores.fill_diagonal_(-math.inf)
    nearest = scores.topk(k, dim=1).indices
    mask = torch.zeros(n, n, dtype=torch.bool, device=kernel.device)
    mask.scatter_(1, nearest, True)
    return mask


def _row_centred(kernel: Tensor) -> Tensor:
    """``K_ij - mean_l K_il``: each similarity relative to the average similarity of ``i`` to the batch."""
    return kernel - kernel.mean(dim=1, keepdim=True)


def cknna(a: Tensor, b: Tensor, *, k: int = 10, normalize: bool = True) -> float:
    """Centered kernel nearest-neighbour alignment of two representations of the same ``n`` samples.

    ``a`` ``[n, d_a]`` and ``b`` ``[n, d_b]`` (more dimensions are flattened). With linear kernels
    ``K = a a^T``, ``L = b b^T`` (cosine similarities when ``normalize``: rows are L2-normalised first), centred per
    row as in the paper (``K_ij - mean_l K_il``), and ``alpha(i, j)`` the indicator that ``j != i`` is among the ``k``
    nearest neighbours of ``i`` under *both* kernels (mutual k-NN)::

        align(K, L) = sum_ij alpha(i, j) Kc_ij Lc_ij
        CKNNA       = align(K, L) / sqrt(align(K, K) * align(L, L))

    where ``align(K, K)`` uses the neighbours under ``K`` alone. Identical representations (or ones that differ by a
    rotation and scale) give 1; independent ones give about 0 (of the order ``k / n``). CKA is the special case
    ``k = n - 1``. ``k`` is capped at ``n - 1``.
    """
    import torch

    if a.shape[0] != b.shape[0]:
        raise ValueError(f"cknna: {a.shape[0]} and {b.shape[0]} samples; both need the same samples")
    n = a.shape[0]
    if n < 3:
        raise ValueError(f"cknna needs at least 3 samples, got {n}")
    if k < 1:
        raise ValueError(f"cknna: k must be >= 1, got {k}")
    k = min(k, n - 1)
    a, b = a.reshape(n, -1).double(), b.reshape(n, -1).double()
    if normalize:
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    kernel_a, kernel_b = a @ a.T, b @ b.T
    mask_a, mask_b = _knn_mask(kernel_a, k), _knn_mask(kernel_b, k)
    centred_a, centred_b = _row_centred(kernel_a), _row_centred(kernel_b)
    cross = (centred_a * centred_b)[mask_a & mask_b].sum()
    self_a = centred_a.square()[mask_a].sum()
    self_b = centred_b.square()[mask_b].sum()
    denominator = torch.sqrt(self_a * self_b)
    return 0.0 if denominator.item() == 0.0 else (cross / denominator).item()


# ---------------------------------------------------------------------------------------------------------------------
# Pictures and reconstruction quality
# ---------------------------------------------------------------------------------------------------------------------


def latent_pca_rgb(z: Tensor) -> Tensor:
    """The first three principal components of the latent channels as RGB in ``[0, 1]``: ``[B, 3, H, W]``.

    Every position of every image of ``z`` ``[B, C, H, W]`` is one sample of ``C`` channels; the components are those
    of the whole batch (so colours compare across images), each min-max scaled to ``[0, 1]`` over the batch. Signs are
    fixed (the largest loading of each component is positive); with fewer than three channels the missing colours are
    0.
    """
    import torch

    b, c, h, w = z.shape
    samples = z.detach().double().permute(0, 2, 3, 1).reshape(-1, c)
    samples = samples - samples.mean(dim=0)
    covariance = samples.T @ samples / max(samples.shape[0] - 1, 1)
    values, vectors = torch.linalg.eigh(covariance)
    vectors = vectors[:, values.argsort(descending=True)[:3]]
    largest = vectors.abs().argmax(dim=0)
    signs = vectors[largest, torch.arange(vectors.shape[1])].sign()
    vectors = vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = samples @ vectors
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp_min(1e-12)
    if scaled.shape[1] < 3:
        scaled = torch.cat([scaled, scaled.new_zeros(scaled.shape[0], 3 - scaled.shape[1])], dim=1)
    return scaled.reshape(b, h, w, 3).permute(0, 3, 1, 2).float().contiguous()


def psnr(reference: Tensor, estimate: Tensor, *, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, per image over all pixels and channels, averaged over images.

    ``10 log10(data_range^2 / mse)``; an exact copy (``mse = 0``) counts as 100 dB so the result stays finite.
    """
    if reference.shape != estimate.shape:
        raise ValueError(f"psnr: shapes {tuple(reference.shape)} and {tuple(estimate.shape)} differ")
    error = (reference.double() - estimate.double()).square().flatten(1).mean(dim=1)
    error = error.clamp_min(data_range**2 * 1e-10)
    return (10.0 * (data_range**2 / error).log10()).mean().item()


def labelled_rows(rows: Sequence[Tensor], labels: Sequence[str]) -> Tensor:
    """Rows of uint8 images ``[n_i, 3, H, W]`` (same ``H``, ``W``) as one uint8 ``[3, H', W']`` picture, each row
    labelled on the left: :func:`repae.sampling.image_grid` (the contact sheet's layout: small tiles scaled up by a
    whole factor, nearest neighbour, to at least :data:`repae.sampling.GRID_MIN_WIDTH` pixels of tiles)."""
    import numpy as np
    import torch

    from repae.sampling import image_grid

    picture = image_grid([list(row.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()) for row in rows],
                         labels=list(labels))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Running a trained model
# ---------------------------------------------------------------------------------------------------------------------


def denoiser_features(
    denoiser: Any,
    normalizer: Any,
    transport: Any,
    z: Tensor,
    labels: Tensor,
    noise: Tensor,
    *,
    t: float,
    depth: int,
) -> Tensor:
    """The denoiser's hidden tokens after block ``depth`` (1-based), mean-pooled per image: ``[B, hidden]``.

    ``z`` are tokenizer latents; they are normalised by ``normalizer`` (its running statistics, eval mode), noised to
    time ``t`` (1 = noise) with ``noise`` by ``transport.interpolate`` and fed with ``labels``. A transport with
    integer steps (``transport.discrete_steps = T``, DDPM) gets ``round(t * (T - 1))``.
    """
    import torch

    b = z.shape[0]
    steps = transport.discrete_steps
    if steps:
        times = torch.full((b,), round(t * (int(steps) - 1)), dtype=torch.long, device=z.device)
    else:
        times = torch.full((b,), float(t), dtype=z.dtype, device=z.device)
    x0 = normalizer.normalize(z) if normalizer is not None else z
    x_t = transport.interpolate(x0, noise, times)
    out = denoiser(x_t, transport.model_time(times), labels, feature_depths=(depth,), features_only=True)
    return out.hidden[depth].float().mean(dim=1)


@dataclass
class BatchAnalysis:
    """What :func:`analyze_batch` measured: JSON-ready ``metrics``, uint8 picture grids ``[3, H, W]`` and the uint8
    reconstructions ``[N, 3, H, W]`` (for an rFID)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    pictures: dict[str, Tensor] = field(default_factory=dict)
    reconstructions: Tensor | None = None


def analyze_batch(
    *,
    tokenizer: Any,
    images: Tensor,
    labels: Tensor,
    denoiser: Any = None,
    normalizer: Any = None,
    transport: Any = None,
    encoders: Mapping[str, Any] | None = None,
    depth: int | None = None,
    t: float = 0.5,
    k: int = 10,
    seed: int = 0,
    batch_size: int = 32,
    grid_images: int = 8,
    device: str = "cpu",
    advance: Callable[[int], None] | None = None,
) -> BatchAnalysis:
    """Measure a run's latent space on ``images`` (uint8 ``[N, 3, H, W]``, CPU) with ``labels`` (``[N]``).

    - latents: the tokenizer posterior's mean (un-normalised): spatial variance and total variation, overall and
      per channel; their PCA picture (``latent_pca``: a row of inputs over a row of PCA maps, upsampled nearest);
    - reconstructions: ``decode(mean)`` quantised to uint8 against the inputs: ``psnr`` (and a ``reconstructions``
      picture, inputs over reconstructions);
    - CKNNA (k = ``k``): the denoiser's hidden tokens at ``depth``, at time ``t`` with noise drawn from ``seed``,
      mean-pooled per image, against each encoder's tokens mean-pooled per image. Skipped (``None``) without a
      denoiser, encoders or depth, or with fewer than 3 images.

    ``advance(n)`` is called after each batch of ``n`` images (a progress bar's).
    """
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    latents, reconstructions, hidden = [], [], []
    encoded: dict[str, list[Tensor]] = {label: [] for label in (encoders or {})}
    with_cknna = denoiser is not None and bool(encoders) and depth is not None and transport is not None and n >= 3
    noise = None
    with torch.no_grad():
        for start in range(0, n, batch_size):
            raw = images[start : start + batch_size].to(device)
            posterior = tokenizer.encode(raw.float() / 127.5 - 1.0)
            z = posterior.mean.float()
            latents.append(z.cpu())
            reconstructions.append(to_uint8(tokenizer.decode(z)).cpu())
            if not with_cknna:
                continue
            if noise is None:
                generator = torch.Generator().manual_seed(seed)
                noise = torch.randn((n, *z.shape[1:]), generator=generator)
            batch_noise = noise[start : start + batch_size].to(device, z.dtype)
            batch_labels = labels[start : start + batch_size].to(device)
            assert depth is not None  # with_cknna
            hidden.append(denoiser_features(denoiser, normalizer, transport, z, batch_labels, batch_noise,
                                            t=t, depth=depth).cpu())
            for label, encoder in (encoders or {}).items():
                encoded[label].append(encoder(raw).float().mean(dim=1).cpu())
            if advance is not None:
                advance(raw.shape[0])
    z = torch.cat(latents)
    recon = torch.cat(reconstructions)
    metrics: dict[str, Any] = {
        "spatial_variance": spatial_variance(z),
        "spatial_variance_per_channel": spatial_variance_per_channel(z),
        "total_variation": total_variation(z),
        "total_variation_per_channel": total_variation_per_channel(z),
        "latent_shape": list(z.shape[1:]),
        "psnr": psnr(images.float(), recon.float()),
    }
    per_encoder = {label: cknna(torch.cat(hidden), torch.cat(tokens), k=k) for label, tokens in encoded.items()
                   if with_cknna}
    metrics["cknna"] = next(iter(per_encoder.values()), None)
    metrics["cknna_per_encoder"] = per_encoder
    shown = images[:grid_images]
    pca = latent_pca_rgb(z)[: shown.shape[0]]
    pca = F.interpolate(pca, size=tuple(shown.shape[-2:]), mode="nearest")
    pca = (pca * 255.0).round().to(torch.uint8)
    pictures = {
        "latent_pca": labelled_rows([shown, pca], ["input", "latent PCA"]),
        "reconstructions": labelled_rows([shown, recon[: shown.shape[0]]], ["input", "reconstruction"]),
    }
    return BatchAnalysis(metrics, pictures, recon)


# ---------------------------------------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------------------------------------

ANALYSIS_FILE = "analysis.json"


@dataclass(frozen=True)
class AnalysisSettings:
    """What ``repae analyze`` measures on (written to ``analysis.json`` with the results)."""

    num_images: int = 256
    """Images analysed, spread over the set (:func:`spread_indices`; all of them when it holds fewer)."""
    images: str | None = None
    """A folder of image files to analyse (read as the run's dataset prepares images); ``None``: the run's dataset."""
    t: float = 0.5
    """Diffusion time of the CKNNA features (1 = noise)."""
    k: int = 10
    """Nearest neighbours of CKNNA (capped at images - 1)."""
    depth: int | None = None
    """Denoiser block whose tokens CKNNA uses; ``None``: the depth the run's losses align."""
    seed: int = 0
    """Seed of the diffusion noise of the CKNNA features."""
    ema: bool = True
    """Use the EMA denoiser and latent normaliser."""

    def __post_init__(self) -> None:
        if self.num_images < 1 or self.k < 1:
            raise UserError(f"--num-images and --k must be >= 1, got {self.num_images} and {self.k}")
        if not 0.0 <= self.t <= 1.0:
            raise UserError(f"--t must lie in [0, 1] (1 = noise), got {self.t}")
        if self.depth is not None and self.depth < 1:
            raise UserError(f"--depth must be >= 1 (1-based block index), got {self.depth}")


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices of ``range(total)`` (every index when ``count >= total``), increasing: ``range(total)`` cut
    into ``count`` equal strides, one index drawn in each with a fixed seed (the same every time).

    The strides cover a set sorted by class evenly (an ImageNet folder gives every class its share); the draw inside
    each stride keeps the choice from aliasing with a periodic layout: a fixed stride of 8 over a dataset labelled
    ``i % 4`` (the synthetic one) would take class 0 only."""
    import random

    if count >= total:
        return list(range(total))
    draw = random.Random(0)
    return [draw.randrange(i * total // count, (i + 1) * total // count) for i in range(count)]


def _image_files(folder: Path) -> list[Path]:
    from repae.evaluate.inputs import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder; pass a folder holding image files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise UserError(f"--images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _load_images(run: OpenedRun, settings: AnalysisSettings) -> tuple[Any, Any, list[int], str, str]:
    """``(uint8 [N, 3, H, W], labels [N], indices [N], source, label source)`` (indices into the dataset, or into the
    folder's sorted files: :func:`spread_indices`) from ``settings.images`` (read by the dataset's
    :class:`repae.ReadsImages`) or the run's dataset items."""
    import numpy as np
    import torch

    from repae.interfaces import ReadsImages, require

    denoiser = run.denoiser
    null_label = int(getattr(denoiser, "num_classes", 0) or 0) if denoiser is not None else 0
    if not getattr(denoiser, "class_dropout_prob", 0):
        null_label = 0  # no null row in the label table: class 0
    dataset = run.dataset
    spec = next((s for s in run.recipe.components if s.slot == "dataset"), None)
    what = f"dataset '{spec.name}' (plugin {spec.entry.plugin.label})" if spec is not None else "the run's dataset"
    if settings.images is not None:
        if dataset is None:
            raise UserError(f"{run.run_dir}: the recipe has no dataset to say how images are prepared")
        reader = require(dataset, ReadsImages, what=what, needed_for="repae analyze --images")
        files = _image_files(Path(settings.images))
        indices = spread_indices(len(files), settings.num_images)
        pixels = torch.stack([reader.load_image(files[i]) for i in indices])
        labels = torch.full((pixels.shape[0],), null_label, dtype=torch.long)
        return pixels, labels, indices, str(settings.images), "null class" if null_label else "class 0"
    if dataset is None or getattr(dataset, "kind", "images") != "images":
        kind = getattr(dataset, "kind", None)
        raise UserError(f"the run's dataset gives {kind!r} items, not images; pass --images DIR (a folder of images)")
    if len(dataset) == 0:
        raise UserError("the run's dataset is empty; pass --images DIR (a folder of images)")
    indices = spread_indices(len(dataset), settings.num_images)
    items = [dataset[i] for i in indices]
    pixels = torch.stack([torch.as_tensor(np.asarray(image)) for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    return pixels, labels, indices, "run dataset", "dataset labels"


def analyze_run(
    run_path: str | Path,
    settings: AnalysisSettings,
    *,
    out: str | Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    inception_weights: str | None = None,
    registry: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse a run's checkpoint and write ``analysis.json`` and the pictures into ``out`` (default
    ``RUN/analysis/<checkpoint>``); returns the JSON."""
    from repae.fileio import write_json, write_png
    from repae.reporting import progress as progress_bar
    from repae.runs import open_run
    from repae.train.distributed import resolve_device

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    slots = ("tokenizer", "encoders", "latent_norm", "denoiser", "losses", "dataset")
    with progress_bar("analyze: open the run", 1, unit="run", enabled=progress, transient=True) as bar:
        run = open_run(run_path, device=device, use_ema=settings.ema, slots=slots, registry=registry,
                       meta_slots=("losses", "dataset") if settings.images is not None else ("losses",))
        bar.advance(1)
    if run.tokenizer is None:
        raise UserError(f"{run.run_dir}: the recipe has no tokenizer; `repae analyze` measures a tokenizer's latents")
    pixels, labels, indices, source, label_source = _load_images(run, settings)
    depth = settings.depth if settings.depth is not None else run.alignment_depth()
    transport = run.transport()
    encoders = {spec.label: run.components[spec.label] for spec in run.recipe.get("encoders")
                if run.components.get(spec.label) is not None}
    with progress_bar("analyze: latents, reconstructions, features", pixels.shape[0], unit="img", enabled=progress,
                      transient=True) as bar:
        analysis = analyze_batch(
            tokenizer=run.tokenizer, images=pixels, labels=labels, denoiser=run.denoiser, normalizer=run.normalizer,
            transport=transport, encoders=encoders, depth=depth, t=settings.t, k=settings.k, seed=settings.seed,
            batch_size=batch_size, device=device, advance=bar.advance,
        )
    with progress_bar("analyze: rFID (Inception features)", 2 * pixels.shape[0], unit="img", enabled=progress,
                      transient=True) as bar:
        rfid, rfid_reason = _rfid(pixels, analysis.reconstructions, device, inception_weights, advance=bar.advance)
    metrics = analysis.metrics
    folder = Path(out) if out is not None else run.run_dir / "analysis" / run.checkpoint.name
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: str(folder / f"{name}.png") for name in analysis.pictures}
    for name, picture in analysis.pictures.items():
        write_png(picture, folder / f"{name}.png")
    files["analysis"] = str(folder / ANALYSIS_FILE)
    result: dict[str, Any] = {
        "step": run.step,
        "checkpoint": str(run.checkpoint),
        "run": str(run.run_dir),
        "num_images": int(pixels.shape[0]),
        "image_indices": indices,
        "images_per_class": [[c, n] for c, n in sorted(collections.Counter(labels.tolist()).items())],
        "spatial_variance": metrics["spatial_variance"],
        "spatial_variance_per_channel": metrics["spatial_variance_per_channel"],
        "total_variation": metrics["total_variation"],
        "total_variation_per_channel": metrics["total_variation_per_channel"],
        "cknna": metrics["cknna"],
        "cknna_per_encoder": metrics["cknna_per_encoder"],
        "cknna_reason": None if metrics["cknna"] is not None else _cknna_reason(run, encoders, depth, transport,
                                                                                pixels),
        "psnr": metrics["psnr"],
        "rfid": rfid,
        "rfid_reason": rfid_reason,
        "latent_shape": metrics["latent_shape"],
        "settings": {
            **dataclasses.asdict(settings),
            "images_source": source,
            "labels": label_source,
            "latents": "tokenizer posterior mean, un-normalised",
            "reconstruction": "decode(posterior mean), quantised to uint8",
            "cknna_features": "denoiser hidden tokens after block `depth`, mean-pooled per image, vs the encoder's "
                              "tokens mean-pooled per image; cosine kernels",
            "k_used": min(settings.k, max(int(pixels.shape[0]) - 1, 1)),
            "depth_used": depth,
            "transport": repr(transport) if transport is not None else None,
            "batch_size": batch_size,
            "device": device,
        },
        "files": files,
    }
    write_json(folder / ANALYSIS_FILE, result)
    return result


def _cknna_reason(run: OpenedRun, encoders: dict[str, Any], depth: int | None, transport: Any, pixels: Any) -> str:
    if run.denoiser is None:
        return "the recipe has no denoiser"
    if not encoders:
        return "the recipe has no representation encoder"
    if depth is None:
        return "no loss of the recipe reads denoiser features (feature_depths) to take the depth from; pass --depth"
    if transport is None:
        return "no loss of the recipe defines the diffusion process (transport) that noises the latents"
    return f"CKNNA needs at least 3 images, got {pixels.shape[0]}"


def _rfid(pixels: Any, reconstructions: Any, device: str, weights: str | None,
          advance: Callable[[int], None] | None = None) -> tuple[float | None, str | None]:
    """rFID (Inception pool features, Frechet distance; :mod:`repae.evaluate`) of the reconstructions against the
    inputs when the Inception weights are on this machine (never downloaded here); else ``(None, reason)``. Never
    raises: a missing rFID must not fail the analysis."""
    try:
        from repae.evaluate.features import (
            extract_features,
            find_inception_weights,
            load_inception,
        )
        from repae.evaluate.metrics import feature_statistics, frechet_distance
    except Exception as exc:  # noqa: BLE001 - the evaluation package or torch-fidelity may be missing
        return None, f"the evaluation package is not available ({describe_exception(exc)})"
    try:
        try:
            with _no_downloads():
                path = find_inception_weights(weights)
        except UserError as exc:  # found by default: the message would blame HF_HUB_OFFLINE, set by _no_downloads
            if weights is not None:
                return None, first_line(exc)
            return None, ("the Inception weights are not on this machine (repae analyze never downloads them): run "
                          "`repae eval` once where there is network, which caches them, or pass "
                          "--inception-weights FILE")
        extractor = load_inception(path, features=("pool",), device=device)

        def batches(images: Any) -> Any:
            for start in range(0, images.shape[0], 50):
                yield images[start : start + 50].permute(0, 2, 3, 1).contiguous().numpy()

        real = extract_features(batches(pixels), extractor, progress=advance)["pool"]
        fake = extract_features(batches(reconstructions), extractor, progress=advance)["pool"]
        return frechet_distance(*feature_statistics(real), *feature_statistics(fake)), None
    except Exception as exc:  # noqa: BLE001 - rFID is optional: record why it is missing
        return None, first_line(exc) if isinstance(exc, UserError) else describe_exception(exc)



@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Forbid downloads (``HF_HUB_OFFLINE=1``) for the duration: analyze uses only weights already present."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


