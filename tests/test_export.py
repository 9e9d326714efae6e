"""`repae export`: diffusers AutoencoderKL folder, LDM safetensors + REPA-E latent statistics, official-layout SiT."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import build_section


def _cli(*args: str):
    from repae.cli.export import export

    app = typer.Typer()
    app.command()(export)
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def run(quick_run):
    from repae.runs import open_run

    return open_run(quick_run, slots=("tokenizer", "encoders", "latent_norm", "denoiser"))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _export(quick_run, out, fmt):
    result = _cli(str(quick_run), "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    return json.loads((out / "export.json").read_text())


def _check_manifest(manifest, out, run, fmt):
    from repae.weights import file_sha256

    assert manifest["format"] == fmt and manifest["step"] == run.step == 4
    assert manifest["checkpoint"] == str(run.checkpoint)
    for name, info in manifest["files"].items():
        assert info["sha256"] == file_sha256(out / name) and info["bytes"] == (out / name).stat().st_size
    bn = run.normalizer
    assert manifest["latents"]["source"].startswith("EMA latent BatchNorm")
    assert manifest["latents"]["mean"] == pytest.approx(bn.running_mean.tolist())
    assert manifest["latents"]["std"] == pytest.approx(bn.running_var.sqrt().tolist())


def test_export_diffusers_round_trip(quick_run, tmp_path, run, images):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "vae"
    manifest = _export(quick_run, out, "diffusers")
    assert set(manifest["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    _check_manifest(manifest, out, run, "diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(str(out)).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["latents_mean"] == pytest.approx(run.normalizer.running_mean.tolist())
    assert config["latents_std"] == pytest.approx(run.normalizer.running_var.sqrt().tolist())
    assert vae.config.scaling_factor == 1.0 and list(vae.config.latents_mean) == config["latents_mean"]
    with torch.no_grad():
        ours = run.tokenizer.encode(images)
        theirs = vae.encode(images).latent_dist
        torch.testing.assert_close(theirs.mean, ours.mean, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.logvar, ours.logvar, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(ours.mean).sample, run.tokenizer.decode(ours.mean), atol=5e-5,
                                   rtol=1e-5)


def test_export_ldm_reloads_into_a_fresh_tokenizer(quick_run, tmp_path, run, registry, images):
    from safetensors.torch import load_file

    out = tmp_path / "ldm"
    manifest = _export(quick_run, out, "ldm")
    assert set(manifest["files"]) == {"vae.safetensors", "vae-latents-stats.safetensors"}
    _check_manifest(manifest, out, run, "ldm")
    stats = load_file(str(out / "vae-latents-stats.safetensors"))
    bn = run.normalizer
    assert stats["latents_bias"].shape == stats["latents_scale"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(stats["latents_bias"].flatten(), bn.running_mean)
    torch.testing.assert_close(stats["latents_scale"].flatten(), bn.running_var.rsqrt())

    fresh = build_section(registry, "tokenizer", "sd-vae", variant="tiny", weights=str(out / "vae.safetensors"))
    fresh.eval()
    for key, value in run.tokenizer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(fresh.latent_stats.mean, bn.running_mean)  # found next to the weights (auto)
    torch.testing.assert_close(fresh.latent_stats.scale, bn.running_var.rsqrt())
    with torch.no_grad():
        z = run.tokenizer.encode(images).mean
        assert torch.equal(fresh.encode(images).mean, z)
        assert torch.equal(fresh.decode(z), run.tokenizer.decode(z))


def test_export_safetensors_loads_through_the_sit_adapters(quick_run, tmp_path, run, registry):
    from repae.config import config_to_dict
    from repae.train.checkpoint import load_checkpoint

    out = tmp_path / "sit"
    manifest = _export(quick_run, out, "safetensors")
    assert set(manifest["files"]) == {"denoiser.safetensors", "ema-denoiser.safetensors", "tokenizer.safetensors",
                                      "tokenizer-latents-stats.safetensors"}
    _check_manifest(manifest, out, run, "safetensors")
    assert manifest["denoiser"]["name"] == "sit"
    spec = run.recipe.get("denoiser")[0]
    section = {**config_to_dict(spec.config), "in_channels": run.denoiser.in_channels,
               "encoder_dims": list(run.denoiser.encoder_dims), "input_size": run.latent_shape()[1]}
    models = load_checkpoint(run.checkpoint).models
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 10])
    built = {}
    for name, norm in (("ema-denoiser", "ema-latent_norm"), ("denoiser", "latent_norm")):
        fresh = build_section(registry, "denoiser", "sit", **{**section, "weights": str(out / f"{name}.safetensors")})
        assert fresh.loaded_weights.sha256 == manifest["files"][f"{name}.safetensors"]["sha256"]
        for key, value in models[norm].items():  # the latent BatchNorm came back as bn.*
            assert torch.equal(fresh.latent_norm_state[key], value), key
        for key, value in models[name].items():
            assert torch.equal(fresh.state_dict()[key], value), key
        built[name] = fresh.eval()
    with torch.no_grad():  # open_run's denoiser is the EMA one
        assert torch.equal(built["ema-denoiser"](x, t, y).prediction, run.denoiser(x, t, y).prediction)


def test_export_refuses_a_non_empty_folder_without_force(quick_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli(str(quick_run), "--format", "ldm", "--out", str(out))
    assert result.exit_code == 2 and "not empty" in result.output and "--force" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = _cli(str(quick_run), "--format", "ldm", "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert (out / "keep.txt").read_text() == "mine" and (out / "vae.safetensors").is_file()
    result = _cli(str(quick_run), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "diffusers, ldm, safetensors" in result.output
    assert not (tmp_path / "x").exists()


def test_export_statistics_fallbacks():
    """Without a BatchNorm: a fixed scale becomes scaling_factor (and REPA-E scale), else the tokenizer's own."""
    from repae.export import latent_statistics
    from repae_latent_norm.normalizers import FixedScale

    class Stats:
        mean, scale = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25])

    class Tokenizer:
        latent_stats = Stats()

    fixed = latent_statistics(FixedScale(0.18215), Tokenizer())
    assert fixed.mean is None and fixed.scaling_factor == 0.18215 and fixed.shift_factor is None
    assert torch.equal(fixed.repae_e(2)["latents_scale"].flatten(), torch.full((2,), 0.18215))
    own = latent_statistics(None, Tokenizer())
    assert own.source == "tokenizer latent_stats" and own.std.tolist() == [2.0, 4.0]
    assert torch.equal(own.repae_e(2)["latents_scale"].flatten(), Stats.scale)
    none = latent_statistics(None, object())
    assert none.source == "none" and none.repae_e(2) is None
