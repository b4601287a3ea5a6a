"""Concurrent clients against a real cluster under faults; the history must be linearizable.

Several clients run random puts, linearizable gets, cas and deletes on a few keys through
random nodes while the leader is SIGKILLed, restarted, and a follower is paused (SIGSTOP) and
resumed. Every operation is recorded with its call and return time and checked with the
porcupine-style checker in bwcore.linearizability (PROTOCOL.md invariant 7).
"""

from __future__ import annotations

import threading
from typing import Callable

import pytest

from bwcore import cluster as local
from bwcore.linearizability import Operation, check_history, render_window
from tests.integration.support import CLIENTS, history_client, wait_for

pytestmark = pytest.mark.integration


def test_history_under_leader_kill_and_pause_is_linearizable(
        start_cluster: Callable[..., local.Cluster]) -> None:
    """Writes and reads during failover, restart and a paused follower linearize."""
    cluster = start_cluster(voters=3)
    stop, lock = threading.Event(), threading.Lock()
    history: list[Operation] = []
    errors: list[str] = []
    threads = [threading.Thread(target=history_client,
                                args=(i, cluster.endpoints, stop, history, errors, lock),
                                kwargs={"kinds": ("put", "get", "get", "cas", "delete")})
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        def ops_done() -> int:
            with lock:
                return sum(1 for op in history if op.ret is not None)

        def run_until(count: int) -> None:
            def reached() -> bool:
                assert not errors, errors
                return ops_done() >= count
            wait_for(reached, 60, f"{count} completed operations")

        run_until(50)
        leader = local.wait_for_leader(cluster, 10)
        local.stop_node(cluster, leader, "KILL", wait=10)
        run_until(ops_done() + 50)
        local.start_node(cluster, leader)
        follower = next(i for i in cluster.nodes if i != local.wait_for_leader(cluster, 30))
        local.stop_node(cluster, follower, "STOP")
        run_until(ops_done() + 50)
        local.stop_node(cluster, follower, "CONT")
        run_until(ops_done() + 50)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    result = check_history(history, timeout_s=30)
    unknown = sum(1 for op in history if op.ret is None)
    print(f"{len(history)} operations ({unknown} with unknown outcome): {result.verdict}")
    assert result.verdict == "ok", render_window(result)
