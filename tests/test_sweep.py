"""`repae sweep` and `repae compare`: grid parsing, validation of every point, a real two-point sweep of the
quickstart recipe (resumed and skipped), and the comparison table, Markdown, CSV and PNG of its runs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import QUICK_RUN_OVERRIDES, ROOT
from repae.cli.compare import compare
from repae.cli.sweep import sweep
from repae.compare import compare_runs, flatten_recipe, load_run
from repae.errors import RecipeError
from repae.sweep import parse_sweep_args, plan_sweep, point_name, run_sweep, split_values

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# two steps, a checkpoint after each (so that a point can be left unfinished), a log line per step
TINY = [*QUICK_RUN_OVERRIDES, "dataset.num_images=16", "trainer.batch_size=4", "trainer.steps=2", "trainer.log_every=1",
        "trainer.checkpoint_every=1"]
LR_AXIS = "trainer.optimizers.default.lr=1.0e-3,2.0e-3"

app = typer.Typer()
app.command("sweep")(sweep)
app.command("compare")(compare)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and planning
# ---------------------------------------------------------------------------------------------------------------------


def test_values_split_on_commas_outside_brackets_and_quotes():
    assert split_values("1,2, 3") == ["1", "2", "3"]
    assert split_values("[denoiser,tokenizer]") == ["[denoiser,tokenizer]"]
    assert split_values("[denoiser],[denoiser, tokenizer]") == ["[denoiser]", "[denoiser, tokenizer]"]
    assert split_values("{name: a, x: 1},{name: b}") == ["{name: a, x: 1}", "{name: b}"]
    assert split_values("'a, b',\"c,d\"") == ["'a, b'", '"c,d"']
    assert split_values("") == [""]


def test_arguments_become_axes_or_plain_overrides():
    parsed = parse_sweep_args(["denoiser.depth=4,8", "trainer.steps=10", "losses.diffusion.updates=[denoiser,tokenizer]",
                               "losses.repa.weight=0.5,1.0e-1", "description='a, b'"])
    assert [(a.key, a.values, a.texts) for a in parsed.axes] == [
        ("denoiser.depth", (4, 8), ("4", "8")), ("losses.repa.weight", (0.5, 0.1), ("0.5", "1.0e-1"))]
    assert parsed.fixed == ["trainer.steps=10", "losses.diffusion.updates=[denoiser,tokenizer]", "description='a, b'"]
    lists = parse_sweep_args(["losses.diffusion.updates=[denoiser],[denoiser,tokenizer]"]).axes[0]
    assert lists.values == (["denoiser"], ["denoiser", "tokenizer"])


def test_bad_arguments_are_all_reported():
    with pytest.raises(RecipeError) as err:
        parse_sweep_args(["no-equals-sign", "bad..key=1,2", "a.b=1,,2", "c=[1,{", "d=1,[2", "e=1,2", "e=3"])
    text = str(err.value)
    assert "5 problem(s)" in text
    for needle in ("`no-equals-sign`: bad override", "`bad..key=1,2`: bad override", "a.b: an empty value",
                   "d: value '[2'", "`e=1,2`: e: is swept but also set by `e=3`"):
        assert needle in text, needle


def test_point_names_are_safe_and_deterministic():
    assert point_name(3, [("denoiser.size", "XL/2"), ("losses.diffusion.updates", "[denoiser, tokenizer]")]) == \
        "003-denoiser.size=XL-2__losses.diffusion.updates=denoiser+tokenizer"
    assert point_name(0, [("tokenizer.weights", "hf://org/repo")]) == "000-tokenizer.weights=hf-org-repo"
    long = point_name(12, [("k", "v" * 300)])
    assert long.startswith("012-k=vvv") and len(long) <= 4 + 120 and long == point_name(12, [("k", "v" * 300)])
    assert long != point_name(12, [("k", "v" * 301)])


def test_plan_is_the_product_in_order(registry, tmp_path):
    plan = plan_sweep(QUICKSTART, ["denoiser.depth=2,3", "trainer.steps=7", "losses.repa.depth=1,2"], registry,
                      tmp_path / "out")
    assert not plan.problems
    assert [p.name for p in plan.points] == ["000-denoiser.depth=2__losses.repa.depth=1",
                                             "001-denoiser.depth=2__losses.repa.depth=2",
                                             "002-denoiser.depth=3__losses.repa.depth=1",
                                             "003-denoiser.depth=3__losses.repa.depth=2"]
    assert plan.points[1].overrides == ["denoiser.depth=2", "trainer.steps=7", "losses.repa.depth=2"]
    resolved = plan.points[2].resolved.to_dict()
    assert resolved["denoiser"]["depth"] == 3 and resolved["losses"]["repa"]["depth"] == 1
    assert plan.points[0].steps == 7 and plan.points[0].step is None
    assert plan_sweep(QUICKSTART, [], registry).out == Path("runs/quickstart-sweep")


def test_every_point_is_checked_whole(registry, tmp_path):
    """Each point's components are composed on meta before anything trains: a point whose alignment depth exceeds
    its denoiser's depth is a problem naming both keys; values that follow from others are derived per point."""
    plan = plan_sweep(QUICKSTART, ["denoiser.depth=1,3"], registry, tmp_path / "depth")
    assert len(plan.problems) == 1
    text = str(plan.problems[0])
    assert text.startswith("[point 000-denoiser.depth=1]") and "losses.repa.depth" in text
    assert "denoiser has 1 blocks" in text and "denoiser.depth=1" in text
    result = invoke("sweep", QUICKSTART, "denoiser.depth=1,3", "--out", tmp_path / "cli", "--dry-run")
    assert result.exit_code == 2 and "losses.repa.depth" in result.output and not (tmp_path / "cli").exists()
    # the denoiser's input size follows the dataset resolution at every point (the paper's 512 px is one line)
    plan = plan_sweep(QUICKSTART, ["dataset.resolution=32,64"], registry, tmp_path / "res")
    assert not plan.problems
    assert [p.resolved.to_dict()["denoiser"]["input_size"] for p in plan.points] == [8, 16]


def test_compare_uses_the_one_recipe_flattener():
    import repae.recipe

    assert flatten_recipe is repae.recipe.flatten_recipe
    recipe = {"losses": {"diffusion": {"updates": ["denoiser", "tokenizer"]}}, "encoders": [{"name": "dinov2"}],
              "trainer": {"optimizers": {}}}
    assert flatten_recipe(recipe) == {"losses.diffusion.updates": ["denoiser", "tokenizer"],
                                      "encoders.0.name": "dinov2", "trainer.optimizers": {}}


def test_dry_run_reports_every_invalid_point_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", QUICKSTART, "denoiser.depth=2,x", "trainer.optimizers.default.lr=1.0e-3,abc",
                    "trainer.steps=oops", "--out", out, "--dry-run")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "3 problem(s)" in text
    assert "[every point] command line `trainer.steps=oops`: trainer.steps: expected int" in text
    assert "[point 002-denoiser.depth=x__trainer.optimizers.default.lr=1.0e-3, 003-denoiser.depth=x__trainer." \
           "optimizers.default.lr=abc] command line `denoiser.depth=x`" in text
    assert "command line `trainer.optimizers.default.lr=abc`: trainer.optimizers.default.lr: expected float" in text
    assert "Traceback" not in result.output and not out.exists()
    ok = invoke("sweep", QUICKSTART, "denoiser.depth=2,3", "--out", out, "--dry-run")
    assert ok.exit_code == 0, ok.output
    assert "2 point(s) valid" in ok.output and not out.exists()


def test_the_points_table_is_readable_at_80_columns(tmp_path):
    """Three swept keys: at 80 columns one column per key folded every point's name over 6 lines; now the point's
    number, its state and its settings, each key=value whole; a wide terminal keeps a column per key."""
    axes = ["latent_norm={name: batchnorm},{name: channel-stats}", "losses.repa.weight=0.5,1.5", LR_AXIS]
    narrow = CliRunner().invoke(app, ["sweep", str(QUICKSTART), *axes, "--out", str(tmp_path), "--dry-run"],
                                env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.output.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow.output
    rows = [line for line in lines if line[:3].isdigit()]
    assert [row.split()[:2] for row in rows] == [[f"{i:03d}", "new"] for i in range(8)], narrow.output
    for setting in ("latent_norm={name: channel-stats}", "losses.repa.weight=1.5",
                    "trainer.optimizers.default.lr=2.0e-3"):
        assert setting in narrow.output, setting
    wide = CliRunner().invoke(app, ["sweep", str(QUICKSTART), *axes, "--out", str(tmp_path), "--dry-run"],
                              env={"COLUMNS": "250"})
    assert wide.exit_code == 0 and "007-latent_norm=name-channel-stats__losses.repa.weight=1.5__trainer.optimizers." \
        "default.lr=2.0e-3" in wide.output, wide.output


def test_a_preempted_point_stops_the_sweep_even_with_keep_going(registry, tmp_path, monkeypatch):
    """SIGTERM reaches a sweep as a stopped point (exit 143 of the launched run, or StopRequested in process): the
    sweep marks it interrupted and stops (on SLURM the job is about to be killed), keep-going or not."""
    from repae.errors import StopRequested

    calls = []
    monkeypatch.setattr("repae.sweep.subprocess.run",
                        lambda command, check: calls.append(command) or subprocess.CompletedProcess(command, 143))
    plan = plan_sweep(QUICKSTART, [*TINY, "trainer.optimizers.default.lr=2.0e-3,1.0e-3"], registry, tmp_path / "s")
    with pytest.raises(StopRequested) as stopped:
        run_sweep(plan, launcher="torchrun", nproc_per_node=2, keep_going=True, echo=lambda _: None)
    assert stopped.value.exit_code == 143 and len(calls) == 1
    index = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["status"] for p in index["points"]] == ["interrupted", "pending"]


def test_torchrun_launcher_runs_one_job_per_point(registry, tmp_path, monkeypatch):
    calls = []

    def fake_run(command, check):
        calls.append(command)
        return subprocess.CompletedProcess(command, 3 if "trainer.optimizers.default.lr=2.0e-3" in command else 0)

    monkeypatch.setattr("repae.sweep.subprocess.run", fake_run)
    plan = plan_sweep(QUICKSTART, [*TINY, "trainer.optimizers.default.lr=2.0e-3,1.0e-3"], registry, tmp_path / "s")
    run_sweep(plan, launcher="torchrun", nproc_per_node=4, torchrun_args="--nnodes 2 --rdzv-endpoint h:1",
              keep_going=True, echo=lambda _: None)
    assert len(calls) == 2
    assert calls[1][1:13] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "2",
                              "--rdzv-endpoint", "h:1", "-m", "repae", "run", str(QUICKSTART)]
    assert calls[1][13:] == [*TINY, "trainer.optimizers.default.lr=1.0e-3", "--out", str(plan.points[1].run_dir)]
    index = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [p["status"] for p in index["points"]] == ["failed", "done"]
    assert "exited with code 3" in index["points"][0]["error"] and index["launcher"] == "torchrun"
    with pytest.raises(Exception, match="needs --launcher torchrun"):
        run_sweep(plan, nproc_per_node=2)


# ---------------------------------------------------------------------------------------------------------------------
# A real sweep, resumed, then compared
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A two-point sweep of the quickstart recipe over the learning rate (2 steps each), run through the CLI."""
    out = tmp_path_factory.mktemp("sweep") / "lr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPAE_PLUGINS", "repae")
        result = invoke("sweep", QUICKSTART, *TINY, LR_AXIS, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_sweep_trains_every_point_and_indexes_them(swept):
    out, output = swept
    index = json.loads((out / "sweep.json").read_text())
    names = ["000-trainer.optimizers.default.lr=1.0e-3", "001-trainer.optimizers.default.lr=2.0e-3"]
    assert [p["name"] for p in index["points"]] == names
    assert [p["status"] for p in index["points"]] == ["done", "done"] and index["points"][1]["step"] == 2
    assert index["axes"] == [{"key": "trainer.optimizers.default.lr", "values": [0.001, 0.002],
                              "texts": ["1.0e-3", "2.0e-3"]}]
    lrs = [flatten_recipe(yaml.safe_load((out / n / "recipe.yaml").read_text()))
           ["trainer.optimizers.default.lr"] for n in names]
    assert lrs == [0.001, 0.002]
    assert all((out / n / "checkpoints" / "step-0000002" / "state.json").is_file() for n in names)
    assert f"repae compare {out}" in " ".join(output.split())


def test_sweep_again_skips_finished_points_and_resumes_unfinished(swept, tmp_path):
    out, _ = swept
    copy = tmp_path / "lr"
    shutil.copytree(out, copy)
    unfinished = copy / "001-trainer.optimizers.default.lr=2.0e-3"
    shutil.rmtree(unfinished / "checkpoints" / "step-0000002")
    finished = copy / "000-trainer.optimizers.default.lr=1.0e-3" / "checkpoints" / "step-0000002" / "state.json"
    before = finished.stat().st_mtime_ns
    dry = invoke("sweep", QUICKSTART, *TINY, LR_AXIS, "--out", copy, "--dry-run")
    assert "done (2)" in dry.output and "step 1/2" in dry.output
    result = invoke("sweep", QUICKSTART, *TINY, LR_AXIS, "--out", copy, "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "[1/2] 000-trainer.optimizers.default.lr=1.0e-3: finished (step 2); skipped" in text
    assert "[2/2] 001-trainer.optimizers.default.lr=2.0e-3: training, resuming from step 1" in text
    assert finished.stat().st_mtime_ns == before
    assert (unfinished / "checkpoints" / "step-0000002" / "state.json").is_file()
    assert [p["status"] for p in json.loads((copy / "sweep.json").read_text())["points"]] == ["done", "done"]
    # the rule of `repae run`: training for longer or changing trackers continues the points
    longer = invoke("sweep", QUICKSTART, *TINY, "trainer.steps=3", "trackers=[tensorboard]", LR_AXIS, "--out", copy,
                    "--dry-run")
    assert longer.exit_code == 0 and longer.output.count("step 2/3") == 2, longer.output
    # a changed list is one key (one flattener for run, sweep and compare), not losses.diffusion.updates.1
    listed = invoke("sweep", QUICKSTART, *TINY, "trainer.steps=3", "losses.diffusion.updates=[denoiser,tokenizer]",
                    LR_AXIS, "--out", copy, "--dry-run")
    assert listed.exit_code == 2 and "already holds a run of a different recipe (differing keys: " \
        "losses.diffusion.updates, trainer.steps)" in " ".join(listed.output.split()), listed.output
    allowed = invoke("sweep", QUICKSTART, *TINY, "losses.diffusion.updates=[denoiser,tokenizer]", LR_AXIS, "--out",
                     copy, "--dry-run", "--allow-recipe-change")
    assert allowed.exit_code == 0 and "done (2)" in allowed.output, allowed.output


def test_compare_tabulates_differing_keys_and_last_losses(swept, tmp_path):
    out, _ = swept
    runs = [out / "000-trainer.optimizers.default.lr=1.0e-3", out / "001-trainer.optimizers.default.lr=2.0e-3"]
    last = json.loads((runs[1] / "metrics.jsonl").read_text().splitlines()[-1])
    comparison = compare_runs([out])  # the sweep directory stands for its points
    assert [r.path for r in comparison.runs] == runs
    assert comparison.keys == ["trainer.optimizers.default.lr"]
    assert "denoiser/diffusion" in comparison.metrics and "tokenizer/reconstruction" in comparison.metrics
    assert not any(m.endswith("grad_norm") for m in comparison.metrics)
    assert comparison.runs[1].metrics["denoiser/repa"] == last["denoiser/repa"]
    assert [s for s, _ in comparison.runs[0].curves["denoiser/diffusion"]] == [1, 2]

    md, table_csv, png = tmp_path / "c.md", tmp_path / "c.csv", tmp_path / "c.png"
    result = invoke("compare", *runs, "--markdown", md, "--csv", table_csv, "--plot", png)
    assert result.exit_code == 0, result.output
    assert "trainer.optimizers.default.lr" in result.output and "denoiser/diffusion" in result.output
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | trainer.optimizers.default.lr | step | tokenizer/")
    assert lines[1].startswith("|---|---|---:|") and len(lines) == 4
    assert lines[3].startswith(f"| {runs[1].name} | 0.002 | 2 |") and f"| {last['denoiser/diffusion']:.4g} |" in lines[3]
    rows = list(csv.DictReader(io.StringIO(table_csv.read_text())))
    assert [r["trainer.optimizers.default.lr"] for r in rows] == ["0.001", "0.002"]
    assert float(rows[1]["denoiser/diffusion"]) == last["denoiser/diffusion"] and rows[1]["path"] == str(runs[1])
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width == 2 * 560 and image.getextrema() != ((255, 255),) * 3


def test_compare_reads_eval_and_analysis_and_selects_metrics(swept, tmp_path):
    out, _ = swept
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        shutil.copytree(out / "000-trainer.optimizers.default.lr=1.0e-3", run,
                        ignore=shutil.ignore_patterns("checkpoints"))
    # `repae eval --json > RUN/eval.json`: values under "metrics", provenance beside them
    (runs[0] / "eval.json").write_text(json.dumps({
        "samples": "s.npz", "num_samples": 64, "metrics": {"fid": 12.5, "inception_score": 80.0, "cfg-1.5": {"fid": 3.25}},
        "skipped": {"precision": "no reference images"}}))
    # `repae analyze` writes RUN/analysis/step-NNNNNNN/analysis.json; the latest step is read
    for step, variance in ((1, 9.0), (2, 0.5)):
        folder = runs[1] / "analysis" / f"step-{step:07d}"
        folder.mkdir(parents=True)
        (folder / "analysis.json").write_text(json.dumps({
            "step": step, "spatial_variance": variance, "cknna": 0.25, "rfid": None, "settings": {"t": 0.5}}))
    (runs[1] / "metrics.jsonl").write_text('{"step": 5, "denoiser/diffusion": NaN}\n{"step": 6, "denoi')
    record = load_run(runs[1])
    assert record.step == 5 and record.metrics["denoiser/diffusion"] is None and not record.curves["denoiser/diffusion"]
    assert record.files["analysis"].parent.name == "step-0000002" and record.metrics["analysis/settings.t"] == 0.5
    default = compare_runs(runs)
    assert default.keys == [] and default.metrics[:4] == [
        "eval/fid", "eval/inception_score", "analysis/spatial_variance", "analysis/cknna"]
    assert default.rows()[1][2:6] == ["-", "-", "0.5", "0.25"] and "denoiser/diffusion" in default.metrics
    chosen = compare_runs(runs, metrics=["eval/*", "analysis/cknna", "denoiser/diffusion"])
    assert chosen.metrics == ["eval/num_samples", "eval/fid", "eval/inception_score", "eval/cfg-1.5.fid",
                              "analysis/cknna", "denoiser/diffusion"]
    assert chosen.rows()[0][2:7] == ["64", "12.5", "80", "3.25", "-"] and float(chosen.rows()[0][7]) > 0
    assert chosen.rows()[1][2:] == ["-", "-", "-", "-", "0.25", "nan"]
    result = invoke("compare", *runs, "--all-keys", "-m", "eval/fid")
    assert result.exit_code == 0 and "denoiser.depth" in result.output


def test_compare_errors_are_clear(swept, tmp_path):
    out, _ = swept
    point = out / "000-trainer.optimizers.default.lr=1.0e-3"
    for args, message in (
        ([tmp_path / "missing"], "does not exist"),
        ([tmp_path], "has no recipe.yaml"),
        ([point, "-m", "eval/fid"], "--metric eval/fid: matches no metric"),
        ([point, "--plot", tmp_path / "x.png", "--curve", "nope"], "choose with --curve from: denoiser/diffusion"),
    ):
        result = invoke("compare", *args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
