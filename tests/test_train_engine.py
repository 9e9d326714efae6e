"""The engine end to end on CPU: exact resume, 2 processes = 1 process, gradient routing, the run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from repae.build import build_recipe
from repae.cli import app
from repae.plugins import load_plugins
from repae.recipe import read_recipe
from repae.train.checkpoint import latest_checkpoint

from conftest import ROOT

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SMALL = [
    "dataset.num_images=64", "trainer.batch_size=8", "trainer.steps=4", "trainer.log_every=1", "trainer.checkpoint_every=2",
    "trainer.sample_every=0", "trainer.num_workers=0",
]


def build(overrides=(), *, device="cpu"):
    resolved = read_recipe(QUICKSTART, [*SMALL, *overrides], load_plugins().registry)
    return resolved, {b.label: b.component for b in build_recipe(resolved, device=device)}


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint(run_dir)
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), *SMALL, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_run_writes_checkpoints_metrics_and_samples(tmp_path):
    out = tmp_path / "run"
    run_cli("--out", str(out), "trainer.sample_every=4", "trainer.sample_count=4", "sampler.steps=2")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    for key in ("tokenizer/total", "discriminator/gan", "denoiser/diffusion", "denoiser/repa", "denoiser/grad_norm",
                "tokenizer/grad_norm", "img_per_s"):
        assert all(isinstance(line[key], float) for line in lines), key
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002", "step-0000004"] or sorted(
        p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    files = {p.name for p in latest_checkpoint(out).iterdir()}
    assert {"model-denoiser.safetensors", "model-ema-denoiser.safetensors", "model-tokenizer.safetensors",
            "model-discriminator.safetensors", "model-latent_norm.safetensors", "state.json"} <= files
    assert (out / "samples" / "step-0000004.png").stat().st_size > 100


def test_resume_is_exact(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_cli("--out", str(straight))
    run_cli("--out", str(interrupted), "trainer.steps=2")
    output = run_cli("--out", str(interrupted), "--allow-recipe-change")
    assert "resuming from" in output and "step 2 of 4" in output
    assert (interrupted / "recipe.previous-1.yaml").is_file()
    a, b = checkpoint_tensors(straight), checkpoint_tensors(interrupted)
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_different_recipe_is_refused_without_the_flag(tmp_path):
    out = tmp_path / "run"
    run_cli("--out", str(out), "trainer.steps=2")
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), *SMALL, "--out", str(out)])
    assert result.exit_code == 2 and "trainer.steps" in result.stderr and "--allow-recipe-change" in result.stderr


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    run_cli("--out", str(single), "trainer.steps=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "repae",
           "run", str(QUICKSTART), *SMALL, "trainer.steps=2", "--out", str(double), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    a, b = checkpoint_tensors(single), checkpoint_tensors(double)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"max abs difference 2 processes vs 1: {worst:.3g}")
    assert worst < 1e-4, worst  # same global batch and randomness; only the order of float reductions differs
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k


ROUTES = {
    # loss section -> parts whose parameters must receive gradient; every other part must receive none
    "{name: reconstruction, updates: [tokenizer]}": {"tokenizer"},
    "{name: kl, updates: [tokenizer]}": {"tokenizer"},
    "{name: repa, depth: 2, updates: [tokenizer]}": {"tokenizer"},
    "{name: repa, depth: 2, updates: [denoiser]}": {"denoiser"},
    "{name: flow-matching, updates: [denoiser]}": {"denoiser"},
    "{name: flow-matching, updates: [denoiser, tokenizer]}": {"denoiser", "tokenizer"},
    "{name: patchgan, ndf: 8, n_layers: 1, updates: [tokenizer, discriminator]}": {"tokenizer", "discriminator"},
    "{name: patchgan, ndf: 8, n_layers: 1, updates: [discriminator]}": {"discriminator"},
}


@pytest.mark.parametrize("section, expected", ROUTES.items(), ids=list(ROUTES))
def test_a_loss_only_reaches_the_parts_it_lists(section, expected):
    # the alignment loss runs the denoiser on noisy latents: a diffusion objective (here with weight 0, so that it
    # sends no gradient) must define the diffusion process
    process = ["losses.process={name: flow-matching, weight: 0.0}"] if "repa" in section else []
    _, built = build(["losses=null", f"losses.only={section}", *process])
    trainer = built["trainer"]
    trainer.setup()
    before = {name: {k: v.clone() for k, v in module.state_dict().items()} for name, module in trainer.parts.items()}
    order_inputs = _inputs(trainer, built)
    trainer.compute_gradients([order_inputs], step=0)
    got = {name for name, module in trainer.parts.items()
           if any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())}
    assert got == expected
    trainer.apply_gradients()
    for name, module in trainer.parts.items():
        changed = any(not torch.equal(before[name][k], v) for k, v in module.state_dict().items()
                      if v.is_floating_point() and not k.startswith("running_"))
        assert changed == (name in expected), name


def _inputs(trainer, built):
    from repae.train.data import StepOrder

    dataset = built["dataset"]
    order = StepOrder(len(dataset), 8, 1, 1, 0, 0)
    items = [dataset[i] for i in order.global_batch(0).tolist()]
    x = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    return trainer.make_inputs(0, 0, x, labels, order)


def test_trainer_config_errors_are_clear():
    with pytest.raises(Exception, match="does not list the trainable part"):
        build(["trainer.phases=[denoiser, tokenizer]"])
    with pytest.raises(Exception, match="lists updates \\['decoder'\\]"):
        build(["losses.kl.updates=[decoder]"])


def test_latent_diagnostics_by_hand():
    from repae.analysis import spatial_variance, total_variation

    z = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    assert spatial_variance(z) == pytest.approx(torch.tensor([0.0, 1.0, 2.0, 3.0]).var().item())
    assert total_variation(z) == pytest.approx((2 + 2) + (1 + 1))
    assert spatial_variance(torch.ones(2, 3, 4, 4)) == 0 and total_variation(torch.ones(2, 3, 4, 4)) == 0


@pytest.mark.slow
def test_table1_direction_without_stop_gradient_the_latent_collapses(tmp_path):
    """Paper Table 1 at toy scale: letting the diffusion loss reach the tokenizer (no stop-gradient) drives the
    latents' spatial variance and total variation far below what REPA-E keeps."""
    from repae.analysis import spatial_variance, total_variation

    measured = {}
    for name, extra in (("repae", []), ("no-stop-grad", ["losses.diffusion.updates=[denoiser,tokenizer]"])):
        _, built = build(["dataset.num_images=256", "trainer.batch_size=16", "trainer.steps=40",
                          "trainer.checkpoint_every=1000", "trainer.log_every=1000", *extra])
        built["trainer"].run(tmp_path / name, progress=False)
        dataset = built["dataset"]
        images = torch.stack([dataset[i][0] for i in range(64)]).float() / 127.5 - 1
        with torch.no_grad():
            z = built["tokenizer"].encode(images).mean
        measured[name] = (spatial_variance(z), total_variation(z))
    (var_e2e, tv_e2e), (var_bad, tv_bad) = measured["repae"], measured["no-stop-grad"]
    assert var_bad < 0.05 * var_e2e, measured
    assert tv_bad < 0.25 * tv_e2e, measured


def test_gradient_accumulation_equals_the_whole_batch_at_once(tmp_path):
    """Without batch statistics in the objective (fixed latent scale, no discriminator), 2 micro-batches of 4 give
    the step that one batch of 8 gives."""
    recipe = ["latent_norm={name: fixed-scale, scale: 1.0}", "losses=null",
              "losses.diffusion={name: flow-matching}", "losses.repa={name: repa, depth: 2}", "trainer.steps=2"]
    for accum in (1, 2):
        run_cli("--out", str(tmp_path / f"accum{accum}"), *recipe, f"trainer.grad_accum={accum}")
    a, b = checkpoint_tensors(tmp_path / "accum1"), checkpoint_tensors(tmp_path / "accum2")
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-5, worst


def test_the_tokenizer_phase_must_come_first():
    with pytest.raises(Exception, match="tokenizer's phase must come first"):
        build(["trainer.phases=[denoiser, discriminator, tokenizer]"])


def test_label_dropout_only_in_the_denoiser_phase():
    _, built = build()
    trainer = built["trainer"]
    trainer.setup()
    inputs = _inputs(trainer, built)
    inputs.drop_labels = torch.ones_like(inputs.drop_labels)
    seen = []
    original = trainer.denoiser.forward

    def spy(*args, **kwargs):
        seen.append((trainer.denoiser.training, bool(kwargs["force_drop"].any())))
        return original(*args, **kwargs)

    trainer.denoiser.forward = spy
    trainer.compute_gradients([inputs], step=0)
    assert seen == [(False, False), (True, True)]  # eval-mode alignment pass: no dropout; train-mode pass: dropout


def test_resume_applies_the_new_optimizer_settings_and_rejects_other_parts(tmp_path):
    out = tmp_path / "run"
    run_cli("--out", str(out), "trainer.steps=2")
    _, built = build(["trainer.steps=4", "trainer.optimizers.default.lr=5.0e-5"])
    trainer = built["trainer"]
    trainer.setup()
    from repae.train.checkpoint import load_checkpoint

    trainer.load_state(load_checkpoint(latest_checkpoint(out)))
    assert trainer.step == 2
    assert {g["lr"] for opt in trainer.optimizers.values() for g in opt.param_groups} == {5e-5}
    _, bigger = build(["denoiser.depth=5"])
    bigger["trainer"].setup()
    from repae.errors import UserError

    with pytest.raises(UserError, match="does not fit this recipe's components"):
        bigger["trainer"].load_state(load_checkpoint(latest_checkpoint(out)), source="x")
