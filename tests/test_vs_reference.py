"""benchmarks/vs_reference.py without a checkout of the official code: its usage errors are clear (exit code 2, no
traceback). The benchmark itself needs the reference checkout and is run by hand (see its docstring)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_reference.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_missing_reference_is_a_usage_error():
    result = _run("--reference", "/nonexistent/REPA-E")
    assert result.returncode == 2, result.stderr
    assert "error: --reference /nonexistent/REPA-E: no such folder" in result.stderr
    assert "End2End-Diffusion/REPA-E" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_folder_that_is_not_the_reference_names_what_is_missing(tmp_path):
    (tmp_path / "train_repae.py").write_text("")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sit.py").write_text("")
    result = _run("--reference", str(tmp_path), "--json")
    assert result.returncode == 2, result.stderr
    assert "is not a checkout of End2End-Diffusion/REPA-E" in result.stderr
    assert "models/autoencoder.py" in result.stderr and "loss/losses.py" in result.stderr
    assert "models/sit.py" not in result.stderr  # present files are not listed
    assert "Traceback" not in result.stderr + result.stdout


def test_arguments_are_checked():
    assert _run().returncode == 2  # --reference is required
    result = _run("--reference", "/nonexistent", "--rounds", "0")
    assert result.returncode == 2
    assert "--rounds must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr
