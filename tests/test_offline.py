"""Without network: no huggingface_hub connection noise, and every missing-weights message is one sentence of what is
missing, then one fix, naming the recipe key to change (issue 12, items 4 and 8)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "quickstart.yaml"
TINY = ["dataset.num_images=32", "trainer.batch_size=8", "trainer.steps=2", "trainer.sample_every=0"]
REFUSED = "http://127.0.0.1:9"
"""A hub address nothing answers on (the discard port): connection refused at once, as on a machine without network."""


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """An empty Hugging Face cache and torch cache, downloads not forbidden, the hub unreachable."""
    import repae.weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", REFUSED)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(repae.weights, "_REACHABLE", {})
    return tmp_path


def check_message(message: str, key: str, source: str, *, cache: Path) -> None:
    """The pattern of every missing-weights message."""
    sentence, _, fix = message.partition("\n  fix: ")
    assert sentence.startswith(f"{key}: ") and sentence.endswith(".") and fix, message
    assert f"{key}=/path/to/" in fix, message  # the one key to change, in the fix
    assert message.count(source) == 1, message  # the file or URL once
    assert message.count("\n") == 1, message
    assert len(message.replace(str(cache), "CACHE")) < 350, (len(message), message)  # the hub one was ~600


def test_reachable_asks_once_and_fails_fast(monkeypatch):
    import repae.weights
    from repae.weights import reachable

    monkeypatch.setattr(repae.weights, "_REACHABLE", {})
    start = time.perf_counter()
    assert reachable(REFUSED + "/some/file") is False
    assert time.perf_counter() - start < 2.5
    assert repae.weights._REACHABLE == {REFUSED + "/": False}
    repae.weights._REACHABLE[REFUSED + "/"] = True  # remembered per host: not asked again
    assert reachable(REFUSED + "/other") is True


def test_a_cached_hub_file_is_used_when_the_hub_is_unreachable(no_network):
    from safetensors.torch import save_file

    from repae.weights import resolve_weights

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = no_network / "hf" / "models--acme--vae"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    target = folder / "snapshots" / commit / "vae.safetensors"
    target.parent.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(target))
    assert resolve_weights("hf://acme/vae/vae.safetensors") == target  # as with HF_HUB_OFFLINE=1


@pytest.mark.parametrize("override,key,source", [
    ("tokenizer.weights=hf://acme/vae/vae.pt", "tokenizer.weights", "hf://acme/vae/vae.pt"),
    ("encoders.0.weights=hf://acme/enc/model.safetensors", "encoders.0.weights", "hf://acme/enc/model.safetensors"),
    ("losses.gan.weights=hf://acme/gan/d.pt", "losses.gan.weights", "hf://acme/gan/d.pt"),
    ("losses.lpips={name: lpips, weights: https://example.invalid/lpips/heads.pth}", "losses.lpips.weights",
     "https://example.invalid/lpips/heads.pth"),
])
def test_missing_weights_name_their_recipe_key(no_network, registry, override, key, source):
    from repae.build import build_recipe
    from repae.errors import UserError
    from repae.recipe import read_recipe

    resolved = read_recipe(QUICK, [*TINY, override], registry)
    with pytest.raises(UserError) as info:
        build_recipe(resolved, device="cpu")
    cache = no_network / ("hf" if source.startswith("hf://") else "torch/hub/checkpoints")
    check_message(str(info.value), key, source, cache=cache)
    host = "127.0.0.1:9" if source.startswith("hf://") else "example.invalid"
    assert f"and {host} cannot be reached." in str(info.value)


def test_lpips_vgg_backbone_names_its_own_key(no_network, registry, tmp_path):
    """The LPIPS heads file has no VGG16 trunk: the backbone comes from `vgg_weights` (torchvision's file by default),
    and that key is the one named."""
    from repae.build import build_recipe
    from repae.errors import UserError
    from repae.recipe import read_recipe

    heads = {f"lin{k}.model.1.weight": torch.zeros(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "heads.pth")
    resolved = read_recipe(QUICK, [*TINY, f"losses.lpips={{name: lpips, weights: {tmp_path / 'heads.pth'}}}"], registry)
    with pytest.raises(UserError) as info:
        build_recipe(resolved, device="cpu")
    url = "https://download.pytorch.org/models/vgg16-397923af.pth"
    check_message(str(info.value), "losses.lpips.vgg_weights", url, cache=no_network / "torch/hub/checkpoints")
    assert "download.pytorch.org cannot be reached" in str(info.value)


def test_headline_recipe_offline_prints_only_repaes_message(tmp_path):
    """`repae run` of a recipe with hub weights on a machine without network used to print 6 connection errors and 5
    retries (23 s of back-off) from huggingface_hub, then a message that did not name the key to change."""
    env = {**os.environ, "REPAE_PLUGINS": "repae", "HF_ENDPOINT": REFUSED, "HF_HUB_CACHE": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    env.pop("HF_HUB_OFFLINE", None)
    source = "hf://REPA-E/sdvae/sdvae-f8d4-discriminator-ckpt.pt"
    done = subprocess.run([sys.executable, "-m", "repae", "run", str(QUICK), *TINY, f"losses.gan.weights={source}",
                           "--out", str(tmp_path / "run"), "--device", "cpu"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "Retry" not in done.stderr and "thrown while requesting" not in done.stderr, done.stderr
    # libraries' own deprecation warnings (torch.jit at the lowest versions) may come first; repae's message is last
    message = done.stderr[done.stderr.index("error: "):].strip() if "error: " in done.stderr else done.stderr
    assert message.startswith("error: losses.gan.weights: "), message
    check_message(message[len("error: "):], "losses.gan.weights", source, cache=tmp_path / "hf")
    assert not (tmp_path / "run").exists()  # nothing written before the components built


def test_inception_weights_missing_while_unreachable(no_network, monkeypatch):
    from repae.errors import UserError
    from repae.evaluate.inception_weights import ENV_WEIGHTS, WEIGHTS_URL, find_inception_weights

    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    import repae.weights

    repae.weights._REACHABLE["https://github.com/"] = False  # as without network (github.com is not asked here)
    with pytest.raises(UserError) as info:
        find_inception_weights()
    message = str(info.value)
    assert message.count(WEIGHTS_URL) == 1 and message.count("\n") == 1 and "github.com cannot be reached" in message
    assert "--inception-weights FILE" in message.partition("\n  fix: ")[2]
    assert len(message.replace(str(no_network / "torch" / "hub" / "checkpoints"), "CACHE")) < 300
