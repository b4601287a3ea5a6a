"""Observers on real processes: 3 voters + 2 observers started like `bwraft cluster up`.

The observers know only the gossip seeds (no voter list); the voters learn of them by gossip
and feed them the log. Reads through them must be linearizable, losing one must not disturb
writes, and a restarted one must catch up.
"""

from __future__ import annotations

import random
import shutil
import threading
import time

from bwcore import cluster as local
from bwcore.client import Client
from bwcore.config import load_config
from bwcore.linearizability import Operation, check_history, render_window
from tests.integration.support import CLIENTS, history_client, wait_for

ROUNDS = 1000


def _status(cluster: local.Cluster, node_id: str) -> dict:
    return local.fetch_status(cluster.nodes[node_id].api, timeout=2.0) or {}


def _caught_up(cluster: local.Cluster, leader: str, observers: list[str]) -> bool:
    commit = _status(cluster, leader).get("commit_index", 0)
    return commit > 0 and all(
        _status(cluster, o).get("applied_index", -1) >= commit for o in observers)


def test_observers_serve_linearizable_reads_survive_kill_and_catch_up(start_cluster) -> None:
    """1,000 rounds of "write through the leader, then a linearizable read through a random
    observer" all see the write; SIGKILL of an observer disturbs no write; restarted, it
    catches up and serves the latest value."""
    cluster = start_cluster(voters=3, observers=2)
    observers = [n.id for n in cluster.nodes.values() if n.role == "observer"]
    voter_urls = [cluster.nodes[v].api for v in cluster.voters]
    for observer in observers:
        assert load_config(cluster.nodes[observer].config).cluster.voters == {}
    leader = local.wait_for_leader(cluster, 30.0, among=cluster.voters)
    wait_for(lambda: set(_status(cluster, leader).get("helpers", ())) == set(observers), 30.0,
             "the leader to feed both observers (learned by gossip)")
    wait_for(lambda: _caught_up(cluster, leader, observers), 30.0, "observers to catch up")

    rng = random.Random(2024)
    writer = Client(voter_urls, timeout=5.0, deadline=30.0)
    readers = {o: Client([cluster.nodes[o].api], timeout=5.0, deadline=30.0)
               for o in observers}
    served_by = dict.fromkeys(observers, 0)
    try:
        for i in range(ROUNDS):
            key, value = f"k{i % 50}", f"v{i}"
            index = writer.put(key, value)
            observer = rng.choice(observers)
            result = readers[observer].get(key)
            assert result.value == value, (i, observer, result)
            assert result.index >= index
            served_by[observer] += 1
        assert all(count > ROUNDS // 4 for count in served_by.values()), served_by

        # Killing an observer does not disturb writes: none fails, the leader stays.
        victim, survivor = observers
        term = _status(cluster, leader)["term"]
        local.stop_node(cluster, victim, "KILL", wait=10.0)
        started = time.monotonic()
        for i in range(200):
            writer.put(f"after-kill-{i}", str(i))
        write_seconds = time.monotonic() - started
        status = _status(cluster, leader)
        assert (status["role"], status["term"]) == ("leader", term)
        assert readers[survivor].get("after-kill-199").value == "199"
        print(f"200 writes with an observer killed: {write_seconds:.2f}s")

        # The leader stops feeding it once gossip declares it dead.
        wait_for(lambda: victim not in _status(cluster, leader).get("helpers", ()), 30.0,
                 "the leader to drop the dead observer")
        writer.put("while-down", "x")

        # Restarted from its data, it is fed again and catches up.
        local.start_node(cluster, victim)
        wait_for(lambda: _caught_up(cluster, leader, [victim]), 60.0,
                 "the restarted observer to catch up")
        readers[victim].close()
        readers[victim] = Client([cluster.nodes[victim].api], timeout=5.0, deadline=30.0)
        assert readers[victim].get("while-down").value == "x"
        last = writer.put("final", "y")
        result = readers[victim].get("final")
        assert (result.value, result.index >= last) == ("y", True)

        # Stateless: restarted at once without its data (before gossip could declare it
        # dead), the other observer announces a new run and is fed again from scratch.
        local.stop_node(cluster, survivor, "KILL", wait=10.0)
        shutil.rmtree(cluster.nodes[survivor].folder / "data")
        local.start_node(cluster, survivor)
        wait_for(lambda: _caught_up(cluster, leader, [survivor]), 60.0,
                 "the observer restarted without its data to catch up")
        readers[survivor].close()
        readers[survivor] = Client([cluster.nodes[survivor].api], timeout=5.0, deadline=30.0)
        assert readers[survivor].get("k0").value == f"v{ROUNDS - 50}"
        assert readers[survivor].get("final").value == "y"
    finally:
        writer.close()
        for reader in readers.values():
            reader.close()


def test_a_write_sent_to_an_observer_reaches_the_leader(start_cluster) -> None:
    """Writes arriving at an observer are forwarded to the leader it learned by gossip."""
    cluster = start_cluster(voters=3, observers=1)
    [observer] = [n.id for n in cluster.nodes.values() if n.role == "observer"]
    leader = local.wait_for_leader(cluster, 30.0, among=cluster.voters)
    wait_for(lambda: _status(cluster, observer).get("leader") == leader, 30.0,
             "the observer to learn the leader")
    with Client([cluster.nodes[observer].api], timeout=5.0, deadline=30.0) as client:
        index = client.put("via-observer", "1")
        assert client.get("via-observer").value == "1"
        assert client.get("via-observer", consistency="stale").index >= index
    with Client([cluster.nodes[leader].api]) as client:
        assert client.get("via-observer").value == "1"


def test_observer_reads_linearize_under_leader_and_observer_faults(start_cluster) -> None:
    """Concurrent clients writing through the leader and reading through the observers,
    while the leader is SIGKILLed and restarted, an observer SIGKILLed and restarted and
    another paused: the history is linearizable (PROTOCOL.md invariant 7)."""
    cluster = start_cluster(voters=3, observers=2)
    obs1, obs2 = (n.id for n in cluster.nodes.values() if n.role == "observer")
    leader = local.wait_for_leader(cluster, 30.0, among=cluster.voters)
    wait_for(lambda: set(_status(cluster, leader).get("helpers", ())) == {obs1, obs2}, 30.0,
             "the leader to feed both observers")
    stop, lock = threading.Event(), threading.Lock()
    history: list[Operation] = []
    errors: list[str] = []
    threads = [threading.Thread(target=history_client,
                                args=(i, cluster.endpoints, stop, history, errors, lock),
                                # puts and cas through the leader, gets through the observers
                                kwargs={"kinds": ("put", "get", "get", "get", "cas"),
                                        "read_from": "observers"})
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()

    def reads_done() -> int:
        with lock:
            return sum(1 for op in history if op.op == "get")

    def run_until(count: int) -> None:
        def reached() -> bool:
            assert not errors, errors
            return reads_done() >= count
        wait_for(reached, 60, f"{count} observer reads")

    try:
        run_until(100)
        leader = local.wait_for_leader(cluster, 10.0, among=cluster.voters)
        local.stop_node(cluster, leader, "KILL", wait=10.0)
        run_until(reads_done() + 100)
        local.start_node(cluster, leader)
        local.stop_node(cluster, obs1, "KILL", wait=10.0)
        run_until(reads_done() + 100)
        local.start_node(cluster, obs1)
        local.stop_node(cluster, obs2, "STOP")
        run_until(reads_done() + 100)
        local.stop_node(cluster, obs2, "CONT")
        run_until(reads_done() + 100)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    result = check_history(history, timeout_s=30)
    reads = sum(1 for op in history if op.op == "get")
    print(f"{len(history)} operations ({reads} observer reads): {result.verdict}")
    assert result.verdict == "ok", render_window(result)
