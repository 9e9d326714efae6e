"""Loader throughput: `image-folder` (decode and ADM-crop a JPEG on every access) against `image-shards` (copy out of
memory-mapped shards written once by `repae prepare-data`), same items, same DataLoader settings.

    OMP_NUM_THREADS=1 python benchmarks/data_loader.py [--root IMAGE_FOLDER] [--num-images 384] [--resolution 256]
                                                       [--workers 0,1,2] [--batch-size 32] [--repeat 5] [--json]

Without ``--root`` it writes ``--num-images`` random-texture JPEGs of ImageNet's typical size (500x375, quality 90,
``.JPEG``) in 8 class folders to a temporary folder; the shards are prepared from the folder into a temporary folder
(``--keep DIR`` keeps both). For each worker count both datasets get a DataLoader with the same settings (batch size,
a seeded shuffle as in training, persistent workers), one warm-up epoch, then ``--repeat`` timed epochs, the two
datasets interleaved (A/B) so that load from other processes on the machine hits both alike. Reported: the median
images/s over the repeats, images/s per CPU core doing the work (the main process with 0 workers, else the
workers), and the ratio shards / folder. The shards are read from the page cache here (they were just written);
a set larger than memory is bound by the disk instead (196 KiB per 256 px image).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_jpegs(root: Path, num_images: int, num_classes: int = 8, size: tuple[int, int] = (500, 375)) -> None:
    """``num_images`` JPEGs of ``size`` (W, H) with smooth random texture plus noise (compresses like a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    for i in range(num_images):
        folder = root / f"n{i % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:06d}.JPEG", quality=90)


def epoch_seconds(loader, epoch: int) -> float:
    loader.sampler.generator.manual_seed(epoch)  # the same shuffled order for both datasets in an epoch
    start = time.perf_counter()
    count = 0
    for images, _ in loader:
        count += len(images)
    seconds = time.perf_counter() - start
    assert count == len(loader.dataset)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an image folder root/<class>/<image> (default: generated JPEGs)")
    parser.add_argument("--num-images", type=int, default=384, help="images to generate without --root")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5, help="timed epochs per dataset and worker count")
    parser.add_argument("--keep", type=Path, help="write the generated folder and the shards here and keep them")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    import torch
    from torch.utils.data import DataLoader, RandomSampler

    import repae
    from repae.image_shards import write_image_shards

    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="repae-bench-data-") as scratch:
        base = args.keep or Path(scratch)
        root = args.root
        if root is None:
            root = base / "jpegs"
            if not root.exists():
                write_jpegs(root, args.num_images)
        folder = repae.create("dataset", "image-folder", root=str(root), resolution=args.resolution)
        out = base / f"shards-{args.resolution}"
        started = time.perf_counter()
        write_image_shards(folder, out, num_workers=max(workers), show_progress=False, source=str(root),
                           dataset_info={"name": "image-folder", "root": str(root), "resolution": args.resolution})
        prepare_s = time.perf_counter() - started
        shards = repae.create("dataset", "image-shards", root=str(out))
        datasets = {"image-folder": folder, "image-shards": shards}

        rows = []
        for w in workers:
            loaders = {
                name: DataLoader(ds, batch_size=args.batch_size, num_workers=w, persistent_workers=w > 0,
                                 sampler=RandomSampler(ds, generator=torch.Generator()))
                for name, ds in datasets.items()
            }
            for loader in loaders.values():
                epoch_seconds(loader, 0)  # warm-up: worker start, page cache
            times: dict[str, list[float]] = {name: [] for name in loaders}
            for r in range(args.repeat):
                for name, loader in loaders.items():
                    times[name].append(epoch_seconds(loader, r + 1))
            del loaders
            cores = max(1, w)
            row: dict[str, Any] = {"workers": w, "cores": cores}
            for name, seconds in times.items():
                n = len(datasets[name])
                rates = [n / s for s in seconds]
                median = statistics.median(rates)
                row[name] = {"img_per_s": median, "img_per_s_per_core": median / cores, "min": min(rates),
                             "max": max(rates)}
            row["ratio"] = row["image-shards"]["img_per_s"] / row["image-folder"]["img_per_s"]
            rows.append(row)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "images": len(folder), "source": "generated 500x375 JPEGs (q90)" if args.root is None else str(args.root),
        "resolution": args.resolution, "batch_size": args.batch_size, "repeat": args.repeat,
        "prepare_s": prepare_s, "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['images']} images ({result['source']}) -> {args.resolution} px, batch {args.batch_size}, median of "
          f"{args.repeat} epochs; {result['machine']}; OMP_NUM_THREADS={result['omp_num_threads']}; prepare-data "
          f"took {prepare_s:.1f} s")
    print("| workers | image-folder img/s | per core | image-shards img/s | per core | shards / folder |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        a, b = row["image-folder"], row["image-shards"]
        print(f"| {row['workers']} | {a['img_per_s']:.0f} | {a['img_per_s_per_core']:.0f} | "
              f"{b['img_per_s']:.0f} | {b['img_per_s_per_core']:.0f} | {row['ratio']:.1f}x |")


if __name__ == "__main__":
    main()
