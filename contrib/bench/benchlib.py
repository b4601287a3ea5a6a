"""Pieces the benchmark scripts share: CPU accounting from /proc and local clusters.

The scripts run as ``python contrib/bench/<script>.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from bwcore import cluster as local


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/<pid>/stat (fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (wrk runs), user + system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_cluster(folder: Path, tick_ms: int, *, observers: int = 0
                  ) -> tuple[local.Cluster, str]:
    """Three voters (and ``observers``) as twistd processes in ``folder``; returns the
    cluster and its leader once elected."""
    cluster = local.plan(folder, voters=3, observers=observers, tick_ms=tick_ms)
    cluster.dir.mkdir(parents=True)
    local.write_files(cluster)
    for node_id in cluster.nodes:
        local.start_node(cluster, node_id)
    leader = local.wait_for_leader(cluster, 60.0, among=list(cluster.nodes))
    return cluster, leader


def stop_cluster(cluster: local.Cluster) -> None:
    """SIGTERM every node, SIGKILL what is left after a grace period."""
    local.down(cluster, grace=10.0)
