"""`repae eval` and repae.evaluate: the metric formulas against NumPy references and constructed cases, the Inception
features against torch-fidelity's own extractor, ADM file formats, the full pipeline on small generated sets (random
Inception weights in torch-fidelity's exact key layout; nothing is downloaded), and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from repae.errors import UserError, WeightsMismatchError
from repae.evaluate import metrics as M
from repae.evaluate.inputs import FolderImages, NpzImages, open_reference, open_samples, write_reference_npz

ROOT = Path(__file__).resolve().parents[1]

try:  # the plugin is importable once the package is (re)installed with its entry point
    import repae_metrics
except ImportError:  # pragma: no cover - source checkout without a reinstall
    sys.path.append(str(ROOT / "plugins"))
    import repae_metrics


# -- helpers ---------------------------------------------------------------------------------------------------------
def reference_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """Textbook Fréchet distance: matrix square root of S1 S2 by eigen-decomposition (what scipy's sqrtm returns for a
    diagonalisable matrix), real part of its trace."""
    values, vectors = np.linalg.eig(sigma1 @ sigma2)
    root = (vectors * np.sqrt(values.astype(complex))) @ np.linalg.inv(vectors)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real)


def generated_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth random colour fields (uint8 NHWC): coarse noise upsampled, so images look like blobs, not static."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_folder(path: Path, images: np.ndarray) -> Path:
    from PIL import Image

    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(path / f"{i:05d}.png")
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random Inception weights saved like torch-fidelity's release (a plain state dict in a .pth file)."""
    from repae.evaluate.features import random_inception_state_dict

    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), path)
    return path


@pytest.fixture
def host():
    """The built-in plugins plus repae-metrics (added in-process when its entry point is not installed yet)."""
    from repae.plugins import load_plugins

    loaded = load_plugins()
    if "fid" not in loaded.registry.names("metric"):
        loaded.add_plugin(repae_metrics, "repae-metrics")
    return loaded


@pytest.fixture
def cli(host, monkeypatch):
    import repae.cli.eval as eval_cli

    monkeypatch.setattr(eval_cli, "load_host", lambda: host)
    app = typer.Typer()
    app.command()(eval_cli.evaluate)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


# -- formulas --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [300, 20])  # full rank, and fewer samples than dimensions
def test_frechet_distance_matches_numpy_reference(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3
    y = rng.normal(size=(n + 7, 64)) * 1.5 + 0.2
    mu1, s1 = M.feature_statistics(x)
    mu2, s2 = M.feature_statistics(y)
    expected = reference_frechet(mu1, s1, mu2, s2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-7)
    assert M.frechet_distance_to_features(x, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    assert abs(M.frechet_distance_to_features(x, mu1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_distance_closed_form_and_shape_check():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5 + 1 + 0 + 4)
    with pytest.raises(UserError, match="statistics do not match"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    mu, sigma = M.feature_statistics(x, chunk=7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_inception_score_on_constructed_logits():
    assert M.inception_score(np.zeros((40, 1008))) == pytest.approx(1.0)  # uniform predictions
    classes = 8
    one_hot = np.tile(np.eye(classes) * 100.0, (10, 1))  # every split holds each class once, confidently
    assert M.inception_score(one_hot, splits=10) == pytest.approx(classes, rel=1e-6)
    # consecutive, unshuffled splits: first half all class 0, second half all class 1 -> each split scores 1
    halves = np.concatenate([np.tile([100.0, 0.0], (10, 1)), np.tile([0.0, 100.0], (10, 1))])
    assert M.inception_score(halves, splits=2) == pytest.approx(1.0)
    assert M.inception_score(halves, splits=1) == pytest.approx(2.0)
    with pytest.raises(UserError, match="at least 10 samples"):
        M.inception_score(np.zeros((5, 3)))


def test_precision_recall_on_constructed_point_clouds():
    rng = np.random.default_rng(0)
    cluster_a = rng.normal(size=(30, 16))
    cluster_b = rng.normal(size=(30, 16)) + 100.0
    both = np.concatenate([cluster_a, cluster_b])
    assert M.precision_recall(both, both) == (1.0, 1.0)
    assert M.precision_recall(cluster_a, cluster_b) == (0.0, 0.0)  # disjoint, far apart
    # samples cover one of the reference's two modes: all realistic, half the reference recalled
    assert M.precision_recall(cluster_a, both) == (1.0, 0.5)
    # ... and the reverse: half the samples are unrealistic, the whole reference is recalled
    assert M.precision_recall(both, cluster_a) == (0.5, 1.0)
    # blocks of distances give the same answer as one block
    assert M.precision_recall(cluster_a, both, batch_size=7) == (1.0, 0.5)
    assert M.precision_recall(both, both, dtype="float16") == (1.0, 1.0)


def test_precision_radius_is_the_kth_neighbour_and_inclusive():
    reference = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=3 radii: 3, 2, 2, 3
    samples = np.array([[-3.0], [-3.5], [1.5], [6.5]])  # on the boundary of 0's ball, outside, inside, outside
    precision, recall = M.precision_recall(samples, reference, k=3)
    assert precision == 0.5
    with pytest.raises(UserError, match="need more than 3"):
        M.precision_recall(samples[:3], reference)


# -- features --------------------------------------------------------------------------------------------------------
def test_features_match_torch_fidelity_and_sfid_layout(weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from repae.evaluate.features import extract_features, load_inception

    images = generated_images(1, seed=1)
    ours = extract_features([images], load_inception(weights, ["pool", "spatial", "logits"]))
    assert ours["pool"].shape == (1, 2048) and ours["logits"].shape == (1, 1008)
    assert ours["spatial"].shape == (1, 17 * 17 * 7) == (1, 2023)

    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(weights))
    captured = []
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: captured.append(out.clone()))
    with torch.no_grad():
        pool, logits = theirs(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(ours["pool"], pool.numpy())
    np.testing.assert_array_equal(ours["logits"], logits.numpy())
    mixed_6 = captured[0]  # [1, 192, 17, 17]: TF mixed_6/conv
    nhwc = mixed_6.permute(0, 2, 3, 1)[..., :7].reshape(1, -1)  # ADM: features[..., :7], flattened NHWC
    np.testing.assert_array_equal(ours["spatial"], nhwc.numpy())
    h, w, c = np.unravel_index(np.argmax(ours["spatial"]), (17, 17, 7))  # channel fastest, then width, height
    assert ours["spatial"][0, (h * 17 + w) * 7 + c] == mixed_6[0, c, h, w] > 0


def test_extractor_is_registered_with_torch_fidelity(weights):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    from repae.evaluate.features import EXTRACTOR_NAME, SPATIAL, ADMInceptionV3

    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] is ADMInceptionV3
    extractor = create_feature_extractor(EXTRACTOR_NAME, [SPATIAL], cuda=False,
                                         feature_extractor_weights_path=str(weights), verbose=False)
    (spatial,) = extractor(torch.from_numpy(generated_images(1, seed=2)).permute(0, 3, 1, 2))
    assert spatial.shape == (1, 2023) and spatial.dtype == torch.float32


def test_weights_that_do_not_fit_name_the_keys(weights, tmp_path):
    from repae.evaluate.features import load_inception

    state = torch.load(weights, weights_only=True)
    del state["Mixed_6d.branch1x1.conv.weight"]
    state["fc.weight"] = state["fc.weight"][:1000]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsMismatchError) as info:
        load_inception(bad)
    assert "Mixed_6d.branch1x1.conv.weight" in str(info.value) and "fc.weight" in str(info.value)


def test_missing_weights_offline_names_the_file_and_where_to_put_it(monkeypatch, tmp_path):
    from repae.evaluate.features import ENV_WEIGHTS, WEIGHTS_FILENAME, find_inception_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    with pytest.raises(UserError) as info:
        find_inception_weights()
    message = str(info.value)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert message == ("the Inception weights are missing: not in torch's cache, "
                       f"and downloads are off (HF_HUB_OFFLINE=1).\n  fix: download https://github.com/toshas/"
                       f"torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME} into {folder}/, or pass "
                       "--inception-weights FILE"), message
    assert message.count("https://") == 1 and len(message.replace(str(folder), "DIR")) < 300, message  # was 1,071
    # the cache location and the environment variable are honoured
    cached = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights() == cached
    monkeypatch.setenv(ENV_WEIGHTS, str(tmp_path / "nowhere.pth"))
    with pytest.raises(UserError, match="nowhere.pth, which does not exist"):
        find_inception_weights()


# -- inputs ----------------------------------------------------------------------------------------------------------
def test_adm_reference_batch_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = generated_images(7, seed=3)
    stats = {"pool": (rng.normal(size=2048), np.eye(2048) * 0.5), "spatial": (rng.normal(size=2023), np.eye(2023))}
    path = write_reference_npz(tmp_path / "ref.npz", stats, [images[:4], images[4:]])
    with np.load(path) as data:  # what ADM's evaluator reads
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["mu_s"], stats["spatial"][0])
    ref = open_reference(path)
    assert set(ref.stats) == {"pool", "spatial"} and len(ref.images) == 7
    np.testing.assert_array_equal(ref.stats["pool"][1], stats["pool"][1])
    np.testing.assert_array_equal(np.concatenate(list(ref.images.batches(3))), images)
    # a reference written by NumPy itself, compressed, statistics only
    np.savez_compressed(tmp_path / "stats.npz", mu=stats["pool"][0], sigma=stats["pool"][1])
    only = open_reference(tmp_path / "stats.npz")
    assert set(only.stats) == {"pool"} and only.images is None


def test_sample_inputs(tmp_path):
    images = generated_images(5, seed=4)
    np.savez_compressed(tmp_path / "batch.npz", arr_0=images)
    streamed = open_samples(tmp_path / "batch.npz")
    assert isinstance(streamed, NpzImages) and len(streamed) == 5
    np.testing.assert_array_equal(np.concatenate(list(streamed.batches(2))), images)
    run = tmp_path / "sampled"  # a `repae sample` folder: its samples.npz wins over its images
    write_folder(run / "images", images[:2])
    np.savez(run / "samples.npz", arr_0=images)
    assert len(open_samples(run)) == 5
    (run / "samples.npz").unlink()
    (run / "sampling.json").write_text("{}")
    with pytest.raises(UserError, match="sampling has not finished"):
        open_samples(run)
    folder = write_folder(tmp_path / "pngs", images)
    from PIL import Image

    Image.fromarray(generated_images(1, seed=5, size=48)[0]).save(folder / "zz_bigger.png")
    source = open_samples(folder)
    assert isinstance(source, FolderImages) and len(source) == 6
    assert [b.shape for b in source.batches(4)] == [(4, 32, 32, 3), (1, 32, 32, 3), (1, 48, 48, 3)]
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
    with pytest.raises(UserError, match="expected uint8 images"):
        open_samples(tmp_path / "floats.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        open_samples(tmp_path / "empty")


# -- plugin ----------------------------------------------------------------------------------------------------------
def test_metric_components_are_registered_and_build(host):
    import repae
    from repae.errors import RecipeError
    from repae.interfaces import Metric

    assert {"fid", "sfid", "inception-score", "precision-recall"} <= set(host.registry.names("metric"))
    metric = repae.create("metric", "precision-recall", k=5, distance_dtype="float16", registry=host.registry)
    assert isinstance(metric, Metric)  # the contract of the kind
    assert (metric.k, metric.dtype, metric.outputs) == (5, "float16", ("precision", "recall"))
    with pytest.raises(RecipeError, match="splits"):
        repae.create("metric", "inception-score", splits=0, registry=host.registry)
    sfid = repae.create("metric", "sfid", registry=host.registry)
    assert isinstance(sfid, Metric) and (sfid.feature, sfid.outputs) == ("spatial", ("sfid",))
    assert isinstance(repae.create("metric", "fid", registry=host.registry), Metric)


def test_registration_and_cli_module_import_no_torch():
    code = (f"import sys; sys.path.append({str(ROOT / 'plugins')!r}); import repae_metrics, repae.cli.eval, "
            "repae.evaluate; print([m for m in ('torch', 'torch_fidelity') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the whole pipeline and the command line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    images = generated_images(8, seed=7)
    np.savez(root / "samples.npz", arr_0=images)
    write_folder(root / "reference", images)
    noise = np.random.default_rng(1).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "other.npz", arr_0=noise)
    return root


@pytest.mark.slow  # three Inception passes over 8 images at 299x299: 5-10 s on 2 CPU cores
def test_identical_sets_give_zero_fid_through_the_cli(cli, weights, image_sets, tmp_path):
    saved = tmp_path / "ref.npz"
    result = cli(image_sets / "samples.npz", "--ref", image_sets / "reference", "--inception-weights", weights,
                 "--metrics", "fid,sfid,pr", "--batch-size", 5, "--set", "pr.batch_size=3", "--save-ref", saved,
                 "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"samples", "num_samples", "reference", "num_reference_images", "metrics", "skipped", "reference_stats",
            "inception_weights", "inception_sha256", "feature_extractor", "device", "batch_size",
            "seconds"} <= set(report)
    assert list(report["metrics"]) == ["fid", "sfid", "precision", "recall"]
    assert abs(report["metrics"]["fid"]) < 1e-3 and abs(report["metrics"]["sfid"]) < 1e-3
    assert report["metrics"]["precision"] == 1.0 and report["metrics"]["recall"] == 1.0
    assert report["num_samples"] == report["num_reference_images"] == 8
    assert report["feature_extractor"] == "repae-inception-v3-adm" and len(report["inception_sha256"]) == 64

    # the saved ADM reference: different samples against its stored statistics (no reference pass needed)
    other = cli(image_sets / "other.npz", "--ref", saved, "--inception-weights", weights, "--metrics", "fid,sfid")
    assert other.exit_code == 0, other.output
    assert "stored statistics used: mu, sigma, mu_s, sigma_s" in other.stdout
    fid = float(next(line.split()[1] for line in other.stdout.splitlines() if line.split()[:1] == ["FID"]))
    assert fid > 5.0, other.stdout  # smooth blobs vs uniform noise (15.5 with these random weights)


def test_json_is_alone_on_stdout_and_progress_goes_to_stderr(cli, weights, tmp_path):
    """`--json` keeps standard output for the report alone and still shows progress on stderr (plain lines when
    stderr is not a terminal), so a long evaluation is not silent."""
    images = generated_images(4, seed=3)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    write_folder(tmp_path / "reference", images[::-1].copy())
    result = cli(tmp_path / "samples.npz", "--ref", tmp_path / "reference", "--inception-weights", weights,
                 "--metrics", "fid", "--batch-size", 2, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["fid"] == pytest.approx(0.0, abs=1e-3)  # the same 4 images
    lines = result.stderr.splitlines()
    assert [line.split()[:4] for line in lines] == [["Inception", "features:", "samples", "4/4"],
                                                    ["Inception", "features:", "reference", "4/4"],
                                                    ["metrics", "(fid)", "1/1", "(100%)"]], result.stderr


def test_cli_user_errors(cli, weights, image_sets, tmp_path, monkeypatch):
    samples = image_sets / "samples.npz"
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    explicit = cli(samples, "--ref", stats_only, "--inception-weights", weights, "--metrics", "pr")
    assert explicit.exit_code == 2 and "needs reference images" in explicit.stderr
    unknown = cli(samples, "--ref", stats_only, "--metrics", "fdi")
    assert unknown.exit_code == 2 and "Did you mean 'fid'" in unknown.stderr
    bad_value = cli(samples, "--ref", stats_only, "--metrics", "fid,pr", "--set", "pr.k=0")
    assert bad_value.exit_code == 2 and "k: must be >= 1" in bad_value.stderr
    bad_field = cli(samples, "--ref", stats_only, "--set", "is.split=5")
    assert bad_field.exit_code == 2 and "splits" in bad_field.stderr
    not_chosen = cli(samples, "--ref", stats_only, "--metrics", "fid", "--set", "is.splits=5")
    assert not_chosen.exit_code == 2 and "not among --metrics" in not_chosen.stderr
    # offline without weights: one message naming the file, exit code 2, no traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("REPAE_INCEPTION_WEIGHTS", raising=False)
    offline = cli(samples, "--ref", stats_only)
    assert offline.exit_code == 2 and "Traceback" not in offline.output
    assert "weights-inception-2015-12-05-6726825d.pth" in offline.stderr
    missing_ref = cli(samples, "--ref", tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    assert missing_ref.exit_code == 2 and "docs/evaluation.md" in missing_ref.stderr
