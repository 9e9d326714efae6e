"""PatchGAN adversarial loss with a hinge discriminator objective, as REPA-E's tokenizer regulariser.

Discriminator: the N-layer PatchGAN of pix2pix (Isola et al., "Image-to-Image Translation with Conditional
Adversarial Networks", arXiv 1611.07004) as used by taming-transformers / LDM and REPA-E (arXiv 2504.10483): 4x4
convolutions, stride 2 for the first ``n_layers``, then two of stride 1, BatchNorm (no bias in the convolutions it
follows) and LeakyReLU(0.2). With ``ndf=64, n_layers=3`` a 256 x 256 image gives 30 x 30 logits (2,765,633
parameters; state-dict keys ``main.<i>.*`` as REPA-E's ``*-discriminator-ckpt.pt``). Init: convolution weights
N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0.

The BatchNorms stay in training mode as in REPA-E (batch statistics, running statistics updated on every call);
under ``torch.distributed`` the statistics are those of the global batch (:class:`repae.GlobalBatchNorm`), so that
N processes with B/N images each compute what one process with B images does. Both terms run in float32 with
autocast off.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from repae import (
    BuildContext,
    GlobalBatchNorm,
    Loss,
    StepContext,
    UserError,
    WeightsInfo,
    load_into,
    load_weights,
)
from repae_losses import PatchGANConfig
from repae_losses.common import full_precision, need

__all__ = ["NLayerDiscriminator", "PatchGANLoss", "build_patchgan", "hinge_d_loss"]

PART = "discriminator"


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
                GlobalBatchNorm(ndf * mult, sync=sync_bn),
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
            elif isinstance(module, GlobalBatchNorm) and module.weight is not None and module.bias is not None:
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """``0.5 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class PatchGANLoss(Loss):
    """Adversarial loss owning the part ``discriminator``.

    Phase ``discriminator``: the hinge loss on ``D(x)`` and ``D(recon.detach())`` (real first), weight
    ``weight.discriminator``; terms ``loss``, ``logits_real``, ``logits_fake``. Any other phase (the tokenizer's):
    the generator term ``-mean D(recon)``, weight ``weight.tokenizer``; terms ``loss``, ``logits_fake``. Both are
    multiplied by 0 before ``start_step``.
    """

    needs_recon = True

    def __init__(self, config: PatchGANConfig) -> None:
        super().__init__(config)
        self.discriminator = NLayerDiscriminator(3, config.ndf, config.n_layers, sync_bn=config.global_batch_norm)
        self.start_step = config.start_step
        self.loaded_weights: dict[str, WeightsInfo] = {}

    def parts(self) -> dict[str, nn.Module]:
        return {PART: self.discriminator}

    def forward(self, ctx: StepContext) -> dict[str, Tensor]:
        fix = "it trains on cached latents or no tokenizer decodes; train the tokenizer from images"
        recon = need(ctx.recon, "reconstructions", "patchgan", fix)
        factor = 1.0 if ctx.step >= self.start_step else 0.0
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
        return f"weight={self.config.weight}, start_step={self.start_step}, updates={list(self.updates)}"


def load_discriminator(model: NLayerDiscriminator, source: str, key: str | None) -> WeightsInfo:
    """Load a discriminator state dict (plain, or the ``key`` entry of a training checkpoint) strictly; BatchNorm
    ``num_batches_tracked`` counters absent from the file keep their value. Returns what was read."""
    state, info = load_weights(source, key=key, missing_key="whole")
    state = dict(state)
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = value
    load_into(model, state, strict=True, what=f"discriminator weights from {source}")
    return info


def build_patchgan(config: PatchGANConfig, context: BuildContext) -> PatchGANLoss:
    """Registry factory of ``patchgan``: build, then load ``config.weights`` unless ``context.load_weights`` is
    false."""
    wrong = [p for p in config.updates if p not in ("tokenizer", PART)]
    if wrong:
        raise UserError(f"patchgan can update only 'tokenizer' (generator term) and '{PART}' (hinge loss), "
                        f"not {wrong}")
    loss = PatchGANLoss(config)
    if config.weights and context.load_weights:
        loss.loaded_weights = {"discriminator": load_discriminator(loss.discriminator, config.weights,
                                                                   config.weights_key)}
    return loss
