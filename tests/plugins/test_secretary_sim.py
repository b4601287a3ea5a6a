"""Secretaries on the simulated network (tests/plugins/secretary_sim.py): the relay cores of
the ``secretary`` plugin between real kernels, with the safety checker after every step.

The cluster: voters w1, w2 in datacenter ``west`` (where the leader is made to start), voters
e1, e2, e3 and observer o1 in ``east``, secretaries in ``east``. A majority needs an east
voter, so the east datacenter's replication path decides whether anything commits.
"""

from __future__ import annotations

import pytest

from bwcore.kernel import MessageType as MT
from bwcore.sim.invariants import InvariantViolation
from bwraft_plugins import secretary_wire as wire
from bwraft_plugins.secretary_leader import RelaySettings
from tests.plugins.secretary_sim import TICK_S, RelayScheduleStats, RelaySim, run_relay_schedule

VOTERS = {"w1": "west", "w2": "west", "e1": "east", "e2": "east", "e3": "east"}
EAST = ("e1", "e2", "e3", "o1")
OBSERVERS = {"o1": "east"}


def west_led(secretaries: dict[str, str], seed: int = 1, **kw) -> RelaySim:
    """A cluster whose leader is w1, all settled."""
    sim = RelaySim(VOTERS, secretaries, seed, helpers=OBSERVERS, election_tick=10, **kw)
    sim.net.campaign("w1")
    sim.stabilize()
    assert sim.leader() == "w1"
    sim.tick_all(2)
    sim.stabilize()
    return sim


def write(sim: RelaySim, first: int, count: int, leader: str = "w1") -> list[bytes]:
    out = []
    for k in range(first, first + count):
        assert sim.propose(leader, b"w%d" % k) is not None
        out.append(b"w%d" % k)
    return out


def converged(sim: RelaySim, commands: list[bytes]) -> bool:
    return all(sim.net.applied_commands(n)[-len(commands):] == commands
               for n in [*VOTERS, *OBSERVERS])


def direct_requests(sim: RelaySim, leader: str) -> int:
    return sum(n for (frm, to), n in sim.direct.items() if frm == leader and to in EAST)


def test_a_secretary_carries_the_east_datacenter_and_the_leader_sends_each_entry_once():
    """With a live secretary, the leader's APPENDs and HEARTBEATs to the east followers and
    observer travel in BATCH frames that carry each entry once; everything commits and every
    relayed message is one the leader emitted (invariant 6)."""
    sim = west_led({"s1": "east"})
    before = direct_requests(sim, "w1")
    commands = write(sim, 0, 40)
    sim.stabilize()
    sim.tick_all(3)
    sim.stabilize()
    assert converged(sim, commands)
    stats = sim.leaders["w1"].stats
    assert direct_requests(sim, "w1") == before  # nothing went to the east directly
    assert stats.relayed_entries >= 4 * 40 and stats.reports > 0
    # Four east targets share each entry: the leader sent it to the secretary about once.
    assert 40 <= stats.sent_entries < stats.relayed_entries / 3
    assert sim.secretaries["s1"].stats.relayed_entries == stats.relayed_entries
    assert sim.net.checker.checks > 0 and sim.relayed_to_followers > 0
    assert sim.leaders["w1"].assignment(sim.now) == {"s1": list(EAST)}


def test_a_direct_voter_that_stops_answering_raises_the_settling_hint():
    """One secretary serving the east voters only (the observer is in west): w1 and w2 need
    one east acknowledgement, and the hint says that is all. w2 crashes: once the leader sees
    it behind the commit index, the hint no longer settles anything; once it lacks what was
    committed a reply deadline before, the hint asks for two, and that settles again.
    Everything commits all along."""
    sim = RelaySim(VOTERS, {"s1": "east"}, 1, helpers={"o1": "west"}, election_tick=10)
    sim.net.campaign("w1")
    sim.stabilize()
    assert sim.leader() == "w1"
    live = ["w1", "e1", "e2", "e3", "o1"]
    seen: list[tuple[int, bool]] = []

    def writes(first: int) -> list[bytes]:
        commands = write(sim, first, 3)
        sim.stabilize()
        for _ in range(2):   # the leader looks at its progress; the next batch shows it
            sim.tick_all(1)
            sim.stabilize()
        if not seen or seen[-1] != sim.hints["s1"]:
            seen.append(sim.hints["s1"])
        return commands

    writes(0)
    sim.crash_voter("w2")
    # Eight rounds of two ticks: commits without w2, then a reply deadline (three ticks).
    for first in range(3, 27, 3):
        commands = writes(first)
    assert seen == [(1, True), (1, False), (2, True)]
    assert all(sim.net.applied_commands(n)[-3:] == commands for n in live)
    assert sim.net.nodes["w1"].raw.term == sim.net.nodes["e1"].raw.term


def test_secretary_crash_causes_no_election_and_loses_nothing():
    """SIGKILL of the secretary (gossip has not noticed): the leader takes its followers back
    when the reply deadline passes, well before check-quorum or any follower's election
    timeout; the term never changes and every write commits on every node."""
    sim = west_led({"s1": "east"})
    term = sim.net.nodes["w1"].raw.term
    commands = write(sim, 0, 10)
    sim.stabilize()
    sim.crash_secretary("s1")
    commands += write(sim, 10, 10)
    for _ in range(40):   # four election timeouts, ticking every node
        sim.tick_all()
        sim.stabilize()
    assert sim.leader() == "w1" and sim.net.nodes["w1"].raw.term == term
    assert all(sim.net.nodes[n].raw.term == term for n in VOTERS)
    assert converged(sim, commands)
    # Gossip never said it died: once benched long enough it is tried again, misses again,
    # and is benched for twice as long; none of that disturbs the cluster.
    assert {tb.reason for tb in sim.takebacks} == {"deadline"}
    assert set(sim.takebacks[0].targets) == set(EAST)
    assert direct_requests(sim, "w1") > 0


def test_new_secretary_is_hired_and_used_after_a_crash():
    """After a take-back, a secretary that gossip reports alive (a new one, or the crashed one
    restarted) is hired again and carries the east datacenter."""
    sim = west_led({"s1": "east", "s2": "east"}, settings=RelaySettings(
        reply_deadline=3 * TICK_S, rehire_after=20 * TICK_S, window=64, split="single"))
    [first] = sim.leaders["w1"].assignment(sim.now)
    other = "s2" if first == "s1" else "s1"
    sim.crash_secretary(first)
    sim.gossip(other, "dead")          # the other one is not running yet
    write(sim, 0, 5)
    sim.tick_all(10)
    sim.stabilize()
    sim.gossip(first, "dead")
    relayed = sim.leaders["w1"].stats.relayed_entries
    sim.restart_secretary(other)       # a new secretary joins
    commands = write(sim, 5, 10)
    sim.tick_all(2)
    sim.stabilize()
    assert converged(sim, commands)
    assert sim.leaders["w1"].assignment(sim.now) == {other: list(EAST)}
    assert sim.leaders["w1"].stats.relayed_entries >= relayed + 4 * 10


def test_secretary_cut_off_from_its_followers_is_bypassed():
    """A secretary that still answers the leader but cannot reach the east followers: the
    leader notices the followers' silence and replicates to them directly; no election."""
    sim = west_led({"s1": "east"})
    term = sim.net.nodes["w1"].raw.term
    for f in EAST:
        sim.net.cut.update({("s1", f), (f, "s1")})
    commands = write(sim, 0, 10)
    for _ in range(30):
        sim.tick_all()
        sim.stabilize()
    assert sim.leader() == "w1" and sim.net.nodes["w1"].raw.term == term
    assert converged(sim, commands)
    reasons = {tb.reason for tb in sim.takebacks}
    assert reasons == {"follower_silent"}


def test_lagging_secretary_is_bypassed_and_its_late_relays_are_harmless():
    """A secretary stalls (its frames sit in the network) past the reply deadline: the leader
    replicates directly; when the stale frames finally arrive, the followers step the leader's
    old messages of the same term again (Raft tolerates duplicates) and nothing changes."""
    sim = west_led({"s1": "east"})
    term = sim.net.nodes["w1"].raw.term
    commands = write(sim, 0, 5)
    sim.stabilize()
    commands += write(sim, 5, 5)
    held = [f for f in sim.frames if f.dst == "s1"]
    sim.frames = [f for f in sim.frames if f.dst != "s1"]
    for _ in range(10):
        sim.tick_all()
        held += [f for f in sim.frames if f.dst == "s1"]
        sim.frames = [f for f in sim.frames if f.dst != "s1"]
        sim.stabilize()
    assert [tb.reason for tb in sim.takebacks][:1] == ["deadline"]
    assert converged(sim, commands)
    checks = sim.net.checker.checks
    for frame in held:             # the stall ends
        sim.deliver_frame(frame)
    sim.stabilize()
    sim.tick_all(3)
    sim.stabilize()
    assert sim.net.checker.checks > checks   # the late relays were checked (invariant 6)
    assert sim.leader() == "w1" and sim.net.nodes["w1"].raw.term == term
    assert converged(sim, commands)


def test_gossip_suspicion_takes_followers_back_at_once():
    sim = west_led({"s1": "east"})
    sim.gossip("s1", "suspect")
    assert [tb.reason for tb in sim.takebacks] == ["suspect"]
    assert sim.leaders["w1"].assignment(sim.now) == {}
    commands = write(sim, 0, 5)
    sim.stabilize()
    assert converged(sim, commands)
    sim.gossip("s1", "alive")          # refuted: hired again at once
    relayed = sim.leaders["w1"].stats.relayed_entries
    commands = write(sim, 5, 5)
    sim.stabilize()
    assert converged(sim, commands)
    assert sim.leaders["w1"].stats.relayed_entries > relayed


def test_new_leader_rehires_and_the_secretary_fences_the_old_term():
    """The leader is cut off; a new one is elected, commits its no-op, hires the secretary
    with a higher term. The secretary then ignores the old leader's batches and never
    forwards replies of the old term."""
    sim = west_led({"s1": "east"})
    write(sim, 0, 5)
    sim.stabilize()
    old_term = sim.net.nodes["w1"].raw.term
    sim.net.isolate("w1")
    for _ in range(60):
        sim.tick_all()
        sim.stabilize()
        lead = sim.leader()
        if lead not in (None, "w1") and sim.net.nodes[lead].raw.term > old_term:
            break
    new = sim.leader()
    assert new not in (None, "w1")
    new_term = sim.net.nodes[new].raw.term
    commands = write(sim, 5, 5, leader=new)
    sim.tick_all(2)
    sim.stabilize()
    secretary = sim.secretaries["s1"]
    assert (secretary.leader, secretary.term) == (new, new_term)
    assert sim.leaders[new].stats.relayed_entries > 0
    # A batch of the old term arriving now (it was delayed in the network) is ignored.
    stale = wire.encode_batch(99, old_term, "w1", [], {})
    assert secretary.on_batch("w1", wire.decode_batch(stale), sim.now) == []
    assert secretary.stats.dropped["stale_term"] == 1
    sim.net.heal()
    for _ in range(5):
        sim.tick_all()
        sim.stabilize()
    assert sim.net.nodes["w1"].raw.term == new_term
    assert converged(sim, commands)


@pytest.mark.parametrize("mutation", ["commit", "data", "term"])
def test_the_checker_catches_a_secretary_that_changes_what_it_relays(monkeypatch, mutation):
    """Invariant 6 is checked, not assumed: a secretary that raises the commit index, alters
    an entry or claims another term is caught at the first relayed message."""
    real = wire.relay_item

    def lying(target, entries):
        item = real(target, entries)
        if mutation == "commit":
            item[3] += 1
        elif mutation == "data" and entries:
            item[5] = [[t, d + b"!", k] for t, d, k in entries]
        return item

    def lying_relay(term, leader, items):
        return real_relay(term + (1 if mutation == "term" else 0), leader, items)

    real_relay = wire.encode_relay
    monkeypatch.setattr(wire, "relay_item", lying)
    monkeypatch.setattr(wire, "encode_relay", lying_relay)
    with pytest.raises(InvariantViolation, match="secretary relay"):
        sim = west_led({"s1": "east"})
        write(sim, 0, 5)
        sim.stabilize()


def test_heartbeats_for_read_index_are_relayed():
    """ReadIndex rounds ride on relayed heartbeats; the leader confirms reads with the east
    followers' echoed contexts."""
    sim = west_led({"s1": "east"})
    sim.net.isolate("w2")   # the west follower cannot confirm: an east voter must
    assert sim.net.read("w1", b"read-1")
    sim.pump()
    sim.stabilize()
    assert (b"read-1", sim.net.nodes["w1"].raw.commit_index) in sim.net.nodes["w1"].served_reads
    assert sim.net.sent_by_type[MT.HEARTBEAT_RESP] > 0


SCHEDULE_SEEDS = 300


def test_randomized_relay_schedules(record_property):
    """Many seeded schedules of relayed replication under loss, duplication, reordering,
    partitions, voter and secretary crashes, wrong gossip and compaction: every safety
    invariant (1-7, with 6 checked on every relayed message) holds after every step, and the
    healed cluster always commits and converges.

    Replay one: ``python -m tests.plugins.secretary_sim --seed N -v``.
    """
    totals = RelayScheduleStats(-1)
    for seed in range(SCHEDULE_SEEDS):
        try:
            st = run_relay_schedule(seed)
        except (InvariantViolation, AssertionError) as e:
            raise AssertionError(f"seed {seed} failed: {e}\nreplay: python -m "
                                 f"tests.plugins.secretary_sim --seed {seed} -v") from e
        for f in ("steps", "acked", "relayed", "takebacks", "leaders", "checks", "settling"):
            setattr(totals, f, getattr(totals, f) + getattr(st, f))
    record_property("coverage", str(totals))
    assert totals.relayed > 10 * SCHEDULE_SEEDS and totals.takebacks > SCHEDULE_SEEDS
    assert totals.acked > SCHEDULE_SEEDS and totals.leaders > SCHEDULE_SEEDS
    assert totals.settling > SCHEDULE_SEEDS   # hints that let secretaries hold replies back
