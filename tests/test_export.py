"""`repae export`: formats the run's components declare (the KL-VAE's diffusers folder and LDM safetensors with REPA-E
latent statistics; SiT's official layout) and repae's own `safetensors` (every model of the checkpoint); a format no
component declares lists the run's formats."""

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
def models(run):
    from repae.train.checkpoint import load_checkpoint

    return load_checkpoint(run.checkpoint).models


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _export(quick_run, out, fmt):
    result = _cli(str(quick_run), "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    return json.loads((out / "export.json").read_text())


def _check_manifest(manifest, out, run, models, fmt, slots):
    from repae.weights import file_sha256

    assert manifest["format"] == fmt and manifest["step"] == run.step == 4
    assert manifest["checkpoint"] == str(run.checkpoint) and manifest["run"] == str(run.run_dir)
    assert set(manifest["files"]) | {"export.json"} == {p.name for p in out.iterdir()}
    for name, info in manifest["files"].items():
        assert info["sha256"] == file_sha256(out / name) and info["bytes"] == (out / name).stat().st_size
    assert set(manifest["components"]) == set(slots)  # the components that wrote this format, by slot
    for slot in slots:
        spec = run.recipe.get(slot)[0]
        assert manifest["components"][slot]["name"] == spec.name and manifest["components"][slot]["trained_in_run"]
        assert manifest["components"][slot]["plugin"] == spec.entry.plugin.label
    # the latent statistics are the EMA latent BatchNorm's (open_run's normaliser), not the raw one's
    ema = models["ema-latent_norm"]
    assert torch.equal(run.normalizer.running_mean, ema["running_mean"])
    assert not torch.equal(ema["running_mean"], models["latent_norm"]["running_mean"])
    latents = manifest["latents"]
    assert "latent BatchNorm" in latents["source"]
    assert latents["mean"] == pytest.approx(ema["running_mean"].tolist())
    assert latents["std"] == pytest.approx(ema["running_var"].sqrt().tolist())
    assert latents["scaling_factor"] == 1.0 and latents["shift_factor"] is None


def test_export_diffusers_round_trip(quick_run, tmp_path, run, models, images):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "vae"
    manifest = _export(quick_run, out, "diffusers")
    assert set(manifest["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    _check_manifest(manifest, out, run, models, "diffusers", ["tokenizer"])
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


def test_export_ldm_reloads_into_a_fresh_tokenizer(quick_run, tmp_path, run, models, registry, images):
    from safetensors.torch import load_file

    out = tmp_path / "ldm"
    manifest = _export(quick_run, out, "ldm")
    assert set(manifest["files"]) == {"tokenizer.safetensors", "tokenizer-latents-stats.safetensors"}
    _check_manifest(manifest, out, run, models, "ldm", ["tokenizer"])
    stats = load_file(str(out / "tokenizer-latents-stats.safetensors"))
    bn = run.normalizer
    assert stats["latents_bias"].shape == stats["latents_scale"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(stats["latents_bias"].flatten(), bn.running_mean)
    torch.testing.assert_close(stats["latents_scale"].flatten(), bn.running_var.rsqrt())

    fresh = build_section(registry, "tokenizer", "sd-vae", size="tiny", weights=str(out / "tokenizer.safetensors"))
    fresh.eval()
    for key, value in run.tokenizer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # the statistics are found next to the weights (latent_stats: auto) and recorded with their file
    assert fresh.loaded_weights["weights"].sha256 == manifest["files"]["tokenizer.safetensors"]["sha256"]
    assert fresh.loaded_weights["latent_stats"].sha256 == \
        manifest["files"]["tokenizer-latents-stats.safetensors"]["sha256"]
    torch.testing.assert_close(fresh.latent_stats.mean, bn.running_mean)
    torch.testing.assert_close(fresh.latent_stats.std, bn.running_var.sqrt())
    with torch.no_grad():
        z = run.tokenizer.encode(images).mean
        assert torch.equal(fresh.encode(images).mean, z)
        assert torch.equal(fresh.decode(z), run.tokenizer.decode(z))


def _sit_section(run, weights):
    from repae.config import config_to_dict

    spec = run.recipe.get("denoiser")[0]
    return {**config_to_dict(spec.config), "in_channels": run.denoiser.in_channels,
            "encoder_dims": list(run.denoiser.encoder_dims), "input_size": run.latent_shape()[1], "weights": weights}


def test_export_official_loads_through_the_sit_adapters(quick_run, tmp_path, run, models, registry):
    from safetensors.torch import load_file

    out = tmp_path / "sit"
    manifest = _export(quick_run, out, "official")
    assert set(manifest["files"]) == {"denoiser.safetensors", "ema-denoiser.safetensors"}
    _check_manifest(manifest, out, run, models, "official", ["denoiser"])
    g = torch.Generator().manual_seed(0)
    null = int(run.denoiser.num_classes)  # the null (CFG) label
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, null])
    built = {}
    for name, norm in (("ema-denoiser", "ema-latent_norm"), ("denoiser", "latent_norm")):
        # the official layout: the denoiser's own keys plus the latent BatchNorm that goes with it as bn.*
        raw = load_file(str(out / f"{name}.safetensors"))
        assert set(raw) == set(models[name]) | {f"bn.{key}" for key in models[norm]}
        fresh = build_section(registry, "denoiser", "sit", **_sit_section(run, str(out / f"{name}.safetensors")))
        assert fresh.loaded_weights["weights"].sha256 == manifest["files"][f"{name}.safetensors"]["sha256"]
        for key, value in models[norm].items():  # the latent BatchNorm came back as bn.*
            assert torch.equal(fresh.latent_norm_state[key], value), key
        for key, value in models[name].items():
            assert torch.equal(fresh.state_dict()[key], value), key
        built[name] = fresh.eval()
    with torch.no_grad():  # open_run's denoiser is the EMA one
        assert torch.equal(built["ema-denoiser"](x, t, y).prediction, run.denoiser(x, t, y).prediction)


def test_export_safetensors_is_every_checkpoint_model(quick_run, tmp_path, run, models, registry):
    """repae's own format: each model of the checkpoint as its state dict, which the components' `weights:` options
    read back (the tokenizer and the denoiser use repae's layouts: LDM and official)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "all"
    manifest = _export(quick_run, out, "safetensors")
    assert set(manifest["files"]) == {f"{name}.safetensors" for name in models} == {
        "denoiser.safetensors", "ema-denoiser.safetensors", "tokenizer.safetensors", "discriminator.safetensors",
        "latent_norm.safetensors", "ema-latent_norm.safetensors"}
    _check_manifest(manifest, out, run, models, "safetensors", ["tokenizer", "denoiser"])
    for name, state in models.items():
        saved = load_file(str(out / f"{name}.safetensors"))
        assert set(saved) == set(state) and all(torch.equal(saved[k], v) for k, v in state.items()), name
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["step"] == "4" and f.metadata()["checkpoint"] == str(run.checkpoint)
    tokenizer = build_section(registry, "tokenizer", "sd-vae", size="tiny", weights=str(out / "tokenizer.safetensors"))
    assert all(torch.equal(tokenizer.state_dict()[k], v) for k, v in models["tokenizer"].items())
    assert tokenizer.latent_stats is None  # no statistics file in this format
    denoiser = build_section(registry, "denoiser", "sit", **_sit_section(run, str(out / "ema-denoiser.safetensors")))
    assert all(torch.equal(denoiser.state_dict()[k], v) for k, v in models["ema-denoiser"].items())
    assert denoiser.latent_norm_state is None


def test_export_refuses_a_non_empty_folder_without_force(quick_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _cli(str(quick_run), "--format", "ldm", "--out", str(out))
    assert result.exit_code == 2 and "not empty" in result.output and "--force" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    result = _cli(str(quick_run), "--format", "ldm", "--out", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert (out / "keep.txt").read_text() == "mine" and (out / "tokenizer.safetensors").is_file()


def test_a_format_no_component_declares_lists_the_runs_formats(quick_run, tmp_path):
    result = _cli(str(quick_run), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "no component of" in text and "exports the format 'onnx'" in text
    assert "tokenizer 'sd-vae' (plugin repae" in text and "declares diffusers, ldm" in text
    assert "denoiser 'sit' (plugin repae" in text and "declares official" in text
    assert "Formats of this run: safetensors, diffusers, ldm, official" in text
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


class StandIn(torch.nn.Module):
    """A third-party tokenizer: the run's, without export formats, with an attribute named `architecture` (which the
    built-in diffusers export used to read from any tokenizer)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.inner = tokenizer
        self.architecture = "conv-ae"
        self.latent_channels, self.downsample = tokenizer.latent_channels, tokenizer.downsample


def test_a_component_without_export_formats_gets_a_message(quick_run, tmp_path, monkeypatch):
    import repae.runs

    opened = repae.runs.open_run

    def open_run(*args, **kwargs):
        run = opened(*args, **kwargs)
        run.components["tokenizer"] = StandIn(run.components["tokenizer"])
        return run

    monkeypatch.setattr(repae.runs, "open_run", open_run)
    for fmt in ("diffusers", "ldm"):
        result = _cli(str(quick_run), "--format", fmt, "--out", str(tmp_path / fmt))
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "tokenizer 'sd-vae' (plugin repae" in text and "declares none" in text
        assert "Formats of this run: safetensors, official" in text
        assert "Traceback" not in result.output and not (tmp_path / fmt).exists()
    # repae's own format works for any run
    manifest = _export(quick_run, tmp_path / "all", "safetensors")
    assert "tokenizer.safetensors" in manifest["files"]


def test_available_formats_come_from_the_components(run):
    from types import SimpleNamespace

    from repae.export import available_formats

    assert available_formats(run) == {"safetensors": ["checkpoint"], "diffusers": ["tokenizer"], "ldm": ["tokenizer"],
                                      "official": ["denoiser"]}

    class Exports:
        export_formats = {"official": "mine too", "onnx": "an ONNX graph"}

        def export(self, fmt, folder, context):
            return {}

    bare = SimpleNamespace(components={"tokenizer": StandIn(run.tokenizer), "denoiser": Exports()})
    assert available_formats(bare) == {"safetensors": ["checkpoint"], "official": ["denoiser"], "onnx": ["denoiser"]}


def test_export_statistics_fallbacks(registry):
    """Without a BatchNorm: a fixed scale becomes scaling_factor (and REPA-E's scale), else the tokenizer's own
    statistics, else none."""
    from repae.export import latent_statistics
    from repae.interfaces import LatentStatistics
    from repae_latent_norm.normalizers import FixedScale
    from repae_vae.convert import repae_e_statistics

    mean, std = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])

    class Tokenizer:
        latent_stats = LatentStatistics(mean, std, source="tokenizer latent statistics (test)")

    fixed = latent_statistics(FixedScale(0.18215), Tokenizer())
    assert fixed.mean is None and fixed.std is None and fixed.scaling_factor == 0.18215 and fixed.shift_factor is None
    assert "fixed-scale" in fixed.source and not fixed.is_empty
    repae_e = repae_e_statistics(fixed, 2)
    assert torch.equal(repae_e["latents_scale"].flatten(), torch.full((2,), 0.18215))
    assert torch.equal(repae_e["latents_bias"].flatten(), torch.zeros(2))
    own = latent_statistics(None, Tokenizer())
    assert own is Tokenizer.latent_stats
    assert torch.equal(repae_e_statistics(own, 2)["latents_scale"].flatten(), torch.tensor([0.5, 0.25]))
    # a real KL-VAE with statistics set
    vae = build_section(registry, "tokenizer", "sd-vae", size="tiny")
    assert latent_statistics(None, vae).is_empty  # none loaded
    vae.set_latent_stats(torch.arange(4.0), torch.full((4,), 2.0))
    shipped = latent_statistics(None, vae)
    assert torch.equal(shipped.mean, torch.arange(4.0)) and torch.equal(shipped.std, torch.full((4,), 2.0))
    none = latent_statistics(None, object())
    assert none.source == "none" and none.is_empty and repae_e_statistics(none, 2) is None
