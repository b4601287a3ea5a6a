"""The randomized schedules and the safety checker really catch broken kernels.

Each test breaks one rule of Raft in the kernel and demands that some of a few hundred seeded
schedules (or, for interleavings too rare for them, a scripted scenario) report a violation,
so that a green run means something.
"""

from __future__ import annotations

import pytest

from bwcore.kernel import StateRole
from bwcore.kernel.log import RaftLog
from bwcore.kernel.raft import Raft
from bwcore.sim.invariants import InvariantViolation
from bwcore.sim.schedule import run_schedule


def _first_failure(seeds: int = 2000, kind: type[Exception] = AssertionError
                   ) -> Exception | None:
    """The first failure of type ``kind`` over up to ``seeds`` schedules (a broken kernel may
    also stall, which is an AssertionError but not a safety violation)."""
    for seed in range(seeds):
        try:
            run_schedule(seed, 400)
        except kind as e:
            return e
        except AssertionError:
            continue
    return None


def test_commit_by_counting_old_term_entries_is_caught(monkeypatch):
    """Figure 8's bug: committing an entry of an older term by counting replicas. The random
    schedules rarely reach it (a new leader's no-op usually travels with the old entry), so
    the scripted Figure 8 must catch it."""
    from bwcore.kernel.progress import committed_index
    from tests.kernel.test_paper import test_figure_8_scripted

    def maybe_commit(self):
        index = committed_index(self.conf.voters, {p: pr.match for p, pr in self.prs.items()})
        if index > self.log.committed:
            self._commit_to(index)
            return True
        return False

    monkeypatch.setattr(Raft, "maybe_commit", maybe_commit)
    with pytest.raises(InvariantViolation, match="leader completeness|state machine safety"):
        test_figure_8_scripted()


def test_voting_for_out_of_date_logs_is_caught(monkeypatch):
    """§5.4.1 broken: votes granted regardless of the candidate's log."""
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, i, t: True)
    assert _first_failure(kind=InvariantViolation) is not None


def test_sending_responses_before_persisting_is_caught(monkeypatch):
    """The persistence rule broken: append and vote responses leave before the Ready is
    durable, and crashes midway through a Ready then lose acknowledged state."""
    import bwcore.kernel.rawnode as rawnode

    monkeypatch.setattr(rawnode, "RESPONSES_AFTER_PERSIST", frozenset())
    assert _first_failure(kind=InvariantViolation) is not None


def test_speaking_in_an_unsaved_term_is_caught(monkeypatch):
    """The persistence rule broken for a candidate or leader: it asks for votes, or appends,
    before its term and its vote for itself are durable, so that a crash could let it lead
    that term twice. The checker flags the message itself, within the suite's seeds."""
    import bwcore.kernel.rawnode as rawnode

    monkeypatch.setattr(rawnode, "SENT_AS_CANDIDATE_OR_LEADER", frozenset())
    e = _first_failure(seeds=1000, kind=InvariantViolation)
    assert e is not None and "durable term" in str(e)


def test_double_voting_is_caught(monkeypatch):
    """§5.2 broken: a node votes for every candidate that asks."""
    orig = Raft._handle_vote_request

    def handle(self, m):
        self.vote = None
        self.leader = None
        orig(self, m)

    monkeypatch.setattr(Raft, "_handle_vote_request", handle)
    assert _first_failure(kind=InvariantViolation) is not None


def test_heartbeat_commit_past_follower_match_is_caught(monkeypatch):
    """A leader that tells followers to commit past what they are known to hold makes them
    apply entries that may be overwritten."""
    from bwcore.kernel import Message, MessageType as MT

    def bcast(self, ctx):
        for p in self.prs:
            if p != self.id:
                self.send(Message(MT.HEARTBEAT, p, self.id, self.term,
                                  commit=self.log.committed, context=ctx))

    monkeypatch.setattr(Raft, "bcast_heartbeat", bcast)
    monkeypatch.setattr("bwcore.kernel.log.RaftLog.commit_to",
                        lambda self, i: _unchecked_commit(self, i))
    assert _first_failure(kind=InvariantViolation) is not None


def _unchecked_commit(log, index):
    if index > log.committed:
        log.committed = index if index <= log.last_index() else log.last_index()
        return True
    return False


def test_leader_without_quorum_check_serving_reads_is_caught(monkeypatch):
    """ReadIndex broken: a leader answers reads at once without confirming it still leads,
    so a deposed leader serves stale reads (the etcd 0.4 bug Jepsen found)."""
    from tests.kernel.test_reads_and_roles import test_deposed_leader_serves_no_stale_read

    def read_index(self, frm, ctx):
        if self.role is StateRole.LEADER:
            self._answer_read(frm, ctx, self.log.committed)

    monkeypatch.setattr(Raft, "_read_index", read_index)
    with pytest.raises(InvariantViolation, match="linearizable read"):
        test_deposed_leader_serves_no_stale_read()
