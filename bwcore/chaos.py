"""``bwraft chaos``: fault injection against a real local cluster, checked for linearizability.

Like Jepsen against etcd, but against processes on this machine: clients run random KV
operations while a nemesis kills, pauses and partitions nodes (and replaces helpers); the
recorded history is then checked for linearizability and for lost acknowledged writes.
See docs/chaos.md. The parts: :mod:`bwcore.chaos_clients` (operations and their outcomes),
:mod:`bwcore.chaos_nemesis` (faults), :mod:`bwcore.chaos_report` (verdict, lost writes,
availability), and this module (the cluster, and one run from start to files).

A run's phases:

1. Bring up a new local cluster in ``dir`` (fault injection enabled), or reuse the one there.
   A chaos cluster is an ordinary ``bwraft cluster`` whose nodes also have
   ``[faults] enabled = true``, so that partitions need no root.
2. Fault phase (``duration`` seconds): ``clients`` threads issue operations while the nemesis
   injects faults one at a time.
3. Heal: the nemesis resumes, heals and restarts everything; the cluster must elect a leader.
4. Final reads: every key is read (linearizably) through every voter and observer.
5. Check: linearizability of the whole history, lost acknowledged writes, availability.
6. Files in the run's folder: ``history.jsonl`` (replay it with ``bwraft chaos --check``),
   ``faults.jsonl``, ``summary.json`` and, when the history is not linearizable,
   ``bad-window.txt``.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from bwcore import cluster as local
from bwcore.chaos_clients import ChaosClient, ClientSettings, Endpoints, http_request
from bwcore.chaos_nemesis import FAULT_KINDS, FaultEvent, Nemesis
from bwcore.chaos_report import (FINAL_READER, availability, lost_writes, render_summary,
                                 summarize)
from bwcore.linearizability import (CheckResult, Operation, check_history, dump_history,
                                    load_history, render_window)

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_VIOLATION", "FAULT_KINDS", "ChaosError",
           "ChaosOptions", "ClientSettings", "add_node", "check_fault_injection", "check_file",
           "enable_fault_injection", "helper_role_problem", "run_chaos", "start_cluster"]

EXIT_OK, EXIT_VIOLATION, EXIT_FAILED = 0, 1, 3


class ChaosError(Exception):
    """The run cannot start (bad options, missing plugins, cluster problems)."""


@dataclass
class ChaosOptions:
    """Everything a run needs; ``bwraft chaos`` fills it from its options (docs/chaos.md)."""

    dir: Path
    duration: float = 60.0
    clients: int = 4
    faults: tuple[str, ...] = ("kill", "pause", "partition")
    seed: int = 0
    voters: int = 3
    observers: int = 0
    secretaries: int = 0
    datacenters: tuple[str, ...] = ("dc1",)
    tick_ms: int = 100
    keep: bool = False
    admin_token: str = ""
    check_timeout: float = 120.0
    out: Path | None = None
    client_settings: ClientSettings = field(default_factory=ClientSettings)
    log: Callable[[str], None] = print


# -- the cluster ----------------------------------------------------------------------------

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
            said = outcome.body.get("error", "") if isinstance(outcome.body, dict) else ""
            missing.append(f"{node_id} ({outcome.status or outcome.error}: {said})")
    for connection in connections.values():
        connection.close()
    return missing


# -- one run --------------------------------------------------------------------------------

def validate(options: ChaosOptions, existing: local.Cluster | None) -> None:
    """Refuse options that cannot work, with a message saying what to do.

    Raises:
        ChaosError: Unknown fault kinds, no clients, helpers without helper roles.
    """
    unknown = [k for k in options.faults if k not in FAULT_KINDS]
    if unknown or not options.faults:
        raise ChaosError(f"unknown fault kind(s) {unknown}; choose from {', '.join(FAULT_KINDS)}")
    if options.clients < 1 or options.duration <= 0:
        raise ChaosError("need at least one client and a positive duration")
    roles = ([n.role for n in existing.nodes.values()] if existing is not None
             else ["observer"] * options.observers + ["secretary"] * options.secretaries)
    for role in sorted({r for r in roles if r in local.HELPER_ROLES}):
        problem = helper_role_problem(role)
        if problem:
            raise ChaosError(f"cannot run {role}s: {problem}")
    if "helpers" in options.faults:
        if not any(r in local.HELPER_ROLES for r in roles):
            missing = [r for r in local.HELPER_ROLES if helper_role_problem(r)]
            why = (f" (and {', '.join(helper_role_problem(r) or '' for r in missing)})"
                   if missing else "")
            raise ChaosError("the helpers fault kills and replaces observers and secretaries,"
                             " and this cluster has none: pass --observers or --secretaries"
                             + why)


def run_chaos(options: ChaosOptions) -> tuple[int, dict[str, Any]]:
    """Run one chaos test; return (exit code, summary).

    Raises:
        ChaosError: The run could not start.
    """
    say = options.log
    existing = local.load(options.dir) if (options.dir / local.CLUSTER_FILE).exists() else None
    validate(options, existing)
    if existing is None:
        say(f"starting a cluster in {options.dir}: {options.voters} voters,"
            f" {options.observers} observers, {options.secretaries} secretaries")
        try:
            cluster = start_cluster(options.dir, voters=options.voters,
                                    observers=options.observers,
                                    secretaries=options.secretaries,
                                    datacenters=list(options.datacenters),
                                    tick_ms=options.tick_ms)
        except local.ClusterError as exc:
            raise ChaosError(str(exc)) from None
    else:
        cluster = existing
        say(f"reusing the cluster in {options.dir} ({', '.join(cluster.nodes)})")
        for node_id in cluster.nodes:
            if local.running_pid(cluster, node_id) is None:
                local.start_node(cluster, node_id)
        local.wait_for_leader(cluster, 60.0)
    try:
        if "partition" in options.faults:
            missing = check_fault_injection(cluster, options.admin_token)
            if missing:
                raise ChaosError("partitions need fault injection on every node ([faults]"
                                 " enabled = true, and --admin-token if the nodes set one);"
                                 f" not available on: {', '.join(missing)}")
        return _run(options, cluster)
    finally:
        if existing is None and not options.keep:
            local.down(cluster, grace=5.0)


def _run(options: ChaosOptions, cluster: local.Cluster) -> tuple[int, dict[str, Any]]:
    say = options.log
    rng = random.Random(options.seed)
    started = time.monotonic()

    def clock() -> float:
        return time.monotonic() - started

    by_role = lambda role: [n.api for n in cluster.nodes.values() if n.role == role]  # noqa: E731
    endpoints = Endpoints(by_role("voter"), by_role("observer"))
    history: list[Operation] = []
    lock = threading.Lock()

    def record(op: Operation) -> None:
        with lock:
            history.append(op)

    clients = [ChaosClient(i, endpoints, options.client_settings,
                           random.Random(rng.getrandbits(64)), clock, record)
               for i in range(options.clients)]
    nemesis = Nemesis(cluster, endpoints, options.faults, random.Random(rng.getrandbits(64)),
                      clock, admin_token=options.admin_token, log=say)
    client_stop, nemesis_stop = threading.Event(), threading.Event()
    threads = [threading.Thread(target=c.run, args=(client_stop,), name=f"chaos-client-{i}",
                                daemon=True) for i, c in enumerate(clients)]
    fault_thread = threading.Thread(target=nemesis.run, args=(nemesis_stop,),
                                    name="chaos-nemesis", daemon=True)
    say(f"running {options.clients} clients for {options.duration:g} s with faults"
        f" {','.join(options.faults)} (seed {options.seed})")
    for thread in threads + [fault_thread]:
        thread.start()
    problems: list[str] = []
    try:
        nemesis_stop.wait(options.duration)
    finally:
        nemesis_stop.set()
        fault_thread.join(timeout=120)
        fault_end = clock()
        try:
            local.wait_for_leader(cluster, 60.0)
        except local.ClusterError as exc:
            problems.append(f"no leader 60 s after the faults stopped: "
                            f"{str(exc).splitlines()[0]}")
        client_stop.set()
        for thread in threads:
            thread.join(timeout=60)
    problems += nemesis.problems
    problems += [f"client: {e}" for c in clients for e in c.errors[:5]]
    if fault_thread.is_alive() or any(t.is_alive() for t in threads):
        problems.append("a client or the nemesis did not stop")
    say(f"faults stopped at {fault_end:.1f} s; reading every key through every node")
    problems += _final_reads(cluster, options.client_settings, clock, record)
    with lock:
        final_history = list(history)
    say(f"checking {len(final_history)} operations for linearizability")
    check = check_history(final_history, timeout_s=options.check_timeout)
    lost = lost_writes(final_history)
    avail = availability(final_history, nemesis.events, 0.0, fault_end)
    settings = {"seed": options.seed, "duration_s": options.duration,
                "clients": options.clients, "faults": list(options.faults),
                "nodes": {n.id: n.role for n in cluster.nodes.values()},
                "tick_ms": cluster.tick_ms}
    summary = summarize(history=final_history, check=check, lost=lost, events=nemesis.events,
                        avail=avail, problems=problems, settings=settings)
    out = options.out or options.dir / "chaos-runs" / (
        time.strftime("%Y%m%d-%H%M%S") + f"-seed{options.seed}")
    summary["files"] = _write_files(out, final_history, nemesis.events, summary, check)
    say(render_summary(summary, check, lost))
    say(f"history and report in {out}")
    return _exit_code(summary), summary


def _final_reads(cluster: local.Cluster, settings: ClientSettings, clock: Callable[[], float],
                 record: Callable[[Operation], None]) -> list[str]:
    """Read every key through every voter and observer; return the keys no node could read."""
    readers = [n.api for n in cluster.nodes.values()
               if n.role in ("voter", "observer") and local.running_pid(cluster, n.id)]
    reader = ChaosClient(FINAL_READER, Endpoints([]), ClientSettings(
        keys=settings.keys, attempt_timeout=2.0, op_deadline=10.0), random.Random(0), clock,
        record)
    problems = []
    for key in settings.keys:
        read_once = False
        for api in readers:
            reader.endpoints = Endpoints([api], [])
            reader.settings.observer_read_share = 0.0
            for _ in range(3):
                if reader.get(key).ok:
                    read_once = True
                    break
        if not read_once:
            problems.append(f"final read of {key!r} failed on every node")
    return problems


def _write_files(out: Path, history: list[Operation], events: list[FaultEvent],
                 summary: dict[str, Any], check: CheckResult) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"history": out / "history.jsonl", "faults": out / "faults.jsonl",
             "summary": out / "summary.json"}
    dump_history(sorted(history, key=lambda o: o.call), files["history"])
    files["faults"].write_text("".join(json.dumps(e.as_dict()) + "\n" for e in events),
                               encoding="utf-8")
    if check.verdict != "ok":
        files["bad_window"] = out / "bad-window.txt"
        files["bad_window"].write_text(render_window(check) + "\n", encoding="utf-8")
    shown = {name: str(path) for name, path in files.items()}
    files["summary"].write_text(json.dumps({**summary, "files": shown}, indent=2) + "\n",
                                encoding="utf-8")
    return shown


def _exit_code(summary: dict[str, Any]) -> int:
    return {"ok": EXIT_OK, "violation": EXIT_VIOLATION}.get(summary["verdict"], EXIT_FAILED)


def check_file(path: Path, *, check_timeout: float = 120.0,
               log: Callable[[str], None] = print) -> int:
    """Re-check a recorded ``history.jsonl``: linearizability and lost writes.

    Raises:
        ChaosError: The file cannot be read as a history.
    """
    try:
        history = load_history(path)
    except (OSError, ValueError) as exc:
        raise ChaosError(f"cannot read {path}: {exc}") from None
    check = check_history(history, timeout_s=check_timeout)
    lost = lost_writes(history)
    log(f"{len(history)} operations: {render_window(check)}")
    log(f"lost acknowledged writes: {len(lost)}")
    for op in lost[:10]:
        log(f"  client {op.client} {op.op} {op.key}={op.value!r} at {op.call:.3f}s")
    if check.verdict == "illegal" or lost:
        return EXIT_VIOLATION
    return EXIT_OK if check.verdict == "ok" else EXIT_FAILED
