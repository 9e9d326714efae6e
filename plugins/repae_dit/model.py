"""DiT: "Scalable Diffusion Models with Transformers", Peebles & Xie, 2023 (arXiv 2212.09748).

The same trunk as SiT (:class:`repae_sit.layers.DiffusionTransformer`), with the DDPM interface of the official
release: ``t`` is the integer diffusion step 0..999 (embedded as is), the output has ``2 * in_channels`` channels with
``learn_sigma`` (the noise prediction, then the values interpolating the log-variance between beta and beta-tilde),
and :meth:`DiT.forward_with_cfg` reproduces the reference guidance, which guides only the first 3 output channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from repae.interfaces import DenoiserOutput
from repae_dit import DiTConfig
from repae_sit.checkpoint import load_configured_weights
from repae_sit.layers import DiffusionTransformer, guided_prediction
from repae_sit.model import resolve_shapes

__all__ = ["DiT", "build_dit"]


class DiT(DiffusionTransformer):
    """DiT noise (+ variance) model implementing :class:`repae.interfaces.Denoiser` with DDPM-step times.

    ``loaded_weights``, ``weights_source``, ``weights_sha256`` and ``latent_norm_state`` record what was loaded.
    """

    def __init__(
        self, *, in_channels: int, learn_sigma: bool = True, cfg_channels: int | None = 3, **trunk: Any
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=2 * in_channels if learn_sigma else in_channels, **trunk)
        self.learn_sigma = learn_sigma
        self.cfg_channels = cfg_channels

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        feature_depths: Sequence[int] = (),
        features_only: bool = False,
        force_drop: Tensor | None = None,
    ) -> DenoiserOutput:
        """Prediction ``[B, out_channels, H, W]`` at latents ``x`` and diffusion steps ``t`` ``[B]`` (0..999).

        ``feature_depths``/``features_only``/``force_drop`` as in :meth:`repae_sit.model.SiT.forward`.
        """
        return self.run(
            x, t, y, feature_depths=feature_depths, features_only=features_only, force_drop=force_drop
        )

    def forward_with_cfg(
        self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, *, guided_channels: int | None = -1
    ) -> Tensor:
        """Reference classifier-free guidance on a doubled batch ``x = [x; x]``, ``y = [labels; null]``.

        Only the first half of ``x`` is used (for both halves). The first ``guided_channels`` output channels (default:
        the config's ``cfg_channels``, 3 as in the reference; ``None``: all) become ``uncond + s (cond - uncond)`` in
        both halves; the other channels are the raw cond / uncond predictions.
        """
        channels = self.cfg_channels if guided_channels == -1 else guided_channels
        half = x[: x.shape[0] // 2]
        pred = self.run(half.repeat(2, 1, 1, 1), t, y).prediction
        return guided_prediction(pred, cfg_scale, channels)


def build_dit(config: DiTConfig, context: Any) -> DiT:
    """Registry factory of ``dit``: build, then load ``config.weights`` unless ``context.load_weights`` is false."""
    input_size, in_channels, encoder_dims = resolve_shapes(config, getattr(context, "built", {}) or {})
    model = DiT(
        input_size=input_size,
        in_channels=in_channels,
        learn_sigma=config.learn_sigma,
        cfg_channels=config.cfg_channels,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        class_dropout_prob=config.class_dropout_prob,
        qk_norm=config.qk_norm,
        encoder_dims=encoder_dims,
        projector_dim=config.projector_dim,
    )
    load_configured_weights(model, config, context)
    return model
