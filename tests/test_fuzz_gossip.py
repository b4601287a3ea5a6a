"""Fuzzing the gossip decoder and member past the MAC: valid msgpack with hostile content.

tests/test_gossip.py feeds random bytes and single-byte corruptions, which mostly fail at the
header or the MAC. Here each datagram is sealed with the right secret around msgpack arrays
shaped like gossip messages and updates (a known type and fields of any type), so that the
field checks and the member's handlers see them. The member must drop or handle each one,
never raise, and keep its own record intact.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import task

from bwcore.gossip import GossipConfig, SwimMember
from bwcore.gossip_codec import (Alive, DatagramRejected, Member, Ping, WireCodec,
                                 encode_message, encode_update)

SECRET = b"gossip-fuzz-secret-16+bytes"
TYPES = [1, 2, 3, 4, 5, 16, 17, 18, 19]

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=30) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
#: A gossip record: a type (mostly known) and fields of any type.
records = st.tuples(st.sampled_from(TYPES + [0, 6, 255]), st.lists(values, max_size=10)).map(
    lambda t: [t[0], *t[1]])
#: Plausible field values, so that more records get past the first checks.
plausible = st.sampled_from(["m0", "m1", "voter", "dc1", "10.0.0.2:7946", "10.0.0.2:7000", "",
                             0, 1, 2**32, 2**63, -1, True, {}, {"k": "v"}, [], None])
plausible_records = st.tuples(st.sampled_from(TYPES),
                              st.lists(plausible, min_size=1, max_size=9)).map(
    lambda t: [t[0], *t[1]])


def make_member() -> tuple[SwimMember, WireCodec, list[bytes]]:
    sent: list[bytes] = []
    local = Member(id="m0", role="voter", datacenter="dc1", raft_addr="10.0.0.1:7000",
                   api_addr="10.0.0.1:8000", gossip_addr="10.0.0.1:7946")
    member = SwimMember(local, lambda addr, data: sent.append(data), task.Clock(),
                        random.Random(3), GossipConfig(), secret=SECRET,
                        registry=CollectorRegistry())
    member.start()
    codec = WireCodec(SECRET, GossipConfig().max_datagram)
    peer = Member(id="m1", role="voter", datacenter="dc1", raft_addr="10.0.0.2:7000",
                  api_addr="10.0.0.2:8000", gossip_addr="10.0.0.2:7946")
    member.datagram_received(codec.seal(encode_message(Ping(1, "m0", "m1"))
                                        + encode_update(Alive(peer))), ("10.0.0.2", 7946))
    return member, codec, sent


def seal(codec: WireCodec, body: list[list[Any]]) -> bytes:
    return codec.seal(b"".join(msgpack.packb(r, use_bin_type=True) for r in body))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=4))
def test_the_decoder_only_ever_raises_datagram_rejected(body: list[list[Any]]) -> None:
    codec = WireCodec(SECRET, 65507)
    try:
        codec.open(seal(codec, body))
    except DatagramRejected:
        pass


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(records, plausible_records), min_size=1, max_size=4))
def test_the_member_survives_authenticated_hostile_datagrams(body: list[list[Any]]) -> None:
    """Hostile but authenticated datagrams are dropped or handled; no handler raises."""
    member, codec, _ = make_member()
    data = seal(codec, body)
    if len(data) > codec.max_datagram:
        return
    member.datagram_received(data, ("10.0.0.9", 7946))
    assert member.stats.dropped["error"] == 0
    assert member.local.id == "m0" and member.running
    # It still answers a well-formed ping afterwards.
    member.datagram_received(codec.seal(encode_message(Ping(77, "m0", "m1"))),
                             ("10.0.0.2", 7946))
    assert member.stats.dropped["error"] == 0


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=1400))
def test_unauthenticated_datagrams_are_all_dropped_as_auth_or_earlier(data: bytes) -> None:
    """Without the secret nothing gets past the header and MAC checks."""
    member, _, _ = make_member()
    before = sum(member.stats.dropped.values())
    unsealed = bytes([1]) + data  # version 1, no authentication flag
    member.datagram_received(unsealed, ("10.0.0.9", 7946))
    assert sum(member.stats.dropped.values()) == before + 1
    assert member.stats.dropped["auth"] >= 1
