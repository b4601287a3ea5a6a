"""The synchronous client against scripted HTTP servers on loopback (ports chosen by the OS)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest

from bwcore.client import (
    BadRequest, CasResult, Client, ClientError, DeleteResult, NotFound, ReadResult, TooLarge,
    Unavailable, normalize_endpoint,
)

Answer = tuple[int, Any, dict[str, str]]


class FakeNode:
    """One scripted API endpoint: a KV leader by default, or whatever ``script`` answers."""

    def __init__(self, role: str = "voter") -> None:
        self.role = role
        self.data: dict[str, str] = {}
        self.applied: dict[str, dict] = {}
        self.index = 0
        self.requests: list[tuple[str, str, Any]] = []
        self.peers: set[int] = set()
        self.script: Callable[[str, str, Any], Answer | None] = lambda *a: None
        self.leader_api: str | None = None
        self.close_after_each = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def _handler(self) -> type:
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                node.peers.add(self.client_address[1])
                node.requests.append((self.command, self.path, body))
                status, answer, headers = (node.script(self.command, self.path, body)
                                           or node.default(self.command, self.path, body))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
                # Closing without "Connection: close" is what an idle timeout looks like.
                self.close_connection = node.close_after_each

            do_GET = do_PUT = do_POST = do_DELETE = _serve

        return Handler

    def default(self, method: str, path: str, body: Any) -> Answer:
        if path == "/v1/status":
            return 200, {"id": self.url, "role": self.role, "leader_api": self.leader_api}, {}
        if path == "/v1/members":
            return 200, [{"id": "n1", "state": "alive"}], {}
        key = path.split("?")[0].removeprefix("/v1/kv/").removesuffix("/cas")
        rid = (body or {}).get("request_id")
        if rid in self.applied:
            return 200, self.applied[rid], {}
        if method == "GET":
            if key not in self.data:
                return 404, {"error": "not found", "index": self.index}, {}
            return 200, {"value": self.data[key], "index": self.index}, {}
        self.index += 1
        if method == "PUT":
            self.data[key] = body["value"]
            result: dict = {"index": self.index}
        elif method == "DELETE":
            result = {"index": self.index, "deleted": self.data.pop(key, None) is not None}
        else:
            ok = self.data.get(key) == body["expect"]
            if ok:
                if body["value"] is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = body["value"]
            result = {"ok": ok, "value": self.data.get(key), "index": self.index}
        self.applied[rid] = result
        return 200, result, {}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nodes() -> Iterator[Callable[..., FakeNode]]:
    started: list[FakeNode] = []

    def start(role: str = "voter") -> FakeNode:
        started.append(FakeNode(role))
        return started[-1]

    yield start
    for node in started:
        node.stop()


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_client(endpoints: list[str], fake_time: FakeTime | None = None, **kw: Any) -> Client:
    fake_time = fake_time or FakeTime()
    return Client(endpoints, clock=fake_time.clock, sleep=fake_time.sleep, **kw)


def dead_endpoint() -> str:
    """An address nothing listens on: bound by the OS, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_put_get_delete_cas_round_trip(nodes: Callable[..., FakeNode]) -> None:
    """Each operation sends the contract's request and returns a typed result."""
    leader = nodes()
    with make_client([leader.url]) as client:
        assert client.put("a/b c", "1") == 1
        assert client.get("a/b c") == ReadResult("1", 1)
        assert client.cas("a/b c", "1", "2") == CasResult(True, "2", 2)
        assert client.cas("a/b c", "1", "3") == CasResult(False, "2", 3)
        assert client.delete("a/b c") == DeleteResult(4, True)
        with pytest.raises(NotFound) as absent:
            client.get("a/b c", consistency="stale")
    assert absent.value.index == 4
    paths = [path for _, path, _ in leader.requests if path != "/v1/status"]
    assert paths[0] == "/v1/kv/a%2Fb%20c" and paths[2] == "/v1/kv/a%2Fb%20c/cas"
    assert paths[-1] == "/v1/kv/a%2Fb%20c?consistency=stale"


def test_requests_share_one_kept_alive_connection(nodes: Callable[..., FakeNode]) -> None:
    """Successive requests to one endpoint reuse one TCP connection."""
    leader = nodes()
    with make_client([leader.url]) as client:
        for i in range(5):
            client.put(f"k{i}", "v")
    assert len(leader.peers) == 1


def test_a_connection_closed_while_idle_is_reopened_without_backoff(
        nodes: Callable[..., FakeNode]) -> None:
    """A kept-alive connection the server closed is replaced at once, not counted a failure."""
    leader = nodes()
    leader.close_after_each = True
    fake_time = FakeTime()
    with make_client([leader.url], fake_time) as client:
        for i in range(3):
            client.put(f"k{i}", "v")
    assert fake_time.sleeps == [] and len(leader.peers) >= 3


def test_writes_learn_the_leader_from_status(nodes: Callable[..., FakeNode]) -> None:
    """A write asks a node who leads and goes straight to the leader."""
    follower, leader = nodes(), nodes()
    follower.leader_api = leader.url
    with make_client([follower.url, leader.url]) as client:
        client.put("k", "v")
        client.put("k", "w")
    assert [m for m, _, _ in follower.requests] == ["GET"]
    assert [m for m, _, _ in leader.requests] == ["PUT", "PUT"]


def test_307_is_followed_and_remembered(nodes: Callable[..., FakeNode]) -> None:
    """A 307 from a non-leader sends the write (same request id) to Location and keeps it."""
    follower, leader = nodes(), nodes()
    follower.script = lambda m, path, body: (
        (307, {"error": "not the leader"}, {"Location": leader.url + path})
        if m != "GET" else None)
    with make_client([follower.url]) as client:
        client.put("k", "v", request_id="rid-1")
        client.put("k2", "v")
        assert client.leader == leader.url
    assert [b["request_id"] for _, _, b in leader.requests][0] == "rid-1"
    assert len(leader.requests) == 2


def test_503_is_retried_with_the_same_request_id(nodes: Callable[..., FakeNode]) -> None:
    """Two 503s, then success: three attempts, one request id, growing backoff."""
    leader = nodes()
    answers = iter([(503, {"error": "no leader"}, {}), (503, {"error": "timed out"}, {})])
    leader.script = lambda m, p, b: next(answers, None) if m == "PUT" else None
    fake_time = FakeTime()
    with make_client([leader.url], fake_time, backoff=0.1) as client:
        assert client.put("k", "v") == 1
    ids = {body["request_id"] for method, _, body in leader.requests if method == "PUT"}
    assert len(ids) == 1 and len([r for r in leader.requests if r[0] == "PUT"]) == 3
    assert len(fake_time.sleeps) == 2
    assert 0.05 <= fake_time.sleeps[0] <= 0.1 and 0.1 <= fake_time.sleeps[1] <= 0.2


def test_a_dead_endpoint_is_skipped(nodes: Callable[..., FakeNode]) -> None:
    """A refused connection moves the client to the next endpoint."""
    leader = nodes()
    with make_client([dead_endpoint(), leader.url]) as client:
        assert client.put("k", "v", request_id="r") == 1
        assert client.get("k").value == "v"


def test_gives_up_at_the_deadline(nodes: Callable[..., FakeNode]) -> None:
    """With no node able to serve, Unavailable is raised once the deadline has passed."""
    leader = nodes()
    leader.script = lambda m, p, b: (503, {"error": "no leader"}, {})
    fake_time = FakeTime()
    with make_client([leader.url, dead_endpoint()], fake_time, deadline=3.0,
                     retries=1000) as client:
        with pytest.raises(Unavailable, match="no leader"):
            client.put("k", "v")
    assert fake_time.now <= 3.0 and sum(fake_time.sleeps) > 1.0


def test_retries_are_bounded_by_count(nodes: Callable[..., FakeNode]) -> None:
    """retries=2 means three attempts at most."""
    leader = nodes()
    leader.script = lambda m, p, b: (503, {"error": "busy"}, {}) if m == "PUT" else None
    with make_client([leader.url], retries=2) as client:
        with pytest.raises(Unavailable, match="3 attempt"):
            client.put("k", "v")
    assert len([r for r in leader.requests if r[0] == "PUT"]) == 3


@pytest.mark.parametrize("status, error", [(400, BadRequest), (413, TooLarge),
                                           (500, ClientError)])
def test_client_errors_are_raised_without_retry(nodes: Callable[..., FakeNode], status: int,
                                                error: type) -> None:
    """400, 413 and 500 raise at once: retrying the same request cannot help."""
    leader = nodes()
    leader.script = lambda m, p, b: (status, {"error": "nope"}, {}) if m == "PUT" else None
    with make_client([leader.url]) as client:
        with pytest.raises(error, match="nope") as raised:
            client.put("k", "v")
    assert raised.value.status == status
    assert len([r for r in leader.requests if r[0] == "PUT"]) == 1


def test_reads_from_observers_round_robin(nodes: Callable[..., FakeNode]) -> None:
    """read_from="observers" spreads reads over the observer endpoints only."""
    voter, obs1, obs2 = nodes(), nodes("observer"), nodes("observer")
    for node in (voter, obs1, obs2):
        node.data["k"] = "v"
    with make_client([voter.url, obs1.url, obs2.url], read_from="observers") as client:
        for _ in range(4):
            client.get("k", consistency="stale")
    reads = lambda node: len([r for r in node.requests if r[1].startswith("/v1/kv/")])
    assert (reads(voter), reads(obs1), reads(obs2)) == (0, 2, 2)


def test_status_of_one_endpoint_and_members(nodes: Callable[..., FakeNode]) -> None:
    """status(endpoint) asks that node once; members() returns the view as a list."""
    a, b = nodes(), nodes("observer")
    with make_client([a.url]) as client:
        assert client.status(b.url)["role"] == "observer"
        assert client.members() == [{"id": "n1", "state": "alive"}]
        with pytest.raises(Unavailable):
            client.status(dead_endpoint())


def test_endpoint_normalization() -> None:
    """Bare host:port gets http://; anything but an http base URL is refused."""
    assert normalize_endpoint("127.0.0.1:8001") == "http://127.0.0.1:8001"
    assert normalize_endpoint("http://h:1/") == "http://h:1"
    for bad in ("https://h:1", "http://h:1/v1", "http://h:port", "http://"):
        with pytest.raises(ValueError):
            normalize_endpoint(bad)
    with pytest.raises(ValueError):
        Client([])
    with pytest.raises(ValueError):
        Client(["h:1"], read_from="followers")
