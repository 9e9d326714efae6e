"""Trackers (kind ``tracker``): the built-in ``tensorboard`` and ``wandb`` (offline) receive what ``metrics.jsonl``
records (same keys, steps and values), the resolved recipe and the sample grids; a resumed run neither drops nor
repeats a step; a missing optional package, an unknown tracker and the removed ``trainer.tensorboard`` are one clear
message each."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys

import pytest
import yaml

import repae

from conftest import ROOT, cli

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = ["dataset.num_images=32", "trainer.batch_size=4", "trainer.log_every=1", "trainer.checkpoint_every=2",
        "trainer.sample_every=100", "trainer.sample_count=4", "trainer.num_workers=0", "sampler.steps=2"]
TRACKERS = "trackers=[tensorboard, {name: wandb, mode: offline, project: repae-tests}]"
LOSS_KEYS = ("denoiser/diffusion", "denoiser/repa", "tokenizer/reconstruction", "discriminator/gan")
"""Losses of the quickstart recipe (exact resume recomputes them bit for bit)."""


@pytest.fixture(autouse=True)
def _wandb_offline_and_quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """``repae run`` of the quickstart with both trackers: 3 steps (metrics at 1, 2, 3; checkpoints at 2 and 3; a
    grid at 3); then the step-3 checkpoint is deleted (a process killed after logging step 3, before checkpointing
    it) and the run continues to step 5 from step 2 (metrics 3, 4, 5 again; a grid at 5)."""
    out = tmp_path_factory.mktemp("trackers") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_CONFIG_DIR", str(out.parent / "wandb-config"))
        mp.setenv("WANDB_CACHE_DIR", str(out.parent / "wandb-cache"))
        mp.delenv("WANDB_DIR", raising=False)
        cli("run", QUICKSTART, "--out", out, "--device", "cpu", *TINY, "trainer.steps=3", TRACKERS)
        first = {
            "metrics": read_metrics(out),
            "tensorboard": tensorboard_scalars(out / "tensorboard"),
            "wandb": wandb_history(out),
        }
        shutil.rmtree(out / "checkpoints" / "step-0000003")
        cli("run", QUICKSTART, "--out", out, "--device", "cpu", *TINY, "trainer.steps=5", TRACKERS)
    return out, first


# -- reading what the trackers wrote ---------------------------------------------------------------------------------


def read_metrics(run_dir) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row.pop("step") for row in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats a step: {steps}"
    return {step: {k: (math.nan if v is None else float(v)) for k, v in row.items()} for step, row in zip(steps, rows)}


def tensorboard_accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()  # purges the events an interrupted process wrote after the checkpoint (purge_step)
    return accumulator


def tensorboard_scalars(folder) -> dict[int, dict[str, float]]:
    accumulator = tensorboard_accumulator(folder)
    out: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            assert tag not in out.setdefault(event.step, {}), f"TensorBoard holds {tag} twice at step {event.step}"
            out[event.step][tag] = event.value
    return out


def wandb_records(path):
    """The records of a W&B transaction log (``run-ID.wandb``, written by wandb-core; wandb 0.31 has no Python
    reader): a 7-byte header (``:W&B``, magic 0xBEE1, version), then LevelDB-log blocks of 32 KiB holding chunks
    (crc32, length, type: full / first / middle / last) of serialised ``Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run_dir):
    """The offline W&B runs under RUN_DIR/wandb, oldest first (one per process that trained)."""
    return sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir())


def wandb_history(run_dir, *, runs=None) -> dict[int, dict[str, object]]:
    """``{step: {key: value}}`` of every history row of the run directory's offline W&B runs (a step in two runs
    fails the test)."""
    out: dict[int, dict[str, object]] = {}
    for folder in runs or wandb_runs(run_dir):
        (log,) = folder.glob("run-*.wandb")
        for record in wandb_records(log):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = int(row.pop("_step"))
            assert step not in out, f"W&B holds step {step} twice"
            out[step] = row
    return out


def wandb_config(folder) -> dict[str, object]:
    (log,) = folder.glob("run-*.wandb")
    config: dict[str, object] = {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        for item in items:
            config[item.key] = json.loads(item.value_json)
    return config


def scalars_of(row: dict[str, object]) -> dict[str, float]:
    """A W&B row without its own keys (``_runtime``, ``_timestamp``) and the sample image's fields."""
    return {k: float(v) for k, v in row.items() if not k.startswith("_") and not k.startswith("samples")}


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# -- the tests ---------------------------------------------------------------------------------------------------------


def test_a_run_logs_the_same_scalars_to_metrics_jsonl_tensorboard_and_wandb(resumed_run):
    _, first = resumed_run
    metrics, board, history = first["metrics"], first["tensorboard"], first["wandb"]
    assert sorted(metrics) == [1, 2, 3]
    assert len(metrics[1]) >= 20 and all(key in metrics[1] for key in LOSS_KEYS + ("it_per_s", "elapsed_s"))
    assert sorted(board) == sorted(history) == [1, 2, 3]
    for step, values in metrics.items():
        assert set(board[step]) == set(values) == set(scalars_of(history[step])), step
        for key, value in values.items():
            # TensorBoard stores float32; W&B's JSON keeps the float64 exactly
            assert same(board[step][key], float(struct.unpack("f", struct.pack("f", value))[0])), (step, key)
            assert same(scalars_of(history[step])[key], value), (step, key)


def test_a_resumed_run_neither_drops_nor_repeats_a_step(resumed_run):
    out, first = resumed_run
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    board = tensorboard_scalars(out / "tensorboard")
    assert sorted(board) == [1, 2, 3, 4, 5]  # step 3 of the interrupted process purged, logged again
    for step in metrics:
        for key, value in metrics[step].items():
            assert same(board[step][key], float(struct.unpack("f", struct.pack("f", value))[0])), (step, key)
    # W&B cannot delete: the interrupted process's step 3 stays, the resumed process starts at 4, in the same run
    runs = wandb_runs(out)
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # two processes, one W&B run id
    assert json.loads((out / "wandb-run.json").read_text())["last_step"] == 5
    history = wandb_history(out)
    assert sorted(history) == [1, 2, 3, 4, 5]
    assert sorted(wandb_history(out, runs=runs[1:])) == [4, 5]
    for step in metrics:
        assert set(scalars_of(history[step])) == set(metrics[step])
        # same values, except step 3's: the interrupted process logged it (its losses are the same: exact resume)
        keys = LOSS_KEYS if step == 3 else metrics[step]
        for key in keys:
            assert same(scalars_of(history[step])[key], metrics[step][key]), (step, key)
    assert first["metrics"][3]["denoiser/diffusion"] == metrics[3]["denoiser/diffusion"]  # exact resume


def test_the_recipe_and_the_sample_grids_are_logged(resumed_run):
    out, _ = resumed_run
    recipe_text = (out / "recipe.yaml").read_text()
    recipe = yaml.safe_load(recipe_text)
    assert recipe["trackers"][0] == {"name": "tensorboard", "dir": None, "flush_secs": 120}
    first, last = (wandb_config(folder) for folder in wandb_runs(out))  # the resolved recipe is the run's config
    for key in ("seed", "dataset", "tokenizer", "encoders", "latent_norm", "denoiser", "losses", "sampler", "trainer",
                "trackers"):
        assert last[key] == recipe[key], key
        assert first[key] == (recipe[key] if key != "trainer" else {**recipe[key], "steps": 3}), key
    accumulator = tensorboard_accumulator(out / "tensorboard")
    texts = accumulator.Tensors("recipe/text_summary")
    assert [t.step for t in texts] == [1, 3]  # each process's recipe, at the first step it trained
    assert texts[-1].tensor_proto.string_val[0].decode() == "\n".join(f"    {line}"
                                                                      for line in recipe_text.splitlines())
    # the grids the run saved: TensorBoard purged the interrupted one (step 3), W&B keeps both
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000005.png"]
    images = accumulator.Images("samples")
    assert [i.step for i in images] == [5]
    from PIL import Image

    with Image.open(out / "samples" / "step-0000005.png") as grid:
        assert (images[0].width, images[0].height) == grid.size
    history = wandb_history(out)
    logged = {step: row for step, row in history.items() if "samples/_type" in row}
    assert sorted(logged) == [3, 5] and all(row["samples/_type"] == "image-file" for row in logged.values())
    for step, row in logged.items():
        media = [p for folder in wandb_runs(out) for p in (folder / "files").rglob(f"samples_{step}_*.png")]
        assert len(media) == 1
        with Image.open(media[0]) as logged_image, Image.open(out / "samples" / f"step-{step:07d}.png") as grid:
            assert logged_image.size == grid.size and logged_image.tobytes() == grid.convert("RGB").tobytes()


def test_listing_and_validating_import_neither_tensorboard_nor_wandb(tmp_path):
    """``repae list`` imports neither; ``repae recipe validate`` with both trackers checks that they are installed
    without importing them (timm imports wandb when installed: only imports from repae's code count)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {QUICKSTART}\ntrackers: [tensorboard, wandb]\n")
    script = tmp_path / "probe.py"
    script.write_text(f"""
import sys, traceback
from typer.testing import CliRunner
from repae.cli import app

WATCHED = ("tensorboard", "wandb", "torch.utils.tensorboard")
by_repae = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED:
            frames = [f.filename for f in traceback.extract_stack()]
            if any(f.endswith(("importlib/util.py", "<frozen importlib.util>")) for f in frames):
                return None  # importlib.util.find_spec: a look-up, not an import
            if not any("/timm/" in f or "/open_clip/" in f for f in frames):
                by_repae.append(name)
        return None

sys.meta_path.insert(0, Watch())
r = CliRunner().invoke(app, ["list", "tracker"])
assert r.exit_code == 0 and "tensorboard" in r.output and "wandb" in r.output, r.output
r = CliRunner().invoke(app, ["show", "wandb"])
assert r.exit_code == 0 and "WANDB_MODE" in r.output, r.output
listed = [m for m in ("torch",) + WATCHED if m in sys.modules]
r = CliRunner().invoke(app, ["recipe", "validate", {str(recipe)!r}])
assert r.exit_code == 0, r.output
print(listed, by_repae, [m for m in ("tensorboard", "torch.utils.tensorboard") if m in sys.modules])
""")
    env = {**os.environ, "REPAE_PLUGINS": "repae", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[] [] []"


@pytest.mark.parametrize("missing,extra", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_package_is_one_message_naming_the_extra(monkeypatch, tmp_path, missing, extra):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: `import` raises ImportError
    with pytest.raises(repae.RecipeError) as caught:
        repae.load_recipe(QUICKSTART, [f"trackers=[{missing}]"], check=True)
    problems = caught.value.problems
    assert len(problems) == 1 and problems[0].path == "trackers.0"
    assert f"pip install 'repae[{extra}]'" in str(problems[0])
    result = cli("run", QUICKSTART, "--out", tmp_path / "run", "--device", "cpu", f"trackers=[{missing}]", code=2)
    assert result.output.count(f"pip install 'repae[{extra}]'") == 1 and "trackers.0" in result.output
    assert not (tmp_path / "run").exists()  # reported before anything was written


def test_an_unknown_tracker_gets_the_registry_suggestion():
    with pytest.raises(repae.RecipeError, match=r"trackers\.0\.name: unknown tracker 'tensorbord'.*tensorboard"):
        repae.load_recipe(QUICKSTART, ["trackers=[tensorbord]"])
    with pytest.raises(repae.RecipeError, match=r"trackers\.1\.mode: expected one of 'auto', 'online', "
                                                r"'offline', 'disabled'.*Did you mean 'offline'"):
        repae.load_recipe(QUICKSTART, ["trackers=[tensorboard, {name: wandb, mode: ofline}]"])


def test_trainer_tensorboard_was_removed_and_names_its_replacement(tmp_path):
    with pytest.raises(repae.RecipeError) as caught:
        repae.load_recipe(QUICKSTART, ["trainer.tensorboard=true"])
    (problem,) = caught.value.problems
    assert problem.path == "trainer.tensorboard" and "was removed" in str(problem)
    assert "trackers: [tensorboard]" in str(problem)
    result = cli("recipe", "validate", QUICKSTART, "trainer.tensorboard=true", code=2)
    assert "trackers: [tensorboard]" in result.output
    # `tensorboard: false` is in the recipe.yaml of every run directory written before: those still load
    recipe = repae.load_recipe(QUICKSTART, ["trainer.tensorboard=false"])
    assert "tensorboard" not in recipe.to_dict()["trainer"]


def test_trackers_may_change_when_a_run_continues(tmp_path):
    from repae.rundir import check_run_dir, prepare_run_dir

    old = repae.load_recipe(QUICKSTART, ["trainer.tensorboard=false"])
    run_dir = tmp_path / "run"
    prepare_run_dir(old, run_dir)
    # a run directory of an earlier version: its recipe.yaml holds trainer.tensorboard: false
    text = (run_dir / "recipe.yaml").read_text()
    (run_dir / "recipe.yaml").write_text(text.replace("  name: default\n", "  name: default\n  tensorboard: false\n"))
    assert "tensorboard: false" in (run_dir / "recipe.yaml").read_text()
    new = repae.load_recipe(QUICKSTART, [TRACKERS])
    plan = check_run_dir(new, run_dir)
    assert plan.changed and all(key.startswith(("trackers", "trainer.tensorboard")) for key in plan.changed)
    with pytest.raises(repae.UserError, match="differing keys: .*trainer.ema_decay"):
        check_run_dir(repae.load_recipe(QUICKSTART, [TRACKERS, "trainer.ema_decay=0.5"]), run_dir)


class Recording:
    """A third-party tracker as the contract describes it: records every call."""

    def __init__(self, fail_in: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail_in = fail_in

    def _record(self, *call) -> None:
        self.calls.append(call)
        if call[0] == self.fail_in:
            raise RuntimeError(f"{self.fail_in} broke")

    def start(self, run):
        self._record("start", run.resume_step, run.name, dict(run.recipe), run.label)

    def log_scalars(self, step, scalars):
        self._record("log_scalars", step, dict(scalars))

    def log_image(self, step, key, path):
        self._record("log_image", step, key, path.name)

    def finish(self, *, ok=True):
        self._record("finish", ok)


def test_a_tracker_failing_while_logging_is_reported_once_and_the_others_go_on(tmp_path, capsys):
    from repae.train.observe import MetricsLog, Trackers

    assert isinstance(Recording(), repae.Tracker)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("seed: 3\n")
    good, bad = Recording(), Recording(fail_in="log_scalars")
    trackers = Trackers([("trackers.0", "good", good), ("trackers.1", "bad", bad)])
    trackers.start(run_dir, 4)
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=4, trackers=trackers)
    log.write(5, {"loss": 0.5, "skipped_steps": 0, "nan": math.nan})
    log.write(6, {"loss": 0.25, "skipped_steps": 1, "nan": math.nan})
    log.image(6, "samples", run_dir / "samples" / "step-0000006.png")
    log.close(ok=True)
    assert good.calls[0] == ("start", 4, "run", {"seed": 3}, "trackers.0")
    assert good.calls[1][:2] == ("log_scalars", 5) and good.calls[1][2]["loss"] == 0.5
    assert math.isnan(good.calls[1][2]["nan"]) and good.calls[2][2]["skipped_steps"] == 1.0
    assert good.calls[3:] == [("log_image", 6, "samples", "step-0000006.png"), ("finish", True)]
    assert [c[0] for c in bad.calls] == ["start", "log_scalars", "finish"] and bad.calls[-1] == ("finish", False)
    err = capsys.readouterr().err
    assert err.count("warning: trackers.1 (tracker 'bad') failed in log_scalars at step 5") == 1
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [5, 6]


def test_a_tracker_that_cannot_start_stops_the_run_naming_its_key_path(tmp_path):
    from repae.train.observe import Trackers

    first, broken = Recording(), Recording(fail_in="start")
    trackers = Trackers([("trackers.0", "first", first), ("trackers.1", "broken", broken)])
    with pytest.raises(repae.UserError, match=r"^trackers\.1 \(tracker 'broken'\) could not start: RuntimeError: "
                                              r"start broke$"):
        trackers.start(tmp_path, 0)
    assert first.calls[-1] == ("finish", False)  # the one started already is closed


@pytest.mark.slow
def test_under_torchrun_process_0_alone_logs_what_metrics_jsonl_holds(tmp_path):
    """Two processes (torchrun, gloo): one TensorBoard events file and one W&B run, written by process 0, holding the
    steps and values of metrics.jsonl (which holds the losses averaged over both processes)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "offline",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    env.pop("WANDB_DIR", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "repae", "run",
           str(QUICKSTART), "--out", str(out), "--device", "cpu", *TINY, "trainer.steps=2", "trainer.sample_every=2",
           TRACKERS]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert len(wandb_runs(out)) == 1
    metrics, board, history = read_metrics(out), tensorboard_scalars(out / "tensorboard"), wandb_history(out)
    assert sorted(metrics) == sorted(board) == sorted(history) == [1, 2]
    for step, values in metrics.items():
        assert set(board[step]) == set(values) == set(scalars_of(history[step])), step
        for key, value in values.items():
            assert same(board[step][key], float(struct.unpack("f", struct.pack("f", value))[0])), (step, key)
            assert same(scalars_of(history[step])[key], value), (step, key)
    assert "samples" in tensorboard_accumulator(out / "tensorboard").Tags()["images"]
