"""The contract of every component kind: what a plugin's component must provide, and what it may provide.

One place for all ten kinds (``repae list`` shows them): tokenizer (and its posterior), denoiser, representation
encoder, latent normaliser, transport (the diffusion process a loss defines), loss (the :class:`repae.Loss` base class
and the :class:`repae.StepContext` it reads), sampler, dataset, metric, tracker and trainer. The contracts are structural
(``typing.Protocol``): a component needs no base class (except a loss, which subclasses :class:`repae.Loss`), only
the members listed here. ``repae recipe validate`` and ``repae run --dry-run`` check a recipe's components against
them before any data is read (:mod:`repae.compose`).

**Optional capabilities** are declared here too, each as a small protocol. A command that needs one checks for it
with :func:`supports` / :func:`require`; a component without it gets a :class:`~repae.errors.CapabilityError` naming
the capability and the command, never a traceback:

===============================  ===================  ============================================================
capability                       kinds                used by
===============================  ===================  ============================================================
:class:`Exportable`              tokenizer, denoiser  ``repae export --format F`` (formats it declares)
:class:`HasLatentStatistics`     tokenizer            latent normalisers (REPA-E BatchNorm init, channel-stats),
                                                      ``repae export`` (statistics in the exported files)
:class:`AffineNormalizer`        normaliser           ``repae export`` (the run's latent statistics)
:class:`RecordsWeights`          any                  latent caches (which weights wrote them), exports
:class:`CarriesLatentNormState`  denoiser             REPA-E checkpoints' ``bn.*`` buffers for the normaliser
:class:`LoadsLatentNormState`    normaliser           adopting those buffers (trainer setup)
:class:`ChecksTokenizer`         dataset (latents)    refusing a cache written by another tokenizer
:class:`ReadsImages`             dataset (images)     ``repae analyze --images DIR`` (the dataset's preprocessing)
:class:`HasBlocks`               any ``nn.Module``    ``trainer.compile`` (block by block), ``trainer.activation_checkpointing``
===============================  ===================  ============================================================

Conventions shared by every implementation:

- images given to a tokenizer are float ``[B, 3, H, W]`` in ``[-1, 1]`` (``uint8 / 127.5 - 1``); images given to a
  representation encoder and yielded by an image dataset are raw ``uint8`` ``[B, 3, H, W]`` (the encoder owns its
  preprocessing);
- latents are ``[B, C, h, w]`` with ``h = H / f`` for a tokenizer that downsamples by ``f``; the denoiser works on
  *normalised* latents (the normaliser's output), samplers return normalised latents;
- diffusion time: with a continuous transport (flow matching; :attr:`Transport.discrete_steps` is ``None``) ``t`` is
  float32 ``[B]`` in ``[0, 1]`` and ``t = 1`` is pure noise (the REPA-E / SiT convention); with a discrete transport
  (DDPM) ``t`` is the int64 step ``[B]`` in ``[0, T)`` and step ``T - 1`` is the noisiest. What the denoiser receives
  is :meth:`Transport.model_time` of it;
- the null class for classifier-free guidance is ``num_classes`` (a label table row that exists when the denoiser's
  ``class_dropout_prob > 0``);
- hidden-state depths are 1-based block indices (``hidden[8]`` is the output of the 8th block), as REPA's
  ``encoder_depth``.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from repae.config import FieldError, option
from repae.errors import CapabilityError

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = [
    "AffineNormalizer",
    "CarriesLatentNormState",
    "ChecksTokenizer",
    "Dataset",
    "Denoiser",
    "DenoiserOutput",
    "Exportable",
    "ExportContext",
    "HasBlocks",
    "HasLatentStatistics",
    "LatentNormalizer",
    "LatentStatistics",
    "LoadsLatentNormState",
    "LossConfig",
    "Metric",
    "PhasePlan",
    "Posterior",
    "ReadsImages",
    "RecordsWeights",
    "ReferenceFeatures",
    "RepresentationEncoder",
    "Sampler",
    "StepPlan",
    "Tokenizer",
    "Tracker",
    "TrackerRun",
    "Trainer",
    "Transport",
    "WeightsInfo",
    "adopt_latent_norm_state",
    "require",
    "supports",
]


# ---------------------------------------------------------------------------------------------------------------------
# Records shared by several contracts
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    """One file a component loaded: what was configured, what was read, and its sha256 (:func:`repae.file_sha256`)."""

    source: str
    """The configured value (local path, ``hf://org/repo/file``, ``https://...``)."""
    path: str
    """The local file that was read."""
    sha256: str
    """Hex sha256 of that file's bytes."""
    entry: str | None = None
    """The checkpoint entry that was loaded (``ema``, ``vae``, ...), ``None`` for a whole file."""
    revision: str | None = None
    """The Hugging Face commit the file came from (its hub cache snapshot), ``None`` outside the hub cache."""


@dataclass(frozen=True)
class LatentStatistics:
    """How latents are standardised for the denoiser, per channel or globally.

    ``normalized = (z - mean) / std * scaling_factor`` when ``mean`` and ``std`` (float32 ``[C]``) are set, else
    ``normalized = (z - shift_factor) * scaling_factor``. This is diffusers' convention (``latents_mean``,
    ``latents_std``, ``scaling_factor``, ``shift_factor``); REPA-E's ``latents_bias`` / ``latents_scale`` files are
    ``mean`` and ``scaling_factor / std``. ``source`` says where the numbers came from (shown in exports).
    """

    mean: Tensor | None = None
    std: Tensor | None = None
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    source: str = "none"

    @property
    def is_empty(self) -> bool:
        return self.mean is None and self.source == "none"


@dataclass
class DenoiserOutput:
    """What a denoiser returns: its prediction and the hidden tokens at the requested depths.

    ``prediction`` is ``[B, C_out, h, w]`` in the latent's dtype (velocity for flow matching, noise plus optional
    variance channels for DDPM; ``C_out`` is ``C`` or ``2C``), or ``None`` when the pass stopped early
    (``features_only=True``). ``hidden`` maps a 1-based block depth to the tokens after that block
    ``[B, N, hidden_size]``.
    """

    prediction: Tensor | None
    hidden: Mapping[int, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportContext:
    """What ``repae export`` hands a component's :meth:`Exportable.export`.

    ``stem`` is the file-name stem to write under (``vae``, ``denoiser``, ``ema-denoiser``); ``statistics`` the run's
    latent statistics (from its normaliser, else the tokenizer's); ``normalizer_state`` the state dict of the latent
    normaliser that goes with these weights (REPA-E's checkpoints keep its BatchNorm as ``bn.*``), or ``None``;
    ``metadata`` strings to store in safetensors headers (run, checkpoint, step, repae version).
    """

    stem: str
    statistics: LatentStatistics = field(default_factory=LatentStatistics)
    normalizer_state: Mapping[str, Tensor] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Posterior(Protocol):
    """A diagonal Gaussian over latents ``[B, C, h, w]`` (float32, or the autocast dtype)."""

    @property
    def mean(self) -> Tensor:
        ...

    @property
    def logvar(self) -> Tensor:
        """Log-variance, clamped by the tokenizer as it sees fit (LDM: ``[-30, 20]``)."""
        ...

    @property
    def std(self) -> Tensor:
        ...

    def sample(self, eps: Tensor | None = None) -> Tensor:
        """``mean + std * eps``; ``eps`` drawn from N(0, I) when not given (the trainer always injects it, for
        reproducible steps)."""
        ...

    def mode(self) -> Tensor:
        """The mean."""
        ...

    def kl(self) -> Tensor:
        """KL divergence to N(0, I) in nats, summed over ``C, h, w``: float ``[B]``."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """Image <-> latent autoencoder (an ``nn.Module``; trained end to end under REPA-E, frozen otherwise).

    Source: the LDM KL autoencoder (Rombach et al., arXiv 2112.10752); REPA-E tunes it (arXiv 2504.10483).
    """

    @property
    def latent_channels(self) -> int:
        """``C``: channels of the latent."""
        ...

    @property
    def downsample(self) -> int:
        """``f``: spatial factor between images and latents; image sides must be multiples of it."""
        ...

    def encode(self, images: Tensor) -> Posterior:
        """Images float ``[B, 3, H, W]`` in ``[-1, 1]`` to the posterior over latents ``[B, C, H/f, W/f]``."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` (un-normalised) to images ``[B, 3, h*f, w*f]`` in (roughly) ``[-1, 1]``."""
        ...


@runtime_checkable
class HasLatentStatistics(Protocol):
    """Capability: per-channel latent statistics shipped with the weights (REPA-E ``*-latents-stats.pt``,
    LightningDiT ``latents_stats.pt``, diffusers ``latents_mean``/``latents_std``); ``None`` when there are none."""

    @property
    def latent_stats(self) -> LatentStatistics | None:
        ...



# ---------------------------------------------------------------------------------------------------------------------
# Denoiser
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Denoiser(Protocol):
    """A diffusion transformer over normalised latents (an ``nn.Module``).

    Source: DiT (Peebles & Xie, arXiv 2212.09748), SiT (Ma et al., arXiv 2401.08740), REPA projectors (Yu et al.,
    arXiv 2410.06940).
    """

    @property
    def in_channels(self) -> int:
        """``C`` of its input latents."""
        ...

    @property
    def input_size(self) -> int:
        """``h = w`` of its input latents."""
        ...

    @property
    def num_tokens(self) -> int:
        """Tokens per sample in its hidden states (``(input_size / patch)^2``); REPA targets must have as many."""
        ...

    @property
    def hidden_size(self) -> int:
        ...

    @property
    def depth(self) -> int:
        """Number of blocks: valid feature depths are ``1..depth``."""
        ...

    @property
    def num_classes(self) -> int:
        ...

    @property
    def class_dropout_prob(self) -> float:
        """Label dropout in training; > 0 means the label table has the null row (index ``num_classes``)."""
        ...

    @property
    def encoder_dims(self) -> Sequence[int]:
        """Output width of each REPA projector, one per representation encoder (empty: no projector)."""
        ...

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        feature_depths: Sequence[int] = (),
        features_only: bool = False,
        force_drop: Tensor | None = None,
    ) -> DenoiserOutput:
        """Predict from noisy latents ``x`` ``[B, C, h, w]`` at model times ``t`` ``[B]`` (see the module's time
        convention) with labels ``y`` int64 ``[B]`` (``num_classes`` = null). Hidden tokens after each block in
        ``feature_depths`` are returned; with ``features_only`` the pass may stop after the deepest of them.
        ``force_drop`` (bool ``[B]``) replaces those labels by the null class and, when given, replaces the
        denoiser's own random label dropout (the trainer injects it for exact steps)."""
        ...

    def project(self, hidden: Tensor) -> list[Tensor]:
        """Apply the REPA projector MLPs (one per encoder) to hidden tokens ``[B, N, hidden_size]``: a list of
        ``[B, N, encoder_dims[k]]``."""
        ...


@runtime_checkable
class CarriesLatentNormState(Protocol):
    """Capability: the latent-normaliser buffers found in the denoiser's checkpoint (REPA-E's SiT checkpoints hold
    their latent BatchNorm as ``bn.*``), without the prefix; ``None`` when there were none."""

    @property
    def latent_norm_state(self) -> Mapping[str, Tensor] | None:
        ...



# ---------------------------------------------------------------------------------------------------------------------
# Representation encoder
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class RepresentationEncoder(Protocol):
    """A frozen encoder giving patch tokens as REPA alignment targets (an ``nn.Module`` in eval mode, no gradients).

    Source: REPA (Yu et al., arXiv 2410.06940): DINOv2, CLIP, I-JEPA, ... tokens without CLS / registers.
    """

    @property
    def embed_dim(self) -> int:
        """``D`` of its tokens; the denoiser's projector for it must have this output width."""
        ...

    def __call__(self, images: Tensor) -> Tensor:
        """Raw ``uint8`` images ``[B, 3, H, W]`` to patch tokens float ``[B, N, embed_dim]`` (no autograd)."""
        ...

    def num_tokens(self, resolution: int) -> int:
        """``N`` for images of ``resolution`` x ``resolution`` pixels (must equal the denoiser's ``num_tokens``)."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Latent normaliser
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class LatentNormalizer(Protocol):
    """Maps tokenizer latents to the denoiser's space and back (an ``nn.Module``; ``forward`` = ``normalize``).

    A normaliser with running statistics (the REPA-E BatchNorm) uses batch statistics and updates them in training
    mode and its running statistics in eval mode; under ``torch.distributed`` the batch statistics are those of the
    global batch (:class:`repae.GlobalBatchNorm`). Its buffers are EMA'd with the denoiser.
    """

    @property
    def channels(self) -> int | None:
        """Latent channels it is built for (``None``: any, e.g. a global scale)."""
        ...

    def normalize(self, z: Tensor) -> Tensor:
        """Tokenizer latents ``[B, C, h, w]`` to the denoiser's space (same shape and dtype)."""
        ...

    def denormalize(self, x: Tensor) -> Tensor:
        """The inverse, with the current (running) statistics: what samples pass through before decoding."""
        ...


@runtime_checkable
class AffineNormalizer(Protocol):
    """Capability: the normaliser is an affine map whose numbers an export can record."""

    def latent_statistics(self) -> LatentStatistics:
        """Its current statistics as :class:`LatentStatistics` (BatchNorm: running mean and ``sqrt(running_var)``)."""
        ...


@runtime_checkable
class LoadsLatentNormState(Protocol):
    """Capability: the normaliser can adopt buffers a denoiser checkpoint carried (:class:`CarriesLatentNormState`)."""

    def adopt_latent_norm_state(self, state: Mapping[str, Tensor], *, source: str) -> bool:
        """Load them when its configuration asks for it; return whether it did. ``source`` names the checkpoint in
        messages. Raises :class:`~repae.errors.UserError` when the state does not fit."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Transport (the diffusion process)
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Transport(Protocol):
    """The forward process a diffusion loss trains on (exactly one loss of a training defines it:
    :attr:`repae.Loss.transport`): time sampling, noising, and the regression target.

    Source: flow matching / SiT interpolants (arXiv 2401.08740), DDPM (arXiv 2006.11239).
    """

    @property
    def discrete_steps(self) -> int | None:
        """``None`` for continuous time ``t`` in ``[0, 1]`` (float32, 1 = noise); ``T`` for integer steps in ``[0, T)``
        (int64, ``T - 1`` the noisiest)."""
        ...

    def sample_time(self, batch: int, *, generator: torch.Generator) -> Tensor:
        """Times for a batch, ``[batch]``, drawn from ``generator`` on its device: pass
        ``device=generator.device`` to ``torch.rand``/``randn``/``randint`` (the trainer draws a step's randomness
        with a generator on the training device, a CUDA one on a GPU)."""
        ...

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The noisy input ``x_t`` ``[B, C, h, w]`` from normalised latents ``x0``, standard normal ``noise`` and
        ``t`` ``[B]``."""
        ...

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser regresses, ``[B, C, h, w]`` (velocity ``noise - x0`` on the linear path; ``noise``
        for DDPM)."""
        ...

    def model_time(self, t: Tensor) -> Tensor:
        """The time the denoiser receives (SiT: ``t`` itself; DiT: the DDPM step index)."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Loss (the base class :class:`repae.Loss` and the step context :class:`repae.StepContext` are in repae.loss and
# repae.train.context: they need torch)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LossConfig:
    """Fields every loss config has; a loss's own config subclasses it (``@dataclass(kw_only=True)``).

    The engine runs a loss once in the phase of every part listed in ``updates`` and adds ``weight * terms["loss"]``
    to that phase's objective; during a phase every other part is frozen, so the loss's gradient reaches no part it
    does not list. This is how a recipe states REPA-E's stop-gradient (the diffusion loss lists ``[denoiser]`` only)
    and how the paper's "no stop-gradient" ablation is one line (``updates: [denoiser, tokenizer]``).
    """

    weight: float | dict[str, float] = option(
        1.0, doc="coefficient in the objective of each part it updates; a mapping gives one per part, e.g. "
        "{denoiser: 0.5, tokenizer: 1.5} (entries of parts it does not update are not used)"
    )
    updates: list[str] = option(
        default_factory=lambda: ["denoiser"],
        doc="trainable parts this loss's gradient may update (tokenizer, denoiser, or a part it owns)",
    )

    def __post_init__(self) -> None:
        if not self.updates:
            raise FieldError("updates", "must name at least one part")
        if len(set(self.updates)) != len(self.updates):
            raise FieldError("updates", f"lists a part twice: {self.updates}")
        if isinstance(self.weight, dict):
            missing = [p for p in self.updates if p not in self.weight]
            if missing:
                raise FieldError(
                    "weight", f"gives coefficients for {sorted(self.weight)} but the loss updates {self.updates}: "
                    f"give one per updated part (missing {missing})"
                )
        weights = self.weight if isinstance(self.weight, dict) else {"": self.weight}
        for part, value in weights.items():  # 0 switches a term off; a negative one would ascend the loss
            if not value >= 0:
                raise FieldError(f"weight.{part}" if part else "weight", f"must be a number >= 0, got {value}")

    def weight_of(self, part: str) -> float:
        """The coefficient of this loss in ``part``'s objective."""
        return float(self.weight[part]) if isinstance(self.weight, dict) else float(self.weight)


# ---------------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Sampler(Protocol):
    """Noise at ``t = 1`` to normalised latents at ``t = 0`` with a denoiser (de-normalise, then decode, to get
    images: :func:`repae.generate.decode_latents`).

    Source: the REPA / REPA-E samplers (``euler_sampler``, ``euler_maruyama_sampler``), DiT's DDPM sampling.
    """

    @property
    def config(self) -> Any:
        """Its config (``repae sample`` records it in ``sampling.json``; fields ``steps``, ``cfg_scale``,
        ``guidance_low``, ``guidance_high``, ``cfg_channels`` are set from the command line when the config has them)."""
        ...

    def __call__(
        self,
        denoiser: Any,
        noise: Tensor,
        labels: Tensor,
        *,
        cfg_scale: float | None = None,
        guidance: tuple[float, float] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Sample: ``noise`` ``[B, C, h, w]`` (the state at ``t = 1``), ``labels`` int64 ``[B]``. ``cfg_scale`` and
        ``guidance = (low, high)`` override the config for this call (guidance applies at ``low <= t <= high``);
        ``generator`` feeds the draws of a stochastic sampler (one per sample: results independent of batching).
        Returns latents ``[B, C, h, w]`` in the dtype of ``noise``. The denoiser runs without gradients in eval mode
        (restored afterwards). Raises :class:`~repae.errors.UserError` for guidance the denoiser cannot do (no null
        row)."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Dataset(Protocol):
    """Where a training's items come from (a ``torch.utils.data.Dataset``; sharding and shuffling are the trainer's).

    ``kind == "images"``: items ``(uint8 [3, resolution, resolution], label)``. ``kind == "latents"``: items
    ``(float32 [2C, h, w], label)``, the posterior mean and std concatenated along channels (a latent cache of a frozen
    tokenizer). Items are a pure function of (config, index, epoch). Built on ``meta`` (dry runs), a dataset must not
    read its data (it may read a small index): ``len`` may then be 0.
    """

    @property
    def kind(self) -> Literal["images", "latents"]:
        ...

    @property
    def num_classes(self) -> int:
        """Labels lie in ``[0, num_classes)``; the denoiser needs at least as many classes."""
        ...

    @property
    def resolution(self) -> int:
        """Image side in pixels (of the images a latent cache was made from)."""
        ...

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """``(C, h, w)`` of the latents of a ``latents`` dataset; ``None`` for images (or when unknown on ``meta``)."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (items may depend on it, e.g. seeded flips); called before each epoch's loader."""
        ...


@runtime_checkable
class ChecksTokenizer(Protocol):
    """Capability of a latents dataset: refuse a tokenizer other than the one that wrote the latents."""

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise :class:`~repae.errors.UserError` naming the difference (channels, factor, weights sha256)."""
        ...


@runtime_checkable
class ReadsImages(Protocol):
    """Capability of an image dataset: read an image file the way its items are made (``repae analyze --images``)."""

    def load_image(self, path: Path) -> Tensor:
        """One file to ``uint8 [3, resolution, resolution]``; :class:`~repae.errors.UserError` when unreadable."""
        ...


@runtime_checkable
class HasBlocks(Protocol):
    """Capability of any component that is an ``nn.Module`` (a loss too): its repeated units, each an ``nn.Module``
    that the component calls through the unit's own ``forward`` (SiT/DiT: the transformer blocks; the KL-VAE: the
    encoder and the decoder; LPIPS: its network).

    ``trainer.compile: true`` compiles these units one by one with ``torch.compile`` (regional compilation: a
    component's own forward may change its arguments between phases without recompiling), and
    ``trainer.activation_checkpointing: [part, ...]`` recomputes their activations in the backward pass instead of
    storing them. Without the capability the trainer compiles a component that it calls through ``forward``
    (denoiser, encoder, a loss's discriminator) as a whole, compiles nothing of a tokenizer (called through
    ``encode``/``decode``), and refuses activation checkpointing for it with a message naming the capability."""

    def block_modules(self) -> Sequence[nn.Module]:
        """The units. Each is compiled with static shapes (``dynamic=False``): units that share one ``forward``
        (the same class) should see the same shapes, or each shape compiles its own graph."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceFeatures:
    """What a metric knows about the reference: stored statistics (``{feature: (mu [D], sigma [D, D])}``, float64)
    and/or features computed from its images (``{feature: [N, D]}``)."""

    stats: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    features: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Metric(Protocol):
    """A sample-quality metric on Inception-v3 features (``repae eval --metrics NAME``).

    The features (NumPy float arrays ``[N, D]``) are torch-fidelity's Inception-v3 port, as ADM's evaluator reads
    them: ``pool`` (pool_3, 2048-d), ``spatial`` (``mixed_6/conv``, 2023-d; sFID) and ``logits`` (1008 unbiased
    logits). Source: ADM's evaluation suite (Dhariwal & Nichol, arXiv 2105.05233).
    """

    @property
    def name(self) -> str:
        ...

    @property
    def feature(self) -> Literal["pool", "spatial", "logits"]:
        """Which sample features :meth:`compute` reads."""
        ...

    @property
    def outputs(self) -> tuple[str, ...]:
        """The keys :meth:`compute` returns (``fid``, ``precision`` ...)."""
        ...

    def reference_features(self, stored_stats: Mapping[str, object]) -> set[str]:
        """Features that must be computed from the reference images, given which statistics it stores (empty when
        the stored statistics suffice)."""
        ...

    def compute(self, samples: Mapping[str, Any], reference: ReferenceFeatures) -> dict[str, float]:
        """The metric's values (keys :attr:`outputs`)."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Tracker
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is told when training starts (:meth:`Tracker.start`)."""

    run_dir: Path
    """The run directory (``--out``): where a tracker keeps its files by default (``RUN_DIR/tensorboard``,
    ``RUN_DIR/wandb``) and whatever it needs to continue the same run after a resume (wandb's run id)."""
    resume_step: int
    """The step training continues from: 0 for a new run, else the checkpoint's step. The steps after it may have
    been logged already by the interrupted process (up to ``log_every * n`` steps it ran past its last checkpoint);
    they are logged again with this process's values, so a tracker that can should drop what it holds for them
    (TensorBoard: ``purge_step``), and one that cannot should skip the steps it already has (wandb)."""
    recipe: Mapping[str, Any]
    """The run's resolved recipe as plain data (the mapping of ``RUN_DIR/recipe.yaml``: every component's full
    config): log it as the run's configuration."""
    recipe_text: str
    """The same recipe as YAML text, byte for byte ``RUN_DIR/recipe.yaml``."""
    label: str = "trackers.0"
    """This tracker's key path in the recipe, for messages."""

    @property
    def name(self) -> str:
        """The run's name: the run directory's name."""
        return self.run_dir.name


@runtime_checkable
class Tracker(Protocol):
    """An experiment tracker (TensorBoard, Weights & Biases, ...): receives what the run writes, as it writes it.

    A recipe lists any number under ``trackers`` (``trackers: [tensorboard, {name: wandb, project: repae}]``); none by
    default. ``RUN_DIR/metrics.jsonl`` is always written by the engine and stays the run's record: trackers are
    additional. Only process 0 of a ``torchrun`` job calls a tracker; the others never build a connection.

    Lifecycle: the factory builds the tracker during ``repae recipe validate`` / ``--dry-run`` / before training
    (on ``meta`` for the first two), so it must not connect, create files or import heavy packages then; it checks
    what it can without side effects, above all that its optional package is installed (a
    :class:`~repae.errors.UserError` naming the ``pip install`` line). Then, in process 0 of ``repae run``:
    :meth:`start` once, :meth:`log_scalars` and :meth:`log_image` as the run writes, in increasing step order,
    :meth:`finish` once (also after an error or a stop by SIGTERM). An exception from :meth:`start` stops the run
    before step 1 (a :class:`~repae.errors.UserError`'s message is shown as is); one from a ``log_*`` method is
    reported once and the run goes on without that tracker (``metrics.jsonl`` keeps everything).
    """

    def start(self, run: TrackerRun) -> None:
        """Open the run (or re-open it on resume: :attr:`TrackerRun.resume_step` > 0) and record
        :attr:`TrackerRun.recipe` as its configuration."""
        ...

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """The values ``metrics.jsonl`` records at ``step`` (the optimizer steps done), the same keys (losses by
        label and term, ``PART/grad_norm``, ``skipped_steps``, ``it_per_s``, ``img_per_s``, ``elapsed_s``, ...)
        and the same values, as floats (``nan``/``inf`` where ``metrics.jsonl`` writes ``null``)."""
        ...

    def log_image(self, step: int, key: str, path: Path) -> None:
        """A sample grid the run saved at ``step``: ``path`` is the PNG (``RUN_DIR/samples/step-NNNNNNN.png``, a
        grid of ``uint8 [N, 3, H, W]`` images from the EMA denoiser), ``key`` what it shows (``samples``)."""
        ...

    def finish(self, *, ok: bool = True) -> None:
        """Flush and close; ``ok`` is false when training ended by an error (the tracker may mark the run failed).
        A run stopped by SIGTERM/SIGINT finishes with ``ok=True``: it resumes later."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhasePlan:
    """One phase of a training step: the part whose objective it computes and how everything else is set up."""

    part: str
    """The part that trains in this phase (``tokenizer``, ``discriminator``, ``denoiser``, ...)."""
    losses: tuple[tuple[str, str, float], ...]
    """``(label, component name, weight)`` of every loss in this phase's objective."""
    modes: tuple[tuple[str, str], ...]
    """``(component, mode)`` of the other components: ``frozen, eval`` / ``frozen, train`` / ``trains``."""
    normalizer: str | None
    """How the latent normaliser normalises in this phase (``batch statistics, running statistics updated`` or
    ``running statistics``), ``None`` without one."""
    stop_gradients: tuple[str, ...]
    """Inputs this phase reads detached (the stop-gradients): ``z.detach()``, ``recon.detach()``."""
    feature_depths: tuple[int, ...]
    """Hidden-state depths of this phase's denoiser pass (``()``: none)."""
    denoiser_pass: str
    """``full`` (prediction and features), ``features only`` (stops at the deepest depth) or ``none``."""


@dataclass(frozen=True)
class StepPlan:
    """What one training step does, phase by phase (``repae run --dry-run`` prints :meth:`describe`)."""

    phases: tuple[PhasePlan, ...]
    transport: str
    """The diffusion process (the transport of the loss that defines it), e.g. ``flow matching, linear path``."""
    label_dropout: float
    """Probability that the denoiser's phase replaces a label by the null class."""
    order: str = "gradients of every phase first, then every optimizer steps, then the EMA moves"

    def describe(self) -> str:
        """A plain-text table of the plan (stable: the docs show it and a test compares)."""
        lines = [f"step plan ({self.order})", f"  transport: {self.transport}",
                 f"  label dropout (denoiser phase): {self.label_dropout:g}"]
        for i, phase in enumerate(self.phases, 1):
            lines.append(f"  phase {i}: {phase.part} trains")
            losses = ", ".join(f"{label}{'' if name == label else f' ({name})'} x {weight:g}"
                               for label, name, weight in phase.losses)
            lines.append(f"    objective:      {losses}")
            lines.append("    other parts:    " + "; ".join(f"{name}: {mode}" for name, mode in phase.modes))
            if phase.normalizer is not None:
                lines.append(f"    latent norm:    {phase.normalizer}")
            lines.append(f"    stop-gradient:  {', '.join(phase.stop_gradients) or 'none'}")
            depths = ", ".join(str(d) for d in phase.feature_depths)
            hidden = f"; hidden states after block {depths}" if depths else ""
            lines.append(f"    denoiser pass:  {phase.denoiser_pass}{hidden}")
        return "\n".join(lines)


@runtime_checkable
class Trainer(Protocol):
    """Runs a recipe: built last, from the components built before it (``context.built``).

    The built-in ``default`` trainer is :class:`repae.PhasedTrainer`; a plugin's trainer may subclass it and override
    its step functions, or implement this contract from scratch (writing checkpoints with
    :func:`repae.save_checkpoint` so that ``repae sample`` / ``analyze`` / ``export`` can read the run).
    """

    @property
    def parts(self) -> Mapping[str, nn.Module]:
        """The trainable parts by name (``tokenizer``, ``denoiser``, ``discriminator``, ...)."""
        ...

    def plan(self) -> StepPlan:
        """The step plan (for ``repae run --dry-run`` and the docs)."""
        ...

    def check_step(self, batch_size: int = 2) -> None:
        """Run one step's forward passes on the components' (``meta``) device without updating anything, so that a
        shape mismatch between components surfaces before any data is read. Raises
        :class:`~repae.errors.RecipeError` naming the phase, the loss and the components."""
        ...

    def run(self, run_dir: Path, *, progress: bool = True) -> None:
        """Train to the configured number of steps, resuming from the latest checkpoint in ``run_dir``."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Capabilities
# ---------------------------------------------------------------------------------------------------------------------


@runtime_checkable
class Exportable(Protocol):
    """Capability of a run's tokenizer or denoiser: it writes itself in formats other code reads (``repae export
    --format NAME``).

    ``export_formats`` maps a format name to a one-line description (``{"diffusers": "AutoencoderKL folder ..."}``).
    """

    @property
    def export_formats(self) -> Mapping[str, str]:
        ...

    def export(self, fmt: str, folder: Path, context: ExportContext) -> Mapping[str, str]:
        """Write format ``fmt`` (one of :attr:`export_formats`) into ``folder`` (it exists); return ``{file name:
        what it holds}`` for the manifest. Raises :class:`~repae.errors.UserError` for what it cannot write."""
        ...


@runtime_checkable
class RecordsWeights(Protocol):
    """Capability: the files the component loaded, by role (``weights``, ``latent_stats``; empty for random init)."""

    @property
    def loaded_weights(self) -> Mapping[str, WeightsInfo]:
        ...



def supports(component: object, capability: type) -> bool:
    """Whether ``component`` declares ``capability`` (one of the protocols of this module)."""
    return isinstance(component, capability)


def adopt_latent_norm_state(normalizer: Any, denoiser: Any) -> bool:
    """Give a latent normaliser (:class:`LoadsLatentNormState`) the ``bn.*`` buffers a REPA-E checkpoint carried with
    the denoiser (:class:`CarriesLatentNormState`; none when the denoiser does not declare it, so that a normaliser
    that requires them can say so). Returns whether the normaliser took them; ``False`` when it does not declare the
    capability. The trainer calls it once both exist, before the EMA copy is taken; the ``batchnorm`` normaliser when
    it is built after the denoiser."""
    if not supports(normalizer, LoadsLatentNormState):
        return False
    state = denoiser.latent_norm_state if supports(denoiser, CarriesLatentNormState) else {}
    if not state:
        return bool(normalizer.adopt_latent_norm_state({}, source="the denoiser (no bn.* buffers)"))
    loaded = denoiser.loaded_weights.get("weights") if supports(denoiser, RecordsWeights) else None
    source = loaded.source if loaded is not None else "the denoiser checkpoint"
    return bool(normalizer.adopt_latent_norm_state(state, source=source))


def require(component: object, capability: type, *, what: str, needed_for: str) -> Any:
    """``component`` as ``capability``, or a :class:`~repae.errors.CapabilityError` saying that ``what`` (``tokenizer
    'conv-ae' (plugin acme 1.0)``) does not declare it and that ``needed_for`` (``repae export --format diffusers``)
    needs it, with the members to implement."""
    if isinstance(component, capability):
        return component
    members = ", ".join(sorted(_members(capability)))
    raise CapabilityError(
        f"{needed_for} needs the capability {capability.__name__} ({members}), which {what} does not declare. "
        f"See repae.interfaces.{capability.__name__} (docs/plugins.md) to add it to the component."
    )


def _members(protocol: type) -> Iterator[str]:
    """The members a contract or capability protocol declares (properties and methods)."""
    for name, value in vars(protocol).items():
        if isinstance(value, property) or (callable(value) and (not name.startswith("_") or name == "__call__")):
            yield name
