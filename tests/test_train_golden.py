"""One full REPA-E step through the engine reproduces the official step (golden/repae_step.safetensors).

The reference step: VAE update (L1 + 1e-6 KL + 0.1 GAN generator + 1.5 REPA through the frozen eval-mode SiT) ->
discriminator update (hinge) -> SiT update on z.detach() (flow matching + 0.5 REPA, BatchNorm in train mode) -> EMA.
Built here from the registry with the golden tiny configs and weights; the randomness (posterior noise, t, noise) and
the encoder targets are injected. LPIPS has weight 0 in the golden step and is left out.

The reference's training loop flips ``requires_grad`` on the sin-cos ``pos_embed`` and so trains it. The SiT's
``pos_embed: learned`` does the same, and the step is compared with no exception: ``pos_embed``'s gradient norm, its
post-step value (and its EMA) and the SiT's global gradient norm (which includes it, hence the clipping) directly against
the reference. ``pos_embed: fixed`` (the default, as SiT) is checked too, with the one documented exception: every
comparison excludes ``pos_embed`` (it stays the sin-cos table), and the SiT's global gradient norm is compared after
removing ``pos_embed``'s share from the reference value.

Every configuration value (model sizes, channels, classes, depths, coefficients, optimizer settings) is read from the
golden file's metadata, so another file made by the same reference script with other settings can be dropped in.
Constants of the reference code that its metadata does not carry are named where they are used (GroupNorm with 32
groups in the LDM VAE, the latent BatchNorm's eps 1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch

from repae.plugins import load_plugins
from repae.train.config import OptimizerConfig, TrainerConfig
from repae.train.context import StepInputs
from repae.train.engine import PhasedTrainer

import repae
from repae_sit.checkpoint import from_official, load_strict

from conftest import build_section, official_weights, read_golden, sit_fields, vae_fields

LOSS_TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=["learned", "fixed"])
def golden_step(request):
    mode = request.param
    meta, g = read_golden("repae_step.safetensors")
    _, vae_fwd = read_golden("vae_forward.safetensors")
    _, vae_dec = read_golden("vae_forward_decoder.safetensors")
    _, sit_fwd = read_golden("sit_forward.safetensors")

    registry = load_plugins(select={"repae"}).registry
    vae = build_section(registry, "tokenizer", "sd-vae", size="tiny", **vae_fields(meta["vae_config"]))
    vae.load_state_dict({**official_weights(vae_fwd, "weights."), **official_weights(vae_dec, "weights.")}, strict=True)
    sc = meta["sit_config"]
    sit = repae.create("denoiser", "sit", registry=registry, **sit_fields(sc), pos_embed=mode)
    sit_state, bn_state = from_official(official_weights(sit_fwd))
    torch.testing.assert_close(sit.pos_embed.detach(), sit_state["pos_embed"], rtol=0, atol=0)  # our sin-cos table
    load_strict(sit, sit_state)
    assert ("pos_embed" in dict(sit.named_parameters())) == (mode == "learned")
    norm = build_section(registry, "normalizer", "batchnorm", channels=sc["in_channels"], init="none",
                         momentum=sc["bn_momentum"], eps=1e-4)  # eps: the reference's BatchNorm2d(eps=1e-4)
    norm.load_state_dict(bn_state, strict=True)
    r = meta["repae"]
    assert r["perceptual_weight"] == 0, "LPIPS is left out: the golden step has it at weight 0"
    dc = meta["disc_config"]
    losses = {
        "reconstruction": build_section(registry, "loss", "reconstruction", kind="l1", updates=["tokenizer"]),
        "kl": build_section(registry, "loss", "kl", weight=r["kl_weight"], updates=["tokenizer"]),
        "gan": build_section(registry, "loss", "patchgan", size="tiny", ndf=dc["ndf"], n_layers=dc["n_layers"],
                             weight={"tokenizer": r["disc_weight"], "discriminator": 1.0},
                             updates=["tokenizer", "discriminator"]),
        "diffusion": build_section(registry, "loss", "flow-matching", updates=["denoiser"]),
        "repa": build_section(registry, "loss", "repa", depth=sc["encoder_depth"],
                              weight={"denoiser": r["proj_coeff"], "tokenizer": r["vae_align_proj_coeff"]},
                              updates=["denoiser", "tokenizer"]),
    }
    losses["gan"].discriminator.load_state_dict(official_weights(g, "disc."), strict=True)
    config = TrainerConfig(
        steps=1, batch_size=r["batch_size"], precision="fp32", label_dropout=0.0, ema_decay=r["ema_decay"],
        clip_grad_norm=r["max_grad_norm"],
        optimizers={"default": OptimizerConfig(lr=r["lr"], betas=tuple(r["betas"]), weight_decay=r["weight_decay"],
                                               eps=r["adam_eps"])},
    )
    trainer = PhasedTrainer(config, {"dataset": object(), "tokenizer": vae, "denoiser": sit, "latent_norm": norm,
                                     "losses": losses, "encoders": []}, seed=r["seed"])
    trainer.setup()
    inputs = StepInputs(labels=g["labels"], images=g["images"], eps_posterior=g["eps_posterior"], t=g["t"],
                        noise=g["noise"], drop_labels=torch.zeros(len(g["labels"]), dtype=torch.bool),
                        targets=[g["zs.0"]])
    logs = trainer.compute_gradients([inputs], step=0)
    grads = {part: {n: p.grad.norm() for n, p in module.named_parameters() if p.grad is not None}
             for part, module in trainer.parts.items()}
    norms = trainer.apply_gradients()
    return g, meta, trainer, logs, grads, norms, mode


def test_losses_match(golden_step):
    g, _, _, logs, _, _, _ = golden_step
    pairs = {
        "tokenizer/reconstruction": "vae_loss.reconstruction_loss",
        "tokenizer/kl": "vae_loss.kl_loss_unweighted",
        "tokenizer/gan": "vae_loss.gan_loss",
        "tokenizer/repa": "vae_loss.align_proj_loss",
        "tokenizer/total": "vae_loss.total",
        "discriminator/gan": "d_loss.total",
        "discriminator/gan.logits_real": "d_loss.logits_real",
        "discriminator/gan.logits_fake": "d_loss.logits_fake",
        "denoiser/diffusion": "sit_loss.denoising_loss",
        "denoiser/repa": "sit_loss.proj_loss",
        "denoiser/total": "sit_loss.total",
    }
    for ours, theirs in pairs.items():
        torch.testing.assert_close(logs[ours], g[theirs], **LOSS_TOL, msg=f"{ours} vs {theirs}")


def test_per_parameter_gradient_norms_match(golden_step):
    g, _, _, _, grads, _, mode = golden_step
    for part, prefix in (("tokenizer", "vae_grad_norm."), ("denoiser", "sit_grad_norm."),
                         ("discriminator", "disc_grad_norm.")):
        expected = {k[len(prefix):]: v for k, v in g.items() if k.startswith(prefix)}
        if mode == "fixed" and part == "denoiser":
            expected.pop("pos_embed")  # a frozen buffer in this mode (the documented exception)
        assert set(grads[part]) == set(expected), part
        for name, norm in grads[part].items():
            torch.testing.assert_close(norm, expected[name], **LOSS_TOL, msg=f"{part}.{name}")


def test_global_gradient_norms_match(golden_step):
    g, _, _, _, _, norms, mode = golden_step
    torch.testing.assert_close(norms["tokenizer/grad_norm"], g["vae_loss.grad_norm"], **LOSS_TOL)
    torch.testing.assert_close(norms["discriminator/grad_norm"], g["d_loss.grad_norm"], **LOSS_TOL)
    if mode == "learned":
        torch.testing.assert_close(norms["denoiser/grad_norm"], g["sit_loss.grad_norm"], **LOSS_TOL)
    else:
        without_pos_embed = math.sqrt(g["sit_loss.grad_norm"].item() ** 2 - g["sit_grad_norm.pos_embed"].item() ** 2)
        torch.testing.assert_close(norms["denoiser/grad_norm"].item(), without_pos_embed, atol=1e-5, rtol=1e-4)


def test_pos_embed_after_the_step(golden_step):
    """learned: ``pos_embed`` moved as the reference's did (by about lr), and its EMA too; fixed: it did not move."""
    g, meta, trainer, _, _, _, mode = golden_step
    _, sit_fwd = read_golden("sit_forward.safetensors")
    initial = sit_fwd["weights.pos_embed"].float()
    value, ema = trainer.denoiser.pos_embed.detach(), trainer.ema["denoiser"].pos_embed
    if mode == "learned":
        assert (g["sit_after.pos_embed"] - initial).abs().max() > 0.5 * meta["repae"]["lr"]  # the reference moved it
        torch.testing.assert_close(value, g["sit_after.pos_embed"], atol=1e-6, rtol=0)
        torch.testing.assert_close(ema, g["ema_after.pos_embed"], atol=1e-6, rtol=0)
    else:
        torch.testing.assert_close(value, initial, atol=0, rtol=0)
        torch.testing.assert_close(ema, initial, atol=0, rtol=0)


def _compare_after(g, meta, state: dict[str, torch.Tensor], prefix: str, *, skip=(), atol=1e-4):
    lr = meta["repae"]["lr"]
    sensitive = {k[len(prefix) + len("_after."):] for k in meta["adam_noise_sensitive_after_keys"]
                 if k.startswith(prefix + "_after.")}
    checked = 0
    for key, value in state.items():
        if key in skip or key.startswith("bn."):
            continue
        tol = lr if key in sensitive else atol
        if f"{prefix}_after.{key}" in g:
            expected = g[f"{prefix}_after.{key}"]
            torch.testing.assert_close(value.to(expected.dtype), expected, atol=tol, rtol=0, msg=f"{prefix}.{key}")
        else:
            expected = g[f"{prefix}_after_strided.{key}"]
            stride = math.ceil(value.numel() / meta["n_strided"])
            torch.testing.assert_close(value.flatten()[::stride], expected, atol=tol, rtol=0, msg=f"{prefix}.{key}")
        checked += 1
    return checked


def _skipped(mode: str) -> tuple[str, ...]:
    return ("pos_embed",) if mode == "fixed" else ()  # fixed: the documented exception (a frozen buffer)


def test_weights_after_the_step_match(golden_step):
    g, meta, trainer, _, _, _, mode = golden_step
    assert _compare_after(g, meta, trainer.tokenizer.state_dict(), "vae") == len(trainer.tokenizer.state_dict())
    sit = trainer.denoiser.state_dict()
    assert _compare_after(g, meta, sit, "sit", skip=_skipped(mode)) == len(sit) - len(_skipped(mode))
    disc = trainer.parts["discriminator"].state_dict()
    assert _compare_after(g, meta, disc, "disc") == len(disc)  # BN buffers too: num_batches_tracked = 3
    assert int(disc[[k for k in disc if k.endswith("num_batches_tracked")][0]]) == 3


def test_latent_batchnorm_and_ema_after_the_step_match(golden_step):
    g, meta, trainer, _, _, _, mode = golden_step
    for key, value in trainer.normalizer.state_dict().items():  # updated by the train-mode denoiser pass only
        expected = g[f"sit_after.bn.{key}"]
        torch.testing.assert_close(value.to(expected.dtype), expected, atol=1e-6, rtol=0)
    ema = trainer.ema["denoiser"].state_dict()
    assert _compare_after(g, meta, ema, "ema", skip=_skipped(mode), atol=1e-6) == len(ema) - len(_skipped(mode))
    for key, value in trainer.ema["latent_norm"].state_dict().items():
        expected = g[f"ema_after.bn.{key}"]
        torch.testing.assert_close(value.to(expected.dtype), expected, atol=1e-6, rtol=0)
