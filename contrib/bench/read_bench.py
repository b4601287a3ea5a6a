"""Read throughput with 0, 1, 2 and 4 observers, and what reads cost the leader, with ``wrk``.

For each observer count it starts a local cluster (3 voters + N observers, like
``bwraft cluster up``), writes ``--keys`` keys through the leader, waits until every observer
has applied them, and runs ``wrk`` (``contrib/bench/read.lua``) for ``--seconds`` per case:

- ``linearizable`` and ``stale`` reads spread evenly over the observers (over the three voters
  when there is none): reads served per second;
- with no observer, also ``leader_only``: linearizable reads all sent to the leader, which
  serves them itself.

For each case it reports the leader's CPU seconds (user + system, from ``/proc/<pid>/stat``)
per 10,000 reads answered 200, the CPU share of every node and of ``wrk`` itself (from its
rusage; the machine's cores are shared by the cluster and the load generator), the answers
by HTTP status, and the load average. The leader's idle CPU (heartbeats, gossip) is measured
for ``--seconds`` before the runs and reported separately, so that it can be told apart.

Usage::

    python contrib/bench/read_bench.py [--observers 0,1,2,4] [--seconds 10]
        [--connections 8] [--keys 1000] [--tick-ms 100] [--dir DIR] [--json FILE]

Needs ``wrk`` (Debian: ``apt-get install wrk``). Every node started is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bwcore import cluster as local
from bwcore.client import Client
from benchlib import children_cpu_seconds, process_cpu_seconds, start_cluster, stop_cluster

LUA = Path(__file__).resolve().with_name("read.lua")
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}








def parse_wrk(output: str) -> dict[str, Any]:
    """Latency percentiles and status counts from wrk's ``--latency`` output."""
    out: dict[str, Any] = {}
    for name in ("50", "99"):
        match = re.search(rf"^\s+{name}%\s+([\d.]+)([a-z]+)", output, re.MULTILINE)
        if match:
            out[f"p{name}_ms"] = round(float(match.group(1)) * _UNITS[match.group(2)], 3)
    statuses = re.search(r"^STATUSES (\{.*\})$", output, re.MULTILINE)
    out["statuses"] = json.loads(statuses.group(1)) if statuses else {}
    errors = re.search(r"Socket errors: (.*)", output)
    if errors:
        out["socket_errors"] = errors.group(1).strip()
    return out


def read_batches(targets: list[str]) -> tuple[float, float]:
    """Summed over the targets: ReadIndex requests observers sent, and reads they batched."""
    requests = reads = 0.0
    for target in targets:
        try:
            with urllib.request.urlopen(f"{target}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue
        for name, value in re.findall(r"^(bwraft_observer_read_index_requests_total|"
                                      r"bwraft_observer_read_batch_size_sum) (\S+)$", text,
                                      re.MULTILINE):
            if name.endswith("requests_total"):
                requests += float(value)
            else:
                reads += float(value)
    return requests, reads


def run_wrk(targets: list[str], consistency: str, args: argparse.Namespace,
            pids: dict[str, int], leader: str) -> dict[str, Any]:
    """One wrk run, one thread per target; CPU of the leader, every node and wrk."""
    hosts = [t.removeprefix("http://") for t in targets]
    env = dict(os.environ, TARGETS=",".join(hosts), CONSISTENCY=consistency,
               KEYS=str(args.keys))
    threads = len(hosts)
    connections = max(threads, args.connections * threads)
    batches_before = read_batches(targets)
    cpu_before = {nid: process_cpu_seconds(pid) for nid, pid in pids.items()}
    children_before = children_cpu_seconds()
    started = time.perf_counter()
    process = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{args.seconds:g}s", "--latency",
         "--timeout", "10s", "-s", str(LUA), targets[0]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        timeout=args.seconds + 60, check=False)
    elapsed = time.perf_counter() - started
    wrk_cpu = children_cpu_seconds() - children_before
    node_cpu = {nid: process_cpu_seconds(pid) - cpu_before[nid] for nid, pid in pids.items()}
    result = parse_wrk(process.stdout)
    ok = result["statuses"].get("200", 0)
    requests, reads = (after - before for after, before in zip(read_batches(targets),
                                                                batches_before))
    return {
        "consistency": consistency, "targets": len(hosts), "connections": connections,
        "reads_s": round(ok / elapsed, 1), "p50_ms": result.get("p50_ms"),
        "p99_ms": result.get("p99_ms"), "statuses": result["statuses"],
        "leader_cpu_s_per_10k_reads": round(node_cpu[leader] / ok * 10_000, 3) if ok else None,
        "node_cpu_share": {nid: round(cpu / elapsed, 2) for nid, cpu in node_cpu.items()},
        "wrk_cpu_share": round(wrk_cpu / elapsed, 2),
        "observer_reads_per_read_index": round(reads / requests, 1) if requests else None,
        **({"socket_errors": result["socket_errors"]} if "socket_errors" in result else {}),
    }


def load_keys(cluster: local.Cluster, leader: str, keys: int, observers: list[str]) -> None:
    """Write k0..k<keys-1> and wait until every observer has applied them."""
    with Client([cluster.nodes[leader].api], deadline=60.0) as client:
        last = 0
        for k in range(keys):
            last = client.put(f"k{k}", "v" * 100)
    give_up_at = time.monotonic() + 60.0
    for observer in observers:
        while (local.fetch_status(cluster.nodes[observer].api) or {}).get(
                "applied_index", 0) < last:
            if time.monotonic() > give_up_at:
                raise RuntimeError(f"{observer} did not catch up")
            time.sleep(0.1)


def one_cluster(observers: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    cluster, leader = start_cluster(folder, args.tick_ms, observers=observers)
    try:
        pids = {nid: p.pid for nid, p in cluster.processes.items()}
        helper_ids = [n.id for n in cluster.nodes.values() if n.role == "observer"]
        load_keys(cluster, leader, args.keys, helper_ids)
        idle_before = process_cpu_seconds(pids[leader])
        time.sleep(args.seconds)  # the leader's idle cost over the same span as a run
        out: dict[str, Any] = {
            "observers": observers, "leader": leader,
            "leader_idle_cpu_share": round(
                (process_cpu_seconds(pids[leader]) - idle_before) / args.seconds, 3)}
        targets = [cluster.nodes[i].api for i in (helper_ids or cluster.voters)]
        for consistency in ("linearizable", "stale"):
            out[consistency] = run_wrk(targets, consistency, args, pids, leader)
        if not helper_ids:
            out["leader_only"] = run_wrk([cluster.nodes[leader].api], "linearizable", args,
                                         pids, leader)
        now = local.wait_for_leader(cluster, 10.0, among=cluster.voters)
        if now != leader:
            out["note"] = f"leader changed from {leader} to {now} during the runs"
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
        return out
    finally:
        stop_cluster(cluster)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| observers | reads to | consistency | reads/s | p50 ms | p99 ms | non-200 |"
             " leader CPU s / 10k reads | reads per ReadIndex | wrk CPU share |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        to = "observers" if r["observers"] else "voters"
        cases = [("linearizable", to), ("stale", to)]
        if "leader_only" in r:
            cases.append(("leader_only", "leader"))
        for case, where in cases:
            c = r[case]
            bad = sum(v for k, v in c["statuses"].items() if k != "200")
            lines.append(f"| {r['observers']} | {where} | {c['consistency']} | {c['reads_s']:,.0f}"
                         f" | {c['p50_ms']} | {c['p99_ms']} | {bad} |"
                         f" {c['leader_cpu_s_per_10k_reads']} |"
                         f" {c['observer_reads_per_read_index'] or '-'} | {c['wrk_cpu_share']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observers", default="0,1,2,4",
                        help="comma-separated observer counts")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8, help="per target node")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--tick-ms", type=int, default=100)
    parser.add_argument("--dir", help="folder for the clusters (default: a temporary one)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="bwraft-read-bench-"))
    results = []
    for observers in (int(n) for n in args.observers.split(",")):
        result = one_cluster(observers, args, base / f"observers{observers}")
        print(json.dumps(result), flush=True)
        results.append(result)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
