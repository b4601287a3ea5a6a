"""The ``compaction`` plugin: when to snapshot, and how snapshots travel (Raft §7).

Loaded on every node by default. It answers ``bwraft_should_snapshot`` — snapshot once
``entries`` entries or ``max_bytes`` bytes were applied since the last snapshot — and the node
does the rest without stalling its reactor: the state machine freezes its state at the applied
index (``snapshot_begin``), a worker thread serializes it and writes the image apart from the
log (``Storage.stage_snapshot``), ``Storage.compact`` on the writer thread records it and drops
the covered entries in one short transaction, and only then does the kernel drop the prefix
(``RawNode.compact``). A crash anywhere in between leaves either the old snapshot with the
whole log or the new snapshot with the log after it: both restart to the same state. See
docs/compaction.md.

On the leader it also takes the kernel's SNAPSHOT messages out of each outgoing batch and
streams the image in acknowledged chunks (:mod:`bwraft_plugins.snapshot_stream`), so a follower,
observer or secretary that fell behind the compacted log — or a new node that starts empty —
catches up by InstallSnapshot whatever the image's size. Every node must load it (it is a
default plugin) to receive such streams.

Settings (``[plugins.compaction]``):

``entries`` (10000)
    Snapshot after this many applied entries; 0 turns the count off.
``max_bytes`` (67108864)
    Snapshot once the entries applied since the last snapshot hold this many data bytes; 0
    turns the size off. With both off the log is never compacted.
``chunk_bytes`` (1048576)
    Image bytes per chunk frame (capped to half of ``limits.max_frame_bytes``).
``window`` (4)
    Chunks in flight per stream before the receiver must acknowledge.
``stall_seconds`` (10.0)
    A stream with no progress for this long fails (leader) or is dropped (receiver).
``max_snapshot_bytes`` (4294967296)
    The largest image a receiver accepts.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from bwcore.hookspecs import hookimpl
from bwcore.kernel import Message, StateRole
from bwraft_plugins.snapshot_stream import (
    PLUGIN,
    SnapshotReceiver,
    SnapshotSender,
    StreamCounters,
)

__all__ = ["CompactionPlugin"]

_SENDER_KINDS = frozenset({"ack", "nack", "done"})
_RECEIVER_KINDS = frozenset({"begin", "chunk", "end"})


class CompactionPlugin:
    """Snapshot policy and chunked InstallSnapshot streaming (see the module docstring)."""

    settings_defaults = {
        "entries": 10_000,
        "max_bytes": 64 * 1024 * 1024,
        "chunk_bytes": 1024 * 1024,
        "window": 4,
        "stall_seconds": 10.0,
        "max_snapshot_bytes": 4 * 1024 * 1024 * 1024,
    }

    def __init__(self, settings: dict[str, Any]) -> None:
        for name in ("entries", "max_bytes"):
            if settings[name] < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {settings[name]}")
        for name in ("chunk_bytes", "window", "max_snapshot_bytes"):
            if settings[name] <= 0:
                raise ValueError(f"{name} must be positive, got {settings[name]}")
        if settings["stall_seconds"] <= 0:
            raise ValueError(f"stall_seconds must be positive, got {settings['stall_seconds']}")
        self.entries: int = settings["entries"]
        self.max_bytes: int = settings["max_bytes"]
        self.chunk_bytes: int = settings["chunk_bytes"]
        self.window: int = settings["window"]
        self.stall_seconds: float = float(settings["stall_seconds"])
        self.max_snapshot_bytes: int = settings["max_snapshot_bytes"]
        self.counters = StreamCounters()
        self.sender: SnapshotSender | None = None
        self.receiver: SnapshotReceiver | None = None

    # -- policy -------------------------------------------------------------------------------

    @hookimpl
    def bwraft_should_snapshot(self, node: Any, applied_index: int, log_entries: int,
                               log_bytes: int) -> bool:
        """Snapshot once enough entries, or enough bytes, were applied since the last one."""
        return (self.entries > 0 and log_entries >= self.entries) \
            or (self.max_bytes > 0 and log_bytes >= self.max_bytes)

    # -- streaming ----------------------------------------------------------------------------

    @hookimpl
    def bwraft_node_started(self, node: Any) -> None:
        frame_limit = node.config.limits.max_frame_bytes
        chunk = max(1, min(self.chunk_bytes, frame_limit // 2))
        self.sender = SnapshotSender(node, chunk_bytes=chunk, window=self.window,
                                     stall_seconds=self.stall_seconds, counters=self.counters)
        self.receiver = SnapshotReceiver(node, max_bytes=self.max_snapshot_bytes,
                                         stall_seconds=self.stall_seconds,
                                         counters=self.counters)

    @hookimpl
    def bwraft_node_stopping(self, node: Any) -> None:
        if self.sender is not None:
            self.sender.abort_all()

    @hookimpl(tryfirst=True)
    def bwraft_route_messages(self, node: Any, messages: list[Message]) -> None:
        """Take SNAPSHOT messages over before any relay sees them: they go out in chunks."""
        if self.sender is not None:
            self.sender.take_over(messages)

    @hookimpl
    def bwraft_role_changed(self, node: Any, role: StateRole, term: int,
                            leader: str | None) -> None:
        if role is not StateRole.LEADER and self.sender is not None:
            self.sender.abort_all()

    @hookimpl
    def bwraft_plugin_frame(self, node: Any, peer: str, frame: Any) -> bool | None:
        if getattr(frame, "plugin", None) != PLUGIN:
            return None
        payload = getattr(frame, "payload", None)
        if not isinstance(payload, dict):
            self.counters.rejected += 1
            return True
        kind = payload.get("k")
        if kind in _SENDER_KINDS and self.sender is not None:
            self.sender.on_frame(peer, payload)
        elif kind in _RECEIVER_KINDS and self.receiver is not None:
            self.receiver.on_frame(peer, payload)
        else:
            self.counters.rejected += 1
        return True

    @hookimpl
    def bwraft_metrics(self, registry: CollectorRegistry) -> None:
        counts = Gauge("bwraft_snapshot_streams", "InstallSnapshot streams by outcome"
                       " (started, completed, failed as sender; received, rejected as"
                       " receiver)", ["outcome"], registry=registry)
        for outcome in ("started", "completed", "failed", "received", "rejected"):
            counts.labels(outcome).set_function(
                lambda o=outcome: getattr(self.counters, o))
        volume = Gauge("bwraft_snapshot_stream_bytes", "Snapshot image bytes streamed",
                       ["direction"], registry=registry)
        volume.labels("sent").set_function(lambda: self.counters.bytes_sent)
        volume.labels("received").set_function(lambda: self.counters.bytes_received)
