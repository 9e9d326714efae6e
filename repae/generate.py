"""Generating images from a trained run: labels, per-sample noise, sampling, de-normalising and decoding.

The pieces ``repae sample`` (and the in-training sample grids) are built from:

- :func:`class_balanced_labels` / :func:`random_labels`: the label of every sample index, from a seed;
- :func:`sample_generator`: the random stream of sample ``i`` (its initial noise, then its sampler's draws), seeded
  by ``(seed, i)`` only, so a sample is the same whichever process or batch makes it;
- :func:`decode_latents`: sampler output -> ``uint8`` images (de-normalise, decode, clamp, round);
- :func:`generate`: batches of sample indices -> ``(indices, uint8 images)``.

torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from repae.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "LABEL_MODES",
    "class_balanced_labels",
    "decode_latents",
    "generate",
    "make_labels",
    "random_labels",
    "sample_generator",
    "to_uint8",
]

LABEL_MODES = ("balanced", "random")


def class_balanced_labels(num: int, num_classes: int, *, seed: int) -> Tensor:
    """``num`` labels with every class equally often, in a seeded random order (int64 ``[num]``).

    The multiset is ``[0, 1, ..., C-1, 0, 1, ...]`` cut at ``num`` (``arange(num) % C``), so when ``num`` is not a
    multiple of ``C`` the first ``num % C`` classes get one sample more; it is then shuffled by
    ``torch.randperm(num)`` with a CPU generator seeded with ``seed`` (REPA-E's ``--label-sampling equal``: one global
    permutation, 50 per class for 50,000 ImageNet samples).
    """
    import torch

    _check_counts(num, num_classes)
    labels = torch.arange(num, dtype=torch.long) % num_classes
    order = torch.randperm(num, generator=torch.Generator().manual_seed(int(seed)))
    return labels[order]


def random_labels(num: int, num_classes: int, *, seed: int) -> Tensor:
    """``num`` labels drawn uniformly and independently (``torch.randint`` with a CPU generator seeded ``seed``)."""
    import torch

    _check_counts(num, num_classes)
    return torch.randint(0, num_classes, (num,), generator=torch.Generator().manual_seed(int(seed)))


def make_labels(num: int, num_classes: int, *, mode: str = "balanced", seed: int = 0) -> Tensor:
    """Labels by ``mode``: ``balanced`` (:func:`class_balanced_labels`) or ``random`` (:func:`random_labels`)."""
    if mode == "balanced":
        return class_balanced_labels(num, num_classes, seed=seed)
    if mode == "random":
        return random_labels(num, num_classes, seed=seed)
    raise UserError(f"unknown label mode {mode!r}; use one of: {', '.join(LABEL_MODES)}")


def _check_counts(num: int, num_classes: int) -> None:
    if num < 0:
        raise UserError(f"the number of samples must be >= 0, got {num}")
    if num_classes < 1:
        raise UserError(f"the number of classes must be >= 1, got {num_classes}")


def _stream_base(seed: int) -> int:
    """A 32-bit offset from the seed (first 4 bytes of sha256 of ``"repae-sample:<seed>"``)."""
    digest = hashlib.sha256(f"repae-sample:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index``: seeded with ``(H(seed) + index) mod 2**32``.

    torch's CPU generator uses 32 bits of its seed; adding the index to a hashed base gives every index of one seed
    its own stream (for up to 2**32 samples) and spreads different seeds apart. The stream gives the sample's
    initial noise first, then the draws of a stochastic sampler.
    """
    import torch

    return torch.Generator().manual_seed((_stream_base(seed) + int(index)) % 2**32)


def to_uint8(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` to ``uint8``: ``round((clamp(x, -1, 1) + 1) * 127.5)`` (float32; ties to even).

    So -1 -> 0, 0 -> 128 (127.5 rounds to even), 1 -> 255. DiT/SiT compute ``clamp(127.5 x + 128, 0, 255)`` and
    truncate, which is the same up to ties; REPA truncates ``255 (x + 1) / 2`` (half a level darker on average).
    """
    import torch

    x = images.detach().to(torch.float32).clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8)


def decode_latents(tokenizer: Any, normalizer: Any, latents: Tensor) -> Tensor:
    """Sampler output (normalised latents ``[N, C, h, w]``) to ``uint8`` images ``[N, 3, H, W]`` on the same device.

    1. ``normalizer.denormalize(latents)`` when there is a normaliser (REPA-E: the EMA BatchNorm's running
       statistics, ``x * sqrt(running_var) + running_mean``); the latents are cast to float32 first;
    2. ``tokenizer.decode`` in eval mode (restored afterwards) without gradients;
    3. :func:`to_uint8`: clamp to ``[-1, 1]``, ``round((x + 1) * 127.5)``.
    """
    import torch

    with torch.no_grad():
        z = latents.to(torch.float32)
        if normalizer is not None:
            z = normalizer.denormalize(z)
        training = bool(getattr(tokenizer, "training", False))
        if training:
            tokenizer.eval()
        try:
            images = tokenizer.decode(z)
        finally:
            if training:
                tokenizer.train(True)
    return to_uint8(images)


def initial_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """One float32 standard normal draw of ``shape`` per generator, stacked ``[len(generators), *shape]`` (CPU)."""
    import torch

    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])


def generate(
    run: Any,
    labels: Tensor | Sequence[int],
    *,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    sampler: Any = None,
    cfg_scale: float | None = None,
    guidance: tuple[float, float] | None = None,
    batch_size: int = 64,
    device: Any = None,
) -> Iterator[tuple[list[int], Tensor]]:
    """Sample and decode ``indices`` (default: all of ``labels``) of an opened run, ``batch_size`` at a time.

    ``labels[i]`` is the class of sample ``i``; sample ``i`` draws its noise from :func:`sample_generator(seed, i)
    <sample_generator>` (its initial latent noise, then the sampler's draws), so its result does not depend on the
    other samples of its batch. ``sampler`` defaults to the run's recipe sampler; ``cfg_scale`` / ``guidance``
    override its config for these calls. ``device`` defaults to the denoiser's. ``run`` is an
    :class:`repae.runs.OpenedRun` (or anything with ``denoiser``, ``tokenizer``, ``normalizer``, ``sampler`` and
    ``latent_shape()``). Yields ``(batch indices, uint8 images [b, 3, H, W] on the CPU)``.
    """
    import torch

    sampler = sampler if sampler is not None else run.sampler
    if sampler is None:
        raise UserError("the run's recipe names no sampler; pass one (e.g. --sampler euler-maruyama for SiT, "
                        "--sampler ddpm for DiT)")
    if run.tokenizer is None:
        raise UserError("the run has no tokenizer to decode samples with")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    denoiser = run.denoiser
    if device is None:
        param = next(iter(denoiser.parameters()), None) if hasattr(denoiser, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    labels = torch.as_tensor(labels, dtype=torch.long)
    order = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    shape = run.latent_shape()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        generators = [sample_generator(seed, i) for i in batch]
        noise = initial_noise(generators, shape).to(device)
        y = labels[batch].to(device)
        latents = sampler(denoiser, noise, y, cfg_scale=cfg_scale, guidance=guidance, generator=generators)
        yield batch, decode_latents(run.tokenizer, run.normalizer, latents).cpu()
