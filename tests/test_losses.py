"""Loss components (plugin ``repae_losses``): contract, math against hand computations, and golden values.

Golden checks take the intermediates of one official REPA-E step (``golden/repae_step.safetensors``) and of the
official SiT forward (``golden/sit_forward.safetensors``) and evaluate each loss in isolation on a small fake step
context; every configuration value (depths, coefficients, discriminator size, optimiser) is read from the files'
metadata. The whole-step comparison is the engine's test.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import repae
from conftest import ROOT, load_manifest, official_weights, read_golden
from repae import BuildContext, DenoiserOutput, GlobalBatchNorm, RecipeError, Transport, UserError, WeightsMismatchError
from repae.build import build_component
from repae.plugins import load_plugins
from repae_losses import (
    DDPMConfig,
    FlowMatchingConfig,
    KLConfig,
    LPIPSConfig,
    PatchGANConfig,
    ReconstructionConfig,
    RepaConfig,
)
from repae_losses.ddpm import DDPMTransport, build_ddpm, linear_betas
from repae_losses.flow_matching import FlowMatchingTransport, build_flow_matching, velocity_mse
from repae_losses.lpips import LPIPS, build_lpips
from repae_losses.patchgan import NLayerDiscriminator, build_patchgan, hinge_d_loss
from repae_losses.regularizers import build_kl, build_reconstruction
from repae_losses.repa import build_repa, negative_cosine

REGISTRY = load_plugins(select={"repae"}).registry
NAMES = ("flow-matching", "ddpm", "repa", "reconstruction", "kl", "lpips", "patchgan")
CPU = BuildContext(device="cpu")
NO_WEIGHTS = BuildContext(device="cpu", load_weights=False)


@dataclass
class FakeStep:
    """The attributes of :class:`repae.train.context.StepContext` that losses read, given directly."""

    phase: str = "denoiser"
    step: int = 0
    images: torch.Tensor | None = None
    recon: torch.Tensor | None = None
    posterior: Any = None
    denoised: DenoiserOutput | None = None
    denoiser: Any = None
    targets: list[torch.Tensor] = field(default_factory=list)
    x0: torch.Tensor | None = None
    x_t: torch.Tensor | None = None
    t: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    target: torch.Tensor | None = None

    @property
    def prediction(self) -> torch.Tensor:
        assert self.denoised is not None and self.denoised.prediction is not None
        return self.denoised.prediction


class Projector:
    """A denoiser stand-in whose ``project`` returns given tensors (the stored projector outputs)."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = outputs

    def project(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return self.outputs


class Posterior:
    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean, self.logvar = mean, logvar

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def encoder_keys(meta: dict[str, Any], prefix: str) -> list[str]:
    """``prefix.0``, ``prefix.1``, ...: one key per representation encoder of the reference SiT (``z_dims``)."""
    return [f"{prefix}.{k}" for k in range(len(meta["sit_config"]["z_dims"]))]


# -- registration and the loss contract ----------------------------------------------------------------------------
def test_registration_is_torch_free():
    code = "import sys, repae_losses; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", NAMES)
def test_default_config_builds_on_meta(name):
    entry = REGISTRY.get("loss", name)
    config, issues = entry.parse({})
    assert not issues
    loss = build_component(entry, config, BuildContext(device="meta"))
    assert isinstance(loss, repae.Loss) and isinstance(loss, torch.nn.Module) and callable(loss.weight)
    assert all(p.device.type == "meta" for p in loss.parameters())
    assert loss.config is config and loss.updates == tuple(config.updates)
    for part in loss.updates:
        assert loss.weight(part) == config.weight_of(part)


EXPECTED = {  # name: (weight by updated part, needs_prediction, needs_recon, needs_targets, feature_depths, transport)
    "flow-matching": ({"denoiser": 1.0}, True, False, False, (), None),
    "ddpm": ({"denoiser": 1.0}, True, False, False, (), 1000),
    "repa": ({"denoiser": 0.5}, False, False, True, (8,), False),
    "reconstruction": ({"tokenizer": 1.0}, False, True, False, (), False),
    "kl": ({"tokenizer": 1e-6}, False, False, False, (), False),
    "lpips": ({"tokenizer": 1.0}, False, True, False, (), False),
    "patchgan": ({"tokenizer": 0.1, "discriminator": 1.0}, False, True, False, (), False),
}
"""``transport``: False for none, else its ``discrete_steps`` (None: continuous time)."""


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name):
    entry = REGISTRY.get("loss", name)
    config, _ = entry.parse({})
    loss = build_component(entry, config, BuildContext(device="meta"))
    weights, prediction, recon, targets, depths, transport = EXPECTED[name]
    assert loss.updates == tuple(weights)
    assert {part: loss.weight(part) for part in loss.updates} == pytest.approx(weights)
    assert (loss.needs_prediction, loss.needs_recon, loss.needs_targets) == (prediction, recon, targets)
    assert tuple(loss.feature_depths) == depths
    assert (loss.transport is not None) == (transport is not False)
    if transport is not False:
        assert isinstance(loss.transport, Transport) and loss.transport.discrete_steps == transport
    assert set(loss.parts()) == ({"discriminator"} if name == "patchgan" else set())


def test_updates_and_weights_are_configurable():
    repa = build_repa(RepaConfig(weight=1.5, updates=["tokenizer"], depth=4), CPU)
    assert repa.updates == ("tokenizer",) and repa.weight("tokenizer") == 1.5 and repa.feature_depths == (4,)
    gan = build_patchgan(PatchGANConfig(ndf=8, n_layers=2, weight={"tokenizer": 0.3, "discriminator": 2.0}),
                         NO_WEIGHTS)
    assert gan.weight("tokenizer") == 0.3 and gan.weight("discriminator") == 2.0
    assert gan.parts()["discriminator"] is gan.discriminator
    one = build_patchgan(PatchGANConfig(ndf=8, n_layers=2, weight=0.3), NO_WEIGHTS)  # one number: every part
    assert one.weight("tokenizer") == one.weight("discriminator") == 0.3
    with pytest.raises(UserError, match="patchgan can update only"):
        build_patchgan(PatchGANConfig(updates=["denoiser"], weight=0.1), NO_WEIGHTS)
    with pytest.raises(ValueError, match="at least one part"):
        FlowMatchingConfig(updates=[])
    with pytest.raises(ValueError, match="twice"):
        FlowMatchingConfig(updates=["denoiser", "denoiser"])
    with pytest.raises(ValueError, match="depth"):
        RepaConfig(depth=0)


def test_per_part_weights_cover_every_updated_part():
    """REPA-E's alignment is one ``repa`` loss with a weight per part. A mapping must give a coefficient for every
    part the loss updates (a clear config error naming both lists otherwise: directly, through ``repae.create`` and in
    a recipe); an entry for a part it does not update is not used, so the REPA ablation of a REPA-E recipe is the one
    line ``losses.repa.updates=[denoiser]``."""
    both = {"denoiser": 0.5, "tokenizer": 1.5}
    loss = repae.create("loss", "repa", registry=REGISTRY, depth=2, weight=both, updates=["denoiser", "tokenizer"])
    assert loss.updates == ("denoiser", "tokenizer") and loss.feature_depths == (2,)
    assert (loss.weight("denoiser"), loss.weight("tokenizer")) == (0.5, 1.5)
    assert loss.config.weight_of("tokenizer") == 1.5
    single = repae.create("loss", "repa", registry=REGISTRY, weight=0.7, updates=["denoiser", "tokenizer"])
    assert single.weight("denoiser") == single.weight("tokenizer") == 0.7
    denoiser_only = repae.create("loss", "repa", registry=REGISTRY, weight=both)  # updates: [denoiser] by default
    assert denoiser_only.updates == ("denoiser",) and denoiser_only.weight("denoiser") == 0.5

    missing = r"weight gives coefficients for \['denoiser'\] but the loss updates \['denoiser', 'tokenizer'\].*missing " \
              r"\['tokenizer'\]"
    with pytest.raises(ValueError, match=missing):
        RepaConfig(weight={"denoiser": 0.5}, updates=["denoiser", "tokenizer"])
    with pytest.raises(ValueError, match=r"missing \['discriminator'\]"):
        PatchGANConfig(weight={"tokenizer": 0.1})
    section = {"weight": {"denoiser": 0.5}, "updates": ["denoiser", "tokenizer"]}
    config, issues = REGISTRY.get("loss", "repa").parse(section)
    assert config is None and [i.path for i in issues] == ["weight"]
    assert re.search(missing.removeprefix("weight "), issues[0].message), issues
    with pytest.raises(RecipeError, match=missing.removeprefix("weight ")):
        repae.create("loss", "repa", registry=REGISTRY, **section)
    _, issues = REGISTRY.get("loss", "repa").parse({"weight": {"denoiser": "half"}})
    assert [i.path for i in issues] == ["weight"]

    recipe = ROOT / "recipes" / "quickstart.yaml"  # losses.repa: updates [denoiser, tokenizer], one weight per part

    def repa_config(*overrides: str) -> RepaConfig:
        resolved = repae.load_recipe(recipe, list(overrides), registry=REGISTRY)
        return next(spec for spec in resolved.components if spec.label == "losses.repa").config

    assert repa_config().updates == ["denoiser", "tokenizer"] and repa_config().weight == both
    assert repa_config("losses.repa.updates=[denoiser]").updates == ["denoiser"]  # REPA: one line
    with pytest.raises(RecipeError, match=r"losses\.repa\.weight: " + missing.removeprefix("weight ")):
        repa_config("losses.repa.weight={denoiser: 0.5}")


def test_patchgan_presets_and_recipe_parsing():
    entry = REGISTRY.get("loss", "patchgan")
    config, issues = entry.parse({"size": "tiny", "weight": 0.1})
    assert not issues and (config.ndf, config.n_layers, config.weight) == (8, 2, 0.1)
    config, issues = entry.parse({"size": "tiny", "ndf": 16})
    assert not issues and (config.ndf, config.n_layers) == (16, 2)
    assert config.weight == {"tokenizer": 0.1, "discriminator": 1.0}
    config, issues = entry.parse({})
    assert not issues and (config.size, config.ndf, config.n_layers) == ("default", 64, 3)
    _, issues = entry.parse({"variant": "tiny"})  # the old selector: a hint to the new one
    assert [i.path for i in issues] == ["variant"] and "size: tiny" in issues[0].hint
    _, issues = entry.parse({"disc_weight": 2.0})  # gone: weight.discriminator
    assert [i.path for i in issues] == ["disc_weight"]
    _, issues = REGISTRY.get("loss", "reconstruction").parse({"kind": "l2"})
    assert issues


# -- flow matching --------------------------------------------------------------------------------------------------
def test_flow_matching_transport_linear():
    tr = FlowMatchingTransport("linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = tr.interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])  # t = 1 is pure noise
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(tr.target(x0, noise, t), noise - x0)
    assert tr.model_time(t) is t
    assert tr.discrete_steps is None and isinstance(tr, Transport)  # continuous time


def test_flow_matching_transport_cosine_velocity_is_the_time_derivative():
    tr = FlowMatchingTransport("cosine")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g,
                                                                                        dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    h = 1e-6
    numeric = (tr.interpolate(x0, noise, t + h) - tr.interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(tr.target(x0, noise, t), numeric, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(tr.interpolate(x0, noise, torch.ones(4, dtype=torch.float64)), noise)


def test_flow_matching_time_sampling():
    g = torch.Generator().manual_seed(0)
    uniform = FlowMatchingTransport().sample_time(20000, generator=g)
    assert uniform.shape == (20000,) and uniform.device.type == "cpu"
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.01
    t = FlowMatchingTransport(time_sampling="logit-normal").sample_time(20000, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    shifted = FlowMatchingTransport(time_sampling="logit-normal", logit_mean=-0.5, logit_std=2.0)
    t = shifted.sample_time(20000, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() + 0.5) < 0.06 and abs(logit.std() - 2) < 0.06
    t = FlowMatchingTransport("cosine", "logit-normal").sample_time(20000, generator=g)  # REPA: t = 2/pi atan(s)
    log_s = torch.log(torch.tan(math.pi / 2 * t.double()))
    assert 0 < t.min() and t.max() < 1 and abs(log_s.mean()) < 0.03 and abs(log_s.std() - 1) < 0.03
    again = FlowMatchingTransport().sample_time(5, generator=torch.Generator().manual_seed(3))
    same = FlowMatchingTransport().sample_time(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, same)


def test_flow_matching_loss_and_learned_sigma_half():
    loss = build_flow_matching(FlowMatchingConfig(), CPU)
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 3
    ctx = FakeStep(denoised=DenoiserOutput(pred), target=target)
    assert loss(ctx)["loss"].item() == pytest.approx((1 + 9) / 2)
    wide = torch.cat([pred, torch.full_like(pred, 7.0)], dim=1)  # a learned-sigma output: the first half is v
    torch.testing.assert_close(velocity_mse(wide, target), torch.tensor([1.0, 9.0]))


def test_golden_flow_matching_sit_forward():
    _, s = read_golden("sit_forward.safetensors", float32=True)
    tr = FlowMatchingTransport()
    x0, noise, t = s["train.normalized_x"], s["noise"], s["t"]
    torch.testing.assert_close(tr.interpolate(x0, noise, t), s["train.model_input"], atol=1e-6, rtol=0)
    torch.testing.assert_close(tr.target(x0, noise, t), s["train.model_target"], atol=1e-6, rtol=0)
    torch.testing.assert_close(tr.interpolate(s["eval_align.normalized_x"], noise, t), s["eval_align.model_input"],
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(velocity_mse(s["train.model_output"], s["train.model_target"]),
                               s["train.denoising_loss"], atol=1e-6, rtol=1e-5)


def test_golden_flow_matching_repae_step():
    _, g = read_golden("repae_step.safetensors", float32=True)
    loss = build_flow_matching(FlowMatchingConfig(), CPU)
    x0, noise, t = g["step.sit_normalized_x"], g["noise"], g["t"]
    ctx = FakeStep(denoised=DenoiserOutput(g["step.sit_model_output"]), x0=x0, noise=noise, t=t,
                   target=loss.transport.target(x0, noise, t))
    torch.testing.assert_close(velocity_mse(ctx.denoised.prediction, ctx.target),
                               g["sit_loss.denoising_loss_per_sample"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss(ctx)["loss"], g["sit_loss.denoising_loss"], atol=1e-5, rtol=1e-4)


# -- DDPM -----------------------------------------------------------------------------------------------------------
def test_ddpm_schedule_and_q_sample_by_hand():
    tr = DDPMTransport()
    assert tr.betas.dtype == torch.float64 and len(tr.betas) == 1000
    assert tr.discrete_steps == 1000 and DDPMTransport(500).discrete_steps == 500 and isinstance(tr, Transport)
    assert tr.betas[0].item() == pytest.approx(1e-4) and tr.betas[-1].item() == pytest.approx(0.02)
    assert tr.betas[1].item() - tr.betas[0].item() == pytest.approx((0.02 - 1e-4) / 999)
    abar = 1.0
    for beta in tr.betas[:11].tolist():
        abar *= 1 - beta
    assert tr.alphas_cumprod[10].item() == pytest.approx(abar, rel=1e-12)
    # T = 500 doubles the betas (ADM's linear schedule scales by 1000 / T)
    assert linear_betas(500)[-1].item() == pytest.approx(0.04)

    x0, noise = torch.tensor([[[[0.5]]], [[[-1.0]]]]), torch.tensor([[[[2.0]]], [[[0.3]]]])
    t = torch.tensor([10, 999])
    got = tr.interpolate(x0, noise, t)
    last = tr.alphas_cumprod[999].item()
    want = torch.tensor([math.sqrt(abar) * 0.5 + math.sqrt(1 - abar) * 2.0,
                         -math.sqrt(last) + math.sqrt(1 - last) * 0.3])
    torch.testing.assert_close(got.flatten(), want.float())
    assert tr.target(x0, noise, t) is noise and tr.model_time(t) is t
    steps = tr.sample_time(10000, generator=torch.Generator().manual_seed(0))
    assert steps.dtype == torch.int64 and steps.min() >= 0 and steps.max() <= 999 and len(steps.unique()) > 990


def _hand_vb(tr: DDPMTransport, x0: float, x_t: float, eps: float, v: float, t: int) -> float:
    """The VLB term of one scalar latent, in bits, from the DDPM formulas written out with floats."""
    beta = tr.betas[t].item()
    abar = tr.alphas_cumprod[t].item()
    abar_prev = tr.alphas_cumprod[t - 1].item() if t > 0 else 1.0
    alpha = 1 - beta

    def posterior(start: float) -> float:
        coef1 = math.sqrt(abar_prev) * beta / (1 - abar)
        return coef1 * start + (math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x_t

    tilde_beta = beta * (1 - abar_prev) / (1 - abar)
    if t == 0:  # the posterior variance is 0 at t = 0: log-variance clipped to its value at t = 1
        b1, a1 = tr.betas[1].item(), tr.alphas_cumprod[1].item()
        tilde_beta = b1 * (1 - tr.alphas_cumprod[0].item()) / (1 - a1)
    frac = (v + 1) / 2
    logvar = frac * math.log(beta) + (1 - frac) * math.log(tilde_beta)
    x0_pred = (x_t - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    mean = posterior(x0_pred)
    if t > 0:
        s1, s2 = math.sqrt(tilde_beta), math.exp(0.5 * logvar)
        kl = math.log(s2 / s1) + (s1**2 + (posterior(x0) - mean) ** 2) / (2 * s2**2) - 0.5
        return kl / math.log(2)

    def cdf(z: float) -> float:  # the tanh approximation used by the reference
        return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))

    std = math.exp(0.5 * logvar)
    prob = cdf((x0 - mean + 1 / 255) / std) - cdf((x0 - mean - 1 / 255) / std)
    return -math.log(prob) / math.log(2)


def test_ddpm_vlb_by_hand():
    tr = DDPMTransport()
    # (x0, noise, eps_pred, v, t)
    cases = [(0.3, 0.1, 0.2, 0.5, 500), (-0.4, 0.2, -1.0, -0.3, 1), (0.05, 0.1, 0.3, 0.0, 0),
             (0.7, -0.2, 0.4, 0.9, 999)]
    x0 = torch.tensor([c[0] for c in cases]).view(-1, 1, 1, 1)
    noise = torch.tensor([c[1] for c in cases]).view(-1, 1, 1, 1)
    eps = torch.tensor([c[2] for c in cases]).view(-1, 1, 1, 1)
    v = torch.tensor([c[3] for c in cases]).view(-1, 1, 1, 1)
    t = torch.tensor([c[4] for c in cases])
    x_t = tr.interpolate(x0, noise, t)
    got = tr.vb_terms(eps, v, x0, x_t, t)
    want = [_hand_vb(tr, c[0], x_t[i].item(), c[2], c[3], c[4]) for i, c in enumerate(cases)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=2e-4, atol=1e-5)


def test_ddpm_loss_terms_and_gradients():
    tr_loss = build_ddpm(DDPMConfig(), CPU)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 10, 700])
    x_t = tr_loss.transport.interpolate(x0, noise, t)
    # the true noise and v = -1 (variance = the posterior's) make the KL terms vanish for t > 0
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    ctx = FakeStep(denoised=DenoiserOutput(exact), x0=x0, x_t=x_t, t=t, noise=noise, target=noise)
    vb = tr_loss.transport.vb_terms(noise, -torch.ones_like(noise), x0, x_t, t)
    assert vb[1:].abs().max() < 1e-4 and vb[0] > 0
    terms = tr_loss(ctx)
    assert terms["mse"] == 0 and terms["loss"].item() == pytest.approx(terms["vb"].item())
    # the VLB trains the variance only: no gradient from it reaches the noise prediction
    pred = torch.randn(3, 8, 2, 2, generator=g, requires_grad=True)
    ctx.denoised = DenoiserOutput(pred)
    terms = tr_loss(ctx)
    (terms["loss"] - terms["mse"]).backward()  # vb only (mse is detached in terms)
    mse_grad = 2 * (pred.detach()[:, :4] - noise) / (4 * 2 * 2) / 3
    torch.testing.assert_close(pred.grad[:, :4], mse_grad)
    assert pred.grad[:, 4:].abs().sum() > 0
    # a fixed-variance denoiser (C output channels): MSE only
    ctx.denoised = DenoiserOutput(torch.zeros(3, 4, 2, 2))
    assert set(tr_loss(ctx)) == {"loss"}
    assert tr_loss(ctx)["loss"].item() == pytest.approx(noise.square().mean().item())


# -- REPA -----------------------------------------------------------------------------------------------------------
def test_repa_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2 tokens, 2]
    assert negative_cosine([a], [a * 3]).item() == pytest.approx(-1.0)
    assert negative_cosine([a], [-a]).item() == pytest.approx(1.0)
    assert negative_cosine([a], [a.flip(-1)]).item() == pytest.approx(0.0)
    both = torch.cat([a, a.flip(-1)])  # samples: cos 1 and 0 -> mean -0.5
    assert negative_cosine([both], [torch.cat([a, a])]).item() == pytest.approx(-0.5)
    # two encoders: averaged
    loss = build_repa(RepaConfig(depth=1), CPU)
    ctx = FakeStep(denoised=DenoiserOutput(None, {1: torch.zeros(1, 2, 5)}), denoiser=Projector([a, a]),
                   targets=[a, -a])
    terms = loss(ctx)
    assert terms["loss"].item() == pytest.approx(0.0)
    assert terms["encoder_0"].item() == pytest.approx(-1.0) and terms["encoder_1"].item() == pytest.approx(1.0)


def test_repa_errors_name_the_mismatch():
    a = torch.randn(2, 4, 8)
    with pytest.raises(UserError, match="tokens"):
        negative_cosine([a], [torch.randn(2, 5, 8)])
    with pytest.raises(UserError, match="projector"):
        negative_cosine([a, a], [a])
    with pytest.raises(UserError, match="no representation encoder"):
        negative_cosine([], [])


def test_repa_depth_beyond_the_denoiser_is_reported_before_training(tmp_path):
    """The alignment depth is checked against the denoiser's with the whole recipe (composed on ``meta``), naming the
    key to change."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "dataset: {name: synthetic, num_classes: 10, resolution: 32, num_images: 8}\n"
        "tokenizer: {name: sd-vae, size: tiny}\n"
        "encoders: [{name: dinov2, size: tiny, token_stride: 8}]\n"
        "denoiser: {name: sit, size: tiny, num_classes: 10}\n"
        "losses:\n"
        "  diffusion: {name: flow-matching}\n"
        "  repa: {name: repa, depth: 9, weight: {denoiser: 0.5, tokenizer: 1.5}, updates: [denoiser, tokenizer]}\n"
    )
    with pytest.raises(RecipeError, match=r"losses\.repa\.depth: .*after block 9, but the denoiser has 4 blocks"):
        repae.load_recipe(recipe, [], registry=REGISTRY, check=True)
    checked = repae.load_recipe(recipe, ["losses.repa.depth=4"], registry=REGISTRY, check=True)
    assert next(s for s in checked.components if s.label == "losses.repa").config.depth == 4


def test_golden_repa():
    """REPA-E's two alignment terms are one ``repa`` loss: depth ``encoder_depth``, weight ``vae_align_proj_coeff``
    in the tokenizer's objective and ``proj_coeff`` in the denoiser's (all read from the file)."""
    meta, g = read_golden("repae_step.safetensors", float32=True)
    sit, coeff = meta["sit_config"], meta["repae"]
    depth = sit["encoder_depth"]
    loss = build_repa(RepaConfig(depth=depth, updates=["denoiser", "tokenizer"],
                                 weight={"denoiser": coeff["proj_coeff"], "tokenizer": coeff["vae_align_proj_coeff"]}),
                      CPU)
    assert loss.feature_depths == (depth,)
    tokens = (sit["input_size"] // sit["patch_size"]) ** 2
    hidden = {depth: torch.zeros(coeff["batch_size"], tokens, sit["hidden_size"])}  # the projector stand-in ignores it
    targets = [g[k] for k in encoder_keys(meta, "zs")]
    # tokenizer phase: the projector outputs of the eval-mode alignment pass on z
    ctx = FakeStep(phase="tokenizer", denoised=DenoiserOutput(None, hidden),
                   denoiser=Projector([g[k] for k in encoder_keys(meta, "step.vae_align_zs_tilde")]), targets=targets)
    align = loss(ctx)["loss"]
    torch.testing.assert_close(align, g["vae_loss.align_proj_loss"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g["vae_loss.total_without_align"] + loss.weight("tokenizer") * align,
                               g["vae_loss.total"], atol=1e-5, rtol=1e-4)
    # denoiser phase: its weight is the one of the SiT update
    torch.testing.assert_close(g["sit_loss.denoising_loss"] + loss.weight("denoiser") * g["sit_loss.proj_loss"],
                               g["sit_loss.total"], atol=1e-5, rtol=1e-4)
    s_meta, s = read_golden("sit_forward.safetensors", float32=True)
    s_targets = [s[k] for k in encoder_keys(s_meta, "zs")]
    for mode in ("train", "eval", "eval_align"):
        projected = [s[k] for k in encoder_keys(s_meta, f"{mode}.zs_tilde")]
        torch.testing.assert_close(negative_cosine(projected, s_targets), s[f"{mode}.proj_loss"], atol=1e-5, rtol=1e-4)
        ctx = FakeStep(phase="denoiser", denoised=DenoiserOutput(None, hidden), denoiser=Projector(projected),
                       targets=s_targets)
        torch.testing.assert_close(loss(ctx)["loss"], s[f"{mode}.proj_loss"], atol=1e-5, rtol=1e-4)


def test_repa_and_flow_matching_in_a_real_step_context():
    """Both diffusion-side losses on repae's StepContext with a tiny SiT (cached latents, no tokenizer)."""
    from repae.train.context import DenoiserPlan, StepContext, StepInputs

    entry = REGISTRY.get("denoiser", "sit")
    config, issues = entry.parse({"size": "tiny", "input_size": 8, "in_channels": 4, "encoder_dims": [32],
                                  "num_classes": 10})
    assert not issues
    torch.manual_seed(0)
    sit = build_component(entry, config, NO_WEIGHTS)
    fm, repa = build_flow_matching(FlowMatchingConfig(), CPU), build_repa(RepaConfig(depth=1), CPU)
    g = torch.Generator().manual_seed(0)
    latents = torch.cat([torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 4, 8, 8, generator=g)], dim=1)
    inputs = StepInputs(labels=torch.tensor([1, 2]), images=torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
                        latents=latents, eps_posterior=torch.randn(2, 4, 8, 8, generator=g),
                        t=fm.transport.sample_time(2, generator=g), noise=torch.randn(2, 4, 8, 8, generator=g))
    tokens = torch.randn(2, 16, 32, generator=g)
    ctx = StepContext(phase="denoiser", inputs=inputs, tokenizer=None, denoiser=sit, normalizer=None,
                      encoders=[lambda images: tokens], transport=fm.transport,
                      plan=DenoiserPlan(feature_depths=(1,), needs_prediction=True))
    total = fm(ctx)["loss"] + 0.5 * repa(ctx)["loss"]
    total.backward()
    assert torch.isfinite(total) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in sit.parameters())


# -- tokenizer regularisers -----------------------------------------------------------------------------------------
def test_reconstruction_kinds_and_precision():
    x, r = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    r[0] = -1.0
    l1 = build_reconstruction(ReconstructionConfig(), CPU)
    assert l1(FakeStep(images=x, recon=r))["loss"].item() == pytest.approx(0.75)
    mse = build_reconstruction(ReconstructionConfig(kind="mse"), CPU)
    assert mse(FakeStep(images=x, recon=r))["loss"].item() == pytest.approx((1 + 0.25) / 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mse(FakeStep(images=x, recon=r.bfloat16()))["loss"]
    assert out.dtype == torch.float32
    with pytest.raises(UserError, match="reconstruction"):
        mse(FakeStep(images=x, recon=None))


def test_kl_by_hand_and_in_reduced_precision():
    mean, logvar = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    mean[0] = 1.0  # KL = 0.5 * 4 * 1 for sample 0
    logvar[1] = math.log(2.0)  # KL = 0.5 * 4 * (2 - 1 - log 2) for sample 1
    loss = build_kl(KLConfig(), CPU)
    want = (2.0 + 2 * (1 - math.log(2))) / 2
    assert loss(FakeStep(posterior=Posterior(mean, logvar)))["loss"].item() == pytest.approx(want)
    half = loss(FakeStep(posterior=Posterior(mean.bfloat16(), logvar.bfloat16())))["loss"]
    assert half.dtype == torch.float32 and half.item() == pytest.approx(want, rel=1e-2)
    with pytest.raises(UserError, match="posterior"):
        loss(FakeStep(posterior=None))


def test_golden_reconstruction_and_kl():
    meta, g = read_golden("repae_step.safetensors", float32=True)
    torch.testing.assert_close(g["images"].float() / 127.5 - 1, g["step.processed_image"])
    ctx = FakeStep(phase="tokenizer", images=g["step.processed_image"], recon=g["step.recon_image"],
                   posterior=Posterior(g["step.posterior_mean"], g["step.posterior_logvar"]))
    kl_loss = build_kl(KLConfig(weight=meta["repae"]["kl_weight"]), CPU)
    rec, kl = build_reconstruction(ReconstructionConfig(), CPU)(ctx)["loss"], kl_loss(ctx)["loss"]
    torch.testing.assert_close(rec, g["vae_loss.reconstruction_loss"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kl, g["vae_loss.kl_loss_unweighted"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kl_loss.weight("tokenizer") * kl, g["vae_loss.kl_loss"], atol=1e-5, rtol=1e-4)


# -- LPIPS ----------------------------------------------------------------------------------------------------------
def _random_lpips_files(tmp_path: Path) -> tuple[LPIPS, Path, Path]:
    """Random LPIPS weights saved in the real layouts: lpips' vgg.pth (heads) and torchvision's vgg16 file."""
    torch.manual_seed(0)
    model = LPIPS()
    for p in model.heads.parameters():
        p.data = p.data.abs()  # the released heads are non-negative
    heads = {f"lin{k}.model.1.weight": head.weight.detach().clone() for k, head in enumerate(model.heads)}
    vgg = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(4, 8)
    torch.save(heads, tmp_path / "vgg.pth")
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    return model, tmp_path / "vgg.pth", tmp_path / "vgg16-397923af.pth"


def test_lpips_loads_the_real_layouts_strictly(tmp_path):
    model, heads, vgg = _random_lpips_files(tmp_path)
    loss = build_lpips(LPIPSConfig(weights=str(heads), vgg_weights=str(vgg)), CPU)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loss.lpips.state_dict()[key], value, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loss.parameters())
    assert repae.supports(loss, repae.RecordsWeights) and set(loss.loaded_weights) == {"heads", "vgg"}
    for role, path in (("heads", heads), ("vgg", vgg)):
        info = loss.loaded_weights[role]
        assert (info.source, info.sha256) == (str(path), repae.file_sha256(path))
    # a full LPIPS state dict (heads + backbone as net.slice<k>.<j>) needs no separate VGG file
    slices = {3: 1, 8: 2, 15: 3, 22: 4, 29: 5}
    full = dict(torch.load(heads))
    for key, value in model.state_dict().items():
        if key.startswith("features."):
            index = int(key.split(".")[1])
            part = min(s for stop, s in slices.items() if index <= stop)
            full[f"net.slice{part}.{index}.{key.split('.')[2]}"] = value
    full["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    torch.save(full, tmp_path / "full.pth")
    again = build_lpips(LPIPSConfig(weights=str(tmp_path / "full.pth"), vgg_weights=str(tmp_path / "absent.pth")), CPU)
    torch.testing.assert_close(again.lpips.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert set(again.loaded_weights) == {"heads"}  # the backbone came with the heads
    assert not build_lpips(LPIPSConfig(), NO_WEIGHTS).loaded_weights  # nothing loaded, nothing recorded


def test_lpips_loading_errors_name_the_keys(tmp_path):
    _, heads, vgg = _random_lpips_files(tmp_path)
    partial = dict(torch.load(heads))
    del partial["lin4.model.1.weight"]
    partial["lin9.extra"] = torch.zeros(1)
    torch.save(partial, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match="lin9.extra"):
        build_lpips(LPIPSConfig(weights=str(tmp_path / "bad.pth"), vgg_weights=str(vgg)), CPU)
    del partial["lin9.extra"]
    torch.save(partial, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"lin4\.model\.1\.weight"):
        build_lpips(LPIPSConfig(weights=str(tmp_path / "bad.pth"), vgg_weights=str(vgg)), CPU)
    shape = dict(torch.load(heads))
    shape["lin0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    torch.save(shape, tmp_path / "shape.pth")
    with pytest.raises(WeightsMismatchError, match="shape"):
        build_lpips(LPIPSConfig(weights=str(tmp_path / "shape.pth"), vgg_weights=str(vgg)), CPU)


def test_lpips_default_sources_fail_cleanly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # as if the lpips package were absent
    with pytest.raises(UserError, match=r"vgg\.pth"):
        build_lpips(LPIPSConfig(), CPU)
    _, heads, _ = _random_lpips_files(tmp_path)
    with pytest.raises(UserError, match=r"vgg16-397923af\.pth"):
        build_lpips(LPIPSConfig(weights=str(heads)), CPU)


def test_lpips_distance_properties(tmp_path):
    model, heads, vgg = _random_lpips_files(tmp_path)
    loss = build_lpips(LPIPSConfig(weights=str(heads), vgg_weights=str(vgg)), CPU)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1  # 16 px: relu5_3 sees 1 x 1
    y = (x + 0.3 * torch.randn(2, 3, 16, 16, generator=g)).clamp(-1, 1)
    d_xx, d_xy, d_yx = loss.lpips(torch.cat([x, x, y]), torch.cat([x, y, x])).split(2)  # one pass: CPU VGG is slow
    assert d_xx.abs().max() < 1e-6 and (d_xy > 0).all()
    torch.testing.assert_close(d_yx, d_xy)
    recon = y.clone().requires_grad_(True)
    out = loss(FakeStep(phase="tokenizer", images=x, recon=recon))["loss"]
    out.backward()
    assert out.item() == pytest.approx(d_xy.mean().item()) and recon.grad.abs().sum() > 0
    loss.lpips.double_scale_inputs = True  # what `double_scale_inputs: true` builds
    torch.testing.assert_close(loss.lpips(x, y), model(2 * x - 1, 2 * y - 1))
    assert build_lpips(LPIPSConfig(double_scale_inputs=True), NO_WEIGHTS).lpips.double_scale_inputs


def test_lpips_real_side_has_no_autograd_and_same_values():
    """With one side requiring grad (the reconstruction), the other side's VGG features are computed without autograd:
    same distance and gradient as one concatenated pass (the reference's), less backward work (issue 9)."""
    torch.manual_seed(0)
    model = LPIPS()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 16, 16, generator=g)).clamp(-1, 1)
    both = y.clone().requires_grad_(True)
    concat = model(x.clone().requires_grad_(True), both)  # both sides with grad: the concatenated pass
    concat.sum().backward()
    seen: list[tuple[int, bool]] = []
    hook = model.features[0].register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], o.requires_grad)))
    for flipped in (False, True):
        recon = y.clone().requires_grad_(True)
        split = model(recon, x) if flipped else model(x, recon)
        split.sum().backward()
        torch.testing.assert_close(split, concat, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(recon.grad, both.grad, atol=1e-6, rtol=1e-5)
    hook.remove()
    assert sorted(seen) == [(2, False), (2, False), (2, True), (2, True)]  # one pass without autograd per call


# -- PatchGAN -------------------------------------------------------------------------------------------------------
def _constructor_kwargs(text: str) -> dict[str, Any]:
    """``{"input_nc": 3, ...}`` from a manifest's ``"NLayerDiscriminator(input_nc=3, ndf=64, ...)"``."""
    values = {"True": True, "False": False}
    return {k: values.get(v, int(v) if v.isdigit() else v) for k, v in re.findall(r"(\w+)=(\w+)", text)}


def test_patchgan_default_is_the_official_discriminator():
    """The default ``patchgan`` discriminator has the state-dict layout of REPA-E's (golden/manifests/
    discriminator.json: keys, shapes, parameter count), so its checkpoints load as they are."""
    meta, manifest = load_manifest("discriminator.json")
    official = _constructor_kwargs(meta["constructor"])
    loss = repae.create("loss", "patchgan", device="meta", registry=REGISTRY)
    assert (official["input_nc"], official["use_actnorm"]) == (3, False)  # what NLayerDiscriminator implements
    assert (loss.config.ndf, loss.config.n_layers) == (official["ndf"], official["n_layers"])
    state = loss.discriminator.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == list(manifest.items())
    assert sum(p.numel() for p in loss.discriminator.parameters()) == meta["num_parameters"]
    assert len(state) == meta["num_state_dict_entries"]
    for key, spec in meta["buffers"].items():
        assert str(state[key].dtype) == f"torch.{spec['dtype']}" and list(state[key].shape) == spec["shape"]


def test_patchgan_shapes_and_init():
    with torch.device("meta"):
        disc = NLayerDiscriminator()
        assert disc(torch.empty(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    torch.manual_seed(0)
    tiny = NLayerDiscriminator(ndf=8, n_layers=2)
    assert tiny(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 6, 6)
    conv = torch.cat([m.weight.flatten() for m in NLayerDiscriminator().modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(conv.std().item() - 0.02) < 1e-3 and abs(conv.mean().item()) < 1e-3
    # its BatchNorms are the shared global-batch primitive (affine, synchronised), one per stride-2/1 block
    bn = [m for m in tiny.modules() if isinstance(m, GlobalBatchNorm)]
    assert len(bn) == 2 and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in tiny.modules())
    assert all(m.affine and m.sync for m in bn) and all((m.bias == 0).all() for m in bn)
    assert all(abs(m.weight.mean().item() - 1) < 0.05 for m in bn)  # N(1, 0.02)
    per_process = build_patchgan(PatchGANConfig(ndf=8, n_layers=2, global_batch_norm=False), NO_WEIGHTS)
    assert [m.sync for m in per_process.discriminator.modules() if isinstance(m, GlobalBatchNorm)] == [False, False]


def test_hinge_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0


def test_patchgan_phases_and_start_step():
    torch.manual_seed(0)
    gan = build_patchgan(PatchGANConfig(ndf=8, n_layers=2, start_step=5), NO_WEIGHTS)
    x, r = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    bn = gan.discriminator.main[3]
    assert isinstance(bn, GlobalBatchNorm)
    early = gan(FakeStep(phase="tokenizer", step=4, images=x, recon=r))
    assert early["loss"].item() == 0 and bn.num_batches_tracked.item() == 1  # the discriminator still runs
    late = gan(FakeStep(phase="tokenizer", step=5, images=x, recon=r))
    assert late["loss"].item() == pytest.approx(-late["logits_fake"].item())
    late["loss"].backward()
    assert r.grad.abs().sum() > 0
    d = gan(FakeStep(phase="discriminator", step=5, images=x, recon=r))
    assert set(d) == {"loss", "logits_real", "logits_fake"} and d["loss"].requires_grad
    assert bn.num_batches_tracked.item() == 4


def _golden_discriminator(g: dict[str, torch.Tensor], meta: dict[str, Any], tmp_path: Path, **config: Any):
    """The loss of the reference step: its discriminator (size from the file's ``disc_config``, initial weights
    ``disc.*``) and its generator coefficient (``disc_weight``)."""
    from safetensors.torch import save_file

    disc = meta["disc_config"]
    assert disc["input_nc"] == 3  # RGB images, as NLayerDiscriminator reads
    state = official_weights(g, "disc.")
    save_file(state, str(tmp_path / "disc.safetensors"))
    torch.save({"discriminator": state, "steps": torch.tensor(0)}, tmp_path / "ckpt.pt")
    weight = {"tokenizer": meta["repae"]["disc_weight"], "discriminator": 1.0}
    return build_patchgan(PatchGANConfig(ndf=disc["ndf"], n_layers=disc["n_layers"], weight=weight,
                                         weights=str(tmp_path / "disc.safetensors"), **config), CPU)


def test_golden_patchgan(tmp_path):
    meta, g = read_golden("repae_step.safetensors", float32=True)
    opt = meta["repae"]
    gan = _golden_discriminator(g, meta, tmp_path)
    assert gan.loaded_weights["discriminator"].source == str(tmp_path / "disc.safetensors")
    x, r = g["step.processed_image"], g["step.recon_image"]
    # tokenizer phase first (the reference's first D call), with the discriminator frozen as the engine does
    gan.discriminator.requires_grad_(False)
    gen = gan(FakeStep(phase="tokenizer", images=x, recon=r))
    torch.testing.assert_close(gen["loss"], g["vae_loss.gan_loss"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gan.weight("tokenizer") * gen["loss"], g["vae_loss.weighted_gan_loss"],
                               atol=1e-5, rtol=1e-4)
    gan.discriminator.requires_grad_(True)
    d = gan(FakeStep(phase="discriminator", images=x, recon=r))
    for key in ("total", "logits_real", "logits_fake"):
        torch.testing.assert_close(d["loss" if key == "total" else key], g[f"d_loss.{key}"], atol=1e-5, rtol=1e-4)
    (gan.weight("discriminator") * d["loss"]).backward()
    for name, p in gan.discriminator.named_parameters():
        torch.testing.assert_close(p.grad.norm(), g[f"disc_grad_norm.{name}"], atol=1e-5, rtol=1e-4)
    norm = torch.nn.utils.clip_grad_norm_(gan.discriminator.parameters(), opt["max_grad_norm"])
    torch.testing.assert_close(norm, g["d_loss.grad_norm"], atol=1e-5, rtol=1e-4)
    torch.optim.AdamW(gan.discriminator.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["adam_eps"],
                      weight_decay=opt["weight_decay"]).step()
    for key, value in gan.discriminator.state_dict().items():  # incl. BN running stats after the 3 calls
        torch.testing.assert_close(value.to(g[f"disc_after.{key}"].dtype), g[f"disc_after.{key}"], atol=1e-4, rtol=0)


def test_patchgan_weights_from_a_training_checkpoint(tmp_path):
    meta, g = read_golden("repae_step.safetensors", float32=True)
    flat = _golden_discriminator(g, meta, tmp_path)
    disc = meta["disc_config"]
    ckpt = build_patchgan(PatchGANConfig(ndf=disc["ndf"], n_layers=disc["n_layers"], weights=str(tmp_path / "ckpt.pt")),
                          CPU)
    torch.testing.assert_close(ckpt.discriminator.state_dict(), flat.discriminator.state_dict(), rtol=0, atol=0)
    assert ckpt.loaded_weights["discriminator"].entry == "discriminator"
    assert ckpt.loaded_weights["discriminator"].sha256 == repae.file_sha256(tmp_path / "ckpt.pt")
    with pytest.raises(WeightsMismatchError, match="main.3.weight"):  # twice as wide does not fit the file
        build_patchgan(PatchGANConfig(ndf=2 * disc["ndf"], n_layers=disc["n_layers"],
                                      weights=str(tmp_path / "ckpt.pt")), CPU)


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    half = slice(2 * rank, 2 * rank + 2)
    loss = hinge_d_loss(disc(real[half]), disc(fake[half]))
    loss.backward()
    grads = [p.grad for p in disc.parameters()]
    for grad in grads:
        dist.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save({"grads": grads, "state": disc.state_dict()}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_patchgan_batchnorm_uses_the_global_batch(tmp_path):
    """Two processes with half the batch each give the gradients and statistics of one process with all of it (through
    repae.GlobalBatchNorm, the BatchNorm of the discriminator)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    assert [type(m) for m in disc.main if "BatchNorm" in type(m).__name__] == [GlobalBatchNorm, GlobalBatchNorm]
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    hinge_d_loss(disc(real), disc(fake)).backward()
    got = torch.load(out)
    for p, grad in zip(disc.parameters(), got["grads"]):
        torch.testing.assert_close(grad, p.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got["state"], disc.state_dict(), atol=1e-6, rtol=1e-5)


def test_config_docs_are_complete():
    for name in NAMES:
        for f in dataclasses.fields(REGISTRY.get("loss", name).config):
            assert f.metadata.get("repae_doc"), f"{name}.{f.name} has no doc"
