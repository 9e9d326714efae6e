"""The diagonal Gaussian posterior of a KL autoencoder, shared by every tokenizer that encodes to (mean, log-variance).

Source: LDM's ``DiagonalGaussianDistribution`` (Rombach et al., arXiv 2112.10752; ``ldm/modules/distributions``), the
same class diffusers' ``AutoencoderKL`` returns and REPA-E's VAE uses: moments split along channels, log-variance
clamped to ``[-30, 20]``, KL to N(0, I) summed over ``C, h, w``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DiagonalGaussian"]

LOGVAR_RANGE = (-30.0, 20.0)
"""LDM's clamp of the log-variance (nats): ``std`` stays within ``[3.1e-7, 2.2e4]``."""


class DiagonalGaussian:
    """A :class:`repae.Posterior`: a diagonal Gaussian over latents ``[B, C, h, w]``.

    ``moments`` is the encoder's output ``[B, 2C, h, w]``: the mean, then the log-variance along channels (the
    layout of LDM, diffusers and REPA-E); the log-variance is clamped to ``[-30, 20]``. The dtype and device are the
    moments' (float32, or the autocast dtype). Moments that are not 4-D or have an odd channel count are a
    :class:`ValueError`.

    Attributes: ``mean``, ``logvar`` (clamped), ``std = exp(logvar / 2)``, ``var = exp(logvar)``, each ``[B, C, h, w]``.
    """

    def __init__(self, moments: Tensor) -> None:
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"DiagonalGaussian takes moments [B, 2C, h, w] (mean, then log-variance); got shape "
                             f"{tuple(moments.shape)}")
        mean, logvar = moments.chunk(2, dim=1)
        self.mean: Tensor = mean
        self.logvar: Tensor = logvar.clamp(*LOGVAR_RANGE)
        self.std: Tensor = torch.exp(0.5 * self.logvar)
        self.var: Tensor = torch.exp(self.logvar)

    def sample(self, eps: Tensor | None = None, *, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps`` ``[B, C, h, w]``; ``eps`` is drawn from N(0, I) (with ``generator`` if given) when
        not passed (the trainer always passes it, for reproducible steps)."""
        if eps is None:
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean ``[B, C, h, w]``."""
        return self.mean

    def kl(self) -> Tensor:
        """KL divergence to N(0, I) in nats, summed over ``C, h, w``: ``[B]``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype})"
