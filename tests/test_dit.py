"""Tests of the ``dit`` denoiser: presets, tiny forward/backward, state-dict round trip, full-size builds on the meta
device against the official manifest, and numerical equivalence with the official DiT (forward and 3-channel CFG;
every configuration value of the golden test is read from the golden file's metadata)."""

from __future__ import annotations

import re

import pytest
import torch

import repae
from conftest import GOLDEN, load_manifest, official_weights, read_golden
from repae.errors import WeightsMismatchError
from repae.interfaces import Denoiser
from repae_dit import DIT_PRESETS
from repae_dit.model import DiT
from repae_sit.checkpoint import from_official, load_strict, to_official

TOL = {"atol": 1e-5, "rtol": 1e-5}  # golden/README.md, "Suggested tolerances", dit_forward
REFERENCE_GUIDED_CHANNELS = 3
"""DiT's ``forward_with_cfg`` guides the first 3 output channels, hard-coded in the reference (golden/README.md §6):
a property of the reference code, not a setting of the golden file."""
_DIT_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
               "class_dropout_prob", "num_classes", "learn_sigma")


def create(**fields) -> DiT:
    return repae.create("denoiser", "dit", **fields)


def tiny(**overrides) -> DiT:
    fields = dict(size="tiny", input_size=8, in_channels=4, num_classes=10)
    return create(**{**fields, **overrides})


def parse(**section):
    config, issues = repae.load_plugins().registry.get("denoiser", "dit").parse(section)
    assert not issues, issues
    return config


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def golden_dit() -> tuple[DiT, dict, dict[str, torch.Tensor]]:
    """The registry's ``dit`` configured as the official ``DiT(**dit_config)`` of the golden file, with its weights;
    returns the model, the file's metadata and its tensors."""
    meta, gold = read_golden("dit_forward.safetensors")
    cfg = meta["dit_config"]
    assert set(cfg) == set(_DIT_FIELDS), f"official DiT arguments this test does not map: {sorted(cfg)}"
    model = create(**{k: cfg[k] for k in _DIT_FIELDS}, encoder_dims=[]).eval()  # every preset field set
    assert model.cfg_channels == REFERENCE_GUIDED_CHANNELS
    official = official_weights(gold)
    torch.testing.assert_close(model.pos_embed, official["pos_embed"], rtol=0, atol=0)
    state, norm = from_official(official)
    assert not norm  # DiT has no latent BatchNorm
    load_strict(model, state)
    return model, meta, gold


def test_registered_with_presets():
    entry = repae.load_plugins().registry.get("denoiser", "dit")
    assert set(DIT_PRESETS) == {f"{s}/{p}" for s in "S B L XL".split() for p in (1, 2, 4, 8)} | {"tiny"}
    config, issues = entry.parse({"size": "B/4", "cfg_channels": None})
    assert not issues and (config.hidden_size, config.patch_size, config.cfg_channels) == (768, 4, None)
    assert config.learn_sigma and config.encoder_dims == []
    _, issues = entry.parse({"size": "tiny", "cfg_channels": 0})
    assert [i.path for i in issues] == ["cfg_channels"] and "must be >= 1" in issues[0].message


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


def test_shapes_derived_like_sit():
    """DiT shares SiT's trunk config: the latent shape comes from the dataset and the tokenizer unless set."""

    class Images:
        kind, latent_shape, num_classes, resolution = "images", None, 1000, 128

    class Tok:
        latent_channels, downsample = 16, 8

    model = create(size="S/2", device="meta", built={"dataset": Images(), "tokenizer": Tok()})
    assert (model.input_size, model.in_channels, model.out_channels) == (16, 16, 32)
    model = create(size="S/2", device="meta", built={"dataset": Images(), "tokenizer": Tok()}, input_size=8)
    assert (model.input_size, model.in_channels) == (8, 16)


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
    cfg = parse(size=size)
    model = create(size=size, device="meta", input_size=32, in_channels=4)
    d, p = cfg.hidden_size, cfg.patch_size
    assert all(t.is_meta for t in model.parameters())
    assert model.final_layer.linear.weight.shape == (p * p * 8, d)
    assert len(model.blocks) == cfg.depth and len(model.projectors) == 0
    assert model.pos_embed.shape == (1, (32 // p) ** 2, d)


DIT_MANIFESTS = sorted(p.name for p in (GOLDEN / "manifests").glob("dit_*.json"))


def test_dit_manifests_are_there():
    assert "dit_xl_2.json" in DIT_MANIFESTS


@pytest.mark.parametrize("manifest", DIT_MANIFESTS)
def test_full_size_matches_official_manifest(manifest):
    """The official full-size DiT of a manifest: the size from its constructor (``DiT_XL_2``), the constructor
    arguments from its ``_meta``."""
    meta, spec = load_manifest(manifest)
    model_size, patch = re.fullmatch(r"DiT_(\w+?)_(\d+)", meta["constructor"]).groups()
    kwargs = meta["kwargs"]
    assert set(kwargs) <= {"input_size", "in_channels", "num_classes", "class_dropout_prob", "learn_sigma"}, kwargs
    model = create(size=f"{model_size}/{patch}", device="meta", **kwargs)  # defaults: the constructor's
    assert {k: list(v.shape) for k, v in to_official(model).items()} == spec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["num_trainable_parameters"]  # pos_embed: fixed, the default (DiT's training keeps it)
    frozen = sum(model.state_dict()[k].numel() for k in meta["frozen_parameters"])
    assert trainable + frozen == meta["num_parameters"]
    learned = create(size=f"{model_size}/{patch}", device="meta", **kwargs, pos_embed="learned")  # the shared trunk
    assert sum(p.numel() for p in learned.parameters() if p.requires_grad) == meta["num_parameters"]
    assert {k: list(v.shape) for k, v in to_official(learned).items()} == spec


def test_matches_official_dit_forward_and_cfg():
    model, meta, gold = golden_dit()
    null = meta["dit_config"]["num_classes"]
    assert torch.equal(gold["cfg_y"], torch.cat([gold["y"], torch.full_like(gold["y"], null)]))
    with torch.no_grad():
        out = model(gold["x"], gold["t"], gold["y"]).prediction
        torch.testing.assert_close(out, gold["out"], **TOL)
        cfg = model.forward_with_cfg(gold["cfg_x"], gold["cfg_t"], gold["cfg_y"], meta["cfg_scale"])
        torch.testing.assert_close(cfg, gold["out_cfg"], **TOL)


def test_cfg_channel_count_is_a_parameter():
    model, meta, gold = golden_dit()
    scale, k = meta["cfg_scale"], REFERENCE_GUIDED_CHANNELS
    with torch.no_grad():
        raw = model(gold["cfg_x"], gold["cfg_t"], gold["cfg_y"]).prediction
        cond, uncond = raw.chunk(2)
        every = model.forward_with_cfg(gold["cfg_x"], gold["cfg_t"], gold["cfg_y"], scale, guided_channels=None)
    torch.testing.assert_close(every, torch.cat([uncond + scale * (cond - uncond)] * 2), **TOL)
    torch.testing.assert_close(every[:, :k], gold["out_cfg"][:, :k], **TOL)
    assert not torch.allclose(every[:, k:], gold["out_cfg"][:, k:])


# -- weights and configuration agree (issue 11): num_heads changes no shape ------------------------------------------


def test_release_layout_with_other_num_heads_is_refused_before_loading(tmp_path):
    """The official DiT-XL/2 key layout (golden manifest) into a config with 12 heads: refused on meta (``repae recipe
    validate``) from the file's header, naming the field, both values and the preset."""
    from repae.errors import UserError
    from test_sit import sparse_safetensors

    _, spec = load_manifest("dit_xl_2.json")
    file = tmp_path / "dit-xl-2.safetensors"
    sparse_safetensors(file, spec)
    with pytest.raises(UserError, match=r"(?s)num_heads 12 \(the weights: 16\).*no parameter shape.*size: XL/2"):
        create(size="XL/2", num_heads=12, weights=str(file), device="meta")
    create(size="XL/2", weights=str(file), device="meta")


def test_weights_naming_a_release_are_checked_by_the_config():
    entry = repae.load_plugins().registry.get("denoiser", "dit")
    _, issues = entry.parse({"size": "XL/2", "num_heads": 8,
                             "weights": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"})
    assert [i.path for i in issues] == ["num_heads"] and "num_heads 8 (the weights: 16)" in issues[0].message
    _, issues = entry.parse({"size": "L/2", "weights": "/ckpts/DiT-XL-2-512x512.pt"})
    assert [i.path for i in issues] == ["depth"] and "size: XL/2" in issues[0].message
    _, issues = entry.parse({"size": "XL/2", "weights": "/ckpts/DiT-XL-2-512x512.pt"})
    assert not issues
