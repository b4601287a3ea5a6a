"""The leader's side of the secretary relay, as a pure core: no Twisted, no clock of its own.

:class:`LeaderRelay` decides which follower each secretary serves, takes the leader's APPEND and
HEARTBEAT messages for those followers out of each outgoing batch and packs them into one BATCH
frame per secretary, checks the secretaries' REPORT frames (term fencing) and turns them back
into replies for the kernel, and takes followers back from a secretary that is gone or late.
Every method that depends on time takes ``now`` (seconds): the Twisted plugin passes
``reactor.seconds()``, the simulated tests their own clock. The rules are PROTOCOL.md
"Secretary"; this module's docstrings say where each comes from.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bwcore.kernel import Entry, Message
from bwraft_plugins import secretary_wire as wire

__all__ = ["DirectoryEntry", "LeaderRelay", "LeaderStats", "RelaySettings", "TakeBack"]

#: Gossip says a member is up (SWIM: alive; suspect is not up enough to be handed work).
ALIVE = "alive"
SECRETARY_ROLE = "secretary"
#: The gossip tag by which a node says it runs the follower side of the relay.
RELAY_TAG = "relay"
RELAY_TAG_VALUE = "secretary/1"
#: Longest bench of a secretary that keeps missing its deadline.
MAX_BENCH_FACTOR = 32


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """The leader's relay policy (``[plugins.secretary]``, resolved to seconds).

    Attributes:
        reply_deadline: A secretary that has not reported on a batch within this many seconds
            is taken off its followers (well under the election timeout: PROTOCOL.md). A
            follower served by a secretary that has not answered anything for 1.5 times this
            long is served directly for a while (the secretary may not reach it).
        rehire_after: How long a secretary that missed its deadline stays benched; it doubles
            with each further miss (up to 32 times) and resets once it reports again.
        window: The most distinct entries one BATCH frame carries (what a secretary holds).
        max_frame_bytes: The most entry bytes one BATCH frame carries.
        split: ``"rendezvous"``: each follower goes to one of its datacenter's secretaries by
            a stable hash of both ids; ``"single"``: all followers of a datacenter go to one.
        datacenters: Datacenters where secretaries are used (empty: all).
        exclude_datacenters: Datacenters where they are never used.
        commit_delay: How long an APPEND that carries no entries (the kernel's notice that
            the commit index moved) may wait for the next batch to the same secretary before
            it goes in a frame of its own; an APPEND to the same follower meanwhile replaces
            it. 0 sends every notice at once.
    """

    reply_deadline: float = 0.3
    rehire_after: float = 2.0
    window: int = 4096
    max_frame_bytes: int = 8 * 1024 * 1024
    split: str = "rendezvous"
    datacenters: frozenset[str] = frozenset()
    exclude_datacenters: frozenset[str] = frozenset()
    commit_delay: float = 0.0

    def uses(self, datacenter: str) -> bool:
        if datacenter in self.exclude_datacenters:
            return False
        return not self.datacenters or datacenter in self.datacenters


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """What gossip says about one member, as far as the relay cares."""

    id: str
    role: str
    datacenter: str
    state: str
    raft_addr: str = ""
    relay: bool = False      # runs the follower side of the relay (the gossip tag)


@dataclass(frozen=True, slots=True)
class TakeBack:
    """The leader stopped using ``secretary`` for ``targets`` (now served directly or by
    another secretary); the kernel must probe them again at once."""

    secretary: str
    targets: tuple[str, ...]
    reason: str


@dataclass
class LeaderStats:
    """Counters the plugin exports as metrics."""

    frames: int = 0                 # BATCH frames sent
    relayed_messages: int = 0       # kernel messages handed to secretaries
    relayed_entries: int = 0        # entries in them (one per follower that receives it)
    sent_entries: int = 0           # distinct entries in BATCH frames (what the leader sent)
    reports: int = 0                # REPORT frames accepted
    replies: int = 0                # replies stepped from reports
    stale_reports: int = 0          # REPORT frames of another term, or from a stranger
    folded_notices: int = 0         # entry-less APPENDs replaced by a later APPEND
    takebacks: dict[str, int] = field(default_factory=dict)   # by reason


@dataclass
class _Secretary:
    id: str
    outstanding: deque[tuple[int, float]] = field(default_factory=deque)
    benched_until: float = 0.0
    misses: int = 0
    addresses_sent: set[str] = field(default_factory=set)
    last_report: float | None = None


def _score(*parts: str) -> int:
    """A stable hash (never Python's salted ``hash``): the same on every leader and run."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class LeaderRelay:
    """The relay, seen from the leader.

    Args:
        node_id: The leader's id.
        settings: Policy.
        voter_addresses: Raft ``host:port`` of the configured voters (authoritative for them).
    """

    def __init__(self, node_id: str, settings: RelaySettings,
                 voter_addresses: Mapping[str, str] | None = None) -> None:
        self.node_id = node_id
        self.settings = settings
        self.voter_addresses = dict(voter_addresses or {})
        self.stats = LeaderStats()
        self.directory: dict[str, DirectoryEntry] = {}
        self.term = 0
        self.ready = False
        self._secretaries: dict[str, _Secretary] = {}
        self._seq = 0
        #: follower -> the secretary its messages went to in this term (to take them back).
        self._served: dict[str, str] = {}
        #: follower -> until when it is served directly (its secretary could not reach it).
        self._direct_until: dict[str, float] = {}
        #: follower -> when a message first went to it through a secretary without an answer.
        self._waiting_since: dict[str, float] = {}
        #: follower -> how many times in a row it was taken back for silence.
        self._silent: dict[str, int] = {}
        self._assignment: dict[str, str | None] = {}
        self._assignment_expires = float("inf")
        #: secretary -> its report hint and whether the hint settles it, for the assignment
        #: above.
        self._hints: dict[str, tuple[int, bool]] = {}
        #: The voters as the kernel last said (note_progress; the configured ones until
        #: then), those not to count on answering promptly, those that were behind the
        #: commit index at the last look, and (time, commit index) at the looks since one
        #: reply deadline ago.
        self._voters: frozenset[str] = frozenset(self.voter_addresses)
        self._lagging: frozenset[str] = frozenset()
        self._behind: frozenset[str] = frozenset()
        self._commits_seen: deque[tuple[float, int]] = deque()
        self._pending_takebacks: list[TakeBack] = []
        #: follower -> its latest entry-less APPEND, waiting for the next batch (commit_delay).
        self._held: dict[str, Message] = {}
        #: When the held APPENDs must go out at the latest (None: nothing is held).
        self.held_until: float | None = None

    # -- membership (gossip) ---------------------------------------------------------------

    def member_changed(self, entry: DirectoryEntry, now: float) -> list[TakeBack]:
        """Gossip news about a member. A secretary that is no longer alive loses its followers
        at once (PROTOCOL.md: taken back when gossip says suspect/dead); one that is alive
        again (restarted, or refuted a suspicion) may be hired again at once."""
        if entry.id == self.node_id:
            return []
        before = self.directory.get(entry.id)
        self.directory[entry.id] = entry
        self._reset_assignment()
        out: list[TakeBack] = []
        if entry.role == SECRETARY_ROLE:
            track = self._secretaries.get(entry.id)
            if entry.state != ALIVE:
                out.extend(self._take_back(entry.id, entry.state, now, bench=False))
            elif track is not None and (before is None or before.state != ALIVE):
                track.benched_until, track.misses = 0.0, 0
        return out

    def forget(self, member_id: str, now: float) -> list[TakeBack]:
        """The member is gone from the gossip view."""
        entry = self.directory.pop(member_id, None)
        self._reset_assignment()
        if entry is not None and entry.role == SECRETARY_ROLE:
            return self._take_back(member_id, "left", now, bench=False)
        return []

    # -- leadership ------------------------------------------------------------------------

    def set_leadership(self, term: int | None, ready: bool) -> None:
        """This node leads ``term`` (None: it does not lead); ``ready`` once the term's no-op
        entry is committed — only then are secretaries hired (PROTOCOL.md, leader change)."""
        term = term or 0
        if term != self.term:
            # A new term: nothing of the old one carries over but what gossip told us, and
            # how each secretary behaved (benches). No hint settles anything before the
            # leader has looked at its followers' progress in this term.
            self.term = term
            self._commits_seen.clear()
            self._behind = self._voters
            self._hints.clear()
            self._drop_held()
            self._served.clear()
            self._direct_until.clear()
            self._waiting_since.clear()
            self._silent.clear()
            for track in self._secretaries.values():
                track.outstanding.clear()
                track.addresses_sent.clear()
        self.ready = bool(term) and ready

    # -- assignment ------------------------------------------------------------------------

    def secretaries_of(self, datacenter: str, now: float) -> list[str]:
        """The secretaries of ``datacenter`` the leader may hire now."""
        if not self.settings.uses(datacenter):
            return []
        out = []
        for entry in self.directory.values():
            if entry.role == SECRETARY_ROLE and entry.datacenter == datacenter \
                    and entry.state == ALIVE and entry.id != self.node_id:
                track = self._secretaries.get(entry.id)
                if track is None or track.benched_until <= now:
                    out.append(entry.id)
        return sorted(out)

    def secretary_for(self, target: str, now: float) -> str | None:
        """The secretary that serves ``target`` now, or None for direct replication."""
        if now >= self._assignment_expires:
            self._reset_assignment()
        if not self._assignment:
            self._assignment_expires = min(
                [t.benched_until for t in self._secretaries.values() if t.benched_until > now]
                + [u for u in self._direct_until.values() if u > now] + [float("inf")])
        if target in self._assignment:
            return self._assignment[target]
        chosen = None
        entry = self.directory.get(target)
        if entry is not None and entry.relay and entry.role != SECRETARY_ROLE \
                and self._direct_until.get(target, 0.0) <= now:
            candidates = self.secretaries_of(entry.datacenter, now)
            if candidates:
                # Rendezvous hashing: a follower moves only when its own secretary comes or
                # goes, and every leader computes the same split.
                key = target if self.settings.split == "rendezvous" else entry.datacenter
                chosen = max(candidates, key=lambda s: _score(s, key))
        self._assignment[target] = chosen
        return chosen

    def _reset_assignment(self) -> None:
        """Who serves which follower must be worked out again (membership, a take-back, a
        bench that ended)."""
        self._assignment.clear()
        self._hints.clear()

    def assignment(self, now: float) -> dict[str, list[str]]:
        """Secretary -> the followers it serves (those the leader has sent anything so far)."""
        out: dict[str, list[str]] = {}
        for target in sorted(self._served):
            sec = self.secretary_for(target, now)
            if sec is not None:
                out.setdefault(sec, []).append(target)
        return out

    # -- outgoing batches ------------------------------------------------------------------

    def route(self, messages: list[Message], now: float) -> list[tuple[str, list[Any]]]:
        """Take the messages a secretary will deliver out of ``messages`` (in place).

        Returns:
            (secretary, BATCH payload) pairs to send. If sending one fails, the caller calls
            :meth:`send_failed` (and sends nothing else for it).
        """
        if not self.ready:
            return []
        if now >= self._assignment_expires:
            self._reset_assignment()   # a bench or a direct spell has ended
        # This runs for every outgoing batch of the leader: one pass, plain lookups.
        me, term, assignment = self.node_id, self.term, self._assignment
        requests, append = wire.REQUESTS, wire.MT.APPEND
        hold = self.settings.commit_delay > 0
        held = self._held
        taken: dict[str, list[Message]] = {}
        keep: list[Message] = []
        for m in messages:
            if m.frm != me or m.term != term or m.type not in requests:
                keep.append(m)
                continue
            to = m.to
            sec = assignment[to] if to in assignment else self.secretary_for(to, now)
            if sec is None or not wire.appendable(m):
                keep.append(m)
            elif hold and m.type is append:
                # The commit index reaches a follower with any later APPEND (Raft §5.3: it
                # commits up to min(leaderCommit, its last new entry)); under load the next
                # batch comes within a few milliseconds, and one frame and one report per
                # batch are saved. A message replaced is one the network lost: always safe.
                if held and held.pop(to, None) is not None:
                    self.stats.folded_notices += 1
                if m.entries:
                    taken.setdefault(sec, []).append(m)
                else:
                    held[to] = m
                    if self.held_until is None:
                        self.held_until = now + self.settings.commit_delay
            else:
                taken.setdefault(sec, []).append(m)
        if taken and held:
            # A frame goes to these secretaries anyway: held notices ride along for free
            # (first: they are older than anything else this batch has for their follower).
            riding: dict[str, list[Message]] = {}
            for target in list(held):
                sec = self.secretary_for(target, now)
                if sec in taken:
                    riding.setdefault(sec, []).append(held.pop(target))
            for sec, notices in riding.items():
                taken[sec] = notices + taken[sec]
        if not held:
            self.held_until = None
        if len(keep) == len(messages):
            return []
        frames = self._frames(taken, keep, now) if taken else []
        messages[:] = keep
        return frames

    def flush_held(self, now: float, *, force: bool = False) -> list[tuple[str, list[Any]]]:
        """The frames of the held commit notices whose wait is over (``force``: all now).

        A notice whose follower no longer goes through a secretary is dropped: taking a
        follower back makes the kernel probe it again, which tells it the commit index too.
        """
        if self.held_until is None or (now < self.held_until and not force):
            return []
        held, self._held, self.held_until = self._held, {}, None
        if not self.ready:
            return []
        taken: dict[str, list[Message]] = {}
        for target, m in held.items():
            sec = self.secretary_for(target, now)
            if sec is not None and m.term == self.term:
                taken.setdefault(sec, []).append(m)
        return self._frames(taken, [], now)

    def _drop_held(self, targets: Iterable[str] | None = None) -> None:
        for target in list(self._held) if targets is None else targets:
            self._held.pop(target, None)
        if not self._held:
            self.held_until = None

    def _frames(self, taken: dict[str, list[Message]], keep: list[Message],
                now: float) -> list[tuple[str, list[Any]]]:
        frames = []
        for sec, msgs in taken.items():
            track = self._secretaries.setdefault(sec, _Secretary(sec))
            for chunk, distinct in self._chunks(msgs, keep):
                frames.append((sec, self._batch(track, chunk, distinct, now)))
        return frames

    def _chunks(self, msgs: list[Message], keep: list[Message]
                ) -> Iterable[tuple[list[Message], dict[int, Entry]]]:
        """Split one secretary's messages so that no frame exceeds the window or byte cap; a
        message too big on its own goes directly (``keep``). Yields each frame's messages
        with their distinct entries (index -> entry)."""
        window, cap = self.settings.window, self.settings.max_frame_bytes
        distinct = wire.distinct_entries(msgs)
        if len(distinct) <= window \
                and sum(len(e.data) + 16 for e in distinct.values()) <= cap:
            yield msgs, distinct   # the usual case: every follower needs the same new entries
            return
        chunk: list[Message] = []
        seen: set[int] = set()
        size = 0
        for m in msgs:
            new = [e for e in m.entries if e.index not in seen]
            grow = sum(len(e.data) + 16 for e in new)
            if len(m.entries) > window or sum(len(e.data) + 16 for e in m.entries) > cap:
                keep.append(m)
                continue
            if chunk and (len(seen) + len(new) > window or size + grow > cap):
                yield chunk, wire.distinct_entries(chunk)
                chunk, seen, size = [], set(), 0
                new = list(m.entries)
                grow = sum(len(e.data) + 16 for e in new)
            chunk.append(m)
            seen.update(e.index for e in new)
            size += grow
        if chunk:
            yield chunk, wire.distinct_entries(chunk)

    def _batch(self, track: _Secretary, msgs: list[Message], distinct: dict[int, Entry],
               now: float) -> list[Any]:
        self._seq += 1
        addresses = {}
        served, waiting, sent = self._served, self._waiting_since, track.addresses_sent
        relayed_entries = 0
        for m in msgs:
            to = m.to
            served[to] = track.id
            if to not in waiting:
                waiting[to] = now
            if to not in sent:
                address = self.voter_addresses.get(to) or getattr(
                    self.directory.get(to), "raft_addr", "")
                if address:
                    addresses[to] = address
                sent.add(to)
            relayed_entries += len(m.entries)
        track.outstanding.append((self._seq, now))
        payload = wire.encode_batch(self._seq, self.term, self.node_id, msgs, addresses,
                                    distinct, *self._report_after(track.id, now))
        st = self.stats
        st.frames += 1
        st.relayed_messages += len(msgs)
        st.relayed_entries += relayed_entries
        st.sent_entries += len(distinct)
        return payload

    def _report_after(self, secretary: str, now: float) -> tuple[int, bool]:
        """How many of the voters ``secretary`` serves should acknowledge before it reports,
        and whether that is all the leader needs from it (the batch's ``report_after`` and
        ``settles``).

        The count is the acknowledgements the leader needs from relayed voters to commit if
        every voter it replicates to directly, except those lagging, answers; it is shared
        among the secretaries by how many voters each serves; 0 when the direct voters are a
        quorum. It settles what the secretary must report at once only when no other
        secretary shares it, the secretary serves voters alone (an observer's answer counts
        for nothing), and no direct voter it counts on was behind the commit index at the
        last look: one that was answers later than the relayed voters, so the leader needed
        more of them than the count says, and holding those back would delay commits. A hint
        only: a secretary that reports earlier or later changes no decision, only when the
        leader hears it.
        """
        if now >= self._assignment_expires:
            self._reset_assignment()   # as secretary_for would: a bench has ended
        hint = self._hints.get(secretary)
        if hint is None:
            voters = self._voters
            by_secretary = {v: self.secretary_for(v, now) for v in voters}
            relayed = sum(1 for s in by_secretary.values() if s is not None)
            served = sum(1 for s in by_secretary.values() if s == secretary)
            counted = [v for v, s in by_secretary.items()
                       if s is None and (v == self.node_id or v not in self._lagging)]
            need = len(voters) // 2 + 1 - len(counted)
            count = -(-need * served // relayed) if need > 0 and served else 0   # ceil
            only_voters = not any(
                self.secretary_for(e.id, now) == secretary for e in self.directory.values()
                if e.id not in voters and e.role != SECRETARY_ROLE)
            prompt = not self._behind.intersection(counted)
            hint = (count, 0 < count and served == relayed and only_voters and prompt)
            self._hints[secretary] = hint
        return hint

    def note_progress(self, status: Mapping[str, Any], now: float) -> None:
        """A look at the leader's kernel (``RawNode.status()``), now and then (the plugin's
        deadline checks): the voters as they are now (a configuration change moves the
        quorum), which of them are behind the commit index, and which are lagging.

        A voter that still lacks what was committed a reply deadline ago is lagging: the
        report hints do not count on it answering in time. (A voter that stopped answering is
        caught within a deadline of the first commit without it, and one that is merely slow,
        on a busy machine, is not; the kernel's ``active`` flag would not do, since
        check-quorum clears it every election timeout.) One that is only behind still counts,
        but the hints no longer settle anything while it is (see :meth:`_report_after`)."""
        commit = status["commit_index"]
        seen = self._commits_seen
        seen.append((now, commit))
        horizon = now - self.settings.reply_deadline
        while len(seen) > 1 and seen[1][0] <= horizon:
            seen.popleft()
        before = seen[0][1] if seen[0][0] <= horizon else 0
        progress = status.get("progress") or {}
        voters = frozenset(status["voters"])
        others = [v for v in voters if v != self.node_id]
        lagging = frozenset(v for v in others
                            if v not in progress or progress[v]["match"] < before)
        behind = frozenset(v for v in others
                           if v not in progress or progress[v]["match"] < commit)
        if (voters, lagging, behind) != (self._voters, self._lagging, self._behind):
            self._voters, self._lagging, self._behind = voters, lagging, behind
            self._hints.clear()

    def send_failed(self, secretary: str, now: float) -> list[TakeBack]:
        """A BATCH frame could not even be queued for ``secretary``."""
        return self._take_back(secretary, "unreachable", now, bench=True)

    # -- reports and deadlines -------------------------------------------------------------

    def on_report(self, peer: str, report: wire.Report, now: float) -> list[Message]:
        """A secretary's REPORT: the replies to step into the kernel.

        Fencing (PROTOCOL.md): a report of another term than the one this node leads now is
        ignored, as is one from a node this leader never hired; each reply carries the
        report's term, which the kernel checks like any other message's.
        """
        track = self._secretaries.get(peer)
        if not self.term or report.term != self.term or track is None:
            self.stats.stale_reports += 1
            return []
        while track.outstanding and track.outstanding[0][0] <= report.ack_seq:
            track.outstanding.popleft()
        track.misses = 0
        track.last_report = now
        self.stats.reports += 1
        replies = [m for m in report.replies if m.frm != self.node_id]
        for m in replies:
            self._waiting_since.pop(m.frm, None)
            self._silent.pop(m.frm, None)
        self.stats.replies += len(replies)
        self._pending_takebacks.extend(
            tb for target in report.unreachable if self._served.get(target) == peer
            for tb in self._take_back_follower(target, "follower_unreachable", now))
        return replies

    def check(self, now: float) -> list[TakeBack]:
        """Take followers back from every secretary that missed its reply deadline, and each
        follower that a secretary has not brought an answer from for 1.5 deadlines."""
        out, self._pending_takebacks = self._pending_takebacks, []
        deadline = self.settings.reply_deadline
        for track in list(self._secretaries.values()):
            if track.outstanding and now - track.outstanding[0][1] > deadline:
                out.extend(self._take_back(track.id, "deadline", now, bench=True))
        for target, since in list(self._waiting_since.items()):
            if now - since > 1.5 * deadline:
                out.extend(self._take_back_follower(target, "follower_silent", now))
        return out

    def _take_back_follower(self, target: str, reason: str, now: float) -> list[TakeBack]:
        """Serve one follower directly for a while: its secretary does not reach it, or it
        does not run the relay. The while doubles with each time in a row."""
        secretary = self._served.pop(target, None)
        self._waiting_since.pop(target, None)
        self._drop_held([target])
        if secretary is None:
            return []
        misses = self._silent[target] = self._silent.get(target, 0) + 1
        factor = min(2 ** (misses - 1), MAX_BENCH_FACTOR)
        self._direct_until[target] = now + self.settings.rehire_after * factor
        self._reset_assignment()
        self.stats.takebacks[reason] = self.stats.takebacks.get(reason, 0) + 1
        return [TakeBack(secretary, (target,), reason)]

    def unreachable_targets(self, now: float) -> list[str]:
        """Followers a secretary reported it cannot reach, now served directly."""
        return sorted(t for t, until in self._direct_until.items() if until > now)

    def _take_back(self, secretary: str, reason: str, now: float, *,
                   bench: bool) -> list[TakeBack]:
        track = self._secretaries.get(secretary)
        if track is None:
            return []
        had_work = bool(track.outstanding)
        track.outstanding.clear()
        track.addresses_sent.clear()
        if bench:
            track.misses += 1
            factor = min(2 ** (track.misses - 1), MAX_BENCH_FACTOR)
            track.benched_until = now + self.settings.rehire_after * factor
        self._reset_assignment()
        targets = tuple(sorted(t for t, s in self._served.items() if s == secretary))
        self._drop_held(targets)
        for t in targets:
            del self._served[t]
            self._waiting_since.pop(t, None)
        if not targets and not had_work:
            return []
        self.stats.takebacks[reason] = self.stats.takebacks.get(reason, 0) + 1
        return [TakeBack(secretary, targets, reason)]

    # -- status ----------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        secretaries = {}
        for entry in sorted(self.directory.values(), key=lambda e: e.id):
            if entry.role != SECRETARY_ROLE:
                continue
            track = self._secretaries.get(entry.id)
            benched = max(0.0, track.benched_until - now) if track else 0.0
            secretaries[entry.id] = {
                "datacenter": entry.datacenter, "state": entry.state,
                "benched_seconds": round(benched, 3),
                "outstanding_batches": len(track.outstanding) if track else 0,
            }
        return {"term": self.term, "relaying": self.ready,
                "assignment": self.assignment(now) if self.ready else {},
                "secretaries": secretaries,
                "direct_after_unreachable": self.unreachable_targets(now)}
