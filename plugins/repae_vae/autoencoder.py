"""KL autoencoder with a diagonal-Gaussian posterior, in the LDM state-dict layout.

Papers:
- Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (arXiv 2112.10752):
  the architecture and the SD-VAE (f8, 4 channels);
- Yao et al., "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models" (arXiv
  2501.01423): VA-VAE (f16, 32 channels);
- Leng et al., "REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion Transformers" (arXiv 2504.10483):
  IN-VAE (f16, 32 channels) and the end-to-end tuned E2E-VAEs.

Parameter names follow the LDM layout (``encoder.down.{i}.block.{j}``, ``decoder.up.{i}``, ``quant_conv`` ...), so
REPA-E's ``.pt`` releases load strictly; diffusers ``AutoencoderKL`` checkpoints go through :mod:`repae_vae.convert`.
Images are ``[-1, 1]``; ``encode`` gives a :class:`repae.DiagonalGaussian`, ``decode`` maps latents back to images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repae import DiagonalGaussian, ExportContext, LatentStatistics, UserError, WeightsInfo, architecture_mismatch
from repae import layout_mismatch, safetensors_shapes, same_value
from repae_vae.convert import diffusers_to_ldm, is_diffusers_layout

if TYPE_CHECKING:
    from repae import BuildContext
    from repae_vae import KLVAEConfig

__all__ = [
    "AttnBlock",
    "Decoder",
    "Encoder",
    "KLAutoencoder",
    "ResnetBlock",
    "build_kl_vae",
    "load_latent_stats",
    "load_vae_weights",
]


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when the width changes) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv q/k/v/output projections."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W, C]; SDPA's default scale is C^-0.5, as in LDM.
        q, k, v = (proj(y).flatten(2).transpose(1, 2).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention where the level has it, then a resampler."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self._resample_name = name
        setattr(self, name, resample)  # `downsample` / `upsample`, as in the LDM layout; None on the last level

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resample = getattr(self, self._resample_name)
        return x if resample is None else resample(x)


class Mid(nn.Module):
    """Middle of the encoder and decoder: residual block, attention, residual block."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Images ``[B, 3, H, W]`` to moments ``[B, 2 * latent_channels, H/f, W/f]``, f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        latent_channels: int,
        norm_groups: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        width, size, levels = ch, resolution, []
        for i, mult in enumerate(ch_mult):
            out = ch * mult
            blocks = [ResnetBlock(width if j == 0 else out, out, norm_groups) for j in range(num_res_blocks)]
            attn = [AttnBlock(out, norm_groups) for _ in range(num_res_blocks)] if size in attn_resolutions else []
            last = i == len(ch_mult) - 1
            levels.append(Level(blocks, attn, None if last else Downsample(out), "downsample"))
            width, size = out, size if last else size // 2
        self.down = nn.ModuleList(levels)
        self.mid = Mid(width, norm_groups)
        self.norm_out = _group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latents ``[B, latent_channels, h, w]`` to images ``[B, 3, h*f, w*f]``.

    ``up.{i}`` is indexed by resolution level (``up.0`` is the full resolution) and runs last.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        latent_channels: int,
        norm_groups: int,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        size = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.mid = Mid(width, norm_groups)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):
            out = ch * ch_mult[i]
            blocks = [ResnetBlock(width if j == 0 else out, out, norm_groups) for j in range(num_res_blocks + 1)]
            attn = [AttnBlock(out, norm_groups) for _ in range(num_res_blocks + 1)] if size in attn_resolutions else []
            levels.insert(0, Level(blocks, attn, Upsample(out) if i > 0 else None, "upsample"))
            width, size = out, size * 2 if i > 0 else size
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ---------------------------------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------------------------------


class KLAutoencoder(nn.Module):
    """LDM KL autoencoder: ``encode(images) -> DiagonalGaussian``, ``decode(z) -> images`` (:class:`repae.Tokenizer`).

    Capabilities: :class:`repae.HasLatentStatistics` (``latent_stats``: the per-channel statistics shipped with the
    weights, or ``None``), :class:`repae.RecordsWeights` (``loaded_weights``: ``weights`` and ``latent_stats`` files)
    and :class:`repae.Exportable` (``diffusers``: an ``AutoencoderKL`` folder; ``ldm``: REPA-E's layout with its
    latent-statistics file).
    """

    export_formats = {
        "diffusers": "an AutoencoderKL folder (config.json with latents_mean/latents_std, "
                     "diffusion_pytorch_model.safetensors) that diffusers' from_pretrained loads",
        "ldm": "<stem>.safetensors in the LDM layout (REPA-E's key names) and <stem>-latents-stats.safetensors "
               "(latents_bias, latents_scale), which `weights:` loads back",
    }

    def __init__(
        self,
        *,
        latent_channels: int = 4,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_architecture(latent_channels, ch, ch_mult, num_res_blocks, norm_groups)
        self.architecture: dict[str, Any] = {
            "latent_channels": latent_channels,
            "ch": ch,
            "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn_resolutions),
            "resolution": resolution,
            "norm_groups": norm_groups,
        }
        """The constructor arguments (what :func:`repae_vae.convert.diffusers_config` needs); also those of
        :class:`Encoder` and :class:`Decoder`."""
        self.encoder = Encoder(**self.architecture)
        self.decoder = Decoder(**self.architecture)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.latent_channels = latent_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        # Not part of the state dict (the LDM layout has no such keys), but they follow .to(device).
        self.register_buffer("latents_mean", None, persistent=False)
        self.register_buffer("latents_std", None, persistent=False)
        self.loaded_weights: dict[str, WeightsInfo] = {}
        """:class:`repae.RecordsWeights`: the files loaded, by role (``weights``, ``latent_stats``)."""

    @property
    def latent_stats(self) -> LatentStatistics | None:
        """Per-channel latent mean and std shipped with the weights (``None`` when there are none)."""
        if self.latents_mean is None or self.latents_std is None:
            return None
        source = self.loaded_weights.get("latent_stats")
        return LatentStatistics(self.latents_mean, self.latents_std,
                                source=f"tokenizer latent statistics ({source.source if source else 'set'})")

    def set_latent_stats(self, mean: Tensor | None, std: Tensor | None) -> None:
        """Set (or with ``None`` clear) the per-channel statistics (``normalized = (z - mean) / std``); any shape
        with ``latent_channels`` elements."""
        if mean is None or std is None:
            self.latents_mean = self.latents_std = None
            return
        c = self.latent_channels
        if mean.numel() != c or std.numel() != c:
            raise UserError(
                f"latent statistics have {mean.numel()} / {std.numel()} channels (mean / std), but this VAE has "
                f"{c} latent channels: the statistics belong to another VAE"
            )
        device = self.quant_conv.weight.device
        self.latents_mean = mean.detach().reshape(c).float().to(device)
        self.latents_std = std.detach().reshape(c).float().to(device)

    def export(self, fmt: str, folder: Path, context: ExportContext) -> dict[str, str]:
        """:class:`repae.Exportable`: ``diffusers`` or ``ldm`` (see :attr:`export_formats`), with the run's latent
        statistics (``context.statistics``)."""
        from repae_vae.convert import export_diffusers, export_ldm

        if fmt == "diffusers":
            return export_diffusers(self, folder, context.statistics)
        if fmt == "ldm":
            return export_ldm(self, folder, context)
        raise UserError(f"the KL autoencoder exports {', '.join(self.export_formats)}, not {fmt!r}")

    def block_modules(self) -> list[nn.Module]:
        """:class:`repae.HasBlocks`: the encoder and the decoder, each compiled as one graph (their levels share one
        ``forward`` at different shapes, which would recompile) and checkpointed as one unit (the decoder at full
        resolution dominates the tokenizer's activation memory)."""
        return [self.encoder, self.decoder]

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images in ``[-1, 1]`` ``[B, 3, H, W]`` to the posterior over latents ``[B, C, H/f, W/f]``."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, C, h, w]`` to images (roughly ``[-1, 1]``) ``[B, 3, h*f, w*f]``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: Tensor, eps: Tensor | None = None) -> tuple[DiagonalGaussian, Tensor, Tensor]:
        """Encode, sample (with ``eps`` if given) and decode: ``(posterior, z, reconstruction)``."""
        posterior = self.encode(images)
        z = posterior.sample(eps)
        return posterior, z, self.decode(z)

    def extra_repr(self) -> str:
        return f"latent_channels={self.latent_channels}, downsample={self.downsample}"


def _check_architecture(
    latent_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, norm_groups: int
) -> None:
    if not ch_mult:
        raise ValueError("ch_mult needs at least one level")
    if latent_channels < 1 or ch < 1 or num_res_blocks < 1 or norm_groups < 1 or min(ch_mult) < 1:
        raise ValueError("latent_channels, ch, ch_mult entries, num_res_blocks and norm_groups must be positive")
    widths = sorted({ch * m for m in ch_mult})
    bad = [w for w in widths if w % norm_groups]
    if bad:
        raise ValueError(f"channel widths {bad} (ch * ch_mult) are not divisible by norm_groups={norm_groups}")


# ---------------------------------------------------------------------------------------------------------------------
# Loading weights and latent statistics
# ---------------------------------------------------------------------------------------------------------------------

DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
_STATS_SUFFIXES = ("-latents-stats.pt", "-latents-stats.safetensors")
# The checkpoint inside REPA-E's repo-format hub repositories, for a source naming only the repository
# (``hf://REPA-E/sdvae``). Only sdvae's file name is verified; the others follow the naming of the released files.
# Any other folder or repository is read as a diffusers AutoencoderKL folder (its DIFFUSERS_FILE) or, failing that,
# the only weights file it holds.
HUB_FILES = {
    "REPA-E/sdvae": "sdvae-f8d4.pt",
    "REPA-E/invae": "invae-f16d32.pt",
    "REPA-E/vavae": "vavae-f16d32.pt",
    "REPA-E/e2e-sdvae": "e2e-sdvae-400k.pt",
    "REPA-E/e2e-invae": "e2e-invae-400k.pt",
    "REPA-E/e2e-vavae": "e2e-vavae-400k.pt",
}


def _default_filename(source: str) -> str:
    repo = source[len("hf://") :].split("@")[0].strip("/") if source.startswith("hf://") else ""
    return HUB_FILES.get(repo, DIFFUSERS_FILE)


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_vae_weights(model: KLAutoencoder, source: str, *, key: str | None = None, strict: bool = True) -> Path:
    """Load a checkpoint into ``model``; returns the file loaded and records its sha256 on the model.

    ``source`` is a local file or folder, or ``hf://org/repo[/file]`` (see :func:`repae.weights.resolve_weights`).
    LDM-layout state dicts load as they are, diffusers ``AutoencoderKL`` ones are converted first; ``key`` picks the
    entry of a training checkpoint (``vae``). Missing keys and shape mismatches always raise
    :class:`repae.errors.UserError` naming the keys; unexpected keys do unless ``strict=False``.
    """
    from repae import load_into, load_weights

    state, info = load_weights(source, key=key, default_filename=_default_filename(source))
    path = Path(info.path)
    state = _vae_state_dict(state, source)
    check_release(model, path, source, {k: tuple(v.shape) for k, v in state.items()})
    if not strict:
        expected = model.state_dict()
        state = {k: v for k, v in state.items() if k in expected}
    arch = ", ".join(f"{k}={v}" for k, v in model.architecture.items())
    where = source if Path(source).expanduser() == path else f"{source} ({path})"
    load_into(model, state, strict=True, what=f"VAE weights {where} for the architecture ({arch})")
    model.loaded_weights["weights"] = info
    return path


def check_release(model: KLAutoencoder, path: Path, source: str, shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """Refuse weights that ``model``'s architecture disagrees with in a field strict loading cannot see
    (:mod:`repae_vae.releases`): the architecture the file states (a diffusers ``config.json`` next to it, repae's
    export metadata), else the release whose key layout it has. ``shapes``: the file's keys and shapes in the LDM
    layout (``None``: unknown, then only a stated architecture is checked). Raises :class:`repae.UserError` naming
    the fields, both values and the preset."""
    from repae_vae.releases import ARCHITECTURE_FIELDS, SHAPE_FREE_FIELDS, compared_fields, declared_architecture
    from repae_vae.releases import release_of_layout

    arch = model.architecture
    declared = declared_architecture(path)
    if declared is not None:
        expected, where = declared
        release = release_of_layout(expected)
        same = release is not None and all(same_value(release.architecture[f], expected.get(f))
                                           for f in ARCHITECTURE_FIELDS)
        problem = architecture_mismatch(arch, expected, fields=compared_fields(arch, expected, ARCHITECTURE_FIELDS),
                                        shape_free=SHAPE_FREE_FIELDS, preset=release.preset if same and release else None,
                                        what=f"{source!r}, with the architecture {where}")
    else:
        problem = layout_mismatch(arch, release_of_layout(arch), source=source, file_shapes=shapes,
                                  model_shapes=model.state_dict(), shape_free=SHAPE_FREE_FIELDS)
    if problem is not None:
        raise UserError(f"VAE: {problem}")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Keys and shapes of an LDM-layout safetensors file, from its header alone (``None`` for other files)."""
    shapes = safetensors_shapes(path)
    if shapes is None:
        return None
    for prefix in ("module.", "vae."):
        if shapes and all(k.startswith(prefix) for k in shapes):
            shapes = {k[len(prefix):]: v for k, v in shapes.items()}
    return None if is_diffusers_layout(shapes) else shapes


def _check_before_loading(model: KLAutoencoder, config: KLVAEConfig) -> None:
    """On ``meta`` (``repae recipe validate``, ``--dry-run``): :func:`check_release` for a local weights file, from
    what it states about itself and its header, without reading its tensors (hub sources are checked when loaded)."""
    from repae import local_weights

    source = config.weights
    if not source or config.weights_key:
        return  # no weights, or an entry of a checkpoint (checked when loaded)
    path = local_weights(source, default_filename=_default_filename(source))
    if path is None:
        return  # a hub source or URL (checked when loaded), or a missing file (reported by the recipe check)
    check_release(model, path, source, _header_shapes(path))


def _vae_state_dict(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The state dict in the LDM layout (a ``module.``/``vae.`` prefix dropped, diffusers names converted)."""
    tensors = dict(state)
    for prefix in ("module.", "vae."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    if is_diffusers_layout(tensors):
        return diffusers_to_ldm(tensors)
    if "encoder.conv_in.weight" not in tensors:
        raise UserError(
            f"{source!r} is not an AutoencoderKL state dict (LDM or diffusers layout): it has no "
            f"'encoder.conv_in.weight'; its keys are {_listing(sorted(tensors), 5)}. For a training checkpoint set "
            "weights_key to the entry holding the VAE ('vae' in REPA-E's checkpoints/*.pt)."
        )
    return tensors


def load_latent_stats(source: str | Path) -> tuple[Tensor, Tensor, WeightsInfo]:
    """Read per-channel latent statistics: ``(mean, std, file)`` with ``normalized = (z - mean) / std``.

    Accepted: REPA-E ``*-latents-stats.pt`` (``latents_bias``, ``latents_scale``: ``std = 1 / scale``), LightningDiT
    ``latents_stats.pt`` (``mean``, ``std``) and a diffusers ``config.json`` with ``latents_mean`` and ``latents_std``.
    """
    from repae import file_sha256, load_state_dict, resolve_weights

    path = source if isinstance(source, Path) else resolve_weights(source)
    info = WeightsInfo(source=str(source), path=str(path), sha256=file_sha256(path))
    if path.suffix == ".json":
        if not _has_stats(path):
            raise UserError(f"latent statistics {str(source)!r}: {path} has no latents_mean and latents_std")
        config = json.loads(path.read_text())
        mean = torch.tensor(config["latents_mean"], dtype=torch.float32)
        return mean, torch.tensor(config["latents_std"], dtype=torch.float32), info
    data, _ = load_state_dict(path)
    if "latents_scale" in data and "latents_bias" in data:
        return data["latents_bias"].float().flatten(), 1.0 / data["latents_scale"].float().flatten(), info
    if "mean" in data and "std" in data:
        return data["mean"].float().flatten(), data["std"].float().flatten(), info
    raise UserError(
        f"latent statistics {str(source)!r} ({path}) hold {_listing(sorted(data), 5)}; expected latents_bias and "
        "latents_scale (REPA-E) or mean and std (LightningDiT)"
    )


def _find_latent_stats(weights: str, loaded: Path) -> str | Path | None:
    """Statistics that ship next to a checkpoint: ``<stem>-latents-stats.pt``, ``latents_stats.pt`` or a diffusers
    ``config.json`` with latents_mean/latents_std. ``None`` when there are none (this is not an error)."""
    folder = loaded.parent
    for name in [loaded.stem + s for s in _STATS_SUFFIXES] + ["latents_stats.pt"]:
        if (folder / name).is_file():
            return folder / name
    config = folder / "config.json"
    if config.is_file():
        return config if _has_stats(config) else None
    if weights.startswith("hf://"):
        # On the hub the statistics sit next to the checkpoint but may not be cached yet: fetch them now.
        from repae import resolve_weights

        base, at, revision = weights.partition("@")
        base = base.rstrip("/")
        remote = base.rsplit("/", 1)[0] if base.endswith("/" + loaded.name) else base
        sibling = loaded.stem + _STATS_SUFFIXES[0] if loaded.suffix in (".pt", ".pth", ".ckpt") else "config.json"
        try:
            found = resolve_weights(f"{remote}/{sibling}{at}{revision}")
        except (UserError, OSError):
            return None
        if found.suffix == ".json" and not _has_stats(found):
            return None
        return found
    return None


def _has_stats(config: Path) -> bool:
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("latents_mean") is not None and data.get("latents_std") is not None


# ---------------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------------


def build_kl_vae(config: KLVAEConfig, context: BuildContext) -> KLAutoencoder:
    """Build the autoencoder a config describes; load its weights and latent statistics unless on ``meta``."""
    model = KLAutoencoder(
        latent_channels=config.latent_channels,
        ch=config.ch,
        ch_mult=config.ch_mult,
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=config.attn_resolutions,
        resolution=config.resolution,
        norm_groups=config.norm_groups,
    )
    if not context.load_weights:
        _check_before_loading(model, config)
        return model
    loaded = None
    if config.weights:
        loaded = load_vae_weights(model, config.weights, key=config.weights_key, strict=config.strict)
    stats: str | Path | None = None
    if config.latent_stats == "auto":
        stats = _find_latent_stats(config.weights, loaded) if config.weights and loaded is not None else None
    elif config.latent_stats:
        stats = config.latent_stats
    if stats is not None:
        mean, std, info = load_latent_stats(stats)
        model.set_latent_stats(mean, std)
        model.loaded_weights["latent_stats"] = info
    return model
