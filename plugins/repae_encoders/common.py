"""What the frozen encoders share: REPA's preprocessing of raw images, freezing, and building with weights.

Preprocessing follows REPA's ``preprocess_raw_image`` (reference facts, §1.4): ``uint8 / 255``, the encoder's
normalisation, and a bicubic ``F.interpolate`` (``align_corners=False``, no antialias) to ``14 * H / 16`` pixels
(224 at 256 px, 448 at 512 px). DINOv2 and I-JEPA normalise before resizing, CLIP resizes first; the order is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repae import BuildContext, UserError, WeightsInfo, layout_mismatch, load_into, load_weights
from repae_encoders import OFFICIAL_WEIGHTS, EncoderConfig

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "FrozenEncoder", "TimmViTEncoder", "build_encoder", "strip_prefix"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RANDOM = "random"
"""The ``weights`` value that asks for random initialisation."""
_NOT_ARCHITECTURE = ("size", "weights", "weights_key")


class FrozenEncoder(nn.Module):
    """Base of the encoders: raw ``uint8`` images -> preprocessing -> patch tokens ``[B, N, embed_dim]``.

    Subclasses set ``backbone`` (the module the weights load into) and implement :meth:`forward_tokens` on
    preprocessed images. The encoder stays in eval mode (``train()`` is a no-op) and its parameters never require
    gradients; :meth:`forward` runs without autograd.
    """

    patch_size: int = 14

    def __init__(
        self,
        *,
        embed_dim: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        normalize_first: bool,
        token_stride: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.mean, self.std = tuple(mean), tuple(std)
        self.pixel_mean: Tensor
        self.pixel_std: Tensor
        self.register_constants()
        self.normalize_first = normalize_first
        self.token_stride = token_stride
        self.loaded_weights: dict[str, WeightsInfo] = {}
        """:class:`repae.RecordsWeights`: the weights file loaded (empty: random init)."""

    def register_constants(self) -> None:
        """The normalisation mean/std as buffers ``[1, 3, 1, 1]`` float32: made once and moved with the module (not
        rebuilt on the device at every call); not in the state dict, so checkpoints hold the backbone's keys only.
        Called again after weights are assigned into a module built on ``meta``."""
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    # -- shapes -----------------------------------------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Tokens along each side for an ``height`` x ``width`` image."""
        return height // self.token_stride, width // self.token_stride

    def num_tokens(self, resolution: int) -> int:
        """How many patch tokens an image of ``resolution`` x ``resolution`` pixels gives."""
        gh, gw = self.grid_size(resolution, resolution)
        return gh * gw

    # -- forward ----------------------------------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """Raw ``uint8`` images ``[B, 3, H, W]`` to the float32 input of the backbone (normalised, resized)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects raw uint8 images [B, 3, H, W] in [0, 255], got {images.dtype} "
                f"{list(images.shape)} (from [-1, 1]: ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))"
            )
        gh, gw = self.grid_size(images.shape[-2], images.shape[-1])
        if gh < 1 or gw < 1:
            raise ValueError(f"images of {list(images.shape[-2:])} px are smaller than token_stride {self.token_stride}")
        size = (gh * self.patch_size, gw * self.patch_size)
        x = images.to(torch.float32) / 255.0
        if self.normalize_first:
            x = self._normalize(x)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        if not self.normalize_first:
            x = self._normalize(x)
        return x

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def _backbone(self) -> nn.Module:
        backbone = getattr(self, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"{type(self).__name__} sets no `backbone` module")  # a bug of the subclass
        return backbone

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Preprocessed images to patch tokens (final-norm'ed where the encoder has one, prefix tokens dropped)."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Raw ``uint8`` images ``[B, 3, H, W]`` to patch tokens ``[B, N, embed_dim]`` (no autograd)."""
        with torch.no_grad():
            x = self.preprocess(images)
            weight = next(self._backbone().parameters(), None)
            if weight is not None and weight.is_floating_point() and weight.dtype != x.dtype:
                x = x.to(weight.dtype)  # an encoder cast to bf16/fp16 as a whole; autocast needs no cast
            return self.forward_tokens(x)

    # -- frozen -----------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stay in eval mode whatever a parent module asks for: the encoder is frozen."""
        return super().train(False)

    def freeze(self) -> FrozenEncoder:
        """Eval mode, no parameter requires gradients."""
        self.requires_grad_(False)
        return self.eval()

    # -- weights ----------------------------------------------------------------------------------------------------
    def load_weights(
        self,
        source: str,
        *,
        key: str | None = None,
        default_filename: str | None = None,
        convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        what: str = "encoder weights",
        assign: bool = False,
        check: Callable[[dict[str, tuple[int, ...]]], None] | None = None,
    ) -> None:
        """Resolve ``source``, read it safely, adapt its layout with ``convert`` and load it strictly into
        ``self.backbone``; records it in :attr:`loaded_weights`. ``check`` gets the adapted keys and shapes before
        anything is loaded (and may raise)."""
        state, info = load_weights(source, key=key, default_filename=default_filename)
        state = strip_prefix(state, "module.")
        if convert is not None:
            state = convert(state)
        if check is not None:
            check({k: tuple(v.shape) for k, v in state.items()})
        load_into(self._backbone(), state, strict=True, what=f"{what} from {info.path}", assign=assign)
        self.loaded_weights = {"weights": info}

    def extra_repr(self) -> str:
        loaded = self.loaded_weights.get("weights")
        return (f"embed_dim={self.embed_dim}, token_stride={self.token_stride}, "
                f"weights={loaded.source if loaded else None!r}")


class TimmViTEncoder(FrozenEncoder):
    """A timm ``VisionTransformer`` backbone (no head, any token grid) returning its final-norm'ed patch tokens, the
    prefix tokens (class, registers) dropped. Inputs get ImageNet normalisation, then the resize (DINOv2, I-JEPA)."""

    def __init__(
        self, *, embed_dim: int, depth: int, num_heads: int, image_size: int, token_stride: int, **vit: Any
    ) -> None:
        super().__init__(
            embed_dim=embed_dim, mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize_first=True, token_stride=token_stride
        )
        from timm.models.vision_transformer import VisionTransformer

        self.backbone = VisionTransformer(
            img_size=image_size,
            patch_size=self.patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
            dynamic_img_size=True,
            **vit,
        )

    def forward_tokens(self, x: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(x)  # [B, prefix + N, D], final norm applied
        return tokens[:, self.backbone.num_prefix_tokens :]


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key when all keys carry it (``module.`` from DDP checkpoints)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


_Encoder = TypeVar("_Encoder", bound=FrozenEncoder)


def build_encoder(
    encoder_cls: type[_Encoder],
    config: EncoderConfig,
    context: BuildContext,
    *,
    family: str,
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> _Encoder:
    """The factory body of every encoder: ``encoder_cls`` built from the resolved ``config``, with its weights.

    The architecture fields of the config (all but ``size``, ``weights``, ``weights_key``) are the constructor
    arguments of ``encoder_cls``. ``weights`` null takes the size's entry of ``OFFICIAL_WEIGHTS[family]`` (source,
    checkpoint entry) when there is one and random init otherwise; ``"random"`` always gives random init. On ``meta``
    (``context.load_weights`` false) weights are never touched. With weights to load, the module is built on ``meta``
    and filled from the file (no wasted random init); ``convert`` adapts the checkpoint's layout first.
    """
    arch = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_ARCHITECTURE}
    official = OFFICIAL_WEIGHTS[family].get(config.size)
    key = config.weights_key
    source: str | None
    if config.weights is None and official is not None:
        source = official[0]
        key = key if key is not None else official[1]
    else:
        source = None if config.weights == RANDOM else config.weights
    if source is None or not context.load_weights:
        built = encoder_cls(**arch)
        built.freeze()
        if source is not None and config.weights is not None:
            _check_header(built, arch, family, config.weights)
        return built
    with torch.device("meta"):
        encoder = encoder_cls(**arch)
    what = f"{family} {config.size} weights"

    def check(shapes: dict[str, tuple[int, ...]]) -> None:
        _check_release(encoder, arch, family, source, shapes)

    encoder.load_weights(source, key=key, convert=convert, what=what, assign=True, check=check)
    encoder.register_constants()
    leftovers = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if leftovers:  # a subclass created tensors that are not in its state dict
        raise RuntimeError(f"{what}: tensors left on meta after loading: {leftovers[:5]}")
    encoder.to(context.device).freeze()
    return encoder


def _check_release(encoder: FrozenEncoder, arch: Mapping[str, Any], family: str, source: str,
                   shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Refuse a file with a release's key layout (``shapes`` equal the encoder's) loaded into a config whose
    ``num_heads`` (which changes no shape) differs from the release's (:mod:`repae_encoders.releases`)."""
    from repae_encoders.releases import SHAPE_FREE_FIELDS, release_of_layout

    problem = layout_mismatch(arch, release_of_layout(family, arch), source=source, file_shapes=shapes,
                              model_shapes=encoder._backbone().state_dict(), shape_free=SHAPE_FREE_FIELDS)
    if problem is not None:
        raise UserError(f"{family}: {problem}")


def _check_header(encoder: FrozenEncoder, arch: Mapping[str, Any], family: str, source: str) -> None:
    """On ``meta`` (``repae recipe validate``): :func:`_check_release` for a local safetensors file in the
    encoder's own layout, from its header alone (other sources are checked when loaded)."""
    from repae import local_weights, safetensors_shapes

    path = local_weights(source) if source != RANDOM else None
    shapes = safetensors_shapes(path) if path is not None else None
    if shapes is None:
        return  # a hub source or URL, a missing file, or not a safetensors file (each reported elsewhere)
    if shapes and all(k.startswith("module.") for k in shapes):
        shapes = {k[len("module."):]: v for k, v in shapes.items()}
    _check_release(encoder, arch, family, source, shapes)
