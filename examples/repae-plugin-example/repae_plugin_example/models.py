"""The example plugin's models. Imported only when a recipe builds them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repae_plugin_example import PatchStatsConfig, PixelShuffleConfig


class GaussianPosterior:
    """A diagonal Gaussian posterior (mean, logvar)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        eps = torch.randn_like(self.mean) if eps is None else eps
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class PixelShuffleTokenizer(nn.Module):
    """Pixel-unshuffle by ``f``, then 1x1 convolutions to (mean, logvar); the decoder mirrors it."""

    def __init__(self, config: PixelShuffleConfig) -> None:
        super().__init__()
        f, c = config.downsample, config.latent_channels
        self.downsample, self.latent_channels = f, c
        self.encoder = nn.Sequential(nn.Conv2d(3 * f * f, config.width, 1), nn.SiLU(), nn.Conv2d(config.width, 2 * c, 1))
        self.decoder = nn.Sequential(nn.Conv2d(c, config.width, 1), nn.SiLU(), nn.Conv2d(config.width, 3 * f * f, 1))

    def encode(self, images: torch.Tensor) -> GaussianPosterior:
        mean, logvar = self.encoder(F.pixel_unshuffle(images, self.downsample)).chunk(2, dim=1)
        return GaussianPosterior(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.decoder(z), self.downsample)


class PatchStatsEncoder(nn.Module):
    """Frozen: normalise uint8 images to [-1, 1], cut patches, project them with a fixed random matrix."""

    def __init__(self, config: PatchStatsConfig) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = config.patch_size, config.embed_dim
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        weight = torch.randn(config.embed_dim, 3 * config.patch_size**2, generator=generator)
        self.proj = nn.Linear(3 * config.patch_size**2, config.embed_dim, bias=False)
        if self.proj.weight.device.type != "meta":
            with torch.no_grad():
                self.proj.weight.copy_(weight / weight.shape[1] ** 0.5)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PatchStatsEncoder:
        return super().train(False)  # always frozen

    def num_tokens(self, resolution: int) -> int:
        return (resolution // self.patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        patches = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)
        return self.proj(patches)


def build_pixel_shuffle(config: PixelShuffleConfig, context) -> PixelShuffleTokenizer:
    return PixelShuffleTokenizer(config)


def build_patch_stats(config: PatchStatsConfig, context) -> PatchStatsEncoder:
    return PatchStatsEncoder(config)
