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
