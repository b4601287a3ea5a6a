"""Helpers shared by the integration tests: waiting on conditions, killing by pid."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable

import pytest

from bwcore import cluster as local

#: Small ticks keep elections and failover fast: election timeout = 10 ticks = 0.5 s.
TICK_MS = 50
GRACE_SECONDS = 5.0


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
