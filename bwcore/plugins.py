"""The plugin host: which plugins a node loads, with which settings, through which path.

Built-in plugins (``sql-storage``, ``kv``, the helper roles) and third-party ones are found the
same way: as entry points of the group ``bwraft`` (declared in setup.cfg for the built-ins). A
node loads the defaults, every plugin named by a table under ``[plugins]`` in its config, and
the plugin named like its role when the role is not ``voter``. Plugins registered later win
firstresult hooks, so a plugin named in the config overrides a default.

Set ``BWRAFT_PLUGINS_TRACE=1`` in the environment to log every hook call.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from bwcore import hookspecs
from bwcore.config import NodeConfig
from bwcore.errors import ConfigError
from bwcore.logs import get_logger

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "PluginHost", "validate_settings"]

ENTRY_POINT_GROUP = "bwraft"
#: Loaded on every node, before the plugins its config names.
DEFAULT_PLUGINS = ("sql-storage", "kv", "compaction", "leadership-transfer", "membership")
TRACE_ENV = "BWRAFT_PLUGINS_TRACE"


class PluginHost:
    """A pluggy ``PluginManager`` holding one node's plugin instances.

    Attributes:
        pm: The plugin manager (project ``bwraft``) with :mod:`bwcore.hookspecs` added.
        hook: ``pm.hook``: call hooks as ``host.hook.bwraft_xxx(**kwargs)``.
        plugins: Plugin name -> registered instance, in registration order.
        config: The node configuration the plugins were chosen from (None if built empty).
    """

    def __init__(self, config: NodeConfig | None = None, *,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.hook = self.pm.hook
        self.plugins: dict[str, Any] = {}
        self._log = get_logger(node_id=config.id if config else None).bind(
            logger="bwcore.plugins")
        environ = os.environ if environ is None else environ
        if environ.get(TRACE_ENV, "") not in ("", "0"):
            self.pm.trace.root.setwriter(self._trace)
            self.pm.enable_tracing()

    @classmethod
    def from_config(cls, config: NodeConfig, *,
                    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
                    environ: Mapping[str, str] | None = None) -> PluginHost:
        """Load, configure and register every plugin ``config`` asks for.

        Args:
            config: The node's configuration.
            entry_points: The ``bwraft`` entry points to choose from (default: those of the
                installed distributions).
            environ: Environment to read ``BWRAFT_PLUGINS_TRACE`` from (default os.environ).

        Raises:
            ConfigError: A plugin is not installed, fails to import or to initialise, is
                given settings it does not declare or of the wrong type, or implements a hook
                that does not exist.
        """
        host = cls(config, environ=environ)
        available = _index(entry_points if entry_points is not None
                           else importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        for name in plugin_names(config):
            if name not in available:
                installed = ", ".join(sorted(available)) or "none"
                raise ConfigError(f"plugin {name!r} {_why_loaded(name, config)} is not"
                                  f" installed (installed: {installed})")
            host.load(name, available[name], config.plugins.get(name, {}))
        host.check_pending()
        return host

    def load(self, name: str, entry_point: importlib.metadata.EntryPoint,
             settings: Mapping[str, Any]) -> Any:
        """Import one entry point, instantiate its class with validated settings, register it."""
        try:
            plugin_class = entry_point.load()
        except Exception as exc:
            raise ConfigError(f"{_where(self.config)}: plugin {name!r} ({entry_point.value})"
                              f" failed to import: {type(exc).__name__}: {exc}") from exc
        defaults = getattr(plugin_class, "settings_defaults", {})
        merged = validate_settings(name, defaults, settings, where=_where(self.config))
        try:
            instance = plugin_class(merged)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{_where(self.config)}: plugins.{name}: {type(exc).__name__}:"
                              f" {exc}") from exc
        return self.register(instance, name)

    def register(self, plugin: Any, name: str) -> Any:
        """Register a plugin instance under ``name`` (also for plugins built in code)."""
        if name in self.plugins:
            raise ConfigError(f"{_where(self.config)}: plugin {name!r} is registered twice")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"{_where(self.config)}: plugin {name!r}: {exc}") from exc
        self.plugins[name] = plugin
        self._log.debug("plugin_registered", plugin=name, cls=type(plugin).__qualname__)
        return plugin

    def check_pending(self) -> None:
        """Fail on any ``@hookimpl`` whose name matches no hook (a misspelled hook name)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or type(exc.plugin).__name__
            raise ConfigError(f"{_where(self.config)}: plugin {name!r}: {exc}") from exc

    def http_resources(self, node: Any) -> dict[str, Any]:
        """Merge every plugin's :func:`~bwcore.hookspecs.bwraft_http_resources` answer.

        Raises:
            ConfigError: Two plugins claim the same path segment.
        """
        merged: dict[str, Any] = {}
        for answer in self.hook.bwraft_http_resources(node=node):
            for segment, resource in (answer or {}).items():
                if segment in merged:
                    raise ConfigError(f"{_where(self.config)}: two plugins serve the HTTP path"
                                      f" /{segment}")
                merged[segment] = resource
        return merged

    def _trace(self, line: str) -> None:
        self._log.info("hook_trace", line=line.rstrip("\n"))


def plugin_names(config: NodeConfig) -> list[str]:
    """The plugins ``config`` loads, in registration order, without duplicates."""
    names = list(DEFAULT_PLUGINS)
    names.extend(config.plugins)
    if not config.is_voter:
        names.append(config.role)
    return list(dict.fromkeys(names))


def validate_settings(plugin: str, defaults: Mapping[str, Any], settings: Mapping[str, Any],
                      *, where: str = "<config>") -> dict[str, Any]:
    """Check ``settings`` against a plugin's ``settings_defaults`` and merge them.

    A setting must be declared, and must have the type of its default: an int default
    accepts only ints (not booleans), a float default accepts ints and floats, a None
    default accepts anything.

    Raises:
        ConfigError: Naming the plugin and the key.
    """
    merged = dict(defaults)
    for key, value in settings.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"{where}: plugins.{plugin}.{key}: unknown setting for plugin"
                              f" {plugin!r} (known: {known})")
        expected = defaults[key]
        if not _same_kind(expected, value):
            raise ConfigError(f"{where}: plugins.{plugin}.{key}: expected"
                              f" {type(expected).__name__}, got {type(value).__name__}"
                              f" {value!r}")
        merged[key] = value
    return merged


def _same_kind(default: Any, value: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _index(entry_points: Iterable[importlib.metadata.EntryPoint]
           ) -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in entry_points:
        if ep.group != ENTRY_POINT_GROUP:
            continue
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise ConfigError(f"two installed plugins are named {ep.name!r}: {previous.value}"
                              f" and {ep.value}")
        found[ep.name] = ep
    return found


def _why_loaded(name: str, config: NodeConfig) -> str:
    if name in config.plugins:
        return f"named in {_where(config)}"
    if name == config.role:
        return f"(providing role {name!r} set in {_where(config)})"
    return "(a default plugin of every node)"


def _where(config: NodeConfig | None) -> str:
    return str(config.source) if config is not None and config.source else "<config>"
