"""KL autoencoders (LDM layout) as repae tokenizers: ``sd-vae``, ``in-vae`` and ``va-vae``.

This module only declares configs and presets and registers them; it imports no torch. The model lives in
:mod:`repae_vae.autoencoder`, the diffusers key conversion in :mod:`repae_vae.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass

from repae import FieldError, architecture_mismatch, hookimpl, option, release_of_source

__all__ = ["KLVAEConfig", "SDVAEConfig", "INVAEConfig", "VAVAEConfig", "F8D4", "F16D32", "TINY"]

_WEIGHTS_DOC = (
    "checkpoint: local file or folder, or hf://org/repo[/file]; LDM (REPA-E .pt) or diffusers AutoencoderKL layout; "
    "null = random init"
)
_STATS_DOC = (
    "per-channel latent statistics (*-latents-stats.pt, LightningDiT latents_stats.pt or a diffusers config.json): "
    "'auto' = look next to the weights, null = none, else a local path or hf:// source"
)


@dataclass(kw_only=True)
class KLVAEConfig:
    """Architecture and weights of an LDM-style KL autoencoder (defaults: the SD-VAE f8d4)."""

    EXPORT_FORMATS = ("diffusers", "ldm")
    """`repae export`'s formats (the built component's ``export_formats``), declared to be checked before building."""

    size: str = option("f8d4", doc="preset: f8d4 (SD-VAE), f16d32 (IN-VAE, VA-VAE) or tiny (tests, quickstart)")
    latent_channels: int = option(4, doc="latent channels (LDM embed_dim = z_channels)")
    ch: int = option(128, doc="base channel width")
    ch_mult: list[int] = option(
        default_factory=lambda: [1, 2, 4, 4], doc="width multiplier per level; f = 2^(levels-1)"
    )
    num_res_blocks: int = option(2, doc="residual blocks per encoder level (the decoder has one more per level)")
    attn_resolutions: list[int] = option(
        default_factory=lambda: [16], doc="levels whose feature size at `resolution` is listed get self-attention"
    )
    resolution: int = option(256, doc="nominal image size that places the attention levels (inputs may be any size)")
    norm_groups: int = option(32, doc="GroupNorm groups (32 in every released VAE)")
    weights: str | None = option(None, doc=_WEIGHTS_DOC)
    weights_key: str | None = option(
        None, doc="entry of a checkpoint dict holding the VAE, e.g. 'vae' in a REPA-E training checkpoint"
    )
    latent_stats: str | None = option("auto", doc=_STATS_DOC)
    strict: bool = option(
        True, doc="false: ignore unexpected keys (e.g. VA-VAE's VF-loss projection); missing keys always fail"
    )

    def __post_init__(self) -> None:
        for name in ("latent_channels", "ch", "num_res_blocks", "resolution", "norm_groups"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult:
            raise FieldError("ch_mult", "must list at least one level's width multiplier, e.g. [1, 2, 4, 4]")
        if any(m < 1 for m in self.ch_mult):
            raise FieldError("ch_mult", f"must be >= 1 each, got {self.ch_mult}")
        if any(r < 1 for r in self.attn_resolutions):
            raise FieldError("attn_resolutions", f"must be >= 1 each, got {self.attn_resolutions}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise FieldError("norm_groups", f"{self.norm_groups} does not divide the channel widths {bad} (ch x "
                             "ch_mult): GroupNorm splits the channels into equal groups")
        from repae_vae.releases import ARCHITECTURE_FIELDS, RELEASES, SHAPE_FREE_FIELDS, compared_fields

        release = release_of_source(self.weights, RELEASES)  # weights naming a release: its architecture, each field
        if release is not None:
            problem = architecture_mismatch(vars(self), release.architecture, preset=release.preset,
                                            fields=compared_fields(vars(self), release.architecture,
                                                                   ARCHITECTURE_FIELDS),
                                            shape_free=SHAPE_FREE_FIELDS,
                                            what=f"the {release.name} release ({self.weights})")
            if problem is not None:
                raise FieldError(problem.field, problem.message)


@dataclass(kw_only=True)
class SDVAEConfig(KLVAEConfig):
    """The SD-VAE (f8, 4 latent channels) of Stable Diffusion, REPA and REPA-E."""


@dataclass(kw_only=True)
class INVAEConfig(KLVAEConfig):
    """REPA-E's IN-VAE: f16, 32 latent channels, trained on ImageNet."""

    size: str = option("f16d32", doc="preset: f16d32 (IN-VAE, VA-VAE), f8d4 (SD-VAE) or tiny (tests, quickstart)")
    latent_channels: int = option(32, doc="latent channels (LDM embed_dim = z_channels)")
    ch_mult: list[int] = option(
        default_factory=lambda: [1, 1, 2, 2, 4], doc="width multiplier per level; f = 2^(levels-1)"
    )


@dataclass(kw_only=True)
class VAVAEConfig(INVAEConfig):
    """LightningDiT's VA-VAE (f16d32, aligned to DINOv2 while training); same architecture as the IN-VAE."""


# Presets: field values, torch-free. Channel widths are ch * ch_mult; attention sits where the feature map of a
# `resolution`-sized image has a size listed in attn_resolutions (plus the middle block, always).
F8D4 = {
    "latent_channels": 4,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "resolution": 256,
    "norm_groups": 32,
}
F16D32 = {**F8D4, "latent_channels": 32, "ch_mult": [1, 1, 2, 2, 4]}
TINY = {
    "latent_channels": 4,
    "ch": 8,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "resolution": 32,
    "norm_groups": 4,
}
PRESETS = {"f8d4": F8D4, "f16d32": F16D32, "tiny": TINY}

_FACTORY = "repae_vae.autoencoder:build_kl_vae"


@hookimpl
def register_components(register) -> None:
    """Register the three KL-VAE tokenizers (one architecture, different defaults)."""
    register(
        "tokenizer",
        "sd-vae",
        summary="SD-VAE: LDM KL autoencoder, f8, 4 latent channels (REPA-E sdvae, sd-vae-ft-ema/mse)",
        config=SDVAEConfig,
        factory=_FACTORY,
        presets=PRESETS,
    )
    register(
        "tokenizer",
        "in-vae",
        summary="IN-VAE: LDM KL autoencoder, f16, 32 latent channels, trained on ImageNet (REPA-E invae)",
        config=INVAEConfig,
        factory=_FACTORY,
        presets=PRESETS,
    )
    register(
        "tokenizer",
        "va-vae",
        summary="VA-VAE: LDM KL autoencoder, f16, 32 latent channels, DINOv2-aligned (LightningDiT, REPA-E vavae)",
        config=VAVAEConfig,
        factory=_FACTORY,
        presets=PRESETS,
    )
