"""Long runs that survive faults (issue 10): preemption signals, kill -9, divergence, a full disk, two runs on one
folder, `--out` into foreign folders, resumed logs, plain progress lines, recipe value ranges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repae.train.checkpoint import latest_checkpoint, list_checkpoints

from conftest import ROOT, cli

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SMALL = ["dataset.num_images=64", "trainer.batch_size=8", "trainer.log_every=1", "trainer.sample_every=0",
         "trainer.num_workers=0"]


def spawn(out: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "repae", "run", str(QUICKSTART), *SMALL, *overrides, "--out", str(out),
           "--device", "cpu"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120.0) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for f in folder.glob("model-*.safetensors") for t in load_file(f).values()
               if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_writes_a_checkpoint_and_the_same_command_resumes(tmp_path, sig):
    """Sent to the whole process group, DataLoader workers included (SLURM signals every process of the job step;
    Ctrl-C reaches the group): the workers leave it to the main process."""
    out = tmp_path / "run"
    proc = spawn(out, "trainer.steps=2000", "trainer.checkpoint_every=2000", "trainer.num_workers=2")
    wait_for_steps(out, proc, 3)
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert f"stopped: by {sig.name} after step" in stderr and "run the same command to resume" in stderr
    assert "Traceback" not in stderr and stderr.count(f"{sig.name} received") == 1
    saved = latest_checkpoint(out)
    step = int(saved.name.split("-")[1])
    assert step >= 3 and json.loads((saved / "state.json").read_text())["step"] == step
    resumed = spawn(out, f"trainer.steps={step + 2}", "trainer.checkpoint_every=2000")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"resuming from {saved}" in stderr
    assert steps_logged(out) == list(range(1, step + 3))  # every step once: nothing logged past the checkpoint


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint_and_no_debris(tmp_path):
    """A checkpoint every step, killed with SIGKILL while writing them: the newest complete checkpoint loads, the
    next start removes the interrupted write's temporary folder and resumes."""
    out = tmp_path / "run"
    proc = spawn(out, "trainer.steps=2000", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2")
    wait_for_steps(out, proc, 4)
    deadline = time.time() + 60
    while not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir()) and time.time() < deadline:
        time.sleep(0.001)  # kill inside a write when we can catch one
    proc.kill()
    proc.communicate(timeout=60)
    newest = latest_checkpoint(out)
    assert newest is not None and all_finite(newest)
    (out / "checkpoints" / ".step-9999999.tmp-12345").mkdir()  # what a kill inside a write leaves, for sure
    step = int(newest.name.split("-")[1])
    resumed = spawn(out, f"trainer.steps={step + 1}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert latest_checkpoint(out).name == f"step-{step + 1:07d}"


def test_divergence_skips_steps_then_stops_with_the_last_good_state(tmp_path):
    out = tmp_path / "run"
    result = cli("run", QUICKSTART, *SMALL, "trainer.steps=40", "trainer.checkpoint_every=1000",
                 "trainer.optimizers.default.lr=1.0e+6", "trainer.max_nonfinite_steps=3", "--out", out,
                 "--device", "cpu", code=2)
    assert "is not finite (NaN or inf); the step was skipped (1 in a row" in result.stderr
    assert "training diverged: 3 steps in a row had a non-finite loss or gradient" in result.stderr
    # nothing saved at the divergence: those weights would diverge again (and would rotate good checkpoints away)
    assert "no checkpoint was written before it" in result.stderr and latest_checkpoint(out) is None
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["skipped_steps"] for line in lines) >= 3


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    import errno

    import repae.train.checkpoint as checkpoint

    out = tmp_path / "run"
    cli("run", QUICKSTART, *SMALL, "trainer.steps=2", "trainer.checkpoint_every=2", "--out", out, "--device", "cpu")
    real = checkpoint.save_file

    def full(tensors, path, *args, **kwargs):
        if "optimizer-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full)
    result = cli("run", QUICKSTART, *SMALL, "trainer.steps=4", "trainer.checkpoint_every=2", "--out", out,
                 "--device", "cpu", code=2)
    assert f"cannot write checkpoint {out / 'checkpoints' / 'step-0000004'}" in result.stderr
    assert "No space left on device" in result.stderr and "step-0000002 is intact" in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert all_finite(out / "checkpoints" / "step-0000002")


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    from repae.rundir import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        result = cli("run", QUICKSTART, *SMALL, "trainer.steps=1", "--out", out, "--device", "cpu", code=2)
    assert f"{out} is in use by repae pid {os.getpid()}" in result.stderr and "pass another --out" in result.stderr
    cli("run", QUICKSTART, *SMALL, "trainer.steps=1", "--out", out, "--device", "cpu")  # free again


def test_out_never_writes_into_foreign_folders_or_files(tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "versions.json").write_text('{"mine": true}')
    (foreign / "metrics.jsonl").write_text("my own lines\n")
    result = cli("run", QUICKSTART, *SMALL, "trainer.steps=1", "--out", foreign, "--device", "cpu", code=2)
    assert "holds files that are not a repae run's (metrics.jsonl, versions.json)" in result.stderr
    assert (foreign / "versions.json").read_text() == '{"mine": true}'
    assert (foreign / "metrics.jsonl").read_text() == "my own lines\n"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    result = cli("run", QUICKSTART, *SMALL, "trainer.steps=1", "--out", a_file, "--device", "cpu", code=2)
    assert "is a file, not a folder" in result.stderr


def test_nothing_is_written_when_the_components_do_not_build(tmp_path):
    out = tmp_path / "run"
    cli("run", QUICKSTART, *SMALL, "trainer.steps=1", f"tokenizer.weights={tmp_path / 'missing.safetensors'}",
        "--out", out, "--device", "cpu", code=2)
    assert not out.exists()


def test_resumed_logs_drop_steps_past_the_checkpoint_and_elapsed_time_goes_on(tmp_path):
    out = tmp_path / "run"
    cli("run", QUICKSTART, *SMALL, "trainer.steps=4", "trainer.checkpoint_every=2", "--out", out, "--device", "cpu")
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for folder in list_checkpoints(out)[1:]:  # as if killed after logging steps 3, 4 but before checkpoint 4
        import shutil

        shutil.rmtree(folder)
    cli("run", QUICKSTART, *SMALL, "trainer.steps=4", "trainer.checkpoint_every=2", "--out", out, "--device", "cpu")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[2]["elapsed_s"] > first[1]["elapsed_s"]  # continues from the checkpoint's, not from 0


def test_a_file_system_without_flock_warns_and_trains(tmp_path, monkeypatch):
    import errno
    import fcntl

    from repae.rundir import run_lock

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="has no flock"), run_lock(tmp_path / "run"):
        pass


def test_plain_progress_lines_when_output_is_not_a_terminal(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "repae", "run", str(QUICKSTART), *SMALL, "trainer.steps=3",
                           "--out", str(tmp_path / "run"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("img/s" in line and "tokenizer/" in line for line in lines) and "ETA" in lines[0]


@pytest.mark.parametrize("override, message", [
    ("trainer.optimizers.default.lr=.nan", "trainer.optimizers.default.lr: must be a finite number"),
    ("trainer.optimizers.default.lr=.inf", "trainer.optimizers.default.lr: must be a finite number"),
    ("trainer.optimizers.default.lr=-1e-4", "lr: must be a finite number > 0"),
    ("trainer.optimizers.default.betas=[0.9, 1.0]", "betas: must be two numbers in [0, 1)"),
    ("trainer.optimizers.default.eps=0.0", "eps: must be a finite number > 0"),
    ("trainer.optimizers.default.weight_decay=-0.1", "weight_decay: must be a finite number >= 0"),
    ("trainer.clip_grad_norm=-1", "clip_grad_norm: must be a finite number > 0 or null"),
    ("trainer.clip_grad_norm=0", "clip_grad_norm: must be a finite number > 0 or null"),
    ("trainer.sample_count=0", "sample_count: must be >= 1"),
    ("trainer.num_workers=-1", "num_workers: must be >= 0"),
    ("trainer.optimizers.defualt={lr: 0.1}", "trainer.optimizers names ['defualt']"),
])
def test_values_that_cannot_train_are_refused_by_validate(override, message):
    result = cli("recipe", "validate", QUICKSTART, override, code=2)
    assert message in result.stderr, result.stderr


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_process_after_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to its workers: both agree on the step (a CPU all-reduce), write one checkpoint of
    it, and process 0 alone says so."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "repae",
           "run", str(QUICKSTART), *SMALL, "trainer.steps=2000", "trainer.checkpoint_every=2000", "--out", str(out),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_steps(out, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert stderr.count("stopped: by SIGTERM after step") == 1, stderr[-3000:]
    saved = latest_checkpoint(out)
    assert saved is not None and all_finite(saved) and "engine.py" not in stderr
    assert f"after step {int(saved.name.split('-')[1])} of 2000" in stderr


def test_a_resume_on_a_full_disk_writes_nothing_it_does_not_need(tmp_path, monkeypatch):
    """Rerunning a run whose recipe, versions and weights are unchanged rewrites none of them (the advice after a
    full disk is to rerun the same command); a write that is needed names the path."""
    import errno

    import repae.fileio as fileio

    out = tmp_path / "run"
    cli("run", QUICKSTART, *SMALL, "trainer.steps=2", "--out", out, "--device", "cpu")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(fileio, "atomic_path", full)
    import repae.rundir as rundir

    monkeypatch.setattr(rundir, "atomic_write", full)
    cli("run", QUICKSTART, *SMALL, "trainer.steps=2", "--out", out, "--device", "cpu")  # finished: nothing to write
    result = cli("run", QUICKSTART, *SMALL, "trainer.steps=3", "--out", out, "--device", "cpu", code=2)
    assert f"cannot write the run directory {out}" in result.stderr and "No space left on device" in result.stderr


def test_temporaries_that_are_not_repaes_are_neither_accepted_nor_deleted(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / ".notes.tmp-1").write_text("mine")
    result = cli("run", QUICKSTART, *SMALL, "trainer.steps=1", "--out", folder, "--device", "cpu", code=2)
    assert "holds files that are not a repae run's (.notes.tmp-1)" in result.stderr
    assert (folder / ".notes.tmp-1").read_text() == "mine"
    from repae.rundir import remove_stale_temporaries

    run = tmp_path / "run"
    (run / "checkpoints" / ".step-0000004.tmp-77").mkdir(parents=True)
    (run / ".recipe.yaml.tmp-78").write_text("x")
    (run / ".mine.tmp-79").write_text("y")
    assert sorted(p.name for p in remove_stale_temporaries(run)) == [".recipe.yaml.tmp-78", ".step-0000004.tmp-77"]
    assert (run / ".mine.tmp-79").is_file()


def test_weights_record_keeps_its_history_when_the_files_change(tmp_path):
    from types import SimpleNamespace

    from repae.weights import write_weights_record

    def built(sha):
        info = SimpleNamespace(path=str(tmp_path / "w.safetensors"), source="w.safetensors", sha256=sha, entry=None,
                               revision=None)
        return {"tokenizer": SimpleNamespace(loaded_weights={"weights": info})}

    write_weights_record(tmp_path, built("aa"))
    first = (tmp_path / "weights.json").read_text()
    write_weights_record(tmp_path, built("aa"))
    assert not (tmp_path / "weights.previous-1.json").exists()
    with pytest.warns(UserWarning, match=r"differ from the last start's \(tokenizer \(weights\)\)"):
        write_weights_record(tmp_path, built("bb"))
    assert (tmp_path / "weights.previous-1.json").read_text() == first
    assert json.loads((tmp_path / "weights.json").read_text())["files"][0]["sha256"] == "bb"


def test_skipped_unreadable_images_are_counted_in_the_metrics(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 36), (30 * i, 100, 200 if label == "a" else 0)).save(root / label / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cli("run", QUICKSTART, *SMALL, "trainer.steps=4",
        f"dataset={{name: image-folder, root: {root}, resolution: 32, on_unreadable: skip}}",
        "--out", tmp_path / "run", "--device", "cpu")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["data/skipped_images"] == 1  # 17 files, every one read in 4 steps of 8
