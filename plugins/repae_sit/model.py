"""SiT: Scalable Interpolant Transformer (Ma et al., 2024, arXiv 2401.08740) with the REPA projectors (Yu et al.,
2024, arXiv 2410.06940) used by REPA-E (Leng et al., 2025, arXiv 2504.10483).

Time convention of repae: ``t`` in ``[0, 1]``, ``t = 1`` is pure noise, ``x_t = (1 - t) x + t eps`` and the
prediction is the velocity ``eps - x``. ``t`` is embedded as is (no x1000). Weights trained with the opposite
convention (the willisma/SiT release: ``t = 1`` is data, velocity ``x - eps``) are served through
``time_convention: data-at-1``, which feeds ``1 - t`` and negates the prediction.

The latent BatchNorm of REPA-E is *not* part of this module (see :mod:`repae_sit.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from repae.errors import UserError
from repae.interfaces import DenoiserOutput
from repae_sit import SiTConfig
from repae_sit.checkpoint import load_configured_weights
from repae_sit.layers import DiffusionTransformer

__all__ = ["SiT", "build_denoiser", "build_sit", "resolve_shapes"]

_Model = TypeVar("_Model", bound=DiffusionTransformer)


class SiT(DiffusionTransformer):
    """SiT velocity model implementing :class:`repae.interfaces.Denoiser`.

    Built from :class:`repae_sit.SiTConfig` by :func:`build_sit`; ``loaded_weights``, ``weights_source``,
    ``weights_sha256`` and ``latent_norm_state`` record what was loaded (``None`` for a random init).
    """

    def __init__(self, *, time_convention: str = "noise-at-1", **trunk: Any) -> None:
        if time_convention not in ("noise-at-1", "data-at-1"):
            raise ValueError(f"time_convention must be 'noise-at-1' or 'data-at-1', got {time_convention!r}")
        super().__init__(**trunk)
        self.time_convention = time_convention

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
        """Velocity ``eps - x`` at noisy latents ``x`` ``[B, C, H, W]``, times ``t`` ``[B]`` (1 = noise), labels ``y``.

        ``hidden[d]`` holds the tokens after block ``d`` (1-based) for each ``d`` in ``feature_depths``; with
        ``features_only`` the pass stops after the deepest of them and ``prediction`` is ``None``. ``force_drop``
        (bool ``[B]``) replaces labels by the null label instead of the random training-mode dropout.
        """
        flipped = self.time_convention == "data-at-1"
        out = self.run(
            x,
            1 - t if flipped else t,
            y,
            feature_depths=feature_depths,
            features_only=features_only,
            force_drop=force_drop,
        )
        if out.prediction is not None:
            pred = out.prediction[:, : self.in_channels] if self.learn_sigma else out.prediction
            out.prediction = -pred if flipped else pred
        return out


def resolve_shapes(config: Any, built: Mapping[str, Any]) -> tuple[int, int, list[int]]:
    """``(input_size, in_channels, encoder_dims)`` from the config, filling ``None`` fields from built components.

    ``input_size = resolution // tokenizer.downsample``, ``in_channels = tokenizer.latent_channels``,
    ``encoder_dims = [encoder.embed_dim for each built encoder]`` (``[]`` when no encoder was built).
    """
    tokenizer = built.get("tokenizer")
    name = type(config).__name__
    input_size, in_channels = config.input_size, config.in_channels
    if input_size is None:
        if tokenizer is None or not hasattr(tokenizer, "downsample"):
            raise UserError(f"{name}.input_size is null and no tokenizer was built to derive it from: set input_size "
                            "(the latent height, e.g. 32 for 256 px images and an f8 VAE)")
        input_size = config.resolution // int(tokenizer.downsample)
        if input_size * int(tokenizer.downsample) != config.resolution or input_size % config.patch_size:
            raise UserError(f"resolution {config.resolution} with tokenizer downsample {tokenizer.downsample} gives "
                            f"latents that patch_size {config.patch_size} does not tile: set input_size or resolution")
    if in_channels is None:
        if tokenizer is None or not hasattr(tokenizer, "latent_channels"):
            raise UserError(f"{name}.in_channels is null and no tokenizer was built to derive it from: set "
                            "in_channels (the latent channels, e.g. 4 for SD-VAE)")
        in_channels = int(tokenizer.latent_channels)
    encoder_dims = config.encoder_dims
    if encoder_dims is None:
        encoders = built.get("encoders") or []
        if isinstance(encoders, Mapping):
            encoders = list(encoders.values())
        encoder_dims = [int(e.embed_dim) for e in encoders]
    return input_size, in_channels, list(encoder_dims)


def build_denoiser(cls: type[_Model], config: Any, context: Any, **specific: Any) -> _Model:
    """Build ``cls`` (a :class:`DiffusionTransformer`) from a SiT/DiT config, the shapes left ``None`` resolved from
    ``context.built``, then load ``config.weights`` unless ``context.load_weights`` is false. ``specific`` holds the
    constructor arguments of ``cls`` beyond the shared ones."""
    input_size, in_channels, encoder_dims = resolve_shapes(config, getattr(context, "built", {}) or {})
    model = cls(
        input_size=input_size,
        in_channels=in_channels,
        learn_sigma=config.learn_sigma,
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
        **specific,
    )
    load_configured_weights(model, config, context)
    return model


def build_sit(config: SiTConfig, context: Any) -> SiT:
    """Registry factory of ``sit``: build, then load ``config.weights`` unless ``context.load_weights`` is false."""
    return build_denoiser(SiT, config, context, time_convention=config.time_convention)
