"""Opening a run: its recipe, components and checkpoint weights (EMA by default)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from repae.errors import UserError
from repae.runs import open_run, resolve_run_path


def test_open_run_loads_the_latest_ema_weights(quick_run):
    run = open_run(quick_run)
    assert run.step == 4 and run.checkpoint.name == "step-0000004"
    ema = load_file(str(run.checkpoint / "model-ema-denoiser.safetensors"))
    for key, value in run.denoiser.state_dict().items():
        assert torch.equal(value, ema[key]), key
    tokenizer = load_file(str(run.checkpoint / "model-tokenizer.safetensors"))
    assert all(torch.equal(v, tokenizer[k]) for k, v in run.tokenizer.state_dict().items())
    assert run.latent_shape() == (4, 8, 8) and len(run.encoders) == 1 and run.sampler is not None
    assert not run.denoiser.training


def test_open_run_raw_weights_and_a_given_checkpoint(quick_run):
    run = open_run(quick_run / "checkpoints" / "step-0000002", use_ema=False)
    raw = load_file(str(run.checkpoint / "model-denoiser.safetensors"))
    assert run.step == 2 and all(torch.equal(v, raw[k]) for k, v in run.denoiser.state_dict().items())


def test_bad_paths_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_run_path(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no checkpoint"):
        resolve_run_path(tmp_path)


def test_open_run_uses_the_given_registry_only(quick_run, registry, monkeypatch):
    """A caller's registry (the CLI's, with its plugin warnings) is used as is: plugins are not loaded a second
    time."""
    import repae.build

    def second_load():
        raise AssertionError("open_run loaded the plugins again")

    monkeypatch.setattr(repae.build, "default_registry", second_load)
    run = open_run(quick_run, slots=("tokenizer", "latent_norm", "denoiser"), registry=registry)
    assert run.step == 4 and set(run.components) == {"tokenizer", "latent_norm", "denoiser"}
    with pytest.raises(AssertionError, match="again"):
        open_run(quick_run, slots=("denoiser",))  # without one: the installed plugins' registry


def test_losses_are_built_on_meta_for_what_they_declare(quick_run):
    """The alignment depth and the diffusion process come from the run's losses (feature_depths, transport), built on
    meta: nothing is allocated or loaded for them."""
    from repae_losses.flow_matching import FlowMatchingTransport

    run = open_run(quick_run, slots=("denoiser", "losses"))
    assert set(run.losses) == {"diffusion", "repa", "reconstruction", "kl", "gan"}  # lpips: null in the quickstart
    assert run.alignment_depth() == 2  # losses.repa.depth of the quickstart
    assert isinstance(run.transport(), FlowMatchingTransport) and run.transport() is run.losses["diffusion"].transport
    parameters = [p for loss in run.losses.values() if isinstance(loss, torch.nn.Module) for p in loss.parameters()]
    assert parameters and all(p.device.type == "meta" for p in parameters)  # the PatchGAN discriminator, on meta
    assert next(run.denoiser.parameters()).device.type == "cpu"  # the models are real
    without = open_run(quick_run, slots=("denoiser",))
    assert without.losses == {} and without.alignment_depth() is None and without.transport() is None
