"""What a run shows and leaves behind: a rich progress bar, ``metrics.jsonl``, optional TensorBoard, sample grids."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "Progress", "save_grid"]


class MetricsLog:
    """Append-only JSONL (one object per logged step) plus TensorBoard scalars when asked for."""

    def __init__(self, path: Path, *, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is an optional dependency
                from repae.errors import UserError

                raise UserError(
                    f"trainer.tensorboard is on but TensorBoard is not installed ({exc}); pip install tensorboard"
                ) from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A rich progress bar with step, it/s, img/s, ETA and the latest losses (rank 0 only; silent elsewhere)."""

    def __init__(self, total: int, start: int, *, enabled: bool, batch_size: int) -> None:
        self.enabled = enabled
        self.batch_size = batch_size
        self._last_time = time.perf_counter()
        self._last_step = start
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeRemainingColumn

        self._bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(), TextColumn("{task.fields[losses]}"), transient=False,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, speed="", losses="")
        self._bar.start()

    def update(self, step: int, losses: Mapping[str, float] | None = None) -> dict[str, float]:
        """Advance to ``step``; returns the throughput since the last call."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds = max(now - self._last_time, 1e-9)
        speed = {"it_per_s": steps / seconds, "img_per_s": steps * self.batch_size / seconds}
        self._last_time, self._last_step = now, step
        if self.enabled:
            shown = "  ".join(f"{k}={v:.4g}" for k, v in list((losses or {}).items())[:4])
            self._bar.update(
                self._task, completed=step,
                speed=f"{speed['it_per_s']:.2f} it/s {speed['img_per_s']:.0f} img/s", losses=shown,
            )
        return speed

    def close(self) -> None:
        if self.enabled:
            self._bar.stop()


def save_grid(images: torch.Tensor, path: Path, *, nrow: int | None = None) -> Path:
    """Save uint8 ``[N, 3, H, W]`` images as one PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    save_image(images.float() / 255.0, str(path), nrow=nrow, padding=2)
    return path


def summarize(values: Mapping[str, Any]) -> dict[str, float]:
    """Scalars (tensors on any device, or numbers) to floats with a single host transfer."""
    keys = list(values)
    if not keys:
        return {}
    tensors = [torch.as_tensor(values[k]).detach().float().reshape(()) for k in keys]
    device = tensors[0].device
    stacked = torch.stack([t.to(device) for t in tensors]).cpu()
    return dict(zip(keys, stacked.tolist()))
