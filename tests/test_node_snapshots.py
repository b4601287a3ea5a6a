"""The node's snapshot work off the reactor: taking, staging, storing and installing.

Unit tests drive one node on ``task.Clock`` with the fakes of tests/test_node.py; the snapshot
worker is a :class:`ManualWriter` the test holds, so what runs "on the worker" visibly waits
until the test releases it while the reactor side goes on. ``RealThreadsTest`` runs three
voters on the real reactor with their worker threads, SQLite storage (images as files) and
the KV state machine.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest as trial

from bwcore.config import NodeConfig, config_from_dict
from bwcore.kernel import ConfState, MessageType as MT, Snapshot, SnapshotMeta, StateRole
from bwcore.node import RaftNode
from bwcore.plugins import PluginHost
from tests.test_node import (
    DictMachine,
    ManualWriter,
    MemoryStorage,
    elect_single,
    make_harness,
    resolved,
    resolved_now,
)

VOTERS = frozenset({"n1", "n2", "n3"})


class FreezingMachine(DictMachine):
    """A DictMachine that also offers snapshots off the reactor, recording each step."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def snapshot_begin(self) -> Callable[[], bytes]:
        applied, frozen = self.applied_index, dict(self.data)
        self.calls.append(("begin", applied))

        def serialize() -> bytes:
            self.calls.append(("serialize", applied))
            return json.dumps({"applied": applied, "data": frozen}).encode()

        return serialize

    def restore_prepare(self, data: bytes) -> Callable[[], None]:
        image = json.loads(data)  # a ValueError for anything else
        self.calls.append(("decode", image["applied"]))

        def install() -> None:
            self.applied_index, self.data = image["applied"], image["data"]
            self.restored += 1

        return install


class StagingStorage(MemoryStorage):
    """MemoryStorage that also stages images, recording the order of image work."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def stage_snapshot(self, snapshot: Snapshot) -> None:
        self.events.append(("stage", snapshot.meta.index))

    def compact(self, snapshot: Snapshot) -> None:
        self.events.append(("compact", snapshot.meta.index))
        super().compact(snapshot)


def held_worker() -> ManualWriter:
    worker = ManualWriter()
    worker.blocked = True
    return worker


def image(applied: int, data: dict[str, str]) -> bytes:
    return json.dumps({"applied": applied, "data": data}).encode()


def test_a_snapshot_is_serialized_and_staged_off_the_reactor_while_writes_go_on() -> None:
    """The state is frozen at the applied index on the reactor; serialization and staging
    wait on the worker while later writes commit and apply; then compact records it and the
    kernel drops the prefix (Raft §7)."""
    storage, worker = StagingStorage(), held_worker()
    h = make_harness(storage=storage, snapshot_every=4, machine_factory=FreezingMachine,
                     snapshot_worker=worker)
    elect_single(h)  # the bootstrap configuration entry and the leader's no-op: 2 entries
    for i in range(2):
        resolved_now(h, h.propose(b"k%d=%d" % (i, i)))
    assert h.machine.calls == [("begin", 4)] and len(worker.queue) == 1
    for i in range(2, 5):  # writes do not wait for the snapshot
        assert resolved_now(h, h.propose(b"k%d=%d" % (i, i)))["index"] == i + 3
    assert storage.events == [] and storage.snapshot is None
    assert h.node.kernel.first_index == 1
    worker.release()
    h.settle()
    assert storage.events == [("stage", 4), ("compact", 4)]
    assert json.loads(storage.snapshot.data) == {"applied": 4, "data": {"k0": "0", "k1": "1"}}
    assert h.node.kernel.first_index == 5
    assert h.machine.data == {f"k{i}": str(i) for i in range(5)}
    assert h.node.registry.get_sample_value("bwraft_snapshots_total") == 1


def test_a_plain_state_machine_is_still_snapshotted_on_the_reactor() -> None:
    """A state machine without snapshot_begin gets snapshot() called at once; only the
    staging of its image waits for the worker."""
    storage, worker = StagingStorage(), held_worker()
    h = make_harness(storage=storage, snapshot_every=4, snapshot_worker=worker)
    elect_single(h)
    for i in range(2):
        resolved_now(h, h.propose(b"k%d=%d" % (i, i)))
    resolved_now(h, h.propose(b"later=1"))
    worker.release()
    h.settle()
    assert json.loads(storage.snapshot.data) == {"applied": 4, "data": {"k0": "0", "k1": "1"}}
    assert storage.events == [("stage", 4), ("compact", 4)]


def test_a_leader_snapshot_is_decoded_off_the_reactor_then_installed() -> None:
    """The snapshot is persisted and acknowledged first; decoding waits on the worker, and
    no later Ready is processed until the decoded state is swapped in."""
    worker = held_worker()
    h = make_harness(("n1", "n2", "n3"), machine_factory=FreezingMachine,
                     snapshot_worker=worker)
    snapshot = Snapshot(SnapshotMeta(10, 2, ConfState(voters=VOTERS)), image(10, {"x": "1"}))
    h.deliver(MT.SNAPSHOT, "n2", 2, snapshot=snapshot)
    assert h.storage.snapshot == snapshot
    [ack] = h.transport.take(MT.APPEND_RESP)
    assert (ack.to, ack.index, ack.reject) == ("n2", 10, False)
    assert h.machine.restored == 0 and h.machine.calls == []
    h.deliver(MT.HEARTBEAT, "n2", 2, commit=10)  # the leader still hears from us
    assert h.transport.take(MT.HEARTBEAT_RESP)
    assert h.node.kernel.applied_index < 10 and h.machine.restored == 0
    worker.release()
    h.settle()
    assert h.machine.calls == [("decode", 10)] and h.machine.restored == 1
    assert h.machine.data == {"x": "1"} and h.node.kernel.applied_index == 10


def test_a_snapshot_that_cannot_be_decoded_halts_the_node() -> None:
    """The log before it is gone once it is stored: the replica stops with the reason."""
    fatal: list[str] = []
    h = make_harness(("n1", "n2", "n3"), machine_factory=FreezingMachine, on_fatal=fatal.append)
    snapshot = Snapshot(SnapshotMeta(10, 2, ConfState(voters=VOTERS)), b"not json")
    h.deliver(MT.SNAPSHOT, "n2", 2, snapshot=snapshot)
    assert len(fatal) == 1 and "snapshot at index 10 cannot be restored" in fatal[0]
    assert h.node.status()["state"] == "halted"


def test_start_decodes_the_stored_snapshot_on_the_worker() -> None:
    """A restart restores the stored snapshot through the worker before it serves."""
    storage, worker = MemoryStorage(), held_worker()
    storage.snapshot = Snapshot(SnapshotMeta(6, 1, ConfState(voters=frozenset({"n1"}))),
                                image(6, {"a": "1"}))
    h = make_harness(storage=storage, machine_factory=FreezingMachine, snapshot_worker=worker)
    started = h.node.when_started()
    assert not started.called and h.machine.calls == []
    worker.release()
    h.settle()
    assert resolved(started) is None
    assert h.machine.data == {"a": "1"} and h.node.kernel.applied_index == 6


def test_stopping_waits_for_a_snapshot_in_flight() -> None:
    """stopService returns only after the snapshot being taken is stored, then closes the
    storage: nothing runs on a closed store or a stopped worker."""
    storage, worker = StagingStorage(), held_worker()
    h = make_harness(storage=storage, snapshot_every=4, machine_factory=FreezingMachine,
                     snapshot_worker=worker)
    elect_single(h)
    for i in range(2):
        resolved_now(h, h.propose(b"k%d=%d" % (i, i)))
    stopped = h.node.stopService()
    h.settle()
    assert not stopped.called and not storage.closed
    worker.release()
    h.settle()
    assert resolved(stopped) is None
    assert storage.events == [("stage", 4), ("compact", 4)] and storage.closed
    assert worker.stopped


class RealThreadsTest(trial.TestCase):
    """Three voters on the real reactor: snapshots serialized and decoded on worker threads,
    images in files beside SQLite, a follower brought back by a streamed snapshot."""

    timeout = 90

    def test_snapshots_on_worker_threads_bound_the_log_and_a_follower_catches_up(
            self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._scenario())

    async def _scenario(self) -> None:
        from importlib.metadata import entry_points

        from twisted.internet import reactor

        from bwraft_plugins.kv import encode_command

        base = tempfile.mkdtemp(prefix="bwraft-snapshot-test-")
        self.addCleanup(shutil.rmtree, base, True)
        voters = ("n1", "n2", "n3")
        nodes: dict[str, RaftNode] = {}

        def make_config(node_id: str) -> NodeConfig:
            return config_from_dict({
                "id": node_id, "tick_ms": 20, "election_ticks": 10,
                "data_dir": f"{base}/{node_id}",
                "addresses": {"raft": "127.0.0.1:0", "api": "127.0.0.1:9"},
                "cluster": {"voters": {v: {"raft": "127.0.0.1:9"} for v in voters}},
                "plugins": {"compaction": {"entries": 100, "chunk_bytes": 4096}},
            }, source=f"{node_id}.toml")

        async def start(node_id: str) -> RaftNode:
            config = make_config(node_id)
            node = RaftNode(config, PluginHost.from_config(
                config, entry_points=list(entry_points(group="bwraft"))), reactor)
            node.startService()
            await node.when_started()
            nodes[node_id] = node
            for other in nodes.values():
                for peer in nodes.values():
                    if peer is not other:
                        other.set_peer_address(peer.node_id, "127.0.0.1", peer.raft_port)
            return node

        async def wait_for(condition: Callable[[], Any], what: str) -> Any:
            deadline = reactor.seconds() + 30
            while not (result := condition()):
                if reactor.seconds() > deadline:
                    raise AssertionError(f"timed out waiting for {what}")
                await task.deferLater(reactor, 0.01, lambda: None)
            return result

        def leader() -> RaftNode | None:
            leaders = [n for n in nodes.values() if n.kernel.role is StateRole.LEADER]
            return leaders[0] if len(leaders) == 1 else None

        async def write(prefix: str, count: int) -> None:
            async def one(i: int) -> None:
                node = await wait_for(leader, "a leader")
                await node.propose(encode_command("put", f"{prefix}{i}", value=f"v{i}"))
            for first in range(0, count, 25):
                await gatherResults([Deferred.fromCoroutine(one(i))
                                     for i in range(first, min(count, first + 25))])

        def snapshots(node: RaftNode, kind: str) -> float:
            return node.registry.get_sample_value(f"bwraft_{kind}_total") or 0

        def images(node: RaftNode) -> list[str]:
            return sorted(p.name for p in node.storage.images_directory.iterdir())

        try:
            for node_id in voters:
                await start(node_id)
            first = await wait_for(leader, "a leader")
            lagging = next(n for n in voters if n != first.node_id)
            await nodes.pop(lagging).stopService()
            await write("k", 450)
            for node in nodes.values():
                await wait_for(lambda n=node: snapshots(n, "snapshots") >= 3,
                               f"{node.node_id} to take snapshots")
                # Each image replaced is removed once its successor is recorded.
                await wait_for(lambda n=node: len(images(n)) == 1, "one image left")
                assert node.storage.log_stats()[0] <= 100 + 50
            back = await start(lagging)
            await write("after", 5)
            await wait_for(lambda: back.state_machine.get("after4") == "v4"
                           and len(back.state_machine) == 455, "the follower to catch up")
            assert snapshots(back, "snapshots_installed") >= 1
            expected = {f"k{i}": f"v{i}" for i in range(450)}
            assert all(back.state_machine.get(k) == v for k, v in expected.items())
            # A restart restores the stored snapshot (read back from its file) and replays.
            restarted_id = leader().node_id
            await nodes.pop(restarted_id).stopService()
            again = await start(restarted_id)
            await wait_for(lambda: len(again.state_machine) == 455, "the restarted node")
        finally:
            for node in nodes.values():
                await node.stopService()


class BrokenSnapshotMachine(DictMachine):
    def snapshot(self) -> bytes:
        raise RuntimeError("cannot serialize")


def test_a_state_machine_that_cannot_snapshot_leaves_the_log_as_it_is() -> None:
    """A failing snapshot() is logged; writes go on and nothing is compacted."""
    storage = StagingStorage()
    h = make_harness(storage=storage, snapshot_every=2, machine_factory=BrokenSnapshotMachine)
    elect_single(h)
    for i in range(4):
        resolved_now(h, h.propose(b"k%d=%d" % (i, i)))
    assert storage.events == [] and storage.snapshot is None
    assert h.node.kernel.first_index == 1 and h.node.status()["state"] == "serving"
