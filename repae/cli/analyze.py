"""``repae analyze``: the paper's latent diagnostics of a trained run on a batch of images (see docs/analysis.md).

Writes ``analysis.json`` (spatial variance and total variation of the latents, CKNNA between the denoiser's hidden
tokens and the encoder's tokens, PSNR of reconstructions, rFID when the evaluation package can compute it) and two
pictures: ``latent_pca.png`` (inputs over the latents' first three principal components as RGB) and
``reconstructions.png`` (inputs over reconstructions).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer

from repae.cli._common import plain_table, stdout, user_errors
from repae.errors import UserError

RUN_ARG = typer.Argument(
    ..., help="Run directory (its latest checkpoint) or one checkpoint folder.", metavar="RUN_OR_CHECKPOINT",
    show_default=False,
)


def analyze(
    run_path: Path = RUN_ARG,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN/analysis/step-NNNNNNN); files in it are replaced."
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Folder of images to analyse instead of the run's dataset (centre-cropped)."
    ),
    num_images: int = typer.Option(256, "--num-images", "-n", help="Images analysed (evenly spread over the set)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Images per forward pass."),
    t: float = typer.Option(0.5, "--t", help="Diffusion time of the CKNNA features (1 = noise)."),
    k: int = typer.Option(10, "--k", help="Nearest neighbours of CKNNA (capped at images - 1)."),
    depth: Optional[int] = typer.Option(
        None, "--depth", help="Denoiser block whose tokens CKNNA uses (default: the recipe's REPA depth)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the diffusion noise of the CKNNA features."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA denoiser and latent normaliser (default)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu, cuda, cuda:N."),
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights", help="Inception weights for the rFID (default: as `repae eval` finds them, "
        "never downloaded here); without them rfid is null."
    ),
) -> None:
    """Latent diagnostics of a run: spatial variance, total variation, CKNNA, PSNR (rFID), PCA picture."""
    console = stdout()
    with user_errors():
        if num_images < 1 or batch_size < 1 or k < 1:
            raise UserError(f"--num-images, --batch-size and --k must be >= 1, got {num_images}, {batch_size}, {k}")
        if not 0.0 <= t <= 1.0:
            raise UserError(f"--t must lie in [0, 1] (1 = noise), got {t}")
        result = run_analysis(run_path, out=out, images_dir=images, num_images=num_images, batch_size=batch_size,
                              t=t, k=k, depth=depth, seed=seed, use_ema=ema, device=device,
                              inception_weights=inception_weights)
        table = plain_table(title=f"analysis of step {result['step']} ({result['num_images']} images)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("spatial_variance", "total_variation", "cknna", "psnr", "rfid"):
            value = result[key]
            table.add_row(key, "-" if value is None else f"{value:.4g}")
        console.print(table)
        for key in ("cknna", "rfid"):
            if result[key] is None and result.get(f"{key}_reason"):
                reason = result[f"{key}_reason"].split(". ")[0]
                console.print(f"[dim]{key} not computed: {reason} (see {key}_reason in analysis.json)[/]",
                              markup=True, highlight=False)
        console.print(f"wrote {result['files']['analysis']} and its pictures")


def run_analysis(
    run_path: Path,
    *,
    out: Path | None = None,
    images_dir: Path | None = None,
    num_images: int = 256,
    batch_size: int = 32,
    t: float = 0.5,
    k: int = 10,
    depth: int | None = None,
    seed: int = 0,
    use_ema: bool = True,
    device: str = "auto",
    inception_weights: str | None = None,
) -> dict[str, Any]:
    """Analyse a run's checkpoint and write ``analysis.json`` and the pictures into ``out``; returns the JSON."""
    from repae.analysis import analyze_batch
    from repae.cli._common import pick_device
    from repae.runs import open_run

    device = pick_device(device)
    slots = ("tokenizer", "encoders", "latent_norm", "denoiser") + (() if images_dir else ("dataset",))
    run = open_run(run_path, device=device, use_ema=use_ema, slots=slots)
    if run.tokenizer is None:
        raise UserError(f"{run.run_dir}: the recipe has no tokenizer; `repae analyze` measures a tokenizer's latents")
    pixels, labels, source, label_source = _load_images(run, images_dir, num_images)
    repa_depth = depth if depth is not None else _repa_depth(run)
    transport = _transport(run)
    encoders = {spec.label: run.components[spec.label] for spec in run.recipe.get("encoders")
                if run.components.get(spec.label) is not None}
    analysis = analyze_batch(
        tokenizer=run.tokenizer, images=pixels, labels=labels, denoiser=run.denoiser, normalizer=run.normalizer,
        transport=transport, encoders=encoders, depth=repa_depth, t=t, k=k, seed=seed, batch_size=batch_size,
        device=device,
    )
    metrics = analysis.metrics
    rfid, rfid_reason = _rfid(pixels, analysis.reconstructions, device, inception_weights)
    out = Path(out) if out is not None else run.run_dir / "analysis" / run.checkpoint.name
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / f"{name}.png") for name in analysis.pictures}
    for name, picture in analysis.pictures.items():
        _save_png(picture, out / f"{name}.png")
    files["analysis"] = str(out / "analysis.json")
    result: dict[str, Any] = {
        "step": run.step,
        "checkpoint": str(run.checkpoint),
        "run": str(run.run_dir),
        "num_images": int(pixels.shape[0]),
        "spatial_variance": metrics["spatial_variance"],
        "spatial_variance_per_channel": metrics["spatial_variance_per_channel"],
        "total_variation": metrics["total_variation"],
        "total_variation_per_channel": metrics["total_variation_per_channel"],
        "cknna": metrics["cknna"],
        "cknna_per_encoder": metrics["cknna_per_encoder"],
        "cknna_reason": None if metrics["cknna"] is not None else _cknna_reason(run, encoders, repa_depth, pixels),
        "psnr": metrics["psnr"],
        "rfid": rfid,
        "rfid_reason": rfid_reason,
        "latent_shape": metrics["latent_shape"],
        "settings": {
            "images": source,
            "labels": label_source,
            "latents": "tokenizer posterior mean, un-normalised",
            "reconstruction": "decode(posterior mean), quantised to uint8",
            "cknna_features": "denoiser hidden tokens after block `depth`, mean-pooled per image, vs the encoder's "
                              "tokens mean-pooled per image; cosine kernels",
            "t": t,
            "k": min(k, max(int(pixels.shape[0]) - 1, 1)),
            "depth": repa_depth,
            "seed": seed,
            "ema": use_ema,
            "batch_size": batch_size,
            "device": device,
        },
        "files": files,
    }
    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _load_images(run: Any, images_dir: Path | None, num_images: int) -> tuple[Any, Any, str, str]:
    """``(uint8 [N, 3, H, W], labels [N], source, label source)`` from ``--images`` or the run's image dataset;
    ``num_images`` items evenly spread over the set (all of them when it holds fewer)."""
    import numpy as np
    import torch

    null_label = int(getattr(run.denoiser, "num_classes", 0) or 0) if run.denoiser is not None else 0
    if not getattr(run.denoiser, "class_dropout_prob", 0):
        null_label = 0  # no null row in the label table: class 0
    if images_dir is not None:
        files = _image_files(images_dir)
        picks = _spread(len(files), num_images)
        resolution = _resolution(run)
        pixels = torch.stack([_read_image(files[i], resolution) for i in picks])
        labels = torch.full((len(picks),), null_label, dtype=torch.long)
        return pixels, labels, str(images_dir), "null class" if null_label else "class 0"
    dataset = run.dataset
    if dataset is None or getattr(dataset, "kind", "images") != "images":
        kind = getattr(dataset, "kind", None)
        raise UserError(f"the run's dataset gives {kind!r} items, not images; pass --images DIR (a folder of images)")
    if len(dataset) == 0:
        raise UserError("the run's dataset is empty; pass --images DIR (a folder of images)")
    items = [dataset[i] for i in _spread(len(dataset), num_images)]
    pixels = torch.stack([torch.as_tensor(np.asarray(image)) for image, _ in items])
    labels = torch.tensor([int(label) for _, label in items], dtype=torch.long)
    return pixels, labels, "run dataset", "dataset labels"


def _spread(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(total)`` (every index when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return [int(i * total // count) for i in range(count)]


def _image_files(folder: Path) -> list[Path]:
    from repae_data.image_folder import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder; pass a folder holding image files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise UserError(f"--images {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _resolution(run: Any) -> int:
    """Image size of the run: its dataset's, else the denoiser's latent size times the tokenizer's factor."""
    dataset = run.dataset
    if dataset is not None and getattr(dataset, "resolution", None):
        return int(dataset.resolution)
    return int(run.latent_shape()[1] * run.tokenizer.downsample)


def _read_image(path: Path, resolution: int):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from repae_data.image_folder import center_crop_adm

    try:
        with Image.open(path) as image:
            array = center_crop_adm(image.convert("RGB"), resolution)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; replace or remove the file") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _repa_depth(run: Any) -> int | None:
    """The REPA alignment depth of the recipe (of the loss that trains the denoiser, if several)."""
    specs = [s for s in run.recipe.get("losses") if isinstance(getattr(s.config, "depth", None), int)
             and "repa" in s.name]
    specs.sort(key=lambda s: "denoiser" not in (getattr(s.config, "updates", None) or []))
    return specs[0].config.depth if specs else None


def _transport(run: Any) -> Any:
    """The recipe's diffusion process (from the loss that defines it), else the linear flow of SiT."""
    from repae.build import BuildContext, build_component
    from repae.train.engine import default_transport

    for spec in run.recipe.get("losses"):
        if spec.name not in ("flow-matching", "ddpm") and "transport" not in spec.name:
            continue
        context = BuildContext(device="cpu", built={"denoiser": run.denoiser}, seed=run.recipe.seed,
                               load_weights=False)
        loss = build_component(spec.entry, spec.config, context, label=spec.label)
        if getattr(loss, "transport", None) is not None:
            return loss.transport
    return default_transport()


def _cknna_reason(run: Any, encoders: dict, depth: int | None, pixels: Any) -> str:
    if run.denoiser is None:
        return "the recipe has no denoiser"
    if not encoders:
        return "the recipe has no representation encoder"
    if depth is None:
        return "the recipe has no REPA loss to take the depth from; pass --depth"
    return f"CKNNA needs at least 3 images, got {pixels.shape[0]}"


def _rfid(pixels: Any, reconstructions: Any, device: str, weights: str | None) -> tuple[float | None, str | None]:
    """rFID (Inception pool features, Frechet distance; :mod:`repae.evaluate`) of the reconstructions against the
    inputs when the Inception weights are on this machine (never downloaded here); else ``(None, reason)``. Never
    raises: a missing rFID must not fail the analysis."""
    try:
        from repae.evaluate.features import extract_features, find_inception_weights, load_inception
        from repae.evaluate.metrics import feature_statistics, frechet_distance
    except Exception as exc:  # noqa: BLE001 - the evaluation package or torch-fidelity may be missing
        return None, f"the evaluation package is not available ({type(exc).__name__}: {_first_line(exc)})"
    try:
        with _no_downloads():
            path = find_inception_weights(weights)
        extractor = load_inception(path, features=("pool",), device=device)

        def batches(images: Any) -> Any:
            for start in range(0, images.shape[0], 50):
                yield images[start : start + 50].permute(0, 2, 3, 1).contiguous().numpy()

        real = extract_features(batches(pixels), extractor)["pool"]
        fake = extract_features(batches(reconstructions), extractor)["pool"]
        return frechet_distance(*feature_statistics(real), *feature_statistics(fake)), None
    except Exception as exc:  # noqa: BLE001 - rFID is optional: record why it is missing
        return None, _first_line(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Forbid downloads (``HF_HUB_OFFLINE=1``) for the duration: analyze uses only weights already present."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _save_png(picture: Any, path: Path) -> None:
    from PIL import Image

    Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(path)
