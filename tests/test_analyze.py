"""`repae analyze` and the metrics of repae.analysis: Table 1 statistics, CKNNA, the PCA picture, PSNR."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from repae.analysis import (
    cknna,
    image_grid,
    latent_pca_rgb,
    psnr,
    spatial_variance,
    spatial_variance_per_channel,
    total_variation,
    total_variation_per_channel,
)


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


def test_psnr_and_grid():
    x = torch.full((2, 3, 4, 4), 100.0)
    assert psnr(x, x) == pytest.approx(100.0)
    assert psnr(x, x + 1) == pytest.approx(20 * math.log10(255.0))
    grid = image_grid([torch.zeros(3, 3, 4, 5, dtype=torch.uint8), torch.zeros(2, 3, 4, 5, dtype=torch.uint8)])
    assert grid.shape == (3, 2 + 2 * 6, 2 + 3 * 7) and grid.dtype == torch.uint8


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
    assert data["settings"]["depth"] == 2 and data["settings"]["t"] == 0.5 and data["settings"]["k"] == 7
    assert math.isfinite(data["psnr"]) and data["psnr"] > 0
    assert data["rfid"] is None or math.isfinite(data["rfid"])
    if data["rfid"] is None:
        assert data["rfid_reason"]
    # the same latents by hand: the first of every 8 dataset images through the trained tokenizer
    run = open_run(quick_run, slots=("tokenizer", "dataset"))
    images = torch.stack([run.dataset[i][0] for i in range(0, 64, 8)]).float() / 127.5 - 1
    with torch.no_grad():
        z = run.tokenizer.encode(images).mean
    assert data["spatial_variance"] == pytest.approx(spatial_variance(z), rel=1e-5)
    assert data["total_variation"] == pytest.approx(total_variation(z), rel=1e-5)
    for name in ("latent_pca", "reconstructions"):
        with Image.open(tmp_path / f"{name}.png") as picture:
            assert picture.size == (2 + 8 * 34, 2 + 2 * 34)  # 8 images of 32 px per row, two rows


def test_analyze_an_image_folder(quick_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    result = _cli(str(quick_run / "checkpoints" / "step-0000002"), "--images", str(folder), "--out", str(out),
                  "--device", "cpu", "--k", "2")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "analysis.json").read_text())
    assert data["step"] == 2 and data["num_images"] == 4
    assert data["settings"]["images"] == str(folder) and data["settings"]["labels"] == "null class"
    assert data["cknna"] is not None


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
    from repae.cli.analyze import _rfid
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
