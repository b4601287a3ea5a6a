"""Bringing up (or reusing) the local cluster a chaos run works on.

A chaos cluster is an ordinary ``bwraft cluster`` whose nodes also have
``[faults] enabled = true``, so that partitions can be injected without root. A cluster that
already exists in ``--dir`` is reused as it is; partitions then need its nodes to have fault
injection enabled, which :func:`check_fault_injection` tells.
"""

from __future__ import annotations

import http.client
from importlib.metadata import entry_points
from pathlib import Path

from bwcore import cluster as local
from bwcore.chaos.clients import http_request

__all__ = ["add_node", "check_fault_injection", "enable_fault_injection", "helper_role_problem",
           "start_cluster"]

_FAULTS_TABLE = "\n[faults]\nenabled = true\n"


def helper_role_problem(role: str) -> str | None:
    """Why nodes of a helper ``role`` cannot run here, or None when its plugin loads."""
    found = [ep for ep in entry_points(group="bwraft") if ep.name == role]
    if not found:
        return f"the '{role}' role plugin is not installed"
    try:
        found[0].load()
    except Exception as exc:  # noqa: BLE001 - any failure means the role cannot run
        return (f"the '{role}' role plugin ({found[0].value}) cannot be loaded: "
                f"{type(exc).__name__}: {exc}")
    return None


def enable_fault_injection(cluster: local.Cluster) -> None:
    """Add ``[faults] enabled = true`` to every node's config that lacks a ``[faults]`` table."""
    for node in cluster.nodes.values():
        text = node.config.read_text(encoding="utf-8")
        if "\n[faults]" not in text and not text.startswith("[faults]"):
            node.config.write_text(text.rstrip("\n") + "\n" + _FAULTS_TABLE, encoding="utf-8")


def start_cluster(directory: Path, *, voters: int, observers: int, secretaries: int,
                  datacenters: list[str], tick_ms: int, timeout: float = 60.0
                  ) -> local.Cluster:
    """Plan, write (with fault injection enabled), start and wait for a new cluster.

    Raises:
        ClusterError: As :func:`bwcore.cluster.up`; every started process is stopped again.
    """
    cluster = local.plan(directory, voters=voters, observers=observers,
                         secretaries=secretaries, datacenters=datacenters, tick_ms=tick_ms)
    cluster.dir.mkdir(parents=True, exist_ok=True)
    local.write_files(cluster)
    enable_fault_injection(cluster)
    try:
        for node_id in cluster.nodes:
            local.start_node(cluster, node_id)
        local.wait_for_leader(cluster, timeout, among=list(cluster.nodes))
    except BaseException:
        local.down(cluster, grace=5.0)
        raise
    return cluster


def add_node(cluster: local.Cluster, role: str, datacenter: str) -> local.NodeInfo:
    """Plan one more node of ``role`` (a new id, free ports) and write its files; not started."""
    prefix = {"observer": "obs", "secretary": "sec"}.get(role, "n")
    taken = {int(i[len(prefix):]) for i in cluster.nodes
             if i.startswith(prefix) and i[len(prefix):].isdigit()}
    node_id = f"{prefix}{max(taken, default=0) + 1}"
    any_node = next(iter(cluster.nodes.values()))
    host = any_node.raft.rpartition(":")[0]
    raft, gossip, api = (f"{host}:{port}" for port in local.free_ports(3, host.strip("[]")))
    folder = cluster.dir / node_id
    node = local.NodeInfo(id=node_id, role=role, datacenter=datacenter, api=f"http://{api}",
                          raft=raft, gossip=gossip, config=folder / "node.toml",
                          pidfile=folder / "twistd.pid", logfile=folder / "node.log")
    cluster.nodes[node_id] = node
    local.write_files(cluster)
    enable_fault_injection(cluster)
    return node


def check_fault_injection(cluster: local.Cluster, admin_token: str = "") -> list[str]:
    """Ids of running nodes whose fault-injection route is not available (disabled, refused)."""
    connections: dict[str, http.client.HTTPConnection] = {}
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    missing = []
    for node_id, node in cluster.nodes.items():
        if local.running_pid(cluster, node_id) is None:
            continue
        outcome = http_request(connections, node.api, "GET", "/v1/admin/faults", None, 2.0,
                               headers)
        if outcome.status != 200:
            missing.append(f"{node_id} ({outcome.status or outcome.error}: "
                           f"{(outcome.body or {}).get('error', '') if isinstance(outcome.body, dict) else ''})")
    for connection in connections.values():
        connection.close()
    return missing
