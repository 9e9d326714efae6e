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
    output = run_cli("--out", str(interrupted))  # training for longer needs no --allow-recipe-change
    assert "resuming from" in output and "step 2 of 4" in output
    assert "continuing with a changed recipe (trainer.steps)" in output
    assert (interrupted / "recipe.previous-1.yaml").is_file()
    a, b = checkpoint_tensors(straight), checkpoint_tensors(interrupted)
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_different_recipe_is_refused_without_the_flag(tmp_path):
    out = tmp_path / "run"
    run_cli("--out", str(out), "trainer.steps=2")
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), *SMALL, "trainer.steps=2", "trainer.batch_size=16",
                                      "--out", str(out)])
    assert result.exit_code == 2 and "trainer.batch_size" in result.stderr
    assert "--allow-recipe-change" in result.stderr


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["trainer.grad_accum=2"], ["trainer.grad_accum=2", "trainer.static_graph=false"]],
                         ids=["ddp-static-graph", "ddp-dynamic-graph"])
def test_two_gloo_processes_equal_one_process(tmp_path, extra):
    single, double = tmp_path / "single", tmp_path / "double"
    run_cli("--out", str(single), "trainer.steps=2", *extra)
    torchrun("-m", "repae", "run", str(QUICKSTART), *SMALL, "trainer.steps=2", *extra, "--out", str(double),
             "--device", "cpu")
    # Every logged loss and gradient norm (the norm of the averaged gradient: a sum instead of a mean doubles it)
    for one, two in zip(metric_lines(single), metric_lines(double), strict=True):
        for key, value in one.items():
            if key.endswith(("loss", "grad_norm", "total")) or "/" in key and not key.endswith("_per_s"):
                assert two[key] == pytest.approx(value, rel=1e-3, abs=1e-6), (one["step"], key)
    a, b = checkpoint_tensors(single), checkpoint_tensors(double)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"max abs difference 2 processes vs 1: {worst:.3g}")
    # Same global batch and randomness; only the order of float reductions differs (convolutions of a local batch of
    # 2 vs 4). Adam moves an element by about lr whatever its gradient's size, so a near-zero gradient that differs
    # in its last bits can move by up to lr (1e-3 in the quickstart) over two steps.
    assert worst < 1e-3, worst
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
    if extra == ["trainer.grad_accum=2"]:  # resuming under torchrun is exact: the same reduction at every step
        resumed = tmp_path / "resumed"
        common = ["-m", "repae", "run", str(QUICKSTART), *SMALL, *extra, "--out", str(resumed), "--device", "cpu"]
        torchrun(*common, "trainer.steps=1")
        torchrun(*common, "trainer.steps=2", "--allow-recipe-change")
        c = checkpoint_tensors(resumed)
        assert c.keys() == b.keys()
        for k in b:
            assert torch.equal(b[k], c[k]), k


@pytest.mark.slow
def test_unused_parameters_under_accumulation_are_named_with_the_fix(tmp_path):
    """REPA-E without reconstruction losses: no loss of the tokenizer's phase reaches its decoder. Under torchrun with
    gradient accumulation (DDP without an unused-parameter search) the first step names them and the fix; with
    `trainer.static_graph=false` the same run trains."""
    common = ["-m", "repae", "run", str(QUICKSTART), *SMALL, "trainer.steps=1", "trainer.grad_accum=2",
              "losses.reconstruction=null", "losses.gan=null", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *common,
           "--out", str(tmp_path / "refused")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "no loss of the tokenizer phase reaches the tokenizer's parameters decoder." in done.stderr
    assert "trainer.static_graph=false" in done.stderr
    assert "engine.py" not in done.stderr  # a message, not a traceback of repae's (torchrun prints its own summary)
    torchrun(*common, "trainer.static_graph=false", "--out", str(tmp_path / "searched"))


DDP_PROBE = """
import json, sys
import torch
import torch.distributed as dist
from repae.build import build_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe
from repae.train import distributed
from repae.train.data import StepOrder

distributed.init("cpu")
counts = {}
for accum in (1, 2):
    resolved = read_recipe(sys.argv[1], [*sys.argv[2:], f"trainer.grad_accum={accum}"], load_plugins().registry)
    built = {b.label: b.component for b in build_recipe(resolved, device="cpu")}
    trainer, dataset = built["trainer"], built["dataset"]
    trainer.setup()
    calls = counts.setdefault(accum, {})

    def counting(part):
        def hook(state, bucket):
            calls[part] = calls.get(part, 0) + 1
            return dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future().then(
                lambda fut: fut.value()[0])
        return hook

    for part, replica in trainer.replicas.items():
        replica.register_comm_hook(None, counting(part))
    order = StepOrder(len(dataset), 8, accum, dist.get_world_size(), dist.get_rank(), 0)
    for step in range(2):
        micro = []
        for m, indices in enumerate(order.local_batches(step, step + 1)):
            x = torch.stack([dataset[i][0] for i in indices])
            y = torch.tensor([dataset[i][1] for i in indices])
            micro.append(trainer.make_inputs(step, m, x, y, order))
        trainer.train_step(micro, step)
if dist.get_rank() == 0:
    print("COUNTS " + json.dumps(counts))
distributed.shutdown()
"""


@pytest.mark.slow
def test_ddp_reduces_each_part_once_per_step_under_accumulation(tmp_path):
    """Each trainable part is in DistributedDataParallel: its gradient buckets are all-reduced during the backward
    pass of its phase's last micro-batch only (``no_sync`` before), so 2 micro-batches cost as many all-reduces as 1,
    from the first step on (the same every step: a resumed run reduces as the straight one)."""
    script = tmp_path / "probe.py"
    script.write_text(DDP_PROBE)
    done = torchrun(str(script), str(QUICKSTART), *SMALL)
    line = next(line for line in done.stdout.splitlines() if line.startswith("COUNTS "))
    counts = json.loads(line.removeprefix("COUNTS "))
    assert set(counts["1"]) == {"tokenizer", "discriminator", "denoiser"}
    assert all(n >= 2 for n in counts["1"].values())  # >= 1 bucket per step, 2 steps
    assert counts["2"] == counts["1"]


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

    with pytest.raises(UserError, match="model-denoiser.safetensors: the denoiser weights do not fit"):
        bigger["trainer"].load_state(load_checkpoint(latest_checkpoint(out)), source="x")


trainer_built: list = []


def _one_step_gradients(overrides=()):
    """Every trainable parameter's gradient after one step of the quickstart on fixed inputs (same seed, same data)."""
    torch.manual_seed(0)
    _, built = build(list(overrides))
    trainer_built[:] = [built]
    trainer = built["trainer"]
    trainer.setup()
    trainer.compute_gradients([_inputs(trainer, built)], step=0)
    return {f"{name}.{key}": p.grad.clone() for name, module in trainer.parts.items()
            for key, p in module.named_parameters() if p.grad is not None}, trainer


@pytest.mark.parametrize("switch", [
    ["trainer.activation_checkpointing=[tokenizer, denoiser]"],
    ["trainer.channels_last=true"],
    ["trainer.sdpa_backend=math"],
])
def test_speed_and_memory_switches_leave_the_step_unchanged(switch, monkeypatch):
    """Activation checkpointing (recomputed blocks), channels_last and the attention kernel change how the step is
    computed, not what: the gradients of every part equal the plain step's (float32 on CPU)."""
    import torch.nn.attention as attention

    kernels = []
    real_kernel = attention.sdpa_kernel
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backend: kernels.append(backend) or real_kernel(backend))
    plain, _ = _one_step_gradients(["trainer.channels_last=false"])
    assert kernels == []  # auto: torch's own choice, no context
    switched, trainer = _one_step_gradients(["trainer.channels_last=false", *switch])
    if "sdpa_backend" in switch[0]:
        assert kernels == [attention.SDPBackend.MATH]
    assert switched.keys() == plain.keys() and len(plain) > 50
    for key in plain:
        torch.testing.assert_close(switched[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)
    if "checkpointing" in switch[0]:  # the blocks run again during the backward pass (the recompute)
        assert all(block.forward.__name__ == "checkpointed" for block in trainer.tokenizer.block_modules())
        calls = {"forward": 0, "backward": 0}
        stage = ["forward"]
        block_class = type(trainer.denoiser.block_modules()[0])
        original = block_class.forward

        def counting(self, *args, **kwargs):
            calls[stage[0]] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(block_class, "forward", counting)
        ctx = trainer._root_context(_inputs(trainer, trainer_built[0]), step=1).for_phase(
            "denoiser", trainer._plan("denoiser"))
        trainer._enter_phase("denoiser")
        objective = sum(loss(ctx)["loss"] for _, loss in trainer._phase_losses("denoiser"))
        stage[0] = "backward"
        objective.backward()
        depth = len(trainer.denoiser.block_modules())
        assert calls["backward"] == depth and calls["forward"] >= depth
    if "channels_last" in switch[0]:
        conv = next(p for p in trainer.tokenizer.parameters() if p.ndim == 4 and p.shape[-1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_ema_shadows_stay_plain_modules_when_the_live_blocks_are_checkpointed():
    """The EMA is copied before blocks are wrapped (or compiled): a shadow block runs its own weights."""
    _, built = build(["trainer.activation_checkpointing=[denoiser]"])
    trainer = built["trainer"]
    trainer.setup()
    live, shadow = trainer.denoiser.block_modules()[0], trainer.ema["denoiser"].block_modules()[0]
    x = torch.randn(2, trainer.denoiser.num_tokens, trainer.denoiser.hidden_size)
    c = torch.randn(2, trainer.denoiser.hidden_size)
    with torch.no_grad():
        before = shadow(x, c)
        for p in live.parameters():
            p.add_(1.0)
        assert torch.equal(shadow(x, c), before)
        assert not torch.allclose(live(x, c), before)


def test_fused_adamw_takes_the_same_step():
    results = []
    for fused in ("false", "true"):
        torch.manual_seed(0)
        _, built = build([f"trainer.optimizers.default.fused={fused}"])
        trainer = built["trainer"]
        trainer.setup()
        assert trainer.optimizers["denoiser"].defaults["fused"] is (True if fused == "true" else None)
        trainer.train_step([_inputs(trainer, built)], step=0)
        results.append(trainer.denoiser.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_activation_checkpointing_errors_name_the_component_and_the_fix():
    from repae.errors import UserError

    with pytest.raises(UserError, match="names 'vae', which is not a network of this training.*denoiser"):
        _, built = build(["trainer.activation_checkpointing=[vae]"])
        built["trainer"].setup()
    with pytest.raises(Exception, match=r"activation_checkpointing: \[encoders.0\] needs the capability HasBlocks"):
        _, built = build(["trainer.activation_checkpointing=[encoders.0]"])
        built["trainer"].setup()
