"""Tests generated from the registry: every built-in tokenizer, denoiser and encoder, through its kind's interface.

For each registered component: the `tiny` preset builds on CPU, runs forward and backward through the interface of
its kind, and survives a strict state-dict round trip; every other preset builds on the `meta` device. New built-in
components are picked up without touching this file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from repae.build import BuildContext, build_component
from repae.interfaces import Denoiser, DenoiserOutput, RepresentationEncoder, Tokenizer
from repae.plugins import load_plugins

KINDS = ("tokenizer", "denoiser", "encoder")
REGISTRY = load_plugins(select={"repae"}).registry
ENTRIES = [e for kind in KINDS for e in REGISTRY.entries(kind)]
RESOLUTION = 32


def build(entry, preset: str, device: str = "cpu", built=None, **overrides):
    config, issues = entry.parse({entry.preset_field: preset, **overrides})
    assert not issues, issues
    return build_component(entry, config, BuildContext(device=device, built=built or {}))


@pytest.fixture(scope="module")
def context_components():
    """A tiny tokenizer and encoder for denoisers that take their shapes from the components built before them."""
    torch.manual_seed(0)
    tokenizer = build(REGISTRY.get("tokenizer", "sd-vae"), "tiny")
    encoder = build(REGISTRY.get("encoder", "dinov2"), "tiny")
    return {"tokenizer": tokenizer, "encoders": [encoder]}


def test_every_builtin_kind_is_populated():
    assert {e.kind for e in ENTRIES} == set(KINDS)
    assert {e.name for e in ENTRIES} >= {"sd-vae", "in-vae", "va-vae", "sit", "dit", "dinov2", "clip", "ijepa"}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.qualified_name)
def test_tiny_preset_forward_backward_roundtrip(entry, context_components):
    assert "tiny" in entry.presets, f"{entry.qualified_name} needs a 'tiny' preset for tests and the quickstart"
    fields = {f.name for f in dataclasses.fields(entry.config)}
    overrides = {"resolution": RESOLUTION} if "resolution" in fields and entry.kind == "denoiser" else {}
    torch.manual_seed(0)
    model = build(entry, "tiny", built=context_components, **overrides)
    torch.manual_seed(1)
    twin = build(entry, "tiny", built=context_components, **overrides)
    twin.load_state_dict(model.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(2)

    if entry.kind == "tokenizer":
        assert isinstance(model, Tokenizer)
        images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
        posterior = model.encode(images)
        eps = torch.randn(posterior.mean.shape, generator=generator)
        z = posterior.sample(eps)
        side = RESOLUTION // model.downsample
        assert z.shape == (2, model.latent_channels, side, side)
        recon = model.decode(z)
        assert recon.shape == images.shape
        loss = (recon - images).abs().mean() + posterior.kl().mean()
        with torch.no_grad():
            again = twin.decode(twin.encode(images).sample(eps))
        torch.testing.assert_close(again, recon.detach())
    elif entry.kind == "denoiser":
        assert isinstance(model, Denoiser)
        tokenizer = context_components["tokenizer"]
        side = RESOLUTION // tokenizer.downsample
        x = torch.randn(2, tokenizer.latent_channels, side, side, generator=generator)
        t = torch.rand(2, generator=generator)
        y = torch.randint(0, model.num_classes, (2,), generator=generator)
        model.eval(), twin.eval()
        out = model(x, t, y, feature_depths=(1,))
        assert isinstance(out, DenoiserOutput)
        assert out.prediction.shape[0] == 2 and out.prediction.shape[2:] == x.shape[2:]
        assert out.prediction.shape[1] in (x.shape[1], 2 * x.shape[1])
        hidden = out.hidden[1]
        assert hidden.shape[0] == 2 and hidden.shape[2] == model.hidden_size
        projected = model.project(hidden)
        target = torch.randn(out.prediction.shape, generator=generator)
        loss = (out.prediction - target).square().mean() + sum(p.square().mean() for p in projected)
        with torch.no_grad():
            torch.testing.assert_close(twin(x, t, y).prediction, out.prediction.detach())
            early = model(x, t, y, feature_depths=(1,), features_only=True)
        assert early.prediction is None
        torch.testing.assert_close(early.hidden[1], hidden.detach())
    else:
        assert isinstance(model, RepresentationEncoder)
        images = torch.randint(0, 256, (2, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, generator=generator)
        tokens = model(images)
        assert tokens.shape == (2, model.num_tokens(RESOLUTION), model.embed_dim)
        assert not any(p.requires_grad for p in model.parameters()), "encoders are frozen"
        torch.testing.assert_close(twin(images), tokens)
        return

    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


PRESETS = [(e, p) for e in ENTRIES for p in e.presets if not p.startswith("tiny")]


@pytest.mark.parametrize("entry, preset", PRESETS, ids=[f"{e.name}-{p}" for e, p in PRESETS])
def test_full_size_presets_build_on_meta(entry, preset):
    built = {}
    if entry.kind == "denoiser":
        built = {"tokenizer": build(REGISTRY.get("tokenizer", "sd-vae"), "f8d4", device="meta"),
                 "encoders": [build(REGISTRY.get("encoder", "dinov2"), "vit-b14", device="meta")]}
    model = build(entry, preset, device="meta", built=built)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
