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
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"


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
    """Build component ``kind``/``name`` from a recipe section the way the core does (presets applied, under the
    device); the section must parse without issues."""
    from repae.build import BuildContext, build_component

    entry = registry.get(kind, name)
    config, issues = entry.parse(section)
    assert not issues, issues
    return build_component(entry, config, BuildContext(device=device))


QUICK_RUN_OVERRIDES = [
    "dataset.size=64", "trainer.batch_size=8", "trainer.steps=4", "trainer.log_every=2", "trainer.checkpoint_every=2",
    "trainer.sample_every=0", "trainer.num_workers=0",
]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> Path:
    """A finished 4-step run of recipes/quickstart.yaml (checkpoints at steps 2 and 4), shared by the tests of the
    commands that read runs (sample, analyze, export, compare). Treat it as read-only."""
    from repae.build import build_recipe
    from repae.plugins import load_plugins
    from repae.recipe import read_recipe
    from repae.rundir import prepare_run_dir

    run_dir = tmp_path_factory.mktemp("quick_run")
    resolved = read_recipe(ROOT / "recipes" / "quickstart.yaml", QUICK_RUN_OVERRIDES,
                           load_plugins(select={"repae"}).registry)
    prepare_run_dir(resolved, run_dir)
    built = build_recipe(resolved, device="cpu")
    built[-1].component.run(run_dir, progress=False)
    return run_dir
