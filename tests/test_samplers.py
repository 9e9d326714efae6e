"""Tests of the ODE samplers ``euler`` and ``heun``: registry and configs, guidance semantics on toy velocity fields,
and the official REPA-E ``euler_sampler`` (golden/sampler_ode.safetensors: final samples and every model call)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import repae
from conftest import sampler_golden_sit
from repae.errors import UserError
from repae.interfaces import DenoiserOutput
from repae.plugins import load_plugins
from repae_samplers.ode import EulerSampler, HeunSampler, time_grid

REGISTRY = load_plugins(select={"repae"}).registry


def sampler(name: str, **section):
    return repae.create("sampler", name, registry=REGISTRY, **section)


class Recorder(nn.Module):
    """Wraps a denoiser and logs every call ``(x, t, y, prediction)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.class_dropout_prob = model.class_dropout_prob
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def forward(self, x, t, y, **kwargs):
        out = self.model(x, t, y, **kwargs)
        self.calls.append((x, t, y, out.prediction))
        return out


class Toy(nn.Module):
    """A velocity "denoiser": ``v = a * x + b[y]`` per channel, optionally with extra (learned-sigma) channels."""

    class_dropout_prob = 0.1  # the label table has the null row (b has num_classes + 1 rows)

    def __init__(self, channels: int = 4, num_classes: int = 3, extra: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.a = nn.Parameter(torch.linspace(-0.5, 0.5, channels))
        self.b = nn.Parameter(torch.randn(num_classes + 1, channels, generator=torch.Generator().manual_seed(0)))
        self.extra = extra
        self.ts: list[torch.Tensor] = []

    def forward(self, x, t, y, **kwargs):
        self.ts.append(t)
        v = self.a.view(1, -1, 1, 1) * x + self.b[y].view(len(y), -1, 1, 1) + 0.0 * t.view(-1, 1, 1, 1)
        if self.extra:
            v = torch.cat([v, torch.full_like(v[:, : self.extra], 1e3)], dim=1)
        return DenoiserOutput(prediction=v)


# -- registry, configs -----------------------------------------------------------------------------------------------


def test_registered_with_validated_configs():
    assert {"euler", "heun"} <= set(REGISTRY.names("sampler"))
    entry = REGISTRY.get("sampler", "heun")
    config, issues = entry.parse({"steps": 8, "cfg_scale": 2.0, "guidance_high": 0.7, "cfg_channels": 3})
    assert not issues and (config.steps, config.cfg_scale, config.guidance_high, config.cfg_channels) == (8, 2, 0.7, 3)
    for bad in ({"steps": 0}, {"guidance_low": 0.8, "guidance_high": 0.5}, {"cfg_channels": 0}, {"step": 3}):
        assert entry.parse(bad)[1], bad
    assert isinstance(sampler("euler"), EulerSampler) and isinstance(sampler("heun"), HeunSampler)


def test_time_grid_is_float64_linspace():
    grid = time_grid(8)
    assert grid.dtype == torch.float64
    assert grid.tolist() == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


# -- semantics on toy fields -----------------------------------------------------------------------------------------


def test_constant_velocity_is_integrated_exactly_and_calls_counted():
    model = Toy()
    with torch.no_grad():
        model.a.zero_()
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    expected = noise - model.b[y].detach().view(2, 4, 1, 1)  # x(0) = x(1) - v
    for name, calls in (("euler", 5), ("heun", 9)):
        s = sampler(name, steps=5)
        torch.testing.assert_close(s(model, noise, y), expected)
        assert s.last_calls == calls


def test_guidance_interval_scale_and_channels():
    model, y = Toy(), torch.tensor([1, 0])
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    s = sampler("euler", steps=4, cfg_scale=3.0, guidance_low=0.3, guidance_high=0.6)
    rec = Recorder(model)
    s(rec, noise, y)
    assert [len(c[2]) for c in rec.calls] == [2, 2, 4, 2]  # t = 1, 0.75, 0.5 (guided), 0.25
    assert rec.calls[2][2].tolist() == [1, 0, 3, 3]  # [labels; null = num_classes]

    # per-call overrides, and guiding only the first channels (the DiT/SiT convention)
    b = model.b.detach()
    with torch.no_grad():
        model.a.zero_()
    cond, null = b[y].view(2, 4, 1, 1), b[3].view(1, 4, 1, 1)
    for channels in (None, 3):
        s = sampler("euler", steps=2, cfg_channels=channels)
        out = s(model, noise, y, cfg_scale=2.0, guidance=(0.0, 1.0))
        v = null + 2.0 * (cond - null)
        if channels is not None:
            v = torch.cat([v[:, :channels], cond[:, channels:].expand_as(v[:, channels:])], dim=1)
        torch.testing.assert_close(out, noise - v)
    torch.testing.assert_close(sampler("euler", steps=2, cfg_scale=2.0)(model, noise, y, cfg_scale=1.0), noise - cond)


def test_dtypes_modes_learned_sigma_and_errors():
    model = Toy(extra=4).train()
    noise = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2])
    s = sampler("heun", steps=3)
    out = s(model, noise, y)
    assert out.dtype == torch.float32 and out.shape == noise.shape and out.abs().max() < 100  # sigma channels cut
    assert model.training and not out.requires_grad  # mode restored, no graph
    assert all(t.dtype == torch.float32 for t in model.ts)  # model called in its own dtype
    assert s(model, noise.double(), y).dtype == torch.float64
    with pytest.raises(UserError, match="labels"):
        s(model, noise, y[:2])
    with pytest.raises(UserError, match="above"):
        s(model, noise, y, guidance=(0.9, 0.1))


def test_guidance_without_null_row_is_a_clear_error():
    model = repae.create("denoiser", "sit", registry=REGISTRY, size="tiny", input_size=4, in_channels=4,
                         num_classes=5, encoder_dims=[], class_dropout_prob=0.0)
    noise, y = torch.randn(2, 4, 4, 4), torch.tensor([0, 1])
    with pytest.raises(UserError, match="null"):
        sampler("euler", steps=2, cfg_scale=1.5)(model, noise, y)
    assert sampler("euler", steps=2)(model, noise, y).shape == noise.shape  # no guidance: fine


# -- golden: the official REPA-E euler_sampler -----------------------------------------------------------------------


def golden_sampler_setup():
    """The golden file's tensors and metadata, and the registry's ``sit`` configured as the file's official SiT
    (every field from its ``sit_config``, no preset) with the golden weights."""
    meta, gold, model, bn_state = sampler_golden_sit(REGISTRY)
    assert set(bn_state) == {"running_mean", "running_var", "num_batches_tracked"}
    return gold, meta, model


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_matches_official_euler_sampler(method):
    gold, meta, model = golden_sampler_setup()
    ref = meta["sampler"]
    assert ref["path_type"] == "linear"
    tol = meta["suggested_tolerance"]  # atol 1e-5, rtol 1e-5 (golden/README.md)
    s = sampler(method, steps=ref["num_steps"], cfg_scale=ref["cfg_scale"], guidance_low=ref["guidance_low"],
                guidance_high=ref["guidance_high"])
    torch.testing.assert_close(time_grid(ref["num_steps"]), gold["t_steps"], rtol=0, atol=0)
    x_T, y = gold["x_T"], gold["y"]

    rec = Recorder(model)
    out = s(rec, x_T.double(), y)  # float64 noise: the float64 state is returned as is
    torch.testing.assert_close(out, gold[f"out_{method}"], **tol)
    calls = sorted(k.rsplit(".", 1)[0] for k in gold if k.startswith(f"{method}.call") and k.endswith(".x"))
    steps = ref["num_steps"]
    assert len(rec.calls) == len(calls) == (steps if method == "euler" else 2 * steps - 1) == s.last_calls
    for name, (x, t, labels, v) in zip(calls, rec.calls):
        assert x.dtype == t.dtype == torch.float32
        assert torch.equal(labels, gold[f"{name}.y"]), name
        for key, value in (("x", x), ("t", t), ("v", v)):
            torch.testing.assert_close(value, gold[f"{name}.{key}"], **tol, msg=lambda m: f"{name}.{key}: {m}")
    guided = [len(c[2]) == 2 * len(y) for c in rec.calls]
    per_step = guided if method == "euler" else guided[0::2]  # Heun: 2 calls per step, the last step 1
    assert per_step == [bool(v) for v in gold["cfg_active"].tolist()]
    null = meta["sit_config"]["num_classes"]  # the null label of the guided calls
    for (_, _, labels, _), on in zip(rec.calls, guided):
        if on:
            assert torch.equal(labels, torch.cat([y, torch.full_like(y, null)]))

    # unguided runs (cfg_scale 1 per call), and the float32 interface (noise dtype in, same dtype out)
    torch.testing.assert_close(s(model, x_T.double(), y, cfg_scale=1.0), gold[f"out_{method}_nocfg"], **tol)
    out32 = s(model, x_T, y)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), gold[f"out_{method}"], **tol)
