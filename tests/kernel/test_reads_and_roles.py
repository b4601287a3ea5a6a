"""ReadIndex, pre-vote and check-quorum, learners and helpers (non-voters)."""

from __future__ import annotations

import pytest

from bwcore.kernel import (
    ConfChange,
    ConfChangeType,
    MessageType as MT,
    ProposalDropped,
    StateRole,
)
from bwcore.sim.network import SimNetwork
from tests.kernel.helpers import drain, make_leader, new_node, of_type


def run(net, ticks):
    for _ in range(ticks):
        net.tick()
        net.stabilize()


# -- ReadIndex (dissertation §6.4) -----------------------------------------------------------

def test_read_index_on_leader_and_follower():
    """A read on any voter returns the leader's commit index once a heartbeat round confirms
    leadership, and covers every write acknowledged before it."""
    net = SimNetwork("abc", seed=1)
    lead = net.elect()
    net.propose(lead, b"w1")
    net.stabilize()
    acked = net.acked[-1][1]
    for node in "abc":
        assert net.read(node, b"r-" + node.encode())
        net.stabilize()
        ((ctx, index),) = net.nodes[node].served_reads
        assert index >= acked


def test_reads_wait_for_the_new_leaders_first_commit():
    """A new leader answers no read until its term's no-op has committed: before that its
    commit index may be stale."""
    raw = new_node()
    make_leader(raw)
    raw.read_index(b"early")
    assert not of_type(drain(raw), MT.HEARTBEAT)  # no confirmation round yet
    raw.step(_resp(raw, "b", raw.last_index))  # the no-op commits...
    beats = of_type(drain(raw), MT.HEARTBEAT)
    assert beats and all(m.context for m in beats)  # ...and only then a round starts
    raw.step(_hb_resp(raw, "b", beats[0].context))
    rd = raw.ready()
    assert [rs.context for rs in rd.read_states] == [b"early"]
    assert rd.read_states[0].index == raw.commit_index


def _resp(raw, frm, index):
    from bwcore.kernel import Message
    return Message(MT.APPEND_RESP, raw.id, frm, raw.term, index=index)


def _hb_resp(raw, frm, ctx):
    from bwcore.kernel import Message
    return Message(MT.HEARTBEAT_RESP, raw.id, frm, raw.term, context=ctx)


def test_concurrent_reads_share_confirmation():
    """A quorum acknowledging a later round confirms every earlier pending round too."""
    raw = new_node()
    make_leader(raw)
    raw.step(_resp(raw, "b", raw.last_index))
    drain(raw)
    raw.read_index(b"r1")
    raw.read_index(b"r2")
    beats = of_type(drain(raw), MT.HEARTBEAT)
    last_ctx = beats[-1].context
    raw.step(_hb_resp(raw, "c", last_ctx))
    rd = raw.ready()
    assert [rs.context for rs in rd.read_states] == [b"r1", b"r2"]


def test_deposed_leader_serves_no_stale_read():
    """A leader cut off from the majority cannot confirm leadership, so a read on it is never
    answered while the majority elects a new leader and acknowledges new writes (the stale
    read Jepsen found in etcd 0.4)."""
    net = SimNetwork("abc", seed=2, check_quorum=False)
    old = net.elect()
    net.propose(old, b"v1")
    net.stabilize()
    net.partition([old], [n for n in "abc" if n != old])
    run(net, 40)
    new = net.leader()
    assert new != old
    net.propose(new, b"v2")
    run(net, 2)
    assert net.nodes[old].raw.role is StateRole.LEADER  # it does not know yet
    net.read(old, b"stale?")
    run(net, 5)
    assert net.nodes[old].served_reads == []


def test_read_through_helper():
    """A helper (observer) gets a read index from the leader like a follower does."""
    net = SimNetwork("abc", seed=3, helpers=["o1"])
    lead = net.elect()
    net.propose(lead, b"w")
    run(net, 2)
    assert net.read("o1", b"obs")
    net.stabilize()
    assert net.nodes["o1"].served_reads[0][1] >= net.acked[-1][1]
    assert b"w" in net.applied_commands("o1")


def test_read_with_no_leader_is_refused_at_once():
    raw = new_node()
    with pytest.raises(ProposalDropped):
        raw.read_index(b"x")


# -- pre-vote and check-quorum ---------------------------------------------------------------

def test_check_quorum_makes_isolated_leader_step_down():
    """A leader that hears from no majority for an election timeout steps down."""
    net = SimNetwork("abc", seed=4)
    lead = net.elect()
    net.isolate(lead)
    run(net, 25)
    assert net.nodes[lead].raw.role is not StateRole.LEADER


def test_rejoining_partitioned_node_does_not_disrupt():
    """With pre-vote, a node cut off for a long time rejoins without bumping the term or
    deposing the healthy leader (dissertation §9.6)."""
    net = SimNetwork("abc", seed=5)
    lead = net.elect()
    term = net.nodes[lead].raw.term
    loner = next(n for n in "abc" if n != lead)
    net.isolate(loner)
    run(net, 100)
    assert net.nodes[loner].raw.term == term  # pre-votes never raise the term
    net.heal()
    run(net, 30)
    assert net.leader() == lead and net.nodes[lead].raw.term == term


def test_stuck_candidate_without_pre_vote_is_freed_by_check_quorum():
    """Without pre-vote a rejoining node with a higher term forces one new election, after
    which the cluster settles on a single leader again."""
    net = SimNetwork("abc", seed=6, pre_vote=False)
    lead = net.elect()
    loner = next(n for n in "abc" if n != lead)
    net.isolate(loner)
    run(net, 60)
    assert net.nodes[loner].raw.term > net.nodes[lead].raw.term
    net.heal()
    run(net, 60)
    assert net.leader() is not None
    terms = {net.nodes[n].raw.term for n in "abc"}
    assert len(terms) == 1


# -- non-voters --------------------------------------------------------------------------------

def test_helpers_never_campaign_or_vote_and_do_not_count():
    """Helpers receive the log but never campaign, never grant a vote and never count toward
    a commit (invariant 5; the checker also fails on any helper vote)."""
    net = SimNetwork("abc", seed=7, helpers=["o1", "o2"])
    lead = net.elect()
    followers = [n for n in "abc" if n != lead]
    for f in followers:
        net.isolate(f)
    index = net.propose(lead, b"needs-a-voter")
    run(net, 5)
    assert net.nodes[lead].raw.commit_index < index  # helpers acked, but do not count
    for n in ("o1", "o2"):
        assert net.nodes[n].raw.role is StateRole.FOLLOWER
    net.heal()
    for f in followers:
        net.nodes[f].crash()
    run(net, 100)
    assert net.leader() in (lead, None)  # the helpers never take over
    assert all(net.nodes[n].raw.role is StateRole.FOLLOWER for n in ("o1", "o2"))


def test_learner_never_campaigns_but_votes_once_promoted():
    """A configuration learner receives the log and never campaigns; once promoted it votes
    and counts."""
    net = SimNetwork("abc", seed=8)
    net.add_node("d")
    lead = net.elect()
    assert net.conf_change(lead, ConfChange(ConfChangeType.ADD_LEARNER, "d")) is not None
    run(net, 3)
    net.propose(lead, b"x")
    run(net, 3)
    assert b"x" in net.applied_commands("d")
    run(net, 50)
    assert net.nodes["d"].raw.role is StateRole.FOLLOWER
    assert net.conf_change(lead, ConfChange(ConfChangeType.PROMOTE, "d")) is not None
    run(net, 3)
    assert net.nodes[lead].raw.conf.voters == frozenset("abcd")
    assert net.nodes["d"].raw.conf.voters == frozenset("abcd")


def test_reads_of_one_turn_share_a_round_that_covers_writes_acknowledged_meanwhile():
    """Reads requested before the driver next takes messages are confirmed by one heartbeat
    round, sent to voters only; its read index is the commit index when the round leaves, so a
    write acknowledged between two of those reads is covered by both."""
    raw = new_node()
    raw.add_helper("o1")
    make_leader(raw)
    raw.step(_resp(raw, "b", raw.last_index))
    drain(raw)
    raw.read_index(b"r1")
    index = raw.propose(b"w")
    raw.step(_resp(raw, "b", index))  # b and c hold it (our own copy is not saved yet):
    raw.step(_resp(raw, "c", index))  # the write commits, and could be acknowledged, now
    assert raw.commit_index == index
    raw.read_index(b"r2")
    beats = [m for m in of_type(drain(raw), MT.HEARTBEAT) if m.context]
    assert sorted(m.to for m in beats) == ["b", "c"]  # one round, voters only
    assert len({m.context for m in beats}) == 1
    raw.step(_hb_resp(raw, "c", beats[0].context))
    rd = raw.ready()
    assert [(rs.context, rs.index) for rs in rd.read_states] == [(b"r1", index), (b"r2", index)]
