"""Tests of the ``sit`` denoiser: configs and presets, tiny forward/backward, checkpoint adapters, full-size builds on
the meta device against the official manifests, and numerical equivalence with the official REPA-E SiT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from repae.build import BuildContext
from repae.errors import UserError
from repae.interfaces import Denoiser
from repae_sit import SIT_PRESETS, SiTConfig
from repae.errors import WeightsMismatchError
from repae_sit.checkpoint import from_official, load_strict, to_official
from repae_sit.model import SiT, build_sit

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden tensors not found at {GOLDEN}")
TOL = {"atol": 1e-5, "rtol": 1e-5}  # golden/README.md, "Suggested tolerances", sit_forward
FULL_PRESETS = [name for name in SIT_PRESETS if name != "tiny"]
BN_KEYS = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


def tiny(**overrides) -> SiT:
    fields = dict(input_size=8, in_channels=4, num_classes=10, encoder_dims=[32, 16])
    return build_sit(SiTConfig.from_preset("tiny", **{**fields, **overrides}), BuildContext())


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the adaLN-Zero init makes most gradients exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def expected_parameters(cfg: SiTConfig, input_size: int, in_channels: int, encoder_dims: list[int]) -> int:
    """Trainable parameters of a SiT, counted from the architecture (pos_embed excluded: it is a buffer)."""
    d, p, c = cfg.hidden_size, cfg.patch_size, in_channels
    out = 2 * c if cfg.learn_sigma else c
    m = int(d * cfg.mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (m * d + m) + (m * d + d) + (6 * d * d + 6 * d)
    proj = sum(d * cfg.projector_dim + cfg.projector_dim + cfg.projector_dim**2 + cfg.projector_dim
               + cfg.projector_dim * e + e for e in encoder_dims)
    return (c * p * p * d + d) + (256 * d + d + d * d + d) + (cfg.num_classes + (cfg.class_dropout_prob > 0)) * d \
        + cfg.depth * block + (p * p * out * d + p * p * out + 2 * d * d + 2 * d) + proj


# -- config, registry ------------------------------------------------------------------------------------------------


def test_registered_with_presets():
    from repae import load_plugins

    entry = load_plugins().registry.get("denoiser", "sit")
    assert set(SIT_PRESETS) == {f"{s}/{p}" for s in "S B L XL".split() for p in (1, 2, 4, 8)} | {"tiny"}
    config, issues = entry.parse({"size": "L/4", "depth": 3})
    assert not issues and (config.hidden_size, config.patch_size, config.depth) == (1024, 4, 3)  # explicit wins
    _, issues = entry.parse({"size": "XXL/2"})
    assert issues and "XL/2" in issues[0].hint
    _, issues = entry.parse({"size": "tiny", "num_heads": 5})
    assert issues and "divisible" in issues[0].message


def test_shapes_from_context_and_explicit_values_win():
    class Tok:
        latent_channels, downsample = 32, 16

    class Enc:
        def __init__(self, dim):
            self.embed_dim = dim

    built = {"tokenizer": Tok(), "encoders": [Enc(768), Enc(1024)]}
    cfg = SiTConfig.from_preset("XL/1")
    with torch.device("meta"):
        model = build_sit(cfg, BuildContext(device="meta", built=built))
        assert (model.input_size, model.in_channels, model.encoder_dims) == (16, 32, [768, 1024])
        model = build_sit(cfg.replace(input_size=8, in_channels=4, encoder_dims=[]), BuildContext("meta", built=built))
        assert (model.input_size, model.in_channels, model.encoder_dims, len(model.projectors)) == (8, 4, [], 0)
    with pytest.raises(UserError, match="input_size"):
        build_sit(cfg, BuildContext(device="meta"))


# -- tiny model ------------------------------------------------------------------------------------------------------


def test_tiny_forward_backward():
    torch.manual_seed(0)
    model = tiny()
    assert isinstance(model, Denoiser) and (model.hidden_size, model.num_classes, model.num_tokens) == (64, 10, 16)
    randomize(model)
    model.train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 10])
    out = model(x, t, y, feature_depths=[2])
    assert out.prediction.shape == x.shape and set(out.hidden) == {2}
    assert out.hidden[2].shape == (2, model.num_tokens, 64)
    zs = model.project(out.hidden[2])
    assert [z.shape for z in zs] == [(2, 16, 32), (2, 16, 16)]
    loss = out.prediction.square().mean() + sum(z.square().mean() for z in zs)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" in model.state_dict()


def test_features_only_stops_early_and_matches_full_pass():
    model = tiny().eval()
    randomize(model, seed=1)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 3, 9])
    full = model(x, t, y, feature_depths=[1, 3])
    early = model(x, t, y, feature_depths=[1, 3], features_only=True)
    assert early.prediction is None and set(early.hidden) == {1, 3}
    torch.testing.assert_close(early.hidden[3], full.hidden[3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="feature_depths"):
        model(x, t, y, feature_depths=[5])
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(1, 4, 16, 16), t[:1], y[:1])


def test_label_dropout_injectable():
    model = tiny()
    randomize(model)
    model.train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    null = torch.full_like(y, 10)
    dropped = model(x, t, y, force_drop=torch.tensor([True, True])).prediction
    torch.testing.assert_close(dropped, model.eval()(x, t, null).prediction)


def test_sit_release_conventions():
    """learn_sigma keeps the first C channels; data-at-1 feeds 1 - t and negates the velocity."""
    model = tiny(learn_sigma=True, time_convention="data-at-1", encoder_dims=[]).eval()
    randomize(model)
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    raw = model.run(x, 1 - t, y).prediction
    torch.testing.assert_close(model(x, t, y).prediction, -raw[:, :4])


def test_forward_with_cfg_guides_all_channels():
    model = tiny().eval()
    randomize(model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    cond, uncond = model(x, t, y).prediction, model(x, t, torch.full_like(y, 10)).prediction
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 2.0)
    torch.testing.assert_close(out, torch.cat([uncond + 2 * (cond - uncond)] * 2), rtol=1e-5, atol=1e-5)


# -- checkpoints -----------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_is_strict_and_exact():
    src, dst = tiny(), tiny()
    randomize(src, seed=3)
    norm = {"running_mean": torch.randn(4), "running_var": torch.rand(4) + 0.5,
            "num_batches_tracked": torch.tensor(7)}
    official = to_official(src, norm)
    assert BN_KEYS <= set(official)
    wrapped = {"module." + k: v for k, v in official.items()}  # DDP prefixes are unwrapped
    state, norm_back = from_official(wrapped)
    load_strict(dst, state)
    for key, value in to_official(dst, norm_back).items():
        assert torch.equal(value, official[key]), key
    assert set(to_official(dst, norm_back)) == set(official)


def test_strict_loading_names_offending_keys():
    state = tiny().state_dict()
    with pytest.raises(WeightsMismatchError, match=r"(?s)6 missing key\(s\).*projectors\.2\.0\.bias") as err:
        load_strict(tiny(encoder_dims=[32, 16, 8]), state)
    assert "encoder_dims" in str(err.value)
    with pytest.raises(WeightsMismatchError, match="(?s)final_layer.linear.weight.*learn_sigma: true"):
        load_strict(tiny(), tiny(learn_sigma=True).state_dict())
    with pytest.raises(WeightsMismatchError, match="unexpected key\\(s\\).*bn.running_mean"):
        load_strict(tiny(), {**state, "bn.running_mean": torch.zeros(4)})


def test_weights_load_from_file_with_entry_and_sha256(tmp_path):
    pytest.importorskip("repae.weights", reason="repae.weights is not there yet")
    import hashlib

    src = tiny()
    randomize(src, seed=4)
    official = to_official(src, {"running_mean": torch.ones(4), "running_var": torch.full((4,), 2.0),
                                 "num_batches_tracked": torch.tensor(5)})
    file = tmp_path / "sit.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, file)
    cfg = SiTConfig.from_preset("tiny", input_size=8, in_channels=4, num_classes=10, encoder_dims=[32, 16],
                                weights=str(file))
    model = build_sit(cfg, BuildContext())
    assert model.weights_sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert torch.equal(model.latent_norm_state["running_var"], torch.full((4,), 2.0))
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # a training checkpoint: {"model": ..., "ema": ...}; weights_key picks the entry
    ema = tiny()
    randomize(ema, seed=5)
    ckpt = tmp_path / "0400000.pt"
    torch.save({"model": official, "ema": to_official(ema), "steps": 400000}, ckpt)
    for key, want in (("ema", ema), ("model", src)):
        model = build_sit(cfg.replace(weights=str(ckpt), weights_key=key), BuildContext())
        assert torch.equal(model.blocks[0].attn.qkv.weight, want.blocks[0].attn.qkv.weight), key
    flat = tmp_path / "release.pt"  # a release file is a flat state dict: weights_key does not apply
    torch.save(to_official(ema), flat)
    model = build_sit(cfg.replace(weights=str(flat)), BuildContext())
    assert model.loaded_weights.key is None and model.latent_norm_state is None
    assert torch.equal(model.final_layer.linear.weight, ema.final_layer.linear.weight)
    with pytest.raises(UserError, match="'ema'"):  # a checkpoint without the entry asked for
        torch.save({"model": official, "opt": {"lr": 1.0}}, ckpt)
        build_sit(cfg.replace(weights=str(ckpt)), BuildContext())
    # on meta nothing is read
    with torch.device("meta"):
        build_sit(cfg.replace(weights=str(tmp_path / "absent.pt")), BuildContext(device="meta"))


# -- full size on meta -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", FULL_PRESETS)
def test_full_size_presets_build_on_meta(size):
    cfg = SiTConfig.from_preset(size)
    patch = cfg.patch_size
    input_size = 32 if patch > 1 else 16
    with torch.device("meta"):
        model = build_sit(cfg.replace(input_size=input_size, in_channels=4, encoder_dims=[768]),
                          BuildContext(device="meta"))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(cfg, input_size, 4, [768])
    assert model.pos_embed.shape == (1, (input_size // patch) ** 2, cfg.hidden_size)


@needs_golden
@pytest.mark.parametrize(("manifest", "size", "input_size", "channels"),
                         [("sit_xl_2.json", "XL/2", 32, 4), ("sit_xl_1.json", "XL/1", 16, 32)])
def test_full_size_matches_official_manifest(manifest, size, input_size, channels):
    spec = json.loads((GOLDEN / "manifests" / manifest).read_text())
    meta = spec.pop("_meta")

    class Tok:  # the sizes come from the "built" tokenizer and encoder, as in a recipe
        latent_channels, downsample = channels, 256 // input_size

    class Enc:
        embed_dim = meta["kwargs"]["z_dims"][0]

    with torch.device("meta"):
        model = build_sit(SiTConfig.from_preset(size),
                          BuildContext(device="meta", built={"tokenizer": Tok(), "encoders": [Enc()]}))
    bn = {"running_mean": torch.empty(channels, device="meta"), "running_var": torch.empty(channels, device="meta"),
          "num_batches_tracked": torch.empty((), dtype=torch.long, device="meta")}
    ours = {k: list(v.shape) for k, v in to_official(model, bn).items()}
    assert ours == spec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["num_trainable_parameters"]
    assert trainable + model.pos_embed.numel() == meta["num_parameters"]


# -- golden: the official REPA-E SiT ---------------------------------------------------------------------------------


def latent_batchnorm(x, state, *, training, momentum=0.1, eps=1e-4):
    """The REPA-E latent BatchNorm2d(affine=False) on ``state`` (running stats updated in place when training)."""
    if training:
        state["num_batches_tracked"] += 1
    return F.batch_norm(x, state["running_mean"], state["running_var"], training=training, momentum=momentum, eps=eps)


def proj_loss(zs, zs_tilde):
    """Minus the mean cosine similarity over encoders, samples and tokens (the REPA loss)."""
    sims = [(F.normalize(z, dim=-1) * F.normalize(zt, dim=-1)).sum(-1).mean() for z, zt in zip(zs, zs_tilde)]
    return -sum(sims) / len(sims)


@needs_golden
def test_matches_official_repae_sit_forward():
    gold = load_file(GOLDEN / "sit_forward.safetensors")
    official = {k[len("weights."):]: v.float() if v.is_floating_point() else v
                for k, v in gold.items() if k.startswith("weights.")}
    model = tiny(class_dropout_prob=0.0, encoder_dims=[32])
    torch.testing.assert_close(model.pos_embed, official["pos_embed"], rtol=0, atol=0)  # our sin-cos table
    state, norm = from_official(official)
    load_strict(model, state)
    norm = {k: v.clone() for k, v in norm.items()}
    x, t, y, noise, zs = gold["x"], gold["t"], gold["y"], gold["noise"], [gold["zs.0"]]
    tb = t.view(-1, 1, 1, 1)

    def check(name, value):
        torch.testing.assert_close(value, gold[name], **TOL, msg=lambda m: f"{name}: {m}")

    torch.set_grad_enabled(False)
    try:
        model.eval()  # (a) align-only pass: eval BN, stop after block 2
        nx = latent_batchnorm(x, norm, training=False)
        x_t = (1 - tb) * nx + tb * noise
        out = model(x_t, t, y, feature_depths=[2], features_only=True)
        zt = model.project(out.hidden[2])
        check("eval_align.normalized_x", nx)
        check("eval_align.model_input", x_t)
        check("eval_align.zs_tilde.0", zt[0])
        check("eval_align.proj_loss", proj_loss(zs, zt))
        c = model.t_embedder(t) + model.y_embedder(y)  # the reference's align-only "model_output" artefact
        check("eval_align.model_output", model.unpatchify(model.final_layer(out.hidden[2], c)))

        out = model(x_t, t, y, feature_depths=[2])  # (a2) full eval pass
        check("eval.model_output", out.prediction)
        check("eval.zs_tilde.0", model.project(out.hidden[2])[0])
        check("eval.proj_loss", proj_loss(zs, model.project(out.hidden[2])))
        check("eval.denoising_loss", (out.prediction - (noise - nx)).square().mean(dim=(1, 2, 3)))

        check("inference.out", model(gold["inference.x_t"], gold["inference.t"], gold["inference.y"]).prediction)

        model.train()  # (b) train pass: batch statistics, running stats updated
        nx = latent_batchnorm(x, norm, training=True)
        x_t = (1 - tb) * nx + tb * noise
        out = model(x_t, t, y, feature_depths=[2])
        check("train.normalized_x", nx)
        check("train.model_input", x_t)
        check("train.model_output", out.prediction)
        check("train.model_target", noise - nx)
        check("train.denoising_loss", (out.prediction - (noise - nx)).square().mean(dim=(1, 2, 3)))
        check("train.zs_tilde.0", model.project(out.hidden[2])[0])
        check("train.proj_loss", proj_loss(zs, model.project(out.hidden[2])))
        for key in ("running_mean", "running_var"):
            check(f"bn_after_train.{key}", norm[key])
        assert torch.equal(norm["num_batches_tracked"], gold["bn_after_train.num_batches_tracked"])
    finally:
        torch.set_grad_enabled(True)


@needs_golden
def test_matches_official_sampler_model_calls():
    """Every model call logged by the official Euler/Heun sampler (label table with the null row), and the guided
    Euler sample."""
    gold = load_file(GOLDEN / "sampler_ode.safetensors")
    official = {k[len("weights."):]: v.float() if v.is_floating_point() else v
                for k, v in load_file(GOLDEN / "sit_forward.safetensors").items() if k.startswith("weights.")}
    official["y_embedder.embedding_table.weight"] = gold["weights.y_embedder.embedding_table.weight"].float()
    model = tiny(class_dropout_prob=0.1, encoder_dims=[32]).eval()
    load_strict(model, from_official(official)[0])
    calls = sorted({k.rsplit(".", 1)[0] for k in gold if ".call" in k})
    with torch.no_grad():
        for call in calls:
            v = model(gold[f"{call}.x"], gold[f"{call}.t"], gold[f"{call}.y"]).prediction
            torch.testing.assert_close(v, gold[f"{call}.v"], **TOL, msg=lambda m: f"{call}: {m}")
        assert len(calls) == 8 + 15
        # the guided Euler run end to end: float64 state, float32 model calls, CFG on all channels in [0, 0.7]
        x, y, steps = gold["x_T"].double(), gold["y"], gold["t_steps"]
        for i, active in enumerate(gold["cfg_active"].tolist()):
            batch, labels = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, 10)])) if active else (x, y)
            v = model(batch.float(), steps[i].float().expand(len(batch)), labels).prediction
            if active:
                cond, uncond = v.chunk(2)
                v = uncond + 2.0 * (cond - uncond)
            x = x + (steps[i + 1] - steps[i]) * v
    torch.testing.assert_close(x, gold["out_euler"], **TOL)
