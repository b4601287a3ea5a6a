"""SWIM gossip membership with the Lifeguard refinements, over UDP.

Every bwraft process is a gossip member. :class:`SwimMember` is the protocol: a pure object
driven by an injected Twisted clock (``IReactorTime``) and ``random.Random``, which sends
datagrams through a ``send(addr, data)`` callable and is fed with :meth:`datagram_received`.
:class:`GossipProtocol`, :func:`listen_gossip` and :class:`GossipService` bind it to a UDP
socket. The design follows SWIM (Das, Gupta, Motivala, DSN 2002), Lifeguard (Dadgar et al.,
2017) and HashiCorp memberlist, the reference implementation of both:

* Failure detection (SWIM §3.1): each protocol period, ping the next member of a shuffled
  round-robin list; without an ack in ``probe_timeout`` ask ``indirect_checks`` others to ping
  it (ping-req); without any ack by the end of the period, suspect it.
* Suspicion (SWIM §4.2): a suspect is declared dead after a timeout proportional to
  ``log10(n)``, which shrinks as independent suspicions confirm it (Lifeguard §IV-B). A member
  told that it is suspect or dead refutes by raising its incarnation; so does a member whose
  datagrams were lost for a while.
* Local health (Lifeguard §IV-A): failed probes without nacks raise an awareness score that
  stretches the probe interval and timeouts, so a slow member accuses others less.
* Dissemination (SWIM §4.1): updates ride on pings and acks, each sent about
  ``retransmit_mult * log10(n + 1)`` times, least-sent first, within
  ``max_datagram``. A periodic push-pull exchange of state with a random member (and with a
  random dead one, to heal partitions) repairs whatever gossip missed.
"""

from __future__ import annotations

import enum
import math
import random
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import structlog
from twisted.application import service
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol

from bwcore.gossip_codec import (
    Ack, Alive, Dead, DatagramRejected, Left, Member, MemberState, Message, Nack, Ping, PingReq,
    PushPull, Suspect, Update, WireCodec, encode_message, encode_update, format_addr,
    parse_addr,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime

__all__ = [
    "GossipConfig", "GossipEvent", "GossipProtocol", "GossipService", "GossipStats", "Member",
    "MemberState", "SwimMember", "listen_gossip",
]

Address = tuple[str, int]
Listener = Callable[[str, Member], None]

ALIVE, SUSPECT, DEAD, LEFT = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD,
                              MemberState.LEFT)
_LIVE = (ALIVE, SUSPECT)
#: Every ``reason`` label of ``bwraft_gossip_dropped_datagrams_total``.
DROP_REASONS = ("oversized", "auth", "version", "malformed", "unknown", "misdirected", "error")
# A relay sends its nack at this fraction of the probe timeout, so that the nack reaches the
# requester before the requester's period ends (Lifeguard §IV-A uses 80%).
_NACK_FRACTION = 0.8
_SMALLEST_UPDATE = 8


class GossipEvent(enum.StrEnum):
    """What a listener is told about another member."""

    JOINED = "joined"     # new, or back after dead/left
    UPDATED = "updated"   # metadata changed (a higher incarnation)
    SUSPECT = "suspect"
    ALIVE = "alive"       # a suspect refuted
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True)
class GossipConfig:
    """Gossip settings; the defaults suit a LAN (raise the times for WAN links).

    Attributes:
        protocol_period: Seconds between probes (SWIM's protocol period T').
        probe_timeout: Seconds to wait for a direct ack before asking others; at most half
            the period, so that indirect probes and nacks can finish within it.
        indirect_checks: Members asked to ping a silent target (SWIM's k).
        suspicion_mult: Suspicion timeout = mult * max(1, log10(n + 1)) * period.
        suspicion_max_timeout_mult: Without confirmations the timeout is this many times
            longer; each independent confirmation brings it closer to the minimum.
        retransmit_mult: Each update is sent retransmit_mult * ceil(log10(n + 1)) times.
        awareness_max_multiplier: Upper bound of the local-health stretch factor.
        max_datagram: The largest datagram sent or accepted, in bytes.
        push_pull_interval: Seconds between anti-entropy exchanges with a random member.
        push_pull_max_datagrams: Datagrams one side of an exchange may use; a larger state
            is sampled at random, so that the load per member stays bounded.
        reconnect_interval: Seconds between push-pull attempts to a random dead member (and
            to the seeds when no other member is alive), which heals partitions.
        join_retry_initial: First delay between join attempts; doubles on every retry.
        join_retry_max: Largest delay between join attempts.
        reap_timeout: Seconds a dead or left member is kept as a tombstone before removal.
        leave_timeout: Longest wait in :meth:`SwimMember.leave` for the news to spread.
    """

    protocol_period: float = 0.2
    probe_timeout: float = 0.1
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    retransmit_mult: int = 4
    awareness_max_multiplier: int = 8
    max_datagram: int = 1400
    push_pull_interval: float = 10.0
    push_pull_max_datagrams: int = 8
    reconnect_interval: float = 30.0
    join_retry_initial: float = 1.0
    join_retry_max: float = 30.0
    reap_timeout: float = 3600.0
    leave_timeout: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and type(value) is not int:
                raise ValueError(f"gossip setting {f.name} must be an integer, not {value!r}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"gossip setting {f.name} must be a non-negative number")
        if self.protocol_period <= 0 or not 0 < self.probe_timeout <= self.protocol_period / 2:
            raise ValueError("gossip needs protocol_period > 0 and "
                             "0 < probe_timeout <= protocol_period / 2")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion multipliers must be at least 1")
        if self.retransmit_mult < 1 or self.awareness_max_multiplier < 1:
            raise ValueError("retransmit_mult and awareness_max_multiplier must be at least 1")
        if not 512 <= self.max_datagram <= 65507:
            raise ValueError("max_datagram must be within 512..65507 bytes")
        if self.push_pull_max_datagrams < 1:
            raise ValueError("push_pull_max_datagrams must be at least 1")
        for name in ("push_pull_interval", "reconnect_interval", "join_retry_initial",
                     "join_retry_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"gossip setting {name} must be positive")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> GossipConfig:
        """Build from a config table, refusing keys this class does not know.

        Raises:
            ValueError: An unknown key or a bad value, named in the message.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown gossip settings: {', '.join(unknown)}")
        return cls(**settings)


@dataclass
class GossipStats:
    """Traffic counters of one member (also exported to Prometheus when a registry is given)."""

    sent_datagrams: int = 0
    sent_bytes: int = 0
    received_datagrams: int = 0
    received_bytes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass
class _Broadcast:
    data: bytes
    transmits: int = 0
    on_done: Callable[[], None] | None = None


class _BroadcastQueue:
    """Pending updates, one per member, each sent a bounded number of times.

    A newer update about a member replaces the older one. Updates sent fewest times go first,
    and among those the most recently queued or sent, as in memberlist's
    TransmitLimitedQueue. Updates are kept in tiers by transmit count, so that taking a few
    from a long queue does not sort it.
    """

    # Updates that do not fit the space left are skipped; stop looking after this many.
    _MAX_MISFITS = 32

    def __init__(self) -> None:
        self._items: dict[str, _Broadcast] = {}
        self._tiers: dict[int, dict[str, None]] = {}  # transmits -> keys, oldest first

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, data: bytes, on_done: Callable[[], None] | None = None) -> None:
        old = self._remove(key)
        self._items[key] = _Broadcast(data, on_done=on_done)
        self._tiers.setdefault(0, {})[key] = None
        if old is not None and old.on_done is not None:
            old.on_done()

    def take(self, budget: int, limit: int, skip: str | None = None) -> list[bytes]:
        """Updates fitting in ``budget`` bytes; each counts as sent once more."""
        chosen: list[str] = []
        misfits = 0
        for tier in sorted(self._tiers):
            for key in reversed(self._tiers[tier]):
                if budget < _SMALLEST_UPDATE or misfits >= self._MAX_MISFITS:
                    break
                size = len(self._items[key].data)
                if key == skip or size > budget:
                    misfits += key != skip
                    continue
                chosen.append(key)
                budget -= size
        datas = [self._items[key].data for key in chosen]
        for key in reversed(chosen):
            item = self._remove(key)
            assert item is not None
            item.transmits += 1
            if item.transmits >= limit:
                if item.on_done is not None:
                    item.on_done()
            else:
                self._items[key] = item
                self._tiers.setdefault(item.transmits, {})[key] = None
        return datas

    def _remove(self, key: str) -> _Broadcast | None:
        item = self._items.pop(key, None)
        if item is not None:
            tier = self._tiers[item.transmits]
            del tier[key]
            if not tier:
                del self._tiers[item.transmits]
        return item


class _Suspicion:
    """A suspicion timer that shortens with independent confirmations (Lifeguard §IV-B).

    With ``c`` of the ``k`` expected confirmations the timeout is
    ``max - (max - min) * log(c + 1) / log(k + 1)``, never below ``min`` (memberlist
    suspicion.go).
    """

    def __init__(self, incarnation: int, source: str, k: int, min_timeout: float,
                 max_timeout: float, started: float) -> None:
        self.incarnation = incarnation
        self.confirmations = {source}
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.started = started
        self.call: IDelayedCall | None = None

    def timeout(self) -> float:
        if self.k < 1:
            return self.min_timeout
        confirmed = len(self.confirmations) - 1
        frac = math.log(confirmed + 1) / math.log(self.k + 1)
        return max(self.min_timeout,
                   self.max_timeout - frac * (self.max_timeout - self.min_timeout))

    def confirm(self, source: str) -> bool:
        """Count ``source`` if it is new; True when the timeout changed."""
        if len(self.confirmations) - 1 >= self.k or source in self.confirmations:
            return False
        self.confirmations.add(source)
        return True


@dataclass
class _Probe:
    target: str
    incarnation: int
    seq: int
    acked: bool = False
    indirect: bool = False
    relays: set[str] = field(default_factory=set)
    nacks: set[str] = field(default_factory=set)
    indirect_call: IDelayedCall | None = None


@dataclass
class _AckWait:
    source: str
    on_ack: Callable[[], None]
    timer: IDelayedCall | None = None


class SwimMember:
    """One member of the gossip cluster: failure detector, dissemination and view.

    Args:
        local: This member; its ``gossip_addr`` is where others send datagrams.
        send: Sends one datagram: ``send((host, port), data)``.
        clock: Schedules every timer (``callLater``) and tells the time (``seconds``).
        rng: The only source of randomness (target order, relays, jitter).
        config: Protocol settings.
        seeds: ``host:port`` strings or ``(host, port)`` tuples to join through.
        secret: Cluster secret; datagrams without a valid HMAC are dropped.
        registry: Prometheus registry for this member's metrics (one member per registry).
        logger: A structlog logger; by default ``bwraft.gossip``.

    Raises:
        ValueError: ``local`` is invalid, or its metadata is too large to gossip.
    """

    def __init__(self, local: Member, send: Callable[[Address, bytes], None],
                 clock: IReactorTime, rng: random.Random, config: GossipConfig | None = None,
                 seeds: Iterable[str | Sequence[Any]] = (), secret: bytes | None = None,
                 registry: CollectorRegistry | None = None, logger: Any = None) -> None:
        self.config = config or GossipConfig()
        local.validate()
        local = replace(local, state=ALIVE, tags=dict(local.tags))
        self._codec = WireCodec(secret, self.config.max_datagram)
        self._check_metadata_size(local)
        self._id = local.id
        self._send_fn = send
        self._clock = clock
        self._rng = rng
        self._members: dict[str, Member] = {}
        self._changed_at: dict[str, float] = {}
        self._counts: Counter[MemberState] = Counter()
        self._set(local)
        own = parse_addr(local.gossip_addr, allow_port_zero=True)
        self._seeds = tuple(a for a in map(_to_address, seeds) if a != own)
        self._suspicions: dict[str, _Suspicion] = {}
        self._broadcasts = _BroadcastQueue()
        self._listeners: list[Listener] = []
        self._acks: dict[int, _AckWait] = {}
        self._seq = rng.randrange(2**32)
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._awareness = 0
        self._timers: set[IDelayedCall] = set()
        self._running = False
        self._stopped = False
        self._leaving = False
        self._leave_waiter: defer.Deferred[None] | None = None
        self._joined = not self._seeds
        self._join_attempts = 0
        self._join_call: IDelayedCall | None = None
        self._join_waiters: list[defer.Deferred[None]] = []
        self.stats = GossipStats()
        self._metrics = _Metrics(registry, self) if registry is not None else None
        self._log = (logger or structlog.get_logger("bwraft.gossip")).bind(member=self._id)

    # --- public API ------------------------------------------------------------------------

    @property
    def local(self) -> Member:
        """This member as the cluster sees it (its current incarnation and metadata)."""
        return self._members[self._id]

    @property
    def health_score(self) -> int:
        """Lifeguard local-health score: 0 is healthy; timeouts stretch by (score + 1)."""
        return self._awareness

    @property
    def joined(self) -> bool:
        """Whether another member's state has arrived (a seed's answer), or there are no seeds."""
        return self._joined

    @property
    def pending_updates(self) -> int:
        """Updates still waiting to be piggybacked (memberlist's queue depth)."""
        return len(self._broadcasts)

    @property
    def running(self) -> bool:
        """Started, and neither stopped nor done leaving."""
        return self._running

    @property
    def leaving(self) -> bool:
        """:meth:`leave` was called."""
        return self._leaving

    def members(self) -> list[Member]:
        """The view, this member included, sorted by id (for ``GET /v1/members``)."""
        return [self._members[k] for k in sorted(self._members)]

    def member(self, member_id: str) -> Member | None:
        """The view's record of one member, or None."""
        return self._members.get(member_id)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event, member)`` on every :class:`GossipEvent` about another member."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def when_joined(self) -> defer.Deferred[None]:
        """A Deferred that fires once :attr:`joined` is true."""
        if self._joined:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._join_waiters.append(waiter)
        return waiter

    def start(self) -> None:
        """Start probing, anti-entropy and, with seeds, joining."""
        if self._running or self._stopped:
            raise RuntimeError("a gossip member starts once")
        self._running = True
        cfg = self.config
        # Random first offsets keep members from probing in lockstep.
        self._schedule(self._rng.uniform(0, cfg.protocol_period), self._probe_tick)
        self._schedule(self._rng.uniform(0.5, 1.0) * cfg.push_pull_interval, self._push_pull_tick)
        self._schedule(self._rng.uniform(0.5, 1.0) * cfg.reconnect_interval, self._reconnect_tick)
        if self._seeds:
            self._join_attempt()

    def stop(self) -> None:
        """Stop at once, without telling anyone (others will detect it as failed).

        A pending :meth:`leave` Deferred fires.
        """
        self._running = False
        self._stopped = True
        for call in list(self._timers):
            if call.active():
                call.cancel()
        self._timers.clear()
        self._acks.clear()
        self._probe = None
        waiter, self._leave_waiter = self._leave_waiter, None
        if waiter is not None:
            waiter.callback(None)

    def leave(self) -> defer.Deferred[None]:
        """Leave gracefully: spread a ``left`` update, then stop.

        Returns:
            A Deferred firing once the update was sent its full retransmit count, or after
            ``leave_timeout``, when the member has stopped.
        """
        if not self._running or self._leaving:
            raise RuntimeError("only a running member that is not leaving can leave")
        self._leaving = True
        local = self.local
        self._set(replace(local, state=LEFT))
        self._leave_waiter = defer.Deferred()
        peers = self._peers(_LIVE)
        if not peers:
            self._schedule(0, self._finish_leave)
            return self._leave_waiter
        self._broadcasts.put(self._id, encode_update(Left(self._id, local.incarnation)),
                             on_done=lambda: self._schedule(0, self._finish_leave))
        # Piggybacking alone waits for the next probe; a few pings now spread it sooner.
        for peer in self._rng.sample(peers, min(len(peers), self.config.indirect_checks)):
            self._send(self._addr(peer), Ping(self._next_seq(), peer.id, self._id))
        self._schedule(self.config.leave_timeout, self._finish_leave)
        return self._leave_waiter

    def update_local(self, *, role: str | None = None, datacenter: str | None = None,
                     raft_addr: str | None = None, api_addr: str | None = None,
                     tags: Mapping[str, str] | None = None) -> Member:
        """Change this member's metadata; a higher incarnation carries it to everyone."""
        if self._leaving:
            raise RuntimeError("a leaving member cannot change its metadata")
        changes: dict[str, Any] = {k: v for k, v in (
            ("role", role), ("datacenter", datacenter), ("raft_addr", raft_addr),
            ("api_addr", api_addr)) if v is not None}
        if tags is not None:
            changes["tags"] = dict(tags)
        local = replace(self.local, incarnation=self.local.incarnation + 1, **changes)
        local.validate()
        self._check_metadata_size(local)
        self._set(local)
        self._broadcasts.put(self._id, encode_update(Alive(local)))
        return local

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Handle one datagram; bad ones are dropped and counted, never raised."""
        if not self._running:
            return
        self.stats.received_datagrams += 1
        self.stats.received_bytes += len(data)
        if self._metrics:
            self._metrics.received.inc()
        try:
            datagram = self._codec.open(data)
        except DatagramRejected as exc:
            self._drop(exc.reason, addr, exc.detail)
            return
        try:
            self._dispatch(datagram.message, datagram.updates, addr)
        except Exception:  # a bug must not take the member down with it
            self._log.exception("gossip_datagram_failed", peer=addr)
            self._drop("error", addr, "handler raised")

    # --- receiving -------------------------------------------------------------------------

    def _dispatch(self, message: Message, updates: tuple[Update, ...], addr: Address) -> None:
        # Updates first: a refutation they trigger can then ride on our answer.
        push_pull_source = message.source if isinstance(message, PushPull) else None
        for update in updates:
            self._apply_update(update, push_pull_source)
        match message:
            case Ping():
                self._on_ping(message, addr)
            case Ack():
                self._on_ack(message)
            case PingReq():
                self._on_ping_req(message, addr)
            case Nack():
                probe = self._probe
                if probe and probe.seq == message.seq and message.source in probe.relays:
                    probe.nacks.add(message.source)
            case PushPull():
                if message.want_reply:
                    self._send_state(addr, want_reply=False)
                else:
                    self._mark_joined()

    def _on_ping(self, ping: Ping, addr: Address) -> None:
        if ping.target != self._id:
            self._drop("misdirected", addr, f"ping for {ping.target!r}")
            return
        tell = self._what_they_missed(ping.source)
        self._send(addr, Ack(ping.seq, self._id), priority=tell, skip=ping.source if tell else None)

    def _on_ack(self, ack: Ack) -> None:
        wait = self._acks.get(ack.seq)
        if wait is None or wait.source != ack.source:
            return  # late, duplicate or stray: nothing waits for it any more
        del self._acks[ack.seq]
        self._cancel(wait.timer)
        wait.on_ack()

    def _on_ping_req(self, req: PingReq, requester: Address) -> None:
        if req.target == self._id:
            self._send(requester, Ack(req.seq, self._id))
            return
        relay_seq = self._next_seq()

        def forward() -> None:
            self._send(requester, Ack(req.seq, req.target))

        self._expect_ack(relay_seq, req.target, forward, self.config.protocol_period)
        self._send(parse_addr(req.target_addr), Ping(relay_seq, req.target, self._id))
        if req.nack:
            self._schedule(self.config.probe_timeout * _NACK_FRACTION, self._nack_if_silent,
                           relay_seq, req.seq, requester)

    def _nack_if_silent(self, relay_seq: int, seq: int, requester: Address) -> None:
        if relay_seq in self._acks:
            self._send(requester, Nack(seq, self._id))

    def _what_they_missed(self, member_id: str) -> list[bytes]:
        """If we hold ``member_id`` suspect, dead or left, tell it so that it can refute.

        Lifeguard's "buddy system" (§IV-C) sends a suspect its suspicion with every probe; we
        also answer a ping from a member we think dead, so a member whose datagrams were
        lost for a while learns of its state from its first successful exchange.
        """
        member = self._members.get(member_id)
        if member is None or member_id == self._id or member.state is ALIVE:
            return []
        update: Update
        if member.state is SUSPECT:
            update = Suspect(member_id, member.incarnation, self._id)
        elif member.state is DEAD:
            update = Dead(member_id, member.incarnation, self._id)
        else:
            update = Left(member_id, member.incarnation)
        return [encode_update(update)]

    # --- merging updates (SWIM §4.2; memberlist state.go) ------------------------------------

    def _apply_update(self, update: Update, push_pull_source: str | None) -> None:
        match update:
            case Alive(member):
                self._apply_alive(member)
            case Suspect():
                # A suspicion in another member's state is no independent failed probe of
                # its sender, so it does not confirm one (Lifeguard §IV-B counts only those).
                self._apply_suspect(update, confirms=push_pull_source is None)
            case Dead(member_id, incarnation, source):
                if push_pull_source is not None:
                    # Another view's "dead" is only a suspicion here, so that a member that
                    # is alive after all gets a chance to refute (memberlist mergeState).
                    self._apply_suspect(Suspect(member_id, incarnation, push_pull_source),
                                        confirms=False)
                else:
                    self._apply_dead(member_id, incarnation, left=False)
            case Left(member_id, incarnation):
                self._apply_dead(member_id, incarnation, left=True)

    def _apply_alive(self, news: Member) -> None:
        if news.id == self._id:
            local = self.local
            if self._leaving or news.incarnation < local.incarnation:
                return
            if news.incarnation == local.incarnation and news.same_metadata(local):
                return
            # Someone advertises us with another incarnation or metadata, e.g. our previous
            # run before a restart: assert our own record above it.
            self._refute(news.incarnation)
            return
        current = self._members.get(news.id)
        if current is not None and news.incarnation <= current.incarnation:
            return
        news = replace(news, state=ALIVE)
        self._set(news)
        self._end_suspicion(news.id)
        self._broadcasts.put(news.id, encode_update(Alive(news)))
        if current is None or current.state in (DEAD, LEFT):
            self._emit(GossipEvent.JOINED, news)
            return
        if current.state is SUSPECT:
            self._emit(GossipEvent.ALIVE, news)
        if not news.same_metadata(current):
            self._emit(GossipEvent.UPDATED, news)

    def _apply_suspect(self, news: Suspect, confirms: bool = True) -> None:
        if news.id == self._id:
            self._answer_accusation(news.incarnation)
            return
        current = self._members.get(news.id)
        if current is None or news.incarnation < current.incarnation:
            return
        if current.state in (DEAD, LEFT):
            return
        suspicion = self._suspicions.get(news.id)
        if current.state is SUSPECT and suspicion and news.incarnation == current.incarnation:
            if confirms and suspicion.confirm(news.source):
                self._reschedule_suspicion(news.id, suspicion)
                # Pass the independent confirmation on, so others shorten theirs too.
                self._broadcasts.put(news.id, encode_update(news))
            return
        suspect = replace(current, incarnation=news.incarnation, state=SUSPECT)
        self._set(suspect)
        self._end_suspicion(news.id)
        self._broadcasts.put(news.id, encode_update(news))
        cfg = self.config
        size = self._counts[ALIVE] + self._counts[SUSPECT]
        k = cfg.suspicion_mult - 2
        if size - 2 < k:
            k = 0
        min_timeout = cfg.suspicion_mult * max(1.0, math.log10(size + 1)) * cfg.protocol_period
        suspicion = _Suspicion(news.incarnation, news.source, k, min_timeout,
                               min_timeout * cfg.suspicion_max_timeout_mult, self._clock.seconds())
        self._suspicions[news.id] = suspicion
        self._reschedule_suspicion(news.id, suspicion)
        self._emit(GossipEvent.SUSPECT, suspect)

    def _reschedule_suspicion(self, member_id: str, suspicion: _Suspicion) -> None:
        self._cancel(suspicion.call)
        remaining = suspicion.started + suspicion.timeout() - self._clock.seconds()
        suspicion.call = self._schedule(remaining, self._suspicion_expired, member_id,
                                        suspicion.incarnation)

    def _suspicion_expired(self, member_id: str, incarnation: int) -> None:
        current = self._members.get(member_id)
        if current is not None and current.state is SUSPECT \
                and current.incarnation == incarnation:
            self._apply_dead(member_id, incarnation, left=False)

    def _end_suspicion(self, member_id: str) -> None:
        suspicion = self._suspicions.pop(member_id, None)
        if suspicion is not None:
            self._cancel(suspicion.call)

    def _apply_dead(self, member_id: str, incarnation: int, left: bool) -> None:
        if member_id == self._id:
            self._answer_accusation(incarnation)
            return
        current = self._members.get(member_id)
        if current is None or incarnation < current.incarnation:
            return
        # A member declared dead may still be heard to have left; never the other way round.
        if current.state is LEFT or (current.state is DEAD and not left):
            return
        gone = replace(current, incarnation=incarnation, state=LEFT if left else DEAD)
        self._set(gone)
        self._end_suspicion(member_id)
        update = Left(member_id, incarnation) if left else Dead(member_id, incarnation, self._id)
        self._broadcasts.put(member_id, encode_update(update))
        self._emit(GossipEvent.LEFT if left else GossipEvent.DEAD, gone)

    def _answer_accusation(self, incarnation: int) -> None:
        """Someone holds this member suspect, dead or left at ``incarnation``."""
        if self._leaving:
            return
        if incarnation >= self.local.incarnation:
            self._refute(incarnation)
        else:
            # We refuted already, but the accuser missed it (all retransmissions of a
            # refutation can miss one member). Gossip our record again, rather than a new
            # incarnation: it goes first on our next datagrams, including the ack to a
            # ping that carried the accusation.
            self._broadcasts.put(self._id, encode_update(Alive(self.local)))

    def _refute(self, accused_incarnation: int) -> None:
        """Outbid an accusation with a higher incarnation (SWIM §4.2)."""
        local = self.local
        incarnation = max(local.incarnation, accused_incarnation) + 1
        local = replace(local, incarnation=incarnation)
        self._set(local)
        self._broadcasts.put(self._id, encode_update(Alive(local)))
        # Being accused hints that our own messages are late (Lifeguard §IV-A).
        self._adjust_awareness(1)
        self._log.info("gossip_refuted", incarnation=incarnation)

    # --- failure detection (SWIM §3.1) -----------------------------------------------------

    def _probe_tick(self) -> None:
        self._finish_probe()
        target = self._next_probe_target()
        if target is not None:
            self._start_probe(target)
        self._schedule(self.config.protocol_period * self._scale(), self._probe_tick)

    def _next_probe_target(self) -> Member | None:
        for _ in range(2 * len(self._members) + 1):
            if self._probe_index >= len(self._probe_order):
                self._reap_tombstones()
                self._probe_order = [k for k, m in self._members.items()
                                     if k != self._id and m.state in _LIVE]
                self._rng.shuffle(self._probe_order)
                self._probe_index = 0
                if not self._probe_order:
                    return None
            member = self._members.get(self._probe_order[self._probe_index])
            self._probe_index += 1
            if member is not None and member.state in _LIVE:
                return member
        return None

    def _start_probe(self, target: Member) -> None:
        probe = _Probe(target.id, target.incarnation, self._next_seq())
        self._probe = probe
        self._expect_ack(probe.seq, target.id, lambda: self._probe_acked(probe), None)
        tell = self._what_they_missed(target.id)
        self._send(self._addr(target), Ping(probe.seq, target.id, self._id), priority=tell,
                   skip=target.id if tell else None)
        probe.indirect_call = self._schedule(self.config.probe_timeout * self._scale(),
                                             self._probe_indirect, probe)

    def _probe_acked(self, probe: _Probe) -> None:
        probe.acked = True
        self._cancel(probe.indirect_call)

    def _probe_indirect(self, probe: _Probe) -> None:
        if probe is not self._probe or probe.acked:
            return
        probe.indirect = True
        target = self._members.get(probe.target)
        if target is None:
            return
        relays = [m for m in self._peers((ALIVE,)) if m.id != probe.target]
        count = min(len(relays), self.config.indirect_checks)
        for relay in self._rng.sample(relays, count):
            probe.relays.add(relay.id)
            self._send(self._addr(relay), PingReq(probe.seq, target.id, target.gossip_addr,
                                                  self._id, nack=True))

    def _finish_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        self._acks.pop(probe.seq, None)
        self._cancel(probe.indirect_call)
        if probe.acked:
            if not probe.indirect:
                self._adjust_awareness(-1)
            return
        # Missing nacks mean our own messages are not getting through (Lifeguard §IV-A);
        # without relays to ask, any failed probe counts against us.
        missed = len(probe.relays) - len(probe.nacks)
        self._adjust_awareness(missed if probe.relays else 1)
        if not self._leaving:
            self._apply_suspect(Suspect(probe.target, probe.incarnation, self._id))

    def _adjust_awareness(self, delta: int) -> None:
        self._awareness = min(max(self._awareness + delta, 0),
                              self.config.awareness_max_multiplier - 1)

    def _scale(self) -> int:
        return self._awareness + 1

    def _expect_ack(self, seq: int, source: str, on_ack: Callable[[], None],
                    timeout: float | None) -> None:
        wait = _AckWait(source, on_ack)
        if timeout is not None:
            wait.timer = self._schedule(timeout, self._acks.pop, seq, None)
        self._acks[seq] = wait

    # --- anti-entropy, join, reconnect -----------------------------------------------------

    def _push_pull_tick(self) -> None:
        self._schedule(self.config.push_pull_interval, self._push_pull_tick)
        self._reap_tombstones()
        peers = self._peers((ALIVE,))
        if peers:
            self._send_state(self._addr(self._rng.choice(peers)), want_reply=True)

    def _reconnect_tick(self) -> None:
        """Exchange state with a random dead member: after a partition heals, nothing else
        would put the two sides in touch, since neither probes the members it holds dead."""
        self._schedule(self.config.reconnect_interval, self._reconnect_tick)
        dead = self._peers((DEAD,))
        if dead:
            self._send_state(self._addr(self._rng.choice(dead)), want_reply=True)
        if self._seeds and self._joined and not self._peers(_LIVE):
            for seed in self._seeds:
                self._send_state(seed, want_reply=True)

    def _join_attempt(self) -> None:
        if self._joined:
            return
        for seed in self._seeds:
            self._send_state(seed, want_reply=True)
        cfg = self.config
        delay = min(cfg.join_retry_max, cfg.join_retry_initial * 2 ** min(self._join_attempts, 30))
        self._join_attempts += 1
        self._join_call = self._schedule(delay * self._rng.uniform(0.8, 1.0), self._join_attempt)

    def _mark_joined(self) -> None:
        if self._joined:
            return
        self._joined = True
        self._cancel(self._join_call)
        self._log.info("gossip_joined", attempts=self._join_attempts)
        waiters, self._join_waiters = self._join_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _send_state(self, addr: Address, want_reply: bool) -> None:
        """Send our view as push-pull datagrams: this member first in each, the others in a
        random order, at most ``push_pull_max_datagrams``; only the last asks for a reply,
        so that the peer answers after merging all that arrived."""
        own = encode_update(Alive(self.local)) if not self._leaving else \
            encode_update(Left(self._id, self.local.incarnation))
        records = [encode_update(self._as_update(m)) for k, m in self._members.items()
                   if k != self._id]
        self._rng.shuffle(records)
        header_len = len(encode_message(PushPull(self._id, True)))
        room = self.config.max_datagram - self._codec.overhead - header_len - len(own)
        chunks: list[list[bytes]] = [[]]
        used = 0
        for record in records:
            if used + len(record) > room:
                if len(chunks) == self.config.push_pull_max_datagrams:
                    break
                chunks.append([])
                used = 0
            chunks[-1].append(record)
            used += len(record)
        for i, chunk in enumerate(chunks):
            ask = want_reply and i == len(chunks) - 1
            body = b"".join([encode_message(PushPull(self._id, ask)), own, *chunk])
            self._transmit(addr, self._codec.seal(body))

    def _as_update(self, member: Member) -> Update:
        if member.state is ALIVE:
            return Alive(member)
        if member.state is SUSPECT:
            return Suspect(member.id, member.incarnation, self._id)
        if member.state is DEAD:
            return Dead(member.id, member.incarnation, self._id)
        return Left(member.id, member.incarnation)

    def _reap_tombstones(self) -> None:
        limit = self._clock.seconds() - self.config.reap_timeout
        for member_id in [k for k, m in self._members.items()
                          if m.state in (DEAD, LEFT) and self._changed_at[k] <= limit]:
            gone = self._members.pop(member_id)
            del self._changed_at[member_id]
            self._counts[gone.state] -= 1
            self._log.info("gossip_reaped", peer=member_id, state=str(gone.state))

    def _finish_leave(self) -> None:
        self.stop()

    # --- plumbing --------------------------------------------------------------------------

    def _set(self, member: Member) -> None:
        old = self._members.get(member.id)
        if old is not None:
            self._counts[old.state] -= 1
        if old is None or old.state is not member.state:
            self._changed_at[member.id] = self._clock.seconds()
        self._counts[member.state] += 1
        self._members[member.id] = member

    def _peers(self, states: tuple[MemberState, ...]) -> list[Member]:
        return [m for k, m in self._members.items() if k != self._id and m.state in states]

    def _addr(self, member: Member) -> Address:
        return parse_addr(member.gossip_addr)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _retransmit_limit(self) -> int:
        size = self._counts[ALIVE] + self._counts[SUSPECT]
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(size + 1)))

    def _send(self, addr: Address, message: Message, priority: Sequence[bytes] = (),
              skip: str | None = None) -> None:
        """Send ``message`` with as many pending updates as fit (SWIM §4.1 piggybacking)."""
        parts = [encode_message(message)]
        budget = self.config.max_datagram - self._codec.overhead - len(parts[0])
        for data in priority:
            if len(data) <= budget:
                parts.append(data)
                budget -= len(data)
        parts.extend(self._broadcasts.take(budget, self._retransmit_limit(), skip))
        self._transmit(addr, self._codec.seal(b"".join(parts)))

    def _transmit(self, addr: Address, data: bytes) -> None:
        if not self._running:
            return  # e.g. a listener stopped this member while a datagram was handled
        self.stats.sent_datagrams += 1
        self.stats.sent_bytes += len(data)
        if self._metrics:
            self._metrics.sent.inc()
            self._metrics.sent_bytes.inc(len(data))
        try:
            self._send_fn(addr, data)
        except Exception as exc:  # e.g. an unroutable address; the probe will time out
            self._log.warning("gossip_send_failed", peer=addr, error=repr(exc))

    def _drop(self, reason: str, addr: Address, detail: str) -> None:
        self.stats.dropped[reason] += 1
        if self._metrics:
            self._metrics.dropped.labels(reason).inc()
        self._log.debug("gossip_datagram_dropped", reason=reason, peer=addr, detail=detail)

    def _emit(self, event: GossipEvent, member: Member) -> None:
        self._log.info("gossip_member_" + event.value, peer=member.id,
                       incarnation=member.incarnation)
        for listener in list(self._listeners):
            try:
                listener(event.value, member)
            except Exception:
                self._log.exception("gossip_listener_failed", gossip_event=event.value)

    def _schedule(self, delay: float, fn: Callable[..., Any], *args: Any) -> IDelayedCall:
        holder: list[IDelayedCall] = []

        def fire() -> None:
            self._timers.discard(holder[0])
            if self._running:
                fn(*args)

        call = self._clock.callLater(max(0.0, delay), fire)
        holder.append(call)
        self._timers.add(call)
        return call

    def _cancel(self, call: IDelayedCall | None) -> None:
        if call is not None:
            if call.active():
                call.cancel()
            self._timers.discard(call)

    def _check_metadata_size(self, local: Member) -> None:
        size = len(encode_update(Alive(local)))
        if size > self.config.max_datagram // 4:
            raise ValueError(f"member metadata takes {size} bytes on the wire; keep it under "
                             f"{self.config.max_datagram // 4} (max_datagram / 4)")


def _to_address(seed: str | Sequence[Any]) -> Address:
    if isinstance(seed, str):
        return parse_addr(seed)
    host, port = seed
    return parse_addr(format_addr(str(host), int(port)))


class _Metrics:
    """Prometheus metrics of one member."""

    def __init__(self, registry: CollectorRegistry, member: SwimMember) -> None:
        from prometheus_client import Counter as PromCounter, Gauge

        self.dropped = PromCounter("bwraft_gossip_dropped_datagrams",
                                   "Gossip datagrams dropped, by reason", ["reason"],
                                   registry=registry)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        self.sent = PromCounter("bwraft_gossip_sent_datagrams", "Gossip datagrams sent",
                                registry=registry)
        self.sent_bytes = PromCounter("bwraft_gossip_sent_bytes", "Gossip bytes sent",
                                      registry=registry)
        self.received = PromCounter("bwraft_gossip_received_datagrams",
                                    "Gossip datagrams received", registry=registry)
        members = Gauge("bwraft_gossip_members", "Members in this member's view, by state",
                        ["state"], registry=registry)
        for state in MemberState:
            members.labels(str(state)).set_function(lambda s=state: member._counts[s])
        Gauge("bwraft_gossip_health_score", "Lifeguard local health score (0 is healthy)",
              registry=registry).set_function(lambda: member.health_score)


# --- UDP binding ---------------------------------------------------------------------------

class GossipProtocol(DatagramProtocol):
    """Binds a :class:`SwimMember` to a UDP port: the member's ``send`` is :meth:`send`."""

    def __init__(self) -> None:
        self.member: SwimMember | None = None

    def send(self, addr: Address, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data, addr)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:  # noqa: N802 (Twisted)
        if self.member is not None:
            self.member.datagram_received(datagram, (addr[0], addr[1]))


def listen_gossip(reactor: Any, local: Member, *, config: GossipConfig | None = None,
                  seeds: Iterable[str | Sequence[Any]] = (), secret: bytes | None = None,
                  registry: CollectorRegistry | None = None, rng: random.Random | None = None,
                  interface: str | None = None,
                  logger: Any = None) -> tuple[SwimMember, IListeningPort]:
    """Bind UDP at ``local.gossip_addr`` (port 0: any free port) and make the member.

    The returned member advertises the bound port; call its ``start()``.

    Args:
        reactor: Provides ``IReactorUDP`` and ``IReactorTime``.
        local: This member; the host of ``gossip_addr`` is advertised to others.
        interface: The address to bind; by default the host of ``gossip_addr``.
        rng: Defaults to a ``random.Random`` seeded by the operating system.
        config, seeds, secret, registry, logger: As for :class:`SwimMember`.
    """
    config = config or GossipConfig()
    host, port = parse_addr(local.gossip_addr, allow_port_zero=True)
    protocol = GossipProtocol()
    listening = reactor.listenUDP(port, protocol, interface=interface or host,
                                  maxPacketSize=config.max_datagram + 1)
    local = replace(local, gossip_addr=format_addr(host, listening.getHost().port))
    member = SwimMember(local, protocol.send, reactor, rng or random.Random(), config, seeds,
                        secret, registry, logger)
    protocol.member = member
    return member, listening


class GossipService(service.Service):
    """A Twisted service running one gossip member: listen and start, leave and close.

    Args and keywords are those of :func:`listen_gossip`. Listeners added before the
    service starts are attached to the member when it is made.
    """

    def __init__(self, reactor: Any, local: Member, **kwargs: Any) -> None:
        self._reactor = reactor
        self._local = local
        self._kwargs = kwargs
        self._listeners: list[Listener] = []
        self.member: SwimMember | None = None
        self.port: IListeningPort | None = None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self.member is not None:
            self.member.add_listener(listener)

    def startService(self) -> None:  # noqa: N802 (Twisted)
        self.member, self.port = listen_gossip(self._reactor, self._local, **self._kwargs)
        for listener in self._listeners:
            self.member.add_listener(listener)
        self.member.start()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 (Twisted)
        super().stopService()
        member, port = self.member, self.port
        done: defer.Deferred[None] = defer.succeed(None)
        if member is not None and member.running and not member.leaving:
            done = member.leave()
        if port is not None:
            done.addCallback(lambda _: port.stopListening())
        return done
