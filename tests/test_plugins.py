"""The plugin host and registry: entry points, failures recorded per plugin, strict mode, selection, duplicates."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from repae import hookimpl, option
from repae.errors import PluginError, UnknownComponentError
from repae.plugins import PluginHost, load_plugins

GOOD = '''
from dataclasses import dataclass
from repae import hookimpl, option

@dataclass(kw_only=True)
class Cfg:
    width: int = option(4, doc="width")

@hookimpl
def register_components(register):
    register("encoder", "{name}", summary="an encoder", config=Cfg, factory="builtins:dict")
'''


@dataclass(kw_only=True)
class Cfg:
    width: int = option(4, doc="width")


class InProcess:
    @hookimpl
    def register_components(self, register):
        register("denoiser", "in-proc", summary="registered in-process", config=Cfg, factory=lambda c, ctx: c)


def test_builtins_are_entry_points_of_the_repae_distribution():
    host = load_plugins()
    assert host.failures == []
    assert {p.info.distribution for p in host.plugins.values()} == {"repae"}
    assert "repae-vae" in host.plugins


def test_failing_import_is_recorded_and_others_keep_working(fake_dists, monkeypatch):
    fake_dists.add("broken-dist", {"broken": "broken_plugin"}, modules={"broken_plugin": "raise RuntimeError('boom')"})
    fake_dists.add("good-dist", {"good": "good_plugin"}, modules={"good_plugin": GOOD.replace("{name}", "good-enc")})
    host = load_plugins(select={"broken", "good"})
    assert [(f.name, f.distribution, f.stage) for f in host.failures] == [("broken", "broken-dist", "import")]
    assert "RuntimeError: boom" in host.failures[0].error
    assert host.registry.get("encoder", "good-enc").plugin.distribution == "good-dist"


def test_strict_mode_turns_failures_into_errors(fake_dists, monkeypatch):
    fake_dists.add("broken-dist", {"broken": "broken_plugin"}, modules={"broken_plugin": "import not_a_module_xyz"})
    monkeypatch.setenv("REPAE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken.*not_a_module_xyz"):
        load_plugins(select={"broken"})


def test_misspelled_hook_is_an_error_with_a_suggestion(fake_dists):
    code = GOOD.replace("def register_components", "def register_component").replace("{name}", "x")
    fake_dists.add("typo-dist", {"typo": "typo_plugin"}, modules={"typo_plugin": code})
    host = load_plugins(select={"typo"})
    (failure,) = host.failures
    assert failure.stage == "hooks"
    assert "'register_component' is not a repae hook" in failure.error
    assert "register_components" in failure.error
    assert "typo" not in host.plugins


def test_hook_with_unknown_argument_is_rejected():
    class BadArgs:
        @hookimpl
        def register_components(self, register, colour):
            pass

    host = PluginHost()
    assert host.add_plugin(BadArgs(), "bad-args") is None
    assert host.failures[0].stage == "hooks" and "colour" in host.failures[0].error


def test_register_errors_roll_back_the_whole_plugin():
    class HalfBroken:
        @hookimpl
        def register_components(self, register):
            register("encoder", "fine", summary="ok", config=Cfg, factory="x:y")
            register("encoders", "wrong-kind", summary="typo in kind", config=Cfg, factory="x:y")

    host = PluginHost()
    assert host.add_plugin(HalfBroken(), "half") is None
    (failure,) = host.failures
    assert failure.stage == "register" and "Did you mean 'encoder'" in failure.error
    assert len(host.registry) == 0


@dataclass(kw_only=True)
class WrongDefault:
    depth: int = option(2.5, doc="a float default for an int field")  # type: ignore[assignment]


@dataclass(kw_only=True)
class SetField:
    ids: set[int] = option(default_factory=set, doc="sets are not a recipe type")


@dataclass(kw_only=True)
class Sized:
    size: str = option("big", doc="preset")
    width: int = option(4, doc="width")


@dataclass(kw_only=True)
class RejectsItsDefault:
    width: int = option(0, doc="width")

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError("width must be >= 1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"config": WrongDefault}, "its default 2.5 is not int"),
        ({"config": SetField}, "set[int] is not a supported config type"),
        ({"config": Sized, "presets": {"small": {"width": 1}}}, "default size 'big' is not one of its presets"),
        ({"config": Sized, "presets": {"big": {"width": "wide"}}}, "preset 'big' sets width to 'wide'"),
        ({"config": RejectsItsDefault}, "its default values fail its own checks: width must be >= 1"),
    ],
)
def test_config_classes_are_checked_at_registration(kwargs, message):
    """The measured bug: a wrong-typed default passed registration, `show` and `validate`, then failed in the build."""
    args = {"name": "ok", "summary": "s", "factory": "m:f", **kwargs}

    class Plugin:
        @hookimpl
        def register_components(self, register):
            register("encoder", args.pop("name"), **args)

    host = PluginHost()
    assert host.add_plugin(Plugin(), "p") is None
    assert message in host.failures[0].error and host.failures[0].stage == "register"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "Bad Name"}, "lower-case"),
        ({"summary": ""}, "summary"),
        ({"config": dict}, "dataclass"),
        ({"factory": "no_colon"}, "module:function"),
        ({"presets": {"a": {"nope": 1}}}, "no field 'size'"),
        ({"presets": {"a": {"width": 1}}}, "no field 'size'"),
    ],
)
def test_invalid_registrations_are_explained(kwargs, message):
    args = {"name": "ok", "summary": "s", "config": Cfg, "factory": "m:f", **kwargs}

    class Plugin:
        @hookimpl
        def register_components(self, register):
            register("encoder", args.pop("name"), **args)

    host = PluginHost()
    host.add_plugin(Plugin(), "p")
    assert message in host.failures[0].error


def test_a_name_clash_keeps_the_first_plugin_and_reaches_the_other_by_qualified_name(fake_dists):
    import os
    import time

    fake_dists.add("dist-a", {"a": "plug_a"}, modules={"plug_a": GOOD.replace("{name}", "same")})
    fake_dists.add("dist-b", {"b": "plug_b"}, modules={"plug_b": GOOD.replace("{name}", "same")})
    now = time.time()  # dist-b was installed first: it keeps the plain name
    os.utime(fake_dists.root / "dist_a-1.0.dist-info", (now, now))
    os.utime(fake_dists.root / "dist_b-1.0.dist-info", (now - 60, now - 60))
    host = load_plugins(select={"a", "b"})
    assert host.failures == []
    (clash,) = host.clashes
    assert clash.winner.plugin.distribution == "dist-b" and [e.plugin.name for e in clash.others] == ["a"]
    assert "'dist-a:same'" in str(clash) and "keep using" in str(clash)
    assert host.registry.get("encoder", "same").plugin.name == "b"
    assert host.registry.get("encoder", "dist-a:same").plugin.name == "a"
    assert host.registry.get("encoder", "a:same").plugin.name == "a"  # the plugin (entry-point) name works too
    assert host.registry.get("encoder", "dist-b:same").plugin.name == "b"
    assert "dist-a:same" in host.registry.names("encoder")
    with pytest.raises(UnknownComponentError, match="dist-a:same"):
        host.registry.get("encoder", "dist-c:same")
    # strict mode does not turn a clash into an error: nothing failed
    assert load_plugins(select={"a", "b"}, strict=True).registry.get("encoder", "same").plugin.name == "b"
    # disabling one provider leaves a plain name again
    host = load_plugins(select={"a", "b"}, disable={"b"})
    assert host.clashes == [] and host.registry.get("encoder", "same").plugin.name == "a"


def test_installing_a_plugin_that_reuses_a_builtin_name_breaks_no_recipe(fake_dists, monkeypatch, tmp_path):
    """The measured bug: a third-party `sd-vae` made the built-in unusable and the stock quickstart failed."""
    from repae.recipe import read_recipe

    from conftest import ROOT

    clash = GOOD.replace('"encoder", "{name}"', '"tokenizer", "sd-vae"')
    fake_dists.add("acme-vae", {"acme": "acme_vae_plugin"}, modules={"acme_vae_plugin": clash})
    host = load_plugins(select={"repae", "acme"})
    assert host.failures == []
    (clash_info,) = [c for c in host.clashes if c.name == "sd-vae"]
    assert clash_info.winner.plugin.distribution == "repae" and clash_info.others[0].plugin.name == "acme"
    resolved = read_recipe(ROOT / "recipes" / "quickstart.yaml", [], host.registry)
    assert resolved.get("tokenizer")[0].entry.plugin.distribution == "repae"
    theirs = read_recipe(ROOT / "recipes" / "quickstart.yaml", ["tokenizer={name: acme-vae:sd-vae}"], host.registry)
    spec = theirs.get("tokenizer")[0]
    assert spec.entry.plugin.name == "acme" and spec.name == "acme-vae:sd-vae"
    assert "name: acme-vae:sd-vae" in theirs.to_yaml()


def test_selection_and_disabling_through_the_environment(fake_dists, monkeypatch):
    fake_dists.add("good-dist", {"good": "good_plugin"}, modules={"good_plugin": GOOD.replace("{name}", "good-enc")})
    monkeypatch.setenv("REPAE_PLUGINS", "")
    assert load_plugins().plugins == {}
    monkeypatch.setenv("REPAE_PLUGINS", "good")
    assert list(load_plugins().plugins) == ["good"]
    monkeypatch.setenv("REPAE_PLUGINS", "good-dist,repae")
    monkeypatch.setenv("REPAE_DISABLE_PLUGINS", "repae")
    assert list(load_plugins().plugins) == ["good"]
    monkeypatch.setenv("REPAE_PLUGINS", "god")
    monkeypatch.delenv("REPAE_DISABLE_PLUGINS")
    (failure,) = load_plugins().failures
    assert "no installed plugin" in failure.error and "'good'" in failure.error


def test_in_process_plugins_register_and_unregister():
    host = load_plugins(select=set())
    plugin = InProcess()
    try:
        host.add_plugin(plugin, "in-process-test")
        assert host.registry.get("denoiser", "in-proc").plugin.label == "in-process-test"
    finally:
        host.remove_plugin("in-process-test")
    assert len(host.registry) == 0 and host.pm.get_plugin("in-process-test") is None


def test_unknown_name_suggests_closest_and_the_list_command():
    host = PluginHost()
    host.add_plugin(InProcess(), "p")
    with pytest.raises(UnknownComponentError) as info:
        host.registry.get("denoiser", "in-prc")
    assert "Did you mean 'in-proc'" in str(info.value) and "repae list denoiser" in str(info.value)


def test_lazy_factory_import_errors_name_the_component():
    class Lazy:
        @hookimpl
        def register_components(self, register):
            register("encoder", "lazy", summary="s", config=Cfg, factory="repae_no_such_module:build")

    host = PluginHost()
    host.add_plugin(Lazy(), "lazy-plugin")
    entry = host.registry.get("encoder", "lazy")
    with pytest.raises(PluginError, match="encoder 'lazy' .*lazy-plugin.*ModuleNotFoundError"):
        entry.load_factory()
