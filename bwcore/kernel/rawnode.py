"""The driver-facing kernel: feed it inputs, take a :class:`Ready`, act on it, ``advance``.

The persistence rule (Raft §5, Figure 2, "respond to RPCs only after updating stable
storage"): a Ready's ``persisted_messages`` may leave only once its ``hard_state``,
``snapshot`` and ``entries`` are durable. ``messages`` may leave at once — a leader may send
appends while it persists the same entries (dissertation §10.2.1) — except what a node says as
a candidate or leader (``SENT_AS_CANDIDATE_OR_LEADER``) in a term whose vote for itself is not
yet durable. A candidate that asked for votes in a term it could forget in a crash would ask
again in the same term after restarting, its voters would grant it again, and it could lead
that term twice, writing two different entries at one index and term (Log Matching broken, and
with it State Machine Safety). The rule looks at each message's own term, not at the node's
role when it leaves: a candidate that fell back to pre-candidate, or a leader that stepped
down, before its term was saved still holds what it said in that term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bwcore.kernel.raft import KernelConfig, Raft, Rng
from bwcore.kernel.types import (
    RESPONSES_AFTER_PERSIST,
    SENT_AS_CANDIDATE_OR_LEADER,
    ConfChange,
    ConfState,
    Entry,
    HardState,
    Message,
    ReadState,
    Snapshot,
    SnapshotMeta,
    SoftState,
    StateRole,
)


class PersistedStateLike(Protocol):
    hard_state: HardState
    snapshot: Snapshot | None
    entries: Sequence[Entry]


@dataclass(frozen=True, slots=True)
class EmptyState:
    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: Sequence[Entry] = ()


@dataclass(frozen=True, slots=True)
class Ready:
    """What the driver must do, in order: persist, send, install, apply, then ``advance``.

    Attributes:
        soft_state: the leader or role changed (None if not).
        hard_state: term/vote/commit to persist (None if unchanged).
        snapshot: a leader's snapshot to persist (storage then holds no older entries) and
            install into the state machine before applying ``committed_entries``.
        entries: to append durably, replacing stored entries from ``entries[0].index`` on.
        messages: may be sent at once (never what a candidate or leader says in a term whose
            vote for itself is not yet durable: module docstring).
        persisted_messages: may be sent only after the above is durable.
        committed_entries: to apply in order, after persisting. Configuration-change entries
            are already reflected in the kernel's configuration; the driver only skips them.
        read_states: linearizable reads to serve once applied >= index.
    """

    soft_state: SoftState | None
    hard_state: HardState | None
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]
    messages: tuple[Message, ...]
    persisted_messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]

    def must_persist(self) -> bool:
        return self.hard_state is not None or self.snapshot is not None or bool(self.entries)


class RawNode:
    """One node's kernel. Not thread-safe: drive it from one thread (the reactor)."""

    def __init__(self, cfg: KernelConfig, rng: Rng,
                 state: PersistedStateLike | None = None,
                 bootstrap: ConfState = ConfState()) -> None:
        state = state or EmptyState()
        self._raft = Raft(cfg, rng, state.hard_state, state.snapshot, list(state.entries),
                          bootstrap)
        r = self._raft
        # What the driver already has: a bootstrapped node has persisted nothing yet.
        self._prev_hard = HardState() if r._bootstrapped else r.hard_state()
        #: The hard state of the last Ready advanced: what the driver holds durably.
        self._durable_hard = self._prev_hard
        self._prev_soft = SoftState(None, StateRole.FOLLOWER)
        self._outstanding: Ready | None = None

    # -- inputs --------------------------------------------------------------------------

    def tick(self) -> None:
        self._raft.tick()

    def step(self, m: Message) -> None:
        """Feed a message from the network. Never raises for stale or misdirected input."""
        if m.to != self._raft.id:
            return
        self._raft.step(m)

    def campaign(self) -> None:
        """Start an election now (tests and forced elections); ignored on non-voters."""
        if self._raft.promotable() and self._raft.role is not StateRole.LEADER:
            self._raft.campaign(pre_vote=self._raft.cfg.pre_vote)

    def propose(self, data: bytes) -> int:
        return self._raft.propose([data])

    def propose_many(self, datas: Sequence[bytes]) -> int:
        return self._raft.propose(list(datas))

    def propose_conf_change(self, cc: ConfChange) -> int:
        return self._raft.propose_conf_change(cc)

    def read_index(self, ctx: bytes) -> None:
        self._raft.read_index(ctx)

    def transfer_leader(self, to: str) -> None:
        self._raft.transfer_leader(to)

    def add_helper(self, node: str) -> None:
        self._raft.add_helper(node)

    def remove_helper(self, node: str) -> None:
        self._raft.remove_helper(node)

    def report_unreachable(self, node: str) -> None:
        self._raft.report_unreachable(node)

    def report_snapshot_failed(self, node: str) -> None:
        self._raft.report_snapshot_failed(node)

    def create_snapshot(self, index: int, data: bytes) -> Snapshot:
        """A snapshot of the state machine at applied ``index``, with the term and the
        configuration as of that index. Changes nothing: persist it, then :meth:`compact`."""
        log = self._raft.log
        if not log.offset < index <= log.applied:
            raise ValueError(f"snapshot index {index} not in ({log.offset}, {log.applied}]")
        conf = log.snapshot.meta.conf
        for e in log.conf_changes_between(log.offset, index):
            conf = ConfChange.decode(e.data).apply(conf)
        return Snapshot(SnapshotMeta(index, log.term(index) or 0, conf), data)

    def compact(self, snapshot: Snapshot) -> None:
        """The driver persisted ``snapshot`` (at or below applied); drop the log before it."""
        self._raft.log.compact(snapshot)

    # -- outputs -------------------------------------------------------------------------

    def has_ready(self) -> bool:
        r = self._raft
        log = r.log
        prev_hard, prev_soft = self._prev_hard, self._prev_soft
        return bool(
            r.msgs or r.read_states or r.open_reads
            or log.stable < log.last_index() or log.pending_snapshot is not None
            or log.has_next_committed()
            or r.term != prev_hard.term or r.vote != prev_hard.vote
            or log.committed != prev_hard.commit
            or r.leader != prev_soft.leader or r.role is not prev_soft.role
        )

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise RuntimeError("advance() the previous Ready first")
        r = self._raft
        r.flush_read_round()
        soft, hard = self._soft(), r.hard_state()
        now, later = self._split(r.msgs)
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != self._prev_hard else None,
            snapshot=r.log.pending_snapshot,
            entries=r.log.unstable_entries(),
            messages=tuple(now),
            persisted_messages=tuple(later),
            committed_entries=r.log.next_committed(r.cfg.max_apply_entries),
            read_states=tuple(r.read_states),
        )
        r.msgs = []
        r.read_states = []
        self._prev_soft, self._prev_hard = soft, hard
        self._outstanding = rd
        return rd

    def take_messages(self) -> list[Message]:
        """Messages that may leave now, taken out of the next Ready.

        A driver calls this while a Ready is being persisted, so that a leader's appends for
        proposals made meanwhile go out at once instead of waiting for that fsync: they depend
        on no unsaved state (dissertation §10.2.1). Responses that do, and what the node said
        as a candidate or leader in a term not yet saved with its vote (module docstring),
        stay in the kernel for the next Ready.
        """
        r = self._raft
        r.flush_read_round()
        now, later = self._split(r.msgs)
        if now:
            r.msgs = later
        return now

    def _split(self, msgs: list[Message]) -> tuple[list[Message], list[Message]]:
        """``msgs`` that may leave now, and those that must wait for the next save."""
        durable = self._durable_hard
        # The last term this node may speak in as a candidate or leader: one it holds
        # durably, having durably voted for itself in it (module docstring).
        spoken = durable.term if durable.vote == self._raft.id else durable.term - 1
        now: list[Message] = []
        later: list[Message] = []
        for m in msgs:
            if m.type in RESPONSES_AFTER_PERSIST \
                    or (m.term > spoken and m.type in SENT_AS_CANDIDATE_OR_LEADER):
                later.append(m)
            else:
                now.append(m)
        return now, later

    def advance(self, rd: Ready) -> None:
        if rd is not self._outstanding:
            raise RuntimeError("advance() takes the Ready returned by the last ready()")
        self._outstanding = None
        if rd.hard_state is not None:
            self._durable_hard = rd.hard_state
        log = self._raft.log
        if rd.snapshot is not None:
            log.snapshot_installed(rd.snapshot)
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
            self._raft.self_persisted()
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)

    def _soft(self) -> SoftState:
        return SoftState(self._raft.leader, self._raft.role)

    # -- what the driver may look at -------------------------------------------------------

    @property
    def id(self) -> str:
        return self._raft.id

    @property
    def term(self) -> int:
        return self._raft.term

    @property
    def leader(self) -> str | None:
        return self._raft.leader

    @property
    def role(self) -> StateRole:
        return self._raft.role

    @property
    def commit_index(self) -> int:
        return self._raft.log.committed

    @property
    def applied_index(self) -> int:
        return self._raft.log.applied

    @property
    def last_index(self) -> int:
        return self._raft.log.last_index()

    @property
    def first_index(self) -> int:
        return self._raft.log.first_index()

    @property
    def conf(self) -> ConfState:
        return self._raft.conf

    @property
    def helpers(self) -> frozenset[str]:
        return frozenset(self._raft.helpers)

    def term_at(self, index: int) -> int | None:
        return self._raft.log.term(index)

    def status(self) -> dict[str, Any]:
        r = self._raft
        out: dict[str, Any] = {
            "id": r.id, "term": r.term, "role": r.role.value, "leader": r.leader,
            "commit_index": r.log.committed, "applied_index": r.log.applied,
            "first_index": r.log.first_index(), "last_index": r.log.last_index(),
            "voters": sorted(r.conf.voters), "learners": sorted(r.conf.learners),
        }
        if r.role is StateRole.LEADER:
            out["progress"] = {
                p: {"match": pr.match, "next": pr.next, "state": pr.state.value,
                    "active": pr.recent_active}
                for p, pr in sorted(r.prs.items()) if p != r.id
            }
            out["lead_transferee"] = r.lead_transferee
        return out
