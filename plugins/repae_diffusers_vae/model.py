"""The ``diffusers-vae`` tokenizer: a diffusers VAE behind repae's Tokenizer contract.

Wrapped classes (diffusers, https://github.com/huggingface/diffusers):

- ``AutoencoderKL``: the LDM KL autoencoder (Rombach et al., arXiv 2112.10752) as SD-VAE (4 channels), SDXL's VAE,
  FLUX.1's VAE (16 channels, no quant convs, latents ``(z - 0.1159) * 0.3611``) and SD3.5's (same layout, shift
  0.0609, scale 1.5305);
- ``AutoencoderKLQwenImage``: Qwen-Image's VAE (a causal 3-D video VAE, Wan-2.1 style; per-channel
  ``latents_mean``/``latents_std``), run here on single frames: images ``[B, 3, H, W]`` become ``[B, 3, 1, H, W]``
  and the frame axis is removed again from the moments and the decoded images.

REPA-E (Leng et al., arXiv 2504.10483) tunes such VAEs end to end; its released T2I E2E-VAEs (``REPA-E/e2e-flux-vae``,
``e2e-sd3.5-vae``, ``e2e-qwenimage-vae``) are diffusers folders of these two classes and load here as they are.

Parameters live in the wrapped diffusers module ``vae``: the tokenizer's state dict is the diffusers state dict with
the prefix ``vae.``, and ``export`` writes a folder that ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from repae import ExportContext, LatentStatistics, UserError, WeightsInfo, architecture_mismatch, require_package
from repae import DiagonalGaussian, same_value

if TYPE_CHECKING:
    from repae import BuildContext
    from repae_diffusers_vae import DiffusersVAEConfig

__all__ = ["DiffusersVAE", "build_diffusers_vae", "import_diffusers", "read_vae_folder"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
"""diffusers' older attention parameter names (some SD-VAE checkpoints) and today's."""


def import_diffusers() -> Any:
    """The ``diffusers`` module, or the :class:`repae.UserError` of :func:`repae.require_package` naming the extra."""
    return require_package("diffusers", extra="diffusers", what="the tokenizer 'diffusers-vae'")


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------------------


class DiffusersVAE(nn.Module):
    """A diffusers VAE as a :class:`repae.Tokenizer`: images ``[B, 3, H, W]`` in ``[-1, 1]`` <-> latents
    ``[B, C, H/f, W/f]`` (float32, or the autocast dtype).

    Capabilities: :class:`repae.HasLatentStatistics` (``latent_stats``: the VAE's own ``shift_factor`` and
    ``scaling_factor``, or its per-channel ``latents_mean``/``latents_std``), :class:`repae.RecordsWeights`
    (``loaded_weights``: ``weights`` and ``config``), :class:`repae.Exportable` (``diffusers``) and
    :class:`repae.HasBlocks` (the encoder and the decoder).
    """

    export_formats = {
        "diffusers": "a diffusers folder (config.json with the run's latent statistics, "
                     "diffusion_pytorch_model.safetensors) that AutoencoderKL / AutoencoderKLQwenImage.from_pretrained "
                     "loads",
    }

    def __init__(self, model_class: str, architecture: Mapping[str, Any], *, source: str = "the recipe") -> None:
        super().__init__()
        diffusers = import_diffusers()
        cls = getattr(diffusers, model_class)
        self.model_class = model_class
        self.vae = cls(**dict(architecture))
        self.video = model_class == "AutoencoderKLQwenImage"
        config = self.vae.config
        self.latent_channels = int(config["z_dim"] if self.video else config["latent_channels"])
        self.downsample = (2 ** len(config["temperal_downsample"]) if self.video
                           else 2 ** (len(config["block_out_channels"]) - 1))
        self.single_frame_inert = frozenset(n for n, _ in self.vae.named_parameters() if ".time_conv." in n)
        """Parameters that do not act on a single frame (the Qwen-Image resamplers' temporal convolutions): kept
        frozen, so that no optimizer or DDP bucket waits for a gradient they never get; exported unchanged."""
        self.requires_grad_(True)
        self.architecture_source = source
        """Where the config came from (the preset, or the weights' config.json)."""
        self.loaded_weights: dict[str, WeightsInfo] = {}
        """:class:`repae.RecordsWeights`: ``weights`` (the safetensors file) and ``config`` (its config.json)."""

    # -- the contract ----------------------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images float ``[B, 3, H, W]`` in ``[-1, 1]`` to the posterior over latents ``[B, C, H/f, W/f]``.

        Same numbers as diffusers' ``vae.encode(images).latent_dist`` (the Qwen-Image VAE on ``images[:, :, None]``,
        one frame: its frame cache has nothing to carry, so the encoder runs without it)."""
        if self.video:
            moments = self.vae.quant_conv(self.vae.encoder(images.unsqueeze(2))).squeeze(2)
        else:
            moments = self.vae.encoder(images)
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` to images ``[B, 3, h*f, w*f]``: diffusers' ``vae.decode(z).sample`` (the
        Qwen-Image VAE clamps its output to ``[-1, 1]``, as diffusers does; the others are roughly in that range)."""
        if self.video:
            out = self.vae.decoder(self.vae.post_quant_conv(z.unsqueeze(2)))
            return out.clamp(-1.0, 1.0).squeeze(2)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    def forward(self, images: Tensor, eps: Tensor | None = None) -> tuple[DiagonalGaussian, Tensor, Tensor]:
        """Encode, sample (with ``eps`` if given) and decode: ``(posterior, z, reconstruction)``."""
        posterior = self.encode(images)
        z = posterior.sample(eps)
        return posterior, z, self.decode(z)

    # -- capabilities ----------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config of the wrapped VAE (``config.json`` content, without ``_``-prefixed entries)."""
        return {k: _plain(v) for k, v in dict(self.vae.config).items() if not k.startswith("_")}

    @property
    def latent_stats(self) -> LatentStatistics | None:
        """:class:`repae.HasLatentStatistics`, from the VAE's config: per-channel ``latents_mean``/``latents_std``
        when it has them (Qwen-Image; ``normalized = (z - mean) / std * scaling_factor``), else its global
        ``shift_factor`` and ``scaling_factor`` (FLUX, SD3.5, SD: ``normalized = (z - shift) * scale``)."""
        config = self.vae.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        scale = float(config.get("scaling_factor") or 1.0)
        source = f"diffusers config of {self.architecture_source}"
        if mean is not None and std is not None:
            return LatentStatistics(torch.tensor(list(mean), dtype=torch.float32),
                                    torch.tensor(list(std), dtype=torch.float32), scale,
                                    source=f"{source} (latents_mean, latents_std)")
        if config.get("scaling_factor") is None:
            return None
        shift = config.get("shift_factor")
        return LatentStatistics(None, None, scale, None if shift is None else float(shift),
                                source=f"{source} (shift_factor, scaling_factor)")

    def block_modules(self) -> list[nn.Module]:
        """:class:`repae.HasBlocks`: the encoder and the decoder, each compiled and checkpointed as one unit."""
        return [self.vae.encoder, self.vae.decoder]

    def export(self, fmt: str, folder: Path, context: ExportContext) -> dict[str, str]:
        """:class:`repae.Exportable`: ``diffusers``, a folder ``from_pretrained`` loads, whose config carries the run's
        latent statistics (``context.statistics``; none: the VAE's own)."""
        if fmt != "diffusers":
            raise UserError(f"the diffusers-vae tokenizer exports {', '.join(self.export_formats)}, not {fmt!r}")
        save_diffusers_folder(self, folder, context.statistics, metadata=context.metadata)
        return {CONFIG_FILE: f"diffusers {self.model_class} config with the latent statistics",
                WEIGHTS_FILE: f"the tokenizer, diffusers {self.model_class} layout"}

    def requires_grad_(self, requires_grad: bool = True) -> DiffusersVAE:
        """``nn.Module.requires_grad_``, leaving :attr:`single_frame_inert` frozen (the trainer toggles every part's
        ``requires_grad`` phase by phase)."""
        super().requires_grad_(requires_grad)
        for name, param in self.vae.named_parameters():
            if name in self.single_frame_inert:
                param.requires_grad_(False)
        return self

    def to(self, *args: Any, **kwargs: Any) -> DiffusersVAE:
        """``nn.Module.to``; ``memory_format=torch.channels_last`` (the trainer's ``channels_last``) converts the 4-D
        tensors only, so that the Qwen-Image VAE's 3-D convolutions (5-D weights, which ``channels_last`` refuses)
        stay as they are."""
        memory_format = kwargs.pop("memory_format", None)
        if args or kwargs:
            super().to(*args, **kwargs)
        if memory_format is not None:
            self._apply(lambda t: t.to(memory_format=memory_format) if t.dim() == 4 else t)
        return self

    def extra_repr(self) -> str:
        return f"{self.model_class}, latent_channels={self.latent_channels}, downsample={self.downsample}"


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def statistics_config(model_class: str, statistics: LatentStatistics, channels: int) -> dict[str, Any]:
    """The config keys that carry ``statistics`` in diffusers' convention for ``model_class``; empty for none.

    ``AutoencoderKL``: per-channel statistics as ``latents_mean``/``latents_std`` with ``scaling_factor`` (and no
    shift), a global scale and shift as ``scaling_factor``/``shift_factor``. ``AutoencoderKLQwenImage`` has only
    ``latents_mean``/``latents_std`` (``normalized = (z - mean) / std``): a scale and a shift are spread over the
    channels."""
    if statistics.is_empty:
        return {}
    scale = float(statistics.scaling_factor)
    mean = None if statistics.mean is None else [float(v) for v in statistics.mean.flatten()]
    std = None if statistics.std is None else [float(v) for v in statistics.std.flatten()]
    if model_class == "AutoencoderKL":
        if mean is not None and std is not None:
            return {"latents_mean": mean, "latents_std": std, "scaling_factor": scale, "shift_factor": None}
        return {"latents_mean": None, "latents_std": None, "scaling_factor": scale,
                "shift_factor": statistics.shift_factor}
    if mean is not None and std is not None:
        return {"latents_mean": mean, "latents_std": [s / scale for s in std]}
    shift = float(statistics.shift_factor or 0.0)
    return {"latents_mean": [shift] * channels, "latents_std": [1.0 / scale] * channels}


def save_diffusers_folder(model: DiffusersVAE, folder: str | Path, statistics: LatentStatistics | None = None, *,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as a diffusers folder: ``config.json`` (the VAE's config with ``statistics`` in diffusers'
    convention, see :func:`statistics_config`) and ``diffusion_pytorch_model.safetensors``. Returns the folder."""
    from repae import write_json, write_safetensors

    diffusers = import_diffusers()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"_class_name": model.model_class, "_diffusers_version": diffusers.__version__,
                              **model.config}
    if statistics is not None:
        config.update(statistics_config(model.model_class, statistics, model.latent_channels))
    state = {k: v.detach().contiguous() for k, v in model.vae.state_dict().items()}
    write_safetensors(folder / WEIGHTS_FILE, state, metadata={**(metadata or {}), "format": "pt"})
    write_json(folder / CONFIG_FILE, config)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _sources(weights: str, subfolder: str | None) -> tuple[str, str]:
    """The sources of ``config.json`` and of the safetensors file for ``weights`` (+ ``subfolder``)."""
    sub = (subfolder or "").strip("/")
    if weights.startswith("hf://"):
        rest, _, revision = weights[len("hf://"):].strip("/").partition("@")
        parts = [p for p in rest.split("/") if p]
        if len(parts) < 2:
            raise UserError(f"tokenizer.weights {weights!r} does not name a Hugging Face repository: write "
                            "hf://org/name (e.g. hf://black-forest-labs/FLUX.1-dev with subfolder: vae)")
        inner = [*parts[2:], *[p for p in sub.split("/") if p]]
        if inner and inner[-1].endswith(".safetensors"):
            inner = inner[:-1]
        rev = f"@{revision}" if revision else ""
        base = "hf://" + "/".join([*parts[:2], *inner])
        return f"{base}/{CONFIG_FILE}{rev}", f"{base}/{WEIGHTS_FILE}{rev}"
    path = Path(weights).expanduser()
    if path.suffix == ".safetensors":
        return str(path.parent / CONFIG_FILE), str(path)
    folder = path / sub if sub else path
    return str(folder / CONFIG_FILE), str(folder / WEIGHTS_FILE)


def read_vae_folder(weights: str, subfolder: str | None = None) -> tuple[dict[str, Any], WeightsInfo]:
    """The ``config.json`` of a diffusers VAE folder (local or ``hf://``) and the record of the file read."""
    from repae import file_sha256, resolve_weights

    config_source, _ = _sources(weights, subfolder)
    path = resolve_weights(config_source)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the diffusers config {path} (of tokenizer.weights {weights!r}): {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a diffusers config (a JSON object), it holds {type(config).__name__}")
    return config, WeightsInfo(source=config_source, path=str(path), sha256=file_sha256(path),
                               revision=_hub_revision(path))


def _hub_revision(path: Path) -> str | None:
    """The commit of a file in the Hugging Face cache (``.../snapshots/<commit>/...``), else ``None``."""
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        commit = parts[i + 1]
        if part == "snapshots" and len(commit) == 40 and all(c in "0123456789abcdef" for c in commit):
            return commit
    return None


def _class_defaults(model_class: str) -> dict[str, Any]:
    import inspect

    cls = getattr(import_diffusers(), model_class)
    params = inspect.signature(cls.__init__).parameters
    return {k: _plain(p.default) for k, p in params.items()
            if k != "self" and p.default is not inspect.Parameter.empty}


def merged_architecture(config: DiffusersVAEConfig) -> dict[str, Any]:
    """The diffusers config the tokenizer is built from (:func:`repae_diffusers_vae.merged_architecture`)."""
    from repae_diffusers_vae import merged_architecture as merged

    return merged(config.size, config.model_class, config.architecture)


def check_against_file(config: DiffusersVAEConfig, wanted: Mapping[str, Any], file_config: Mapping[str, Any],
                       where: str) -> dict[str, Any]:
    """The architecture to build for weights whose ``config.json`` is ``file_config``: the class and every compared
    key of the recipe's architecture must agree with the file (the latent statistics aside, which the file
    supplies). A disagreement is the :class:`repae.UserError` of :func:`repae.architecture_mismatch`: each key, both
    values, the preset whose architecture the file has."""
    from repae_diffusers_vae import ARCHITECTURE_KEYS, NOT_COMPARED, PRESETS, SHAPE_FREE_KEYS, STATISTICS_KEYS
    from repae_diffusers_vae import recipe_fields

    file_class = str(file_config.get("_class_name") or config.model_class)
    if file_class not in ARCHITECTURE_KEYS:
        raise UserError(f"{where} holds a diffusers {file_class}, which the tokenizer 'diffusers-vae' does not wrap "
                        f"(it wraps {', '.join(ARCHITECTURE_KEYS)})")
    defaults = _class_defaults(file_class)
    keys = ARCHITECTURE_KEYS[file_class]
    from_file = {**defaults, **{k: _plain(v) for k, v in file_config.items() if k in keys}}
    theirs = recipe_fields(file_class, from_file)
    fits = [name for name, p in PRESETS.items() if p["model_class"] == file_class and all(
        same_value(v, theirs.get(k)) for k, v in recipe_fields(file_class, {**defaults, **p["architecture"]}).items())]
    if file_class != config.model_class:
        ours = {"model_class": config.model_class}
    else:
        ours = recipe_fields(config.model_class, {**defaults, **{k: v for k, v in wanted.items() if k in keys}})
    problem = architecture_mismatch(ours, theirs, preset=fits[0] if fits else None,
                                    shape_free=[f"architecture.{k}" for k in SHAPE_FREE_KEYS],
                                    what=f"{where}, with the architecture its {CONFIG_FILE} states")
    if problem is not None:
        raise UserError(f"diffusers-vae: {problem}")
    recipe = {**defaults, **{k: v for k, v in wanted.items() if k in keys}}
    # the latent statistics and the keys that change no computation come with the weights
    return {**recipe, **{k: from_file.get(k) for k in (*STATISTICS_KEYS, *NOT_COMPARED) if k in keys}}


def _state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The diffusers state dict: a ``vae.`` / ``module.`` prefix dropped, old attention names renamed."""
    tensors = dict(state)
    for prefix in ("module.", "vae."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    out = {}
    for key, value in tensors.items():
        renamed = key
        if ".attentions." in key:
            for old, new in _OLD_ATTENTION.items():
                renamed = renamed.replace(old, new)
        if renamed != key and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # the old names' 1x1-conv projections are Linear layers today
        out[renamed] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------------


def _build_unloaded(config: DiffusersVAEConfig, architecture: dict[str, Any], *, check_folder: bool) -> DiffusersVAE:
    """The VAE built without reading weights: from the preset and the recipe's architecture. With ``check_folder``
    (on ``meta``: ``repae recipe validate``, ``--dry-run``) the ``config.json`` of a local weights folder is read (a
    small file, no tensors) and checked as loading will check it, so that a folder that does not fit the recipe is
    reported before the run, and the dry run has the shapes the run will have; hub sources and a folder without
    ``config.json`` are checked when the weights are loaded. A run's checkpoint (``repae sample``, ``export``) holds
    the weights itself: then the folder is not read."""
    source = f"preset {config.size!r}"
    if check_folder and config.weights and not config.weights.startswith(("hf://", "http://", "https://")):
        config_path = Path(_sources(config.weights, config.subfolder)[0])
        if config_path.is_file():
            file_config, _ = read_vae_folder(config.weights, config.subfolder)
            where = config.weights + (f" (subfolder {config.subfolder})" if config.subfolder else "")
            architecture = check_against_file(config, architecture, file_config, where)
            source = where
    return DiffusersVAE(config.model_class, architecture, source=source)


def build_diffusers_vae(config: DiffusersVAEConfig, context: BuildContext) -> DiffusersVAE:
    """Build the VAE a config describes; read its ``config.json`` and weights unless on ``meta`` (where only a local
    folder's ``config.json`` is read and checked)."""
    import_diffusers()  # the one clear message when the extra is missing
    architecture = merged_architecture(config)
    if not (config.weights and context.load_weights):
        return _build_unloaded(config, architecture, check_folder=context.device == "meta")
    from repae import load_into, load_weights

    file_config, config_info = read_vae_folder(config.weights, config.subfolder)
    where = config.weights + (f" (subfolder {config.subfolder})" if config.subfolder else "")
    architecture = check_against_file(config, architecture, file_config, where)
    _, weights_source = _sources(config.weights, config.subfolder)
    state, info = load_weights(weights_source, default_filename=WEIGHTS_FILE)
    model = DiffusersVAE(config.model_class, architecture, source=where)
    load_into(model.vae, _state_dict(state), what=f"diffusers {config.model_class} weights {info.path}")
    model.loaded_weights["weights"] = info
    model.loaded_weights["config"] = config_info
    return model
