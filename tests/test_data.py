"""The datasets (synthetic, image-folder, latent-cache) and their capabilities (``load_image``, ``check_tokenizer``),
the latent-cache format, writer and reader (:mod:`repae.latent_cache`, core) and `repae cache-latents`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

import repae
from conftest import build_section
from repae import BuildContext, UserError, WeightsInfo
from repae.build import build_component
from repae.latent_cache import INDEX_FILE, LatentCache, describe_tokenizer, read_index, write_latent_cache
from repae_data.cache import LatentCacheDataset
from repae_data.image_folder import ImageFolderDataset, center_crop_adm, flip_decision, read_image
from repae_data.synthetic import SHAPES, SyntheticDataset, class_style


def build(registry, name: str, device: str = "cpu", **section):
    """Dataset ``name`` built from a recipe section as a recipe builds it (validation, derived fields, device). Not
    through ``repae.create``, whose own keyword ``seed`` (the initialisation seed) would take the datasets' ``seed``
    field."""
    entry = registry.get("dataset", name)
    config, issues = entry.parse(section)
    assert not issues, issues
    return build_component(entry, config, BuildContext(device=device), explicit=entry.explicit_fields(section))


# ---------------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------------


def test_datasets_are_registered_with_documented_configs(registry):
    assert {"synthetic", "image-folder", "latent-cache"} <= set(registry.names("dataset"))
    entry = registry.get("dataset", "image-folder")
    config, issues = entry.parse({})
    assert config is None and [i.path for i in issues] == ["root"]
    _, issues = registry.get("dataset", "synthetic").parse({"num_classes": 0})
    assert [i.path for i in issues] == ["num_classes"] and "must be >= 1" in issues[0].message


def test_registration_module_imports_neither_torch_nor_pil():
    code = "import sys, repae_data; print(sorted(m for m in ('torch', 'PIL', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_items_follow_the_dataset_contract(registry):
    ds = build(registry, "synthetic", num_classes=7, resolution=24, num_images=50, seed=3)
    assert (ds.kind, ds.num_classes, ds.resolution, len(ds)) == ("images", 7, 24, 50)
    assert ds.latent_shape is None and ds.seed == 3 and repae.supports(ds, repae.Dataset)
    image, label = ds[9]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and image.device.type == "cpu"
    assert isinstance(label, int) and label == 9 % 7
    assert [ds[i][1] for i in range(14)] == [i % 7 for i in range(14)]  # balanced
    with pytest.raises(IndexError):
        ds[50]


def test_synthetic_is_deterministic_from_seed_and_index():
    a, b = SyntheticDataset(num_images=64, seed=1), SyntheticDataset(num_images=64, seed=1)
    order = [5, 63, 0, 5]
    first = [a[i][0] for i in order]
    assert all(torch.equal(x, b[i][0]) for x, i in zip(first, order))
    assert torch.equal(first[0], first[3])
    a.set_epoch(4)
    assert torch.equal(a[5][0], first[0])
    other = SyntheticDataset(num_images=64, seed=2)
    assert not torch.equal(other[5][0], first[0])
    assert not torch.equal(a[5][0], a[15][0])  # same class, different image


def test_synthetic_classes_are_distinct_and_learnable():
    styles = [class_style(c, 10) for c in range(10)]
    assert len({(s.shape, s.foreground) for s in styles}) == 10
    assert {s.shape for s in styles} == set(SHAPES)
    # Nearest class mean on 9 colour statistics (mean, max, std per channel) labels held-out images: the classes are
    # easy to tell apart, and a tiny model can learn them.
    ds = SyntheticDataset(num_classes=10, resolution=32, num_images=600, seed=0)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    features = torch.cat([x.mean((2, 3)), x.amax((2, 3)), x.std((2, 3))], dim=1)
    y = torch.tensor([ds.label(i) for i in range(len(ds))])
    train, test = slice(0, 400), slice(400, 600)
    means = torch.stack([features[train][y[train] == c].mean(0) for c in range(10)])
    predicted = torch.cdist(features[test], means).argmin(1)
    assert (predicted == y[test]).float().mean() > 0.9


def test_synthetic_defaults_render_the_images_they_always_did():
    """The per-image options (shapes, offset, scale, rotation, noise) default to the values the images were drawn
    with before they existed: the same bytes (sha256 of items 0..63 of 10 classes at 32 px, seed 0)."""
    import hashlib

    ds = SyntheticDataset(num_classes=10, resolution=32, num_images=64, seed=0)
    digest = hashlib.sha256(b"".join(ds[i][0].numpy().tobytes() for i in range(64))).hexdigest()
    assert digest == "13564a468b9483466bc137c734457983e4646e14886f02157aca00c3f3129323"


def test_synthetic_variation_options(registry):
    ds = build(registry, "synthetic", num_classes=3, resolution=32, num_images=30, shapes=["square", "disc"],
               offset=0.0, scale=[0.5, 0.5], rotation=0.0, noise=0.0)
    assert [s.shape for s in ds.styles] == ["square", "disc", "square"]  # classes cycle through the given shapes
    assert ds.styles[2].angle != ds.styles[0].angle  # a class repeating a shape gets another orientation
    x = torch.stack([ds[i][0] for i in range(30)]).float()
    y = torch.tensor([ds.label(i) for i in range(30)])
    fg = (x.amax(1) > 0.62 * 255).float()  # the bright foreground (value 0.95 against 0.3 for the background)
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for mask in fg:  # offset 0: every shape centred
        area = mask.sum()
        assert abs((mask * rows).sum() / area - 15.5) < 0.6 and abs((mask * cols).sum() / area - 15.5) < 0.6
    # scale fixed: every image of a class has about the same foreground area; discs (radius 0.5) are smaller
    # than squares (half-side 0.85 x 0.5)
    areas = fg.sum((1, 2))
    for c in range(3):
        assert areas[y == c].max() - areas[y == c].min() <= 0.12 * areas[y == c].mean()  # edges and brightness
    assert areas[y == 1].mean() < areas[y == 0].mean()
    # no pixel noise: a flat interior (the noisy default varies from pixel to pixel)
    noisy = SyntheticDataset(num_classes=3, resolution=32, num_images=3)[1][0].float()
    assert x[1][:, 14:18, 14:18].flatten(1).std(1).max() < 1.0 < noisy[:, 14:18, 14:18].flatten(1).std(1).min()
    for fields, message in (({"shapes": ["blob"]}, "shapes"), ({"shapes": []}, "shapes"), ({"offset": 1.5}, "offset"),
                            ({"scale": [0.6, 0.5]}, "scale"), ({"rotation": -1.0}, "rotation"),
                            ({"noise": 2.0}, "noise")):
        _, issues = registry.get("dataset", "synthetic").parse(fields)
        assert [i.path for i in issues] == [message], fields


# ---------------------------------------------------------------------------------------------------------------------
# ADM centre crop and image-folder
# ---------------------------------------------------------------------------------------------------------------------


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def test_center_crop_matches_a_hand_computation():
    image = random_image(517, 300, seed=0)
    # 300 >= 2*64 twice: BOX-halve to 258x150, then to 129x75; BICUBIC by 64/75 to 110x64; centre: left (110-64)//2.
    hand = image.resize((258, 150), Image.Resampling.BOX).resize((129, 75), Image.Resampling.BOX)
    hand = hand.resize((110, 64), Image.Resampling.BICUBIC).crop((23, 0, 87, 64))
    np.testing.assert_array_equal(center_crop_adm(image, 64), np.asarray(hand))

    portrait = random_image(91, 203, seed=1)  # no halving (91 < 2*64); 64/91 gives 64 x round(142.77)=143; top 39
    hand = portrait.resize((64, 143), Image.Resampling.BICUBIC).crop((0, 39, 64, 103))
    np.testing.assert_array_equal(center_crop_adm(portrait, 64), np.asarray(hand))

    small = random_image(50, 40, seed=2)  # upsampled: 80x64, left 8
    hand = small.resize((80, 64), Image.Resampling.BICUBIC).crop((8, 0, 72, 64))
    np.testing.assert_array_equal(center_crop_adm(small, 64), np.asarray(hand))
    assert center_crop_adm(random_image(64, 64, seed=3), 64).shape == (64, 64, 3)


@pytest.fixture
def image_root(tmp_path) -> Path:
    """Three classes (created out of order), PNG and JPEG files of odd sizes and modes, plus files to ignore."""
    root = tmp_path / "train"
    files = {
        "n02_bird": [("b.png", 45, 33, "RGB"), ("a.JPEG", 70, 51, "RGB")],
        "n01_cat": [("x.jpg", 37, 80, "L"), ("y.png", 64, 64, "RGBA"), ("z.PNG", 120, 41, "RGB")],
        "n03_dog": [("only.jpeg", 33, 33, "RGB")],
    }
    for seed, (cls, images) in enumerate(files.items()):
        (root / cls).mkdir(parents=True)
        for k, (name, w, h, mode) in enumerate(images):
            random_image(w, h, seed=10 * seed + k, mode=mode).save(root / cls / name)
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / ".hidden.png").write_bytes(b"")
    (root / ".cache").mkdir()
    return root


def test_image_folder_labels_order_and_crop(registry, image_root):
    ds = build(registry, "image-folder", root=str(image_root), resolution=32)
    assert (ds.kind, ds.num_classes, ds.resolution, len(ds)) == ("images", 3, 32, 6)
    assert ds.latent_shape is None and repae.supports(ds, repae.Dataset)
    assert ds.classes == ["n01_cat", "n02_bird", "n03_dog"]
    names = [(Path(p).parent.name, Path(p).name, label) for p, label in ds.samples]
    assert names == [("n01_cat", "x.jpg", 0), ("n01_cat", "y.png", 0), ("n01_cat", "z.PNG", 0),
                     ("n02_bird", "a.JPEG", 1), ("n02_bird", "b.png", 1), ("n03_dog", "only.jpeg", 2)]
    for i, (path, label) in enumerate(ds.samples):
        image, got = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and got == label
        expected = center_crop_adm(Image.fromarray(repae.decode_image(path)), 32)  # RGBA: on white
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_image_folder_flips_are_a_function_of_seed_index_and_epoch(image_root):
    plain = ImageFolderDataset(image_root, resolution=16)
    flipped = ImageFolderDataset(image_root, resolution=16, hflip=True, seed=5)
    twin = ImageFolderDataset(image_root, resolution=16, hflip=True, seed=5)
    decisions = set()
    for epoch in range(4):
        flipped.set_epoch(epoch)
        twin.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(plain)):
            image, original = flipped[i][0], plain[i][0]
            assert torch.equal(image, twin[i][0])
            expect_flip = flip_decision(5, i, epoch)
            decisions.add(expect_flip)
            assert torch.equal(image, original.flip(-1) if expect_flip else original)
    assert decisions == {True, False}
    assert [flip_decision(5, i, 0) for i in range(32)] != [flip_decision(5, i, 1) for i in range(32)]
    assert [flip_decision(5, i, 0) for i in range(32)] != [flip_decision(6, i, 0) for i in range(32)]


def test_image_folder_errors_name_the_path_and_the_fix(tmp_path, image_root):
    with pytest.raises(UserError, match=r"does not exist.*dataset.root"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        ImageFolderDataset(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders and no images"):
        ImageFolderDataset(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    random_image(8, 8, 0).save(flat / "a.png")
    with pytest.raises(UserError, match=r"1 image\(s\) but no class folders.*one folder per class"):
        ImageFolderDataset(flat)
    (image_root / "n00_empty").mkdir()
    (image_root / "n00_empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"class folder\(s\) of .*train hold no images \(n00_empty\).*Remove"):
        ImageFolderDataset(image_root)
    (image_root / "n00_empty" / "readme.txt").unlink()
    (image_root / "n00_empty").rmdir()
    with pytest.raises(UserError, match="holds 3 class folders but dataset.num_classes is 1000"):
        ImageFolderDataset(image_root, num_classes=1000)
    (image_root / "n03_dog" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(image_root, num_classes=3)
    with pytest.raises(UserError, match=r"cannot read image .*broken.png"):
        ds[len(ds) - 2]


def test_image_datasets_read_image_files_as_their_items(registry, image_root, tmp_path):
    """:class:`repae.ReadsImages` (what `repae analyze --images` uses): any file, RGB, ADM crop to the dataset's
    resolution, never flipped; the latent cache cannot read images."""
    folder = build(registry, "image-folder", root=str(image_root), resolution=24, hflip=True, seed=5)
    assert (folder.hflip, folder.seed) == (True, 5)
    synthetic = build(registry, "synthetic", resolution=16)
    for ds in (folder, synthetic):
        assert repae.supports(ds, repae.ReadsImages)
    for path, _ in folder.samples:  # RGB, L and RGBA files
        want = {r: center_crop_adm(Image.fromarray(repae.decode_image(path)), r) for r in (24, 16)}
        for ds in (folder, synthetic):
            image = ds.load_image(Path(path))
            assert image.dtype == torch.uint8 and image.shape == (3, ds.resolution, ds.resolution)
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), want[ds.resolution])
            torch.testing.assert_close(read_image(path, ds.resolution), image, rtol=0, atol=0)
    # the same pixels as the items (which are the images in sorted order), without the items' flips
    folder.set_epoch(0)
    for i, (path, _) in enumerate(folder.samples):
        item = folder[i][0]
        expected = item.flip(-1) if flip_decision(5, i, 0) else item
        assert torch.equal(folder.load_image(Path(path)), expected)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for ds in (folder, synthetic):
        with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
            ds.load_image(broken)
        with pytest.raises(UserError, match="cannot read image"):
            ds.load_image(tmp_path / "absent.png")


def test_file_datasets_do_not_touch_the_disk_on_meta(registry, tmp_path):
    ds = build(registry, "image-folder", device="meta", root=str(tmp_path / "nowhere"), num_classes=1000)
    assert (len(ds), ds.num_classes, ds.kind) == (0, 1000, "images")
    cache = build(registry, "latent-cache", device="meta", root=str(tmp_path / "nowhere"))
    assert (len(cache), cache.kind, cache.latent_shape) == (0, "latents", None)
    with pytest.raises(UserError, match="no latent cache at"):
        build(registry, "latent-cache", root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------------------
# Latent cache: writer and reader
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(registry):
    return build_section(registry, "tokenizer", "sd-vae", size="tiny").eval()


def test_cache_round_trip(registry, tokenizer, tmp_path):
    images = SyntheticDataset(num_classes=5, resolution=16, num_images=37, seed=0)
    out = write_latent_cache(images, tokenizer, tmp_path / "cache", batch_size=5, device="cpu",
                             tokenizer_info={"name": "sd-vae", "latent_channels": 4, "downsample": 4},
                             shard_size=16, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILE, "shard-00000.safetensors",
                                                     "shard-00001.safetensors", "shard-00002.safetensors"]
    assert not (tmp_path / "cache.partial").exists()
    index = read_index(out)
    assert (index["num_items"], index["num_classes"], index["resolution"]) == (37, 5, 16)
    assert index["latent_shape"] == [8, 4, 4] and index["latent_channels"] == 4
    assert index["tokenizer"]["name"] == "sd-vae"
    assert [s["num_items"] for s in index["shards"]] == [16, 16, 5]

    ds = build(registry, "latent-cache", root=str(out))
    assert (ds.kind, len(ds), ds.num_classes, ds.resolution) == ("latents", 37, 5, 16)
    assert ds.latent_shape == (4, 4, 4)  # (C, h, w): half the stored channels
    assert isinstance(ds.cache, LatentCache) and ds.cache.latent_shape == ds.latent_shape
    assert repae.supports(ds, repae.Dataset) and repae.supports(ds, repae.ChecksTokenizer)
    assert not repae.supports(ds, repae.ReadsImages)
    batch = torch.stack([images[i][0] for i in (0, 20, 36)]).float() / 127.5 - 1
    with torch.no_grad():
        posterior = tokenizer.encode(batch)
    for row, i in enumerate((0, 20, 36)):
        latents, label = ds[i]
        assert latents.dtype == torch.float32 and latents.shape == (8, 4, 4)
        assert label == images.label(i)
        torch.testing.assert_close(latents[:4], posterior.mean[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(latents[4:], posterior.std[row], atol=1e-5, rtol=1e-5)
    # through forked DataLoader workers (each opens its own shard files)
    loader = DataLoader(ds, batch_size=8, num_workers=2)
    stacked = torch.cat([x for x, _ in loader])
    assert torch.equal(stacked, torch.stack([ds[i][0] for i in range(len(ds))]))


def test_cache_records_the_tokenizer_weights_and_detects_another(tokenizer, tmp_path, monkeypatch):
    """The index records the tokenizer's ``loaded_weights`` (role -> source, sha256); ``check_tokenizer`` compares the
    sha256 of every role and refuses a tokenizer with other files, other latent statistics or random weights."""
    a = WeightsInfo(source="hf://org/vae/a.pt", path="/hub/a.pt", sha256="ab" * 32)
    monkeypatch.setattr(tokenizer, "loaded_weights", {"weights": a})
    assert repae.supports(tokenizer, repae.RecordsWeights)
    info = describe_tokenizer(tokenizer, name="sd-vae", config={"size": "tiny"}, plugin="repae")
    assert info == {"name": "sd-vae", "config": {"size": "tiny"}, "plugin": "repae", "latent_channels": 4,
                    "downsample": 4, "weights": {"weights": {"source": "hf://org/vae/a.pt", "sha256": "ab" * 32}}}
    images = SyntheticDataset(resolution=16, num_images=4)
    out = write_latent_cache(images, tokenizer, tmp_path / "c", batch_size=4, device="cpu", tokenizer_info=info,
                             show_progress=False)
    ds = LatentCacheDataset(out)
    assert ds.tokenizer_info["weights"] == {"weights": {"source": "hf://org/vae/a.pt", "sha256": "ab" * 32}}
    assert ds.cache.check_tokenizer(tokenizer) is True  # the weights were compared, and matched
    ds.check_tokenizer(tokenizer)
    # the same file read from elsewhere is the same tokenizer: the sha256 counts, not the source
    monkeypatch.setattr(tokenizer, "loaded_weights", {"weights": WeightsInfo("copy/a.pt", "copy/a.pt", "ab" * 32)})
    ds.check_tokenizer(tokenizer)
    monkeypatch.setattr(tokenizer, "loaded_weights", {"weights": WeightsInfo("other.pt", "other.pt", "cd" * 32)})
    with pytest.raises(UserError, match=r"with weights hf://org/vae/a.pt \(sha256 abababababab…\).*has weights "
                                         r"other.pt \(sha256 cdcdcdcdcdcd…\)"):
        ds.check_tokenizer(tokenizer)
    # the same weights, but latent statistics the writing tokenizer did not have: another tokenizer
    stats = WeightsInfo("stats.pt", "stats.pt", "ef" * 32)
    monkeypatch.setattr(tokenizer, "loaded_weights", {"weights": a, "latent_stats": stats})
    with pytest.raises(UserError, match=r"latent_stats stats.pt \(sha256 efefefefefef…\)"):
        ds.check_tokenizer(tokenizer)
    monkeypatch.setattr(tokenizer, "loaded_weights", {})
    with pytest.raises(UserError, match="recipe's tokenizer has random weights"):
        ds.check_tokenizer(tokenizer)

    class Unrecorded:  # a tokenizer without the RecordsWeights capability counts as random weights
        latent_channels, downsample = 4, 4

    with pytest.raises(UserError, match="random weights"):
        ds.check_tokenizer(Unrecorded())

    class Wider:
        latent_channels, downsample, loaded_weights = 32, 4, {"weights": a}

    with pytest.raises(UserError, match="latent_channels=4.*latent_channels=32"):
        ds.check_tokenizer(Wider())

    class Coarser:
        latent_channels, downsample, loaded_weights = 4, 8, {"weights": a}

    with pytest.raises(UserError, match="downsample=4.*downsample=8"):
        ds.check_tokenizer(Coarser())

    # written without tokenizer_info: the writer describes the tokenizer itself, weights included
    monkeypatch.setattr(tokenizer, "loaded_weights", {"weights": a, "latent_stats": stats})
    own = LatentCacheDataset(write_latent_cache(images, tokenizer, tmp_path / "own", batch_size=4, device="cpu",
                                                show_progress=False))
    assert own.tokenizer_info["weights"] == {"latent_stats": {"source": "stats.pt", "sha256": "ef" * 32},
                                             "weights": {"source": "hf://org/vae/a.pt", "sha256": "ab" * 32}}
    own.check_tokenizer(tokenizer)

    class WithoutStats:
        latent_channels, downsample, loaded_weights = 4, 4, {"weights": a}

    with pytest.raises(UserError, match="latent_stats"):
        own.check_tokenizer(WithoutStats())
    # random weights on both sides: nothing to compare, accepted
    monkeypatch.setattr(tokenizer, "loaded_weights", {})
    random = LatentCacheDataset(write_latent_cache(images, tokenizer, tmp_path / "random", batch_size=4,
                                                   device="cpu", show_progress=False))
    assert random.tokenizer_info["weights"] == {}
    assert random.cache.check_tokenizer(tokenizer) is False
    random.check_tokenizer(tokenizer)
    monkeypatch.setattr(tokenizer, "loaded_weights", {"weights": a})
    with pytest.raises(UserError, match=r"written by a tokenizer with random weights.*weights hf://org/vae/a.pt \(sha256 abababababab"):
        random.check_tokenizer(tokenizer)


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of writing."""


class FailingAfter(Dataset):
    """Images of a synthetic dataset that fail from item ``stop`` on (an interrupted run)."""

    kind, num_classes, resolution, latent_shape = "images", 10, 16, None

    def __init__(self, stop: int) -> None:
        self.inner, self.stop = SyntheticDataset(resolution=16, num_images=40), stop

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        if i >= self.stop:
            raise Interrupted(i)
        return self.inner[i]

    def set_epoch(self, epoch: int) -> None:
        """Items do not depend on the epoch."""


def test_cache_resumes_after_an_interruption(tokenizer, tmp_path):
    kwargs = dict(batch_size=8, device="cpu", dataset_info={"name": "synthetic"}, shard_size=16, show_progress=False)
    with pytest.raises(Interrupted):
        write_latent_cache(FailingAfter(stop=20), tokenizer, tmp_path / "c", **kwargs)
    partial = tmp_path / "c.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["header.json", "shard-00000.safetensors"]
    with pytest.raises(UserError, match=r"unfinished \(.*c.partial exists\)"):
        LatentCacheDataset(tmp_path / "c")
    first = (partial / "shard-00000.safetensors").stat().st_mtime_ns
    out = write_latent_cache(FailingAfter(stop=40), tokenizer, tmp_path / "c", **kwargs)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not encoded again
    fresh = write_latent_cache(FailingAfter(stop=40), tokenizer, tmp_path / "fresh", **kwargs)
    a, b = LatentCacheDataset(out), LatentCacheDataset(fresh)
    assert len(a) == 40 and all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(40))


def test_cache_never_overwrites_something_else(tokenizer, tmp_path):
    kwargs = dict(batch_size=8, device="cpu", show_progress=False, dataset_info={"name": "synthetic"})
    images = SyntheticDataset(resolution=16, num_images=8)
    out = write_latent_cache(images, tokenizer, tmp_path / "c", **kwargs)
    stamp = (out / INDEX_FILE).stat().st_mtime_ns
    assert write_latent_cache(images, tokenizer, out, **kwargs) == out  # the same cache: nothing to do
    assert (out / INDEX_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"already holds a different latent cache \(differs in num_items\)"):
        write_latent_cache(SyntheticDataset(resolution=16, num_images=9), tokenizer, out, **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="already holds other files; refusing to overwrite"):
        write_latent_cache(images, tokenizer, tmp_path / "other", **kwargs)
    (tmp_path / "d.partial").mkdir()
    (tmp_path / "d.partial" / "header.json").write_text(json.dumps({"format": "repae-latent-cache"}))
    with pytest.raises(UserError, match="d.partial holds an unfinished cache of another"):
        write_latent_cache(images, tokenizer, tmp_path / "d", **kwargs)


class EpochDependent(Dataset):
    """Images of which item ``changing`` depends on the epoch: an augmentation the writer cannot know by name (no
    ``hflip`` attribute)."""

    kind, num_classes, resolution, latent_shape = "images", 10, 16, None

    def __init__(self, changing: int) -> None:
        self.inner, self.changing, self.epoch = SyntheticDataset(resolution=16, num_images=20), changing, 0

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        image, label = self.inner[i]
        return (image.roll(self.epoch, dims=-1) if i == self.changing else image), label


def test_cache_refuses_datasets_whose_items_change_with_the_epoch(tokenizer, tmp_path, image_root):
    kwargs = dict(batch_size=4, device="cpu", show_progress=False)
    flipped = ImageFolderDataset(image_root, resolution=16, hflip=True)
    with pytest.raises(UserError, match=r"change from one epoch to the next \(item \d+ differs.*hflip=true"):
        write_latent_cache(flipped, tokenizer, tmp_path / "c", **kwargs)
    with pytest.raises(UserError, match=r"item 7 differs between epochs 0 and 1"):
        write_latent_cache(EpochDependent(changing=7), tokenizer, tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()  # refused before writing
    # the same datasets without the augmentation are cached
    plain = ImageFolderDataset(image_root, resolution=16)
    assert len(LatentCacheDataset(write_latent_cache(plain, tokenizer, tmp_path / "plain", **kwargs))) == 6
    steady = EpochDependent(changing=len(plain) + 100)
    assert len(LatentCacheDataset(write_latent_cache(steady, tokenizer, tmp_path / "c", **kwargs))) == 20


def test_cache_refuses_latent_and_empty_datasets(tokenizer, tmp_path):
    images = SyntheticDataset(resolution=16, num_images=2)
    out = write_latent_cache(images, tokenizer, tmp_path / "c", batch_size=2, device="cpu", show_progress=False)
    with pytest.raises(UserError, match="cannot be cached again"):
        write_latent_cache(LatentCacheDataset(out), tokenizer, tmp_path / "c2", batch_size=2, device="cpu")
    with pytest.raises(UserError, match="the dataset is empty"):
        write_latent_cache(SyntheticDataset(resolution=16, num_images=0), tokenizer, tmp_path / "c2", batch_size=2,
                           device="cpu")
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c2.partial").exists()


def test_reader_names_missing_shards(tokenizer, tmp_path):
    out = write_latent_cache(SyntheticDataset(resolution=16, num_images=5), tokenizer, tmp_path / "c", batch_size=5,
                             device="cpu", shard_size=2, show_progress=False)
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(UserError, match="incomplete: missing shard-00001.safetensors"):
        LatentCacheDataset(out)
    (out / INDEX_FILE).write_text("{}")
    with pytest.raises(UserError, match="not a repae latent-cache index"):
        LatentCacheDataset(out)


# ---------------------------------------------------------------------------------------------------------------------
# repae cache-latents
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def cli():
    from repae.cli.cache import cache_latents

    app = typer.Typer()
    app.command("cache-latents")(cache_latents)

    @app.callback()
    def _root() -> None:
        """(a group, so that the command is invoked by name as in the real app)"""

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["cache-latents", *map(str, args)])


def test_cache_latents_command(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        dataset: {name: synthetic, num_classes: 4, resolution: 16, num_images: 20}
        tokenizer: {name: sd-vae, size: tiny}
        denoiser: {name: sit, size: tiny, weights: /nowhere/never-built.pt}
        """))
    out = tmp_path / "latents"
    result = cli(recipe, "--out", out, "--batch-size", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output and "done" in result.output
    ds = LatentCacheDataset(out)
    assert (len(ds), ds.num_classes, ds.latent_shape) == (20, 4, (4, 4, 4))
    assert ds.cache.index["latent_shape"] == [8, 4, 4]
    assert ds.cache.index["dataset"] == {"name": "synthetic", "num_classes": 4, "resolution": 16, "num_images": 20,
                                   "seed": 0, "shapes": list(SHAPES), "offset": 0.35, "scale": [0.35, 0.6],
                                   "rotation": 0.15, "noise": 0.03}
    assert ds.tokenizer_info["name"] == "sd-vae" and ds.tokenizer_info["config"]["size"] == "tiny"
    assert ds.tokenizer_info["weights"] == {}  # random weights: nothing loaded, nothing recorded

    again = cli(recipe, "--out", out, "--device", "cpu")
    assert again.exit_code == 0, again.output
    different = cli(recipe, "dataset.num_images=21", "--out", out, "--device", "cpu")
    assert different.exit_code == 2 and "refusing to overwrite" in different.output

    bare = tmp_path / "bare.yaml"
    bare.write_text("dataset: {name: synthetic}\n")
    result = cli(bare, "--out", tmp_path / "x", "--device", "cpu")
    assert result.exit_code == 2 and "names no tokenizer" in result.output
    assert not (tmp_path / "x").exists()
