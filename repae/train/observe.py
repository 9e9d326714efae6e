"""What a run leaves behind: ``metrics.jsonl``, optional TensorBoard, sample grids (its progress bar is
:func:`repae.reporting.progress`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLog", "save_grid", "summarize"]


class MetricsLog:
    """Append-only JSONL (one object per logged step) plus TensorBoard scalars when asked for."""

    def __init__(self, path: Path, *, tensorboard_dir: Path | None = None, resume_step: int = 0) -> None:
        """``resume_step``: the step training resumes from; lines and TensorBoard events of later steps (logged
        after that checkpoint by the interrupted run) are dropped, so every step appears once."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self._drop_after(resume_step)
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
            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def _drop_after(self, step: int) -> None:
        from repae.fileio import atomic_write

        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                logged = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: dropped
            if logged <= step:
                kept.append(line)
        if len(kept) != len(lines):
            try:
                atomic_write(self.path, "".join(f"{line}\n" for line in kept))
            except OSError as exc:
                from repae.errors import UserError

                raise UserError(f"cannot rewrite {self.path} ({exc.strerror or exc}); free space or fix its "
                                "permissions, then run the same command") from None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            from repae.errors import UserError

            raise UserError(f"cannot append to {self.path} ({exc.strerror or exc}); free space or fix its "
                            "permissions, then run the same command to resume from the last checkpoint") from None
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def save_grid(images: torch.Tensor, path: Path, *, nrow: int | None = None) -> Path:
    """Save uint8 ``[N, 3, H, W]`` images as one PNG grid."""
    from torchvision.utils import save_image  # type: ignore[import-untyped]

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
