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


# -- shell completion and choices ------------------------------------------------------------------------------------


def complete(runner, line: str) -> list[str]:
    """What `repae` offers bash for the last word of ``line`` (click's protocol: the completion script sets
    _REPAE_COMPLETE=complete_bash, COMP_WORDS and COMP_CWORD and reads one candidate per line)."""
    words = line.split(" ")
    env = {"_REPAE_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    result = runner.invoke(app, [], env=env, prog_name="repae")
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def test_shell_completion_is_on(runner, monkeypatch):
    assert "--install-completion" in invoke(runner, "--help").stdout
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")  # name the shell instead of detecting it
    for shell in ("bash", "zsh", "fish"):
        script = invoke(runner, "--show-completion", shell)
        assert script.exit_code == 0 and "_REPAE_COMPLETE" in script.stdout, (shell, script.output)


def test_completion_of_commands_choices_and_component_names(runner, toys):
    from repae.registry import KINDS

    assert complete(runner, "repae sa") == ["sample"]
    assert complete(runner, "repae sample run --device c") == ["cpu", "cuda", "cuda:0"]
    assert complete(runner, "repae sample run --labels ") == ["balanced", "random"]
    assert complete(runner, "repae sweep r.yaml --launcher t") == ["torchrun"]
    assert complete(runner, "repae list t") == [k for k in KINDS if k.startswith("t")]
    assert complete(runner, "repae show toy-") == ["toy-data", "toy-dit", "toy-enc", "toy-loss", "toy-vae"]
    assert complete(runner, "repae run r.yaml --out x --dev") == ["--device"]


def test_completion_of_registered_samplers_and_metrics(runner, monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    assert complete(runner, "repae sample run --sampler euler") == ["euler", "euler-maruyama"]
    assert complete(runner, "repae eval s.npz --metrics fid,s") == ["fid,sfid"]
    assert complete(runner, "repae eval s.npz --metrics p") == ["precision-recall", "pr"]
    assert complete(runner, "repae prepare-data root --dataset image-") == ["image-folder", "image-shards"]


def test_choices_are_listed_by_help(runner):
    expected = {
        "sample": ["--labels", "[balanced|random]", "--cfg-channels", "[all|N]"],
        "sweep": ["--launcher", "[in-process|torchrun]"],
        "prepare-data": ["--on-unreadable", "[error|skip]"],
        "show": ["--kind", "[tokenizer|denoiser|"],
    }
    device = ["run", "bench", "cache-latents", "sample", "eval", "analyze", "sweep"]
    for command in {*expected, *device}:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}, terminal_width=250)
        assert result.exit_code == 0, result.output
        for text in expected.get(command, []) + (["--device", "[auto|cpu|cuda|cuda:N]"] if command in device else []):
            assert text in result.stdout, (command, text, result.stdout)


def test_bad_choices_are_usage_errors_before_torch_is_imported(tmp_path):
    """Each mistake exits with code 2 and a message naming the valid values (and the closest), without a traceback
    and before torch is imported (the check of a registered name loads only the plugins' metadata)."""
    (tmp_path / "images").mkdir()
    cases = [
        (["sample", "run", "--device", "cdua"], ["'cdua'", "Did you mean 'cuda'?", "auto, cpu, cuda or cuda:N"]),
        (["sample", "run", "--labels", "balance"], ["Did you mean 'balanced'?", "balanced or random"]),
        (["sample", "run", "--cfg-channels", "0"], ["all or N", "a number of channels"]),
        (["sample", "run", "--sampler", "eulr"], ["--sampler eulr: unknown sampler", "Did you mean 'euler'?",
                                                  "ddpm, euler, euler-maruyama, heun"]),
        (["eval", "s.npz", "--ref", "r.npz", "--metrics", "fdi"], ["unknown metric 'fdi'. Did you mean 'fid'"]),
        (["sweep", "r.yaml", "--launcher", "slurm"], ["in-process or torchrun"]),
        (["prepare-data", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--on-unreadable", "ignore"],
         ["error or skip"]),
        (["prepare-data", str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--dataset", "image-foldr"],
         ["Did you mean 'image-folder'?"]),
        (["run", "r.yaml", "--device", "gpu"], ["Did you mean 'cuda'?", "auto, cpu, cuda or cuda:N"]),
        (["show", "sit", "--kind", "denoisers"], ["Did you mean 'denoiser'?"]),
    ]
    code = (
        "import json, sys\nfrom typer.testing import CliRunner\nfrom repae.cli import app\n"
        f"cases = json.loads({json.dumps(json.dumps([args for args, _ in cases]))})\n"
        "try:\n    runner = CliRunner(mix_stderr=False)  # click < 8.2\n"
        "except TypeError:\n    runner = CliRunner()\n"
        "out = []\n"
        "for args in cases:\n"
        "    r = runner.invoke(app, args, terminal_width=400)\n"
        "    out.append([r.exit_code, r.stdout, r.stderr])\n"
        "print(json.dumps({'results': out, 'heavy': [m for m in ('torch', 'timm') if m in sys.modules]}))\n"
    )
    env = {**os.environ, "REPAE_PLUGINS": "repae", "COLUMNS": "400"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["heavy"] == []
    for (args, texts), (exit_code, out, err) in zip(cases, data["results"]):
        assert exit_code == 2 and "Traceback" not in out + err, (args, out, err)
        for text in texts:
            assert text in " ".join(err.split()), (args, text, err)


def test_completion_imports_no_torch():
    code = (
        "import os, sys; from typer.testing import CliRunner; from repae.cli import app\n"
        "env = {'_REPAE_COMPLETE': 'complete_bash', 'COMP_WORDS': 'repae sample run --sampler e', 'COMP_CWORD': '4'}\n"
        "r = CliRunner().invoke(app, [], env=env, prog_name='repae')\n"
        "print(r.stdout.split(), [m for m in ('torch', 'timm', 'open_clip') if m in sys.modules])"
    )
    env = {**os.environ, "REPAE_PLUGINS": "repae"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['euler', 'euler-maruyama'] []"


def test_analyze_json_is_alone_on_stdout(runner, quick_run, tmp_path, monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    out = tmp_path / "analysis"
    result = invoke(runner, "analyze", quick_run, "-n", 4, "--out", out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads((out / "analysis.json").read_text()) and data["num_images"] == 4


def test_export_format_misspelled_names_the_closest_of_the_runs_formats(runner, quick_run, tmp_path, monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    result = invoke(runner, "export", quick_run, "--format", "difusers", "--out", tmp_path / "x")
    text = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Did you mean 'diffusers'?" in text and "Formats of this run:" in text, text
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Readable at 80 columns (issue 12, item 5)
# ---------------------------------------------------------------------------------------------------------------------


def _at(runner, columns, *args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


@pytest.mark.parametrize("columns", [80, 100])
def test_list_is_one_line_per_component_with_the_full_summary_in_show_and_json(runner, monkeypatch, columns):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    entries = json.loads(invoke(runner, "list", "--json").stdout)
    result = _at(runner, columns, "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").splitlines()
    assert len(lines) == len(entries) + 2, result.stdout  # header, rule, one line per component (was 103 for 30)
    assert max(len(line) for line in lines) <= columns
    for entry, line in zip(entries, lines[2:]):
        assert line.split()[:2] == [entry["kind"], entry["name"]]
        assert line.endswith(f"  {entry['distribution']} {entry['version']}"), line  # the plugin column, whole
        shown = line.split(None, 2)[2].rsplit("  ", 1)[0].strip()
        if shown.endswith("…"):  # cut, never wrapped: the beginning of the summary
            assert entry["summary"].startswith(shown[:-1].rstrip()), (shown, entry["summary"])
        else:
            assert shown == entry["summary"]
    cut = next(e for e, line in zip(entries, lines[2:]) if line.split(None, 2)[2].rsplit("  ", 1)[0].endswith("…"))
    full = _at(runner, columns, "show", cut["name"], "--kind", cut["kind"])
    assert cut["summary"] in " ".join(full.stdout.split())  # the whole text is in show


def test_plugins_and_show_tables_fit_80_columns_without_breaking_names(runner, monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    plugins = _at(runner, 80, "plugins")
    assert plugins.exit_code == 0, plugins.output
    assert max(len(line) for line in plugins.stdout.splitlines()) <= 80
    words = plugins.stdout.replace(",", " ").replace(";", " ").split()
    for plugin in json.loads(invoke(runner, "plugins", "--json").stdout)["plugins"]:
        assert plugin["name"] in words
        for component in plugin["components"]:  # "kind:name", shown as "kind: name, name": never cut in two
            assert component.split(":", 1)[1] in words, component
    show = _at(runner, 80, "show", "sit")
    assert show.exit_code == 0 and max(len(line) for line in show.stdout.splitlines()) <= 80
    text = " ".join(show.stdout.split())
    for field in json.loads(invoke(runner, "show", "sit", "--json").stdout)[0]["config"]:
        assert field["name"] in show.stdout.split() and " ".join(field["doc"].split()) in text, field["name"]


def test_recipe_problems_are_listed_in_file_and_line_order(runner, toys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(textwrap.dedent("""\
        description: problems out of slot order
        losses: {diffusion: {name: toy-loss, nope: 1}}
        denoiser: {name: toy-dit, depth: many}
        dataset: {name: toy-data, root: /data, bogus: 2}
        encoders: [{name: toy-enc, extra: 3}]
        tokenizer: {name: toy-vea}
        """))
    result = invoke(runner, "recipe", "validate", recipe, "zzz=1")
    assert result.exit_code == 2, result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    lines = [int(line.split(f"{recipe}:", 1)[1].split(":")[0]) for line in problems if str(recipe) in line]
    assert lines == sorted(lines) and len(lines) >= 5, result.stderr  # was slot order: 4, 6, 5, 3, 2
    assert problems[-1].startswith("  - command line `zzz=1`")  # overrides after the file


def test_dry_run_table_has_a_total_row_and_one_line_per_component_at_80_columns(runner, toy_recipe):
    result = _at(runner, 80, "run", toy_recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("components (built on meta"))
    header = lines[start + 1].split()
    assert header == ["slot", "component", "plugin", "parameters", "trained"]
    rows = lines[start + 3: start + 3 + 5]
    assert [row.split()[0] for row in rows] == ["dataset", "tokenizer", "encoders.0", "denoiser", "losses.diffusion"]
    total = next(line for line in lines[start:] if line.startswith("total"))
    assert all(len(line) <= 80 for line in lines[start:]), result.stdout  # table, derived values, step plan

    def count(text):
        if text == "-":
            return 0.0
        scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1])
        return float(text[:-1]) * scale if scale else float(text)

    for column in (-2, -1):  # parameters, trained: the total is the sum of the rows (shown to 3 significant digits)
        rows_sum = sum(count(row.split()[column]) for row in rows)
        assert rows_sum > 0 and abs(count(total.split()[column]) - rows_sum) <= 0.01e6 * len(rows), total


def _progress_lines(stderr: str, description: str) -> list[str]:
    """The plain progress lines (stderr not a terminal) of one bar: ``description done/total (percent) ...``."""
    return [line for line in stderr.splitlines() if line.startswith(description + " ")]


def test_long_commands_show_progress_with_a_total(runner, quick_run, tmp_path, monkeypatch):
    """analyze (35 s silent before: bars without a total that never advanced), bench, cache-latents and eval print
    progress with a total on stderr; standard output keeps the result alone (--json)."""
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    analyzed = invoke(runner, "analyze", quick_run, "-n", 6, "--out", tmp_path / "analysis", "--device", "cpu",
                      "--json", "--batch-size", 4)
    assert analyzed.exit_code == 0, analyzed.output
    json.loads(analyzed.stdout)
    assert _progress_lines(analyzed.stderr, "analyze: open the run")[-1].startswith("analyze: open the run 1/1 (100%)")
    features = _progress_lines(analyzed.stderr, "analyze: latents, reconstructions, features")
    assert features and features[-1].split()[4:6] == ["6/6", "(100%)"], analyzed.stderr

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "dataset: {name: synthetic, num_classes: 4, resolution: 16, num_images: 24}\n"
        "tokenizer: {name: sd-vae, size: tiny}\n"
        "denoiser: {name: sit, size: tiny, num_classes: 4}\n"
        "losses: {diffusion: {name: flow-matching, updates: [denoiser]}}\n"
        "trainer: {name: default, batch_size: 8, num_workers: 0}\n")
    bench = invoke(runner, "bench", recipe, "--steps", 2, "--warmup", 1, "--device", "cpu", "--json", "--no-flops")
    assert bench.exit_code == 0, bench.output
    json.loads(bench.stdout)
    lines = _progress_lines(bench.stderr, "bench")
    assert lines[0].startswith("bench 1/3 (33%)") and lines[0].endswith("warm-up done, timing"), bench.stderr
    assert lines[-1].startswith("bench 3/3 (100%)"), bench.stderr

    cached = invoke(runner, "cache-latents", recipe, "--out", tmp_path / "cache", "--device", "cpu",
                    "--batch-size", 8)
    assert cached.exit_code == 0, cached.output
    assert _progress_lines(cached.stderr, "cache latents")[-1].startswith("cache latents 24/24 (100%)")


def test_eval_shows_progress_of_features_and_metrics(runner, tmp_path, monkeypatch):
    import numpy as np
    import torch

    from repae.evaluate.features import random_inception_state_dict

    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), weights)
    rng = np.random.default_rng(0)
    for name in ("samples", "ref"):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    result = invoke(runner, "eval", tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", "--metrics", "fid",
                    "--inception-weights", weights, "--json")
    assert result.exit_code == 0, result.output
    assert "fid" in json.loads(result.stdout)["metrics"]
    assert _progress_lines(result.stderr, "Inception features: samples")[-1].startswith(
        "Inception features: samples 12/12 (100%)"), result.stderr
    assert _progress_lines(result.stderr, "metrics (fid)")[-1].startswith("metrics (fid) 1/1 (100%)"), result.stderr


def test_sample_says_how_many_and_estimates_the_time_before_a_long_job(runner, quick_run, tmp_path, monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    result = invoke(runner, "sample", quick_run, "-n", 6, "--batch-size", 2, "--steps", 2, "--out", tmp_path / "s",
                    "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # notes on stderr only
    notes = result.stderr.splitlines()
    announce = next(line for line in notes if line.startswith("6 samples of "))
    estimate = next(line for line in notes if line.startswith("first batch: 2 samples in "))
    assert "batches of 2" in announce and "the remaining 4 need about " in estimate
    assert any(line.startswith("sample: open the run 1/1 (100%)") for line in notes)  # loading the checkpoint
    assert notes.index(announce) < notes.index(estimate) < next(
        i for i, line in enumerate(notes) if line.startswith("sample 6/6"))  # before the job goes on
    again = invoke(runner, "sample", quick_run, "-n", 6, "--batch-size", 2, "--steps", 2, "--out", tmp_path / "s",
                   "--device", "cpu")
    assert again.exit_code == 0 and "first batch" not in again.output  # nothing left to make: no estimate
    helped = " ".join(invoke(runner, "sample", "--help").stdout.replace("│", " ").split())
    assert "The default, 50,000, is the 50K of the paper's evaluation (FID-50K)" in helped


def test_problems_sort_by_file_then_line_as_numbers_then_key_path():
    from repae.errors import Problem, RecipeError

    given = [Problem("b.yaml:3", "x", "m"), Problem("command line `b=1`", "b", "m"), Problem("a.yaml:10", "z", "m"),
             Problem("a.yaml:9, changed by command line `a.k=2`", "a.k", "m"), Problem("a.yaml", "", "empty"),
             Problem("command line `a=1`", "a", "m"), Problem("a.yaml:10", "y", "m"),
             Problem(r"C:\r\a.yaml:2", "w", "m")]
    order = [(p.where.split(",")[0], p.path) for p in RecipeError(given).problems]
    assert order == [("C:\\r\\a.yaml:2", "w"), ("a.yaml", ""), ("a.yaml:9", "a.k"), ("a.yaml:10", "y"),
                     ("a.yaml:10", "z"), ("b.yaml:3", "x"),
                     ("command line `b=1`", "b"), ("command line `a=1`", "a")]  # overrides: in the order found
    assert str(RecipeError(given)).splitlines()[1] == r"  - C:\r\a.yaml:2: w: m"


def test_quickstart_dry_run_fits_80_columns_with_the_same_words(runner, monkeypatch):
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    narrow, wide = (_at(runner, columns, "run", ROOT / "recipes" / "quickstart.yaml", "--dry-run")
                    for columns in (80, 300))
    assert narrow.exit_code == 0 and wide.exit_code == 0, narrow.output

    def after_table(text):
        lines = text.splitlines()
        return lines[next(i for i, line in enumerate(lines) if line.lstrip().startswith("components (built")) + 1:]

    assert max(len(line) for line in after_table(narrow.stdout)) <= 80, narrow.stdout
    assert max(len(line) for line in after_table(wide.stdout)) > 80  # the step plan does need wrapping
    assert "step plan" in narrow.stdout and " ".join("\n".join(after_table(narrow.stdout)).split()) == " ".join(
        "\n".join(after_table(wide.stdout)).split())  # wrapped, nothing cut
    total = next(line for line in narrow.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:] == next(line for line in wide.stdout.splitlines() if line.startswith("total")).split()[1:]
