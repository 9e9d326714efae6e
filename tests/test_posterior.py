"""repae.DiagonalGaussian, the one posterior of the KL autoencoders (sd-vae/in-vae/va-vae, diffusers-vae, the example
plugin), against diffusers' DiagonalGaussianDistribution (LDM's class) when diffusers is installed."""

from __future__ import annotations

import pytest
import torch

from repae import DiagonalGaussian, Posterior


def moments(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(3, 8, 5, 6, generator=generator)
    m[:, 4:] *= 20  # log-variances beyond the clamp on both sides
    return m


def test_is_a_posterior_with_ldm_numbers():
    m = moments()
    post = DiagonalGaussian(m)
    assert isinstance(post, Posterior)
    mean, logvar = m[:, :4], m[:, 4:].clamp(-30, 20)
    assert torch.equal(post.mean, mean) and torch.equal(post.mode(), mean) and torch.equal(post.logvar, logvar)
    assert post.logvar.min() == -30 and post.logvar.max() == 20
    eps = torch.randn_like(mean)
    assert torch.equal(post.sample(eps), mean + torch.exp(0.5 * logvar) * eps)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,) and torch.allclose(post.kl(), kl, rtol=1e-6)
    a = post.sample(generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, post.sample(generator=torch.Generator().manual_seed(1)))


def test_matches_diffusers():
    distributions = pytest.importorskip("diffusers.models.autoencoders.vae")
    m = moments(2)
    ours, theirs = DiagonalGaussian(m), distributions.DiagonalGaussianDistribution(m)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.kl(), theirs.kl()) and torch.equal(ours.mode(), theirs.mode())


@pytest.mark.parametrize("shape", [(2, 7, 4, 4), (2, 8, 4)])
def test_bad_moments_are_named(shape):
    with pytest.raises(ValueError, match=r"moments \[B, 2C, h, w\].*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        DiagonalGaussian(torch.zeros(shape))
