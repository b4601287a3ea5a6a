#!/usr/bin/env python3
"""Kernel throughput: entries committed per CPU-second in a 3-voter cluster with no I/O.

    python contrib/bench/kernel_bench.py [--entries 300000] [--batch 256] [--size 100] [--runs 5]

A bare driver moves Readies between three RawNodes in one process (no storage, no sockets,
no safety checker), proposing ``--batch`` entries of ``--size`` bytes at a time at the leader,
and counts entries applied on every node. Prints one JSON line per run and the median.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections import deque

from bwcore.kernel import ConfState, KernelConfig, RawNode, StateRole


def run_once(entries: int, batch: int, size: int) -> dict:
    ids = ["a", "b", "c"]
    boot = ConfState(voters=frozenset(ids))
    nodes = {i: RawNode(KernelConfig(id=i), random.Random(k), bootstrap=boot)
             for k, i in enumerate(ids)}
    inbox: deque = deque()
    applied = {i: 0 for i in ids}

    def pump() -> None:
        progress = True
        while progress:
            progress = False
            for i, raw in nodes.items():
                while raw.has_ready():
                    progress = True
                    rd = raw.ready()
                    inbox.extend(rd.messages)
                    inbox.extend(rd.persisted_messages)
                    applied[i] += len(rd.committed_entries)
                    raw.advance(rd)
            while inbox:
                progress = True
                m = inbox.popleft()
                nodes[m.to].step(m)

    while not any(r.role is StateRole.LEADER for r in nodes.values()):
        for r in nodes.values():
            r.tick()
        pump()
    leader = next(r for r in nodes.values() if r.role is StateRole.LEADER)
    base = dict(applied)
    payload = [b"x" * size] * batch
    t0 = time.process_time()
    proposed = 0
    while proposed < entries:
        leader.propose_many(payload)
        proposed += batch
        pump()
    cpu = time.process_time() - t0
    done = min(applied[i] - base[i] for i in ids)
    return {"entries": done, "cpu_s": round(cpu, 3), "entries_per_cpu_s": round(done / cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=300_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rates = []
    for _ in range(args.runs):
        r = run_once(args.entries, args.batch, args.size)
        rates.append(r["entries_per_cpu_s"])
        print(json.dumps(r))
    print(json.dumps({"benchmark": "kernel", "voters": 3, "batch": args.batch,
                      "entry_bytes": args.size, "median_entries_per_cpu_s": statistics.median(rates),
                      "python": platform.python_version(), "machine": platform.machine()}))


if __name__ == "__main__":
    main()
