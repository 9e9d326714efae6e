"""Factories of the toy components; every call is recorded in CALLS (config type, context keys).

The components implement their kinds' contracts (repae.interfaces) in the smallest way, so that recipes of them pass
`repae recipe validate`; the loss is a repae.Loss that reads nothing."""

from __future__ import annotations

import torch
from torch import nn

import repae

CALLS: list[tuple[str, object, object]] = []


class Holder(nn.Module):
    def __init__(self, config, *sizes: int) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))


class ToyPosterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean, self.logvar, self.std = mean, torch.zeros_like(mean), torch.ones_like(mean)

    def sample(self, eps=None):
        return self.mean if eps is None else self.mean + eps

    def mode(self):
        return self.mean

    def kl(self):
        return 0.5 * self.mean.square().flatten(1).sum(1)


class ToyVAE(Holder):
    def encode(self, images):
        f = self.downsample
        pooled = nn.functional.avg_pool2d(images, f)
        return ToyPosterior(pooled.mean(1, keepdim=True).expand(-1, self.latent_channels, -1, -1))

    def decode(self, z):
        return nn.functional.interpolate(z[:, :3], scale_factor=self.downsample)


class ToyDenoiser(Holder):
    num_classes = 10
    class_dropout_prob = 0.0
    input_size = 4

    def forward(self, x, t, y, *, feature_depths=(), features_only=False, force_drop=None):
        return repae.DenoiserOutput(x, {})

    def project(self, hidden):
        return []


class ToyEncoder(Holder):
    def num_tokens(self, resolution: int) -> int:
        return (resolution // 8) ** 2

    def forward(self, images):
        return torch.zeros(images.shape[0], self.num_tokens(images.shape[-1]), self.embed_dim)


class ToyLoss(repae.Loss):
    def forward(self, ctx):
        return {"loss": ctx.labels.float().mean()}


class ToyData:
    kind = "images"
    num_classes = 10
    latent_shape = None

    def __init__(self, config) -> None:
        self.config, self.resolution = config, config.resolution

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index):
        raise IndexError(index)

    def set_epoch(self, epoch: int) -> None:
        pass


def build_vae(config, context):
    CALLS.append(("tokenizer", config, context))
    module = ToyVAE(config, 3, config.latent_channels)
    module.latent_channels, module.downsample = config.latent_channels, config.downsample
    return module


def build_denoiser(config, context):
    CALLS.append(("denoiser", config, context))
    in_channels = config.in_channels or context.built["tokenizer"].latent_channels
    module = ToyDenoiser(config, in_channels, *[config.width] * config.depth)
    module.in_channels, module.hidden_size, module.depth = in_channels, config.width, config.depth
    module.num_tokens, module.encoder_dims = 16, list(config.encoder_dims or [])
    shape = context.latent_shape()
    module.input_size = shape[1] if shape else 4
    return module


def build_encoder(config, context):
    CALLS.append(("encoder", config, context))
    module = ToyEncoder(config, 3, config.embed_dim)
    module.embed_dim = config.embed_dim
    return module.requires_grad_(False)


def build_loss(config, context):
    CALLS.append(("loss", config, context))
    return ToyLoss(config)


def build_data(config, context):
    CALLS.append(("dataset", config, context))
    if config.root == "reject-me":
        raise ValueError("root 'reject-me' does not exist")
    return ToyData(config)
