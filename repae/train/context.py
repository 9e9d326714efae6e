"""What one training step computes, shared by every loss component, computed lazily and at most once.

A step runs one *phase* per trainable part (``tokenizer``, then loss-owned parts such as ``discriminator``, then
``denoiser``; :meth:`repae.PhasedTrainer.plan`). Quantities of the tokenizer pass (``posterior``, ``z``, ``recon``),
the encoder ``targets``, ``t`` and ``noise`` are computed once per step and shared by every phase; outside the
tokenizer phase ``z`` and ``recon`` are detached (REPA-E's stop-gradient). Quantities that depend on the modes of the
denoiser and the normaliser (``x0``, ``x_t``, ``target``, the denoiser pass) are computed once per phase.

What a loss may read (``B`` the micro-batch, ``C, h, w`` the latent shape, ``H = h * f`` the image side; "float" is
float32, or the autocast dtype inside mixed precision):

=================  ==============================  ===================================================================
member             shape, dtype                    meaning
=================  ==============================  ===================================================================
``phase``          str                             the part this phase trains (``tokenizer``, ``discriminator``, ...)
``step``           int                             the step being computed (0-based)
``labels``         int64 ``[B]``                   class labels in ``[0, num_classes)`` (before label dropout)
``raw_images``     uint8 ``[B, 3, H, W]``          the batch's images; ``None`` when training from cached latents
``images``         float32 ``[B, 3, H, W]``        ``raw_images / 127.5 - 1`` in ``[-1, 1]``; ``None`` likewise
``posterior``      :class:`Posterior`              the tokenizer's posterior (``None`` from cached latents); with
                                                   gradients in the tokenizer phase
``z``              float ``[B, C, h, w]``          the posterior sample ``mean + std * eps`` (un-normalised);
                                                   **detached outside the tokenizer phase** (the stop-gradient)
``recon``          float ``[B, 3, H, W]``          ``decode(z)`` in about ``[-1, 1]``, when some loss
                                                   ``needs_recon``; **detached outside the tokenizer phase**
``targets``        list of float32 ``[B, N, D_k]`` each encoder's tokens of the raw images; no gradient
``t``              ``[B]``                         float32 in ``[0, 1]`` (1 = noise) for a continuous transport; int64
                                                   steps in ``[0, T)`` for a discrete one (``transport.discrete_steps``)
``noise``          float32 ``[B, C, h, w]``        standard normal, the same in every phase of the step
``x0``             float ``[B, C, h, w]``          ``normalizer.normalize(z)`` in this phase's mode (eval: running
                                                   statistics; denoiser phase: batch statistics)
``x_t``            float ``[B, C, h, w]``          ``transport.interpolate(x0, noise, t)``
``target``         float ``[B, C, h, w]``          ``transport.target(x0, noise, t)`` (velocity, or the noise)
``denoised``       :class:`DenoiserOutput`         this phase's single denoiser pass on ``x_t`` with every
                                                   ``feature_depths`` of the phase's losses; ``prediction`` is
                                                   ``None`` unless some loss ``needs_prediction``
``prediction``     float ``[B, C_out, h, w]``      ``denoised.prediction`` (velocity, or noise [+ variance]); an
                                                   error when no loss of the phase ``needs_prediction``
``denoiser``, ``tokenizer``, ``normalizer``, ``encoders``, ``transport``: the components themselves (read-only)
=================  ==============================  ===================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

    from repae.interfaces import DenoiserOutput, Posterior, Transport

__all__ = ["DETACHED_OUTSIDE_TOKENIZER_PHASE", "DenoiserPlan", "StepContext", "StepInputs"]

DETACHED_OUTSIDE_TOKENIZER_PHASE = ("z", "recon")
"""What every phase but the tokenizer's reads detached: the stop-gradient of REPA-E (the denoiser trains on
``z.detach()``, the discriminator on ``recon.detach()``, both pre-update)."""


@dataclass
class StepInputs:
    """The batch and the randomness a step consumes. The engine draws every tensor from a generator seeded with
    (recipe seed, step) for the whole global batch and slices it per process, so that a step is a pure function of
    its inputs (exact resume, N processes = one process). Tests inject every tensor to reproduce a reference step."""

    labels: Tensor
    """int64 ``[B]``."""
    images: Tensor | None = None
    """uint8 ``[B, 3, H, W]`` (the dataset's images), or ``None`` when training from cached latents."""
    latents: Tensor | None = None
    """Cached posterior parameters ``[B, 2C, h, w]`` (mean and std concatenated), for frozen-tokenizer trainings."""
    eps_posterior: Tensor | None = None
    """Standard normal ``[B, C, h, w]``: ``z = mean + std * eps_posterior``."""
    t: Tensor | None = None
    """``[B]``, as the transport's ``sample_time`` draws it."""
    noise: Tensor | None = None
    """Standard normal ``[B, C, h, w]``: the diffusion noise."""
    drop_labels: Tensor | None = None
    """bool ``[B]``: labels replaced by the null class in the denoiser's phase (classifier-free guidance dropout)."""
    targets: list[Tensor] | None = None
    """Precomputed representation targets, one ``[B, N, D]`` tensor per encoder (else the encoders run)."""


@dataclass(frozen=True)
class DenoiserPlan:
    """What this phase's single denoiser pass must return."""

    feature_depths: tuple[int, ...] = ()
    needs_prediction: bool = False


@dataclass
class StepContext:
    """Lazy, cached quantities of one step in the phase ``phase`` (see the module's table). Built by the engine; read
    by losses (:class:`repae.Loss`)."""

    phase: str
    inputs: StepInputs
    tokenizer: Any
    denoiser: Any
    normalizer: Any
    encoders: Sequence[Any]
    transport: Transport | None
    plan: DenoiserPlan
    step: int = 0
    shared: dict[str, Any] = field(default_factory=dict)
    """Per-step cache shared by all phases (tokenizer pass, targets)."""
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
        """The batch's images as float32 in ``[-1, 1]`` (``uint8 / 127.5 - 1``)."""
        if self.inputs.images is None:
            return None
        if "images" not in self.shared:
            self.shared["images"] = self.inputs.images.float() / 127.5 - 1.0
        return self.shared["images"]  # type: ignore[no-any-return]

    def _tokenizer_pass(self) -> None:
        """Encode, sample and decode once per step; with gradients when the tokenizer is being trained."""
        if "z" in self.shared:
            return
        eps = self.inputs.eps_posterior
        if self.inputs.latents is not None:  # cached posterior (mean, std)
            mean, std = self.inputs.latents.float().chunk(2, dim=1)
            z = mean + std * (eps if eps is not None else torch.randn_like(std))
            self.shared.update(posterior=None, z=z, recon=None)
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

    def _stopped(self, name: str, value: Tensor | None) -> Tensor | None:
        if value is None or self.phase == "tokenizer" or name not in DETACHED_OUTSIDE_TOKENIZER_PHASE:
            return value
        return value.detach()

    @property
    def posterior(self) -> Posterior | None:
        self._tokenizer_pass()
        return self.shared["posterior"]  # type: ignore[no-any-return]

    @property
    def z(self) -> Tensor:
        """Tokenizer latents (un-normalised). Detached outside the tokenizer phase: the stop-gradient."""
        self._tokenizer_pass()
        z = self._stopped("z", self.shared["z"])
        assert z is not None
        return z

    @property
    def recon(self) -> Tensor | None:
        """The decoded latents; detached outside the tokenizer phase (the discriminator sees the pre-update recon)."""
        self._tokenizer_pass()
        return self._stopped("recon", self.shared["recon"])

    @property
    def targets(self) -> list[Tensor]:
        """Representation-encoder tokens for the batch, one tensor per encoder (no gradient)."""
        if "targets" not in self.shared and self.inputs.targets is not None:
            self.shared["targets"] = list(self.inputs.targets)
        if "targets" not in self.shared:
            with torch.no_grad(), self._autocast():
                with torch.no_grad():  # alignment targets: the contract says no gradient, whatever the encoder does
                    self.shared["targets"] = [enc(self.inputs.images).float() for enc in self.encoders]
        return self.shared["targets"]  # type: ignore[no-any-return]

    @property
    def t(self) -> Tensor:
        assert self.inputs.t is not None
        return self.inputs.t

    @property
    def noise(self) -> Tensor:
        assert self.inputs.noise is not None
        return self.inputs.noise

    # -- per phase -----------------------------------------------------------------------------------------------
    @property
    def x0(self) -> Tensor:
        """The normalised latent the diffusion runs on (normaliser in this phase's mode)."""
        if "x0" not in self.cache:
            z = self.z
            self.cache["x0"] = self.normalizer.normalize(z) if self.normalizer is not None else z
        return self.cache["x0"]  # type: ignore[no-any-return]

    def _transport(self) -> Transport:
        if self.transport is None:
            from repae.errors import UserError

            raise UserError("a loss reads x_t or the target, but no loss defines the diffusion process: add a "
                            "diffusion objective, e.g. `diffusion: {name: flow-matching}`")
        return self.transport

    @property
    def x_t(self) -> Tensor:
        if "x_t" not in self.cache:
            self.cache["x_t"] = self._transport().interpolate(self.x0, self.noise, self.t)
        return self.cache["x_t"]  # type: ignore[no-any-return]

    @property
    def target(self) -> Tensor:
        """The denoiser's regression target (velocity or noise) for this phase's ``x0``."""
        if "target" not in self.cache:
            self.cache["target"] = self._transport().target(self.x0, self.noise, self.t)
        return self.cache["target"]  # type: ignore[no-any-return]

    @property
    def denoised(self) -> DenoiserOutput:
        """This phase's single denoiser pass, with the hidden tokens every loss of the phase asked for."""
        if "denoised" not in self.cache:
            with self._autocast():
                self.cache["denoised"] = self.denoiser(
                    self.x_t,
                    self._transport().model_time(self.t),
                    self.labels,
                    feature_depths=self.plan.feature_depths,
                    features_only=not self.plan.needs_prediction,
                    force_drop=self._drop_labels(),
                )
        return self.cache["denoised"]  # type: ignore[no-any-return]

    @property
    def prediction(self) -> Tensor:
        """``denoised.prediction``: ``[B, C_out, h, w]``, for a loss that declares ``needs_prediction = True``."""
        prediction = self.denoised.prediction
        if prediction is None:
            from repae.errors import UserError

            raise UserError("a loss reads the denoiser's prediction, but no loss of this phase declares "
                            "needs_prediction = True (the pass stopped after the deepest feature depth)")
        return prediction

    def _drop_labels(self) -> Tensor | None:
        """The label-dropout mask in the denoiser's own (training) phase; no dropout when the denoiser is frozen in
        eval mode (REPA-E's alignment pass), as the reference drops labels only in training mode."""
        drop = self.inputs.drop_labels
        if drop is None or self.phase == "denoiser":
            return drop
        return torch.zeros_like(drop)

    def _autocast(self) -> Any:
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def for_phase(self, phase: str, plan: DenoiserPlan) -> StepContext:
        """The context of the next phase: same step-level cache, fresh phase-level cache."""
        return StepContext(
            phase=phase, inputs=self.inputs, tokenizer=self.tokenizer, denoiser=self.denoiser,
            normalizer=self.normalizer, encoders=self.encoders, transport=self.transport, plan=plan, step=self.step,
            shared=self.shared, num_classes=self.num_classes, autocast=self.autocast,
        )
