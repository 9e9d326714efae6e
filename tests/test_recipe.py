"""Recipes: extends, merging, overrides, validation with every problem at once, byte-identical resolution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from repae.build import build_recipe
from repae.errors import RecipeError
from repae.plugins import load_plugins
from repae.recipe import load_source, parse_override, resolve_recipe


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def registry(toys):
    host = load_plugins()
    assert host.failures == []
    return host.registry


@pytest.fixture
def recipes(tmp_path):
    write(tmp_path / "_base" / "model.yaml", """\
        tokenizer: {name: toy-vae, latent_channels: 8}
        denoiser:
          name: toy-dit
          size: small
          dropout: 0.1
        encoders:
          - {name: toy-enc, embed_dim: 16}
        """)
    write(tmp_path / "_base" / "data.yaml", """\
        dataset: {name: toy-data, root: /data/imagenet}
        seed: 1
        """)
    write(tmp_path / "child.yaml", """\
        extends: [_base/model.yaml, _base/data.yaml]
        description: child recipe
        denoiser:
          depth: 3
          dropout: null           # back to the default
        encoders:
          - {name: toy-enc, embed_dim: 4}
          - {name: toy-enc}
        losses:
          diffusion: {name: toy-loss}
          repa: {name: toy-loss, weight: 0.5, updates: [denoiser, tokenizer]}
        """)
    return tmp_path


def test_extends_merges_deeply_replaces_lists_and_null_deletes(recipes):
    source = load_source(recipes / "child.yaml")
    data = source.data
    assert data["denoiser"] == {"name": "toy-dit", "size": "small", "depth": 3}
    assert data["tokenizer"] == {"name": "toy-vae", "latent_channels": 8}
    assert [e.get("embed_dim") for e in data["encoders"]] == [4, None]
    assert data["seed"] == 1 and data["dataset"]["root"] == "/data/imagenet"
    assert source.where(("denoiser", "depth")).endswith("child.yaml:4")
    assert source.where(("denoiser", "size")).endswith("model.yaml:4")
    assert len(source.files) == 3


def test_single_extends_and_relative_paths_resolve_from_the_file(recipes):
    write(recipes / "nested" / "deeper.yaml", "extends: ../child.yaml\nseed: 7\n")
    data = load_source(recipes / "nested" / "deeper.yaml").data
    assert data["seed"] == 7 and data["denoiser"]["depth"] == 3


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "extends: [c.yaml]\n")
    write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_source(tmp_path / "a.yaml")
    (problem,) = info.value.problems
    assert "cycle" in problem.message and "a.yaml -> " in problem.message and problem.path == "extends"


def test_missing_base_and_bad_yaml_are_reported_together(tmp_path):
    write(tmp_path / "broken.yaml", "seed: [1\n")
    write(tmp_path / "r.yaml", "extends: [nope.yaml, broken.yaml]\n")
    with pytest.raises(RecipeError) as info:
        load_source(tmp_path / "r.yaml")
    messages = [p.message for p in info.value.problems]
    assert any("file not found: nope.yaml" in m for m in messages)
    assert any("not valid YAML" in m for m in messages)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_source(tmp_path / "absent.yaml")


def test_overrides_parse_yaml_scalars_and_index_lists(recipes):
    source = load_source(
        recipes / "child.yaml",
        ["denoiser.depth=5", "encoders.1.embed_dim=32", "losses.repa.weight=1e-1", "description='a: b'",
         "losses.diffusion=null", "trainer_free=yes"],
    )
    assert source.data["denoiser"]["depth"] == 5
    assert source.data["encoders"][1]["embed_dim"] == 32
    assert source.data["losses"]["repa"]["weight"] == 0.1
    assert source.data["description"] == "a: b"
    assert "diffusion" not in source.data["losses"]
    assert source.data["trainer_free"] is True
    assert source.where(("denoiser", "depth")) == "command line `denoiser.depth=5`"


@pytest.mark.parametrize(
    "override, message",
    [
        ("denoiser.depth", "no '='"),
        ("=3", "empty"),
        ("denoiser..depth=3", "not a valid key path"),
        ("encoders.5.embed_dim=1", "out of range"),
        ("seed.x=1", "seed: is an int; it has no key 'x'"), ("seed.x.y=1", "seed: is an int; it has no key 'x'"),
        ("denoiser.depth=[1", "not valid YAML"),
    ],
)
def test_bad_overrides_are_reported(recipes, override, message):
    with pytest.raises(RecipeError) as info:
        load_source(recipes / "child.yaml", [override])
    assert message in str(info.value)


def test_parse_override_keeps_strings_and_numbers():
    assert parse_override("a.b=XL/2") == (("a", "b"), "XL/2")
    assert parse_override("a.0=1") == (("a", 0), 1)
    assert parse_override("a=") == (("a",), None)


def test_validation_reports_every_problem_with_file_line_and_hint(recipes, registry):
    write(recipes / "typos.yaml", """\
        extends: child.yaml
        denoiser:
          dpeth: 4
          activation: relu
        tokenizer: {name: toy-vea}
        encoders:
          - {name: toy-enc, embed_dim: wide}
        dataset: {name: toy-data}
        sampler: [1, 2]
        tranier: {}
        seed: one
        """)
    with pytest.raises(RecipeError) as info:
        resolve_recipe(load_source(recipes / "typos.yaml", ["denoiser.size=huge", "dataset.root=null"]), registry)
    problems = {p.path: p for p in info.value.problems}
    assert set(problems) == {  # an unknown preset does not hide the section's other keys
        "denoiser.size", "denoiser.dpeth", "denoiser.activation", "tokenizer.name", "encoders.0.embed_dim",
        "dataset.root", "sampler", "tranier", "seed",
    }
    assert "Did you mean 'toy-vae'" in problems["tokenizer.name"].message
    assert "repae list tokenizer" in problems["tokenizer.name"].message
    assert problems["tranier"].hint.startswith("Did you mean 'trainer'")
    assert problems["encoders.0.embed_dim"].where.endswith("typos.yaml:7")
    assert "required" in problems["dataset.root"].message
    assert problems["denoiser.size"].where == "command line `denoiser.size=huge`"


def test_config_errors_inside_a_valid_preset_are_all_reported(recipes, registry):
    write(recipes / "typos2.yaml", """\
        extends: child.yaml
        denoiser: {dpeth: 4, activation: relu}
        """)
    with pytest.raises(RecipeError) as info:
        resolve_recipe(load_source(recipes / "typos2.yaml"), registry)
    problems = {p.path: p for p in info.value.problems}
    assert set(problems) == {"denoiser.dpeth", "denoiser.activation"}
    assert "depth" in problems["denoiser.dpeth"].hint
    assert problems["denoiser.dpeth"].where.endswith("typos2.yaml:2")


def test_presets_fill_values_and_explicit_keys_win(recipes, registry):
    resolved = resolve_recipe(load_source(recipes / "child.yaml", ["denoiser.size=big"]), registry)
    (denoiser,) = resolved.get("denoiser")
    assert denoiser.config.depth == 3 and denoiser.config.width == 768


def test_resolved_recipe_is_complete_and_byte_identical(recipes, registry):
    first = resolve_recipe(load_source(recipes / "child.yaml"), registry).to_yaml()
    second = resolve_recipe(load_source(recipes / "child.yaml"), registry).to_yaml()
    assert first == second
    assert "dropout: 0.0" in first and "activation: silu" in first  # defaults written out
    # the resolved recipe is itself a valid recipe that resolves to the same text
    write(recipes / "resolved.yaml", first)
    assert resolve_recipe(load_source(recipes / "resolved.yaml"), registry).to_yaml() == first


def test_components_receive_only_their_own_section(recipes, registry):
    import repae_toys.models as toy

    resolved = resolve_recipe(load_source(recipes / "child.yaml"), registry)
    built = build_recipe(resolved, device="meta")
    assert [b.label for b in built] == [
        "dataset", "tokenizer", "encoders.0", "encoders.1", "denoiser", "losses.diffusion", "losses.repa"
    ]
    kinds = [kind for kind, _, _ in toy.CALLS]
    assert kinds == ["dataset", "tokenizer", "encoder", "encoder", "denoiser", "loss", "loss"]
    for kind, config, context in toy.CALLS:
        assert type(config).__name__.startswith("Toy")  # its own config object, not the recipe
        assert not hasattr(context, "recipe")
    denoiser = built[4].component
    assert denoiser.layers[0].in_features == 8  # in_channels from the tokenizer built before it
    assert denoiser.layers[0].weight.device.type == "meta"
    _, _, context = toy.CALLS[4]
    assert set(context.built) == {"dataset", "tokenizer", "encoders"} and len(context.built["encoders"]) == 2


def test_factory_value_errors_become_build_errors(recipes, registry):
    from repae.errors import ComponentBuildError

    resolved = resolve_recipe(load_source(recipes / "child.yaml", ["dataset.root=reject-me"]), registry)
    with pytest.raises(ComponentBuildError, match="dataset 'toy-data' rejected its config: root 'reject-me'"):
        build_recipe(resolved, device="meta")


def test_a_section_naming_another_component_replaces_the_base_section(tmp_path, registry):
    write(tmp_path / "base.yaml", "tokenizer: {name: toy-vae, latent_channels: 8}\n")
    write(tmp_path / "child.yaml", "extends: base.yaml\ntokenizer: {name: other-vae}\n")
    write(tmp_path / "same.yaml", "extends: base.yaml\ntokenizer: {name: toy-vae, downsample: 4}\n")
    assert load_source(tmp_path / "child.yaml").data["tokenizer"] == {"name": "other-vae"}
    assert load_source(tmp_path / "same.yaml").data["tokenizer"] == {
        "name": "toy-vae", "latent_channels": 8, "downsample": 4}
