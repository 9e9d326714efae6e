"""The third-party path end to end: the example plugin package (examples/repae-plugin-example), installed beside repae
as its own distribution, used from a recipe: its tokenizer, encoder, loss, sampler and tracker with the built-in
SiT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import repae

from conftest import EXAMPLE_PLUGIN, cli


def readme_recipe() -> str:
    """The recipe of the example's README (so that the README stays true)."""
    text = (EXAMPLE_PLUGIN / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the example's README should show one recipe"
    return blocks[0]


@pytest.fixture
def recipe(example_plugin, tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(readme_recipe())
    return path


def test_listed_with_its_distribution(example_plugin):
    entries = {(e["kind"], e["name"]): e for e in json.loads(cli("list", "--json").stdout)}
    for key in [("tokenizer", "pixel-shuffle"), ("encoder", "patch-stats"), ("loss", "variance-floor"),
                ("sampler", "midpoint"), ("tracker", "run-summary")]:
        assert entries[key]["plugin"] == "example" and entries[key]["distribution"] == "repae-plugin-example"
        assert entries[key]["version"] == "0.1.0"
    assert ("tokenizer", "sd-vae") in entries  # built-ins still there


def test_components_build_from_the_registry(example_plugin):
    registry = repae.load_plugins().registry
    tokenizer = repae.create("tokenizer", "pixel-shuffle", downsample=2, latent_channels=4, registry=registry)
    encoder = repae.create("encoder", "patch-stats", patch_size=4, embed_dim=16, registry=registry)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = tokenizer.encode(images)
    assert posterior.sample().shape == (2, 4, 8, 8) and tokenizer.decode(posterior.mode()).shape == images.shape
    tokens = encoder(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert tokens.shape == (2, encoder.num_tokens(16), 16)
    assert not any(p.requires_grad for p in encoder.parameters())
    loss = repae.create("loss", "variance-floor", floor=0.25, registry=registry)
    assert isinstance(loss, repae.Loss) and loss.updates == ("tokenizer",) and loss.transport is None
    sampler = repae.create("sampler", "midpoint", steps=3, registry=registry)
    assert isinstance(sampler, repae.Sampler)
    with pytest.raises(repae.RecipeError, match="floor"):
        repae.create("loss", "variance-floor", floor=0.0, registry=registry)


class LinearInTime(nn.Module):
    """A denoiser-shaped velocity field ``v = 2 t a`` for labels, ``0`` for the null label: the flow from ``x(1)``
    reaches ``x(1) - a`` at ``t = 0`` (``- s a`` with guidance ``s``). Euler steps would miss it; the midpoint rule is
    exact for velocities linear in ``t``."""

    num_classes = 3

    def __init__(self, a: torch.Tensor, class_dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.a = nn.Parameter(a)
        self.class_dropout_prob = class_dropout_prob
        self.calls = 0

    def forward(self, x, t, y, **kwargs):
        self.calls += 1
        assert x.dtype == torch.float32 and t.shape == y.shape == (x.shape[0],) and not self.training
        labelled = (y != self.num_classes).float().view(-1, 1, 1, 1)
        return repae.DenoiserOutput(2 * t.view(-1, 1, 1, 1) * self.a * labelled)


def test_midpoint_sampler_integrates_the_flow_and_guides(example_plugin):
    sampler = repae.create("sampler", "midpoint", steps=3, registry=repae.load_plugins().registry)
    a = torch.randn(1, 2, 4, 4)
    field = LinearInTime(a).train()
    noise = torch.randn(5, 2, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = sampler(field, noise, labels)
    assert out.dtype == noise.dtype and field.training  # its mode restored
    torch.testing.assert_close(out, noise - a.expand_as(noise), rtol=0, atol=1e-6)
    assert field.calls == 2 * 3
    guided = sampler(field, noise, labels, cfg_scale=2.5)
    torch.testing.assert_close(guided, noise - 2.5 * a.expand_as(noise), rtol=0, atol=1e-5)
    with pytest.raises(repae.UserError, match="null label"):
        sampler(LinearInTime(a, class_dropout_prob=0.0), noise, labels, cfg_scale=2.0)


def test_trains_and_samples_with_the_example_components_and_sit(recipe, tmp_path):
    dry = cli("run", recipe, "--dry-run").stdout
    assert "repae-plugin-example 0.1.0" in dry and "sampler midpoint" in dry
    assert re.search(r"objective:.*floor \(variance-floor\)", dry)  # in the tokenizer's phase
    run_dir = tmp_path / "run"
    cli("run", recipe, "trainer.log_every=1", "--out", run_dir, "--device", "cpu")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for key in ("tokenizer/floor", "tokenizer/floor.spatial_std", "tokenizer/repa", "denoiser/diffusion"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert (run_dir / "checkpoints" / "step-0000002" / "model-tokenizer.safetensors").is_file()
    assert (run_dir / "samples" / "step-0000002.png").is_file()  # the in-training grid, through midpoint
    summary = json.loads((run_dir / "summary.json").read_text())  # the plugin's tracker: the last line, the grid
    assert summary["step"] == 2 and summary["finished"] == "ok" and summary["run"] == "run"
    assert summary["values"] == {k: v for k, v in lines[-1].items() if k != "step"}
    assert summary["samples"] == {"2": str(run_dir / "samples" / "step-0000002.png")}

    out = tmp_path / "samples"
    cli("sample", run_dir, "-n", 4, "--steps", 2, "--device", "cpu", "--out", out, "--no-progress")
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    settings = json.loads((out / "sampling.json").read_text())["settings"]
    assert settings["sampler_config"]["name"] == "midpoint" and settings["sampler_config"]["steps"] == 2


def test_a_mismatch_with_the_builtin_denoiser_is_caught_before_training(recipe):
    bad = cli("recipe", "validate", recipe, "encoders.0.patch_size=8", code=2).output
    assert "the encoder gives 4 tokens per 16 px image, but the denoiser has 16 tokens" in bad


def test_console_script_finds_it_through_entry_points(example_plugin, recipe):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(example_plugin.root), str(EXAMPLE_PLUGIN)]),
        "REPAE_PLUGINS": "repae,repae-plugin-example",
    }
    done = subprocess.run(
        [sys.executable, "-m", "repae", "recipe", "validate", str(recipe)], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "tokenizer=pixel-shuffle" in done.stdout and "losses.floor=variance-floor" in done.stdout
    assert "sampler=midpoint" in done.stdout
