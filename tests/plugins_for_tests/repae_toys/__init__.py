"""Toy components for the core's tests, registered through a real (temporary) entry point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from repae import LossConfig, hookimpl, option


@dataclass(kw_only=True)
class ToyVAEConfig:
    latent_channels: int = option(4, doc="latent channels")
    downsample: int = option(2, doc="spatial downsampling")


@dataclass(kw_only=True)
class ToyDenoiserConfig:
    size: str = option("small", doc="preset")
    depth: int = option(2, doc="blocks")
    width: int = option(16, doc="hidden width [/not-markup]")
    in_channels: int | None = option(None, doc="null: the tokenizer's latent_channels")
    activation: Literal["silu", "gelu"] = option("silu", doc="activation")
    dropout: float = option(0.0, doc="dropout")
    encoder_dims: list[int] | None = option(None, doc="null: from the encoders")


@dataclass(kw_only=True)
class ToyEncoderConfig:
    embed_dim: int = option(8, doc="token width")


@dataclass(kw_only=True)
class ToyLossConfig(LossConfig):
    pass


@dataclass(kw_only=True)
class ToyDataConfig:
    root: str = option(doc="required: where the data lives")
    resolution: int = option(32, doc="image size")


TOY_DENOISER_PRESETS = {"small": {"depth": 2, "width": 16}, "big": {"depth": 12, "width": 768}}


@hookimpl
def register_components(register):
    register("tokenizer", "toy-vae", summary="toy tokenizer", config=ToyVAEConfig,
             factory="repae_toys.models:build_vae")
    register("denoiser", "toy-dit", summary="toy denoiser", config=ToyDenoiserConfig,
             factory="repae_toys.models:build_denoiser", presets=TOY_DENOISER_PRESETS)
    register("encoder", "toy-enc", summary="toy encoder", config=ToyEncoderConfig,
             factory="repae_toys.models:build_encoder")
    register("loss", "toy-loss", summary="toy loss", config=ToyLossConfig, factory="repae_toys.models:build_loss")
    register("dataset", "toy-data", summary="toy dataset", config=ToyDataConfig,
             factory="repae_toys.models:build_data")
