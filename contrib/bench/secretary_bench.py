"""What a secretary saves the leader: the same write load with and without one.

For each N in ``--followers`` (default 2 4 8) this starts two local clusters of ``twistd -n
bwraft`` processes on 127.0.0.1, one after the other: datacenter ``west`` holds the leader
``n1`` and one follower, datacenter ``east`` holds N followers — and, in the second cluster, one
secretary. Every node uses the default storage (SQLite, ``synchronous=FULL``). ``wrk`` (one
thread pinned to CPU ``--wrk-cpu`` with ``taskset``, ``--clients`` keep-alive connections,
``contrib/bench/put.lua``) sends KV writes of ``--value-bytes`` bytes to the leader's API for
``--seconds`` (after a one-second warm-up, which starts only once every voter has the leader's
whole log). Measured at the leader, over the timed run only:

- bytes and messages the leader's peer transport sent per committed entry
  (``bwraft_transport_sent_bytes_total`` / ``_messages_total`` on its /metrics, all peers,
  divided by the growth of its commit index: heartbeats included);
- the leader process's CPU seconds per 10,000 writes (utime + stime from /proc/<pid>/stat);
- write throughput (acknowledged writes per second of wall time), and wrk's CPU share.

The leader is placed in ``west`` the way a leadership transfer ends (Raft dissertation §3.10):
a TIMEOUT_NOW in the current term sent to ``n1`` over the peer protocol.

Usage::

    python contrib/bench/secretary_bench.py [--followers 0 2 4 8] [--seconds 10]
        [--clients 16] [--value-bytes 1024] [--tick-ms 100] [--repeat 3] [--wrk-cpu 1]
        [--rate 0] [--leader-cpu 0] [--local-followers 1] [--json FILE]

``--rate R`` paces wrk's writes to R per second (``put.lua``'s ``RATE``; slots missed because
every connection is waiting are made up while under 100 ms behind, skipped beyond), so that both
clusters carry the same load instead of each running as fast as it can: CPU per write then
compares the leader's work like with like.
``--leader-cpu C`` runs the leader on CPU C alone and every other node on the other CPUs (wrk
stays on ``--wrk-cpu``, which must not be C), as if the leader had a machine of its own.
``--local-followers 0`` leaves the leader alone in ``west`` (default 1: ``n2`` is there too), so
that every follower is in the remote datacenter.

Needs ``wrk`` (Debian: ``apt-get install wrk``). ``--followers 0`` adds the floor: the leader
alone, same load, no replication at all.
``--repeat R`` runs each configuration R times, as pairs (direct, with a secretary; every other
pair runs the secretary cluster first), and reports the median of each figure (CPU figures on a
shared machine move by 10-20% from run to run) and each pair's change in leader CPU. It prints a
Markdown table (the one in docs/benchmarks.md, "Secretaries") and, with ``--json``, every run's
figures. Benchmarks print figures; they assert nothing.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bwcore import cluster as local
from bwcore.codec import Hello, encode_frame
from bwcore.kernel import Message, MessageType
from benchlib import (busy_percent, children_cpu_seconds, cpu_times, every_voter_caught_up,
                      pinned, process_cpu_seconds)
from http_bench import LUA, parse_wrk

LEADER = "n1"
WAIT_S = 90.0


@dataclass
class Result:
    followers: int
    secretary: bool
    writes: int
    seconds: float
    committed: int
    bytes_per_entry: float
    messages_per_entry: float
    cpu_per_10k_writes: float
    writes_per_second: float
    relayed_entries: float
    wrk_cpu_share: float
    #: Write latency percentiles, from wrk.
    p50_ms: float
    p99_ms: float
    entries_per_save: float
    #: The leader's mean save (one transaction and its fsync), in ms: entries proposed while
    #: a save runs go into the next one, so the longer saves take, the more each one carries.
    save_ms: float
    readies_per_write: float
    #: With --leader-cpu: how busy the other CPUs were (%), where the other nodes run.
    others_busy: int | None = None


def status(cluster: local.Cluster, node_id: str) -> dict:
    return local.fetch_status(cluster.nodes[node_id].api, timeout=5.0) or {}


def scrape(cluster: local.Cluster, node_id: str) -> dict[str, float]:
    """The node's /metrics, summed over labels: name -> value."""
    url = urllib.parse.urlsplit(cluster.nodes[node_id].api)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + float(value)
    return out


def wait(condition, timeout: float, what: str):
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def make_leader(cluster: local.Cluster, target: str, voters: list[str]) -> None:
    for _ in range(10):
        leader = local.wait_for_leader(cluster, WAIT_S, among=voters)
        if leader == target:
            return
        term = status(cluster, leader)["term"]
        host, _, port = cluster.nodes[target].raft.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(encode_frame(Hello("bench-transfer", "bwraft-local"))
                         + encode_frame(Message(MessageType.TIMEOUT_NOW, target, leader, term)))
        wait(lambda term=term: status(cluster, target).get("term", 0) > term, 30,
             "the campaign")
    raise SystemExit(f"{target} never became leader")


def drive(api: str, seconds: float, args: argparse.Namespace
          ) -> tuple[int, float, dict[str, Any]]:
    """Run wrk against ``api`` for ``seconds``: (writes answered 200, wrk's CPU seconds, what
    :func:`http_bench.parse_wrk` read from its output: latency percentiles).
    Any other answer means the run is void (a leader change, an overload): it stops here."""
    env = dict(os.environ, VALUE_BYTES=str(args.value_bytes), RATE=f"{args.rate:g}")
    before = children_cpu_seconds()
    output = subprocess.run(
        ["taskset", "-c", str(args.wrk_cpu), "wrk", "-t1", f"-c{args.clients}",
         f"-d{seconds:g}s", "--latency", "--timeout", "10s", "-s", str(LUA), api],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        timeout=seconds + 60, check=True).stdout
    parsed = parse_wrk(output)
    statuses = parsed["statuses"]
    if not statuses.get("200") or any(n for status, n in statuses.items() if status != "200"):
        raise SystemExit(f"writes failed: answers by status {statuses}\n{output}")
    return statuses["200"], children_cpu_seconds() - before, parsed


def run(base: Path, followers: int, with_secretary: bool, args: argparse.Namespace) -> Result:
    """One cluster: n1 and n2 in west, ``followers`` voters in east (0: n1 alone, the floor:
    what a write costs the leader without any replication)."""
    alone = followers == 0
    cluster = local.plan(base / f"n{followers}-{'sec' if with_secretary else 'direct'}",
                         voters=1 if alone else 1 + args.local_followers + followers,
                         secretaries=1 if with_secretary else 0,
                         tick_ms=args.tick_ms, datacenters=("west", "east"))
    west = {f"n{k}" for k in range(1, 2 + (0 if alone else args.local_followers))}
    for node_id, node in list(cluster.nodes.items()):
        cluster.nodes[node_id] = replace(node, datacenter="west" if node_id in west else "east")
    voters = [n for n, node in cluster.nodes.items() if node.role == "voter"]
    east = sorted(set(voters) - west)
    cluster.dir.mkdir(parents=True)
    local.write_files(cluster)
    try:
        for node_id in cluster.nodes:
            with pinned(args.leader_cpu, leader=node_id == LEADER):
                local.start_node(cluster, node_id)
        local.wait_for_leader(cluster, WAIT_S, among=list(cluster.nodes))
        if not alone:
            make_leader(cluster, LEADER, voters)
        if with_secretary:
            wait(lambda: (status(cluster, LEADER).get("secretaries") or {}).get("assignment")
                 == {"sec1": east}, WAIT_S, "the secretary to be hired")
        wait(lambda: every_voter_caught_up(status(cluster, LEADER)), WAIT_S,
             "every voter to catch up")
        api = cluster.nodes[LEADER].api
        drive(api, 1.0, args)   # warm-up
        pid = cluster.processes[LEADER].pid
        before, commit0, cpu0 = scrape(cluster, LEADER), status(cluster, LEADER)[
            "commit_index"], process_cpu_seconds(pid)
        times0 = cpu_times()
        started = time.monotonic()
        writes, wrk_cpu, wrk = drive(api, args.seconds, args)
        seconds = time.monotonic() - started
        times1 = cpu_times()
        after, commit1, cpu1 = scrape(cluster, LEADER), status(cluster, LEADER)[
            "commit_index"], process_cpu_seconds(pid)
        if status(cluster, LEADER).get("role") != "leader":
            raise SystemExit("the leader changed during the run")
        committed = commit1 - commit0

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        return Result(
            followers=followers, secretary=with_secretary, writes=writes,
            seconds=round(seconds, 2), committed=committed,
            bytes_per_entry=round(delta("bwraft_transport_sent_bytes_total") / committed, 1),
            messages_per_entry=round(delta("bwraft_transport_sent_messages_total")
                                     / committed, 3),
            cpu_per_10k_writes=round((cpu1 - cpu0) / writes * 10_000, 2),
            writes_per_second=round(writes / seconds, 1),
            relayed_entries=delta("bwraft_secretary_leader_relayed_entries_total"),
            wrk_cpu_share=round(wrk_cpu / seconds, 2),
            p50_ms=wrk.get("p50_ms", 0.0), p99_ms=wrk.get("p99_ms", 0.0),
            entries_per_save=round(delta("bwraft_storage_save_entries_sum")
                                   / max(1.0, delta("bwraft_storage_save_entries_count")), 2),
            save_ms=round(1000 * delta("bwraft_storage_fsync_seconds_sum")
                          / max(1.0, delta("bwraft_storage_fsync_seconds_count")), 2),
            readies_per_write=round(delta("bwraft_readies_total") / writes, 3),
            others_busy=None if args.leader_cpu is None else busy_percent(
                times0, times1, set(times1) - {args.leader_cpu}))
    finally:
        local.down(cluster, grace=10.0)


def table(results: list[Result], value_bytes: int, local_followers: int = 1) -> str:
    """Medians per configuration, and the targets' arithmetic; ``local_followers``: followers
    in the leader's datacenter."""
    rows = ["| N east | secretary | bytes/entry | msgs/entry | leader CPU s/10k writes "
            "| writes/s | p50 / p99 ms | relayed entries | entries/save | save ms | wrk CPU "
            "| other CPUs busy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "leader alone" if r.followers == 0 else str(r.followers)
        rows.append(f"| {name} | {'yes' if r.secretary else 'no'} | "
                    f"{r.bytes_per_entry:,.0f} | {r.messages_per_entry:.2f} | "
                    f"{r.cpu_per_10k_writes:.1f} | {r.writes_per_second:.0f} | "
                    f"{r.p50_ms:.1f} / {r.p99_ms:.1f} | "
                    f"{r.relayed_entries:,.0f} | {r.entries_per_save:.1f} | {r.save_ms:.2f} | "
                    f"{r.wrk_cpu_share:.2f} | "
                    + (f"{r.others_busy}% |" if r.others_busy is not None else "|"))
    by = {(r.followers, r.secretary): r for r in results}
    floor = by.get((0, False))
    notes = []
    for n in sorted({r.followers for r in results} - {0}):
        direct, relayed = by.get((n, False)), by.get((n, True))
        if direct and relayed:
            one_copy = direct.bytes_per_entry / (n + local_followers)   # one per follower
            copies = 1 + local_followers   # one to the secretary, one to each west follower
            bound = 1.2 * copies * one_copy
            saved = 1 - relayed.cpu_per_10k_writes / direct.cpu_per_10k_writes
            notes.append(
                f"N={n}: with a secretary {relayed.bytes_per_entry:,.0f} bytes/entry vs "
                f"{copies * one_copy:,.0f} for {copies} copies (limit 1.2x: {bound:,.0f}); "
                f"leader CPU per write {100 * saved:.0f}% lower")
            if floor is not None:
                above = [r.cpu_per_10k_writes - floor.cpu_per_10k_writes for r in (direct, relayed)]
                notes.append(f"N={n}: leader CPU above the leader-alone floor: {above[0]:.1f} s "
                             f"direct, {above[1]:.1f} s with a secretary per 10k writes")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + \
        f"\n\n({value_bytes}-byte values.)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--followers", type=int, nargs="+", default=[2, 4, 8],
                    help="east followers per run; 0 measures the leader alone (the floor)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--wrk-cpu", type=int, default=1, help="the CPU wrk is pinned to")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--tick-ms", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=None, help="keep the clusters here")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="writes per second, paced (0: each connection as fast as answered)")
    ap.add_argument("--leader-cpu", type=int, default=None,
                    help="run the leader on this CPU alone, the other nodes on the rest")
    ap.add_argument("--local-followers", type=int, choices=(0, 1), default=1,
                    help="followers in the leader's datacenter (0: all are remote)")
    args = ap.parse_args(argv)
    if args.rate < 0:
        ap.error("--rate must not be negative")
    if args.leader_cpu is not None and (
            not 0 <= args.leader_cpu < (os.cpu_count() or 1) or os.cpu_count() == 1
            or args.leader_cpu == args.wrk_cpu):
        ap.error("--leader-cpu needs another CPU, for the other nodes and wrk")
    runs: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bwraft-secretary-bench-") as tmp:
        base = args.dir or Path(tmp)
        for n in args.followers:
            for k in range(args.repeat):
                # ABBA: every other pair runs the secretary cluster first, so that whatever
                # one run leaves to the next weighs on both kinds of run alike.
                order = (False, True) if k % 2 == 0 else (True, False)
                for with_secretary in order if n else (False,):
                    r = run(base / f"run{k}", n, with_secretary, args)
                    print(json.dumps(asdict(r)), file=sys.stderr, flush=True)
                    runs.append(r)
    print(table(medians(runs), args.value_bytes, args.local_followers))
    if args.repeat > 1:
        print("\n" + "\n".join(f"- {line}" for line in paired_changes(runs)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0


def paired_changes(runs: list[Result]) -> list[str]:
    """Each secretary run's leader CPU against the direct run of the same pair (the two ran
    back to back, so the machine's drift between pairs cancels out)."""
    groups: dict[tuple[int, bool], list[Result]] = {}
    for r in runs:
        groups.setdefault((r.followers, r.secretary), []).append(r)
    lines = []
    for (n, sec), relayed in sorted(groups.items()):
        if not sec:
            continue
        changes = [s.cpu_per_10k_writes / d.cpu_per_10k_writes - 1
                   for d, s in zip(groups[(n, False)], relayed)]
        lines.append(f"N={n}: leader CPU per write, change per pair "
                     + " / ".join(f"{c:+.0%}" for c in changes)
                     + f"; median {statistics.median(changes):+.0%}")
    return lines


def medians(runs: list[Result]) -> list[Result]:
    """One result per configuration: the median of each figure over its runs."""
    groups: dict[tuple[int, bool], list[Result]] = {}
    for r in runs:
        groups.setdefault((r.followers, r.secretary), []).append(r)
    out = []
    for rs in groups.values():
        fields = {f: statistics.median(getattr(r, f) for r in rs)
                  for f in ("seconds", "bytes_per_entry", "messages_per_entry",
                            "cpu_per_10k_writes", "writes_per_second", "relayed_entries",
                            "wrk_cpu_share", "p50_ms", "p99_ms", "entries_per_save", "save_ms",
                            "readies_per_write")}
        busy = [r.others_busy for r in rs if r.others_busy is not None]
        if busy:
            fields["others_busy"] = round(statistics.median(busy))
        out.append(replace(rs[0], **fields))
    return out


if __name__ == "__main__":
    sys.exit(main())
