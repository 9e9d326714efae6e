"""LPIPS perceptual distance with a VGG16 backbone: Zhang et al., "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", CVPR 2018 (arXiv 1801.03924), as REPA-E's tokenizer regulariser (weight 1.0).

Images in ``[-1, 1]`` are shifted and scaled per channel (shift ``[-.030, -.088, -.188]``, scale
``[.458, .448, .450]``), run through VGG16's convolutional trunk, and the activations after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3 are unit-normalised over channels; their squared differences are weighted per channel by the
linear heads (1x1 convolutions to one channel), averaged over space and summed over the five layers.

REPA-E's April-2025 code mapped its already-[-1, 1] inputs once more through ``x*2-1`` (fixed upstream later):
``double_scale_inputs: true`` reproduces it for parity; the default scales once.

Weights (frozen, never trained):

- ``weights``: the linear heads, as in the lpips release file ``vgg.pth`` (keys ``lin0.model.1.weight`` ..
  ``lin4.model.1.weight``; ``lins.<k>.`` and ``.model.0.`` spellings are accepted). If the same file also holds the
  backbone (a full LPIPS state dict: ``net.slice<k>.<j>.*``, or torchvision's ``features.<j>.*``) it is used and
  ``vgg_weights`` is ignored. Null: the ``vgg.pth`` of an installed ``lpips`` package, else the file of the lpips
  repository fetched once into the torch hub cache.
- ``vgg_weights``: the VGG16 backbone in torchvision's layout (``features.<j>.weight/bias``; ``classifier.*`` is
  ignored). Null: torchvision's ImageNet file ``vgg16-397923af.pth`` in the torch hub cache (where torchvision keeps
  it).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from repae import (
    BuildContext,
    Loss,
    StepContext,
    WeightsInfo,
    WeightsMismatchError,
    load_into,
    load_weights,
)
from repae_losses import LPIPSConfig
from repae_losses.common import full_precision, need

__all__ = ["LPIPS", "LPIPSLoss", "build_lpips", "LPIPS_HEADS_URL", "VGG16_URL", "convert_lpips_state_dict"]

LPIPS_HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
"""VGG16 ("configuration D") up to relu5_3; indices of the Sequential match torchvision's ``features``."""
_TAPS = (3, 8, 15, 22, 29)
"""Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in ``features``."""
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_trunk() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(item)
    return nn.Sequential(*layers)


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """The LPIPS-VGG network: ``forward(x, y) -> [B]`` distances of images in ``[-1, 1]``. Frozen (no gradients to
    its parameters; gradients do flow to the images)."""

    def __init__(self, double_scale_inputs: bool = False) -> None:
        super().__init__()
        self.double_scale_inputs = double_scale_inputs
        self.shift: Tensor
        self.scale: Tensor
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_trunk()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _TAP_CHANNELS)
        self.requires_grad_(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        batch = x.shape[0]
        if x.requires_grad == y.requires_grad:
            taps = self._taps(torch.cat([x, y]))
            pairs = [(h[:batch], h[batch:]) for h in taps]
        else:
            # One side (the real images) needs no gradient: its VGG features are computed without autograd, which
            # saves the backward pass through half of the batch (same values as one concatenated pass).
            with torch.no_grad():
                fixed = self._taps(y if x.requires_grad else x)
            moving = self._taps(x if x.requires_grad else y)
            pairs = list(zip(moving, fixed)) if x.requires_grad else list(zip(fixed, moving))
        total = x.new_zeros(batch, dtype=torch.float32)
        for head, (fx, fy) in zip(self.heads, pairs):
            total = total + head((fx - fy).square()).mean(dim=(1, 2, 3))
        return total

    def _taps(self, images: Tensor) -> list[Tensor]:
        """Unit-normalised VGG features at the five LPIPS taps of images in ``[-1, 1]`` (or ``[0, 1]`` with
        ``double_scale_inputs``): float32 ``[N, C_k, H_k, W_k]``."""
        h = images.float()
        if self.double_scale_inputs:
            h = h * 2 - 1
        h = (h - self.shift) / self.scale
        taps: list[Tensor] = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == _TAPS[len(taps)]:
                taps.append(_unit(h))
                if len(taps) == len(_TAPS):
                    break
        return taps


_HEAD = re.compile(r"^(?:lin|lins\.)(\d)\.model\.[01]\.weight$")
_SLICE = re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$")
_FEATURE = re.compile(r"^features\.(\d+)\.(weight|bias)$")


def convert_lpips_state_dict(state: dict[str, Tensor], *, source: str = "weights") -> tuple[dict, dict, list[str]]:
    """Split a file's tensors into heads (``heads.<k>.weight``) and backbone (``features.<j>.*``) entries of
    :class:`LPIPS`; return them with the keys that are neither (``scaling_layer.*`` and ``classifier.*`` are
    known and dropped)."""
    heads: dict[str, Tensor] = {}
    trunk: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if m := _HEAD.match(key):
            heads[f"heads.{m.group(1)}.weight"] = value
        elif m := (_SLICE.match(key) or _FEATURE.match(key)):
            if int(m.group(1)) < 30:
                trunk[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif not key.startswith(("scaling_layer.", "classifier.")):
            unknown.append(key)
    return heads, trunk, unknown


def _default_heads_source() -> str:
    spec = importlib.util.find_spec("lpips")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "weights" / "v0.1" / "vgg.pth"
        if bundled.is_file():
            return str(bundled)
    return LPIPS_HEADS_URL


def load_lpips_weights(model: LPIPS, heads_source: str | None, vgg_source: str | None) -> dict[str, WeightsInfo]:
    """Fill ``model`` from the sources (see the module docstring); return the files read by role (``heads``, and
    ``vgg`` when the backbone came from its own file). Keys and shapes are checked strictly; errors name the
    offending keys."""
    heads_source = heads_source or _default_heads_source()
    state, info = load_weights(heads_source, option="weights")
    read: dict[str, WeightsInfo] = {"heads": info}
    heads, trunk, unknown = convert_lpips_state_dict(state)
    if unknown:
        shown = ", ".join(sorted(unknown)[:10])
        raise WeightsMismatchError(f"LPIPS weights {heads_source} hold {len(unknown)} key(s) that are neither LPIPS "
                                   f"heads (lin<k>.model.1.weight) nor VGG16 layers: {shown}")
    absent = [f"lin{k}.model.1.weight" for k in range(len(_TAPS)) if f"heads.{k}.weight" not in heads]
    if absent:
        raise WeightsMismatchError(f"LPIPS weights {heads_source} lack the linear head(s) {', '.join(absent)}; "
                                   "give the lpips release file vgg.pth (or a full LPIPS state dict)")
    if not trunk:
        vgg_source = vgg_source or VGG16_URL
        vgg_state, read["vgg"] = load_weights(vgg_source, option="vgg_weights")
        _, trunk, _ = convert_lpips_state_dict({k: v for k, v in vgg_state.items() if k.startswith("features.")})
    load_into(model, {**trunk, **heads}, strict=True,
              what=f"LPIPS weights from {', '.join(info.source for info in read.values())}")
    model.requires_grad_(False)
    return read


class LPIPSLoss(Loss):
    """``mean_b LPIPS(x_b, recon_b)`` in float32 with autocast off. Terms: ``loss``."""

    needs_recon = True

    def __init__(self, config: LPIPSConfig) -> None:
        super().__init__(config)
        self.lpips = LPIPS(double_scale_inputs=config.double_scale_inputs)
        self.loaded_weights: dict[str, WeightsInfo] = {}

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        fix = "it trains on cached latents or no tokenizer decodes; train the tokenizer from images"
        images = need(ctx.images, "images", "lpips", fix)
        recon = need(ctx.recon, "reconstructions", "lpips", fix)
        with full_precision(recon.device):
            loss = self.lpips(images.float(), recon.float()).mean()
        return {"loss": loss}

    def block_modules(self) -> list[nn.Module]:
        """:class:`repae.HasBlocks`: the LPIPS network (``forward(x, y)``), compiled as one unit."""
        return [self.lpips]

    def extra_repr(self) -> str:
        return f"double_scale_inputs={self.lpips.double_scale_inputs}, {super().extra_repr()}"


def build_lpips(config: LPIPSConfig, context: BuildContext) -> LPIPSLoss:
    """Registry factory of ``lpips``: build, then load the weights unless ``context.load_weights`` is false (then the
    network keeps its random initialisation: only for dry runs and tests)."""
    loss = LPIPSLoss(config)
    if context.load_weights:
        loss.loaded_weights = load_lpips_weights(loss.lpips, config.weights, config.vgg_weights)
    return loss
