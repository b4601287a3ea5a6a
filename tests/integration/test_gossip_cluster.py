"""Gossip membership end to end: real processes, real UDP, faults by signal.

3 voters and 3 helpers (observers) started like `bwraft cluster up`. Bounds are those stated
in docs/gossip.md ("Operations"), for the default gossip settings.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from bwcore import cluster as local
from bwcore.cli import main
from bwcore.client import Client
from tests.integration.support import wait_for

#: A SIGKILLed member is seen dead by every other member within this many seconds.
DEAD_BOUND_SECONDS = 15.0


def views(cluster: local.Cluster, among: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each listed node's gossip view (``GET /v1/members``): node -> member id -> record."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node_id in among:
        try:
            with Client([cluster.nodes[node_id].api], timeout=2.0, retries=0,
                        deadline=2.0) as client:
                out[node_id] = {m["id"]: m for m in client.members()}
        except Exception:  # noqa: BLE001 - a node not answering has no view this round
            out[node_id] = {}
    return out


def all_see(cluster: local.Cluster, among: list[str], member: str,
            accept: Callable[[dict[str, Any]], bool]) -> bool:
    seen = views(cluster, among)
    return all(member in view and accept(view[member]) for view in seen.values())


def is_alive(record: dict[str, Any]) -> bool:
    return record["state"] == "alive"


def add_observer(cluster: local.Cluster, node_id: str) -> local.NodeInfo:
    """A new observer that knows nothing but the gossip seeds (the voters' gossip addresses)."""
    raft, gossip, api = (f"127.0.0.1:{port}" for port in local.free_ports(3))
    folder = cluster.dir / node_id
    node = local.NodeInfo(id=node_id, role="observer", datacenter="dc1", api=f"http://{api}",
                          raft=raft, gossip=gossip, config=folder / "node.toml",
                          pidfile=folder / "twistd.pid", logfile=folder / "node.log")
    cluster.nodes[node_id] = node
    local.write_files(cluster)
    text = node.config.read_text()
    assert "[cluster.voters" not in text and "seeds = [" in text
    local.start_node(cluster, node_id)
    return node


def test_gossip_view_failure_detection_join_and_refutation(start_cluster, capsys) -> None:
    """All six listed alive everywhere (and by `bwraft members`); a SIGKILLed helper is seen
    dead by all within the bound; a helper started with only a seed appears everywhere and
    is fed; a SIGSTOPped helper is suspected and refutes when continued."""
    cluster = start_cluster(voters=3, observers=3)
    ids = list(cluster.nodes)
    assert len(ids) == 6

    # Every member lists all six alive.
    wait_for(lambda: all(len(view) == 6 and all(map(is_alive, view.values()))
                         for view in views(cluster, ids).values()), 30.0,
             "every /v1/members to list all six alive")
    assert main(["members", "--endpoints", cluster.nodes["n1"].api]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert sorted(m["id"] for m in shown) == sorted(ids)
    assert {m["id"]: m["role"] for m in shown}["obs2"] == "observer"

    # SIGKILL of a helper: every other member sees it dead within the stated bound.
    local.stop_node(cluster, "obs3", "KILL", wait=10.0)
    killed_at = time.monotonic()
    others = [i for i in ids if i != "obs3"]
    wait_for(lambda: all_see(cluster, others, "obs3", lambda m: m["state"] == "dead"),
             DEAD_BOUND_SECONDS, f"obs3 seen dead by all within {DEAD_BOUND_SECONDS:g}s")
    print(f"SIGKILLed helper seen dead by all after {time.monotonic() - killed_at:.2f}s")

    # A new helper started with only a seed address appears everywhere, and sees everyone.
    add_observer(cluster, "obs4")
    live = [*others, "obs4"]
    joined_from = time.monotonic()
    wait_for(lambda: all_see(cluster, live, "obs4", is_alive), 30.0,
             "obs4 alive in every view")
    wait_for(lambda: all(is_alive(views(cluster, ["obs4"])["obs4"].get(i, {"state": "-"}))
                         for i in others), 30.0, "obs4 to see every live member")
    print(f"new helper alive everywhere after {time.monotonic() - joined_from:.2f}s")
    leader = local.wait_for_leader(cluster, 30.0, among=cluster.voters)
    wait_for(lambda: "obs4" in (local.fetch_status(cluster.nodes[leader].api) or {}).get(
        "helpers", ()), 30.0, "the leader to feed obs4")

    # A SIGSTOPped helper is suspected; continued, it refutes with a higher incarnation.
    before = views(cluster, ["n1"])["n1"]["obs1"]["incarnation"]
    watchers = [i for i in live if i != "obs1"]
    local.stop_node(cluster, "obs1", "STOP")
    try:
        wait_for(lambda: any(view.get("obs1", {}).get("state") in ("suspect", "dead")
                             for view in views(cluster, watchers).values()), 30.0,
                 "obs1 to be suspected")
    finally:
        local.stop_node(cluster, "obs1", "CONT")
    wait_for(lambda: all_see(cluster, watchers, "obs1",
                             lambda m: is_alive(m) and m["incarnation"] > before), 30.0,
             "obs1 to refute: alive everywhere at a higher incarnation")

