"""Pieces the benchmark scripts share: CPU accounting from /proc, local clusters, and when a
cluster is ready to be measured.

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


def every_voter_caught_up(leader_status: dict) -> bool:
    """Whether every voter has acknowledged the leader's whole log, from a leader's status (the
    kernel's, or ``GET /v1/status``): a benchmark that starts measuring before that charges a
    late follower's catch-up to the writes it measures."""
    progress = leader_status.get("progress") or {}
    return leader_status.get("role") == "leader" and all(
        progress.get(v, {}).get("match", 0) >= leader_status.get("last_index", 0)
        for v in leader_status.get("voters", ()) if v != leader_status.get("id"))


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
