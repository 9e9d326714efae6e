"""Training-step time per phase and peak memory for a recipe, on whatever device is given, with random weights.

    python benchmarks/train_step.py recipes/repae_sdvae_dinov2.yaml --batch 32 --steps 6 [--compile] [overrides...]

Builds the recipe (weights replaced by random initialisation so that nothing is downloaded; the dataset replaced by
the synthetic one at the recipe's resolution), then runs full training steps through the engine and reports, per
phase (tokenizer / discriminator / denoiser objective + backward) and for the optimizer + EMA update, the median
milliseconds over the steps after a warm-up step, plus images/s and peak GPU memory. Compare runs made in the same
invocation or on the same machine only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from repae.build import build_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe
from repae.train.data import StepOrder

OFFLINE = ["tokenizer.weights=null", "tokenizer.latent_stats=null", "encoders.0.weights=random",
           "losses.lpips=null", "losses.gan.weights=null"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    registry = load_plugins().registry
    probe = read_recipe(args.recipe, [*OFFLINE, *args.overrides], registry)
    resolution = probe.get("denoiser")[0].config.resolution
    classes = probe.get("denoiser")[0].config.num_classes
    overrides = [*OFFLINE, f"dataset={{name: synthetic, resolution: {resolution}, num_classes: {classes}, "
                           f"size: {args.batch * 2}}}", f"trainer.batch_size={args.batch}",
                 f"trainer.compile={'true' if args.compile else 'false'}", *args.overrides]
    resolved = read_recipe(args.recipe, overrides, registry)
    built = {b.label: b.component for b in build_recipe(resolved, device=args.device)}
    trainer, dataset = built["trainer"], built["dataset"]
    trainer.setup()
    order = StepOrder(len(dataset), args.batch, 1, 1, 0, 0)
    cuda = torch.device(args.device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {}
    for step in range(args.steps):
        idx = order.global_batch(step).tolist()
        x = torch.stack([dataset[i][0] for i in idx])
        y = torch.tensor([dataset[i][1] for i in idx])
        inputs = trainer.make_inputs(step, 0, x, y, order)
        if step == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        mark = [time.perf_counter()]

        def lap(phase: str) -> None:
            sync()
            now = time.perf_counter()
            if step > 0:
                times.setdefault(phase, []).append(now - mark[0])
            mark[0] = now

        trainer.compute_gradients([inputs], step, on_phase_end=lap)
        trainer.apply_gradients()
        lap("optimizer + EMA")
    total = sum(statistics.median(v) for v in times.values())
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.recipe} on {name}, batch {args.batch}, precision {trainer._precision(trainer.device)}, "
          f"compile {args.compile}, torch {torch.__version__}")
    print("| phase | median ms | share |")
    print("|---|---|---|")
    for phase, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"| {phase} | {ms:.1f} | {ms / (total * 1e3):.0%} |")
    print(f"| step | {total * 1e3:.1f} | {args.batch / total:.0f} img/s, peak {peak:.1f} GiB |")


if __name__ == "__main__":
    main()
