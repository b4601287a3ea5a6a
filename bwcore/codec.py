"""The peer wire format: msgpack bodies in length-prefixed, optionally authenticated frames.

A frame is ``length (4 bytes, big-endian) | body | mac (32 bytes, only with a secret)``;
``length`` counts the body and the MAC. The body is one msgpack array whose first item says
what follows (no field names travel on the wire, see docs/wire.md for the full layout):

- ``[0, type, to, frm, term, log_term, index, entries, commit, reject, reject_hint,
  context, snapshot]`` — a kernel :class:`~bwcore.kernel.Message`;
- ``[1, plugin, payload]`` — a :class:`PluginFrame` that a plugin (the secretary relay, ...)
  sends to its peer instance;
- ``[2, node_id, cluster_name]`` — the :class:`Hello` that opens every connection.

Decoding treats its input as hostile: every failure, whatever its cause, is one
:class:`FrameError`, and no frame longer than ``max_frame_bytes`` is ever buffered.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Union

import msgpack

from bwcore.kernel import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "KIND_HELLO", "KIND_MESSAGE", "KIND_PLUGIN", "MAC_BYTES",
    "Frame", "FrameDecoder", "FrameError", "Hello", "PluginFrame", "decode", "encode",
    "encode_frame",
]

KIND_MESSAGE = 0
KIND_PLUGIN = 1
KIND_HELLO = 2

#: Length of the HMAC-SHA256 tag appended to an authenticated frame's body.
MAC_BYTES = 32
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
_MAX_LENGTH_FIELD = 2**32 - 1

_MESSAGE_TYPES = {int(t): t for t in MessageType}
_ENTRY_TYPES = {int(t): t for t in EntryType}


class FrameError(ValueError):
    """A frame that cannot be accepted.

    Attributes:
        reason: A short stable label for metrics and logs: ``oversize``, ``malformed``,
            ``bad_mac`` or ``missing_mac``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class PluginFrame:
    """A frame a plugin sends to the same plugin on another node.

    ``payload`` is any msgpack value (None, bool, int, float, str, bytes, list, dict with str
    or bytes keys). Arrays come back as lists, so a payload built from tuples compares equal
    only after conversion to lists.
    """

    plugin: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame on every connection: who is dialling, and for which cluster."""

    node_id: str
    cluster_name: str


Frame = Union[Message, PluginFrame, Hello]


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------

def _message_fields(m: Message) -> list[Any]:
    snap = m.snapshot
    if snap is None:
        snap_fields = None
    else:
        meta = snap.meta
        # Sorted so that equal configurations always encode to equal bytes.
        snap_fields = [meta.index, meta.term, sorted(meta.conf.voters),
                       sorted(meta.conf.learners), snap.data]
    return [
        KIND_MESSAGE, int(m.type), m.to, m.frm, m.term, m.log_term, m.index,
        [[e.term, e.index, e.data, int(e.type)] for e in m.entries],
        m.commit, m.reject, m.reject_hint, m.context, snap_fields,
    ]


_PAYLOAD_DEPTH = 64


def _check_payload(value: Any, depth: int = 0) -> None:
    # Refuse at the sender what every receiver would reject (see decode()), so that a
    # plugin's mistake is a TypeError in the plugin, not a closed connection later.
    if depth > _PAYLOAD_DEPTH:
        raise TypeError(f"plugin payload nested deeper than {_PAYLOAD_DEPTH}")
    if value is None or type(value) in (bool, int, float, str, bytes):
        return
    if type(value) in (list, tuple):
        for item in value:
            _check_payload(item, depth + 1)
    elif type(value) is dict:
        for key, item in value.items():
            if type(key) not in (str, bytes):
                raise TypeError(f"plugin payload map keys must be str or bytes, not {key!r}")
            _check_payload(item, depth + 1)
    else:
        raise TypeError(f"plugin payload cannot hold {type(value).__name__}")


def encode(obj: Frame) -> bytes:
    """Encode a frame body (no length prefix, no MAC).

    Raises:
        TypeError: ``obj`` is not a Message, PluginFrame or Hello, or a plugin payload holds
            something other than None, bool, int, float, str, bytes, list, tuple, or dict
            with str or bytes keys (nested at most 64 deep).
        ValueError: an integer outside msgpack's range (-2**63 .. 2**64 - 1).
    """
    if isinstance(obj, Message):
        fields = _message_fields(obj)
    elif isinstance(obj, PluginFrame):
        _check_payload(obj.payload)
        fields = [KIND_PLUGIN, obj.plugin, obj.payload]
    elif isinstance(obj, Hello):
        fields = [KIND_HELLO, obj.node_id, obj.cluster_name]
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as a frame")
    try:
        return msgpack.packb(fields, use_bin_type=True)
    except OverflowError as exc:
        raise ValueError(f"integer out of msgpack range: {exc}") from None


def encode_frame(obj: Frame, secret: bytes | None = None) -> bytes:
    """Encode a complete frame: length prefix, body and, with a ``secret``, the HMAC."""
    body = encode(obj)
    if secret is None:
        return _HEADER.pack(len(body)) + body
    mac = hmac.digest(secret, body, hashlib.sha256)
    return _HEADER.pack(len(body) + MAC_BYTES) + body + mac


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------

def _bad(detail: str) -> FrameError:
    return FrameError("malformed", detail)


def _uint(value: Any, name: str) -> int:
    # ``type(...) is int`` on purpose: msgpack booleans decode to bool, a subclass of int.
    if type(value) is not int or value < 0:
        raise _bad(f"{name} must be a non-negative integer")
    return value


def _str(value: Any, name: str) -> str:
    if type(value) is not str:
        raise _bad(f"{name} must be a string")
    return value


def _bytes(value: Any, name: str) -> bytes:
    if type(value) is not bytes:
        raise _bad(f"{name} must be bytes")
    return value


def _array(value: Any, length: int, name: str) -> list[Any]:
    if type(value) is not list or len(value) != length:
        raise _bad(f"{name} must be an array of {length}")
    return value


def _ids(value: Any, name: str) -> frozenset[str]:
    if type(value) is not list:
        raise _bad(f"{name} must be an array")
    return frozenset(_str(v, name) for v in value)


def _entries(value: Any) -> tuple[Entry, ...]:
    # One flat loop, no helper calls: a follower decodes every replicated entry here.
    if type(value) is not list:
        raise _bad("entries must be an array")
    entries = []
    for item in value:
        if type(item) is not list or len(item) != 4:
            raise _bad("an entry must be an array of 4")
        term, index, data, etype = item
        if type(term) is not int or type(index) is not int or term < 0 or index < 0:
            raise _bad("entry term and index must be non-negative integers")
        if type(data) is not bytes:
            raise _bad("entry data must be bytes")
        kind = _ENTRY_TYPES.get(etype) if type(etype) is int else None
        if kind is None:
            raise _bad(f"unknown entry type {etype!r}")
        entries.append(Entry(term, index, data, kind))
    return tuple(entries)


def _snapshot(value: Any) -> Snapshot | None:
    if value is None:
        return None
    index, term, voters, learners, data = _array(value, 5, "snapshot")
    conf = ConfState(_ids(voters, "voters"), _ids(learners, "learners"))
    meta = SnapshotMeta(_uint(index, "snapshot index"), _uint(term, "snapshot term"), conf)
    return Snapshot(meta, _bytes(data, "snapshot data"))


def _message(f: list[Any]) -> Message:
    if len(f) != 13:
        raise _bad("a message must be an array of 13")
    mtype = _MESSAGE_TYPES.get(f[1]) if type(f[1]) is int else None
    if mtype is None:
        raise _bad(f"unknown message type {f[1]!r}")
    if type(f[9]) is not bool:
        raise _bad("reject must be a boolean")
    return Message(
        type=mtype, to=_str(f[2], "to"), frm=_str(f[3], "frm"), term=_uint(f[4], "term"),
        log_term=_uint(f[5], "log_term"), index=_uint(f[6], "index"),
        entries=_entries(f[7]), commit=_uint(f[8], "commit"),
        reject=f[9], reject_hint=_uint(f[10], "reject_hint"), context=_bytes(f[11], "context"),
        snapshot=_snapshot(f[12]),
    )


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode(body: bytes) -> Frame:
    """Decode a frame body produced by :func:`encode`.

    Raises:
        FrameError: for anything that is not a well-formed body, and nothing else.
    """
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True,
                                 ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises many types for bad input; all mean one thing
        raise _bad(f"not a msgpack value ({type(exc).__name__}: {exc})") from None
    if type(fields) is not list or not fields:
        raise _bad("a body must be a non-empty array")
    kind = fields[0] if type(fields[0]) is int else None
    if kind == KIND_MESSAGE:
        return _message(fields)
    if kind == KIND_PLUGIN:
        _, plugin, payload = _array(fields, 3, "a plugin frame")
        return PluginFrame(_str(plugin, "plugin"), payload)
    if kind == KIND_HELLO:
        _, node_id, cluster = _array(fields, 3, "a hello")
        return Hello(_str(node_id, "node_id"), _str(cluster, "cluster_name"))
    raise _bad(f"unknown frame kind {fields[0]!r}")


class FrameDecoder:
    """Incremental frame decoder for one connection.

    Feed it bytes as they arrive and iterate over it for complete frames. After the first
    :class:`FrameError` the stream cannot be resynchronised: the decoder stays failed and
    raises the same error again, so the connection must be closed.

    Args:
        max_frame_bytes: Largest accepted value of a frame's length field (body plus MAC).
            A larger length is rejected as soon as its 4-byte header arrives, before any of
            its body is buffered.
        secret: The cluster secret; when given every frame must end with a valid
            HMAC-SHA256 of its body.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 secret: bytes | None = None) -> None:
        if not 1 <= max_frame_bytes <= _MAX_LENGTH_FIELD:
            raise ValueError("max_frame_bytes must be between 1 and 2**32 - 1")
        self._max = max_frame_bytes
        self._secret = secret
        self._buf = bytearray()
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (at most one partial frame plus one read)."""
        return len(self._buf)

    def push(self, data: bytes) -> None:
        """Append received bytes; decode them by iterating over the decoder."""
        if self._failed is None:
            self._buf += data

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame

    def feed(self, data: bytes) -> list[Frame]:
        """Append ``data`` and return every frame it completes.

        Raises:
            FrameError: at the first bad frame (frames before it in ``data`` are lost; use
                :meth:`push` and iteration to receive them first).
        """
        self.push(data)
        return list(self)

    def next_frame(self) -> Frame | None:
        """Decode and return the next complete frame, or None until more bytes arrive.

        Raises:
            FrameError: the next frame is oversized, unauthenticated or malformed.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._next_frame()
        except FrameError as exc:
            self._failed = exc
            self._buf = bytearray()
            raise

    def _next_frame(self) -> Frame | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _HEADER.unpack_from(buf)
        if length > self._max:
            raise FrameError("oversize", f"frame of {length} bytes exceeds {self._max}")
        end = 4 + length
        if len(buf) < end:
            return None
        frame = bytes(buf[4:end])
        del buf[:end]  # bytearray trims its head in O(1) amortised time
        if self._secret is not None:
            if length < MAC_BYTES:
                raise FrameError("missing_mac", "frame too short to hold a MAC")
            body, mac = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
            expected = hmac.digest(self._secret, body, hashlib.sha256)
            if not hmac.compare_digest(mac, expected):
                raise FrameError("bad_mac", "frame MAC does not match the cluster secret")
            frame = body
        return decode(frame)
