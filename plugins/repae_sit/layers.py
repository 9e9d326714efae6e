"""Layers shared by the SiT and DiT denoisers, and the transformer trunk both are made of.

DiT: "Scalable Diffusion Models with Transformers", Peebles & Xie, 2023 (arXiv 2212.09748) introduced the
adaLN-Zero block, the timestep/label embedders and the patch layout; SiT (arXiv 2401.08740) keeps them and REPA
(arXiv 2410.06940) adds the projector MLPs. Module and parameter names follow the official checkpoints
(``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.N.attn.qkv``, ``projectors.K``,
``final_layer.linear`` ...), so official state dicts load into these modules without renaming.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repae import DenoiserOutput, WeightsInfo

__all__ = [
    "AdaLNBlock",
    "Attention",
    "DiffusionTransformer",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "build_projector",
    "guided_prediction",
    "modulate",
    "sincos_pos_embed_2d",
]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens ``x`` ``[B, N, D]`` by per-sample ``shift``/``scale`` ``[B, D]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_1d(dim: int, positions: Tensor) -> Tensor:
    """``[len(positions), dim]`` float64: ``[sin(p*w), cos(p*w)]`` with ``w_k = 10000^(-k / (dim/2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos table ``[grid_size**2, dim]`` (float32), row-major tokens.

    Token ``h * grid_size + w`` gets ``[embed_1d(w), embed_1d(h)]`` (each ``dim/2`` wide), computed in float64.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # h of each token
    cols = coords.repeat(grid_size)  # w of each token
    table = torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)
    return table.to(torch.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches of a latent ``[B, C, H, W]`` to tokens ``[B, (H/p)*(W/p), D]``."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar time per sample (``[cos, sin]``, 256 wide), then a two-layer MLP.

    The time is embedded as given: continuous ``t`` for SiT, integer DDPM steps for DiT.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def frequency_embedding(self, t: Tensor) -> Tensor:
        """``[B, frequency_size]`` float32: ``cos(t * f_k)`` then ``sin(t * f_k)``, ``f_k = max_period^(-k/half)``."""
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.reshape(-1, 1).float() * freqs.reshape(1, -1)
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if self.frequency_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.frequency_embedding(t).to(next(self.mlp.parameters()).dtype))


class LabelEmbedder(nn.Module):
    """Class label table; with ``dropout_prob > 0`` it has a null row (index ``num_classes``) for CFG.

    In training mode labels are replaced by the null label with probability ``dropout_prob``; a boolean
    ``force_drop`` mask ``[B]`` replaces that random draw (and works in eval mode too).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        if force_drop is not None:
            drop = force_drop.to(device=labels.device, dtype=torch.bool)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = None
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1 -> GELU(tanh) -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: shift/scale/gate for attention and MLP from ``c``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to a ``p x p x out_channels`` patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA projector: ``Linear(hidden, p) -> SiLU -> Linear(p, p) -> SiLU -> Linear(p, out)`` applied per token."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, out_dim),
    )


def guided_prediction(output: Tensor, cfg_scale: float, guided_channels: int | None = None) -> Tensor:
    """Classifier-free guidance on a doubled batch ``[cond; uncond]`` (DiT's ``forward_with_cfg`` combination).

    The first ``guided_channels`` channels (all when ``None``) become ``uncond + s * (cond - uncond)`` in both
    halves; the other channels are passed through (cond half from the cond batch, uncond half from the null batch).
    """
    n = guided_channels if guided_channels is not None else output.shape[1]
    guided, rest = output[:, :n], output[:, n:]
    cond, uncond = guided.chunk(2, dim=0)
    mixed = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([mixed, mixed], dim=0), rest], dim=1)


class DiffusionTransformer(nn.Module):
    """The SiT/DiT trunk: patch embedding + fixed sin-cos positions, ``depth`` adaLN-Zero blocks conditioned on
    time + label, REPA projectors, and a final layer that unpatchifies to ``out_channels`` (``2 * in_channels`` with
    ``learn_sigma``: the prediction, then the variance values of the DiT/SiT releases).

    ``pos_embed`` (the 2-D sin-cos table, saved and loaded under its official key) is, with ``pos_embed="fixed"``, a
    persistent buffer that nothing trains; with ``pos_embed="learned"`` it is an ``nn.Parameter`` initialised to the
    same table, trained, clipped, decayed and EMA'd with the other parameters (the official REPA-E step trains it).
    Subclasses define ``forward``: how time enters and what the prediction is.
    """

    cfg_channels: int | None = None
    """Output channels :meth:`forward_with_cfg` guides by default (``None``: all)."""
    export_formats = {"official": "denoiser.safetensors (+ ema-denoiser.safetensors): the official SiT/DiT layout, "
                                  "latent BatchNorm as bn.* (REPA-E checkpoints)"}
    """:class:`repae.Exportable`: the formats ``repae export`` can write."""

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        learn_sigma: bool = False,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        qk_norm: bool = False,
        pos_embed: str = "fixed",
        encoder_dims: Sequence[int] = (),
        projector_dim: int = 2048,
    ) -> None:
        super().__init__()
        if pos_embed not in ("fixed", "learned"):
            raise ValueError(f"pos_embed must be 'fixed' or 'learned', got {pos_embed!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob  # > 0: the label table has the null row (CFG)
        self.encoder_dims = list(encoder_dims)
        self.mlp_ratio, self.qk_norm, self.projector_dim = mlp_ratio, qk_norm, projector_dim
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2

        self.pos_embed_mode = pos_embed
        table = sincos_pos_embed_2d(hidden_size, self.grid_size).unsqueeze(0)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table)
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_dim, d) for d in self.encoder_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        # What repae_sit.checkpoint.load_configured_weights loaded (empty / None after a random init): the files
        # (repae.RecordsWeights) and the split-off REPA-E latent BatchNorm buffers (repae.CarriesLatentNormState).
        self.loaded_weights: dict[str, WeightsInfo] = {}
        self.latent_norm_state: dict[str, Tensor] | None = None

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier-uniform linears (projectors too), zero biases, N(0, 0.02) label table and time
        MLP, zero adaLN modulations and final linear (so every block starts as the identity)."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.x_embedder.proj.bias is not None:
            nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for linear in self.t_embedder.mlp:
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=0.02)
        for module in self.modules():  # adaLN-Zero: every block (then the final layer) starts as the identity
            if isinstance(module, (AdaLNBlock, FinalLayer)):
                for layer in module.adaLN_modulation.modules():
                    if isinstance(layer, nn.Linear):
                        nn.init.zeros_(layer.weight)
                        nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``[B, N, p*p*C]`` (patch-major, channel-minor) to ``[B, C, H, W]``."""
        b, p, c, g = tokens.shape[0], self.patch_size, self.out_channels, self.grid_size
        x = tokens.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def run(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        feature_depths: Sequence[int] = (),
        features_only: bool = False,
        force_drop: Tensor | None = None,
    ) -> DenoiserOutput:
        """Run the trunk with ``t`` already in the embedder's units; the prediction is the raw final-layer output."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"expected latents [B, {self.in_channels}, {self.input_size}, {self.input_size}], got {tuple(x.shape)}"
            )
        depths = sorted(set(int(d) for d in feature_depths))
        if depths and not 1 <= depths[0] <= depths[-1] <= self.depth:
            raise ValueError(f"feature_depths must lie in 1..{self.depth}, got {list(feature_depths)}")
        if features_only and not depths:
            raise ValueError("features_only=True needs at least one entry in feature_depths")
        t = t.reshape(-1)
        if t.numel() == 1 and x.shape[0] != 1:
            t = t.expand(x.shape[0])
        stop = depths[-1] if features_only else self.depth

        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop)
        hidden: dict[int, Tensor] = {}
        for index, block in enumerate(self.blocks[:stop], start=1):
            h = block(h, c)
            if index in depths:
                hidden[index] = h
        if features_only:
            return DenoiserOutput(prediction=None, hidden=hidden)
        return DenoiserOutput(prediction=self.unpatchify(self.final_layer(h, c)), hidden=hidden)

    @property
    def architecture(self) -> dict[str, Any]:
        """The config fields that describe this network (what :mod:`repae_sit.releases` checks; repae's exports
        store it as ``repae.architecture`` metadata)."""
        arch = {"depth": self.depth, "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                "patch_size": self.patch_size, "mlp_ratio": self.mlp_ratio, "input_size": self.input_size,
                "in_channels": self.in_channels, "num_classes": self.num_classes, "encoder_dims": self.encoder_dims,
                "projector_dim": self.projector_dim, "qk_norm": self.qk_norm, "learn_sigma": self.learn_sigma}
        time_convention = getattr(self, "time_convention", None)
        return {**arch, "time_convention": time_convention} if time_convention is not None else arch

    def block_modules(self) -> list[nn.Module]:
        """:class:`repae.HasBlocks`: the transformer blocks (compiled one by one, checkpointed for memory)."""
        return list(self.blocks)

    def forward_with_cfg(
        self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, *, guided_channels: int | None = -1
    ) -> Tensor:
        """Classifier-free guidance on a doubled batch ``x = [x; x]``, ``y = [labels; null]``, as the reference
        samplers run it: the first half of ``x`` serves both halves, and the first ``guided_channels`` output channels
        (default ``-1``: :attr:`cfg_channels`; ``None``: all) become ``uncond + s (cond - uncond)`` in both halves; the
        other channels are the raw cond / uncond predictions."""
        channels = self.cfg_channels if guided_channels == -1 else guided_channels
        half = x[: x.shape[0] // 2]
        pred = self.forward(half.repeat(2, 1, 1, 1), t, y).prediction
        return guided_prediction(pred, cfg_scale, channels)

    def export(self, fmt: str, folder: Any, context: Any) -> dict[str, str]:
        """:class:`repae.Exportable` (see :func:`repae_sit.model.export_official`)."""
        from repae_sit.model import export_official

        return export_official(self, fmt, folder, context)

    def project(self, hidden: Tensor) -> list[Tensor]:
        """REPA projector outputs ``[B, N, encoder_dims[k]]``, one per target encoder, of tokens ``[B, N, D]``."""
        return [projector(hidden) for projector in self.projectors]

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, patch_size={self.patch_size}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, tokens={self.num_tokens}, pos_embed={self.pos_embed_mode}, "
            f"encoder_dims={self.encoder_dims}"
        )
