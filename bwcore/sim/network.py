"""A synchronous, seeded simulation of kernels on a network, for tests and plugin authors.

Each :class:`SimNode` is a minimal driver: it persists a Ready to an in-memory store, sends its
messages into the :class:`SimNetwork`, applies committed entries to a list-of-commands state
machine and advances. The network holds messages in flight and delivers, drops, duplicates or
reorders them as the test (or a seeded random schedule) says; nodes crash — optionally in the
middle of a Ready, after its eager messages left but before anything was persisted — and restart
from what they persisted. A :class:`SafetyChecker` sees every step.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from bwcore.kernel import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    KernelConfig,
    Message,
    ProposalDropped,
    RawNode,
    Ready,
    Snapshot,
    StateRole,
)
from bwcore.sim.invariants import SafetyChecker


@dataclass
class MemoryStorage:
    """What a node persisted. Read by RawNode on restart (it copies the entries)."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def compact(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > snap.meta.index]

    def term_at(self, index: int) -> int | None:
        snap_index = self.snapshot.meta.index if self.snapshot else 0
        if index <= snap_index:
            return None if index < snap_index else self.snapshot.meta.term
        k = index - snap_index - 1
        if k < len(self.entries) and self.entries[k].index == index:
            return self.entries[k].term
        return None


class SimNode:
    def __init__(self, net: "SimNetwork", node_id: str, cfg: KernelConfig,
                 bootstrap: ConfState) -> None:
        self.net = net
        self.id = node_id
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.storage = MemoryStorage()
        self.raw: RawNode | None = None
        self.state: list[bytes] = []      # the state machine: every applied command, in order
        self.applied = 0
        self.pending: dict[int, int] = {}  # proposal index -> term it was proposed in
        self.reads: dict[bytes, int] = {}  # read ctx -> acked index when the read began
        self.served_reads: list[tuple[bytes, int]] = []
        self.commit_seen = 0
        self.voters_before: frozenset[str] = frozenset()
        self.in_flight: Ready | None = None
        self.in_flight_prev_term = 0   # the term before the in-flight Ready's first entry
        self.start()

    @property
    def up(self) -> bool:
        return self.raw is not None

    def start(self) -> None:
        rng = random.Random(self.net.rng.random())
        self.raw = RawNode(self.cfg, rng, state=self.storage, bootstrap=self.bootstrap)
        snap = self.storage.snapshot
        self.state = pickle.loads(snap.data) if snap and snap.data else []
        self.applied = snap.meta.index if snap else 0
        self.pending.clear()
        self.reads.clear()
        # A commit index restored from storage was decided before the crash (and checked
        # then); only commits this run decides are checked against its quorum.
        self.commit_seen = self.raw.commit_index
        self.in_flight = None
        self.voters_before = self.raw.conf.voters
        for h in self.net.helpers:
            self.raw.add_helper(h)
        self.process()

    def crash(self, torn: bool = False) -> None:
        """Lose everything not persisted. ``torn``: crash midway through a Ready, after its
        eager messages left but before it was persisted."""
        if self.raw is None:
            return
        if torn and self.in_flight is None and self.raw.has_ready():
            rd = self.raw.ready()
            for m in rd.messages:
                self.net.send(m)
        self.raw = None
        self.in_flight = None

    def process(self) -> None:
        """Handle Readies. With the network's ``async_persist``, a Ready's eager messages
        leave at once and the rest waits for :meth:`finish_persist` — meanwhile the node keeps
        stepping messages, as a real driver does while its storage thread fsyncs."""
        raw = self.raw
        while raw is not None and self.in_flight is None and raw.has_ready():
            rd = raw.ready()
            if rd.soft_state is not None and rd.soft_state.role is StateRole.LEADER:
                self.net.checker.on_leader(self.id, raw.term, raw)
                # Only commits this leader decides are checked against its quorum below.
                self.commit_seen = max(self.commit_seen, raw.commit_index)
            if rd.entries:
                # Checked once saved (finish_persist), with the term before them as it is now.
                prev = raw.term_at(rd.entries[0].index - 1)
                self.in_flight_prev_term = prev if prev is not None else 0
            for m in rd.messages:
                self.net.send(m)
            self.in_flight = rd
            if self.net.async_persist and rd.must_persist():
                return
            self.finish_persist()

    def finish_persist(self) -> None:
        rd, raw = self.in_flight, self.raw
        if rd is None or raw is None:
            return
        self.in_flight = None
        net, chk = self.net, self.net.checker
        self.storage.save(rd)
        if rd.entries:
            # Only what storage holds counts: a Ready lost in a crash never existed anywhere
            # but in the messages it sent, and their receivers' saves are checked in turn.
            chk.on_persist(self.id, rd.entries, self.in_flight_prev_term)
        for m in rd.persisted_messages:
            net.send(m)
        if rd.snapshot is not None:
            meta = rd.snapshot.meta
            chk.on_snapshot_install(self.id, meta.index, meta.term)
            self.state = pickle.loads(rd.snapshot.data) if rd.snapshot.data else []
            self.applied = meta.index
        for e in rd.committed_entries:
            chk.on_apply(self.id, e)
            if e.type is EntryType.NORMAL and e.data:
                self.state.append(e.data)
            self.applied = e.index
            t = self.pending.pop(e.index, None)
            if t == e.term:
                chk.on_ack(e.index)
                net.acked.append((self.id, e.index, e.data))
        for rs in rd.read_states:
            began = self.reads.pop(rs.context, None)
            if began is not None:
                chk.on_read(self.id, rs.index, began)
                self.served_reads.append((rs.context, rs.index))
        raw.advance(rd)
        if raw.role is StateRole.LEADER and raw.commit_index > self.commit_seen:
            self.commit_seen = raw.commit_index
            # The commit was decided under the configuration before this step, or (after a
            # change committed in this step) under the new one.
            chk.on_commit(self.id, raw.commit_index, raw.term_at(raw.commit_index),
                          (self.voters_before, raw.conf.voters), net.durable_term_at)
        self.voters_before = raw.conf.voters
        self.process()


class SimNetwork:
    """Nodes plus the messages in flight between them.

    Args:
        voters: ids of the initial voters.
        seed: seeds every random choice of the network and the kernels.
        helpers: ids of non-voting helpers fed by the leader (observers).
        router: called with each message sent; returning True means it took the message over
            (the hook a secretary uses to relay appends).
        async_persist: Readies are persisted only when :meth:`persist_random` or
            :meth:`stabilize` says so, not at once.
        **kernel: KernelConfig fields applied to every node.
    """

    def __init__(self, voters: Iterable[str], seed: int = 0, *, helpers: Iterable[str] = (),
                 router: Callable[[Message], bool] | None = None, async_persist: bool = False,
                 **kernel) -> None:
        self.rng = random.Random(seed)
        self.checker = SafetyChecker()
        self.voters = tuple(voters)
        self.helpers = tuple(helpers)
        self.non_voters = frozenset(self.helpers)
        self.router = router
        self.async_persist = async_persist
        self.inflight: list[Message] = []
        self.cut: set[tuple[str, str]] = set()
        self.isolated: set[str] = set()
        self.drop_rate = 0.0
        self.dup_rate = 0.0
        self.acked: list[tuple[str, int, bytes]] = []
        self.sent = 0
        self.sent_by_type: dict = {}
        self.kernel = kernel
        boot = ConfState(voters=frozenset(self.voters))
        self.nodes: dict[str, SimNode] = {}
        for v in self.voters:
            self.nodes[v] = SimNode(self, v, KernelConfig(id=v, **kernel), boot)
        for h in self.helpers:
            self.nodes[h] = SimNode(self, h, KernelConfig(id=h, non_voting=True, **kernel),
                                    ConfState())

    def add_node(self, node_id: str, **kernel) -> SimNode:
        """A new, empty node (to be added by a configuration change)."""
        cfg = KernelConfig(id=node_id, **{**self.kernel, **kernel})
        node = SimNode(self, node_id, cfg, ConfState())
        self.nodes[node_id] = node
        return node

    # -- the network -----------------------------------------------------------------------

    def send(self, m: Message) -> None:
        sender = self.nodes.get(m.frm)
        self.checker.on_send(m, self.non_voters,
                             sender.storage.hard_state if sender is not None else None)
        self.sent += 1
        self.sent_by_type[m.type] = self.sent_by_type.get(m.type, 0) + 1
        if self.router is not None and self.router(m):
            return
        self.post(m)

    def post(self, m: Message) -> None:
        """Put a message in flight, subject to cuts and losses."""
        if (m.frm, m.to) in self.cut or m.frm in self.isolated or m.to in self.isolated:
            return
        if self.drop_rate and self.rng.random() < self.drop_rate:
            return
        self.inflight.append(m)
        if self.dup_rate and self.rng.random() < self.dup_rate:
            self.inflight.append(m)

    def deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        if node is None or node.raw is None:
            return
        node.raw.step(m)
        node.process()

    def deliver_random(self) -> bool:
        if not self.inflight:
            return False
        k = self.rng.randrange(len(self.inflight))
        self.inflight[k], self.inflight[-1] = self.inflight[-1], self.inflight[k]
        self.deliver(self.inflight.pop())
        return True

    def send_eager_random(self) -> bool:
        """A node whose Ready is being persisted sends the messages that may leave already."""
        waiting = [n for n in self.nodes.values() if n.in_flight is not None and n.raw]
        if not waiting:
            return False
        for m in self.rng.choice(waiting).raw.take_messages():
            self.send(m)
        return True

    def persist_random(self) -> bool:
        """Finish one node's in-flight Ready (its fsync completes)."""
        waiting = [n for n in self.nodes.values() if n.in_flight is not None]
        if not waiting:
            return False
        self.rng.choice(waiting).finish_persist()
        return True

    def stabilize(self, max_messages: int = 100_000) -> int:
        """Persist and deliver in order until nothing is in flight; returns how many messages
        were delivered."""
        n = 0
        while n < max_messages:
            for node in self.nodes.values():
                node.finish_persist()
                node.process()
            if not self.inflight:
                break
            batch, self.inflight = self.inflight, []
            for m in batch:
                self.deliver(m)
                n += 1
        return n

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes in the same group can talk."""
        groups = [set(g) for g in groups]
        self.cut.clear()
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in g and b in g for g in groups):
                    self.cut.add((a, b))

    def isolate(self, node_id: str) -> None:
        self.isolated.add(node_id)

    def heal(self) -> None:
        self.cut.clear()
        self.isolated.clear()

    def durable_term_at(self, node_id: str, index: int) -> int | None:
        node = self.nodes.get(node_id)
        if node is None:
            return None
        snap = node.storage.snapshot
        if snap is not None and index <= snap.meta.index:
            # A snapshot only holds committed entries: the term there is the committed one.
            return self.checker.committed.get(index, (snap.meta.term,))[0]
        return node.storage.term_at(index)

    # -- time and clients ----------------------------------------------------------------------

    def tick(self, node_id: str | None = None, n: int = 1) -> None:
        ids = [node_id] if node_id else list(self.nodes)
        for _ in range(n):
            for i in ids:
                node = self.nodes[i]
                if node.raw is not None:
                    node.raw.tick()
                    node.process()

    def leader(self) -> str | None:
        """The leader of the highest term among live nodes, if any."""
        best = None
        for node in self.nodes.values():
            raw = node.raw
            if raw is not None and raw.role is StateRole.LEADER:
                if best is None or raw.term > self.nodes[best].raw.term:
                    best = node.id
        return best

    def elect(self, max_ticks: int = 1000) -> str:
        """Tick and deliver until some node leads and every live voter follows it."""
        for _ in range(max_ticks):
            self.stabilize()
            lead = self.leader()
            if lead is not None:
                raw = self.nodes[lead].raw
                # Judged by the leader's configuration: a removed voter that never learned of
                # its removal may stay a pre-candidate forever, harmlessly (pre-vote).
                if all(n.raw is None or n.id in self.isolated or
                       (n.raw.term == raw.term and n.raw.leader == lead)
                       for n in self.nodes.values() if n.id in raw.conf.voters):
                    return lead
            self.tick()
        raise AssertionError("no leader elected")

    def campaign(self, node_id: str) -> None:
        """Make ``node_id`` start an election now."""
        node = self.nodes[node_id]
        if node.raw is not None:
            node.raw.campaign()
            node.process()

    def propose(self, node_id: str, data: bytes) -> int | None:
        node = self.nodes[node_id]
        if node.raw is None:
            return None
        try:
            index = node.raw.propose(data)
        except ProposalDropped:
            return None
        node.pending[index] = node.raw.term
        node.process()
        return index

    def read(self, node_id: str, ctx: bytes) -> bool:
        node = self.nodes[node_id]
        if node.raw is None:
            return False
        try:
            node.raw.read_index(ctx)
        except ProposalDropped:
            return False
        node.reads[ctx] = self.checker.acked_index
        node.process()
        return True

    def conf_change(self, node_id: str, cc: ConfChange) -> int | None:
        node = self.nodes[node_id]
        try:
            index = node.raw.propose_conf_change(cc)
        except ProposalDropped:
            return None
        node.process()
        return index

    def compact(self, node_id: str) -> bool:
        """Snapshot ``node_id``'s state machine at its applied index and drop its log prefix."""
        node = self.nodes[node_id]
        raw = node.raw
        if raw is None or node.applied <= raw.first_index - 1:
            return False
        snap = raw.create_snapshot(node.applied, pickle.dumps(node.state))
        node.storage.compact(snap)
        raw.compact(snap)
        return True

    def applied_commands(self, node_id: str) -> list[bytes]:
        return list(self.nodes[node_id].state)
