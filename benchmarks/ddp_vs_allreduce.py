"""Data-parallel step time: torch's DistributedDataParallel (repae's engine) against the hand-rolled reduction it
replaced (flattened all-reduces of every gradient after the last backward pass), same processes, same run.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/ddp_vs_allreduce.py [RECIPE] [overrides...] [--rounds 7] [--warmup 2] [--json]

Both trainers are built from the same recipe (random weights, the recipe's own dataset; default: the quickstart) in
every process. Rounds alternate A/B (one step of each per round, after warm-up steps of each), with a barrier and a
process-0 clock around each step; the report gives medians, min/max and the ratio DDP / hand-rolled (< 1: DDP is
faster). The baseline is kept here, not in the package: repae has one data-parallel mechanism.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from repae.build import build_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe
from repae.train import distributed
from repae.train.data import StepOrder

ROOT = Path(__file__).resolve().parents[1]
BUCKET_BYTES = 64 * 2**20


def all_reduce_mean_(tensors: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """The replaced mechanism: average tensors over processes in place, flattened buckets per dtype/device."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    world = dist.get_world_size()
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                _reduce(bucket, world)
                bucket, size = [], 0
        if bucket:
            _reduce(bucket, world)


def _reduce(bucket: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in bucket:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def build_trainer(recipe: str, overrides: list[str], hand_rolled: bool):
    resolved = read_recipe(recipe, overrides, load_plugins().registry)
    built = {b.slot: b.component for b in build_recipe(resolved, device="cpu", load_weights=False)}
    trainer = built["trainer"]
    trainer.setup()
    if hand_rolled:
        trainer.replicas = {}  # no DDP: plain modules, gradients reduced after the backward passes

        apply = trainer.apply_gradients

        def apply_after_reduce():
            for module in trainer.parts.values():
                all_reduce_mean_([p.grad for p in module.parameters() if p.grad is not None])
            return apply()

        trainer.apply_gradients = apply_after_reduce
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    topology = distributed.init("cpu")
    if topology.world_size < 2:
        sys.exit("start it with torchrun --nproc-per-node 2 (or more): it compares data-parallel mechanisms")
    overrides = ["trainer.num_workers=0", *args.overrides]
    trainers = {"ddp": build_trainer(args.recipe, overrides, False),
                "hand-rolled": build_trainer(args.recipe, overrides, True)}
    config = trainers["ddp"].config
    dataset = trainers["ddp"].dataset
    order = StepOrder(len(dataset), config.batch_size, config.grad_accum, topology.world_size, topology.rank, 0)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    step = 0
    for round_ in range(args.warmup + args.rounds):
        for name, trainer in (trainers.items() if round_ % 2 == 0 else reversed(trainers.items())):
            micro = []
            for m, indices in enumerate(order.local_batches(step, step + 1)):
                x = torch.stack([dataset[i][0] for i in indices])
                y = torch.tensor([dataset[i][1] for i in indices])
                micro.append(trainer.make_inputs(step, m, x, y, order))
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(micro, step)
            dist.barrier()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
        step += 1
    if topology.is_main:
        med = {name: statistics.median(values) for name, values in times.items()}
        result = {"processes": topology.world_size, "batch_size": config.batch_size, "rounds": args.rounds,
                  **{f"{name}_step_s": med[name] for name in med},
                  **{f"{name}_min_s": min(times[name]) for name in times},
                  **{f"{name}_max_s": max(times[name]) for name in times},
                  "ratio": med["ddp"] / med["hand-rolled"]}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{args.recipe} {' '.join(overrides)}: {topology.world_size} gloo processes, global batch "
                  f"{config.batch_size}, {args.rounds} rounds A/B after {args.warmup} warm-up")
            for name in times:
                print(f"  {name:<12} median {1e3 * med[name]:8.1f} ms  (min {1e3 * min(times[name]):.1f}, "
                      f"max {1e3 * max(times[name]):.1f})")
            print(f"  ratio ddp / hand-rolled: {result['ratio']:.3f}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
