"""The hook for outgoing replication: something outside the kernel (a secretary) delivers the
leader's appends to some followers and feeds their replies back, and the kernel never knows."""

from __future__ import annotations

from bwcore.kernel import Message, MessageType as MT
from bwcore.sim.network import SimNetwork

REPLICATION = (MT.APPEND, MT.SNAPSHOT, MT.HEARTBEAT)
REPLIES = (MT.APPEND_RESP, MT.HEARTBEAT_RESP)


class Relay:
    """A stand-in secretary: holds appends for its followers, delivers them in one batch,
    collects the replies and hands them to the leader in one batch."""

    def __init__(self, followers: set[str]) -> None:
        self.followers = followers
        self.alive = True
        self.outbox: list[Message] = []
        self.replies: list[Message] = []
        self.relayed = 0

    def route(self, m: Message) -> bool:
        if not self.alive:
            return False  # taken back: the leader reaches them directly
        if m.type in REPLICATION and m.to in self.followers:
            self.outbox.append(m)
            return True
        if m.type in REPLIES and m.frm in self.followers:
            self.replies.append(m)
            return True
        return False

    def flush(self, net: SimNetwork) -> None:
        out, self.outbox = self.outbox, []
        for m in out:  # followers see the leader's own message: term, id, entries unchanged
            self.relayed += 1
            net.deliver(m)
        replies, self.replies = self.replies, []
        for m in replies:
            net.deliver(m)


def settle(net, relay, ticks):
    for _ in range(ticks):
        net.tick()
        for _ in range(5):
            net.stabilize()
            relay.flush(net)


def test_relay_carries_replication_and_leader_takes_back_on_failure():
    relay = Relay(set())
    net = SimNetwork("abcde", seed=1, router=relay.route)
    lead = net.elect()
    term = net.nodes[lead].raw.term
    relay.followers = {n for n in "abcde" if n != lead} - {sorted(set("abcde") - {lead})[0]}
    for k in range(20):
        net.propose(lead, b"r%d" % k)
    settle(net, relay, 3)
    assert relay.relayed > 0
    for n in "abcde":
        assert net.applied_commands(n) == [b"r%d" % k for k in range(20)]
    # The relay dies with messages in its hands; the leader takes its followers back.
    for k in range(20, 25):
        net.propose(lead, b"r%d" % k)
    relay.alive = False
    relay.outbox.clear()
    relay.replies.clear()
    settle(net, relay, 5)
    assert net.leader() == lead and net.nodes[lead].raw.term == term  # no election
    for n in "abcde":
        assert net.applied_commands(n)[-1] == b"r24"
