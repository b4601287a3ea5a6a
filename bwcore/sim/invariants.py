"""Raft's safety properties, checked incrementally after every step of a simulation.

The numbers follow ../design PROTOCOL.md "Safety invariants": 1 election safety, 2 log
matching, 3 leader completeness, 4 state machine safety, 5 non-voters never in a quorum,
6 relayed messages are the leader's own, 7 linearizable reads; and, beneath 1 and 2, that a
node speaks as candidate or leader only in a term it holds durably, having durably voted for
itself in it (else a crash could let it lead that term twice). Each check is incremental so
that thousands of schedules stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bwcore.kernel import SENT_AS_CANDIDATE_OR_LEADER, Entry, HardState, Message, MessageType


_REPLICATION = frozenset({MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT})


class InvariantViolation(AssertionError):
    pass


@dataclass
class SafetyChecker:
    #: term -> the node that led it (invariant 1).
    leaders: dict[int, str] = field(default_factory=dict)
    #: (index, term) -> (data, term of the previous entry), for every entry ever persisted
    #: anywhere: same index and term must mean same entry and same prefix (invariant 2).
    entries: dict[tuple[int, int], tuple[bytes, int]] = field(default_factory=dict)
    #: index -> (term, data) of every entry any node applied (invariants 3 and 4).
    committed: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    #: the highest index of any write acknowledged to a client so far (invariant 7).
    acked_index: int = 0
    #: Record the leaders' replication messages, for :meth:`on_relayed` (invariant 6).
    track_relays: bool = False
    #: term -> every APPEND, HEARTBEAT and SNAPSHOT the leader of that term emitted.
    emitted: dict[int, set[Message]] = field(default_factory=dict)
    checks: int = 0

    def fail(self, what: str) -> None:
        raise InvariantViolation(what)

    def on_leader(self, node: str, term: int, raw) -> None:
        """``node`` (a RawNode ``raw``) became leader of ``term``."""
        self.checks += 1
        other = self.leaders.setdefault(term, node)
        if other != node:
            self.fail(f"election safety: {other} and {node} both led term {term}")
        first = raw.first_index
        for index, (t, _) in self.committed.items():
            if index < first:
                continue  # compacted into the leader's snapshot, which holds only committed state
            have = raw.term_at(index)
            if have != t:
                self.fail(f"leader completeness: leader {node} of term {term} has term {have} "
                          f"at committed index {index} (term {t})")

    def on_persist(self, node: str, entries: tuple[Entry, ...], prev_term: int) -> None:
        self.checks += 1
        for e in entries:
            key = (e.index, e.term)
            seen = self.entries.setdefault(key, (e.data, prev_term))
            if seen != (e.data, prev_term):
                self.fail(f"log matching: {node} holds a different entry or prefix at index "
                          f"{e.index} term {e.term}")
            prev_term = e.term

    def on_apply(self, node: str, entry: Entry) -> None:
        self.checks += 1
        seen = self.committed.setdefault(entry.index, (entry.term, entry.data))
        if seen != (entry.term, entry.data):
            self.fail(f"state machine safety: {node} applied {entry} where another node applied "
                      f"term {seen[0]} data {seen[1]!r}")

    def on_snapshot_install(self, node: str, index: int, term: int) -> None:
        seen = self.committed.get(index)
        if seen is not None and seen[0] != term:
            self.fail(f"state machine safety: {node} installed a snapshot at {index} term {term}, "
                      f"committed term {seen[0]}")

    def on_send(self, m: Message, non_voters: frozenset[str],
                durable: HardState | None = None) -> None:
        """``m`` leaves its sender, whose storage holds ``durable`` (None: unknown)."""
        if durable is not None and m.type in SENT_AS_CANDIDATE_OR_LEADER \
                and (m.term > durable.term
                     or (m.term == durable.term and durable.vote != m.frm)):
            self.fail(f"durable term: {m.frm} sent {m.type.name} in term {m.term} holding only "
                      f"term {durable.term} and vote {durable.vote} durably")
        if self.track_relays and m.type in _REPLICATION and self.leaders.get(m.term) == m.frm:
            self.emitted.setdefault(m.term, set()).add(m)
        if m.frm in non_voters and m.type in (MessageType.VOTE_RESP, MessageType.PRE_VOTE_RESP) \
                and not m.reject:
            self.fail(f"non-voter {m.frm} granted a vote to {m.to}")
        if m.frm in non_voters and m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self.fail(f"non-voter {m.frm} campaigned")

    def on_relayed(self, node: str, m: Message) -> None:
        """``node`` is about to step ``m``, which a helper (a secretary) relayed: it must be a
        message the leader of its term emitted, unchanged — entries, commit index and all
        (invariant 6: secretaries never make a follower accept what the leader did not send)."""
        self.checks += 1
        if m.to != node or m.frm != self.leaders.get(m.term) \
                or m not in self.emitted.get(m.term, ()):
            self.fail(f"secretary relay: {node} was handed {m.type.name} index {m.index} term "
                      f"{m.term} from {m.frm} with {len(m.entries)} entries, commit {m.commit}, "
                      f"which the leader of term {m.term} never sent to it")

    def on_commit(self, leader: str, index: int, term: int,
                  configurations: tuple[frozenset[str], ...], durable_term_at) -> None:
        """A leader moved its commit index: a voter majority of a configuration it was in
        during the step must hold the entry durably (invariant 5 and §5.3)."""
        self.checks += 1
        for voters in configurations:
            holders = [v for v in voters if durable_term_at(v, index) == term]
            if voters and len(holders) >= len(voters) // 2 + 1:
                return
        self.fail(f"quorum: {leader} committed {index} (term {term}) without a durable voter "
                  f"majority in {[sorted(v) for v in configurations]}")

    def on_ack(self, index: int) -> None:
        self.acked_index = max(self.acked_index, index)

    def on_read(self, node: str, read_index: int, acked_before: int) -> None:
        self.checks += 1
        if read_index < acked_before:
            self.fail(f"linearizable read on {node} at index {read_index} misses a write "
                      f"acknowledged at index {acked_before} before the read began")
