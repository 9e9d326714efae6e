"""The example plugin's components. Imported only when a recipe builds them; they use only the public names of
``repae`` (the contracts are in ``repae.interfaces``, docs/plugins.md explains them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repae import BuildContext, DiagonalGaussian, Loss, StepContext, UserError
from repae_plugin_example import MidpointConfig, PatchStatsConfig, PixelShuffleConfig, VarianceFloorConfig


class PixelShuffleTokenizer(nn.Module):
    """Pixel-unshuffle by ``f``, then 1x1 convolutions to (mean, logvar); the decoder mirrors it."""

    def __init__(self, config: PixelShuffleConfig) -> None:
        super().__init__()
        f, c = config.downsample, config.latent_channels
        self.downsample, self.latent_channels = f, c
        self.encoder = nn.Sequential(nn.Conv2d(3 * f * f, config.width, 1), nn.SiLU(), nn.Conv2d(config.width, 2 * c, 1))
        self.decoder = nn.Sequential(nn.Conv2d(c, config.width, 1), nn.SiLU(), nn.Conv2d(config.width, 3 * f * f, 1))

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(F.pixel_unshuffle(images, self.downsample)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.decoder(z), self.downsample)


class PatchStatsEncoder(nn.Module):
    """Frozen: normalise uint8 images to [-1, 1], cut patches, project them with a fixed random matrix."""

    def __init__(self, config: PatchStatsConfig) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = config.patch_size, config.embed_dim
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        weight = torch.randn(config.embed_dim, 3 * config.patch_size**2, generator=generator)
        self.proj = nn.Linear(3 * config.patch_size**2, config.embed_dim, bias=False)
        if self.proj.weight.device.type != "meta":
            with torch.no_grad():
                self.proj.weight.copy_(weight / weight.shape[1] ** 0.5)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PatchStatsEncoder:
        return super().train(False)  # always frozen

    def num_tokens(self, resolution: int) -> int:
        return (resolution // self.patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        patches = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)
        return self.proj(patches)


class VarianceFloorLoss(Loss):
    """``relu(floor - std)`` averaged over images and channels, where ``std`` is each latent channel's standard
    deviation over the spatial positions of ``ctx.z`` (the posterior sample; it carries gradients to the tokenizer in
    the tokenizer's phase only). Terms: ``loss`` and ``spatial_std`` (the mean ``std``, logged)."""

    def __init__(self, config: VarianceFloorConfig) -> None:
        super().__init__(config)
        self.floor = config.floor

    def forward(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        std = ctx.z.float().flatten(2).std(dim=2)  # [B, C]
        return {"loss": F.relu(self.floor - std).mean(), "spatial_std": std.mean().detach()}

    def extra_repr(self) -> str:
        return f"floor={self.floor}, {super().extra_repr()}"


class MidpointSampler:
    """Explicit midpoint rule for the flow-matching ODE ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` on
    ``linspace(1, 0, steps + 1)``: ``x_mid = x + dt/2 v(x, t)``, ``x <- x + dt v(x_mid, t + dt/2)``. Second order:
    exact for velocities linear in ``t``. Classifier-free guidance ``v_null + s (v - v_null)`` where
    ``guidance_low <= t <= guidance_high`` (null label ``denoiser.num_classes``). Deterministic: ``generator`` is not
    used. The state is float64; the denoiser runs in the dtype of its parameters."""

    def __init__(self, config: MidpointConfig) -> None:
        self.config = config

    @torch.no_grad()
    def __call__(
        self,
        denoiser: Any,
        noise: torch.Tensor,
        labels: torch.Tensor,
        *,
        cfg_scale: float | None = None,
        guidance: tuple[float, float] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        scale = self.config.cfg_scale if cfg_scale is None else float(cfg_scale)
        low, high = (self.config.guidance_low, self.config.guidance_high) if guidance is None else guidance
        if scale != 1.0 and not float(denoiser.class_dropout_prob) > 0:
            raise UserError(f"cfg_scale {scale} needs the null label {denoiser.num_classes}, but the denoiser was "
                            "built without one (class_dropout_prob 0): set cfg_scale to 1")
        param = next(iter(denoiser.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        null = torch.full_like(labels, int(denoiser.num_classes))

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            times = torch.full(labels.shape, t, dtype=dtype, device=x.device)
            v = denoiser(x.to(dtype), times, labels).prediction[:, : x.shape[1]].double()
            if scale != 1.0 and low <= t <= high:
                v_null = denoiser(x.to(dtype), times, null).prediction[:, : x.shape[1]].double()
                v = v_null + scale * (v - v_null)
            return v

        was_training = bool(denoiser.training)
        denoiser.eval()
        try:
            x = self._integrate(velocity, noise.double())
        finally:
            denoiser.train(was_training)
        return x.to(noise.dtype)

    def _integrate(self, velocity: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        grid = torch.linspace(1.0, 0.0, self.config.steps + 1, dtype=torch.float64).tolist()
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            dt = t_next - t_cur
            x_mid = x + dt / 2 * velocity(x, t_cur)
            x = x + dt * velocity(x_mid, t_cur + dt / 2)
        return x

    def __repr__(self) -> str:
        return f"MidpointSampler({self.config})"


def build_pixel_shuffle(config: PixelShuffleConfig, context: BuildContext) -> PixelShuffleTokenizer:
    return PixelShuffleTokenizer(config)


def build_patch_stats(config: PatchStatsConfig, context: BuildContext) -> PatchStatsEncoder:
    return PatchStatsEncoder(config)


def build_variance_floor(config: VarianceFloorConfig, context: BuildContext) -> VarianceFloorLoss:
    return VarianceFloorLoss(config)


def build_midpoint(config: MidpointConfig, context: BuildContext) -> MidpointSampler:
    return MidpointSampler(config)
