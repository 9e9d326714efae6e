"""``repae cache-latents``: encode a recipe's dataset once with its (frozen) tokenizer, for trainings that read latents.

Only the recipe's ``dataset`` and ``tokenizer`` are built, and used through their contracts only (any plugin's
tokenizer and image dataset can be cached). The cache stores the posterior mean and std of every image (see
:mod:`repae.latent_cache`); a recipe then trains from it with ``dataset: {name: latent-cache, root: OUT}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from repae.cli._choices import DEVICE_OPTION
from repae.cli._common import announce_output, load_host, pick_device, stdout, user_errors
from repae.cli.recipe import OVERRIDES_ARG, RECIPE_ARG
from repae.errors import UserError


def cache_latents(
    recipe: Path = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the cache to (created; never overwritten)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images encoded per forward pass."),
    device: str = DEVICE_OPTION,
    workers: int = typer.Option(0, "--workers", help="DataLoader processes reading and cropping images."),
) -> None:
    """Cache the latents of a recipe's dataset under its tokenizer (posterior mean and std, float32).

    Rerunning the same command after an interruption continues where it stopped; an existing different cache is
    never overwritten.
    """
    from repae.recipe import read_recipe

    console = stdout()
    with user_errors():
        if batch_size < 1 or workers < 0:
            raise UserError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; --out names a folder to create. Choose another --out.")
        host = load_host()
        resolved = read_recipe(recipe, overrides or [], host.registry)
        specs = {slot: resolved.get(slot) for slot in ("dataset", "tokenizer")}
        missing = [slot for slot, found in specs.items() if not found]
        if missing:
            raise UserError(f"{recipe} names no {' and no '.join(missing)}; caching latents needs both "
                            f"(e.g. `dataset: {{name: image-folder, root: data/imagenet/train}}` and a tokenizer)")
        dataset_spec, tokenizer_spec = specs["dataset"][0], specs["tokenizer"][0]
        if device == "meta":
            raise UserError("--device meta cannot encode images; use cpu or cuda")
        from repae.build import build_recipe
        from repae.config import config_to_dict
        from repae.latent_cache import describe_tokenizer, read_index, write_latent_cache

        device = pick_device(device)
        built = {b.slot: b.component for b in build_recipe(resolved, device=device, slots=("dataset", "tokenizer"),
                                                           progress="cache-latents")}
        dataset, tokenizer = built["dataset"], built["tokenizer"]
        tokenizer_info = describe_tokenizer(
            tokenizer,
            name=tokenizer_spec.name,
            config=config_to_dict(tokenizer_spec.config),
            plugin=tokenizer_spec.entry.plugin.label,
        )
        if not tokenizer_info["weights"]:
            console.print("[yellow]warning:[/] the tokenizer has random weights (its recipe section sets no "
                          "`weights`): the cache is only good for tests")
        announce_output(console, out, checking="that it is this very cache",
                        starting=f"Caching {len(dataset)} images of dataset {dataset_spec.name} with tokenizer "
                                 f"{tokenizer_spec.name} on {device} into {out}")
        path = write_latent_cache(
            dataset,
            tokenizer,
            out,
            batch_size=batch_size,
            device=device,
            tokenizer_info=tokenizer_info,
            dataset_info={"name": dataset_spec.name, **config_to_dict(dataset_spec.config)},
            num_workers=workers,
        )
        index = read_index(path)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        console.print(
            f"[green]done[/] {path}: {index['num_items']} latents of shape {index['latent_shape']} in "
            f"{len(index['shards'])} shard(s), {size / 2**20:.1f} MiB. Train from it with "
            f"`dataset: {{name: latent-cache, root: {path}}}`."
        )

