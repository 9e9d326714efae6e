"""Image shards: the format, writer and reader (:mod:`repae.image_shards`, core), `repae prepare-data`, and the
``image-shards`` dataset, interchangeable with the ``image-folder`` it was made from."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import repae
from conftest import ROOT, cli
from repae import BuildContext, UserError
from repae.build import build_component
from repae.cli import app
from repae.image_shards import MANIFEST_FILE, ImageShards, images_name, labels_name, write_image_shards
from repae_data.image_folder import ImageFolderDataset
from repae_data.shards import ImageShardsDataset


def build(registry, name: str, device: str = "cpu", **section):
    """Dataset ``name`` built from a recipe section as a recipe builds it (see tests/test_data.py)."""
    entry = registry.get("dataset", name)
    config, issues = entry.parse(section)
    assert not issues, issues
    return build_component(entry, config, BuildContext(device=device), explicit=entry.explicit_fields(section))


@pytest.fixture
def image_root(tmp_path) -> Path:
    """Three classes created out of order; JPEG and PNG files of odd sizes and modes (grey, RGBA), files to skip."""
    root = tmp_path / "train"
    files = {
        "n02_bird": [("b.png", 45, 33, "RGB"), ("a.JPEG", 70, 51, "RGB"), ("c.jpg", 64, 100, "RGB")],
        "n01_cat": [("x.jpg", 37, 80, "L"), ("y.png", 64, 64, "RGBA"), ("z.PNG", 120, 41, "RGB")],
        "n03_dog": [("only.jpeg", 33, 33, "RGB")],
    }
    for seed, (cls, images) in enumerate(files.items()):
        (root / cls).mkdir(parents=True)
        for k, (name, w, h, mode) in enumerate(images):
            rng = np.random.default_rng(10 * seed + k)
            channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
            array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
            Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(root / cls / name)
        (root / cls / "notes.txt").write_text("not an image")
    return root  # 7 images


def prepare(root: Path, out: Path, *extra, code: int = 0):
    return cli("prepare-data", root, "--out", out, "--resolution", 24, "--shard-size", 2, *extra, code=code)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != MANIFEST_FILE}


# ---------------------------------------------------------------------------------------------------------------------
# prepare-data and the format
# ---------------------------------------------------------------------------------------------------------------------


def test_prepare_data_writes_shards_with_a_manifest_and_reruns_as_a_no_op(image_root, tmp_path):
    out = tmp_path / "shards"
    result = prepare(image_root, out, "--verify")
    assert "done" in result.stdout and "every sha256 verified" in result.stdout
    assert "name: image-shards" in result.stdout and not (tmp_path / "shards.partial").exists()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert (manifest["format"], manifest["version"], manifest["num_items"], manifest["num_classes"]) == (
        "repae-image-shards", 1, 7, 3)
    assert manifest["classes"] == ["n01_cat", "n02_bird", "n03_dog"]
    assert (manifest["resolution"], manifest["shard_size"], manifest["source"]) == (24, 2, str(image_root.resolve()))
    assert manifest["dataset"]["name"] == "image-folder" and manifest["dataset"]["resolution"] == 24
    assert manifest["repae_version"] == repae.__version__
    assert [s["num_items"] for s in manifest["shards"]] == [2, 2, 2, 1]
    for shard, record in enumerate(manifest["shards"]):
        images, labels = out / images_name(shard), out / labels_name(shard)
        assert (record["images"], record["labels"]) == (images.name, labels.name)
        assert images.stat().st_size == record["images_bytes"] == record["num_items"] * 3 * 24 * 24
        assert hashlib.sha256(images.read_bytes()).hexdigest() == record["images_sha256"]
        assert hashlib.sha256(labels.read_bytes()).hexdigest() == record["labels_sha256"]
        assert np.load(labels).dtype == np.int64
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE, *(images_name(s) for s in range(4)), *(labels_name(s) for s in range(4))])

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(image_root, out)
    assert "checking that it holds these very shards" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten


def test_shards_give_exactly_the_image_folder_items(registry, image_root, tmp_path):
    out = tmp_path / "shards"
    prepare(image_root, out, "--workers", 1)
    folder = build(registry, "image-folder", root=str(image_root), resolution=24)
    shards = build(registry, "image-shards", root=str(out))
    assert isinstance(shards, ImageShardsDataset) and repae.supports(shards, repae.Dataset)
    assert (shards.kind, len(shards), shards.num_classes, shards.resolution, shards.latent_shape) == (
        "images", 7, 3, 24, None)
    assert shards.classes == folder.classes
    for i in range(len(folder)):
        image, label = shards[i]
        expected, expected_label = folder[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and isinstance(label, int)
        assert torch.equal(image, expected) and label == expected_label
    assert len({shards[i][0].float().sum().item() for i in range(7)}) == 7  # seven different images

    # flips: the same function of (seed, index, epoch) as image-folder's
    folder = build(registry, "image-folder", root=str(image_root), resolution=24, hflip=True, seed=3)
    shards = build(registry, "image-shards", root=str(out), hflip=True, seed=3)
    flipped = set()
    for epoch in (0, 1, 2):
        folder.set_epoch(epoch)
        shards.set_epoch(epoch)
        for i in range(7):
            assert torch.equal(shards[i][0], folder[i][0])
            flipped.add(not torch.equal(shards[i][0], torch.from_numpy(shards.shards[i][0])))
    assert flipped == {True, False}  # some items flipped, some not

    # through DataLoader workers: each maps the files itself; pickling carries no map
    plain = build(registry, "image-shards", root=str(out))
    plain[0]
    assert plain.shards._images and not pickle.loads(pickle.dumps(plain)).shards._images
    loader = DataLoader(plain, batch_size=3, num_workers=2)
    images, labels = (torch.cat(parts) for parts in zip(*loader))
    assert torch.equal(images, torch.stack([torch.from_numpy(folder.load(i).transpose(2, 0, 1).copy())
                                            for i in range(7)]))
    assert labels.tolist() == [label for _, label in folder.samples]
    assert torch.equal(plain.load_image(Path(folder.samples[2][0])), folder.load_image(Path(folder.samples[2][0])))


def test_interrupted_prepare_resumes_from_verified_shards(image_root, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    prepare(image_root, whole)

    out = tmp_path / "resumed"
    real = ImageFolderDataset.__getitem__
    reads = []

    def dies_at_item_5(self, index):
        reads.append(index)
        if reads.count(5) == 3:  # the writer's epoch check reads items 0-6 twice first
            raise KeyboardInterrupt  # as a Ctrl-C half-way through shard 2
        return real(self, index)

    monkeypatch.setattr(ImageFolderDataset, "__getitem__", dies_at_item_5)
    result = CliRunner().invoke(app, ["prepare-data", str(image_root), "--out", str(out), "--resolution", "24",
                                      "--shard-size", "2"])
    assert result.exit_code != 0 and not out.exists()
    partial = tmp_path / "resumed.partial"
    assert sorted(p.name for p in partial.glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]
    assert not list(partial.glob(".*.tmp-*"))  # the half-written shard 2 was removed
    monkeypatch.setattr(ImageFolderDataset, "__getitem__", real)

    kept = (partial / images_name(0)).stat().st_mtime_ns
    damaged = bytearray((partial / images_name(1)).read_bytes())
    damaged[100] ^= 0xFF  # same size, other bytes: only the sha256 tells
    (partial / images_name(1)).write_bytes(bytes(damaged))

    resumed = prepare(image_root, out)
    assert "Resuming" in resumed.stdout and "2 finished shard(s)" in resumed.stdout
    assert not partial.exists()
    assert (out / images_name(0)).stat().st_mtime_ns == kept  # the good shard was kept
    assert file_bytes(out) == file_bytes(whole)  # the damaged one written again: the same bytes as in one go
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert strip(json.loads((out / MANIFEST_FILE).read_text())) == strip(json.loads((whole / MANIFEST_FILE).read_text()))


def test_verification_finds_damaged_and_truncated_shards(image_root, tmp_path):
    out = tmp_path / "shards"
    prepare(image_root, out)
    path = out / images_name(1)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x01
    path.write_bytes(bytes(data))
    ImageShards(out)  # opening checks sizes only: still opens
    result = prepare(image_root, out, "--verify", code=2)
    assert f"the image shards {out} are damaged: images-00001.u8 does not match its sha256" in result.output
    assert "run `repae prepare-data` again" in result.output
    with pytest.raises(UserError, match="images-00001.u8 does not match its sha256"):
        ImageShards(out).verify()

    path.write_bytes(bytes(data[:-5]))  # truncated: found on opening
    with pytest.raises(UserError, match=r"incomplete or damaged: images-00001\.u8 has 3451 bytes, 3456 expected"):
        ImageShards(out)
    (out / labels_name(3)).unlink()
    with pytest.raises(UserError, match=r"labels-00003\.npy is missing"):
        ImageShards(out)


def test_a_different_output_is_never_overwritten(image_root, tmp_path):
    out = tmp_path / "shards"
    prepare(image_root, out)
    before = file_bytes(out)
    result = prepare(image_root, out, "--resolution", 16, code=2)  # the later --resolution wins
    assert f"{out} already holds different image shards (differs in dataset.resolution, resolution)" in result.output
    assert "refusing to overwrite it. Choose another --out" in result.output
    assert file_bytes(out) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = prepare(image_root, other, code=2)
    assert f"{other} already holds other files; refusing to overwrite it" in result.output
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    partial = tmp_path / "fresh.partial"
    prepare(image_root, tmp_path / "fresh")
    os.replace(tmp_path / "fresh", partial)  # an "unfinished" folder without a header: not ours
    result = prepare(image_root, tmp_path / "fresh", code=2)
    assert f"{partial} holds unfinished shards of another dataset" in result.output


def test_bad_arguments_are_rejected_before_any_heavy_import(image_root, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--resolution", "0"], "--resolution must be >= 1, got 0"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    ]
    for extra, message in cases:
        assert message in cli("prepare-data", image_root, "--out", tmp_path / "x", *extra, code=2).output
    assert "does not exist" in cli("prepare-data", tmp_path / "nowhere", "--out", tmp_path / "x", code=2).output
    assert "is a file, not a folder" in cli("prepare-data", a_file, "--out", tmp_path / "x", code=2).output
    assert "--out" in cli("prepare-data", image_root, "--out", a_file, code=2).output
    assert "Did you mean 'image-folder'" in cli("prepare-data", image_root, "--out", tmp_path / "x",
                                                "--dataset", "image-foldr", code=2).output
    assert "has no `root` field" in cli("prepare-data", image_root, "--out", tmp_path / "x",
                                        "--dataset", "synthetic", code=2).output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()

    code = ("import sys; from repae.cli import app\n"
            "try: app(['prepare-data', sys.argv[1], '--out', sys.argv[2], '--resolution', '0'])\n"
            "except SystemExit as e: print(e.code, 'torch' in sys.modules, 'numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(image_root), str(tmp_path / "x")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "REPAE_PLUGINS": "repae"})
    assert done.stdout.strip() == "2 False False", done.stderr


def test_writer_refuses_datasets_it_cannot_freeze(registry, image_root, tmp_path):
    flips = build(registry, "image-folder", root=str(image_root), resolution=24, hflip=True)
    with pytest.raises(UserError, match="items change from one epoch to the next"):
        write_image_shards(flips, tmp_path / "a", show_progress=False)
    latents = type("Latents", (), {"kind": "latents", "__len__": lambda self: 1})()
    with pytest.raises(UserError, match="only an image dataset can be sharded"):
        write_image_shards(latents, tmp_path / "b", show_progress=False)
    assert not list(tmp_path.glob("[ab]*"))


# ---------------------------------------------------------------------------------------------------------------------
# The dataset in recipes: dry runs and training
# ---------------------------------------------------------------------------------------------------------------------


def test_image_shards_config_errors_and_mismatches(registry, image_root, tmp_path):
    entry = registry.get("dataset", "image-shards")
    _, issues = entry.parse({})
    assert [i.path for i in issues] == ["root"]
    _, issues = entry.parse({"root": "x", "resolution": 0})
    assert [i.path for i in issues] == ["resolution"]
    with pytest.raises(UserError, match=r"no image shards at .*nowhere; write them with `repae prepare-data"):
        build(registry, "image-shards", root=str(tmp_path / "nowhere"))
    out = tmp_path / "shards"
    prepare(image_root, out)
    with pytest.raises(UserError, match="hold resolution=24 but dataset.resolution is 32; set dataset.resolution"):
        build(registry, "image-shards", root=str(out), resolution=32)
    with pytest.raises(UserError, match="hold num_classes=3 but dataset.num_classes is 1000"):
        build(registry, "image-shards", root=str(out), num_classes=1000)


def test_dry_run_reads_at_most_the_manifest(registry, image_root, tmp_path):
    missing = build(registry, "image-shards", device="meta", root=str(tmp_path / "nowhere"), resolution=256,
                    num_classes=1000)
    assert (len(missing), missing.num_classes, missing.resolution, missing.kind) == (0, 1000, 256, "images")
    with pytest.raises(UserError, match="set dataset.resolution"):
        build(registry, "image-shards", device="meta", root=str(tmp_path / "nowhere"))
    out = tmp_path / "shards"
    prepare(image_root, out)
    for shard in range(4):
        (out / images_name(shard)).write_bytes(b"")  # the data is not read on meta...
    with pytest.raises(UserError, match="incomplete or damaged"):  # ...its sizes are checked (a stat)
        build(registry, "image-shards", device="meta", root=str(out))
    prepare(image_root, tmp_path / "good")
    dry = build(registry, "image-shards", device="meta", root=str(tmp_path / "good"))
    assert (len(dry), dry.num_classes, dry.resolution) == (7, 3, 24)
    with pytest.raises(UserError, match="dataset.resolution is 32"):
        build(registry, "image-shards", device="meta", root=str(tmp_path / "good"), resolution=32)


def test_a_recipe_trains_on_image_shards_in_place_of_image_folder(image_root, tmp_path):
    out = tmp_path / "shards"
    cli("prepare-data", image_root, "--out", out, "--resolution", 32)
    recipe = tmp_path / "shards.yaml"
    recipe.write_text(
        f"extends: {ROOT / 'recipes' / 'quickstart.yaml'}\n"
        f"dataset: {{name: image-shards, root: {out}, hflip: true}}\n"
        "denoiser: {name: sit, size: tiny, num_classes: 3}\n"
        "trainer: {steps: 2, batch_size: 4, log_every: 1, checkpoint_every: 2, sample_every: 0, num_workers: 0}\n"
    )
    dry = cli("run", recipe, "--dry-run").stdout
    assert "image-shards" in dry
    run_dir = tmp_path / "run"
    cli("run", recipe, "--out", run_dir, "--device", "cpu")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(np.isfinite(v) for line in lines for k, v in line.items() if isinstance(v, float))
    assert (run_dir / "checkpoints").is_dir()
