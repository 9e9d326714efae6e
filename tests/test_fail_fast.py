"""Mistakes in what the user typed are reported before torch, timm or torchvision are imported, and a finished run is
recognised without building anything (issue 12, item 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from repae.cli import app

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "open_clip")

# Runs each argument list through the CLI in one fresh process and reports exit code, output and the heavy modules
# loaded after it: a command that imported torch before refusing its argument shows it here.
_PROBE = r"""
import json, sys
from typer.testing import CliRunner
from repae.cli import app
try:
    runner = CliRunner(mix_stderr=False)  # click < 8.2
except TypeError:
    runner = CliRunner()
out = []
for args in json.loads(sys.argv[1]):
    r = runner.invoke(app, args, terminal_width=400)
    out.append([r.exit_code, r.stdout, r.stderr, [m for m in HEAVY if m in sys.modules]])
print(json.dumps(out))
""".replace("HEAVY", repr(HEAVY))


def probe(cases: list[list[str]], **env: str) -> list[tuple[int, str, list[str]]]:
    """``[(exit code, stdout + stderr with whitespace collapsed, heavy modules loaded so far), ...]``, one per case, in
    one fresh process: the first case that imports a heavy module shows it (and so do the ones after it)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([[str(a) for a in args] for args in cases])],
                          text=True, capture_output=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "REPAE_PLUGINS": "repae", "COLUMNS": "400", **env})
    assert done.returncode == 0, done.stderr
    return [(code, " ".join((out + " " + err).split()), heavy) for code, out, err, heavy in json.loads(done.stdout)]


def check(cases: list[tuple[list, str]], **env: str) -> None:
    for (args, message), (code, text, heavy) in zip(cases, probe([a for a, _ in cases], **env)):
        assert code == 2 and message in text and "Traceback" not in text, (args, code, text)
        assert heavy == [], (args, heavy)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail_fast")
    (root / "a_file").write_text("x")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine")
    (root / "no_checkpoint").mkdir()
    (root / "no_recipe" / "checkpoints" / "step-0000002").mkdir(parents=True)
    (root / "no_recipe" / "checkpoints" / "step-0000002" / "state.json").write_text('{"step": 2}')
    return root


def test_run_bench_and_cache_latents_refuse_paths_before_torch(places):
    quick = ROOT / "recipes" / "quickstart.yaml"
    check([
        (["run", quick, "--out", places / "a_file"], "is a file, not a folder"),
        (["run", quick, "--out", places / "foreign"], "holds files that are not a repae run's (notes.txt)"),
        (["run", quick, "trainer.stepz=3", "--out", places / "x"], "trainer.stepz: unknown key"),
        (["bench", places / "nope.yaml"], "recipe file not found"),
        (["bench", quick, "trainer.steps=abc"], "trainer.steps: expected int"),
        (["cache-latents", quick, "--out", places / "a_file"], "--out " + str(places / "a_file") + " is a file"),
        (["cache-latents", quick, "--out", places / "c", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["cache-latents", places / "nope.yaml", "--out", places / "c"], "recipe file not found"),
    ])


def test_commands_that_read_a_run_refuse_it_before_torch(places, quick_run):
    cases = []
    for command in (["sample"], ["analyze"], ["export", "--format", "safetensors", "--out", places / "e"]):
        cases += [
            ([command[0], places / "nowhere", *command[1:]], "does not exist; pass a run directory"),
            ([command[0], places / "a_file", *command[1:]], "is a file, not a run"),
            ([command[0], places / "no_checkpoint", *command[1:]], "holds no checkpoint"),
            ([command[0], places / "no_recipe", *command[1:]], "has no recipe.yaml"),
        ]
    cases += [
        (["sample", quick_run, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["analyze", quick_run, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["analyze", quick_run, "--images", places / "no_images"], "not a folder; pass a folder holding image"),
        (["export", quick_run, "--format", "diffusers", "--out", places / "foreign"], "is not empty; pass an empty"),
        (["export", quick_run, "--format", "diffusers", "--out", places / "a_file"], "is a file; pass a folder"),
    ]
    check(cases)


def test_export_format_is_checked_from_the_recipe_before_building(places, quick_run):
    """`repae export RUN --format onnx` used to build every model of the run (44 s under load) to say this."""
    check([
        (["export", quick_run, "--format", "onnx", "--out", places / "e"],
         "no component of " + str(quick_run) + " exports the format 'onnx' (tokenizer 'sd-vae' (plugin repae"),
        (["export", quick_run, "--format", "difusers", "--out", places / "e"], "Did you mean 'diffusers'? Formats of "
         "this run: safetensors, diffusers, ldm, official"),
    ])
    assert not (places / "e").exists()


def test_declared_export_formats_are_the_built_components_formats(registry):
    """A config's ``EXPORT_FORMATS`` (checked before building) names exactly what its component exports."""
    from repae import create
    from repae.export import declared_formats
    from repae.interfaces import Exportable, supports

    sizes = {"tokenizer": "tiny", "denoiser": "tiny"}
    seen = 0
    for kind in ("tokenizer", "denoiser"):
        for entry in registry.entries(kind):
            if entry.plugin.distribution != "repae":
                continue
            preset = sizes[kind] if sizes[kind] in entry.presets else None
            try:
                component = create(kind, entry.name, device="meta", registry=registry,
                                   **({"size": preset} if preset else {}))
            except Exception:  # noqa: BLE001 - a component that needs more than its kind to build (e.g. a dataset)
                continue
            declared = declared_formats(entry)
            exported = tuple(component.export_formats) if supports(component, Exportable) else None
            assert declared == exported, (kind, entry.name, declared, exported)
            seen += exported is not None
    assert seen >= 3  # the KL-VAEs, diffusers-vae, SiT, DiT


def test_eval_refuses_paths_and_numbers_before_torch(places, tmp_path):
    samples = tmp_path / "samples.npz"
    samples.write_bytes(b"PK")  # only the name and existence matter before reading
    check([
        (["eval", places / "nowhere.npz", "--ref", samples], "samples not found"),
        (["eval", places / "a_file", "--ref", samples], "samples must be an .npz"),
        (["eval", samples, "--ref", places / "nowhere.npz"], "reference not found"),
        (["eval", samples, "--ref", samples, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["eval", samples, "--ref", samples, "--inception-weights", places / "none.pth"],
         "--inception-weights names " + str(places / "none.pth") + ", which does not exist"),
        (["eval", samples, "--ref", samples, "--metrics", "fdi"], "unknown metric 'fdi'"),
    ])


def test_prepare_sweep_compare_recipe_refuse_before_torch(places):
    quick = ROOT / "recipes" / "quickstart.yaml"
    check([
        (["prepare-data", places / "nowhere", "--out", places / "p"], "does not exist"),
        (["sweep", quick, "trainer.stepz=1,2", "--dry-run"], "trainer.stepz: unknown key"),
        (["sweep", places / "nope.yaml", "trainer.steps=1,2"], "recipe file not found"),
        (["compare", places / "nowhere"], "does not exist"),
        (["recipe", "validate", quick, "trainer.steps=abc"], "trainer.steps: expected int"),
        (["recipe", "show", places / "nope.yaml"], "recipe file not found"),
    ])


# -- a finished run ---------------------------------------------------------------------------------------------------
TINY = ["dataset.num_images=32", "trainer.batch_size=8", "trainer.steps=2", "trainer.log_every=1",
        "trainer.checkpoint_every=2", "trainer.sample_every=0"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step quickstart run trained by `repae run` (which records the recipe it resolved)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "quickstart.yaml"), *TINY, "--out", str(out),
                                      "--device", "cpu"], env={"REPAE_PLUGINS": "repae"})
    assert result.exit_code == 0, result.output
    return out


def test_a_finished_run_says_so_without_building(finished, tmp_path):
    """Running a finished run again used to rebuild every component to do nothing (10 s idle, 214 s under load)."""
    quick = ROOT / "recipes" / "quickstart.yaml"
    [(code, text, heavy)] = probe([["run", quick, *TINY, "--out", finished, "--device", "cpu"]])
    assert code == 0 and heavy == [], (code, text, heavy)
    assert f"{finished} is finished (step 2/2); nothing to do. Raise trainer.steps to train longer, or pass another " \
           "--out." in text, text


def test_a_finished_run_still_refuses_another_recipe(finished, tmp_path):
    quick = str(ROOT / "recipes" / "quickstart.yaml")
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    runner = CliRunner()
    env = {"REPAE_PLUGINS": "repae"}
    changed = runner.invoke(app, ["run", quick, *TINY, "trainer.optimizers.default.lr=0.5", "--out", str(run_dir),
                                  "--device", "cpu"], env=env)
    assert changed.exit_code == 2 and "already holds a run of a different recipe" in changed.output, changed.output
    # recipe.yaml edited after training: the record no longer vouches for it, so the run is built and checked
    recipe = run_dir / "recipe.yaml"
    text = recipe.read_text()
    assert "lr: 0.002" in text  # the quickstart's learning rate
    recipe.write_text(text.replace("lr: 0.002", "lr: 0.003"))
    edited = runner.invoke(app, ["run", quick, *TINY, "--out", str(run_dir), "--device", "cpu"], env=env)
    assert edited.exit_code == 2 and "different recipe" in edited.output, edited.output


def test_a_run_without_the_record_or_with_more_steps_is_built(finished, tmp_path):
    quick = str(ROOT / "recipes" / "quickstart.yaml")
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / ".recipe-input.json").unlink()
    runner = CliRunner()
    env = {"REPAE_PLUGINS": "repae"}
    again = runner.invoke(app, ["run", quick, *TINY, "--out", str(run_dir), "--device", "cpu"], env=env)
    assert again.exit_code == 0 and "is finished" not in again.output and f"done: {run_dir}" in again.output
    longer = runner.invoke(app, ["run", quick, *TINY, "trainer.steps=3", "trainer.checkpoint_every=1", "--out",
                                 str(run_dir), "--device", "cpu"], env=env)
    assert longer.exit_code == 0 and "is finished" not in longer.output, longer.output
    assert (run_dir / "checkpoints" / "step-0000003" / "state.json").is_file()


def test_the_finished_shortcut_needs_proof(registry, tmp_path):
    """finished_run speaks only when the record vouches for this very recipe, the recipe.yaml, the plugin versions
    and the dataset's folder (fields are derived from what it holds): any change means building as before."""
    from repae.cli._preflight import INPUT_RECORD, finished_run, record_run_input
    from repae.recipe import read_recipe

    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    resolved = read_recipe(ROOT / "recipes" / "quickstart.yaml",
                           [*TINY, f"dataset={{name: image-folder, root: {images}, resolution: 32}}"], registry)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-0000002" / "state.json").write_text('{"step": 2}')
    (run_dir / "recipe.yaml").write_text(resolved.to_yaml())
    assert finished_run(resolved, run_dir) is None  # no record: build
    record_run_input(resolved, resolved, run_dir)
    assert finished_run(resolved, run_dir) == (f"{run_dir} is finished (step 2/2); nothing to do. Raise trainer.steps "
                                               "to train longer, or pass another --out.")
    record = json.loads((run_dir / INPUT_RECORD).read_text())
    (images / "dog").mkdir()  # another class: the denoiser's derived num_classes could change
    assert finished_run(resolved, run_dir) is None
    record_run_input(resolved, resolved, run_dir)
    assert finished_run(resolved, run_dir) is not None
    record["plugins"] = {name: [dist, "0.0.0"] for name, (dist, _) in record["plugins"].items()}
    saved = (run_dir / INPUT_RECORD).read_text()
    (run_dir / INPUT_RECORD).write_text(json.dumps(record))  # other plugin versions may derive other values
    assert finished_run(resolved, run_dir) is None
    (run_dir / INPUT_RECORD).write_text(saved)
    (run_dir / "checkpoints" / "step-0000002" / "state.json").write_text('{"step": 1}')
    assert finished_run(resolved, run_dir) is None  # not at its last step
    (run_dir / "checkpoints" / "step-0000002" / "state.json").write_text('{"step": 2}')
    longer = read_recipe(ROOT / "recipes" / "quickstart.yaml",
                         [*TINY, f"dataset={{name: image-folder, root: {images}, resolution: 32}}", "trainer.steps=3"],
                         registry)
    assert finished_run(longer, run_dir) is None
    (run_dir / "recipe.yaml").write_text(resolved.to_yaml() + "# edited\n")
    assert finished_run(resolved, run_dir) is None
