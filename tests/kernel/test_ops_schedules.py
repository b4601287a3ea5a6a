"""Operations under faults, in the simulator: compaction, leadership transfer, membership churn.

The schedules of bwcore.sim.schedule already compact and change membership now and then; the
schedule here does little else. Leadership transfers to random voters (some lagging, some
partitioned away, some crashed), removal of the leader itself, crashes right after a change is
proposed, snapshots everywhere — with drops, duplicates, partitions and crashes around them.
The SafetyChecker checks every step (at most one leader per term, log matching, leader
completeness, state machine safety, quorum-only commits); at the end the cluster heals and must
converge with every acknowledged entry applied.
"""

from __future__ import annotations

import random

import pytest

from bwcore.kernel import ConfChange, ConfChangeType, ProposalDropped, StateRole
from bwcore.kernel.progress import Progress, ProgressState
from bwcore.sim.network import MemoryStorage, SimNetwork
from bwcore.sim.schedule import _converge

SEEDS = range(100)


def _conf_change(net: SimNetwork, lead: str, rng: random.Random) -> ConfChange | None:
    conf = net.nodes[lead].raw.conf
    spares = [n for n in net.nodes if n not in conf.members() and n not in net.helpers]
    choices = []
    if spares:
        choices.append(ConfChange(ConfChangeType.ADD_LEARNER, rng.choice(sorted(spares))))
    if conf.learners:
        choices.append(ConfChange(ConfChangeType.PROMOTE, rng.choice(sorted(conf.learners))))
        choices.append(ConfChange(ConfChangeType.REMOVE, rng.choice(sorted(conf.learners))))
    if len(conf.voters) >= 3:
        # Often the leader itself: it must step down once the removal commits (§4.2.2).
        victim = lead if rng.random() < 0.5 else rng.choice(sorted(conf.voters))
        choices.append(ConfChange(ConfChangeType.REMOVE, victim))
    return rng.choice(choices) if choices else None


def run_ops_schedule(seed: int, steps: int = 800) -> dict[str, int]:
    voters = ["n1", "n2", "n3"]
    net = SimNetwork(voters, seed, helpers=["o1"], async_persist=True, election_tick=6,
                     max_inflight=8)
    for spare in ("s1", "s2"):
        net.add_node(spare)
    rng = net.rng
    down: set[str] = set()
    stats = {"transfers": 0, "leader_changes": 0, "conf_changes": 0, "leader_removals": 0,
             "crash_mid_change": 0, "compactions": 0, "acked": 0}
    counter = 0
    last_leader: str | None = None

    def live() -> list[str]:
        return [n for n in net.nodes if n not in down]

    for _ in range(steps):
        r = rng.random()
        lead = net.leader()
        if r < 0.42:
            if not net.deliver_random():
                net.tick(rng.choice(live()) if live() else None)
        elif r < 0.52:
            net.persist_random()
        elif r < 0.60:
            net.tick(rng.choice(list(net.nodes)))
        elif r < 0.74:
            counter += 1
            if lead is not None:
                net.propose(lead, b"c%d" % counter)
        elif r < 0.77:
            if lead is not None and lead not in down:
                target = rng.choice(sorted(net.nodes[lead].raw.conf.voters | {"s1"}))
                try:
                    net.nodes[lead].raw.transfer_leader(target)
                    stats["transfers"] += 1
                except ProposalDropped:
                    pass
                net.nodes[lead].process()
        elif r < 0.85:
            if lead is not None and lead not in down:
                cc = _conf_change(net, lead, rng)
                if cc is not None and net.conf_change(lead, cc) is not None:
                    stats["conf_changes"] += 1
                    if cc.type is ConfChangeType.REMOVE and cc.node == lead:
                        stats["leader_removals"] += 1
                    if rng.random() < 0.25:
                        # Crash the leader right after proposing: the change may or may not
                        # survive, never half of it.
                        net.nodes[lead].crash(torn=rng.random() < 0.5)
                        down.add(lead)
                        stats["crash_mid_change"] += 1
        elif r < 0.87:
            victims = live()
            if victims:
                v = rng.choice(victims)
                net.nodes[v].crash(torn=rng.random() < 0.5)
                down.add(v)
        elif r < 0.91:
            if down:
                v = rng.choice(sorted(down))
                down.discard(v)
                net.nodes[v].start()
        elif r < 0.97:
            n = rng.choice(live() or list(net.nodes))
            if net.nodes[n].up and net.compact(n):
                stats["compactions"] += 1
        elif r < 0.98:
            ids = list(net.nodes)
            rng.shuffle(ids)
            k = rng.randrange(1, len(ids))
            net.partition(ids[:k], ids[k:])
        else:
            net.heal()
        new_lead = net.leader()
        if new_lead is not None and new_lead != last_leader:
            stats["leader_changes"] += last_leader is not None
            last_leader = new_lead

    _converge(net, down)
    lead = net.elect(max_ticks=2000)
    applied = set(net.applied_commands(lead))
    for _, _, data in net.acked:
        assert data in applied, f"seed {seed}: acknowledged {data!r} was lost"
    stats["acked"] = len(net.acked)
    return stats


@pytest.mark.parametrize("seed", SEEDS)
def test_ops_schedule_keeps_every_invariant(seed: int) -> None:
    """Transfers, churn (removing the leader too), crashes mid-change and snapshots under faults
    never break safety, and the healed cluster converges with every acknowledged entry."""
    run_ops_schedule(seed)


def test_ops_schedules_exercise_what_they_claim() -> None:
    """Across the seeds, each kind of operation happened many times (the test is not vacuous)."""
    total: dict[str, int] = {}
    for seed in range(20):
        for key, value in run_ops_schedule(seed).items():
            total[key] = total.get(key, 0) + value
    assert total["transfers"] >= 60
    assert total["leader_changes"] >= 15
    assert total["conf_changes"] >= 25
    assert total["leader_removals"] >= 3
    assert total["crash_mid_change"] >= 4
    assert total["compactions"] >= 100
    assert total["acked"] >= 200


def test_transfer_under_partition_is_abandoned_and_never_makes_two_leaders() -> None:
    """A transfer to a voter cut off from the leader times out after an election timeout; the
    leader takes proposals again, and at no point are there two leaders in one term."""
    net = SimNetwork(["n1", "n2", "n3"], 7, election_tick=6)
    lead = net.elect()
    target = next(n for n in ("n1", "n2", "n3") if n != lead)
    net.isolate(target)
    net.nodes[lead].raw.transfer_leader(target)
    net.nodes[lead].process()
    with pytest.raises(ProposalDropped):
        net.nodes[lead].raw.propose(b"during")
    for _ in range(8):
        net.tick(lead)
        net.stabilize()
    assert net.nodes[lead].raw.role is StateRole.LEADER
    assert net.propose(lead, b"after") is not None


def test_wiped_follower_is_probed_back_to_a_snapshot() -> None:
    """A follower whose storage is wiped rejects appends below what it once acknowledged; the
    leader forgets that match and sends a snapshot instead of probing the same index forever."""
    net = SimNetwork(["n1", "n2", "n3"], 3, election_tick=6)
    lead = net.elect()
    for i in range(30):
        net.propose(lead, b"w%d" % i)
        net.stabilize()
    net.tick()
    net.stabilize()
    assert net.compact(lead)
    victim = next(n for n in ("n1", "n2", "n3") if n != lead)
    node = net.nodes[victim]
    node.crash()
    node.storage = MemoryStorage()
    node.start()
    net.propose(lead, b"after")
    for _ in range(5):
        net.tick()
        assert net.stabilize() < 10_000, "the leader and the wiped follower ping-pong"
    assert node.raw.applied_index == net.nodes[lead].raw.applied_index
    assert net.applied_commands(victim)[-1] == b"after"


def test_probe_rejected_below_the_match_forgets_the_match() -> None:
    pr = Progress(705, 8)
    pr.match = 704
    assert pr.state is ProgressState.PROBE
    assert pr.maybe_decrease_to(704, 3)
    assert (pr.match, pr.next) == (3, 4)
    stale = Progress(705, 8)
    stale.match = 704
    assert not stale.maybe_decrease_to(650, 3)  # not the probe in flight: ignored
    assert stale.match == 704
