"""Snapshot benchmark: size and time to take, store, stream and install; the write dip.

Part 1, for each key count (default 100,000 and 1,000,000 keys of ~30-byte values):

- take: ``KVStateMachine.snapshot_begin()`` (``freeze``, on the reactor thread in a node) and
  the serializer it returns (``serialize``, on the node's snapshot worker thread);
- store: ``SqlStorage.stage_snapshot`` (``stage``: the image file, on the snapshot worker)
  and ``SqlStorage.compact`` (``compact``: metadata and prefix deletion, on the writer thread);
- stream: the image through the compaction plugin's sender and receiver (chunks, CRC-32,
  acknowledgements), in memory, without a network;
- install: ``SqlStorage.save`` of the received snapshot (``install_save``, writer thread),
  ``KVStateMachine.restore_prepare`` (``install_decode``, snapshot worker) and the install
  step it returns (``install_swap``, reactor).

For the two worker-thread steps it also reports ``*_main_gap_ms``: the longest the main thread
waited for the GIL (a 1 ms sleep loop) while the step ran on another thread — what the
reactor would feel.

Part 2, the write-throughput dip: one single-voter node on the real reactor with SQLite
storage and the KV state machine preloaded with ``--dip-keys`` keys, kept busy by
``--inflight`` concurrent proposals for ``--seconds``; the compaction plugin snapshots every
``--every`` entries (50,000). Throughput is counted per 100 ms window; the report compares
windows that overlap a snapshot (from ``snapshot_begin`` to the end of ``Storage.compact``)
with those that do not, and gives the longest reactor stall (a 10 ms LoopingCall), overall
and inside snapshot windows.

    python contrib/bench/snapshot_bench.py                 # both parts, the figures above
    python contrib/bench/snapshot_bench.py --keys 100000 --dip-keys 100000 --seconds 10

Figures are recorded in docs/benchmarks.md ("Snapshots"). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402

from bwcore.kernel import (  # noqa: E402
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)
from bwcore.logs import get_logger  # noqa: E402
from bwraft_plugins.kv import KVStateMachine, encode_command  # noqa: E402
from bwraft_plugins.snapshot_stream import (  # noqa: E402
    SnapshotReceiver,
    SnapshotSender,
    StreamCounters,
)
from bwraft_plugins.sqlstorage import SqlStorage  # noqa: E402


def machine_with(keys: int) -> KVStateMachine:
    sm = KVStateMachine()
    image = {"format": 1, "applied_index": keys,
             "data": {f"key{i:09d}": f"value-{i:09d}-{'x' * 14}" for i in range(keys)},
             "requests": []}
    import msgpack

    sm.restore(msgpack.packb(image))
    return sm


class _LoopNode:
    """Just enough of a node for a sender and a receiver talking to each other in memory."""

    def __init__(self, node_id: str, clock: task.Clock) -> None:
        self.node_id = node_id
        self.reactor = clock
        self.log = get_logger(node_id=node_id)
        self.peer: _LoopNode | None = None
        self.plugin_side: Any = None
        self.queue: list[tuple[str, dict]] = []
        self.stepped: list[Message] = []

    def send_plugin_frame(self, peer: str, plugin: str, payload: Any) -> bool:
        assert self.peer is not None
        self.peer.queue.append((self.node_id, payload))
        return True

    def report_snapshot_failed(self, peer: str) -> None:
        raise RuntimeError("stream failed")

    def step(self, m: Message) -> None:
        self.stepped.append(m)


def stream_in_memory(snapshot: Snapshot, chunk_bytes: int) -> tuple[float, bytes]:
    clock = task.Clock()
    a, b = _LoopNode("n1", clock), _LoopNode("n2", clock)
    a.peer, b.peer = b, a
    counters = StreamCounters()
    sender = SnapshotSender(a, chunk_bytes=chunk_bytes, window=4, stall_seconds=60,
                            counters=counters)
    receiver = SnapshotReceiver(b, max_bytes=1 << 34, stall_seconds=60, counters=counters)
    began = time.perf_counter()
    sender.start(Message(MessageType.SNAPSHOT, "n2", "n1", 2, snapshot=snapshot))
    while a.queue or b.queue:
        for node, handler in ((b, receiver.on_frame), (a, sender.on_frame)):
            queue, node.queue = node.queue, []
            for peer, payload in queue:
                handler(peer, payload)
    elapsed = time.perf_counter() - began
    [message] = b.stepped
    return elapsed, message.snapshot.data


def on_worker(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """Run ``fn`` on another thread; return its result, its duration and the longest the
    main thread (sleeping 1 ms at a time, like an idle reactor) was kept from running."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    began = time.perf_counter()
    worker.start()
    gap, last = 0.0, time.perf_counter()
    while worker.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    worker.join()
    return out[0], time.perf_counter() - began, gap


def on_main(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """Run ``fn`` here (as a node without worker threads would, on its reactor): the main
    thread is kept from running for all of it."""
    began = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - began
    return result, elapsed, elapsed


def part_one(keys: int, chunk_bytes: int) -> dict[str, Any]:
    sm = machine_with(keys)
    began = time.perf_counter()
    # Before snapshot_begin existed the node serialized on the reactor: measured that way.
    off_reactor = hasattr(sm, "snapshot_begin")
    serialize = sm.snapshot_begin() if off_reactor else sm.snapshot
    freeze = time.perf_counter() - began
    data, serialized, serialize_gap = (on_worker if off_reactor else on_main)(serialize)
    conf = ConfState(frozenset({"n1", "n2", "n3"}))
    snapshot = Snapshot(SnapshotMeta(keys, 2, conf), data)
    with tempfile.TemporaryDirectory() as folder:
        storage = SqlStorage(f"sqlite:///{folder}/leader.db")
        # A log that ends at the snapshot's index, so that compact accepts it.
        storage.save(HardState(2, "n1", keys), [], Snapshot(SnapshotMeta(keys - 1, 2, conf),
                                                            b""))
        storage.save(None, [Entry(2, keys, b"x")], None)
        began = time.perf_counter()
        if hasattr(storage, "stage_snapshot"):
            storage.stage_snapshot(snapshot)
        staged = time.perf_counter() - began
        began = time.perf_counter()
        storage.compact(snapshot)
        compacted = time.perf_counter() - began
        storage.close()
        streamed, received = stream_in_memory(snapshot, chunk_bytes)
        assert received == data
        follower = SqlStorage(f"sqlite:///{folder}/follower.db")
        began = time.perf_counter()
        follower.save(HardState(2, None, keys), [], Snapshot(snapshot.meta, received))
        saved = time.perf_counter() - began
        fresh = KVStateMachine()
        if hasattr(fresh, "restore_prepare"):
            install, decoded, decode_gap = on_worker(fresh.restore_prepare, received)
        else:
            _, decoded, decode_gap = on_main(fresh.restore, received)
            install = dict  # nothing left to swap in
        began = time.perf_counter()
        install()
        swapped = time.perf_counter() - began
        follower.close()
    assert len(fresh) == keys
    return {"keys": keys, "bytes": len(data), "off_reactor": off_reactor,
            "freeze_s": round(freeze, 4),
            "serialize_s": round(serialized, 3),
            "serialize_main_gap_ms": round(serialize_gap * 1000, 1),
            "stage_s": round(staged, 3), "compact_s": round(compacted, 4),
            "stream_s": round(streamed, 3), "chunks": -(-len(data) // chunk_bytes),
            "install_save_s": round(saved, 3), "install_decode_s": round(decoded, 3),
            "install_decode_main_gap_ms": round(decode_gap * 1000, 1),
            "install_swap_s": round(swapped, 4)}


def part_two(keys: int, every: int, seconds: float, inflight: int) -> dict[str, Any]:
    from twisted.internet import reactor

    from bwcore.config import config_from_dict
    from bwcore.node import RaftNode
    from bwcore.plugins import PluginHost
    from bwraft_plugins.compaction import CompactionPlugin
    from bwraft_plugins.kv import KVPlugin
    from bwraft_plugins.sqlstorage import SqlStoragePlugin

    folder = tempfile.mkdtemp(prefix="bwraft-snapbench-")
    conf = ConfState(frozenset({"n1"}))
    preload = SqlStorage(f"sqlite:///{folder}/raft.db")
    image = machine_with(keys).snapshot()
    preload.save(HardState(1, "n1", keys), [], Snapshot(SnapshotMeta(keys, 1, conf), image))
    preload.close()
    config = config_from_dict({"id": "n1", "data_dir": folder, "tick_ms": 100,
                               "addresses": {"raft": "127.0.0.1:0", "api": "127.0.0.1:0"},
                               "cluster": {"voters": {"n1": {"raft": "127.0.0.1:1"}}},
                               "log": {"level": "warning"}})
    host = PluginHost(config)
    host.register(SqlStoragePlugin({"url": ""}), "sql-storage")
    host.register(KVPlugin({"dedup_window": 0}), "kv")
    host.register(CompactionPlugin({**CompactionPlugin.settings_defaults, "entries": every}),
                  "compaction")
    node = RaftNode(config, host, reactor)
    begins: list[tuple[float, float]] = []
    serializes: list[tuple[float, float]] = []
    stages: list[tuple[float, float]] = []
    stores: list[tuple[float, float]] = []
    completions: list[float] = []
    ticks: list[float] = []
    began = [0.0]

    def timed(fn: Any, where: list[tuple[float, float]]) -> Any:
        def wrapper(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                where.append((t0, time.perf_counter()))
        wrapper.__name__ = fn.__name__
        return wrapper

    def timed_begin(begin: Any) -> Any:
        def wrapper() -> Any:
            return timed(timed(begin, begins)(), serializes)
        return wrapper

    def timed_snapshot(snapshot: Any) -> Any:
        """Before snapshot_begin: snapshot() froze and serialized at once, on the reactor."""
        def wrapper() -> Any:
            t0 = time.perf_counter()
            try:
                return snapshot()
            finally:
                begins.append((t0, t0))
                serializes.append((t0, time.perf_counter()))
        return wrapper

    async def writer(worker: int) -> None:
        i = 0
        while time.perf_counter() - began[0] < seconds:
            i += 1
            command = encode_command("put", f"w{worker}-{i % 5000}", value="v" * 30)
            try:
                await node.propose(command, timeout=10.0)
            except Exception:  # noqa: BLE001 - counted as not completed
                continue
            completions.append(time.perf_counter())

    def heartbeat() -> None:
        ticks.append(time.perf_counter())

    async def main() -> None:
        await node.when_started()
        sm = node.state_machine
        if hasattr(sm, "snapshot_begin"):
            sm.snapshot_begin = timed_begin(sm.snapshot_begin)
        else:
            sm.snapshot = timed_snapshot(sm.snapshot)
        if hasattr(node.storage, "stage_snapshot"):
            node.storage.stage_snapshot = timed(node.storage.stage_snapshot, stages)
        node.storage.compact = timed(node.storage.compact, stores)
        loop = task.LoopingCall(heartbeat)
        loop.start(0.01)
        while node.kernel.role.value != "leader":
            await task.deferLater(reactor, 0.05, lambda: None)
        began[0] = time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(writer(w)) for w in range(inflight)])
        loop.stop()
        await node.stopService()

    node.startService()
    done: list[Any] = []
    d = Deferred.fromCoroutine(main())
    d.addBoth(lambda r: (done.append(r), reactor.stop()))
    reactor.run()
    if done and hasattr(done[0], "raiseException"):
        done[0].raiseException()
    window = 0.1
    start = began[0]
    buckets = [0] * int(seconds / window + 1)
    for t in completions:
        k = int((t - start) / window)
        if 0 <= k < len(buckets):
            buckets[k] += 1
    in_snapshot = set()
    spans = list(zip(begins, stores))
    # A window is "in a snapshot" from snapshot_begin (reactor) to the end of Storage.compact
    # (writer thread): serialization and staging run in between, on the snapshot worker.
    for (t0, _), (_, t1) in spans:
        for k in range(int((t0 - start) / window), int((t1 - start) / window) + 1):
            in_snapshot.add(k)
    during = [buckets[k] / window for k in sorted(in_snapshot) if 0 <= k < len(buckets)]
    outside = [b / window for k, b in enumerate(buckets) if k not in in_snapshot]
    stalls = [(b - a, b) for a, b in zip(ticks, ticks[1:]) if b >= start]
    stalls_in = [gap for gap, t in stalls
                 if any(t0 <= t <= t1 + 0.01 for (t0, _), (_, t1) in spans)]
    stalls_out = [gap for gap, t in stalls
                  if not any(t0 <= t <= t1 + 0.01 for (t0, _), (_, t1) in spans)]

    def p99_ms(gaps: list[float]) -> float | None:
        return round(statistics.quantiles(gaps, n=100)[98] * 1000, 1) if len(gaps) > 1 else None

    def ms(spans_: list[tuple[float, float]]) -> list[float]:
        return [round((b - a) * 1000, 1) for a, b in spans_]

    return {"preloaded_keys": keys, "snapshot_every": every, "seconds": seconds,
            "inflight": inflight, "writes": len(completions),
            "writes_per_s": round(len(completions) / seconds),
            "snapshots": len(stores),
            "freeze_ms": ms(begins), "serialize_ms": ms(serializes), "stage_ms": ms(stages),
            "compact_ms": ms(stores),
            "begin_to_stored_s": [round(t1 - t0, 3) for (t0, _), (_, t1) in spans],
            "windows_in_snapshots": len(during), "windows_outside": len(outside),
            "writes_per_s_outside_snapshots_median": round(statistics.median(outside))
            if outside else None,
            "writes_per_s_in_snapshot_windows_median": round(statistics.median(during))
            if during else None,
            "writes_per_s_in_snapshot_windows_mean": round(statistics.mean(during))
            if during else None,
            "longest_reactor_stall_s": round(max(g for g, _ in stalls), 3) if stalls else None,
            "longest_reactor_stall_in_snapshots_s": round(max(stalls_in), 3)
            if stalls_in else None,
            "reactor_gap_p99_ms_in_snapshots": p99_ms(stalls_in),
            "reactor_gap_p99_ms_outside": p99_ms(stalls_out),
            "reactor_gaps_over_100ms_in_snapshots": sum(g > 0.1 for g in stalls_in),
            "reactor_gaps_over_100ms_outside": sum(g > 0.1 for g in stalls_out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="100000,1000000", help="comma-separated key counts")
    ap.add_argument("--chunk-bytes", type=int, default=1 << 20)
    ap.add_argument("--dip-keys", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--skip-dip", action="store_true")
    args = ap.parse_args(argv)
    random.seed(1)
    for keys in (int(k) for k in args.keys.split(",") if k):
        print(json.dumps(part_one(keys, args.chunk_bytes)), flush=True)
    if not args.skip_dip:
        print(json.dumps(part_two(args.dip_keys, args.every, args.seconds, args.inflight)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
