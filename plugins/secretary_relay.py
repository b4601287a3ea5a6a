"""The secretary's and the follower's sides of the relay, as pure cores (no Twisted, no clock).

:class:`SecretaryRelay` runs on a secretary: it fans each BATCH out to the followers as RELAY
frames carrying the leader's own messages, collects their replies, and reports them to the
leader in one REPORT frame. :class:`FollowerRelay` runs on every voter and observer: it turns a
RELAY frame back into the leader's kernel messages, and picks the replies to them out of the
node's outgoing batches so that they return through the same secretary.

Fencing (PROTOCOL.md "Secretary"): a secretary acts for one (leader, term) at a time; a batch
of a higher term replaces that assignment and drops everything buffered for the old one, a
batch of a lower term is ignored, and only replies of the current assignment are forwarded. A
secretary never builds an entry, a term, a leader id or a commit index of its own: it copies
what the leader sent (invariant 6: followers accept only entries the current leader sent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bwcore.kernel import Message, MessageType as MT
from bwraft_plugins import secretary_wire as wire

__all__ = ["FollowerRelay", "FollowerStats", "SecretaryRelay", "SecretaryStats"]

#: A follower that has been owing replies for this many report delays without a break no
#: longer holds reports back.
STALE_OWED_FACTOR = 10
#: Replies that tell the leader nothing new, and batches no follower has answered yet, are
#: reported within this many report delays (with the next report that leaves for another
#: reason, if one does sooner).
QUIET_FACTOR = 10


@dataclass
class SecretaryStats:
    batches: int = 0                # BATCH frames accepted
    relayed_messages: int = 0       # messages delivered to followers
    relayed_entries: int = 0        # entries in them
    replies: int = 0                # replies forwarded to the leader
    coalesced: int = 0              # replies left out: a later one of the same follower says more
    reports: int = 0                # REPORT frames sent
    dropped: dict[str, int] = field(default_factory=dict)   # frames dropped, by reason

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class SecretaryRelay:
    """A secretary's relay state: one assignment (leader, term) and the replies collected.

    Args:
        node_id: The secretary's id.
        window: The most distinct entries it accepts in one batch (it holds no more).
        max_delay: Seconds a reply with news may wait to be reported along with others.
        quiet_delay: Seconds a reply without news, or a batch nobody has answered, may wait
            (default ``QUIET_FACTOR * max_delay``; the plugin keeps it well under the
            leader's reply deadline).
        max_relay_bytes: Entry bytes above which the messages to one follower are split over
            several RELAY frames.
    """

    def __init__(self, node_id: str, *, window: int = 4096, max_delay: float = 0.002,
                 max_relay_bytes: int = 8 * 1024 * 1024, quiet_delay: float | None = None
                 ) -> None:
        self.node_id = node_id
        self.window = window
        self.max_delay = max_delay
        self.quiet_delay = QUIET_FACTOR * max_delay if quiet_delay is None else quiet_delay
        self.max_relay_bytes = max_relay_bytes
        self.stats = SecretaryStats()
        self.leader: str | None = None
        self.term = 0
        self._ack_seq = 0
        self._reported_seq = 0
        self._replies: list[tuple[str, list[Any]]] = []
        #: follower -> [replies it still owes, since when it has owed any].
        self._awaiting: dict[str, list[Any]] = {}
        #: follower -> the highest index it acknowledged in this assignment since its last
        #: rejection (reported, or buffered for the next report): no more is no news.
        self._acknowledged: dict[str, int] = {}
        #: Whether any reply buffered for the next report is news.
        self._news = False
        #: Followers that answered with news since the last report, and how many the leader
        #: needs to commit (its hint in the latest batch; 0: none).
        self._answered: set[str] = set()
        self._report_after = 0
        #: Whether that hint is all the leader needs (the batch's ``settles``), and then the
        #: highest index that many followers acknowledged in one report since the hint was
        #: given: another acknowledgement up to it cannot move the leader's commit index.
        self._settles = False
        self._settled = 0
        self._unreachable: set[str] = set()
        #: When the collected replies and acknowledgements must be reported at the latest.
        self.flush_at: float | None = None

    def on_batch(self, peer: str, batch: wire.Batch, now: float) -> list[tuple[str, list[Any]]]:
        """A leader's batch: the RELAY payloads to send, one or more per follower.

        ``peer`` is the sender's authenticated id (the transport's hello): a batch must come
        from the leader it names.
        """
        if peer != batch.leader:
            self.stats.drop("not_from_leader")
            return []
        if self.leader is None or batch.term > self.term:
            # A higher term: the old assignment and whatever was buffered for it are void.
            self.leader, self.term = batch.leader, batch.term
            self._ack_seq = self._reported_seq = 0
            self._replies.clear()
            self._awaiting.clear()
            self._acknowledged.clear()
            self._news = False
            self._answered.clear()
            self._settled = 0
            self._unreachable.clear()
            self.flush_at = None
        elif batch.term < self.term:
            self.stats.drop("stale_term")
            return []
        elif batch.leader != self.leader:
            self.stats.drop("conflicting_leader")  # two leaders of one term: never forward
            return []
        if len(batch.entries) > self.window:
            self.stats.drop("window")
            return []
        self.stats.batches += 1
        self._ack_seq = max(self._ack_seq, batch.seq)
        if (batch.report_after, batch.settles) != (self._report_after, self._settles):
            # A new hint (the leader's assignment or its direct voters changed): what the
            # old one settled says nothing about what the leader needs now, the
            # acknowledgements held back under it go within the report delay, and each
            # follower's next one is prompt again (one handed back to us may be probed).
            self._report_after, self._settles = batch.report_after, batch.settles
            self._settled = 0
            self._acknowledged.clear()
            if self._replies:
                self._news = True
                self._report_by(now + self.max_delay)
        by_target: dict[str, list[list[Any]]] = {}
        sizes: dict[str, int] = {}
        out: list[tuple[str, list[Any]]] = []
        for target in batch.targets:
            entries = batch.wire_entries(target)
            size = sum(len(e[1]) for e in entries)
            items = by_target.setdefault(target.to, [])
            if items and sizes[target.to] + size > self.max_relay_bytes:
                out.append((target.to, wire.encode_relay(self.term, self.leader, items)))
                items = by_target[target.to] = []
                sizes[target.to] = 0
            items.append(wire.relay_item(target, entries))
            sizes[target.to] = sizes.get(target.to, 0) + size
            owed = self._awaiting.setdefault(target.to, [0, now])
            owed[0] += 1
            self.stats.relayed_messages += 1
            self.stats.relayed_entries += target.count
        out.extend((to, wire.encode_relay(self.term, self.leader, items))
                   for to, items in by_target.items() if items)
        # The batch is acknowledged with the first report its replies bring, or on its own
        # well within the leader's reply deadline.
        self._report_by(now + self.quiet_delay)
        return out

    def on_replies(self, peer: str, replies: wire.Replies, now: float) -> bool:
        """A follower's replies. Returns True when news is waiting and every follower has
        answered everything relayed to it, or as many as the leader needs to commit have
        answered with news since the last report: report at once (at the end of this reactor
        turn).

        News is anything but an acknowledgement of an index the follower already acknowledged
        since its last rejection (its answer to a commit notice, say): the leader acts on an
        acknowledgement only when it raises the follower's match (Raft §5.3), which only a
        rejection lowers, so that one waits for the next report instead of making one.

        When the leader's hint settles it (the hint is all the leader needs from this
        secretary), acknowledgements wait for the hint: a report with fewer cannot move the
        commit index, so news that is only an acknowledgement is reported once the hinted
        number of followers have answered with news, or everyone has, or within the quiet
        delay. An acknowledgement that raises the match no further than an index the hinted
        number of followers acknowledged together in one report is no news at all (the commit
        index moved with them): the stragglers of one batch ride with the next batch's report. A
        follower's first acknowledgement (in the term, since a rejection, or since a new hint)
        and every other reply stay news within ``max_delay``: the leader may be probing that
        follower, or waiting on a read.
        """
        if self.leader is None or replies.term != self.term or replies.leader != self.leader:
            self.stats.drop("stale_reply")  # never forward a reply of another assignment
            return False
        if not replies.items:
            return False
        acknowledged = self._acknowledged
        settles = self._settles
        settled = self._settled if settles else 0
        news = prompt = False
        for item in replies.items:
            self._replies.append((peer, item))
            mtype, index, _, reject, _, context = item
            if mtype is MT.APPEND_RESP and not reject and not context:
                before = acknowledged.get(peer)
                if before is None or index > before:
                    acknowledged[peer] = index
                    if before is None or not settles:
                        news = prompt = True
                    elif index > settled:
                        news = True
            else:
                if reject:
                    # The follower lacks what it had (wiped storage): the leader lowers its
                    # match, and every acknowledgement up to the old one is news again.
                    acknowledged.pop(peer, None)
                news = prompt = True
        owed = self._awaiting.get(peer)
        if owed is not None:
            owed[0] -= len(replies.items)
            if owed[0] <= 0:
                del self._awaiting[peer]
        if news:
            self._news = True
            self._answered.add(peer)
        self._report_by(now + (self.max_delay if prompt else self.quiet_delay))
        # The leader commits once a quorum has the entries (Raft §5.3): the acknowledgements
        # it needs from here go back as soon as they are in; the rest follow together.
        return self._news and (not self._awaiting
                               or 0 < self._report_after <= len(self._answered))

    def _report_by(self, when: float) -> None:
        if self.flush_at is None or when < self.flush_at:
            self.flush_at = when

    def unreachable(self, follower: str, now: float) -> None:
        """A RELAY frame to ``follower`` could not be queued: tell the leader."""
        self._unreachable.add(follower)
        self._awaiting.pop(follower, None)
        self._report_by(now + self.max_delay)

    def flush(self, now: float) -> tuple[str, list[Any]] | None:
        """The REPORT to send now (leader id, payload), or None if there is nothing to say."""
        self.flush_at = None
        # Replies still owed stay owed across reports, so that the stragglers of a batch go
        # back together in one more report rather than one report each. A follower that has
        # owed replies for a while without a break may have lost some (with the relay to it):
        # its count is forgotten, so that it no longer holds reports back; the next relay to
        # it counts afresh. Only when reports leave depends on these counts, never what they
        # carry.
        stale = now - STALE_OWED_FACTOR * self.max_delay
        for follower in [f for f, (_, since) in self._awaiting.items() if since < stale]:
            del self._awaiting[follower]
        if self.leader is None or (not self._replies and not self._unreachable
                                   and self._ack_seq == self._reported_seq):
            return None
        replies = coalesce(self._replies)
        payload = wire.encode_report(self.term, self._ack_seq, replies, self._unreachable)
        self.stats.replies += len(replies)
        self.stats.coalesced += len(self._replies) - len(replies)
        self.stats.reports += 1
        self._replies = []
        self._unreachable = set()
        self._answered = set()
        self._news = False
        self._reported_seq = self._ack_seq
        need = self._report_after
        if self._settles:
            # The followers' acknowledgements in this report (one each, fresh): as many as
            # the hint asks for let the leader commit up to the lowest of the highest ones.
            acks = sorted(item[1] for _, item in replies if item[0] is MT.APPEND_RESP
                          and not item[3] and not item[5])
            if 0 < need <= len(acks):
                self._settled = max(self._settled, acks[-need])
        return self.leader, payload

    def report_lost(self) -> None:
        """The report could not even be queued: what it acknowledged is news again. (A
        report lost after it was queued costs at most ``quiet_delay`` more.)"""
        self._acknowledged.clear()
        self._settled = 0   # the leader never heard what settled it

    def status(self) -> dict[str, Any]:
        return {"leader": self.leader, "term": self.term, "acknowledged_batch": self._ack_seq,
                "replies_buffered": len(self._replies)}


def coalesce(replies: Sequence[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    """Each follower's replies as the leader needs them: its highest accepted APPEND_RESP
    (the match index; Raft's leader keeps only the highest one it hears, §5.3), its last plain
    HEARTBEAT_RESP, and every rejection and every ReadIndex acknowledgement as they came.

    Leaving out a superseded reply is what losing it would do, which Raft tolerates; the
    leader's view of each follower ends up the same as if it had stepped them all.
    """
    last: dict[tuple[str, Any], int] = {}
    for k, (frm, item) in enumerate(replies):
        mtype, index, _, reject, _, context = item
        if mtype is MT.APPEND_RESP and not reject:
            key = (frm, "match")
            best = last.get(key)
            if best is None or index >= replies[best][1][1]:
                last[key] = k
        elif mtype is MT.HEARTBEAT_RESP and not context:
            last[(frm, "heartbeat")] = k
        else:
            last[(frm, k)] = k
    return [replies[k] for k in sorted(last.values())]


@dataclass
class FollowerStats:
    relays: int = 0                 # RELAY frames accepted
    messages: int = 0               # leader messages stepped from them
    replies: int = 0                # replies sent back through a secretary
    dropped: int = 0                # malformed frames


@dataclass(frozen=True, slots=True)
class _Route:
    leader: str
    term: int
    secretary: str
    last_relay: float


class FollowerRelay:
    """A follower's side: which secretary its replies to the leader go back through.

    Args:
        node_id: This node's id.
        ttl: Seconds after the last relayed message during which replies still go through its
            secretary; after that they go directly to the leader (the secretary may be gone,
            and the leader then replicates directly).
    """

    def __init__(self, node_id: str, ttl: float) -> None:
        self.node_id = node_id
        self.ttl = ttl
        self.stats = FollowerStats()
        self._route: _Route | None = None

    def on_relay(self, peer: str, relay: wire.Relay, now: float) -> list[Message]:
        """A RELAY frame from secretary ``peer``: the leader's messages to step.

        The kernel checks each message's term exactly as if the leader had sent it; the route
        back only ever moves forward in terms.
        """
        if relay.leader == self.node_id:
            self.stats.dropped += 1
            return []
        route = self._route
        if route is None or relay.term >= route.term:
            self._route = _Route(relay.leader, relay.term, peer, now)
        self.stats.relays += 1
        self.stats.messages += len(relay.messages)
        return list(relay.messages)

    def on_direct(self, peer: str, term: int) -> None:
        """The leader took this follower back: reply to it directly from now on."""
        route = self._route
        if route is not None and peer == route.leader and term >= route.term:
            self._route = None

    def take_replies(self, messages: Sequence[Message], now: float
                     ) -> tuple[str, list[Message], list[Any]] | None:
        """The replies in ``messages`` that go back through the secretary.

        Returns:
            (secretary, the replies, REPLY payload), or None. The caller removes the replies
            from its batch only once the frame is queued.
        """
        route = self._route
        if route is None:
            return None
        if now - route.last_relay > self.ttl:
            self._route = None
            return None
        picked = [m for m in messages if m.type in wire.RESPONSES and m.to == route.leader
                  and m.term == route.term and m.frm == self.node_id]
        if not picked:
            return None
        self.stats.replies += len(picked)
        return route.secretary, picked, wire.encode_replies(route.term, route.leader, picked)

    def status(self) -> dict[str, Any] | None:
        route = self._route
        if route is None:
            return None
        return {"leader": route.leader, "term": route.term, "secretary": route.secretary}
