"""The training engine: one code path for vanilla, REPA and REPA-E training, from one CPU process to many nodes.

A step computes one objective per trainable *part*, in the order of ``trainer.phases`` (default: tokenizer,
discriminator, denoiser). In the phase of part P every other part is frozen (``requires_grad`` off; the denoiser and
its latent normaliser in eval mode, as REPA-E runs its alignment pass), and only the losses that list P in
``updates`` contribute. Gradients of all phases are computed first and the optimizers step afterwards; this equals
the reference order (VAE step, discriminator step, SiT step) because the denoiser phase trains on the pre-update
``z.detach()`` and the discriminator on the pre-update ``recon.detach()``. Then the EMA of the denoiser (and its
normaliser's buffers) moves.

Which training a recipe runs follows from its losses:

- vanilla: ``flow-matching`` updating ``[denoiser]``; the tokenizer is frozen (or replaced by a latent cache);
- REPA: + ``repa`` (weight 0.5) updating ``[denoiser]``;
- REPA-E: ``repa`` updating ``[denoiser, tokenizer]`` (weights 0.5 and 1.5), the VAE regularisers updating
  ``[tokenizer]``, a ``patchgan`` updating ``[tokenizer, discriminator]``, and the latent ``batchnorm`` normaliser.

The phases, modes and stop-gradients are computed once into a :class:`~repae.interfaces.StepPlan`
(:meth:`PhasedTrainer.plan`); the step applies that plan, and ``repae run --dry-run`` prints it.

Randomness a step consumes (posterior noise, t, diffusion noise, label dropout) is drawn for the whole global batch
from a generator seeded by (seed, step) and sliced per process, so a step is a pure function of the recipe and the
step number: resuming is exact, and N processes compute what one process computes on the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from repae.build import latent_shape
from repae.errors import Problem, RecipeError, StopRequested, UserError, describe_exception
from repae.generate import decode_latents
from repae.interfaces import (
    ChecksTokenizer,
    PhasePlan,
    StepPlan,
    Transport,
    adopt_latent_norm_state,
    supports,
)
from repae.reporting import progress as progress_bar
from repae.train import distributed
from repae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from repae.train.config import OptimizerConfig, TrainerConfig
from repae.train.context import (
    DETACHED_OUTSIDE_TOKENIZER_PHASE,
    DenoiserPlan,
    StepContext,
    StepInputs,
)
from repae.train.data import StepOrder, step_generator
from repae.train.ema import EMA
from repae.train.observe import MetricsLog, Trackers, save_grid, summarize

if TYPE_CHECKING:
    from repae.build import BuildContext

__all__ = ["PhasedTrainer", "build_trainer"]


def build_trainer(config: TrainerConfig, context: BuildContext) -> PhasedTrainer:
    """Factory of the ``default`` trainer: takes the components built before it from ``context.built``."""
    return PhasedTrainer(config, context.built, seed=context.seed, names=context.names)


class PhasedTrainer:
    """Trains the components of a recipe (the ``default`` trainer; :class:`repae.interfaces.Trainer`).

    Built through the registry (``trainer: {name: default}``) from the components built before it. A plugin's trainer
    may subclass it and override the step functions :meth:`make_inputs`, :meth:`compute_gradients`,
    :meth:`apply_gradients` or :meth:`train_step` (whose returned terms are what ``metrics.jsonl`` logs).
    """

    def __init__(self, config: TrainerConfig, built: Mapping[str, Any], *, seed: int = 0,
                 names: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.seed = seed
        self.names = dict(names or {})
        """Registered name of each component by slot label (``losses.repa``: ``repa``), for the plan."""
        # The components, through their contracts (repae.interfaces): typed Any, a plugin's classes are its own.
        self.dataset = _component(built, "dataset")
        self.tokenizer = _component(built, "tokenizer")
        self.encoders: list[Any] = list(built.get("encoders") or [])
        self.normalizer = _component(built, "latent_norm")
        self.denoiser = _component(built, "denoiser")
        self.losses: dict[str, Any] = dict(built.get("losses") or {})
        self.sampler = _component(built, "sampler")
        self.trackers: list[Any] = list(built.get("trackers") or [])
        """The recipe's trackers (:class:`repae.interfaces.Tracker`), in recipe order: process 0 starts them."""
        problems = []
        if self.denoiser is None:
            problems.append("a `denoiser`")
        if self.dataset is None:
            problems.append("a `dataset`")
        if not self.losses:
            problems.append("`losses` (e.g. losses: {diffusion: {name: flow-matching}})")
        if problems:
            raise UserError(f"the trainer needs {', '.join(problems)} in the recipe")
        self.from_latents = getattr(self.dataset, "kind", "images") == "latents"
        if not self.from_latents and self.tokenizer is None:
            raise UserError("an image dataset needs a `tokenizer` to turn images into latents")
        if self.from_latents and self.tokenizer is not None and supports(self.dataset, ChecksTokenizer):
            if not _on_meta(self.tokenizer):  # a dry run has no weights to compare
                self.dataset.check_tokenizer(self.tokenizer)  # the cache must come from this very tokenizer

        self.parts: dict[str, nn.Module] = {"denoiser": self.denoiser}
        if any("tokenizer" in loss.updates for loss in self.losses.values()):
            if self.tokenizer is None or self.from_latents:
                raise UserError("a loss updates the tokenizer, but the recipe trains from cached latents or has none")
            self.parts["tokenizer"] = self.tokenizer
        self.loss_parts: set[str] = set()
        for loss in self.losses.values():
            for name, module in loss.parts().items():
                self.parts[name] = module
                self.loss_parts.add(name)
        for label, loss in self.losses.items():
            unknown_parts = [p for p in loss.updates if p not in self.parts]
            if unknown_parts:
                raise UserError(f"loss '{label}' lists updates {unknown_parts}, but the parts of this training are "
                                f"{sorted(self.parts)}")
        strays = [key for key in config.optimizers if key != "default" and key not in self.parts]
        if strays:
            raise UserError(f"trainer.optimizers names {strays}, which this training does not train; the keys are "
                            f"'default' or a trainable part: {sorted(self.parts)}")
        unknown = [p for p in self.parts if p not in config.phases]
        if unknown:
            raise UserError(f"trainer.phases {config.phases} does not list the trainable part(s) {unknown}")
        self.phases = [p for p in config.phases if p in self.parts and self._phase_losses(p)]
        if "tokenizer" in self.phases and self.phases[0] != "tokenizer":
            raise UserError(
                f"trainer.phases {config.phases}: the tokenizer's phase must come first (the other parts train on "
                "its pre-update latents and reconstructions, detached)"
            )
        has_null_row = float(getattr(self.denoiser, "class_dropout_prob", 0.0) or 0.0) > 0
        if not has_null_row and (config.label_dropout or 0.0) > 0:
            raise UserError(
                "trainer.label_dropout > 0 needs a null-class row in the denoiser's label table: set the denoiser's "
                "class_dropout_prob > 0 (or trainer.label_dropout to 0)"
            )
        guidance = getattr(getattr(self.sampler, "config", None), "cfg_scale", 1.0)
        if not has_null_row and guidance not in (None, 1.0) and config.sample_every:
            raise UserError(
                f"the sampler guides with cfg_scale {guidance}, which needs the null class, but the denoiser has no "
                "null row (class_dropout_prob 0): set sampler.cfg_scale=1.0 or the denoiser's class_dropout_prob > 0"
            )
        transports = [(label, loss.transport) for label, loss in self.losses.items() if loss.transport is not None]
        if len(transports) > 1:
            raise UserError(f"several losses define the diffusion process: {[t[0] for t in transports]}; keep one")
        self.transport: Transport | None = transports[0][1] if transports else None
        if self.transport is None and any(self._plan(p).feature_depths or self._plan(p).needs_prediction
                                          for p in self.phases):
            raise UserError("the losses run the denoiser on noisy latents, but none defines the diffusion process: "
                            "add a diffusion objective, e.g. `diffusion: {name: flow-matching}`")
        self._frozen = [m for m in (self.tokenizer, *self.encoders) if m is not None and m not in self.parts.values()]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.ema: EMA | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.step = 0
        self._randomness_cache: tuple | None = None
        self.replicas: dict[str, DistributedDataParallel] = {}
        """Each trainable part in torch's ``DistributedDataParallel`` (:func:`repae.train.distributed.replicate`)
        when several processes train; empty in a single process."""
        self._checked_gradients: set[str] = set()  # parts whose first DDP step was checked for unused parameters
        self._unused_search = "static"  # how DDP learns unused parameters (distributed.replicate's `unused`)
        self.skipped_last = False
        """Whether the last :meth:`apply_gradients` skipped its update (a non-finite gradient)."""
        self.elapsed_s = 0.0
        """Training seconds before this process started (from the checkpoint it resumed), so elapsed time goes on."""

    # -- setup -----------------------------------------------------------------------------------------------------
    def _phase_losses(self, phase: str) -> list[tuple[str, Any]]:
        return [(label, loss) for label, loss in self.losses.items() if phase in loss.updates]

    def _optimizer_config(self, part: str) -> OptimizerConfig:
        configured = self.config.optimizers
        return configured.get(part) or configured.get("default") or OptimizerConfig()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def freeze(self) -> None:
        """Freeze what does not train: the frozen tokenizer and the encoders (``requires_grad`` off, eval mode)."""
        for module in self._frozen:
            module.requires_grad_(False)
            module.eval()

    def setup(self) -> None:
        """Freeze what does not train, move loss-owned parts to the device, prepare the networks (memory format,
        activation checkpointing, compilation), create optimizers (and DDP wrappers with several processes), EMA
        and scaler."""
        device = self.device
        self.freeze()
        for label, loss in self.losses.items():
            loss.to(device)
        if device.type == "cuda" and self.config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        tracked = {"denoiser": self.denoiser}
        if self.normalizer is not None:
            adopt_latent_norm_state(self.normalizer, self.denoiser)
            tracked["latent_norm"] = self.normalizer
        # The EMA copies the networks before they are compiled or checkpointed: its shadows stay plain modules
        # (a copy made after would call the live modules' compiled or checkpointed forward).
        self.ema = EMA(tracked, self.config.ema_decay)
        self._prepare_networks(device)
        for name, module in self.parts.items():
            params = [p for p in module.parameters()]
            if not params:
                raise UserError(f"the trainable part '{name}' has no parameters")
            cfg = self._optimizer_config(name)
            fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
            self.optimizers[name] = torch.optim.AdamW(
                params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay, eps=cfg.eps,
                **({"fused": True} if fused else {}),
            )
        if distributed.is_distributed():
            # One graph-handling mode for every step (hence exact resume): DDP's static graph finds unused
            # parameters once, but cannot record it inside no_sync, so under gradient accumulation DDP runs
            # without a search and the first step checks that every parameter got a gradient.
            self._unused_search = "every-step" if not self.config.static_graph else (
                "none" if self.config.grad_accum > 1 else "static")
            self.replicas = {name: distributed.replicate(module, device, bucket_mb=self.config.bucket_mb,
                                                         unused=self._unused_search)
                             for name, module in self.parts.items()}
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)

    def _networks(self) -> dict[str, tuple[nn.Module, bool]]:
        """Every network a step runs, by label, with whether the step calls it through its ``forward`` (the denoiser,
        the encoders, loss-owned parts such as the discriminator) or through other methods (the tokenizer's
        ``encode``/``decode``, a loss's own networks inside its ``forward(ctx)``)."""
        networks: dict[str, tuple[nn.Module, bool]] = {"denoiser": (self.denoiser, True)}
        if isinstance(self.tokenizer, nn.Module):
            networks["tokenizer"] = (self.tokenizer, False)
        for index, encoder in enumerate(self.encoders):
            if isinstance(encoder, nn.Module):
                networks[f"encoders.{index}"] = (encoder, True)
        for name in sorted(self.loss_parts):
            networks[name] = (self.parts[name], True)
        for label, loss in self.losses.items():
            networks[f"losses.{label}"] = (loss, False)
        return networks

    def _prepare_networks(self, device: torch.device) -> None:
        """Memory format, activation checkpointing and compilation of the networks, in place (state-dict keys and
        values unchanged; ``repae.HasBlocks`` says which units are compiled and checkpointed)."""
        from repae.interfaces import HasBlocks, require

        networks = self._networks()
        if self.config.channels_last:  # the convolutional networks: the tokenizer and the losses' networks
            for label, (module, _) in networks.items():
                if label == "tokenizer" or label in self.loss_parts or label.startswith("losses."):
                    module.to(memory_format=torch.channels_last)
        for label in self.config.activation_checkpointing:
            if label not in networks:
                raise UserError(f"trainer.activation_checkpointing names '{label}', which is not a network of this "
                                f"training; choose among {sorted(networks)}")
            module = networks[label][0]
            blocks = require(module, HasBlocks, what=f"{label} ('{self.names.get(label, type(module).__name__)}')",
                             needed_for=f"trainer.activation_checkpointing: [{label}]")
            for block in blocks.block_modules():
                _checkpoint_activations(block)
        if self.config.compile:
            for label, (module, through_forward) in networks.items():
                if supports(module, HasBlocks):
                    units: list[nn.Module] = list(cast(HasBlocks, module).block_modules())
                    for unit in units:
                        unit.compile(dynamic=False)
                elif through_forward:
                    module.compile(dynamic=False)

    @property
    def precision(self) -> str:
        """The step's precision on the components' device: ``fp32``, ``bf16`` or ``fp16`` (``auto`` resolved)."""
        if self.config.precision == "auto":
            return "bf16" if self.device.type == "cuda" else "fp32"
        return self.config.precision

    def autocast(self) -> Callable[[], Any] | None:
        """A factory of the step's autocast context (``None`` in fp32): what the forward passes run under."""
        precision = self.precision
        if precision == "fp32":
            return None
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        device_type = self.device.type
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)

    # -- the plan --------------------------------------------------------------------------------------------------
    def _modes(self, phase: str) -> dict[str, bool]:
        """Train (``True``) or eval mode of every module in the phase of ``phase``: the denoiser and its normaliser
        train only in the denoiser's own phase (REPA-E's alignment pass through the frozen denoiser runs in eval mode,
        with the running statistics); a trainable tokenizer and loss-owned parts (the discriminator, whose BatchNorm
        keeps batch statistics, as in REPA-E) stay in train mode; frozen components are in eval mode."""
        modes = {"denoiser": phase == "denoiser"}
        if self.normalizer is not None:
            modes["latent_norm"] = phase == "denoiser"
        if "tokenizer" in self.parts:
            modes["tokenizer"] = True
        for name in self.loss_parts:
            modes[name] = True
        return modes

    def _enter_phase(self, phase: str) -> None:
        for name, module in self.parts.items():
            module.requires_grad_(name == phase)
        modules = {"denoiser": self.denoiser, "latent_norm": self.normalizer, "tokenizer": self.tokenizer,
                   **{name: self.parts[name] for name in self.loss_parts}}
        for name, train in self._modes(phase).items():
            modules[name].train(train)

    def _plan(self, phase: str) -> DenoiserPlan:
        losses = [loss for _, loss in self._phase_losses(phase)]
        depths = sorted({d for loss in losses for d in loss.feature_depths})
        return DenoiserPlan(tuple(depths), any(loss.needs_prediction for loss in losses))

    def plan(self) -> StepPlan:
        """The step plan: per phase the part that trains, the others' modes, the normaliser's statistics, the losses
        with their weights, the stop-gradients and the denoiser pass. Generated from the same methods the step runs
        (:meth:`_modes`, :meth:`_plan`, ``DETACHED_OUTSIDE_TOKENIZER_PHASE``)."""
        phases = []
        reads_targets = {p: any(loss.needs_targets for _, loss in self._phase_losses(p)) for p in self.phases}
        needs_recon = any(loss.needs_recon for loss in self.losses.values())
        for phase in self.phases:
            modes = self._modes(phase)
            other = []
            for name in ("tokenizer", "denoiser", *sorted(self.loss_parts)):
                if name == phase or (name == "tokenizer" and self.tokenizer is None):
                    continue
                if name in self.parts:
                    other.append((name, f"frozen, {'train' if modes[name] else 'eval'} mode"))
                elif name == "tokenizer":
                    other.append((name, "frozen, eval mode (not trained)"))
            if self.encoders:
                other.append(("encoders", "frozen, eval mode" + (" (the alignment targets)" if
                                                                  reads_targets[phase] else ", not run")))
            norm = None
            if self.normalizer is not None:
                norm = ("batch statistics (global batch), running statistics updated" if modes["latent_norm"]
                        else "running statistics")
            detached = []
            if phase != "tokenizer" and "tokenizer" in self.parts:
                detached = [f"{name}.detach()" for name in DETACHED_OUTSIDE_TOKENIZER_PHASE
                            if name != "recon" or needs_recon]
            plan = self._plan(phase)
            pass_kind = "full" if plan.needs_prediction else ("features only" if plan.feature_depths else "none")
            losses = tuple((label, self.names.get(f"losses.{label}", type(loss).__name__), loss.weight(phase))
                           for label, loss in self._phase_losses(phase))
            phases.append(PhasePlan(phase, losses, tuple(other), norm, tuple(detached), plan.feature_depths,
                                    pass_kind))
        transport = repr(self.transport) if self.transport is not None else "none"
        return StepPlan(tuple(phases), transport, self._label_dropout())

    def example_inputs(self, batch_size: int) -> StepInputs:
        """Inputs of one micro-batch of ``batch_size`` with the shapes and dtypes the data would have (zeros, times
        drawn from a fixed generator), on the components' device: for checks on ``meta`` and FLOP counts."""
        device = self.device
        shape = self.latent_shape()
        images = latents = None
        if self.from_latents:
            latents = torch.zeros(batch_size, 2 * shape[0], *shape[1:], device=device)
        else:
            side = int(self.dataset.resolution)
            images = torch.zeros(batch_size, 3, side, side, dtype=torch.uint8, device=device)
        g = torch.Generator().manual_seed(0)
        t = self.transport.sample_time(batch_size, generator=g) if self.transport is not None \
            else torch.zeros(batch_size)
        return StepInputs(
            labels=torch.zeros(batch_size, dtype=torch.long, device=device), images=images, latents=latents,
            eps_posterior=torch.zeros(batch_size, *shape, device=device), t=t.to(device),
            noise=torch.zeros(batch_size, *shape, device=device),
            drop_labels=torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    def check_step(self, batch_size: int = 2) -> None:
        """Run one step's forward passes (every phase, every loss) on the components' device without a backward
        pass, with inputs of the shapes the data would have. Meant for ``meta`` (dry runs): a shape mismatch between
        components then surfaces as a :class:`RecipeError` naming the phase, the loss and the message, before any
        data is read. (On a real device it would update BatchNorm statistics.)"""
        inputs = self.example_inputs(batch_size)
        problems = []
        root = self._root_context(inputs, step=0)
        try:
            for phase in self.phases:
                self._enter_phase(phase)
                ctx = root.for_phase(phase, self._plan(phase))
                for label, loss in self._phase_losses(phase):
                    try:
                        terms = loss(ctx)
                        value = terms["loss"]
                        if value.numel() != 1:
                            raise ValueError(f"its 'loss' term has shape {tuple(value.shape)}, not a scalar")
                    except (UserError, RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
                        problems.append(Problem(
                            "", f"losses.{label}",
                            f"one step on meta failed in the {phase} phase, loss '{label}': "
                            f"{describe_exception(exc)}",
                            "the shapes of the components do not fit (see the message); run `repae run --dry-run` "
                            "after each change"))
                        break
                if problems:
                    break
        finally:
            for module in self.parts.values():
                module.requires_grad_(True)
        if problems:
            raise RecipeError(problems)

    # -- one step --------------------------------------------------------------------------------------------------
    def _root_context(self, inputs: StepInputs, *, step: int) -> StepContext:
        root = StepContext(
            phase="", inputs=inputs, tokenizer=self.tokenizer, denoiser=self.denoiser,
            normalizer=self.normalizer, encoders=self.encoders, transport=self.transport, plan=DenoiserPlan(),
            step=step, autocast=self.autocast(), num_classes=getattr(self.denoiser, "num_classes", None),
        )
        root.shared["needs_recon"] = any(loss.needs_recon for loss in self.losses.values())
        return root

    def compute_gradients(
        self, micro_batches: Sequence[StepInputs], step: int, *, on_phase_end: Callable[[str], None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run every phase on every micro-batch and accumulate gradients; returns the terms to log (tensors).
        ``on_phase_end(phase)`` is called after each phase's backward pass (benchmarks time phases with it)."""
        logs: dict[str, torch.Tensor] = {}
        n = len(micro_batches)
        roots = [self._root_context(inputs, step=step) for inputs in micro_batches]
        # Phases outside, micro-batches inside: every micro-batch's tokenizer phase sees the same latent statistics
        # (the denoiser phases, which update them, come after), as one large batch would.
        with self._attention_kernel():
            for phase in self.phases:
                self._enter_phase(phase)
                plan = self._plan(phase)
                replica = self.replicas.get(phase)
                for index, root in enumerate(roots):
                    ctx = root.for_phase(phase, plan)

                    def objective(ctx: StepContext = ctx) -> torch.Tensor:
                        total = torch.zeros((), device=self.device)
                        for label, loss in self._phase_losses(phase):
                            terms = loss(ctx)
                            total = total + loss.weight(phase) * terms["loss"]
                            for key, value in terms.items():
                                name = f"{phase}/{label}" if key == "loss" else f"{phase}/{label}.{key}"
                                logs[name] = logs.get(name, 0.0) + value.detach().float() / n
                        return total

                    # Several processes: the phase's objective is one DDP forward of the part; its gradient buckets
                    # are all-reduced during the backward pass of the phase's last micro-batch only.
                    accumulate = replica is not None and index < n - 1
                    sync = replica.no_sync() if replica is not None and accumulate else contextlib.nullcontext()
                    with sync, distributed.quiet_stride_warnings(replica is not None):
                        value = replica(objective) if replica is not None else objective()
                        logs[f"{phase}/total"] = logs.get(f"{phase}/total", 0.0) + value.detach().float() / n
                        scaled = value / n
                        if self.scaler is not None:
                            scaled = self.scaler.scale(scaled)
                        scaled.backward()
                if replica is not None and phase not in self._checked_gradients:
                    self._check_all_parameters_reached(phase)
                if on_phase_end is not None:
                    on_phase_end(phase)
        for module in self.parts.values():
            module.requires_grad_(True)
        return logs

    def _check_all_parameters_reached(self, phase: str) -> None:
        """After the first DDP step of a part under gradient accumulation (no unused-parameter search): every trained
        parameter must have received a gradient, else DDP would fail at the next step with a message of its own."""
        self._checked_gradients.add(phase)
        if self._unused_search != "none":  # DDP finds unused parameters itself
            return
        missing = [name for name, p in self.parts[phase].named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(
                f"no loss of the {phase} phase reaches the {phase}'s parameters {shown}; with several processes "
                f"and trainer.grad_accum > 1 DistributedDataParallel needs every trained parameter used: set "
                f"trainer.static_graph=false (DDP then searches unused parameters every step)")

    def _attention_kernel(self) -> contextlib.AbstractContextManager[Any]:
        """The ``sdpa_backend`` of the recipe for the step's attention (``auto``: torch's own choice)."""
        if self.config.sdpa_backend == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[self.config.sdpa_backend]
        return sdpa_kernel(backend)

    def apply_gradients(self) -> dict[str, torch.Tensor]:
        """Clip per part, step every optimizer, update the EMA (gradients arrive averaged over processes: DDP)."""
        norms: dict[str, torch.Tensor] = {}
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else math.inf
        stepping = []
        for name, optimizer in self.optimizers.items():
            params = [p for p in self.parts[name].parameters() if p.grad is not None]
            if not params:
                continue
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            norms[f"{name}/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm)
            stepping.append(optimizer)
        # A non-finite gradient (a NaN/inf loss, or an overflow) skips the whole step: no update, no EMA move. One
        # host read per step (the flag); with fp16 the gradient scaler skips such steps itself.
        self.skipped_last = self.scaler is None and bool(norms) and not bool(
            torch.stack([torch.isfinite(n) for n in norms.values()]).all())
        for optimizer in stepping:
            if self.skipped_last:
                pass
            elif self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        if not self.skipped_last:
            self._shadow().update(self._ema_sources())
        return norms

    def _shadow(self) -> EMA:
        if self.ema is None:
            raise RuntimeError("the trainer is not set up: call setup() first")  # a bug, not a user error
        return self.ema

    def _ema_sources(self) -> dict[str, Any]:
        sources = {"denoiser": self.denoiser}
        if self.normalizer is not None:
            sources["latent_norm"] = self.normalizer
        return sources

    def train_step(self, micro_batches: Sequence[StepInputs], step: int) -> dict[str, torch.Tensor]:
        """One optimizer step; a skipped one (non-finite gradient) also restores the buffers its forward passes
        moved (BatchNorm running statistics), so that nothing of it remains."""
        buffers = [b for m in (*self.parts.values(), self.normalizer) if m is not None for b in m.buffers()
                   if b.is_floating_point()]
        saved = [b.clone() for b in buffers]
        logs = self.compute_gradients(micro_batches, step)
        logs.update(self.apply_gradients())
        if self.skipped_last:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
        self.step = step + 1
        return logs

    # -- inputs ----------------------------------------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents, from the contracts of the dataset and the tokenizer (no data is read)."""
        shape = latent_shape(self.dataset, self.tokenizer)
        if shape is None:
            raise UserError("the dataset and the tokenizer do not tell the latents' shape: a latent cache that is not "
                            "there, or a resolution the tokenizer's downsampling does not divide (`repae recipe "
                            "validate` names which)")
        return shape

    def _latent_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        if self.from_latents:
            return x.shape[1] // 2, x.shape[2], x.shape[3]
        f = self.tokenizer.downsample
        return self.tokenizer.latent_channels, x.shape[2] // f, x.shape[3] // f

    def _label_dropout(self) -> float:
        if self.config.label_dropout is not None:
            return self.config.label_dropout
        return float(getattr(self.denoiser, "class_dropout_prob", 0.0) or 0.0)

    def _step_randomness(self, step: int, shape: tuple[int, ...], batch: int) -> tuple[torch.Tensor, ...]:
        """Posterior noise, t, diffusion noise and the label-drop mask of the whole global batch of ``step``."""
        if self._randomness_cache and self._randomness_cache[0] == (step, shape, batch):
            return self._randomness_cache[1]
        # Drawn on the training device (a GPU draws a global batch in microseconds; the CPU took 11-22 ms at batch
        # 256): every process draws the same global batch and keeps its slice.
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        g = step_generator(self.seed, step, device=device)
        eps = torch.randn(batch, *shape, generator=g, device=device)
        t = self.transport.sample_time(batch, generator=g) if self.transport is not None \
            else torch.zeros(batch, device=device)
        noise = torch.randn(batch, *shape, generator=g, device=device)
        drop = torch.rand(batch, generator=g, device=device) < self._label_dropout()
        self._randomness_cache = ((step, shape, batch), (eps, t, noise, drop))
        return eps, t, noise, drop

    def make_inputs(self, step: int, micro: int, x: torch.Tensor, labels: torch.Tensor, order: StepOrder) -> StepInputs:
        """The micro-batch's inputs with randomness drawn for the global batch (seed, step) and sliced."""
        eps, t, noise, drop = self._step_randomness(step, self._latent_shape(x), order.batch_size)
        part = order.local_slice(micro)
        device = self.device
        non_blocking = device.type == "cuda"

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if non_blocking and tensor.device.type == "cpu" and not tensor.is_pinned():
                tensor = tensor.pin_memory()  # the DataLoader pins its batches already (pin_memory on CUDA)
            return tensor.to(device, non_blocking=non_blocking)

        images, latents = (None, move(x)) if self.from_latents else (move(x), None)
        return StepInputs(
            labels=move(labels), images=images, latents=latents, eps_posterior=move(eps[part]),
            t=move(t[part]), noise=move(noise[part]), drop_labels=move(drop[part]),
        )

    # -- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        models = {name: module.state_dict() for name, module in self.parts.items()}
        if self.normalizer is not None:
            models["latent_norm"] = self.normalizer.state_dict()
        for name, shadow in self._shadow().shadows.items():
            models[f"ema-{name}"] = shadow.state_dict()
        optimizers = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state = {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "elapsed_s": self.elapsed_s}
        return {"models": models, "optimizers": optimizers, "state": state}

    def load_state(self, checkpoint: Mapping[str, Any], *, source: str = "the checkpoint") -> None:
        """Restore a checkpoint; the optimizers keep the settings of the current recipe (lr, betas, ...)."""
        try:
            self._load_state(checkpoint)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(
                f"{source} does not fit this recipe's components ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                "A recipe that adds, removes or resizes a trained part cannot continue an old run: pass a new --out."
            ) from None
        for name, optimizer in self.optimizers.items():
            cfg = self._optimizer_config(name)
            for group in optimizer.param_groups:
                group.update(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)

    def _load_state(self, checkpoint: Mapping[str, Any]) -> None:
        from repae.train.checkpoint import restore_model, restore_optimizer

        # One checker for every part (repae.weights.check_state_dict): the file, the part, the first mismatching keys
        for name, module in self.parts.items():
            restore_model(checkpoint, name, module)
        if self.normalizer is not None and "latent_norm" in checkpoint["models"]:
            restore_model(checkpoint, "latent_norm", self.normalizer)
        for name, shadow in self._shadow().shadows.items():
            restore_model(checkpoint, f"ema-{name}", shadow)
        for name, optimizer in self.optimizers.items():
            restore_optimizer(checkpoint, name, optimizer)
        scaler_state = checkpoint["state"].get("scaler")
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.step = int(checkpoint["state"]["step"])
        self.elapsed_s = float(checkpoint["state"].get("elapsed_s") or 0.0)

    # -- sampling during training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path) -> Path | None:
        """A class-balanced grid from the EMA denoiser through the recipe's sampler, de-normalised and decoded."""
        if self.sampler is None or self.tokenizer is None:
            return None
        count = self.config.sample_count
        num_classes = getattr(self.denoiser, "num_classes", 1)
        labels = torch.arange(count, device=self.device) % num_classes
        noise = torch.randn(count, *self.latent_shape(),
                            generator=step_generator(self.seed, self.step, stream=2)).to(self.device)
        denoiser = self._shadow()["denoiser"]
        latents = self.sampler(denoiser, noise, labels, generator=step_generator(self.seed, self.step, stream=3))
        norm = self._shadow()["latent_norm"] if "latent_norm" in self._shadow().shadows else None
        images = decode_latents(self.tokenizer, norm, latents).cpu()
        return save_grid(images, path, labels=labels.tolist() if (num_classes or 1) > 1 else None)

    # -- the loop --------------------------------------------------------------------------------------------------
    def run(self, run_dir: Path, *, progress: bool = True) -> None:
        """Train to ``config.steps``, resuming from the latest checkpoint in ``run_dir`` if there is one.

        SIGTERM or SIGINT (preemption, Ctrl-C) stops after the current step with a checkpoint written and
        :class:`repae.errors.StopRequested` raised (the CLI exits with 128 + the signal's number); the same command
        resumes. After ``max_nonfinite_steps`` skipped steps in a row training stops with the last good state saved."""
        run_dir = Path(run_dir)
        topo_rank, world = distributed.rank(), distributed.world_size()
        is_main = topo_rank == 0
        self.setup()
        found = distributed.broadcast_object(latest_checkpoint(run_dir) if is_main else None)
        if isinstance(found, Path):
            self.load_state(load_checkpoint(found), source=str(found))
            if is_main:
                _say(f"resuming from {found} (step {self.step} of {self.config.steps})")
        order = StepOrder(len(self.dataset), self.config.batch_size, self.config.grad_accum, world, topo_rank,
                          self.seed)
        trackers = Trackers([(f"trackers.{i}", self.names.get(f"trackers.{i}", type(t).__name__), t)
                             for i, t in enumerate(self.trackers)]) if is_main else None
        metrics: MetricsLog | None = None
        ok = False
        try:
            if trackers is not None:
                trackers.start(run_dir, self.step)  # a tracker that cannot start stops the run before step 1
                metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=self.step, trackers=trackers)
            with progress_bar("train", self.config.steps, completed=self.step, unit="it", elapsed=self.elapsed_s,
                              enabled=progress and is_main) as bar, _StopSignals() as signals:
                self._loop(run_dir, order, metrics, bar, is_main, signals)
            ok = True
        except StopRequested:
            ok = True  # stopped by a signal with a checkpoint: the run continues later
            raise
        finally:
            if metrics is not None:
                metrics.close(ok=ok)
            elif trackers is not None:
                trackers.finish(ok=False)

    def _loop(self, run_dir: Path, order: StepOrder, metrics: MetricsLog | None, bar: Any, is_main: bool,
              signals: _StopSignals | None = None) -> None:
        cfg = self.config
        loader = iter(self.loader(order, self.step, cfg.steps))
        started = time.perf_counter() - self.elapsed_s
        pending: dict[str, Any] = {}
        pending_steps = 0
        last_time, last_step = time.perf_counter(), self.step
        streak = 0
        while self.step < cfg.steps:
            step = self.step
            micro = []
            for m in range(cfg.grad_accum):
                x, labels = next(loader)
                micro.append(self.make_inputs(step, m, x, labels, order))
            logs = self.train_step(micro, step)
            self.elapsed_s = time.perf_counter() - started
            streak = streak + 1 if self.skipped_last else 0
            if self.skipped_last:
                if is_main:
                    bad = ", ".join(k.split("/")[0] for k, v in logs.items()
                                    if k.endswith("grad_norm") and not bool(torch.isfinite(v)))
                    _say(f"warning: step {step + 1}: the gradient of {bad or 'a part'} is not finite (NaN or inf); "
                         f"the step was skipped ({streak} in a row, stopping at {cfg.max_nonfinite_steps})")
            diverged = streak >= cfg.max_nonfinite_steps
            for key, value in logs.items():
                pending[key] = pending.get(key, 0.0) + value.detach().float()
            pending["skipped_steps"] = pending.get("skipped_steps", 0.0) + float(self.skipped_last)
            pending_steps += 1
            done = self.step
            if done % cfg.log_every == 0 or done == cfg.steps or diverged:
                skipped_images = getattr(self.dataset, "num_skipped", None)  # datasets that skip unreadable files
                if skipped_images is not None:
                    pending["data/skipped_images"] = float(skipped_images) * pending_steps
                distributed.all_reduce_mean_values(pending)  # logged: the global batch's means, not process 0's
                values = {k: v / pending_steps for k, v in summarize(pending).items()}
                values["skipped_steps"] = round(values["skipped_steps"] * pending_steps)
                if "data/skipped_images" in values:  # a count so far, summed over the processes
                    values["data/skipped_images"] = round(values["data/skipped_images"] * distributed.world_size())
                pending.clear()
                pending_steps = 0
                now = time.perf_counter()
                seconds = max(now - last_time, 1e-9)
                speed = {"it_per_s": (done - last_step) / seconds,
                         "img_per_s": (done - last_step) * cfg.batch_size / seconds}
                last_time, last_step = now, done
                losses = [f"{k}={v:.4g}" for k, v in values.items()
                          if not k.endswith("grad_norm") and k != "skipped_steps" and not k.startswith("data/")]
                bar.update(done, text="  ".join([f"{speed['img_per_s']:.1f} img/s", *losses]))
                if metrics is not None:
                    metrics.write(done, {**values, **speed, "elapsed_s": self.elapsed_s})
            if diverged:  # nothing saved: the weights that led here would diverge again
                last = latest_checkpoint(run_dir) if is_main else None
                since = f"the last checkpoint, {last}, is from before it" if last is not None else \
                    "no checkpoint was written before it (training restarts from step 0)"
                raise UserError(
                    f"training diverged: {streak} steps in a row had a non-finite loss or gradient (the last at "
                    f"step {done}); {since}. Lower the learning rate (trainer.optimizers.*.lr) or clip gradients "
                    "(trainer.clip_grad_norm), then rerun with the same --out (--allow-recipe-change), or checkpoint "
                    "more often (trainer.checkpoint_every)")
            saved = False
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                self._save(run_dir, is_main)
                saved = True
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps) and is_main:
                grid = self.sample_grid(run_dir / "samples" / f"step-{done:07d}.png")
                if grid is not None and metrics is not None:
                    metrics.image(done, "samples", grid)
            received = signals.received if signals is not None else 0
            if distributed.any_process(received != 0) and done < cfg.steps:
                if is_main:
                    again = " (Ctrl-C again to stop at once)" if received == signal.SIGINT else ""
                    _say(f"{signal.Signals(received or signal.SIGTERM).name} received: writing a checkpoint of "
                         f"step {done}{again}")
                if not saved:
                    self._save(run_dir, is_main)
                number = received or signal.SIGTERM  # another process was signalled
                raise StopRequested(
                    f"by {signal.Signals(number).name} after step {done} of {cfg.steps}: checkpoint written to "
                    f"{run_dir / 'checkpoints'}; run the same command to resume", exit_code=128 + int(number))

    def _save(self, run_dir: Path, is_main: bool) -> None:
        if is_main:
            state = self.state()
            save_checkpoint(run_dir, self.step, models=state["models"], optimizers=state["optimizers"],
                            state=state["state"], keep=self.config.keep_checkpoints)
        distributed.barrier()

    def loader(self, order: StepOrder, start: int, end: int) -> Any:
        """This process's micro-batches ``(x, labels)`` for steps ``start`` .. ``end - 1``, in order: one
        ``DataLoader`` for the whole range (its ``num_workers`` processes start once and prefetch across epochs;
        batches pinned for CUDA). Items are read as ``(index, epoch)``, so that ``set_epoch`` runs in the process
        that reads them (a worker too) and every item stays a pure function of (config, index, epoch)."""
        from torch.utils.data import DataLoader

        workers = self.config.num_workers
        return DataLoader(_EpochItems(self.dataset), batch_sampler=_RunBatches(order, start, end),
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if workers else None,
                          worker_init_fn=_ignore_stop_signals if workers else None)


def _ignore_stop_signals(worker_id: int) -> None:
    """In DataLoader workers: SIGTERM/SIGINT sent to the whole process group (SLURM signals every process of a job
    step; Ctrl-C reaches the group) are the main process's to handle; a worker that died of one would crash the run
    before it could write its checkpoint. Workers still end with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _EpochItems(torch.utils.data.Dataset):
    """A dataset read by ``(index, epoch)`` keys: calls the dataset's ``set_epoch`` when the epoch changes, in
    whichever process reads."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if epoch != self.epoch:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]


class _RunBatches:
    """The batch sampler of :meth:`PhasedTrainer.loader`: this process's micro-batches of each step, as
    ``(index, epoch)`` lists."""

    def __init__(self, order: StepOrder, start: int, end: int) -> None:
        self.order, self.start, self.end = order, start, end

    def __len__(self) -> int:
        return max(self.end - self.start, 0) * self.order.grad_accum

    def __iter__(self) -> Any:
        for step in range(self.start, self.end):
            epoch = self.order.epoch_of(step)
            for indices in self.order.local_batches(step, step + 1):
                yield [(index, epoch) for index in indices]


class _StopSignals:
    """While training: SIGTERM and SIGINT set :attr:`received` (the signal's number) instead of killing the process,
    so that the loop stops after the current step with a checkpoint; a second SIGINT interrupts at once. Installed
    only in the main thread (signal handlers cannot be set elsewhere)."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.received == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = number  # reported by the loop (printing inside a signal handler can re-enter stderr)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)


def _component(built: Mapping[str, Any], slot: str) -> Any:
    """The component of a slot (``None`` when the recipe has none), typed ``Any`` (``Mapping.get`` would give
    ``Any | None``, which mypy then narrows): it is a plugin's own class, used through its contract."""
    return built.get(slot)


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)



def _on_meta(module: Any) -> bool:
    param = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return param is not None and param.device.type == "meta"


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass (``torch.utils.checkpoint``, non-reentrant) instead of
    storing them; the block's parameters and state-dict keys are unchanged."""
    from torch.utils.checkpoint import checkpoint

    def checkpointed(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = type(self).forward.__get__(self)  # the class's forward of *this* module (a deepcopy rebinds)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = types.MethodType(checkpointed, block)  # type: ignore[method-assign]
