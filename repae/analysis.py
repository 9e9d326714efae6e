"""Latent-space diagnostics of the paper (Table 1): spatial variance and total variation of latents.

Both take latents ``[B, C, H, W]`` (the tokenizer posterior's mean, un-normalised) and return a per-image value
averaged over the batch. A latent space collapsed by the diffusion loss (REPA-E without the stop-gradient) has both
near zero: a constant latent is trivially easy to denoise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["spatial_variance", "total_variation"]


def spatial_variance(z: Tensor) -> float:
    """Variance over spatial positions, per channel, averaged over channels and images."""
    return z.float().var(dim=(2, 3)).mean().item()


def total_variation(z: Tensor) -> float:
    """Sum of absolute differences between vertically and horizontally adjacent latent pixels over all channels,
    averaged over images (anisotropic total variation)."""
    z = z.float()
    vertical = (z[:, :, 1:, :] - z[:, :, :-1, :]).abs().sum(dim=(1, 2, 3))
    horizontal = (z[:, :, :, 1:] - z[:, :, :, :-1]).abs().sum(dim=(1, 2, 3))
    return (vertical + horizontal).mean().item()
