"""``repae bench``: time a recipe's training step phase by phase (see :mod:`repae.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from repae.cli._choices import DEVICE_OPTION
from repae.cli._common import load_host, pick_device, print_json, stdout, user_errors
from repae.cli.recipe import OVERRIDES_ARG, RECIPE_ARG
from repae.errors import UserError


def bench(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    steps: int = typer.Option(10, "--steps", help="Timed steps (medians are over these)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed steps first (compilation, allocator, caches)."),
    device: str = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (img_per_s, step_s, peak_mem_mb, "
                                 "phases, flops, mfu, ...) instead of the report."),
    weights: bool = typer.Option(False, "--weights/--random-weights", help="Load the recipe's pretrained weights "
                                 "(default: random initialisation, same shapes and speed, nothing downloaded)."),
    synthetic_data: bool = typer.Option(False, "--synthetic-data", help="Replace the recipe's image dataset by "
                                        "generated images of the same resolution and classes (no files read)."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count model FLOPs per step (on meta) and MFU."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="The device's dense peak TFLOP/s for "
                                                "MFU (default: known NVIDIA data-centre GPUs)."),
) -> None:
    """Time a recipe's steady-state training step: step time, images/s, peak memory, per-phase times (data, encoders,
    each trainable part's phase, optimizer + EMA), model FLOPs per step and, on a GPU, MFU. Nothing is written."""
    with user_errors():
        if steps < 1 or warmup < 0:
            raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise UserError(f"--peak-tflops must be > 0, got {peak_tflops}")
        from repae.recipe import read_recipe

        host = load_host()
        extra = list(overrides or [])
        resolved = read_recipe(recipe, extra, host.registry)  # recipe and override errors before torch is imported
        if not resolved.get("trainer"):
            raise UserError(f"{recipe} names no trainer; repae bench times a training step (add `trainer: "
                            "{name: default}`)")
        from repae.bench import bench_trainer, count_step_flops, format_result
        from repae.build import build_recipe
        from repae.compose import compose_recipe

        composition = compose_recipe(resolved)
        if synthetic_data:
            resolved = read_recipe(recipe, [*extra, _synthetic_dataset(composition)], host.registry)
            composition = compose_recipe(resolved)
        config = composition.trainer.config
        counted = count_step_flops(composition.trainer, config.batch_size, config.grad_accum) if flops else None
        built = {b.slot: b.component for b in build_recipe(composition.recipe, device=pick_device(device),
                                                               load_weights=weights, progress="bench")}
        result = bench_trainer(built["trainer"], steps=steps, warmup=warmup, flops=counted, peak_tflops=peak_tflops)
    setting = {"weights": "recipe" if weights else "random", "data": "synthetic" if synthetic_data else "recipe"}
    if as_json:
        print_json({"recipe": str(recipe), "overrides": extra, **setting, **result.to_json()})
    else:
        flags = [*extra, *(["--weights"] if weights else []), *(["--synthetic-data"] if synthetic_data else [])]
        title = f"repae bench {recipe} {' '.join(flags)}".rstrip() + \
            f"  ({setting['weights']} weights, {setting['data']} data)"
        stdout().out(format_result(result, title), highlight=False)


def _synthetic_dataset(composition) -> str:
    """The override that replaces an image dataset by ``synthetic`` images of the same resolution and classes."""
    dataset = next(b.component for b in composition.built if b.slot == "dataset")
    if getattr(dataset, "kind", "images") != "images":
        raise UserError("--synthetic-data replaces an image dataset; this recipe trains from cached latents "
                        "(drop the flag and point the recipe at an existing latent cache)")
    denoiser = next((b.component for b in composition.built if b.slot == "denoiser"), None)
    classes = int(getattr(denoiser, "num_classes", 0) or getattr(dataset, "num_classes", 0) or 1)
    batch = composition.trainer.config.batch_size
    return (f"dataset={{name: synthetic, resolution: {int(dataset.resolution)}, num_classes: {classes}, "
            f"num_images: {max(2 * batch, 64)}}}")
