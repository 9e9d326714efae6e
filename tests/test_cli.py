"""The CLI as a user meets it: Typer's CliRunner in-process, and the console script in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from repae.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def toy_recipe(toys, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(textwrap.dedent("""\
        description: toy
        dataset: {name: toy-data, root: /data}
        tokenizer: {name: toy-vae}
        encoders: [{name: toy-enc}]
        denoiser: {name: toy-dit, size: big}
        losses: {diffusion: {name: toy-loss}}
        """))
    return path


def test_version_and_help(runner):
    from repae import __version__

    assert invoke(runner, "--version").stdout.strip() == f"repae {__version__}"
    for args in ([], ["--help"], ["list", "--help"], ["recipe", "--help"], ["recipe", "show", "-h"], ["run", "-h"]):
        result = invoke(runner, *args)
        assert result.exit_code in (0, 2) and "Usage" in result.output, args


def test_list_shows_kind_name_summary_plugin(runner, toys):
    result = invoke(runner, "list")
    assert result.exit_code == 0, result.output
    assert "toy-dit" in result.stdout and "toy denoiser" in result.stdout and "repae-toys 1.0" in result.stdout
    only = invoke(runner, "list", "encoder")
    assert "toy-enc" in only.stdout and "toy-dit" not in only.stdout


def test_list_json(runner, toys):
    data = json.loads(invoke(runner, "list", "--json").stdout)
    assert {"kind", "name", "summary", "plugin"} <= set(data[0])
    assert {(d["kind"], d["name"]) for d in data} >= {("denoiser", "toy-dit"), ("encoder", "toy-enc")}


def test_list_unknown_kind_is_a_clean_error(runner, toys):
    result = invoke(runner, "list", "denoisers")
    assert result.exit_code == 2 and "Did you mean 'denoiser'" in result.stderr
    assert "Traceback" not in result.output


def test_show_lists_fields_and_presets(runner, toys):
    result = invoke(runner, "show", "toy-dit")
    assert result.exit_code == 0, result.output
    for text in ("depth", "int", "hidden width [/not-markup]", "presets", "small (default)", "big", "width=768"):
        assert text in result.stdout
    data = json.loads(invoke(runner, "show", "toy-dit", "--json").stdout)
    assert data[0]["presets"]["big"] == {"depth": 12, "width": 768}
    missing = invoke(runner, "show", "toy-dt")
    assert missing.exit_code == 2 and "Did you mean 'toy-dit'" in missing.stderr


def test_plugins_reports_loaded_and_failed(runner, toys, fake_dists, monkeypatch):
    fake_dists.add("broken-dist", {"broken": "broken_plugin"}, modules={"broken_plugin": "raise ImportError('no gpu')"})
    monkeypatch.setenv("REPAE_PLUGINS", "repae-toys,broken")
    result = invoke(runner, "plugins", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["plugins"][0]["name"] == "toys" and "denoiser:toy-dit" in data["plugins"][0]["components"]
    assert data["failures"] == [
        {"name": "broken", "distribution": "broken-dist", "version": "1.0", "stage": "import",
         "error": "ImportError: no gpu"}
    ]
    table = invoke(runner, "plugins")
    assert "failed to load" in table.stdout and "no gpu" in table.stdout
    # other commands keep working and warn on stderr
    listed = invoke(runner, "list")
    assert listed.exit_code == 0 and "toy-dit" in listed.stdout and "broken" in listed.stderr
    monkeypatch.setenv("REPAE_STRICT_PLUGINS", "1")
    strict = invoke(runner, "list")
    assert strict.exit_code == 2 and "no gpu" in strict.stderr and "Traceback" not in strict.output


def test_recipe_show_and_validate(runner, toy_recipe):
    shown = invoke(runner, "recipe", "show", toy_recipe, "denoiser.depth=3")
    assert shown.exit_code == 0, shown.output
    assert "depth: 3" in shown.stdout and "width: 768" in shown.stdout
    assert invoke(runner, "recipe", "show", toy_recipe, "denoiser.depth=3").stdout == shown.stdout
    raw = invoke(runner, "recipe", "show", toy_recipe, "--raw")
    assert "width" not in raw.stdout
    ok = invoke(runner, "recipe", "validate", toy_recipe)
    assert ok.exit_code == 0 and "ok" in ok.stdout


def test_user_mistakes_exit_2_with_every_problem_and_no_traceback(runner, toy_recipe):
    result = invoke(runner, "recipe", "validate", toy_recipe, "denoiser.dpeth=3", "tokenizer.name=toy-vea", "bad")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "3 problem(s)" in result.stderr
    assert "bad override" in result.stderr
    result = invoke(runner, "recipe", "validate", toy_recipe, "denoiser.dpeth=3", "tokenizer.name=toy-vea")
    assert "denoiser.dpeth: unknown key (Did you mean 'depth'?)" in result.stderr
    assert "Did you mean 'toy-vae'" in result.stderr
    assert invoke(runner, "run", toy_recipe.with_name("nope.yaml")).exit_code == 2


def test_run_dry_run_builds_on_meta_and_counts_parameters(runner, toy_recipe, tmp_path):
    result = invoke(runner, "run", toy_recipe, "--dry-run", "--out", tmp_path / "never")
    assert result.exit_code == 0, result.output
    assert "built on meta" in result.stdout and "denoiser" in result.stdout
    expected = sum(a * b + b for a, b in zip([4] + [768] * 12, [768] * 12))
    assert f"{expected / 1e6:.2f}M" in result.stdout
    assert not (tmp_path / "never").exists()


def test_run_without_a_trainer_says_what_to_add_and_writes_nothing(runner, toy_recipe, tmp_path):
    out = tmp_path / "run"
    result = invoke(runner, "run", toy_recipe, "--out", out, "--device", "cpu")
    assert result.exit_code == 2 and "names no trainer" in result.stderr and "trainer: {name: default}" in result.stderr
    assert not out.exists()


def test_a_component_that_breaks_its_contract_is_named_by_validate(runner, toy_recipe, monkeypatch):
    import repae_toys.models as toy

    monkeypatch.delattr(toy.ToyEncoder, "num_tokens")
    result = invoke(runner, "recipe", "validate", toy_recipe)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "encoders.0: encoder 'toy-enc' (plugin repae-toys 1.0) does not implement the encoder contract" in \
        result.stderr and "num_tokens" in result.stderr


def test_console_script_and_module_entry_point():
    env = {**os.environ, "REPAE_PLUGINS": "repae"}
    for cmd in (["repae", "--version"], [sys.executable, "-m", "repae", "--version"]):
        exe = Path(sys.executable).with_name("repae") if cmd[0] == "repae" else None
        if exe is not None:
            cmd = [str(exe), *cmd[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("repae "), done.stderr


def test_listing_does_not_import_heavy_modules():
    code = (
        "import sys; from typer.testing import CliRunner; from repae.cli import app;"
        "r = CliRunner().invoke(app, ['list']); assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'timm', 'open_clip', 'torch_fidelity') if m in sys.modules];"
        "print(heavy)"
    )
    env = {**os.environ, "REPAE_PLUGINS": "repae"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
