"""Exponential moving average of modules: parameters and floating-point buffers (integer buffers are copied)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["EMA"]


class EMA(nn.Module):
    """EMA copies of named modules (the denoiser and its latent normaliser, as REPA-E keeps them).

    Starts as an exact copy (the reference's ``update_ema(ema, model, decay=0)``); ``update`` moves every parameter
    and float buffer ``x_ema <- decay * x_ema + (1 - decay) * x``. The copies are frozen and in eval mode.
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadows = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items() if m is not None})
        self.shadows.requires_grad_(False)
        self.shadows.eval()

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # always eval

    @torch.no_grad()
    def update(self, modules: Mapping[str, nn.Module]) -> None:
        weight = 1.0 - self.decay
        for name, shadow in self.shadows.items():
            live = modules[name]
            targets: list[torch.Tensor] = list(shadow.parameters())
            sources: list[torch.Tensor] = [p.detach() for p in live.parameters()]
            for ema_b, b in zip(shadow.buffers(), live.buffers()):
                if ema_b.is_floating_point():
                    targets.append(ema_b)
                    sources.append(b)
                else:
                    ema_b.copy_(b)
            if targets:
                torch._foreach_lerp_(targets, sources, weight)

    def __getitem__(self, name: str) -> nn.Module:
        return self.shadows[name]
