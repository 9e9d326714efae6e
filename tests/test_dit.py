"""Tests of the ``dit`` denoiser: presets, tiny forward/backward, state-dict round trip, full-size builds on the meta
device against the official manifest, and numerical equivalence with the official DiT (forward and 3-channel CFG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repae.build import BuildContext
from repae.interfaces import Denoiser
from repae_dit import DIT_PRESETS, DiTConfig
from repae_dit.model import DiT, build_dit
from repae.errors import WeightsMismatchError
from repae_sit.checkpoint import from_official, load_strict, to_official

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden tensors not found at {GOLDEN}")
TOL = {"atol": 1e-5, "rtol": 1e-5}  # golden/README.md, "Suggested tolerances", dit_forward


def tiny(**overrides) -> DiT:
    fields = dict(input_size=8, in_channels=4, num_classes=10)
    return build_dit(DiTConfig.from_preset("tiny", **{**fields, **overrides}), BuildContext())


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def golden_dit() -> tuple[DiT, dict[str, torch.Tensor]]:
    gold = load_file(GOLDEN / "dit_forward.safetensors")
    official = {k[len("weights."):]: v.float() for k, v in gold.items() if k.startswith("weights.")}
    model = tiny().eval()
    torch.testing.assert_close(model.pos_embed, official["pos_embed"], rtol=0, atol=0)
    state, norm = from_official(official)
    assert not norm  # DiT has no latent BatchNorm
    load_strict(model, state)
    return model, gold


def test_registered_with_presets():
    from repae import load_plugins

    entry = load_plugins().registry.get("denoiser", "dit")
    assert set(DIT_PRESETS) == {f"{s}/{p}" for s in "S B L XL".split() for p in (1, 2, 4, 8)} | {"tiny"}
    config, issues = entry.parse({"size": "B/4", "cfg_channels": None})
    assert not issues and (config.hidden_size, config.patch_size, config.cfg_channels) == (768, 4, None)
    assert config.learn_sigma and config.encoder_dims == []


def test_tiny_forward_backward_with_learned_sigma():
    model = tiny(encoder_dims=[24])
    assert isinstance(model, Denoiser)
    randomize(model)
    model.train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.tensor([3, 10])
    out = model(x, t, y, feature_depths=[1])
    assert out.prediction.shape == (2, 8, 8, 8)  # eps and variance values
    (zs,) = model.project(out.hidden[1])
    (out.prediction.square().mean() + zs.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip():
    src, dst = tiny(), tiny()
    randomize(src, seed=2)
    official = to_official(src)
    state, norm = from_official({"_orig_mod." + k: v for k, v in official.items()})
    load_strict(dst, state)
    assert not norm and all(torch.equal(v, official[k]) for k, v in to_official(dst).items())
    with pytest.raises(WeightsMismatchError, match="learn_sigma: true"):
        load_strict(tiny(learn_sigma=False), official)


@pytest.mark.parametrize("size", [name for name in DIT_PRESETS if name != "tiny"])
def test_full_size_presets_build_on_meta(size):
    cfg = DiTConfig.from_preset(size, input_size=32, in_channels=4)
    with torch.device("meta"):
        model = build_dit(cfg, BuildContext(device="meta"))
    d, p = cfg.hidden_size, cfg.patch_size
    assert model.final_layer.linear.weight.shape == (p * p * 8, d)
    assert len(model.blocks) == cfg.depth and len(model.projectors) == 0
    assert model.pos_embed.shape == (1, (32 // p) ** 2, d)


@needs_golden
def test_full_size_matches_official_manifest():
    spec = json.loads((GOLDEN / "manifests" / "dit_xl_2.json").read_text())
    meta = spec.pop("_meta")
    with torch.device("meta"):
        model = build_dit(DiTConfig.from_preset("XL/2", input_size=32, in_channels=4), BuildContext(device="meta"))
    assert {k: list(v.shape) for k, v in to_official(model).items()} == spec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["num_trainable_parameters"]
    assert trainable + model.pos_embed.numel() == meta["num_parameters"] == 675_129_632


@needs_golden
def test_matches_official_dit_forward_and_cfg():
    model, gold = golden_dit()
    with torch.no_grad():
        out = model(gold["x"], gold["t"], gold["y"]).prediction
        torch.testing.assert_close(out, gold["out"], **TOL)
        cfg = model.forward_with_cfg(gold["cfg_x"], gold["cfg_t"], gold["cfg_y"], 3.0)
        torch.testing.assert_close(cfg, gold["out_cfg"], **TOL)


@needs_golden
def test_cfg_channel_count_is_a_parameter():
    model, gold = golden_dit()
    with torch.no_grad():
        raw = model(gold["cfg_x"], gold["cfg_t"], gold["cfg_y"]).prediction
        cond, uncond = raw.chunk(2)
        every = model.forward_with_cfg(gold["cfg_x"], gold["cfg_t"], gold["cfg_y"], 3.0, guided_channels=None)
    torch.testing.assert_close(every, torch.cat([uncond + 3.0 * (cond - uncond)] * 2), **TOL)
    torch.testing.assert_close(every[:, :3], gold["out_cfg"][:, :3], **TOL)
    assert not torch.allclose(every[:, 3:], gold["out_cfg"][:, 3:])
