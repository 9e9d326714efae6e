"""The KL-VAE tokenizers (sd-vae, in-vae, va-vae): forward/backward, state-dict layouts, golden numerics against the
official REPA-E code, parity with diffusers.AutoencoderKL, weight and latent-statistics loading, loading errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import repae
import repae.weights
from conftest import GOLDEN, build_section, load_manifest, official_weights, read_golden, vae_fields
from repae.errors import RecipeError, UserError
from repae.interfaces import Posterior, Tokenizer
from repae_vae import F8D4, F16D32, TINY
from repae_vae.autoencoder import KLAutoencoder
from repae_vae.convert import (
    architecture_from_diffusers,
    diffusers_config,
    diffusers_to_ldm,
    ldm_to_diffusers,
    save_diffusers,
)

MANIFESTS = GOLDEN / "manifests"
NAMES = ("sd-vae", "in-vae", "va-vae")


def build(registry, name: str, device: str = "cpu", **section):
    return build_section(registry, "tokenizer", name, device, **section)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial random weights (norm scales near 1) so that every parameter matters in comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_scale else 0.1 * noise)
    return module


def parse_section(registry, name: str, **section):
    """The config a tokenizer section resolves to (presets applied); asserts it is valid."""
    config, issues = registry.get("tokenizer", name).parse(section)
    assert not issues, issues
    return config


def tiny(seed: int = 0) -> KLAutoencoder:
    return randomize_(KLAutoencoder(**TINY), seed).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Registration, interface, forward/backward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "channels", "factor"),
    [("sd-vae", "f8d4", 4, 8), ("in-vae", "f16d32", 32, 16), ("va-vae", "f16d32", 32, 16)],
)
def test_registered_with_sensible_defaults(registry, name, size, channels, factor):
    entry = registry.get("tokenizer", name)
    config, issues = entry.parse({})
    assert not issues
    assert config.size == size and config.latent_channels == channels
    assert {k: getattr(config, k) for k in entry.presets[size]} == entry.presets[size]  # defaults = default preset
    assert 2 ** (len(config.ch_mult) - 1) == factor
    assert config.weights is None  # tests and dry runs never download
    assert set(entry.presets) >= {"f8d4", "f16d32", "tiny"}
    _, issues = entry.parse({"variant": "tiny"})  # the old selector name points to the new one
    assert issues and "size: tiny" in issues[0].hint


def test_tiny_forward_backward(registry):
    vae = build(registry, "sd-vae", size="tiny")
    assert isinstance(vae, Tokenizer)
    assert 1_000 <= sum(p.numel() for p in vae.parameters()) <= 100_000
    assert (vae.latent_channels, vae.downsample) == (4, 4)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(images)
    assert isinstance(posterior, Posterior)
    assert posterior.mean.shape == (2, 4, 8, 8) and posterior.kl().shape == (2,)
    eps = torch.randn_like(posterior.mean)
    z = posterior.sample(eps)
    torch.testing.assert_close(z, posterior.mean + posterior.std * eps)
    torch.testing.assert_close(posterior.mode(), posterior.mean)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    recon = vae.decode(z)
    assert recon.shape == images.shape
    loss = (recon - images).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    missing = [n for n, p in vae.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert vae.loaded_weights == {} and vae.latent_stats is None


def test_sample_draws_fresh_noise_unless_given():
    posterior = tiny().encode(torch.zeros(1, 3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    a, b = posterior.sample(generator=gen), posterior.sample(generator=gen)
    assert not torch.equal(a, b)
    torch.testing.assert_close(posterior.sample(torch.zeros_like(a)), posterior.mean)


def test_invalid_architecture_is_a_config_error(registry):
    """Found by the config's own check (so `repae recipe validate` reports it), before anything is built."""
    with pytest.raises(RecipeError, match=r"norm_groups: 4 does not divide the channel widths \[6\]"):
        build(registry, "sd-vae", size="tiny", ch=6)


def test_state_dict_round_trip_is_strict_and_exact():
    a, b = tiny(0), tiny(1)
    b.load_state_dict(a.state_dict(), strict=True)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        eps = torch.zeros(2, 4, 8, 8)
        torch.testing.assert_close(a(images, eps)[2], b(images, eps)[2], rtol=0, atol=0)
    assert not any("latents_" in k for k in a.state_dict())  # statistics travel outside the LDM layout


# ---------------------------------------------------------------------------------------------------------------------
# Full-size presets on meta against the official manifests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "manifest"),
    [("sd-vae", "vae_f8d4.json"), ("in-vae", "vae_f16d32.json"), ("va-vae", "vae_f16d32.json")],
)
def test_full_size_on_meta_matches_official_layout(registry, name, manifest):
    meta, shapes = load_manifest(manifest)
    vae = build(registry, name, device="meta")  # the component's defaults are the official model's
    kwargs = meta["kwargs"]
    assert (vae.architecture["ch_mult"], vae.latent_channels) == (kwargs["ch_mult"], kwargs["embed_dim"])
    assert all(p.is_meta for p in vae.parameters())
    assert sum(p.numel() for p in vae.parameters()) == meta["num_parameters"]
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == shapes


def test_full_size_converts_to_diffusers_layout(registry):
    meta, shapes = load_manifest("diffusers_sdvae.json")
    vae = build(registry, "sd-vae", device="meta")
    converted = ldm_to_diffusers(vae.state_dict())
    assert {k: list(v.shape) for k, v in converted.items()} == shapes
    assert sum(v.numel() for v in converted.values()) == meta["num_parameters"]
    expected = meta["kwargs"]
    config = diffusers_config(vae.architecture)
    assert {k: config[k] for k in expected} == expected
    back = diffusers_to_ldm(converted)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae.state_dict().items()}


@pytest.mark.parametrize("arch", [F8D4, F16D32, TINY], ids=["f8d4", "f16d32", "tiny"])
def test_diffusers_config_round_trip(arch):
    config = diffusers_config(arch)
    with torch.device("meta"):
        original, rebuilt = KLAutoencoder(**arch), KLAutoencoder(**architecture_from_diffusers(config))
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    attention_levels = [t.startswith("Attn") for t in config["down_block_types"]]
    assert attention_levels == [False] * (len(arch["ch_mult"]) - 1) + [arch is not F8D4]
    assert config["up_block_types"][0].startswith("Attn") == (arch is not F8D4)


# ---------------------------------------------------------------------------------------------------------------------
# Golden numerics (official REPA-E AutoencoderKL)
# ---------------------------------------------------------------------------------------------------------------------


def test_golden_forward_matches_official(registry):
    meta, tensors = read_golden("vae_forward.safetensors")
    also = meta.get("weights_also_in", [])  # the weights are split over several files (size limit)
    for name in [also] if isinstance(also, str) else also:
        tensors.update(read_golden(name)[1])
    cfg, tol = meta["vae_config"], meta["suggested_tolerance"]
    assert cfg["z_channels"] == cfg["embed_dim"] and cfg["double_z"] and cfg["dropout"] == 0
    assert cfg["in_channels"] == cfg["out_ch"] == 3  # RGB
    vae = build(registry, "sd-vae", **vae_fields(cfg)).eval()
    vae.load_state_dict(official_weights(tensors), strict=True)
    with torch.no_grad():
        encoder_out = vae.encoder(tensors["image"])
        posterior = vae.encode(tensors["image"])
        z = posterior.sample(tensors["eps"])
        got = {
            "encoder_out": encoder_out,
            "moments": vae.quant_conv(encoder_out),
            "posterior_mean": posterior.mean,
            "posterior_logvar": posterior.logvar,
            "posterior_std": posterior.std,
            "posterior_var": posterior.var,
            "posterior_kl": posterior.kl(),
            "z_sample": z,
            "decoded_from_sample": vae.decode(z),
            "decoded_from_mean": vae.decode(posterior.mode()),
            "forward_recon": vae(tensors["image"], tensors["eps"])[2],
        }
    assert set(meta["roles"]["outputs"]) <= set(got), "every output of the file is compared"
    expected = dict(tensors, forward_recon=tensors["decoded_from_sample"])
    for key, value in got.items():
        torch.testing.assert_close(
            value, expected[key], atol=tol["atol"], rtol=tol["rtol"], msg=lambda m, k=key: f"{k}: {m}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# diffusers parity through the converter (test-only dependency)
# ---------------------------------------------------------------------------------------------------------------------


# The tiny preset, and the f16d32 layout narrowed (several attention blocks per level, 5 levels).
PARITY_ARCHS = {"tiny": TINY, "f16d32-narrow": {**F16D32, "ch": 32, "resolution": 64, "attn_resolutions": [4]}}


def diffusers_model(arch: dict, seed: int):
    diffusers = pytest.importorskip("diffusers")
    config = {k: v for k, v in diffusers_config(KLAutoencoder(**arch).architecture).items() if not k.startswith("_")}
    assert config["down_block_types"][-1] == "AttnDownEncoderBlock2D"  # both exercise level attention
    return randomize_(diffusers.AutoencoderKL(**config), seed).eval()


def assert_same_outputs(ours: KLAutoencoder, theirs, size: int = 32) -> None:
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post, dist = ours.encode(images), theirs.encode(images).latent_dist
        torch.testing.assert_close(post.mean, dist.mean, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, dist.logvar, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(post.mean), theirs.decode(dist.mean).sample, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(PARITY_ARCHS))
def test_diffusers_weights_convert_to_ours(arch):
    theirs = diffusers_model(PARITY_ARCHS[arch], seed=5)
    ours = KLAutoencoder(**PARITY_ARCHS[arch]).eval()
    ours.load_state_dict(diffusers_to_ldm(theirs.state_dict()), strict=True)
    assert_same_outputs(ours, theirs, PARITY_ARCHS[arch]["resolution"])


@pytest.mark.parametrize("arch", list(PARITY_ARCHS))
def test_our_weights_convert_to_diffusers(arch):
    theirs = diffusers_model(PARITY_ARCHS[arch], seed=5)
    ours = randomize_(KLAutoencoder(**PARITY_ARCHS[arch]), 6).eval()
    theirs.load_state_dict(ldm_to_diffusers(ours.state_dict()), strict=True)
    assert_same_outputs(ours, theirs, PARITY_ARCHS[arch]["resolution"])


def test_legacy_diffusers_attention_names_convert():
    ours = tiny(seed=7)
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    legacy = {}
    for k, v in ldm_to_diffusers(ours.state_dict()).items():
        for new, old in old_names.items():
            k = k.replace(new, old)
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    back = diffusers_to_ldm(legacy)
    assert back.keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_save_diffusers_folder_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = tiny(seed=8)
    ours.set_latent_stats(torch.arange(4.0), torch.full((4,), 0.5))  # mean, std
    folder = save_diffusers(ours, tmp_path / "vae-hf")
    theirs = diffusers.AutoencoderKL.from_pretrained(str(folder)).eval()
    assert list(theirs.config.latents_std) == [0.5] * 4 and list(theirs.config.latents_mean) == [0.0, 1.0, 2.0, 3.0]
    assert_same_outputs(ours, theirs)


# ---------------------------------------------------------------------------------------------------------------------
# Loading by source: weights, latent statistics, errors
# ---------------------------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def test_loads_ldm_pt_with_repae_latent_stats(registry, tmp_path):
    ours = tiny(seed=10)
    ckpt = tmp_path / "e2e-tiny-400k.pt"
    torch.save(ours.state_dict(), ckpt)
    stats = {"latents_scale": torch.full((1, 4, 1, 1), 0.5), "latents_bias": torch.arange(4.0).view(1, 4, 1, 1)}
    torch.save(stats, tmp_path / "e2e-tiny-400k-latents-stats.pt")
    vae = build(registry, "sd-vae", size="tiny", weights=str(ckpt))
    assert_same_weights(ours, vae)
    assert vae.loaded_weights["weights"].sha256 == sha256(ckpt)
    assert vae.latent_stats is not None
    torch.testing.assert_close(vae.latent_stats.mean, torch.arange(4.0))
    torch.testing.assert_close(vae.latent_stats.std, torch.full((4,), 2.0))  # REPA-E's latents_scale is 1 / std
    stats = vae.loaded_weights["latent_stats"]
    assert stats.sha256 == sha256(tmp_path / "e2e-tiny-400k-latents-stats.pt")
    assert stats.path == str(tmp_path / "e2e-tiny-400k-latents-stats.pt")
    assert build(registry, "sd-vae", size="tiny", weights=str(ckpt), latent_stats=None).latent_stats is None


def test_loads_safetensors_with_lightningdit_stats(registry, tmp_path):
    ours = tiny(seed=11)
    save_file(ours.state_dict(), str(tmp_path / "vae.safetensors"))
    torch.save({"mean": torch.ones(1, 4, 1, 1), "std": torch.full((1, 4, 1, 1), 4.0)}, tmp_path / "stats.pt")
    vae = build(
        registry,
        "va-vae",
        size="tiny",
        weights=str(tmp_path / "vae.safetensors"),
        latent_stats=str(tmp_path / "stats.pt"),
    )
    assert_same_weights(ours, vae)
    assert vae.loaded_weights["weights"].sha256 == sha256(tmp_path / "vae.safetensors")
    torch.testing.assert_close(vae.latent_stats.mean, torch.ones(4))
    torch.testing.assert_close(vae.latent_stats.std, torch.full((4,), 4.0))


def test_loads_diffusers_folder_with_config_stats(registry, tmp_path):
    ours = tiny(seed=12)
    ours.set_latent_stats(torch.zeros(4), torch.full((4,), 4.0))  # mean, std
    folder = save_diffusers(ours, tmp_path / "e2e-tiny-hf")
    vae = build(registry, "in-vae", size="tiny", weights=str(folder))
    assert_same_weights(ours, vae)
    assert vae.loaded_weights["weights"].sha256 == sha256(folder / "diffusion_pytorch_model.safetensors")
    assert vae.loaded_weights["latent_stats"].path == str(folder / "config.json")
    torch.testing.assert_close(vae.latent_stats.std, torch.full((4,), 4.0))


def test_loads_vae_from_a_training_checkpoint(registry, tmp_path):
    ours = tiny(seed=13)
    ckpt = tmp_path / "0400000.pt"
    torch.save({"vae": ours.state_dict(), "model": {"blocks.0.weight": torch.zeros(1)}}, ckpt)
    with pytest.raises(UserError, match="vae"):
        build(registry, "sd-vae", size="tiny", weights=str(ckpt))
    vae = build(registry, "sd-vae", size="tiny", weights=str(ckpt), weights_key="vae")
    assert_same_weights(ours, vae)


def test_missing_file_names_it(registry, tmp_path):
    with pytest.raises(UserError, match="nowhere.pt"):
        build(registry, "sd-vae", size="tiny", weights=str(tmp_path / "nowhere.pt"))


def test_wrong_layout_names_keys(registry, tmp_path):
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "sit.safetensors"))
    with pytest.raises(UserError, match=r"not an AutoencoderKL state dict.*blocks\.0\.attn\.qkv\.weight"):
        build(registry, "sd-vae", size="tiny", weights=str(tmp_path / "sit.safetensors"))


def test_shape_mismatch_names_keys(registry, tmp_path):
    other = KLAutoencoder(**{**TINY, "latent_channels": 8})
    save_file(other.state_dict(), str(tmp_path / "d8.safetensors"))
    expected = r"shape mismatch.*quant_conv\.weight: file \[16, 16, 1, 1\] vs model \[8, 8, 1, 1\]"
    with pytest.raises(UserError, match=expected):
        build(registry, "sd-vae", size="tiny", weights=str(tmp_path / "d8.safetensors"))


def test_missing_and_unexpected_keys_are_named(registry, tmp_path):
    state = tiny().state_dict()
    del state["decoder.conv_out.bias"]
    state["loss.discriminator.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "partial.safetensors"))
    expected = r"(?s)missing key.*decoder\.conv_out\.bias.*unexpected key.*loss\.discriminator\.weight"
    with pytest.raises(UserError, match=expected):
        build(registry, "sd-vae", size="tiny", weights=str(tmp_path / "partial.safetensors"))
    state["decoder.conv_out.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="unexpected"):
        build(registry, "sd-vae", size="tiny", weights=str(tmp_path / "extra.safetensors"))
    vae = build(registry, "sd-vae", size="tiny", weights=str(tmp_path / "extra.safetensors"), strict=False)
    assert torch.equal(vae.decoder.conv_out.bias, torch.zeros(3))


def test_latent_stats_of_another_vae_are_rejected(registry, tmp_path):
    torch.save({"latents_scale": torch.ones(1, 32, 1, 1), "latents_bias": torch.zeros(1, 32, 1, 1)}, tmp_path / "s.pt")
    with pytest.raises(UserError, match="32"):
        build(registry, "sd-vae", size="tiny", latent_stats=str(tmp_path / "s.pt"))


def test_meta_build_never_touches_weights(registry, tmp_path):
    absent = {"weights": str(tmp_path / "absent.pt"), "latent_stats": str(tmp_path / "x.pt")}
    vae = build(registry, "sd-vae", device="meta", **absent)
    assert vae.loaded_weights == {} and vae.latent_stats is None


def fake_hub_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache entry for ``repo`` holding ``files`` (read offline, as after `hf download`)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_loads_repae_hub_repository_offline(registry, offline_hub, tmp_path):
    torch.manual_seed(14)
    ours = KLAutoencoder(**F8D4)  # the release's architecture (random weights, stored in half precision: 167 MB)
    torch.save({k: v.half() for k, v in ours.state_dict().items()}, tmp_path / "w.pt")
    stats = {"latents_scale": torch.full((1, 4, 1, 1), 3.0), "latents_bias": torch.zeros(1, 4, 1, 1)}
    torch.save(stats, tmp_path / "s.pt")
    files = {"sdvae-f8d4.pt": tmp_path / "w.pt", "sdvae-f8d4-latents-stats.pt": tmp_path / "s.pt"}
    fake_hub_repo(offline_hub, "REPA-E/sdvae", files)
    vae = build(registry, "sd-vae", size="f8d4", weights="hf://REPA-E/sdvae")  # the repository alone names its file
    for k, v in ours.state_dict().items():
        assert torch.equal(v.half().float(), vae.state_dict()[k]), k
    info = vae.loaded_weights["weights"]
    assert info.sha256 == sha256(tmp_path / "w.pt") and info.source == "hf://REPA-E/sdvae"
    torch.testing.assert_close(vae.latent_stats.std, torch.full((4,), 1 / 3))


def test_hub_repository_without_cached_stats_loads_without_them(registry, offline_hub, tmp_path):
    ours = tiny(seed=15)
    folder = save_diffusers(ours, tmp_path / "hf")
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    fake_hub_repo(offline_hub, "someone/tiny-vae-hf", {weights_file.name: weights_file})
    vae = build(registry, "sd-vae", size="tiny", weights="hf://someone/tiny-vae-hf")
    assert_same_weights(ours, vae)
    assert vae.latent_stats is None


def test_uncached_hub_weights_say_what_to_download(registry, offline_hub):
    with pytest.raises(UserError, match=r"(?s)e2e-vavae-400k\.pt.*REPA-E/e2e-vavae"):
        build(registry, "va-vae", weights="hf://REPA-E/e2e-vavae")  # its preset, f16d32


def test_registration_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, repae_vae; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hub_stats_are_fetched_beside_the_checkpoint(registry, tmp_path, monkeypatch):
    ours = tiny(seed=16)  # tiny weights: a repository that is not a release (those must hold their architecture)
    (tmp_path / "cached").mkdir()
    (tmp_path / "fetched").mkdir()
    ckpt = tmp_path / "cached" / "e2e-tiny-400k.pt"
    torch.save(ours.state_dict(), ckpt)
    stats = tmp_path / "fetched" / "e2e-tiny-400k-latents-stats.pt"
    torch.save({"latents_scale": torch.full((1, 4, 1, 1), 2.0), "latents_bias": torch.zeros(1, 4, 1, 1)}, stats)
    asked = []

    def resolve(source, *, default_filename=None):
        asked.append(source)
        return stats if "latents-stats" in source else ckpt

    # the public name (what plugins import) and the module's own (what repae.load_weights calls)
    monkeypatch.setattr(repae.weights, "resolve_weights", resolve)
    monkeypatch.setattr(repae, "resolve_weights", resolve)
    vae = build(registry, "va-vae", size="tiny", weights="hf://someone/e2e-tiny/e2e-tiny-400k.pt@v1")
    repo = "hf://someone/e2e-tiny"
    assert asked == [f"{repo}/e2e-tiny-400k.pt@v1", f"{repo}/e2e-tiny-400k-latents-stats.pt@v1"]
    torch.testing.assert_close(vae.latent_stats.std, torch.full((4,), 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# Weights and configuration agree (issue 11): fields that change no parameter shape are checked against the release
# ---------------------------------------------------------------------------------------------------------------------

# The reported input: the tiny preset's fields, with the f8d4 shape fields set, keeps the tiny preset's norm_groups 4.
F8D4_SHAPES_TINY_GROUPS = {**{k: v for k, v in F8D4.items() if k != "norm_groups"}, "size": "tiny"}


@pytest.fixture(scope="module")
def f8d4_file(tmp_path_factory) -> Path:
    """A real f8d4-layout state dict (random weights, half precision) in a plain .pt file, as REPA-E's sdvae-f8d4.pt."""
    torch.manual_seed(21)
    file = tmp_path_factory.mktemp("f8d4") / "sdvae-f8d4.pt"
    torch.save({k: v.half() for k, v in KLAutoencoder(**F8D4).state_dict().items()}, file)
    return file


def test_release_weights_into_a_config_with_other_norm_groups_are_refused(registry, f8d4_file):
    """The f8d4 weights load strictly into norm_groups 4 (no shape changes) and compute something else: an error
    naming the field, both values and the preset, before anything is copied."""
    assert parse_section(registry, "sd-vae", **F8D4_SHAPES_TINY_GROUPS).norm_groups == 4
    with pytest.raises(UserError, match=r"(?s)norm_groups 4 \(the weights: 32\).*no parameter shape.*size: f8d4"):
        build(registry, "sd-vae", weights=str(f8d4_file), **F8D4_SHAPES_TINY_GROUPS)
    vae = build(registry, "sd-vae", size="f8d4", weights=str(f8d4_file))  # the release's own preset loads
    assert vae.architecture["norm_groups"] == 32


def test_release_layout_is_checked_by_validate_from_the_header(registry, tmp_path):
    """A local safetensors file: ``repae recipe validate`` (a build on meta) reads its header and refuses the config,
    without reading the tensors."""
    from repae.compose import compose_recipe
    from repae.recipe import read_recipe

    with torch.device("meta"):
        model = KLAutoencoder(**F8D4)
    file = tmp_path / "sdvae-f8d4.safetensors"
    header = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in model.state_dict().items()}
    save_file(header, str(file))
    with pytest.raises(UserError, match=r"norm_groups 4 \(the weights: 32\)"):
        build(registry, "sd-vae", device="meta", weights=str(file), **F8D4_SHAPES_TINY_GROUPS)
    fields = ", ".join(f"{k}: {v}" for k, v in {**F8D4_SHAPES_TINY_GROUPS, "weights": str(file)}.items())
    recipe = tmp_path / "r.yaml"
    recipe.write_text((Path(__file__).parents[1] / "recipes" / "quickstart.yaml").read_text().replace(
        "tokenizer: {name: sd-vae, size: tiny}", f"tokenizer: {{name: sd-vae, {fields}}}").replace(
        "extends: _base/repae_losses.yaml", f"extends: {Path(__file__).parents[1] / 'recipes/_base/repae_losses.yaml'}"))
    with pytest.raises(RecipeError, match=r"(?s)tokenizer.*norm_groups 4 \(the weights: 32\).*size: f8d4"):
        compose_recipe(read_recipe(recipe, ["dataset.resolution=256"], registry), check_step=False)
    build(registry, "sd-vae", device="meta", size="f8d4", weights=str(file))  # the right config passes


def test_weights_naming_a_release_are_checked_by_the_config(registry):
    """``weights`` naming a released repository: every architecture field against the release, at the key path."""
    entry = registry.get("tokenizer", "sd-vae")
    _, issues = entry.parse({**F8D4_SHAPES_TINY_GROUPS, "weights": "hf://REPA-E/sdvae"})
    assert [i.path for i in issues] == ["norm_groups"]
    assert "norm_groups 4 (the weights: 32)" in issues[0].message and "size: f8d4" in issues[0].message
    _, issues = entry.parse({"size": "tiny", "weights": "hf://stabilityai/sd-vae-ft-ema"})
    assert [i.path for i in issues] == ["ch"]  # the first field that differs; the message lists them all
    assert all(f in issues[0].message for f in ("ch 8 (the weights: 128)", "norm_groups 4 (the weights: 32)"))
    _, issues = registry.get("tokenizer", "va-vae").parse({"size": "f8d4", "weights": "hf://REPA-E/e2e-vavae"})
    assert issues and "size: f16d32" in issues[0].message
    for name, size, source in (("sd-vae", "f8d4", "hf://REPA-E/e2e-sdvae/e2e-sdvae-400k.pt"),
                               ("in-vae", "f16d32", "hf://REPA-E/invae"), ("sd-vae", "tiny", "hf://me/my-vae")):
        _, issues = registry.get("tokenizer", name).parse({"size": size, "weights": source})
        assert not issues, (source, issues)


def test_weights_stating_their_architecture_are_checked_against_it(registry, tmp_path):
    """A diffusers folder (config.json) or repae's own export (safetensors metadata) states its architecture: a config
    that differs from it, even in a field that changes no shape, is refused; the stated one loads."""
    from repae_vae.convert import export_ldm
    from repae.interfaces import ExportContext, LatentStatistics

    ours = tiny(seed=22)  # norm_groups 4; 2 divides every width too, and changes no shape
    folder = save_diffusers(ours, tmp_path / "hf")
    with pytest.raises(UserError, match=r"(?s)config\.json states.*norm_groups 2 \(the weights: 4\)"):
        build(registry, "sd-vae", size="tiny", norm_groups=2, weights=str(folder))
    assert_same_weights(ours, build(registry, "sd-vae", size="tiny", weights=str(folder)))
    export_ldm(ours, tmp_path, ExportContext("tokenizer", LatentStatistics(), None, {}))
    exported = tmp_path / "tokenizer.safetensors"
    with pytest.raises(UserError, match=r"(?s)repae\.architecture metadata.*norm_groups 2 \(the weights: 4\)"):
        build(registry, "sd-vae", size="tiny", norm_groups=2, weights=str(exported))
    with pytest.raises(UserError, match=r"norm_groups 2 \(the weights: 4\)"):  # validate too (the header)
        build(registry, "sd-vae", device="meta", size="tiny", norm_groups=2, weights=str(exported))
    assert_same_weights(ours, build(registry, "sd-vae", size="tiny", weights=str(exported)))
