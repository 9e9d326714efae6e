"""An example repae plugin: registers the tokenizer ``pixel-shuffle``, the encoder ``patch-stats``, the loss
``variance-floor``, the sampler ``midpoint`` and the tracker ``run-summary``.

This module is what the entry point names. It stays free of torch so that ``repae list`` remains fast; the
implementations live in :mod:`repae_plugin_example.models` (and ``.tracker``) and are imported only when a recipe
builds them. Like every
plugin it imports only the public names of ``repae``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from repae import FieldError, LossConfig, hookimpl, option


@dataclass(kw_only=True)
class PixelShuffleConfig:
    """Config of the ``pixel-shuffle`` tokenizer."""

    downsample: int = option(4, doc="spatial downsampling factor f (latents are H/f x W/f)")
    latent_channels: int = option(8, doc="channels of the latent")
    width: int = option(16, doc="hidden channels of the 1x1 convolutions")

    def __post_init__(self) -> None:
        if self.downsample < 1:
            raise FieldError("downsample", f"must be >= 1, got {self.downsample}")


@dataclass(kw_only=True)
class PatchStatsConfig:
    """Config of the ``patch-stats`` encoder."""

    patch_size: int = option(8, doc="pixels per patch side")
    embed_dim: int = option(32, doc="output token width")
    seed: int = option(0, doc="seed of the fixed random projection")


@dataclass(kw_only=True)
class VarianceFloorConfig(LossConfig):
    """Config of the ``variance-floor`` loss: ``mean over channels of relu(floor - spatial std of z)``.

    REPA-E observes that back-propagating the diffusion loss into the tokenizer collapses the latent space (its
    spatial variance goes to zero). This regulariser keeps every latent channel's spatial standard deviation above
    ``floor``; it reads the tokenizer's latents ``z`` and, by default, updates the tokenizer only.
    """

    updates: list[str] = option(default_factory=lambda: ["tokenizer"],
                                doc="trainable parts this loss's gradient may update (the tokenizer)")
    floor: float = option(0.5, doc="smallest spatial standard deviation per latent channel that costs nothing")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.floor <= 0:
            raise FieldError("floor", f"must be > 0, got {self.floor}")


@dataclass(kw_only=True)
class MidpointConfig:
    """Config of the ``midpoint`` sampler (explicit midpoint rule, two model calls per step, four where guided)."""

    steps: int = option(8, doc="intervals of linspace(1, 0, steps + 1)")
    cfg_scale: float = option(1.0, doc="classifier-free guidance scale s: v = v_null + s (v - v_null); 1 = none")
    guidance_low: float = option(0.0, doc="guide only at times t >= guidance_low (t = 1 is noise)")
    guidance_high: float = option(1.0, doc="guide only at times t <= guidance_high")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FieldError("steps", f"must be >= 1, got {self.steps}")
        if self.guidance_low > self.guidance_high:
            raise FieldError("guidance_low", f"{self.guidance_low} is above guidance_high {self.guidance_high}")


@dataclass(kw_only=True)
class RunSummaryConfig:
    """Config of the ``run-summary`` tracker."""

    file: str = option("summary.json", doc="JSON file in the run directory: last step, its values, sample grids")
    keys: list[str] = option(default_factory=list, doc="only these keys of metrics.jsonl (empty: every key)")

    def __post_init__(self) -> None:
        if not self.file.strip() or "/" in self.file:
            raise FieldError("file", f"must be a file name in the run directory, got {self.file!r}")


@hookimpl
def register_components(register: Any) -> None:
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
    register(
        "loss",
        "variance-floor",
        summary="example: keeps each latent channel's spatial std above a floor (against latent collapse)",
        config=VarianceFloorConfig,
        factory="repae_plugin_example.models:build_variance_floor",
    )
    register(
        "sampler",
        "midpoint",
        summary="example: explicit-midpoint ODE sampler for flow matching (t = 1 noise), with CFG",
        config=MidpointConfig,
        factory="repae_plugin_example.models:build_midpoint",
    )
    register(
        "tracker",
        "run-summary",
        summary="example: RUN_DIR/summary.json with the last step's values and the sample grids",
        config=RunSummaryConfig,
        factory="repae_plugin_example.tracker:build_run_summary",
    )
