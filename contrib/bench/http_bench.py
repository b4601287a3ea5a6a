"""Durable writes through the HTTP API of a 3-voter bwraft cluster, driven by ``wrk``.

Starts three ``twistd -n bwraft`` voters on 127.0.0.1 (default storage: SQLite, WAL,
``synchronous=FULL``) and runs, per round:

- ``low_load``: one connection, one write at a time, against the leader: p50/p99 latency;
- ``leader``: ``--connections`` connections against the leader;
- ``all_nodes``: the same number of connections spread over the three nodes, so two thirds of
  the writes are forwarded by a follower to the leader.

Every request is ``PUT /v1/kv/k<N>`` with a ``--value-bytes`` value and a fresh request id
(``contrib/bench/put.lua``). ``wrk`` runs with one thread per process, pinned with ``taskset``
to ``--wrk-cpu``, so that it takes at most one of the machine's cores; its CPU share (user +
system time over wall time) and the nodes' are reported, since on a 2-core machine the load
generator competes with the cluster.

Usage::

    python contrib/bench/http_bench.py [--rounds 3] [--seconds 10] [--connections 64]
        [--value-bytes 100] [--wrk-cpu 1] [--dir DIR]

Needs ``wrk`` (Debian: ``apt-get install wrk``). Prints one JSON object per round and then
the medians over the rounds. Every node started is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bwcore import cluster as local
from benchlib import children_cpu_seconds, process_cpu_seconds, start_cluster, stop_cluster

LUA = Path(__file__).resolve().with_name("put.lua")
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, latency percentiles and status counts from wrk's ``--latency`` output."""
    out: dict[str, Any] = {}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    out["requests_s"] = float(rate.group(1)) if rate else 0.0
    for name in ("50", "90", "99"):
        match = re.search(rf"^\s+{name}%\s+(\S+)", output, re.MULTILINE)
        if match:
            out[f"p{name}_ms"] = round(_ms(match.group(1)), 3)
    statuses = re.search(r"^STATUSES (\{.*\})$", output, re.MULTILINE)
    out["statuses"] = json.loads(statuses.group(1)) if statuses else {}
    errors = re.search(r"Socket errors: (.*)", output)
    if errors:
        out["socket_errors"] = errors.group(1).strip()
    return out


def run_wrk(urls: list[str], connections: int, seconds: float, args: argparse.Namespace,
            node_pids: dict[str, int]) -> dict[str, Any]:
    """Run one pinned single-threaded wrk per URL at once; merge what they report."""
    per_url = max(1, connections // len(urls))
    env = dict(os.environ, VALUE_BYTES=str(args.value_bytes))
    cpu_before = {nid: process_cpu_seconds(pid) for nid, pid in node_pids.items()}
    # Reaped children's CPU (node processes of earlier rounds too) accrues here: take the
    # difference over this run only.
    children_before = children_cpu_seconds()
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["taskset", "-c", str(args.wrk_cpu), "wrk", "-t1", f"-c{per_url}",
             f"-d{seconds:g}s", "--latency", "--timeout", "10s", "-s", str(LUA), url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for url in urls]
    results = []
    for process in processes:
        output = process.communicate(timeout=seconds + 60)[0]
        results.append(parse_wrk(output))
    elapsed = time.perf_counter() - started
    # wrk's CPU time (taskset execs it) is in RUSAGE_CHILDREN once communicate() reaped it.
    wrk_cpu = children_cpu_seconds() - children_before
    cpu = {nid: round((process_cpu_seconds(pid) - cpu_before[nid]) / elapsed, 2)
           for nid, pid in node_pids.items()}
    statuses: dict[str, int] = {}
    for result in results:
        for status, count in result["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    ok = statuses.get("200", 0)
    merged: dict[str, Any] = {
        "connections": per_url * len(urls), "targets": len(urls),
        "writes_s": round(ok / elapsed, 1),
        "requests_s": round(sum(r["requests_s"] for r in results), 1),
        "p50_ms": max(r.get("p50_ms", 0.0) for r in results),
        "p99_ms": max(r.get("p99_ms", 0.0) for r in results),
        "statuses": statuses, "wrk_cpu_share": round(wrk_cpu / elapsed, 2),
        "node_cpu_share": cpu,
    }
    errors = [r["socket_errors"] for r in results if "socket_errors" in r]
    if errors:
        merged["socket_errors"] = errors
    return merged


def one_round(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    cluster, leader = start_cluster(folder, args.tick_ms)
    try:
        pids = {nid: p.pid for nid, p in cluster.processes.items()}
        leader_url = cluster.nodes[leader].api
        result: dict[str, Any] = {"leader_id": leader, "value_bytes": args.value_bytes}
        result["low_load"] = run_wrk([leader_url], 1, args.seconds, args, pids)
        result["leader"] = run_wrk([leader_url], args.connections, args.seconds, args, pids)
        result["all_nodes"] = run_wrk(cluster.endpoints, args.connections, args.seconds, args,
                                      pids)
        now = local.wait_for_leader(cluster, 10.0, among=list(cluster.nodes))
        if now != leader:
            result["note"] = f"leader changed from {leader} to {now} during the round"
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        return result
    finally:
        stop_cluster(cluster)


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": len(rounds)}
    for phase in ("low_load", "leader", "all_nodes"):
        out[phase] = {key: statistics.median(r[phase][key] for r in rounds)
                      for key in ("writes_s", "p50_ms", "p99_ms", "wrk_cpu_share")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--tick-ms", type=int, default=100)
    parser.add_argument("--wrk-cpu", type=int, default=1, help="CPU to pin wrk to")
    parser.add_argument("--dir", help="folder for the clusters (default: a temporary one)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bwraft-http-bench-"))
    rounds = []
    for n in range(args.rounds):
        result = one_round(args, base / f"round{n}")
        print(json.dumps(result), flush=True)
        rounds.append(result)
    print(json.dumps({"median": medians(rounds)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
