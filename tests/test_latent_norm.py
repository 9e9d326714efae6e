"""Tests of the latent normalisers ``batchnorm``, ``fixed-scale`` and ``channel-stats``: torch BatchNorm2d equivalence,
the official REPA-E latent BatchNorm (golden/sit_forward.safetensors), global-batch statistics over two gloo
processes, initialisation from tokenizer statistics and from REPA-E checkpoints, round trips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from repae.build import BuildContext, build_component
from repae.errors import UserError
from repae.interfaces import LatentNormalizer
from repae.plugins import load_plugins
from repae_latent_norm.normalizers import ChannelStats, FixedScale, LatentBatchNorm

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden tensors not found at {GOLDEN}")
TOL = {"atol": 1e-5, "rtol": 1e-5}  # golden/README.md, "Suggested tolerances", sit_forward
REGISTRY = load_plugins(select={"repae"}).registry
BN_STATE = {"running_mean", "running_var", "num_batches_tracked"}


def build(name: str, built=None, device: str = "cpu", **section):
    entry = REGISTRY.get("normalizer", name)
    config, issues = entry.parse(section)
    assert not issues, issues
    return build_component(entry, config, BuildContext(device=device, built=built or {}))


class Tok:
    """Stands in for a tokenizer: latent channels and (optional) per-channel statistics."""

    def __init__(self, channels: int = 4, mean=None, scale=None) -> None:
        from repae_vae.autoencoder import LatentStats

        self.latent_channels, self.downsample = channels, 8
        self.latent_stats = LatentStats(mean, scale) if mean is not None else None


def latents(*shape, seed=0, shift=1.5, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return shift + spread * torch.randn(*shape, generator=gen)


# -- registry, interface ---------------------------------------------------------------------------------------------


def test_registered_and_implement_the_interface():
    assert {"batchnorm", "fixed-scale", "channel-stats"} <= set(REGISTRY.names("normalizer"))
    tok = Tok(4, torch.zeros(4), torch.ones(4))
    for name in ("batchnorm", "fixed-scale", "channel-stats"):
        norm = build(name, built={"tokenizer": tok})
        assert isinstance(norm, LatentNormalizer) and isinstance(norm, torch.nn.Module)
        z = latents(2, 4, 3, 3)
        torch.testing.assert_close(norm(z), norm.normalize(z))
    entry = REGISTRY.get("normalizer", "batchnorm")
    for bad in ({"eps": 0.0}, {"momentum": 1.5}, {"init": "vae"}, {"channels": 0}):
        assert entry.parse(bad)[1], bad
    assert REGISTRY.get("normalizer", "channel-stats").parse({"mean": [0.0]})[1]
    assert REGISTRY.get("normalizer", "fixed-scale").parse({"scale": 0.0})[1]


def test_build_on_meta_and_channels_from_the_tokenizer():
    norm = build("batchnorm", built={"tokenizer": Tok(32)}, device="meta", init="tokenizer")  # no stats: dry run ok
    assert norm.running_mean.shape == (32,) and norm.running_mean.device.type == "meta"
    assert build("channel-stats", built={"tokenizer": Tok(32)}, device="meta").mean.device.type == "meta"
    assert build("batchnorm", channels=8).num_features == 8
    with pytest.raises(UserError, match="channels"):
        build("batchnorm")


# -- batchnorm: torch and the official REPA-E BatchNorm --------------------------------------------------------------


def test_batchnorm_equals_torch_batchnorm2d():
    ours = LatentBatchNorm(4)
    ref = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    assert set(ours.state_dict()) == set(ref.state_dict()) == BN_STATE
    for step in range(3):  # train: batch statistics, running statistics updated
        z = latents(6, 4, 5, 5, seed=step)
        torch.testing.assert_close(ours(z), ref(z), rtol=0, atol=0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)
    ours.eval(), ref.eval()
    z = latents(3, 4, 5, 5, seed=9)
    torch.testing.assert_close(ours(z), ref(z), rtol=0, atol=0)
    assert int(ours.num_batches_tracked) == 3


@needs_golden
def test_batchnorm_matches_official_repae_latent_bn():
    gold = load_file(GOLDEN / "sit_forward.safetensors")
    norm = LatentBatchNorm(4)
    norm.load_latent_norm_state({k[len("weights."):]: v for k, v in gold.items() if k.startswith("weights.bn.")})
    assert norm.init_source == "state"
    x = gold["x"]
    with torch.no_grad():
        norm.eval()  # the align pass: running statistics
        torch.testing.assert_close(norm(x), gold["eval_align.normalized_x"], **TOL)
        norm.train()  # the denoiser pass: batch statistics, running statistics updated
        torch.testing.assert_close(norm(x), gold["train.normalized_x"], **TOL)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(norm.state_dict()[key], gold[f"bn_after_train.{key}"], **TOL)
    assert torch.equal(norm.num_batches_tracked, gold["bn_after_train.num_batches_tracked"])


def test_eval_mode_gradient_reaches_latents_through_running_stats_only():
    norm = LatentBatchNorm(4).eval()
    with torch.no_grad():
        norm.running_var.fill_(4.0)
    z = latents(2, 4, 3, 3).requires_grad_()
    norm(z).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, (4.0 + 1e-4) ** -0.5))


# -- batchnorm: global batch over processes --------------------------------------------------------------------------


def _global_batch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z, w = latents(8, 4, 3, 3, seed=5), latents(8, 4, 3, 3, seed=6)
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        norm = LatentBatchNorm(4)
        with torch.no_grad():
            norm.running_mean.fill_(0.5), norm.running_var.fill_(2.0)
        x = z[rows].clone().requires_grad_()
        out = norm(x)
        (out * w[rows]).sum().backward()
        norm(z[rows] * 2.0)  # a second step
        unsynced = LatentBatchNorm(4, sync=False)
        unsynced(z[rows])
        torch.save({"out": out.detach(), "grad": x.grad, "state": norm.state_dict(),
                    "unsynced": unsynced.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_batchnorm_global_batch_statistics_over_two_processes(tmp_path):
    mp.spawn(_global_batch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    z, w = latents(8, 4, 3, 3, seed=5), latents(8, 4, 3, 3, seed=6)
    norm = LatentBatchNorm(4)
    with torch.no_grad():
        norm.running_mean.fill_(0.5), norm.running_var.fill_(2.0)
    x = z.clone().requires_grad_()
    out = norm(x)
    (out * w).sum().backward()  # the sum of both processes' losses
    norm(z * 2.0)

    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach(), **TOL)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad, **TOL)
    for p in parts:
        for key, value in norm.state_dict().items():
            torch.testing.assert_close(p["state"][key], value, **TOL, msg=lambda m: f"{key}: {m}")
    # sync: false keeps per-process statistics
    assert not torch.allclose(parts[0]["unsynced"]["running_mean"], parts[1]["unsynced"]["running_mean"])


# -- batchnorm: initialisation ---------------------------------------------------------------------------------------


def test_batchnorm_init_from_tokenizer_statistics():
    mean, scale = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.2, 1.0, 0.5, 4.0])
    tok = Tok(4, mean.view(1, 4, 1, 1), scale.view(1, 4, 1, 1))
    for init in ("auto", "tokenizer"):
        norm = build("batchnorm", built={"tokenizer": tok}, init=init)
        assert norm.init_source == "tokenizer"
        torch.testing.assert_close(norm.running_mean, mean)
        torch.testing.assert_close(norm.running_var, scale.reciprocal().square())
        z = latents(2, 4, 3, 3)
        torch.testing.assert_close(norm.eval()(z), (z - mean.view(1, 4, 1, 1)) * scale.view(1, 4, 1, 1),
                                   atol=1e-3, rtol=1e-3)  # (z - m) / sqrt(1/s^2 + eps)
    none = build("batchnorm", built={"tokenizer": tok}, init="none")
    assert none.init_source == "none" and torch.equal(none.running_var, torch.ones(4))
    assert build("batchnorm", built={"tokenizer": Tok(4)}).init_source == "none"  # auto without stats
    with pytest.raises(UserError, match="latent statistics"):
        build("batchnorm", built={"tokenizer": Tok(4)}, init="tokenizer")
    with pytest.raises(UserError, match="channels"):
        build("batchnorm", built={"tokenizer": tok}, channels=8)


def test_batchnorm_init_from_a_repae_checkpoint_through_the_denoiser(tmp_path):
    """A REPA-E SiT checkpoint's ``bn.*`` buffers reach the normaliser (denoiser built before or after it)."""
    from repae_sit import SiTConfig
    from repae_sit.model import build_sit

    config = SiTConfig.from_preset("tiny", input_size=8, in_channels=4, num_classes=10, encoder_dims=[])
    state = build_sit(config, BuildContext()).state_dict()
    bn = {"bn.running_mean": torch.arange(4.0), "bn.running_var": torch.full((4,), 3.0),
          "bn.num_batches_tracked": torch.tensor(7)}
    save_file({**state, **bn}, str(tmp_path / "repae.safetensors"))
    denoiser = build_sit(config.replace(weights=str(tmp_path / "repae.safetensors")), BuildContext())
    assert set(denoiser.latent_norm_state) == BN_STATE

    tok = Tok(4, torch.zeros(4), torch.ones(4))
    norm = build("batchnorm", built={"tokenizer": tok})  # recipe order: the normaliser first ...
    assert norm.init_source == "tokenizer"
    assert norm.init_from_denoiser(denoiser)  # ... then the trainer hands it the denoiser
    assert norm.init_source == "denoiser-checkpoint"
    torch.testing.assert_close(norm.running_mean, torch.arange(4.0))
    assert int(norm.num_batches_tracked) == 7
    built_after = build("batchnorm", built={"tokenizer": tok, "denoiser": denoiser})
    assert built_after.init_source == "denoiser-checkpoint"
    assert not build("batchnorm", built={"tokenizer": tok}, init="tokenizer").init_from_denoiser(denoiser)

    plain = build_sit(config, BuildContext())  # no bn.* buffers loaded
    assert not norm.init_from_denoiser(plain)
    strict = build("batchnorm", built={"tokenizer": tok}, init="denoiser-checkpoint")
    with pytest.raises(UserError, match="denoiser-checkpoint"):
        strict.init_from_denoiser(plain)


def test_batchnorm_state_loading_names_bad_keys():
    norm = LatentBatchNorm(4)
    norm.load_latent_norm_state({"running_mean": torch.ones(4), "running_var": torch.ones(4)})  # counter optional
    with pytest.raises(UserError, match="running_var"):
        norm.load_latent_norm_state({"bn.running_mean": torch.ones(4), "bn.running_var": torch.ones(3)})
    with pytest.raises(UserError, match="weight"):
        norm.load_latent_norm_state({"running_mean": torch.ones(4), "running_var": torch.ones(4),
                                     "weight": torch.ones(4)})
    twin = LatentBatchNorm(4)
    twin.load_state_dict(copy.deepcopy(norm).state_dict(), strict=True)  # plain state dicts and deep copies (EMA)


# -- round trips, fixed normalisers ----------------------------------------------------------------------------------


def test_round_trips():
    tok = Tok(4, torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.5, 2.0, 1.0, 0.25]))
    z = latents(3, 4, 5, 5, seed=4)
    for name, section in (("batchnorm", {}), ("fixed-scale", {"shift": 0.3}), ("channel-stats", {"multiplier": 0.7})):
        norm = build(name, built={"tokenizer": tok}, **section).eval()
        torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z, atol=2e-3 if name == "batchnorm" else 1e-5,
                                   rtol=1e-5, msg=lambda m: f"{name}: {m}")  # batchnorm: eps is not inverted
        x = norm.normalize(z).double()
        assert norm.denormalize(x).dtype == torch.float64  # samplers return float64 states
    bn = build("batchnorm", built={"tokenizer": tok}).eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn.denormalize(x), x * bn.running_var.sqrt().view(1, 4, 1, 1)
                               + bn.running_mean.view(1, 4, 1, 1), rtol=0, atol=0)


def test_fixed_scale_and_channel_stats():
    z = latents(2, 4, 3, 3)
    fixed = build("fixed-scale")
    assert isinstance(fixed, FixedScale) and fixed.scale == 0.18215 and not fixed.state_dict()
    torch.testing.assert_close(fixed(z), z * 0.18215)
    torch.testing.assert_close(build("fixed-scale", scale=2.0, shift=1.0)(z), (z - 1.0) * 2.0)

    stats = build("channel-stats", mean=[1, 2, 3, 4], std=[1, 2, 4, 8], multiplier=0.5)
    assert isinstance(stats, ChannelStats) and set(stats.state_dict()) == {"mean", "std"}
    m, s = torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1), torch.tensor([1.0, 2, 4, 8]).view(1, 4, 1, 1)
    torch.testing.assert_close(stats.train()(z), (z - m) / s * 0.5)
    torch.testing.assert_close(stats.eval()(z), (z - m) / s * 0.5)  # no mode dependence, no updates
    from_tok = build("channel-stats", built={"tokenizer": Tok(4, m, s.reciprocal())})
    torch.testing.assert_close(from_tok(z), (z - m) / s)
    with pytest.raises(UserError, match="statistics"):
        build("channel-stats", built={"tokenizer": Tok(4)})
    with pytest.raises(UserError, match="channels"):
        build("channel-stats", built={"tokenizer": Tok(8)}, mean=[0.0], std=[1.0])
