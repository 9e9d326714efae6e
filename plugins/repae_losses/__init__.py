"""Loss components (registry kind ``loss``) of REPA-E (Leng et al., "REPA-E: Unlocking VAE for End-to-End Tuning
with Latent Diffusion Transformers", arXiv 2504.10483), REPA (Yu et al., arXiv 2410.06940), SiT (Ma et al.,
arXiv 2401.08740) and DiT (Peebles & Xie, arXiv 2212.09748).

Each loss lists the trainable parts its gradient may update (``updates``); the engine runs it in the phase of each
of them with every other part frozen (:class:`repae.PhasedTrainer`). Defaults are REPA-E's coefficients:

========================  =====================  ===================================  ===========================
name                      default updates        default weight                       reads
========================  =====================  ===================================  ===========================
``flow-matching``         denoiser               1.0                                  prediction, x0, noise, t
``ddpm``                  denoiser               1.0                                  prediction (2C channels)
``repa``                  denoiser               0.5 (REPA-E: {denoiser: 0.5,         hidden[depth], encoder tokens
                                                 tokenizer: 1.5})
``reconstruction``        tokenizer              1.0                                  images, recon
``lpips``                 tokenizer              1.0                                  images, recon
``kl``                    tokenizer              1e-6                                 posterior
``patchgan``              tokenizer, discrim.    {tokenizer: 0.1, discriminator: 1}   images, recon
========================  =====================  ===================================  ===========================

A ``weight`` is one coefficient for every part a loss updates, or one per part (``{denoiser: 0.5, tokenizer:
1.5}``): REPA-E's alignment loss is one ``repa`` entry, so its depth is set in one place. This module is the
torch-free registration; the implementations live in the sibling modules and are imported when a loss is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from repae import FieldError, LossConfig, hookimpl, option

__all__ = [
    "DDPMConfig",
    "FlowMatchingConfig",
    "KLConfig",
    "LPIPSConfig",
    "PATCHGAN_PRESETS",
    "PatchGANConfig",
    "ReconstructionConfig",
    "RepaConfig",
]


def _parts(*names: str) -> Any:
    return option(default_factory=lambda: list(names), doc="trainable parts this loss's gradient may update")


# -- diffusion objectives -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FlowMatchingConfig(LossConfig):
    """Flow matching on the interpolant ``x_t = alpha_t x0 + sigma_t noise`` (t = 1 is noise), velocity target.

    ``time_sampling: logit-normal`` is REPA's ``weighting: lognormal``: ``s = exp(logit_mean + logit_std N(0,1))``,
    ``t = s / (1 + s)`` on the linear path (``2/pi atan(s)`` on the cosine path). It changes only the distribution of
    ``t``; there is no per-sample loss weight.
    """

    updates: list[str] = _parts("denoiser")
    path: Literal["linear", "cosine"] = option("linear", doc="interpolant: linear (1-t, t) or cosine (cos, sin)")
    prediction: Literal["v"] = option("v", doc="what the denoiser predicts: the velocity d x_t / d t")
    time_sampling: Literal["uniform", "logit-normal"] = option(
        "uniform", doc="distribution of t: uniform on [0, 1), or logit-normal (REPA's 'lognormal')"
    )
    logit_mean: float = option(0.0, doc="logit-normal: mean of log(t / (1 - t)) on the linear path")
    logit_std: float = option(1.0, doc="logit-normal: standard deviation of log(t / (1 - t))")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logit_std <= 0:
            raise FieldError("logit_std", f"must be > 0, got {self.logit_std}")


@dataclass(kw_only=True)
class DDPMConfig(LossConfig):
    """DiT's DDPM objective: integer steps ``t ~ U{0..T-1}``, noise (epsilon) prediction by MSE, plus the
    variational bound term of the learned variance when the denoiser outputs ``2C`` channels ("hybrid" loss of
    improved DDPM, as DiT trains it). The linear schedule is ADM's: betas from ``1000/T * beta_start`` to
    ``1000/T * beta_end``."""

    updates: list[str] = _parts("denoiser")
    num_timesteps: int = option(1000, doc="number of diffusion steps T")
    beta_schedule: Literal["linear"] = option("linear", doc="noise schedule (ADM's linear schedule)")
    beta_start: float = option(1e-4, doc="first beta for T = 1000 (scaled by 1000 / T)")
    beta_end: float = option(0.02, doc="last beta for T = 1000 (scaled by 1000 / T)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_timesteps < 2:
            raise FieldError("num_timesteps", f"must be >= 2, got {self.num_timesteps}")
        if not 0 < self.beta_start < self.beta_end:
            raise ValueError(f"need 0 < beta_start < beta_end, got {self.beta_start}, {self.beta_end}")
        if self.beta_end * 1000 / self.num_timesteps >= 1:
            largest = self.beta_end * 1000 / self.num_timesteps
            raise ValueError(f"beta_end * 1000 / num_timesteps must be < 1, got {largest}")


# -- representation alignment ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RepaConfig(LossConfig):
    """REPA alignment: minus the cosine similarity between the projected hidden tokens after block ``depth`` and the
    encoders' tokens, averaged over tokens, samples and encoders. REPA updates the denoiser with weight 0.5; REPA-E
    also updates the tokenizer through the frozen denoiser with weight 1.5: ``updates: [denoiser, tokenizer]``,
    ``weight: {denoiser: 0.5, tokenizer: 1.5}`` (one entry, one depth)."""

    weight: float | dict[str, float] = option(
        0.5, doc="coefficient (REPA: 0.5); per part for REPA-E: {denoiser: 0.5, tokenizer: 1.5}"
    )
    updates: list[str] = _parts("denoiser")
    depth: int = option(8, doc="1-based block whose output tokens are projected and aligned")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise FieldError("depth", f"must be >= 1 (1-based block index), got {self.depth}")


# -- tokenizer regularisers -----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ReconstructionConfig(LossConfig):
    """Pixel reconstruction of the tokenizer: mean over all pixels of ``|x - recon|`` (l1, as the REPA-E code) or
    ``(x - recon)^2`` (mse, as the paper writes)."""

    updates: list[str] = _parts("tokenizer")
    kind: Literal["l1", "mse"] = option("l1", doc="l1 (REPA-E code) or mse (REPA-E paper)")


@dataclass(kw_only=True)
class KLConfig(LossConfig):
    """KL divergence of the tokenizer posterior to N(0, I), summed over C, H, W and averaged over the batch."""

    weight: float | dict[str, float] = option(1e-6, doc="coefficient of this loss (REPA-E: 1e-6)")
    updates: list[str] = _parts("tokenizer")


@dataclass(kw_only=True)
class LPIPSConfig(LossConfig):
    """LPIPS perceptual distance (VGG16 backbone + linear heads) between images and reconstructions, frozen."""

    updates: list[str] = _parts("tokenizer")
    weights: str | None = option(
        None,
        doc="LPIPS linear heads (lin0..lin4, the lpips 'vgg.pth'); may also hold the VGG16 backbone; null: the "
        "standard file (installed lpips package, else the torch hub cache)",
    )
    vgg_weights: str | None = option(
        None,
        doc="VGG16 backbone (torchvision layout features.*) when `weights` has none; null: torchvision's ImageNet "
        "file vgg16-397923af.pth from the torch hub cache",
    )
    double_scale_inputs: bool = option(
        False, doc="apply x*2-1 to inputs already in [-1, 1] (the April-2025 REPA-E code; true only for parity)"
    )


PATCHGAN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"ndf": 64, "n_layers": 3},
    "tiny": {"ndf": 8, "n_layers": 2},
}
"""``size`` presets of ``patchgan``: REPA-E's discriminator (2.77M parameters) and the golden-test one."""


@dataclass(kw_only=True)
class PatchGANConfig(LossConfig):
    """PatchGAN adversarial loss. The loss owns the trainable part ``discriminator`` (configure its optimizer in the
    trainer under that name). Tokenizer phase: the generator term ``-mean D(recon)`` times ``weight.tokenizer``;
    discriminator phase: the hinge loss ``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(recon)))`` times
    ``weight.discriminator``. Before ``start_step`` both terms are multiplied by 0 (the discriminator still runs)."""

    weight: float | dict[str, float] = option(
        default_factory=lambda: {"tokenizer": 0.1, "discriminator": 1.0},
        doc="coefficient per part: generator term in the tokenizer's objective (REPA-E: 0.1), hinge loss in the "
        "discriminator's (1.0)",
    )
    updates: list[str] = _parts("tokenizer", "discriminator")
    size: str = option("default", doc="preset: default (ndf 64, 3 layers) or tiny (ndf 8, 2 layers)")
    ndf: int = option(64, doc="channels of the first discriminator convolution")
    n_layers: int = option(3, doc="number of stride-2 convolutions after the first")
    start_step: int = option(0, doc="step from which the adversarial terms count (REPA-E: 0)")
    weights: str | None = option(
        None, doc="pretrained discriminator: local file or hf://org/repo/file (e.g. sdvae-f8d4-discriminator-ckpt.pt)"
    )
    weights_key: str | None = option(
        "discriminator", doc="entry of a training checkpoint to load; a plain state dict is read whole"
    )
    global_batch_norm: bool = option(
        True, doc="BatchNorm statistics over the global batch under torch.distributed (false: per process)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ndf < 1 or self.n_layers < 1:
            raise ValueError(f"ndf and n_layers must be >= 1, got ndf={self.ndf}, n_layers={self.n_layers}")
        if self.start_step < 0:
            raise FieldError("start_step", f"must be >= 0, got {self.start_step}")


@hookimpl
def register_components(register: Any) -> None:
    register("loss", "flow-matching", summary="flow matching, v-prediction (linear/cosine path, t=1 noise)",
             config=FlowMatchingConfig, factory="repae_losses.flow_matching:build_flow_matching")
    register("loss", "ddpm", summary="DiT's DDPM objective: epsilon MSE + learned-variance VLB, 1000 linear steps",
             config=DDPMConfig, factory="repae_losses.ddpm:build_ddpm")
    register("loss", "repa", summary="REPA alignment: -cosine of projected hidden tokens vs encoder tokens",
             config=RepaConfig, factory="repae_losses.repa:build_repa")
    register("loss", "reconstruction", summary="pixel reconstruction of the tokenizer (L1 or MSE)",
             config=ReconstructionConfig, factory="repae_losses.regularizers:build_reconstruction")
    register("loss", "kl", summary="KL of the tokenizer posterior to N(0, I)",
             config=KLConfig, factory="repae_losses.regularizers:build_kl")
    register("loss", "lpips", summary="LPIPS perceptual distance (VGG16), frozen",
             config=LPIPSConfig, factory="repae_losses.lpips:build_lpips")
    register("loss", "patchgan", summary="PatchGAN adversarial loss (hinge), owns the part 'discriminator'",
             config=PatchGANConfig, factory="repae_losses.patchgan:build_patchgan",
             presets=PATCHGAN_PRESETS)
