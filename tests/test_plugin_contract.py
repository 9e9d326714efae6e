"""The plugin contract end to end, as a third-party author meets it.

The example package of docs/plugins.md (one component of every kind) is assembled from the page's code blocks (those
whose first line names a file), installed beside repae as its own distribution (a dist-info with its entry point on
``sys.path``, found by the real entry-point discovery), and used through the CLI with the page's recipe: validate, dry
run, a few training steps, sample, analyze (run dataset and ``--images``), export (the plugin's own format and
``safetensors``), cache-latents with the exported weights, and eval with the plugin's metric. A missing capability
must come back as a clear message with exit code 2.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import repae

from conftest import ROOT, cli, python_imports

DOC = ROOT / "docs" / "plugins.md"
FILE_BLOCK = re.compile(r"^```[a-z]*\n# (?P<path>[\w./-]+\.(?:py|toml|yaml))\n(?P<body>.*?)^```", re.M | re.S)
DISTRIBUTION = "acme-repae"
PLUGINS = f"repae,{DISTRIBUTION}"


def doc_files() -> dict[str, str]:
    """``{relative path: text}`` of every code block of docs/plugins.md whose first line is ``# <file name>``."""
    files: dict[str, str] = {}
    for match in FILE_BLOCK.finditer(DOC.read_text()):
        path = match["path"]
        assert path not in files, f"docs/plugins.md has two code blocks for {path}"
        files[path] = f"# {path}\n{match['body']}"
    return files


def entry_point(pyproject: str) -> tuple[str, str, str, str]:
    """``(distribution, version, entry-point name, target)`` from the page's pyproject.toml."""
    name = re.search(r'^name = "([^"]+)"', pyproject, re.M)
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    ep = re.search(r'^\[project\.entry-points\.repae\]\n([\w-]+) = "([\w.:]+)"', pyproject, re.M)
    assert name and version and ep, "pyproject.toml of docs/plugins.md lacks name, version or the repae entry point"
    return name[1], version[1], ep[1], ep[2]


@pytest.fixture(scope="module")
def acme(tmp_path_factory):
    """The package of docs/plugins.md written to a temporary folder and installed as the distribution acme-repae."""
    files = doc_files()
    root = tmp_path_factory.mktemp("acme") / "acme-repae"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    dist, version, name, target = entry_point(files["pyproject.toml"])
    assert dist == DISTRIBUTION
    site = root.parent / "site"
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[repae]\n{name} = {target}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.syspath_prepend(str(site))
        mp.setenv("REPAE_PLUGINS", PLUGINS)
        mp.setenv("COLUMNS", "200")
        yield root
    for module in [m for m in sys.modules if m.split(".")[0] == "acme_repae"]:
        del sys.modules[module]


@pytest.fixture(autouse=True)
def _acme_selected(monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", PLUGINS)


@pytest.fixture(scope="module")
def run_dir(acme):
    """`repae run` of the page's recipe: two steps on the CPU."""
    out = acme.parent / "runs" / "acme"
    cli("run", acme / "recipes" / "acme.yaml", "--out", out, "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def image_folder(acme):
    """Image files of other sizes than the dataset's (read through the dataset's load_image)."""
    from PIL import Image

    folder = acme.parent / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def samples(run_dir):
    out = run_dir.parent / "samples"
    cli("sample", run_dir, "-n", 6, "--batch-size", 4, "--steps", 3, "--device", "cpu", "--out", out, "--no-progress")
    return out


def test_the_page_has_one_component_of_every_kind_importing_only_public_repae(acme):
    registered = re.findall(r'register\("(\w+)", "([\w-]+)"', (acme / "acme_repae" / "__init__.py").read_text())
    assert sorted(kind for kind, _ in registered) == sorted(repae.KINDS)
    found = []
    for path in sorted(acme.rglob("*.py")):
        for line, module, names in python_imports(path):
            where = f"{path.relative_to(acme)}:{line}"
            if module.startswith("repae."):
                found.append(f"{where} imports the internal module {module}")
            found.extend(f"{where} imports repae.{n}, which is not public" for n in names
                         if module == "repae" and n not in repae.__all__)
    assert found == []
    # the registration module stays cheap: `repae list` imports it on every call
    code = "import sys, acme_repae; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(acme), str(ROOT)])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_the_page_unit_tests_pass(acme):
    spec = importlib.util.spec_from_file_location("acme_page_tests", acme / "tests" / "test_acme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [f for name, f in inspect.getmembers(module, inspect.isfunction) if name.startswith("test_")]
    assert len(tests) >= 2
    for test in tests:
        test()


def test_listed_with_its_distribution_and_reachable_by_qualified_name(acme):
    entries = json.loads(cli("list", "--json").stdout)
    ours = {e["kind"]: e["name"] for e in entries if e["distribution"] == DISTRIBUTION}
    assert sorted(ours) == sorted(repae.KINDS)
    assert any(e["name"] == "repa" and e["distribution"] == "repae" for e in entries)
    tokenizer = repae.create("tokenizer", f"{DISTRIBUTION}:acme-ae", size="base", device="meta",
                             registry=repae.load_plugins().registry)
    assert tokenizer.encoder[1].out_channels == 128 and tokenizer.latent_channels == 4


def test_validate_and_dry_run_check_the_composition(acme):
    recipe = acme / "recipes" / "acme.yaml"
    ok = cli("recipe", "validate", recipe)
    assert ok.stdout.startswith("ok") and "denoiser.input_size = 4" in ok.stdout
    dry = cli("run", recipe, "--dry-run").stdout
    assert "acme-repae 1.0" in dry and "repae 0.1" in dry  # the plugin's components beside a built-in loss
    assert "shifted linear flow (shift 2" in dry  # the transport the plugin's loss defines, in the step plan
    assert "denoiser.encoder_dims = [16]" in dry and "phase 1: tokenizer trains" in dry
    # 32 px is one override: input size, token grid and projector follow from the other components
    shown = cli("recipe", "show", recipe, "dataset.resolution=32").stdout
    assert re.search(r"denoiser:\n  name: acme-mixer\n(?:  .*\n)*?  input_size: 8\n", shown), shown
    cli("recipe", "validate", recipe, "dataset.resolution=32", f"tokenizer.name={DISTRIBUTION}:acme-ae")
    bad = cli("recipe", "validate", recipe, "encoders.0.patch_size=8", "losses.repa.depth=3", code=2).output
    assert "2 problem(s)" in bad
    assert "the encoder gives 4 tokens per 16 px image, but the denoiser has 16 tokens" in bad
    assert "losses.repa.depth" in bad and "denoiser has 2 blocks" in bad


def test_run_trains_with_the_plugin_trainer_loss_and_sampler(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for key in ("denoiser/param_norm", "denoiser/flow", "denoiser/flow.noisy_half", "denoiser/repa",
                "tokenizer/repa", "tokenizer/recon"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert lines[0]["denoiser/param_norm"] != lines[1]["denoiser/param_norm"]  # the denoiser trained
    checkpoint = run_dir / "checkpoints" / "step-0000002"
    assert (checkpoint / "model-tokenizer.safetensors").is_file()  # trained end to end by repa and recon
    assert (run_dir / "samples" / "step-0000002.png").is_file()  # the in-training grid, through acme-euler
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "input_size: 4" in recipe and "name: acme-trainer" in recipe
    assert json.loads((run_dir / "versions.json").read_text())["plugins"]["acme"]["distribution"] == DISTRIBUTION
    # the plugin's tracker got what metrics.jsonl holds (its two keys, each step) and the grid
    rows = (run_dir / "acme-metrics.csv").read_text().splitlines()
    assert rows[0] == "step,key,value" and len(rows) == 1 + 2 * 2 + 1
    for line in lines:
        for key in ("denoiser/total", "denoiser/param_norm"):
            assert f"{line['step']},{key},{line[key]!r}" in rows
    assert rows[-1] == f"2,samples,{run_dir / 'samples' / 'step-0000002.png'}"


def test_sample_with_the_plugin_sampler(samples):
    arr = np.load(samples / "samples.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    settings = json.loads((samples / "sampling.json").read_text())["settings"]
    assert settings["sampler_config"]["name"] == "acme-euler" and settings["sampler_config"]["steps"] == 3
    assert settings["latent_shape"] == [4, 4, 4]


def test_analyze_reads_depth_and_transport_from_the_components(run_dir, image_folder):
    out = run_dir.parent / "analysis"
    cli("analyze", run_dir, "--device", "cpu", "--num-images", 8, "--out", out / "dataset")
    result = json.loads((out / "dataset" / "analysis.json").read_text())
    assert result["num_images"] == 8 and result["latent_shape"] == [4, 4, 4]
    assert result["settings"]["depth_used"] == 1  # the repa loss's feature_depths
    assert result["settings"]["transport"].startswith("shifted linear flow")  # acme-flow's transport
    assert result["cknna"] is not None and np.isfinite(result["spatial_variance"])
    cli("analyze", run_dir, "--device", "cpu", "--images", image_folder, "--out", out / "images")
    result = json.loads((out / "images" / "analysis.json").read_text())
    assert result["num_images"] == 5 and result["settings"]["images_source"] == str(image_folder)
    assert (out / "images" / "reconstructions.png").is_file()


def test_export_in_the_plugin_format_and_safetensors_then_load_the_weights_back(acme, run_dir):
    from safetensors.torch import load_file

    out = run_dir.parent / "exported"
    cli("export", run_dir, "--format", "acme-npz", "--out", out / "npz")
    manifest = json.loads((out / "npz" / "export.json").read_text())
    assert sorted(manifest["files"]) == ["tokenizer.json", "tokenizer.npz"]
    assert manifest["components"]["tokenizer"]["plugin"] == f"{DISTRIBUTION} 1.0"
    assert manifest["latents"]["source"] == "acme-scaled-bn running statistics"  # AffineNormalizer
    assert manifest["latents"]["scaling_factor"] == 0.5
    assert json.loads((out / "npz" / "tokenizer.json").read_text())["config"]["downsample"] == 4

    cli("export", run_dir, "--format", "safetensors", "--out", out / "st")
    trained = load_file(str(out / "st" / "tokenizer.safetensors"))
    arrays = np.load(out / "npz" / "tokenizer.npz")
    assert sorted(arrays.files) == sorted(trained)
    for key, value in trained.items():
        np.testing.assert_array_equal(arrays[key], value.numpy())
    assert {"denoiser.safetensors", "ema-denoiser.safetensors", "ema-latent_norm.safetensors"} <= set(
        json.loads((out / "st" / "export.json").read_text())["files"])

    # the exported weights load back into the plugin's tokenizer, which records them (RecordsWeights)
    weights = out / "st" / "tokenizer.safetensors"
    cli("cache-latents", acme / "recipes" / "acme.yaml", f"tokenizer.weights={weights}", "--out", out / "cache",
        "--device", "cpu")
    recorded = json.loads((out / "cache" / "index.json").read_text())["tokenizer"]["weights"]["weights"]
    assert recorded["sha256"] == repae.file_sha256(weights)


def test_a_missing_capability_is_a_clear_error(run_dir):
    from repae.export import export_run

    message = cli("export", run_dir, "--format", "diffusers", "--out", run_dir.parent / "nothing", code=2).output
    assert "no component of" in message and "'diffusers'" in message
    assert "tokenizer 'acme-ae' (plugin acme-repae 1.0) declares acme-npz" in message
    assert "denoiser 'acme-mixer' (plugin acme-repae 1.0) declares none" in message
    assert not (run_dir.parent / "nothing").exists()
    with pytest.raises(repae.CapabilityError):
        export_run(run_dir, run_dir.parent / "nothing", "diffusers", registry=repae.load_plugins().registry)


def test_eval_with_the_plugin_metric(samples, tmp_path):
    from repae.evaluate.features import random_inception_state_dict

    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), weights)
    # the sample PNGs as the reference: the same images, so the mean features coincide
    result = cli("eval", samples, "--ref", samples / "images", "--metrics", "acme-mean-distance",
                 "--inception-weights", weights, "--device", "cpu", "--json")
    report = json.loads(result.stdout)
    assert report["num_samples"] == 6 and report["num_reference_images"] == 6
    assert list(report["metrics"]) == ["mean_distance"] and abs(report["metrics"]["mean_distance"]) < 1e-4
