"""DiT: "Scalable Diffusion Models with Transformers", Peebles & Xie, 2023 (arXiv 2212.09748).

The same trunk as SiT (:class:`repae_sit.layers.DiffusionTransformer`), with the DDPM interface of the official
release: ``t`` is the integer diffusion step 0..999 (embedded as is), the output has ``2 * in_channels`` channels with
``learn_sigma`` (the noise prediction, then the values interpolating the log-variance between beta and beta-tilde),
and :meth:`DiT.forward_with_cfg` reproduces the reference guidance, which guides only the first 3 output channels.
"""

from __future__ import annotations

from typing import Any

from repae_sit.layers import DiffusionTransformer
from repae_sit.model import build_denoiser

from repae import BuildContext
from repae_dit import DiTConfig

__all__ = ["DiT", "build_dit"]


class DiT(DiffusionTransformer):
    """DiT noise (+ variance) model implementing :class:`repae.interfaces.Denoiser` with DDPM-step times.

    ``forward(x, t, y, *, feature_depths=(), features_only=False, force_drop=None)`` is the trunk's
    :meth:`~repae_sit.layers.DiffusionTransformer.run` unchanged: ``t`` ``[B]`` is the diffusion step 0..999 and the
    prediction ``[B, out_channels, H, W]`` is the raw final-layer output (options as in
    :meth:`repae_sit.model.SiT.forward`). :meth:`forward_with_cfg` guides ``cfg_channels`` (3, as the reference).
    ``loaded_weights`` and ``latent_norm_state`` record what was loaded.
    """

    forward = DiffusionTransformer.run

    def __init__(self, *, learn_sigma: bool = True, cfg_channels: int | None = 3, **trunk: Any) -> None:
        super().__init__(learn_sigma=learn_sigma, **trunk)
        self.cfg_channels = cfg_channels


def build_dit(config: DiTConfig, context: BuildContext) -> DiT:
    """Registry factory of ``dit``: build, then load ``config.weights`` unless ``context.load_weights`` is false."""
    return build_denoiser(DiT, config, context, cfg_channels=config.cfg_channels)
