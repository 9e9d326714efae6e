"""Issue 10 (deliverables 2 and 4): every checkpoint and weights load goes through one checker, pickles are refused
unless trusted explicitly, recipes hold data only, and a run records the weights it loaded.

Each broken file is made in ``tmp_path`` from a copy of the shared 4-step quickstart run and fed to the command a user
would run; the message is checked for the file, the part, the key (with both shapes) and the fix. Before this change:
a truncated or empty safetensors file was an uncaught ``SafetensorError`` traceback without the file named (exit 1), a
missing optimizer file a ``FileNotFoundError`` traceback, a deleted model file or a missing EMA copy silently fell back
on the recipe's initial weights, ``repae export`` wrote a wrong-shaped raw denoiser unchecked (exit 0), ``sample`` on
a ``.pt`` file said it "does not exist", a pickle's refusal repeated torch's advice to pass ``weights_only=False``, an
``argparse.Namespace`` in an official checkpoint was refused, and nothing recorded the weights a run loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from repae.errors import UserError, WeightsMismatchError
from repae.weights import TRUST_PICKLE_ENV, load_state_dict, load_weights, read_checkpoint
from conftest import QUICK_RUN_OVERRIDES, ROOT, cli

LAST = "step-0000004"


@pytest.fixture
def run(quick_run, tmp_path) -> Path:
    """A private copy of the 4-step quickstart run (checkpoints at steps 2 and 4)."""
    return Path(shutil.copytree(quick_run, tmp_path / "run"))


def _ckpt(run: Path) -> Path:
    return run / "checkpoints" / LAST


def _sample(run: Path, *extra, code: int = 2):
    return cli("sample", run, "-n", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
               "--out", run.parent / "samples", *extra, code=code)


def _one_line(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


def _rewrite(file: Path, change) -> None:
    state = load_file(str(file))
    change(state)
    save_file(state, str(file))


# -- broken checkpoint files ----------------------------------------------------------------------------------------
def test_truncated_model_file_is_named_with_the_fallback(run):
    file = _ckpt(run) / "model-ema-denoiser.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    text = _one_line(_sample(run).output)
    assert "model-ema-denoiser.safetensors cannot be read as safetensors" in text
    assert "truncated or corrupt" in text and "step-0000002" in text  # the checkpoint to fall back on


def test_zero_byte_file_is_named(run):
    (_ckpt(run) / "model-tokenizer.safetensors").write_bytes(b"")
    text = _one_line(_sample(run).output)
    assert "model-tokenizer.safetensors is empty (0 bytes)" in text and "step-0000002" in text


def test_missing_model_file_is_an_error_not_the_recipe_weights(run):
    """The tokenizer trained; without its file the sample would have used the recipe's initial VAE silently."""
    (_ckpt(run) / "model-tokenizer.safetensors").unlink()
    text = _one_line(_sample(run).output)
    assert "model-tokenizer.safetensors is missing" in text and "tokenizer weights" in text


def test_missing_optimizer_file_on_resume(run):
    (_ckpt(run) / "optimizer-denoiser.safetensors").unlink()
    overrides = [o for o in QUICK_RUN_OVERRIDES if not o.startswith("trainer.steps")] + ["trainer.steps=6"]
    result = cli("run", ROOT / "recipes" / "quickstart.yaml", *overrides, "--out", run, "--device", "cpu",
                 "--allow-recipe-change", code=2)
    text = _one_line(result.output)
    assert "optimizer-denoiser.safetensors is missing" in text and "denoiser optimizer state" in text
    assert "Fix:" in text


def test_missing_ema_copy_is_not_replaced_by_initial_weights(run):
    (_ckpt(run) / "model-ema-denoiser.safetensors").unlink()
    state = json.loads((_ckpt(run) / "state.json").read_text())
    state["models"].remove("ema-denoiser")  # as an older checkpoint without the file would read
    (_ckpt(run) / "state.json").write_text(json.dumps(state))
    text = _one_line(_sample(run).output)
    assert "model-ema-denoiser.safetensors" in text and "--no-ema" in text


@pytest.mark.parametrize("damage", ["shape", "missing", "extra"])
def test_mismatched_part_names_file_part_key_and_shapes(run, damage):
    file = _ckpt(run) / "model-ema-denoiser.safetensors"
    key = "pos_embed" if "pos_embed" in load_file(str(file)) else sorted(load_file(str(file)))[0]

    def change(state):
        if damage == "shape":
            state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
        elif damage == "missing":
            del state[key]
        else:
            state["surplus.weight"] = torch.zeros(2, 3)

    shape = list(load_file(str(file))[key].shape)
    _rewrite(file, change)
    text = _one_line(_sample(run).output)
    assert f"{file}: the ema-denoiser weights do not fit the" in text
    if damage == "shape":
        assert f"{key} is {shape[:-1] + [shape[-1] + 1]} in the file, {shape} in the" in text
    elif damage == "missing":
        assert f"{key} is missing from the file" in text
    else:
        assert "surplus.weight is not in the" in text
    assert "fix: the checkpoint does not match" in text and "recipe.yaml" in text


def test_export_checks_every_copy_before_writing(run, tmp_path):
    """The raw denoiser is not the one ``open_run`` loads (EMA is): it used to be exported unchecked."""
    file = _ckpt(run) / "model-denoiser.safetensors"
    key = sorted(load_file(str(file)))[0]
    _rewrite(file, lambda s: s.__setitem__(key, torch.zeros(3, 1, 7)))
    out = tmp_path / "export"
    text = _one_line(cli("export", run, "--format", "safetensors", "--out", out, code=2).output)
    assert f"{file}: the denoiser weights do not fit the" in text and f"{key} is [3, 1, 7] in the file" in text
    assert not out.exists() or not any(out.iterdir())


def test_restore_model_and_optimizer_name_the_part():
    """The functions the trainer's resume calls per part (repae.train.checkpoint.restore_*)."""
    from repae.train.checkpoint import Checkpoint, restore_model, restore_optimizer

    small, big = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    opt_small = torch.optim.AdamW(small.parameters())
    small(torch.ones(1, 2)).sum().backward()
    opt_small.step()
    ckpt = Checkpoint(models={"denoiser": small.state_dict()}, optimizers={"denoiser": opt_small.state_dict()},
                      state={"step": 1})
    ckpt.path = Path("runs/x/checkpoints/step-0000001")
    with pytest.raises(WeightsMismatchError) as info:
        restore_model(ckpt, "denoiser", big)
    msg = str(info.value)
    assert msg.startswith("runs/x/checkpoints/step-0000001/model-denoiser.safetensors: the denoiser weights do not "
                          "fit the Linear built from the config (bias is [3] in the file, [4] in the Linear)")
    assert "weight: file [3, 2] vs model [4, 2]" in msg and "--out" in msg
    with pytest.raises(UserError, match="holds no tokenizer weights .*it holds: denoiser"):
        restore_model(ckpt, "tokenizer", small)
    with pytest.raises(UserError, match=r"optimizer-denoiser.safetensors: the denoiser optimizer state does not fit "
                                        r"the denoiser being trained \(parameter 0 exp_avg: file \[3, 2\] vs model "
                                        r"\[4, 2\]\)"):
        restore_optimizer(ckpt, "denoiser", torch.optim.AdamW(big.parameters()))
    fitting = torch.nn.Linear(2, 3)
    restore_model(ckpt, "denoiser", fitting)
    restore_optimizer(ckpt, "denoiser", torch.optim.AdamW(fitting.parameters()))
    assert torch.equal(fitting.weight, small.weight)


def test_resume_with_a_resized_part_names_the_key(run):
    file = _ckpt(run) / "model-denoiser.safetensors"
    key = sorted(load_file(str(file)))[0]
    _rewrite(file, lambda s: s.__setitem__(key, torch.zeros(3, 1, 7)))
    overrides = [o for o in QUICK_RUN_OVERRIDES if not o.startswith("trainer.steps")] + ["trainer.steps=6"]
    result = cli("run", ROOT / "recipes" / "quickstart.yaml", *overrides, "--out", run, "--device", "cpu",
                 "--allow-recipe-change", code=2)
    assert f"{key} is [3, 1, 7] in the file" in _one_line(result.output)


# -- checkpoint provenance ------------------------------------------------------------------------------------------
def test_state_json_records_models_recipe_digest_and_versions(quick_run):
    state = json.loads((quick_run / "checkpoints" / LAST / "state.json").read_text())
    assert state["recipe_sha256"] == hashlib.sha256((quick_run / "recipe.yaml").read_bytes()).hexdigest()
    assert state["versions"]["torch"] == torch.__version__.split("+")[0] and "repae" in state["versions"]
    assert "ema-denoiser" in state["models"] and "tokenizer" in state["models"]


# -- pickles ----------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the file ``marker`` (module level, so that pickle can save it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class Harmless:
    def __init__(self) -> None:
        self.value = 3


def _payloads(tmp_path: Path, marker: Path) -> list[Path]:
    import pickle

    weights = {"w": torch.ones(2)}
    zipped, legacy, plain = tmp_path / "evil.pt", tmp_path / "evil-legacy.pth", tmp_path / "evil.pkl"
    torch.save({"model": weights, "x": Payload(marker)}, zipped)
    torch.save({"model": weights, "x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    plain.write_bytes(pickle.dumps({"model": weights, "x": Payload(marker)}, protocol=4))
    return [zipped, legacy, plain]


def test_pickle_payloads_are_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    marker = tmp_path / "ran"
    for path in _payloads(tmp_path, marker):
        for load in (read_checkpoint, lambda p: load_state_dict(p, key="model"), lambda p: load_weights(str(p))):
            with pytest.raises(UserError) as info:
                load(path)
            msg = str(info.value)
            assert msg.startswith(f"refusing to load {path}: it is a Python pickle"), msg
            assert "arbitrary code" in msg and TRUST_PICKLE_ENV in msg and "--trust-pickle" in msg
            assert "weights_only" not in msg  # not torch's advice
            assert not marker.exists()


def test_sample_and_export_on_a_weights_file_say_what_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    marker = tmp_path / "ran"
    evil = _payloads(tmp_path, marker)[0]
    text = _one_line(cli("sample", evil, "-n", "1", "--device", "cpu", code=2).output)
    assert "is a PyTorch checkpoint (a zip of pickled objects), not a run" in text and "does not exist" not in text
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1)}, str(weights))
    text = _one_line(cli("export", weights, "--format", "safetensors", "--out", tmp_path / "o", code=2).output)
    assert "is a safetensors file, not a run" in text
    assert not marker.exists()


def test_official_namespace_checkpoint_loads_without_trust(tmp_path, monkeypatch):
    """DiT/SiT/REPA/REPA-E checkpoints hold their training arguments as an argparse.Namespace (allow-listed)."""
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    weights = {"fc.weight": torch.randn(3, 2)}
    f = tmp_path / "0400000.pt"
    torch.save({"model": weights, "ema": weights, "opt": {}, "steps": 400000,
                "args": argparse.Namespace(model="SiT-XL/2", lr=1e-4, encoder_depth=8)}, f)
    ema, _ = load_state_dict(f, key="ema")
    assert torch.equal(ema["fc.weight"], weights["fc.weight"])
    obj, _ = read_checkpoint(f)
    assert obj["args"].model == "SiT-XL/2"


def test_trust_pickle_is_the_explicit_opt_in(tmp_path, monkeypatch):
    f = tmp_path / "custom.pt"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Harmless()}, f)
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(UserError, match="refusing to load"):
        read_checkpoint(f)
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    with pytest.warns(UserWarning, match="full unpickler"):
        obj, _ = read_checkpoint(f)
    assert obj["extra"].value == 3


def test_trust_pickle_option_sets_the_variable_for_the_command_only(monkeypatch):
    from repae.cli._pickle import pickle_trust

    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pickle_trust(True):
        import os

        assert os.environ[TRUST_PICKLE_ENV] == "1"
    assert TRUST_PICKLE_ENV not in os.environ
    for command in ("run", "sample", "analyze", "export"):
        assert "--trust-pickle" in cli(command, "--help").output


# -- recipes are data -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ['!!python/object/apply:os.system ["touch {marker}"]',
                                   "!!python/name:os.system", '!!python/object:os.system {{a: 1}}'])
def test_recipe_cannot_run_code(tmp_path, value):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"extends: {ROOT / 'recipes' / 'quickstart.yaml'}\ndescription: {value.format(marker=marker)}\n")
    text = _one_line(cli("recipe", "validate", recipe, code=2).output)
    assert "evil.yaml:2: description: the YAML tag !!python/" in text and "is not allowed" in text
    override = cli("recipe", "validate", ROOT / "recipes" / "quickstart.yaml",
                   f"description={value.format(marker=marker)}", code=2)
    assert "python/" in _one_line(override.output)
    assert not marker.exists()


# -- provenance of loaded weights -------------------------------------------------------------------------------------
def test_weights_json_records_source_revision_and_sha256(tmp_path, monkeypatch):
    from repae.interfaces import WeightsInfo
    from repae.weights import WEIGHTS_FILE, write_weights_record

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    target = cache / "models--org--enc" / "snapshots" / commit / "model.safetensors"
    target.parent.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(target))
    (cache / "models--org--enc" / "refs").mkdir()
    (cache / "models--org--enc" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, info = load_weights("hf://org/enc/model.safetensors")
    assert info.revision == commit

    class Component:
        loaded_weights = {"weights": info}

    class Random:
        loaded_weights: dict[str, WeightsInfo] = {}

    path = write_weights_record(tmp_path / "run", {"encoders.0": Component(), "denoiser": Random(), "x": object()})
    assert path == tmp_path / "run" / WEIGHTS_FILE
    (entry,) = json.loads(path.read_text())["files"]
    assert entry["component"] == "encoders.0" and entry["role"] == "weights"
    assert entry["source"] == "hf://org/enc/model.safetensors" and entry["revision"] == commit
    assert entry["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert entry["bytes"] == target.stat().st_size


def test_a_failed_continuation_leaves_the_run_directory_as_it_was(tmp_path):
    """Continuing with --allow-recipe-change and a recipe whose optimizer state cannot fit (pos_embed fixed ->
    learned adds a parameter) fails before any step; the folder keeps its recipe (no recipe.previous-N.yaml piling up
    per attempt) and the original command still continues the run."""
    run_dir = tmp_path / "run"
    recipe = ROOT / "recipes" / "quickstart.yaml"
    fixed = [o for o in QUICK_RUN_OVERRIDES if not o.startswith("trainer.steps")] + ["denoiser.pos_embed=fixed"]
    cli("run", recipe, *fixed, "trainer.steps=2", "--out", run_dir, "--device", "cpu")
    before = (run_dir / "recipe.yaml").read_text()
    for _ in range(2):
        result = cli("run", recipe, *fixed[:-1], "denoiser.pos_embed=learned", "trainer.steps=2", "--out", run_dir,
                     "--device", "cpu", "--allow-recipe-change", code=2)
        assert "optimizer" in result.output.lower(), result.output
    assert (run_dir / "recipe.yaml").read_text() == before
    assert not list(run_dir.glob("recipe.previous-*.yaml"))
    cli("run", recipe, *fixed, "trainer.steps=4", "--out", run_dir, "--device", "cpu")
    assert json.loads((run_dir / "checkpoints" / "step-0000004" / "state.json").read_text())["step"] == 4
