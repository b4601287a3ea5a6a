"""The Raft log as the kernel sees it: a snapshot followed by entries, with marks for what is
durable (``stable``), committed and applied.

The whole uncompacted log is kept in memory; the driver bounds it by taking snapshots and
calling :meth:`RaftLog.compact`. Entries past ``stable`` are in memory only and go into the next
``Ready`` for the driver to persist.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from bwcore.kernel.types import Entry, EntryType, Snapshot


class RaftLog:
    __slots__ = ("snapshot", "offset", "entries", "committed", "applied", "stable",
                 "pending_snapshot", "conf_indexes")

    def __init__(self, snapshot: Snapshot, entries: list[Entry], commit: int) -> None:
        self.snapshot = snapshot
        #: Index of the last entry covered by the snapshot; entries[k].index == offset + 1 + k.
        self.offset = snapshot.meta.index
        self.entries = entries
        self.stable = self.last_index()
        self.committed = max(commit, self.offset)
        self.applied = self.offset
        #: A snapshot received from the leader that the driver must persist and install.
        self.pending_snapshot: Snapshot | None = None
        #: Indexes of the configuration-change entries in ``entries``, ascending: they are rare,
        #: and the kernel looks them up on every commit.
        self.conf_indexes: list[int] = [e.index for e in entries
                                        if e.type is EntryType.CONF_CHANGE]

    # -- queries -----------------------------------------------------------------------

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snapshot.meta.term

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index``; None when compacted away or not yet present."""
        if index == self.offset:
            return self.snapshot.meta.term
        k = index - self.offset - 1
        if 0 <= k < len(self.entries):
            return self.entries[k].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft §5.4.1: a candidate's log is at least as up-to-date as ours."""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def slice(self, lo: int, hi: int, max_bytes: int) -> tuple[Entry, ...] | None:
        """Entries [lo, hi) limited to about ``max_bytes`` (at least one); None if compacted."""
        if lo <= self.offset:
            return None
        start = lo - self.offset - 1
        stop = min(hi, self.last_index() + 1) - self.offset - 1
        if start >= stop:
            return ()
        out = self.entries[start:stop]
        if max_bytes and len(out) > 1:
            size = 0
            for k, e in enumerate(out):
                size += len(e.data) + 16
                if size > max_bytes and k > 0:
                    out = out[:k]
                    break
        return tuple(out)

    def entry(self, index: int) -> Entry | None:
        k = index - self.offset - 1
        return self.entries[k] if 0 <= k < len(self.entries) else None

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest i <= index whose term is <= ``term`` (fast backtracking, Raft §5.3)."""
        index = min(index, self.last_index())
        while index > self.offset:
            t = self.term(index)
            if t is not None and t <= term:
                break
            index -= 1
        return index

    def unstable_entries(self) -> tuple[Entry, ...]:
        return tuple(self.entries[self.stable - self.offset:])

    def has_next_committed(self) -> bool:
        return self.committed > self.applied and self.pending_snapshot is None

    def next_committed(self, max_entries: int) -> tuple[Entry, ...]:
        """Committed entries not yet handed out for applying, in order.

        Entries not yet durable are included: the driver persists a Ready before applying it,
        and everything unstable at ``ready()`` time is in that same Ready.
        """
        if not self.has_next_committed():
            return ()
        lo = self.applied - self.offset
        hi = min(self.committed - self.offset, lo + max_entries)
        return tuple(self.entries[lo:hi])

    # -- mutations ---------------------------------------------------------------------

    def append(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Append, first dropping any of our entries at or after ``entries[0].index``."""
        if not entries:
            return
        first = entries[0].index
        assert first > self.committed, "never truncate committed entries"
        keep = first - self.offset - 1
        if keep < len(self.entries):
            del self.entries[keep:]
            self.stable = min(self.stable, first - 1)
            del self.conf_indexes[bisect_left(self.conf_indexes, first):]
        self.entries.extend(entries)
        for e in entries:
            if e.type is EntryType.CONF_CHANGE:
                self.conf_indexes.append(e.index)

    def maybe_append(self, prev_index: int, prev_term: int, commit: int,
                     entries: tuple[Entry, ...]) -> int | None:
        """The follower's side of AppendEntries (Raft §5.3, Figure 2 receiver rules 2-5).

        Returns the index of the last entry now known to match the leader, or None if the
        log does not contain ``prev_index`` with ``prev_term``.
        """
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        for k, e in enumerate(entries):
            t = self.term(e.index)
            if t is None and e.index <= self.offset:
                continue  # already covered by our snapshot
            if t != e.term:
                self.append(entries[k:])
                break
        self.commit_to(min(commit, last_new))
        return last_new

    def conf_changes_between(self, lo: int, hi: int) -> list[Entry]:
        """Configuration-change entries with lo < index <= hi, in order."""
        ci = self.conf_indexes
        return [self.entries[i - self.offset - 1]
                for i in ci[bisect_right(ci, lo):bisect_right(ci, hi)]]

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            self.committed = min(index, self.last_index())
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        if self.match_term(index, term) and index > self.stable:
            self.stable = index

    def applied_to(self, index: int) -> None:
        self.applied = max(self.applied, index)

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by ``snapshot`` (a leader's InstallSnapshot, Raft §7)."""
        self.snapshot = snapshot
        self.offset = snapshot.meta.index
        self.entries = []
        self.conf_indexes = []
        self.committed = self.offset
        self.stable = self.offset
        self.pending_snapshot = snapshot

    def snapshot_installed(self, snapshot: Snapshot) -> None:
        if self.pending_snapshot is snapshot:
            self.pending_snapshot = None
            self.applied = max(self.applied, snapshot.meta.index)

    def compact(self, snapshot: Snapshot) -> None:
        """Drop entries covered by a snapshot the driver took and persisted."""
        index = snapshot.meta.index
        if index <= self.offset:
            return
        assert index <= self.applied, "snapshot past the applied index"
        assert self.match_term(index, snapshot.meta.term), "snapshot term mismatch"
        del self.entries[: index - self.offset]
        del self.conf_indexes[: bisect_right(self.conf_indexes, index)]
        self.offset = index
        self.snapshot = snapshot
