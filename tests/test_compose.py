"""A recipe checked whole before step 1: the measured mismatches between components now stop `repae recipe validate`
and `repae run` with exit code 2, naming both key paths, before any data is read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import repae
from repae.cli import app
from repae.compose import compose_recipe
from repae.errors import RecipeError
from repae.plugins import load_plugins
from repae.recipe import read_recipe

from conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
HEADLINE = ROOT / "recipes" / "repae_sdvae_dinov2.yaml"
REGISTRY = load_plugins(select={"repae"}).registry


def problems(recipe, *overrides: str, check_step: bool = True) -> str:
    with pytest.raises(RecipeError) as info:
        compose_recipe(read_recipe(recipe, list(overrides), REGISTRY), check_step=check_step)
    return str(info.value)


def test_quickstart_at_64_px_is_derived_whole_and_trains(tmp_path):
    """Measured: `repae run recipes/quickstart.yaml dataset.resolution=64` failed at step 1 with "expected latents
    [B, 4, 8, 8], got (4, 4, 16, 16)". Now the SiT's input size follows the dataset and the tokenizer."""
    composition = compose_recipe(read_recipe(QUICKSTART, ["dataset.resolution=64"], REGISTRY))
    assert composition.recipe.spec("denoiser").config.input_size == 16
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "dataset.resolution=64", "dataset.num_images=16",
                                      "trainer.batch_size=4", "trainer.steps=1", "trainer.sample_every=0",
                                      "trainer.checkpoint_every=1", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "input_size: 16" in (out / "recipe.yaml").read_text()


def test_a_resolution_the_tokenizer_does_not_divide_names_dataset_resolution(tmp_path):
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), "dataset.resolution=62", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "command line `dataset.resolution=62`: dataset.resolution: 62 px images are not a multiple of the " \
           "tokenizer's downsampling factor 4" in result.stderr
    assert "set dataset.resolution to a multiple of 4 (e.g. 60 or 64)" in result.stderr
    assert not (tmp_path / "r").exists()  # nothing written before the check
    # a resolution the tokenizer divides but the SiT's patches do not tile: blamed on what it was derived from
    text = problems(QUICKSTART, "dataset.resolution=60")
    assert "input_size 15 is not divisible by patch_size 2" in text and "dataset.resolution 60 px" in text


def test_the_headline_recipe_at_512_px_keeps_its_token_grids():
    """Measured: with `dataset.resolution=512` the SiT stayed at 32x32 latents."""
    composition = compose_recipe(read_recipe(HEADLINE, ["dataset.resolution=512"], REGISTRY), check_step=False)
    assert composition.recipe.spec("denoiser").config.input_size == 64
    text = problems(HEADLINE, "dataset.resolution=512", "denoiser.input_size=32", check_step=False)
    assert "denoiser.input_size: the denoiser takes 32x32 latents (set at command line" in text
    assert "the latents are 64x64" in text and "dataset.resolution = 512" in text


def test_tokenizer_channels_against_the_denoisers_name_both_keys():
    """Measured: a tokenizer with 8 latent channels under a 4-channel SiT passed validate and the dry run."""
    text = problems(QUICKSTART, "tokenizer.latent_channels=8", "denoiser.in_channels=4")
    assert "denoiser.in_channels: the denoiser takes 4-channel latents" in text
    assert "tokenizer.latent_channels = 8 (command line `tokenizer.latent_channels=8`)" in text
    assert "remove denoiser.in_channels (it is derived) or set it to 8" in text
    # left to derivation, the same tokenizer simply fits
    composition = compose_recipe(read_recipe(QUICKSTART, ["tokenizer.latent_channels=8"], REGISTRY))
    assert composition.recipe.spec("denoiser").config.in_channels == 8
    assert composition.recipe.spec("latent_norm").config.channels == 8


def test_an_encoder_token_grid_other_than_the_denoisers_is_reported():
    """Measured: an encoder whose token grid differs from the denoiser's passed validate and the dry run."""
    text = problems(QUICKSTART, "encoders.0.token_stride=4")
    assert "encoders.0: the encoder gives 64 tokens per 32 px image, but the denoiser has 16 tokens" in text
    text = problems(QUICKSTART, "denoiser.encoder_dims=[16]")
    assert "projector 0 of the denoiser outputs 16-wide tokens but encoders.0.embed_dim = 32" in text


def test_labels_null_class_and_depths_are_checked_against_the_denoiser():
    text = problems(QUICKSTART, "denoiser.num_classes=3", "losses.repa.depth=9", check_step=False)
    assert "denoiser.num_classes: the denoiser has 3 classes" in text and "labels 0..3" in text  # 4 in the data
    assert "losses.repa.depth: the loss reads the hidden states after block 9, but the denoiser has 4 blocks" in text
    text = problems(QUICKSTART, "denoiser.class_dropout_prob=0", check_step=False)
    assert "sampler.cfg_scale: classifier-free guidance with scale 4.0" in text and "no null label row" in text


def test_every_problem_is_reported_at_once():
    text = problems(QUICKSTART, "denoiser.num_classes=3", "losses.repa.depth=9", "denoiser.class_dropout_prob=0",
                    check_step=False)
    assert "3 problem(s)" in text


def test_losses_need_encoders_parts_and_one_diffusion_process():
    text = problems(QUICKSTART, "encoders=null", check_step=False)
    assert "losses.repa: losses.repa 'repa'" in text and "aligns the denoiser to encoder tokens, but the recipe has " \
        "no encoders" in text
    text = problems(QUICKSTART, "losses.diffusion=null", check_step=False)
    assert "no loss defines the diffusion process" in text and "diffusion: {name: flow-matching}" in text
    text = problems(QUICKSTART, "losses.extra={name: ddpm}", check_step=False)
    assert "several losses define the diffusion process: losses.diffusion, losses.extra" in text
    text = problems(QUICKSTART, "losses.kl.updates=[decoder]", check_step=False)
    assert "losses.kl.updates: the loss updates part(s) ['decoder'] that this training does not have" in text


def test_the_one_step_check_catches_what_the_contracts_cannot_see(monkeypatch):
    """A component whose own shapes do not fit passes the contract checks; one step's forward on meta finds it and
    names the phase and the loss."""
    import repae_losses.regularizers as regularizers

    def broken(self, ctx):
        return {"loss": (ctx.recon - ctx.images[:, :1, :3]).abs().mean()}  # shapes that do not broadcast

    monkeypatch.setattr(regularizers.ReconstructionLoss, "forward", broken)
    text = problems(QUICKSTART)
    assert "losses.reconstruction: one step on meta failed in the tokenizer phase, loss 'reconstruction'" in text


def test_alignment_from_a_latent_cache_is_a_recipe_problem_not_a_traceback(tmp_path):
    """Measured: a `latent-cache` dataset with a `repa` loss passed the composition checks and the one-step check then
    raised AttributeError (a traceback from `repae recipe validate`). The encoders need images; a cache has none."""
    from repae.latent_cache import write_latent_cache
    from repae_data.synthetic import SyntheticDataset

    tokenizer = repae.create("tokenizer", "sd-vae", size="tiny", registry=REGISTRY).eval()
    cache = write_latent_cache(SyntheticDataset(num_classes=5, resolution=16, num_images=8, seed=0), tokenizer,
                               tmp_path / "cache", batch_size=4, device="cpu", show_progress=False,
                               tokenizer_info={"name": "sd-vae", "latent_channels": 4, "downsample": 4})
    recipe = tmp_path / "repa_from_cache.yaml"
    recipe.write_text(f"""\
dataset: {{name: latent-cache, root: {cache}}}
tokenizer: {{name: sd-vae, size: tiny}}
encoders: [{{name: dinov2, size: tiny, token_stride: 8}}]
denoiser: {{name: sit, size: tiny, num_classes: 5}}
losses:
  diffusion: {{name: flow-matching, updates: [denoiser]}}
  repa: {{name: repa, depth: 2, weight: 0.5, updates: [denoiser]}}
trainer: {{name: default, steps: 1, batch_size: 4}}
""")
    result = CliRunner().invoke(app, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "losses.repa: losses.repa 'repa'" in result.stderr
    assert "yields cached latents, not images: there is nothing to encode" in result.stderr
    assert "train from images" in result.stderr
    # without the alignment loss the same cache trains (REPA's frozen-tokenizer setting, vanilla objective)
    compose_recipe(read_recipe(recipe, ["losses.repa=null", "encoders=null"], REGISTRY))


def test_an_unknown_preset_does_not_hide_the_sections_other_mistakes():
    """Measured: `denoiser: {size: XXL/2, dpeth: 3}` reported the preset only; a second run then found the typo."""
    with pytest.raises(RecipeError) as info:
        read_recipe(QUICKSTART, ["denoiser.size=XXL/2", "denoiser.dpeth=3"], REGISTRY)
    text = str(info.value)
    assert "denoiser.size: unknown preset 'XXL/2'" in text and "denoiser.dpeth" in text and "depth" in text


def test_values_derived_equal_to_their_default_are_still_reported_as_derived():
    """Measured: `repae run --dry-run` on the headline recipe listed input_size only when it differed from the
    default 32, so at 256 px the derived grid went unmentioned."""
    composition = compose_recipe(read_recipe(HEADLINE, [], REGISTRY), check_step=False)
    assert any(line.startswith("denoiser.input_size = 32") for line in composition.derived), composition.derived
    assert "input_size" in composition.recipe.spec("denoiser").derived
