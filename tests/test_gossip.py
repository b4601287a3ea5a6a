"""SWIM gossip membership: behaviour on a fake clock and an in-memory datagram network.

Every scenario is seeded and deterministic. The network below delivers datagrams after a small
random latency and can lose them, partition members into groups, or isolate one member; it also
checks on every datagram that no member ever sends one above its size limit.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter
from typing import Callable

import msgpack
import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.trial import unittest as trial

from bwcore.gossip import GossipConfig, GossipService, Member, MemberState, SwimMember
from bwcore.gossip_codec import (
    Ack, Alive, Datagram, Dead, Left, Nack, Ping, PingReq, PushPull, Suspect, WireCodec,
    encode_message, encode_update,
)

Address = tuple[str, int]
ALIVE, SUSPECT, DEAD, LEFT = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD,
                              MemberState.LEFT)
SECRET = b"correct horse battery staple"


def advance(clock: task.Clock, seconds: float) -> None:
    """Advance the clock by ``seconds``, running every timer at its own time (a timer set
    while another runs fires later in the same call if it falls within the span)."""
    end = clock.seconds() + seconds
    while (calls := clock.getDelayedCalls()) and calls[0].getTime() <= end:
        clock.advance(max(0.0, calls[0].getTime() - clock.seconds()) + 1e-9)
    clock.advance(max(0.0, end - clock.seconds()))


def addr_of(i: int) -> Address:
    return (f"10.0.{i // 250}.{i % 250 + 1}", 7946)


def make_member(i: int, incarnation: int = 0) -> Member:
    host, port = addr_of(i)
    return Member(id=f"m{i}", role=("voter", "secretary", "observer")[i % 3],
                  datacenter=f"dc{i % 2}", raft_addr=f"{host}:7000", api_addr=f"{host}:8000",
                  gossip_addr=f"{host}:{port}", incarnation=incarnation)


class SimNetwork:
    """Datagrams between members, delivered on the fake clock, with fault controls."""

    def __init__(self, clock: task.Clock, rng: random.Random, max_datagram: int) -> None:
        self.clock = clock
        self.rng = rng
        self.max_datagram = max_datagram
        self.nodes: dict[Address, Callable[[bytes, Address], None]] = {}
        self.loss = 0.0
        self.groups: dict[Address, int] = {}
        self.isolated: set[Address] = set()
        self.sent_by: Counter[Address] = Counter()
        self.log: list[tuple[float, Address, Address, bytes]] = []

    def sender(self, src: Address) -> Callable[[Address, bytes], None]:
        return lambda dst, data: self.send(src, dst, data)

    def send(self, src: Address, dst: Address, data: bytes) -> None:
        assert len(data) <= self.max_datagram, f"{src} sent {len(data)} bytes"
        self.sent_by[src] += 1
        self.log.append((self.clock.seconds(), src, dst, data))
        if self.blocked(src, dst) or self.rng.random() < self.loss:
            return
        self.clock.callLater(self.rng.uniform(0.0005, 0.005), self.deliver, src, dst, data)

    def deliver(self, src: Address, dst: Address, data: bytes) -> None:
        receiver = self.nodes.get(dst)
        if receiver is not None and not self.blocked(src, dst):
            receiver(data, src)

    def blocked(self, src: Address, dst: Address) -> bool:
        if src in self.isolated or dst in self.isolated:
            return True
        return self.groups.get(src, 0) != self.groups.get(dst, 0)


class Cluster:
    """Members on one SimNetwork, with the events each of them reported."""

    def __init__(self, seed: int = 1, config: GossipConfig | None = None,
                 secret: bytes | None = None) -> None:
        self.config = config or GossipConfig()
        self.secret = secret
        self.clock = task.Clock()
        self.rng = random.Random(seed)
        self.net = SimNetwork(self.clock, random.Random(seed + 1), self.config.max_datagram)
        self.members: dict[str, SwimMember] = {}
        self.events: list[tuple[str, str, str, int]] = []  # observer, event, member, incarnation

    def add(self, i: int, seeds: tuple[int, ...] = (0,), incarnation: int = 0,
            start: bool = True, **kwargs: object) -> SwimMember:
        local = make_member(i, incarnation)
        kwargs.setdefault("secret", self.secret)
        member = SwimMember(local, self.net.sender(addr_of(i)), self.clock,
                            random.Random(self.rng.getrandbits(64)), self.config,
                            seeds=[f"{h}:{p}" for h, p in map(addr_of, seeds)], **kwargs)
        member.add_listener(lambda event, m, me=local.id:
                            self.events.append((me, event, m.id, m.incarnation)))
        self.members[local.id] = member
        self.net.nodes[addr_of(i)] = member.datagram_received
        if start:
            member.start()
        return member

    def grow(self, size: int) -> None:
        for i in range(size):
            self.add(i)

    def crash(self, name: str) -> None:
        member = self.members.pop(name)
        del self.net.nodes[parse_index_addr(name)]
        member.stop()

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            advance(self.clock, min(step, end - self.clock.seconds()))

    def run_until(self, condition: Callable[[], bool], timeout: float,
                  step: float = 0.05) -> float:
        """Advance the clock until ``condition()``; return the simulated seconds it took."""
        start = self.clock.seconds()
        while not condition():
            assert self.clock.seconds() - start < timeout, f"not within {timeout} s"
            advance(self.clock, step)
        return self.clock.seconds() - start

    def state(self, observer: str, name: str) -> MemberState | None:
        member = self.members[observer].member(name)
        return None if member is None else member.state

    def all_see(self, name: str, *states: MemberState,
                observers: list[str] | None = None) -> bool:
        names = observers if observers is not None else [n for n in self.members if n != name]
        return all(self.state(o, name) in states for o in names)

    def converged(self) -> bool:
        names = set(self.members)
        return all({m.id for m in member.members() if m.state is ALIVE} == names
                   for member in self.members.values())

    def errors(self) -> int:
        return sum(m.stats.dropped["error"] for m in self.members.values())


def parse_index_addr(name: str) -> Address:
    return addr_of(int(name[1:]))


def converged_cluster(size: int, seed: int = 1, **kwargs: object) -> Cluster:
    cluster = Cluster(seed, **kwargs)
    cluster.grow(size)
    cluster.run_until(cluster.converged, timeout=30)
    return cluster


class ScriptedPeers:
    """A single member under test, surrounded by fake peers that ack every ping to them."""

    def __init__(self, peers: int, config: GossipConfig | None = None,
                 registry: CollectorRegistry | None = None, ack: bool = True) -> None:
        self.config = config or GossipConfig()
        self.clock = task.Clock()
        self.codec = WireCodec(None, self.config.max_datagram)
        self.sent: list[tuple[float, Address, Datagram]] = []
        self.ack = ack
        self.member = SwimMember(make_member(0), self.send, self.clock, random.Random(7),
                                 self.config, registry=registry)
        self.member.start()
        self.peers = [make_member(i) for i in range(1, peers + 1)]
        self.introduce(self.peers)

    def send(self, dst: Address, data: bytes) -> None:
        assert len(data) <= self.config.max_datagram
        datagram = self.codec.open(data)
        self.sent.append((self.clock.seconds(), dst, datagram))
        if self.ack and isinstance(datagram.message, Ping):
            reply = self.codec.seal(encode_message(Ack(datagram.message.seq,
                                                       datagram.message.target)))
            self.clock.callLater(0.001, self.member.datagram_received, reply, dst)

    def deliver(self, src: int, message: object, *updates: object) -> None:
        body = encode_message(message) + b"".join(encode_update(u) for u in updates)
        self.member.datagram_received(self.codec.seal(body), addr_of(src))

    def introduce(self, members: list[Member]) -> None:
        """Tell the member about ``members`` as push-pull state, a few per datagram."""
        for start in range(0, len(members), 10):
            batch = [Alive(m) for m in members[start:start + 10]]
            self.deliver(1, PushPull("m1", False), *batch)


# --- membership and failure detection --------------------------------------------------------

def test_members_converge_from_one_seed() -> None:
    """Twelve members that know only the first one's address all end with the same full view."""
    cluster = Cluster(seed=3)
    cluster.grow(12)
    took = cluster.run_until(cluster.converged, timeout=30)
    assert took < 10
    assert all(member.joined for member in cluster.members.values())
    joined = Counter(observer for observer, event, _, _ in cluster.events if event == "joined")
    assert joined == {name: 11 for name in cluster.members}
    view = cluster.members["m5"].members()
    assert [m.id for m in view] == sorted(f"m{i}" for i in range(12))
    assert view[0].to_dict()["state"] == "alive" and view[0].to_dict()["datacenter"] == "dc0"
    assert cluster.errors() == 0


def test_crashed_member_is_declared_dead_by_all_within_a_bound() -> None:
    """A crashed member goes suspect, then dead, in every other view; nobody else is accused."""
    cluster = converged_cluster(10, seed=5)
    cluster.events.clear()
    cluster.crash("m3")
    took = cluster.run_until(lambda: cluster.all_see("m3", DEAD), timeout=20)
    # Detection within a few periods, then the suspicion timeout: at most 6 * 4 * log10(10)
    # * 0.2 s = 5 s without confirmations, plus dissemination.
    assert took < 8
    dead = [(o, m) for o, event, m, _ in cluster.events if event == "dead"]
    assert sorted(dead) == sorted((name, "m3") for name in cluster.members)
    assert {m for _, event, m, _ in cluster.events if event == "suspect"} <= {"m3"}
    assert cluster.errors() == 0


def test_no_live_member_is_declared_dead_under_ten_percent_loss() -> None:
    """With 10% of datagrams lost for ten simulated minutes, suspicions happen and are all
    refuted: no live member is ever declared dead."""
    cluster = converged_cluster(10, seed=11)
    cluster.net.loss = 0.10
    cluster.events.clear()
    cluster.run(600, step=0.1)
    kinds = Counter(event for _, event, _, _ in cluster.events)
    assert kinds["dead"] == 0 and kinds["left"] == 0
    assert kinds["suspect"] > 0, "the loss should have caused some suspicion"
    assert kinds["alive"] > 0
    cluster.net.loss = 0.0
    cluster.run_until(cluster.converged, timeout=10)


def test_isolated_member_refutes_and_comes_back_alive() -> None:
    """A member whose datagrams are all dropped for a while is declared dead; once they flow
    again it learns of its state, refutes with a higher incarnation and is alive everywhere."""
    cluster = converged_cluster(10, seed=13)
    paused = cluster.members["m4"]
    before = paused.local.incarnation
    cluster.net.isolated.add(addr_of(4))
    cluster.run_until(lambda: cluster.all_see("m4", DEAD), timeout=20)
    assert paused.health_score > 0, "failed probes without nacks lower local health"
    cluster.net.isolated.clear()
    took = cluster.run_until(cluster.converged, timeout=90)
    after = paused.local.incarnation
    assert after > before
    assert all(m.member("m4").incarnation == after for m in cluster.members.values())
    assert any(e[1:3] == ("joined", "m4") for e in cluster.events)
    print(f"isolated member back alive everywhere after {took:.1f} s")
    assert cluster.errors() == 0


def test_member_refutes_suspicion_before_it_becomes_death() -> None:
    """A member isolated for less than the suspicion timeout is suspected, refutes, and is
    never declared dead."""
    cluster = converged_cluster(10, seed=17)
    cluster.events.clear()
    cluster.net.isolated.add(addr_of(6))
    cluster.run_until(lambda: any(e[1:3] == ("suspect", "m6") for e in cluster.events),
                      timeout=10)
    cluster.net.isolated.clear()
    cluster.run_until(cluster.converged, timeout=10)
    assert not [e for e in cluster.events if e[1] == "dead"]
    assert cluster.members["m6"].local.incarnation > 0


def test_graceful_leave_is_seen_as_left_not_dead() -> None:
    """leave() spreads 'left' to every member, fires its Deferred, and then sends nothing."""
    cluster = converged_cluster(10, seed=19)
    cluster.events.clear()
    leaving = cluster.members["m7"]
    done = leaving.leave()
    cluster.run_until(lambda: done.called, timeout=cluster.config.leave_timeout + 1)
    assert not leaving.running
    sent = cluster.net.sent_by[addr_of(7)]
    cluster.members.pop("m7")
    cluster.run_until(lambda: cluster.all_see("m7", LEFT), timeout=5)
    cluster.run(10)
    assert cluster.net.sent_by[addr_of(7)] == sent
    about = [(o, e) for o, e, m, _ in cluster.events if m == "m7"]
    assert sorted(about) == sorted((name, "left") for name in cluster.members)
    assert cluster.all_see("m7", LEFT)


def test_stop_during_leave_fires_the_leave_deferred_and_silences_the_member() -> None:
    """stop() while leaving ends the leave at once; a stopped member sends nothing."""
    cluster = converged_cluster(4, seed=20)
    member = cluster.members["m1"]
    done = member.leave()
    member.stop()
    assert done.called
    sent = cluster.net.sent_by[addr_of(1)]
    member.datagram_received(cluster.net.log[-1][3], addr_of(2))
    cluster.run(5)
    assert cluster.net.sent_by[addr_of(1)] == sent


def test_partition_heals_and_views_converge() -> None:
    """Split in two halves, each side declares the other dead; after the network heals, the
    reconnect exchanges bring every member back alive in every view."""
    cluster = converged_cluster(10, seed=23)
    left_side = [f"m{i}" for i in range(5)]
    right_side = [f"m{i}" for i in range(5, 10)]
    for i in range(5, 10):
        cluster.net.groups[addr_of(i)] = 1
    cluster.run_until(lambda: all(cluster.all_see(n, DEAD, observers=left_side)
                                  for n in right_side)
                      and all(cluster.all_see(n, DEAD, observers=right_side)
                              for n in left_side), timeout=30)
    cluster.run(20)
    cluster.net.groups.clear()
    took = cluster.run_until(cluster.converged, timeout=3 * cluster.config.reconnect_interval)
    print(f"partition healed in {took:.1f} s")
    assert cluster.errors() == 0


def test_restarted_member_rejoins_with_a_higher_incarnation() -> None:
    """A member that crashed and restarts with incarnation 0 outbids its old record and is
    alive again everywhere."""
    cluster = converged_cluster(8, seed=29)
    cluster.members["m2"].update_local(tags={"v": "1"})  # raise its incarnation to 1
    cluster.run_until(lambda: all(m.member("m2").incarnation == 1
                                  for m in cluster.members.values()), timeout=10)
    cluster.crash("m2")
    cluster.run_until(lambda: cluster.all_see("m2", DEAD), timeout=20)
    restarted = cluster.add(2, seeds=(0,), incarnation=0)
    cluster.run_until(cluster.converged, timeout=20)
    assert restarted.local.incarnation > 1
    assert {e[0] for e in cluster.events if e[1:3] == ("joined", "m2")} >= \
        set(cluster.members) - {"m2"}
    assert restarted.local.tags == {}


def test_dead_members_are_reaped_after_the_tombstone_timeout() -> None:
    """A dead member stays in the view as a tombstone, then disappears after reap_timeout."""
    cluster = converged_cluster(6, seed=31, config=GossipConfig(reap_timeout=30.0))
    cluster.crash("m1")
    cluster.run_until(lambda: cluster.all_see("m1", DEAD), timeout=20)
    cluster.run(10)
    assert cluster.all_see("m1", DEAD)
    cluster.run_until(lambda: all(m.member("m1") is None for m in cluster.members.values()),
                      timeout=30)


def test_metadata_update_reaches_everyone() -> None:
    """update_local() raises the incarnation and every other member reports 'updated'."""
    cluster = converged_cluster(6, seed=37)
    cluster.events.clear()
    cluster.members["m3"].update_local(role="observer", tags={"zone": "b"})
    cluster.run_until(lambda: all(m.member("m3").tags == {"zone": "b"}
                                  for m in cluster.members.values()), timeout=10)
    updated = {o for o, e, m, _ in cluster.events if e == "updated" and m == "m3"}
    assert updated == set(cluster.members) - {"m3"}
    assert cluster.members["m0"].member("m3").role == "observer"


# --- join -------------------------------------------------------------------------------------

def test_join_retries_with_backoff_until_a_seed_answers() -> None:
    """A member whose seed is down retries at growing intervals, and joins once it is up."""
    cluster = Cluster(seed=41, config=GossipConfig(join_retry_initial=1.0, join_retry_max=8.0))
    joiner = cluster.add(1, seeds=(0,))
    joined = joiner.when_joined()
    cluster.run(40, step=0.1)
    attempts = sorted({round(t, 1) for t, src, dst, _ in cluster.net.log
                       if src == addr_of(1) and dst == addr_of(0)})
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) >= 5
    assert gaps[0] < 1.05 and gaps[1] > 1.5 and max(gaps) <= 8.05
    assert not joined.called
    cluster.add(0, seeds=())
    cluster.run_until(cluster.converged, timeout=15)
    assert joined.called and joiner.joined


# --- Lifeguard suspicion and dissemination -------------------------------------------------

def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    """Alone, a suspicion lasts the maximum timeout; each independent suspicion shortens it, and
    with k = suspicion_mult - 2 of them it lasts the minimum (Lifeguard §IV-B)."""
    # n = 6 members: min = 4 * max(1, log10(7)) * 0.2 = 0.8 s; max = 6 * min = 4.8 s.
    for confirmations, expected in ((0, 4.8), (1, 4.8 - 4.0 * 0.6309297535714574), (2, 0.8)):
        peers = ScriptedPeers(5)
        start = peers.clock.seconds()
        peers.deliver(2, Ack(1, "m2"), Suspect("m5", 0, "m2"))
        for source in range(3, 3 + confirmations):
            peers.deliver(source, Ack(1, f"m{source}"), Suspect("m5", 0, f"m{source}"))
        assert peers.member.member("m5").state is SUSPECT
        took = 0.0
        while peers.member.member("m5").state is SUSPECT:
            advance(peers.clock, 0.01)
            took = peers.clock.seconds() - start
        assert peers.member.member("m5").state is DEAD
        assert took == pytest.approx(expected, abs=0.011)


def test_a_repeated_suspicion_from_the_same_source_does_not_confirm() -> None:
    """Only distinct members count as confirmations."""
    peers = ScriptedPeers(5)
    for _ in range(3):
        peers.deliver(2, Ack(1, "m2"), Suspect("m5", 0, "m2"))
    advance(peers.clock, 4.7)
    assert peers.member.member("m5").state is SUSPECT


def test_updates_piggyback_within_the_datagram_limit_and_retransmit_limit() -> None:
    """Updates about 60 new members leave on the member's pings, least-sent first,
    each exactly retransmit_mult * ceil(log10(n + 1)) times, never above max_datagram."""
    peers = ScriptedPeers(3)
    advance(peers.clock, 30)  # let the first three introductions finish spreading
    newcomers = [make_member(i) for i in range(100, 160)]
    peers.sent.clear()
    peers.introduce(newcomers)
    advance(peers.clock, 60)
    sends: Counter[str] = Counter()
    for _, _, datagram in peers.sent:
        if isinstance(datagram.message, Ping | Ack):
            for update in datagram.updates:
                if isinstance(update, Alive):
                    sends[update.member.id] += 1
    limit = 4 * 2  # retransmit_mult * ceil(log10(64 + 1))
    assert sends == {m.id: limit for m in newcomers}
    first = next(d for _, _, d in peers.sent if isinstance(d.message, Ping) and d.updates)
    assert len(first.updates) > 10, "one datagram carries many updates"


def test_push_pull_state_is_bounded_in_datagrams() -> None:
    """A state exchange uses at most push_pull_max_datagrams datagrams, each within the
    size limit, and always includes the sender's own record."""
    config = GossipConfig(push_pull_max_datagrams=3)
    peers = ScriptedPeers(150, config=config)
    peers.sent.clear()
    peers.deliver(9, PushPull("m9", True), Alive(make_member(9)))
    replies = [d for _, dst, d in peers.sent if isinstance(d.message, PushPull)]
    assert len(replies) == 3
    assert all(d.updates[0] == Alive(peers.member.local) for d in replies)
    assert all(not d.message.want_reply for d in replies)
    records = {u.member.id for d in replies for u in d.updates}
    assert 30 < len(records) < 151


def test_ping_for_a_suspect_carries_its_suspicion() -> None:
    """A probe of a suspect tells it of the suspicion, so that it can refute at once."""
    peers = ScriptedPeers(2)
    peers.deliver(1, Ack(1, "m1"), Suspect("m2", 0, "m1"))
    peers.sent.clear()
    advance(peers.clock, 1.0)
    pings = [d for _, dst, d in peers.sent if isinstance(d.message, Ping)
             and d.message.target == "m2"]
    assert pings and pings[0].updates[0] == Suspect("m2", 0, "m0")


def test_indirect_probe_through_relays_and_relay_behaviour() -> None:
    """A silent target is pinged through indirect_checks relays; a relay forwards the
    target's ack to the requester, or sends a nack when the target stays silent."""
    peers = ScriptedPeers(5, ack=False)
    advance(peers.clock, 0.5)
    first_ping = next(d.message for _, _, d in peers.sent if isinstance(d.message, Ping))
    reqs = [(dst, d.message) for _, dst, d in peers.sent
            if isinstance(d.message, PingReq) and d.message.seq == first_ping.seq]
    assert len({dst for dst, _ in reqs}) == 3
    assert all(req.target == first_ping.target and req.nack for _, req in reqs)
    assert addr_of(int(first_ping.target[1:])) not in {dst for dst, _ in reqs}
    # Now the member under test is the relay.
    peers.sent.clear()
    peers.deliver(1, PingReq(77, "m2", "10.0.0.3:7946", "m1", True))
    relay_ping = next(d.message for _, dst, d in peers.sent
                      if dst == addr_of(2) and isinstance(d.message, Ping))
    peers.deliver(2, Ack(relay_ping.seq, "m2"))
    assert [d.message for _, dst, d in peers.sent
            if dst == addr_of(1) and isinstance(d.message, Ack)] == [Ack(77, "m2")]
    peers.sent.clear()
    peers.deliver(1, PingReq(78, "m3", "10.0.0.4:7946", "m1", True))
    advance(peers.clock, 0.09)
    nacks = [d.message for _, dst, d in peers.sent
             if dst == addr_of(1) and isinstance(d.message, Nack)]
    assert nacks == [Nack(78, "m0")]


# --- never accepting one's own death ---------------------------------------------------------

@pytest.mark.parametrize("accusation", [
    Suspect("m0", 0, "m1"), Dead("m0", 0, "m1"), Left("m0", 0), Dead("m0", 5, "m1"),
])
def test_member_refutes_any_accusation_about_itself(accusation: object) -> None:
    """Told that it is suspect, dead or left, a member stays alive and gossips a higher
    incarnation instead (SWIM §4.2)."""
    peers = ScriptedPeers(3)
    accused = accusation.incarnation
    peers.deliver(1, Ack(1, "m1"), accusation)
    local = peers.member.local
    assert local.state is ALIVE and local.incarnation == accused + 1
    peers.sent.clear()
    advance(peers.clock, 0.5)
    carried = [u for _, _, d in peers.sent for u in d.updates if isinstance(u, Alive)]
    assert Alive(local) in carried


def test_member_outbids_a_newer_record_of_itself() -> None:
    """An alive record of this member with a higher incarnation (its previous run) is
    outbid, never adopted."""
    peers = ScriptedPeers(3)
    stale = Member(**{**make_member(0).__dict__, "incarnation": 9, "role": "observer"})
    peers.deliver(1, Ack(1, "m1"), Alive(stale))
    assert peers.member.local.incarnation == 10
    assert peers.member.local.role == make_member(0).role


# --- hostile and broken input ----------------------------------------------------------------

def valid_datagram(codec: WireCodec) -> bytes:
    body = encode_message(Ping(5, "m0", "m1")) + encode_update(Alive(make_member(1)))
    return codec.seal(body)


BAD_DATAGRAMS = [
    (b"", "malformed"),
    (b"\x01", "malformed"),
    (b"\x01\xc1", "malformed"),                                 # reserved msgpack byte
    (b"\x01" + b"\x93\x01\x05", "malformed"),                    # truncated array
    (b"\x01" + encode_message(Ping(5, "m0", "m1"))[:-1], "malformed"),
    (b"\x01\x92\x01\x05", "malformed"),                         # ping with missing fields
    (b"\x01\x94\x01\xa1x\xa2m0\xa2m1", "malformed"),             # seq is a string
    (b"\x01\x94\x01\xff\xa2m0\xa2m1", "malformed"),              # negative seq
    (b"\x01\x93\x02\xc3\xa2m1", "malformed"),                    # seq is a boolean
    (b"\x01\x81\xa1a\x01", "malformed"),                         # a map, not an array
    (b"\x01\x93\x10\x01\x02", "malformed"),                      # an update as the message
    (b"\x01\x92\x63\x01", "unknown"),                            # message type 99
    (b"\x01" + encode_message(Ack(1, "m1")) + b"\x92\x63\x01", "unknown"),
    (b"\x02" + encode_message(Ack(1, "m1")), "version"),
    (b"\x01" + encode_message(Ack(1, "m1")) + b"\x00" * 1500, "oversized"),
    (b"\x81" + b"\x00" * 32 + encode_message(Ack(1, "m1")), "auth"),
    (b"\x01" + encode_message(Ack(1, "")), "malformed"),         # empty id
    (b"\x01" + encode_message(Ack(1, "x" * 200)), "malformed"),  # id too long
    (b"\x01" + encode_message(PingReq(1, "m2", "nowhere", "m1", True)), "malformed"),
    (b"\x01" + encode_message(Ack(1, "m1")) + b"\x99" + b"\x10" * 9, "malformed"),
]


@pytest.mark.parametrize(("data", "reason"), BAD_DATAGRAMS)
def test_bad_datagram_is_dropped_and_counted(data: bytes, reason: str) -> None:
    """Malformed, oversized, unknown, foreign-version and unauthenticated datagrams are
    dropped with a counted reason; nothing raises and the view does not change."""
    registry = CollectorRegistry()
    peers = ScriptedPeers(2, registry=registry)
    view = peers.member.members()
    peers.member.datagram_received(data, addr_of(9))
    assert dict(peers.member.stats.dropped) == {reason: 1}
    assert registry.get_sample_value("bwraft_gossip_dropped_datagrams_total",
                                     {"reason": reason}) == 1.0
    assert peers.member.members() == view


def test_alive_update_with_bad_metadata_is_rejected() -> None:
    """An alive record with a non-string tag or a bad address is malformed, not merged."""
    peers = ScriptedPeers(1)
    bad_tags = msgpack.packb([16, "m9", 0, "voter", "", "", "", "10.0.0.9:1", {"k": 1}])
    bad_addr = msgpack.packb([16, "m9", 0, "voter", "", "", "", "nop", {}])
    for update in (bad_tags, bad_addr):
        peers.member.datagram_received(b"\x01" + encode_message(Ack(1, "m1")) + update,
                                       addr_of(9))
    assert peers.member.stats.dropped == {"malformed": 2}
    assert peers.member.member("m9") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_random_bytes_never_raise(data: bytes) -> None:
    """Any byte string is handled: processed or dropped, never an exception."""
    peers = ScriptedPeers(1)
    peers.member.datagram_received(data, addr_of(9))
    assert peers.member.stats.dropped["error"] == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_corrupted_valid_datagrams_never_raise(position: int, value: int) -> None:
    """A valid datagram with one byte changed is processed or dropped, never raised."""
    peers = ScriptedPeers(1)
    data = bytearray(valid_datagram(peers.codec))
    data[position % len(data)] = value
    peers.member.datagram_received(bytes(data), addr_of(9))
    assert peers.member.stats.dropped["error"] == 0


def test_misdirected_ping_is_not_acked() -> None:
    """A ping meant for another member (an address now used by someone else) is dropped."""
    peers = ScriptedPeers(1)
    peers.sent.clear()
    peers.deliver(1, Ping(3, "m42", "m1"))
    assert peers.member.stats.dropped == {"misdirected": 1}
    assert not [d for _, _, d in peers.sent if isinstance(d.message, Ack)]


def test_hmac_keeps_strangers_out() -> None:
    """With a cluster secret, members join each other, while datagrams without a MAC or
    with a MAC from another key are dropped and cannot inject a member."""
    cluster = Cluster(seed=43, secret=SECRET)
    cluster.grow(4)
    cluster.run_until(cluster.converged, timeout=15)
    intruder = Alive(make_member(66))
    body = encode_message(PushPull("m66", True)) + encode_update(intruder)
    for codec in (WireCodec(None, 1400), WireCodec(b"another secret key", 1400)):
        for name in cluster.members:
            cluster.net.send(addr_of(66), parse_index_addr(name), codec.seal(body))
    cluster.run(5)
    assert all(m.member("m66") is None for m in cluster.members.values())
    assert all(m.stats.dropped["auth"] == 2 for m in cluster.members.values())
    # A member without the secret cannot join either.
    cluster.add(5, seeds=(0,), secret=None)
    cluster.run(5)
    assert cluster.members["m0"].member("m5") is None
    assert not cluster.members["m5"].joined
    assert cluster.members["m0"].stats.dropped["auth"] > 2


# --- configuration ----------------------------------------------------------------------------

def test_config_from_settings_rejects_unknown_and_bad_values() -> None:
    """Settings come from a config table: unknown keys and bad values are named."""
    config = GossipConfig.from_settings({"protocol_period": 1.0, "probe_timeout": 0.5})
    assert config.protocol_period == 1.0
    with pytest.raises(ValueError, match="unknown gossip settings: colour"):
        GossipConfig.from_settings({"colour": "blue"})
    for bad in ({"probe_timeout": 0.15}, {"max_datagram": 100}, {"indirect_checks": 2.5},
                {"protocol_period": -1}, {"retransmit_mult": True}):
        with pytest.raises(ValueError):
            GossipConfig.from_settings(bad)


def test_oversized_metadata_is_refused_at_construction() -> None:
    """Metadata too large to gossip is a ValueError when the member is made, not later."""
    big = Member(**{**make_member(0).__dict__,
                    "tags": {f"k{i}": "v" * 200 for i in range(10)}})
    with pytest.raises(ValueError, match="metadata takes"):
        SwimMember(big, lambda a, d: None, task.Clock(), random.Random(1))


def test_detection_time_median_is_stable_across_seeds() -> None:
    """Across seeds, a crash is detected by all members; the median stays under 6 s."""
    times = []
    for seed in (51, 52, 53):
        cluster = converged_cluster(10, seed=seed)
        cluster.crash(f"m{seed % 10}")
        times.append(cluster.run_until(lambda c=cluster, n=f"m{seed % 10}": c.all_see(n, DEAD),
                                       timeout=20))
    assert statistics.median(times) < 6
    print("detection times", [round(t, 2) for t in times])


# --- over real UDP ----------------------------------------------------------------------------

class RealUdpTests(trial.TestCase):
    """Two members on 127.0.0.1, each on a port the OS chose, run by the real reactor."""

    timeout = 30

    def test_two_members_join_and_leave_over_udp(self) -> defer.Deferred[None]:
        """B joins through A's address, both see each other alive, B leaves and A sees it."""
        return defer.Deferred.fromCoroutine(self._join_and_leave())

    async def _join_and_leave(self) -> None:
        from twisted.internet import reactor

        config = GossipConfig(protocol_period=0.05, probe_timeout=0.025, leave_timeout=2.0)

        def local(name: str) -> Member:
            return Member(id=name, role="voter", datacenter="dc1", raft_addr="127.0.0.1:7000",
                          api_addr="", gossip_addr="127.0.0.1:0")

        registry = CollectorRegistry()
        service_a = GossipService(reactor, local("a"), config=config, secret=SECRET,
                                  rng=random.Random(1), registry=registry)
        events: list[tuple[str, str]] = []
        service_a.add_listener(lambda event, m: events.append((event, m.id)))
        service_a.startService()
        a = service_a.member
        assert a is not None
        self.addCleanup(lambda: service_a.running and service_a.stopService())
        assert a.local.gossip_addr != "127.0.0.1:0"

        service_b = GossipService(reactor, local("b"), config=config, secret=SECRET,
                                  rng=random.Random(2), seeds=[a.local.gossip_addr])
        service_b.startService()
        b = service_b.member
        assert b is not None
        self.addCleanup(lambda: service_b.running and service_b.stopService())
        await b.when_joined()
        await until(reactor, lambda: a.member("b") is not None and b.member("a") is not None
                    and a.member("b").state is ALIVE and b.member("a").state is ALIVE)
        # Some probe round trips, to show the failure detector runs over the socket.
        acks_before = a.stats.received_datagrams
        await until(reactor, lambda: a.stats.received_datagrams > acks_before + 10)
        assert a.member("b").state is ALIVE and events == [("joined", "b")]
        assert registry.get_sample_value("bwraft_gossip_members", {"state": "alive"}) == 2.0

        await service_b.stopService()
        await until(reactor, lambda: a.member("b").state is LEFT)
        assert events == [("joined", "b"), ("left", "b")]
        await service_a.stopService()
        assert not a.running and a.stats.dropped == {}


async def until(reactor: object, condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``condition`` on the reactor's clock every 10 ms until it holds."""
    deadline = reactor.seconds() + limit
    while not condition():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await task.deferLater(reactor, 0.01, lambda: None)
