"""PatchGAN adversarial loss with a hinge discriminator objective, as REPA-E's tokenizer regulariser.

Discriminator: the N-layer PatchGAN of pix2pix (Isola et al., "Image-to-Image Translation with Conditional
Adversarial Networks", arXiv 1611.07004) as used by taming-transformers / LDM and REPA-E (arXiv 2504.10483): 4x4
convolutions, stride 2 for the first ``n_layers``, then two of stride 1, BatchNorm (no bias in the convolutions it
follows) and LeakyReLU(0.2). With ``ndf=64, n_layers=3`` a 256 x 256 image gives 30 x 30 logits (2,765,633
parameters; state-dict keys ``main.<i>.*`` as REPA-E's ``*-discriminator-ckpt.pt``). Init: convolution weights
N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0.

The BatchNorms stay in training mode as in REPA-E (batch statistics, running statistics updated on every call);
under ``torch.distributed`` the statistics are those of the global batch (sums all-reduced, gradients too), so that
N processes with B/N images each compute what one process with B images does. Both terms run in float32 with
autocast off.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from repae.errors import UserError
from repae.train.losses import LossBase
from repae.weights import load_into, load_state_dict, resolve_weights
from repae_losses import PatchGANConfig
from repae_losses.common import full_precision, need

__all__ = ["GlobalBatchNorm2d", "NLayerDiscriminator", "PatchGANLoss", "build_patchgan", "hinge_d_loss"]

PART = "discriminator"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes as well."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics cover the global batch under ``torch.distributed``.

    Single process (or ``sync=False``, or eval mode): exactly ``nn.BatchNorm2d``. Distributed: per-channel mean and
    biased variance from all-reduced sums (two passes), normalisation with them, running statistics updated with the
    unbiased global variance. The state dict is that of ``BatchNorm2d``.
    """

    def __init__(self, num_features: int, *args: Any, sync: bool = True, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.sync = sync

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.sync and _distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        n = float(x.numel() // x.shape[1] * dist.get_world_size())  # every process holds an equal shard (no sync)
        mean = _AllReduceSum.apply(x.sum(dim=dims)) / n
        centered = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centered.square().sum(dim=dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: images ``[B, 3, H, W]`` in ``[-1, 1]`` to logits ``[B, 1, h, w]``."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, *, sync_bn: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                GlobalBatchNorm2d(ndf * mult, sync=sync_bn),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Convolution weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class PatchGANLoss(LossBase, nn.Module):
    """Adversarial loss owning the part ``discriminator``.

    Phase ``discriminator``: the hinge loss on ``D(x)`` and ``D(recon.detach())`` (real first), weight
    ``disc_weight``; terms ``loss``, ``logits_real``, ``logits_fake``. Any other phase (the tokenizer's): the
    generator term ``-mean D(recon)``, weight ``weight``; terms ``loss``, ``logits_fake``. Both are multiplied by 0
    before ``start_step``.
    """

    needs_recon = True

    def __init__(self, config: PatchGANConfig) -> None:
        nn.Module.__init__(self)
        LossBase.__init__(self, config)
        self.discriminator = NLayerDiscriminator(3, config.ndf, config.n_layers, sync_bn=config.global_batch_norm)
        self.disc_weight = config.disc_weight
        self.start_step = config.start_step
        self.weights_sha256: str | None = None

    def weight(self, part: str) -> float:
        return self.disc_weight if part == PART else self.config.weight

    def parts(self) -> dict[str, nn.Module]:
        return {PART: self.discriminator}

    def forward(self, ctx: Any) -> dict[str, Tensor]:
        fix = "it trains on cached latents or no tokenizer decodes; train the tokenizer from images"
        recon = need(ctx.recon, "reconstructions", "patchgan", fix)
        factor = 1.0 if int(getattr(ctx, "step", 0)) >= self.start_step else 0.0
        with full_precision(recon.device):
            if ctx.phase == PART:
                images = need(ctx.images, "images", "patchgan", fix)
                logits_real = self.discriminator(images.detach().float())
                logits_fake = self.discriminator(recon.detach().float())
                loss = factor * hinge_d_loss(logits_real, logits_fake)
                return {"loss": loss, "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
            logits_fake = self.discriminator(recon.float())
            return {"loss": factor * -logits_fake.mean(), "logits_fake": logits_fake.detach().mean()}

    def extra_repr(self) -> str:
        return (f"weight={self.config.weight}, disc_weight={self.disc_weight}, start_step={self.start_step}, "
                f"updates={list(self.updates)}")


def load_discriminator(model: NLayerDiscriminator, source: str, key: str | None) -> str:
    """Load a discriminator state dict (plain, or the ``key`` entry of a training checkpoint) strictly; BatchNorm
    ``num_batches_tracked`` counters absent from the file keep their value. Returns the file's sha256."""
    state, digest = load_state_dict(resolve_weights(source), key=key, missing_key="whole")
    state = dict(state)
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = value
    load_into(model, state, strict=True, what=f"discriminator weights from {source}")
    return digest


def build_patchgan(config: PatchGANConfig, context: Any = None) -> PatchGANLoss:
    """Registry factory of ``patchgan``: build, then load ``config.weights`` unless ``context.load_weights`` is
    false."""
    wrong = [p for p in config.updates if p not in ("tokenizer", PART)]
    if wrong:
        raise UserError(f"patchgan can update only 'tokenizer' (generator term) and '{PART}' (hinge loss), "
                        f"not {wrong}")
    loss = PatchGANLoss(config)
    if config.weights and (context is None or getattr(context, "load_weights", True)):
        loss.weights_sha256 = load_discriminator(loss.discriminator, config.weights, config.weights_key)
    return loss
