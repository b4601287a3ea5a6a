"""The ``observer`` role: a stateless, non-voting replica that serves reads (BW-Raft).

An observer (PROTOCOL.md "Observer") receives the log like a learner, from the leader or from
its datacenter's secretary, applies it to its own state machine, and answers client reads so
that read throughput grows with the number of observers without touching the write quorum.
It joins through gossip knowing only a seed address and leaves without any configuration
change: it is not in the Raft configuration at all. Its kernel is non-voting, so it never
campaigns, never grants a vote and never counts toward a quorum.

The one plugin plays both sides:

- **On an observer** (``role = "observer"``) it runs :class:`ObserverService`, which serves
  the ``bwraft_read_barrier`` hook with a :class:`ReadBatcher`. A linearizable read (the
  default) asks the leader for a read index (ReadIndex, Raft dissertation §6.4), shared by
  every read that arrived while no request was in flight, and is answered once the observer
  has applied that index. A stale read is answered at once from local state. A lagging
  observer refuses with 503 quickly instead of hanging: when it already knows it is more than
  ``max_lag_entries`` behind, or when the read index is not applied within ``max_wait_ms``.
  Writes reaching an observer are forwarded to the leader by the HTTP API.
- **On a voter** (name ``[plugins.observer]`` in its config) it feeds the observers gossip
  announces: every voter keeps the kernel's helper set equal to the live observers it knows,
  so whichever voter leads sends them the log. A dead or departed observer is dropped; one
  that restarted (announced by a new ``run`` tag) is fed from a fresh probe, so an observer
  restarted without its data is brought up to date from scratch (or from a snapshot).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from bwcore.errors import Unavailable
from bwcore.hookspecs import hookimpl
from bwcore.kernel import MessageType, StateRole

__all__ = ["ObserverMetrics", "ObserverPlugin", "ObserverService", "ReadBatcher", "ROLE"]

ROLE = "observer"
#: The gossip tag an observer sets to a new random value in every run of its process.
RUN_TAG = "run"
#: Gossip events after which a voter feeds a member that plays the observer role.
_FEED_EVENTS = ("joined", "updated", "alive")
#: Gossip events after which a voter stops feeding a member.
_DROP_EVENTS = ("dead", "left")
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ObserverMetrics:
    """The observer's Prometheus collectors (served at ``GET /metrics``).

    Args:
        registry: The node's registry.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.read_index_requests = Counter(
            "bwraft_observer_read_index_requests_total",
            "ReadIndex requests an observer sent for linearizable reads (one per batch).",
            registry=registry)
        self.batch_size = Histogram(
            "bwraft_observer_read_batch_size",
            "Linearizable reads sharing one ReadIndex request.",
            buckets=_BATCH_BUCKETS, registry=registry)
        self.wait_seconds = Histogram(
            "bwraft_observer_read_wait_seconds",
            "Time a linearizable read waited for its read index to be confirmed and applied.",
            buckets=_WAIT_BUCKETS, registry=registry)
        self.reads = Counter(
            "bwraft_observer_reads_total",
            "Reads an observer served, by consistency mode (linearizable, stale).",
            ["consistency"], registry=registry)
        self.refused = Counter(
            "bwraft_observer_reads_refused_total",
            "Linearizable reads an observer answered 503 (no_leader, lagging, timeout,"
            " failed, stopping).",
            ["reason"], registry=registry)
        self.fed = Gauge(
            "bwraft_observer_fed_observers",
            "On a voter: observers its kernel feeds the log to when it leads.",
            registry=registry)


@dataclass(eq=False)
class _Read:
    """One linearizable read waiting for a read index."""

    deferred: Deferred[int]
    started: float
    expiry: Any = field(default=None, repr=False)


class ReadBatcher:
    """Linearizable and stale reads on an observer (PROTOCOL.md "Observer").

    At most one ReadIndex request is in flight; reads that arrive meanwhile wait and share
    the next one, so a busy observer asks the leader once per round trip, not once per read.
    A read never uses a read index requested before it arrived: the leader must confirm its
    commit index after the read began, or the read could miss a write acknowledged before
    it (the stale-read bug class ReadIndex exists to prevent).

    Args:
        node: The observer's node (``kernel``, ``read_barrier``, ``reactor``).
        metrics: Where to count.
        max_wait: Seconds a read may wait for its read index to be confirmed and applied.
        max_lag: Entries the observer may be behind the read index and still wait.
        timer: Monotonic seconds, for the wait-time histogram only.
    """

    def __init__(self, node: Any, metrics: ObserverMetrics, *, max_wait: float, max_lag: int,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.node = node
        self.metrics = metrics
        self.max_wait = max_wait
        self.max_lag = max_lag
        self._timer = timer
        self._queued: list[_Read] = []
        self._in_flight: list[_Read] | None = None
        self._flush_call: Any = None
        self._stopped = False

    @property
    def queued(self) -> int:
        """Reads waiting for the next ReadIndex request."""
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        """Reads sharing the ReadIndex request in flight (0 when none is)."""
        return len(self._in_flight or ())

    def stale(self) -> Deferred[int]:
        """A stale read: served at once at the applied index."""
        kernel = self.node.kernel
        if self._stopped or kernel is None:
            return self._refuse("stopping", "observer not serving")
        self.metrics.reads.labels("stale").inc()
        return succeed(kernel.applied_index)

    def linearizable(self, timeout: float) -> Deferred[int]:
        """A linearizable read: fires once the state machine has applied a read index the
        leader confirmed after this call (errback :class:`Unavailable` for a 503)."""
        kernel = self.node.kernel
        if self._stopped or kernel is None:
            return self._refuse("stopping", "observer not serving")
        if kernel.leader is None:
            return self._refuse("no_leader", "observer knows no leader yet, retry")
        behind = kernel.commit_index - kernel.applied_index
        if behind > self.max_lag:
            return self._refuse("lagging", f"observer is {behind} entries behind, retry"
                                           " elsewhere")
        read = _Read(Deferred(), self._timer())
        wait = max(0.0, min(timeout, self.max_wait))
        read.expiry = self.node.reactor.callLater(wait, self._expire, read, wait)
        self._queued.append(read)
        if self._in_flight is None and self._flush_call is None:
            # Reads of this reactor turn join the same request.
            self._flush_call = self.node.reactor.callLater(0, self._flush)
        return read.deferred

    def stop(self) -> None:
        """Refuse every waiting read and every later one."""
        self._stopped = True
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        waiting = self._queued + (self._in_flight or [])
        self._queued, self._in_flight = [], None
        for read in waiting:
            self._finish(read, Unavailable("observer stopping"), "stopping")

    # -- internals -------------------------------------------------------------------------

    def _refuse(self, reason: str, message: str) -> Deferred[int]:
        self.metrics.refused.labels(reason).inc()
        d: Deferred[int] = Deferred()
        d.errback(Failure(Unavailable(message)))
        return d

    def _flush(self) -> None:
        self._flush_call = None
        batch = [read for read in self._queued if not read.deferred.called]
        self._queued = []
        if not batch or self._stopped:
            return
        self._in_flight = batch
        self.metrics.read_index_requests.inc()
        self.metrics.batch_size.observe(len(batch))
        d = Deferred.fromCoroutine(
            self.node.read_barrier(timeout=self.max_wait, max_lag=self.max_lag))
        d.addCallbacks(self._answered, self._failed, callbackArgs=(batch,),
                       errbackArgs=(batch,))

    def _answered(self, index: int, batch: list[_Read]) -> None:
        for read in batch:
            self._finish(read, index, None)
        self._next(batch)

    def _failed(self, failure: Failure, batch: list[_Read]) -> None:
        error = failure.value
        if not isinstance(error, Unavailable):
            error = Unavailable(f"read index failed: {type(error).__name__}: {error}")
        reason = "lagging" if "behind the read index" in str(error) else "failed"
        for read in batch:
            self._finish(read, error, reason)
        self._next(batch)

    def _next(self, batch: list[_Read]) -> None:
        if self._in_flight is batch:
            self._in_flight = None
            if self._queued and not self._stopped:
                self._flush()

    def _expire(self, read: _Read, wait: float) -> None:
        read.expiry = None
        self._finish(read, Unavailable(f"observer lagging: read index not applied within"
                                       f" {wait * 1000:g} ms, retry elsewhere"), "timeout")

    def _finish(self, read: _Read, result: int | Exception, refused: str | None) -> None:
        if read.expiry is not None and read.expiry.active():
            read.expiry.cancel()
        read.expiry = None
        if read.deferred.called:
            return
        if isinstance(result, Exception):
            self.metrics.refused.labels(refused or "failed").inc()
            read.deferred.errback(Failure(result))
            return
        self.metrics.reads.labels("linearizable").inc()
        self.metrics.wait_seconds.observe(self._timer() - read.started)
        read.deferred.callback(result)


class ObserverService(Service):
    """Runs the observer role on its node: serves reads, announces each run in gossip.

    Args:
        node: The observer's node.
        metrics: The plugin's metrics.
        max_wait: See :class:`ReadBatcher`.
        max_lag: See :class:`ReadBatcher`.
        run_id: A value unique to this run of the process, set as the gossip tag ``run`` so
            that voters notice a restart and feed the observer from a fresh probe.
    """

    name = "observer"

    def __init__(self, node: Any, metrics: ObserverMetrics, *, max_wait: float, max_lag: int,
                 run_id: str) -> None:
        self.node = node
        self.run_id = run_id
        self.reads = ReadBatcher(node, metrics, max_wait=max_wait, max_lag=max_lag)

    def startService(self) -> None:  # noqa: N802 (Twisted)
        super().startService()
        member = getattr(getattr(self.node, "gossip", None), "member", None)
        if member is not None:
            tags = dict(member.local.tags)
            tags[RUN_TAG] = self.run_id
            member.update_local(tags=tags)

    def stopService(self) -> Any:  # noqa: N802 (Twisted)
        self.reads.stop()
        return super().stopService()

    def barrier(self, consistency: str, timeout: float) -> Deferred[int]:
        """The wait of one client read (the ``bwraft_read_barrier`` answer)."""
        if consistency == "stale":
            return self.reads.stale()
        return self.reads.linearizable(timeout)


class ObserverPlugin:
    """The ``observer`` entry point: the role on observers, the feeding on voters.

    Settings (``[plugins.observer]``):

    - ``max_wait_ms`` — longest a linearizable read on an observer waits for its read index
      to be confirmed and applied before answering 503 (default 1000).
    - ``max_lag_entries`` — an observer this many entries (or more) behind answers
      linearizable reads 503 at once instead of waiting to catch up (default 10000).
    - ``feed_observers`` — on a voter, feed the observers gossip announces (default true).

    Args:
        settings: The validated settings.
        rng: Randomness for the run id (default: seeded from the OS).
    """

    settings_defaults = {"max_wait_ms": 1000, "max_lag_entries": 10_000,
                         "feed_observers": True}

    def __init__(self, settings: dict[str, Any], *, rng: random.Random | None = None) -> None:
        if settings["max_wait_ms"] <= 0:
            raise ValueError(f"max_wait_ms must be positive, got {settings['max_wait_ms']}")
        if settings["max_lag_entries"] < 0:
            raise ValueError("max_lag_entries must not be negative, got"
                             f" {settings['max_lag_entries']}")
        self.max_wait = settings["max_wait_ms"] / 1000
        self.max_lag = settings["max_lag_entries"]
        self.feed_observers = settings["feed_observers"]
        self._rng = rng if rng is not None else random.Random(os.urandom(16))
        self.metrics: ObserverMetrics | None = None
        self.service: ObserverService | None = None
        #: On a voter: the observers its kernel feeds, with the run each was last seen in.
        self.fed: dict[str, str] = {}

    # -- both sides ------------------------------------------------------------------------

    @hookimpl
    def bwraft_metrics(self, registry: CollectorRegistry) -> None:
        self.metrics = ObserverMetrics(registry)

    # -- the observer side -----------------------------------------------------------------

    @hookimpl
    def bwraft_role_service(self, node: Any) -> ObserverService | None:
        if node.config.role != ROLE:
            return None
        if self.metrics is None:  # a node that did not call bwraft_metrics
            self.metrics = ObserverMetrics(CollectorRegistry())
        self.service = ObserverService(node, self.metrics, max_wait=self.max_wait,
                                       max_lag=self.max_lag,
                                       run_id=f"{self._rng.getrandbits(64):016x}")
        return self.service

    @hookimpl
    def bwraft_read_barrier(self, node: Any, consistency: str, timeout: float
                            ) -> Deferred[int] | None:
        if self.service is None or node is not self.service.node:
            return None
        return self.service.barrier(consistency, timeout)

    # -- the voter side --------------------------------------------------------------------

    @hookimpl
    def bwraft_node_started(self, node: Any) -> None:
        # Members gossip reported before the kernel existed: feed them now.
        member = getattr(getattr(node, "gossip", None), "member", None)
        if member is None:
            return
        for known in member.members():
            if str(getattr(known, "state", "")) in ("alive", "suspect"):
                self.bwraft_member_event(node, "joined", known)

    @hookimpl
    def bwraft_route_messages(self, node: Any, messages: list[Any]) -> None:
        # A ReadIndex round's heartbeats (those with a context) confirm leadership only
        # through the acknowledgements of voters (dissertation §6.4); an observer's would not
        # count, so it is not asked. Its regular heartbeats (empty context) still go.
        kernel = node.kernel
        if self.fed and kernel is not None and kernel.role is StateRole.LEADER:
            messages[:] = [m for m in messages if not (
                m.type is MessageType.HEARTBEAT and m.context and m.to in self.fed)]

    @hookimpl
    def bwraft_status(self, node: Any) -> dict[str, Any] | None:
        if self.service is not None and node is self.service.node:
            reads = self.service.reads
            return {"observer": {"reads_queued": reads.queued, "reads_in_flight":
                                 reads.in_flight, "max_wait_ms": round(self.max_wait * 1000),
                                 "max_lag_entries": self.max_lag}}
        if node.config.is_voter and self.feed_observers:
            return {"observers_fed": sorted(self.fed)}
        return None

    @hookimpl
    def bwraft_member_event(self, node: Any, event: str, member: Any) -> None:
        if not self.feed_observers or not node.config.is_voter:
            return
        member_id = getattr(member, "id", None)
        if not isinstance(member_id, str) or member_id == node.node_id \
                or member_id in node.config.cluster.voters:
            return  # a voter is never a helper, whatever gossip says of it
        is_observer = getattr(member, "role", None) == ROLE
        tags = getattr(member, "tags", None)
        run = tags.get(RUN_TAG, "") if isinstance(tags, dict) else ""
        run = run if isinstance(run, str) else ""
        if event in _FEED_EVENTS and is_observer:
            previous = self.fed.get(member_id)
            if previous is not None and previous != run:
                # A new run of the observer may have lost its log: the leader's progress for
                # it (its match index) no longer holds, so probe it afresh (Raft §5.3).
                node.remove_helper(member_id)
            self.fed[member_id] = run
            node.add_helper(member_id)
        elif member_id in self.fed and (event in _DROP_EVENTS or event in _FEED_EVENTS):
            # Dead, departed, or no longer an observer: stop feeding it. No configuration
            # change is needed, as an observer was never in the configuration.
            del self.fed[member_id]
            node.remove_helper(member_id)
        if self.metrics is not None:
            self.metrics.fed.set(len(self.fed))
