"""Tests generated from the registry: every built-in tokenizer, denoiser and encoder, through its kind's interface.

For each registered component: the `tiny` preset builds on CPU (through ``repae.create``, as a recipe section would,
its shapes derived from the components built before it), runs forward and backward through the interface of its
kind, and survives a strict state-dict round trip; every other preset builds on the `meta` device. New built-in
components are picked up without touching this file.
"""

from __future__ import annotations

import pytest
import torch

import repae
from repae.interfaces import Denoiser, DenoiserOutput, RepresentationEncoder, Tokenizer
from repae.plugins import load_plugins
from repae.registry import PRESET_FIELD

KINDS = ("tokenizer", "denoiser", "encoder")
REGISTRY = load_plugins(select={"repae"}).registry
ENTRIES = [e for kind in KINDS for e in REGISTRY.entries(kind)]
RESOLUTION = 32


def build(entry, preset: str, device: str = "cpu", built=None, **overrides):
    """``entry`` with ``preset`` as a recipe section ``{name: ..., size: preset, **overrides}`` builds it."""
    if entry.name == "diffusers-vae":  # needs the optional extra repae[diffusers]
        pytest.importorskip("diffusers")
    return repae.create(entry.kind, entry.qualified_name, device=device, built=built, registry=REGISTRY,
                        **{PRESET_FIELD: preset, **overrides})


def context(resolution: int, tokenizer, encoder, device: str = "cpu") -> dict:
    """An image dataset of ``resolution`` px, a tokenizer and an encoder: what a denoiser's shapes derive from."""
    dataset = repae.create("dataset", "synthetic", registry=REGISTRY, resolution=resolution, num_images=8,
                           device=device)
    return {"dataset": dataset, "tokenizer": build(REGISTRY.get("tokenizer", "sd-vae"), tokenizer, device),
            "encoders": [build(REGISTRY.get("encoder", "dinov2"), encoder, device)]}


@pytest.fixture(scope="module")
def context_components():
    """A tiny dataset, tokenizer and encoder for denoisers that take their shapes from the components built before
    them."""
    return context(RESOLUTION, "tiny", "tiny")


def test_every_builtin_kind_is_populated():
    assert {e.kind for e in ENTRIES} == set(KINDS)
    assert {e.name for e in ENTRIES} >= {"sd-vae", "in-vae", "va-vae", "sit", "dit", "dinov2", "clip", "ijepa"}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.qualified_name)
def test_tiny_preset_forward_backward_roundtrip(entry, context_components):
    assert "tiny" in entry.presets, f"{entry.qualified_name} needs a 'tiny' preset for tests and the quickstart"
    model = build(entry, "tiny", built=context_components)
    twin = build(entry, "tiny", built=context_components)  # the same seeded init: make it differ, then load
    with torch.no_grad():
        for tensor in twin.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.5)
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
        tokenizer, (encoder,) = context_components["tokenizer"], context_components["encoders"]
        side = RESOLUTION // tokenizer.downsample
        # derived: the latent shape from the dataset and the tokenizer, one projector per encoder
        assert (model.input_size, model.in_channels) == (side, tokenizer.latent_channels)
        assert model.encoder_dims == [encoder.embed_dim]
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
        assert [p.shape[-1] for p in projected] == [encoder.embed_dim]
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
    built = context(256, "f8d4", "vit-b14", device="meta") if entry.kind == "denoiser" else {}
    model = build(entry, preset, device="meta", built=built)
    if entry.kind == "denoiser":  # 256 px through an f8 tokenizer: 32 x 32 x 4 latents, one projector
        assert (model.input_size, model.in_channels, model.encoder_dims) == (32, 4, [768])
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
