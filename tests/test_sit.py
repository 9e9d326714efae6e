"""Tests of the ``sit`` denoiser: configs and presets, derived shapes, tiny forward/backward, checkpoint adapters,
full-size builds on the meta device against the official manifests, and numerical equivalence with the official
REPA-E SiT (every configuration value of the golden tests is read from the golden files' metadata)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repae
from conftest import GOLDEN, golden_sit, load_manifest, official_weights, read_golden, sampler_golden_sit
from repae.errors import ComponentBuildError, RecipeError, UserError, WeightsMismatchError
from repae.interfaces import Denoiser
from repae_sit import SIT_PRESETS, SiTConfig
from repae_sit.checkpoint import from_official, load_strict, to_official
from repae_sit.model import SiT

TOL = {"atol": 1e-5, "rtol": 1e-5}  # golden/README.md, "Suggested tolerances", sit_forward and sampler_ode
FULL_PRESETS = [name for name in SIT_PRESETS if name != "tiny"]
BN_KEYS = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
BN_EPS = 1e-4  # REPA-E's latent BatchNorm2d(eps=1e-4) is hard-coded in the reference (README, "Key facts")


def create(**fields) -> SiT:
    """``repae.create("denoiser", "sit", ...)`` on the installed (built-in) plugins."""
    return repae.create("denoiser", "sit", **fields)


def tiny(**overrides) -> SiT:
    fields = dict(size="tiny", input_size=8, in_channels=4, num_classes=10, encoder_dims=[32, 16])
    return create(**{**fields, **overrides})


def parse(**section) -> SiTConfig:
    """The config a recipe section resolves to (presets applied)."""
    from repae import load_plugins

    config, issues = load_plugins().registry.get("denoiser", "sit").parse(section)
    assert not issues, issues
    return config


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


class Images:
    """What the denoiser's shapes are derived from: an image dataset (its resolution)."""

    kind, latent_shape, num_classes = "images", None, 1000

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution


class Tok:
    def __init__(self, latent_channels: int, downsample: int) -> None:
        self.latent_channels, self.downsample = latent_channels, downsample


class Enc:
    def __init__(self, dim: int) -> None:
        self.embed_dim = dim


# -- golden files: configuration from their metadata -----------------------------------------------------------------

# -- config, registry, derived shapes --------------------------------------------------------------------------------


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
    with pytest.raises(RecipeError, match="divisible"):  # repae.create validates as a recipe does
        create(size="tiny", num_heads=5, device="meta")


def test_shapes_derived_from_context_and_explicit_values_win():
    built = {"dataset": Images(256), "tokenizer": Tok(32, 16), "encoders": [Enc(768), Enc(1024)]}
    model = create(size="XL/1", device="meta", built=built)
    assert (model.input_size, model.in_channels, model.encoder_dims) == (16, 32, [768, 1024])
    assert len(model.projectors) == 2
    model = create(size="XL/1", device="meta", built=built, input_size=8, in_channels=4, encoder_dims=[])
    assert (model.input_size, model.in_channels, model.encoder_dims, len(model.projectors)) == (8, 4, [], 0)

    class Latents:  # a latent cache gives the latent shape itself
        kind, latent_shape, resolution, num_classes = "latents", (8, 4, 4), 64, 10

    model = create(size="XL/2", device="meta", built={"dataset": Latents(), "tokenizer": Tok(8, 16)})
    assert (model.input_size, model.in_channels, model.encoder_dims) == (4, 8, [])
    model = create(size="XL/2", device="meta")  # nothing to derive from: the defaults (SD-VAE latents at 256 px)
    assert (model.input_size, model.in_channels, model.encoder_dims) == (32, 4, [])
    # a derived latent size the patch does not tile names the fields that were derived and where from
    with pytest.raises(ComponentBuildError, match=r"(?s)input_size 3 is not divisible.*dataset\.resolution"):
        create(size="XL/2", device="meta", built={"dataset": Images(24), "tokenizer": Tok(4, 8)})


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


def test_pos_embed_fixed_or_learned():
    """``fixed``: a buffer nothing trains; ``learned``: a parameter with the same initial sin-cos values that gets a
    gradient (the official REPA-E step trains it). Both keep the official key ``pos_embed``."""
    fixed, learned = tiny(), tiny(pos_embed="learned")
    assert parse(size="tiny").pos_embed == "fixed"
    assert isinstance(learned.pos_embed, torch.nn.Parameter) and learned.pos_embed.requires_grad
    assert "pos_embed" in dict(learned.named_parameters()) and "pos_embed" not in dict(fixed.named_parameters())
    torch.testing.assert_close(learned.pos_embed.detach(), fixed.pos_embed, rtol=0, atol=0)
    assert set(learned.state_dict()) == set(fixed.state_dict())
    assert "pos_embed=learned" in repr(learned)
    randomize(learned)
    out = learned(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    out.prediction.square().mean().backward()
    assert learned.pos_embed.grad is not None and learned.pos_embed.grad.abs().sum() > 0
    fixed.requires_grad_(True)  # the reference's requires_grad(model, True) cannot unfreeze a buffer
    assert not fixed.pos_embed.requires_grad
    _, issues = repae.load_plugins().registry.get("denoiser", "sit").parse({"pos_embed": "trained"})
    assert issues and "learned" in str(issues[0].message) + str(issues[0].hint)


def test_pos_embed_checkpoints_load_in_both_modes(tmp_path):
    """An official checkpoint (the sin-cos table) loads in both modes; a learned run's trained table loaded into
    ``fixed`` mode is kept (as the buffer: it is what the weights were trained with), never replaced by sin-cos."""
    official = tiny()
    randomize(official, seed=7)
    file = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in to_official(official).items()}, file)
    for mode in ("fixed", "learned"):
        model = tiny(weights=str(file), pos_embed=mode)
        assert torch.equal(model.pos_embed.detach(), official.pos_embed), mode
        assert isinstance(model.pos_embed, torch.nn.Parameter) == (mode == "learned")
    trained = tiny(pos_embed="learned")
    randomize(trained, seed=8)  # the table moved away from sin-cos, as training moves it
    assert not torch.equal(trained.pos_embed.detach(), official.pos_embed)
    file = tmp_path / "learned-run.safetensors"
    save_file({k: v.detach().contiguous() for k, v in to_official(trained).items()}, file)
    for mode in ("fixed", "learned"):
        model = tiny(weights=str(file), pos_embed=mode)
        assert torch.equal(model.pos_embed.detach(), trained.pos_embed.detach()), mode
        x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
        torch.testing.assert_close(model.eval()(x, t, y).prediction, trained.eval()(x, t, y).prediction,
                                   rtol=0, atol=0)


def test_repae_recipes_learn_pos_embed_and_the_others_keep_it_fixed():
    """The REPA-E recipes (the tokenizer and the denoiser both train: the official train_repae.py step, which unfreezes
    the table) choose ``learned``; REPA (train.py) and vanilla / frozen-VAE runs (train_ldm_only.py, SiT, DiT) keep it
    ``fixed``, as their official code does."""
    from pathlib import Path

    from repae.recipe import read_recipe

    registry = repae.load_plugins(select={"repae"}).registry
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(p for p in root.rglob("*.yaml")
                     if not p.name.startswith("_") and "_base" not in p.parts)
    seen = set()
    for path in recipes:
        resolved = read_recipe(path, [], registry)
        end_to_end = any("tokenizer" in spec.config.updates for spec in resolved.get("losses"))
        denoiser = resolved.get("denoiser")[0].config
        assert denoiser.pos_embed == ("learned" if end_to_end else "fixed"), path.relative_to(root)
        seen.add(end_to_end)
    assert seen == {True, False}


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
    import hashlib

    src = tiny()
    randomize(src, seed=4)
    official = to_official(src, {"running_mean": torch.ones(4), "running_var": torch.full((4,), 2.0),
                                 "num_batches_tracked": torch.tensor(5)})
    file = tmp_path / "sit.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, file)
    model = tiny(weights=str(file))
    info = model.loaded_weights["weights"]
    assert info.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (info.source, info.path, info.entry) == (str(file), str(file), None)
    assert torch.equal(model.latent_norm_state["running_var"], torch.full((4,), 2.0))
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # a training checkpoint: {"model": ..., "ema": ...}; weights_key picks the entry
    ema = tiny()
    randomize(ema, seed=5)
    ckpt = tmp_path / "0400000.pt"
    torch.save({"model": official, "ema": to_official(ema), "steps": 400000}, ckpt)
    for key, want in (("ema", ema), ("model", src)):
        model = tiny(weights=str(ckpt), weights_key=key)
        assert torch.equal(model.blocks[0].attn.qkv.weight, want.blocks[0].attn.qkv.weight), key
        assert model.loaded_weights["weights"].entry == key
    flat = tmp_path / "release.pt"  # a release file is a flat state dict: weights_key does not apply
    torch.save(to_official(ema), flat)
    model = tiny(weights=str(flat))
    assert model.loaded_weights["weights"].entry is None and model.latent_norm_state is None
    assert torch.equal(model.final_layer.linear.weight, ema.final_layer.linear.weight)
    with pytest.raises(UserError, match="'ema'"):  # a checkpoint without the entry asked for
        torch.save({"model": official, "opt": {"lr": 1.0}}, ckpt)
        tiny(weights=str(ckpt))
    # on meta nothing is read
    model = tiny(weights=str(tmp_path / "absent.pt"), device="meta")
    assert model.loaded_weights == {} and model.latent_norm_state is None
    # nor with load_weights=False
    assert tiny(weights=str(tmp_path / "absent.pt"), load_weights=False).loaded_weights == {}


# -- full size on meta -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", FULL_PRESETS)
def test_full_size_presets_build_on_meta(size):
    cfg = parse(size=size)
    patch = cfg.patch_size
    input_size = 32 if patch > 1 else 16
    model = create(size=size, device="meta", input_size=input_size, in_channels=4, encoder_dims=[768])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(cfg, input_size, 4, [768])
    assert model.pos_embed.shape == (1, (input_size // patch) ** 2, cfg.hidden_size)


SIT_MANIFESTS = sorted(p.name for p in (GOLDEN / "manifests").glob("sit_*.json"))
# What the official constructor's keyword arguments mean here; the others change no shape.
_MANIFEST_SHAPE_KWARGS = {"input_size", "in_channels", "num_classes", "class_dropout_prob", "z_dims", "qk_norm"}
_MANIFEST_OTHER_KWARGS = {"encoder_depth", "bn_momentum", "fused_attn"}


def test_sit_manifests_are_there():
    assert {"sit_xl_1.json", "sit_xl_2.json"} <= set(SIT_MANIFESTS)


@pytest.mark.parametrize("manifest", SIT_MANIFESTS)
def test_full_size_matches_official_manifest(manifest):
    """The official full-size model of a manifest (preset and constructor arguments from its ``_meta``), its shapes
    derived from a dataset, tokenizer and encoders as in a recipe."""
    meta, spec = load_manifest(manifest)
    size = re.fullmatch(r"SiT_models\['SiT-(\w+/\d+)'\]", meta["constructor"]).group(1)
    kwargs = meta["kwargs"]
    assert not set(kwargs) - _MANIFEST_SHAPE_KWARGS - _MANIFEST_OTHER_KWARGS, kwargs
    f = 8  # any tokenizer downsampling: the latent size is derived as resolution // f
    built = {"dataset": Images(kwargs["input_size"] * f), "tokenizer": Tok(kwargs["in_channels"], f),
             "encoders": [Enc(dim) for dim in kwargs["z_dims"]]}
    model = create(size=size, device="meta", built=built, num_classes=kwargs["num_classes"],
                   class_dropout_prob=kwargs["class_dropout_prob"], qk_norm=kwargs["qk_norm"])
    assert (model.input_size, model.in_channels, model.encoder_dims) == (
        kwargs["input_size"], kwargs["in_channels"], kwargs["z_dims"])
    bn = {k[len("bn."):]: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta")
          for k, v in meta["buffers"].items() if k.startswith("bn.")}
    assert list(bn["running_mean"].shape) == [kwargs["in_channels"]]
    ours = {k: list(v.shape) for k, v in to_official(model, bn).items()}
    assert ours == spec
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == meta["num_trainable_parameters"]  # pos_embed: fixed (SiT's constructor freezes it)
    frozen = sum(model.state_dict()[k].numel() for k in meta["frozen_parameters"])
    assert meta["frozen_parameters"] == ["pos_embed"] and trainable + frozen == meta["num_parameters"]
    learned = create(size=size, device="meta", built=built, num_classes=kwargs["num_classes"],
                     class_dropout_prob=kwargs["class_dropout_prob"], qk_norm=kwargs["qk_norm"], pos_embed="learned")
    # pos_embed: learned trains what train_repae.py trains after its requires_grad(model, True): every parameter
    assert sum(p.numel() for p in learned.parameters() if p.requires_grad) == meta["num_parameters"]
    assert {k: list(v.shape) for k, v in to_official(learned, bn).items()} == spec


# -- golden: the official REPA-E SiT ---------------------------------------------------------------------------------


def latent_batchnorm(x, state, *, training, momentum, eps=BN_EPS):
    """The REPA-E latent BatchNorm2d(affine=False) on ``state`` (running stats updated in place when training)."""
    if training:
        state["num_batches_tracked"] += 1
    return F.batch_norm(x, state["running_mean"], state["running_var"], training=training, momentum=momentum, eps=eps)


def proj_loss(zs, zs_tilde):
    """Minus the mean cosine similarity over encoders, samples and tokens (the REPA loss)."""
    sims = [(F.normalize(z, dim=-1) * F.normalize(zt, dim=-1)).sum(-1).mean() for z, zt in zip(zs, zs_tilde)]
    return -sum(sims) / len(sims)


def test_matches_official_repae_sit_forward():
    meta, gold = read_golden("sit_forward.safetensors")
    cfg = meta["sit_config"]
    model, norm = golden_sit(cfg, official_weights(gold))
    depth, momentum = cfg["encoder_depth"], cfg["bn_momentum"]  # alignment depth, latent BatchNorm momentum
    encoders = range(len(cfg["z_dims"]))
    x, t, y, noise = gold["x"], gold["t"], gold["y"], gold["noise"]
    zs = [gold[f"zs.{i}"] for i in encoders]
    tb = t.view(-1, 1, 1, 1)
    checked: set[str] = set()

    def check(name, value):
        torch.testing.assert_close(value, gold[name], **TOL, msg=lambda m: f"{name}: {m}")
        checked.add(name)

    def check_projections(prefix, hidden):
        zt = model.project(hidden)
        for i in encoders:
            check(f"{prefix}.zs_tilde.{i}", zt[i])
        check(f"{prefix}.proj_loss", proj_loss(zs, zt))

    torch.set_grad_enabled(False)
    try:
        model.eval()  # (a) align-only pass: eval BN, stop after block `encoder_depth`
        nx = latent_batchnorm(x, norm, training=False, momentum=momentum)
        x_t = (1 - tb) * nx + tb * noise
        out = model(x_t, t, y, feature_depths=[depth], features_only=True)
        check("eval_align.normalized_x", nx)
        check("eval_align.model_input", x_t)
        check_projections("eval_align", out.hidden[depth])
        c = model.t_embedder(t) + model.y_embedder(y)  # the reference's align-only "model_output" artefact
        check("eval_align.model_output", model.unpatchify(model.final_layer(out.hidden[depth], c)))

        out = model(x_t, t, y, feature_depths=[depth])  # (a2) full eval pass
        check("eval.model_output", out.prediction)
        check_projections("eval", out.hidden[depth])
        check("eval.denoising_loss", (out.prediction - (noise - nx)).square().mean(dim=(1, 2, 3)))

        check("inference.out", model(gold["inference.x_t"], gold["inference.t"], gold["inference.y"]).prediction)

        model.train()  # (b) train pass: batch statistics, running stats updated
        nx = latent_batchnorm(x, norm, training=True, momentum=momentum)
        x_t = (1 - tb) * nx + tb * noise
        out = model(x_t, t, y, feature_depths=[depth])
        check("train.normalized_x", nx)
        check("train.model_input", x_t)
        check("train.model_output", out.prediction)
        check("train.model_target", noise - nx)
        check("train.denoising_loss", (out.prediction - (noise - nx)).square().mean(dim=(1, 2, 3)))
        check_projections("train", out.hidden[depth])
        for key in ("running_mean", "running_var"):
            check(f"bn_after_train.{key}", norm[key])
        assert torch.equal(norm["num_batches_tracked"], gold["bn_after_train.num_batches_tracked"])
        checked.add("bn_after_train.num_batches_tracked")
    finally:
        torch.set_grad_enabled(True)
    assert checked == set(meta["roles"]["outputs"]), "every output of the file is compared"


def test_matches_official_sampler_model_calls():
    """Every model call logged by the official Euler/Heun sampler (label table with the null row), and the guided
    Euler sample; steps, guidance scale and interval, and the null label from the file's metadata."""
    meta, gold, model, _ = sampler_golden_sit()
    cfg, ref = meta["sit_config"], meta["sampler"]
    null, scale, steps = cfg["num_classes"], ref["cfg_scale"], ref["num_steps"]
    calls = sorted({k.rsplit(".", 1)[0] for k in gold if ".call" in k})
    assert len(calls) == steps + (2 * steps - 1)  # Euler: one call per step; Heun: two, the last step one
    with torch.no_grad():
        for call in calls:
            v = model(gold[f"{call}.x"], gold[f"{call}.t"], gold[f"{call}.y"]).prediction
            torch.testing.assert_close(v, gold[f"{call}.v"], **TOL, msg=lambda m: f"{call}: {m}")
        # the guided Euler run end to end: float64 state, float32 model calls, CFG on all channels in the interval
        x, y, grid = gold["x_T"].double(), gold["y"], gold["t_steps"]
        assert len(grid) == steps + 1
        active = [scale != 1.0 and ref["guidance_low"] <= float(t) <= ref["guidance_high"] for t in grid[:-1]]
        assert active == [bool(a) for a in gold["cfg_active"].tolist()]
        for i, guided in enumerate(active):
            batch, labels = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, null)])) if guided else (x, y)
            v = model(batch.float(), grid[i].float().expand(len(batch)), labels).prediction
            if guided:
                cond, uncond = v.chunk(2)
                v = uncond + scale * (cond - uncond)
            x = x + (grid[i + 1] - grid[i]) * v
    torch.testing.assert_close(x, gold["out_euler"], **TOL)


# -- weights and configuration agree (issue 11): num_heads and time_convention change no shape ------------------------


def sparse_safetensors(path, shapes: dict, metadata: dict | None = None) -> None:
    """A safetensors file with the given keys and shapes (float16) whose data is a hole in the file: a full-size
    official key layout that costs no disk, for the checks that read only the header (``repae recipe validate``)."""
    import json
    import math
    import struct

    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def test_release_layout_with_other_num_heads_is_refused_before_loading(tmp_path):
    """The official REPA-E SiT-XL/2 key layout (golden manifest) into a config with 8 heads (no shape changes): on
    meta (``repae recipe validate``) the file's header is enough for an error naming the field, both values and the
    preset; the release's own config passes."""
    _, spec = load_manifest("sit_xl_2.json")
    file = tmp_path / "sit-repae-sdvae.safetensors"
    sparse_safetensors(file, spec)
    fields = dict(size="XL/2", encoder_dims=[768], weights=str(file), device="meta")
    with pytest.raises(UserError, match=r"(?s)num_heads 8 \(the weights: 16\).*no parameter shape.*size: XL/2"):
        create(num_heads=8, **fields)
    create(**fields)
    _, spec = load_manifest("sit_xl_1.json")  # the f16d32 release: SiT-XL/1 on 16x16x32 latents
    sparse_safetensors(file, spec)
    with pytest.raises(UserError, match=r"(?s)num_heads 12 \(the weights: 16\).*size: XL/1"):
        create(size="XL/1", num_heads=12, input_size=16, in_channels=32, encoder_dims=[768], weights=str(file),
               device="meta")


def test_sit_release_with_the_other_time_convention_is_refused(tmp_path):
    """willisma/SiT's SiT-XL-2-256x256.pt (learned sigma, no projector) was trained with t = 1 as data: a config in
    REPA's convention would load it and integrate backwards."""
    layout = create(size="XL/2", learn_sigma=True, time_convention="data-at-1", device="meta")
    file = tmp_path / "sit-xl-2.safetensors"
    sparse_safetensors(file, {k: tuple(v.shape) for k, v in layout.state_dict().items()})
    with pytest.raises(UserError, match=r"(?s)time_convention noise-at-1 \(the weights: data-at-1\)"):
        create(size="XL/2", learn_sigma=True, weights=str(file), device="meta")
    create(size="XL/2", learn_sigma=True, time_convention="data-at-1", weights=str(file), device="meta")
    # named by its file: the config check, at the key path
    entry = repae.load_plugins().registry.get("denoiser", "sit")
    _, issues = entry.parse({"size": "XL/2", "learn_sigma": True, "weights": "/ckpts/SiT-XL-2-256x256.pt"})
    assert [i.path for i in issues] == ["time_convention"] and "data-at-1" in issues[0].message


def test_weights_naming_a_release_are_checked_by_the_config():
    entry = repae.load_plugins().registry.get("denoiser", "sit")
    source = "hf://REPA-E/sit-repae-sdvae/checkpoints/0400000.pt"
    _, issues = entry.parse({"size": "XL/2", "num_heads": 8, "weights": source})
    assert [i.path for i in issues] == ["num_heads"]
    assert "num_heads 8 (the weights: 16)" in issues[0].message and "size: XL/2" in issues[0].message
    _, issues = entry.parse({"size": "XL/2", "weights": "hf://REPA-E/sit-repae-vavae/checkpoints/0400000.pt"})
    assert [i.path for i in issues] == ["patch_size"] and "size: XL/1" in issues[0].message
    for fields in ({"size": "XL/2", "weights": source}, {"size": "XL/1", "weights": "hf://REPA-E/sit-ldm-e2e-vavae"},
                   {"size": "B/2", "weights": "hf://me/my-sit/model.safetensors"}):
        _, issues = entry.parse(fields)
        assert not issues, (fields, issues)


def test_exported_weights_are_checked_against_the_architecture_they_state(tmp_path):
    """repae's export states the architecture (``repae.architecture`` metadata): loading it with other heads is refused
    before the tensors are copied (and on meta), with the stated ones it loads."""
    from repae.interfaces import ExportContext
    from repae_sit.model import export_official

    src = tiny(num_heads=4)
    randomize(src, seed=9)
    export_official(src, "official", tmp_path, ExportContext("denoiser"))
    file = tmp_path / "denoiser.safetensors"
    for device in ("cpu", "meta"):
        with pytest.raises(UserError, match=r"(?s)repae\.architecture metadata.*num_heads 2 \(the weights: 4\)"):
            tiny(num_heads=2, weights=str(file), device=device)
    model = tiny(num_heads=4, weights=str(file))
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
