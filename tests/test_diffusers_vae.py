"""The `diffusers-vae` tokenizer: diffusers' AutoencoderKL (FLUX / SD3.5 layouts) and AutoencoderKLQwenImage with
random weights in their real configs, narrowed (same block layout and key names, smaller widths) to keep CPU tests
fast: loading a saved folder and a hub id from an offline cache, parity with diffusers itself, the latent statistics
the normalisers read, a few REPA-E steps through the real engine, export and reload with `from_pretrained`, and the
errors a user meets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import repae

diffusers = pytest.importorskip("diffusers")

from conftest import ROOT

TOL = {"atol": 5e-5, "rtol": 1e-5}
KL_BLOCKS = {"down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
             "block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
"""FLUX's / SD3.5's AutoencoderKL layout (no attention but the middle, 16 channels, no quant convs), narrowed: f4."""
FLUX_SMALL = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False, "scaling_factor": 0.3611,
              "shift_factor": 0.1159, "sample_size": 1024, "force_upcast": True, **KL_BLOCKS}
SD35_SMALL = {**FLUX_SMALL, "scaling_factor": 1.5305, "shift_factor": 0.0609}
QWEN_SMALL = {"base_dim": 8, "dim_mult": [1, 2, 2], "num_res_blocks": 1, "temperal_downsample": [False, True]}
"""AutoencoderKLQwenImage's default config (z_dim 16, latents_mean/std) narrowed: base_dim 8, f4."""
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def registry():
    return repae.load_plugins(select={"repae"}).registry


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _reference(model_class: str, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return getattr(diffusers, model_class)(**config).eval()


def _save(vae, folder: Path) -> Path:
    vae.save_pretrained(str(folder), safe_serialization=True)  # diffusers' own writer: config.json + safetensors
    return folder


def _create(registry, **section):
    return repae.create("tokenizer", "diffusers-vae", registry=registry, **section)


def _outputs(vae, images: torch.Tensor, video: bool):
    """diffusers' own encode / decode (the Qwen-Image VAE through its frame-cache path, on one frame)."""
    with torch.no_grad():
        x = images.unsqueeze(2) if video else images
        dist = vae.encode(x).latent_dist
        decoded = vae.decode(dist.mean).sample
    if video:
        return dist.mean.squeeze(2), dist.logvar.squeeze(2), decoded.squeeze(2)
    return dist.mean, dist.logvar, decoded


def _assert_parity(tokenizer, reference, images, video):
    mean, logvar, decoded = _outputs(reference, images, video)
    with torch.no_grad():
        posterior = tokenizer.eval().encode(images)
        ours = tokenizer.decode(posterior.mean)
    diffs = [(a - b).abs().max().item() for a, b in ((posterior.mean, mean), (posterior.logvar, logvar),
                                                     (ours, decoded))]
    print(f"max abs diff vs diffusers (mean, logvar, decode): {diffs}")
    torch.testing.assert_close(posterior.mean, mean, **TOL)
    torch.testing.assert_close(posterior.logvar, logvar, **TOL)
    torch.testing.assert_close(ours, decoded, **TOL)
    return diffs


# -- registration, building ----------------------------------------------------------------------------------------
def test_registration_imports_neither_torch_nor_diffusers():
    code = ("import sys, repae_diffusers_vae; "
            "assert not {'torch', 'diffusers'} & set(sys.modules), sorted({'torch', 'diffusers'} & set(sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_presets_build_on_meta_with_the_released_sizes(registry):
    flux = _create(registry, device="meta")  # default preset: FLUX.1's VAE
    assert (flux.latent_channels, flux.downsample, flux.model_class) == (16, 8, "AutoencoderKL")
    assert flux.vae.quant_conv is None and flux.vae.post_quant_conv is None
    assert sum(p.numel() for p in flux.parameters()) == 83_819_683  # the FLUX.1 VAE's parameter count
    stats = flux.latent_stats
    assert (stats.mean, stats.scaling_factor, stats.shift_factor) == (None, 0.3611, 0.1159)
    sd35 = _create(registry, size="sd3.5", device="meta")
    assert (sd35.latent_stats.scaling_factor, sd35.latent_stats.shift_factor) == (1.5305, 0.0609)
    qwen = _create(registry, size="qwen-image", device="meta")
    assert (qwen.latent_channels, qwen.downsample, qwen.model_class) == (16, 8, "AutoencoderKLQwenImage")
    assert qwen.latent_stats.mean.shape == (16,) and qwen.latent_stats.scaling_factor == 1.0
    # the resamplers' temporal convolutions do not act on one frame: frozen, whatever the trainer toggles
    frozen = {n for n, p in qwen.requires_grad_(True).named_parameters() if not p.requires_grad}
    assert frozen == {f"vae.{n}" for n in qwen.single_frame_inert} and len(frozen) == 8
    assert all(".time_conv." in n for n in frozen) and not flux.single_frame_inert
    assert isinstance(flux, repae.Tokenizer) and isinstance(qwen, repae.Tokenizer)
    for capability in (repae.HasLatentStatistics, repae.RecordsWeights, repae.Exportable, repae.HasBlocks):
        assert repae.supports(flux, capability) and repae.supports(qwen, capability), capability


def test_an_unknown_architecture_key_is_a_config_error(registry):
    with pytest.raises(repae.RecipeError) as info:
        repae.load_recipe(ROOT / "recipes" / "t2i_vae" / "repae_flux_vae_dinov2.yaml",
                          ["tokenizer.architecture.latent_chanels=8"], registry=registry)
    text = str(info.value)
    assert "tokenizer.architecture" in text and "'latent_chanels'" in text and "latent_channels" in text


# -- loading and parity ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,config", [("flux", FLUX_SMALL), ("sd3.5", SD35_SMALL)], ids=["flux", "sd3.5"])
def test_kl_folder_loads_and_matches_diffusers(registry, images, tmp_path, size, config):
    reference = _reference("AutoencoderKL", config)
    _save(reference, tmp_path / "pipeline" / "vae")
    tokenizer = _create(registry, size=size, architecture=KL_BLOCKS, weights=str(tmp_path / "pipeline"),
                        subfolder="vae")
    _assert_parity(tokenizer, reference, images, video=False)
    assert tokenizer.latent_stats.scaling_factor == config["scaling_factor"]
    assert tokenizer.latent_stats.shift_factor == config["shift_factor"]
    info = tokenizer.loaded_weights["weights"]
    assert info.path == str(tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    assert info.sha256 == repae.file_sha256(info.path)
    assert tokenizer.loaded_weights["config"].path.endswith("vae/config.json")
    assert set(tokenizer.state_dict()) == {f"vae.{k}" for k in reference.state_dict()}


def test_qwen_image_folder_loads_and_matches_diffusers(registry, images, tmp_path):
    reference = _reference("AutoencoderKLQwenImage", QWEN_SMALL)
    _save(reference, tmp_path / "vae")
    tokenizer = _create(registry, size="qwen-image", architecture=QWEN_SMALL, weights=str(tmp_path / "vae"))
    assert tokenizer.downsample == 4 and tokenizer.latent_channels == 16
    _assert_parity(tokenizer, reference, images, video=True)
    stats = tokenizer.latent_stats
    assert stats.mean.tolist() == pytest.approx(reference.config.latents_mean)
    assert stats.std.tolist() == pytest.approx(reference.config.latents_std)


def test_the_weights_config_must_match_the_architecture(registry, tmp_path):
    _save(_reference("AutoencoderKL", {**FLUX_SMALL, "norm_num_groups": 8}), tmp_path / "vae")
    with pytest.raises(repae.UserError) as info:
        _create(registry, architecture=KL_BLOCKS, weights=str(tmp_path / "vae"))
    text = str(info.value)
    assert "architecture.norm_num_groups 4 (the weights: 8)" in text and str(tmp_path / "vae") in text
    assert "norm_num_groups changes no parameter shape" in text and "config.json states" in text
    assert "set architecture.norm_num_groups: 8" in text
    assert "size:" not in text  # no preset has the file's architecture (narrowed, 8 groups)
    with pytest.raises(repae.UserError, match=r"model_class AutoencoderKLQwenImage \(the weights: AutoencoderKL\)"):
        _create(registry, size="qwen-image", architecture=QWEN_SMALL, weights=str(tmp_path / "vae"))
    full = tmp_path / "sd35"
    full.mkdir()
    (full / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **SD35_SMALL,
                                                  "block_out_channels": [128, 256, 512, 512]}))
    with pytest.raises(repae.UserError, match="block_out_channels"):
        _create(registry, size="sd3.5", architecture=KL_BLOCKS, weights=str(full))


def test_a_local_folder_is_checked_on_meta_without_reading_its_tensors(registry, tmp_path):
    """`repae recipe validate` / `--dry-run` (meta) read a local folder's config.json: a folder that does not fit the
    recipe is the same error as when loading, and the dry run has the folder's shapes and statistics."""
    sd_style = {**FLUX_SMALL, "latent_channels": 4, "use_quant_conv": True, "use_post_quant_conv": True,
                "scaling_factor": 0.18215, "shift_factor": None}
    _save(_reference("AutoencoderKL", sd_style), tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read on meta")
    with pytest.raises(repae.UserError) as info:
        _create(registry, size="tiny", weights=str(tmp_path / "vae"), device="meta")
    assert "architecture.latent_channels 16 (the weights: 4)" in str(info.value)
    on_meta = _create(registry, size="tiny", architecture={"latent_channels": 4, "use_quant_conv": True,
                                                            "use_post_quant_conv": True},
                      weights=str(tmp_path / "vae"), device="meta")
    assert on_meta.latent_channels == 4 and on_meta.latent_stats.scaling_factor == 0.18215
    assert on_meta.latent_stats.shift_factor is None  # the folder's statistics, not the preset's (FLUX's)


def test_a_folder_with_a_preset_architecture_names_that_preset_and_claims_no_release(registry, tmp_path):
    """The review's finding: "Fix: set tokenizer.size to 'tiny' (the preset of this release)" for a folder with the
    tiny preset's architecture, which is no release."""
    from repae_diffusers_vae import TINY

    _save(_reference("AutoencoderKL", TINY), tmp_path / "vae")
    with pytest.raises(repae.UserError) as info:
        _create(registry, size="flux", weights=str(tmp_path / "vae"), device="meta")
    text = str(info.value)
    assert "use the preset `size: tiny`" in text and "release" not in text
    assert "architecture.block_out_channels [128, 256, 512, 512] (the weights: [8, 16, 16])" in text


def test_a_missing_folder_names_the_file(registry, tmp_path):
    with pytest.raises(repae.UserError, match="weights file not found"):
        _create(registry, weights=str(tmp_path / "nowhere"), subfolder="vae")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo: str, folder: Path, subfolder: str) -> Path:
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(COMMIT)
        target = root / "snapshots" / COMMIT / subfolder
        target.mkdir(parents=True)
        for f in folder.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        return target

    return put


def test_hub_id_loads_offline_from_the_cache(registry, images, tmp_path, hub):
    reference = _reference("AutoencoderKL", FLUX_SMALL)  # narrowed: not the FLUX.1 release, so not under its name
    hub("someone/small-flux-pipeline", _save(reference, tmp_path / "saved"), "vae")
    tokenizer = _create(registry, architecture=KL_BLOCKS, weights="hf://someone/small-flux-pipeline", subfolder="vae")
    _assert_parity(tokenizer, reference, images, video=False)
    info = tokenizer.loaded_weights["weights"]
    assert info.revision == COMMIT and info.source.endswith("/vae/diffusion_pytorch_model.safetensors")
    assert tokenizer.loaded_weights["config"].revision == COMMIT
    with pytest.raises(repae.UserError) as missing:  # not cached, offline: the same message as every component
        _create(registry, weights="hf://stabilityai/stable-diffusion-3.5-large", subfolder="vae", size="sd3.5")
    text = str(missing.value)
    assert "HF_HUB_OFFLINE=1" in text and "vae/config.json" in text and "stabilityai/stable-diffusion-3.5-large" in text


def test_without_diffusers_the_build_names_the_extra(registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(repae.UserError) as info:
        _create(registry, device="meta")
    assert "pip install 'repae[diffusers]'" in str(info.value) and "diffusers-vae" in str(info.value)


# -- the normalisers read the VAE's own statistics -----------------------------------------------------------------
def test_normalisers_use_the_vae_shift_and_scale(registry):
    tokenizer = _create(registry, architecture=KL_BLOCKS)  # FLUX: (z - 0.1159) * 0.3611
    bn = repae.create("normalizer", "batchnorm", registry=registry, built={"tokenizer": tokenizer})
    assert bn.running_mean.tolist() == pytest.approx([0.1159] * 16)
    assert bn.running_var.tolist() == pytest.approx([(1 / 0.3611) ** 2] * 16, rel=1e-6)
    own = repae.create("normalizer", "channel-stats", registry=registry, built={"tokenizer": tokenizer})
    z = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(own.normalize(z), (z - 0.1159) * 0.3611)
    torch.testing.assert_close(own.denormalize(own.normalize(z)), z)


# -- training, export, reload ----------------------------------------------------------------------------------------
_RUN = ["dataset.num_images=8", "trainer.batch_size=4", "trainer.steps=2", "trainer.log_every=1",
        "trainer.checkpoint_every=2", "trainer.sample_every=0", "trainer.num_workers=0"]


def _recipe(tmp_path: Path, tokenizer: dict) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"extends": str(ROOT / "recipes" / "quickstart.yaml"),
                                    "tokenizer": {"name": "diffusers-vae", **tokenizer}}))
    return path


@pytest.mark.parametrize("tokenizer,model_class", [
    ({"size": "flux", "architecture": KL_BLOCKS}, "AutoencoderKL"),
    ({"size": "qwen-image", "model_class": "AutoencoderKLQwenImage", "architecture": QWEN_SMALL},
     "AutoencoderKLQwenImage"),
], ids=["flux", "qwen-image"])
def test_repae_steps_then_export_reloads_in_diffusers(registry, tmp_path, tokenizer, model_class):
    from repae.build import build_recipe
    from repae.cli import app
    from repae.export import export_run
    from repae.recipe import read_recipe
    from repae.runs import open_run

    recipe = _recipe(tmp_path, tokenizer)
    resolved = read_recipe(recipe, _RUN, registry)
    plan = {p.part: p for p in repae.compose_recipe(resolved).plan.phases}
    assert "diffusion" not in {label for label, _, _ in plan["tokenizer"].losses}  # the stop-gradient of REPA-E
    assert {"repa", "reconstruction", "kl", "gan"} <= {label for label, _, _ in plan["tokenizer"].losses}
    initial = {k: v.clone() for k, v in
               {b.label: b.component for b in build_recipe(resolved, device="cpu")}["tokenizer"].state_dict().items()}

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), *_RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["tokenizer/grad_norm"] > 0 and line["denoiser/grad_norm"] > 0 for line in lines)

    run = open_run(out, slots=("tokenizer", "latent_norm"))
    trained = run.tokenizer.eval()
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, initial[k])]
    assert len(moved) > len(initial) // 2, "the tokenizer trains end to end"
    inert = {f"vae.{n}" for n in trained.single_frame_inert}
    assert bool(inert) == (model_class == "AutoencoderKLQwenImage") and not inert & set(moved)

    manifest = export_run(out, tmp_path / "export", "diffusers", registry=registry)
    assert set(manifest["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["_class_name"] == model_class
    ema_mean = run.normalizer.running_mean  # the run's latent statistics: the EMA latent BatchNorm's
    assert config["latents_mean"] == pytest.approx(ema_mean.tolist(), abs=1e-6)
    reloaded = getattr(diffusers, model_class).from_pretrained(str(tmp_path / "export"), low_cpu_mem_usage=False)
    reloaded.eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    _assert_parity(trained, reloaded, images, video=model_class == "AutoencoderKLQwenImage")


# -- the recipes -------------------------------------------------------------------------------------------------------
T2I = {"repae_flux_vae_dinov2": ("flux", "hf://black-forest-labs/FLUX.1-dev"),
       "repae_sd35_vae_dinov2": ("sd3.5", "hf://stabilityai/stable-diffusion-3.5-large"),
       "repae_qwenimage_vae_dinov2": ("qwen-image", "hf://Qwen/Qwen-Image")}


@pytest.mark.parametrize("name", sorted(T2I))
def test_t2i_recipes_tune_the_released_vae_with_sit_xl_and_dinov2_b(registry, name):
    composition = repae.compose_recipe(repae.load_recipe(ROOT / "recipes" / "t2i_vae" / f"{name}.yaml",
                                                         registry=registry))
    tokenizer = composition.recipe.get("tokenizer")[0].config
    assert (tokenizer.size, tokenizer.weights, tokenizer.subfolder) == (*T2I[name], "vae")
    built = {b.label: b.component for b in composition.built}
    assert (built["tokenizer"].latent_channels, built["denoiser"].input_size) == (16, 32)  # 16 x 32 x 32 latents
    assert built["denoiser"].num_tokens == 256 and built["denoiser"].depth == 28  # SiT-XL/2
    assert built["encoders.0"].embed_dim == 768  # DINOv2 ViT-B/14
    assert type(built["latent_norm"]).__name__ == "LatentBatchNorm"  # REPA-E's latent BatchNorm


def test_t2i_recipe_dry_runs_offline_without_the_weights(tmp_path, monkeypatch):
    from repae.cli import app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "t2i_vae" / "repae_flux_vae_dinov2.yaml"),
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run: nothing was written or trained" in result.output
