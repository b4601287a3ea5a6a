"""Pieces the benchmark scripts share: CPU accounting from /proc, local clusters, and when a
cluster is ready to be measured.

The scripts run as ``python contrib/bench/<script>.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

from bwcore import cluster as local


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/<pid>/stat (fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def pinned(leader_cpu: int | None, *, leader: bool) -> Iterator[None]:
    """With a ``--leader-cpu``: processes started inside run on that CPU alone (``leader``) or
    on every CPU but that one (a child inherits the starting thread's CPUs); this thread's
    CPUs are restored afterwards. Without one (None), nothing changes."""
    if leader_cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    everyone = set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, {leader_cpu} if leader else everyone - {leader_cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_times() -> dict[int, tuple[int, int]]:
    """CPU number -> (all, idle + iowait) jiffies since boot, from /proc/stat."""
    out = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(x) for x in fields[:8]]
                out[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])
    return out


def busy_percent(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
                 cpus: set[int]) -> int:
    """How busy ``cpus`` were (%) between two :func:`cpu_times` readings."""
    total = sum(after[c][0] - before[c][0] for c in cpus)
    idle = sum(after[c][1] - before[c][1] for c in cpus)
    return round(100 * (total - idle) / max(1, total))


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
