"""The trainer's config (torch-free: read by ``repae list``/``repae show`` without importing the engine)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from repae.config import FieldError, option

__all__ = ["OptimizerConfig", "TrainerConfig"]


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW settings of one trainable part (REPA-E: lr 1e-4, betas (0.9, 0.999), no weight decay, eps 1e-8)."""

    lr: float = option(1e-4, doc="learning rate (constant)")
    betas: tuple[float, float] = option((0.9, 0.999), doc="AdamW betas")
    weight_decay: float = option(0.0, doc="AdamW weight decay")
    eps: float = option(1e-8, doc="AdamW epsilon")
    fused: bool | None = option(
        None, doc="torch's fused AdamW kernel (one kernel for all parameters); null: on CUDA, foreach elsewhere"
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FieldError("lr", f"must be a finite number > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise FieldError("betas", f"must be two numbers in [0, 1), e.g. [0.9, 0.999], got {list(self.betas)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FieldError("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise FieldError("eps", f"must be a finite number > 0, got {self.eps}")


@dataclass(kw_only=True)
class TrainerConfig:
    """How a recipe trains: which parts update in which order, optimisation, precision, logging and checkpoints."""

    steps: int = option(400_000, doc="optimizer steps to train for")
    batch_size: int = option(256, doc="global batch size (split evenly over processes)")
    grad_accum: int = option(1, doc="micro-batches per optimizer step (the global batch is split into them)")
    phases: list[str] = option(
        default_factory=lambda: ["tokenizer", "discriminator", "denoiser"],
        doc="order in which parts compute their objectives each step; parts no loss updates are skipped",
    )
    optimizers: dict[str, OptimizerConfig] = option(
        default_factory=lambda: {"default": OptimizerConfig()},
        doc="AdamW per trainable part (tokenizer, denoiser, discriminator, ...); 'default' serves the others",
    )
    clip_grad_norm: float | None = option(1.0, doc="max global grad norm per part, > 0 (null: no clipping)")
    max_nonfinite_steps: int = option(
        5, doc="a step whose loss or gradient is not finite is skipped (no update, a warning); after this many in a "
               "row training stops with the last good state saved"
    )
    ema_decay: float = option(0.9999, doc="EMA decay of the denoiser and its latent normaliser's buffers")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", doc="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a gradient scaler"
    )
    tf32: bool = option(True, doc="allow TF32 matmuls and convolutions on CUDA")
    compile: bool = option(
        False, doc="torch.compile every network of the step block by block (repae.HasBlocks: SiT/DiT blocks, VAE "
                   "levels, LPIPS) or whole (the discriminator, the encoders); compiled once, no recompiles per step"
    )
    channels_last: bool = option(
        True, doc="channels_last memory format for the convolutional networks (tokenizer, discriminator, LPIPS): "
                  "faster convolutions on CUDA and on CPU (0.88x the step time of the reference, see performance.md)"
    )
    activation_checkpointing: list[str] = option(
        default_factory=list, doc="components whose blocks recompute activations in the backward pass instead of "
                                  "storing them (less memory, ~1 more forward): e.g. [tokenizer, denoiser]"
    )
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = option(
        "auto", doc="attention kernel of scaled_dot_product_attention (auto: torch picks the fastest that applies)"
    )
    static_graph: bool = option(
        True, doc="DDP: each phase uses the same parameters every step (true for the built-in losses): unused ones "
                  "are found once (with grad_accum > 1 there must be none); false: searched every step (losses "
                  "that switch on later)"
    )
    bucket_mb: float = option(25.0, doc="DDP gradient bucket size in MiB")
    label_dropout: float | None = option(
        None, doc="probability of replacing a label by the null class; null: the denoiser's class_dropout_prob"
    )
    num_workers: int = option(2, doc="data-loading worker processes per training process")
    log_every: int = option(10, doc="steps between metric lines (metrics.jsonl, progress bar)")
    checkpoint_every: int = option(5000, doc="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = option(3, doc="how many of the latest checkpoints to keep")
    sample_every: int = option(10_000, doc="steps between sample grids from the EMA denoiser (0: never)")
    sample_count: int = option(16, doc="images per sample grid (class-balanced labels)")

    REMOVED_KEYS: ClassVar[Mapping[str, tuple[Any, str]]] = {
        "tensorboard": (False, "TensorBoard is a tracker now: delete trainer.tensorboard and add `trackers: "
                               "[tensorboard]` at the recipe's top level, or 'trackers=[tensorboard]' on the command "
                               "line; see docs/training.md#trackers"),
    }
    """Keys of earlier versions (see :func:`repae.config.parse_config`): ``tensorboard: false``, which every run
    directory's recipe.yaml of those versions holds, is ignored; ``true`` names the replacement."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise FieldError("ema_decay", f"must be in [0, 1], got {self.ema_decay}")
        if not (math.isfinite(self.bucket_mb) and self.bucket_mb > 0):
            raise FieldError("bucket_mb", f"must be a finite number > 0, got {self.bucket_mb}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise FieldError("clip_grad_norm", f"must be a finite number > 0 or null (no clipping), got "
                                               f"{self.clip_grad_norm}")
        for name in ("sample_count", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "sample_every"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.label_dropout is not None and not 0.0 <= self.label_dropout <= 1.0:
            raise FieldError("label_dropout", f"must be in [0, 1] or null, got {self.label_dropout}")
        if len(set(self.activation_checkpointing)) != len(self.activation_checkpointing):
            raise FieldError("activation_checkpointing", f"lists a component twice: {self.activation_checkpointing}")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError(f"phases lists a part twice: {self.phases}")
