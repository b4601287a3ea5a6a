"""A synchronous Python client for the bwraft HTTP API (standard library only).

    from bwcore.client import Client
    with Client(["http://127.0.0.1:8001", "http://127.0.0.1:8002"]) as kv:
        kv.put("color", "blue")
        print(kv.get("color").value)

Writes go to the leader, learned from ``/v1/status`` and from 307 redirects. Every write carries
a request id (a fresh uuid4 unless the caller gives one) and is retried with the SAME id on 503
answers and connection errors, across endpoints, with exponential backoff, up to a deadline: the
state machine applies an id once, so a retry can never apply a write twice (Raft paper §8,
"Client interaction"). Reads are retried the same way. A Client keeps one keep-alive
connection per endpoint and is not thread-safe: use one per thread.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import quote, urlsplit

__all__ = [
    "BadRequest", "CasResult", "Client", "ClientError", "DeleteResult", "NotFound",
    "ReadResult", "TooLarge", "Unavailable", "normalize_endpoint",
]

READ_FROM = ("any", "leader", "observers")
CONSISTENCY_LEVELS = ("linearizable", "stale")
# Connection failures that mean "a kept-alive connection was closed by the server while idle":
# the request never reached it, so it is resent once at once on a fresh connection.
_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError,
                            ConnectionResetError)


class ClientError(Exception):
    """A request failed. ``status`` is the HTTP status, or None when no node answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BadRequest(ClientError):
    """The request was refused as invalid (400, 405); retrying it cannot help."""


class TooLarge(BadRequest):
    """The request body was larger than the node accepts (413)."""


class NotFound(ClientError):
    """The key is absent. ``index`` is the applied index at which it was absent."""

    def __init__(self, message: str, status: int | None = 404, index: int | None = None) -> None:
        super().__init__(message, status)
        self.index = index


class Unavailable(ClientError):
    """No node could serve the request before the deadline (no leader, timeouts, down nodes).

    The outcome of a write is unknown; retrying it with the same ``request_id`` is safe.
    """


@dataclass(frozen=True)
class ReadResult:
    value: str
    index: int


@dataclass(frozen=True)
class DeleteResult:
    index: int
    deleted: bool


@dataclass(frozen=True)
class CasResult:
    ok: bool
    value: str | None
    index: int


def normalize_endpoint(endpoint: str) -> str:
    """``"127.0.0.1:8001"`` or ``"http://127.0.0.1:8001/"`` -> ``"http://127.0.0.1:8001"``."""
    text = endpoint.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"endpoint {endpoint!r} is not an http://host:port base URL")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r} has an invalid port") from None
    return f"http://{parts.netloc}"


class Client:
    """A client of one bwraft cluster.

    Args:
        endpoints: API base URLs of some of the cluster's nodes (``http://host:port``).
        timeout: Seconds one attempt may take (socket timeout).
        retries: How many times a failed attempt is retried, at most.
        deadline: Seconds an operation may take in total, retries included.
        read_from: ``"any"`` (one endpoint, the next one after a failure), ``"leader"`` or
            ``"observers"`` (round-robin over endpoints whose status role is ``observer``;
            any endpoint when there is none).
        backoff: First pause between retries, doubled after each, up to ``max_backoff``.
        max_backoff: Longest pause between retries.
        clock: Monotonic time source in seconds.
        sleep: How to pause.
        rng: Randomness for backoff jitter.
        admin_token: Sent as ``Authorization: Bearer`` with admin requests (``/v1/admin/``)
            only, for nodes that set ``security.admin_token``.
    """

    def __init__(self, endpoints: Iterable[str], *, timeout: float = 5.0, retries: int = 20,
                 deadline: float = 20.0, read_from: str = "any", backoff: float = 0.05,
                 max_backoff: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, admin_token: str = "") -> None:
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        if not self.endpoints:
            raise ValueError("at least one endpoint is needed")
        if read_from not in READ_FROM:
            raise ValueError(f"read_from must be one of {', '.join(READ_FROM)}")
        self.timeout, self.retries, self.deadline = timeout, retries, deadline
        self.read_from = read_from
        self.backoff, self.max_backoff = backoff, max_backoff
        self._clock, self._sleep = clock, sleep
        self._rng = rng or random.Random()
        self.admin_token = admin_token
        self.leader: str | None = None
        self._cursor = 0
        self._observers: list[str] | None = None
        self._observer_cursor = 0
        self._connections: dict[str, http.client.HTTPConnection] = {}

    # -- the key-value API ------------------------------------------------------------------

    def put(self, key: str, value: str, request_id: str | None = None) -> int:
        """Store ``value`` under ``key``; return the log index of the write."""
        body = {"value": value, "request_id": request_id or uuid.uuid4().hex}
        return int(self._write("PUT", _kv_path(key), body)["index"])

    def get(self, key: str, consistency: str = "linearizable") -> ReadResult:
        """Read ``key``. Raises NotFound when it is absent."""
        if consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        path = f"{_kv_path(key)}?consistency={consistency}"
        answer = self._request("GET", path, None, self._read_endpoint)
        return ReadResult(answer["value"], int(answer["index"]))

    def delete(self, key: str, request_id: str | None = None) -> DeleteResult:
        """Delete ``key``; ``deleted`` says whether it existed."""
        answer = self._write("DELETE", _kv_path(key),
                             {"request_id": request_id or uuid.uuid4().hex})
        return DeleteResult(int(answer["index"]), bool(answer["deleted"]))

    def cas(self, key: str, expect: str | None, value: str | None,
            request_id: str | None = None) -> CasResult:
        """Set ``key`` to ``value`` if it holds ``expect``.

        ``expect=None`` requires the key to be absent; ``value=None`` deletes it on success.
        """
        body = {"expect": expect, "value": value, "request_id": request_id or uuid.uuid4().hex}
        answer = self._write("POST", _kv_path(key) + "/cas", body)
        return CasResult(bool(answer["ok"]), answer.get("value"), int(answer["index"]))

    def status(self, endpoint: str | None = None) -> dict:
        """The status of ``endpoint`` (one attempt), or of the first endpoint that answers."""
        if endpoint is not None:
            url = normalize_endpoint(endpoint)
            return self._request("GET", "/v1/status", None, lambda: url, attempts=1)
        return self._request("GET", "/v1/status", None, self._any_endpoint)

    def members(self) -> list:
        """The gossip membership view of the first endpoint that answers."""
        return self._request("GET", "/v1/members", None, self._any_endpoint)

    # -- cluster administration (through the leader; see docs/api.md) -----------------------

    def admin(self, method: str, path: str, body: dict | None = None) -> dict:
        """One admin request (``/v1/admin/...``), sent to the leader (307s are followed).

        Answers 200 and 202 are returned; 503 is retried like a write; anything else raises.
        """
        if not path.startswith("/v1/admin/"):
            raise ValueError("admin paths start with /v1/admin/")
        return self._request(method, path, body, self._write_endpoint)

    def transfer_leader(self, to: str | None = None) -> dict:
        """Hand leadership to ``to`` (None: the most up-to-date voter); the outcome."""
        return self.admin("POST", "/v1/admin/transfer-leader", {"to": to})

    def member_add(self, node_id: str, raft_addr: str, api_addr: str = "", *,
                   as_learner: bool = False) -> dict:
        """Add a learner and, unless ``as_learner``, promote it once it has caught up."""
        return self.admin("POST", "/v1/admin/members", {
            "id": node_id, "raft_addr": raft_addr, "api_addr": api_addr,
            "as_learner": as_learner})

    def member_promote(self, node_id: str) -> dict:
        return self.admin("POST", f"/v1/admin/members/{quote(node_id, safe='')}/promote")

    def member_remove(self, node_id: str) -> dict:
        return self.admin("DELETE", f"/v1/admin/members/{quote(node_id, safe='')}")

    def member_list(self) -> dict:
        return self.admin("GET", "/v1/admin/members")

    def close(self) -> None:
        """Close every kept-alive connection."""
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- choosing endpoints -----------------------------------------------------------------

    def _any_endpoint(self) -> str:
        return self.endpoints[self._cursor % len(self.endpoints)]

    def _write_endpoint(self) -> str:
        if self.leader is None:
            self._learn_leader(self._any_endpoint())
        return self.leader or self._any_endpoint()

    def _read_endpoint(self) -> str:
        if self.read_from == "leader":
            return self._write_endpoint()
        if self.read_from == "observers":
            if self._observers is None:
                self._observers = [e for e in self.endpoints if self._role_of(e) == "observer"]
                # Start at a random observer, so that short-lived clients (one CLI command
                # each) spread their reads too.
                self._observer_cursor = self._rng.randrange(max(1, len(self._observers)))
            if self._observers:
                self._observer_cursor += 1
                return self._observers[self._observer_cursor % len(self._observers)]
        return self._any_endpoint()

    def _role_of(self, endpoint: str) -> str | None:
        try:
            status, _, answer = self._send(endpoint, "GET", "/v1/status", None)
        except (OSError, http.client.HTTPException):
            return None
        if status != 200 or not isinstance(answer, dict):
            return None
        # A voter's "role" is its Raft role; "node_role" is the configured role.
        return answer.get("node_role", answer.get("role"))

    def _learn_leader(self, endpoint: str) -> None:
        """Ask ``endpoint`` who leads; a failure here only means "send it there anyway"."""
        try:
            status, _, answer = self._send(endpoint, "GET", "/v1/status", None)
        except (OSError, http.client.HTTPException):
            self._failed(endpoint)
            return
        if status == 200 and isinstance(answer, dict) and answer.get("leader_api"):
            try:
                self.leader = normalize_endpoint(str(answer["leader_api"]))
            except ValueError:
                pass

    def _failed(self, endpoint: str) -> None:
        """Move on from an endpoint that failed or could not serve the request."""
        if endpoint == self.leader:
            self.leader = None
        if self._any_endpoint() == endpoint:
            self._cursor += 1
        self._observers = None

    # -- requests, retries and answers ------------------------------------------------------

    def _write(self, method: str, path: str, body: dict) -> dict:
        return self._request(method, path, body, self._write_endpoint)

    def _request(self, method: str, path: str, body: dict | None,
                 choose: Callable[[], str], attempts: int | None = None) -> Any:
        payload = json.dumps(body).encode("utf-8") if body is not None else None
        give_up_at = self._clock() + self.deadline
        attempts = self.retries + 1 if attempts is None else attempts
        pause = self.backoff
        redirects = 0
        failures: list[str] = []
        endpoint = choose()
        while True:
            try:
                status, headers, answer = self._send(endpoint, method, path, payload,
                                                     max(0.001, give_up_at - self._clock()))
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{endpoint}: {type(exc).__name__}: {exc}")
                self._failed(endpoint)
            else:
                if status == 307 and headers.get("location") and redirects < 2 * len(
                        self.endpoints) + 2:
                    # The node is not the leader and could not forward: go where it points.
                    redirects += 1
                    endpoint = self.leader = _base_url(headers["location"])
                    continue
                if status != 503:
                    return _result(status, answer, endpoint)
                failures.append(f"{endpoint}: 503 {_error_text(answer)}")
                self._failed(endpoint)
            attempts -= 1
            if attempts <= 0 or self._clock() + pause > give_up_at:
                raise Unavailable(f"{method} {path} failed after {len(failures)} attempt(s): "
                                  + "; ".join(failures[-3:]))
            # Full jitter, so that many clients retrying after a leader change do not march
            # in step against the new leader.
            self._sleep(self._rng.uniform(pause / 2, pause))
            pause = min(pause * 2, self.max_backoff)
            endpoint = choose()

    def _send(self, endpoint: str, method: str, path: str, payload: bytes | None,
              budget: float | None = None) -> tuple[int, dict[str, str], Any]:
        """One HTTP exchange over the endpoint's kept-alive connection."""
        timeout = min(self.timeout, budget) if budget is not None else self.timeout
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.admin_token and path.startswith("/v1/admin/"):
            headers["Authorization"] = f"Bearer {self.admin_token}"
        for fresh_retry in (False, True):
            connection = self._connections.get(endpoint)
            reused = connection is not None
            if connection is None:
                parts = urlsplit(endpoint)
                connection = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                                        timeout=timeout)
                self._connections[endpoint] = connection
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            try:
                connection.request(method, path, body=payload, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except _STALE_CONNECTION_ERRORS:
                self._drop(endpoint)
                if reused and not fresh_retry:
                    continue
                raise
            except BaseException:
                self._drop(endpoint)
                raise
            if response.will_close:
                self._drop(endpoint)
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, answer_headers, _decode(data, answer_headers)
        raise AssertionError("unreachable")

    def _drop(self, endpoint: str) -> None:
        connection = self._connections.pop(endpoint, None)
        if connection is not None:
            connection.close()


def _kv_path(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("key must be a non-empty string")
    return "/v1/kv/" + quote(key, safe="")


def _base_url(location: str) -> str:
    parts = urlsplit(location)
    return f"{parts.scheme or 'http'}://{parts.netloc}"


def _decode(data: bytes, headers: dict[str, str]) -> Any:
    if headers.get("content-type", "").startswith("application/json"):
        try:
            return json.loads(data)
        except ValueError:
            pass
    return {"error": data.decode("utf-8", "replace").strip()[:500]}


def _error_text(answer: Any) -> str:
    if isinstance(answer, dict) and "error" in answer:
        return str(answer["error"])
    return str(answer)[:200]


def _result(status: int, answer: Any, endpoint: str) -> Any:
    """Return a 200 answer or raise the ClientError that says why it is not one."""
    if status in (200, 202):
        return answer
    message = f"{endpoint}: {_error_text(answer)}"
    if status == 404 and isinstance(answer, dict) and "index" in answer:
        raise NotFound(message, status, answer.get("index"))
    if status == 413:
        raise TooLarge(message, status)
    if status in (400, 405):
        raise BadRequest(message, status)
    raise ClientError(f"HTTP {status} from {message}", status)
