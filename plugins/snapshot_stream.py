"""InstallSnapshot in chunks over plugin frames (Raft §7, "sent in chunks").

The kernel hands the driver a SNAPSHOT message carrying the whole state-machine image. Sent as
one frame, an image larger than ``limits.max_frame_bytes`` could never arrive, and a smaller
but large one would sit in a peer's send queue as one block. So the leader's compaction plugin
takes SNAPSHOT messages out of each outgoing batch (``bwraft_route_messages``) and a
:class:`SnapshotSender` streams each one as plugin frames:

``begin`` (stream id, the leader's term, snapshot index, term and configuration, total size),
then ``chunk`` frames (offset, bytes, CRC-32 of the bytes), then ``end`` (CRC-32 of the whole).

The receiver (:class:`SnapshotReceiver`) checks every frame, acknowledges each chunk with the
offset it holds, and only once the whole image is there and its checksum matches does it step
the kernel message (``SNAPSHOT`` from the leader, with the image) into its node, which then
persists and installs it like any snapshot. At most ``window`` chunks are unacknowledged at a
time, so a stream never floods the peer's bounded send queue. Any failure — a missing or
corrupt chunk, a frame out of order, a peer that stops acknowledging for ``stall_seconds`` —
ends the stream; the leader calls ``node.report_snapshot_failed(peer)`` and the kernel sends
the snapshot again later. A receiver that crashes mid-stream loses only the partial image,
which is held in memory, never on disk: nothing is installed before it is complete.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from bwcore.kernel import ConfState, Message, MessageType, Snapshot, SnapshotMeta

__all__ = ["SnapshotReceiver", "SnapshotSender", "StreamCounters"]

#: Plugin frames of the stream are addressed to this plugin name.
PLUGIN = "compaction"
_MAX_MEMBERS = 4096
_MAX_ID_CHARS = 64
_MAX_STREAM_ID_CHARS = 64


@dataclass
class StreamCounters:
    """What the streams did, for metrics and tests."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    received: int = 0
    rejected: int = 0
    bytes_received: int = 0


@dataclass
class _OutStream:
    peer: str
    stream_id: str
    index: int
    data: memoryview
    term: int
    sent: int = 0          # bytes handed to the transport
    acked: int = 0         # bytes the receiver holds
    crc: int = 0           # CRC-32 of data[:sent]
    ended: bool = False
    timer: Any = None


@dataclass
class _InStream:
    peer: str
    stream_id: str
    term: int
    meta: SnapshotMeta
    size: int
    buf: bytearray = field(default_factory=bytearray)
    crc: int = 0
    timer: Any = None


class SnapshotSender:
    """The leader's side: one stream per peer that needs a snapshot.

    Args:
        node: The node (``node_id``, ``reactor``, ``send_plugin_frame``,
            ``report_snapshot_failed``, ``log``).
        chunk_bytes: Image bytes per chunk frame.
        window: Chunks that may be unacknowledged at once.
        stall_seconds: A stream whose peer acknowledges nothing for this long has failed.
        counters: Where to count.
    """

    def __init__(self, node: Any, *, chunk_bytes: int, window: int, stall_seconds: float,
                 counters: StreamCounters) -> None:
        self.node = node
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.stall_seconds = stall_seconds
        self.counters = counters
        self.streams: dict[str, _OutStream] = {}
        self._seq = 0

    def take_over(self, messages: list[Message]) -> None:
        """Remove the SNAPSHOT messages from ``messages`` (in place) and stream them."""
        snapshots = [m for m in messages if m.type is MessageType.SNAPSHOT
                     and m.snapshot is not None]
        if not snapshots:
            return
        messages[:] = [m for m in messages if not any(m is s for s in snapshots)]
        for m in snapshots:
            self.start(m)

    def start(self, m: Message) -> None:
        """Stream the snapshot of the kernel message ``m`` to ``m.to``."""
        assert m.snapshot is not None
        current = self.streams.get(m.to)
        if current is not None and current.index == m.snapshot.meta.index \
                and current.term == m.term:
            return  # the same image is already on its way
        if current is not None:
            self._close(current)
        self._seq += 1
        meta = m.snapshot.meta
        stream = _OutStream(m.to, f"{m.term}.{self._seq}", meta.index,
                            memoryview(m.snapshot.data), m.term)
        self.streams[m.to] = stream
        self.counters.started += 1
        self.node.log.info("snapshot_stream_started", peer=m.to, stream=stream.stream_id,
                           index=meta.index, bytes=len(stream.data))
        begin = {"k": "begin", "id": stream.stream_id, "term": m.term, "index": meta.index,
                 "sterm": meta.term, "voters": sorted(meta.conf.voters),
                 "learners": sorted(meta.conf.learners), "size": len(stream.data)}
        if not self._send(stream, begin):
            return
        self._arm(stream)
        self._pump(stream)

    def on_frame(self, peer: str, payload: dict[str, Any]) -> None:
        """An ``ack``, ``done`` or ``nack`` from the receiver ``peer``."""
        stream = self.streams.get(peer)
        if stream is None or payload.get("id") != stream.stream_id:
            return  # about a stream we already ended
        kind = payload.get("k")
        if kind == "nack":
            why = payload.get("why")
            self._fail(stream, f"refused by the receiver: {why if isinstance(why, str) else '?'}")
        elif kind == "done":
            self._close(stream)
            self.counters.completed += 1
            self.node.log.info("snapshot_stream_done", peer=peer, stream=stream.stream_id,
                               index=stream.index, bytes=len(stream.data))
        elif kind == "ack":
            offset = payload.get("off")
            if type(offset) is not int or not stream.acked <= offset <= stream.sent:
                self._fail(stream, f"acknowledged offset {offset!r} out of range")
                return
            stream.acked = offset
            self._arm(stream)
            self._pump(stream)

    def abort_all(self) -> None:
        """Stop every stream (leadership lost: the new leader sends its own snapshots)."""
        for stream in list(self.streams.values()):
            self._close(stream)

    def _pump(self, stream: _OutStream) -> None:
        size = len(stream.data)
        while stream.sent < size and stream.sent - stream.acked < self.window * self.chunk_bytes:
            piece = bytes(stream.data[stream.sent:stream.sent + self.chunk_bytes])
            frame = {"k": "chunk", "id": stream.stream_id, "off": stream.sent, "data": piece,
                     "crc": zlib.crc32(piece)}
            if not self._send(stream, frame):
                return
            stream.crc = zlib.crc32(piece, stream.crc)
            stream.sent += len(piece)
            self.counters.chunks_sent += 1
            self.counters.bytes_sent += len(piece)
        if stream.sent == size and not stream.ended:
            stream.ended = True
            self._send(stream, {"k": "end", "id": stream.stream_id, "crc": stream.crc})

    def _send(self, stream: _OutStream, payload: dict[str, Any]) -> bool:
        if self.node.send_plugin_frame(stream.peer, PLUGIN, payload):
            return True
        self._fail(stream, "peer unreachable")
        return False

    def _arm(self, stream: _OutStream) -> None:
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()
        stream.timer = self.node.reactor.callLater(
            self.stall_seconds, self._fail, stream, f"no acknowledgement for"
                                                    f" {self.stall_seconds:g}s")

    def _fail(self, stream: _OutStream, reason: str) -> None:
        if self.streams.get(stream.peer) is not stream:
            return
        self._close(stream)
        self.counters.failed += 1
        self.node.log.warning("snapshot_stream_failed", peer=stream.peer,
                              stream=stream.stream_id, reason=reason, sent=stream.sent,
                              acked=stream.acked)
        # The kernel leaves the snapshot state and will send the snapshot again (Raft §7).
        self.node.report_snapshot_failed(stream.peer)

    def _close(self, stream: _OutStream) -> None:
        if self.streams.get(stream.peer) is stream:
            del self.streams[stream.peer]
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()


class SnapshotReceiver:
    """A follower's (or helper's) side: assembles one incoming image at a time.

    Args:
        node: The node (``node_id``, ``reactor``, ``step``, ``send_plugin_frame``, ``log``).
        max_bytes: The largest image accepted; a larger ``begin`` is refused.
        stall_seconds: A partial image that receives nothing for this long is dropped.
        counters: Where to count.
        on_complete: Called with the assembled kernel message instead of ``node.step``
            (tests); None steps it into the node.
    """

    def __init__(self, node: Any, *, max_bytes: int, stall_seconds: float,
                 counters: StreamCounters,
                 on_complete: Callable[[Message], None] | None = None) -> None:
        self.node = node
        self.max_bytes = max_bytes
        self.stall_seconds = stall_seconds
        self.counters = counters
        self.on_complete = on_complete
        self.current: _InStream | None = None

    def on_frame(self, peer: str, payload: dict[str, Any]) -> None:
        """A ``begin``, ``chunk`` or ``end`` frame from ``peer``; never raises for bad input."""
        kind = payload.get("k")
        stream_id = payload.get("id")
        if not isinstance(stream_id, str) or not 0 < len(stream_id) <= _MAX_STREAM_ID_CHARS:
            self.counters.rejected += 1
            return
        if kind == "begin":
            self._begin(peer, stream_id, payload)
            return
        stream = self.current
        if stream is None or stream.peer != peer or stream.stream_id != stream_id:
            # A stream we dropped or never saw begin: tell the sender to start over.
            self._reply(peer, {"k": "nack", "id": stream_id, "why": "unknown stream"})
            self.counters.rejected += 1
            return
        if kind == "chunk":
            self._chunk(stream, payload)
        elif kind == "end":
            self._end(stream, payload)
        else:
            self._refuse(stream, f"unknown frame kind {kind!r}")

    def _begin(self, peer: str, stream_id: str, p: dict[str, Any]) -> None:
        try:
            term, index, sterm, size = (_uint(p.get(k), k) for k in ("term", "index", "sterm",
                                                                     "size"))
            voters, learners = _ids(p.get("voters"), "voters"), _ids(p.get("learners"),
                                                                     "learners")
        except ValueError as exc:
            self.counters.rejected += 1
            self._reply(peer, {"k": "nack", "id": stream_id, "why": str(exc)})
            return
        if size > self.max_bytes:
            self.counters.rejected += 1
            self._reply(peer, {"k": "nack", "id": stream_id,
                               "why": f"snapshot of {size} bytes exceeds {self.max_bytes}"})
            return
        if index < 1:
            self.counters.rejected += 1
            self._reply(peer, {"k": "nack", "id": stream_id, "why": "snapshot index 0"})
            return
        if self.current is not None:
            self._drop(self.current)  # a newer stream (often from a newer leader) wins
        meta = SnapshotMeta(index, sterm, ConfState(voters, learners))
        self.current = _InStream(peer, stream_id, term, meta, size)
        self._arm(self.current)
        self._reply(peer, {"k": "ack", "id": stream_id, "off": 0})

    def _chunk(self, stream: _InStream, p: dict[str, Any]) -> None:
        offset, data, crc = p.get("off"), p.get("data"), p.get("crc")
        if type(offset) is not int or offset != len(stream.buf):
            self._refuse(stream, f"chunk at offset {offset!r}, expected {len(stream.buf)}")
            return
        if not isinstance(data, bytes) or not data or len(stream.buf) + len(data) > stream.size:
            self._refuse(stream, "chunk data missing or beyond the announced size")
            return
        if type(crc) is not int or zlib.crc32(data) != crc:
            self._refuse(stream, f"chunk at offset {offset} fails its checksum")
            return
        stream.buf += data
        stream.crc = zlib.crc32(data, stream.crc)
        self.counters.bytes_received += len(data)
        self._arm(stream)
        self._reply(stream.peer, {"k": "ack", "id": stream.stream_id, "off": len(stream.buf)})

    def _end(self, stream: _InStream, p: dict[str, Any]) -> None:
        if len(stream.buf) != stream.size:
            self._refuse(stream, f"ended at {len(stream.buf)} of {stream.size} bytes")
            return
        if p.get("crc") != stream.crc:
            self._refuse(stream, "the image fails its checksum")
            return
        self._drop(stream)
        snapshot = Snapshot(stream.meta, bytes(stream.buf))
        message = Message(MessageType.SNAPSHOT, self.node.node_id, stream.peer, stream.term,
                          snapshot=snapshot)
        self.counters.received += 1
        self.node.log.info("snapshot_stream_received", peer=stream.peer,
                           stream=stream.stream_id, index=stream.meta.index, bytes=stream.size)
        self._reply(stream.peer, {"k": "done", "id": stream.stream_id})
        # The kernel decides what the image is worth (stale term, already covered, ...) and
        # answers the leader itself once it is persisted (Raft §7).
        if self.on_complete is not None:
            self.on_complete(message)
        else:
            self.node.step(message)

    def _refuse(self, stream: _InStream, why: str) -> None:
        self.counters.rejected += 1
        self.node.log.warning("snapshot_stream_refused", peer=stream.peer,
                              stream=stream.stream_id, reason=why)
        self._drop(stream)
        self._reply(stream.peer, {"k": "nack", "id": stream.stream_id, "why": why})

    def _drop(self, stream: _InStream) -> None:
        if self.current is stream:
            self.current = None
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()

    def _arm(self, stream: _InStream) -> None:
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()
        stream.timer = self.node.reactor.callLater(self.stall_seconds, self._stalled, stream)

    def _stalled(self, stream: _InStream) -> None:
        if self.current is stream:
            self.node.log.warning("snapshot_stream_stalled", peer=stream.peer,
                                  stream=stream.stream_id, received=len(stream.buf))
            self._drop(stream)

    def _reply(self, peer: str, payload: dict[str, Any]) -> None:
        self.node.send_plugin_frame(peer, PLUGIN, payload)


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{name} must be an integer >= 0")
    return value


def _ids(value: Any, name: str) -> frozenset[str]:
    if not isinstance(value, list) or len(value) > _MAX_MEMBERS or not all(
            isinstance(v, str) and 0 < len(v) <= _MAX_ID_CHARS for v in value):
        raise ValueError(f"{name} must be a list of node ids")
    return frozenset(value)
