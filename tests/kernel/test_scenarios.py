"""Cluster scenarios after the MIT 6.824 Raft lab's tests, on the simulated network.

One tick stands for 100 ms; election_tick=10 makes the election timeout 1-2 s as in the lab.
Every scenario also runs the safety checker on every step (it raises on any violation).
"""

from __future__ import annotations

import random

import pytest

from bwcore.kernel import MessageType as MT, StateRole
from bwcore.sim.network import SimNetwork

ET = 10  # election ticks


def run(net: SimNetwork, ticks: int) -> None:
    for _ in range(ticks):
        net.tick()
        net.stabilize()


def leaders(net: SimNetwork) -> dict[str, int]:
    return {i: n.raw.term for i, n in net.nodes.items()
            if n.raw is not None and n.raw.role is StateRole.LEADER and i not in net.isolated}


def one(net: SimNetwork, data: bytes, expected: int | None = None, ticks: int = 50) -> int:
    """6.824's ``one()``: keep submitting until a leader commits ``data`` on all live voters."""
    for _ in range(ticks):
        lead = net.leader()
        if lead is not None and lead not in net.isolated:
            index = net.propose(lead, data)
            if index is not None:
                for _ in range(ET):
                    run(net, 1)
                    live = [n for n in net.voters if net.nodes[n].up and n not in net.isolated]
                    if all(data in net.applied_commands(n) for n in live):
                        assert expected is None or index == expected
                        return index
        run(net, 1)
    raise AssertionError(f"{data!r} did not commit")


def test_initial_election():
    """Exactly one leader; all agree on the term; no term change for two election timeouts."""
    net = SimNetwork("abc", seed=1)
    lead = net.elect()
    terms = {n.raw.term for n in net.nodes.values()}
    assert len(terms) == 1
    run(net, 2 * 2 * ET)
    assert net.leader() == lead and {n.raw.term for n in net.nodes.values()} == terms


def test_reelection():
    """A new leader after the leader is cut off; none without a majority; the old leader
    rejoins as a follower."""
    net = SimNetwork("abc", seed=2)
    old = net.elect()
    net.isolate(old)
    run(net, 4 * ET)
    new = [i for i in leaders(net)]
    assert len(new) == 1 and new[0] != old
    second = next(i for i in "abc" if i not in (old, new[0]))
    net.isolate(new[0])
    net.isolate(second)
    run(net, 4 * ET)
    assert leaders(net) == {}
    net.heal()
    run(net, 4 * ET)
    assert len(leaders(net)) == 1
    assert net.nodes[old].raw.role is not StateRole.LEADER or net.leader() == old


def test_many_elections():
    """Seven nodes, ten rounds of cutting three at random: a leader whenever a majority is
    connected."""
    ids = "abcdefg"
    net = SimNetwork(ids, seed=3)
    net.elect()
    rng = random.Random(3)
    for _ in range(10):
        for i in rng.sample(ids, 3):
            net.isolate(i)
        run(net, 4 * ET)
        assert len(leaders(net)) == 1
        net.heal()
    run(net, 4 * ET)
    assert len(leaders(net)) == 1


def test_basic_agreement():
    """Three commands commit at the expected indexes on every node (4 is the first leader's
    no-op after the three bootstrap entries)."""
    net = SimNetwork("abc", seed=4)
    net.elect()
    for k in range(3):
        one(net, b"cmd%d" % k, expected=5 + k)


def test_bytes_per_command():
    """Ten 5 KB commands: entry bytes sent stay under nodes x payload + 50 KB, i.e. each entry
    travels about once per follower."""
    net = SimNetwork("abc", seed=5)
    net.elect()
    sent = []
    orig = net.post

    def counting(m):
        sent.append(sum(len(e.data) for e in m.entries))
        orig(m)

    net.post = counting
    payload = 0
    for k in range(10):
        data = bytes([k]) * 5000
        payload += len(data)
        one(net, data)
    assert sum(sent) <= 3 * payload + 50_000


def test_agreement_with_follower_down_then_no_agreement_without_majority():
    """Commands commit with one of three down; with three of five down nothing commits, and
    the uncommitted entries are replaced once the majority is back."""
    net = SimNetwork("abc", seed=6)
    lead = net.elect()
    down = next(i for i in "abc" if i != lead)
    net.isolate(down)
    one(net, b"x1")
    one(net, b"x2")
    net.heal()
    one(net, b"x3")

    net = SimNetwork("abcde", seed=7)
    lead = net.elect()
    one(net, b"base")
    others = [i for i in "abcde" if i != lead][:3]
    for i in others:
        net.isolate(i)
    index = net.propose(lead, b"lost")
    run(net, 2 * ET)
    assert all(b"lost" not in net.applied_commands(i) for i in "abcde")
    net.heal()
    run(net, 6 * ET)
    one(net, b"after")
    # Whoever leads now either carried the entry over or replaced it; all agree either way.
    logs = {i: net.applied_commands(i) for i in "abcde"}
    assert len({tuple(v) for v in logs.values()}) == 1
    assert index is not None


def test_concurrent_proposals():
    """Five proposals at once all commit, each exactly once."""
    net = SimNetwork("abc", seed=8)
    lead = net.elect()
    for k in range(5):
        net.propose(lead, b"c%d" % k)
    run(net, 3)
    for i in "abc":
        assert sorted(net.applied_commands(i)) == [b"c%d" % k for k in range(5)]


def test_rejoin_of_partitioned_leader_overwrites_its_uncommitted_entries():
    """A partitioned leader's uncommitted entries are overwritten when it rejoins."""
    net = SimNetwork("abc", seed=9)
    old = net.elect()
    one(net, b"101")
    net.isolate(old)
    for k in range(3):
        net.propose(old, b"stale%d" % k)
    run(net, 4 * ET)
    one(net, b"103")
    net.heal()
    run(net, 4 * ET)
    one(net, b"104")
    for i in "abc":
        cmds = net.applied_commands(i)
        assert cmds == [b"101", b"103", b"104"]


def test_fast_backup_over_long_divergent_logs():
    """Five nodes, batches of 50 entries across partitions: a follower with a long divergent
    log converges in a few round trips (one per term, not one per entry)."""
    net = SimNetwork("abcde", seed=10, max_inflight=64)
    lead = net.elect()
    one(net, b"start")
    rest = [i for i in "abcde" if i != lead]
    # The leader and one follower get 50 entries that will never commit.
    net.partition([lead, rest[0]], rest[1:])
    for k in range(50):
        net.propose(lead, b"bad%d" % k)
    run(net, 4 * ET)
    # The other three elect a leader and commit 50 entries.
    for k in range(50):
        lead2 = net.leader()
        net.propose(lead2, b"good%d" % k)
    run(net, 2)
    # Now the old pair comes back: count the rejected appends it takes to converge.
    rejects = []
    orig = net.post
    net.post = lambda m: (rejects.append(m) if m.type is MT.APPEND_RESP and m.reject else None,
                          orig(m))
    net.heal()
    run(net, 4 * ET)
    one(net, b"end")
    assert net.applied_commands(lead) == net.applied_commands(rest[1])
    assert len(rejects) <= 10, len(rejects)


def test_message_counts_for_election_and_idle_heartbeats():
    """An election costs at most 30 messages; an idle second (10 ticks) at most 60."""
    net = SimNetwork("abc", seed=11)
    before = net.sent
    net.elect()
    assert net.sent - before <= 30
    run(net, 2)
    before = net.sent
    run(net, 10)
    assert net.sent - before <= 60


@pytest.mark.parametrize("who", ["one", "majority", "all", "leader"])
def test_persistence_across_crashes(who):
    """Crash and restart of one node, of a majority, of all, of a (partitioned) leader:
    nothing committed is lost."""
    net = SimNetwork("abcde", seed=12)
    lead = net.elect()
    for k in range(5):
        one(net, b"p%d" % k)
    victims = {"one": [next(i for i in "abcde" if i != lead)],
               "majority": [i for i in "abcde" if i != lead][:3],
               "all": list("abcde"), "leader": [lead]}[who]
    if who == "leader":
        net.isolate(lead)
        net.propose(lead, b"unacked")
    for v in victims:
        net.nodes[v].crash(torn=True)
    run(net, 2)
    net.heal()
    for v in victims:
        net.nodes[v].start()
    one(net, b"after")
    for i in "abcde":
        cmds = net.applied_commands(i)
        assert cmds[:5] == [b"p%d" % k for k in range(5)] and cmds[-1] == b"after"


@pytest.mark.parametrize("unreliable", [False, True])
def test_figure_8(unreliable):
    """Figure 8: rounds of random leader crashes (and, unreliable, lost, duplicated and
    reordered messages): no committed entry is ever lost or changed."""
    rng = random.Random(13)
    net = SimNetwork("abcde", seed=13)
    if unreliable:
        net.drop_rate, net.dup_rate = 0.1, 0.05
    net.elect()
    rounds = 300 if unreliable else 1000
    up = set("abcde")
    for k in range(rounds):
        lead = net.leader()
        if lead is not None:
            net.propose(lead, b"f%d" % k)
        for _ in range(rng.randrange(1, 4)):
            if unreliable:
                for _ in range(rng.randrange(len(net.inflight) + 1)):
                    net.deliver_random()
            else:
                net.stabilize()
            net.tick()
        if lead is not None and rng.random() < 0.5:
            net.nodes[lead].crash(torn=rng.random() < 0.5)
            up.discard(lead)
        if len(up) < 3:
            v = rng.choice(sorted(set("abcde") - up))
            net.nodes[v].start()
            up.add(v)
    net.drop_rate = net.dup_rate = 0.0
    for v in set("abcde") - up:
        net.nodes[v].start()
    one(net, b"final", ticks=200)
    ref = net.applied_commands("a")
    assert all(net.applied_commands(i) == ref for i in "abcde")
    for _, index, data in net.acked:
        assert data in ref


def test_unreliable_agreement():
    """Five nodes on a lossy network: 50 rounds of 4 concurrent commands all commit."""
    net = SimNetwork("abcde", seed=14)
    net.drop_rate = 0.1
    net.elect()
    for r in range(50):
        lead = net.leader()
        for c in range(4):
            if lead is not None:
                net.propose(lead, b"u%d-%d" % (r, c))
        net.tick()
        for _ in range(len(net.inflight)):
            net.deliver_random()
    net.drop_rate = 0.0
    one(net, b"done", ticks=200)
    ref = net.applied_commands(net.leader())
    acked = [d for _, _, d in net.acked]
    assert all(d in ref for d in acked) and len(acked) > 100


def test_churn():
    """Three clients, twenty rounds of random disconnects, restarts and crashes: every
    acknowledged command is in every log."""
    rng = random.Random(15)
    net = SimNetwork("abcde", seed=15)
    net.elect()
    k = 0
    for _ in range(20):
        for _ in range(10):
            for _client in range(3):
                lead = net.leader()
                if lead is not None:
                    k += 1
                    net.propose(lead, b"ch%d" % k)
            net.tick()
            for _ in range(len(net.inflight)):
                net.deliver_random()
        v = rng.choice("abcde")
        action = rng.random()
        if action < 0.3:
            net.isolate(v)
        elif action < 0.6:
            net.nodes[v].crash(torn=True)
        else:
            net.heal()
        for n in net.nodes.values():
            if not n.up and rng.random() < 0.5:
                n.start()
    net.heal()
    for n in net.nodes.values():
        if not n.up:
            n.start()
    one(net, b"churned", ticks=200)
    for i in "abcde":
        cmds = set(net.applied_commands(i))
        assert all(d in cmds for _, _, d in net.acked)


@pytest.mark.parametrize("crash", [False, True])
def test_snapshot_install_after_disconnect(crash):
    """Thirty rounds of eleven commands with the log compacted every ten: a disconnected (or
    crashed) follower catches up by InstallSnapshot, and logs stay bounded."""
    net = SimNetwork("abc", seed=16)
    lead = net.elect()
    lagger = next(i for i in "abc" if i != lead)
    snapshots_sent = []
    orig = net.post
    net.post = lambda m: (snapshots_sent.append(m) if m.type is MT.SNAPSHOT else None, orig(m))
    for r in range(30):
        if r % 10 == 2:
            if crash:
                net.nodes[lagger].crash()
            else:
                net.isolate(lagger)
        if r % 10 == 7:
            net.heal()
            if not net.nodes[lagger].up:
                net.nodes[lagger].start()
        lead = net.leader()
        for c in range(11):
            net.propose(lead, b"s%d-%d" % (r, c))
        run(net, 2)
        for i in "abc":
            if net.nodes[i].up:
                net.compact(i)
                assert net.nodes[i].raw.last_index - net.nodes[i].raw.first_index < 40
    net.heal()
    if not net.nodes[lagger].up:
        net.nodes[lagger].start()
    one(net, b"end")
    assert snapshots_sent
    assert net.applied_commands(lagger) == net.applied_commands(net.leader())
