"""An image's tokens do not depend on the other images of its batch, for every registered encoder (issue 11).

REPA's alignment target for an image must be a function of that image: an encoder that mixes the images of a batch
(batch statistics, a normalisation over the batch, a token pooled across images) would make the target change with
the batch size, the sampler's order and the number of processes. Generated from the registry: every built-in encoder
with each of its ``tiny`` presets (random weights, CPU), and every third-party encoder found with the example plugin
installed (its defaults, or its ``tiny`` preset where it has one). Each is used as the trainer uses it: eval mode, no
gradients.

Tolerance: fp32, ``atol = rtol = 1e-5`` on tokens of magnitude up to ~4. The same computation on a batch of 1 and a
batch of 4 may take differently blocked matrix-product kernels (other CPUs, threads, GPUs), whose rounding differs by a
few ulps; on the 2-core CI machine with one thread the tiny encoders gave bitwise-equal tokens. An image that really
sees its neighbours moves by orders of magnitude more: the batch-leaking encoder below by ~1.4.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repae
from repae.plugins import load_plugins
from repae.registry import PRESET_FIELD

RESOLUTION = 64
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
BUILTIN = load_plugins(select={"repae"}).registry


def cases(registry) -> list[tuple]:
    """``(entry, preset)`` for every encoder: each ``tiny*`` preset, or the defaults (``None``) if it has none."""
    out = []
    for entry in registry.entries("encoder"):
        tiny = [p for p in entry.presets if p.startswith("tiny")]
        out.extend((entry, preset) for preset in (tiny or [None]))
    return out


def build(entry, preset, registry) -> nn.Module:
    section = {PRESET_FIELD: preset} if preset else {}
    encoder = repae.create("encoder", entry.qualified_name, registry=registry, **section)
    encoder.requires_grad_(False)
    return encoder.eval()  # as the trainer freezes it (Trainer.freeze)


def images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, generator=generator)


def assert_batch_independent(encoder) -> None:
    """Tokens of a batch of 4 equal those of each image alone, of a reordered batch, and of a batch whose other
    images are different ones."""
    batch = images(4, seed=0)
    with torch.no_grad():
        tokens = encoder(batch)
        assert tokens.dtype == torch.float32 and tokens.shape[0] == 4
        for i in range(4):
            torch.testing.assert_close(encoder(batch[i : i + 1])[0], tokens[i], **TOLERANCE,
                                       msg=lambda m, i=i: f"image {i} alone vs in its batch of 4: {m}")
        order = torch.tensor([2, 0, 3, 1])
        torch.testing.assert_close(encoder(batch[order]), tokens[order], **TOLERANCE,
                                   msg=lambda m: f"the batch reordered: {m}")
        others = torch.cat([batch[:1], images(3, seed=1)])
        torch.testing.assert_close(encoder(others)[0], tokens[0], **TOLERANCE,
                                   msg=lambda m: f"image 0 with three other images: {m}")


@pytest.mark.parametrize(("entry", "preset"), cases(BUILTIN),
                         ids=lambda v: getattr(v, "qualified_name", v or "defaults"))
def test_builtin_encoder_tokens_do_not_depend_on_the_batch(entry, preset):
    assert_batch_independent(build(entry, preset, BUILTIN))


def test_every_builtin_encoder_is_covered():
    assert {e.name for e, _ in cases(BUILTIN)} >= {"dinov2", "clip", "ijepa"}


def test_third_party_encoders_tokens_do_not_depend_on_the_batch(example_plugin):
    registry = repae.load_plugins().registry
    third_party = [(e, p) for e, p in cases(registry) if e.plugin.distribution != "repae"]
    assert {e.name for e, _ in third_party} >= {"patch-stats"}  # the example plugin's encoder
    for entry, preset in third_party:
        assert_batch_independent(build(entry, preset, registry))


class BatchLeakingEncoder(nn.Module):
    """What the check must catch: tokens normalised with statistics of the whole batch."""

    embed_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 16 * 16, self.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        tokens = self.proj(nn.functional.unfold(x, 16, stride=16).transpose(1, 2))
        return (tokens - tokens.mean(dim=0)) / (tokens.std(dim=0) + 1e-6) if tokens.shape[0] > 1 else tokens


def test_the_check_catches_an_encoder_that_sees_its_batch():
    with pytest.raises(AssertionError, match="alone vs in its batch"):
        assert_batch_independent(BatchLeakingEncoder().eval())
