"""The compaction plugin: snapshot policy, chunked InstallSnapshot, and crashes around both.

Cluster tests run real RaftNodes on one task.Clock (tests/plugins/ops_harness.py); the frame
limit there is 256 KiB, so the images below, several times larger, prove that a snapshot never
travels as one frame.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from twisted.internet import task

from bwcore.config import config_from_dict
from bwcore.errors import ConfigError
from bwcore.kernel import Message, MessageType, StateRole
from bwcore.plugins import PluginHost
from bwcore.logs import get_logger
from bwraft_plugins.compaction import CompactionPlugin
from bwraft_plugins.snapshot_stream import SnapshotReceiver, StreamCounters
from tests.plugins.ops_harness import FRAME_LIMIT, Net

VOTERS = ("n1", "n2", "n3")


def compaction(**settings: Any) -> CompactionPlugin:
    merged = {**CompactionPlugin.settings_defaults, **settings}
    return CompactionPlugin(merged)


def make_net(**settings: Any) -> tuple[Net, dict[str, CompactionPlugin]]:
    plugins: dict[str, CompactionPlugin] = {}

    def factory(node_id: str) -> list[tuple[str, Any]]:
        plugins[node_id] = compaction(**{"entries": 200, "chunk_bytes": 16 * 1024,
                                         "window": 3, "stall_seconds": 2.0, **settings})
        return [("compaction", plugins[node_id])]

    net = Net(VOTERS, factory)
    net.start_all()
    net.wait_leader()
    return net, plugins


# -- policy -----------------------------------------------------------------------------------


def test_policy_snapshots_on_entry_count_or_byte_size() -> None:
    """Either threshold triggers a snapshot; 0 turns a threshold off."""
    plugin = compaction(entries=100, max_bytes=1000)
    ask = plugin.bwraft_should_snapshot
    assert ask(node=None, applied_index=5, log_entries=99, log_bytes=999) is False
    assert ask(node=None, applied_index=5, log_entries=100, log_bytes=0) is True
    assert ask(node=None, applied_index=5, log_entries=1, log_bytes=1000) is True
    off = compaction(entries=0, max_bytes=0).bwraft_should_snapshot
    assert off(node=None, applied_index=5, log_entries=10**9, log_bytes=10**12) is False


@pytest.mark.parametrize("settings, message", [
    ({"entries": -1}, "entries must be >= 0"),
    ({"window": 0}, "window must be positive"),
    ({"chunk_bytes": 0}, "chunk_bytes must be positive"),
    ({"stall_seconds": 0.0}, "stall_seconds must be positive"),
])
def test_bad_settings_stop_the_node_with_a_clear_message(settings: dict, message: str) -> None:
    """Values out of range are refused when the host loads the plugin, naming the setting."""
    import importlib.metadata

    config = config_from_dict({"id": "n1", "addresses": {"raft": "127.0.0.1:0",
                                                        "api": "127.0.0.1:0"},
                               "plugins": {"compaction": settings}}, source="node.toml")
    ep = importlib.metadata.EntryPoint("compaction", "bwraft_plugins.compaction:CompactionPlugin",
                                       "bwraft")
    host = PluginHost(config)
    with pytest.raises(ConfigError, match=message):
        host.load("compaction", ep, settings)


# -- compaction and InstallSnapshot in a cluster -----------------------------------------------


def test_log_stays_bounded_and_a_lagging_follower_catches_up_by_chunked_snapshot() -> None:
    """A follower cut off while the log is compacted gets the image in many acknowledged chunks,
    none over the frame limit, and ends with the leader's exact data."""
    net, plugins = make_net()
    leader = net.wait_leader()
    lagging = next(n for n in VOTERS if n != leader)
    net.partition([lagging], [n for n in VOTERS if n != lagging])
    net.write_many(1500, value_bytes=600)  # ~1 MB of state, 4x the frame limit
    for node_id in VOTERS:
        if node_id != lagging:
            entries, _ = net.storages[node_id].log_stats()
            assert entries <= 200 + 60, f"{node_id} kept {entries} entries"
            assert net.storages[node_id].compactions >= 6
    net.heal()
    net.run_until(lambda: net.kv(lagging) == net.kv(net.wait_leader()), 30.0,
                  "the lagging follower to hold the leader's data")
    sender = plugins[net.wait_leader()].counters
    assert sender.completed >= 1 and sender.bytes_sent > 3 * FRAME_LIMIT
    assert sender.chunks_sent >= sender.bytes_sent // (16 * 1024)
    assert plugins[lagging].counters.received >= 1
    assert net.storages[lagging].snapshot is not None
    assert net.oversized == 0
    assert len(net.kv(lagging)) == 1500
    assert not net.fatal


def test_receiver_crash_between_chunks_then_the_stream_is_sent_again() -> None:
    """A follower killed in the middle of a stream restarts with its old state, the leader's
    stream fails and the kernel sends the snapshot again, which then installs."""
    net, plugins = make_net(window=1, chunk_bytes=8 * 1024)
    net.latency = 0.004  # a round trip per chunk: the stream spans many ticks
    leader = net.wait_leader()
    lagging = next(n for n in VOTERS if n != leader)
    net.partition([lagging], [n for n in VOTERS if n != lagging])
    net.write_many(800, value_bytes=400)
    net.heal()
    receiver = plugins[lagging].receiver
    net.run_until(lambda: receiver.current is not None and len(receiver.current.buf) > 0,
                  10.0, "a stream half-way")
    partial = len(receiver.current.buf)
    assert partial < receiver.current.size
    net.crash(lagging)
    net.start(lagging)
    net.run_until(lambda: len(net.kv(lagging)) == 800, 40.0, "the restarted follower to catch up")
    assert plugins[net.wait_leader()].counters.failed >= 1
    assert net.kv(lagging) == net.kv(net.wait_leader())


def test_crash_after_the_received_snapshot_is_stored_but_before_it_is_installed() -> None:
    """The stored snapshot alone rebuilds the follower: restart restores it and goes on."""
    net, _ = make_net()
    leader = net.wait_leader()
    lagging = next(n for n in VOTERS if n != leader)
    net.partition([lagging], [n for n in VOTERS if n != lagging])
    net.write_many(600, value_bytes=300)
    writer = net.writers[lagging]
    writer.hold = lambda fn, args: len(args) == 3 and args[2] is not None  # a snapshot save
    net.heal()
    net.run_until(lambda: writer.held, 20.0, "the follower to store the snapshot")
    writer.run_held(notify=False)        # on disk, but the node never hears of it
    net.crash(lagging)
    assert net.storages[lagging].snapshot is not None
    node = net.start(lagging)
    assert node.state_machine.applied_index == net.storages[lagging].snapshot.meta.index
    net.run_until(lambda: len(net.kv(lagging)) == 600, 20.0, "the follower to catch up")


@pytest.mark.parametrize("notify_storage", [False, True])
def test_crash_around_a_local_snapshot_loses_nothing(notify_storage: bool) -> None:
    """Killed before the stored snapshot reaches the kernel (or just after), a node restarts
    with every acknowledged write."""
    net, _ = make_net(entries=100)
    leader = net.wait_leader()
    victim = next(n for n in VOTERS if n != leader)
    writer = net.writers[victim]
    writer.hold = lambda fn, args: getattr(fn, "__name__", "") == "compact"
    net.write_many(150)
    net.run_until(lambda: writer.held, 10.0, "a local snapshot to be stored")
    writer.run_held(notify=notify_storage)
    net.crash(victim)
    storage = net.storages[victim]
    assert storage.snapshot is not None
    net.start(victim)
    net.run_until(lambda: len(net.kv(victim)) == 150, 20.0, "the restarted node's data")
    net.write_many(150, prefix="after")
    net.run_until(lambda: len(net.kv(victim)) == 300, 20.0, "replication after the restart")
    assert net.kv(victim) == net.kv(net.wait_leader())


def test_a_wiped_node_catches_up_by_snapshot() -> None:
    """A voter whose data directory was deleted restarts empty and is rebuilt from a snapshot."""
    net, plugins = make_net()
    leader = net.wait_leader()
    victim = next(n for n in VOTERS if n != leader)
    net.write_many(700, value_bytes=200)
    net.crash(victim)
    net.wipe(victim)
    net.start(victim)
    # The leader believes the node still holds what it acknowledged; the next append finds
    # out otherwise (a rejected probe) and the snapshot follows.
    net.write_many(5, prefix="after")
    net.run_until(lambda: len(net.kv(victim)) == 705, 30.0, "the wiped node to catch up")
    assert plugins[victim].counters.received >= 1
    assert net.kv(victim) == net.kv(net.wait_leader())


def test_leader_change_mid_stream_ends_the_old_stream() -> None:
    """A leader that loses leadership stops streaming; the new leader's snapshot installs."""
    net, plugins = make_net(window=1, chunk_bytes=4 * 1024)
    net.latency = 0.004
    leader = net.wait_leader()
    lagging = next(n for n in VOTERS if n != leader)
    net.partition([lagging], [n for n in VOTERS if n != lagging])
    net.write_many(500, value_bytes=300)
    net.heal()
    net.run_until(lambda: plugins[leader].sender.streams, 10.0, "a stream")
    net.crash(leader)
    net.run_until(lambda: net.leader() not in (None, leader), 20.0, "a new leader")
    net.run_until(lambda: len(net.kv(lagging)) == 500, 30.0, "the follower to catch up")
    net.start(leader)
    net.run_until(lambda: len(net.kv(leader)) == 500, 30.0, "the old leader to catch up")


# -- the receiver against bad input --------------------------------------------------------------


class _Node:
    node_id = "n2"

    def __init__(self) -> None:
        self.reactor = task.Clock()
        self.log = get_logger(node_id="n2")
        self.sent: list[tuple[str, Any]] = []
        self.stepped: list[Message] = []

    def send_plugin_frame(self, peer: str, plugin: str, payload: Any) -> bool:
        self.sent.append((peer, payload))
        return True

    def step(self, m: Message) -> None:
        self.stepped.append(m)


def _begin(size: int, **over: Any) -> dict[str, Any]:
    return {"k": "begin", "id": "5.1", "term": 5, "index": 40, "sterm": 4, "voters": ["n1"],
            "learners": [], "size": size, **over}


def _chunk(off: int, data: bytes, **over: Any) -> dict[str, Any]:
    return {"k": "chunk", "id": "5.1", "off": off, "data": data, "crc": zlib.crc32(data), **over}


def make_receiver(max_bytes: int = 1 << 20) -> tuple[_Node, SnapshotReceiver]:
    node = _Node()
    return node, SnapshotReceiver(node, max_bytes=max_bytes, stall_seconds=5.0,
                                  counters=StreamCounters())


def test_receiver_steps_the_snapshot_only_when_complete_and_intact() -> None:
    node, rx = make_receiver()
    rx.on_frame("n1", _begin(6))
    rx.on_frame("n1", _chunk(0, b"abc"))
    assert node.stepped == []
    rx.on_frame("n1", _chunk(3, b"def"))
    rx.on_frame("n1", {"k": "end", "id": "5.1", "crc": zlib.crc32(b"abcdef")})
    [m] = node.stepped
    assert (m.type, m.frm, m.to, m.term) == (MessageType.SNAPSHOT, "n1", "n2", 5)
    assert m.snapshot.data == b"abcdef" and m.snapshot.meta.index == 40
    assert [p["k"] for _, p in node.sent] == ["ack", "ack", "ack", "done"]


@pytest.mark.parametrize("frames", [
    [_chunk(0, b"abc", crc=1)],                                   # corrupt chunk
    [_chunk(3, b"abc")],                                          # a chunk went missing
    [_chunk(0, b"abcdefg")],                                      # beyond the announced size
    [_chunk(0, b"abcdef"), {"k": "end", "id": "5.1", "crc": 7}],  # whole image corrupt
    [_chunk(0, b"abc"), {"k": "end", "id": "5.1", "crc": zlib.crc32(b"abc")}],  # short
])
def test_receiver_refuses_a_broken_stream_and_installs_nothing(frames: list[dict]) -> None:
    node, rx = make_receiver()
    rx.on_frame("n1", _begin(6))
    for frame in frames:
        rx.on_frame("n1", frame)
    assert node.stepped == []
    assert node.sent[-1][1]["k"] == "nack"
    assert rx.current is None


@pytest.mark.parametrize("payload", [
    {}, {"k": "begin"}, {"k": "begin", "id": 3}, _begin(-1), _begin(10, voters="n1"),
    _begin(10, term="x"), _begin(10, index=0), {"k": "chunk", "id": "5.1", "off": 0},
    {"k": "end", "id": "zz"}, {"k": "what", "id": "5.1"}, _begin(10, id="x" * 500),
])
def test_receiver_never_raises_on_garbage(payload: dict) -> None:
    node, rx = make_receiver()
    rx.on_frame("n1", payload)
    assert node.stepped == []
    assert rx.counters.rejected >= 1 or node.sent[-1][1]["k"] == "ack"


def test_receiver_refuses_an_image_over_its_limit_and_drops_a_stalled_one() -> None:
    node, rx = make_receiver(max_bytes=100)
    rx.on_frame("n1", _begin(101))
    assert node.sent[-1][1]["k"] == "nack" and rx.current is None
    rx.on_frame("n1", _begin(50))
    rx.on_frame("n1", _chunk(0, b"x" * 10))
    assert rx.current is not None
    node.reactor.advance(5.0)
    assert rx.current is None


def test_plugin_frames_for_other_plugins_are_left_alone() -> None:
    plugin = compaction()

    class Frame:
        plugin = "secretary"
        payload: dict = {}

    assert plugin.bwraft_plugin_frame(node=None, peer="n1", frame=Frame()) is None


def test_frame_limit_in_the_harness_is_what_makes_chunking_necessary() -> None:
    """Sanity check of the harness: a whole image above the limit could not be sent."""
    net, _ = make_net()
    leader = net.wait_leader()
    net.write_many(600, value_bytes=600)
    assert len(net.nodes[leader].state_machine.snapshot()) > FRAME_LIMIT
    assert net.nodes[leader].kernel.role is StateRole.LEADER


def test_a_new_helper_is_bootstrapped_from_the_snapshot() -> None:
    """A non-member the leader feeds (an observer learned by gossip) starts empty and gets the
    compacted state by InstallSnapshot, then the log after it."""
    net, plugins = make_net()
    net.write_many(500, value_bytes=100)
    leader = net.wait_leader()
    net.start("o1", net.config("o1", voters=[]))
    for node_id, node in net.nodes.items():  # what gossip would tell them
        for other in net.nodes:
            if other != node_id:
                node.set_peer_address(other, "127.0.0.1", net.port_of(other))
    net.nodes[leader].add_helper("o1")
    net.run_until(lambda: len(net.kv("o1")) == 500, 20.0, "the helper to be bootstrapped")
    assert plugins["o1"].counters.received == 1
    assert net.nodes["o1"].kernel.conf.voters == set(VOTERS)
    net.write_many(10, prefix="after")
    net.run_until(lambda: len(net.kv("o1")) == 510, 10.0, "the helper to follow the log")
