"""``bwraft chaos`` against real processes: every fault kind, zero violations, zero lost writes.

Each run is CI-sized (3 voters, 3 clients, about 40 s of faults at 50 ms ticks, so that the
election timeout is 0.5-1 s and a run sees several faults). The long runs are described in
docs/chaos.md. A targeted test also checks that an injected partition really cuts a leader off.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bwcore import cluster as local
from bwcore.chaos import ChaosError, ChaosOptions, ClientSettings, run_chaos
from bwcore.chaos_clients import Endpoints, http_request
from bwcore.chaos_nemesis import Nemesis
from bwcore.chaos import helper_role_problem, start_cluster
from bwcore.client import Client, ClientError, Unavailable
from tests.integration.support import TICK_MS, kill_all, wait_for

pytestmark = pytest.mark.integration

FAULT_SECONDS = 40.0


def chaos(tmp_path: Path, faults: tuple[str, ...], seed: int, **kwargs: Any) -> dict[str, Any]:
    lines: list[str] = []
    options = ChaosOptions(dir=tmp_path / "cluster", duration=FAULT_SECONDS, clients=3,
                           faults=faults, seed=seed, tick_ms=TICK_MS, check_timeout=60.0,
                           out=tmp_path / "run", log=lines.append,
                           client_settings=ClientSettings(keys=("a", "b", "c", "d")), **kwargs)
    code, summary = run_chaos(options)
    print("\n".join(lines))
    assert code == 0, "\n".join(lines)
    # run_chaos stops the cluster it created: nothing may be left running.
    cluster = local.load(tmp_path / "cluster")
    assert all(local.running_pid(cluster, n) is None for n in cluster.nodes)
    return summary


def assert_clean(summary: dict[str, Any], kind: str) -> None:
    shown = json.dumps(summary, indent=1)
    assert summary["verdict"] == "ok", shown
    assert summary["linearizability"]["verdict"] == "ok", shown
    assert summary["lost_writes"] == 0, shown
    assert summary["problems"] == [], shown
    # Several faults in a quiet run; a loaded machine restarts nodes slowly, so ask for one.
    assert summary["faults"]["by_kind"].get(kind, 0) >= 1, shown
    assert summary["operations"]["ok"] >= 200, shown
    # Every key was read at the end, through every voter.
    assert summary["operations"]["final_reads"] >= 4 * 3, shown
    history = Path(summary["files"]["history"]).read_text().splitlines()
    assert len(history) == summary["operations"]["total"] + summary["operations"]["final_reads"]


@pytest.mark.parametrize("kind, seed", [("kill", 1), ("pause", 2), ("partition", 3)])
def test_chaos_run_of_one_fault_kind_is_linearizable_and_loses_nothing(
        tmp_path: Path, kind: str, seed: int) -> None:
    """Under repeated faults of one kind the history linearizes and no write is lost."""
    summary = chaos(tmp_path, (kind,), seed)
    assert_clean(summary, kind)
    if kind == "kill":
        assert summary["faults"]["leader_kills"] >= 1
        assert summary["availability"]["longest_unavailability_after_leader_kill_s"] is not None
    if kind == "partition":
        faults = [json.loads(line) for line in
                  Path(summary["files"]["faults"]).read_text().splitlines()]
        assert not any("could not reach" in f["detail"] for f in faults), faults


def test_chaos_with_helpers_replaces_them_or_refuses_clearly(tmp_path: Path) -> None:
    """The helpers fault runs once the helper roles exist, and is refused clearly until then."""
    problems = [p for p in (helper_role_problem("observer"), helper_role_problem("secretary"))
                if p]
    if problems:
        refused = r"cannot run (observers|secretaries): the '(observer|secretary)' role plugin"
        with pytest.raises(ChaosError, match=refused):
            chaos(tmp_path, ("helpers", "kill"), 4, observers=2, secretaries=1)
        with pytest.raises(ChaosError, match="the helpers fault kills and replaces"):
            chaos(tmp_path, ("helpers",), 4)
        assert not (tmp_path / "cluster").exists()  # refused before anything started
        return
    summary = chaos(tmp_path, ("helpers", "kill"), 4, observers=2, secretaries=1)
    assert_clean(summary, "helpers")


def test_chaos_catches_stale_reads(tmp_path: Path) -> None:
    """The tool can fail: reads with consistency=stale during partitions are caught.

    Stale reads answer from a replica's own state at once, so a follower cut off from the
    leader keeps answering old values after newer writes were acknowledged (the bug class of
    Jepsen's etcd 0.4 finding).
    """
    lines: list[str] = []
    options = ChaosOptions(dir=tmp_path / "cluster", duration=20.0, clients=3,
                           faults=("partition",), seed=5, tick_ms=TICK_MS, check_timeout=60.0,
                           out=tmp_path / "run", log=lines.append,
                           client_settings=ClientSettings(keys=("a", "b"),
                                                          read_consistency="stale"))
    code, summary = run_chaos(options)
    assert code == 1, "\n".join(lines)
    assert summary["verdict"] == "violation"
    assert summary["linearizability"]["verdict"] == "illegal"
    window = Path(summary["files"]["bad_window"]).read_text()
    assert window.startswith("not linearizable: key") and "cannot be linearized" in window


def test_a_reused_cluster_is_left_running_and_partitions_need_fault_injection(
        tmp_path: Path) -> None:
    """A cluster from ``bwraft cluster up`` is reused as it is, and stays up afterwards."""
    cluster = local.up(tmp_path / "cluster", voters=3, tick_ms=TICK_MS)
    try:
        with pytest.raises(ChaosError, match="partitions need fault injection on every node"
                                             r".*n1 \(404"):
            chaos(tmp_path, ("partition",), 7)
        options = ChaosOptions(dir=tmp_path / "cluster", duration=10.0, clients=2,
                               faults=("kill",), seed=7, out=tmp_path / "run",
                               log=lambda _: None,
                               client_settings=ClientSettings(keys=("a", "b")))
        code, summary = run_chaos(options)
        assert code == 0 and summary["verdict"] == "ok", summary["problems"]
        assert all(local.running_pid(cluster, n) is not None for n in cluster.nodes)
    finally:
        kill_all(cluster)
        local.down(cluster, grace=5.0)


class AlwaysLow(random.Random):
    """Randomness whose ``random()`` is always 0: every coin flip takes its first branch."""

    def random(self) -> float:
        return 0.0


def test_a_helper_replaced_by_a_new_node_serves_linearizable_reads(tmp_path: Path) -> None:
    """The helpers fault's "new node" branch: a fresh observer with a new id joins and serves."""
    if helper_role_problem("observer"):
        with pytest.raises(ChaosError, match="cannot run observers"):
            chaos(tmp_path, ("helpers",), 6, observers=1)
        return
    cluster = start_cluster(tmp_path / "cluster", voters=3, observers=1, secretaries=0,
                            datacenters=["dc1"], tick_ms=TICK_MS)
    try:
        with Client(cluster.endpoints, timeout=2, deadline=20) as client:
            client.put("x", "before")
        endpoints = Endpoints(cluster.endpoints[:3], [cluster.nodes["obs1"].api])
        nemesis = Nemesis(cluster, endpoints, ("helpers",), AlwaysLow(1), time.monotonic,
                          log=lambda _: None)
        event = nemesis.inject("helpers", threading.Event())
        assert event is not None and event.detail == "replaced by new node obs2"
        assert local.running_pid(cluster, "obs1") is None
        assert endpoints.observers() == [cluster.nodes["obs2"].api]
        assert "[faults]" in cluster.nodes["obs2"].config.read_text()
        assert local.load(cluster.dir).nodes["obs2"].role == "observer"
        with Client(cluster.endpoints[:3], timeout=2, deadline=20) as client:
            client.put("x", "after")
        with Client([cluster.nodes["obs2"].api], timeout=2, deadline=30) as reader:
            wait_for(lambda: _read_or_none(reader, "x") == "after", 30,
                     "the new observer to serve the latest value")
    finally:
        kill_all(cluster)
        local.down(cluster, grace=5.0)


def _read_or_none(client: Client, key: str) -> str | None:
    try:
        return client.get(key).value
    except ClientError:
        return None


def admin(node: local.NodeInfo, method: str, body: dict | None = None) -> Any:
    outcome = http_request({}, node.api, method, "/v1/admin/faults", body, 2.0)
    assert outcome.status == 200, outcome
    return outcome.body


def test_an_injected_partition_cuts_the_leader_off_until_healed(tmp_path: Path) -> None:
    """A leader cut off from both followers loses its leadership; after healing all agree.

    Only the old leader is told of the partition: its layer drops frames and datagrams both
    ways, so the others need no change, and its drop counters show both directions.
    """
    cluster = start_cluster(tmp_path / "cluster", voters=3, observers=0, secretaries=0,
                            datacenters=["dc1"], tick_ms=TICK_MS)
    try:
        old = local.wait_for_leader(cluster, 30)
        others = [n for n in cluster.voters if n != old]
        with Client(cluster.endpoints, timeout=2, deadline=10) as client:
            client.put("before", "1")
        admin(cluster.nodes[old], "POST", {"partition": others,
                                           "gossip_addresses": [cluster.nodes[o].gossip
                                                                for o in others]})

        def new_leader() -> str | None:
            views = [local.fetch_status(cluster.nodes[o].api) or {} for o in others]
            leaders = {v.get("leader") for v in views}
            return leaders.pop() if len(leaders) == 1 and None not in leaders and \
                old not in leaders else None

        leader = wait_for(new_leader, 30, "a leader among the majority side")
        # The old leader cannot commit: check-quorum makes it step down (Raft thesis §6.2),
        # and a write sent to it alone never succeeds.
        wait_for(lambda: (local.fetch_status(cluster.nodes[old].api) or {}).get(
            "raft_role") != "leader", 30, "the cut-off leader to step down")
        with Client([cluster.nodes[old].api], timeout=1, deadline=3, retries=2) as lonely:
            with pytest.raises(Unavailable):
                lonely.put("during", "lost?")
        dropped = admin(cluster.nodes[old], "GET")["dropped"]
        assert dropped["raft_out"] > 0 and dropped["raft_in"] > 0
        assert dropped["gossip_out"] > 0 and dropped["gossip_in"] > 0
        assert admin(cluster.nodes[old], "DELETE")["partition"] == []
        with Client(cluster.endpoints, timeout=2, deadline=20) as client:
            client.put("after", "2")
            assert client.get("before").value == "1"
        agreed = local.wait_for_leader(cluster, 30)
        assert agreed in cluster.voters and leader in cluster.voters
        # The drop counters are exported to Prometheus as well.
        text = _get(cluster.nodes[old].api + "/metrics")
        assert 'bwraft_faults_dropped_total{channel="raft",direction="in"}' in text
    finally:
        kill_all(cluster)
        local.down(cluster, grace=5.0)


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()

