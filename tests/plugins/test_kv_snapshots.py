"""KV snapshots taken while writes go on: copy-on-write, the image format, restore in two steps.

The reference for every check is a second state machine that applies the same commands with
no snapshot in flight: a snapshot begun at index i must serialize exactly what that reference
serializes at i, and the state (and its image) after the snapshot must be exactly the
reference's, whatever was written while the serializer ran.
"""

from __future__ import annotations

import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bwcore.hookspecs import SnapshotsOffReactor
from bwraft_plugins import kv, kv_snapshot
from bwraft_plugins.kv import KVStateMachine, encode_command
from bwraft_plugins.kv_snapshot import decode_image, encode_image


def put(key: str, value: str, request_id: str | None = None) -> bytes:
    return encode_command("put", key, value=value, request_id=request_id)


def apply_all(sm: KVStateMachine, commands: list[bytes]) -> list[dict]:
    return [sm.apply(sm.applied_index + 1, command) for command in commands]


@st.composite
def commands(draw) -> bytes:
    """Commands over a few keys, so that puts, deletes and re-puts of one key interleave."""
    op = draw(st.sampled_from(["put", "put", "delete", "cas"]))
    key = draw(st.sampled_from(["a", "b", "c", "d", "e"]))
    request_id = draw(st.one_of(st.none(), st.sampled_from(["r1", "r2", "r3", "r4", "r5"])))
    value = draw(st.sampled_from(["1", "2", "3"]))
    if op == "put":
        return encode_command(op, key, value=value, request_id=request_id)
    if op == "delete":
        return encode_command(op, key, request_id=request_id)
    absent = draw(st.booleans())
    return encode_command(op, key, value=draw(st.none() | st.just(value)),
                          expect=None if absent else draw(st.sampled_from(["1", "2"])),
                          expect_absent=absent, request_id=request_id)


# --- copy-on-write ---------------------------------------------------------------------------


@given(st.lists(commands(), max_size=40), st.data())
@settings(max_examples=300, deadline=None)
def test_a_snapshot_is_the_state_at_its_begin_whatever_is_written_meanwhile(log, data):
    """The image is the state at snapshot_begin; results, state and later images match a
    replica that never snapshotted, byte for byte (a re-put key goes last, as in a dict)."""
    begin = data.draw(st.integers(0, len(log)), label="begin")
    serialize_after = data.draw(st.integers(begin, len(log)), label="serialize_after")
    sm, reference = KVStateMachine(dedup_window=3), KVStateMachine(dedup_window=3)
    assert apply_all(sm, log[:begin]) == apply_all(reference, log[:begin])
    expected_image = reference.snapshot()
    serialize = sm.snapshot_begin()
    assert apply_all(sm, log[begin:serialize_after]) == \
        apply_all(reference, log[begin:serialize_after])
    assert serialize() == expected_image
    assert apply_all(sm, log[serialize_after:]) == apply_all(reference, log[serialize_after:])
    for key in "abcde":
        assert sm.get(key) == reference.get(key)
    assert len(sm) == len(reference)
    assert sm.snapshot() == reference.snapshot()


def test_reads_during_a_snapshot_see_the_writes_made_meanwhile() -> None:
    """While the serializer has not run, get and len answer from the overlaid state."""
    sm = KVStateMachine()
    apply_all(sm, [put("a", "1"), put("b", "1")])
    serialize = sm.snapshot_begin()
    apply_all(sm, [put("a", "2"), encode_command("delete", "b"), put("c", "1")])
    assert (sm.get("a"), sm.get("b"), sm.get("c"), len(sm)) == ("2", None, "1", 2)
    image = msgpack.unpackb(serialize())
    assert image["data"] == {"a": "1", "b": "1"} and image["applied_index"] == 2
    assert (sm.get("a"), sm.get("b"), sm.get("c"), len(sm)) == ("2", None, "1", 2)


def test_a_serializer_that_never_runs_costs_correctness_nothing() -> None:
    """A snapshot begun and abandoned leaves the state machine right; the next one is too."""
    sm, reference = KVStateMachine(), KVStateMachine()
    first = [put(f"k{i}", "v") for i in range(10)]
    apply_all(sm, first), apply_all(reference, first)
    sm.snapshot_begin()  # never serialized
    more = [put("k1", "w"), encode_command("delete", "k2"), put("new", "x")]
    apply_all(sm, more), apply_all(reference, more)
    second = sm.snapshot_begin()  # overlaps the abandoned one: gets a frozen dict of its own
    apply_all(sm, [put("late", "1")]), apply_all(reference, [put("late", "1")])
    expected = KVStateMachine()
    apply_all(expected, first + more)
    assert second() == expected.snapshot()
    assert sm.snapshot() == reference.snapshot()


def test_the_serializer_on_another_thread_while_writes_go_on() -> None:
    """A serializer on a worker thread, with the main thread applying meanwhile, produces the
    image of the state at begin."""
    sm, reference = KVStateMachine(dedup_window=500), KVStateMachine(dedup_window=500)
    base = [put(f"key{i}", f"value{i}", request_id=f"r{i}") for i in range(20_000)]
    apply_all(sm, base), apply_all(reference, base)
    expected = reference.snapshot()
    serialize = sm.snapshot_begin()
    images: list[bytes] = []
    worker = threading.Thread(target=lambda: images.append(serialize()))
    worker.start()
    during = [put(f"key{i % 30_000}", "changed", request_id=f"s{i}") for i in range(5_000)]
    during += [encode_command("delete", f"key{i}") for i in range(0, 20_000, 7)]
    assert apply_all(sm, during) == apply_all(reference, during)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert images == [expected]
    assert sm.snapshot() == reference.snapshot()


def test_forgotten_request_ids_are_dropped_without_disturbing_a_snapshot_in_flight() -> None:
    """The exactly-once list is replaced, not cut, when its forgotten prefix goes: a serializer
    holding the old list still writes the table as it was at begin."""
    sm, reference = KVStateMachine(dedup_window=3), KVStateMachine(dedup_window=3)
    first = [put("k", str(i), request_id=f"a{i}") for i in range(10)]
    apply_all(sm, first), apply_all(reference, first)
    expected = reference.snapshot()
    serialize = sm.snapshot_begin()
    many = [put("k", str(i), request_id=f"b{i}") for i in range(3000)]  # drops the prefix
    apply_all(sm, many), apply_all(reference, many)
    assert serialize() == expected
    assert msgpack.unpackb(expected)["requests"] == [[f"a{i}", {"index": i + 1}]
                                                     for i in (7, 8, 9)]
    assert apply_all(sm, [many[-1], first[0]]) == apply_all(reference, [many[-1], first[0]])
    assert sm.snapshot() == reference.snapshot()


# --- restore in two steps -------------------------------------------------------------------


def test_restore_prepare_changes_nothing_until_the_install_step() -> None:
    """Decoding leaves the state alone; the returned step swaps the decoded state in."""
    source = KVStateMachine()
    apply_all(source, [put("a", "1", request_id="r"), put("b", "2")])
    target = KVStateMachine()
    apply_all(target, [put("x", "9")])
    install = target.restore_prepare(source.snapshot())
    assert (target.get("x"), target.get("a"), target.applied_index) == ("9", None, 1)
    install()
    assert (target.get("x"), target.get("a"), target.applied_index) == (None, "1", 2)
    assert apply_all(target, [put("a", "other", request_id="r")]) == [{"index": 1}]
    assert target.get("a") == "1"  # the restored exactly-once table answered the retry


def test_restore_while_a_snapshot_is_in_flight() -> None:
    """An install during serialization replaces the state; the serializer still writes the
    image it froze, and the restored state is not disturbed when it finishes."""
    sm = KVStateMachine()
    apply_all(sm, [put("old", "1")])
    frozen = sm.snapshot()
    serialize = sm.snapshot_begin()
    source = KVStateMachine()
    apply_all(source, [put("new", "2"), put("more", "3")])
    sm.restore(source.snapshot())
    assert serialize() == frozen
    assert (sm.get("old"), sm.get("new"), len(sm)) == (None, "2", 2)
    assert sm.snapshot() == source.snapshot()


def test_a_request_id_twice_in_an_image_is_refused() -> None:
    """A table naming one request id twice cannot come from a correct replica."""
    image = msgpack.packb({"format": 1, "applied_index": 3, "data": {},
                           "requests": [["r", {"index": 1}], ["r", {"index": 2}]]})
    with pytest.raises(ValueError, match="appears twice"):
        KVStateMachine().restore_prepare(image)


def test_the_kv_state_machine_offers_snapshots_off_the_reactor() -> None:
    """KVStateMachine implements the optional protocol the node looks for."""
    assert isinstance(KVStateMachine(), SnapshotsOffReactor)


# --- the image ---------------------------------------------------------------------------------


# Pieces of 1 and 15 items against a whole of 65,536 would only repeat the small cases, slower.
IMAGE_SHAPES = [(keys, chunk) for keys in (0, 1, 15, 16, 17, 4096, 4097, 65_535, 65_536, 70_000)
                for chunk in (1, 15, 16, 4096, 65_536) if keys <= 20_000 or chunk >= 16]


@pytest.mark.parametrize("keys, chunk_items", IMAGE_SHAPES)
def test_the_chunked_image_is_byte_for_byte_one_packb(keys: int, chunk_items: int) -> None:
    """Pieces with their headers cut off add up to one packb of the whole image, whichever
    header sizes (fix, 16- and 32-bit) the whole and the pieces need."""
    data = {f"k{i}": f"v{i % 7}" for i in range(keys)}
    requests = [(f"r{i}", {"index": i}) for i in range(min(keys, 40))]
    whole = msgpack.packb({"format": 1, "applied_index": 12, "data": data,
                           "requests": [list(pair) for pair in requests]})
    assert encode_image(12, data, requests, chunk_items=chunk_items) == whole
    assert decode_image(whole) == (12, data, requests)


def test_encoding_packs_no_more_than_a_chunk_per_msgpack_call(monkeypatch) -> None:
    """No single msgpack call covers more than chunk_items keys: the GIL is never held for
    the whole image."""
    sizes: list[int] = []
    real = kv_snapshot.msgpack.packb

    def recording(value, *args, **kwargs):
        sizes.append(len(value) if isinstance(value, (dict, list)) else 1)
        return real(value, *args, **kwargs)

    monkeypatch.setattr(kv_snapshot.msgpack, "packb", recording)
    data = {f"k{i}": "v" for i in range(10_000)}
    encode_image(1, data, [(f"r{i}", {"index": i}) for i in range(5_000)], chunk_items=1000)
    assert max(sizes) == 1000 and sum(sizes) >= 15_000


def test_work_on_a_worker_thread_hands_the_gil_over_between_pieces(monkeypatch) -> None:
    """The serializer from snapshot_begin and restore_prepare pause every CHUNK_ITEMS
    entries; snapshot() and restore(), which run on the caller's thread, never do."""
    pauses: list[int] = []
    monkeypatch.setattr(kv, "yield_gil", lambda: pauses.append(1))
    sm = KVStateMachine()
    apply_all(sm, [put(f"k{i}", "v") for i in range(3 * kv_snapshot.CHUNK_ITEMS + 5)])
    image = sm.snapshot()
    sm.restore(image)
    assert pauses == []
    assert sm.snapshot_begin()() == image
    assert len(pauses) == 4  # three full pieces and the rest
    sm.restore_prepare(image)()
    assert len(pauses) == 4 + 3
    assert sm.snapshot() == image


@pytest.mark.parametrize("image", [
    b"", b"\xc1", b"\x80", msgpack.packb([1, 2]),
    msgpack.packb({"format": 1, "applied_index": 0, "data": {}, "requests": []}) + b"\x00",
    msgpack.packb({"format": 1, "applied_index": 0, "data": {"k": 1}, "requests": []}),
    msgpack.packb({"format": 1, "applied_index": 0, "data": {1: "v"}, "requests": []}),
    msgpack.packb({"format": 1, "applied_index": 0, "data": [], "requests": []}),
    msgpack.packb({"format": 1, "applied_index": 0, "data": {}, "requests": {}}),
    msgpack.packb({"format": 1, "applied_index": 0, "data": {}, "requests": [["r", 1]]}),
    msgpack.packb({"format": 1, "applied_index": True, "data": {}, "requests": []}),
    msgpack.packb({"format": 3, "applied_index": 0, "data": {}, "requests": []}),
    msgpack.packb({"format": 1, "applied_index": 0, "requests": []}),
    msgpack.packb({"format": 1, "applied_index": 0, "data": {"a": "b", "c": "d"},
                   "requests": []})[:-3],
])
def test_decoding_refuses_what_is_not_an_image(image: bytes) -> None:
    """Truncated, trailing, mistyped or incomplete images raise ValueError, nothing else."""
    with pytest.raises(ValueError, match="^invalid KV snapshot"):
        decode_image(image)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decoding_arbitrary_bytes_raises_only_value_error(image: bytes) -> None:
    """Whatever the bytes, decoding returns an image or raises ValueError."""
    try:
        decode_image(image)
    except ValueError as exc:
        assert str(exc).startswith("invalid KV snapshot")
