"""The public surface: what `repae` exports, that plugins use nothing else, and that the core uses no plugin."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import repae

from conftest import EXAMPLE_PLUGIN, ROOT, python_imports

CORE = sorted((ROOT / "repae").rglob("*.py"))
PLUGINS = sorted([*(ROOT / "plugins").rglob("*.py"), *EXAMPLE_PLUGIN.rglob("*.py")])
PLUGIN_PACKAGES = sorted({p.relative_to(ROOT / "plugins").parts[0] for p in (ROOT / "plugins").rglob("*.py")}
                         | {"repae_plugin_example"})


def test_the_core_and_the_cli_import_no_plugin_module():
    """The measured bug: export, cache-latents and analyze imported repae_vae, repae_sit and repae_data."""
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in CORE
             for line, module, _ in python_imports(path) if module.split(".")[0] in PLUGIN_PACKAGES]
    assert found == []


def test_plugins_import_only_the_public_names_of_repae():
    public = set(repae.__all__)
    found = []
    for path in PLUGINS:
        for line, module, names in python_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module.startswith("repae.") and not module.startswith(tuple(f"{p}." for p in PLUGIN_PACKAGES)):
                found.append(f"{where} imports the internal module {module}")
            elif module == "repae":
                found.extend(f"{where} imports repae.{name}, which is not public" for name in names
                             if name not in public)
    assert found == []


def test_every_public_name_resolves_and_is_documented():
    undocumented = []
    for name in repae.__all__:
        value = getattr(repae, name)
        if (inspect.isclass(value) or inspect.isfunction(value)) and not inspect.getdoc(value):
            undocumented.append(name)
    assert undocumented == []
    with pytest.raises(AttributeError, match="no attribute 'Trainerr'"):
        repae.Trainerr  # noqa: B018 - a typo gets the normal AttributeError


def test_import_repae_loads_neither_torch_nor_a_plugin_and_create_builds_on_request():
    code = (
        "import sys; import repae;"
        "plugins = lambda: sorted({m.split('.')[0] for m in sys.modules if m.startswith('repae_')});"
        "print('torch' in sys.modules, plugins());"
        "sit = repae.create('denoiser', 'sit', size='S/2');"
        "print(type(sit).__name__, sit.depth, sit.hidden_size, sit.input_size, sit.in_channels);"
        "print('repae_sit' in plugins(), 'repae_vae.autoencoder' in sys.modules)"
    )
    env = {**os.environ, "REPAE_PLUGINS": "repae"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "False []"
    assert lines[1] == "SiT 12 384 32 4"  # S/2 with the SiT defaults (256 px, SD-VAE latents)
    assert lines[2] == "True False"  # only the factory asked for was imported


def test_create_validates_like_a_recipe_and_derives_from_built_components():
    vae = repae.create("tokenizer", "sd-vae", size="tiny")
    encoder = repae.create("encoder", "dinov2", size="tiny")
    sit = repae.create("denoiser", "sit", size="tiny", built={"tokenizer": vae, "encoders": [encoder]})
    assert (sit.in_channels, sit.encoder_dims) == (vae.latent_channels, [encoder.embed_dim])
    explicit = repae.create("denoiser", "sit", size="tiny", in_channels=8, built={"tokenizer": vae})
    assert explicit.in_channels == 8  # a field that is set is never derived
    with pytest.raises(repae.RecipeError) as info:
        repae.create("denoiser", "sit", size="tiny", depht=3, num_heads="four")
    text = str(info.value)
    assert "depht: unknown key" in text and "Did you mean 'depth'" in text and "num_heads: expected int" in text
    with pytest.raises(repae.UserError, match="unknown kind 'denoisr'.*Did you mean 'denoiser'"):
        repae.create("denoisr", "sit")
    with pytest.raises(repae.UnknownComponentError, match="Did you mean 'sit'"):
        repae.create("denoiser", "sitt")


def test_list_components_and_load_recipe():
    names = {(e.kind, e.name) for e in repae.list_components()}
    assert {("denoiser", "sit"), ("tokenizer", "sd-vae"), ("loss", "repa"), ("trainer", "default")} <= names
    assert {e.name for e in repae.list_components("sampler")} == {"euler", "heun", "euler-maruyama", "ddpm"}
    recipe = repae.load_recipe(ROOT / "recipes" / "quickstart.yaml", ["losses.repa.depth=1"])
    assert recipe.spec("losses.repa").config.depth == 1
    assert recipe.spec("denoiser").config.input_size == 32  # the default; derived only when checked whole
    checked = repae.load_recipe(ROOT / "recipes" / "quickstart.yaml", check=True)
    assert checked.spec("denoiser").config.input_size == 8 and "input_size" in checked.spec("denoiser").derived
    with pytest.raises(repae.RecipeError, match="losses.repa.dpeth: unknown key"):
        repae.load_recipe(ROOT / "recipes" / "quickstart.yaml", ["losses.repa.dpeth=1"])


def test_every_kind_has_a_written_contract():
    from repae import interfaces

    contracts = {"tokenizer": interfaces.Tokenizer, "denoiser": interfaces.Denoiser,
                 "encoder": interfaces.RepresentationEncoder, "normalizer": interfaces.LatentNormalizer,
                 "loss": repae.Loss, "dataset": interfaces.Dataset, "sampler": interfaces.Sampler,
                 "metric": interfaces.Metric, "tracker": interfaces.Tracker, "trainer": interfaces.Trainer}
    assert set(contracts) == set(repae.KINDS)
    for contract in contracts.values():
        assert inspect.getdoc(contract) and contract.__module__ in ("repae.interfaces", "repae.loss")
    doc = inspect.getdoc(sys.modules[repae.StepContext.__module__])
    for member in ("t", "noise", "x_t", "posterior", "labels", "targets", "recon", "detached"):
        assert member in doc, member  # what a loss may read: shape, dtype, units, when detached


def test_every_builtin_factory_takes_its_config_and_a_build_context():
    """Measured: the factories annotated their context five different ways (Any, BuildContext, object, a default of
    None, nothing)."""
    from repae.plugins import load_plugins

    wrong = []
    for entry in load_plugins(select={"repae"}).registry.entries():
        factory = entry.load_factory()
        params = list(inspect.signature(factory).parameters.values())
        annotations = [str(p.annotation) for p in params]
        if len(params) != 2 or annotations[1] != "BuildContext" or params[1].default is not inspect.Parameter.empty:
            wrong.append(f"{entry.kind} {entry.name}: {factory.__module__}.{factory.__name__}{inspect.signature(factory)}")
        elif annotations[0] not in [c.__name__ for c in entry.config.__mro__]:
            wrong.append(f"{entry.kind} {entry.name}: config annotated {annotations[0]}, registered {entry.config}")
    assert wrong == []
