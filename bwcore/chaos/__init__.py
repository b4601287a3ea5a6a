"""``bwraft chaos``: fault injection against a real local cluster, checked for linearizability.

Like Jepsen against etcd, but against processes on this machine: clients run random KV
operations while a nemesis kills, pauses and partitions nodes (and replaces helpers); the
recorded history is then checked for linearizability and for lost acknowledged writes.
See docs/chaos.md.

Modules: :mod:`~bwcore.chaos.clients` (operations and their outcomes),
:mod:`~bwcore.chaos.nemesis` (faults), :mod:`~bwcore.chaos.setup` (the cluster),
:mod:`~bwcore.chaos.report` (verdict, lost writes, availability), :mod:`~bwcore.chaos.runner`
(one run from start to files).
"""

from __future__ import annotations

from bwcore.chaos.clients import ClientSettings
from bwcore.chaos.nemesis import FAULT_KINDS
from bwcore.chaos.runner import (EXIT_FAILED, EXIT_OK, EXIT_VIOLATION, ChaosError,
                                 ChaosOptions, check_file, run_chaos)

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_VIOLATION", "FAULT_KINDS", "ChaosError",
           "ChaosOptions", "ClientSettings", "check_file", "run_chaos"]
