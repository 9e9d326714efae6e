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
- REPA-E: + VAE regularisers and ``repa`` (weight 1.5) updating ``[tokenizer]``, a ``patchgan`` updating
  ``[tokenizer, discriminator]``, and the latent ``batchnorm`` normaliser.

Randomness a step consumes (posterior noise, t, diffusion noise, label dropout) is drawn for the whole global batch
from a generator seeded by (seed, step) and sliced per process, so a step is a pure function of the recipe and the
step number: resuming is exact, and N processes compute what one process computes on the same global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repae.errors import UserError
from repae.generate import decode_latents
from repae.train import distributed
from repae.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from repae.train.config import OptimizerConfig, TrainerConfig
from repae.train.context import DenoiserPlan, StepContext, StepInputs
from repae.train.data import StepOrder, step_generator
from repae.train.ema import EMA
from repae.train.losses import check_updates
from repae.train.observe import MetricsLog, Progress, save_grid, summarize

__all__ = ["Trainer", "build_trainer", "default_transport"]


def build_trainer(config: TrainerConfig, context: Any) -> Trainer:
    """Factory of the ``default`` trainer: takes the components built before it from ``context.built``."""
    return Trainer(config, context.built, seed=getattr(context, "seed", 0))


class _LinearFlow:
    """The default forward process when no loss provides one: linear interpolant, v target, t ~ U[0, 1)."""

    def sample_time(self, batch: int, *, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(batch, generator=generator)

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t


def default_transport() -> _LinearFlow:
    return _LinearFlow()


class Trainer:
    """Trains the components of a recipe. Build it through the registry (``trainer: {name: default}``)."""

    def __init__(self, config: TrainerConfig, built: Mapping[str, Any], *, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        self.dataset = built.get("dataset")
        self.tokenizer = built.get("tokenizer")
        self.encoders: list[nn.Module] = list(built.get("encoders") or [])
        self.normalizer = built.get("latent_norm")
        self.denoiser = built.get("denoiser")
        self.losses: dict[str, Any] = dict(built.get("losses") or {})
        self.sampler = built.get("sampler")
        problems = []
        if self.denoiser is None:
            problems.append("a `denoiser`")
        if self.dataset is None:
            problems.append("a `dataset`")
        if not self.losses:
            problems.append("`losses` (e.g. losses: {diffusion: {name: flow-matching}})")
        if problems:
            raise UserError(f"the trainer needs {', '.join(problems)} in the recipe")
        if getattr(self.dataset, "kind", "images") == "images" and self.tokenizer is None:
            raise UserError("an image dataset needs a `tokenizer` to turn images into latents")
        if getattr(self.dataset, "kind", "images") == "latents" and self.tokenizer is not None:
            check = getattr(self.dataset, "check_tokenizer", None)
            if callable(check):
                check(self.tokenizer)  # the cache must come from this very tokenizer

        self.parts: dict[str, nn.Module] = {"denoiser": self.denoiser}
        if any("tokenizer" in loss.updates for loss in self.losses.values()):
            if self.tokenizer is None or getattr(self.dataset, "kind", "images") == "latents":
                raise UserError("a loss updates the tokenizer, but the recipe trains from cached latents or has none")
            self.parts["tokenizer"] = self.tokenizer
        self.loss_parts: set[str] = set()
        for loss in self.losses.values():
            for name, module in loss.parts().items():
                self.parts[name] = module
                self.loss_parts.add(name)
        for label, loss in self.losses.items():
            try:
                check_updates(loss, set(self.parts), label)
            except ValueError as exc:
                raise UserError(str(exc)) from None
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
        self.transport = transports[0][1] if transports else default_transport()
        self._frozen = [m for m in (self.tokenizer, *self.encoders) if m is not None and m not in self.parts.values()]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.ema: EMA | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.step = 0
        self._randomness_cache: tuple | None = None

    # -- setup -----------------------------------------------------------------------------------------------------
    def _phase_losses(self, phase: str) -> list[tuple[str, Any]]:
        return [(label, loss) for label, loss in self.losses.items() if phase in loss.updates]

    def _optimizer_config(self, part: str) -> OptimizerConfig:
        configured = self.config.optimizers
        return configured.get(part) or configured.get("default") or OptimizerConfig()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def setup(self) -> None:
        """Freeze what does not train, move loss-owned parts to the device, create optimizers, EMA and scaler."""
        device = self.device
        for module in self._frozen:
            module.requires_grad_(False)
            module.eval()
        for label, loss in self.losses.items():
            loss.to(device)
        for name, module in self.parts.items():
            params = [p for p in module.parameters()]
            if not params:
                raise UserError(f"the trainable part '{name}' has no parameters")
            cfg = self._optimizer_config(name)
            self.optimizers[name] = torch.optim.AdamW(
                params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps
            )
        tracked = {"denoiser": self.denoiser}
        if self.normalizer is not None:
            adopt = getattr(self.normalizer, "init_from_denoiser", None)
            if callable(adopt):  # a REPA-E checkpoint's latent BatchNorm statistics, loaded with the denoiser
                adopt(self.denoiser)
            tracked["latent_norm"] = self.normalizer
        self.ema = EMA(tracked, self.config.ema_decay)
        if self._precision(device) == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        if device.type == "cuda" and self.config.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.config.compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile the denoiser and the tokenizer's encoder and decoder in place (state-dict keys unchanged)."""
        self.denoiser.compile()
        for name in ("encoder", "decoder"):
            child = getattr(self.tokenizer, name, None) if self.tokenizer is not None else None
            if isinstance(child, nn.Module):
                child.compile()

    def _precision(self, device: torch.device) -> str:
        if self.config.precision == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return self.config.precision

    def _autocast(self) -> Callable[[], Any] | None:
        precision = self._precision(self.device)
        if precision == "fp32":
            return None
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        device_type = self.device.type
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)

    # -- one step --------------------------------------------------------------------------------------------------
    def _enter_phase(self, phase: str) -> None:
        for name, module in self.parts.items():
            module.requires_grad_(name == phase)
        in_denoiser_phase = phase == "denoiser"
        self.denoiser.train(in_denoiser_phase)
        if self.normalizer is not None:
            self.normalizer.train(in_denoiser_phase)
        if "tokenizer" in self.parts:
            self.tokenizer.train(True)
        for name in self.loss_parts:  # a loss-owned part (the discriminator) stays in train mode, as in REPA-E
            self.parts[name].train(True)

    def _plan(self, phase: str) -> DenoiserPlan:
        losses = [loss for _, loss in self._phase_losses(phase)]
        depths = sorted({d for loss in losses for d in loss.feature_depths})
        return DenoiserPlan(tuple(depths), any(loss.needs_prediction for loss in losses))

    def compute_gradients(
        self, micro_batches: Sequence[StepInputs], step: int, *, on_phase_end: Callable[[str], None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run every phase on every micro-batch and accumulate gradients; returns the terms to log (tensors).
        ``on_phase_end(phase)`` is called after each phase's backward pass (benchmarks time phases with it)."""
        logs: dict[str, torch.Tensor] = {}
        n = len(micro_batches)
        needs_recon = any(loss.needs_recon for loss in self.losses.values())
        roots = []
        for inputs in micro_batches:
            root = StepContext(
                phase="", inputs=inputs, tokenizer=self.tokenizer, denoiser=self.denoiser,
                normalizer=self.normalizer, encoders=self.encoders, transport=self.transport, plan=DenoiserPlan(),
                step=step, autocast=self._autocast(), num_classes=getattr(self.denoiser, "num_classes", None),
            )
            root.shared["needs_recon"] = needs_recon
            roots.append(root)
        # Phases outside, micro-batches inside: every micro-batch's tokenizer phase sees the same latent statistics
        # (the denoiser phases, which update them, come after), as one large batch would.
        for phase in self.phases:
            self._enter_phase(phase)
            plan = self._plan(phase)
            for root in roots:
                ctx = root.for_phase(phase, plan)
                objective: torch.Tensor | float = 0.0
                for label, loss in self._phase_losses(phase):
                    terms = loss(ctx)
                    objective = objective + loss.weight(phase) * terms["loss"]
                    for key, value in terms.items():
                        name = f"{phase}/{label}" if key == "loss" else f"{phase}/{label}.{key}"
                        logs[name] = logs.get(name, 0.0) + value.detach().float() / n
                logs[f"{phase}/total"] = logs.get(f"{phase}/total", 0.0) + objective.detach().float() / n
                scaled = objective / n
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            if on_phase_end is not None:
                on_phase_end(phase)
        for module in self.parts.values():
            module.requires_grad_(True)
        return logs

    def apply_gradients(self) -> dict[str, torch.Tensor]:
        """Average gradients over processes, clip per part, step every optimizer, update the EMA."""
        norms: dict[str, torch.Tensor] = {}
        max_norm = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else math.inf
        for name, optimizer in self.optimizers.items():
            params = [p for p in self.parts[name].parameters() if p.grad is not None]
            if not params:
                continue
            distributed.all_reduce_mean_([p.grad for p in params])
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            norms[f"{name}/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        self.ema.update(self._ema_sources())
        return norms

    def _ema_sources(self) -> dict[str, nn.Module]:
        sources = {"denoiser": self.denoiser}
        if self.normalizer is not None:
            sources["latent_norm"] = self.normalizer
        return sources

    def train_step(self, micro_batches: Sequence[StepInputs], step: int) -> dict[str, torch.Tensor]:
        logs = self.compute_gradients(micro_batches, step)
        logs.update(self.apply_gradients())
        self.step = step + 1
        return logs

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _latent_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        if getattr(self.dataset, "kind", "images") == "latents":
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
        g = step_generator(self.seed, step)
        eps = torch.randn(batch, *shape, generator=g)
        t = self.transport.sample_time(batch, generator=g)
        noise = torch.randn(batch, *shape, generator=g)
        drop = torch.rand(batch, generator=g) < self._label_dropout()
        self._randomness_cache = ((step, shape, batch), (eps, t, noise, drop))
        return eps, t, noise, drop

    def make_inputs(self, step: int, micro: int, x: torch.Tensor, labels: torch.Tensor, order: StepOrder) -> StepInputs:
        """The micro-batch's inputs with randomness drawn for the global batch (seed, step) and sliced."""
        eps, t, noise, drop = self._step_randomness(step, self._latent_shape(x), order.batch_size)
        part = order.local_slice(micro)
        device = self.device
        non_blocking = device.type == "cuda"

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if non_blocking:
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=non_blocking)

        images, latents = (None, move(x)) if getattr(self.dataset, "kind", "images") == "latents" else (
            move(x), None)
        return StepInputs(
            labels=move(labels), images=images, latents=latents, eps_posterior=move(eps[part]),
            t=move(t[part]), noise=move(noise[part]), drop_labels=move(drop[part]),
        )

    # -- state -----------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        models = {name: module.state_dict() for name, module in self.parts.items()}
        if self.normalizer is not None:
            models["latent_norm"] = self.normalizer.state_dict()
        for name, shadow in self.ema.shadows.items():
            models[f"ema-{name}"] = shadow.state_dict()
        optimizers = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state = {"scaler": self.scaler.state_dict() if self.scaler is not None else None}
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
        models = checkpoint["models"]
        for name, module in self.parts.items():
            module.load_state_dict(models[name])
        if self.normalizer is not None and "latent_norm" in models:
            self.normalizer.load_state_dict(models["latent_norm"])
        for name, shadow in self.ema.shadows.items():
            shadow.load_state_dict(models[f"ema-{name}"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        scaler_state = checkpoint["state"].get("scaler")
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.step = int(checkpoint["state"]["step"])

    # -- sampling during training -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path) -> Path | None:
        """A class-balanced grid from the EMA denoiser through the recipe's sampler, de-normalised and decoded."""
        if self.sampler is None or self.tokenizer is None:
            return None
        count = self.config.sample_count
        num_classes = getattr(self.denoiser, "num_classes", 1)
        labels = torch.arange(count, device=self.device) % num_classes
        example = self._sample_shape()
        noise = torch.randn(count, *example, generator=step_generator(self.seed, self.step, stream=2)).to(self.device)
        denoiser = self.ema["denoiser"]
        latents = self.sampler(denoiser, noise, labels, generator=step_generator(self.seed, self.step, stream=3))
        norm = self.ema["latent_norm"] if "latent_norm" in self.ema.shadows else None
        images = decode_latents(self.tokenizer, norm, latents).cpu()
        return save_grid(images, path)

    def _sample_shape(self) -> tuple[int, int, int]:
        x, _ = self.dataset[0]
        return self._latent_shape(x.unsqueeze(0))

    # -- the loop --------------------------------------------------------------------------------------------------
    def run(self, run_dir: Path, *, progress: bool = True) -> None:
        """Train to ``config.steps``, resuming from the latest checkpoint in ``run_dir`` if there is one."""
        run_dir = Path(run_dir)
        topo_rank, world = distributed.rank(), distributed.world_size()
        is_main = topo_rank == 0
        self.setup()
        found = distributed.broadcast_object(latest_checkpoint(run_dir) if is_main else None)
        if found is not None:
            self.load_state(load_checkpoint(found), source=str(found))
            if is_main:
                _say(f"resuming from {found} (step {self.step} of {self.config.steps})")
        order = StepOrder(len(self.dataset), self.config.batch_size, self.config.grad_accum, world, topo_rank,
                          self.seed)
        metrics = MetricsLog(run_dir / "metrics.jsonl",
                             tensorboard_dir=run_dir / "tensorboard" if self.config.tensorboard else None) \
            if is_main else None
        bar = Progress(self.config.steps, self.step, enabled=progress and is_main, batch_size=self.config.batch_size)
        try:
            self._loop(run_dir, order, metrics, bar, is_main)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()

    def _loop(self, run_dir: Path, order: StepOrder, metrics: MetricsLog | None, bar: Progress, is_main: bool) -> None:
        cfg = self.config
        loader = iter(self._loader(order, self.step, cfg.steps))
        started = time.perf_counter()
        pending: dict[str, torch.Tensor] = {}
        pending_steps = 0
        while self.step < cfg.steps:
            step = self.step
            micro = []
            for m in range(cfg.grad_accum):
                x, labels = next(loader)
                micro.append(self.make_inputs(step, m, x, labels, order))
            logs = self.train_step(micro, step)
            for key, value in logs.items():
                pending[key] = pending.get(key, 0.0) + value.detach().float()
            pending_steps += 1
            done = self.step
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = {k: v / pending_steps for k, v in summarize(pending).items()}
                pending.clear()
                pending_steps = 0
                speed = bar.update(done, {k: v for k, v in values.items() if not k.endswith("grad_norm")})
                if metrics is not None:
                    metrics.write(done, {**values, **speed, "elapsed_s": time.perf_counter() - started})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                self._save(run_dir, is_main)
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps) and is_main:
                self.sample_grid(run_dir / "samples" / f"step-{done:07d}.png")

    def _save(self, run_dir: Path, is_main: bool) -> None:
        if is_main:
            state = self.state()
            save_checkpoint(run_dir, self.step, models=state["models"], optimizers=state["optimizers"],
                            state=state["state"], keep=self.config.keep_checkpoints)
        distributed.barrier()

    def _loader(self, order: StepOrder, start: int, end: int):
        """Micro-batches for steps ``start`` .. ``end - 1`` through a DataLoader, one epoch at a time."""
        from torch.utils.data import DataLoader

        step = start
        while step < end:
            epoch = order.epoch_of(step)
            last = min(end, (epoch + 1) * order.steps_per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            batches = list(order.local_batches(step, last))
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.config.num_workers,
                                pin_memory=self.device.type == "cuda")
            yield from loader
            step = last


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message)
