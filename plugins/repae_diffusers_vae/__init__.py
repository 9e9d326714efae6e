"""diffusers VAEs as a repae tokenizer: ``diffusers-vae`` wraps diffusers' ``AutoencoderKL`` (SD-VAE, SDXL, FLUX-VAE,
SD3.5-VAE) and ``AutoencoderKLQwenImage`` (Qwen-Image-VAE, a video VAE used here on single frames).

This module only declares the config and the presets and registers them; it imports neither torch nor diffusers
(diffusers is the optional extra ``repae[diffusers]``, needed when the tokenizer is built). The model lives in
:mod:`repae_diffusers_vae.model`.

A preset (``size``) is the diffusers config (``config.json`` content) of a released VAE: it is what the tokenizer is
built from when no weights are read (dry runs on ``meta``, random initialisation), and what the ``config.json`` of the
weights must agree with when they are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from repae import FieldError, Release, architecture_mismatch, did_you_mean, hookimpl, option, release_of_source

__all__ = ["ARCHITECTURE_KEYS", "NOT_COMPARED", "PRESETS", "RELEASES", "STATISTICS_KEYS", "DiffusersVAEConfig",
           "compared_keys", "merged_architecture", "recipe_fields"]

ArchitectureValue = int | float | bool | str | None | list[int] | list[float] | list[bool] | list[str]
"""A value of a diffusers config key, as a recipe can hold it."""

ModelClass = Literal["AutoencoderKL", "AutoencoderKLQwenImage"]

# The constructor arguments of each diffusers class that repae accepts in `architecture` (diffusers 0.3x-0.4x).
ARCHITECTURE_KEYS: dict[str, tuple[str, ...]] = {
    "AutoencoderKL": (
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
        "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor",
        "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
        "mid_block_add_attention",
    ),
    "AutoencoderKLQwenImage": (
        "base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout",
        "input_channels", "latents_mean", "latents_std",
    ),
}
STATISTICS_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
"""Keys that describe the latent distribution, not the network: the weights' ``config.json`` supplies them."""
NOT_COMPARED = ("sample_size", "force_upcast")
"""Config keys that change no computation of ``encode``/``decode`` (tiling size, upcasting advice to pipelines)."""
SHAPE_FREE_KEYS = ("act_fn", "norm_num_groups", "dropout")
"""Architecture keys that change no parameter shape: weights load into either value without an error."""

_KL = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
}
# black-forest-labs/FLUX.1-dev vae/config.json: 16 channels, no quant convs, latents (z - 0.1159) * 0.3611.
FLUX = {**_KL, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False}
# stabilityai/stable-diffusion-3.5-large vae/config.json: the FLUX layout with its own shift and scale.
SD35 = {**FLUX, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# stabilityai/sd-vae-ft-mse / sd-vae-ft-ema (SD 1.x/2.x, REPA, REPA-E's starting SD-VAE): 4 channels, 0.18215.
SD = {**_KL, "latent_channels": 4, "sample_size": 256, "scaling_factor": 0.18215, "shift_factor": None,
      "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json: the SD layout, scale 0.13025.
SDXL = {**SD, "sample_size": 1024, "scaling_factor": 0.13025}
# Qwen/Qwen-Image vae/config.json (= diffusers' AutoencoderKLQwenImage defaults): per-channel latent statistics.
QWEN_IMAGE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "input_channels": 3,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.916],
}

# Tests and quick experiments: the FLUX layout (16 channels, no quant convs, its shift and scale) and the Qwen-Image
# one, narrowed to widths 8-16 and downsampling by 4 (random weights; no release).
TINY = {**FLUX, "block_out_channels": [8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32}
TINY_QWEN_IMAGE = {**QWEN_IMAGE, "base_dim": 8, "dim_mult": [1, 2, 2], "num_res_blocks": 1,
                   "temperal_downsample": [False, True]}

PRESETS: dict[str, dict[str, Any]] = {
    "flux": {"model_class": "AutoencoderKL", "architecture": FLUX},
    "sd3.5": {"model_class": "AutoencoderKL", "architecture": SD35},
    "sd": {"model_class": "AutoencoderKL", "architecture": SD},
    "sdxl": {"model_class": "AutoencoderKL", "architecture": SDXL},
    "qwen-image": {"model_class": "AutoencoderKLQwenImage", "architecture": QWEN_IMAGE},
    "tiny": {"model_class": "AutoencoderKL", "architecture": TINY},
    "tiny-qwen-image": {"model_class": "AutoencoderKLQwenImage", "architecture": TINY_QWEN_IMAGE},
}

RELEASES: tuple[Release, ...] = (
    Release("FLUX.1 VAE", "flux", FLUX, repositories=("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"),
            subfolder="vae"),
    Release("REPA-E E2E-FLUX-VAE", "flux", FLUX, repositories=("REPA-E/e2e-flux-vae",)),
    Release("SD3.5 VAE", "sd3.5", SD35, subfolder="vae",
            repositories=("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium")),
    Release("REPA-E E2E-SD-3.5-VAE", "sd3.5", SD35, repositories=("REPA-E/e2e-sd3.5-vae",)),
    Release("Qwen-Image VAE", "qwen-image", QWEN_IMAGE, repositories=("Qwen/Qwen-Image",), subfolder="vae"),
    Release("REPA-E E2E-Qwen-Image-VAE", "qwen-image", QWEN_IMAGE, repositories=("REPA-E/e2e-qwenimage-vae",)),
    Release("SD-VAE (sd-vae-ft-ema / -mse)", "sd", SD,
            repositories=("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")),
    Release("SDXL VAE", "sdxl", SDXL, repositories=("stabilityai/sdxl-vae",)),
    Release("SDXL VAE", "sdxl", SDXL, repositories=("stabilityai/stable-diffusion-xl-base-1.0",), subfolder="vae"),
)
"""The published diffusers VAEs a hub ``weights`` source is checked against at validate time (the presets are these
releases' ``config.json``; REPA-E's E2E-VAEs keep the architecture of the VAE they tune and are diffusers folders
at the top of their repositories, the pipelines' VAEs are in ``vae/``)."""


def compared_keys(model_class: str) -> tuple[str, ...]:
    """The keys of ``model_class`` that weights and recipe must agree on: all but the latent statistics (the weights
    supply them) and the keys that change no computation."""
    return tuple(k for k in ARCHITECTURE_KEYS[model_class] if k not in STATISTICS_KEYS and k not in NOT_COMPARED)


def merged_architecture(size: str, model_class: str, architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers config the tokenizer is built from: the preset's (``size``, when of ``model_class``) with the
    recipe's ``architecture`` keys on top."""
    preset = PRESETS.get(size)
    base = dict(preset["architecture"]) if preset and preset["model_class"] == model_class else {}
    return {**base, **architecture}


def recipe_fields(model_class: str, architecture: Mapping[str, Any]) -> dict[str, Any]:
    """``model_class`` and the compared architecture keys as the recipe's keys (``architecture.latent_channels``),
    for :func:`repae.architecture_mismatch`."""
    keys = compared_keys(model_class)
    return {"model_class": model_class, **{f"architecture.{k}": v for k, v in architecture.items() if k in keys}}


def _hub_folder(weights: str, subfolder: str | None) -> str:
    """The folder inside the repository that ``weights`` (``hf://org/name[/folder][@revision]``) and ``subfolder``
    name together ("" for the top)."""
    parts = [p for p in weights[len("hf://"):].split("@")[0].split("/") if p][2:]
    if parts and parts[-1].endswith(".safetensors"):
        parts = parts[:-1]
    return "/".join([*parts, *[p for p in (subfolder or "").split("/") if p]])


_WEIGHTS_DOC = (
    "a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors) or hf://org/name[@revision] (the "
    "Hugging Face cache; offline with HF_HUB_OFFLINE=1); null = random init"
)


@dataclass(kw_only=True)
class DiffusersVAEConfig:
    """A diffusers ``AutoencoderKL`` / ``AutoencoderKLQwenImage`` and where its weights are (default: FLUX-VAE)."""

    EXPORT_FORMATS = ("diffusers",)
    """`repae export`'s formats (the built component's ``export_formats``), declared to be checked before building."""

    size: str = option("flux", doc="preset (a released VAE's config): flux, sd3.5, sd, sdxl, qwen-image; "
                     "tiny, tiny-qwen-image (tests)")
    model_class: ModelClass = option("AutoencoderKL", doc="the diffusers class: AutoencoderKL or AutoencoderKLQwenImage")
    architecture: dict[str, ArchitectureValue] = option(
        default_factory=lambda: dict(FLUX),
        doc="diffusers config keys (config.json), on top of the preset's when the preset is of the same class; the "
        "weights' config.json must agree on every key but the latent statistics (scaling_factor, shift_factor, "
        "latents_mean, latents_std), which it supplies",
    )
    weights: str | None = option(None, doc=_WEIGHTS_DOC)
    subfolder: str | None = option(None, doc="folder of the VAE inside `weights`, e.g. 'vae' for a pipeline")

    def __post_init__(self) -> None:
        known = ARCHITECTURE_KEYS[self.model_class]
        unknown = sorted(k for k in self.architecture if k not in known)
        if unknown:
            hints = "".join(did_you_mean(k, known) for k in unknown)
            listed = (f"{unknown[0]!r} is not a config key" if len(unknown) == 1 else
                      f"{', '.join(map(repr, unknown))} are not config keys")
            raise FieldError("architecture", f"{listed} of diffusers' {self.model_class}.{hints} (Its keys: "
                             f"{', '.join(known)}.)")
        if self.subfolder is not None and (not self.subfolder.strip("/") or ".." in self.subfolder.split("/")):
            raise FieldError("subfolder", f"must name a folder inside the weights, e.g. 'vae'; got {self.subfolder!r}")
        for key in ("latents_mean", "latents_std"):
            value = self.architecture.get(key)
            if value is not None and not isinstance(value, list):
                raise FieldError("architecture", f"{key} must be a list of per-channel values or null, got {value!r}")
        scale = self.architecture.get("scaling_factor")
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 0:
            raise FieldError("architecture", "scaling_factor must not be 0")
        self._check_release()

    def _check_release(self) -> None:
        """Weights naming a known release (:data:`RELEASES`): the class and every compared architecture key of the
        release, and its folder inside the repository."""
        release = release_of_source(self.weights, RELEASES)
        if release is None or self.weights is None:
            return
        ours = recipe_fields(self.model_class, merged_architecture(self.size, self.model_class, self.architecture))
        theirs = recipe_fields(str(PRESETS[release.preset]["model_class"]), release.architecture)
        fields = ["model_class"] if ours["model_class"] != theirs["model_class"] else list(theirs)
        problem = architecture_mismatch(ours, theirs, fields=fields, preset=release.preset,
                                        shape_free=[f"architecture.{k}" for k in SHAPE_FREE_KEYS],
                                        what=f"the {release.name} release ({self.weights})")
        if problem is not None:
            raise FieldError(problem.field, problem.message)
        folder = _hub_folder(self.weights, self.subfolder)
        if release.subfolder is not None and folder != release.subfolder:
            raise FieldError("subfolder", f"{self.weights} is a pipeline: the VAE of the {release.name} release is "
                             f"in its folder {release.subfolder!r}, not {folder or 'the top'!r}. Fix: set "
                             f"subfolder: {release.subfolder}")


@hookimpl
def register_components(register: Any) -> None:
    """Register the ``diffusers-vae`` tokenizer."""
    register(
        "tokenizer",
        "diffusers-vae",
        summary="a diffusers VAE: AutoencoderKL (SD, SDXL, FLUX, SD3.5) or AutoencoderKLQwenImage (Qwen-Image)",
        config=DiffusersVAEConfig,
        factory="repae_diffusers_vae.model:build_diffusers_vae",
        presets=PRESETS,
    )
