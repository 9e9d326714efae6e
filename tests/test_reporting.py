"""The progress line of every long task (repae.reporting) at 80, 100 and 200 columns: in a terminal it keeps step k/N,
the speed and the ETA and drops the loss terms first; plain lines (a log file, a pipe) keep everything, most
important first."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest
from rich.cells import cell_len

from repae.reporting import progress, render_line

LOSSES = ["tokenizer/repa_tokenizer=-0.216", "tokenizer/reconstruction=0.1234", "tokenizer/kl=1.25e+04",
          "denoiser/diffusion=1.234", "denoiser/repa=-0.5871"]
TEXT = "  ".join(["12.4 img/s", *LOSSES])
"""What the engine passes every log_every steps: img/s first, then the loss terms."""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _last_frame(raw: str) -> str:
    """The line a terminal shows last: the text after the last carriage return, without escape codes."""
    return _ANSI.sub("", raw).rstrip("\n").split("\r")[-1].split("\n")[-1]


def _train_line(width: int) -> str:
    return render_line(width, description="train", completed=25, total=300, rate=0.031, unit="it",
                       elapsed=806.0, eta=8870.0, text=TEXT).plain


@pytest.mark.parametrize("width", [80, 100, 200])
def test_progress_line_keeps_step_speed_and_eta(width):
    line = _train_line(width)
    assert cell_len(line) <= width, line
    assert "train" in line and "25/300" in line and "ETA 2:27:50" in line and "12.4 img/s" in line, line
    assert "…" not in line  # nothing cut: whole terms dropped
    shown = [term for term in LOSSES if term in line]
    assert shown == LOSSES[: len(shown)]  # the loss terms go from the last one
    if shown:  # a loss term only while everything else is shown
        assert "━" in line and "0:13:26" in line and "0.031 it/s" in line, line


def test_progress_line_drops_loss_terms_first_then_shortens():
    assert all(term in _train_line(200) for term in LOSSES[:4])
    assert not any(term in _train_line(80) for term in LOSSES)
    assert "━" in _train_line(80)  # the bar stays at 80 columns once the loss terms are gone
    narrow = _train_line(40)
    assert cell_len(narrow) <= 40 and "25/300" in narrow and "ETA 2:27:50" in narrow and "12.4 img/s" in narrow
    assert "━" not in narrow and "0:13:26" not in narrow  # bar and elapsed went before the essentials
    long = render_line(50, description="Inception features: reference images", completed=1200, total=50000,
                       rate=35.2, unit="img", eta=1386.0).plain
    assert cell_len(long) <= 50 and "1200/50000" in long and "35.2 img/s" in long and "ETA 0:23:06" in long
    assert long.startswith("Incep") and "…" in long  # the description is shortened, not the numbers


def test_progress_line_is_one_line_whatever_the_text():
    line = render_line(80, description="eval\nsamples", completed=1, total=2, text="a=1\nb=2  c=3")
    assert "\n" not in line.plain and "eval samples" in line.plain and "a=1 b=2  c=3" in line.plain


def test_progress_line_unknown_total_and_finished():
    line = render_line(80, description="analyze", completed=3, total=None, rate=1.5, unit="step", elapsed=2.0).plain
    assert "analyze" in line and " 3 " in line and "1.5 step/s" in line and "ETA" not in line
    done = render_line(80, description="sample", completed=10, total=10, rate=2.0, unit="img", elapsed=5.0).plain
    assert "10/10" in done and "ETA 0:00:00" in done


@pytest.mark.parametrize("width", [80, 100, 200])
def test_terminal_progress_at_width(monkeypatch, width):
    """The whole path: stderr a terminal of ``width`` columns (COLUMNS, as a shell sets it)."""
    for name in ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", str(width))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress("train", 300, unit="it") as bar:
        time.sleep(0.05)
        bar.update(25, text=TEXT)
    frame = _last_frame(terminal.getvalue())
    assert cell_len(frame) <= width, frame
    assert "25/300" in frame and "ETA " in frame and "12.4 img/s" in frame, frame
    assert ("tokenizer/repa_tokenizer=-0.216" in frame) == (width >= 100), frame


@pytest.mark.parametrize("width", [80, 100, 200])
def test_plain_progress_lines_keep_everything_most_important_first(monkeypatch, width):
    """Not a terminal: one plain line per update with a text, never cut, whatever the width; what matters most comes
    first, so an 80-column viewer's first row holds step k/N, the ETA and img/s."""
    monkeypatch.setenv("COLUMNS", str(width))
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress("train", 300, completed=0, unit="it") as bar:
        time.sleep(0.01)
        bar.update(25, text=TEXT)
    line = log.getvalue().splitlines()[0]
    assert all(term in line for term in LOSSES), line
    first_row = line[:80]
    assert first_row.startswith("train 25/300 (8%)") and "ETA " in first_row and "12.4 img/s" in first_row, line


def test_disabled_progress_prints_nothing(monkeypatch):
    log = _Terminal()
    monkeypatch.setattr(sys, "stderr", log)
    with progress("train", 300, enabled=False) as bar:
        bar.update(25, text=TEXT)
    assert log.getvalue() == ""


@pytest.mark.parametrize("width", [80, 100, 200])
def test_bench_report_fits_the_width(width):
    from repae.bench import BenchResult, format_result

    result = BenchResult(device="NVIDIA H200 NVL", precision="bf16", batch_size=256, grad_accum=4, steps=50, warmup=10,
                         step_s=0.8123, step_s_min=0.8, step_s_max=0.9, img_per_s=315.2, peak_mem_mb=70123.0,
                         peak_mem_kind="cuda max allocated",
                         phases={"data": 0.01, "encoders": 0.05, "tokenizer": 0.3, "optimizer + EMA": 0.02},
                         flops=4.2e15, tflops_per_s=5170.0, peak_tflops=989.0, mfu=0.52, graphs_compiled_timed=0)
    title = ("repae bench recipes/repae_sdvae_dinov2.yaml trainer.batch_size=256 trainer.grad_accum=4 "
             "--synthetic-data  (random weights, synthetic data)")
    text = format_result(result, title, width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, text
    assert " ".join(text.split()) == " ".join(format_result(result, title, width=10_000).split())  # only wrapped
    assert lines[0].startswith("repae bench recipes/repae_sdvae_dinov2.yaml")
    assert all(line.startswith("  ") for line in lines[1:])  # continuations indented under their line


def test_a_quiet_stage_leaves_nothing_in_a_log_unless_it_is_slow(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress("quick", 3, unit="component", quiet_s=5.0) as bar:
        for name in "abc":
            bar.advance(1, text=name)
    assert log.getvalue() == ""
    with progress("slow", 3, unit="component", quiet_s=0.5) as bar:
        bar.advance(1, text="a")
        time.sleep(0.6)
        bar.advance(1, text="b")
        bar.advance(1, text="c")
    assert [line.split()[:3] for line in log.getvalue().splitlines()] == [["slow", "2/3", "(67%)"],
                                                                         ["slow", "3/3", "(100%)"]]


def test_building_a_recipe_counts_its_components(monkeypatch, registry):
    """cache-latents, bench and run name the component being built (a hub download or a large checkpoint can take
    minutes) in plain lines, also in a terminal (a download draws its own bar); after 5 s, here at once."""
    import repae.reporting
    from repae.build import build_recipe
    from repae.recipe import read_recipe

    from conftest import ROOT

    real = repae.reporting.progress
    monkeypatch.setattr(repae.reporting, "progress", lambda *a, **k: real(*a, **{**k, "quiet_s": 0.0}))
    log = _Terminal()
    monkeypatch.setattr(sys, "stderr", log)
    resolved = read_recipe(ROOT / "recipes" / "quickstart.yaml", ["dataset.num_images=8"], registry)
    build_recipe(resolved, slots=("dataset", "tokenizer"), progress="cache-latents")
    lines = log.getvalue().splitlines()
    # a terminal (_Terminal) gets plain lines, no live bar
    assert len(lines) == 3 and all(line.startswith("cache-latents: build the components ") for line in lines), lines
    assert "0/2 (0%)" in lines[0] and lines[0].endswith("building dataset"), lines
    assert "1/2 (50%)" in lines[1] and lines[1].endswith("building tokenizer"), lines
    assert "2/2 (100%)" in lines[2] and "building" not in lines[2], lines
    log.truncate(0)
    build_recipe(resolved, slots=("dataset",))
    assert log.getvalue() == ""
