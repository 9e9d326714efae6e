"""Test isolation: only repae's own plugins load unless a test adds others; helpers to install test plugins."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins_for_tests"
EXAMPLE_PLUGIN = ROOT / "examples" / "repae-plugin-example"
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
"""The reference implementations' golden tensors (a copy of the public set; see data/golden/README.md)."""


def cli(*args, code: int = 0):
    """``repae ARGS`` through typer's test runner; asserts the exit code (and that no traceback was printed)."""
    from typer.testing import CliRunner

    from repae.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"repae {' '.join(map(str, args))} -> {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output
    return result


def python_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every absolute import in a Python file (``names`` empty for ``import x``)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return out


def read_golden(name: str, *, float32: bool = False) -> tuple[dict, dict]:
    """A golden file's metadata (the JSON under its safetensors metadata key ``json``: the reference's configuration)
    and its tensors (floating point ones as float32 with ``float32``; the stored float8 weights convert exactly)."""
    import json

    from safetensors import safe_open

    with safe_open(str(GOLDEN / name), framework="pt") as f:
        meta = json.loads(f.metadata()["json"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if float32:
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return meta, tensors


def official_weights(tensors: dict, prefix: str = "weights.") -> dict:
    """The entries of a golden file under ``prefix`` as a float32 state dict of the official module."""
    return {k[len(prefix):]: v.float() if v.is_floating_point() else v
            for k, v in tensors.items() if k.startswith(prefix)}


# Keys of the official ``SiT(**sit_config)`` that do not change the numbers our model computes: the loss path is
# given per call (``loss_kwargs``), fused attention is an implementation choice; ``encoder_depth`` and ``bn_momentum``
# are read by the tests (alignment depth, latent BatchNorm), not by the denoiser.
_SIT_OTHER_KEYS = {"path_type", "fused_attn", "encoder_depth", "bn_momentum", "decoder_hidden_size"}
_SIT_FIELDS = {"depth": "depth", "hidden_size": "hidden_size", "num_heads": "num_heads", "patch_size": "patch_size",
               "mlp_ratio": "mlp_ratio", "input_size": "input_size", "in_channels": "in_channels",
               "num_classes": "num_classes", "class_dropout_prob": "class_dropout_prob", "z_dims": "encoder_dims",
               "projector_dim": "projector_dim", "qk_norm": "qk_norm"}


def sit_fields(cfg: dict) -> dict:
    """The ``sit`` config fields of the official ``SiT(**cfg)`` (a golden file's ``sit_config``); every field a
    preset would fill is set, so no preset is involved."""
    unknown = set(cfg) - set(_SIT_FIELDS) - _SIT_OTHER_KEYS
    assert not unknown, f"official SiT arguments this test does not map: {sorted(unknown)}"
    assert cfg["decoder_hidden_size"] == cfg["hidden_size"], "the final layer reads the trunk's tokens"
    fields = {ours: cfg[theirs] for theirs, ours in _SIT_FIELDS.items()}
    return {**fields, "encoder_dims": list(fields["encoder_dims"]), "learn_sigma": False,
            "time_convention": "noise-at-1"}


def golden_sit(cfg: dict, weights: dict, registry=None) -> tuple:
    """The registry's ``sit`` configured as the official ``SiT(**cfg)`` (:func:`sit_fields`) with the official
    ``weights``; returns it and the split-off latent BatchNorm buffers (REPA-E's ``bn.*``)."""
    import repae
    import torch
    from repae_sit.checkpoint import from_official, load_strict

    model = repae.create("denoiser", "sit", registry=registry, **sit_fields(cfg))
    torch.testing.assert_close(model.pos_embed, weights["pos_embed"], rtol=0, atol=0)  # our sin-cos table
    state, norm = from_official(weights)
    load_strict(model, state)
    return model, {k: v.clone() for k, v in norm.items()}


def sampler_golden_sit(registry=None) -> tuple:
    """``(meta, tensors, model, bn_state)`` of ``sampler_ode.safetensors``: the SiT of its ``sit_config`` (eval mode)
    with the weights of the file it names (``weights_from``) and its own label table (which has the null row)."""
    meta, gold = read_golden("sampler_ode.safetensors")
    _, source = read_golden(meta["weights_from"].split()[0])
    weights = official_weights(source)
    weights["y_embedder.embedding_table.weight"] = gold["weights.y_embedder.embedding_table.weight"].float()
    model, norm = golden_sit(meta["sit_config"], weights, registry)
    return meta, gold, model.eval(), norm


REFERENCE_NORM_GROUPS = 32
"""The official Encoder/Decoder use GroupNorm(32 groups) whatever their width (golden/README.md §3): a property of
the reference code, not a setting of the golden files."""


def vae_fields(cfg: dict) -> dict:
    """The ``sd-vae`` config fields of the official LDM ``AutoencoderKL`` of a golden file's ``vae_config`` (every
    architecture field set: no preset involved)."""
    assert cfg["z_channels"] == cfg["embed_dim"] and cfg["double_z"], "the LDM KL-VAE ties z_channels to embed_dim"
    return dict(latent_channels=cfg["embed_dim"], ch=cfg["ch"], ch_mult=cfg["ch_mult"],
                num_res_blocks=cfg["num_res_blocks"], attn_resolutions=cfg["attn_resolutions"],
                resolution=cfg["resolution"], norm_groups=REFERENCE_NORM_GROUPS)


def load_manifest(name: str) -> tuple[dict, dict]:
    """A key-layout manifest of the official checkpoints (``golden/manifests``): its ``_meta`` and the shapes."""
    import json

    shapes = json.loads((GOLDEN / "manifests" / name).read_text())
    return shapes.pop("_meta"), shapes


@pytest.fixture(autouse=True)
def _only_builtin_plugins(monkeypatch):
    """The developer's own installed plugins never leak into tests: select repae's distribution only."""
    monkeypatch.setenv("REPAE_PLUGINS", "repae")
    monkeypatch.delenv("REPAE_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("REPAE_STRICT_PLUGINS", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


class FakeDistributions:
    """Write distributions (dist-info with entry points, plus optional modules) to a temporary sys.path entry."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))

    def add(
        self,
        dist: str,
        entry_points: dict[str, str],
        *,
        version: str = "1.0",
        modules: dict[str, str] | None = None,
        source_dir: Path | None = None,
    ) -> None:
        """Create ``dist`` exposing ``entry_points`` (name -> module) in the ``repae`` group."""
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[repae]\n{lines}\n")
        for name, code in (modules or {}).items():
            (self.root / f"{name}.py").write_text(textwrap.dedent(code))
            self.modules.add(name)
        if source_dir is not None:
            self.monkeypatch.syspath_prepend(str(source_dir))
        self.modules.update(target.split(":")[0].split(".")[0] for target in entry_points.values())
        importlib.invalidate_caches()

    def cleanup(self) -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in self.modules:
                del sys.modules[name]


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    dists = FakeDistributions(tmp_path / "site", monkeypatch)
    yield dists
    dists.cleanup()


@pytest.fixture
def toys(fake_dists, monkeypatch):
    """The toy components (tests/plugins_for_tests/repae_toys) installed as distribution `repae-toys`."""
    fake_dists.add("repae-toys", {"toys": "repae_toys"}, source_dir=TEST_PLUGINS)
    monkeypatch.setenv("REPAE_PLUGINS", "repae-toys")
    import repae_toys.models

    repae_toys.models.CALLS.clear()
    return fake_dists


@pytest.fixture
def example_plugin(fake_dists, monkeypatch):
    """The example third-party plugin, installed as its own distribution beside repae."""
    fake_dists.add(
        "repae-plugin-example", {"example": "repae_plugin_example"}, version="0.1.0", source_dir=EXAMPLE_PLUGIN
    )
    monkeypatch.setenv("REPAE_PLUGINS", "repae,repae-plugin-example")
    return fake_dists


@pytest.fixture(scope="module")
def registry():
    """The registry of repae's built-in plugins, loaded once per test module (a module may define its own)."""
    from repae import load_plugins

    return load_plugins().registry


def build_section(registry, kind: str, name: str, /, device: str = "cpu", **section):
    """Build component ``kind``/``name`` from a recipe section the way the core does (presets applied, validation,
    under the device): ``repae.create`` with this registry."""
    import repae

    return repae.create(kind, name, device=device, registry=registry, **section)


QUICK_RUN_OVERRIDES = [
    "dataset.num_images=64", "trainer.batch_size=8", "trainer.steps=4", "trainer.log_every=2", "trainer.checkpoint_every=2",
    "trainer.sample_every=0", "trainer.num_workers=0",
]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """A finished 4-step run of recipes/quickstart.yaml (checkpoints at steps 2 and 4), shared by the tests of the
    commands that read runs (sample, analyze, export, compare). Treat it as read-only."""
    from repae.build import build_recipe
    from repae.plugins import load_plugins
    from repae.recipe import load_recipe
    from repae.rundir import prepare_run_dir

    run_dir = tmp_path_factory.mktemp("quick_run")
    resolved = load_recipe(ROOT / "recipes" / "quickstart.yaml", QUICK_RUN_OVERRIDES,
                           registry=load_plugins(select={"repae"}).registry, check=True)
    prepare_run_dir(resolved, run_dir)
    built = build_recipe(resolved, device="cpu")
    built[-1].component.run(run_dir, progress=False)
    return run_dir
