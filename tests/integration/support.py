"""Helpers shared by the integration tests: waiting on conditions, killing by pid, clients
that record histories for the linearizability checker."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from typing import Callable

import pytest

from bwcore import cluster as local
from bwcore.client import Client, ClientError, NotFound, Unavailable
from bwcore.linearizability import Operation

#: Small ticks keep elections and failover fast: election timeout = 10 ticks = 0.5 s.
TICK_MS = 50
GRACE_SECONDS = 5.0
#: Keys and client count of the history-recording clients.
KEYS = ("x", "y", "z")
CLIENTS = 4


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    give_up_at = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= give_up_at:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def kill_all(cluster: local.Cluster) -> None:
    """Stop every process this test started for ``cluster``, by pid."""
    processes = [p for p in cluster.processes.values() if p.poll() is None]
    for process in processes:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass
    give_up_at = time.monotonic() + GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, give_up_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # it gets SIGKILL below
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def history_client(client_id: int, endpoints: list[str], stop: threading.Event,
                   history: list[Operation], errors: list[str], lock: threading.Lock, *,
                   kinds: tuple[str, ...], read_from: str = "any", keys: tuple[str, ...] = KEYS,
                   clients: int = CLIENTS) -> None:
    """One client of a linearizability test: random operations drawn from ``kinds`` (put, get,
    cas, delete) on ``keys`` until ``stop``, each recorded in ``history`` with its call and
    return times and outcome (``ok=None``, unknown, when it timed out)."""
    rng = random.Random(client_id)
    # A short deadline turns a stuck request into an operation with unknown outcome instead of
    # a client that waits out the whole test.
    with Client(endpoints, timeout=2.0, deadline=3.0, read_from=read_from, rng=rng) as client:
        counter = 0
        while not stop.is_set():
            key, kind = rng.choice(keys), rng.choice(kinds)
            counter += 1
            value = f"c{client_id}-{counter}"
            expect = rng.choice([None, f"c{rng.randrange(clients)}-{rng.randrange(counter)}"])
            call = time.monotonic()
            fields: dict = {}
            try:
                if kind == "put":
                    client.put(key, value)
                    fields = {"value": value}
                elif kind == "delete":
                    client.delete(key)
                elif kind == "cas":
                    result = client.cas(key, expect, value)
                    fields = {"value": value, "expect": expect, "expect_absent": expect is None,
                              "output": result.ok}
                else:
                    try:
                        fields = {"output": client.get(key).value}
                    except NotFound:
                        fields = {"output": None}
                outcome: bool | None = True
                ret: float | None = time.monotonic()
            except Unavailable:
                if kind == "get":
                    continue  # a failed read has no effect: leave it out
                outcome, ret = None, None
                if kind != "delete":
                    fields = {"value": value}
                if kind == "cas":
                    fields.update(expect=expect, expect_absent=expect is None)
            except ClientError as exc:  # anything else is a bug the test must show
                errors.append(f"client {client_id}: {kind} {key}: {exc}")
                return
            with lock:
                history.append(Operation(client_id, kind, key, call=call, ret=ret, ok=outcome,
                                         **fields))
