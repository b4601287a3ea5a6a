"""The durable-log contract every storage backend implements.

A Raft node must not answer an RPC before its term, vote and log entries are on stable
storage (Raft §5, Figure 2: "updated on stable storage before responding to RPCs"). The node
drives a :class:`Storage` with one :meth:`Storage.save` per ``Ready`` (group commit) from a
single writer thread, and calls :meth:`Storage.load` once at start to rebuild the kernel.

Backends: :mod:`bwraft_plugins.sqlstorage` (SQLite by default, PostgreSQL by URL). A third
party backend implements :class:`Storage` and returns it from the ``bwraft_open_storage`` hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bwcore.kernel import Entry, HardState, Snapshot


class StorageError(Exception):
    """The stored state cannot be read or written: corrupt, unknown layout, I/O failure.

    The message starts with where the state lives (a file path or a database URL without its
    password). After a failed :meth:`Storage.save` the node must stop: whether the write
    reached the disk is unknown, so nothing that depends on it may be sent.
    """


@dataclass(frozen=True)
class PersistedState:
    """Everything a node needs to rebuild its kernel after a restart.

    Attributes:
        hard_state: The last stored term, vote and commit index (all zero on a new store).
        snapshot: The last stored snapshot, or ``None`` if there never was one.
        entries: The entries after the snapshot, contiguous and in index order: the first
            one has index ``snapshot.meta.index + 1`` (or 1 without a snapshot).
    """

    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]


@runtime_checkable
class Storage(Protocol):
    """A durable Raft log: hard state, one snapshot and the entries after it.

    The log invariant every backend keeps: the stored entries are contiguous and start right
    after the snapshot's index. Calls that would break it raise :class:`ValueError` (a bug in
    the caller) and change nothing; failures of the medium raise :class:`StorageError`.
    """

    def load(self) -> PersistedState:
        """Read the whole stored state.

        Raises:
            StorageError: The store is corrupt, has an unknown layout or cannot be read. A
                corrupt store is never mistaken for an empty one.
        """
        ...

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Persist one ``Ready`` in one transaction, durable when this returns.

        If ``snapshot`` is given: store it (replacing the previous one) and delete ALL stored
        entries (a follower installing a leader's snapshot, Raft §7). Then, if ``entries`` is
        non-empty, delete stored entries with index >= ``entries[0].index`` (a conflicting
        suffix, Raft §5.3) and insert ``entries``. Then store ``hard_state`` if given.

        Raises:
            ValueError: ``snapshot`` is older than the stored one or has index < 1;
                ``entries`` are not contiguous, or would leave a gap after the log or start
                at or below the snapshot's index. Nothing is changed.
            StorageError: The write failed; its outcome is unknown.
        """
        ...

    def compact(self, snapshot: Snapshot) -> None:
        """Store a snapshot taken locally and delete the entries it covers (Raft §7).

        In one transaction: store ``snapshot`` and delete entries with index <=
        ``snapshot.meta.index``.

        Raises:
            ValueError: The snapshot is older than the stored one, lies beyond the last
                stored entry, or its term differs from the term of the entry at its index.
                Nothing is changed.
            StorageError: The write failed; its outcome is unknown.
        """
        ...

    def log_stats(self) -> tuple[int, int]:
        """Return ``(entry count, total data bytes)`` of the stored entries."""
        ...

    def close(self) -> None:
        """Release the backend's connections. Idempotent."""
        ...


@runtime_checkable
class SnapshotStaging(Protocol):
    """Optional for a :class:`Storage`: write a snapshot's image apart from the log writer.

    A large image written inside :meth:`Storage.compact` would hold the single writer thread
    (and every ``save`` queued behind it) for as long as the write takes. A storage offering
    this method lets the node write the image first, on a thread of its own, while saves go
    on; ``compact`` with the same snapshot then only records it and drops the log prefix.
    """

    def stage_snapshot(self, snapshot: Snapshot) -> None:
        """Make the image of ``snapshot`` durable, without putting the snapshot in effect.

        Called on a thread other than the writer, concurrently with ``save``. A later
        ``compact(snapshot)`` or ``save(..., snapshot)`` of the same object records it; an
        image staged but never recorded (refused, or lost with a crash) must not be mistaken
        for a snapshot, and should be removed eventually (the built-in storage: once a newer
        image is recorded).

        Raises:
            ValueError: The snapshot's index is below 1.
            StorageError: The image could not be written.
        """
        ...
