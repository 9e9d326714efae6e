"""The ``tensorboard`` tracker: TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

Scalars under the keys of ``metrics.jsonl`` (``losses.repa/proj_loss`` ...), the resolved recipe as text (tab TEXT,
tag ``recipe``, at the first step this process trains), sample grids as images (tag ``samples``). On resume the
writer purges what the interrupted process logged after the checkpoint (``purge_step``), so every step holds the
values of the process that trained it, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repae import TrackerRun, UserError, check_package, require_package

from repae_trackers import TensorBoardConfig

if TYPE_CHECKING:
    from repae import BuildContext

PACKAGE_USER = "the tensorboard tracker"
PACKAGE_INSTEAD = "remove tensorboard from `trackers`"

__all__ = ["TensorBoardTracker", "build_tensorboard"]


class TensorBoardTracker:
    """:class:`repae.Tracker` writing TensorBoard event files."""

    def __init__(self, config: TensorBoardConfig) -> None:
        self.config = config
        self.log_dir: Path | None = None
        self._writer: Any = None

    def start(self, run: TrackerRun) -> None:
        module = require_package("tensorboard", extra="tensorboard", what=PACKAGE_USER, instead=PACKAGE_INSTEAD,
                                 via="torch.utils.tensorboard")
        self.log_dir = Path(self.config.dir).expanduser() if self.config.dir else run.run_dir / "tensorboard"
        # Events of an earlier process in this folder: drop those after the checkpoint this process resumes from
        # (TensorBoard discards events at steps >= purge_step that precede the restart marker).
        earlier = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        try:
            self._writer = module.SummaryWriter(str(self.log_dir), flush_secs=self.config.flush_secs,
                                                purge_step=run.resume_step + 1 if earlier else None)
        except OSError as exc:
            raise UserError(f"cannot write TensorBoard events to {self.log_dir} ({exc.strerror or exc}); fix the "
                            f"folder's permissions or set {run.label}.dir") from None
        # The recipe that trains the steps from here on; indented four spaces: a code block in TensorBoard's markdown
        text = "\n".join(f"    {line}" for line in run.recipe_text.splitlines())
        self._writer.add_text("recipe", text or "(no recipe.yaml in the run directory)",
                              global_step=run.resume_step + 1)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self._writer.add_image(key, pixels, global_step=step, dataformats="HWC")

    def finish(self, *, ok: bool = True) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes
            self._writer = None


def build_tensorboard(config: TensorBoardConfig, context: BuildContext) -> TensorBoardTracker:
    """Factory of ``tensorboard``: checks that TensorBoard is installed (when the recipe is validated), imports
    nothing."""
    check_package("tensorboard", extra="tensorboard", what=PACKAGE_USER, instead=PACKAGE_INSTEAD)
    return TensorBoardTracker(config)
