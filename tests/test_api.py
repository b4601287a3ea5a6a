"""The HTTP API over a real twisted.web Site, driven through StringTransport (no sockets)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, Counter
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from bwcore.api import (
    FORWARD_POOL_SIZE,
    FORWARDED_BY_HEADER,
    ApiResource,
    ApiSite,
    make_api_service,
)
from bwcore.errors import NotLeader, Unavailable
from bwraft_plugins.kv import KVStateMachine

MAX_BODY = 1024


class FakeNode:
    """The RaftNode facade the API calls, with a real KV state machine and no Raft."""

    def __init__(self) -> None:
        self.node_id = "n1"
        self.config = SimpleNamespace(
            id="n1", role="voter", datacenter="dc1",
            addresses=SimpleNamespace(api="127.0.0.1:8001"),
            limits=SimpleNamespace(max_body_bytes=MAX_BODY),
            security=SimpleNamespace(admin_token=""))
        self.state_machine = KVStateMachine()
        self.registry = CollectorRegistry()
        self.proposals: list[tuple[bytes, float]] = []
        self.barriers = 0
        self.failure: Exception | None = None
        self.held: list[Deferred] = []
        self.hold = False

    async def propose(self, data: bytes, *, timeout: float = 5.0) -> Any:
        self.proposals.append((data, timeout))
        if self.failure is not None:
            raise self.failure
        if self.hold:
            waiter: Deferred = Deferred()
            self.held.append(waiter)
            await waiter
        return self.state_machine.apply(self.state_machine.applied_index + 1, data)

    async def read_barrier(self, *, timeout: float = 5.0) -> int:
        self.barriers += 1
        if self.failure is not None:
            raise self.failure
        return self.state_machine.applied_index

    def status(self) -> dict:
        return {"id": "n1", "role": "voter", "term": 3, "leader": "n1",
                "voters": frozenset({"n1", "n2"}), "commit_index": 0}


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body = rest[:int(self.headers["content-length"])]

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class Http:
    """Speaks raw HTTP/1.1 to an ApiSite over StringTransport."""

    def __init__(self, resource: Resource, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.site = ApiSite(resource, max_body_bytes=MAX_BODY, reactor=self.clock,
                            linger_seconds=5.0)

    def send(self, raw: bytes) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        return channel, transport

    @staticmethod
    def build(method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        _, transport = self.send(self.build(method, path, body, headers))
        return Response(transport.value())

    def put(self, key: str, body: Any) -> Response:
        return self.request("PUT", f"/v1/kv/{key}", json.dumps(body).encode())


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


@pytest.fixture
def http(node: FakeNode) -> Http:
    return Http(ApiResource(node))


def test_put_then_linearizable_get_reads_through_the_barrier(node: FakeNode, http: Http) -> None:
    """A committed put is visible to a default (linearizable) read, which waits on ReadIndex."""
    put = http.put("color", {"value": "blue"})
    assert (put.status, put.json()) == (200, {"index": 1})
    got = http.request("GET", "/v1/kv/color")
    assert (got.status, got.json()) == (200, {"value": "blue", "index": 1})
    assert node.barriers == 1


def test_stale_get_skips_the_barrier(node: FakeNode, http: Http) -> None:
    """consistency=stale answers from local state without a read barrier."""
    http.put("k", {"value": "v"})
    got = http.request("GET", "/v1/kv/k?consistency=stale")
    assert got.json() == {"value": "v", "index": 1}
    assert node.barriers == 0


def test_get_of_an_absent_key_is_404_with_the_applied_index(http: Http) -> None:
    """A missing key answers 404 and says at which index it was absent."""
    http.put("other", {"value": "x"})
    got = http.request("GET", "/v1/kv/missing")
    assert (got.status, got.json()) == (404, {"error": "not found", "index": 1})


def test_delete_reports_whether_the_key_existed(http: Http) -> None:
    """DELETE answers {"index", "deleted"} and works with or without a body."""
    http.put("k", {"value": "v"})
    first = http.request("DELETE", "/v1/kv/k")
    second = http.request("DELETE", "/v1/kv/k", b'{"request_id": "d-2"}')
    assert first.json() == {"index": 2, "deleted": True}
    assert second.json() == {"index": 3, "deleted": False}


def test_cas_expect_null_value_null_and_mismatch(http: Http) -> None:
    """cas creates with expect=null, fails on a mismatch, deletes with value=null."""
    post = lambda body: http.request("POST", "/v1/kv/k/cas", json.dumps(body).encode()).json()
    assert post({"expect": None, "value": "a"}) == {"ok": True, "value": "a", "index": 1}
    assert post({"expect": None, "value": "b"}) == {"ok": False, "value": "a", "index": 2}
    assert post({"expect": "zzz", "value": "b"}) == {"ok": False, "value": "a", "index": 3}
    assert post({"expect": "a", "value": None}) == {"ok": True, "value": None, "index": 4}
    assert http.request("GET", "/v1/kv/k").status == 404


def test_a_retried_request_id_is_applied_once(node: FakeNode, http: Http) -> None:
    """The same request_id twice returns the first result; the second put changes nothing."""
    first = http.put("k", {"value": "one", "request_id": "r1"})
    again = http.put("k", {"value": "two", "request_id": "r1"})
    assert first.json() == again.json() == {"index": 1}
    assert http.request("GET", "/v1/kv/k").json()["value"] == "one"


def test_percent_encoded_keys_are_decoded(http: Http) -> None:
    """A key is one percent-decoded path segment: %2F is a slash inside the key."""
    assert http.put("a%2Fb%20%C3%A9", {"value": "v"}).status == 200
    assert http.request("GET", "/v1/kv/a%2Fb%20%C3%A9").json()["value"] == "v"
    assert http.request("GET", "/v1/kv/a/b").status == 404


@pytest.mark.parametrize("path, message", [
    ("/v1/kv/", "key must not be empty"),
    ("/v1/kv", "missing key"),
    ("/v1/kv/%FF", "not valid UTF-8"),
    ("/v1/kv/" + "k" * 1025, "limit is 1024"),
])
def test_bad_keys_are_400(http: Http, path: str, message: str) -> None:
    """Empty, missing, non-UTF-8 and over-long keys are refused with a clear message."""
    got = http.request("PUT", path, b'{"value": "v"}')
    assert got.status == 400 and message in got.json()["error"]


@pytest.mark.parametrize("method, path, body, message", [
    ("PUT", "/v1/kv/k", b"{not json", "not valid JSON"),
    ("PUT", "/v1/kv/k", b"\xff\xfe", "not valid JSON"),
    ("PUT", "/v1/kv/k", b"[1, 2]", "must be a JSON object"),
    ("PUT", "/v1/kv/k", b"", "must be a JSON object"),
    ("PUT", "/v1/kv/k", b'{"value": 5}', "'value' must be a string"),
    ("PUT", "/v1/kv/k", b'{"value": null}', "'value' must be a string"),
    ("PUT", "/v1/kv/k", b'{"value": "v", "ttl": 3}', "unknown field(s): ttl"),
    ("PUT", "/v1/kv/k", b'{"value": "v", "request_id": ""}', "non-empty string"),
    ("PUT", "/v1/kv/k", b'{"value": "v", "request_id": 7}', "non-empty string"),
    ("POST", "/v1/kv/k/cas", b'{"value": "v"}', "missing field(s): expect"),
    ("POST", "/v1/kv/k/cas", b'{"expect": 1, "value": "v"}', "'expect' must be a string or null"),
    ("DELETE", "/v1/kv/k", b'{"value": "v"}', "unknown field(s): value"),
    ("GET", "/v1/kv/k?consistency=eventual", None, "consistency must be one of"),
    ("GET", "/v1/kv/k?consistency=stale&consistency=stale", None, "more than once"),
    ("GET", "/v1/kv/k?limit=3", None, "unknown query parameter(s): limit"),
    ("PUT", "/v1/kv/k", b"[" * 100_000, "not valid JSON"),
])
def test_bad_requests_are_400_json(node: FakeNode, method: str, path: str, body: bytes | None,
                                   message: str) -> None:
    """Malformed JSON, wrong types, unknown fields and bad parameters give 400 and no write."""
    node.config.limits.max_body_bytes = 200_000
    http = Http(ApiResource(node))
    http.site.max_body_bytes = 200_000
    got = http.request(method, path, body)
    assert got.status == 400, got.body
    assert message in got.json()["error"]
    assert node.proposals == []


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_arbitrary_bodies_never_cause_a_server_error(body: bytes) -> None:
    """Whatever bytes a client sends as a PUT body, the answer is 200 or 400, never 5xx."""
    got = Http(ApiResource(FakeNode())).request("PUT", "/v1/kv/k", body)
    assert got.status in (200, 400)
    assert "error" in got.json() or got.json() == {"index": 1}


def test_declared_oversized_body_gets_413_before_it_is_sent(node: FakeNode, http: Http) -> None:
    """A Content-Length over the limit is answered 413 from the headers alone."""
    raw = Http.build("PUT", "/v1/kv/k", headers={"Content-Length": str(10 << 20),
                                                 "Expect": "100-continue"})
    channel, transport = http.send(raw)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert "exceeds the limit of 1024 bytes" in Response(answer).json()["error"]
    channel.dataReceived(b"x" * (2 << 20))  # the rest of the body is drained, not stored
    assert transport.value() == answer and node.proposals == []
    assert not transport.disconnecting
    http.clock.advance(5.0)  # a client that never finishes is cut off after the linger time
    assert transport.disconnecting


def test_oversized_body_fully_drained_closes_the_connection(http: Http) -> None:
    """Once the refused body has been read to its end, the connection closes cleanly."""
    channel, transport = http.send(Http.build("PUT", "/v1/kv/k", b"y" * 2000))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.value().count(b"HTTP/1.1") == 1
    assert transport.disconnecting and not transport.disconnected  # a clean close, no abort


def test_chunked_body_over_the_limit_gets_413(node: FakeNode, http: Http) -> None:
    """A chunked body with no declared length is refused when it crosses the limit."""
    chunk = b"z" * 700
    raw = Http.build("PUT", "/v1/kv/k", headers={"Transfer-Encoding": "chunked"})
    raw += b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
    _, transport = http.send(raw)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert node.proposals == []


def test_unavailable_is_503(node: FakeNode, http: Http) -> None:
    """A write or linearizable read the node cannot serve now answers 503 with the reason."""
    node.failure = Unavailable("timed out")
    got = http.put("k", {"value": "v"})
    assert (got.status, got.json()) == (503, {"error": "timed out"})
    assert http.request("GET", "/v1/kv/k").status == 503
    assert http.request("GET", "/v1/kv/k?consistency=stale").status == 404


def test_not_leader_without_a_known_leader_is_503(node: FakeNode, http: Http) -> None:
    """With no leader to forward to, a write answers 503 "no leader"."""
    node.failure = NotLeader(None, None)
    got = http.put("k", {"value": "v"})
    assert (got.status, got.json()) == (503, {"error": "no leader"})


class FakeResponse:
    def __init__(self, code: int, body: bytes, headers: dict[bytes, list[bytes]]) -> None:
        self.code, self.phrase, self.body = code, b"X", body
        self.headers = Headers(headers)
        self.length = len(body)

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class SiteAgent:
    """An IAgent whose requests are served by another in-memory API site (the leader)."""

    def __init__(self, leader_http: Http | None) -> None:
        self.leader_http = leader_http
        self.sent: list[tuple[bytes, bytes, Headers, bytes]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> Deferred:
        chunks: list[bytes] = []
        if bodyProducer is not None:
            bodyProducer.startProducing(SimpleNamespace(write=chunks.append))
        body = b"".join(chunks)
        self.sent.append((method, uri, headers, body))
        if self.leader_http is None:
            return Deferred()  # never answers
        path = uri.split(b"8002", 1)[1].decode()
        extra = {name.decode(): values[0].decode() for name, values in headers.getAllRawHeaders()}
        answer = self.leader_http.request(method.decode(), path, body if body else None, extra)
        return succeed(FakeResponse(answer.status, answer.body,
                                    {b"Content-Type": [answer.headers["content-type"].encode()]}))


def test_writes_on_a_follower_are_forwarded_to_the_leader(node: FakeNode) -> None:
    """A follower forwards the same method, path and body to the leader and relays its answer."""
    leader = FakeNode()
    agent = SiteAgent(Http(ApiResource(leader)))
    node.failure = NotLeader("n2", "http://127.0.0.1:8002")
    follower = Http(ApiResource(node, agent=agent))
    got = follower.put("k%2F1", {"value": "v", "request_id": "rid-7"})
    assert (got.status, got.json()) == (200, {"index": 1})
    method, uri, headers, body = agent.sent[0]
    assert (method, uri) == (b"PUT", b"http://127.0.0.1:8002/v1/kv/k%2F1")
    assert json.loads(body) == {"value": "v", "request_id": "rid-7"}
    assert headers.getRawHeaders(FORWARDED_BY_HEADER) == [b"n1"]
    assert leader.state_machine.get("k/1") == "v"
    again = follower.put("k%2F1", {"value": "w", "request_id": "rid-7"})
    assert again.json() == {"index": 1} and leader.state_machine.get("k/1") == "v"


def test_a_failed_forward_answers_307_to_the_leader(node: FakeNode) -> None:
    """When the leader cannot be reached in time, the client is redirected to it instead."""
    clock = Clock()
    agent = SiteAgent(None)
    node.failure = NotLeader("n2", "http://127.0.0.1:8002")
    http = Http(ApiResource(node, agent=agent, reactor=clock, request_timeout=2.0), clock)
    _, transport = http.send(Http.build("PUT", "/v1/kv/k?x", b'{"value": "v"}'))
    assert transport.value() == b""
    clock.advance(2.5)
    got = Response(transport.value())
    assert got.status == 307
    assert got.headers["location"] == "http://127.0.0.1:8002/v1/kv/k?x"
    assert got.json()["leader"] == "n2"


def test_a_forwarded_request_is_never_forwarded_again(node: FakeNode) -> None:
    """A request another node forwarded gets 307 from a non-leader, so it cannot loop."""
    agent = SiteAgent(None)
    node.failure = NotLeader("n3", "http://127.0.0.1:8003")
    http = Http(ApiResource(node, agent=agent))
    got = http.request("PUT", "/v1/kv/k", b'{"value": "v"}',
                       {FORWARDED_BY_HEADER.decode(): "n2"})
    assert got.status == 307 and agent.sent == []


def test_forwarding_can_be_turned_off(node: FakeNode) -> None:
    """With forward=False a follower redirects at once, reads included."""
    agent = SiteAgent(None)
    node.failure = NotLeader("n2", "http://127.0.0.1:8002")
    http = Http(ApiResource(node, agent=agent, forward=False))
    assert http.request("GET", "/v1/kv/k").headers["location"] == "http://127.0.0.1:8002/v1/kv/k"
    assert agent.sent == []


def test_the_default_forwarding_agent_keeps_a_connection_per_concurrent_write(
        node: FakeNode) -> None:
    """The default agent keeps FORWARD_POOL_SIZE idle connections to the leader, not
    Twisted's default of 2, so concurrent forwards do not each open a new connection."""
    resource = ApiResource(node, reactor=MemoryReactorClock())
    assert resource.agent is resource.agent
    assert resource._pool.maxPersistentPerHost == FORWARD_POOL_SIZE >= 64


def test_status_members_and_metrics(node: FakeNode, http: Http) -> None:
    """status is the node's status as JSON, members is [] without gossip, metrics is text."""
    Counter("bwraft_test_events", "events", registry=node.registry).inc(3)
    status = http.request("GET", "/v1/status")
    assert status.json()["voters"] == ["n1", "n2"]
    assert http.request("GET", "/v1/members").json() == []
    metrics = http.request("GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert b"bwraft_test_events_total 3.0" in metrics.body
    node.members = lambda: [{"id": "n1", "state": "alive"}]
    assert http.request("GET", "/v1/members").json() == [{"id": "n1", "state": "alive"}]


def test_unknown_routes_and_methods_answer_json(http: Http) -> None:
    """Unknown paths are 404 and wrong methods 405 with Allow, both as JSON errors."""
    for path in ("/", "/v2/kv/k", "/v1/nothing", "/v1/status/extra"):
        got = http.request("GET", path)
        assert got.status == 404 and "no such route" in got.json()["error"]
    wrong = http.request("POST", "/v1/status", b"{}")
    assert (wrong.status, wrong.headers["allow"]) == (405, "GET")
    cas_get = http.request("GET", "/v1/kv/k/cas")
    assert (cas_get.status, cas_get.headers["allow"]) == (405, "POST")
    patch = http.request("PATCH", "/v1/kv/k", b"{}")
    assert (patch.status, patch.headers["allow"]) == (405, "GET, PUT, DELETE")


def test_an_internal_failure_is_500_and_the_node_keeps_serving(node: FakeNode,
                                                               http: Http) -> None:
    """An unexpected exception in a handler answers 500 JSON; the next request works."""
    def broken() -> dict:
        raise RuntimeError("boom")
    node.status = broken
    assert http.request("GET", "/v1/status").json() == {"error": "internal error"}
    assert http.put("k", {"value": "v"}).status == 200


def test_a_client_gone_before_the_answer_gets_nothing_written(node: FakeNode,
                                                              http: Http) -> None:
    """If the client disconnects while a write waits for commit, the reply is dropped quietly."""
    node.hold = True
    channel, transport = http.send(Http.build("PUT", "/v1/kv/k", b'{"value": "v"}'))
    channel.connectionLost(Failure(ConnectionError("client went away")))
    node.held[0].callback(None)
    assert transport.value() == b""
    assert node.state_machine.get("k") == "v"


def test_plugin_routes_are_mounted_and_may_not_shadow_core_routes(node: FakeNode) -> None:
    """Resources from bwraft_http_resources are served; a clash with a core route is refused."""
    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"hello"

    node.host = SimpleNamespace(hook=SimpleNamespace(
        bwraft_http_resources=lambda node: [{"v1/hello": Hello()}, {"extra/x": Hello()}]))
    http = Http(ApiResource(node))
    assert http.request("GET", "/v1/hello").body == b"hello"
    assert http.request("GET", "/extra/x").body == b"hello"
    node.host = SimpleNamespace(hook=SimpleNamespace(
        bwraft_http_resources=lambda node: [{"v1/status": Hello()}]))
    with pytest.raises(ValueError, match="already taken"):
        ApiResource(node)


def test_make_api_service_listens_on_the_configured_address(node: FakeNode) -> None:
    """The service listens on addresses.api and closes its forwarding pool on stop."""
    reactor = MemoryReactorClock()
    service = make_api_service(node, reactor=reactor)
    service.startService()
    port, factory, _, interface = reactor.tcpServers[0]
    assert (port, interface) == (8001, "127.0.0.1")
    assert isinstance(factory, ApiSite) and factory.max_body_bytes == MAX_BODY
    service.stopService()


def test_a_route_with_no_answer_of_its_own_is_404(node: FakeNode) -> None:
    """The endpoint base answers 404 as JSON rather than failing when a route does not
    override ``respond``; admin routes likewise (after the token check)."""
    from bwcore.admin import AdminResource
    from bwcore.api import _Endpoint

    api = ApiResource(node)
    api.putChild(b"bare", _Endpoint(api))
    api.putChild(b"bare-admin", AdminResource(node))
    http = Http(api)
    for path, method in (("/bare", "GET"), ("/bare-admin", "POST")):
        response = http.request(method, path, b"{}")
        assert response.status == 404 and "no such" in response.json()["error"]
