"""Tests of generation: labels, per-sample noise streams, decoding to uint8, the Euler–Maruyama SDE and DDPM samplers,
and ``repae sample`` on the quickstart run (npz layout and order, PNGs, resume, determinism, sharding, options)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from repae.build import BuildContext, build_component
from repae.errors import UserError
from repae.generate import (
    class_balanced_labels,
    decode_latents,
    generate,
    make_labels,
    random_labels,
    sample_generator,
    to_uint8,
)
from repae.interfaces import DenoiserOutput
from repae.plugins import load_plugins
from repae.sampling import SamplingSettings
from repae_losses.ddpm import DDPMTransport
from repae_samplers.base import VelocityField
from repae_samplers.ddpm import DDPMSampler, RespacedSchedule, respaced_steps
from repae_samplers.sde import EulerMaruyamaSampler, sde_time_grid

REGISTRY = load_plugins(select={"repae"}).registry


def sampler(name: str, **section):
    entry = REGISTRY.get("sampler", name)
    config, issues = entry.parse(section)
    assert not issues, issues
    return build_component(entry, config, BuildContext())


# -- labels, noise streams, decoding ---------------------------------------------------------------------------------


def test_class_balanced_labels():
    labels = class_balanced_labels(50, 10, seed=3)
    assert labels.dtype == torch.long and labels.shape == (50,)
    assert torch.bincount(labels, minlength=10).tolist() == [5] * 10
    assert not torch.equal(labels, torch.arange(50) % 10)  # shuffled
    assert torch.equal(labels, class_balanced_labels(50, 10, seed=3))
    assert not torch.equal(labels, class_balanced_labels(50, 10, seed=4))
    # not a multiple: the first num % C classes get one more
    assert torch.bincount(class_balanced_labels(23, 10, seed=0), minlength=10).tolist() == [3, 3, 3] + [2] * 7
    assert torch.bincount(class_balanced_labels(4, 10, seed=0), minlength=10).tolist() == [1] * 4 + [0] * 6


def test_random_labels_and_modes():
    labels = random_labels(200, 7, seed=1)
    assert labels.min() >= 0 and labels.max() < 7 and torch.equal(labels, random_labels(200, 7, seed=1))
    assert torch.equal(make_labels(200, 7, mode="random", seed=1), labels)
    assert torch.equal(make_labels(20, 7, mode="balanced", seed=1), class_balanced_labels(20, 7, seed=1))
    with pytest.raises(UserError, match="balanced"):
        make_labels(10, 3, mode="equal")
    with pytest.raises(UserError, match="classes"):
        class_balanced_labels(10, 0, seed=0)


def test_sample_generators_depend_on_seed_and_index_only():
    draw = lambda s, i: torch.randn(8, generator=sample_generator(s, i))  # noqa: E731
    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))
    assert not torch.equal(draw(0, 1), draw(1, 0))


class Identity(nn.Module):
    """A "tokenizer" whose decode returns its 3-channel input; records the mode it decoded in."""

    latent_channels, downsample = 3, 1

    def decode(self, z):
        self.decoded_in_training = self.training
        return z * 1.0


class Affine(nn.Module):
    def denormalize(self, x):
        return 2.0 * x + 0.5


def test_decode_latents_mapping():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 7.0]).view(1, 1, 1, 8).expand(2, 3, 1, 8)
    expected = [0, 0, 64, 128, 159, 191, 255, 255]  # round((clamp(x) + 1) * 127.5), ties to even (127.5 -> 128)
    tokenizer = Identity().train()
    images = decode_latents(tokenizer, None, x.double())
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 1, 8)
    assert images[0, 0, 0].tolist() == expected
    assert tokenizer.training and not tokenizer.decoded_in_training  # decoded in eval mode, mode restored
    # through the normaliser: 2 x + 0.5
    z = (x - 0.5) / 2.0
    assert torch.equal(decode_latents(tokenizer, Affine(), z), images)
    assert to_uint8(torch.tensor([0.999, -0.999])).tolist() == [255, 0]


# -- toy denoisers with known exact answers --------------------------------------------------------------------------

MEAN, STD = 1.0, 0.5  # data distribution N(MEAN, STD^2), one latent channel


class GaussianFlow(nn.Module):
    """The exact velocity ``E[eps - x0 | x_t]`` of the linear path for data N(MEAN, STD^2) (t = 1 is noise)."""

    num_classes = 2
    class_dropout_prob = 0.1  # labels do not matter; the null class exists

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y, **kwargs):
        t, x = t.double().view(-1, 1, 1, 1), x.double()
        var = (1 - t) ** 2 * STD**2 + t**2
        r = x - (1 - t) * MEAN
        return DenoiserOutput(prediction=(t / var * r - (MEAN + (1 - t) * STD**2 / var * r)).float())


class GaussianEps(nn.Module):
    """The exact noise prediction ``E[eps | x_k]`` of DDPM's step ``k`` for data N(MEAN, STD^2), plus constant
    variance values (learned-range channels) when ``var`` is given."""

    num_classes = 2
    class_dropout_prob = 0.1  # labels do not matter; the null class exists

    def __init__(self, var: float | None = None) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))
        self.abar = DDPMTransport().alphas_cumprod
        self.var = var
        self.times: list[float] = []

    def forward(self, x, t, y, **kwargs):
        self.times.append(float(t[0]))
        abar = self.abar[t.long()].view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() / (abar * STD**2 + 1 - abar) * (x.double() - abar.sqrt() * MEAN)
        eps = eps.float()
        return DenoiserOutput(prediction=eps if self.var is None else torch.cat([eps, torch.full_like(eps, self.var)],
                                                                               dim=1))


class LinearToy(nn.Module):
    """``v = a * x + b[y] + c * t`` per channel: a field with labels, time and state dependence."""

    class_dropout_prob = 0.1  # b has the null row

    def __init__(self, channels: int = 3, num_classes: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.num_classes = num_classes
        self.a = nn.Parameter(torch.linspace(-0.5, 0.5, channels))
        self.b = nn.Parameter(torch.randn(num_classes + 1, channels, generator=gen))
        self.c = nn.Parameter(torch.randn(channels, generator=gen))

    def velocity(self, x, t, y):
        """The same field in float64 (for the hand-written reference)."""
        a, b, c = (p.detach().double() for p in (self.a, self.b, self.c))
        return a.view(1, -1, 1, 1) * x + b[y].view(len(y), -1, 1, 1) + c.view(1, -1, 1, 1) * t

    def forward(self, x, t, y, **kwargs):
        return DenoiserOutput(prediction=self.velocity(x.double(), t.double().view(-1, 1, 1, 1), y).float())


def reference_euler_maruyama(model, x, y, gens, *, steps, scale, low, high, last=0.04):
    """REPA-E's ``euler_maruyama_sampler`` written out for the toy: drift from velocity and score, guidance on the
    drift, noise ``sqrt(2 t) sqrt(|dt|) eps`` per sample, deterministic mean step from ``last`` to 0."""
    t_steps = torch.cat([torch.linspace(1.0, last, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    null = torch.full_like(y, model.num_classes)

    def drift(x, t, labels):
        v = model.velocity(x, t, labels)
        score = (-(1 - t) * v - x) / t  # linear path: alpha = 1 - t, sigma = t
        return v - 0.5 * (2 * t) * score

    x = x.double()
    for i in range(steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        dt = t_next - t_cur
        d = drift(x, t_cur, y)
        if scale != 1 and low <= t_cur <= high:
            d_u = drift(x, t_cur, null)
            d = d_u + scale * (d - d_u)
        if i < steps - 1:
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).double()
            x = x + d * dt + math.sqrt(2 * t_cur) * math.sqrt(abs(dt)) * eps
        else:
            x = x + dt * d
    return x


# -- Euler–Maruyama --------------------------------------------------------------------------------------------------


def test_sde_registered_with_reference_defaults():
    s = sampler("euler-maruyama")
    assert isinstance(s, EulerMaruyamaSampler)
    assert (s.config.steps, s.config.last_step, s.config.cfg_channels) == (250, 0.04, None)
    grid = sde_time_grid(5)
    assert grid.dtype == torch.float64 and grid.tolist() == pytest.approx([1.0, 0.76, 0.52, 0.28, 0.04, 0.0])
    for bad in ({"steps": 0}, {"last_step": 0.0}, {"last_step": 1.0}):
        assert REGISTRY.get("sampler", "euler-maruyama").parse(bad)[1], bad


@pytest.mark.parametrize("scale, interval", [(1.0, (0.0, 1.0)), (2.5, (0.0, 0.65)), (1.5, (0.3, 0.8))])
def test_sde_matches_hand_written_reference(scale, interval):
    model, y = LinearToy(), torch.tensor([0, 2, 1])
    noise = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    s = sampler("euler-maruyama", steps=12, cfg_scale=scale, guidance_low=interval[0], guidance_high=interval[1])
    out = s(model, noise.double(), y, generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    ref = reference_euler_maruyama(model, noise, y, [torch.Generator().manual_seed(10 + i) for i in range(3)],
                                   steps=12, scale=scale, low=interval[0], high=interval[1])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # the model runs in float32
    assert s.last_calls == 12 and s.last_draws == 11  # no noise on the last step


def test_sde_noise_is_per_sample_and_reproducible():
    model, y = LinearToy(), torch.tensor([0, 1, 2, 0])
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(6))
    s = sampler("euler-maruyama", steps=6, cfg_scale=2.0)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    together = s(model, noise, y, generator=gens(range(4)))
    apart = torch.cat([s(model, noise[:1], y[:1], generator=gens([0])),
                       s(model, noise[1:], y[1:], generator=gens([1, 2, 3]))])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-6)  # batch composition does not matter
    assert torch.equal(s(model, noise, y), s(model, noise, y))  # no generator: a fixed default seed
    one = torch.Generator().manual_seed(1)
    assert not torch.equal(s(model, noise, y, generator=one), s(model, noise, y, generator=one))  # stream advances
    with pytest.raises(UserError, match="generators"):
        s(model, noise, y, generator=gens(range(3)))


@pytest.mark.parametrize("name, steps", [("euler-maruyama", 100), ("euler", 50)])
def test_samples_follow_the_data_distribution(name, steps):
    noise = torch.randn(250, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # 4000 independent values
    out = sampler(name, steps=steps)(GaussianFlow(), noise, torch.zeros(250, dtype=torch.long),
                                     generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - MEAN) < 0.04 and abs(out.std().item() - STD) < 0.04


# -- DDPM ------------------------------------------------------------------------------------------------------------


def test_respacing_follows_adm():
    assert respaced_steps(1000, 1000) == list(range(1000))
    kept = respaced_steps(1000, 250)
    assert len(kept) == 250 and kept[:5] == [0, 4, 8, 12, 16] and kept[-3:] == [991, 995, 999]
    assert respaced_steps(10, 4) == [0, 3, 6, 9] and respaced_steps(1000, 1) == [0]
    # all steps kept: the ddpm loss's own tables
    full, base = RespacedSchedule(1000, 1000), DDPMTransport(1000)
    for key in ("betas", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        torch.testing.assert_close(getattr(full, key), getattr(base, key), rtol=1e-12, atol=1e-15)
    # respaced: the kept cumulative products are the base ones
    short = RespacedSchedule(1000, 250)
    torch.testing.assert_close(short.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)


def test_ddpm_config_defaults():
    s = sampler("ddpm")
    assert isinstance(s, DDPMSampler)
    assert (s.config.steps, s.config.num_timesteps, s.config.cfg_channels, s.config.variance) == (250, 1000, 3, "auto")
    for bad in ({"steps": 0}, {"steps": 1001}, {"variance": "big"}, {"beta_start": 0.1}):
        assert REGISTRY.get("sampler", "ddpm").parse(bad)[1], bad


@pytest.mark.parametrize("var, variance, tol", [(None, "auto", 0.05), (0.0, "auto", 0.03), (-1.0, "learned", 0.06)])
def test_ddpm_samples_follow_the_data_distribution(var, variance, tol):
    model = GaussianEps(var)
    noise = torch.randn(250, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # 4000 independent values
    s = sampler("ddpm", steps=100, variance=variance)
    out = s(model, noise, torch.zeros(250, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - MEAN) < 0.03 and abs(out.std().item() - STD) < tol
    assert model.times[0] == 999.0 and model.times[-1] == 0.0 and len(model.times) == 100
    assert s.last_draws == 99  # no noise on the last step


def tiny_dit(**overrides):
    from conftest import build_section

    section = dict(size="tiny", input_size=4, in_channels=4, num_classes=5, encoder_dims=[], **overrides)
    model = build_section(REGISTRY, "denoiser", "dit", **section).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would make every sample the same
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_ddpm_with_tiny_dit_shapes_and_determinism():
    model, y = tiny_dit(), torch.tensor([0, 3, 5 - 1])
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    s = sampler("ddpm", steps=5, cfg_scale=1.5)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    out = s(model, noise, y, generator=gens())
    assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert s.last_calls == 5
    assert torch.equal(out, s(model, noise, y, generator=gens()))
    assert not torch.equal(out, s(model, noise, y, generator=[torch.Generator().manual_seed(9)] * 3))
    apart = torch.cat([s(model, noise[i:i + 1], y[i:i + 1], generator=[gens()[i]]) for i in range(3)])
    torch.testing.assert_close(out, apart, rtol=1e-4, atol=1e-4)  # float32 batch effects only
    # fixed variance on a model without variance channels
    plain = tiny_dit(learn_sigma=False)
    assert sampler("ddpm", steps=3)(plain, noise, y).shape == noise.shape
    with pytest.raises(UserError, match="learned"):
        sampler("ddpm", steps=3, variance="learned")(plain, noise, y)


def test_ddpm_guidance_is_dit_forward_with_cfg():
    """The guided prediction (first 3 channels mixed, the rest and the variance from the conditional pass) equals the
    conditional half of DiT's forward_with_cfg."""
    model, y = tiny_dit(), torch.tensor([1, 2])
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(500.0, dtype=torch.float64)
    for channels in (3, None):
        field = VelocityField(model, y, scale=2.0, interval=(0.0, 1.0), channels=channels, dtype=torch.float32,
                              keep_extra=True)
        ours = field(x.double(), t, guided=True)
        null = torch.full_like(y, model.num_classes)
        theirs = model.forward_with_cfg(torch.cat([x, x]), torch.full((4,), 500.0), torch.cat([y, null]), 2.0,
                                        guided_channels=3 if channels else 4)[:2]
        assert ours.shape == (2, 8, 4, 4)
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-6)


def test_ddpm_guidance_interval_in_ddpm_time():
    model = GaussianEps()
    s = sampler("ddpm", steps=5, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.5)
    calls = []
    original = model.forward
    model.forward = lambda x, t, y, **kw: (calls.append((float(t[0]), len(y))), original(x, t, y))[1]
    s(model, torch.randn(2, 1, 1, 1), torch.tensor([0, 1]))
    # steps 999, 749, 500, 250, 0 (t = k / 999): guided (doubled batch) where t <= 0.5
    assert calls == [(999.0, 2), (749.0, 2), (500.0, 2), (250.0, 4), (0.0, 4)]


# -- generate() and `repae sample` on the quickstart run ------------------------------------------------------------


@pytest.fixture(scope="module")
def opened(quick_run):
    from repae.runs import open_run

    return open_run(quick_run, slots=("tokenizer", "encoders", "latent_norm", "denoiser", "sampler"))


def test_generate_is_independent_of_batching(opened):
    labels = class_balanced_labels(5, 10, seed=0)
    s = sampler("euler-maruyama", steps=3, cfg_scale=2.0)
    whole = dict(item for batch, images in generate(opened, labels, seed=7, sampler=s, batch_size=5)
                 for item in zip(batch, images))
    split = {}
    for part in ([4, 0], [3, 1, 2]):
        for batch, images in generate(opened, labels, indices=part, seed=7, sampler=s, batch_size=2):
            split.update(zip(batch, images))
    assert sorted(whole) == sorted(split) == list(range(5))
    for i in range(5):
        assert whole[i].shape == (3, 32, 32) and whole[i].dtype == torch.uint8
        assert (whole[i].int() - split[i].int()).abs().max() <= 1, i  # same noise; float32 batch effects only


def cli():
    from repae.cli.sample import sample

    app = typer.Typer()
    app.command("sample")(sample)
    app.callback()(lambda: None)
    return app


def run_sample(*args):
    result = CliRunner().invoke(cli(), ["sample", *map(str, args), "--no-progress"])
    return result


def read_npz(path):
    with np.load(path) as data:
        assert data.files == ["arr_0"]
        return data["arr_0"]


@pytest.fixture(scope="module")
def first_samples(quick_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "a"
    result = run_sample(quick_run, "--num", 6, "--steps", 2, "--batch-size", 4, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_cli_writes_npz_pngs_and_settings(first_samples, quick_run):
    arr = read_npz(first_samples / "samples.npz")
    assert arr.shape == (6, 32, 32, 3) and arr.dtype == np.uint8
    pngs = sorted((first_samples / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    for i, p in enumerate(pngs):  # the npz is in index order and equals the PNGs
        assert np.array_equal(np.asarray(Image.open(p)), arr[i])
    meta = json.loads((first_samples / "sampling.json").read_text())
    settings = meta["settings"]
    assert meta["status"] == "done" and meta["npz"] == "samples.npz"
    # the SamplingSettings of the command line, then what they resolved to for this run
    fields = [f.name for f in dataclasses.fields(SamplingSettings)]
    assert set(settings) == {*fields, "checkpoint", "step", "sampler_config", "latent_shape"}
    given = SamplingSettings(num=6, steps=2)
    assert {name: settings[name] for name in fields} == given.to_json()  # the command line's settings, all of them
    assert SamplingSettings(**{name: settings[name] for name in fields}).to_json() == given.to_json()
    config = settings["sampler_config"]
    assert settings["sampler"] is None and config["name"] == "euler"  # the recipe's sampler ...
    assert settings["steps"] == config["steps"] == 2  # ... with the steps overridden
    # not overridden: the recipe sampler's own guidance
    assert settings["cfg_scale"] is None and settings["guidance_interval"] is None
    assert (config["cfg_scale"], config["guidance_low"], config["guidance_high"]) == (4.0, 0.0, 1.0)
    assert (settings["num"], settings["seed"], settings["labels"], settings["ema"], settings["step"]) == \
        (6, 0, "balanced", True, 4)
    assert settings["checkpoint"].endswith("step-0000004") and settings["latent_shape"] == [4, 8, 8]
    assert len({arr[i].tobytes() for i in range(6)}) == 6


def test_cli_resume_skips_valid_pngs(first_samples, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(first_samples, out)
    before = read_npz(out / "samples.npz")
    (out / "images" / "000002.png").unlink()
    (out / "images" / "000004.png").write_bytes(b"not a png")
    kept = (out / "images" / "000000.png").stat().st_mtime_ns
    run_dir = json.loads((out / "sampling.json").read_text())["settings"]["checkpoint"]
    result = run_sample(run_dir, "--num", 6, "--steps", 2, "--batch-size", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "sampling.json").read_text())["made_this_time"] == 2
    assert (out / "images" / "000000.png").stat().st_mtime_ns == kept
    assert np.array_equal(read_npz(out / "samples.npz"), before)
    again = run_sample(run_dir, "--num", 6, "--steps", 2, "--out", out)
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = run_sample(run_dir, "--num", 6, "--steps", 3, "--out", out)  # other settings: refused
    # both the given setting and the sampler config it resolved to changed
    assert other.exit_code == 2 and "other settings (sampler_config.steps: 2 -> 3, steps: 2 -> 3)" in other.output


def test_cli_same_seed_same_npz_other_seed_differs(first_samples, quick_run, tmp_path):
    same = run_sample(quick_run, "-n", 6, "--steps", 2, "--batch-size", 6, "--out", tmp_path / "same")
    other = run_sample(quick_run, "--num-samples", 6, "--steps", 2, "--seed", 1, "--out", tmp_path / "other")
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    reference = read_npz(first_samples / "samples.npz")
    assert np.abs(read_npz(tmp_path / "same" / "samples.npz").astype(int) - reference).max() <= 1
    assert not np.array_equal(read_npz(tmp_path / "other" / "samples.npz"), reference)


def test_cli_sampler_options(quick_run, tmp_path):
    out = tmp_path / "sde"
    result = run_sample(quick_run / "checkpoints" / "step-0000002", "--num", 3, "--sampler", "euler-maruyama",
                        "--steps", 3, "--cfg", 1.8, "--guidance-interval", 0, 0.65, "--cfg-channels", 3,
                        "--labels", "random", "--no-ema", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "sampling.json").read_text())["settings"]
    assert settings["sampler_config"] == {"name": "euler-maruyama", "cfg_scale": 1.8, "guidance_low": 0.0,
                                          "guidance_high": 0.65, "cfg_channels": 3, "steps": 3, "last_step": 0.04}
    assert (settings["sampler"], settings["steps"], settings["cfg_scale"], settings["cfg_channels"]) == \
        ("euler-maruyama", 3, 1.8, 3)
    assert settings["guidance_interval"] == [0.0, 0.65] and settings["step"] == 2 and settings["ema"] is False
    assert settings["labels"] == "random" and read_npz(out / "samples.npz").shape == (3, 32, 32, 3)
    for args, message in (
        (["--labels", "equal"], "balanced"),
        (["--guidance-interval", 0.8, 0.2], "guidance_low"),
        (["--sampler", "nope"], "nope"),
        (["--num", 0], "--num"),
        (["--cfg-channels", "x"], "cfg-channels"),
    ):
        bad = run_sample(quick_run, *args, "--out", tmp_path / "bad")
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path, "no checkpoint")):
        bad = run_sample(path, "--out", tmp_path / "bad")
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)


def test_cli_uses_the_hosts_plugins_and_shows_their_failures(quick_run, tmp_path, fake_dists, monkeypatch):
    """`repae sample` loads the plugins once (the CLI's host, whose load failures it reports), not a second time."""
    import repae.build

    fake_dists.add("repae-broken", {"broken": "repae_broken"}, modules={"repae_broken": "raise ImportError('boom')"})
    monkeypatch.setenv("REPAE_PLUGINS", "repae,repae-broken")

    def second_load():
        raise AssertionError("the plugins were loaded a second time")

    monkeypatch.setattr(repae.build, "default_registry", second_load)
    result = run_sample(quick_run, "--num", 1, "--sampler", "euler", "--steps", 1, "--out", tmp_path / "one")
    assert result.exit_code == 0, result.output
    assert "repae-broken" in result.output and "boom" in result.output
    assert read_npz(tmp_path / "one" / "samples.npz").shape == (1, 32, 32, 3)


def test_default_output_dir_name(opened):
    from repae.sampling import build_sampler, default_dirname

    settings = SamplingSettings(sampler="euler-maruyama", steps=250, cfg_scale=1.8, guidance_interval=(0.0, 0.65))
    name, s = build_sampler(opened, settings, registry=REGISTRY)
    assert (s.config.steps, s.config.cfg_scale, s.config.guidance_low, s.config.guidance_high) == (250, 1.8, 0.0, 0.65)
    assert default_dirname(opened, name, s.config, settings) == "step-0000004_euler-maruyama-250_cfg1.8-0-0.65_seed0"
    settings = SamplingSettings(seed=3, ema=False)
    name, s = build_sampler(opened, settings)  # the run's recipe sampler with its settings
    assert default_dirname(opened, name, s.config, settings) == "step-0000004_euler-20_cfg4_seed3_raw"


def test_sampling_settings_are_checked_and_serialised():
    settings = SamplingSettings(num=4, guidance_interval=(0.0, 0.65), cfg_channels="all")
    assert settings.to_json() == {"num": 4, "seed": 0, "labels": "balanced", "ema": True, "sampler": None,
                                  "steps": None, "cfg_scale": None, "guidance_interval": [0.0, 0.65],
                                  "cfg_channels": "all"}
    json.dumps(settings.to_json())  # what sampling.json holds
    for fields, message in (({"num": 0}, "--num"), ({"labels": "equal"}, "--labels equal"), ({"steps": 0}, "--steps"),
                            ({"cfg_channels": 0}, "--cfg-channels")):
        with pytest.raises(UserError, match=message):
            SamplingSettings(**fields)


def test_sample_run_api_matches_the_cli(first_samples, quick_run, tmp_path):
    """`repae sample` is a thin front end: the library call with the same settings makes the same samples."""
    from repae.sampling import sample_run

    said = []
    folder = sample_run(quick_run, SamplingSettings(num=6, steps=2), out=tmp_path / "api", batch_size=3,
                        device="cpu", progress=False, registry=REGISTRY, echo=said.append)
    assert folder == tmp_path / "api" and len(said) == 2 and "wrote" in said[0]
    assert said[1].startswith(f"contact sheet: {folder / 'contact_sheet.png'} (")
    reference = read_npz(first_samples / "samples.npz")
    assert np.abs(read_npz(folder / "samples.npz").astype(int) - reference).max() <= 1  # float32 batch effects only
    ours = json.loads((folder / "sampling.json").read_text())["settings"]
    assert ours == json.loads((first_samples / "sampling.json").read_text())["settings"]
    # the default folder: RUN/samples/<default_dirname> (in a copy: the session's run is shared)
    run = tmp_path / "run"
    shutil.copytree(quick_run, run, ignore=shutil.ignore_patterns("step-0000004", "samples", "analysis"))
    default = sample_run(run, SamplingSettings(num=1, steps=1, seed=5), device="cpu", progress=False,
                         registry=REGISTRY, echo=said.append)
    assert default == run / "samples" / "step-0000002_euler-1_cfg4_seed5"
    assert read_npz(default / "samples.npz").shape == (1, 32, 32, 3)


# -- the contact sheet -----------------------------------------------------------------------------------------------


def test_contact_sheet_rows_are_the_first_samples_of_the_first_classes():
    from repae.sampling import contact_sheet_rows

    labels = make_labels(200, 10, mode="balanced", seed=3).tolist()
    rows = contact_sheet_rows(labels, 10)
    assert [label for label, _ in rows] == list(range(8))  # the first 8 classes, by id
    for label, indices in rows:  # each: the first 8 samples of its class, in index order
        assert indices == [i for i, y in enumerate(labels) if y == label][:8]
    # few samples: a row per class present (classes 0..5 of 10), as many samples as there are
    few = contact_sheet_rows([4, 0, 2, 0, 5, 1, 3], 10)
    assert few == [(0, [1, 3]), (1, [5]), (2, [2]), (3, [6]), (4, [0]), (5, [4])]
    # unconditional: the first 64 samples, 8 to a row, no classes
    plain = contact_sheet_rows([0] * 100, 1)
    assert plain == [(None, list(range(r * 8, r * 8 + 8))) for r in range(8)]
    assert contact_sheet_rows([0] * 10, 1) == [(None, list(range(8))), (None, [8, 9])]


def test_image_grid_scales_small_tiles_up_sharply_and_labels_rows():
    from repae.sampling import image_grid

    rng = np.random.default_rng(0)
    tiles = [[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(8)] for _ in range(2)]
    grid = np.asarray(image_grid(tiles, labels=["class 0", "class 1"]))
    assert grid.shape[1] >= 512 and grid.shape[0] == 2 + 2 * (64 + 2)  # 32-px tiles x2: 8 x 64 = 512 px
    right = grid.shape[1]
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = 2 + r * 66, right - (8 - c) * 66
            assert np.array_equal(grid[top:top + 64, left:left + 64], tile.repeat(2, 0).repeat(2, 1)), (r, c)
        margin = grid[2 + r * 66:2 + r * 66 + 64, :right - 8 * 66]
        assert margin.shape[1] > 10 and (margin < 128).any()  # the row's label, in black
    big = [[np.zeros((256, 256, 3), np.uint8)] * 4]
    assert np.asarray(image_grid(big)).shape == (2 + 256 + 2, 2 + 4 * 258, 3)  # wide enough: not scaled, no margin


def test_cli_writes_a_class_balanced_contact_sheet(first_samples, quick_run):
    sheet = first_samples / "contact_sheet.png"
    assert sheet.is_file()
    assert json.loads((first_samples / "sampling.json").read_text())["contact_sheet"] == "contact_sheet.png"
    classes = int(yaml.safe_load((quick_run / "recipe.yaml").read_text())["denoiser"]["num_classes"])
    labels = make_labels(6, classes, mode="balanced", seed=0).tolist()  # 6 samples over the quickstart's classes
    rows = min(6, classes)
    image = np.asarray(Image.open(sheet).convert("RGB"))
    assert image.shape[1] >= 512 and image.shape[0] == 2 + rows * (64 + 2)  # a row per class; 32 px tiles x2
    for row in range(rows):  # 8 columns (the first 8 samples of each class), the first filled
        index = labels.index(row)
        sample = np.asarray(Image.open(first_samples / "images" / f"{index:06d}.png"))
        top, left = 2 + row * 66, image.shape[1] - 8 * 66
        assert np.array_equal(image[top:top + 64, left:left + 64], sample.repeat(2, 0).repeat(2, 1)), row


def test_cli_json_is_alone_on_stdout_with_progress_and_notes_on_stderr(quick_run, tmp_path):
    out = tmp_path / "json"
    result = CliRunner().invoke(cli(), ["sample", str(quick_run), "-n", "2", "--steps", "1", "--out", str(out),
                                        "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["status"] == "done" and summary["settings"]["num"] == 2
    assert summary["npz"] == str(out / "samples.npz") and summary["contact_sheet"] == str(out / "contact_sheet.png")
    assert read_npz(summary["npz"]).shape == (2, 32, 32, 3) and Image.open(summary["contact_sheet"]).width >= 512
    assert "sample 2/2 (100%)" in result.stderr  # plain progress lines: stderr is not a terminal here
    assert "wrote " in result.stderr and f"contact sheet: {out / 'contact_sheet.png'}" in result.stderr
