"""Chaos clients: threads issuing random KV operations and recording each one's outcome.

Each client runs one operation at a time (a Jepsen "process"): a put, a linearizable get, a
delete or a compare-and-set on a small key set, with values unique to the history so that a
read names the write it saw. Every operation is recorded as a
:class:`bwcore.linearizability.Operation` with its call and return times and an outcome:

* ``ok=True``: the cluster answered; ``output`` is what it said.
* ``ok=False``: the operation definitely did not take effect: every attempt was refused before
  a node could propose it (connection refused, or 503 "no leader", which a node answers only
  when it proposed nothing), or a read that failed (a read changes nothing).
* ``ok=None`` (unknown): an attempt may have reached the log (a timeout, a dropped connection, a
  503 after proposing) and no attempt succeeded. Retries carry the same ``request_id``, so the
  write is applied at most once (Raft §8), but it may be applied after the client gave up.

The clients talk HTTP themselves (not through :class:`bwcore.client.Client`) so that each
attempt can be classified as above.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from bwcore.linearizability import Operation

__all__ = ["ClientSettings", "ChaosClient", "Endpoints", "Outcome", "http_request"]

#: A 503 whose error says this was answered by a node that proposed nothing (bwcore.api).
_NOT_PROPOSED_ERRORS = ("no leader",)


@dataclass
class ClientSettings:
    """How chaos clients behave.

    Attributes:
        keys: The keys operated on.
        attempt_timeout: Seconds one HTTP attempt may take (socket timeout).
        op_deadline: Seconds one operation may take, retries included; then its outcome is
            unknown (or, for a read, failed).
        think: Seconds a client waits between two operations.
        observer_read_share: Fraction of reads sent to observers, when there are any.
        read_consistency: ``"linearizable"``; ``"stale"`` reads are not linearizable and
            serve only to check that a run catches them (``bwraft chaos --stale-reads``).
    """

    keys: tuple[str, ...] = ("k0", "k1", "k2", "k3", "k4", "k5")
    attempt_timeout: float = 2.0
    op_deadline: float = 6.0
    think: float = 0.0
    observer_read_share: float = 0.5
    read_consistency: str = "linearizable"


class Endpoints:
    """The cluster's API URLs by role, shared by clients and faults (it changes as helpers do).

    Args:
        voters: API URLs of the voters.
        observers: API URLs of the observers.
    """

    def __init__(self, voters: list[str], observers: list[str] = ()) -> None:
        self._lock = threading.Lock()
        self._voters = list(voters)
        self._observers = list(observers)
        self.leader: str | None = None

    def voters(self) -> list[str]:
        with self._lock:
            return list(self._voters)

    def observers(self) -> list[str]:
        with self._lock:
            return list(self._observers)

    def replace_observer(self, old: str | None, new: str | None) -> None:
        """Swap an observer's URL (a helper replaced by a new one); None adds or removes."""
        with self._lock:
            if old in self._observers:
                self._observers.remove(old)
            if new is not None:
                self._observers.append(new)


@dataclass
class Outcome:
    """The result of one HTTP attempt."""

    status: int | None           # None: no answer
    body: Any = None
    location: str | None = None
    #: Whether the request certainly never reached a node (connection refused).
    not_sent: bool = False
    error: str = ""


def http_request(connections: dict[str, http.client.HTTPConnection], endpoint: str,
                 method: str, path: str, body: dict | None, timeout: float,
                 headers: dict[str, str] | None = None) -> Outcome:
    """One HTTP exchange over a kept-alive connection; failures become an Outcome, never raise."""
    payload = json.dumps(body).encode("utf-8") if body is not None else None
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    connection = connections.get(endpoint)
    if connection is None:
        parts = urlsplit(endpoint)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        connections[endpoint] = connection
    connection.timeout = timeout
    if connection.sock is not None:
        connection.sock.settimeout(timeout)
    try:
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        data = response.read()
    except ConnectionRefusedError as exc:
        _close(connections, endpoint)
        return Outcome(None, not_sent=True, error=f"refused: {exc}")
    except (OSError, http.client.HTTPException) as exc:
        _close(connections, endpoint)
        return Outcome(None, error=f"{type(exc).__name__}: {exc}")
    if response.will_close:
        _close(connections, endpoint)
    try:
        answer = json.loads(data) if data else None
    except ValueError:
        answer = {"error": data[:200].decode("utf-8", "replace")}
    return Outcome(response.status, answer, response.getheader("Location"))


def _close(connections: dict[str, http.client.HTTPConnection], endpoint: str) -> None:
    connection = connections.pop(endpoint, None)
    if connection is not None:
        connection.close()


def _base(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme or 'http'}://{parts.netloc}"


class ChaosClient:
    """One client thread's logic: pick an operation, run it against the cluster, record it.

    Args:
        client_id: Its id in the history.
        endpoints: Where the cluster is.
        settings: Keys, timeouts, read routing.
        rng: Its own randomness (seeded by the run, so a seed replays the same choices).
        clock: Seconds since the run started (monotonic).
        record: Called with each finished Operation.
    """

    def __init__(self, client_id: int, endpoints: Endpoints, settings: ClientSettings,
                 rng: random.Random, clock: Callable[[], float],
                 record: Callable[[Operation], None]) -> None:
        self.client_id = client_id
        self.endpoints = endpoints
        self.settings = settings
        self.rng = rng
        self.clock = clock
        self.record = record
        self.counter = 0
        self.errors: list[str] = []
        #: The last value this client saw in each key: what its compare-and-sets expect.
        self.recent: dict[str, str | None] = {}
        self._connections: dict[str, http.client.HTTPConnection] = {}

    def run(self, stop: threading.Event) -> None:
        """Issue operations until ``stop`` is set."""
        try:
            while not stop.is_set():
                self.step()
                if self.settings.think:
                    stop.wait(self.settings.think)
        except Exception as exc:  # noqa: BLE001 - a bug here must show in the report
            self.errors.append(f"client {self.client_id} stopped: {type(exc).__name__}: {exc}")
        finally:
            for connection in self._connections.values():
                connection.close()

    def step(self) -> Operation:
        """Choose and run one random operation; record and return it."""
        rng = self.rng
        key = rng.choice(self.settings.keys)
        kind = rng.choices(("put", "get", "cas", "delete"), weights=(3, 4, 2, 1))[0]
        self.counter += 1
        value = f"c{self.client_id}-{self.counter}"
        if kind == "put":
            return self.put(key, value)
        if kind == "get":
            return self.get(key)
        if kind == "delete":
            return self.delete(key)
        # Expect the value last seen, so that some of them succeed, or absence.
        expect = None if rng.random() < 0.2 else self.recent.get(key)
        return self.cas(key, expect, None if rng.random() < 0.1 else value)

    # -- operations -------------------------------------------------------------------------

    def put(self, key: str, value: str) -> Operation:
        call = self.clock()
        status, answer, certain = self._write("PUT", key, "", {"value": value})
        return self._finish(Operation(self.client_id, "put", key, value=value, call=call,
                                      ret=None, ok=None), status, answer, certain, None)

    def delete(self, key: str) -> Operation:
        call = self.clock()
        status, answer, certain = self._write("DELETE", key, "", {})
        return self._finish(Operation(self.client_id, "delete", key, call=call, ret=None,
                                      ok=None), status, answer, certain, None)

    def cas(self, key: str, expect: str | None, value: str | None) -> Operation:
        call = self.clock()
        status, answer, certain = self._write("POST", key, "/cas",
                                              {"expect": expect, "value": value})
        output = bool(answer.get("ok")) if status == 200 and isinstance(answer, dict) else None
        op = Operation(self.client_id, "cas", key, value=value, expect=expect,
                       expect_absent=expect is None, call=call, ret=None, ok=None)
        return self._finish(op, status, answer, certain, output)

    def get(self, key: str) -> Operation:
        call = self.clock()
        path = f"/v1/kv/{quote(key, safe='')}?consistency={self.settings.read_consistency}"
        give_up_at = time.monotonic() + self.settings.op_deadline
        status, answer = None, None
        while time.monotonic() < give_up_at:
            endpoint = self._read_endpoint()
            outcome = self._attempt(endpoint, "GET", path, None, give_up_at)
            if outcome.status == 307 and outcome.location:
                outcome = self._attempt(_base(outcome.location), "GET", path, None, give_up_at)
            if outcome.status in (200, 404):
                status, answer = outcome.status, outcome.body
                break
            if outcome.status is not None and outcome.status not in (503, 307):
                self.errors.append(f"get {key} at {endpoint}: HTTP {outcome.status} "
                                   f"{outcome.body}")
                break
            self._pause(give_up_at)
        ret = self.clock()
        if status == 200 and isinstance(answer, dict) and isinstance(answer.get("value"), str):
            op = Operation(self.client_id, "get", key, output=answer["value"], call=call,
                           ret=ret, ok=True)
            self.recent[key] = answer["value"]
        elif status == 404:
            op = Operation(self.client_id, "get", key, output=None, call=call, ret=ret, ok=True)
            self.recent[key] = None
        else:
            # A read that got no answer changed nothing: a definite failure.
            op = Operation(self.client_id, "get", key, call=call, ret=ret, ok=False)
        self.record(op)
        return op

    # -- plumbing ---------------------------------------------------------------------------

    def _write(self, method: str, key: str, suffix: str, body: dict) -> tuple[
            int | None, Any, bool]:
        """Send a write until it succeeds or the deadline passes.

        Returns:
            (status of the last answer, its body, whether no attempt may have taken effect).
        """
        path = f"/v1/kv/{quote(key, safe='')}{suffix}"
        body = {**body, "request_id": f"chaos-{self.client_id}-{self.counter}-"
                                      f"{self.rng.getrandbits(48):012x}"}
        give_up_at = time.monotonic() + self.settings.op_deadline
        certainly_not_applied = True
        endpoint = self.endpoints.leader or self.rng.choice(self.endpoints.voters())
        redirects = 0
        while time.monotonic() < give_up_at:
            outcome = self._attempt(endpoint, method, path, body, give_up_at)
            if outcome.status == 200:
                self.endpoints.leader = endpoint
                return 200, outcome.body, False
            if outcome.status == 307 and outcome.location and redirects < 4:
                redirects += 1
                endpoint = _base(outcome.location)
                continue
            if outcome.status is not None and outcome.status not in (307, 503):
                # 400 and the like: refused before proposing; a bug in this tool or the node.
                self.errors.append(f"{method} {path} at {endpoint}: HTTP {outcome.status} "
                                   f"{outcome.body}")
                return outcome.status, outcome.body, certainly_not_applied
            # A 307 may follow a forward that reached the leader and timed out: not certain.
            if not (outcome.not_sent or _not_proposed(outcome)):
                certainly_not_applied = False
            if self.endpoints.leader == endpoint:
                self.endpoints.leader = None
            endpoint = self.rng.choice(self.endpoints.voters())
            redirects = 0
            self._pause(give_up_at)
        return None, None, certainly_not_applied

    def _attempt(self, endpoint: str, method: str, path: str, body: dict | None,
                 give_up_at: float) -> Outcome:
        timeout = max(0.05, min(self.settings.attempt_timeout, give_up_at - time.monotonic()))
        return http_request(self._connections, endpoint, method, path, body, timeout)

    def _pause(self, give_up_at: float) -> None:
        time.sleep(max(0.0, min(self.rng.uniform(0.05, 0.2), give_up_at - time.monotonic())))

    def _read_endpoint(self) -> str:
        observers = self.endpoints.observers()
        if observers and self.rng.random() < self.settings.observer_read_share:
            return self.rng.choice(observers)
        return self.rng.choice(self.endpoints.voters())

    def _finish(self, op: Operation, status: int | None, answer: Any, certain: bool,
                output: Any) -> Operation:
        ret = self.clock()
        if status == 200:
            op = replace(op, ret=ret, ok=True, output=output)
            if op.op == "put" or (op.op == "cas" and output):
                self.recent[op.key] = op.value
            elif op.op == "delete":
                self.recent[op.key] = None
        elif certain:
            op = replace(op, ret=ret, ok=False)
        # else: unknown outcome, ret stays None
        self.record(op)
        return op


def _not_proposed(outcome: Outcome) -> bool:
    if outcome.status != 503 or not isinstance(outcome.body, dict):
        return False
    return str(outcome.body.get("error", "")) in _NOT_PROPOSED_ERRORS

