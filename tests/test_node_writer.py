"""ThreadedWriter (bwcore.node): the node's storage calls on one dedicated thread.

The reactor is replaced by a recorder of ``callFromThread`` calls, which the test runs on its
own thread, as the reactor thread would: results must arrive only that way.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from bwcore.node import StorageWriter, ThreadedWriter


class ThreadCalls:
    """A reactor's ``callFromThread``: calls wait here until the test runs them."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.put((f, args))

    def run_next(self) -> None:
        f, args = self.calls.get(timeout=30)
        f(*args)

    def run(self, count: int) -> None:
        for _ in range(count):
            self.run_next()


class ThreadedWriterTest(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadCalls()
        self.writer = ThreadedWriter(self.reactor, name="test-writer")
        self.addCleanup(self.writer.stop)

    def test_is_a_storage_writer(self) -> None:
        """ThreadedWriter has the methods of the StorageWriter protocol."""
        for name in vars(StorageWriter):
            if not name.startswith("_"):
                assert callable(getattr(self.writer, name))

    def test_calls_run_in_order_one_at_a_time_on_one_thread(self) -> None:
        """Calls run in submission order, never overlapping, all on one thread that is not
        the caller's."""
        self.writer.start()
        lock = threading.Lock()
        seen: list[tuple[int, str]] = []
        active = [0, 0]  # now, most at once

        def call(n: int) -> int:
            with lock:
                active[0] += 1
                active[1] = max(active)
            seen.append((n, threading.current_thread().name))
            with lock:
                active[0] -= 1
            return n * 10

        deferreds = [self.writer.run(call, n) for n in range(50)]
        self.reactor.run(50)
        assert [self.successResultOf(d) for d in deferreds] == [n * 10 for n in range(50)]
        assert [n for n, _ in seen] == list(range(50))
        assert {name for _, name in seen} == {"test-writer"}
        assert active[1] == 1

    def test_results_arrive_through_the_reactor(self) -> None:
        """A call's Deferred fires only when the reactor runs what the thread handed over."""
        self.writer.start()
        done = threading.Event()
        d = self.writer.run(lambda: done.set() or "saved")
        assert done.wait(timeout=30)
        self.assertNoResult(d)
        self.reactor.run_next()
        assert self.successResultOf(d) == "saved"

    def test_a_failing_call_fails_its_deferred_and_the_next_runs(self) -> None:
        """What a call raises is its Deferred's failure; calls after it still run."""
        self.writer.start()

        def fail() -> None:
            raise OSError("disk on fire")

        failed = self.writer.run(fail)
        after = self.writer.run(lambda: "next")
        self.reactor.run(2)
        assert str(self.failureResultOf(failed, OSError).value) == "disk on fire"
        assert self.successResultOf(after) == "next"

    def test_calls_queued_before_start_run_after_it(self) -> None:
        """run() before start() queues the call; start() runs it."""
        d = self.writer.run(lambda: "early")
        assert self.reactor.calls.empty()
        self.writer.start()
        self.reactor.run_next()
        assert self.successResultOf(d) == "early"

    def test_stop_runs_queued_calls_then_joins(self) -> None:
        """stop() lets every queued call finish and returns once the thread has ended."""
        started, release = threading.Event(), threading.Event()
        ran: list[int] = []

        def first_call() -> bool:
            started.set()
            return release.wait(30)

        self.writer.start()
        first = self.writer.run(first_call)
        second = self.writer.run(ran.append, 2)
        # Released from elsewhere once the first call runs, while stop() waits.
        releaser = threading.Thread(target=lambda: started.wait(30) and release.set())
        releaser.start()
        self.writer.stop()
        releaser.join()
        assert ran == [2]
        assert not any(t.name == "test-writer" for t in threading.enumerate())
        self.reactor.run(2)
        assert self.successResultOf(first) is True
        self.successResultOf(second)

    def test_run_after_stop_fails(self) -> None:
        """A call submitted after stop() fails at once instead of waiting forever."""
        self.writer.start()
        self.writer.stop()
        self.writer.stop()  # idempotent
        d: Deferred[Any] = self.writer.run(lambda: None)
        assert "stopped" in str(self.failureResultOf(d, RuntimeError).value)

    def test_stop_without_start(self) -> None:
        """stop() on a writer never started returns at once."""
        self.writer.stop()
        with pytest.raises(queue.Empty):
            self.reactor.calls.get_nowait()
