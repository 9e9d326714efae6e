"""``repae bench``: the steady-state training step of a recipe, timed phase by phase, with memory, FLOPs and MFU.

What is measured (one process; the recipe's batch size, gradient accumulation, precision and speed switches):

- ``data``: the next micro-batches from the trainer's own DataLoader and their inputs on the device;
- ``encoders``: the representation encoders' tokens of the batch (REPA's alignment targets, under ``no_grad``);
- one entry per phase of the step (``tokenizer``, ``discriminator``, ``denoiser``, ...): the phase's forward passes
  and its backward pass (:meth:`repae.PhasedTrainer.compute_gradients`);
- ``optimizer + EMA``: clipping, the optimizer steps and the EMA update (:meth:`repae.PhasedTrainer.apply_gradients`).

Each is the median over the timed steps (after ``warmup`` steps, which include compilation and allocator warm-up),
with the device synchronised at every boundary (on CUDA this costs a little overlap; the step total is timed with
the same synchronisation). ``step_s`` is the median wall time of a whole step, ``img_per_s`` the global batch over
it. Peak memory is CUDA's ``max_memory_allocated`` during the timed steps, or the process's peak resident set size
on the CPU (which includes building the components). Model FLOPs per step are counted by
``torch.utils.flop_counter.FlopCounterMode`` on a copy of the recipe built on the ``meta`` device (shapes only: the
matmuls, convolutions and attention of every phase's forward and backward pass; no elementwise work), so counting
does not disturb the timed run. MFU is those FLOPs per second over the device's dense peak for the step's precision
(a small table of NVIDIA data-centre GPUs, or ``peak_tflops``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from repae.errors import UserError

__all__ = ["BenchResult", "bench_trainer", "count_step_flops", "device_peak_tflops", "format_result"]

# Dense (no sparsity) peak TFLOP/s by precision, from NVIDIA's data sheets (SXM parts).
_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
}


@dataclass
class BenchResult:
    """What :func:`bench_trainer` measured. Times in seconds, memory in MiB, FLOPs per step (multiply-add = 2)."""

    device: str
    precision: str
    batch_size: int
    grad_accum: int
    steps: int
    warmup: int
    step_s: float
    step_s_min: float
    step_s_max: float
    img_per_s: float
    peak_mem_mb: float
    peak_mem_kind: str
    phases: dict[str, float] = field(default_factory=dict)
    flops: float | None = None
    tflops_per_s: float | None = None
    peak_tflops: float | None = None
    mfu: float | None = None
    graphs_compiled_timed: int | None = None
    """Graphs ``torch.compile`` compiled during the timed steps (0: no recompiles after warm-up; ``None`` when
    nothing is compiled)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def device_peak_tflops(device: torch.device, precision: str, tf32: bool) -> float | None:
    """Dense peak TFLOP/s of ``device`` for the step's ``precision`` (``bf16``/``fp16``/``fp32``; fp32 with TF32
    matmuls counts as ``tf32``), ``None`` for a CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    for model, peaks in _PEAKS.items():
        if model in name:
            return peaks.get(key)
    return None


def count_step_flops(trainer: Any, batch_size: int, grad_accum: int) -> float:
    """Model FLOPs of one step (every phase's forward and backward pass over ``grad_accum`` micro-batches of
    ``batch_size // grad_accum``) of ``trainer``, whose components are on the ``meta`` device."""
    from torch.utils.flop_counter import FlopCounterMode

    micro = batch_size // grad_accum
    trainer.freeze()  # no gradient for the frozen tokenizer and the encoders, as in training
    inputs = [trainer.example_inputs(micro) for _ in range(grad_accum)]
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.compute_gradients(inputs, 0)
    for module in trainer.parts.values():
        module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _graphs_compiled() -> int:
    """Graphs compiled so far by torch.compile in this process (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def bench_trainer(trainer: Any, *, steps: int, warmup: int, flops: float | None = None,
                  peak_tflops: float | None = None, progress: bool = True) -> BenchResult:
    """Run ``warmup + steps`` training steps of a set-up-able ``trainer`` (:class:`repae.PhasedTrainer` or a
    subclass) from step 0 and time them (see the module docstring). The trainer's models are updated as in
    training; nothing is written to disk. ``progress``: a bar over the steps on stderr (drawn between steps, outside
    the timed spans)."""
    from repae.reporting import progress as progress_bar
    from repae.train.data import StepOrder

    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    for member in ("setup", "compute_gradients", "apply_gradients", "make_inputs", "loader", "autocast"):
        if not callable(getattr(trainer, member, None)):
            raise UserError(f"repae bench times the phases of repae.PhasedTrainer; this recipe's trainer "
                            f"({type(trainer).__name__}) has no `{member}`: subclass PhasedTrainer")
    trainer.setup()
    config = trainer.config
    device = trainer.device
    cuda = device.type == "cuda"
    order = StepOrder(len(trainer.dataset), config.batch_size, config.grad_accum, 1, 0, trainer.seed)
    loader = iter(trainer.loader(order, 0, warmup + steps))
    encoders = [e for e in trainer.encoders] if not trainer.from_latents else []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {}
    totals: list[float] = []
    graphs_before = 0
    with progress_bar("bench", warmup + steps, unit="step", enabled=progress, transient=True) as bar:
        for step in range(warmup + steps):
            if step == warmup:
                graphs_before = _graphs_compiled()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
            sync()
            begin = time.perf_counter()
            mark = [begin]

            def lap(phase: str, step: int = step) -> None:
                sync()
                now = time.perf_counter()
                if step >= warmup:
                    times.setdefault(phase, []).append(now - mark[0])
                mark[0] = now

            micro = []
            for m in range(config.grad_accum):
                x, labels = next(loader)
                micro.append(trainer.make_inputs(step, m, x, labels, order))
            lap("data")
            if encoders:  # as the step computes them: without autograd, under the step's autocast
                autocast = trainer.autocast() or contextlib.nullcontext
                with torch.no_grad(), autocast():
                    for inputs in micro:
                        inputs.targets = [encoder(inputs.images).float() for encoder in encoders]
                lap("encoders")
            trainer.compute_gradients(micro, step, on_phase_end=lap)
            trainer.apply_gradients()
            trainer.step = step + 1
            lap("optimizer + EMA")
            if step >= warmup:
                totals.append(mark[0] - begin)
            bar.advance(1, text="warm-up done, timing" if step + 1 == warmup else None)
    step_s = statistics.median(totals)
    precision = trainer.precision
    peak = peak_tflops if peak_tflops is not None else device_peak_tflops(device, precision, config.tf32)
    result = BenchResult(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        precision=precision, batch_size=config.batch_size, grad_accum=config.grad_accum, steps=steps,
        warmup=warmup, step_s=step_s, step_s_min=min(totals), step_s_max=max(totals),
        img_per_s=config.batch_size / step_s,
        peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mb(),
        peak_mem_kind="cuda max allocated" if cuda else "peak RSS (process)",
        phases={name: statistics.median(values) for name, values in times.items()},
        flops=flops, peak_tflops=peak,
        graphs_compiled_timed=_graphs_compiled() - graphs_before if config.compile else None,
    )
    if flops is not None:
        result.tflops_per_s = flops / step_s / 1e12
        if peak:
            result.mfu = result.tflops_per_s / peak
    return result


def format_result(result: BenchResult, title: str, width: int | None = None) -> str:
    """The plain-text report ``repae bench`` prints, its lines wrapped between words to ``width`` columns (default:
    the terminal's, ``COLUMNS``, else 80) with the continuation indented."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((80, 24)).columns
    lines = [title,
             f"  device {result.device}, precision {result.precision}, batch {result.batch_size}"
             + (f" ({result.grad_accum} micro-batches)" if result.grad_accum > 1 else "")
             + f", {result.steps} timed steps after {result.warmup} warm-up",
             f"  step     {result.step_s * 1e3:9.1f} ms  (min {result.step_s_min * 1e3:.1f}, "
             f"max {result.step_s_max * 1e3:.1f})   {result.img_per_s:.1f} img/s",
             f"  memory   {result.peak_mem_mb:9.0f} MiB ({result.peak_mem_kind})"]
    if result.flops is not None:
        mfu = f"   MFU {100 * result.mfu:.1f}% of {result.peak_tflops:g} TFLOP/s" if result.mfu is not None else ""
        lines.append(f"  FLOPs    {_si(result.flops)}FLOP/step   {_si((result.tflops_per_s or 0) * 1e12)}FLOP/s{mfu}")
    if result.graphs_compiled_timed is not None:
        lines.append(f"  compile  {result.graphs_compiled_timed} graph(s) compiled during the timed steps"
                     + (" (recompiles: see TORCH_LOGS=recompiles)" if result.graphs_compiled_timed else ""))
    lines.append("  phase                 median ms   share")
    total = sum(result.phases.values()) or 1.0
    for name, seconds in result.phases.items():
        lines.append(f"    {name:<20}{seconds * 1e3:10.1f}   {100 * seconds / total:4.0f}%")
    wrapped = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        wrapped.extend(textwrap.wrap(line, max(width, 40), subsequent_indent=indent, break_long_words=False,
                                     break_on_hyphens=False, drop_whitespace=True) or [line])
    return "\n".join(wrapped)



def _si(value: float) -> str:
    """``12.3 G`` style: the value with an SI prefix (k ... P)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:.0f} "
