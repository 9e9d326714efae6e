"""``repae eval``: gFID, sFID, Inception Score, precision and recall of generated samples, as ADM's evaluator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, List, Optional

import typer

from repae.cli._choices import DEVICE_OPTION, component_names
from repae.cli._common import (
    load_host,
    pick_device,
    plain_table,
    print_json,
    stdout,
    user_errors,
)
from repae.errors import UserError

METRIC_ALIASES = {"is": "inception-score", "pr": "precision-recall"}
"""Short ``--metrics`` names -> registered metric names (``fid`` and ``sfid`` are their own)."""
DEFAULT_METRICS = ("fid", "sfid", "inception-score", "precision-recall")


def evaluate(
    samples: Path = typer.Argument(
        ..., help="Generated images: an ADM .npz (arr_0, uint8 NHWC), a folder of images, or a `repae sample` folder."
    ),
    ref: Path = typer.Option(
        ..., "--ref", help="Reference: an ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0; ImageNet 256: "
        "VIRTUAL_imagenet256_labeled.npz) or a folder of reference images."
    ),
    json_out: bool = typer.Option(
        False, "--json", help="Print the report as JSON (alone on standard output; progress goes to stderr)."
    ),
    metrics: Optional[str] = typer.Option(
        None, "--metrics", metavar="NAME,...", show_default=False,
        autocompletion=component_names("metric", also=tuple(METRIC_ALIASES), separator=","),
        help="Comma-separated: fid, sfid, is, pr, or any registered metric (`repae list metric`). Default: all four, "
        "skipping precision/recall when the reference has no images."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per Inception forward pass (ADM: 64)."),
    device: str = DEVICE_OPTION,
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights", help="Inception weights file (weights-inception-2015-12-05-6726825d.pth). "
        "Default: $REPAE_INCEPTION_WEIGHTS, then torch's hub cache."
    ),
    save_ref: Optional[Path] = typer.Option(
        None, "--save-ref", help="Also write the reference's statistics (and images) as an ADM reference batch .npz."
    ),
    settings: Optional[List[str]] = typer.Option(
        None, "--set", help="A metric's config field, METRIC.FIELD=VALUE (e.g. pr.distance_dtype=float16, "
        "is.splits=5; `repae show precision-recall` lists the fields). Repeatable."
    ),
) -> None:
    """Evaluate generated samples against a reference: FID, sFID, IS, precision, recall (ADM protocol)."""
    from repae.evaluate import evaluate as run_evaluation

    with user_errors():
        chosen = _choose_metrics(metrics, settings or [])  # names and --set checked before torch is imported
        _check_arguments(samples, ref, batch_size, inception_weights)
        device = pick_device(device)
        built = _build_metrics(chosen, device)
        report = run_evaluation(
            samples, ref, built, inception_weights=inception_weights, device=device,
            batch_size=batch_size, skip_unavailable=metrics is None, save_reference=save_ref, progress=_progress,
        )
    if json_out:
        print_json(report.to_dict())
        return
    console = stdout()
    console.print(f"samples:   {report.samples} ({report.num_samples} images)", markup=False)
    reference = f"reference: {report.reference}"
    if report.num_reference_images is not None:
        reference += f" ({report.num_reference_images} images)"
    if report.reference_stats:
        reference += f"; stored statistics used: {', '.join(report.reference_stats)}"
    console.print(reference, markup=False)
    console.print(f"inception: {report.inception_weights} (sha256 {report.inception_sha256[:12]})", markup=False)
    table = plain_table(header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, value in report.rows():
        table.add_row(label, value)
    console.print(table)
    if save_ref is not None:
        console.print(f"wrote the reference batch {save_ref}", markup=False)
    console.print(f"[dim]{report.num_samples} samples on {report.device} in {report.seconds:.1f} s[/]")


def _choose_metrics(names: str | None, settings: List[str]) -> list[tuple[Any, Any]]:
    """The registry entries of the metrics named by ``--metrics`` (aliases allowed), each with its config parsed
    from the ``--set`` values: ``[(entry, config), ...]``. Torch-free."""
    from repae.errors import did_you_mean

    wanted = DEFAULT_METRICS if names is None else [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise UserError("--metrics is empty; name at least one of fid, sfid, is, pr")
    registry = load_host().registry
    known = registry.names("metric")

    def resolve(name: str, where: str) -> str:
        name = METRIC_ALIASES.get(name.lower(), name.lower())
        if name not in known:
            hint = did_you_mean(name, [*known, *METRIC_ALIASES])
            if not known:
                hint += " No metric is registered: is the repae-metrics plugin installed (`repae plugins`)?"
            raise UserError(f"{where}: unknown metric '{name}'.{hint} Available: {', '.join(known) or 'none'}")
        return name

    chosen = list(dict.fromkeys(resolve(n, "--metrics") for n in wanted))
    sections: dict[str, dict[str, Any]] = {name: {} for name in chosen}
    for item in settings:
        key, sep, value = item.partition("=")
        metric, dot, fieldname = key.strip().partition(".")
        if not sep or not dot or not fieldname:
            raise UserError(f"--set {item!r}: write METRIC.FIELD=VALUE, e.g. pr.distance_dtype=float16")
        name = resolve(metric, f"--set {item!r}")
        if name not in sections:
            raise UserError(f"--set {item!r}: metric '{name}' is not among --metrics ({', '.join(chosen)})")
        import yaml

        sections[name][fieldname] = yaml.safe_load(value) if value.strip() else None
    parsed = []
    for name in chosen:
        entry = registry.get("metric", name)
        config, issues = entry.parse(sections[name])
        if issues:
            raise UserError(f"metric '{name}': " + "; ".join(
                f"{i.path}: {i.message}" + (f" ({i.hint})" if i.hint else "") for i in issues))
        parsed.append((entry, config))
    return parsed


def _check_arguments(samples: Path, ref: Path, batch_size: int, inception_weights: str | None) -> None:
    """The paths and numbers, from the file system alone (torch-free)."""
    from repae.cli._preflight import check_positive
    from repae.evaluate.inception_weights import check_inception_weights
    from repae.evaluate.inputs import check_inputs

    check_positive(batch_size=batch_size)
    check_inputs(samples, ref)
    check_inception_weights(inception_weights)


def _build_metrics(chosen: list[tuple[Any, Any]], device: str) -> list:
    """Build the metrics :func:`_choose_metrics` chose, through the registry."""
    from repae.build import BuildContext, build_component

    return [build_component(entry, config, BuildContext(device=device)) for entry, config in chosen]



@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    from repae.reporting import progress

    # on stderr, also with --json (standard output holds the report alone); plain lines when stderr is not a terminal
    metrics = description.startswith("metrics")  # the pipeline's last stage: the metrics computed, one by one
    with progress(description if metrics else f"Inception features: {description}", total,
                  unit="metric" if metrics else "img", transient=True) as bar:
        yield bar.advance
