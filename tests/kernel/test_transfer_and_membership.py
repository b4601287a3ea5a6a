"""Leadership transfer (dissertation §3.10) and single-server membership changes (§4.1)."""

from __future__ import annotations

import pytest

from bwcore.kernel import ConfChange, ConfChangeType as CC, ProposalDropped, StateRole
from bwcore.sim.network import SimNetwork


def run(net, ticks):
    for _ in range(ticks):
        net.tick()
        net.stabilize()


def test_transfer_to_up_to_date_follower():
    """The target campaigns at once on TIMEOUT_NOW and wins in the next term, bypassing the
    other followers' leader lease."""
    net = SimNetwork("abc", seed=1)
    lead = net.elect()
    target = next(n for n in "abc" if n != lead)
    term = net.nodes[lead].raw.term
    net.nodes[lead].raw.transfer_leader(target)
    net.nodes[lead].process()
    net.stabilize()
    assert net.leader() == target and net.nodes[target].raw.term == term + 1


def test_transfer_to_lagging_follower_catches_it_up_first():
    net = SimNetwork("abc", seed=2)
    lead = net.elect()
    target = next(n for n in "abc" if n != lead)
    net.isolate(target)
    for k in range(20):
        net.propose(lead, b"x%d" % k)
    net.stabilize()
    net.heal()
    net.nodes[lead].raw.transfer_leader(target)
    net.nodes[lead].process()
    net.stabilize()
    run(net, 2)
    assert net.leader() == target
    assert net.applied_commands(target)[:20] == [b"x%d" % k for k in range(20)]


def test_proposals_refused_during_transfer_and_transfer_aborts_after_timeout():
    net = SimNetwork("abc", seed=3)
    lead = net.elect()
    target = next(n for n in "abc" if n != lead)
    net.isolate(target)
    net.nodes[lead].raw.transfer_leader(target)
    with pytest.raises(ProposalDropped):
        net.nodes[lead].raw.propose(b"during")
    run(net, 12)  # one election timeout (10 ticks) later the transfer is abandoned
    assert net.leader() == lead
    assert net.propose(lead, b"after") is not None


@pytest.mark.parametrize("to", ["self", "stranger", "learner"])
def test_transfer_to_invalid_target_is_refused(to):
    net = SimNetwork("abc", seed=4)
    net.add_node("d")
    lead = net.elect()
    net.conf_change(lead, ConfChange(CC.ADD_LEARNER, "d"))
    run(net, 2)
    target = {"self": lead, "stranger": "zz", "learner": "d"}[to]
    with pytest.raises(ProposalDropped):
        net.nodes[lead].raw.transfer_leader(target)


def test_grow_to_five_and_shrink_back_to_three():
    """Learner first, promotion after catch-up, one change at a time; commits continue and
    quorum sizes follow the configuration."""
    net = SimNetwork("abc", seed=5)
    for n in "de":
        net.add_node(n)
    lead = net.elect()
    for n in "de":
        assert net.conf_change(lead, ConfChange(CC.ADD_LEARNER, n)) is not None
        # One change at a time: a second one is refused until this one commits.
        with pytest.raises(ProposalDropped):
            net.nodes[lead].raw.propose_conf_change(ConfChange(CC.PROMOTE, n))
        run(net, 2)
        assert net.conf_change(lead, ConfChange(CC.PROMOTE, n)) is not None
        run(net, 2)
    assert net.nodes[lead].raw.conf.voters == frozenset("abcde")
    for n in "abc":
        net.isolate(n) if n != lead else None
    index = net.propose(lead, b"needs-3-of-5")
    run(net, 3)
    assert net.nodes[lead].raw.commit_index >= index  # lead + d + e
    net.heal()
    for n in [x for x in "abc" if x != lead][:2]:
        assert net.conf_change(lead, ConfChange(CC.REMOVE, n)) is not None
        run(net, 3)
    assert len(net.nodes[lead].raw.conf.voters) == 3
    net.propose(lead, b"still")
    run(net, 3)
    assert b"still" in net.applied_commands(lead)


def test_removing_the_leader():
    """A leader that commits its own removal steps down and the rest elect a new leader."""
    net = SimNetwork("abcd", seed=6)
    lead = net.elect()
    net.propose(lead, b"before")
    net.stabilize()
    assert net.conf_change(lead, ConfChange(CC.REMOVE, lead)) is not None
    run(net, 3)
    assert net.nodes[lead].raw.role is not StateRole.LEADER
    run(net, 40)
    new = net.leader()
    assert new is not None and new != lead
    assert net.nodes[new].raw.conf.voters == frozenset("abcd") - {lead}
    net.propose(new, b"after")
    run(net, 3)
    assert net.applied_commands(new) == [b"before", b"after"]


def test_conf_change_refused_before_leader_commits_in_its_term():
    """The fix to single-server changes: no change until an entry of the leader's term has
    committed."""
    from tests.kernel.helpers import make_leader, new_node
    raw = new_node()
    make_leader(raw)
    with pytest.raises(ProposalDropped):
        raw.propose_conf_change(ConfChange(CC.ADD_LEARNER, "d"))
