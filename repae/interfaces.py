"""The interfaces components implement, by kind.

These are structural (``typing.Protocol``): a third-party component needs no base class, only these attributes and
methods. Tensors are ``torch.Tensor``; torch is imported only for type checking so that importing this module stays
cheap.

Conventions shared by every implementation:

- images given to a tokenizer are float ``[B, 3, H, W]`` in ``[-1, 1]``; images given to a representation encoder are
  raw ``uint8`` ``[B, 3, H, W]`` (the encoder owns its preprocessing);
- diffusion time ``t`` is continuous in ``[0, 1]`` with ``t = 1`` pure noise (REPA-E / SiT convention); a denoiser
  trained on integer DDPM steps (DiT) documents its own mapping;
- the null class for classifier-free guidance is ``num_classes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "Denoiser",
    "DenoiserOutput",
    "LatentNormalizer",
    "Posterior",
    "RepresentationEncoder",
    "Tokenizer",
    "Transport",
]


@runtime_checkable
class Posterior(Protocol):
    """A diagonal Gaussian over latents."""

    mean: Tensor
    logvar: Tensor
    std: Tensor

    def sample(self, eps: Tensor | None = None) -> Tensor:
        """``mean + std * eps``; ``eps`` drawn from N(0, I) when not given (inject it for reproducible steps)."""
        ...

    def mode(self) -> Tensor:
        """The mean."""
        ...

    def kl(self) -> Tensor:
        """KL divergence to N(0, I), summed over C, H, W: shape ``[B]``."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """Image <-> latent autoencoder."""

    latent_channels: int
    downsample: int

    def encode(self, images: Tensor) -> Posterior:
        """Images in ``[-1, 1]`` to a posterior over latents of shape ``[B, latent_channels, H/f, W/f]``."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Latents to images in (roughly) ``[-1, 1]``."""
        ...


@dataclass
class DenoiserOutput:
    """What a denoiser returns: its prediction and the hidden tokens at the requested depths.

    ``prediction`` is ``None`` when the forward pass stopped early (``features_only=True``).
    ``hidden`` maps a 1-based block depth to tokens ``[B, N, hidden_size]`` (the output of that block).
    """

    prediction: Tensor | None
    hidden: Mapping[int, Tensor] = field(default_factory=dict)


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion transformer over latents."""

    hidden_size: int
    num_classes: int
    class_dropout_prob: float
    """Label-dropout probability in training; > 0 means the label table has the null row (index ``num_classes``)."""

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        feature_depths: Sequence[int] = (),
        features_only: bool = False,
        force_drop: Tensor | None = None,
    ) -> DenoiserOutput:
        """Predict from noisy latents ``x`` at times ``t`` (shape ``[B]``) with labels ``y`` (``num_classes`` =
        null). Hidden tokens after each block in ``feature_depths`` are returned; with ``features_only`` the pass
        stops after the deepest of them. ``force_drop`` (bool ``[B]``) replaces those labels by the null class and,
        when given, replaces the denoiser's own random label dropout (the trainer injects it for exact steps)."""
        ...

    def project(self, hidden: Tensor) -> list[Tensor]:
        """Apply the REPA projector MLPs (one per target encoder) to hidden tokens ``[B, N, hidden_size]``."""
        ...


@runtime_checkable
class RepresentationEncoder(Protocol):
    """A frozen encoder giving patch tokens as REPA alignment targets."""

    embed_dim: int

    def forward(self, images: Tensor) -> Tensor:
        """Raw ``uint8`` images ``[B, 3, H, W]`` to patch tokens ``[B, N, embed_dim]`` (CLS/registers dropped)."""
        ...

    def num_tokens(self, resolution: int) -> int:
        """How many patch tokens an image of ``resolution`` x ``resolution`` pixels gives."""
        ...


@runtime_checkable
class LatentNormalizer(Protocol):
    """Maps tokenizer latents to the denoiser's space and back (an ``nn.Module``; ``forward`` = ``normalize``).

    A normaliser with running statistics (the REPA-E BatchNorm) uses batch statistics and updates them in training
    mode and uses its running statistics in eval mode; under ``torch.distributed`` the batch statistics are those of
    the global batch.
    """

    def normalize(self, z: Tensor) -> Tensor:
        """Tokenizer latents ``[B, C, h, w]`` to the denoiser's space."""
        ...

    def denormalize(self, x: Tensor) -> Tensor:
        """The inverse, with the current (running) statistics: what samples pass through before decoding."""
        ...


@runtime_checkable
class Transport(Protocol):
    """The forward process a diffusion objective trains on: time sampling, noising, and the regression target."""

    def sample_time(self, batch: int, *, generator: torch.Generator) -> Tensor:
        """Times for a batch, shape ``[batch]`` (drawn on CPU from ``generator``)."""
        ...

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The noisy input ``x_t`` (``t`` has shape ``[B]``)."""
        ...

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser regresses (velocity for flow matching, noise for DDPM)."""
        ...

    def model_time(self, t: Tensor) -> Tensor:
        """The time the denoiser receives (SiT: ``t`` itself; DiT: the DDPM step index)."""
        ...
