"""Every shipped recipe resolves against the built-in components and builds on the meta device."""

from __future__ import annotations

import pytest

from repae.build import build_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe

from conftest import ROOT

RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if not p.name.startswith("_") and "_base" not in p.parts
)
REGISTRY = load_plugins(select={"repae"}).registry


def test_the_paper_tables_have_recipes():
    tables = {p.parent.name for p in RECIPES if p.parent.parent.name == "paper"}
    assert tables == {"table1", "table3", "table4", "table5", "table6", "table7", "table8", "table9"}
    for name in ("quickstart", "repae_sdvae_dinov2", "repa_sdvae_dinov2", "vanilla_sdvae"):
        assert ROOT / "recipes" / f"{name}.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_builds_on_meta(path):
    resolved = read_recipe(path, [], REGISTRY)
    built = {b.label: b for b in build_recipe(resolved, device="meta")}
    assert "trainer" in built and "denoiser" in built
    trainer = built["trainer"].component
    assert trainer.phases[-1] == "denoiser"
    if "tokenizer" in trainer.phases:  # end-to-end: the VAE trains and the diffusion loss must not reach it ...
        diffusion = resolved.get("losses")
        routes = {spec.key: spec.config.updates for spec in diffusion}
        if "e2e_diffusion_loss" not in path.name and "no_stopgrad" not in path.name:
            assert "tokenizer" not in routes["diffusion"], "the stop-gradient of REPA-E"


def test_headline_recipe_numbers():
    resolved = read_recipe(ROOT / "recipes" / "repae_sdvae_dinov2.yaml", [], REGISTRY)
    built = {b.label: b for b in build_recipe(resolved, device="meta")}
    assert 675e6 < built["denoiser"].num_parameters < 684e6  # SiT-XL/2 (675M) + the 8.1M projector
    losses = {spec.key: spec.config for spec in resolved.get("losses")}
    assert (losses["repa"].weight, losses["repa_tokenizer"].weight, losses["kl"].weight, losses["gan"].weight) == (
        0.5, 1.5, 1e-6, 0.1)
    trainer = built["trainer"].config
    assert (trainer.batch_size, trainer.steps, trainer.ema_decay) == (256, 400_000, 0.9999)
