"""An example repae plugin: registers the tokenizer ``pixel-shuffle`` and the encoder ``patch-stats``.

This module is what the entry point names. It stays free of torch so that ``repae list`` remains fast; the models
live in :mod:`repae_plugin_example.models` and are imported only when a recipe builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from repae import hookimpl, option


@dataclass(kw_only=True)
class PixelShuffleConfig:
    """Config of the ``pixel-shuffle`` tokenizer."""

    downsample: int = option(4, doc="spatial downsampling factor f (latents are H/f x W/f)")
    latent_channels: int = option(8, doc="channels of the latent")
    width: int = option(16, doc="hidden channels of the 1x1 convolutions")

    def __post_init__(self) -> None:
        if self.downsample < 1:
            raise ValueError("downsample must be >= 1")


@dataclass(kw_only=True)
class PatchStatsConfig:
    """Config of the ``patch-stats`` encoder."""

    patch_size: int = option(8, doc="pixels per patch side")
    embed_dim: int = option(32, doc="output token width")
    seed: int = option(0, doc="seed of the fixed random projection")


@hookimpl
def register_components(register):
    register(
        "tokenizer",
        "pixel-shuffle",
        summary="example: pixel-unshuffle tokenizer with learned 1x1 convolutions",
        config=PixelShuffleConfig,
        factory="repae_plugin_example.models:build_pixel_shuffle",
    )
    register(
        "encoder",
        "patch-stats",
        summary="example: frozen random projection of image patches",
        config=PatchStatsConfig,
        factory="repae_plugin_example.models:build_patch_stats",
    )
