"""What a secretary saves the leader when no client API is in the leader's path.

The same clusters as ``secretary_bench.py`` (``west``: the leader ``n1`` and one follower, or
``--local-followers`` of them; ``east``: N followers and, in the second cluster, one secretary;
SQLite, ``synchronous=FULL``),
but the leader runs in this process and proposals are submitted with ``RaftNode.propose``,
``--window`` in flight, for ``--seconds``: the leader's CPU is then what proposing, saving,
applying and replicating cost, without HTTP. The other nodes are ``twistd`` processes whose
election timeout is five times longer, so that this process's node leads. Each run starts
measuring (after a one-second warm-up) only once every voter has acknowledged the leader's whole
log, so that no follower's start-up catch-up falls into the measured window.

Usage::

    python contrib/bench/secretary_inproc_bench.py [--followers 0 2 4 8] [--seconds 8]
        [--window 16 | --rate 1000] [--value-bytes 1024] [--leader-cpu 0] [--repeat 3]
        [--local-followers 1]

``--leader-cpu 0`` runs the leader on CPU 0 alone and every other node on the other CPUs, so
that the leader's CPU time is its own work, not slowed by sharing a core with its followers.
``--window`` keeps that many writes in flight (closed loop): the clusters then run at their own
speeds, and CPU per write also reflects how well each batches. ``--rate`` submits that many
writes per second whatever the latency (open loop): both clusters do the same work per second,
and CPU per write compares the leader's work alone. ``--local-followers 0`` leaves the leader
alone in its datacenter, so that every follower is in the remote one.

With ``--repeat``, each repeat is a pair (direct, with a secretary), and every other pair runs
the secretary cluster first. Prints one JSON line per run and a Markdown table of the medians.
The leader's CPU is this process's (user + system), per 10,000 acknowledged writes, and
separately the reactor thread's (the rest is mostly the storage writer thread: SQLite and its
fsyncs, the same work with and without a secretary), and how many times per write the reactor
went round its loop (each wake-up costs a poll and a pass over the timers); with
``--leader-cpu``, each run also records how busy the other CPUs were (if they are saturated,
the followers answer late and in bunches, and the leader's CPU per write swings from run to
run). Benchmarks assert nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from bwcore import cluster as local
from bwcore.config import load_config
from bwcore.errors import Unavailable
from bwcore.logs import configure_logging
from bwcore.node import RaftNode
from bwcore.plugins import PluginHost
from bwcore.tap import tune_gc
from bwraft_plugins.kv import encode_command
from benchlib import busy_percent, cpu_times, every_voter_caught_up, own_cpu_seconds, pinned

LEADER = "n1"
SLOWER = 5   # the other nodes' election timeout, in multiples of the leader's
WAIT_S = 60.0
PACE_S = 0.005          # with --rate: how often writes are submitted
MAX_IN_FLIGHT = 1000    # with --rate: writes beyond this many in flight are skipped
#: Entries saved, saves, Readies, secretary reports: how much each round of work carries (CPU
#: per write depends on it); take-backs, each of which sends a while directly; and messages
#: the leader's send queues dropped (a peer too slow to read), which it may send again.
BATCHING = ("bwraft_storage_save_entries_sum", "bwraft_storage_save_entries_count",
            "bwraft_readies_total", "bwraft_secretary_leader_reports_total",
            "bwraft_secretary_takebacks_total", "bwraft_transport_dropped_messages_total")


@dataclass
class Result:
    followers: int
    secretary: bool
    writes: int
    cpu_per_10k_writes: float
    #: Of which the reactor thread (the rest: the storage writer's saves and fsyncs).
    reactor_cpu_per_10k_writes: float
    writes_per_second: float
    bytes_per_entry: float
    entries_per_save: float
    readies_per_write: float
    #: Reactor loop iterations (each one poll of its sockets and timers).
    iterations_per_write: float
    reports_per_write: float
    takebacks: int
    #: Messages dropped from the leader's send queues.
    dropped: int
    #: How busy the CPUs other than the leader's were (%), where the other nodes run.
    others_busy: int | None = None


def sample(node: RaftNode, name: str) -> float:
    """The sum of a metric's samples in the in-process node's registry."""
    return sum(s.value for m in node.registry.collect() for s in m.samples if s.name == name)


@contextlib.contextmanager
def counting_iterations(reactor: Any) -> Iterator[list[int]]:
    """Count the reactor's loop iterations inside the block (``[count]``): how often the leader
    wakes up, each time paying for a poll and a pass over its timers. Wraps ``doIteration`` on
    the reactor instance for the while; a count costs well under a microsecond."""
    count = [0]
    iterate = reactor.doIteration

    def counted(delay: float | None) -> None:
        count[0] += 1
        iterate(delay)

    reactor.doIteration = counted
    try:
        yield count
    finally:
        del reactor.doIteration   # the reactor's own method again


async def pause(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def one_run(reactor: Any, base: Path, followers: int, with_secretary: bool,
                  args: argparse.Namespace) -> Result:
    alone = followers == 0
    local_followers = 0 if alone else args.local_followers
    west = {f"n{k}" for k in range(1, 2 + local_followers)}   # the leader and its neighbours
    cluster = local.plan(base / f"n{followers}-{'sec' if with_secretary else 'direct'}",
                         voters=1 + local_followers + followers,
                         secretaries=1 if with_secretary else 0,
                         tick_ms=args.tick_ms, datacenters=("west", "east"))
    for node_id, node in list(cluster.nodes.items()):
        cluster.nodes[node_id] = replace(node, datacenter="west" if node_id in west else "east")
    cluster.dir.mkdir(parents=True)
    local.write_files(cluster)
    node: RaftNode | None = None
    try:
        for node_id, info in cluster.nodes.items():
            if node_id == LEADER:
                continue
            # Top-level keys come before any table in TOML, so a first line is enough.
            info.config.write_text(f"election_ticks = {10 * SLOWER}\n"
                                   + info.config.read_text(encoding="utf-8"), encoding="utf-8")
            with pinned(args.leader_cpu, leader=False):
                local.start_node(cluster, node_id)
        config = load_config(cluster.nodes[LEADER].config)
        node = RaftNode(config, PluginHost.from_config(config), reactor)
        node.startService()
        await node.when_started()
        give_up = time.monotonic() + WAIT_S
        east = sorted(n for n, i in cluster.nodes.items()
                      if i.role == "voter" and n not in west)
        while True:
            kernel = node.kernel
            # Committed, and every voter connected and caught up: else a follower that started
            # late catches up inside the measured window (its backlog, and the re-sends after
            # its refusals), which costs the leader CPU and bytes that are not per write.
            leading = kernel is not None and kernel.commit_index >= kernel.last_index \
                and every_voter_caught_up(kernel.status())
            hired = not with_secretary or (node.status().get("secretaries") or {}).get(
                "assignment") == {"sec1": east}
            if leading and hired:
                break
            if kernel is not None and kernel.leader not in (None, LEADER):
                raise SystemExit(f"{kernel.leader} was elected instead of {LEADER}: run again")
            if time.monotonic() > give_up:
                raise SystemExit("no leader (or no secretary hired) in time")
            await pause(reactor, 0.05)
        value = "v" * args.value_bytes
        seq = 0

        async def drive(seconds: float) -> int:
            done: Deferred[None] = Deferred()
            counts = {"ok": 0, "in_flight": 0}
            deadline = time.perf_counter() + seconds

            def submit() -> None:
                nonlocal seq
                seq += 1
                counts["in_flight"] += 1
                d = Deferred.fromCoroutine(node.propose(
                    encode_command("put", f"k{seq % 10_000}", value=value)))
                d.addCallbacks(finished, failed)

            def finished(_: Any) -> None:
                counts["ok"] += 1
                settle()

            def failed(failure: Any) -> None:
                failure.trap(Unavailable)
                settle()

            def settle() -> None:
                counts["in_flight"] -= 1
                if not args.rate and time.perf_counter() < deadline:
                    submit()
                elif counts["in_flight"] == 0 and time.perf_counter() >= deadline \
                        and not done.called:
                    done.callback(None)

            if not args.rate:
                for _ in range(args.window):
                    submit()
                await done
                return counts["ok"]
            # Open loop: ``--rate`` writes per second whatever the latency, so that both
            # clusters do the same work per second and CPU per write compares like with like.
            begun, paced = time.perf_counter(), 0

            def pace() -> None:
                nonlocal paced
                now = time.perf_counter()
                if now >= deadline:
                    pacer.stop()
                    if counts["in_flight"] == 0 and not done.called:
                        done.callback(None)
                    return
                due = int((now - begun) * args.rate) - paced
                for _ in range(min(due, MAX_IN_FLIGHT - counts["in_flight"])):
                    submit()
                paced += due   # what could not be submitted is skipped, not queued

            pacer = task.LoopingCall(pace)
            pacer.clock = reactor
            pacer.start(PACE_S)
            await done
            return counts["ok"]

        await drive(1.0)   # warm-up
        times0 = cpu_times()
        cpu0, sent0 = own_cpu_seconds(), sample(node, "bwraft_transport_sent_bytes_total")
        reactor0 = time.thread_time()   # this thread runs the reactor
        counts0 = [sample(node, name) for name in BATCHING]
        commit0, started = node.kernel.commit_index, time.perf_counter()
        with counting_iterations(reactor) as iterations:
            writes = await drive(args.seconds)
        seconds = time.perf_counter() - started
        cpu = own_cpu_seconds() - cpu0
        reactor = time.thread_time() - reactor0
        times1 = cpu_times()
        others = None
        if args.leader_cpu is not None:
            others = busy_percent(times0, times1, set(times1) - {args.leader_cpu})
        committed = max(1, node.kernel.commit_index - commit0)
        sent = sample(node, "bwraft_transport_sent_bytes_total") - sent0
        saved, saves, readies, reports, takebacks, dropped = (
            sample(node, name) - c0 for name, c0 in zip(BATCHING, counts0))
        return Result(followers, with_secretary, writes,
                      round(cpu / max(1, writes) * 10_000, 2),
                      round(reactor / max(1, writes) * 10_000, 2), round(writes / seconds, 1),
                      round(sent / committed, 1), round(saved / max(1, saves), 1),
                      round(readies / max(1, writes), 2),
                      round(iterations[0] / max(1, writes), 2),
                      round(reports / max(1, writes), 3),
                      int(takebacks), int(dropped), others)
    finally:
        try:
            if node is not None:
                await node.stopService()
        finally:
            local.down(cluster, grace=10.0)   # the other nodes go even if the leader's stop fails


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--followers", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--window", type=int, default=16,
                    help="writes in flight (closed loop; the default)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="writes per second, open loop (0: closed loop with --window)")
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--leader-cpu", type=int, default=None,
                    help="pin the leader (this process) to this CPU and the other nodes to "
                         "the rest, as if the leader had a machine of its own")
    ap.add_argument("--local-followers", type=int, default=1,
                    help="followers in the leader's datacenter (0: all are remote)")
    ap.add_argument("--tick-ms", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    if args.local_followers < 0:
        ap.error("--local-followers must not be negative")
    if args.leader_cpu is not None:
        if not 0 <= args.leader_cpu < (os.cpu_count() or 1) or os.cpu_count() == 1:
            ap.error("--leader-cpu needs another CPU for the other nodes")
        os.sched_setaffinity(0, {args.leader_cpu})
    configure_logging("warning", "json")
    tune_gc()   # as `twistd bwraft` does for a node process
    runs: list[Result] = []

    async def all_runs(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bwraft-secretary-inproc-") as tmp:
            for n in args.followers:
                for k in range(args.repeat):
                    # ABBA: every other pair runs the secretary cluster first, so that
                    # whatever one run leaves to the next (processes still exiting, files
                    # still being written back) weighs on both kinds of run alike.
                    order = (False, True) if k % 2 == 0 else (True, False)
                    for with_secretary in order if n else (False,):
                        r = await one_run(reactor, Path(tmp) / f"run{k}", n, with_secretary,
                                          args)
                        print(json.dumps(asdict(r)), file=sys.stderr, flush=True)
                        runs.append(r)
        print(table(runs))

    task.react(lambda reactor: defer.ensureDeferred(all_runs(reactor)))   # exits when done
    return 0


def table(runs: list[Result]) -> str:
    """Medians per cluster; "change" is the median over repeats of each secretary run's leader
    CPU against the direct run of the same repeat (the pair ran back to back, so the machine's
    drift between repeats cancels out), with the lowest and highest pair in brackets;
    "dropped" is how many messages the leader's send queues dropped, all runs together; "other
    CPUs busy" (with ``--leader-cpu``) is how busy the CPUs of the other nodes were."""
    groups: dict[tuple[int, bool], list[Result]] = {}
    for r in runs:
        groups.setdefault((r.followers, r.secretary), []).append(r)
    rows = ["| N east | secretary | leader CPU s/10k writes | of which reactor thread "
            "| change (paired) | writes/s | bytes/entry | entries/save | reactor iterations/write "
            "| reports/write | take-backs | dropped | other CPUs busy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, sec), rs in sorted(groups.items()):
        med = {f: statistics.median(getattr(r, f) for r in rs)
               for f in ("cpu_per_10k_writes", "reactor_cpu_per_10k_writes",
                         "writes_per_second", "bytes_per_entry",
                         "entries_per_save", "iterations_per_write", "reports_per_write")}
        busy = [r.others_busy for r in rs if r.others_busy is not None]
        change = ""
        if sec:
            ratios = [s.cpu_per_10k_writes / d.cpu_per_10k_writes
                      for d, s in zip(groups[(n, False)], rs)]
            change = f"{statistics.median(ratios) - 1:+.0%}"
            if len(ratios) > 1:   # single pairs on a noisy machine: how far they spread
                change += f" ({min(ratios) - 1:+.0%} to {max(ratios) - 1:+.0%})"
        rows.append(f"| {'leader alone' if n == 0 else n} | {'yes' if sec else 'no'} | "
                    f"{med['cpu_per_10k_writes']:.2f} | "
                    f"{med['reactor_cpu_per_10k_writes']:.2f} | {change} | "
                    f"{med['writes_per_second']:.0f} | "
                    f"{med['bytes_per_entry']:,.0f} | {med['entries_per_save']:.1f} | "
                    f"{med['iterations_per_write']:.2f} | "
                    f"{med['reports_per_write']:.2f} | {sum(r.takebacks for r in rs)} | "
                    f"{sum(r.dropped for r in rs)} | "
                    + (f"{min(busy)}-{max(busy)}% |" if busy else "|"))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
