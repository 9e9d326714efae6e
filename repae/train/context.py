"""What one training step computes, shared by every loss component, computed lazily and at most once.

A step runs one *phase* per trainable part (``tokenizer``, then loss-owned parts such as ``discriminator``, then
``denoiser``; see :mod:`repae.train.engine`). Quantities of the tokenizer forward pass (posterior, ``z``, ``recon``),
the encoder targets, ``t`` and the noise are computed once per step and shared by every phase; outside the tokenizer
phase ``z`` and ``recon`` are detached (the stop-gradient of REPA-E). Quantities that depend on the modes of the
denoiser and the normaliser (the normalised latent, ``x_t``, the denoiser pass) are computed once per phase.

Losses read what they need::

    ctx.recon            # decoded images, [-1, 1]
    ctx.targets          # list of encoder token tensors [B, N, D]
    ctx.denoised         # DenoiserOutput of this phase's single denoiser pass
    ctx.x0, ctx.x_t, ctx.t, ctx.noise, ctx.target
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

    from repae.interfaces import DenoiserOutput, Transport

__all__ = ["StepContext", "StepInputs", "DenoiserPlan"]


@dataclass
class StepInputs:
    """The batch and the randomness a step consumes. Anything left ``None`` is drawn by the engine from a generator
    seeded with (recipe seed, step), so that a step is a pure function of its inputs (exact resume, DDP = single
    process). Tests inject every tensor to reproduce a reference step."""

    labels: Tensor
    images: Tensor | None = None
    """uint8 ``[B, 3, H, W]`` (the dataset's images), or ``None`` when training from cached latents."""
    latents: Tensor | None = None
    """Cached posterior parameters ``[B, 2C, h, w]`` (mean and std concatenated), for frozen-tokenizer trainings."""
    eps_posterior: Tensor | None = None
    t: Tensor | None = None
    noise: Tensor | None = None
    drop_labels: Tensor | None = None
    """bool ``[B]``: labels replaced by the null class (classifier-free guidance dropout)."""
    targets: list[Tensor] | None = None
    """Precomputed representation targets, one ``[B, N, D]`` tensor per encoder (else the encoders run)."""


@dataclass(frozen=True)
class DenoiserPlan:
    """What this phase's single denoiser pass must return."""

    feature_depths: tuple[int, ...] = ()
    needs_prediction: bool = False


@dataclass
class StepContext:
    """Lazy, cached quantities of one step for the phase ``phase``. Built by the engine; read by losses."""

    phase: str
    inputs: StepInputs
    tokenizer: Any
    denoiser: Any
    normalizer: Any
    encoders: Sequence[Any]
    transport: Transport
    plan: DenoiserPlan
    step: int = 0
    shared: dict[str, Any] = field(default_factory=dict)
    """Per-step cache shared by all phases (tokenizer pass, targets, t, noise)."""
    cache: dict[str, Any] = field(default_factory=dict)
    """Per-phase cache."""
    num_classes: int | None = None
    autocast: Any = None
    """A context-manager factory for the forward passes (mixed precision); ``None`` = no autocast."""

    # -- per step ------------------------------------------------------------------------------------------------
    @property
    def labels(self) -> Tensor:
        return self.inputs.labels

    @property
    def raw_images(self) -> Tensor | None:
        return self.inputs.images

    @property
    def images(self) -> Tensor | None:
        """The batch's images as float in ``[-1, 1]`` (``uint8 / 127.5 - 1``)."""
        if self.inputs.images is None:
            return None
        if "images" not in self.shared:
            self.shared["images"] = self.inputs.images.float() / 127.5 - 1.0
        return self.shared["images"]

    def _tokenizer_pass(self) -> None:
        """Encode, sample and decode once per step; with gradients when the tokenizer is being trained."""
        if "z" in self.shared:
            return
        import torch

        if self.inputs.latents is not None:  # cached posterior (mean, std)
            mean, std = self.inputs.latents.float().chunk(2, dim=1)
            eps = self.inputs.eps_posterior
            self.shared["posterior"] = None
            self.shared["z"] = mean + std * eps
            self.shared["recon"] = None
            return
        grad = self.phase == "tokenizer"
        with torch.set_grad_enabled(grad), self._autocast():
            posterior = self.tokenizer.encode(self.images)
            z = posterior.sample(self.inputs.eps_posterior)
            recon = self.tokenizer.decode(z) if self._needs_recon else None
        self.shared.update(posterior=posterior, z=z, recon=recon)

    @property
    def _needs_recon(self) -> bool:
        return bool(self.shared.get("needs_recon", True))

    @property
    def posterior(self) -> Any:
        self._tokenizer_pass()
        return self.shared["posterior"]

    @property
    def z(self) -> Tensor:
        """Tokenizer latents (un-normalised). Detached outside the tokenizer phase: the stop-gradient."""
        self._tokenizer_pass()
        z = self.shared["z"]
        return z if self.phase == "tokenizer" else z.detach()

    @property
    def recon(self) -> Tensor | None:
        """The decoded latents; detached outside the tokenizer phase (the discriminator sees the pre-update recon)."""
        self._tokenizer_pass()
        recon = self.shared["recon"]
        return recon if recon is None or self.phase == "tokenizer" else recon.detach()

    @property
    def targets(self) -> list[Tensor]:
        """Representation-encoder tokens for the batch, one tensor per encoder (no gradient)."""
        if "targets" not in self.shared and self.inputs.targets is not None:
            self.shared["targets"] = list(self.inputs.targets)
        if "targets" not in self.shared:
            import torch

            with torch.no_grad(), self._autocast():
                self.shared["targets"] = [enc(self.inputs.images).float() for enc in self.encoders]
        return self.shared["targets"]

    @property
    def t(self) -> Tensor:
        return self.inputs.t

    @property
    def noise(self) -> Tensor:
        return self.inputs.noise

    # -- per phase -----------------------------------------------------------------------------------------------
    @property
    def x0(self) -> Tensor:
        """The normalised latent the diffusion runs on (normaliser in this phase's mode)."""
        if "x0" not in self.cache:
            z = self.z
            self.cache["x0"] = self.normalizer.normalize(z) if self.normalizer is not None else z
        return self.cache["x0"]

    @property
    def x_t(self) -> Tensor:
        if "x_t" not in self.cache:
            self.cache["x_t"] = self.transport.interpolate(self.x0, self.noise, self.t)
        return self.cache["x_t"]

    @property
    def target(self) -> Tensor:
        """The denoiser's regression target (velocity or noise) for this phase's ``x0``."""
        if "target" not in self.cache:
            self.cache["target"] = self.transport.target(self.x0, self.noise, self.t)
        return self.cache["target"]

    @property
    def denoised(self) -> DenoiserOutput:
        """This phase's single denoiser pass, with the hidden tokens every loss of the phase asked for."""
        if "denoised" not in self.cache:
            with self._autocast():
                self.cache["denoised"] = self.denoiser(
                    self.x_t,
                    self.transport.model_time(self.t),
                    self.labels,
                    feature_depths=self.plan.feature_depths,
                    features_only=not self.plan.needs_prediction,
                    force_drop=self._drop_labels(),
                )
        return self.cache["denoised"]

    def _drop_labels(self) -> Tensor | None:
        """The label-dropout mask in the denoiser's own (training) phase; no dropout when the denoiser is frozen in
        eval mode (REPA-E's alignment pass), as the reference drops labels only in training mode."""
        drop = self.inputs.drop_labels
        if drop is None or self.phase == "denoiser":
            return drop
        return torch.zeros_like(drop)

    def _autocast(self) -> Any:
        import contextlib

        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def for_phase(self, phase: str, plan: DenoiserPlan) -> StepContext:
        """The context of the next phase: same step-level cache, fresh phase-level cache."""
        return StepContext(
            phase=phase, inputs=self.inputs, tokenizer=self.tokenizer, denoiser=self.denoiser,
            normalizer=self.normalizer, encoders=self.encoders, transport=self.transport, plan=plan, step=self.step,
            shared=self.shared, num_classes=self.num_classes, autocast=self.autocast,
        )

