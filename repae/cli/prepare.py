"""``repae prepare-data``: decode and centre-crop an image folder once, into uint8 shards read through memory maps.

The source dataset is built through the registry by its registered name (``--dataset``, default ``image-folder``)
with ``root`` and ``resolution`` set, and used through its contract only (:class:`repae.Dataset` of kind
``"images"``), so any plugin's folder dataset can be sharded. The format, the writer and the reader are repae's own
(:mod:`repae.image_shards`); a recipe then trains from the result with ``dataset: {name: image-shards, root: OUT}``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from repae.cli._choices import check_component, choice, component_names
from repae.cli._common import announce_output, load_host, stdout, user_errors
from repae.errors import UserError

DEFAULT_SHARD_SIZE = 1024  # repae.image_shards.DEFAULT_SHARD_SIZE (not imported here: the CLI starts without numpy)


def _check_arguments(root: Path, out: Path, resolution: int, workers: int, shard_size: int, batch_size: int) -> None:
    """Reject mistakes before anything heavy is imported or built."""
    numbers = [("--resolution", resolution, 1), ("--workers", workers, 0), ("--shard-size", shard_size, 1),
               ("--batch-size", batch_size, 1)]
    for flag, value, least in numbers:
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    layout = "ROOT is a folder with one sub-folder per class holding its images (root/<class>/<image>, as ImageNet's " \
             "train/)"
    if not root.exists():
        raise UserError(f"the image folder {root} does not exist; {layout}")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder; {layout}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --out names a folder to create. Choose another --out.")
    if out.resolve() == root.resolve():
        raise UserError(f"--out {out} is the image folder itself; choose a new folder, e.g. {root}-shards")


def prepare_data(
    root: Path = typer.Argument(..., help="Image folder root/<class>/<image> (e.g. ImageNet's train/).",
                                show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the shards to (created; never overwritten)."),
    resolution: int = typer.Option(256, "--resolution", "-r", help="Side of the centre crop, in pixels."),
    dataset: str = typer.Option("image-folder", "--dataset", metavar="NAME", autocompletion=component_names("dataset"),
                                help="Registered image dataset that reads ROOT (`repae list dataset`)."),
    workers: int = typer.Option(0, "--workers", help="DataLoader processes decoding and cropping images."),
    shard_size: int = typer.Option(DEFAULT_SHARD_SIZE, "--shard-size", help="Images per shard file."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per DataLoader batch."),
    verify: bool = typer.Option(False, "--verify", help="Afterwards re-read every shard against its sha256 (also "
                                "when OUT was already complete)."),
    on_unreadable: str = typer.Option("error", "--on-unreadable", help="An image file that cannot be decoded: "
                                      "error stops naming it; skip warns and uses the next readable image.",
                                      **choice(("error", "skip"))),
    scan: bool = typer.Option(False, "--scan", help="Decode every image first and report all unreadable ones at "
                              "once, before anything is written."),
) -> None:
    """Decode and centre-crop an image folder once into uint8 shards (train with dataset image-shards).

    Rerunning the same command after an interruption verifies the finished shards and continues; an existing
    different output is never overwritten.
    """
    console = stdout()
    console.soft_wrap = True  # paths and the recipe line stay whole (copy-pasteable)
    with user_errors():
        _check_arguments(root, out, resolution, workers, shard_size, batch_size)
        host = load_host()
        check_component(host.registry, "dataset", dataset, "--dataset")
        import dataclasses

        from repae.build import BuildContext, build_component
        from repae.config import config_to_dict
        from repae.errors import Problem, RecipeError
        from repae.image_shards import ImageShards, write_image_shards

        entry = host.registry.get("dataset", dataset)
        fields = {f.name for f in dataclasses.fields(entry.config)}
        if "root" not in fields:
            raise UserError(f"dataset '{dataset}' has no `root` field: prepare-data shards a dataset read from a "
                            "folder (e.g. --dataset image-folder)")
        source = str(root.expanduser().resolve())
        section: dict[str, object] = {"root": source}
        if "resolution" in fields:
            section["resolution"] = resolution
        for flag, key, value, default in (("--on-unreadable", "on_unreadable", on_unreadable, "error"),
                                          ("--scan", "scan", scan, False)):
            if key in fields:
                section[key] = value
            elif value != default:
                raise UserError(f"dataset '{dataset}' has no `{key}` field, so {flag} cannot be applied to it")
        config, issues = entry.parse(section)
        if issues:
            raise RecipeError([Problem("repae prepare-data", i.path, i.message, i.hint) for i in issues],
                              title=f"invalid settings for dataset '{dataset}'")
        images = build_component(entry, config, BuildContext(device="cpu", load_weights=False), label="dataset",
                                 explicit=entry.explicit_fields(section))
        if int(getattr(images, "resolution", resolution)) != resolution:
            raise UserError(f"dataset '{dataset}' gives images of {images.resolution} px, not --resolution "
                            f"{resolution}: it has no `resolution` field; pass --resolution {images.resolution}")

        def resuming(partial: Path) -> str:
            finished = len(list(partial.glob("shard-*.json")))
            return f"Resuming into {partial}: {finished} finished shard(s) to verify (sha256), then the rest"

        announce_output(console, out, checking="that it holds these very shards", resuming=resuming,
                        starting=f"Preparing {len(images)} images of {root} ({dataset}, {resolution} px) into {out} "
                                 f"with {workers} worker(s)")
        path = write_image_shards(
            images,
            out,
            shard_size=shard_size,
            batch_size=batch_size,
            num_workers=workers,
            source=source,
            dataset_info={"name": dataset, **{k: v for k, v in config_to_dict(config).items() if k != "scan"}},
        )
        from rich.markup import escape

        skipped = list(getattr(images, "skipped", []))
        if skipped:
            console.print(f"[yellow]{len(skipped)} unreadable image(s) replaced by the next readable one:[/] "
                          + escape(", ".join(skipped[:20])) + (f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""))
        shards = ImageShards(path)
        if verify:
            shards.verify(show_progress=True)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        console.print(
            f"[green]done[/] {path}: {len(shards)} images of {shards.resolution} px, {shards.num_classes} classes, in "
            f"{len(shards.manifest['shards'])} shard(s), {size / 2**30:.2f} GiB"
            + (", every sha256 verified" if verify else "")
            + f". Train from it with `dataset: {{name: image-shards, root: {path}}}`."
        )
