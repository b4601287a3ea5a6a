"""Peer TCP transport: framed kernel messages and plugin frames between nodes.

Each node dials one outbound connection per peer and only writes on it; a peer's replies
arrive on the connection that peer dialled. Outbound traffic goes through a per-peer queue
bounded in bytes, so :meth:`PeerTransport.send` never blocks: when the queue is full the
oldest kernel messages are dropped, which Raft tolerates because the leader retransmits
whatever is not acknowledged (Raft §5.3, "the leader retries AppendEntries indefinitely").

Inbound connections must open with a :class:`~bwcore.codec.Hello`; anything malformed,
oversized or unauthenticated closes that one connection and is counted, never more.
The wire format is in :mod:`bwcore.codec` and docs/wire.md.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable

import structlog
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IPushProducer, ITCPTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from bwcore.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    FrameError,
    Hello,
    PluginFrame,
    encode_frame,
)
from bwcore.kernel import Message

__all__ = ["OnFrame", "PeerTransport", "TransportMetrics"]

#: ``on_frame(peer_id, obj)``: ``obj`` is a kernel Message or a PluginFrame.
OnFrame = Callable[[str, "Message | PluginFrame"], Any]

#: One ``transport.write`` carries at most this much (or one larger frame), so that a long
#: backlog is handed to TCP in steps the producer/consumer flow control can pause.
_MAX_WRITE_BYTES = 1 << 20


class TransportMetrics:
    """The transport's Prometheus counters, created on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent_bytes = Counter(
            "bwraft_transport_sent_bytes", "Bytes written to peer connections.",
            ["peer"], registry=registry)
        self.sent_messages = Counter(
            "bwraft_transport_sent_messages", "Messages and plugin frames written to peers.",
            ["peer"], registry=registry)
        self.received_bytes = Counter(
            "bwraft_transport_received_bytes", "Bytes read from inbound peer connections.",
            registry=registry)
        self.rejected_frames = Counter(
            "bwraft_transport_rejected_frames",
            "Inbound frames or connections rejected, by reason.", ["reason"], registry=registry)
        self.dropped_messages = Counter(
            "bwraft_transport_dropped_messages",
            "Outbound messages dropped (queue full, unknown peer, frame too large).",
            ["peer"], registry=registry)


class _SendQueue:
    """A FIFO of encoded frames bounded in bytes that sheds the oldest kernel messages first.

    Items are ``[frame, alive]`` lists shared between the FIFO and an index of the kernel
    items, so dropping the oldest kernel message is O(1); dropped items are skipped lazily
    and compacted away once they outnumber the live ones.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._count = 0
        self._items: deque[list[Any]] = deque()
        self._kernel: deque[list[Any]] = deque()  # exactly the live kernel items, in order
        self._dead = 0

    def __len__(self) -> int:
        return self._count

    def append(self, frame: bytes, kernel: bool) -> int:
        """Queue ``frame``, dropping older frames to make room; return how many were dropped."""
        dropped = 0
        while self._count and self.bytes + len(frame) > self.limit:
            victim = self._kernel.popleft() if self._kernel else self._pop_oldest()
            self._kill(victim)
            dropped += 1
        item = [frame, True]
        self._items.append(item)
        if kernel:
            self._kernel.append(item)
        self.bytes += len(frame)
        self._count += 1
        if self._dead > self._count:
            self._items = deque(i for i in self._items if i[1])
            self._dead = 0
        return dropped

    def take(self, max_bytes: int) -> list[bytes]:
        """Remove and return the oldest frames, at most ``max_bytes`` (at least one frame)."""
        out: list[bytes] = []
        size = 0
        items = self._items
        while items:
            item = items[0]
            if not item[1]:
                items.popleft()
                self._dead -= 1
                continue
            if out and size + len(item[0]) > max_bytes:
                break
            items.popleft()
            if self._kernel and self._kernel[0] is item:
                self._kernel.popleft()
            item[1] = False
            out.append(item[0])
            size += len(item[0])
            self.bytes -= len(item[0])
            self._count -= 1
        return out

    def clear(self) -> int:
        """Drop everything; return how many frames were dropped."""
        count = self._count
        self._items.clear()
        self._kernel.clear()
        self.bytes = self._count = self._dead = 0
        return count

    def _pop_oldest(self) -> list[Any]:
        while True:
            item = self._items.popleft()
            if item[1]:
                return item
            self._dead -= 1

    def _kill(self, item: list[Any]) -> None:
        self.bytes -= len(item[0])
        item[0] = b""  # free the frame now; the husk is skipped or compacted later
        item[1] = False
        self._count -= 1
        self._dead += 1


def _describe(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


class _WhenLost:
    """Deferreds that fire when a protocol's connection is gone."""

    def __init__(self) -> None:
        self._waiters: list[defer.Deferred[None]] = []
        self.lost = False

    def wait(self) -> defer.Deferred[None]:
        if self.lost:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self) -> None:
        self.lost = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


# --------------------------------------------------------------------------------------
# Outbound
# --------------------------------------------------------------------------------------

class _PeerProtocol(Protocol):
    """A peer connection whose closing can be awaited."""

    def __init__(self) -> None:
        self.when_lost = _WhenLost()


@implementer(IPushProducer)
class _OutboundProtocol(_PeerProtocol):
    """Writes one peer's queue; paused by TCP flow control when the socket buffer is full."""

    def __init__(self, link: _PeerLink) -> None:
        super().__init__()
        self.link = link
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        if ITCPTransport.providedBy(self.transport):
            # We coalesce writes ourselves, so Nagle's algorithm would only add latency.
            self.transport.setTcpNoDelay(True)
            self.transport.setTcpKeepAlive(True)
        self.link.connected(self)

    def dataReceived(self, data: bytes) -> None:
        """Peers never write on a connection they accepted; ignore anything that arrives."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.when_lost.fire()
        self.link.connection_lost(self, reason)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.link.schedule_flush()

    def stopProducing(self) -> None:
        self.paused = True


class _OutboundFactory(ClientFactory):
    """One connection attempt of one link; stale attempts are recognised and closed."""

    def __init__(self, link: _PeerLink) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> _OutboundProtocol:
        return _OutboundProtocol(self.link)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link.connect_failed(self, reason)


class _PeerLink:
    """Outbound state for one peer: address, send queue, connection and reconnect backoff."""

    def __init__(self, owner: PeerTransport, peer_id: str, host: str, port: int) -> None:
        self.owner = owner
        self.peer_id = peer_id
        self.host = host
        self.port = port
        self.queue = _SendQueue(owner.max_queue_bytes)
        self.factory: _OutboundFactory | None = None  # the attempt in progress
        self.connector: Any = None
        self.protocol: _OutboundProtocol | None = None
        self.retry: Any = None  # DelayedCall while backing off
        self.flush_call: Any = None  # DelayedCall: the flush at the end of this reactor turn
        self.failures = 0
        self.connected_at = 0.0
        self.closed = False
        # This peer's counters, looked up once: flush() runs for every write to the socket.
        self._sent_bytes = owner.metrics.sent_bytes.labels(peer_id)
        self._sent_messages = owner.metrics.sent_messages.labels(peer_id)

    def enqueue(self, frame: bytes, kernel: bool) -> None:
        dropped = self.queue.append(frame, kernel)
        if dropped:
            self.owner.metrics.dropped_messages.labels(self.peer_id).inc(dropped)
            self.owner.log.debug("send_queue_full", peer=self.peer_id, dropped=dropped,
                                 queued_bytes=self.queue.bytes)
        self.kick()

    def kick(self) -> None:
        """Make progress: flush if connected, else dial unless dialling or backing off."""
        if self.closed:
            return
        if self.protocol is not None:
            self.schedule_flush()
        elif self.factory is None and self.retry is None and len(self.queue):
            self.dial()

    def dial(self) -> None:
        self.factory = _OutboundFactory(self)
        self.connector = self.owner.reactor.connectTCP(
            self.host, self.port, self.factory, timeout=self.owner.connect_timeout)

    def connected(self, protocol: _OutboundProtocol) -> None:
        if self.closed or protocol.link is not self or self.protocol is not None:
            protocol.transport.loseConnection()
            return
        self.factory = self.connector = None
        self.protocol = protocol
        self.connected_at = self.owner.reactor.seconds()
        self.owner.log.debug("peer_connected", peer=self.peer_id,
                             address=f"{self.host}:{self.port}")
        self.flush(first=[self.owner.hello_frame])

    def connect_failed(self, factory: _OutboundFactory, reason: Failure) -> None:
        if factory is not self.factory:
            return
        self.factory = self.connector = None
        self.owner.log.debug("peer_connect_failed", peer=self.peer_id,
                             address=f"{self.host}:{self.port}", reason=reason.getErrorMessage())
        self.failures += 1
        self.back_off()

    def connection_lost(self, protocol: _OutboundProtocol, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()
        self.flush_call = None
        self.owner.log.debug("peer_connection_lost", peer=self.peer_id,
                             reason=reason.getErrorMessage())
        if self.closed:
            return
        # A connection that stayed up for a full backoff period counts as a success; one
        # that a peer closes at once (wrong secret, refused) keeps backing off.
        if self.owner.reactor.seconds() - self.connected_at >= self.owner.backoff_max:
            self.failures = 0
            self.kick()
        else:
            self.failures += 1
            self.back_off()

    def back_off(self) -> None:
        if self.closed:
            return
        self.retry = self.owner.reactor.callLater(self.owner.backoff_delay(self.failures),
                                                  self._retry)

    def _retry(self) -> None:
        self.retry = None
        self.kick()

    def schedule_flush(self) -> None:
        # callLater(0) runs after the current reactor turn: every frame queued in this turn
        # goes out in the same write.
        if self.flush_call is None:
            self.flush_call = self.owner.reactor.callLater(0, self.flush)

    def flush(self, first: list[bytes] | None = None) -> None:
        """Write the queue (after ``first``) until it is empty or TCP pauses us."""
        if self.flush_call is not None and self.flush_call.active():
            self.flush_call.cancel()  # called directly: the scheduled flush is redundant
        self.flush_call = None
        protocol = self.protocol
        if protocol is None:
            return
        extra = first or []
        while (extra or len(self.queue)) and not protocol.paused:
            frames = self.queue.take(_MAX_WRITE_BYTES)
            data = b"".join(extra + frames)
            extra = []
            protocol.transport.write(data)  # may call pauseProducing before returning
            self._sent_bytes.inc(len(data))
            if frames:
                self._sent_messages.inc(len(frames))

    def close(self) -> _OutboundProtocol | None:
        """Stop for good: cancel timers and attempts, hand TCP what is queued, then close.

        Returns:
            The connection being closed, if there was one.
        """
        self.closed = True
        for call in (self.retry, self.flush_call):
            if call is not None and call.active():
                call.cancel()
        self.retry = self.flush_call = None
        if self.protocol is not None:
            # Hand TCP what is queued (a TIMEOUT_NOW sent just before a shutdown, say).
            self.flush()
        dropped = self.queue.clear()
        if dropped:
            self.owner.metrics.dropped_messages.labels(self.peer_id).inc(dropped)
        if self.connector is not None:
            self.connector.stopConnecting()
        self.factory = self.connector = None
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.transport.unregisterProducer()
            protocol.transport.loseConnection()  # TCP still sends what it holds
        return protocol


# --------------------------------------------------------------------------------------
# Inbound
# --------------------------------------------------------------------------------------

class _InboundProtocol(_PeerProtocol):
    """Decodes one accepted connection and hands its frames to ``on_frame``."""

    def __init__(self, owner: PeerTransport) -> None:
        super().__init__()
        self.owner = owner
        self.decoder = FrameDecoder(owner.max_frame_bytes, owner.secret)
        self.peer_id: str | None = None
        self.address = "?"
        self.closing = False
        self.hello_timer: Any = None

    def connectionMade(self) -> None:
        owner = self.owner
        self.address = _describe(self.transport.getPeer())
        if owner.stopped:
            self.closing = True
            self.transport.loseConnection()
            return
        if len(owner.inbound) >= owner.max_inbound_connections:
            owner.metrics.rejected_frames.labels("too_many_connections").inc()
            owner.log.warning("inbound_refused", address=self.address,
                              limit=owner.max_inbound_connections)
            self.closing = True
            self.transport.loseConnection()
            return
        owner.inbound.add(self)
        self.hello_timer = owner.reactor.callLater(owner.hello_timeout, self._hello_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        self.owner.metrics.received_bytes.inc(len(data))
        self.decoder.push(data)
        try:
            for frame in self.decoder:
                self._handle(frame)
                if self.closing:
                    return
        except FrameError as exc:
            self.reject(exc.reason, exc.detail)

    def _handle(self, frame: Any) -> None:
        if self.peer_id is None:
            if not isinstance(frame, Hello):
                self.reject("no_hello", f"first frame was {type(frame).__name__}")
            elif frame.cluster_name != self.owner.cluster_name:
                self.reject("cluster_mismatch", f"peer is in cluster {frame.cluster_name!r}")
            elif not frame.node_id:
                self.reject("malformed", "empty node id in hello")
            else:
                self._cancel_hello_timer()
                self.peer_id = frame.node_id
                self.owner.inbound_identified(self)
        elif isinstance(frame, Hello):
            self.reject("unexpected_hello", "hello after the first frame")
        else:
            self.owner.deliver(self.peer_id, frame)

    def reject(self, reason: str, detail: str) -> None:
        """Count and log a bad frame, then close this connection (and only this one)."""
        if self.closing:
            return
        self.owner.metrics.rejected_frames.labels(reason).inc()
        self.owner.log.warning("frame_rejected", address=self.address, peer=self.peer_id,
                               reason=reason, detail=detail)
        self.close()

    def close(self) -> defer.Deferred[None]:
        if not self.closing:
            self.closing = True
            self._cancel_hello_timer()
            self.transport.loseConnection()
        return self.when_lost.wait()

    def _hello_timed_out(self) -> None:
        self.hello_timer = None
        self.reject("hello_timeout", f"no hello within {self.owner.hello_timeout} s")

    def _cancel_hello_timer(self) -> None:
        if self.hello_timer is not None and self.hello_timer.active():
            self.hello_timer.cancel()
        self.hello_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        self._cancel_hello_timer()
        self.owner.inbound_lost(self)
        self.when_lost.fire()


class _InboundFactory(Factory):
    def __init__(self, owner: PeerTransport) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _InboundProtocol:
        return _InboundProtocol(self.owner)


# --------------------------------------------------------------------------------------
# The transport
# --------------------------------------------------------------------------------------

class PeerTransport:
    """Sends framed messages to peers and delivers the frames peers send.

    Args:
        node_id: This node's id, announced in the hello of every outbound connection.
        reactor: Provides ``IReactorTCP`` and ``IReactorTime`` (a ``MemoryReactorClock``
            in tests); every timer and connection goes through it.
        on_frame: Called as ``on_frame(peer_id, obj)`` for every inbound kernel Message or
            PluginFrame; ``peer_id`` is the id the connection's hello announced. Exceptions
            it raises are logged and the connection carries on.
        secret: Cluster secret; when set, every frame carries and must carry an
            HMAC-SHA256 tag (peers without it, or with another, are rejected).
        max_frame_bytes: Largest frame accepted or sent (body plus MAC).
        max_queue_bytes: Per-peer bound on queued outbound bytes.
        cluster_name: Connections announcing another cluster are rejected.
        max_inbound_connections: Accepted connections beyond this are closed at once.
        hello_timeout: Seconds an accepted connection may take to send its hello.
        connect_timeout: Seconds a dial may take.
        backoff_min: First reconnect delay, in seconds.
        backoff_max: Cap of the exponential reconnect delay, in seconds.
        rng: Source of reconnect jitter.
        metrics: Counters to use; by default created on ``registry``.
        registry: Where to create the counters when ``metrics`` is not given (a private
            registry when neither is).
        log: A structlog logger; by default ``bwcore.transport`` bound to ``node``.
    """

    def __init__(
        self,
        node_id: str,
        reactor: Any,
        on_frame: OnFrame,
        *,
        secret: bytes | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_queue_bytes: int = 64 * 1024 * 1024,
        cluster_name: str = "bwraft",
        max_inbound_connections: int = 256,
        hello_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        backoff_min: float = 0.05,
        backoff_max: float = 2.0,
        rng: random.Random | None = None,
        metrics: TransportMetrics | None = None,
        registry: CollectorRegistry | None = None,
        log: Any = None,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        if max_queue_bytes < max_frame_bytes + 4:
            raise ValueError("max_queue_bytes must hold at least one frame of max_frame_bytes")
        if not 0 < backoff_min <= backoff_max:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if secret is not None and len(secret) < 16:
            raise ValueError("a cluster secret must be at least 16 bytes")
        self.node_id = node_id
        self.reactor = reactor
        self.on_frame = on_frame
        self.secret = secret
        self.max_frame_bytes = max_frame_bytes
        self.max_queue_bytes = max_queue_bytes
        self.cluster_name = cluster_name
        self.max_inbound_connections = max_inbound_connections
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.rng = rng if rng is not None else random.Random()
        if metrics is None:
            metrics = TransportMetrics(registry if registry is not None else CollectorRegistry())
        self.metrics = metrics
        if log is None:
            log = structlog.get_logger("bwcore.transport", node=node_id)
        self.log = log
        self.hello_frame = encode_frame(Hello(node_id, cluster_name), secret)
        self.stopped = False
        self.inbound: set[_InboundProtocol] = set()
        self._links: dict[str, _PeerLink] = {}
        self._ports: list[IListeningPort] = []

    # -- address book ------------------------------------------------------------------

    def set_peer(self, peer_id: str, host: str, port: int) -> None:
        """Add a peer or change its address (an open connection to the old one is closed)."""
        link = self._links.get(peer_id)
        if link is not None and (link.host, link.port) == (host, port):
            return
        if link is not None:
            link.close()
        self._links[peer_id] = _PeerLink(self, peer_id, host, port)

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer: its queue is dropped and its connection closed."""
        link = self._links.pop(peer_id, None)
        if link is not None:
            link.close()

    def peers(self) -> dict[str, tuple[str, int]]:
        """The address book: peer id -> (host, port)."""
        return {pid: (link.host, link.port) for pid, link in self._links.items()}

    def queued_bytes(self, peer_id: str) -> int:
        """Bytes waiting in the peer's send queue (0 for an unknown peer)."""
        link = self._links.get(peer_id)
        return link.queue.bytes if link is not None else 0

    # -- sending -----------------------------------------------------------------------

    def send(self, peer_id: str, obj: Message | PluginFrame) -> bool:
        """Queue ``obj`` for ``peer_id``; never blocks.

        Returns:
            True if queued; False if dropped at once (transport stopped, unknown peer, or a
            frame larger than ``max_frame_bytes``), which is counted and logged.

        Raises:
            TypeError: ``obj`` is neither a Message nor a PluginFrame, or a plugin payload
                holds something msgpack cannot carry.
        """
        if not isinstance(obj, (Message, PluginFrame)):
            raise TypeError(f"cannot send {type(obj).__name__}; send a Message or PluginFrame")
        link = self._links.get(peer_id)
        if self.stopped or link is None:
            self.metrics.dropped_messages.labels(peer_id).inc()
            self.log.debug("send_dropped", peer=peer_id,
                           reason="stopped" if self.stopped else "unknown_peer")
            return False
        frame = encode_frame(obj, self.secret)
        if len(frame) - 4 > self.max_frame_bytes:
            self.metrics.dropped_messages.labels(peer_id).inc()
            self.log.error("frame_too_large", peer=peer_id, bytes=len(frame),
                           limit=self.max_frame_bytes, kind=type(obj).__name__)
            return False
        link.enqueue(frame, isinstance(obj, Message))
        return True

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait before redialling after ``failures`` consecutive failures.

        Exponential, capped at ``backoff_max``, with full jitter above ``backoff_min`` so that
        peers restarted together do not redial in lockstep.
        """
        ceiling = min(self.backoff_max, self.backoff_min * 2 ** min(max(failures - 1, 0), 32))
        return self.rng.uniform(self.backoff_min, ceiling)

    # -- receiving ---------------------------------------------------------------------

    def listen(self, host: str, port: int) -> IListeningPort:
        """Accept peer connections on ``host:port`` (port 0: the OS picks; see getHost())."""
        listening = self.reactor.listenTCP(port, _InboundFactory(self), interface=host)
        self._ports.append(listening)
        return listening

    def deliver(self, peer_id: str, obj: Message | PluginFrame) -> None:
        try:
            self.on_frame(peer_id, obj)
        except Exception:
            self.log.exception("on_frame_failed", peer=peer_id, kind=type(obj).__name__)

    def inbound_identified(self, protocol: _InboundProtocol) -> None:
        # A sender keeps one connection to us, so an older one from the same id is a dead
        # leftover (half-open after a network failure): close it to free its slot.
        for other in list(self.inbound):
            if other is not protocol and other.peer_id == protocol.peer_id:
                other.close()
        self.log.debug("inbound_connected", peer=protocol.peer_id, address=protocol.address)

    def inbound_lost(self, protocol: _InboundProtocol) -> None:
        self.inbound.discard(protocol)

    # -- shutdown ----------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> defer.Deferred[None]:
        """Stop listening and close every connection.

        Queued frames are handed to TCP first. Connections still open after ``timeout``
        seconds (a peer that stopped reading) are aborted.

        Returns:
            A Deferred that fires once every port and connection is closed.
        """
        self.stopped = True
        waits: list[defer.Deferred[Any]] = [
            defer.maybeDeferred(port.stopListening) for port in self._ports]
        self._ports = []
        closing: list[_PeerProtocol] = []
        for link in self._links.values():
            outbound = link.close()
            if outbound is not None:
                closing.append(outbound)
        for inbound in list(self.inbound):
            inbound.close()
            closing.append(inbound)
        waits.extend(p.when_lost.wait() for p in closing)

        def abort() -> None:
            for p in closing:
                if not p.when_lost.lost:
                    p.transport.abortConnection()

        deadline = self.reactor.callLater(timeout, abort)
        done = defer.gatherResults(waits, consumeErrors=True)

        def finished(result: Any) -> None:
            if deadline.active():
                deadline.cancel()
            if isinstance(result, Failure):
                self.log.error("transport_stop_failed", error=result.getErrorMessage())

        done.addBoth(finished)
        return done
