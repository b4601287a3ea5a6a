"""The wire codec: exact round trips, compact bodies, frame limits, MACs, hostile input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bwcore.codec import (
    MAC_BYTES,
    FrameDecoder,
    FrameError,
    Hello,
    PluginFrame,
    decode,
    encode,
    encode_frame,
)
from bwcore.kernel import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

SECRET = b"0123456789abcdef-cluster-secret"

# -- strategies ------------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=2**64 - 1)
small = st.integers(min_value=0, max_value=1000)
node_ids = st.text(max_size=12)
entries = st.builds(Entry, term=u64, index=u64, data=st.binary(max_size=64),
                    type=st.sampled_from(EntryType))
confs = st.builds(ConfState, voters=st.frozensets(node_ids, max_size=5),
                  learners=st.frozensets(node_ids, max_size=5))
snapshots = st.builds(Snapshot, meta=st.builds(SnapshotMeta, index=u64, term=u64, conf=confs),
                      data=st.binary(max_size=128))
messages = st.builds(
    Message, type=st.sampled_from(MessageType), to=node_ids, frm=node_ids, term=u64,
    log_term=u64, index=u64, entries=st.lists(entries, max_size=6).map(tuple), commit=u64,
    reject=st.booleans(), reject_hint=u64, context=st.binary(max_size=16),
    snapshot=st.none() | snapshots)
# Payloads as they come back from the wire: arrays are lists, map keys str or bytes.
payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
    | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=12)
frames = (messages | st.builds(PluginFrame, plugin=st.text(max_size=10), payload=payloads)
          | st.builds(Hello, node_id=node_ids, cluster_name=st.text(max_size=10)))


def append_msg(n_entries: int = 2) -> Message:
    return Message(MessageType.APPEND, "n2", "n1", 3, log_term=3, index=10,
                   entries=tuple(Entry(3, 11 + i, b"x" * 10) for i in range(n_entries)),
                   commit=9)


# -- round trips -----------------------------------------------------------------------

@given(messages)
def test_every_message_round_trips_exactly(m: Message) -> None:
    """decode(encode(m)) == m for every field, entries and snapshot included."""
    assert decode(encode(m)) == m


@given(frames)
def test_every_frame_kind_round_trips(obj: object) -> None:
    """Messages, plugin frames and hellos all come back equal."""
    assert decode(encode(obj)) == obj


def test_enums_are_restored_as_enum_members() -> None:
    """Decoded message and entry types are the enum members, not bare ints."""
    m = Message(MessageType.SNAPSHOT, "a", "b", 1,
                entries=(Entry(1, 1, b"", EntryType.CONF_CHANGE),),
                snapshot=Snapshot(SnapshotMeta(5, 1, ConfState(frozenset({"a"}))), b"s"))
    out = decode(encode(m))
    assert out.type is MessageType.SNAPSHOT
    assert out.entries[0].type is EntryType.CONF_CHANGE
    assert out.snapshot.meta.conf.voters == frozenset({"a"})


def test_body_is_a_positional_array_without_field_names() -> None:
    """A message travels as [kind, fields...]; entries as arrays; no field names on the wire."""
    raw = msgpack.unpackb(encode(append_msg(2)), raw=False)
    assert raw == [0, 5, "n2", "n1", 3, 3, 10,
                   [[3, 11, b"x" * 10, 0], [3, 12, b"x" * 10, 0]], 9, False, 0, b"", None]
    heartbeat = Message(MessageType.HEARTBEAT, "n2", "n1", 3, commit=9)
    assert len(encode(heartbeat)) <= 20


def test_snapshot_configuration_is_sent_sorted() -> None:
    """Voters and learners travel sorted, so equal configurations encode to equal bytes."""
    ids = [f"node-{i}" for i in range(40)]
    conf = ConfState(frozenset(ids[::2]), frozenset(ids[1::2]))
    m = Message(MessageType.SNAPSHOT, "x", "y", 1,
                snapshot=Snapshot(SnapshotMeta(1, 1, conf), b""))
    index, term, voters, learners, data = msgpack.unpackb(encode(m), raw=False)[12]
    assert voters == sorted(ids[::2]) and learners == sorted(ids[1::2])


def test_plugin_payload_arrays_come_back_as_lists() -> None:
    """Tuples in a payload are msgpack arrays and decode as lists."""
    out = decode(encode(PluginFrame("relay", {"f": ("a", 1), b"k": [b"\x00"]})))
    assert out == PluginFrame("relay", {"f": ["a", 1], b"k": [b"\x00"]})


@pytest.mark.parametrize("payload", [{1: "int key"}, {"s": {1, 2}}, object(), [{("t",): 1}]])
def test_encode_refuses_payloads_a_receiver_would_reject(payload: object) -> None:
    """Non-str/bytes map keys, sets and arbitrary objects fail at the sender with TypeError."""
    with pytest.raises(TypeError):
        encode(PluginFrame("p", payload))


def test_encode_refuses_deep_payloads_and_non_frames() -> None:
    """Payload nesting is bounded and only frame objects can be encoded."""
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(TypeError):
        encode(PluginFrame("p", deep))
    with pytest.raises(TypeError):
        encode("not a frame")  # type: ignore[arg-type]


def test_encode_reports_out_of_range_integers_as_value_error() -> None:
    """An int msgpack cannot carry is a ValueError, not an OverflowError."""
    with pytest.raises(ValueError):
        encode(PluginFrame("p", 2**64))


# -- frames and the incremental decoder ------------------------------------------------

def test_frame_is_big_endian_length_then_body() -> None:
    """Without a secret a frame is a 4-byte big-endian length and the body."""
    m = append_msg()
    frame = encode_frame(m)
    assert frame[:4] == struct.pack(">I", len(encode(m)))
    assert frame[4:] == encode(m)


def test_authenticated_frame_appends_a_mac_counted_in_the_length() -> None:
    """With a secret, 32 MAC bytes follow the body inside the frame."""
    m = append_msg()
    frame = encode_frame(m, SECRET)
    assert struct.unpack(">I", frame[:4])[0] == len(encode(m)) + MAC_BYTES
    assert FrameDecoder(secret=SECRET).feed(frame) == [m]


@given(st.lists(frames, min_size=1, max_size=5), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_decoder_reassembles_frames_split_anywhere(objs: list, data: st.DataObject) -> None:
    """Frames cut at arbitrary byte boundaries come out whole, in order."""
    stream = b"".join(encode_frame(o, SECRET) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder(secret=SECRET)
    out: list = []
    for start, end in zip([0] + cuts, cuts + [len(stream)]):
        out += decoder.feed(stream[start:end])
    assert out == objs
    assert decoder.buffered == 0


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    """A length above the limit fails as soon as the 4-byte header arrives."""
    decoder = FrameDecoder(max_frame_bytes=1000)
    with pytest.raises(FrameError) as err:
        decoder.feed(struct.pack(">I", 1001))
    assert err.value.reason == "oversize"
    assert decoder.buffered == 0


def test_decoder_buffers_at_most_one_frame_plus_the_last_read() -> None:
    """A frame at the limit is buffered while incomplete and released once decoded."""
    m = append_msg(50)
    frame = encode_frame(m)
    decoder = FrameDecoder(max_frame_bytes=len(frame) - 4)
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [m]
    assert decoder.buffered == 0
    with pytest.raises(FrameError):
        FrameDecoder(max_frame_bytes=len(frame) - 5).feed(frame)


def test_decoder_stays_failed_after_an_error() -> None:
    """After one bad frame every later call raises the same error, even for good bytes."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as first:
        decoder.feed(struct.pack(">I", 1) + b"\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(FrameError) as again:
        decoder.feed(encode_frame(append_msg()))
    assert again.value is first.value


def test_iteration_yields_good_frames_before_a_bad_one() -> None:
    """push() + iteration delivers every frame that precedes a corrupt one."""
    decoder = FrameDecoder()
    decoder.push(encode_frame(append_msg()) + struct.pack(">I", 1) + b"\xc1")
    it = iter(decoder)
    assert next(it) == append_msg()
    with pytest.raises(FrameError):
        next(it)


def _flip_last_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0x01])


@pytest.mark.parametrize("reason, frame", [
    ("bad_mac", encode_frame(append_msg(), b"another-secret-of-the-cluster")),
    ("bad_mac", encode_frame(append_msg())),  # no MAC: the body's tail is taken as one
    ("missing_mac", encode_frame(Hello("a", "b"))),  # shorter than a MAC
    ("bad_mac", _flip_last_byte(encode_frame(append_msg(), SECRET))),
])
def test_frames_without_a_valid_mac_are_rejected(reason: str, frame: bytes) -> None:
    """With a secret, a missing, foreign or damaged MAC is a FrameError."""
    with pytest.raises(FrameError) as err:
        FrameDecoder(secret=SECRET).feed(frame)
    assert err.value.reason == reason


def test_a_tampered_body_fails_the_mac() -> None:
    """Changing one body byte of an authenticated frame is detected."""
    frame = bytearray(encode_frame(append_msg(), SECRET))
    frame[20] ^= 0x40
    with pytest.raises(FrameError) as err:
        FrameDecoder(secret=SECRET).feed(bytes(frame))
    assert err.value.reason == "bad_mac"


def _body(fields: object) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


GOOD = [0, 5, "b", "a", 1, 0, 0, [], 0, False, 0, b"", None]


def _with(i: int, value: object) -> bytes:
    fields = list(GOOD)
    fields[i] = value
    return _body(fields)


@pytest.mark.parametrize("body", [
    b"",
    b"\xc1",
    _body({"type": 5}),
    _body([]),
    _body([3, "x"]),
    _body(["0", 5]),
    _body(GOOD + [1]),
    _body(GOOD)[:-1],
    _body(GOOD) + b"\x00",
    _with(1, 99),
    _with(1, True),
    _with(2, b"bytes not str"),
    _with(4, -1),
    _with(4, True),
    _with(4, 1.5),
    _with(7, [[1, 2, b"d"]]),
    _with(7, [[1, 2, "str", 0]]),
    _with(7, [[1, 2, b"d", 7]]),
    _with(7, {"not": "a list"}),
    _with(9, 0),
    _with(11, "str"),
    _with(12, [1, 1, ["a"], [], "not bytes"]),
    _with(12, [1, 1, "ab", [], b""]),
    _with(12, [1, 1, [1], [], b""]),
    _body([1, 7, None]),
    _body([1, "p"]),
    _body([2, "a", None]),
    _body([1, "p", {1: 2}]),
    b"\x92\xa1\xff\x00",  # invalid UTF-8 in a str
    msgpack.packb([1, "p", msgpack.ExtType(5, b"xx")]),
    b"\x91" * 5000 + b"\xc0",  # nested arrays far beyond any sane depth
])
def test_malformed_bodies_raise_frame_error(body: bytes) -> None:
    """Every wrong shape, type, enum value or encoding is a FrameError 'malformed'."""
    with pytest.raises(FrameError) as err:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert err.value.reason == "malformed"
    assert isinstance(err.value, ValueError)


# -- fuzzing ---------------------------------------------------------------------------

def _feed_all(decoder: FrameDecoder, data: bytes) -> None:
    try:
        decoder.feed(data)
    except FrameError:
        pass  # the only acceptable failure; anything else fails the test


@given(st.binary(max_size=2048), st.sampled_from([None, SECRET]))
@example(b"\x00\x00\x00\x01\xc1", None)
def test_random_bytes_only_ever_raise_frame_error(data: bytes, secret: bytes | None) -> None:
    """Arbitrary bytes never crash the decoder."""
    _feed_all(FrameDecoder(max_frame_bytes=4096, secret=secret), data)


@given(frames, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                        max_size=6), st.integers(0, 64), st.sampled_from([None, SECRET]))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_only_ever_raise_frame_error(
        obj: object, flips: list, cut: int, secret: bytes | None) -> None:
    """Valid frames with bytes changed and tails cut decode or fail with FrameError only."""
    frame = bytearray(encode_frame(obj, secret))
    for pos, value in flips:
        frame[pos % len(frame)] = value
    _feed_all(FrameDecoder(max_frame_bytes=1 << 16, secret=secret), bytes(frame[:len(frame) - cut]))


@given(frames)
def test_mutated_bodies_decode_to_valid_objects_or_frame_error(obj: object) -> None:
    """Any body that does decode yields a frame that encodes again (no half-valid objects)."""
    body = bytearray(encode(obj))
    for i in range(len(body)):
        mutated = bytes(body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:])
        try:
            out = decode(mutated)
        except FrameError:
            continue
        # Compared as bytes: a mutated float may decode to NaN, which equals nothing.
        again = encode(out)
        assert encode(decode(again)) == again
