"""A secretary on real processes: two datacenters, SIGKILL of the secretary, a new one hired.

West holds two voters and the leader; east holds three voters and the secretary, so nothing
commits without an east voter. The test shows, through each node's /v1/status and /metrics:
writes commit through the secretary; its SIGKILL costs no election (no voter's term moves)
and writes go on once the leader has taken the east followers back; a secretary started later
is hired and carries the east datacenter again (its relayed-entry counters move).
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import replace
from pathlib import Path
from collections.abc import Iterator

import pytest

from bwcore import cluster as local
from bwcore.client import Client
from bwcore.codec import Hello, encode_frame
from bwcore.kernel import Message, MessageType
from tests.integration.support import kill_all, wait_for

pytestmark = pytest.mark.integration

#: 100 ms ticks: a 1 s election timeout, so a 300 ms reply deadline (30%) on a busy machine.
TICK_MS = 100
WEST = ("n1", "n2")
EAST = ("n3", "n4", "n5")
WAIT_S = 60.0


#: The shared secret of the secured cluster (docs/security.md: at least 16 bytes).
SECRET = b"relay-test-secret-0123456789"


@pytest.fixture
def two_datacenters(tmp_path: Path) -> Iterator[local.Cluster]:
    """Five voters (2 west, 3 east) and one east secretary running; ``sec2`` (east) planned but
    not started."""
    yield from _two_datacenters(tmp_path, secret=None)


@pytest.fixture
def secured_two_datacenters(tmp_path: Path) -> Iterator[local.Cluster]:
    """The same, every node holding the cluster secret: frames and datagrams carry HMACs."""
    yield from _two_datacenters(tmp_path, secret=SECRET)


@pytest.fixture
def east_observer(tmp_path: Path) -> Iterator[local.Cluster]:
    """The same with an east observer, ``obs1``, which the leader feeds too."""
    yield from _two_datacenters(tmp_path, secret=None, observers=1)


def _two_datacenters(tmp_path: Path, secret: bytes | None,
                     observers: int = 0) -> Iterator[local.Cluster]:
    cluster = local.plan(tmp_path / "cluster", voters=5, secretaries=2, observers=observers,
                         tick_ms=TICK_MS, datacenters=("west", "east"))
    for node_id, node in list(cluster.nodes.items()):
        cluster.nodes[node_id] = replace(node, datacenter="west" if node_id in WEST else "east")
    cluster.dir.mkdir(parents=True)
    local.write_files(cluster)
    if secret is not None:
        secret_file = cluster.dir / "cluster.secret"
        secret_file.write_bytes(secret + b"\n")
        for node in cluster.nodes.values():
            # A table of its own at the end of the file: valid TOML after any other table.
            with node.config.open("a", encoding="utf-8") as f:
                f.write(f'\n[security]\ncluster_secret_file = "{secret_file}"\n')
    try:
        for node_id in cluster.nodes:
            if node_id != "sec2":
                local.start_node(cluster, node_id)
        local.wait_for_leader(cluster, WAIT_S, among=[*WEST, *EAST, "sec1"])
        yield cluster
    finally:
        kill_all(cluster)
        for node in cluster.nodes.values():
            print(local.log_tail(node, lines=15))


def status(cluster: local.Cluster, node_id: str) -> dict:
    return local.fetch_status(cluster.nodes[node_id].api) or {}


def metric(cluster: local.Cluster, node_id: str, name: str, *, labels: bool = False) -> float:
    """One sample from the node's /metrics (0 if absent); ``labels``: the sum over them."""
    host, _, port = cluster.nodes[node_id].api.removeprefix("http://").rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    prefix = name + ("{" if labels else " ")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def make_leader(cluster: local.Cluster, target: str, secret: bytes | None = None) -> str:
    """Hand leadership to ``target`` the way a leadership transfer ends (Raft dissertation
    §3.10): a TIMEOUT_NOW in the current term makes it campaign at once. The test sends it
    over the peer protocol itself, as the leader would (with the cluster's HMAC, if any)."""
    for _ in range(10):
        leader = local.wait_for_leader(cluster, WAIT_S, among=[*WEST, *EAST])
        if leader == target:
            return leader
        term = status(cluster, leader)["term"]
        host, _, port = cluster.nodes[target].raft.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(encode_frame(Hello("test-transfer", "bwraft-local"), secret)
                         + encode_frame(Message(MessageType.TIMEOUT_NOW, target, leader, term),
                                        secret))
        wait_for(lambda term=term: status(cluster, target).get("term", 0) > term, 20,
                 "the campaign")
    pytest.fail(f"{target} never became leader")


def east_assigned_to(cluster: local.Cluster, leader: str, secretary: str) -> bool:
    view = status(cluster, leader).get("secretaries") or {}
    return view.get("relaying") is True and view.get("assignment") == {secretary: list(EAST)}


def test_secretary_sigkill_costs_no_election_and_a_new_secretary_is_hired(
        two_datacenters: local.Cluster) -> None:
    cluster = two_datacenters
    leader = make_leader(cluster, "n1")
    wait_for(lambda: east_assigned_to(cluster, leader, "sec1"), WAIT_S,
             "the leader to hand the east followers to sec1")
    terms = {v: status(cluster, v)["term"] for v in (*WEST, *EAST)}
    assert len(set(terms.values())) == 1
    relayed = "bwraft_secretary_leader_relayed_entries_total"
    acknowledged: dict[str, str] = {}
    with Client([cluster.nodes[v].api for v in (*WEST, *EAST)], timeout=3.0,
                deadline=30.0) as client:
        start = metric(cluster, leader, relayed)
        for i in range(20):
            client.put(f"a{i}", str(i))
            acknowledged[f"a{i}"] = str(i)
        # Each write reached the three east voters through sec1.
        assert metric(cluster, leader, relayed) >= start + 3 * 20
        assert metric(cluster, "sec1", "bwraft_secretary_relayed_entries_total") >= 3 * 20

        local.stop_node(cluster, "sec1", "KILL", wait=10)
        for i in range(20):
            client.put(f"b{i}", str(i))
            acknowledged[f"b{i}"] = str(i)
        taken_back = sum(
            metric(cluster, leader, f'bwraft_secretary_takebacks_total{{reason="{r}"}}')
            for r in ("deadline", "suspect", "dead", "follower_silent"))
        assert taken_back >= 1
        # No election: every voter is still in the term it had, under the same leader.
        assert {v: status(cluster, v)["term"] for v in (*WEST, *EAST)} == terms
        assert all(status(cluster, v)["leader"] == leader for v in (*WEST, *EAST))

        local.start_node(cluster, "sec2")
        wait_for(lambda: east_assigned_to(cluster, leader, "sec2"), WAIT_S,
                 "the leader to hire sec2")
        start = metric(cluster, leader, relayed)
        for i in range(20):
            client.put(f"c{i}", str(i))
            acknowledged[f"c{i}"] = str(i)
        assert metric(cluster, leader, relayed) >= start + 3 * 20
        assert metric(cluster, "sec2", "bwraft_secretary_relayed_entries_total") >= 3 * 20
        assert {v: status(cluster, v)["term"] for v in (*WEST, *EAST)} == terms
    # Every acknowledged write reads back linearizably through an east follower.
    with Client([cluster.nodes["n4"].api], timeout=3.0, deadline=30.0) as client:
        assert {k: client.get(k).value for k in acknowledged} == acknowledged


def test_secretary_relays_in_a_cluster_with_a_secret(
        secured_two_datacenters: local.Cluster) -> None:
    """With a cluster secret every hop of the relay (leader -> secretary -> followers and
    back) is an authenticated connection: writes commit through the secretary, and no node
    refuses a frame on the way."""
    cluster = secured_two_datacenters
    leader = make_leader(cluster, "n1", SECRET)
    wait_for(lambda: east_assigned_to(cluster, leader, "sec1"), WAIT_S,
             "the leader to hand the east followers to sec1")
    relayed = "bwraft_secretary_leader_relayed_entries_total"
    with Client([cluster.nodes[v].api for v in (*WEST, *EAST)], timeout=3.0,
                deadline=30.0) as client:
        start = metric(cluster, leader, relayed)
        for i in range(20):
            client.put(f"s{i}", str(i))
        assert metric(cluster, leader, relayed) >= start + 3 * 20
        assert metric(cluster, "sec1", "bwraft_secretary_relayed_entries_total") >= 3 * 20
    for node_id in (*WEST, *EAST, "sec1"):
        assert metric(cluster, node_id, "bwraft_transport_rejected_frames_total",
                      labels=True) == 0
        assert metric(cluster, node_id, "bwraft_secretary_malformed_frames_total") == 0
    assert {status(cluster, v)["term"] for v in (*WEST, *EAST)} == \
        {status(cluster, leader)["term"]}


def test_secretary_carries_an_observer_and_its_reads_stay_linearizable(
        east_observer: local.Cluster) -> None:
    """An observer in the secretary's datacenter is fed through the secretary like the east
    voters (PROTOCOL.md: followers and observers of a datacenter), and a linearizable read
    through it sees every acknowledged write."""
    cluster = east_observer
    leader = make_leader(cluster, "n1")
    wait_for(lambda: (status(cluster, leader).get("secretaries") or {}).get("assignment")
             == {"sec1": sorted([*EAST, "obs1"])}, WAIT_S,
             "the leader to hand the east voters and the observer to sec1")
    with Client([cluster.nodes[v].api for v in (*WEST, *EAST)], timeout=3.0,
                deadline=30.0) as client:
        for i in range(20):
            client.put(f"o{i}", str(i))
    assert metric(cluster, "obs1", "bwraft_secretary_follower_relays_total") > 0
    with Client([cluster.nodes["obs1"].api], timeout=3.0, deadline=30.0) as client:
        assert {f"o{i}": client.get(f"o{i}").value for i in range(20)} == \
            {f"o{i}": str(i) for i in range(20)}
