"""Wall time of `repae list` (and friends) against baselines measured in the same run.

    python benchmarks/cli_latency.py [--repeat 7]

Baselines: the bare interpreter (`python -c pass`) and `python -c "import torch"` (what listing must avoid). Reports
median wall seconds and the ratio to `import torch`. Numbers come from this machine; run it where you want to know.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str], repeat: int) -> list[float]:
    env = {**os.environ, "REPAE_PLUGINS": os.environ.get("REPAE_PLUGINS", "repae")}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.decode()[-500:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    repae = shutil.which("repae") or str(Path(sys.executable).with_name("repae"))
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "repae --version": [repae, "--version"],
        "repae list": [repae, "list"],
        "repae list --json": [repae, "list", "--json"],
        "repae show sit": [repae, "show", "sit"],
    }
    wall(cases["repae list"], 1)  # warm the file-system cache
    results = {name: statistics.median(wall(cmd, args.repeat)) for name, cmd in cases.items()}
    torch_time = results["python -c 'import torch'"]
    print(f"| command | median wall s (n={args.repeat}) | ratio to `import torch` |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {seconds / torch_time:.2f} |")


if __name__ == "__main__":
    main()
