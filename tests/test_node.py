"""Tests for bwcore.node.RaftNode: the Ready loop, persistence ordering, the facade.

Unit tests drive one node with ``task.Clock``, an in-memory storage, a recording transport and
a storage writer the test controls. ``LoopbackClusterTest`` runs three nodes over the real
peer transport, SQLite storage and KV state machine on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.trial import unittest as trial

from bwcore.codec import PluginFrame
from bwcore.config import NodeConfig, config_from_dict
from bwcore.errors import ConfigError, NotLeader, Unavailable
from bwcore.hookspecs import hookimpl
from bwcore.kernel import (
    Entry,
    HardState,
    Message,
    MessageType as MT,
    Snapshot,
    StateRole,
)
from bwcore.node import RaftNode
from bwcore.plugins import PluginHost
from bwcore.storage import PersistedState, StorageError

TICK = 0.1  # tick_ms = 100 in the configs below


# -- fakes ------------------------------------------------------------------------------------


class MemoryStorage:
    """The storage contract, in memory; records every save."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.saves: list[tuple[HardState | None, tuple[Entry, ...], Snapshot | None]] = []
        self.fail_next_save: Exception | None = None
        self.closed = False

    def load(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, list(self.entries))

    def save(self, hard_state: HardState | None, entries: Any, snapshot: Snapshot | None
             ) -> None:
        if self.fail_next_save is not None:
            error, self.fail_next_save = self.fail_next_save, None
            raise error
        self.saves.append((hard_state, tuple(entries), snapshot))
        if snapshot is not None:
            self.snapshot, self.entries = snapshot, []
        if entries:
            first = entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def compact(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.entries = [e for e in self.entries if e.index > snapshot.meta.index]

    def log_stats(self) -> tuple[int, int]:
        return len(self.entries), sum(len(e.data) for e in self.entries)

    def close(self) -> None:
        self.closed = True

    def entry_saves(self) -> list[int]:
        """Sizes of the saves that wrote entries."""
        return [len(entries) for _, entries, _ in self.saves if entries]


class DictMachine:
    """A state machine of ``key=value`` commands."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.applied_index = 0
        self.restored = 0
        self.fail_on: str | None = None

    def apply(self, index: int, data: bytes) -> dict[str, Any]:
        key, _, value = data.decode().partition("=")
        if key == self.fail_on:
            raise RuntimeError("broken state machine")
        self.data[key] = value
        self.applied_index = index
        return {"index": index, "key": key}

    def snapshot(self) -> bytes:
        return json.dumps({"applied": self.applied_index, "data": self.data}).encode()

    def restore(self, data: bytes) -> None:
        image = json.loads(data)
        self.applied_index, self.data = image["applied"], image["data"]
        self.restored += 1


class Backend:
    """Test plugin: provides storage and state machine, optionally a snapshot policy."""

    def __init__(self, storage: MemoryStorage, snapshot_every: int | None = None,
                 machine_factory: Callable[[], DictMachine] = DictMachine) -> None:
        self.storage = storage
        self.snapshot_every = snapshot_every
        self.machine_factory = machine_factory
        self.machines: list[DictMachine] = []

    @hookimpl
    def bwraft_open_storage(self, config: NodeConfig) -> MemoryStorage:
        return self.storage

    @hookimpl
    def bwraft_create_state_machine(self, config: NodeConfig) -> DictMachine:
        self.machines.append(self.machine_factory())
        return self.machines[-1]

    @hookimpl
    def bwraft_should_snapshot(self, node: RaftNode, applied_index: int, log_entries: int,
                               log_bytes: int) -> bool | None:
        if self.snapshot_every is None:
            return None
        return log_entries >= self.snapshot_every


class FakePort:
    def __init__(self, host: str, port: int) -> None:
        self.address = IPv4Address("TCP", host, port)

    def getHost(self) -> IPv4Address:
        return self.address


class FakeTransport:
    """Records what the node sends; knows the peers the node told it about."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self.sent: list[tuple[str, Any]] = []
        self.peers: dict[str, tuple[str, int]] = {}
        self.stopped = False

    def listen(self, host: str, port: int) -> FakePort:
        return FakePort(host, port or 47001)

    def set_peer(self, peer_id: str, host: str, port: int) -> None:
        self.peers[peer_id] = (host, port)

    def remove_peer(self, peer_id: str) -> None:
        self.peers.pop(peer_id, None)

    def send(self, peer_id: str, obj: Any) -> bool:
        if self.stopped or peer_id not in self.peers:
            return False
        self.sent.append((peer_id, obj))
        return True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return defer.succeed(None)

    def take(self, kind: MT | None = None) -> list[Message]:
        """Remove and return the sent kernel messages (of one type, if given)."""
        taken = [m for _, m in self.sent if isinstance(m, Message)
                 and (kind is None or m.type is kind)]
        self.sent = [(p, m) for p, m in self.sent if m not in taken]
        return taken


class ManualWriter:
    """Runs storage calls inline, or, while blocked, queues them until released."""

    def __init__(self) -> None:
        self.blocked = False
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.stopped = False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self.blocked:
            return defer.maybeDeferred(fn, *args)
        d: Deferred[Any] = Deferred()
        self.queue.append((fn, args, d))
        return d

    def release(self) -> None:
        """Run what is queued now (one save per queued Ready), in order."""
        queue, self.queue = self.queue, []
        for fn, args, d in queue:
            defer.maybeDeferred(fn, *args).chainDeferred(d)


@dataclass
class Harness:
    node: RaftNode
    clock: task.Clock
    storage: MemoryStorage
    backend: Backend
    writer: ManualWriter
    transports: list[FakeTransport] = field(default_factory=list)

    @property
    def transport(self) -> FakeTransport:
        return self.transports[-1]

    @property
    def machine(self) -> DictMachine:
        return self.backend.machines[-1]

    def ticks(self, n: int) -> None:
        for _ in range(n):
            self.clock.advance(TICK)

    def settle(self) -> None:
        """Run everything due now (the Ready loop schedules itself with callLater(0))."""
        self.clock.advance(0)

    def propose(self, data: bytes, timeout: float = 5.0) -> Deferred[Any]:
        return Deferred.fromCoroutine(self.node.propose(data, timeout=timeout))

    def read(self, timeout: float = 5.0) -> Deferred[int]:
        return Deferred.fromCoroutine(self.node.read_barrier(timeout=timeout))

    def deliver(self, kind: MT, frm: str, term: int, **fields: Any) -> None:
        self.node.on_frame(frm, Message(kind, self.node.node_id, frm, term, **fields))
        self.settle()


def make_config(voters: tuple[str, ...] = ("n1",), **extra: Any) -> NodeConfig:
    raw: dict[str, Any] = {
        "id": "n1", "tick_ms": 100, "election_ticks": 10, "heartbeat_ticks": 1,
        "addresses": {"raft": "127.0.0.1:0", "api": "127.0.0.1:8001"},
        "cluster": {"voters": {v: {"raft": f"127.0.0.1:{7000 + i}",
                                   "api": f"127.0.0.1:{8001 + i}"}
                               for i, v in enumerate(voters)}},
    }
    raw.update(extra)
    return config_from_dict(raw, source="n1.toml")


def make_harness(voters: tuple[str, ...] = ("n1",), *, storage: MemoryStorage | None = None,
                 plugins: tuple[tuple[str, Any], ...] = (), snapshot_every: int | None = None,
                 on_fatal: Callable[[str], None] | None = None, start: bool = True,
                 machine_factory: Callable[[], DictMachine] = DictMachine,
                 snapshot_worker: ManualWriter | None = None, **extra: Any) -> Harness:
    config = make_config(voters, **extra)
    host = PluginHost(config)
    backend = Backend(storage or MemoryStorage(), snapshot_every, machine_factory)
    host.register(backend, "backend")
    for name, plugin in plugins:
        host.register(plugin, name)
    clock = task.Clock()
    writer = ManualWriter()
    transports: list[FakeTransport] = []

    def transport_factory(node: RaftNode) -> FakeTransport:
        transports.append(FakeTransport(node))
        return transports[-1]

    node = RaftNode(config, host, clock, rng=random.Random(7), writer=writer,
                    snapshot_worker=snapshot_worker, transport_factory=transport_factory,
                    on_fatal=on_fatal)
    harness = Harness(node, clock, backend.storage, backend, writer, transports)
    if start:
        node.startService()
        harness.settle()
    return harness


def elect_single(h: Harness) -> None:
    h.ticks(2 * 10 + 1)  # the randomized timeout is below 2 * election_ticks
    assert h.node.kernel.role is StateRole.LEADER


def elect_n1_of_three(h: Harness) -> None:
    """Make n1 leader of {n1, n2, n3} by answering its pre-vote and vote requests."""
    for _ in range(25):
        h.ticks(1)
        requests = h.transport.take(MT.PRE_VOTE)
        if requests:
            break
    else:
        raise AssertionError("n1 never campaigned")
    for m in requests:
        h.deliver(MT.PRE_VOTE_RESP, m.to, m.term)
    for m in h.transport.take(MT.VOTE):
        h.deliver(MT.VOTE_RESP, m.to, m.term)
    assert h.node.kernel.role is StateRole.LEADER


def ack_appends(h: Harness, peers: tuple[str, ...] = ("n2", "n3")) -> None:
    """Answer every APPEND sent to ``peers`` as a follower that accepts it would."""
    for m in h.transport.take(MT.APPEND):
        if m.to in peers:
            last = m.entries[-1].index if m.entries else m.index
            h.deliver(MT.APPEND_RESP, m.to, m.term, index=last)


# -- single node --------------------------------------------------------------------------------


def test_single_voter_elects_itself() -> None:
    """A one-voter cluster elects its only node within two election timeouts."""
    h = make_harness()
    assert h.node.kernel.role is StateRole.FOLLOWER
    elect_single(h)
    status = h.node.status()
    assert status["role"] == "leader" and status["leader"] == "n1"
    assert status["leader_api"] == "http://127.0.0.1:8001" == h.node.leader_api()
    assert status["term"] >= 1 and status["state"] == "serving"
    assert h.node.registry.get_sample_value("bwraft_is_leader") == 1
    assert h.node.registry.get_sample_value("bwraft_term") == status["term"]


def test_proposal_resolves_with_state_machine_result() -> None:
    h = make_harness()
    elect_single(h)
    d = h.propose(b"colour=blue")
    h.settle()
    assert resolved(d) == {"index": h.node.kernel.applied_index, "key": "colour"}
    assert h.machine.data == {"colour": "blue"}
    assert [e.data for e in h.storage.entries][-1] == b"colour=blue"
    assert h.node.registry.get_sample_value("bwraft_proposals_total") == 1
    assert h.node.registry.get_sample_value("bwraft_apply_latency_seconds_count") == 1
    assert h.node.registry.get_sample_value("bwraft_applied_index") == \
        h.node.kernel.applied_index


def test_kernel_gauges_are_read_when_collected() -> None:
    """The term and index gauges show the kernel as it is when scraped: 0 before it exists,
    then every change, with no Ready in between to copy them."""
    h = make_harness(start=False)
    value = h.node.registry.get_sample_value
    assert [value(f"bwraft_{name}") for name in
            ("term", "commit_index", "applied_index", "last_index", "is_leader")] == [0] * 5
    h.node.startService()
    h.settle()
    elect_single(h)
    h.propose(b"colour=blue")
    h.settle()
    kernel = h.node.kernel
    assert (value("bwraft_term"), value("bwraft_is_leader")) == (kernel.term, 1)
    assert value("bwraft_commit_index") == value("bwraft_applied_index") == \
        value("bwraft_last_index") == kernel.last_index >= 2


def resolved(d: Deferred[Any]) -> Any:
    """The result of a fired Deferred (raises its failure; fails if it has not fired)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    outcome = results[0]
    if hasattr(outcome, "raiseException"):
        outcome.raiseException()
    return outcome


def test_group_commit_one_save_per_turn_and_per_save_in_flight() -> None:
    """Proposals of one turn share one save; those made while it runs share the next."""
    h = make_harness()
    elect_single(h)
    h.settle()
    before = len(h.storage.entry_saves())
    h.writer.blocked = True
    first = [h.propose(b"a%d=x" % i) for i in range(50)]
    h.settle()
    assert len(h.writer.queue) == 1  # one Ready, one save for all 50
    second = [h.propose(b"b%d=y" % i) for i in range(30)]
    h.ticks(3)  # time passes while the disk is slow: still one save in flight
    assert len(h.writer.queue) == 1
    h.writer.release()
    h.settle()
    assert len(h.writer.queue) == 1  # the 30 (and the commit of the 50) in one save
    h.writer.blocked = False
    h.writer.release()
    h.settle()
    assert h.storage.entry_saves()[before:] == [50, 30]
    assert all(isinstance(resolved(d), dict) for d in first + second)
    assert len(h.machine.data) == 80


def test_entries_committed_before_a_save_are_answered_while_it_runs() -> None:
    """An entry already durable here and committed is applied and answered while the next
    Ready's save (of newer entries) is still in flight: it does not wait for that fsync."""
    h = make_harness()
    elect_single(h)
    h.settle()
    h.writer.blocked = True
    first = h.propose(b"a=1")
    h.settle()
    second = h.propose(b"b=2")  # waits for the save of a=1 to finish
    h.writer.release()           # a=1 is durable, hence committed (one voter)
    h.settle()
    assert len(h.writer.queue) == 1  # the save of b=2 is in flight
    assert resolved(first)["key"] == "a"
    assert h.machine.data == {"a": "1"} and not second.called
    h.writer.blocked = False
    h.writer.release()
    h.settle()
    assert resolved(second)["key"] == "b"
    assert h.machine.data == {"a": "1", "b": "2"}
    assert h.node.kernel.applied_index == h.machine.applied_index


def test_follower_applies_entries_that_arrive_committed_only_after_saving_them() -> None:
    """A follower told of a commit together with the entries never applies them before
    they are durable on its own disk."""
    h = make_harness(("n1", "n2", "n3"))
    h.deliver(MT.HEARTBEAT, "n2", 2, commit=0)
    h.writer.blocked = True
    last = h.node.kernel.last_index
    h.deliver(MT.APPEND, "n2", 2, index=last, log_term=h.node.kernel.term_at(last),
              entries=(Entry(2, last + 1, b"r=1"),), commit=last + 1)
    assert len(h.writer.queue) == 1
    assert h.machine.data == {}
    h.writer.blocked = False
    h.writer.release()
    h.settle()
    assert h.machine.data == {"r": "1"}


def test_commit_index_alone_costs_no_save_of_its_own() -> None:
    """A Ready whose only durable change is the commit index is not waited for (Raft Fig. 2:
    commitIndex is volatile); the index rides along with the next save and the final stop."""
    h = make_harness()
    elect_single(h)
    h.settle()
    saves = len(h.storage.saves)
    resolved_now(h, h.propose(b"a=1"))
    h.ticks(5)
    assert len(h.storage.saves) == saves + 1  # the entry; its commit was not saved alone
    committed = h.node.kernel.commit_index
    assert h.storage.hard_state.commit < committed
    resolved_now(h, h.propose(b"b=2"))
    assert h.storage.hard_state.commit >= committed  # carried by the next entry's save
    resolved(h.node.stopService())
    assert h.storage.hard_state.commit == h.node.kernel.commit_index


def test_read_barrier_shares_one_read_index_per_turn() -> None:
    h = make_harness()
    elect_single(h)
    h.settle()
    reads = [h.read() for _ in range(5)]
    h.settle()
    assert [resolved(d) for d in reads] == [h.node.kernel.commit_index] * 5
    assert h.node.registry.get_sample_value("bwraft_read_index_rounds_total") == 1
    later = h.read()
    h.settle()
    assert resolved(later) == h.node.kernel.commit_index
    assert h.node.registry.get_sample_value("bwraft_read_index_rounds_total") == 2
    assert h.node.registry.get_sample_value("bwraft_read_barriers_total") == 6


def test_calls_before_start_are_unavailable() -> None:
    h = make_harness(start=False)
    with pytest.raises(Unavailable, match="node not started"):
        resolved(h.propose(b"k=v"))
    assert h.node.status()["role"] == "starting"


def test_stop_while_loading_state_ends_cleanly() -> None:
    h = make_harness(start=False)
    h.writer.blocked = True
    h.node.startService()
    stopped = h.node.stopService()
    h.writer.release()  # the load, then the close queued behind it
    h.writer.release()
    h.settle()
    assert resolved(stopped) is None
    with pytest.raises(Unavailable, match="node stopped while starting"):
        resolved(h.node.when_started())
    assert h.storage.closed and h.transports == [] and h.node.status()["state"] == "stopped"


def test_empty_and_oversized_proposals_are_refused() -> None:
    h = make_harness(limits={"max_frame_bytes": 8192})
    elect_single(h)
    with pytest.raises(ValueError, match="non-empty"):
        resolved(h.propose(b""))
    with pytest.raises(ValueError, match="exceeds the frame limit"):
        resolved(h.propose(b"k=" + b"x" * 8192))


# -- persistence --------------------------------------------------------------------------------


def test_restart_from_the_same_storage_keeps_state() -> None:
    storage = MemoryStorage()
    h = make_harness(storage=storage)
    elect_single(h)
    for i in range(3):
        resolved_now(h, h.propose(b"k%d=v%d" % (i, i)))
    term = h.node.kernel.term
    h.settle()
    resolved(h.node.stopService())
    assert storage.closed and h.transport.stopped and h.writer.stopped
    assert storage.hard_state.term == term

    again = make_harness(storage=storage)
    assert again.machine.data == {"k0": "v0", "k1": "v1", "k2": "v2"}  # replayed at start
    elect_single(again)
    assert again.node.kernel.term > term


def resolved_now(h: Harness, d: Deferred[Any]) -> Any:
    h.settle()
    return resolved(d)


def test_snapshot_compacts_log_and_restart_restores_it() -> None:
    """With a policy asking for it, the node snapshots, compacts, and restores on restart."""
    storage = MemoryStorage()
    h = make_harness(storage=storage, snapshot_every=4)
    elect_single(h)
    for i in range(6):
        resolved_now(h, h.propose(b"k%d=%d" % (i, i)))
    h.settle()
    assert storage.snapshot is not None
    index = storage.snapshot.meta.index
    assert index == h.node.kernel.applied_index == 8  # snapshots at 4 and 8 entries
    assert storage.entries == []
    assert h.node.kernel.first_index == index + 1  # the kernel dropped the prefix too
    assert h.node.registry.get_sample_value("bwraft_snapshots_total") >= 1
    resolved(h.node.stopService())

    again = make_harness(storage=storage)
    assert again.machine.restored == 1
    assert again.machine.data == {f"k{i}": str(i) for i in range(6)}


def test_persisted_messages_wait_for_the_save() -> None:
    """An append is acknowledged only once the entries it carried are durable (Raft §5)."""
    h = make_harness(("n1", "n2", "n3"))
    h.settle()
    bootstrap_last = h.node.kernel.last_index
    h.writer.blocked = True
    h.deliver(MT.APPEND, "n2", 2, index=bootstrap_last, log_term=1,
              entries=(Entry(2, bootstrap_last + 1, b"x=1"),), commit=bootstrap_last)
    assert len(h.writer.queue) == 1
    assert h.transport.take(MT.APPEND_RESP) == []
    assert all(e.index <= bootstrap_last for e in h.storage.entries)
    h.writer.release()
    h.settle()
    [ack] = h.transport.take(MT.APPEND_RESP)
    assert (ack.to, ack.index, ack.reject) == ("n2", bootstrap_last + 1, False)
    assert h.storage.entries[-1] == Entry(2, bootstrap_last + 1, b"x=1")
    assert h.storage.hard_state.term == 2


def test_vote_is_sent_only_after_it_is_durable() -> None:
    h = make_harness(("n1", "n2", "n3"))
    h.settle()
    h.writer.blocked = True
    h.deliver(MT.VOTE, "n3", 5, index=h.node.kernel.last_index, log_term=1)
    assert h.transport.take(MT.VOTE_RESP) == []
    h.writer.release()
    h.settle()
    [vote] = h.transport.take(MT.VOTE_RESP)
    assert (vote.to, vote.term, vote.reject) == ("n3", 5, False)
    assert h.storage.hard_state == HardState(5, "n3", h.storage.hard_state.commit)


def test_storage_failure_halts_the_node() -> None:
    reasons: list[str] = []
    h = make_harness(on_fatal=reasons.append)
    elect_single(h)
    h.settle()
    h.writer.blocked = True
    d = h.propose(b"k=v")
    h.settle()
    h.storage.fail_next_save = StorageError("raft.db: disk I/O error")
    h.writer.release()
    h.settle()
    with pytest.raises(Unavailable, match="node halted: storage save failed"):
        resolved(d)
    assert reasons and "disk I/O error" in reasons[0]
    assert h.node.status()["state"] == "halted"
    with pytest.raises(Unavailable, match="node halted"):
        resolved(h.propose(b"k=w"))
    h.ticks(30)  # nothing is driven any more
    assert h.machine.data == {}


def test_state_machine_failure_halts_the_node() -> None:
    h = make_harness()
    elect_single(h)
    h.settle()
    h.machine.fail_on = "bad"
    d = h.propose(b"bad=1")
    h.settle()
    with pytest.raises(Unavailable, match="state machine failed at index"):
        resolved(d)
    assert h.node.status()["state"] == "halted"


# -- three voters, peers simulated ---------------------------------------------------------------


def test_proposal_on_follower_raises_not_leader() -> None:
    h = make_harness(("n1", "n2", "n3"))
    with pytest.raises(NotLeader) as info:
        resolved(h.propose(b"k=v"))
    assert (info.value.leader_id, info.value.leader_api) == (None, None)
    h.deliver(MT.HEARTBEAT, "n2", 2, commit=0)
    with pytest.raises(NotLeader) as info:
        resolved(h.propose(b"k=v"))
    assert (info.value.leader_id, info.value.leader_api) == ("n2", "http://127.0.0.1:8002")
    assert h.node.status()["leader_api"] == "http://127.0.0.1:8002"


def test_read_barrier_without_leader_is_unavailable() -> None:
    h = make_harness(("n1", "n2", "n3"))
    with pytest.raises(Unavailable, match="no leader known"):
        resolved(h.read())


def test_follower_read_barrier_asks_the_leader_and_waits_for_apply() -> None:
    h = make_harness(("n1", "n2", "n3"))
    h.deliver(MT.HEARTBEAT, "n2", 2, commit=0)
    d = h.read()
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    assert request.to == "n2"
    target = h.node.kernel.applied_index + 1
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=target, context=request.context)
    assert not d.called  # confirmed, but not applied that far yet
    last = h.node.kernel.last_index
    h.deliver(MT.APPEND, "n2", 2, index=last, log_term=h.node.kernel.term_at(last),
              entries=(Entry(2, last + 1, b"r=1"),), commit=last + 1)
    assert resolved(d) == target


def test_proposal_times_out_without_a_quorum() -> None:
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    d = h.propose(b"k=v", timeout=0.5)
    h.ticks(4)
    assert not d.called
    h.ticks(2)
    with pytest.raises(Unavailable, match="proposal timed out after 0.5s"):
        resolved(d)


def test_proposal_deadlines_share_one_timer_and_expire_in_order() -> None:
    """Many proposals in flight cost one reactor timer; each still fails at its own
    deadline, a shorter one proposed later included."""
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    h.settle()
    before = len(h.clock.getDelayedCalls())
    slow = [h.propose(b"k%d=v" % i, timeout=2.0) for i in range(100)]
    assert len(h.clock.getDelayedCalls()) - before <= 2  # one deadline timer, one Ready
    h.settle()
    fast = h.propose(b"fast=1", timeout=0.5)
    h.ticks(6)
    with pytest.raises(Unavailable, match="proposal timed out after 0.5s"):
        resolved(fast)
    assert not any(d.called for d in slow)
    h.ticks(15)
    for d in slow:
        with pytest.raises(Unavailable, match="proposal timed out after 2s"):
            resolved(d)
    assert h.node.registry.get_sample_value(
        "bwraft_proposal_failures_total", {"reason": "timeout"}) == 101


def test_answered_proposals_do_not_wake_the_deadline_timer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a steady stream of proposals answered in time, the deadline timer wakes about
    once per timeout, not once per proposal; a proposal left unanswered still fails on time."""
    h = make_harness()
    elect_single(h)
    wakeups = 0
    expire = h.node._expire_proposals

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        expire()

    monkeypatch.setattr(h.node, "_expire_proposals", counted)
    for i in range(100):   # one proposal every 100 ms for 10 s, each answered at once
        d = h.propose(b"k%d=v" % i, timeout=1.0)
        h.settle()
        assert resolved(d)["key"] == f"k{i}"
        h.clock.advance(0.1)
    assert wakeups <= 11   # one per second of proposals, at most
    h.writer.blocked = True   # no save completes: the next proposal is never answered
    stuck = h.propose(b"stuck=1", timeout=1.0)
    h.clock.advance(0.99)
    assert not stuck.called
    h.clock.advance(0.02)
    with pytest.raises(Unavailable, match="proposal timed out after 1s"):
        resolved(stuck)


def test_proposal_overwritten_by_a_new_leader_fails() -> None:
    """An index proposed in term t that applies with another term was lost (Raft §5.3)."""
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    term = h.node.kernel.term
    noop = h.node.kernel.last_index
    d = h.propose(b"mine=1")
    h.settle()
    index = h.node.kernel.last_index
    # n2 won a later term without our entry and commits its own at that index.
    h.deliver(MT.APPEND, "n2", term + 1, index=noop, log_term=term,
              entries=(Entry(term + 1, index, b"theirs=1"),), commit=index)
    with pytest.raises(Unavailable, match="lost leadership, retry"):
        resolved(d)
    assert h.machine.data == {"theirs": "1"}


def test_commit_needs_a_majority_of_acks() -> None:
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    ack_appends(h)
    d = h.propose(b"k=v")
    h.settle()
    assert not d.called
    ack_appends(h, ("n2",))  # with n1 itself: 2 of 3
    assert resolved(d)["key"] == "k"


def test_proposals_of_one_turn_travel_in_one_append_per_follower() -> None:
    """Commands proposed in one reactor turn enter the log with one propose_many: each
    follower gets one append carrying all of them, not one append per command."""
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    ack_appends(h)
    h.transport.take()  # what the acks caused: commit news, empty appends
    first = h.node.kernel.last_index + 1
    ds = [h.propose(b"k%d=v" % i) for i in range(20)]
    h.settle()
    appends = h.transport.take(MT.APPEND)
    assert sorted(m.to for m in appends) == ["n2", "n3"]
    for m in appends:
        assert [e.data for e in m.entries] == [b"k%d=v" % i for i in range(20)]
        assert m.entries[0].index == first
    assert h.node.registry.get_sample_value("bwraft_proposals_total") == 20
    for m in appends:
        h.deliver(MT.APPEND_RESP, m.to, m.term, index=m.entries[-1].index)
    assert [resolved(d)["index"] for d in ds] == list(range(first, first + 20))


def test_proposal_waiting_for_the_batch_fails_with_not_leader_if_leadership_is_lost() -> None:
    """A command accepted while leader but not yet in the log when the node steps down never
    enters the log; the caller gets NotLeader and may take it to the new leader."""
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    ack_appends(h)
    last = h.node.kernel.last_index
    d = h.propose(b"late=1")
    # In the same turn, before the Ready loop runs: n2 leads a later term.
    h.node.on_frame("n2", Message(MT.HEARTBEAT, "n1", "n2", h.node.kernel.term + 1))
    h.settle()
    with pytest.raises(NotLeader) as info:
        resolved(d)
    assert info.value.leader_id == "n2"
    assert h.node.kernel.last_index == last
    assert all(e.data != b"late=1" for e in h.storage.entries)


def test_appends_leave_while_a_save_is_in_flight() -> None:
    """While the leader's save of one batch is slow, a proposal made meanwhile joins the log
    and its append goes to the followers at once (they fsync while we do); a vote or append
    response, by contrast, never leaves before the save it depends on."""
    h = make_harness(("n1", "n2", "n3"))
    elect_n1_of_three(h)
    h.settle()
    kernel = h.node.kernel
    h.deliver(MT.APPEND_RESP, "n2", kernel.term, index=kernel.last_index)  # n2 replicates
    h.settle()
    h.writer.blocked = True
    first = h.propose(b"a=1")
    h.settle()
    assert len(h.writer.queue) == 1  # a=1 is being saved
    h.transport.sent.clear()
    second = h.propose(b"b=2")
    h.settle()
    assert len(h.writer.queue) == 1  # still the first save: nothing else was written
    carried = [e.data for peer, m in h.transport.sent if isinstance(m, Message)
               and m.type is MT.APPEND for e in m.entries]
    assert b"b=2" in carried
    assert not first.called and not second.called  # nothing acknowledged before durable
    h.writer.blocked = False
    h.writer.release()
    h.settle()
    assert b"b=2" in [e.data for e in h.storage.entries]


class Router:
    """Takes over replication to n3, as a secretary plugin would."""

    def __init__(self) -> None:
        self.taken: list[Message] = []
        self.fail = False

    @hookimpl
    def bwraft_route_messages(self, node: RaftNode, messages: list[Message]) -> None:
        if self.fail:
            raise RuntimeError("router bug")
        for m in [m for m in messages if m.to == "n3"]:
            messages.remove(m)
            self.taken.append(m)


def test_route_messages_hook_takes_over_replication() -> None:
    router = Router()
    h = make_harness(("n1", "n2", "n3"), plugins=(("router", router),))
    elect_n1_of_three(h)
    h.ticks(1)
    sent_to = {peer for peer, m in h.transport.sent
               if isinstance(m, Message) and m.type in (MT.APPEND, MT.HEARTBEAT)}
    assert sent_to == {"n2"}
    assert {m.type for m in router.taken} >= {MT.APPEND} and all(m.to == "n3"
                                                                   for m in router.taken)
    router.fail = True  # a failing router must not stop replication
    h.transport.sent.clear()
    h.ticks(1)
    sent_to = {peer for peer, m in h.transport.sent if isinstance(m, Message)}
    assert sent_to == {"n2", "n3"}


def test_misdirected_and_unhandled_input_is_dropped_and_counted() -> None:
    h = make_harness(("n1", "n2", "n3"))
    h.node.on_frame("n2", Message(MT.HEARTBEAT, "n9", "n2", 3))
    h.node.on_frame("n2", PluginFrame("nobody", {"x": 1}))
    h.settle()
    assert h.node.kernel.term == 1  # the heartbeat for n9 was not stepped
    sample = h.node.registry.get_sample_value
    assert sample("bwraft_dropped_inbound_messages_total", {"reason": "misdirected"}) == 1
    assert sample("bwraft_dropped_inbound_messages_total",
                  {"reason": "unhandled_plugin_frame"}) == 1


# -- every hook, roles, shutdown ----------------------------------------------------------------


class Recorder:
    """Implements every hook the node calls and records the calls."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}

    def _record(self, name: str, **kwargs: Any) -> None:
        self.calls.setdefault(name, []).append(kwargs)

    @hookimpl
    def bwraft_node_started(self, node: RaftNode) -> None:
        self._record("bwraft_node_started", node=node)

    @hookimpl
    def bwraft_node_stopping(self, node: RaftNode) -> None:
        self._record("bwraft_node_stopping", node=node)

    @hookimpl
    def bwraft_role_service(self, node: RaftNode) -> None:
        self._record("bwraft_role_service", node=node)

    @hookimpl
    def bwraft_route_messages(self, node: RaftNode, messages: list[Message]) -> None:
        self._record("bwraft_route_messages", count=len(messages))

    @hookimpl
    def bwraft_plugin_frame(self, node: RaftNode, peer: str, frame: Any) -> bool | None:
        self._record("bwraft_plugin_frame", peer=peer, frame=frame)
        return True if frame.plugin == "recorder" else None

    @hookimpl
    def bwraft_role_changed(self, node: RaftNode, role: StateRole, term: int,
                            leader: str | None) -> None:
        self._record("bwraft_role_changed", role=role, term=term, leader=leader)

    @hookimpl
    def bwraft_transfer_target(self, node: RaftNode, reason: str) -> str:
        self._record("bwraft_transfer_target", reason=reason)
        return "n2"

    @hookimpl
    def bwraft_applied(self, node: RaftNode, index: int) -> None:
        self._record("bwraft_applied", index=index)

    @hookimpl
    def bwraft_should_snapshot(self, node: RaftNode, applied_index: int, log_entries: int,
                               log_bytes: int) -> None:
        self._record("bwraft_should_snapshot", applied_index=applied_index)

    @hookimpl
    def bwraft_member_event(self, node: RaftNode, event: str, member: Any) -> None:
        self._record("bwraft_member_event", event=event, member=member)

    @hookimpl
    def bwraft_read_barrier(self, node: RaftNode, consistency: str, timeout: float) -> None:
        self._record("bwraft_read_barrier", consistency=consistency, timeout=timeout)

    @hookimpl
    def bwraft_http_resources(self, node: RaftNode) -> dict[str, str]:
        self._record("bwraft_http_resources")
        return {"recorder": "resource"}

    @hookimpl
    def bwraft_metrics(self, registry: Any) -> None:
        self._record("bwraft_metrics", registry=registry)

    @hookimpl
    def bwraft_status(self, node: RaftNode) -> dict[str, Any]:
        self._record("bwraft_status")
        return {"recorder": {"calls": len(self.calls)}, "id": "not-overwritten"}


@dataclass
class Member:
    id: str
    raft_addr: str
    api_addr: str | None = None
    role: str = "observer"


def test_every_hook_is_called_by_the_node() -> None:
    """One scenario through which the node calls each hook of the contract."""
    from bwcore import hookspecs

    recorder = Recorder()
    h = make_harness(("n1", "n2", "n3"), plugins=(("recorder", recorder),))
    elect_n1_of_three(h)
    ack_appends(h)
    d = h.propose(b"k=v")
    h.settle()
    ack_appends(h)
    assert resolved(d)["key"] == "k"
    h.node.on_frame("n2", PluginFrame("recorder", [1, 2]))
    resolved(Deferred.fromCoroutine(h.node.read_ready("stale", timeout=1.0)))
    h.node.member_event("joined", Member("obs1", "127.0.0.1:7301", "127.0.0.1:8301"))
    assert h.transport.peers["obs1"] == ("127.0.0.1", 7301)
    assert h.node.host.http_resources(h.node) == {"recorder": "resource"}
    status = h.node.status()
    assert status["id"] == "n1" and status["recorder"]["calls"] > 0
    stopping = h.node.stopService()
    h.settle()
    [timeout_now] = h.transport.take(MT.TIMEOUT_NOW)  # n2 is caught up: transfer at once
    h.deliver(MT.VOTE, "n2", h.node.kernel.term + 1, index=h.node.kernel.last_index,
              log_term=h.node.kernel.term, context=b"transfer")
    h.ticks(1)
    resolved(stopping)

    hooks = {name for name in dir(hookspecs) if name.startswith("bwraft_")}
    node_hooks = hooks - {"bwraft_open_storage", "bwraft_create_state_machine"}
    assert node_hooks - set(recorder.calls) == set()
    assert h.storage.closed  # open_storage / create_state_machine: answered by Backend
    assert recorder.calls["bwraft_role_changed"][-1]["role"] is StateRole.FOLLOWER
    assert StateRole.LEADER in {c["role"] for c in recorder.calls["bwraft_role_changed"]}
    assert recorder.calls["bwraft_transfer_target"] == [{"reason": "shutdown"}]
    assert recorder.calls["bwraft_plugin_frame"][0]["frame"] == PluginFrame("recorder", [1, 2])
    assert recorder.calls["bwraft_metrics"] == [{"registry": h.node.registry}]
    assert recorder.calls["bwraft_read_barrier"] == [{"consistency": "stale", "timeout": 1.0}]
    assert timeout_now.to == "n2"


class ObserverRole:
    def __init__(self) -> None:
        self.service = Service()

    @hookimpl
    def bwraft_role_service(self, node: RaftNode) -> Service | None:
        return self.service if node.config.role == "observer" else None


def test_role_service_runs_as_child_of_the_node() -> None:
    role = ObserverRole()
    h = make_harness(("n2", "n3"), plugins=(("observer", role),), role="observer")
    assert role.service.running and role.service.parent is h.node
    assert h.node.status()["role"] == "observer"
    h.ticks(40)
    assert h.transport.take(MT.PRE_VOTE) == []  # a helper never campaigns
    resolved(h.node.stopService())
    assert not role.service.running


def test_helper_role_without_a_plugin_fails_to_start() -> None:
    reasons: list[str] = []
    h = make_harness(("n2", "n3"), role="observer", on_fatal=reasons.append)
    with pytest.raises(ConfigError, match="no plugin runs role 'observer'"):
        resolved(h.node.when_started())
    assert h.node.status()["state"] == "halted" and reasons


class Misspelled:
    @hookimpl
    def bwraft_node_startd(self, node: RaftNode) -> None:
        """Never called: no such hook."""


def test_start_checks_for_misspelled_hooks() -> None:
    h = make_harness(plugins=(("typo", Misspelled()),))
    with pytest.raises(ConfigError, match="plugin 'typo'.*bwraft_node_startd"):
        resolved(h.node.when_started())


# -- three real nodes over loopback TCP ----------------------------------------------------------


class PassiveRole:
    """A helper role for the loopback test: the node's kernel does the work (a learner)."""

    settings_defaults: dict[str, Any] = {}

    def __init__(self, settings: dict[str, Any]) -> None:
        pass

    @hookimpl
    def bwraft_role_service(self, node: RaftNode) -> Service | None:
        return Service() if node.config.role == "passive" else None


class LoopbackClusterTest(trial.TestCase):
    """Three voters and a helper on the real reactor: PeerTransport and gossip on 127.0.0.1,
    SQLite storage and the KV state machine, loaded through the real entry points."""

    timeout = 60

    def test_three_nodes_elect_replicate_fail_over_and_catch_up(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._scenario())

    async def _scenario(self) -> None:
        from importlib.metadata import EntryPoint, entry_points

        from twisted.internet import reactor

        from bwraft_plugins.kv import encode_command

        base = tempfile.mkdtemp(prefix="bwraft-node-test-")
        self.addCleanup(shutil.rmtree, base, True)
        voters = ("n1", "n2", "n3")
        api_ports = {"n1": 9001, "n2": 9002, "n3": 9003, "h1": 9004}  # advertised, not bound
        plugins = [*entry_points(group="bwraft"),
                   EntryPoint("passive", f"{__name__}:PassiveRole", "bwraft")]
        nodes: dict[str, RaftNode] = {}
        configs: dict[str, NodeConfig] = {}

        def make_config(node_id: str) -> NodeConfig:
            seeds = [n.gossip.member.local.gossip_addr for n in nodes.values()][:1]
            return config_from_dict({
                "id": node_id, "tick_ms": 20, "election_ticks": 10,
                "role": "voter" if node_id in voters else "passive",
                "data_dir": f"{base}/{node_id}",
                "addresses": {"raft": "127.0.0.1:0", "gossip": "127.0.0.1:0",
                              "api": f"127.0.0.1:{api_ports[node_id]}"},
                # Placeholders: the real ports are only known once each node listens.
                "cluster": {"seeds": seeds, "voters": {
                    v: {"raft": "127.0.0.1:9", "api": f"127.0.0.1:{api_ports[v]}"}
                    for v in voters}},
            }, source=f"{node_id}.toml")

        async def start(node_id: str, *, announce: bool = True) -> RaftNode:
            configs.setdefault(node_id, make_config(node_id))
            config = configs[node_id]
            node = RaftNode(config, PluginHost.from_config(config, entry_points=plugins),
                            reactor)
            node.startService()
            await node.when_started()
            nodes[node_id] = node
            for other in nodes.values():  # tell the voters' real ports around
                for peer in nodes.values():
                    if peer is not other and peer.node_id in voters and (
                            announce or other is node):
                        other.set_peer_address(peer.node_id, "127.0.0.1", peer.raft_port)
            return node

        async def wait_for(condition: Callable[[], Any], what: str) -> Any:
            deadline = reactor.seconds() + 20
            while not (result := condition()):
                if reactor.seconds() > deadline:
                    raise AssertionError(f"timed out waiting for {what}")
                await task.deferLater(reactor, 0.01, lambda: None)
            return result

        def leader_of(group: dict[str, RaftNode]) -> RaftNode | None:
            leaders = [n for n in group.values() if n.kernel.role is StateRole.LEADER]
            return leaders[0] if len(leaders) == 1 else None

        def alive(node: RaftNode) -> set[str]:
            return {m["id"] for m in node.members() if m["state"] == "alive"}

        try:
            for node_id in voters:
                await start(node_id)
            leader = await wait_for(lambda: leader_of(nodes), "a leader")
            result = await leader.propose(encode_command("put", "a", value="1"))
            followers = [n for n in nodes.values() if n is not leader]
            await wait_for(lambda: all(n.state_machine.get("a") == "1" for n in followers),
                           "replication to both followers")
            with pytest.raises(NotLeader) as info:
                await followers[0].propose(encode_command("put", "b", value="2"))
            assert info.value.leader_id == leader.node_id
            assert info.value.leader_api == f"http://127.0.0.1:{api_ports[leader.node_id]}"
            assert await followers[0].read_barrier() >= result["index"]

            # A helper joins by gossip alone: the voters learn its address from it, and the
            # leader, told to feed it, brings it up to date although it is no member.
            helper = await start("h1", announce=False)
            await wait_for(lambda: all(alive(n) == {*voters, "h1"} for n in nodes.values()),
                           "gossip views to converge")
            assert leader.transport.peers()["h1"] == ("127.0.0.1", helper.raft_port)
            leader.add_helper("h1")
            await wait_for(lambda: helper.state_machine.get("a") == "1", "the helper to apply")
            assert helper.kernel.conf.voters == frozenset(voters)
            assert helper.status()["role"] == "passive"

            # The leader stops; the others elect one of themselves and keep serving.
            old = leader.node_id
            await leader.stopService()
            del nodes[old]
            new_leader = await wait_for(lambda: leader_of(nodes), "a new leader")
            assert new_leader.node_id != old
            second = await new_leader.propose(encode_command("put", "b", value="2"))
            assert second["index"] > result["index"]

            # The old leader restarts from its data directory and catches up.
            restarted = await start(old)
            await wait_for(lambda: restarted.state_machine.get("b") == "2", "catch-up")
            assert restarted.state_machine.get("a") == "1"
        finally:
            await defer.gatherResults([defer.ensureDeferred(n.stopService())
                                       for n in nodes.values()])


# -- the twistd plugin ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TWISTD = Path(sys.executable).with_name("twistd")


def run_twistd(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # The source tree's twisted/plugins/bwraft_dropin.py is found through PYTHONPATH, as for
    # an installed copy through site-packages.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(TWISTD), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_twistd_lists_the_bwraft_plugin(tmp_path: Path) -> None:
    result = run_twistd("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bwraft" in result.stdout and "A bwraft (BW-Raft) node." in result.stdout


def test_twistd_refuses_a_bad_config_with_its_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('id = "n1"\ntick_ms = "fast"\n[addresses]\nraft = "127.0.0.1:0"\n'
                   'api = "127.0.0.1:0"\n')
    result = run_twistd("-n", "bwraft", "--config", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{bad}: tick_ms: expected an integer, got a string 'fast'" in result.stdout
    missing = run_twistd("-n", "bwraft", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert missing.returncode != 0 and "nope.toml: cannot read config file" in missing.stdout


def test_twistd_exits_non_zero_when_the_node_cannot_load_its_state(tmp_path: Path) -> None:
    """A corrupt data directory stops the process with status 1 and a one-line reason."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raft.db").write_bytes(b"this is not a database" * 100)
    config = tmp_path / "node.toml"
    config.write_text('id = "n1"\n[addresses]\nraft = "127.0.0.1:0"\napi = "127.0.0.1:0"\n'
                      '[cluster.voters.n1]\nraft = "127.0.0.1:7001"\n')
    result = run_twistd("-n", "--pidfile", str(tmp_path / "twistd.pid"), "bwraft",
                        "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "bwraft: node n1 (" in result.stderr and "halted: start failed: StorageError" \
        in result.stderr
    assert not (tmp_path / "twistd.pid").exists()  # twistd cleaned up before the exit


def test_make_service_builds_node_and_api(tmp_path: Path) -> None:
    from bwcore.tap import Options, makeService

    config = tmp_path / "node.toml"
    config.write_text('id = "n1"\n[addresses]\nraft = "127.0.0.1:0"\napi = "127.0.0.1:0"\n')
    options = Options()
    options.parseOptions(["--config", str(config)])
    top = makeService(options)
    services = list(top)
    assert isinstance(services[0], RaftNode) and services[0].node_id == "n1"
    assert len(services) == 2  # and the HTTP API
    with pytest.raises(usage.UsageError, match="--config FILE is required"):
        Options().parseOptions([])
