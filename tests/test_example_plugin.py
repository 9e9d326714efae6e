"""The third-party path end to end: the example plugin package, installed beside repae, used from a recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from typer.testing import CliRunner

from repae.build import build_recipe
from repae.cli import app
from repae.plugins import load_plugins
from repae.recipe import read_recipe

from conftest import EXAMPLE_PLUGIN

RECIPE = """\
    tokenizer: {name: pixel-shuffle, downsample: 2, latent_channels: 4}
    encoders: [{name: patch-stats, patch_size: 4, embed_dim: 16}]
    """


def test_listed_with_its_distribution(example_plugin):
    result = CliRunner().invoke(app, ["list", "--json"])
    entries = {(e["kind"], e["name"]): e for e in json.loads(result.stdout)}
    assert entries[("tokenizer", "pixel-shuffle")]["plugin"] == "example"
    assert entries[("tokenizer", "pixel-shuffle")]["distribution"] == "repae-plugin-example"
    assert entries[("encoder", "patch-stats")]["version"] == "0.1.0"
    assert ("tokenizer", "sd-vae") in entries  # built-ins still there


def test_usable_from_a_recipe(example_plugin, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    resolved = read_recipe(path, [], load_plugins().registry)
    tokenizer, encoder = (b.component for b in build_recipe(resolved, device="cpu"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = tokenizer.encode(images)
    assert posterior.sample().shape == (2, 4, 8, 8) and tokenizer.decode(posterior.mode()).shape == images.shape
    tokens = encoder(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert tokens.shape == (2, encoder.num_tokens(16), 16)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert resolved.plugins["example"].distribution == "repae-plugin-example"


def test_console_script_finds_it_through_entry_points(example_plugin, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(example_plugin.root), str(EXAMPLE_PLUGIN)]),
        "REPAE_PLUGINS": "repae-plugin-example",
    }
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    done = subprocess.run(
        [sys.executable, "-m", "repae", "run", str(path), "--dry-run"], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pixel-shuffle" in done.stdout and "repae-plugin-example 0.1.0" in done.stdout
