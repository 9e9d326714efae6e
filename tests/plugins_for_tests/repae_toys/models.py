"""Factories of the toy components; every call is recorded in CALLS (config type, context keys)."""

from __future__ import annotations

from torch import nn

CALLS: list[tuple[str, object, object]] = []


class Holder(nn.Module):
    def __init__(self, config, *sizes: int) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))


def build_vae(config, context):
    CALLS.append(("tokenizer", config, context))
    module = Holder(config, 3, config.latent_channels)
    module.latent_channels, module.downsample = config.latent_channels, config.downsample
    return module


def build_denoiser(config, context):
    CALLS.append(("denoiser", config, context))
    in_channels = config.in_channels or context.built["tokenizer"].latent_channels
    return Holder(config, in_channels, *[config.width] * config.depth)


def build_encoder(config, context):
    CALLS.append(("encoder", config, context))
    module = Holder(config, 3, config.embed_dim)
    module.embed_dim = config.embed_dim
    return module.requires_grad_(False)


def build_loss(config, context):
    CALLS.append(("loss", config, context))
    return config


def build_data(config, context):
    CALLS.append(("dataset", config, context))
    if config.root == "reject-me":
        raise ValueError("root 'reject-me' does not exist")
    return config
