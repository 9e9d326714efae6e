"""The plugin host and registry: entry points, failures recorded per plugin, strict mode, selection, duplicates."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from repae import hookimpl, option
from repae.errors import DuplicateComponentError, PluginError, UnknownComponentError
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "Bad Name"}, "lower-case"),
        ({"summary": ""}, "summary"),
        ({"config": dict}, "dataclass"),
        ({"factory": "no_colon"}, "module:function"),
        ({"presets": {"a": {"nope": 1}}, "preset_field": "width"}, "unknown field"),
        ({"presets": {"a": {"width": 1}}}, "preset_field"),
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


def test_duplicate_names_both_providers_and_blocks_the_name(fake_dists):
    fake_dists.add("dist-a", {"a": "plug_a"}, modules={"plug_a": GOOD.replace("{name}", "same")})
    fake_dists.add("dist-b", {"b": "plug_b"}, modules={"plug_b": GOOD.replace("{name}", "same")})
    host = load_plugins(select={"a", "b"})
    assert "dist-a" in host.failures[0].error and "dist-b" in host.failures[0].error
    with pytest.raises(DuplicateComponentError, match=r"'a' \(dist-a 1.0\) and plugin 'b' \(dist-b 1.0\)"):
        host.registry.get("encoder", "same")
    # disabling one provider resolves it
    host = load_plugins(select={"a", "b"}, disable={"b"})
    assert host.registry.get("encoder", "same").plugin.name == "a"


def test_duplicate_in_strict_mode_raises(fake_dists):
    fake_dists.add("dist-a", {"a": "plug_a"}, modules={"plug_a": GOOD.replace("{name}", "same")})
    fake_dists.add("dist-b", {"b": "plug_b"}, modules={"plug_b": GOOD.replace("{name}", "same")})
    with pytest.raises(PluginError, match="registered twice"):
        load_plugins(select={"a", "b"}, strict=True)


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
