"""The core's one mechanism for "weights and configuration agree" (repae.architecture) and for a missing optional
package (repae.packages): what every plugin family uses, checked here once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import repae

from conftest import ROOT


def test_safetensors_header_reads_shapes_and_metadata_without_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a.weight": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float16), "s": torch.tensor(1.0)},
              str(path), metadata={repae.ARCHITECTURE_METADATA: json.dumps({"num_heads": 4}), "other": "x"})
    shapes, metadata = repae.safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert shapes == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"a.weight": (3, 4), "b": (2,), "s": ()}
    assert metadata["other"] == "x" and repae.safetensors_shapes(path) == shapes
    assert repae.declared_architecture(path) == {"num_heads": 4}


def test_safetensors_header_is_none_for_what_is_not_one(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"anything")
    (tmp_path / "short.safetensors").write_bytes(b"\x01")
    (tmp_path / "huge.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    (tmp_path / "garbage.safetensors").write_bytes((5).to_bytes(8, "little") + b"nope!")
    for name in ("w.pt", "short.safetensors", "huge.safetensors", "garbage.safetensors", "missing.safetensors"):
        assert repae.safetensors_header(tmp_path / name) is None, name
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    assert repae.declared_architecture(plain) is None and repae.safetensors_shapes(plain) == {"x": (1,)}


def test_a_release_is_named_by_repository_file_or_source():
    release = repae.Release("X", "XL/2", {"depth": 28}, repositories=("Org/Model",), files=("X-256.pt",),
                            sources=("hf://timm/vit/model.safetensors", "https://example.org/w.pth"))
    for source in ("hf://org/model", "hf://Org/Model/ckpt/last.pt@abc", "/data/X-256.pt", "https://h/X-256.pt",
                   "hf://timm/vit/model.safetensors", "hf://timm/vit", "hf://timm/vit@main", "https://example.org/w.pth"):
        assert release.matches(source), source
    for source in (None, "", "hf://org/other", "hf://timm/vitx", "X-512.pt", "https://example.org/w.pth.bak"):
        assert not release.matches(source), source
    assert repae.release_of_source("hf://org/model/a.pt", [release]) is release
    assert repae.release_of_source("hf://org/none", [release]) is None


def test_a_mismatch_names_each_field_both_values_the_shape_free_ones_and_the_preset():
    config = {"depth": 28, "num_heads": 12, "ch_mult": (1, 2), "act": "silu", "extra": 1}
    weights = {"depth": 28, "num_heads": 16, "ch_mult": [1, 2, 4], "act": "silu"}
    found = repae.architecture_mismatch(config, weights, what="the X release", shape_free=("num_heads",),
                                        preset="XL/2")
    assert found is not None and found.field == "num_heads" and found.fields == ("num_heads", "ch_mult")
    assert str(found) == found.message == (
        "the weights are the X release; the config differs from them in num_heads 12 (the weights: 16), ch_mult "
        "[1, 2] (the weights: [1, 2, 4]); num_heads changes no parameter shape, so these weights would load without "
        "an error and compute something else. Fix: use the preset `size: XL/2` (and leave num_heads, ch_mult unset), "
        "or set num_heads: 16, ch_mult: [1, 2, 4]")
    no_preset = repae.architecture_mismatch(config, weights, what="w", fields=["ch_mult"])
    assert no_preset is not None and no_preset.message.endswith("Fix: set ch_mult: [1, 2, 4]")
    assert "no parameter shape" not in no_preset.message
    assert repae.architecture_mismatch(config, weights, what="w", fields=["depth", "act", "missing"]) is None
    assert repae.architecture_mismatch({"a": 1, "b": True}, {"a": 1.0, "b": True}, what="w") is None
    assert repae.architecture_mismatch({"b": 1}, {"b": True}, what="w") is not None  # True is not 1
    both = repae.architecture_mismatch({"h": 1, "t": "a"}, {"h": 2, "t": "b"}, what="w", shape_free=("h", "t"))
    assert both is not None and "h and t change no parameter shape" in both.message


def test_a_file_with_a_releases_layout_is_checked_in_the_shape_free_fields(tmp_path):
    release = repae.Release("Acme AE f8", "f8", {"channels": 4, "groups": 32, "heads": 8})
    model = torch.nn.Conv2d(3, 8, 3).state_dict()  # the model built from the config: weight [8, 3, 3, 3], bias [8]
    path = tmp_path / "ae.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in model.items()}, str(path))
    shapes = repae.safetensors_shapes(path)
    config = {"channels": 4, "groups": 8, "heads": 8}

    found = repae.layout_mismatch(config, release, source=str(path), file_shapes=shapes, model_shapes=model,
                                  shape_free=("groups", "heads"))
    assert found is not None and found.fields == ("groups",)
    assert "whose key layout is that of the Acme AE f8 release" in found.message and "size: f8" in found.message
    # agreeing fields, no release with this layout, an unknown file, another layout: nothing to say
    same = {**config, "groups": 32}
    assert repae.layout_mismatch(same, release, source="x", file_shapes=shapes, model_shapes=model,
                                 shape_free=("groups",)) is None
    assert repae.layout_mismatch(config, None, source="x", file_shapes=shapes, model_shapes=model,
                                 shape_free=("groups",)) is None
    assert repae.layout_mismatch(config, release, source="x", file_shapes=None, model_shapes=model,
                                 shape_free=("groups",)) is None
    other = {**shapes, "bias": (9,)}
    assert repae.layout_mismatch(config, release, source="x", file_shapes=other, model_shapes=model,
                                 shape_free=("groups",)) is None
    # shapes as lists (a JSON header) and tensors (a state dict) compare alike
    listed = {k: list(v) for k, v in shapes.items()}
    assert repae.layout_mismatch(config, release, source="x", file_shapes=listed, model_shapes=model,
                                 shape_free=("groups",)) is not None


def test_a_missing_package_is_one_message_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    for call in (repae.check_package, repae.require_package):
        with pytest.raises(repae.UserError) as info:
            call("wandb", extra="wandb", what="the wandb tracker", instead="remove wandb from `trackers`")
        assert str(info.value) == ("the wandb tracker needs the wandb package, which is not installed: pip install "
                                   "'repae[wandb]' (or remove wandb from `trackers`)")
    with pytest.raises(repae.UserError, match=r"^the thing needs the no_such_pkg_x package, which is not installed: "
                                              r"pip install 'repae\[x\]'$"):
        repae.check_package("no_such_pkg_x", extra="x", what="the thing")
    assert repae.require_package("json", extra="x", what="w") is json
    assert repae.check_package("json", extra="x", what="w") is None


def test_checking_a_package_imports_nothing():
    code = ("import sys, repae; repae.check_package('email.mime.text', extra='x', what='w'); "
            "print('email.mime.text' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# -- diffusers-vae: known hub releases are checked when the recipe is validated (no diffusers, no download) ---------
def _t2i_problems(*overrides: str) -> list:
    with pytest.raises(repae.RecipeError) as caught:
        repae.load_recipe(T2I_FLUX, list(overrides))
    return [p for p in caught.value.problems if p.path.startswith("tokenizer")]


T2I_FLUX = ROOT / "recipes" / "t2i_vae" / "repae_flux_vae_dinov2.yaml"


@pytest.mark.parametrize("weights,subfolder,preset", [
    ("hf://REPA-E/e2e-flux-vae", None, "flux"),
    ("hf://black-forest-labs/FLUX.1-schnell", "vae", "flux"),
    ("hf://REPA-E/e2e-sd3.5-vae", None, "sd3.5"),
    ("hf://stabilityai/stable-diffusion-3.5-medium", "vae", "sd3.5"),
    ("hf://stabilityai/sd-vae-ft-ema", None, "sd"),
    ("hf://stabilityai/sdxl-vae", None, "sdxl"),
])
def test_a_known_diffusers_release_with_another_architecture_fails_validation(weights, subfolder, preset):
    """The review's measured case: `size: tiny, weights: hf://REPA-E/e2e-flux-vae` validated; it only failed once
    the weights were downloaded."""
    overrides = ["tokenizer.size=tiny", f"tokenizer.weights={weights}", f"tokenizer.subfolder={subfolder or 'null'}"]
    (problem,) = _t2i_problems(*overrides)
    text = str(problem)
    assert problem.path == "tokenizer.architecture.down_block_types"  # the first differing key
    assert "architecture.block_out_channels [8, 16, 16] (the weights: [128, 256, 512, 512])" in text
    assert "architecture.norm_num_groups 4 (the weights: 32)" in text and "no parameter shape" in text
    assert f"use the preset `size: {preset}`" in text and weights in text
    repae.load_recipe(T2I_FLUX, [f"tokenizer.size={preset}", f"tokenizer.weights={weights}",
                                 f"tokenizer.subfolder={subfolder or 'null'}"])  # the preset it names validates


def test_a_diffusers_release_of_another_class_names_the_class_and_the_preset():
    (problem,) = _t2i_problems("tokenizer.size=tiny-qwen-image", "tokenizer.model_class=AutoencoderKLQwenImage",
                               "tokenizer.weights=hf://REPA-E/e2e-flux-vae", "tokenizer.subfolder=null")
    assert problem.path == "tokenizer.model_class"
    assert "model_class AutoencoderKLQwenImage (the weights: AutoencoderKL)" in str(problem)
    assert "`size: flux`" in str(problem)
    (problem,) = _t2i_problems("tokenizer.size=flux", "tokenizer.weights=hf://Qwen/Qwen-Image")
    assert "model_class AutoencoderKL (the weights: AutoencoderKLQwenImage)" in str(problem)
    assert "`size: qwen-image`" in str(problem)
    repae.load_recipe(T2I_FLUX, ["tokenizer.size=qwen-image", "tokenizer.model_class=AutoencoderKLQwenImage",
                                 "tokenizer.weights=hf://REPA-E/e2e-qwenimage-vae", "tokenizer.subfolder=null"])


def test_a_pipeline_release_needs_its_vae_folder():
    (problem,) = _t2i_problems("tokenizer.subfolder=null")  # hf://black-forest-labs/FLUX.1-dev, the pipeline's top
    assert problem.path == "tokenizer.subfolder" and "set subfolder: vae" in str(problem)
    repae.load_recipe(T2I_FLUX, ["tokenizer.weights=hf://black-forest-labs/FLUX.1-dev/vae", "tokenizer.subfolder=null"])


def test_a_misspelt_diffusers_key_gets_did_you_mean():
    (problem,) = _t2i_problems("tokenizer.architecture={latent_chanels: 16}")
    text = str(problem)
    assert "'latent_chanels' is not a config key of diffusers' AutoencoderKL. Did you mean 'latent_channels'?" in text
    assert "are not config keys" not in text
    (problem,) = _t2i_problems("tokenizer.architecture={latent_chanels: 16, norm_num_group: 32}")
    assert "'latent_chanels', 'norm_num_group' are not config keys" in str(problem)
    assert "Did you mean 'latent_channels'?" in str(problem) and "Did you mean 'norm_num_groups'?" in str(problem)


def test_a_plugin_names_its_own_distribution_for_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "acmelib", None)
    with pytest.raises(repae.UserError, match=r"^w needs the json package, which is not installed "
                                              r"\(ModuleNotFoundError: import of acmelib"):
        repae.require_package("json", extra="fast", what="w", via="acmelib")  # json is there, acmelib fails
    with pytest.raises(repae.UserError, match=r"^the acme-ae tokenizer needs the acmelib package, which is not "
                                              r"installed: pip install 'acme-repae\[fast\]'$"):
        repae.check_package("acmelib", extra="fast", what="the acme-ae tokenizer", distribution="acme-repae")
