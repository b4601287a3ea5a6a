"""Durable write throughput and latency of a 3-voter bwraft cluster, measured at the leader.

The leader runs in this process; the two followers are ``twistd -n bwraft`` processes on
127.0.0.1. Every node uses the default storage (SQLite, WAL, ``synchronous=FULL``), so a write
is acknowledged only once it is fsynced on a majority. Proposals are KV ``put`` commands of
``--value-bytes`` bytes on 10,000 keys, submitted with ``RaftNode.propose`` (no HTTP).

Usage::

    python contrib/bench/node_bench.py [--seconds 10] [--window 1000] [--value-bytes 100]
        [--latency-count 2000] [--latency-seconds 10] [--runs 1] [--dir DIR]
        [--profile FILE]

Prints one JSON object per run (the same shape as PySyncObj's baseline script:
``latency_low_load`` with p50/p99 of single sequential writes, ``throughput`` with WINDOW
writes in flight), plus ``fsync_alone`` (an fsync of a 100-byte append in the leader's data
folder, what one durable write costs at least) and the CPU seconds each process used.

This process tunes its garbage collector as a node process does (``bwcore.tap.tune_gc``;
``--default-gc`` to compare). How the leader is chosen: the followers get a five times longer election timeout, so this
process's node times out and campaigns first; a run whose leader ends up elsewhere fails.
``--profile FILE`` writes a cProfile of the reactor thread during the throughput phase.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from bwcore import cluster as local
from bwcore.config import load_config
from bwcore.errors import Unavailable
from bwcore.kernel import StateRole
from bwcore.logs import configure_logging
from bwcore.node import RaftNode
from bwcore.plugins import PluginHost
from bwcore.tap import tune_gc
from bwraft_plugins.kv import encode_command
from benchlib import own_cpu_seconds, process_cpu_seconds

LEADER = "n1"
KEYS = 10_000
#: Followers wait this many times longer before campaigning, so the in-process node leads.
FOLLOWER_ELECTION_FACTOR = 5
GRACE_SECONDS = 10.0


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100.0 * len(ordered)))]


def summary(samples_ms: list[float]) -> dict[str, Any]:
    if not samples_ms:
        return {"n": 0}
    return {"n": len(samples_ms), "p50_ms": round(statistics.median(samples_ms), 3),
            "p99_ms": round(percentile(samples_ms, 99), 3)}


def fsync_alone(folder: Path, count: int = 200) -> dict[str, Any]:
    """Latency of appending 100 bytes to a file and fsyncing it, in ``folder``."""
    path = folder / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 100)
            started = time.perf_counter()
            os.fsync(fd)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return summary(samples)


class Bench:
    """One run: a planned cluster, the followers' processes and the in-process leader."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.cluster = local.plan(folder, voters=3, tick_ms=args.tick_ms)
        self.node: RaftNode | None = None
        self.value = "v" * args.value_bytes
        self.seq = 0

    def start_followers(self) -> None:
        self.cluster.dir.mkdir(parents=True)
        local.write_files(self.cluster)
        for node_id, info in self.cluster.nodes.items():
            if node_id == LEADER:
                continue
            # Top-level keys come before any table in TOML, so a first line is enough.
            slower = f"election_ticks = {10 * FOLLOWER_ELECTION_FACTOR}\n"
            info.config.write_text(slower + info.config.read_text(encoding="utf-8"),
                                   encoding="utf-8")
            local.start_node(self.cluster, node_id)

    def stop_followers(self) -> None:
        processes = [p for p in self.cluster.processes.values() if p.poll() is None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        give_up_at = time.monotonic() + GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.0, give_up_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    async def start_leader(self, reactor: Any) -> RaftNode:
        config = load_config(self.cluster.nodes[LEADER].config)
        host = PluginHost.from_config(config)
        node = RaftNode(config, host, reactor)
        node.startService()
        await node.when_started()
        self.node = node
        give_up_at = time.monotonic() + 60
        while node.kernel is None or node.kernel.role is not StateRole.LEADER \
                or node.kernel.commit_index < node.kernel.last_index:
            leader = node.kernel.leader if node.kernel is not None else None
            if leader not in (None, LEADER):
                raise RuntimeError(f"{leader} was elected instead of {LEADER}: run again")
            if time.monotonic() > give_up_at:
                raise RuntimeError(f"{LEADER} did not become leader within 60 s")
            await task.deferLater(reactor, 0.05, lambda: None)
        return node

    def command(self) -> bytes:
        self.seq += 1
        return encode_command("put", f"k{self.seq % KEYS}", value=self.value)

    async def latency(self) -> dict[str, Any]:
        assert self.node is not None
        samples: list[float] = []
        began = time.perf_counter()
        while len(samples) < self.args.latency_count \
                and time.perf_counter() - began < self.args.latency_seconds:
            data = self.command()
            started = time.perf_counter()
            await self.node.propose(data)
            samples.append((time.perf_counter() - started) * 1000)
        return summary(samples)

    async def throughput(self) -> dict[str, Any]:
        node = self.node
        assert node is not None
        done: Deferred[None] = Deferred()
        counts = {"ok": 0, "err": 0, "in_flight": 0}
        samples: list[float] = []
        deadline = time.perf_counter() + self.args.seconds

        def submit() -> None:
            counts["in_flight"] += 1
            started = time.perf_counter()
            d = Deferred.fromCoroutine(node.propose(self.command()))
            d.addCallbacks(finished, failed, callbackArgs=(started,))

        def finished(_: Any, started: float) -> None:
            now = time.perf_counter()
            counts["ok"] += 1
            samples.append((now - started) * 1000)
            settle(now)

        def failed(failure: Any) -> None:
            failure.trap(Unavailable)
            counts["err"] += 1
            settle(time.perf_counter())

        def settle(now: float) -> None:
            counts["in_flight"] -= 1
            if now < deadline:
                submit()
            elif counts["in_flight"] == 0 and not done.called:
                done.callback(None)

        began = time.perf_counter()
        for _ in range(self.args.window):
            submit()
        await done
        elapsed = time.perf_counter() - began
        return {"ops_s": round(counts["ok"] / elapsed, 1), "errors": counts["err"],
                "window": self.args.window, "latency": summary(samples)}

    async def run(self, reactor: Any) -> dict[str, Any]:
        self.start_followers()
        try:
            node = await self.start_leader(reactor)
            leader_dir = Path(node.config.data_dir)
            result: dict[str, Any] = {
                "system": "bwraft", "nodes": 3, "durable": True,
                "storage": node.storage.durability(), "value_bytes": self.args.value_bytes,
                "fsync_alone": fsync_alone(leader_dir),
            }
            result["latency_low_load"] = await self.latency()
            pids = {nid: p.pid for nid, p in self.cluster.processes.items()}
            cpu_before = {nid: process_cpu_seconds(pid) for nid, pid in pids.items()}
            cpu_before[LEADER] = own_cpu_seconds()
            wall = time.perf_counter()
            profiler = cProfile.Profile() if self.args.profile else None
            if profiler is not None:
                profiler.enable()
            result["throughput"] = await self.throughput()
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(self.args.profile)
            wall = time.perf_counter() - wall
            cpu = {nid: process_cpu_seconds(pid) - cpu_before[nid] for nid, pid in pids.items()}
            cpu[LEADER] = own_cpu_seconds() - cpu_before[LEADER]
            result["throughput"]["cpu_share"] = {
                nid: round(seconds / wall, 2) for nid, seconds in sorted(cpu.items())}
            writes = max(1.0, result["throughput"]["ops_s"] * wall)
            result["throughput"]["cpu_us_per_write"] = {
                nid: round(seconds / writes * 1e6, 1) for nid, seconds in sorted(cpu.items())}
            result["throughput"]["leader_metrics"] = _leader_metrics(node)
            return result
        finally:
            if self.node is not None:
                await self.node.stopService()
            self.stop_followers()


def _leader_metrics(node: RaftNode) -> dict[str, float]:
    """Means of the leader's histograms over the whole run: what a save and a Ready cost."""
    sums: dict[str, float] = {}
    for metric in node.registry.collect():
        for sample in metric.samples:
            sums[sample.name] = sample.value
    out: dict[str, float] = {"readies": sums.get("bwraft_readies_total", 0.0)}
    for name, short, scale in (("bwraft_storage_save_entries", "entries_per_save", 1),
                               ("bwraft_storage_fsync_seconds", "save_ms", 1000),
                               ("bwraft_ready_reactor_seconds", "ready_reactor_ms", 1000)):
        count = sums.get(f"{name}_count", 0.0)
        out[f"mean_{short}"] = round(sums.get(f"{name}_sum", 0.0) / count * scale, 3) \
            if count else 0.0
        out[f"{short}_count"] = count
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--tick-ms", type=int, default=100)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--dir", help="folder for the clusters (default: a temporary one;"
                                      " keep it off tmpfs, or fsync costs nothing)")
    parser.add_argument("--profile", help="write a cProfile of the throughput phase here")
    parser.add_argument("--default-gc", action="store_true",
                        help="keep CPython's GC thresholds in this process instead of the"
                             " ones a node process uses (bwcore.tap.tune_gc)")
    args = parser.parse_args()
    configure_logging("warning", "json")
    if not args.default_gc:
        tune_gc()  # as `twistd bwraft` does for a node process

    async def all_runs(reactor: Any) -> None:
        base = Path(args.dir or tempfile.mkdtemp(prefix="bwraft-node-bench-"))
        for run in range(args.runs):
            result = await Bench(args, base / f"run{run}").run(reactor)
            result["load_average"] = [round(x, 2) for x in os.getloadavg()]
            print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(all_runs(reactor)))


if __name__ == "__main__":
    sys.exit(main())
