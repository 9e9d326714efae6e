"""Experiment trackers (kind ``tracker``): where a run's metrics, resolved recipe and sample grids also go.

- ``tensorboard``: TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``) in ``RUN_DIR/tensorboard``;
  extra ``pip install 'repae[tensorboard]'``;
- ``wandb``: a Weights & Biases run (online, or offline without network: ``mode: offline`` or ``WANDB_MODE=offline``,
  then ``wandb sync``); extra ``pip install 'repae[wandb]'``.

A recipe lists any number: ``trackers: [tensorboard, {name: wandb, project: my-project}]``. ``metrics.jsonl`` is
written either way. This module only declares configs and registers them: it imports neither torch, tensorboard nor
wandb (``repae list`` stays fast); the factories check that the optional package is installed when a recipe is
validated, and import it when training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from repae import FieldError, hookimpl, option

__all__ = ["TensorBoardConfig", "WandbConfig"]


@dataclass(kw_only=True)
class TensorBoardConfig:
    """Config of the ``tensorboard`` tracker (``tensorboard --logdir RUN_DIR/tensorboard`` shows the run)."""

    dir: str | None = option(None, doc="folder of the event files; null: RUN_DIR/tensorboard")
    flush_secs: int = option(120, doc="seconds between writes of pending events to disk (all are written at the end)")

    def __post_init__(self) -> None:
        if self.flush_secs < 1:
            raise FieldError("flush_secs", f"must be >= 1, got {self.flush_secs}")
        if self.dir is not None and not self.dir.strip():
            raise FieldError("dir", "is empty; give a folder, or null for RUN_DIR/tensorboard")


@dataclass(kw_only=True)
class WandbConfig:
    """Config of the ``wandb`` tracker: one W&B run per run directory, continued on resume (its id is kept in
    ``RUN_DIR/wandb-run.json``). Unset fields follow wandb's environment variables."""

    project: str | None = option(None, doc="W&B project; null: WANDB_PROJECT, else 'repae'")
    entity: str | None = option(None, doc="W&B team or user; null: WANDB_ENTITY, else your default entity")
    run_name: str | None = option(None, doc="display name of the W&B run; null: the run directory's name")
    group: str | None = option(None, doc="W&B group (e.g. a sweep's name); null: none")
    tags: list[str] = option(default_factory=list, doc="W&B tags of the run")
    notes: str | None = option(None, doc="a longer description of the run; null: none")
    mode: Literal["auto", "online", "offline", "disabled"] = option(
        "auto", doc="online: stream to the W&B server (needs network and `wandb login`); offline: write the run "
                    "locally (no network), upload later with `wandb sync RUN_DIR/wandb/offline-run-*`; disabled: log "
                    "nothing; auto: WANDB_MODE if set, else online"
    )
    dir: str | None = option(None, doc="folder for wandb's files (its `wandb/` folder goes inside); null: WANDB_DIR, "
                                       "else the run directory")

    def __post_init__(self) -> None:
        for field in ("project", "entity", "run_name", "group", "dir"):
            value = getattr(self, field)
            if value is not None and not value.strip():
                raise FieldError(field, "is empty; give a value, or null for the default")
        if self.project is not None and any(c in self.project for c in "/\\#?%:"):
            raise FieldError("project", f"{self.project!r} contains one of / \\ # ? % : which W&B project names "
                                        "cannot hold")


@hookimpl
def register_components(register: Any) -> None:
    """Register the ``tensorboard`` and ``wandb`` trackers."""
    register(
        "tracker",
        "tensorboard",
        summary="TensorBoard event files in RUN_DIR/tensorboard: scalars, the recipe (text), sample grids",
        config=TensorBoardConfig,
        factory="repae_trackers.tensorboard_tracker:build_tensorboard",
    )
    register(
        "tracker",
        "wandb",
        summary="Weights & Biases run (online or offline): scalars, the recipe as config, sample grids",
        config=WandbConfig,
        factory="repae_trackers.wandb_tracker:build_wandb",
    )
