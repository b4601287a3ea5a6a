"""The leader's view of each follower's log, with flow control (etcd-io/raft ``tracker``)."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping


class ProgressState(enum.Enum):
    PROBE = "probe"          # one append per heartbeat interval until we learn where logs match
    REPLICATE = "replicate"  # pipelined appends, up to max_inflight outstanding
    SNAPSHOT = "snapshot"    # a snapshot is on its way; nothing else is sent


class Progress:
    __slots__ = ("match", "next", "state", "probe_sent", "pending_snapshot", "recent_active",
                 "inflights", "max_inflight", "snapshot_waits")

    def __init__(self, next_index: int, max_inflight: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.recent_active = True
        self.inflights: deque[int] = deque()
        self.max_inflight = max_inflight
        #: Heartbeat answers received while a snapshot is unacknowledged (see Raft._step_leader).
        self.snapshot_waits = 0

    def become_probe(self) -> None:
        # After a snapshot the follower is at least at the snapshot's index.
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_waits = 0
        self.inflights.clear()

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflights) >= self.max_inflight
        return True

    def maybe_update(self, index: int) -> bool:
        """An append was acknowledged up to ``index``; False if that told us nothing new."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """An append at ``rejected`` was refused; move ``next`` back. False if stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # an old rejection, overtaken by a later success
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # not the probe we are waiting on
        if match_hint < self.match:
            # The follower no longer holds what it acknowledged (its storage was lost or
            # wiped): forget the match, or the probe would repeat at the same index forever
            # and never reach the snapshot it needs. A lower match only delays commits.
            self.match = match_hint
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def sent_entries(self, last: int) -> None:
        if self.state is ProgressState.REPLICATE:
            self.next = last + 1
            self.inflights.append(last)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def free_to(self, index: int) -> None:
        q = self.inflights
        while q and q[0] <= index:
            q.popleft()

    def free_first(self) -> None:
        if self.inflights:
            self.inflights.popleft()


def quorum_size(voters: int) -> int:
    return voters // 2 + 1


def committed_index(voters: Iterable[str], match: Mapping[str, int]) -> int:
    """The largest index that a majority of ``voters`` have (Raft §5.3 / §5.4.2)."""
    ms = sorted((match.get(v, 0) for v in voters), reverse=True)
    if not ms:
        return 0
    return ms[quorum_size(len(ms)) - 1]


def has_quorum(voters: frozenset[str], granted: Iterable[str]) -> bool:
    return len(voters.intersection(granted)) >= quorum_size(len(voters))


def vote_result(voters: frozenset[str], votes: Mapping[str, bool]) -> bool | None:
    """True if won, False if lost, None while undecided."""
    q = quorum_size(len(voters))
    yes = sum(1 for v in voters if votes.get(v) is True)
    no = sum(1 for v in voters if votes.get(v) is False)
    if yes >= q:
        return True
    if no > len(voters) - q:
        return False
    return None
