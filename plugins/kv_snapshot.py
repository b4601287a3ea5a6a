"""The KV state machine's snapshot image, encoded and decoded in small pieces.

The image is one msgpack map (format 1)::

    {"format": 1, "applied_index": int, "data": {key: value, ...},
     "requests": [[request_id, result], ...]}

One ``msgpack.packb`` or ``msgpack.unpackb`` of a 1,000,000-key image is a single C call that
holds the GIL for 0.1-2 s: run on a worker thread it would still stop the reactor thread for
that long. So the encoder packs ``data`` and ``requests`` ``chunk_items`` items at a time and
the decoder reads one key or value per call; between two pieces the interpreter may hand the
GIL to the reactor. Each piece packed by the encoder is a map (or array) with its msgpack
header cut off, so the concatenation is byte for byte what one ``packb`` of the whole image
gives: images stay comparable across replicas and versions.

On a worker thread both are given ``pause`` = :func:`yield_gil`, called between pieces: it
releases the GIL, so a reactor thread waiting for it runs at once instead of after the
interpreter's 5 ms switch interval. Measured with 64 writers on a 1,000,000-key node
(contrib/bench/snapshot_bench.py), this raised the writes completed during a snapshot from
25-39% to about 48% of the rate outside one, for a serialization about 1.5 times as long.

Both functions read only their arguments, never a live state machine, so they are safe on any
thread as long as nobody mutates those arguments meanwhile (see ``KVStateMachine``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

import msgpack

__all__ = ["FORMAT", "CHUNK_ITEMS", "decode_image", "encode_image", "yield_gil"]

#: The image layout version written and read here.
FORMAT = 1
#: Keys (or request ids) packed per msgpack call (about 1 ms of GIL each), and decoded between
#: two pauses.
CHUNK_ITEMS = 4096


def yield_gil() -> None:
    """Let any thread waiting for the GIL (the reactor) take it now."""
    time.sleep(0)  # releases the GIL for a moment; not a wait for anything


def encode_image(applied_index: int, data: Mapping[str, str],
                 requests: Sequence[tuple[str, dict] | list[Any]], *,
                 chunk_items: int = CHUNK_ITEMS,
                 pause: Callable[[], None] | None = None) -> bytes:
    """Encode a KV image, packing ``chunk_items`` entries per msgpack call.

    Args:
        applied_index: The index the image is taken at.
        data: The keys and values; must not change while this runs.
        requests: ``(request_id, result)`` pairs, oldest first; must not change either.
        chunk_items: Entries per msgpack call (tests vary it to cross header sizes).
        pause: Called after each piece (:func:`yield_gil` on a worker thread).

    Returns:
        Exactly ``msgpack.packb({"format": 1, "applied_index": ..., "data": dict(data),
        "requests": [list(pair) for pair in requests]})``.
    """
    pack = msgpack.packb
    packer = msgpack.Packer()  # one per call: a Packer is not safe to share across threads
    parts = [packer.pack_map_header(4), pack("format"), pack(FORMAT),
             pack("applied_index"), pack(applied_index),
             pack("data"), packer.pack_map_header(len(data))]
    items = iter(data.items())
    while True:
        chunk = dict(islice(items, chunk_items))
        if not chunk:
            break
        parts.append(_body(pack(chunk), len(chunk)))
        if pause is not None:
            pause()
    parts += [pack("requests"), packer.pack_array_header(len(requests))]
    for start in range(0, len(requests), chunk_items):
        piece = list(requests[start:start + chunk_items])
        parts.append(_body(pack(piece), len(piece)))
        if pause is not None:
            pause()
    # bytes.join copies without holding the GIL once the result passes 1 MiB.
    return b"".join(parts)


def _body(packed: bytes, count: int) -> bytes:
    """``packed`` (a map or array of ``count`` items) without its msgpack header.

    Map and array headers have the same sizes: 1 byte up to 15 items (fixmap/fixarray),
    3 bytes up to 65,535 (map16/array16), 5 bytes beyond (map32/array32).
    """
    header = 1 if count <= 15 else 3 if count <= 0xFFFF else 5
    return packed[header:]


class _Invalid(ValueError):
    """The image decodes as msgpack but is not a KV image."""


def decode_image(image: bytes, *, pause: Callable[[], None] | None = None
                 ) -> tuple[int, dict[str, str], list[tuple[str, dict]]]:
    """Decode and check a KV image, one key or value per msgpack call.

    Args:
        image: An image from :func:`encode_image` (or any ``packb`` of the same map).
        pause: Called every :data:`CHUNK_ITEMS` entries (:func:`yield_gil` on a worker).

    Returns:
        ``(applied_index, data, requests)``, requests as ``(request_id, result)`` pairs,
        oldest first.

    Raises:
        ValueError: ``image`` is not a valid KV image (the message starts with
            ``invalid KV snapshot``). Arbitrary bytes never raise anything else.
    """
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ValueError(f"invalid KV snapshot: data must be bytes, got {type(image).__name__}")
    try:
        return _decode(image, pause)
    except _Invalid as exc:
        raise ValueError(f"invalid KV snapshot: {exc}") from None
    # msgpack signals malformed input through several unrelated exception types (OutOfData,
    # FormatError, StackError, BufferFull, ValueError, TypeError, UnicodeDecodeError): the
    # input is arbitrary bytes, so every failure here means "not an image".
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"invalid KV snapshot: malformed msgpack: {type(exc).__name__}:"
                         f" {exc}") from None


def _decode(image: bytes | bytearray | memoryview, pause: Callable[[], None] | None
            ) -> tuple[int, dict[str, str], list[tuple[str, dict]]]:
    size = len(image)
    read_size = 1 << 20
    unpacker = msgpack.Unpacker(io.BytesIO(image), raw=False, strict_map_key=True,
                                use_list=True, read_size=read_size,
                                max_buffer_size=max(size, read_size))
    fields: dict[str, Any] = {}
    for _ in range(unpacker.read_map_header()):
        name = unpacker.unpack()
        if name == "data":
            fields[name] = _read_data(unpacker, pause)
        elif name == "requests":
            fields[name] = _read_requests(unpacker, pause)
        else:
            fields[name] = unpacker.unpack()
    if unpacker.tell() != size:
        raise _Invalid(f"{size - unpacker.tell()} bytes after the image")
    if fields.get("format") != FORMAT:
        raise _Invalid(f"not a format-{FORMAT} snapshot map")
    applied_index = fields.get("applied_index")
    if type(applied_index) is not int or applied_index < 0:
        raise _Invalid("applied_index must be an int >= 0")
    if "data" not in fields:
        raise _Invalid("data must map strings to strings")
    if "requests" not in fields:
        raise _Invalid("requests must be [request_id, result] pairs")
    return applied_index, fields["data"], fields["requests"]


def _read_data(unpacker: msgpack.Unpacker, pause: Callable[[], None] | None
               ) -> dict[str, str]:
    try:
        count = unpacker.read_map_header()
    except ValueError:
        raise _Invalid("data must map strings to strings") from None
    data: dict[str, str] = {}
    unpack = unpacker.unpack
    for done in range(1, count + 1):
        key = unpack()
        value = unpack()
        if type(key) is not str or type(value) is not str:
            raise _Invalid("data must map strings to strings")
        data[key] = value
        if pause is not None and done % CHUNK_ITEMS == 0:
            pause()
    return data


def _read_requests(unpacker: msgpack.Unpacker, pause: Callable[[], None] | None
                   ) -> list[tuple[str, dict]]:
    try:
        count = unpacker.read_array_header()
    except ValueError:
        raise _Invalid("requests must be [request_id, result] pairs") from None
    pairs: list[tuple[str, dict]] = []
    for done in range(1, count + 1):
        pair = unpacker.unpack()
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], dict)):
            raise _Invalid("requests must be [request_id, result] pairs")
        pairs.append((pair[0], pair[1]))
        if pause is not None and done % CHUNK_ITEMS == 0:
            pause()
    return pairs
