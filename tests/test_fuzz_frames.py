"""Fuzzing the peer wire past the MAC: well-formed msgpack with hostile content.

tests/test_codec.py fuzzes the frame decoder with random bytes and mutated frames, which
mostly fail early (bad length, bad MAC, not msgpack). Here the input is valid msgpack, framed
and authenticated with the right secret (a peer that holds the secret, or a bug in one), so it
reaches the field checks; and the same goes through a live inbound connection of the
transport, which must close only that connection and count the rejection.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from bwcore.codec import (KIND_HELLO, KIND_MESSAGE, KIND_PLUGIN, FrameDecoder, FrameError,
                          Hello, PluginFrame, decode, encode, encode_frame)
from bwcore.kernel import Entry, Message, MessageType
from bwcore.transport import PeerTransport

SECRET = b"fuzzing-secret-of-at-least-16-bytes"
PEER = IPv4Address("TCP", "127.0.0.9", 40000)

#: Any msgpack value (ints within what msgpack can encode).
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=5) | st.binary(max_size=5), inner, max_size=3),
    max_leaves=20)

#: Bodies shaped like frames: a kind (mostly a known one) and fields of any type.
bodies = st.tuples(st.sampled_from([KIND_MESSAGE, KIND_PLUGIN, KIND_HELLO, 3, -1, True]),
                   st.lists(values, max_size=14)).map(lambda t: [t[0], *t[1]])

VALID_MESSAGE = Message(MessageType.APPEND, "n2", "n1", 3, log_term=2, index=7,
                        entries=(Entry(3, 8, b"put x"),), commit=6)

#: Longer than a MAC, so that a frame of it without one is "bad_mac", not "missing_mac".
BIG_MESSAGE = Message(MessageType.APPEND, "n1", "n2", 3, log_term=2, index=7,
                      entries=(Entry(3, 8, b"x" * 64),), commit=6)


def msgpack_of(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_hostile_bodies_decode_or_raise_frame_error(body: list[Any]) -> None:
    """Any msgpack array decodes to a valid frame or raises FrameError, nothing else."""
    try:
        frame = decode(msgpack_of(body))
    except FrameError:
        return
    assert isinstance(frame, (Message, PluginFrame, Hello))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 12), values)
def test_a_valid_message_with_one_field_replaced_decodes_or_raises_frame_error(
        position: int, value: Any) -> None:
    """One hostile field in an otherwise valid message is caught by the field checks."""
    fields = msgpack.unpackb(encode(VALID_MESSAGE), raw=False)
    fields[position] = value
    try:
        frame = decode(msgpack_of(fields))
    except FrameError:
        return
    assert isinstance(frame, Message)
    assert decode(encode(frame)) == frame  # what was accepted is a well-formed message


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=4))
def test_authenticated_hostile_frames_only_raise_frame_error(frames: list[list[Any]]) -> None:
    """Frames carrying a valid MAC around hostile bodies fail with FrameError only."""
    data = b"".join(_framed(msgpack_of(body)) for body in frames)
    decoder = FrameDecoder(max_frame_bytes=1 << 16, secret=SECRET)
    try:
        decoder.feed(data)
    except FrameError:
        pass


def _framed(body: bytes) -> bytes:
    import hashlib
    import hmac

    mac = hmac.new(SECRET, body, hashlib.sha256).digest()
    return (len(body) + len(mac)).to_bytes(4, "big") + body + mac


class Inbound:
    """A transport with a secret and one inbound connection on a StringTransport."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reactor = MemoryReactorClock()
        self.received: list[tuple[str, Any]] = []
        self.transport = PeerTransport("n1", self.reactor,
                                       lambda peer, obj: self.received.append((peer, obj)),
                                       secret=SECRET, cluster_name="c", registry=self.registry,
                                       rng=random.Random(1))
        self.transport.listen("127.0.0.1", 0)
        factory = self.reactor.tcpServers[-1][1]
        self.protocol = factory.buildProtocol(PEER)
        self.wire = StringTransport(peerAddress=PEER)
        self.protocol.makeConnection(self.wire)

    def rejected(self) -> float:
        return sum(sample.value for metric in self.registry.collect()
                   if metric.name == "bwraft_transport_rejected_frames"
                   for sample in metric.samples if sample.name.endswith("_total"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies, min_size=1, max_size=3), st.booleans())
def test_a_connection_sending_hostile_frames_is_closed_and_counted(
        frames: list[list[Any]], hello_first: bool) -> None:
    """The transport delivers what is valid, rejects the rest by closing and counting."""
    inbound = Inbound()
    data = encode_frame(Hello("n2", "c"), SECRET) if hello_first else b""
    data += b"".join(_framed(msgpack_of(body)) for body in frames)
    inbound.protocol.dataReceived(data)
    if inbound.wire.disconnecting:
        assert inbound.rejected() >= 1
    else:
        # Nothing was wrong: every frame after the hello was a valid message or plugin frame.
        assert hello_first
        assert len(inbound.received) == len(frames)


@pytest.mark.parametrize("first, reason", [
    (encode_frame(Hello("n2", "c"), secret=None), "missing_mac"),           # shorter than a MAC
    (encode_frame(Hello("n2", "c"), SECRET) + encode_frame(BIG_MESSAGE, None), "bad_mac"),
    (encode_frame(Hello("n2", "c"), b"another-secret-16-bytes+"), "bad_mac"),
], ids=["hello-without-mac", "message-without-mac", "hello-with-another-secret"])
def test_an_unauthenticated_frame_closes_the_connection_and_is_counted(
        first: bytes, reason: str) -> None:
    """A frame without the cluster's MAC is rejected: connection closed, reason counted."""
    inbound = Inbound()
    inbound.protocol.dataReceived(first)
    assert inbound.wire.disconnecting and inbound.received == []
    assert inbound.registry.get_sample_value("bwraft_transport_rejected_frames_total",
                                             {"reason": reason}) == 1
