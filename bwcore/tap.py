"""``twistd bwraft``: options and service construction for one node process.

``twistd -n bwraft --config node.toml`` runs the node in the foreground. Everything that can
be wrong with the configuration (the file, its keys, the plugins it names and their settings)
is checked while the options are parsed, so twistd reports it as a usage error and exits
non-zero before anything starts. A node that halts later (its storage failed, it could not
load its state) stops the process with exit status 1, so a supervisor can restart it.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from bwcore.config import NodeConfig, load_config
from bwcore.errors import ConfigError
from bwcore.logs import configure_logging, get_logger
from bwcore.node import RaftNode
from bwcore.plugins import PluginHost

__all__ = ["Options", "makeService"]

#: Exit status of a process whose node halted.
HALT_EXIT_STATUS = 1
#: Cyclic-GC thresholds of a node process (CPython's default is (700, 10, 10)).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Run CPython's cyclic garbage collector less often in a node process.

    A busy leader allocates a few dozen objects per write (entries, messages, Deferreds),
    nearly all freed by reference counting, and holds its whole uncompacted log: with the
    default thresholds the collector ran hundreds of times a second and took about a fifth
    of the leader's CPU (docs/benchmarks.md, "Node: durable writes"). Garbage with cycles
    still gets collected, after 50,000 allocations instead of 700.
    """
    gc.set_threshold(*GC_THRESHOLDS)


class Options(usage.Options):
    """Command-line options of ``twistd bwraft``."""

    synopsis = "--config FILE"
    longdesc = ("Run one bwraft node. Everything about the node is in its TOML config file;"
                " see docs/configuration.md.")
    optParameters = [["config", "c", None, "The node's TOML config file (required)."]]

    def __init__(self) -> None:
        super().__init__()
        self.node_config: NodeConfig | None = None
        self.plugin_host: PluginHost | None = None

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self.node_config = load_config(self["config"])
            configure_logging(self.node_config.log.level, self.node_config.log.format)
            self.plugin_host = PluginHost.from_config(self.node_config)
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None


def makeService(options: Options) -> IService:
    """Build the node process: the Raft node and, when available, its HTTP API."""
    from twisted.internet import reactor

    config, host = options.node_config, options.plugin_host
    if config is None or host is None:  # called without parseOptions (embedding, tests)
        options.postOptions()
        config, host = options.node_config, options.plugin_host
    assert config is not None and host is not None
    tune_gc()
    log = get_logger(node_id=config.id)
    top = MultiService()
    node = RaftNode(config, host, reactor, on_fatal=_StopProcess(reactor, config))
    node.setServiceParent(top)
    try:
        from bwcore.api import make_api_service
    except ImportError:
        log.warning("api_unavailable", reason="bwcore.api is not installed")
    else:
        make_api_service(node).setServiceParent(top)
    return top


class _StopProcess:
    """On a halt: say why on stderr, stop the reactor, and exit non-zero once twistd is done."""

    def __init__(self, reactor: Any, config: NodeConfig) -> None:
        self._reactor = reactor
        self._config = config
        self._armed = False

    def __call__(self, reason: str) -> None:
        print(f"bwraft: node {self._config.id} ({self._config.source}) halted: {reason}",
              file=sys.__stderr__, flush=True)
        if not self._armed:
            self._armed = True
            # twistd has no exit status of its own: let it shut down cleanly (stop services,
            # remove the pid file), then leave with ours from the interpreter's exit hooks.
            atexit.register(_exit_with, HALT_EXIT_STATUS)
        self._reactor.callWhenRunning(self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:  # already shutting down
            pass


def _exit_with(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
