"""Convert KL-autoencoder state dicts between the LDM layout (ours, REPA-E's ``.pt``) and diffusers ``AutoencoderKL``.

The two layouts hold the same tensors under different names; diffusers' attention projections are ``Linear``
(``[C, C]``) where LDM has 1x1 convs (``[C, C, 1, 1]``), and diffusers numbers the decoder's ``up_blocks`` in the
order they run (lowest resolution first) where LDM's ``up.{i}`` is indexed by resolution level. Older diffusers
checkpoints (``stabilityai/sd-vae-ft-ema``) name the attention ``query/key/value/proj_attn``; both spellings load.

diffusers itself is not needed here: only its key names and config fields are used.
"""

from __future__ import annotations

import json

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from repae import ExportContext, LatentStatistics
    from repae_vae.autoencoder import KLAutoencoder

__all__ = [
    "architecture_from_diffusers",
    "diffusers_config",
    "diffusers_to_ldm",
    "export_diffusers",
    "export_ldm",
    "is_diffusers_layout",
    "ldm_to_diffusers",
    "repae_e_statistics",
    "save_diffusers",
]

# LDM attention name -> diffusers (current) name; and every diffusers spelling -> LDM.
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_LDM = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RESNET_TO_DIFFUSERS = {"nin_shortcut": "conv_shortcut"}
_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}


def is_diffusers_layout(state: Mapping[str, Any]) -> bool:
    """Whether a state dict uses diffusers' ``AutoencoderKL`` names (``encoder.down_blocks.*`` ...)."""
    return any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.")) for k in state)


def _num_levels(keys: Sequence[str], pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    if not found:
        raise ValueError(f"cannot tell the number of decoder levels: no key matches {pattern!r}")
    return max(found) + 1


def _attn_tensor(name: str, value: Tensor, to_linear: bool) -> Tensor:
    if not name.endswith(".weight") or value.dim() not in (2, 4):
        return value
    if to_linear and value.dim() == 4:
        return value.reshape(value.shape[0], value.shape[1])
    if not to_linear and value.dim() == 2:
        return value.reshape(*value.shape, 1, 1)
    return value


def _rename_resnet(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _rename_attn(rest: str, table: Mapping[str, str]) -> str:
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old + "."):
            return table[old] + rest[len(old) :]
    raise ValueError(f"unknown attention parameter {rest!r}")


def ldm_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM names (``encoder.down.0.block.0.conv1.weight``) -> diffusers names; attention weights become Linear."""
    levels = _num_levels(list(state), r"decoder\.up\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        new, attn = name, False
        if m := re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", name):
            part, sub, rest = m.groups()
            if sub == "attn_1":
                new, attn = f"{part}.mid_block.attentions.0.{_rename_attn(rest, _ATTN_TO_DIFFUSERS)}", True
            else:
                index = 0 if sub == "block_1" else 1
                new = f"{part}.mid_block.resnets.{index}.{_rename_resnet(rest, _RESNET_TO_DIFFUSERS)}"
        elif m := re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", name):
            path, level, sub, rest = m.groups()
            level = int(level)
            if path == "encoder.down":
                prefix = f"encoder.down_blocks.{level}"
            else:
                prefix = f"decoder.up_blocks.{levels - 1 - level}"
            if sub == "block":
                j, _, rest = rest.partition(".")
                new = f"{prefix}.resnets.{j}.{_rename_resnet(rest, _RESNET_TO_DIFFUSERS)}"
            elif sub == "attn":
                j, _, rest = rest.partition(".")
                new, attn = f"{prefix}.attentions.{j}.{_rename_attn(rest, _ATTN_TO_DIFFUSERS)}", True
            else:
                new = f"{prefix}.{sub}rs.0.{rest}"  # downsample -> downsamplers.0, upsample -> upsamplers.0
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.+)", name):
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        out[new] = _attn_tensor(new, value, to_linear=True) if attn else value
    return out


_DIFFUSERS_BLOCK = re.compile(
    r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)


def diffusers_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers names (either attention spelling) -> LDM names; attention weights become 1x1 convs."""
    levels = _num_levels(list(state), r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        new, attn = name, False
        if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
            part, sub, index, rest = m.groups()
            if sub == "attentions":
                new, attn = f"{part}.mid.attn_1.{_rename_attn(rest, _ATTN_TO_LDM)}", True
            else:
                new = f"{part}.mid.block_{int(index) + 1}.{_rename_resnet(rest, _RESNET_TO_LDM)}"
        elif m := re.match(_DIFFUSERS_BLOCK, name):
            path, block, sub, j, rest = m.groups()
            block = int(block)
            prefix = f"encoder.down.{block}" if path == "encoder.down_blocks" else f"decoder.up.{levels - 1 - block}"
            if sub == "resnets":
                new = f"{prefix}.block.{j}.{_rename_resnet(rest, _RESNET_TO_LDM)}"
            elif sub == "attentions":
                new, attn = f"{prefix}.attn.{j}.{_rename_attn(rest, _ATTN_TO_LDM)}", True
            else:
                new = f"{prefix}.{sub[:-2]}.{rest}"  # downsamplers.0 -> downsample, upsamplers.0 -> upsample
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", name):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        out[new] = _attn_tensor(new, value, to_linear=False) if attn else value
    return out


def diffusers_config(architecture: Mapping[str, Any], *, latent_stats: LatentStatistics | None = None) -> dict[str, Any]:
    """The ``AutoencoderKL`` config (``config.json`` content) of one of our architectures.

    ``architecture`` is :attr:`KLAutoencoder.architecture` (or a config with the same fields). With ``latent_stats``
    (a :class:`repae.LatentStatistics`), ``latents_mean`` / ``latents_std`` / ``scaling_factor`` / ``shift_factor``
    are filled in (diffusers' convention ``(z - latents_mean) * scaling_factor / latents_std``, the SDXL pipelines').
    """
    ch, ch_mult = architecture["ch"], list(architecture["ch_mult"])
    resolution, attn = architecture["resolution"], set(architecture["attn_resolutions"])
    has_attn = [resolution // 2**i in attn for i in range(len(ch_mult))]
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(has_attn)],
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": architecture["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": architecture["latent_channels"],
        "norm_num_groups": architecture["norm_groups"],
        "sample_size": resolution,
        "mid_block_add_attention": True,
    }
    if latent_stats is not None:
        mean, std = latent_stats.mean, latent_stats.std
        config["latents_mean"] = None if mean is None else [float(v) for v in mean.flatten()]
        config["latents_std"] = None if std is None else [float(v) for v in std.flatten()]
        config["scaling_factor"] = latent_stats.scaling_factor
        config["shift_factor"] = latent_stats.shift_factor
    return config


def architecture_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our architecture fields (``latent_channels``, ``ch``, ``ch_mult`` ...) from an ``AutoencoderKL`` config."""
    widths = list(config.get("block_out_channels", [64]))
    ch = widths[0]
    if any(w % ch for w in widths) or config.get("act_fn", "silu") != "silu":
        raise ValueError(f"not an LDM-style AutoencoderKL: block_out_channels {widths}, act_fn {config.get('act_fn')}")
    if not config.get("mid_block_add_attention", True):
        raise ValueError("AutoencoderKL without mid-block attention is not the LDM layout")
    resolution = int(config.get("sample_size", 256))
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"]))
    return {
        "latent_channels": int(config.get("latent_channels", 4)),
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": int(config.get("layers_per_block", 1)),
        "attn_resolutions": [resolution // 2**i for i, t in enumerate(down) if t.startswith("Attn")],
        "resolution": resolution,
        "norm_groups": int(config.get("norm_num_groups", 32)),
    }


def save_diffusers(model: KLAutoencoder, folder: str | Path, statistics: LatentStatistics | None = None) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder that ``AutoencoderKL.from_pretrained(folder)`` loads:
    ``config.json`` (with ``statistics``, else the model's own latent statistics, if any) and
    ``diffusion_pytorch_model.safetensors``. Returns it."""
    from repae import write_json, write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", ldm_to_diffusers(model.state_dict()),
                      metadata={"format": "pt"})
    stats = statistics if statistics is not None and not statistics.is_empty else model.latent_stats
    write_json(folder / "config.json", diffusers_config(model.architecture, latent_stats=stats))
    return folder


def export_diffusers(model: KLAutoencoder, folder: Path, statistics: LatentStatistics) -> dict[str, str]:
    """``repae export --format diffusers``: :func:`save_diffusers` with the run's latent statistics, so that diffusers'
    convention ``(z - latents_mean) * scaling_factor / latents_std`` is the run's normalisation: with per-channel
    statistics ``scaling_factor`` is the multiplier of the normaliser (1 for REPA-E's BatchNorm); with a fixed scale
    there are no per-channel statistics and ``scaling_factor`` / ``shift_factor`` carry it."""
    save_diffusers(model, folder, statistics)
    return {"config.json": "diffusers AutoencoderKL config with the latent statistics",
            "diffusion_pytorch_model.safetensors": "the tokenizer, diffusers AutoencoderKL layout"}


def repae_e_statistics(statistics: LatentStatistics, channels: int) -> dict[str, Tensor] | None:
    """REPA-E's ``latents_bias`` / ``latents_scale`` (``[1, C, 1, 1]``, normalised = ``(z - bias) * scale``) of
    ``statistics``; ``None`` when there are none."""
    import torch

    if statistics.mean is not None and statistics.std is not None:
        bias, scale = statistics.mean.float(), statistics.scaling_factor / statistics.std.float()
    elif not statistics.is_empty:
        bias = torch.full((channels,), float(statistics.shift_factor or 0.0))
        scale = torch.full((channels,), float(statistics.scaling_factor))
    else:
        return None
    return {"latents_bias": bias.reshape(1, -1, 1, 1).contiguous(),
            "latents_scale": scale.reshape(1, -1, 1, 1).contiguous()}


def export_ldm(model: KLAutoencoder, folder: Path, context: ExportContext) -> dict[str, str]:
    """``repae export --format ldm``: ``<stem>.safetensors`` (the LDM layout: REPA-E's ``.pt`` key names) and, when
    there are statistics, REPA-E's ``<stem>-latents-stats.safetensors`` (``latents_bias``, ``latents_scale``); a recipe
    loads it back with ``tokenizer: {name: sd-vae, weights: DIR/<stem>.safetensors}`` (the statistics are found next
    to it)."""
    from repae import ARCHITECTURE_METADATA, write_safetensors

    files = {}
    metadata = {**(context.metadata or {}), ARCHITECTURE_METADATA: json.dumps(model.architecture)}
    write_safetensors(folder / f"{context.stem}.safetensors", model.state_dict(), metadata=metadata)
    files[f"{context.stem}.safetensors"] = "the tokenizer, LDM layout (REPA-E / latent-diffusion key names)"
    stats = repae_e_statistics(context.statistics, model.latent_channels)
    if stats is not None:
        write_safetensors(folder / f"{context.stem}-latents-stats.safetensors", stats, metadata=context.metadata)
        files[f"{context.stem}-latents-stats.safetensors"] = ("REPA-E latent statistics: latents_bias, "
                                                              "latents_scale [1, C, 1, 1]; normalised = (z - bias) * "
                                                              "scale")
    return files
