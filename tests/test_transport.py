"""The peer transport, on Twisted's fakes (MemoryReactorClock, StringTransport, iosim) and,
once, over real loopback TCP."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from bwcore.codec import FrameDecoder, Hello, PluginFrame, encode_frame
from bwcore.kernel import Entry, Message, MessageType
from bwcore.transport import PeerTransport, _SendQueue

SECRET = b"a-cluster-secret-of-32-bytes...."
PEER_ADDR = IPv4Address("TCP", "127.0.0.2", 40000)


def msg(index: int = 1, to: str = "b", frm: str = "a", size: int = 10) -> Message:
    return Message(MessageType.APPEND, to, frm, 2, index=index,
                   entries=(Entry(2, index + 1, b"x" * size),))


class CountingTransport(StringTransport):
    """A StringTransport that counts write calls."""

    def __init__(self) -> None:
        super().__init__(peerAddress=PEER_ADDR)
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Node:
    """A PeerTransport on a (possibly shared) MemoryReactorClock that records its input."""

    def __init__(self, node_id: str, reactor: MemoryReactorClock | None = None,
                 on_frame: Any = None, seed: int = 7, **kwargs: Any) -> None:
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.registry = CollectorRegistry()
        self.received: list[tuple[str, Any]] = []
        self.transport = PeerTransport(
            node_id, self.reactor, on_frame or (lambda p, o: self.received.append((p, o))),
            registry=self.registry, rng=random.Random(seed), **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def server_factory(self) -> Any:
        if not self.reactor.tcpServers:
            self.transport.listen("127.0.0.1", 0)
        return self.reactor.tcpServers[-1][1]

    def accept_dial(self, index: int = -1) -> tuple[Any, CountingTransport]:
        """Complete the outbound dial number ``index`` onto a StringTransport."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        tr = CountingTransport()
        proto.makeConnection(tr)
        return proto, tr

    def fail_dial(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index],
                                       Failure(error.ConnectionRefusedError()))

    def accept_inbound(self) -> tuple[Any, StringTransport]:
        """Open an inbound connection onto a StringTransport."""
        proto = self.server_factory().buildProtocol(PEER_ADDR)
        tr = StringTransport(peerAddress=PEER_ADDR)
        proto.makeConnection(tr)
        return proto, tr


def wire(a: Node, b: Node, index: int = -1) -> iosim.IOPump:
    """Connect ``a``'s outbound dial to ``b``'s listener through an iosim pump."""
    client = a.reactor.tcpClients[index][2].buildProtocol(None)
    server = b.server_factory().buildProtocol(None)
    return iosim.connect(server, iosim.FakeTransport(server, True, peerAddress=PEER_ADDR),
                         client, iosim.FakeTransport(client, False), clock=a.reactor)


def frames_of(data: bytes, secret: bytes | None = None) -> list[Any]:
    return FrameDecoder(secret=secret).feed(data)


def lose(proto: Any) -> None:
    proto.connectionLost(Failure(error.ConnectionDone()))


# -- the send queue --------------------------------------------------------------------

@given(st.lists(st.tuples(st.sampled_from(["k", "p", "take"]), st.integers(1, 40)),
                max_size=80))
def test_send_queue_matches_a_simple_model(ops: list[tuple[str, int]]) -> None:
    """FIFO order, the byte bound, and shedding oldest kernel frames first, then the oldest."""
    limit = 100
    queue, model = _SendQueue(limit), []  # model: [(frame, is_kernel)]
    for n, (op, size) in enumerate(ops):
        if op == "take":
            got = queue.take(size * 3)
            expect, total = [], 0
            while model and (not expect or total + len(model[0][0]) <= size * 3):
                frame, _ = model.pop(0)
                expect.append(frame)
                total += len(frame)
            assert got == expect
            continue
        frame = bytes([n % 256]) * size
        dropped = 0
        while model and sum(len(f) for f, _ in model) + size > limit:
            kernel = [i for i, (_, k) in enumerate(model) if k]
            model.pop(kernel[0] if kernel else 0)
            dropped += 1
        model.append((frame, op == "k"))
        assert queue.append(frame, op == "k") == dropped
        assert queue.bytes == sum(len(f) for f, _ in model) <= limit
        assert len(queue) == len(model)
    assert queue.take(10**9) == [f for f, _ in model]


# -- outbound --------------------------------------------------------------------------

def test_send_to_an_unknown_peer_is_dropped_and_counted() -> None:
    """Without an address there is nothing to dial: send returns False and counts a drop."""
    a = Node("a")
    assert a.transport.send("nobody", msg()) is False
    assert a.metric("bwraft_transport_dropped_messages_total", peer="nobody") == 1
    assert a.reactor.tcpClients == []


def test_first_send_dials_once_and_the_connection_opens_with_hello() -> None:
    """Frames queued while dialling go out after the hello, all in one write."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    for i in range(3):
        assert a.transport.send("b", msg(i))
    assert [(h, p) for h, p, *_ in a.reactor.tcpClients] == [("127.0.0.1", 4001)]
    _, tr = a.accept_dial()
    assert tr.writes == 1
    assert frames_of(tr.value()) == [Hello("a", "bwraft"), msg(0), msg(1), msg(2)]
    assert a.metric("bwraft_transport_sent_messages_total", peer="b") == 3
    assert a.metric("bwraft_transport_sent_bytes_total", peer="b") == len(tr.value())


def test_frames_sent_in_one_reactor_turn_share_one_write() -> None:
    """Write coalescing: nothing is written until the turn ends, then one write for all."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg(0))
    _, tr = a.accept_dial()
    before = tr.value()
    for i in range(1, 6):
        a.transport.send("b", msg(i))
    a.transport.send("b", PluginFrame("relay", {"n": 1}))
    assert tr.value() == before
    a.reactor.advance(0)
    assert tr.writes == 2
    assert frames_of(tr.value())[2:] == [msg(i) for i in range(1, 6)] + [
        PluginFrame("relay", {"n": 1})]


def test_full_queue_sheds_oldest_kernel_messages_and_keeps_plugin_frames() -> None:
    """While TCP is paused the queue stays within its bound by dropping old kernel messages."""
    a = Node("a", max_frame_bytes=200, max_queue_bytes=600)
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg(0))
    proto, tr = a.accept_dial()
    proto.pauseProducing()
    written = len(tr.value())
    a.transport.send("b", PluginFrame("relay", "keep me"))
    for i in range(1, 40):
        a.transport.send("b", msg(i))
        assert a.transport.queued_bytes("b") <= 600
    a.reactor.advance(0)
    assert len(tr.value()) == written  # paused: nothing handed to TCP
    dropped = a.metric("bwraft_transport_dropped_messages_total", peer="b")
    assert dropped > 0
    proto.resumeProducing()
    a.reactor.advance(0)
    out = frames_of(tr.value())[2:]
    assert out[0] == PluginFrame("relay", "keep me")
    assert out[1:] == [msg(i) for i in range(40 - len(out) + 1, 40)]
    assert len(out) - 1 + dropped == 39


def test_a_frame_larger_than_the_limit_is_not_sent() -> None:
    """send() refuses, counts and logs a frame above max_frame_bytes."""
    a = Node("a", max_frame_bytes=100)
    a.transport.set_peer("b", "127.0.0.1", 4001)
    with capture_logs() as logs:
        assert a.transport.send("b", msg(size=200)) is False
    assert a.metric("bwraft_transport_dropped_messages_total", peer="b") == 1
    assert [e["event"] for e in logs] == ["frame_too_large"]
    assert a.reactor.tcpClients == []


def test_send_refuses_objects_that_are_not_frames() -> None:
    """A Hello or any other object is a programming error, not a message."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    with pytest.raises(TypeError):
        a.transport.send("b", Hello("a", "bwraft"))  # type: ignore[arg-type]


def test_failed_dials_back_off_exponentially_with_capped_jitter() -> None:
    """Each failure waits longer (50 ms doubling, 2 s cap, jittered) before the next dial."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    delays = []
    for attempt in range(1, 10):
        a.fail_dial()
        a.transport.send("b", msg())  # sending while backing off does not dial
        assert len(a.reactor.tcpClients) == attempt
        (call,) = a.reactor.getDelayedCalls()
        delays.append(call.getTime() - a.reactor.seconds())
        a.reactor.advance(delays[-1] + 1e-9)
        assert len(a.reactor.tcpClients) == attempt + 1
    for n, delay in enumerate(delays, start=1):
        assert 0.05 <= delay <= min(2.0, 0.05 * 2 ** (n - 1)) + 1e-9
    assert max(delays) > 0.4 and len(set(delays)) > 5


def test_backoff_jitter_comes_from_the_injected_rng() -> None:
    """Equal seeds give equal delays; another seed gives other delays."""
    def delays(seed: int) -> list[float]:
        t = Node("a", seed=seed).transport
        return [t.backoff_delay(n) for n in range(1, 12)]
    assert delays(1) == delays(1)
    assert delays(1) != delays(2)


def test_a_connection_closed_at_once_backs_off_but_a_lasting_one_redials_at_once() -> None:
    """A peer that hangs up right away is not hammered; a long-lived link reconnects fast."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    proto, _ = a.accept_dial()
    lose(proto)
    a.transport.send("b", msg())
    assert len(a.reactor.tcpClients) == 1  # backing off
    a.reactor.advance(0.05)
    assert len(a.reactor.tcpClients) == 2
    proto, _ = a.accept_dial()
    a.reactor.advance(5.0)  # the connection lasts
    lose(proto)
    a.transport.send("b", msg())
    assert len(a.reactor.tcpClients) == 3  # dialled without waiting


def test_a_lasting_connection_resets_the_backoff() -> None:
    """After a connection that lasted, the next failure waits the minimum again."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    for _ in range(6):
        a.fail_dial()
        a.reactor.advance(2.0)
    proto, _ = a.accept_dial()
    a.reactor.advance(5.0)
    lose(proto)
    a.transport.send("b", msg())
    a.fail_dial()
    (call,) = a.reactor.getDelayedCalls()
    assert call.getTime() - a.reactor.seconds() == pytest.approx(0.05)


def test_set_peer_with_a_new_address_closes_the_old_link() -> None:
    """Moving a peer closes its connection and dials the new address."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    _, old = a.accept_dial()
    a.transport.set_peer("b", "127.0.0.1", 4001)  # unchanged: nothing happens
    assert not old.disconnecting
    a.transport.set_peer("b", "127.0.0.1", 4002)
    assert old.disconnecting
    a.transport.send("b", msg())
    assert a.reactor.tcpClients[-1][:2] == ("127.0.0.1", 4002)
    assert a.transport.peers() == {"b": ("127.0.0.1", 4002)}


def test_remove_peer_drops_its_queue_and_stops_dialling() -> None:
    """A removed peer's pending frames are dropped and no retry fires."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    a.fail_dial()
    a.transport.send("b", msg(2))
    a.transport.remove_peer("b")
    assert a.reactor.getDelayedCalls() == []
    assert a.metric("bwraft_transport_dropped_messages_total", peer="b") == 2
    assert a.transport.send("b", msg()) is False


# -- between two transports (iosim) ----------------------------------------------------

def test_messages_and_plugin_frames_cross_an_iosim_connection() -> None:
    """What a sends, b's on_frame receives, with a's id, in order."""
    reactor = MemoryReactorClock()
    a, b = Node("a", reactor), Node("b", reactor)
    b.transport.listen("127.0.0.1", 0)
    a.transport.set_peer("b", "127.0.0.1", 4001)
    sent = [msg(1), PluginFrame("relay", [1, "two", b"3"]), msg(2)]
    for obj in sent:
        a.transport.send("b", obj)
    pump = wire(a, b)
    pump.flush()
    assert b.received == [("a", obj) for obj in sent]
    a.transport.send("b", msg(3))
    pump.flush()
    assert b.received[-1] == ("a", msg(3))
    assert b.metric("bwraft_transport_received_bytes_total") == a.metric(
        "bwraft_transport_sent_bytes_total", peer="b")


def test_matching_secrets_authenticate_and_mismatched_ones_are_rejected() -> None:
    """With the same secret frames flow; with another, the receiver closes and counts bad_mac."""
    reactor = MemoryReactorClock()
    a, b = Node("a", reactor, secret=SECRET), Node("b", reactor, secret=SECRET)
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    wire(a, b).flush()
    assert b.received == [("a", msg())]

    c = Node("c", reactor, secret=b"some-other-cluster-secret-value!")
    c.transport.set_peer("b", "127.0.0.1", 4001)
    c.transport.send("b", msg())
    with capture_logs() as logs:
        pump = wire(c, b)
        pump.flush()
    assert b.received == [("a", msg())]
    assert b.metric("bwraft_transport_rejected_frames_total", reason="bad_mac") == 1
    assert pump.serverIO.disconnected and pump.clientIO.disconnecting
    assert any(e["event"] == "frame_rejected" and e["reason"] == "bad_mac" for e in logs)


def test_an_unauthenticated_sender_is_rejected_by_a_node_with_a_secret() -> None:
    """Frames without a MAC never reach on_frame when a secret is configured."""
    reactor = MemoryReactorClock()
    a, b = Node("a", reactor), Node("b", reactor, secret=SECRET)
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    wire(a, b).flush()
    assert b.received == []
    # The hello alone is shorter than a MAC.
    assert b.metric("bwraft_transport_rejected_frames_total", reason="missing_mac") == 1


def test_a_peer_of_another_cluster_is_rejected() -> None:
    """The hello's cluster name must match ours."""
    reactor = MemoryReactorClock()
    a, b = Node("a", reactor, cluster_name="east"), Node("b", reactor, cluster_name="west")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    wire(a, b).flush()
    assert b.received == []
    assert b.metric("bwraft_transport_rejected_frames_total", reason="cluster_mismatch") == 1


# -- inbound ---------------------------------------------------------------------------

def test_first_frame_must_be_hello() -> None:
    """A connection that starts with anything else is closed with a frame_rejected event."""
    b = Node("b")
    proto, tr = b.accept_inbound()
    with capture_logs() as logs:
        proto.dataReceived(encode_frame(msg()))
    assert tr.disconnecting and b.received == []
    assert b.metric("bwraft_transport_rejected_frames_total", reason="no_hello") == 1
    (event,) = [e for e in logs if e["event"] == "frame_rejected"]
    assert event["reason"] == "no_hello" and event["address"] == "127.0.0.2:40000"


@pytest.mark.parametrize("garbage, reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "oversize"),
    (b"\x00\x00\x00\x03\xc1\xc1\xc1", "malformed"),
    (b"\xff\xff\xff\xff", "oversize"),
])
def test_garbage_closes_only_that_connection(garbage: bytes, reason: str) -> None:
    """Bad bytes close their own connection; a healthy one keeps delivering."""
    b = Node("b")
    good, good_tr = b.accept_inbound()
    good.dataReceived(encode_frame(Hello("a", "bwraft")))
    bad, bad_tr = b.accept_inbound()
    bad.dataReceived(encode_frame(Hello("x", "bwraft")) + garbage)
    bad.dataReceived(encode_frame(msg(9)))  # after the rejection: ignored
    assert bad_tr.disconnecting and not good_tr.disconnecting
    assert b.metric("bwraft_transport_rejected_frames_total", reason=reason) == 1
    good.dataReceived(encode_frame(msg(1)))
    assert b.received == [("a", msg(1))]


def test_frames_before_a_bad_one_in_the_same_read_are_delivered() -> None:
    """A corrupt frame does not take the good frames that preceded it down with it."""
    b = Node("b")
    proto, tr = b.accept_inbound()
    proto.dataReceived(encode_frame(Hello("a", "bwraft")) + encode_frame(msg(1))
                       + b"\x00\x00\x00\x01\xc1" + encode_frame(msg(2)))
    assert b.received == [("a", msg(1))] and tr.disconnecting


def test_a_second_hello_is_rejected() -> None:
    """Hello is only valid as the first frame."""
    b = Node("b")
    proto, tr = b.accept_inbound()
    proto.dataReceived(encode_frame(Hello("a", "bwraft")) + encode_frame(Hello("z", "bwraft")))
    assert tr.disconnecting
    assert b.metric("bwraft_transport_rejected_frames_total", reason="unexpected_hello") == 1


def test_on_frame_exceptions_are_logged_and_delivery_continues() -> None:
    """A failing handler is logged; the connection stays open and later frames arrive."""
    seen: list[int] = []

    def on_frame(peer: str, obj: Message) -> None:
        seen.append(obj.index)
        if obj.index == 1:
            raise RuntimeError("handler bug")

    b = Node("b", on_frame=on_frame)
    proto, tr = b.accept_inbound()
    with capture_logs() as logs:
        proto.dataReceived(b"".join(encode_frame(o) for o in
                                    (Hello("a", "bwraft"), msg(1), msg(2))))
    assert seen == [1, 2] and not tr.disconnecting
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["on_frame_failed"]


def test_inbound_connections_beyond_the_limit_are_closed() -> None:
    """The limit counts open inbound connections; a closed one frees its slot."""
    b = Node("b", max_inbound_connections=2)
    (p1, t1), (p2, t2), (p3, t3) = (b.accept_inbound() for _ in range(3))
    assert not t1.disconnecting and not t2.disconnecting and t3.disconnecting
    assert b.metric("bwraft_transport_rejected_frames_total", reason="too_many_connections") == 1
    lose(p3)
    lose(p1)
    _, t4 = b.accept_inbound()
    assert not t4.disconnecting


def test_a_connection_that_never_says_hello_times_out() -> None:
    """An idle unidentified connection is closed after hello_timeout seconds."""
    b = Node("b", hello_timeout=3.0)
    _, tr = b.accept_inbound()
    b.reactor.advance(2.9)
    assert not tr.disconnecting
    b.reactor.advance(0.2)
    assert tr.disconnecting
    assert b.metric("bwraft_transport_rejected_frames_total", reason="hello_timeout") == 1


def test_a_new_connection_from_the_same_peer_replaces_the_old_one() -> None:
    """A sender keeps one connection, so an older one with the same id is a leftover."""
    b = Node("b")
    _, old = b.accept_inbound()
    b.accept_inbound()[0].dataReceived(encode_frame(Hello("a", "bwraft")))
    assert not old.disconnecting  # unidentified connections are not matched
    first, first_tr = b.accept_inbound()
    first.dataReceived(encode_frame(Hello("c", "bwraft")))
    second, _ = b.accept_inbound()
    second.dataReceived(encode_frame(Hello("c", "bwraft")))
    assert first_tr.disconnecting


# -- stopping --------------------------------------------------------------------------

def test_stop_flushes_queued_frames_closes_everything_and_cancels_timers() -> None:
    """stop() hands TCP what is queued, closes all, fires when closed, and leaves no timer."""
    a = Node("a")
    a.transport.listen("127.0.0.1", 0)
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.set_peer("c", "127.0.0.1", 4002)
    a.transport.send("b", msg(1))
    out_proto, out_tr = a.accept_dial(0)
    a.transport.send("b", msg(2))  # queued for the end of the turn
    a.transport.send("c", msg(1))
    a.fail_dial(1)  # c is backing off
    in_proto, in_tr = a.accept_inbound()
    done = a.transport.stop()
    assert frames_of(out_tr.value())[-1] == msg(2)
    assert out_tr.disconnecting and in_tr.disconnecting
    assert a.transport.send("b", msg(3)) is False
    assert len(a.reactor.getDelayedCalls()) == 1  # only stop()'s abort deadline
    assert not done.called
    lose(out_proto)
    lose(in_proto)
    assert done.called and a.reactor.getDelayedCalls() == []


def test_stop_aborts_connections_that_do_not_close_in_time() -> None:
    """A peer that stopped reading cannot hold stop() forever."""
    a = Node("a")
    a.transport.set_peer("b", "127.0.0.1", 4001)
    a.transport.send("b", msg())
    proto, tr = a.accept_dial()
    done = a.transport.stop(timeout=3.0)
    a.reactor.advance(3.0)
    assert tr.disconnected  # abortConnection
    lose(proto)
    assert done.called


# -- real loopback TCP -----------------------------------------------------------------

class Inbox:
    """Collects delivered frames and fires Deferreds when a condition becomes true."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, Any]] = []
        self._waiters: list[tuple[Any, defer.Deferred[None]]] = []

    def __call__(self, peer: str, obj: Any) -> None:
        self.frames.append((peer, obj))
        for waiter in list(self._waiters):
            if waiter[0](self.frames):
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    def until(self, condition: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if condition(self.frames):
            d.callback(None)
        else:
            self._waiters.append((condition, d))
        return d


class Garbage(Protocol):
    """Writes bytes that are no frame and reports when the server hangs up."""

    def __init__(self) -> None:
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"\x00\x00\x00\x05not msgpack at all\xff" * 3)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(None)


def rejected_total(registry: CollectorRegistry) -> float:
    return sum(sample.value for metric in registry.collect()
               if metric.name == "bwraft_transport_rejected_frames"
               for sample in metric.samples if sample.name.endswith("_total"))


class LoopbackTCPTests(unittest.TestCase):
    """Two transports on the real reactor over 127.0.0.1, ports chosen by the OS."""

    timeout = 20

    def _transport(self, node_id: str, inbox: Inbox) -> tuple[PeerTransport, CollectorRegistry]:
        from twisted.internet import reactor
        registry = CollectorRegistry()
        transport = PeerTransport(node_id, reactor, inbox, secret=SECRET, registry=registry,
                                  rng=random.Random(1), backoff_min=0.01, backoff_max=0.2)
        self.addCleanup(transport.stop)
        return transport, registry

    async def _scenario(self) -> None:
        from twisted.internet import reactor
        a_inbox, b_inbox = Inbox(), Inbox()
        a, _ = self._transport("a", a_inbox)
        b, b_registry = self._transport("b", b_inbox)
        a_port = a.listen("127.0.0.1", 0).getHost().port
        b_port = b.listen("127.0.0.1", 0).getHost().port
        self.assertNotEqual(b_port, 0)
        a.set_peer("b", "127.0.0.1", b_port)
        b.set_peer("a", "127.0.0.1", a_port)

        for i in range(50):
            a.send("b", msg(i))
        await b_inbox.until(lambda f: len(f) == 50)
        self.assertEqual(b_inbox.frames, [("a", msg(i)) for i in range(50)])
        b.send("a", PluginFrame("relay", {"ack": 49}))
        await a_inbox.until(lambda f: len(f) == 1)
        self.assertEqual(a_inbox.frames, [("b", PluginFrame("relay", {"ack": 49}))])

        # Garbage on b's port: b hangs up on that connection, counts it, and carries on.
        garbage = Garbage()
        reactor.connectTCP("127.0.0.1", b_port, ClientFactory.forProtocol(lambda: garbage))
        await garbage.closed
        self.assertEqual(rejected_total(b_registry), 1)
        a.send("b", msg(100))
        await b_inbox.until(lambda f: f[-1] == ("a", msg(100)))

        # b stops and a new b listens on the same port: a redials by itself. Like a Raft
        # leader, the test resends until delivery (frames written into the dying connection
        # are lost).
        await b.stop()
        b2_inbox = Inbox()
        b2, _ = self._transport("b", b2_inbox)
        b2.listen("127.0.0.1", b_port)
        resend = task.LoopingCall(a.send, "b", msg(200))
        resend.start(0.02)
        try:
            await b2_inbox.until(lambda f: len(f) >= 1)
        finally:
            resend.stop()
        self.assertEqual(set(b2_inbox.frames), {("a", msg(200))})

    def test_exchange_survive_garbage_and_reconnect(self) -> defer.Deferred[None]:
        """Messages flow both ways, garbage is shrugged off, and a restarted peer is redialled."""
        return defer.Deferred.fromCoroutine(self._scenario())
