"""repae.weights: resolving weight sources (local, hf:// through a fake hub cache, URLs) and safe loading."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from repae.errors import UserError
from repae.weights import file_sha256, load_into, load_state_dict, local_weights, parse_hf_source, resolve_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class NotATensor:  # module-level so torch.save can pickle it
    def __init__(self) -> None:
        self.value = 3


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder, offline; returns a function that puts a file in it."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def put(repo: str, filename: str, payload: dict[str, torch.Tensor], revision: str = "main") -> Path:
        folder = cache / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(COMMIT)
        target = folder / "snapshots" / COMMIT / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(payload, str(target))
        return target

    put.cache = cache  # type: ignore[attr-defined]
    return put


# -- resolve_weights -----------------------------------------------------------------------------------------------
def test_local_file_folder_and_home(tmp_path, monkeypatch):
    f = tmp_path / "w" / "model.safetensors"
    f.parent.mkdir()
    save_file(_tiny_state(), str(f))
    assert resolve_weights(str(f)) == f
    assert resolve_weights(str(f.parent)) == f  # the only weights file in the folder
    (f.parent / "other.pt").write_bytes(b"x")
    assert resolve_weights(str(f.parent), default_filename="model.safetensors") == f
    with pytest.raises(UserError, match="several weights files"):
        resolve_weights(str(f.parent))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_weights("~/w/model.safetensors") == f


def test_local_missing_names_the_path(tmp_path):
    with pytest.raises(UserError, match="weights file not found: .*nope.safetensors"):
        resolve_weights(str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no weights file"):
        resolve_weights(str(tmp_path / "empty"))


def test_local_weights_finds_local_files_only(tmp_path, hub):
    f = tmp_path / "w" / "model.safetensors"
    f.parent.mkdir()
    save_file(_tiny_state(), str(f))
    assert local_weights(str(f)) == f and local_weights(f.parent) == f
    (f.parent / "other.pt").write_bytes(b"x")
    assert local_weights(str(f.parent)) is None  # two candidates: the loader's message names them
    assert local_weights(str(f.parent), default_filename="model.safetensors") == f
    assert local_weights(str(tmp_path / "nope.safetensors")) is None
    # never downloads, even a cached hub file: hub sources are checked when loaded
    hub("someorg/somerepo", "model.safetensors", _tiny_state())
    for source in ("hf://someorg/somerepo/model.safetensors", "https://example.com/x.pt", "", "  ", None):
        assert local_weights(source) is None, source


def test_parse_hf_source():
    s = parse_hf_source("hf://org/repo/sub/dir/file.safetensors@v1.0")
    assert (s.repo_id, s.filename, s.revision) == ("org/repo", "sub/dir/file.safetensors", "v1.0")
    s = parse_hf_source("hf://org/repo")
    assert (s.repo_id, s.filename, s.revision) == ("org/repo", None, None)
    with pytest.raises(UserError, match="does not name a Hugging Face repository"):
        parse_hf_source("hf://justone")


def test_hf_cached_resolves_offline(hub):
    target = hub("someorg/somerepo", "model.safetensors", _tiny_state())
    got = resolve_weights("hf://someorg/somerepo/model.safetensors")
    assert got.resolve() == target.resolve()
    # bare repo + the component's default file name
    assert resolve_weights("hf://someorg/somerepo", default_filename="model.safetensors").resolve() == target.resolve()
    # a file in a sub-folder, at a named revision
    nested = hub("someorg/somerepo", "sub/enc.safetensors", _tiny_state(), revision="v2")
    assert resolve_weights("hf://someorg/somerepo/sub/enc.safetensors@v2").resolve() == nested.resolve()


def test_hf_not_cached_message(hub):
    with pytest.raises(UserError) as info:
        resolve_weights("hf://someorg/missing-repo/weights/model.safetensors")
    msg = str(info.value)
    assert msg.startswith("hf://someorg/missing-repo/weights/model.safetensors is not in the Hugging Face cache")
    assert str(hub.cache) in msg  # where the cache is
    assert "HF_HUB_OFFLINE=1" in msg
    assert "fix: run `hf download someorg/missing-repo weights/model.safetensors`" in msg
    assert "or set this weights option to /path/to/model.safetensors" in msg  # outside a recipe: no key to name
    with pytest.raises(UserError, match="names no file"):
        resolve_weights("hf://someorg/missing-repo")


def test_url_cached_and_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = "https://example.invalid/ckpts/enc.pth.tar"
    with pytest.raises(UserError) as info:
        resolve_weights(url)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "enc.pth.tar"
    assert f"fix: download {url} into {expected.parent}/" in str(info.value)
    expected.parent.mkdir(parents=True)
    torch.save(_tiny_state(), expected)
    assert resolve_weights(url) == expected


# -- load_state_dict -----------------------------------------------------------------------------------------------
def test_safetensors_and_sha256(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file(_tiny_state(), str(f))
    sd, digest = load_state_dict(f)
    assert set(sd) == {"fc.weight", "fc.bias"}
    assert digest == hashlib.sha256(f.read_bytes()).hexdigest() == file_sha256(f)
    # sniffed by content when the suffix says nothing
    g = tmp_path / "weights.bin"
    g.write_bytes(f.read_bytes())
    assert torch.equal(load_state_dict(g)[0]["fc.bias"], sd["fc.bias"])


def test_torch_checkpoint_nested_keys(tmp_path):
    sd = _tiny_state()
    f = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "steps": 10}, f)
    with pytest.raises(UserError) as info:
        load_state_dict(f)
    assert "'model'" in str(info.value) and "'ema'" in str(info.value) and "weights_key" in str(info.value)
    ema, _ = load_state_dict(f, key="ema")
    assert torch.equal(ema["fc.bias"], sd["fc.bias"] + 1)
    with pytest.raises(UserError, match="no entry 'state_dict'.*'model'"):
        load_state_dict(f, key="state_dict")
    # a single state dict inside a checkpoint is unwrapped without a key
    single = tmp_path / "single.pth"
    torch.save({"state_dict": sd, "epoch": 3}, single)
    assert set(load_state_dict(single)[0]) == set(sd)


def test_flat_file_key_selects_prefix(tmp_path):
    f = tmp_path / "flat.safetensors"
    save_file({"ema.fc.weight": torch.ones(3, 2), "model.fc.weight": torch.zeros(3, 2)}, str(f))
    got, _ = load_state_dict(f, key="ema")
    assert list(got) == ["fc.weight"] and got["fc.weight"].sum() == 6
    with pytest.raises(UserError, match="flat state dict.*'ema'.*'model'"):
        load_state_dict(f, key="vae")


def test_pickles_are_refused(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"model": _tiny_state(), "extra": NotATensor()}, f)
    with pytest.raises(UserError) as info:
        load_state_dict(f)
    msg = str(info.value)
    assert "refusing to load" in msg and "NotATensor" in msg and "arbitrary code" in msg and "safetensors" in msg


def test_garbage_file(tmp_path):
    f = tmp_path / "junk.ckpt"
    f.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="could not read"):
        load_state_dict(f)


# -- load_into -----------------------------------------------------------------------------------------------------
def test_load_into_reports_keys_and_shapes():
    m = Tiny()
    load_into(m, _tiny_state())
    assert torch.equal(m.fc.bias, _tiny_state()["fc.bias"])

    bad = {"fc.weight": torch.zeros(4, 2), "extra.a": torch.zeros(1)}
    bad.update({f"more.{i}": torch.zeros(1) for i in range(12)})
    with pytest.raises(UserError) as info:
        load_into(m, bad, what="tiny weights from x.safetensors")
    msg = str(info.value)
    assert msg.startswith("tiny weights from x.safetensors do not fit the Tiny built from the config")
    assert "1 shape mismatch(es): fc.weight: file [4, 2] vs model [3, 2]" in msg
    assert "1 missing key(s)" in msg and "fc.bias" in msg
    assert "13 unexpected key(s)" in msg and "(3 more)" in msg

    report = load_into(m, {"fc.bias": torch.zeros(3), "extra": torch.zeros(1)}, strict=False)
    assert report.missing == ["fc.weight"] and report.unexpected == ["extra"]
    with pytest.raises(UserError, match="shape mismatch"):
        load_into(m, {"fc.bias": torch.zeros(5)}, strict=False)


def test_load_into_meta_assign_casts_dtype():
    with torch.device("meta"):
        m = Tiny()
    half = {k: v.half() for k, v in _tiny_state().items()}
    load_into(m, half, assign=True)
    assert m.fc.weight.device.type == "cpu" and m.fc.weight.dtype == torch.float32
    assert isinstance(m.fc.weight, nn.Parameter)
