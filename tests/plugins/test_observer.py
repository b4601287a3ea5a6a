"""The observer plugin on a real RaftNode driven by a fake clock and a fake transport.

The observer is node ``n1`` of the node test harness, a helper outside the configuration of
the voters n2, n3 and n4; n2 plays the leader by delivering its messages by hand.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from bwcore.errors import ConfigError, Unavailable
from bwcore.kernel import Entry
from bwcore.kernel import MessageType as MT
from bwcore.plugins import PluginHost
from bwraft_plugins.observer import ObserverPlugin, ReadBatcher
from tests.test_node import (
    Harness, ack_appends, elect_n1_of_three, make_config, make_harness, resolved,
)

VOTERS = ("n2", "n3", "n4")
SETTINGS = {"max_wait_ms": 1000, "max_lag_entries": 5, "feed_observers": True}


def observer(**settings: Any) -> tuple[Harness, ObserverPlugin]:
    plugin = ObserverPlugin({**SETTINGS, **settings}, rng=random.Random(1))
    h = make_harness(VOTERS, plugins=(("observer", plugin),), role="observer")
    return h, plugin


def follow_leader(h: Harness) -> None:
    """n2 leads term 2 and has told the observer (a heartbeat)."""
    h.deliver(MT.HEARTBEAT, "n2", 2, commit=0)
    assert h.node.kernel.leader == "n2"


def append(h: Harness, count: int) -> None:
    """The leader appends ``count`` entries (and commits them)."""
    kernel = h.node.kernel
    last = kernel.last_index
    entries = tuple(Entry(2, last + 1 + k, b"k%d=v" % (last + 1 + k)) for k in range(count))
    h.deliver(MT.APPEND, "n2", 2, index=last, log_term=kernel.term_at(last) or 0,
              entries=entries, commit=last + count)


def read(h: Harness, consistency: str = "linearizable", timeout: float = 4.0) -> Deferred[Any]:
    return Deferred.fromCoroutine(h.node.read_ready(consistency, timeout=timeout))


def sample(h: Harness, name: str, **labels: str) -> float:
    return h.node.registry.get_sample_value(name, labels or None) or 0.0


def test_concurrent_reads_share_one_read_index_and_wait_for_apply() -> None:
    """Reads of one moment share a ReadIndex request; they answer once the observer has
    applied the read index the leader confirmed, not before."""
    h, _ = observer()
    follow_leader(h)
    reads = [read(h) for _ in range(5)]
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    assert request.to == "n2"
    target = h.node.kernel.applied_index + 2
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=target, context=request.context)
    assert not any(d.called for d in reads)  # confirmed, but not applied yet
    append(h, 2)
    assert all(resolved(d) is None for d in reads)
    assert h.node.kernel.applied_index == target
    assert sample(h, "bwraft_observer_read_index_requests_total") == 1
    assert sample(h, "bwraft_observer_read_batch_size_sum") == 5
    assert sample(h, "bwraft_observer_reads_total", consistency="linearizable") == 5
    assert sample(h, "bwraft_observer_read_wait_seconds_count") == 5


def test_a_read_arriving_during_a_request_waits_for_the_next_one() -> None:
    """A read index requested before a read began may miss a write acknowledged before it:
    such a read waits for a request of its own, shared with the others that arrived."""
    h, _ = observer()
    follow_leader(h)
    first = read(h)
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    late = [read(h), read(h)]
    h.settle()
    assert h.transport.take(MT.READ_INDEX) == []  # one request in flight at a time
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=h.node.kernel.applied_index,
              context=request.context)
    assert resolved(first) is None
    assert not any(d.called for d in late)
    [second] = h.transport.take(MT.READ_INDEX)
    assert second.context != request.context
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=h.node.kernel.applied_index,
              context=second.context)
    assert all(resolved(d) is None for d in late)
    assert sample(h, "bwraft_observer_read_index_requests_total") == 2


def test_far_behind_the_read_index_answers_503_at_once() -> None:
    """An observer more than max_lag_entries behind the read index refuses at once."""
    h, _ = observer(max_lag_entries=5)
    follow_leader(h)
    d = read(h)
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=h.node.kernel.applied_index + 6,
              context=request.context)
    with pytest.raises(Unavailable, match="6 entries behind the read index"):
        resolved(d)
    assert sample(h, "bwraft_observer_reads_refused_total", reason="lagging") == 1
    # Within the bound it waits instead.
    d = read(h)
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=h.node.kernel.applied_index + 5,
              context=request.context)
    assert not d.called
    append(h, 5)
    assert resolved(d) is None


def test_an_unapplied_read_index_answers_503_after_max_wait() -> None:
    """A read whose index is not applied within max_wait_ms gets 503, not a hang."""
    h, _ = observer(max_wait_ms=300)
    follow_leader(h)
    d = read(h)
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=h.node.kernel.applied_index + 1,
              context=request.context)
    h.clock.advance(0.29)
    assert not d.called
    h.clock.advance(0.02)
    with pytest.raises(Unavailable, match="not applied within 300 ms"):
        resolved(d)
    assert sample(h, "bwraft_observer_reads_refused_total", reason="timeout") == 1


def test_a_lost_read_index_request_answers_503_and_the_next_read_asks_again() -> None:
    h, _ = observer(max_wait_ms=200)
    follow_leader(h)
    d = read(h)
    h.settle()
    h.transport.take(MT.READ_INDEX)  # lost
    h.clock.advance(0.2)
    with pytest.raises(Unavailable):
        resolved(d)
    d = read(h)
    h.settle()
    [request] = h.transport.take(MT.READ_INDEX)
    h.deliver(MT.READ_INDEX_RESP, "n2", 2, index=h.node.kernel.applied_index,
              context=request.context)
    assert resolved(d) is None


def test_without_a_leader_a_linearizable_read_answers_503_at_once() -> None:
    h, _ = observer()
    with pytest.raises(Unavailable, match="knows no leader"):
        resolved(read(h))
    assert h.transport.take(MT.READ_INDEX) == []
    assert sample(h, "bwraft_observer_reads_refused_total", reason="no_leader") == 1


def test_stale_reads_are_served_at_once_from_local_state() -> None:
    h, _ = observer()
    assert resolved(read(h, "stale")) is None  # no leader needed
    follow_leader(h)
    append(h, 3)
    assert resolved(read(h, "stale")) is None
    assert h.transport.take(MT.READ_INDEX) == []
    assert sample(h, "bwraft_observer_reads_total", consistency="stale") == 2


def test_a_new_leader_fails_reads_in_flight_quickly() -> None:
    """Reads asked of a leader that was replaced answer 503 rather than wait it out."""
    h, _ = observer()
    follow_leader(h)
    d = read(h)
    h.settle()
    h.transport.take(MT.READ_INDEX)
    h.deliver(MT.HEARTBEAT, "n3", 3, commit=0)
    with pytest.raises(Unavailable, match="leader changed"):
        resolved(d)


def test_status_shows_the_reads_waiting_and_the_bounds() -> None:
    h, _ = observer(max_wait_ms=700, max_lag_entries=9)
    follow_leader(h)
    reads = [read(h) for _ in range(3)]
    h.settle()
    late = read(h)
    assert h.node.status()["observer"] == {"reads_queued": 1, "reads_in_flight": 3,
                                           "max_wait_ms": 700, "max_lag_entries": 9}
    assert not late.called and not any(d.called for d in reads)


def test_stopping_the_observer_fails_waiting_reads() -> None:
    h, plugin = observer()
    follow_leader(h)
    d = read(h)
    h.settle()
    resolved(h.node.stopService())
    with pytest.raises(Unavailable):
        resolved(d)
    assert plugin.service is not None and not plugin.service.running


def test_locally_known_lag_refuses_before_asking_the_leader() -> None:
    """An observer that knows it is behind (committed but not applied) does not ask."""

    @dataclass
    class Kernel:
        leader: str | None = "n2"
        commit_index: int = 100
        applied_index: int = 10

    @dataclass
    class Node:
        kernel: Kernel = field(default_factory=Kernel)
        reactor: Any = None

        async def read_barrier(self, **_: Any) -> int:
            raise AssertionError("must not ask the leader")

    from prometheus_client import CollectorRegistry

    from bwraft_plugins.observer import ObserverMetrics

    batcher = ReadBatcher(Node(), ObserverMetrics(CollectorRegistry()), max_wait=1.0,
                          max_lag=50)
    with pytest.raises(Unavailable, match="90 entries behind"):
        resolved(batcher.linearizable(1.0))


# -- the voter side: feeding the observers gossip announces --------------------------------


@dataclass
class Member:
    id: Any
    role: Any = "observer"
    raft_addr: Any = "127.0.0.1:7301"
    api_addr: Any = "127.0.0.1:8301"
    tags: Any = field(default_factory=lambda: {"run": "a"})


def leader_with_plugin() -> tuple[Harness, ObserverPlugin]:
    plugin = ObserverPlugin(dict(SETTINGS), rng=random.Random(1))
    h = make_harness(("n1", "n2", "n3"), plugins=(("observer", plugin),))
    elect_n1_of_three(h)
    h.transport.take(MT.APPEND)
    return h, plugin


def test_the_leader_feeds_observers_gossip_announces_and_drops_dead_ones() -> None:
    h, plugin = leader_with_plugin()
    h.node.member_event("joined", Member("obs1"))
    h.settle()
    assert h.node.kernel.helpers == {"obs1"}
    [probe] = h.transport.take(MT.APPEND)
    assert probe.to == "obs1"
    assert sample(h, "bwraft_observer_fed_observers") == 1
    h.node.member_event("suspect", Member("obs1"))
    assert h.node.kernel.helpers == {"obs1"}  # a suspect may refute: keep feeding it
    h.node.member_event("dead", Member("obs1"))
    assert h.node.kernel.helpers == frozenset()
    h.node.member_event("joined", Member("obs1"))
    h.node.member_event("left", Member("obs1"))
    assert h.node.kernel.helpers == frozenset() and plugin.fed == {}
    h.node.member_event("joined", Member("obs2"))
    assert h.node.status()["observers_fed"] == ["obs2"]


def test_a_restarted_observer_is_probed_afresh() -> None:
    """A new run of an observer may have lost its log: its progress restarts from a probe."""
    h, _ = leader_with_plugin()
    h.node.member_event("joined", Member("obs1"))
    h.settle()
    [probe] = h.transport.take(MT.APPEND)
    h.deliver(MT.APPEND_RESP, "obs1", h.node.kernel.term, index=h.node.kernel.last_index)
    assert h.node.kernel.status()["progress"]["obs1"]["match"] == h.node.kernel.last_index
    h.node.member_event("updated", Member("obs1", tags={"run": "b"}))
    h.settle()
    assert h.node.kernel.status()["progress"]["obs1"]["match"] == 0
    assert {m.to for m in h.transport.take(MT.APPEND)} == {"obs1"}


def test_read_rounds_ask_only_voters_but_observers_keep_their_heartbeats() -> None:
    """The leader's ReadIndex heartbeats go to the voters only (an observer's ack would not
    count); regular heartbeats still reach the observer; reads are still confirmed."""
    plugin = ObserverPlugin(dict(SETTINGS), rng=random.Random(1))
    h = make_harness(("n1", "n2", "n3"), plugins=(("observer", plugin),))
    elect_n1_of_three(h)
    ack_appends(h)  # the leader's no-op commits: it may serve reads
    h.node.member_event("joined", Member("obs1"))
    h.settle()
    h.transport.take(MT.HEARTBEAT)
    d = h.read()
    h.settle()
    round_beats = h.transport.take(MT.HEARTBEAT)
    assert sorted(m.to for m in round_beats) == ["n2", "n3"] and round_beats[0].context
    h.deliver(MT.HEARTBEAT_RESP, "n2", h.node.kernel.term, context=round_beats[0].context)
    assert resolved(d) == h.node.kernel.commit_index
    h.ticks(1)
    assert "obs1" in {m.to for m in h.transport.take(MT.HEARTBEAT) if not m.context}


def test_voters_secretaries_and_garbage_are_never_fed() -> None:
    h, plugin = leader_with_plugin()
    for member in (Member("n2"), Member("n1"), Member("sec1", role="secretary"),
                   Member(None), Member(7), Member("obs9", tags=None),
                   Member("obs8", tags={"run": 3})):
        h.node.member_event("joined", member)
    assert h.node.kernel.helpers == {"obs9", "obs8"}
    h.node.member_event("updated", Member("obs9", role="secretary"))
    assert h.node.kernel.helpers == {"obs8"}


def test_observers_gossip_knew_before_the_node_started_are_fed() -> None:
    """At start, a voter feeds the live observers already in its gossip view."""

    @dataclass
    class View:
        records: list[Any]

        def members(self) -> list[Any]:
            return self.records

    @dataclass
    class Gossip:
        member: View

    h, plugin = leader_with_plugin()
    records = [Member(f"obs{i}") for i in (1, 2, 3)]
    for record, state in zip(records, ("alive", "suspect", "dead")):
        record.state = state  # type: ignore[attr-defined]
    h.node.gossip = Gossip(View(records))
    plugin.bwraft_node_started(h.node)
    assert h.node.kernel.helpers == {"obs1", "obs2"}


def test_nodes_that_are_not_voters_feed_nobody() -> None:
    h, _ = observer()
    h.node.member_event("joined", Member("obs2"))
    assert h.node.kernel.helpers == frozenset()


def test_feeding_can_be_turned_off() -> None:
    plugin = ObserverPlugin({**SETTINGS, "feed_observers": False})
    h = make_harness(("n1", "n2", "n3"), plugins=(("observer", plugin),))
    h.node.member_event("joined", Member("obs1"))
    assert h.node.kernel.helpers == frozenset()


@pytest.mark.parametrize("settings, message", [
    ({"max_wait_ms": 0}, "max_wait_ms must be positive"),
    ({"max_lag_entries": -1}, "max_lag_entries must not be negative"),
    ({"max_wait_ms": "1"}, "expected int"),
    ({"max_wait": 1}, "unknown setting"),
])
def test_bad_settings_stop_the_node_with_a_clear_message(settings: dict, message: str) -> None:
    from importlib.metadata import entry_points

    config = make_config(VOTERS, role="observer", plugins={"observer": settings})
    with pytest.raises(ConfigError, match=message):
        PluginHost.from_config(config, entry_points=entry_points(group="bwraft"))
