"""``repae bench``: the report and its JSON, FLOPs counted on meta equal FLOPs of the real step, clear errors."""

from __future__ import annotations

import json

import pytest

from repae.bench import count_step_flops
from repae.build import build_recipe
from repae.compose import compose_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe

from conftest import ROOT, cli

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SMALL = ["trainer.batch_size=8", "trainer.num_workers=0", "dataset.num_images=32"]


def test_bench_json_has_every_measure():
    result = cli("bench", str(QUICKSTART), *SMALL, "--steps", "2", "--warmup", "1", "--device", "cpu", "--json")
    data = json.loads(result.stdout)
    assert {"img_per_s", "step_s", "peak_mem_mb", "phases", "flops"} <= data.keys()
    assert list(data["phases"]) == ["data", "encoders", "tokenizer", "discriminator", "denoiser", "optimizer + EMA"]
    assert all(seconds > 0 for seconds in data["phases"].values())
    assert data["img_per_s"] == pytest.approx(8 / data["step_s"])
    assert data["step_s_min"] <= data["step_s"] <= data["step_s_max"]
    assert sum(data["phases"].values()) <= data["step_s_max"] * 1.01
    assert data["flops"] > 1e9 and data["peak_mem_mb"] > 100 and data["mfu"] is None  # no peak known for a CPU
    assert data["batch_size"] == 8 and data["steps"] == 2 and data["precision"] == "fp32"
    assert (data["weights"], data["data"]) == ("random", "recipe")


def test_bench_report_and_synthetic_data_for_a_missing_image_folder(tmp_path):
    missing = tmp_path / "imagenet" / "train"
    result = cli("bench", str(QUICKSTART), *SMALL, f"dataset={{name: image-folder, root: {missing}, resolution: 32}}",
                 "--synthetic-data", "--steps", "1", "--warmup", "0", "--device", "cpu", "--no-flops")
    assert "img/s" in result.stdout and "tokenizer" in result.stdout and "FLOP" not in result.stdout
    assert "--synthetic-data" in result.stdout and "(random weights, synthetic data)" in result.stdout


def test_flops_counted_on_meta_equal_the_real_steps():
    """The meta-device count (what `repae bench` reports) equals FlopCounterMode around the real CPU step (with the
    math attention kernel, whose matmuls the counter sees; it has no formula for the CPU flash kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    registry = load_plugins().registry
    resolved = read_recipe(QUICKSTART, [*SMALL, "trainer.grad_accum=2"], registry)
    on_meta = count_step_flops(compose_recipe(resolved).trainer, 8, 2)
    resolved = read_recipe(QUICKSTART, [*SMALL, "trainer.grad_accum=2", "trainer.sdpa_backend=math"], registry)
    built = {b.slot: b.component for b in build_recipe(resolved, device="cpu", load_weights=False)}
    trainer = built["trainer"]
    trainer.setup()
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.compute_gradients([trainer.example_inputs(4), trainer.example_inputs(4)], 0)
    assert on_meta == counter.get_total_flops() > 1e9


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--peak-tflops", "-1"], "--peak-tflops must be > 0"),
    (["--device", "gpu"], "Invalid value for '--device': 'gpu'. Did you mean 'cuda'? Choose from"),
])
def test_bench_argument_errors(args, message):
    result = cli("bench", str(QUICKSTART), *args, code=2)
    assert message in result.stderr


def test_bench_synthetic_data_refuses_a_latent_cache(tmp_path):
    recipe = tmp_path / "vanilla.yaml"
    recipe.write_text(
        "dataset: {name: synthetic, num_classes: 4, resolution: 16, num_images: 16}\n"
        "tokenizer: {name: sd-vae, size: tiny}\n"
        "denoiser: {name: sit, size: tiny, num_classes: 4}\n"
        "losses: {diffusion: {name: flow-matching, updates: [denoiser]}}\n"
        "trainer: {name: default, batch_size: 8, num_workers: 0}\n")
    cache = tmp_path / "latents"
    cli("cache-latents", recipe, "--out", cache, "--device", "cpu")
    on_cache = [f"dataset={{name: latent-cache, root: {cache}}}"]
    result = cli("bench", recipe, *on_cache, "--synthetic-data", code=2)
    assert "--synthetic-data replaces an image dataset; this recipe trains from cached latents" in result.stderr
    report = cli("bench", recipe, *on_cache, "--steps", "1", "--warmup", "0", "--device", "cpu", "--json")
    data = json.loads(report.stdout)
    assert list(data["phases"]) == ["data", "denoiser", "optimizer + EMA"] and data["data"] == "recipe"
