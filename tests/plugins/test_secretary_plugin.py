"""The ``secretary`` plugin's wiring: settings, hooks, timers on the node's reactor, frames,
status and metrics. Nodes are small fakes on one ``task.Clock``; frames go through the real
codec. The relay logic itself is tested in test_secretary_cores.py and test_secretary_sim.py,
and on real processes in tests/integration/test_secretary.py."""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import task

from bwcore import codec
from bwcore.config import config_from_dict
from bwcore.errors import ConfigError
from bwcore.kernel import Entry, Message, MessageType as MT, StateRole
from bwcore.logs import get_logger
from bwcore.plugins import PluginHost
from bwraft_plugins import secretary_wire as wire
from bwraft_plugins.secretary import SecretaryPlugin
from bwraft_plugins.secretary_relay import QUIET_FACTOR

TERM = 3
DEFAULTS = dict(SecretaryPlugin.settings_defaults)


@dataclass
class FakeKernel:
    role: StateRole = StateRole.FOLLOWER
    term: int = TERM
    commit_index: int = 5
    unreachable: list[str] = field(default_factory=list)
    id: str = "L"
    #: follower -> (match, recently active), as the leader's progress says.
    progress: dict[str, tuple[int, bool]] = field(
        default_factory=lambda: {"F1": (5, True), "F2": (5, True)})

    def term_at(self, index: int) -> int:
        return self.term

    def status(self) -> dict[str, Any]:
        return {"commit_index": self.commit_index, "voters": ["F1", "F2", "L"],
                "progress": {p: {"match": m, "active": a}
                             for p, (m, a) in self.progress.items()}}

    def report_unreachable(self, node: str) -> None:
        self.unreachable.append(node)


@dataclass
class FakeMember:
    id: str
    role: str
    datacenter: str
    raft_addr: str = "127.0.0.1:1"
    state: str = "alive"
    tags: dict[str, str] = field(default_factory=dict)


class FakeGossip:
    """The slice of a gossip member the plugin uses: its own tags and the view."""

    def __init__(self, local: FakeMember, view: list[FakeMember]) -> None:
        self.local = local
        self.view = view

    def update_local(self, tags: dict[str, str]) -> FakeMember:
        self.local = replace(self.local, tags=dict(tags))
        return self.local

    def members(self) -> list[FakeMember]:
        return [self.local, *self.view]


@dataclass
class GossipService:
    member: FakeGossip


class Net:
    """Frames between fake nodes, through the codec, delivered when the test says so."""

    def __init__(self) -> None:
        self.clock = task.Clock()
        self.nodes: dict[str, FakeNode] = {}
        self.queue: list[tuple[str, str, bytes]] = []

    def deliver(self) -> int:
        n = 0
        while self.queue:
            src, dst, data = self.queue.pop(0)
            node = self.nodes.get(dst)
            if node is not None:
                handled = node.host.hook.bwraft_plugin_frame(node=node, peer=src,
                                                             frame=codec.decode(data))
                assert handled is True
                n += 1
        return n


class FakeNode:
    """What the plugin touches on a RaftNode, recorded."""

    def __init__(self, net: Net, node_id: str, role: str = "voter", datacenter: str = "east",
                 settings: dict[str, Any] | None = None, gossip_view=()) -> None:
        self.net = net
        self.node_id = node_id
        self.reactor = net.clock
        self.config = config_from_dict({
            "id": node_id, "role": role, "datacenter": datacenter, "tick_ms": 100,
            "addresses": {"raft": "127.0.0.1:0", "api": "127.0.0.1:0"},
            "cluster": {"voters": {v: {"raft": f"127.0.0.1:{7000 + k}"}
                                   for k, v in enumerate(("L", "F1", "F2"))}}})
        self.log = get_logger(node_id=node_id)
        self.kernel = FakeKernel()
        self.stepped: list[Message] = []
        self.peers: dict[str, tuple[str, int]] = {}
        self.sent: list[tuple[str, Any]] = []
        self.gossip = GossipService(FakeGossip(FakeMember(node_id, role, datacenter),
                                               list(gossip_view)))
        self.plugin = SecretaryPlugin({**DEFAULTS, **(settings or {})})
        self.registry = CollectorRegistry()
        self.host = PluginHost(self.config)
        self.host.register(self.plugin, "secretary")
        self.host.check_pending()
        self.host.hook.bwraft_metrics(registry=self.registry)
        self.service = self.host.hook.bwraft_role_service(node=self)
        if self.service is not None:
            self.service.startService()
        self.host.hook.bwraft_node_started(node=self)
        net.nodes[node_id] = self

    def send_plugin_frame(self, peer: str, plugin: str, payload: Any) -> bool:
        self.sent.append((peer, payload))
        self.net.queue.append((self.node_id, peer,
                               codec.encode(codec.PluginFrame(plugin, payload))))
        return True

    def step(self, m: Message) -> None:
        self.stepped.append(m)

    def set_peer_address(self, node_id: str, host: str, port: int, *, api=None) -> None:
        self.peers[node_id] = (host, port)

    def report_unreachable(self, node_id: str) -> None:
        self.kernel.report_unreachable(node_id)

    def route(self, messages: list[Message]) -> list[Message]:
        batch = list(messages)
        self.host.hook.bwraft_route_messages(node=self, messages=batch)
        return batch

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for extra in self.host.hook.bwraft_status(node=self):
            out.update(extra or {})
        return out


def cluster(settings: dict[str, Any] | None = None) -> tuple[Net, FakeNode, FakeNode, FakeNode]:
    """Leader L (west), follower F1 (east), secretary S (east), all plugins started."""
    net = Net()
    view = [FakeMember("F1", "voter", "east", tags={"relay": "secretary/1"}),
            FakeMember("S", "secretary", "east")]
    leader = FakeNode(net, "L", datacenter="west", settings=settings, gossip_view=view)
    follower = FakeNode(net, "F1", settings=settings)
    secretary = FakeNode(net, "S", role="secretary", settings=settings)
    leader.kernel.role = StateRole.LEADER
    leader.host.hook.bwraft_role_changed(node=leader, role=StateRole.LEADER, term=TERM,
                                         leader="L")
    return net, leader, follower, secretary


def test_plugin_loads_through_its_entry_point():
    [ep] = [ep for ep in importlib.metadata.entry_points(group="bwraft") if ep.name == "secretary"]
    assert ep.load() is SecretaryPlugin


@pytest.mark.parametrize("settings, message", [
    ({"split": "random"}, "split must be one of"),
    ({"window": 0}, "window must be at least 1"),
    ({"reply_deadline_ms": -1}, "reply_deadline_ms must be 0"),
    ({"datacenters": [1]}, "datacenters must be a list"),
])
def test_bad_settings_stop_the_node_with_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):
        SecretaryPlugin({**DEFAULTS, **settings})


def test_reply_deadline_must_be_well_under_the_election_timeout():
    """With the default 1 s election timeout, a 600 ms deadline is refused at start-up (the
    node calls bwraft_role_service directly, so this stops it)."""
    with pytest.raises(ConfigError, match="reply_deadline_ms: 600 ms is not well under"):
        FakeNode(Net(), "L", settings={"reply_deadline_ms": 600})


def test_followers_advertise_the_relay_and_the_leader_learns_the_view():
    net, leader, follower, secretary = cluster()
    assert follower.gossip.member.local.tags == {"relay": "secretary/1"}
    assert secretary.gossip.member.local.tags == {}   # a secretary is no relay target
    assert leader.plugin.leader.directory["S"].role == "secretary"


def test_one_round_trip_through_the_secretary():
    """The leader's append leaves as a BATCH, the follower steps the leader's own message,
    its reply returns through the secretary, and the leader steps it."""
    net, leader, follower, secretary = cluster()
    append = Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=5, commit=5,
                     entries=(Entry(TERM, 6, b"x"),))
    direct = Message(MT.APPEND, "F2", "L", TERM, index=5)   # F2 has no relay tag
    assert leader.route([append, direct]) == [direct]
    net.deliver()                              # BATCH to S, RELAY to F1
    assert follower.stepped == [append]
    assert secretary.peers == {"F1": ("127.0.0.1", 7001)}   # learned from the batch
    reply = Message(MT.APPEND_RESP, "L", "F1", TERM, index=6)
    assert follower.route([reply]) == []       # taken: it goes back through S
    net.deliver()
    net.clock.advance(0)                       # everyone answered: reported this turn
    net.deliver()
    assert leader.stepped == [reply]
    status = leader.status()["secretaries"]
    assert status["assignment"] == {"S": ["F1"]} and status["relaying"] is True
    assert follower.status()["secretary_route"] == {"leader": "L", "term": TERM,
                                                    "secretary": "S"}
    assert secretary.status()["secretary"]["leader"] == "L"
    text = generate_latest(leader.registry).decode()
    assert "bwraft_secretary_leader_relayed_entries_total 1.0" in text
    assert "bwraft_secretary_assigned_followers 1.0" in text
    assert "bwraft_secretary_relayed_entries_total 1.0" in generate_latest(
        secretary.registry).decode()


def test_quiet_reports_stay_well_inside_a_short_reply_deadline():
    # Ten report delays of 5 ms would be half of a 100 ms deadline: a quarter of it instead.
    net, leader, follower, secretary = cluster({"max_report_delay_ms": 5.0,
                                                "reply_deadline_ms": 100})
    leader.route([Message(MT.HEARTBEAT, "F1", "L", TERM, commit=5)])
    net.deliver()
    net.clock.advance(0.024)
    assert not any(peer == "L" for peer, _ in secretary.sent)
    net.clock.advance(0.002)
    assert [p for p, _ in secretary.sent if p == "L"] == ["L"]


def test_a_batch_nobody_answers_is_acknowledged_within_quiet_factor_report_delays():
    net, leader, follower, secretary = cluster({"max_report_delay_ms": 5.0})
    leader.route([Message(MT.HEARTBEAT, "F1", "L", TERM, commit=5)])
    net.deliver()
    assert not any(peer == "L" for peer, _ in secretary.sent)
    net.clock.advance(QUIET_FACTOR * 0.005 - 0.001)
    assert not any(peer == "L" for peer, _ in secretary.sent)
    net.clock.advance(0.002)
    [(_, report)] = [(p, m) for p, m in secretary.sent if p == "L"]
    assert wire.decode_report(report, "L").ack_seq == 1


def test_commit_notice_leaves_alone_after_commit_delay_unless_a_batch_takes_it_first():
    net, leader, follower, secretary = cluster({"commit_delay_ms": 3.0})
    notice = Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=6, commit=6)
    assert leader.route([notice]) == []        # held: nothing sent yet
    net.clock.advance(0.002)
    assert net.deliver() == 0
    net.clock.advance(0.0015)                  # its wait is over: a frame of its own
    net.deliver()
    assert follower.stepped == [notice]
    # A later APPEND within the wait replaces the next notice: one frame, the newer message.
    newer = Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=6, commit=7,
                    entries=(Entry(TERM, 7, b"y"),))
    sent_before = len(leader.sent)
    leader.route([Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=6, commit=6)])
    leader.route([newer])
    net.clock.advance(0.01)
    net.deliver()
    assert len(leader.sent) == sent_before + 1     # one BATCH, with the newer message only
    assert follower.stepped == [notice, newer]
    assert "bwraft_secretary_leader_folded_notices_total 1.0" in generate_latest(
        leader.registry).decode()


def held_notice_timers(clock: task.Clock) -> list[Any]:
    return [call for call in clock.getDelayedCalls()
            if getattr(call.func, "__name__", "") == "_flush_held"]


def test_a_batch_that_takes_the_held_notices_along_cancels_their_timer():
    """Under load every held notice rides the next batch; a timer left behind would wake the
    leader for nothing once per round."""
    net, leader, follower, secretary = cluster({"commit_delay_ms": 3.0})
    notice = Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=6, commit=6)
    leader.route([notice])
    assert len(held_notice_timers(net.clock)) == 1
    newer = Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=6, commit=6,
                    entries=(Entry(TERM, 7, b"y"),))
    leader.route([newer])                      # replaces the notice: nothing is held now
    assert held_notice_timers(net.clock) == []
    leader.route([Message(MT.APPEND, "F1", "L", TERM, log_term=TERM, index=7, commit=7)])
    assert len(held_notice_timers(net.clock)) == 1   # the next hold gets a timer of its own
    net.clock.advance(0.0035)
    net.deliver()
    assert held_notice_timers(net.clock) == []
    assert follower.stepped[-1].commit == 7


def test_dead_secretary_is_taken_back_by_the_deadline_timer():
    """No report within the deadline (30% of the 1 s election timeout): the leader probes the
    follower again and tells it to answer directly."""
    net, leader, follower, secretary = cluster()
    leader.route([Message(MT.HEARTBEAT, "F1", "L", TERM, commit=5)])
    net.queue.clear()                          # the secretary never got it
    net.clock.advance(0.25)
    assert leader.kernel.unreachable == []
    net.clock.advance(0.1)
    net.clock.advance(0.1)
    assert leader.kernel.unreachable == ["F1"]
    assert ("F1", wire.encode_direct(TERM)) in leader.sent
    later = Message(MT.HEARTBEAT, "F1", "L", TERM, commit=5)
    assert leader.route([later]) == [later]    # benched: sent directly
    text = generate_latest(leader.registry).decode()
    assert 'bwraft_secretary_takebacks_total{reason="deadline"} 1.0' in text


def test_the_hint_counts_on_no_direct_voter_that_lags():
    """F2 (direct) and L are a quorum of three, so the secretary's F1 is no hint ... until
    F2 lacks what was committed a reply deadline (300 ms) before: then the leader needs F1's
    acknowledgement, and the hint says it is all it needs."""
    net, leader, follower, secretary = cluster()

    def hint() -> tuple[int, bool]:
        leader.route([Message(MT.HEARTBEAT, "F1", "L", TERM, commit=5)])
        [batch] = [wire.decode_batch(msgpack.unpackb(msgpack.packb(p), raw=False))
                   for peer, p in leader.sent[-1:] if peer == "S"]
        net.deliver()
        follower.route([Message(MT.HEARTBEAT_RESP, "L", "F1", TERM)])   # F1 answers
        net.deliver()
        return batch.report_after, batch.settles

    def next_check() -> None:
        """Up to the deadline checker's next run (every 100 ms tick), the secretary's quiet
        reports delivered on the way."""
        for _ in range(4):
            net.clock.advance(0.025)
            net.deliver()

    assert hint() == (0, False)
    leader.kernel.commit_index = 9
    next_check()                              # commit 9 seen; F2 had 5
    next_check()
    assert hint() == (0, False)               # behind for less than the 300 ms deadline
    next_check()
    next_check()                              # still lacks what was committed 300 ms ago
    assert hint() == (1, True)
    leader.kernel.progress["F2"] = (9, True)
    next_check()
    assert hint() == (0, False)
    assert leader.kernel.unreachable == []     # the secretary kept its follower throughout


def test_gossip_marks_the_secretary_dead():
    net, leader, follower, secretary = cluster()
    leader.route([Message(MT.HEARTBEAT, "F1", "L", TERM, commit=5)])
    leader.host.hook.bwraft_member_event(
        node=leader, event="dead", member=FakeMember("S", "secretary", "east", state="dead"))
    assert leader.kernel.unreachable == ["F1"]


def test_garbage_frames_are_counted_never_raised():
    net, leader, follower, secretary = cluster()
    rng = random.Random(3)
    junk = [None, 1, "x", b"y", [], [1], [2, 1], [3, b""], [4, b"\x91"], [5, b"x"], [9, b""],
            {"a": 1}, [1, msgpack.packb([1, 1, "L", [[1, [[1, b"x", 0]]]],
                                         [[5, "F1", 1, 0, 2, 0, b""]], {}])],
            [2, msgpack.packb([TERM, "L", [[5, 0, 0, 0, b"", [[1, "not bytes", 0]]]]])],
            [4, msgpack.packb([TERM, 1, [["F1", 6, 1, 1, "no", 0, b""]], []])]]
    for node in (leader, follower, secretary):
        for _ in range(50):
            node.host.hook.bwraft_plugin_frame(
                node=node, peer="X", frame=codec.PluginFrame("secretary", rng.choice(junk)))
    assert all(n.plugin.malformed > 0 for n in (leader, follower, secretary))
    assert leader.stepped == follower.stepped == []
    other = codec.PluginFrame("someone-else", [1])
    assert leader.host.hook.bwraft_plugin_frame(node=leader, peer="X", frame=other) is None


def test_a_follower_never_steps_a_relay_as_leader_and_reports_are_fenced():
    net, leader, follower, secretary = cluster()
    stale = wire.encode_report(TERM - 1, 1, [("F1", [MT.APPEND_RESP, 1, 1, False, 0, b""])],
                               ())
    leader.host.hook.bwraft_plugin_frame(node=leader, peer="S",
                                         frame=codec.PluginFrame("secretary", stale))
    assert leader.stepped == []
    leader.kernel.role = StateRole.FOLLOWER   # deposed: reports mean nothing now
    fresh = wire.encode_report(TERM, 1, [("F1", [MT.APPEND_RESP, 1, 1, False, 0, b""])], ())
    leader.host.hook.bwraft_plugin_frame(node=leader, peer="S",
                                         frame=codec.PluginFrame("secretary", fresh))
    assert leader.stepped == [] and leader.plugin.leader.stats.stale_reports == 2
