"""CPU threads on a shared machine: the quickstart's training speed idle and next to one competing CPU-bound process,
with repae's thread choice (repae/_threads.py) and with torch's own defaults, side by side in one run.

    python benchmarks/cpu_threads.py [--steps 60] [--rounds 3] [--cap-s 90] [--configs repae,torch] [--json]

Each measurement is one ``repae run recipes/quickstart.yaml trainer.steps=STEPS`` in a fresh process and a fresh
folder; its speed is the training steps per second between the first and the last logged step of ``metrics.jsonl``
(imports, building and the first steps excluded). "loaded" starts one busy-looping Python process before the run and
stops it after. Rounds interleave every (config, situation) pair. Configs:

- ``repae``: what ``repae`` does by default (``OMP_WAIT_POLICY=PASSIVE``, its thread count);
- ``torch``: ``REPAE_CPU_THREADS=torch``, torch's defaults (one thread per core, libgomp's spinning wait);
- ``N`` (a number): ``REPAE_CPU_THREADS=N`` (the passive wait policy, N threads);
- ``N-active``: N threads, ``OMP_WAIT_POLICY`` left to libgomp (``REPAE_CPU_THREADS=torch`` + ``OMP_NUM_THREADS=N``);
- ``N-spinK``: N threads, libgomp spinning ``GOMP_SPINCOUNT=K`` iterations before a waiting thread sleeps.

Run it on an otherwise quiet machine: the report states the 1-minute load average before and after. The figures
people quote: per config, loaded/idle (time ratio: 1.0 = unaffected by the competitor) and each config's idle speed
against ``torch``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SITUATIONS = ("idle", "loaded")


def config_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "REPAE_CPU_THREADS")}
    if name == "torch":
        env["REPAE_CPU_THREADS"] = "torch"
    elif name.endswith("-active"):
        env["REPAE_CPU_THREADS"] = "torch"
        env["OMP_NUM_THREADS"] = name.removesuffix("-active")
    elif "-spin" in name:  # N threads, libgomp spinning K iterations before it sleeps
        threads, spin = name.split("-spin")
        env.update(REPAE_CPU_THREADS="torch", OMP_NUM_THREADS=threads, GOMP_SPINCOUNT=spin)
    elif name != "repae":
        env["REPAE_CPU_THREADS"] = name
    return env


def measure(config: str, loaded: bool, steps: int, log_every: int, cap_s: float) -> float:
    """Steps per second of one quickstart run (between its first and last logged step). A run still going after
    ``cap_s`` seconds is stopped and measured on the steps it logged (fewer than two log lines: an upper bound)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
    try:
        with tempfile.TemporaryDirectory(prefix="repae-threads-") as tmp:
            out = Path(tmp) / "run"
            command = [sys.executable, "-m", "repae", "run", str(QUICKSTART), f"trainer.steps={steps}",
                       f"trainer.log_every={log_every}", f"trainer.checkpoint_every={steps}",
                       f"trainer.sample_every={steps * 10}", "--out", str(out), "--device", "cpu"]
            run = subprocess.Popen(command, env=config_env(config), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
            try:
                _, stderr = run.communicate(timeout=cap_s)
            except subprocess.TimeoutExpired:  # a collapsed config: stop it (SIGTERM: after the current step)
                run.terminate()
                try:
                    _, stderr = run.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    run.kill()
                    _, stderr = run.communicate()
            else:
                if run.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} failed ({run.returncode}):\n{stderr[-2000:]}")
            metrics = out / "metrics.jsonl"
            lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if len(lines) < 2:  # not two log lines within the cap: at most one logged step in cap_s
        return (lines[-1]["step"] if lines else 0.5 * log_every) / cap_s
    first, last = lines[0], lines[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cap-s", type=float, default=90.0, help="stop a run after this many seconds")
    parser.add_argument("--configs", default="repae,torch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    load_before = os.getloadavg()[0]
    speeds: dict[tuple[str, str], list[float]] = {(c, s): [] for c in configs for s in SITUATIONS}
    pairs = [(c, s) for c in configs for s in SITUATIONS]
    started = time.perf_counter()
    for r in range(args.rounds):
        order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]  # rotate: no pair always first
        for config, situation in order:
            speed = measure(config, situation == "loaded", args.steps, args.log_every, args.cap_s)
            speeds[(config, situation)].append(speed)
            print(f"round {r + 1}: {config:>10} {situation:>6}: {speed:.2f} steps/s", file=sys.stderr)
    median = {key: statistics.median(values) for key, values in speeds.items()}
    report = {
        "steps": args.steps, "rounds": args.rounds, "cores": os.cpu_count(),
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
        "steps_per_s": {f"{c}/{s}": {"median": round(median[(c, s)], 3), "min": round(min(speeds[(c, s)]), 3),
                                     "max": round(max(speeds[(c, s)]), 3)} for c, s in pairs},
        # time ratios: loaded time / idle time (1.0 = unaffected), idle time / torch's idle time
        "loaded_over_idle": {c: round(median[(c, "idle")] / median[(c, "loaded")], 2) for c in configs},
        "idle_vs_torch": ({c: round(median[("torch", "idle")] / median[(c, "idle")], 2) for c in configs}
                          if "torch" in configs else {}),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"quickstart, {args.steps} steps per run, {args.rounds} rounds, {report['cores']} cores; "
          f"1-min load average {report['load_average_before']} before, {report['load_average_after']} after")
    print(f"{'config':>10} {'idle steps/s':>13} {'loaded steps/s':>15} {'loaded/idle time':>17} "
          f"{'idle time vs torch':>19}")
    for c in configs:
        vs_torch = report["idle_vs_torch"].get(c, float("nan"))
        print(f"{c:>10} {median[(c, 'idle')]:>13.2f} {median[(c, 'loaded')]:>15.2f} "
              f"{report['loaded_over_idle'][c]:>16.2f}x {vs_torch:>18.2f}x")


if __name__ == "__main__":
    main()
