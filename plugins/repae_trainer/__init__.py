"""The built-in trainer (registry name ``default``): vanilla, REPA and REPA-E training from one engine.

Which of the three a recipe runs is decided by its losses and what they update, not by the trainer; see
``docs/training.md``. The engine is repae's :class:`repae.PhasedTrainer` (the core's, since ``repae sample`` /
``analyze`` / ``export`` read the run directories it writes); this plugin registers it like any other trainer.
"""

from __future__ import annotations

from typing import Any

from repae import TrainerConfig, hookimpl

__all__ = ["TrainerConfig"]


@hookimpl
def register_components(register: Any) -> None:
    register(
        "trainer",
        "default",
        summary="phased trainer: one objective per trainable part each step (REPA-E, REPA, vanilla), DDP, EMA",
        config=TrainerConfig,
        factory="repae.train.engine:build_trainer",
    )
