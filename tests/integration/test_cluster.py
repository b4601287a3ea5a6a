"""A real cluster of ``twistd -n bwraft`` processes: replication, failover, recovery, bad input.

Faults are real: SIGKILL of the leader, of every node; restarts from the same data folders.
Nothing waits a fixed time: every wait polls a condition up to a deadline.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import time
from pathlib import Path
from typing import Callable

import pytest

from bwcore import cluster as local
from bwcore.client import Client, NotFound
from bwcore.cli import main
from tests.integration.support import TICK_MS, kill_all, wait_for

pytestmark = pytest.mark.integration

ELECTION_TIMEOUT_S = 10 * TICK_MS / 1000
# Generous on a loaded two-core machine; a healthy failover takes a few election timeouts.
FAILOVER_WAIT_S = 40 * ELECTION_TIMEOUT_S


def client_for(*endpoints: str) -> Client:
    return Client(list(endpoints), timeout=3.0, deadline=30.0)


def status_of(node: local.NodeInfo) -> dict:
    return local.fetch_status(node.api) or {}


def read_all(cluster: local.Cluster, node_id: str, expected: dict[str, str]) -> dict[str, str]:
    """Read every key of ``expected`` through one node, linearizably."""
    with client_for(cluster.nodes[node_id].api) as client:
        return {key: client.get(key).value for key in expected}


def test_writes_through_any_node_are_read_through_every_node(
        start_cluster: Callable[..., local.Cluster]) -> None:
    """3 voters elect one leader; a write sent to any node is read (linearizably) from all."""
    cluster = start_cluster(voters=3)
    statuses = [status_of(node) for node in cluster.nodes.values()]
    assert len({s["leader"] for s in statuses}) == 1
    assert sum(1 for s in statuses if s["role"] == "leader") == 1
    expected = {}
    for node in cluster.nodes.values():
        with client_for(node.api) as client:
            client.put(f"key-{node.id}", f"written via {node.id}")
        expected[f"key-{node.id}"] = f"written via {node.id}"
    for node_id in cluster.nodes:
        assert read_all(cluster, node_id, expected) == expected
    # Linearizable reads through followers answered from their own state machines: it must
    # have applied the writes, so a stale read there now sees them too.
    with client_for(cluster.nodes["n2"].api) as client:
        assert client.get("key-n3", consistency="stale").value == "written via n3"


def test_leader_sigkill_fails_over_without_losing_writes_and_the_node_recovers(
        start_cluster: Callable[..., local.Cluster]) -> None:
    """After SIGKILL of the leader a new one is elected; acknowledged writes survive; the
    killed node restarts from its data folder and catches up."""
    cluster = start_cluster(voters=3)
    acknowledged: dict[str, str] = {}
    with client_for(*cluster.endpoints) as client:
        for i in range(20):
            client.put(f"before-{i}", str(i))
            acknowledged[f"before-{i}"] = str(i)
    old_leader = local.wait_for_leader(cluster, 10)
    local.stop_node(cluster, old_leader, "KILL", wait=10)
    killed_at = time.monotonic()
    survivors = [node_id for node_id in cluster.nodes if node_id != old_leader]
    new_leader = local.wait_for_leader(cluster, FAILOVER_WAIT_S, among=survivors)
    failover_s = time.monotonic() - killed_at
    print(f"failover took {failover_s:.2f}s ({failover_s / ELECTION_TIMEOUT_S:.1f} election "
          f"timeouts)")
    assert new_leader != old_leader
    survivor_urls = [cluster.nodes[i].api for i in survivors]
    with client_for(*survivor_urls) as client:
        for i in range(10):
            client.put(f"after-{i}", str(i))
            acknowledged[f"after-{i}"] = str(i)
    for node_id in survivors:
        assert read_all(cluster, node_id, acknowledged) == acknowledged

    local.start_node(cluster, old_leader)
    leader_commit = status_of(cluster.nodes[new_leader])["commit_index"]
    wait_for(lambda: status_of(cluster.nodes[old_leader]).get("applied_index", -1)
             >= leader_commit, 30, f"{old_leader} to catch up to index {leader_commit}")
    with client_for(cluster.nodes[old_leader].api) as client:
        stale = {key: client.get(key, consistency="stale").value for key in acknowledged}
    assert stale == acknowledged
    assert read_all(cluster, old_leader, acknowledged) == acknowledged


def test_sigkill_of_every_node_then_restart_loses_no_acknowledged_write(
        start_cluster: Callable[..., local.Cluster]) -> None:
    """Every write acknowledged before all nodes are SIGKILLed is there after the restart."""
    cluster = start_cluster(voters=3)
    acknowledged: dict[str, str] = {}
    with client_for(*cluster.endpoints) as client:
        for i in range(30):
            client.put(f"k{i % 7}", f"v{i}")
            acknowledged[f"k{i % 7}"] = f"v{i}"
        client.delete("k6")
        del acknowledged["k6"]
    for node_id in cluster.nodes:
        local.stop_node(cluster, node_id, "KILL", wait=10)
    for node_id in cluster.nodes:
        local.start_node(cluster, node_id)
    local.wait_for_leader(cluster, FAILOVER_WAIT_S, among=list(cluster.nodes))
    for node_id in cluster.nodes:
        assert read_all(cluster, node_id, acknowledged) == acknowledged
    with client_for(*cluster.endpoints) as client, pytest.raises(NotFound):
        client.get("k6")


def test_a_write_retried_with_the_same_request_id_is_applied_once(
        start_cluster: Callable[..., local.Cluster]) -> None:
    """Resending a write with its request id returns the first result and changes nothing,
    whether the retry reaches the leader or a follower that forwards it."""
    cluster = start_cluster(voters=3)
    leader = local.wait_for_leader(cluster, 10)
    follower = next(node_id for node_id in cluster.nodes if node_id != leader)
    with client_for(cluster.nodes[leader].api) as to_leader, \
            client_for(cluster.nodes[follower].api) as to_follower:
        first = to_leader.put("counter", "1", request_id="req-1")
        second = to_leader.put("counter", "2", request_id="req-2")
        assert to_leader.put("counter", "1", request_id="req-1") == first
        assert to_follower.put("counter", "1", request_id="req-1") == first
        cas = to_follower.cas("counter", "2", "3", request_id="req-3")
        assert to_leader.cas("counter", "2", "3", request_id="req-3") == cas
        assert to_follower.get("counter").value == "3"
    assert first < second < cas.index


def raw_request(node: local.NodeInfo, method: str, path: str, body: bytes) -> tuple[int, dict]:
    host, port = node.api.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_bad_input_gets_clear_errors_and_the_node_keeps_serving(
        start_cluster: Callable[..., local.Cluster]) -> None:
    """Malformed JSON, wrong types, a 10 MB body and garbage on the Raft port harm nothing."""
    cluster = start_cluster(voters=3)
    node = cluster.nodes["n1"]
    assert raw_request(node, "PUT", "/v1/kv/k", b'{"value": ')[0] == 400
    status, answer = raw_request(node, "PUT", "/v1/kv/k", b'{"value": 12}')
    assert (status, answer) == (400, {"error": "'value' must be a string"})
    status, answer = raw_request(node, "POST", "/v1/kv/k/cas", b'{"expect": [], "value": "x"}')
    assert status == 400 and "expect" in answer["error"]
    status, answer = raw_request(node, "PUT", "/v1/kv/k", b"x" * (10 << 20))
    assert status == 413 and "exceeds the limit" in answer["error"]

    rng = random.Random(7)
    for target in cluster.nodes.values():
        host, port = target.raft.rsplit(":", 1)
        for garbage in (rng.randbytes(4096), struct.pack(">I", 2**32 - 1) + b"\x00" * 64,
                        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1"):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(garbage)
    with client_for(*cluster.endpoints) as client:
        client.put("still", "serving")
        for node_id in cluster.nodes:
            with client_for(cluster.nodes[node_id].api) as one:
                assert one.get("still").value == "serving"
    assert all(local.running_pid(cluster, node_id) for node_id in cluster.nodes)


def test_demo_starts_a_cluster_and_shows_reads_and_writes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`bwraft demo` brings up 3 voters, writes, reads through each node, cas and delete."""
    folder = tmp_path / "demo"
    try:
        assert main(["demo", "--dir", str(folder), "--tick-ms", str(TICK_MS)]) == 0
        out = capsys.readouterr().out
        for expected in ("leader elected", "put color='blue'",
                         "linearizable get color through n1", "through n3",
                         "cas color blue->green: ok=True", "delete shape: deleted=True",
                         "get shape: not found"):
            assert expected in out
    finally:
        if (folder / local.CLUSTER_FILE).exists():
            cluster = local.load(folder)
            local.down(cluster, grace=5)
            kill_all(cluster)
