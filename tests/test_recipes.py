"""Every shipped recipe is checked whole (components built on meta, shapes through one step), and every paper recipe is
a one-line-style change of its base: it differs from it in exactly the keys its `# changes:` comment names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from repae.compose import compose_recipe
from repae.plugins import load_plugins
from repae.recipe import flatten_recipe, load_source, read_recipe

from conftest import ROOT

RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if not p.name.startswith("_") and "_base" not in p.parts
)
PAPER = [p for p in RECIPES if "paper" in p.parts]
REGISTRY = load_plugins(select={"repae"}).registry
STEP_CHECKED = {"quickstart.yaml", "repae_sdvae_dinov2.yaml", "repa_sdvae_dinov2.yaml", "vanilla_sdvae.yaml",
                "paper/table1/e2e_diffusion_loss.yaml", "paper/table4/clip_l_repae.yaml",
                "paper/table4/ijepa_h_repa.yaml", "paper/table5/invae_repa.yaml", "paper/table9/dit_xl_vavae_repa.yaml",
                "t2i_vae/repae_flux_vae_dinov2.yaml", "t2i_vae/repae_qwenimage_vae_dinov2.yaml"}
"""Recipes whose one-step shape check on meta runs here (1-2 s each for XL models); one per family of components:
the others differ from these in sizes only, and their composition is checked without the step."""


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT / "recipes")) for p in paths]


def test_the_paper_tables_have_recipes():
    tables = {p.parent.name for p in PAPER}
    assert tables == {"table1", "table3", "table4", "table5", "table6", "table7", "table8", "table9"}
    for name in ("quickstart", "repae_sdvae_dinov2", "repa_sdvae_dinov2", "vanilla_sdvae"):
        assert ROOT / "recipes" / f"{name}.yaml" in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_is_checked_whole_on_meta(path):
    if "t2i_vae" in path.parts:  # the diffusers-vae tokenizer needs the optional extra repae[diffusers]
        pytest.importorskip("diffusers")
    step = str(path.relative_to(ROOT / "recipes")) in STEP_CHECKED
    composition = compose_recipe(read_recipe(path, [], REGISTRY), check_step=step)
    built = {b.label: b for b in composition.built}
    assert "trainer" in built and "denoiser" in built and composition.plan is not None
    trainer = built["trainer"].component
    assert trainer.phases[-1] == "denoiser"
    if "tokenizer" in trainer.phases:  # end-to-end: the VAE trains and the diffusion loss must not reach it ...
        routes = {spec.key: spec.config.updates for spec in composition.recipe.get("losses")}
        if "e2e_diffusion_loss" not in path.name and "no_stopgrad" not in path.name:
            assert "tokenizer" not in routes["diffusion"], "the stop-gradient of REPA-E"
    # the derived shapes are recorded in the recipe a run directory would hold
    denoiser = composition.recipe.get("denoiser")[0].config
    tokenizer = built["tokenizer"].component
    assert denoiser.in_channels == tokenizer.latent_channels
    assert denoiser.input_size * tokenizer.downsample == built["dataset"].component.resolution


def _changes(path: Path) -> tuple[Path, list[str]]:
    text = path.read_text()
    found = re.search(r"^# changes: (.+)$", text, re.MULTILINE)
    assert found, f"{path} has no `# changes:` comment naming the keys it changes"
    base = re.search(r"^extends: (\S+)$", text, re.MULTILINE)
    assert base, f"{path} must extend exactly one base recipe"
    names = [] if found.group(1).strip() == "none" else [n.strip() for n in found.group(1).split(",")]
    return (path.parent / base.group(1)).resolve(), names


@pytest.mark.parametrize("path", PAPER, ids=_ids(PAPER))
def test_paper_recipe_differs_from_its_base_in_exactly_the_keys_its_comment_names(path):
    base, named = _changes(path)
    mine, theirs = flatten_recipe(load_source(path).data), flatten_recipe(load_source(base).data)
    missing = object()
    differing = {k for k in mine.keys() | theirs.keys()
                 if k != "description" and mine.get(k, missing) != theirs.get(k, missing)}

    def covered(key: str, name: str) -> bool:
        return key == name or key.startswith(name + ".")

    assert all(any(covered(k, n) for n in named) for k in differing), (
        f"{path.name} changes {sorted(differing)} but its comment names {named}")
    assert all(any(covered(k, n) for k in differing) for n in named), (
        f"{path.name} names {named} but changes only {sorted(differing)}")


def test_the_alignment_depth_is_one_key():
    """Table 6 as one change: `losses.repa.depth` moves the alignment of both parts (REPA-E aligns the tokenizer and
    the denoiser with one loss)."""
    resolved = read_recipe(ROOT / "recipes" / "quickstart.yaml", ["losses.repa.depth=1"], REGISTRY)
    composition = compose_recipe(resolved)
    phases = {p.part: p for p in composition.plan.phases}
    assert phases["tokenizer"].feature_depths == (1,) and phases["denoiser"].feature_depths == (1,)
    assert [k for k in flatten_recipe(resolved.to_dict()) if k.endswith(".depth") and k.startswith("losses")] == [
        "losses.repa.depth"]


def test_512_px_is_one_key():
    """The denoiser's input size follows the dataset resolution and the tokenizer's downsampling."""
    composition = compose_recipe(read_recipe(ROOT / "recipes" / "repae_sdvae_dinov2.yaml", ["dataset.resolution=512"],
                                             REGISTRY))
    sit = composition.recipe.get("denoiser")[0].config
    assert sit.input_size == 64 and "denoiser.input_size = 64" in composition.derived
    encoder = next(b.component for b in composition.built if b.slot == "encoders")
    denoiser = next(b.component for b in composition.built if b.slot == "denoiser")
    assert encoder.num_tokens(512) == denoiser.num_tokens == 1024


def test_headline_recipe_numbers():
    composition = compose_recipe(read_recipe(ROOT / "recipes" / "repae_sdvae_dinov2.yaml", [], REGISTRY))
    built = {b.label: b for b in composition.built}
    assert 675e6 < built["denoiser"].num_parameters < 684e6  # SiT-XL/2 (675M) + the 8.1M projector
    losses = {spec.key: spec.config for spec in composition.recipe.get("losses")}
    assert losses["repa"].weight == {"denoiser": 0.5, "tokenizer": 1.5} and losses["repa"].depth == 8
    assert (losses["kl"].weight, losses["gan"].weight) == (1e-6, {"tokenizer": 0.1, "discriminator": 1.0})
    trainer = built["trainer"].config
    assert (trainer.batch_size, trainer.steps, trainer.ema_decay) == (256, 400_000, 0.9999)
    assert composition.recipe.get("denoiser")[0].config.encoder_dims == [768]
