"""`repae analyze` and the metrics of repae.analysis: Table 1 statistics, CKNNA, the PCA picture, PSNR."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import QUICK_RUN_OVERRIDES, ROOT
from repae.analysis import (
    AnalysisSettings,
    analyze_run,
    cknna,
    denoiser_features,
    labelled_rows,
    latent_pca_rgb,
    psnr,
    spatial_variance,
    spatial_variance_per_channel,
    spread_indices,
    total_variation,
    total_variation_per_channel,
)
from repae.errors import UserError


# -- Table 1 statistics -------------------------------------------------------------------------------------------


def test_per_channel_statistics_by_hand():
    z = torch.zeros(2, 2, 2, 2)
    z[:, 0] = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # channel 1 stays constant
    variance = torch.tensor([0.0, 1.0, 2.0, 3.0]).var().item()
    assert spatial_variance_per_channel(z) == pytest.approx([variance, 0.0])
    assert spatial_variance(z) == pytest.approx(variance / 2)
    assert total_variation_per_channel(z) == pytest.approx([(2 + 2) + (1 + 1), 0.0])
    assert total_variation(z) == pytest.approx(6.0)


def test_per_channel_statistics_agree_with_the_totals():
    z = torch.randn(5, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    assert np.mean(spatial_variance_per_channel(z)) == pytest.approx(spatial_variance(z), rel=1e-6)
    assert np.sum(total_variation_per_channel(z)) == pytest.approx(total_variation(z), rel=1e-6)


# -- CKNNA ----------------------------------------------------------------------------------------------------------


def _cknna_by_loops(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The definition of Huh et al. (2024) written out with loops: row-centred cosine kernels, mutual k-NN pairs in
    the numerator, each kernel's own k-NN pairs in the denominator."""
    def kernel(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    def neighbours(kern, i):
        order = [j for j in np.argsort(-kern[i], kind="stable") if j != i]
        return set(order[:k])

    K, L = kernel(a), kernel(b)
    n = len(a)
    Kc = K - K.mean(axis=1, keepdims=True)
    Lc = L - L.mean(axis=1, keepdims=True)
    cross = self_k = self_l = 0.0
    for i in range(n):
        nk, nl = neighbours(K, i), neighbours(L, i)
        for j in range(n):
            if j in nk and j in nl:
                cross += Kc[i, j] * Lc[i, j]
            if j in nk:
                self_k += Kc[i, j] ** 2
            if j in nl:
                self_l += Lc[i, j] ** 2
    return cross / math.sqrt(self_k * self_l)


def test_cknna_identical_features_give_one():
    a = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-12)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert cknna(a, 3.0 * a @ rotation) == pytest.approx(1.0, abs=1e-9)  # invariant to rotation and scale


def test_cknna_independent_features_give_about_zero():
    g = torch.Generator().manual_seed(0)
    values = [cknna(torch.randn(256, 32, generator=g), torch.randn(256, 48, generator=g), k=10) for _ in range(3)]
    assert all(abs(v) < 0.1 for v in values), values


def test_cknna_grows_with_shared_structure():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    noise = torch.randn(200, 16, generator=g)
    values = [cknna(a, a + s * noise, k=10) for s in (0.1, 0.5, 1.0, 3.0)]
    assert values == sorted(values, reverse=True), values
    assert values[0] > 0.8 and values[-1] < values[0] - 0.3


def test_cknna_matches_the_definition_written_with_loops():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(14, 5, generator=g), torch.randn(14, 7, generator=g)
    b[:, :3] += 2 * a[:, :3]  # partly shared
    for k in (1, 3, 13):
        expected = _cknna_by_loops(a.double().numpy(), b.double().numpy(), k)
        assert cknna(a, b, k=k) == pytest.approx(expected, abs=1e-9)
        assert cknna(b, a, k=k) == pytest.approx(expected, abs=1e-9)  # symmetric


def test_cknna_errors():
    with pytest.raises(ValueError, match="same samples"):
        cknna(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="at least 3"):
        cknna(torch.randn(2, 2), torch.randn(2, 2))


# -- pictures and PSNR ----------------------------------------------------------------------------------------------


def test_latent_pca_follows_the_dominant_channels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 16, 16, generator=g) * torch.tensor([0.5, 8.0, 0.01, 2.5]).view(1, 4, 1, 1)
    rgb = latent_pca_rgb(z)
    assert rgb.shape == (4, 3, 16, 16) and rgb.min() >= 0 and rgb.max() <= 1
    for colour in range(3):
        assert rgb[:, colour].min() == pytest.approx(0.0, abs=1e-6)
        assert rgb[:, colour].max() == pytest.approx(1.0, abs=1e-6)

    def scaled(x):
        return (x - x.min()) / (x.max() - x.min())

    # nearly axis-aligned components: red follows channel 1 (largest variance), green channel 3, blue channel 0
    for colour, channel in ((0, 1), (1, 3), (2, 0)):
        corr = torch.corrcoef(torch.stack([rgb[:, colour].flatten(), scaled(z[:, channel]).flatten()]))[0, 1]
        assert abs(corr.item()) > 0.99


def test_latent_pca_with_two_channels_leaves_blue_empty():
    rgb = latent_pca_rgb(torch.randn(2, 2, 3, 3))
    assert rgb.shape == (2, 3, 3, 3) and torch.all(rgb[:, 2] == 0)


def test_psnr():
    x = torch.full((2, 3, 4, 4), 100.0)
    assert psnr(x, x) == pytest.approx(100.0)
    assert psnr(x, x + 1) == pytest.approx(20 * math.log10(255.0))


def test_the_images_analysed_cover_every_class_of_a_periodic_or_sorted_set():
    # the synthetic dataset labels image i with i % classes: a fixed stride of 8 took class 0 only (the quickstart's
    # 2048 images, 4 classes, 256 analysed: every image a disc)
    chosen = spread_indices(2048, 256)
    assert chosen == spread_indices(2048, 256) and chosen == sorted(set(chosen))
    counts = collections.Counter(i % 4 for i in chosen)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) >= 40, counts
    # a set sorted by class (ImageNet's folders): each class's share, as the even stride gave
    assert collections.Counter(i // 50 for i in spread_indices(1000 * 50, 1000)) == {c: 1 for c in range(1000)}
    assert spread_indices(5, 8) == [0, 1, 2, 3, 4] and spread_indices(7, 7) == list(range(7))
    assert len(set(spread_indices(10, 9))) == 9


def test_analysis_pictures_are_scaled_up_sharply_and_labelled():
    """Rows of small images become a picture >= 512 px wide: each pixel a k x k block (nearest), a label per row."""
    rng = torch.Generator().manual_seed(0)
    top = torch.randint(0, 256, (3, 3, 4, 5), generator=rng, dtype=torch.uint8)
    bottom = torch.randint(0, 256, (2, 3, 4, 5), generator=rng, dtype=torch.uint8)
    grid = labelled_rows([top, bottom], ["input", "reconstruction"])
    k = -(-512 // (3 * 5))  # the smallest whole factor making 3 columns of 5 px at least 512 px wide
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    assert grid.shape[1] == 2 + 2 * (4 * k + 2) and grid.shape[2] >= 512 + 3 * 2
    right = grid.shape[2]
    for r, row in enumerate((top, bottom)):
        for c, image in enumerate(row):
            y, x = 2 + r * (4 * k + 2), right - (3 - c) * (5 * k + 2)
            block = grid[:, y:y + 4 * k, x:x + 5 * k]
            assert torch.equal(block, image.repeat_interleave(k, 1).repeat_interleave(k, 2)), (r, c)
        label = grid[:, 2 + r * (4 * k + 2):2 + r * (4 * k + 2) + 4 * k, :right - 3 * (5 * k + 2)]
        assert label.shape[2] > 20 and (label < 128).any()  # the row's label, in black on white


# -- the command ----------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_inception_weights(monkeypatch, tmp_path):
    """Inception weights a developer has cached would make every analysis compute a (slow) rFID: hide them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("REPAE_INCEPTION_WEIGHTS", raising=False)


def _cli(*args: str):
    from repae.cli.analyze import analyze

    app = typer.Typer()
    app.command()(analyze)
    return CliRunner().invoke(app, list(args))


def test_analyze_a_run(quick_run, tmp_path):
    from PIL import Image

    from repae.runs import open_run

    result = _cli(str(quick_run), "--out", str(tmp_path), "--num-images", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "analysis.json").read_text())
    for key in ("step", "checkpoint", "num_images", "spatial_variance", "spatial_variance_per_channel",
                "total_variation", "cknna", "psnr", "rfid", "settings"):
        assert key in data, key
    assert data["step"] == 4 and data["num_images"] == 8 and data["checkpoint"].endswith("step-0000004")
    assert len(data["spatial_variance_per_channel"]) == 4
    assert np.mean(data["spatial_variance_per_channel"]) == pytest.approx(data["spatial_variance"], rel=1e-6)
    assert -1.0 <= data["cknna"] <= 1.0 and data["cknna_reason"] is None
    # analysis.json records the AnalysisSettings as given, then what they resolved to for this run
    settings = data["settings"]
    given = {f.name: settings[f.name] for f in dataclasses.fields(AnalysisSettings)}
    assert given == dataclasses.asdict(AnalysisSettings(num_images=8))
    assert settings["depth"] is None and settings["depth_used"] == 2  # the quickstart's losses.repa.depth
    assert settings["t"] == 0.5 and settings["k"] == 10 and settings["k_used"] == 7  # capped at images - 1
    assert settings["transport"].startswith("FlowMatchingTransport")  # the run's diffusion loss
    assert settings["images"] is None and settings["images_source"] == "run dataset"
    assert math.isfinite(data["psnr"]) and data["psnr"] > 0
    assert data["rfid"] is None or math.isfinite(data["rfid"])
    if data["rfid"] is None:  # no Inception weights here: analyze says so without blaming its own HF_HUB_OFFLINE
        assert data["rfid_reason"].startswith("the Inception weights are not on this machine")
        assert "HF_HUB_OFFLINE" not in data["rfid_reason"]
    # the same latents by hand: one image of each stride of 8 (the quickstart's 64 images, 8 asked) through the
    # trained tokenizer
    indices = data["image_indices"]
    assert len(indices) == 8 and all(8 * i <= index < 8 * (i + 1) for i, index in enumerate(indices))
    run = open_run(quick_run, slots=("tokenizer", "dataset"))
    assert data["images_per_class"] == [[c, n] for c, n in
                                        sorted(collections.Counter(run.dataset[i][1] for i in indices).items())]
    images = torch.stack([run.dataset[i][0] for i in indices]).float() / 127.5 - 1
    with torch.no_grad():
        z = run.tokenizer.encode(images).mean
    assert data["spatial_variance"] == pytest.approx(spatial_variance(z), rel=1e-5)
    assert data["total_variation"] == pytest.approx(total_variation(z), rel=1e-5)
    for name in ("latent_pca", "reconstructions"):
        with Image.open(tmp_path / f"{name}.png") as picture:
            # 8 images of 32 px per row scaled up twice (8 x 64 = 512 px), two labelled rows
            assert picture.width >= 512 + 8 * 2 and picture.height == 2 + 2 * (64 + 2)


def _image_folder(tmp_path, count=4):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_analyze_an_image_folder(quick_run, tmp_path, monkeypatch):
    """--images reads every file through the run dataset's load_image (repae.ReadsImages), not a reader of its own."""
    from repae_data.image_folder import read_image
    from repae_data.synthetic import SyntheticDataset

    folder = _image_folder(tmp_path)
    read = []

    def load_image(self, path):
        read.append((Path(path).name, self.resolution))
        return read_image(path, self.resolution)

    monkeypatch.setattr(SyntheticDataset, "load_image", load_image)
    out = tmp_path / "out"
    result = _cli(str(quick_run / "checkpoints" / "step-0000002"), "--images", str(folder), "--out", str(out),
                  "--device", "cpu", "--k", "2")
    assert result.exit_code == 0, result.output
    assert read == [(f"{i}.png", 32) for i in range(4)]  # in file order, at the run dataset's resolution
    data = json.loads((out / "analysis.json").read_text())
    assert data["step"] == 2 and data["num_images"] == 4 and data["latent_shape"] == [4, 8, 8]
    assert data["settings"]["images"] == str(folder) and data["settings"]["images_source"] == str(folder)
    assert data["settings"]["labels"] == "null class"
    assert data["cknna"] is not None and data["settings"]["k_used"] == 2


def test_analyze_images_needs_a_dataset_that_reads_images(quick_run, tmp_path, monkeypatch):
    """A run dataset without repae.ReadsImages (as a third-party dataset may be): a message naming the capability."""
    import repae.runs

    class NoReader:
        """The run's dataset without load_image."""

        def __init__(self, dataset):
            self.kind, self.resolution, self._dataset = dataset.kind, dataset.resolution, dataset

        def __len__(self):
            return len(self._dataset)

        def __getitem__(self, index):
            return self._dataset[index]

    opened = repae.runs.open_run

    def open_run(*args, **kwargs):
        run = opened(*args, **kwargs)
        run.components["dataset"] = NoReader(run.components["dataset"])
        return run

    monkeypatch.setattr(repae.runs, "open_run", open_run)
    result = _cli(str(quick_run), "--images", str(_image_folder(tmp_path)), "--out", str(tmp_path / "out"),
                  "--device", "cpu")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "repae analyze --images needs the capability ReadsImages (load_image)" in text
    assert "dataset 'synthetic'" in text and "Traceback" not in result.output
    assert not (tmp_path / "out" / "analysis.json").exists()
    # the run's own dataset is still analysed without --images
    result = _cli(str(quick_run), "--out", str(tmp_path / "own"), "--num-images", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def ddpm_depth1_run(tmp_path_factory):
    """A one-step run of the quickstart whose losses align at block 1 and whose diffusion loss is DDPM."""
    from repae.build import build_recipe
    from repae.plugins import load_plugins
    from repae.recipe import load_recipe
    from repae.rundir import prepare_run_dir

    overrides = [*QUICK_RUN_OVERRIDES, "dataset.num_images=8", "trainer.batch_size=4", "trainer.steps=1",
                 "trainer.checkpoint_every=1", "losses.repa.depth=1",
                 "losses.diffusion={name: ddpm, updates: [denoiser]}", "sampler={name: ddpm, steps: 5}"]
    run_dir = tmp_path_factory.mktemp("ddpm_depth1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPAE_PLUGINS", "repae")
        resolved = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides,
                               registry=load_plugins(select={"repae"}).registry, check=True)
        prepare_run_dir(resolved, run_dir)
        built = build_recipe(resolved, device="cpu")
        built[-1].component.run(run_dir, progress=False)
    return run_dir


def test_depth_and_diffusion_process_come_from_the_runs_losses(ddpm_depth1_run, tmp_path, monkeypatch):
    """No --depth: the depth the run's alignment loss reads (1 here, not the quickstart's 2); the noise of the CKNNA
    features is the run's diffusion process (DDPM here)."""
    import repae.analysis
    from repae_losses.ddpm import DDPMTransport

    calls = []
    features = repae.analysis.denoiser_features

    def spy(denoiser, normalizer, transport, *args, depth, **kwargs):
        calls.append((type(transport), depth))
        return features(denoiser, normalizer, transport, *args, depth=depth, **kwargs)

    monkeypatch.setattr(repae.analysis, "denoiser_features", spy)

    def analyse(*args):
        calls.clear()
        out = tmp_path / "-".join(("default", *args))
        result = _cli(str(ddpm_depth1_run), "--out", str(out), "--num-images", "8", "--device", "cpu", *args)
        assert result.exit_code == 0, result.output
        return json.loads((out / "analysis.json").read_text()), set(calls)

    default, used = analyse()
    assert used == {(DDPMTransport, 1)}
    assert default["settings"]["depth"] is None and default["settings"]["depth_used"] == 1
    assert default["settings"]["transport"].startswith("DDPMTransport(num_timesteps=1000")
    assert default["cknna"] is not None and default["cknna_reason"] is None
    explicit, used = analyse("--depth", "1")
    assert used == {(DDPMTransport, 1)} and explicit["settings"]["depth"] == explicit["settings"]["depth_used"] == 1
    assert explicit["cknna"] == default["cknna"]
    deeper, used = analyse("--depth", "2")  # --depth wins over the losses
    assert used == {(DDPMTransport, 2)} and deeper["settings"]["depth_used"] == 2


def test_analyze_run_api_takes_a_settings_object(quick_run, tmp_path):
    """The library call of `repae analyze`: settings given win over the run's (depth), checked when made."""
    from repae.plugins import load_plugins

    registry = load_plugins(select={"repae"}).registry
    result = analyze_run(quick_run, AnalysisSettings(num_images=4, depth=1, k=2, ema=False), out=tmp_path,
                         device="cpu", registry=registry, progress=False)
    assert result["settings"]["depth_used"] == 1 and result["settings"]["ema"] is False
    assert json.loads((tmp_path / "analysis.json").read_text()) == json.loads(json.dumps(result))
    for fields, message in (({"t": 2.0}, "--t"), ({"depth": 0}, "--depth"), ({"k": 0}, "--k")):
        with pytest.raises(UserError, match=message):
            AnalysisSettings(**fields)


class _Recorder:
    """A stand-in denoiser recording the time it was called with."""

    def __call__(self, x, t, y, *, feature_depths, features_only):
        from repae.interfaces import DenoiserOutput

        self.t, self.depths, self.features_only = t, feature_depths, features_only
        tokens = x.flatten(2).transpose(1, 2)
        return DenoiserOutput(None, {d: tokens for d in feature_depths})


@pytest.mark.parametrize("steps, expected", [(None, 0.25), (1000, 250)])
def test_denoiser_features_use_the_transports_time(steps, expected):
    """Continuous time under flow matching; DDPM's integer step round(t (T - 1)) under a discrete transport."""

    class Transport:
        discrete_steps = steps

        def interpolate(self, x0, noise, t):
            self.t = t
            return x0 + noise

        def model_time(self, t):
            return t

    transport, denoiser = Transport(), _Recorder()
    z, noise = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    features = denoiser_features(denoiser, None, transport, z, torch.zeros(2, dtype=torch.long), noise, t=0.25,
                                 depth=3)
    assert features.shape == (2, 4) and denoiser.depths == (3,) and denoiser.features_only
    assert transport.t.tolist() == [expected] * 2 and denoiser.t.tolist() == [expected] * 2
    assert transport.t.dtype == (torch.long if steps else z.dtype)


def test_analyze_user_errors(quick_run, tmp_path):
    result = _cli(str(tmp_path / "missing"))
    assert result.exit_code == 2 and "does not exist" in result.output
    result = _cli(str(quick_run), "--t", "2", "--out", str(tmp_path))
    assert result.exit_code == 2 and "--t" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _cli(str(quick_run), "--images", str(empty), "--out", str(tmp_path), "--device", "cpu")
    assert result.exit_code == 2 and "holds no images" in result.output


def test_rfid_uses_the_evaluation_package_and_never_fails(monkeypatch, tmp_path):
    """rFID plumbing with a stand-in feature extractor (the real Inception is too slow for the suite): the Frechet
    distance of the features of inputs and reconstructions; any failure becomes a reason, never an error."""
    import repae.evaluate.features as features
    from repae.analysis import _rfid
    from repae.evaluate.metrics import feature_statistics, frechet_distance

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    fake = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)

    def pool(batches, extractor, **_):
        return {"pool": np.concatenate([b.reshape(len(b), 8 * 8, 3).mean(axis=1) for b in batches]).astype(np.float32)}

    monkeypatch.setattr(features, "find_inception_weights", lambda weights=None: tmp_path / "w.pth")
    monkeypatch.setattr(features, "load_inception", lambda path, features=(), device="cpu": object())
    monkeypatch.setattr(features, "extract_features", pool)
    value, reason = _rfid(real, fake, "cpu", None)
    a = real.permute(0, 2, 3, 1).reshape(6, 64, 3).float().mean(1).numpy()
    b = fake.permute(0, 2, 3, 1).reshape(6, 64, 3).float().mean(1).numpy()
    assert reason is None
    assert value == pytest.approx(frechet_distance(*feature_statistics(a), *feature_statistics(b)), rel=1e-4)

    def broken(*args, **kwargs):
        raise RuntimeError("no weights here")

    monkeypatch.setattr(features, "find_inception_weights", broken)
    assert _rfid(real, fake, "cpu", None) == (None, "RuntimeError: no weights here")
