"""Tests for bwcore.plugins: discovery by entry point, settings, validation, tracing."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bwcore.config import ConfigError, NodeConfig, config_from_dict
from bwcore.hookspecs import hookimpl
from bwcore.plugins import PluginHost, plugin_names, validate_settings

# -- plugin classes the fake entry points below point at ------------------------------------


class FakeStorage:
    settings_defaults: dict[str, Any] = {"url": ""}

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    @hookimpl
    def bwraft_open_storage(self, config: NodeConfig) -> str:
        return f"default-storage:{self.settings['url']}"


class FakeKV:
    settings_defaults: dict[str, Any] = {"dedup_window": 100, "ratio": 0.5, "tag": None,
                                         "strict": False}

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    @hookimpl
    def bwraft_create_state_machine(self, config: NodeConfig) -> str:
        return "kv-machine"


class OtherStorage:
    settings_defaults: dict[str, Any] = {}

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    @hookimpl
    def bwraft_open_storage(self, config: NodeConfig) -> str:
        return "other-storage"


class ObserverRole:
    settings_defaults: dict[str, Any] = {}

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    @hookimpl
    def bwraft_role_service(self, node: Any) -> str:
        return "observer-service"


class MisspelledHook:
    settings_defaults: dict[str, Any] = {}

    def __init__(self, settings: dict[str, Any]) -> None:
        pass

    @hookimpl
    def bwraft_aplied(self, node: Any, index: int) -> None:
        """Misspelled: no such hook."""


class WrongArguments:
    settings_defaults: dict[str, Any] = {}

    def __init__(self, settings: dict[str, Any]) -> None:
        pass

    @hookimpl
    def bwraft_applied(self, node: Any, index: int, extra: int) -> None:
        """Asks for an argument the hook does not pass."""


class RefusesSettings:
    settings_defaults: dict[str, Any] = {"every": 10}

    def __init__(self, settings: dict[str, Any]) -> None:
        if settings["every"] <= 0:
            raise ValueError("every must be positive")


class RoutesA:
    settings_defaults: dict[str, Any] = {}

    def __init__(self, settings: dict[str, Any]) -> None:
        pass

    @hookimpl
    def bwraft_http_resources(self, node: Any) -> dict[str, str]:
        return {"a": "resource-a", "shared": "from-a"}


class RoutesB(RoutesA):
    @hookimpl
    def bwraft_http_resources(self, node: Any) -> dict[str, str]:
        return {"b": "resource-b"}


class RoutesClash(RoutesA):
    @hookimpl
    def bwraft_http_resources(self, node: Any) -> dict[str, str]:
        return {"shared": "from-clash"}


def ep(name: str, attr: str) -> EntryPoint:
    return EntryPoint(name=name, value=f"{__name__}:{attr}", group="bwraft")


class NoHooks:
    """Stands for a default plugin whose hooks these tests do not need."""

    def __init__(self, settings: dict) -> None:
        self.settings = settings


OPS_DEFAULTS = ("compaction", "leadership-transfer", "membership")
DEFAULTS = [ep("sql-storage", "FakeStorage"), ep("kv", "FakeKV"),
            *(ep(name, "NoHooks") for name in OPS_DEFAULTS)]


def make_config(**extra: Any) -> NodeConfig:
    raw = {"id": "n1", "addresses": {"raft": "127.0.0.1:0", "api": "127.0.0.1:0"}, **extra}
    return config_from_dict(raw, source="node.toml")


# -- tests ------------------------------------------------------------------------------------


def test_defaults_are_loaded_through_entry_points() -> None:
    """A plain voter gets the default storage and state machine plugins, with defaults."""
    host = PluginHost.from_config(make_config(), entry_points=DEFAULTS)
    assert list(host.plugins) == ["sql-storage", "kv", *OPS_DEFAULTS]
    assert host.plugins["kv"].settings == {"dedup_window": 100, "ratio": 0.5, "tag": None,
                                           "strict": False}
    assert host.hook.bwraft_open_storage(config=None) == "default-storage:"
    assert host.hook.bwraft_create_state_machine(config=None) == "kv-machine"


def test_third_party_plugin_from_an_installed_distribution(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution declaring a `bwraft` entry point is found and loaded like a built-in."""
    (tmp_path / "fancy_bwraft_plugin.py").write_text(textwrap.dedent("""
        from bwcore.hookspecs import hookimpl

        class FancyPlugin:
            settings_defaults = {"every": 1000}

            def __init__(self, settings):
                self.settings = settings

            @hookimpl
            def bwraft_should_snapshot(self, node, applied_index, log_entries, log_bytes):
                return log_entries >= self.settings["every"]
    """))
    dist_info = tmp_path / "fancy_bwraft_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-bwraft-plugin\n"
                                        "Version: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[bwraft]\nfancy = fancy_bwraft_plugin:FancyPlugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    host = PluginHost.from_config(make_config(plugins={"fancy": {"every": 5}}))

    assert list(host.plugins) == ["sql-storage", "kv", *OPS_DEFAULTS, "fancy"]
    assert type(host.plugins["fancy"]).__name__ == "FancyPlugin"
    assert host.plugins["fancy"].settings == {"every": 5}
    assert host.hook.bwraft_should_snapshot(node=None, applied_index=9, log_entries=5,
                                            log_bytes=0) is True
    assert host.hook.bwraft_should_snapshot(node=None, applied_index=9, log_entries=4,
                                            log_bytes=0) is False


def test_missing_plugin_names_file_and_installed_ones() -> None:
    config = make_config(plugins={"secretary": {}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config, entry_points=DEFAULTS)
    assert str(info.value) == ("plugin 'secretary' named in node.toml is not installed"
                               " (installed: compaction, kv, leadership-transfer, membership,"
                               " sql-storage)")


def test_missing_default_plugin_is_explained() -> None:
    with pytest.raises(ConfigError, match=r"plugin 'kv' \(a default plugin of every node\) is"
                                          r" not installed \(installed: sql-storage\)"):
        PluginHost.from_config(make_config(), entry_points=DEFAULTS[:1])


def test_role_plugin_is_loaded_for_a_non_voter() -> None:
    """role = "observer" loads the plugin named observer without a [plugins] table."""
    config = make_config(role="observer")
    assert plugin_names(config) == ["sql-storage", "kv", *OPS_DEFAULTS, "observer"]
    host = PluginHost.from_config(config, entry_points=DEFAULTS + [ep("observer",
                                                                      "ObserverRole")])
    assert host.hook.bwraft_role_service(node=None) == "observer-service"
    with pytest.raises(ConfigError, match=r"plugin 'observer' \(providing role 'observer' set"
                                          r" in node.toml\) is not installed"):
        PluginHost.from_config(config, entry_points=DEFAULTS)


def test_plugin_named_in_config_wins_firstresult_over_default() -> None:
    """Plugins named in the config register after the defaults, so pluggy asks them first."""
    host = PluginHost.from_config(make_config(plugins={"other-storage": {}}),
                                  entry_points=DEFAULTS + [ep("other-storage", "OtherStorage")])
    assert host.hook.bwraft_open_storage(config=None) == "other-storage"


def test_settings_from_config_override_defaults() -> None:
    config = make_config(plugins={"kv": {"dedup_window": 7, "ratio": 2, "tag": [1]},
                                  "sql-storage": {"url": "sqlite://"}})
    host = PluginHost.from_config(config, entry_points=DEFAULTS)
    assert host.plugins["kv"].settings == {"dedup_window": 7, "ratio": 2, "tag": [1],
                                           "strict": False}
    assert host.hook.bwraft_open_storage(config=None) == "default-storage:sqlite://"


@pytest.mark.parametrize("settings, message", [
    ({"dedup": 1}, "node.toml: plugins.kv.dedup: unknown setting for plugin 'kv' (known:"
                   " dedup_window, ratio, strict, tag)"),
    ({"dedup_window": "10"}, "node.toml: plugins.kv.dedup_window: expected int, got str '10'"),
    ({"dedup_window": True}, "node.toml: plugins.kv.dedup_window: expected int, got bool True"),
    ({"strict": 1}, "node.toml: plugins.kv.strict: expected bool, got int 1"),
    ({"ratio": "x"}, "node.toml: plugins.kv.ratio: expected float, got str 'x'"),
])
def test_bad_settings_name_plugin_and_key(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(make_config(plugins={"kv": settings}), entry_points=DEFAULTS)
    assert str(info.value) == message


def test_plugin_constructor_errors_become_config_errors() -> None:
    config = make_config(plugins={"refuses": {"every": 0}})
    with pytest.raises(ConfigError, match=r"^node.toml: plugins.refuses: ValueError: every must"
                                          r" be positive$"):
        PluginHost.from_config(config, entry_points=DEFAULTS + [ep("refuses",
                                                                   "RefusesSettings")])


def test_plugin_that_fails_to_import() -> None:
    broken = EntryPoint(name="broken", value="no_such_module_anywhere:Plugin", group="bwraft")
    with pytest.raises(ConfigError, match=r"plugin 'broken' \(no_such_module_anywhere:Plugin\)"
                                          r" failed to import: ModuleNotFoundError"):
        PluginHost.from_config(make_config(plugins={"broken": {}}),
                               entry_points=DEFAULTS + [broken])


def test_check_pending_catches_misspelled_hook() -> None:
    """A @hookimpl named like no hook stops the node instead of never being called."""
    config = make_config(plugins={"typo": {}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config, entry_points=DEFAULTS + [ep("typo", "MisspelledHook")])
    assert "plugin 'typo'" in str(info.value) and "bwraft_aplied" in str(info.value)


def test_hookimpl_with_unknown_argument_is_rejected() -> None:
    config = make_config(plugins={"wrong": {}})
    with pytest.raises(ConfigError) as info:
        PluginHost.from_config(config, entry_points=DEFAULTS + [ep("wrong", "WrongArguments")])
    assert "plugin 'wrong'" in str(info.value) and "extra" in str(info.value)


def test_conflicting_entry_points_with_one_name() -> None:
    with pytest.raises(ConfigError, match="two installed plugins are named 'kv'"):
        PluginHost.from_config(make_config(), entry_points=DEFAULTS + [ep("kv", "OtherStorage")])


def test_tracing_logs_hook_calls() -> None:
    """BWRAFT_PLUGINS_TRACE=1 writes pluggy's trace of each hook call to the log."""
    with capture_logs() as logs:
        host = PluginHost.from_config(make_config(), entry_points=DEFAULTS,
                                      environ={"BWRAFT_PLUGINS_TRACE": "1"})
        host.hook.bwraft_create_state_machine(config="cfg")
    traces = [e["line"] for e in logs if e["event"] == "hook_trace"]
    assert any("bwraft_create_state_machine" in line for line in traces), traces
    with capture_logs() as logs:
        host = PluginHost.from_config(make_config(), entry_points=DEFAULTS, environ={})
        host.hook.bwraft_create_state_machine(config="cfg")
    assert not [e for e in logs if e["event"] == "hook_trace"]


def test_http_resources_are_merged_and_clashes_refused() -> None:
    host = PluginHost(make_config())
    host.register(RoutesA({}), "a")
    host.register(RoutesB({}), "b")
    assert host.http_resources(node=None) == {"a": "resource-a", "shared": "from-a",
                                              "b": "resource-b"}
    host.register(RoutesClash({}), "clash")
    with pytest.raises(ConfigError, match="two plugins serve the HTTP path /shared"):
        host.http_resources(node=None)


def test_registering_one_name_twice_is_refused() -> None:
    host = PluginHost(make_config())
    host.register(RoutesA({}), "a")
    with pytest.raises(ConfigError, match="plugin 'a' is registered twice"):
        host.register(RoutesB({}), "a")


def test_validate_settings_without_declared_settings() -> None:
    assert validate_settings("p", {}, {}) == {}
    with pytest.raises(ConfigError, match=r"plugins.p.x: unknown setting for plugin 'p'"
                                          r" \(known: none\)"):
        validate_settings("p", {}, {"x": 1})
