"""The Raft driver: kernel <-> storage <-> transport <-> state machine, as a Twisted service.

:class:`RaftNode` owns one :class:`~bwcore.kernel.RawNode` and runs its Ready loop on the
reactor thread. For each Ready it sends ``messages``, persists hard state, snapshot and entries
in ONE storage transaction on a dedicated writer thread, and only then sends
``persisted_messages`` (Raft §5, Figure 2: "respond to RPCs only after updating stable
storage"), installs the snapshot, applies committed entries and serves read states. While a
save is in flight, proposals and messages accumulate in the kernel and go into the next Ready:
one fsync covers the whole batch (group commit).

It is also the facade the HTTP API calls: :meth:`RaftNode.propose`,
:meth:`RaftNode.read_barrier`, :meth:`RaftNode.status`, :meth:`RaftNode.leader_api`.
"""

from __future__ import annotations

import heapq
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from bwcore.codec import PluginFrame
from bwcore.config import Address, NodeConfig, parse_address
from bwcore.errors import ConfigError, NotLeader, Unavailable
from bwcore.hookspecs import SnapshotsOffReactor
from bwcore.kernel import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    KernelConfig,
    Message,
    ProposalDropped,
    RawNode,
    Ready,
    ReadState,
    Snapshot,
    SnapshotMeta,
    SoftState,
    StateRole,
)
from bwcore.logs import get_logger
from bwcore.metrics import NodeMetrics
from bwcore.plugins import PluginHost
from bwcore.storage import SnapshotStaging

__all__ = ["RaftNode", "StorageWriter", "ThreadedWriter"]

T = TypeVar("T")

#: Room for a frame's envelope around one entry; bigger proposals could never be replicated.
_FRAME_OVERHEAD = 4096


class StorageWriter(Protocol):
    """Runs storage calls off the reactor thread, one at a time, in submission order."""

    def start(self) -> None: ...

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...

    def stop(self) -> None: ...


class ThreadedWriter:
    """A :class:`StorageWriter` with ONE dedicated thread, so saves never overlap or reorder
    and the reactor never waits on an fsync.

    Calls reach the thread through a :class:`queue.SimpleQueue`, in submission order, and
    their results come back with ``reactor.callFromThread``: the Deferred :meth:`run` returned
    fires on the reactor thread, or fails with whatever the call raised. (Twisted's
    ``ThreadPool`` with ``deferToThreadPool`` does the same with more Python work on both
    threads per call — its team coordinator, a context wrapper — all of it holding the GIL.)
    Calls queued before :meth:`start` run once it is called; :meth:`stop` lets the queued calls
    run, then ends the thread and waits for it.
    """

    def __init__(self, reactor: Any, name: str = "bwraft-writer") -> None:
        self._reactor = reactor
        self._name = name
        self._calls: queue.SimpleQueue[tuple[Deferred[Any], Callable[..., Any],
                                             tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._stopped:
            return defer.fail(RuntimeError(f"{self._name}: the writer is stopped"))
        d: Deferred[T] = Deferred()
        self._calls.put((d, fn, args))
        return d

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._calls.put(None)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _work(self) -> None:
        calls = self._calls
        while (call := calls.get()) is not None:
            self._call(*call)
            del call  # hold nothing of a finished call while waiting for the next

    def _call(self, d: Deferred[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            result = fn(*args)
        except BaseException:
            self._reactor.callFromThread(d.errback, Failure())
        else:
            self._reactor.callFromThread(d.callback, result)


@dataclass(slots=True)
class _Proposal:
    term: int
    deferred: Deferred[Any]
    started: float
    #: The command while it waits for the next Ready to take it into the log, and then
    #: the index it was given there.
    data: bytes = b""
    index: int = 0


def _fire(d: Deferred[Any], result: Any) -> None:
    """Fire ``d`` unless it already fired (timed out or cancelled by the caller)."""
    if d.called:
        return
    if isinstance(result, Exception):
        d.errback(Failure(result))
    else:
        d.callback(result)


class RaftNode(MultiService):
    """One bwraft node: the Raft driver plus the facade the API and plugins call.

    Construction does no I/O; :meth:`start` (``startService``) opens storage, loads state,
    builds kernel, state machine and transport, and starts ticking.

    Args:
        config: The node's configuration.
        host: Its plugins (storage, state machine, role, policies).
        reactor: ``IReactorTime`` (and ``IReactorTCP``/``IReactorFromThreads`` for the default
            transport and writer); every timer goes through it.
        rng: Randomness for election timeouts and read contexts (seeded from the OS if None).
        transport_factory: ``factory(node) -> transport`` (default: a
            :class:`bwcore.transport.PeerTransport`); the transport must offer ``listen``,
            ``set_peer``, ``remove_peer``, ``send`` and ``stop``.
        writer: Where storage calls run (default: a :class:`ThreadedWriter`).
        snapshot_worker: Where snapshot work runs off the reactor: serializing a snapshot,
            staging its image, decoding one to install (default: a :class:`ThreadedWriter` of
            its own; when only ``writer`` is given, ``writer`` — a test's inline writer then
            runs everything it is given).
        registry: Prometheus registry for the node's metrics (default: a new one).
        timer: Monotonic seconds for measurements only (latency histograms).
        on_fatal: Called with a reason when the node halts (storage failure, a state machine
            that raised, a failed start).
    """

    def __init__(self, config: NodeConfig, host: PluginHost, reactor: Any, *,
                 rng: random.Random | None = None,
                 transport_factory: Callable[[RaftNode], Any] | None = None,
                 writer: StorageWriter | None = None,
                 snapshot_worker: StorageWriter | None = None,
                 registry: CollectorRegistry | None = None,
                 timer: Callable[[], float] = time.perf_counter,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.setName(f"raft:{config.id}")
        self.node_id = config.id
        self.config = config
        self.host = host
        self.reactor = reactor
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = NodeMetrics(self.registry)
        self.log = get_logger(node_id=config.id)
        self.kernel: RawNode | None = None
        self._read_kernel_gauges()
        self.state_machine: Any = None
        self.storage: Any = None
        self.transport: Any = None
        self.gossip: Any = None
        self.raft_port: int | None = None
        #: The fault-injection layer (bwcore.faults), only when the config enables it.
        self.faults: Any = None
        if config.faults.enabled:
            from bwcore.faults import FaultInjector

            self.faults = FaultInjector(config.id, registry=self.registry,
                                        log=self.log.bind(logger="bwcore.faults"))
        self._rng = rng if rng is not None else random.Random(os.urandom(16))
        self._transport_factory = transport_factory or _default_transport
        self._writer = writer if writer is not None else ThreadedWriter(
            reactor, name=f"bwraft-writer-{config.id}")
        if snapshot_worker is None:
            snapshot_worker = writer if writer is not None else ThreadedWriter(
                reactor, name=f"bwraft-snapshot-{config.id}")
        self._snapshot_worker = snapshot_worker
        self._timer = timer
        self._on_fatal = on_fatal
        self._api_urls: dict[str, str] = {
            vid: v.api.url for vid, v in config.cluster.voters.items() if v.api is not None}
        self._api_urls.setdefault(config.id, config.addresses.api.url)
        self._ticker: task.LoopingCall | None = None
        self._start_waiters: list[Deferred[None]] | None = []
        self._start_failure: Failure | None = None
        self._serving = False
        self._driving = False
        self._stopping = False
        self._stopped = False
        self._halted: str | None = None
        # The Ready loop.
        self._ready_call: Any = None
        self._saving = False
        self._idle_waiters: list[Deferred[None]] = []
        # Term and vote as last handed to storage, and a newer hard state whose only change is
        # the commit index, which rides along with the next save (see _process_ready).
        self._saved_hard_state = HardState()
        self._unsaved_hard_state: HardState | None = None
        # Proposals of this turn, not yet in the log, and those waiting for their entry to
        # apply, by log index.
        self._pending: list[_Proposal] = []
        self._proposals: dict[int, _Proposal] = {}
        # The last committed entry of the Ready being saved that was applied already.
        self._applied_early = 0
        # Proposal deadlines, (when, sequence, timeout, proposal) in a heap served by ONE
        # timer: a timer per proposal cost the leader more than the rest of its bookkeeping.
        self._deadlines: list[tuple[float, int, float, _Proposal]] = []
        self._deadline_seq = 0
        self._deadline_call: Any = None
        # ReadIndex: callers of this turn, requests in flight by context, and confirmed read
        # indexes waiting for the state machine to catch up (a heap by index).
        self._read_batch: list[Deferred[int]] = []
        self._read_flush: Any = None
        self._read_prefix = b""
        self._read_seq = 0
        self._reads_in_flight: dict[bytes, list[Deferred[int]]] = {}
        self._reads_waiting: list[tuple[int, int, list[Deferred[int]]]] = []
        self._read_max_lag: dict[Deferred[int], int] = {}  # read_barrier(max_lag=...)
        # Compaction: what applied since the last snapshot, a snapshot being taken (from
        # snapshot_begin to the end of Storage.compact), one stored for the kernel to compact
        # to, and a leader's snapshot being decoded before it is installed.
        self._log_entries = 0
        self._log_bytes = 0
        self._snapshotting = False
        self._compacted: Snapshot | None = None
        self._installing = False
        self._leader: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self.start())
        d.addErrback(self._start_failed)

    def when_started(self) -> Deferred[None]:
        """A Deferred firing once the node serves (errback if starting failed)."""
        if self._start_waiters is not None:
            d: Deferred[None] = Deferred()
            self._start_waiters.append(d)
            return d
        return defer.fail(self._start_failure) if self._start_failure else defer.succeed(None)

    def _start_finished(self, failure: Failure | None) -> None:
        waiters, self._start_waiters = self._start_waiters or [], None
        self._start_failure = failure
        for d in waiters:
            d.errback(failure) if failure is not None else d.callback(None)

    async def start(self) -> None:
        """Open storage, load state, build everything, start ticking. Called by startService."""
        config, hook = self.config, self.host.hook
        self.host.check_pending()
        self._writer.start()
        if self._snapshot_worker is not self._writer:
            self._snapshot_worker.start()
        self.storage = hook.bwraft_open_storage(config=config)
        if self.storage is None:
            raise ConfigError(f"{config.source or '<config>'}: no plugin provides storage"
                              " (is sql-storage installed?)")
        state = await self._writer.run(self.storage.load)
        if self._stopping:  # stopService ran while the state was loading
            raise Unavailable("node stopped while starting")
        self._saved_hard_state = state.hard_state
        self.state_machine = hook.bwraft_create_state_machine(config=config)
        if self.state_machine is None:
            raise ConfigError(f"{config.source or '<config>'}: no plugin provides a state"
                              " machine (is kv installed?)")
        if state.snapshot is not None:
            # The kernel hands out only entries after the snapshot: restore the image first.
            install = await self._prepare_restore(state.snapshot.data)
            if self._stopping:
                raise Unavailable("node stopped while starting")
            install()
        kernel_config = KernelConfig(
            id=config.id, election_tick=config.election_ticks,
            heartbeat_tick=config.heartbeat_ticks, pre_vote=True, check_quorum=True,
            non_voting=not config.is_voter,
            # An append must fit in one frame, or the peer transport can never deliver it.
            max_append_bytes=min(1 << 20, config.limits.max_frame_bytes // 2))
        self.kernel = RawNode(kernel_config, self._rng, state=state,
                              bootstrap=ConfState(voters=frozenset(config.cluster.voters)))
        # Read contexts must not collide with those of an earlier run of this node, whose
        # answers may still be in flight: prefix them with a random incarnation.
        self._read_prefix = self._rng.getrandbits(64).to_bytes(8, "big")
        hook.bwraft_metrics(registry=self.registry)
        self.transport = self._transport_factory(self)
        if self.faults is not None:
            self.transport = self.faults.wrap_transport(self.transport)
        raft = config.addresses.raft
        port = self.transport.listen(raft.host, raft.port)
        self.raft_port = port.getHost().port
        for voter_id, voter in config.cluster.voters.items():
            if voter_id != self.node_id:
                self.transport.set_peer(voter_id, voter.raft.host, voter.raft.port)
        if config.addresses.gossip is not None:
            self._start_gossip()
        role_service = hook.bwraft_role_service(node=self)
        if role_service is not None:
            role_service.setServiceParent(self)
        elif not config.is_voter:
            raise ConfigError(f"{config.source or '<config>'}: no plugin runs role"
                              f" {config.role!r}")
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(config.tick_ms / 1000, now=False)
        self._serving = self._driving = True
        self.log.info("node_started", role=config.role, raft_port=self.raft_port,
                      term=self.kernel.term, commit_index=self.kernel.commit_index,
                      last_index=self.kernel.last_index,
                      snapshot_index=state.snapshot.meta.index if state.snapshot else 0)
        self._call_hook("bwraft_node_started", node=self)
        self._schedule_ready()
        self._start_finished(None)

    def _start_failed(self, failure: Failure) -> None:
        if self._stopping:
            self._start_finished(failure)
            return
        reason = f"{type(failure.value).__name__}: {failure.value}"
        self.log.critical("node_start_failed", error=reason)
        self._halt(f"start failed: {reason}")
        self._start_finished(failure)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._serving:
            self._call_hook("bwraft_node_stopping", node=self)
            await self._hand_over_leadership()
        self._serving = self._driving = False
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        for call in (self._ready_call, self._read_flush, self._deadline_call):
            if call is not None and call.active():
                call.cancel()
        self._ready_call = self._read_flush = self._deadline_call = None
        await super().stopService()
        await self._wait_idle()
        self._fail_waiters(Unavailable("node stopping"))
        if self.transport is not None:
            await self.transport.stop()
        if self.storage is not None:
            if self._unsaved_hard_state is not None and not self._halted:
                # Keep the commit index for a quicker restart (replay up to it at once).
                unsaved, self._unsaved_hard_state = self._unsaved_hard_state, None
                await self._writer.run(self.storage.save, unsaved, (), None)
            await self._writer.run(self.storage.close)
        self._writer.stop()
        if self._snapshot_worker is not self._writer:
            self._snapshot_worker.stop()
        self._stopped = True
        self.log.info("node_stopped")

    async def _hand_over_leadership(self) -> None:
        """On a clean stop, hand leadership to a voter a plugin picks (dissertation §3.10)."""
        kernel = self.kernel
        if kernel is None or kernel.role is not StateRole.LEADER or self._halted:
            return
        target = self._call_hook("bwraft_transfer_target", node=self, reason="shutdown")
        if not target:
            return
        try:
            kernel.transfer_leader(target)
        except ProposalDropped as exc:
            self.log.warning("transfer_refused", target=target, reason=str(exc))
            return
        self.log.info("transferring_leadership", target=target, term=kernel.term)
        self._schedule_ready()
        # The kernel gives a transfer one election timeout; wait that long at most.
        timeout = self.config.election_ticks * self.config.tick_ms / 1000
        deadline = self.reactor.seconds() + timeout
        while kernel.role is StateRole.LEADER and self.reactor.seconds() < deadline \
                and not self._halted:
            await task.deferLater(self.reactor, self.config.tick_ms / 1000, lambda: None)

    def _halt(self, reason: str) -> None:
        """Stop driving the kernel for good: what follows a failed save is unknown territory."""
        if self._halted:
            return
        self._halted = reason
        self._serving = self._driving = False
        self.log.critical("node_halted", reason=reason)
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._fail_waiters(Unavailable(f"node halted: {reason}"))
        if self._on_fatal is not None:
            self._on_fatal(reason)

    # -- the facade ------------------------------------------------------------------------

    async def propose(self, data: bytes, *, timeout: float = 5.0) -> Any:
        """Replicate ``data`` and return the state machine's result of applying it.

        Raises:
            NotLeader: This node is not the leader.
            Unavailable: Timeout, lost leadership, transfer in progress, node not serving.
                The command may or may not have been applied.
            ValueError: ``data`` is empty or too large to replicate.
        """
        if not isinstance(data, bytes) or not data:
            raise ValueError("a proposal is non-empty bytes")
        if len(data) > self.config.limits.max_frame_bytes - _FRAME_OVERHEAD:
            raise ValueError(f"proposal of {len(data)} bytes exceeds the frame limit"
                             f" ({self.config.limits.max_frame_bytes})")
        kernel = self._serving_kernel()
        if kernel.role is not StateRole.LEADER:
            self.metrics.proposal_failures.labels("not_leader").inc()
            raise NotLeader(kernel.leader, self.leader_api())
        # The command joins the others of this reactor turn (or of the save in flight): the
        # next Ready appends them with one propose_many, so the leader sends each follower
        # one append for the batch instead of one per command (see _propose_pending).
        d: Deferred[Any] = Deferred()
        proposal = _Proposal(0, d, self._timer(), data)
        self._pending.append(proposal)
        self._schedule_ready()
        self._add_proposal_deadline(proposal, timeout)
        return await d

    async def read_barrier(self, *, timeout: float = 5.0, max_lag: int | None = None) -> int:
        """Wait until a linearizable read may be served locally (ReadIndex, dissertation §6.4).

        Concurrent callers in one reactor turn share one kernel ReadIndex request.

        Args:
            timeout: Seconds to wait in all.
            max_lag: Give up at once when the confirmed read index is more than this many
                entries ahead of the applied index, instead of waiting to catch up (a
                lagging observer answers quickly, PROTOCOL.md "Observer").

        Returns:
            The read index: the state machine has applied at least this far.

        Raises:
            Unavailable: No leader known, leader changed, timeout, too far behind, node not
                serving.
        """
        kernel = self._serving_kernel()
        if kernel.leader is None:
            raise Unavailable("no leader known")
        d: Deferred[int] = Deferred()
        self._read_batch.append(d)
        if max_lag is not None:
            self._read_max_lag[d] = max_lag
            d.addBoth(self._forget_read_lag, d)
        if self._read_flush is None:
            self._read_flush = self.reactor.callLater(0, self._flush_reads)
        self._add_deadline(d, timeout, "read barrier")
        return await d

    def _forget_read_lag(self, result: Any, d: Deferred[int]) -> Any:
        self._read_max_lag.pop(d, None)
        return result

    async def read_ready(self, consistency: str, *, timeout: float = 5.0) -> None:
        """Wait until a client read of ``consistency`` may be served from the state machine.

        A plugin may serve the wait (``bwraft_read_barrier``: an observer batches its
        ReadIndex requests and bounds how long a lagging replica waits); otherwise a
        ``linearizable`` read waits for :meth:`read_barrier` and a ``stale`` one not at all.

        Raises:
            Unavailable: The read cannot be served now (no leader, timeout, lagging).
        """
        barrier = self._call_hook("bwraft_read_barrier", node=self, consistency=consistency,
                                  timeout=timeout)
        if barrier is not None:
            await barrier
        elif consistency == "linearizable":
            await self.read_barrier(timeout=timeout)

    def members(self) -> list[dict[str, Any]]:
        """The gossip view (``GET /v1/members``); empty when the node runs no gossip."""
        member = getattr(self.gossip, "member", None)
        if member is None:
            return []
        return [{"id": m.id, "role": m.role, "datacenter": m.datacenter,
                 "raft_addr": m.raft_addr, "api_addr": m.api_addr, "gossip_addr": m.gossip_addr,
                 "incarnation": m.incarnation, "state": str(m.state), "tags": dict(m.tags)}
                for m in member.members()]

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/status`` shows.

        ``role`` is the Raft role (leader, follower, candidate, pre_candidate) for a voter and
        the configured role (observer, secretary, ...) for a helper; ``node_role`` and
        ``raft_role`` give both.
        """
        kernel = self.kernel
        out: dict[str, Any] = {
            "id": self.node_id, "node_role": self.config.role,
            "datacenter": self.config.datacenter, "state": self._state_name(),
        }
        if kernel is None:
            out.update(role="starting", raft_role=None, term=0, leader=None, leader_api=None,
                       commit_index=0, applied_index=0, voters=sorted(self.config.cluster.voters))
            return out
        kernel_status = kernel.status()
        raft_role = kernel.role.value
        out.update(kernel_status)
        out.update(
            id=self.node_id,
            role=raft_role if self.config.is_voter else self.config.role,
            raft_role=raft_role, leader_api=self.leader_api(),
            helpers=sorted(kernel.helpers))
        for extra in self._call_hook("bwraft_status", node=self) or ():
            for key, value in (extra or {}).items():
                out.setdefault(key, value)  # a plugin never overwrites what the node reports
        return out

    def leader_api(self) -> str | None:
        """The current leader's API base URL (``http://host:port``), if known."""
        leader = self.kernel.leader if self.kernel is not None else None
        return self._api_urls.get(leader) if leader is not None else None

    # -- for plugins and the runtime --------------------------------------------------------

    def step(self, message: Message) -> None:
        """Feed a message to the kernel (from the transport, or a plugin relaying replies)."""
        if self.kernel is None or not self._driving:
            self.metrics.dropped_inbound.labels("not_running").inc()
            return
        if not isinstance(message, Message) or message.to != self.node_id:
            self.metrics.dropped_inbound.labels("misdirected").inc()
            return
        try:
            self.kernel.step(message)
        except Exception:
            # The kernel promises never to raise for bad input; if it does, drop the message
            # rather than let one peer's frame take the node down.
            self.metrics.dropped_inbound.labels("kernel_error").inc()
            self.log.exception("step_failed", msg_type=message.type.name, frm=message.frm)
            return
        self._schedule_ready()

    def send_plugin_frame(self, peer: str, plugin: str, payload: Any) -> bool:
        """Send a plugin frame to ``peer``; False if it was dropped at once."""
        if self.transport is None:
            return False
        return bool(self.transport.send(peer, PluginFrame(plugin, payload)))

    def set_peer_address(self, node_id: str, host: str, port: int, *,
                         api: str | None = None) -> None:
        """Tell the transport how to reach ``node_id`` (e.g. a helper learned by gossip)."""
        if node_id == self.node_id or self.transport is None:
            return
        self.transport.set_peer(node_id, host, port)
        if api is not None:
            self._api_urls[node_id] = api

    def advertise_api(self, url: str) -> None:
        """Set this node's own API URL (e.g. once an API bound to port 0 knows its port)."""
        self._api_urls[self.node_id] = url

    def add_helper(self, node_id: str) -> None:
        """Have the leader also feed the log to the non-member ``node_id`` (an observer)."""
        if self.kernel is not None:
            self.kernel.add_helper(node_id)
            self._schedule_ready()

    def remove_helper(self, node_id: str) -> None:
        if self.kernel is not None:
            self.kernel.remove_helper(node_id)
            self._schedule_ready()

    def report_unreachable(self, node_id: str) -> None:
        """Messages to ``node_id`` may have been lost (a relay failed): on the leader, the
        kernel stops pipelining to it and probes it again (Raft §5.3)."""
        if self.kernel is not None and self._driving:
            self.kernel.report_unreachable(node_id)
            self._schedule_ready()

    def report_snapshot_failed(self, node_id: str) -> None:
        """A snapshot sent to ``node_id`` did not arrive: the leader probes and resends (§7)."""
        if self.kernel is not None and self._driving:
            self.kernel.report_snapshot_failed(node_id)
            self._schedule_ready()

    def transfer_leader(self, to: str) -> None:
        """Start handing leadership to the voter ``to`` (dissertation §3.10).

        The kernel stops taking proposals, brings ``to`` up to date, sends it TIMEOUT_NOW, and
        abandons the transfer after an election timeout.

        Raises:
            NotLeader: This node is not the leader.
            Unavailable: ``to`` is not another voter, or the node is not serving.
        """
        kernel = self._serving_kernel()
        if kernel.role is not StateRole.LEADER:
            raise NotLeader(kernel.leader, self.leader_api())
        try:
            kernel.transfer_leader(to)
        except ProposalDropped as exc:
            raise Unavailable(str(exc)) from None
        self.log.info("transferring_leadership", target=to, term=kernel.term)
        self._schedule_ready()

    async def propose_conf_change(self, change: ConfChange, *, timeout: float = 5.0) -> int:
        """Replicate a single-server configuration change; return its index once applied.

        Raises:
            NotLeader: This node is not the leader.
            Unavailable: Another change is pending, the leader has not committed in its term
                yet, the change does not fit the configuration, timeout, lost leadership.
        """
        kernel = self._serving_kernel()
        if kernel.role is not StateRole.LEADER:
            raise NotLeader(kernel.leader, self.leader_api())
        try:
            index = kernel.propose_conf_change(change)
        except ProposalDropped as exc:
            raise Unavailable(str(exc)) from None
        superseded = self._proposals.pop(index, None)
        if superseded is not None:
            _fire(superseded.deferred, Unavailable("lost leadership, retry"))
        d: Deferred[Any] = Deferred()
        self._proposals[index] = _Proposal(kernel.term, d, self._timer())
        self.log.info("conf_change_proposed", change=change.type.name, member=change.node,
                      index=index, term=kernel.term)
        self._schedule_ready()
        self._add_deadline(d, timeout, "configuration change",
                           lambda: self._forget_proposal(index, d))
        await d
        return index

    def member_event(self, event: str, member: Any) -> None:
        """A gossip membership change: learn addresses of non-voters, then tell the plugins.

        Initial voters keep the addresses of the config file: gossip carries what a member
        advertises, which is not authoritative for them.
        """
        raft_addr = getattr(member, "raft_addr", None)
        member_id = getattr(member, "id", None)
        if event in ("joined", "updated", "alive") and raft_addr and member_id \
                and member_id not in self.config.cluster.voters:
            try:
                address = parse_address(raft_addr)
            except ValueError as exc:
                self.log.warning("member_address_invalid", member=member_id, error=str(exc))
            else:
                api = getattr(member, "api_addr", None)
                self.set_peer_address(member_id, address.host, address.port,
                                      api=f"http://{api}" if api else None)
        self._call_hook("bwraft_member_event", node=self, event=event, member=member)

    def _start_gossip(self) -> None:
        """Join the gossip cluster (SWIM), advertising where this node's services are."""
        from bwcore.gossip import GossipService, Member

        config = self.config
        gossip = config.addresses.gossip
        assert gossip is not None and self.raft_port is not None
        api = config.addresses.api
        local = Member(
            id=self.node_id, role=config.role, datacenter=config.datacenter,
            raft_addr=str(_advertised(config.addresses.raft.host, self.raft_port, gossip.host)),
            api_addr=str(_advertised(api.host, api.port, gossip.host)) if api.port else "",
            gossip_addr=str(gossip))
        self.gossip = GossipService(
            self.reactor, local, seeds=[str(seed) for seed in config.cluster.seeds],
            secret=config.security.cluster_secret, registry=self.registry,
            rng=random.Random(self._rng.getrandbits(64)),
            logger=self.log.bind(logger="bwcore.gossip"))
        self.gossip.add_listener(self.member_event)
        self.gossip.setServiceParent(self)
        if self.faults is not None:
            self.faults.attach_gossip(self.gossip)

    # -- the Ready loop ----------------------------------------------------------------------

    def on_frame(self, peer: str, obj: Any) -> None:
        """The transport's callback: kernel messages to the kernel, plugin frames to plugins."""
        if self.faults is not None and self.faults.drops_frame_from(peer):
            return
        if isinstance(obj, Message):
            self.step(obj)
        elif self._call_hook("bwraft_plugin_frame", node=self, peer=peer, frame=obj) is None:
            self.metrics.dropped_inbound.labels("unhandled_plugin_frame").inc()
            self.log.debug("plugin_frame_unhandled", peer=peer,
                           plugin=getattr(obj, "plugin", None))

    def _tick(self) -> None:
        if self.kernel is not None and self._driving:
            self.kernel.tick()
            self._schedule_ready()

    def _schedule_ready(self) -> None:
        # callLater(0): everything else this reactor turn does (more proposals, more
        # messages) lands in the same Ready.
        if self._ready_call is None and self._driving:
            self._ready_call = self.reactor.callLater(0, self._process_ready)

    def _process_ready(self) -> None:
        self._ready_call = None
        kernel = self.kernel
        if not self._driving or kernel is None:
            return
        if self._saving or self._installing:
            # A Ready is being saved (or its snapshot decoded). Proposals of this turn still
            # join the log now, and the messages that depend on nothing unsaved leave at once
            # — a leader's appends, so that followers fsync while we do (dissertation
            # §10.2.1); responses wait for the next Ready. Our own copy is counted toward
            # commit only once saved.
            if self._pending:
                self._propose_pending(kernel)
            self._send(kernel.take_messages())
            return
        started = self._timer()
        self._apply_compaction()
        if self._pending:
            self._propose_pending(kernel)
        if not kernel.has_ready():
            return
        rd = kernel.ready()
        self.metrics.readies.inc()
        if rd.soft_state is not None:
            self._soft_state_changed(rd.soft_state)
        self._send(rd.messages)
        hard_state = rd.hard_state
        if hard_state is not None and not rd.entries and rd.snapshot is None \
                and (hard_state.term, hard_state.vote) == (self._saved_hard_state.term,
                                                           self._saved_hard_state.vote):
            # Only the commit index moved. It need not be durable before anything (Raft
            # Figure 2 lists commitIndex as volatile state; after a restart the leader tells
            # us again), so it waits for the next save instead of costing an fsync of its own.
            self._unsaved_hard_state, hard_state = hard_state, None
        if hard_state is None and not rd.entries and rd.snapshot is None:
            self._finish_ready(rd, started)
            return
        if hard_state is None:
            hard_state, self._unsaved_hard_state = self._unsaved_hard_state, None
        else:
            self._unsaved_hard_state = None
            self._saved_hard_state = hard_state
        self._saving = True
        d = self._writer.run(self._save, hard_state, rd.entries, rd.snapshot)
        if rd.committed_entries and rd.snapshot is None:
            self._apply_durable_prefix(rd)
        stall = self._timer() - started
        # Attached only now: a writer that saved inline must not finish the Ready first.
        d.addCallbacks(self._persisted, self._save_failed, callbackArgs=(rd, stall))

    def _apply_durable_prefix(self, rd: Ready) -> None:
        """Apply, while this Ready's save runs, its committed entries that were already on
        our disk before it, and answer their proposers now.

        They are committed (durable on a voter majority, Raft §5.3) and durable here, so
        acknowledging them depends on nothing this save writes; without this, every commit
        under load would also wait for the fsync of the newer entries proposed meanwhile.
        Committed entries that are part of this Ready's own ``entries`` (a follower that
        learns the commit index with the entries) still wait for the save.
        """
        committed = rd.committed_entries
        count = len(committed)
        if rd.entries:
            count = max(0, min(count, rd.entries[0].index - committed[0].index))
        if count == 0:
            return
        resolved: list[tuple[Deferred[Any], Any]] = []
        if not self._apply(committed[:count], resolved):
            return
        self._applied_early = committed[count - 1].index
        for d, result in resolved:
            _fire(d, result)

    def _propose_pending(self, kernel: RawNode) -> None:
        """Append this turn's proposals to the log in one batch (group commit)."""
        batch, self._pending = self._pending, []
        batch = [p for p in batch if not p.deferred.called]  # timed out while waiting
        if not batch:
            return
        error: Exception | None = None
        if kernel.role is not StateRole.LEADER:
            # Leadership was lost since propose() checked: nothing reached the log, so the
            # caller may send the command to the new leader.
            self.metrics.proposal_failures.labels("not_leader").inc(len(batch))
            error = NotLeader(kernel.leader, self.leader_api())
        else:
            try:
                last = kernel.propose_many([p.data for p in batch])
            except ProposalDropped as exc:
                self.metrics.proposal_failures.labels("transfer").inc(len(batch))
                error = Unavailable(str(exc))
        if error is not None:
            for p in batch:
                _fire(p.deferred, error)
            return
        term = kernel.term
        for index, p in enumerate(batch, start=last - len(batch) + 1):
            superseded = self._proposals.pop(index, None)
            if superseded is not None:  # its entry was overwritten by one of a newer term
                _fire(superseded.deferred, Unavailable("lost leadership, retry"))
            p.term, p.data, p.index = term, b"", index
            self._proposals[index] = p
        self.metrics.proposals.inc(len(batch))

    def _save(self, hard_state: Any, entries: Sequence[Entry], snapshot: Snapshot | None
              ) -> None:
        """Runs on the writer thread: one transaction per Ready."""
        began = time.perf_counter()
        self.storage.save(hard_state, entries, snapshot)
        self.metrics.storage_fsync_seconds.observe(time.perf_counter() - began)
        self.metrics.save_entries.observe(len(entries))

    def _persisted(self, _: None, rd: Ready, stall: float) -> None:
        self._saving = False
        self._notify_idle()
        if self._halted:
            return
        self._finish_ready(rd, self._timer() - stall)

    def _save_failed(self, failure: Failure) -> None:
        self._saving = False
        self._notify_idle()
        # Whether the write reached the disk is unknown: nothing that depends on it may be
        # sent, so the node stops driving the kernel.
        self._halt(f"storage save failed: {type(failure.value).__name__}: {failure.value}")

    def _finish_ready(self, rd: Ready, started: float) -> None:
        self._send(rd.persisted_messages)
        if rd.snapshot is None:
            self._complete_ready(rd, started)
            return
        if not self._driving:
            return  # stopping: the stored snapshot is restored at the next start
        # A leader's snapshot, now durable (Raft §7): decode it off the reactor, then swap it
        # into the state machine and go on with this Ready. Until then no new Ready starts.
        self._installing = True
        d = self._prepare_restore(rd.snapshot.data)
        d.addCallbacks(self._restore_prepared, self._restore_failed, callbackArgs=(rd,),
                       errbackArgs=(rd.snapshot,))

    def _restore_prepared(self, install: Callable[[], None], rd: Ready) -> None:
        self._installing = False
        self._notify_idle()
        if self._halted or not self._driving:
            return  # stopping: the stored snapshot is restored at the next start
        started = self._timer()
        try:
            install()
        except Exception as exc:
            self._restore_failed(Failure(exc), rd.snapshot)
            return
        self._complete_ready(rd, started)

    def _restore_failed(self, failure: Failure, snapshot: Snapshot) -> None:
        self._installing = False
        self._notify_idle()
        # The snapshot is durable and the log before it gone: this replica cannot go on.
        self._halt(f"snapshot at index {snapshot.meta.index} cannot be restored:"
                   f" {type(failure.value).__name__}: {failure.value}")

    def _complete_ready(self, rd: Ready, started: float) -> None:
        kernel = self.kernel
        assert kernel is not None
        resolved: list[tuple[Deferred[Any], Any]] = []
        if rd.snapshot is not None:
            self._snapshot_installed(rd.snapshot, resolved)
        committed = rd.committed_entries
        if self._applied_early:  # the prefix _apply_durable_prefix applied during the save
            committed = committed[self._applied_early - committed[0].index + 1:]
            self._applied_early = 0
        if committed and not self._apply(committed, resolved):
            return
        kernel.advance(rd)
        applied = kernel.applied_index
        self._queue_reads(rd.read_states, applied, resolved)
        self._release_reads(applied, resolved)
        self.metrics.ready_reactor_seconds.observe(self._timer() - started)
        # Callers resume only now, after advance(): whatever they do next (propose again)
        # meets a kernel with no Ready outstanding.
        for d, result in resolved:
            _fire(d, result)
        if rd.committed_entries or rd.snapshot is not None:
            self._call_hook("bwraft_applied", node=self, index=applied)
            self._maybe_snapshot(applied)
        if kernel.has_ready() or self._compacted is not None or self._pending:
            self._schedule_ready()

    def _send(self, messages: Sequence[Message]) -> None:
        if not messages or self.transport is None:
            return
        kernel = self.kernel
        # Every batch of every node goes through the routing hook: a secretary relays the
        # leader's appends, and the followers' replies to them go back the same way.
        messages = self._route(messages)
        for m in messages:
            if m.to == self.node_id:
                continue
            if not self.transport.send(m.to, m) and kernel is not None:
                kernel.report_unreachable(m.to)

    def _route(self, messages: Sequence[Message]) -> list[Message]:
        batch = list(messages)
        try:
            self.host.hook.bwraft_route_messages(node=self, messages=batch)
        except Exception:
            self.log.exception("route_messages_failed")
            return list(messages)
        return batch

    def _soft_state_changed(self, soft: SoftState) -> None:
        kernel = self.kernel
        assert kernel is not None
        if soft.leader != self._leader:
            self.metrics.leader_changes.inc()
            # Reads in flight were asked of the old leader, which may never answer.
            self._fail_reads_in_flight(Unavailable("leader changed, retry"))
        self._leader = soft.leader
        self.log.info(f"became_{soft.role.value}", term=kernel.term, leader=soft.leader)
        self._call_hook("bwraft_role_changed", node=self, role=soft.role, term=kernel.term,
                        leader=soft.leader)

    def _prepare_restore(self, data: bytes) -> Deferred[Callable[[], None]]:
        """Decode a snapshot image off the reactor if the state machine can (see
        :class:`bwcore.hookspecs.SnapshotsOffReactor`); the result swaps it in."""
        machine = self.state_machine
        if isinstance(machine, SnapshotsOffReactor):
            return self._snapshot_worker.run(machine.restore_prepare, data)
        return defer.succeed(lambda: machine.restore(data))

    def _snapshot_installed(self, snapshot: Snapshot,
                            resolved: list[tuple[Deferred[Any], Any]]) -> None:
        self.metrics.snapshots_installed.inc()
        self._log_entries = self._log_bytes = 0
        for index in [i for i in self._proposals if i <= snapshot.meta.index]:
            resolved.append((self._proposals.pop(index).deferred,
                             Unavailable("outcome unknown (replaced by a snapshot), retry")))
        self.log.info("snapshot_installed", index=snapshot.meta.index, term=snapshot.meta.term)

    def _apply(self, entries: Sequence[Entry], resolved: list[tuple[Deferred[Any], Any]]
               ) -> bool:
        now = self._timer()
        for entry in entries:
            result: Any = None
            if entry.type is EntryType.NORMAL and entry.data:  # b"" is a leader's no-op
                try:
                    result = self.state_machine.apply(entry.index, entry.data)
                except Exception as exc:
                    # Replicas must not diverge: a state machine that raised may be half-way
                    # through a change, so this replica stops.
                    self.log.exception("apply_failed", index=entry.index)
                    self._halt(f"state machine failed at index {entry.index}: {exc!r}")
                    return False
            self._log_entries += 1
            self._log_bytes += len(entry.data)
            waiter = self._proposals.pop(entry.index, None)
            if waiter is not None:
                # The entry at our index is ours only if it carries the term we proposed in.
                if waiter.term == entry.term:
                    resolved.append((waiter.deferred, result))
                    self.metrics.apply_latency_seconds.observe(now - waiter.started)
                else:
                    self.metrics.proposal_failures.labels("lost_leadership").inc()
                    resolved.append((waiter.deferred, Unavailable("lost leadership, retry")))
        self.metrics.applied_entries.inc(len(entries))
        return True

    # -- ReadIndex ----------------------------------------------------------------------------

    def _flush_reads(self) -> None:
        self._read_flush = None
        batch, self._read_batch = self._read_batch, []
        batch = [d for d in batch if not d.called]
        if not batch or self.kernel is None:
            return
        self._read_seq += 1
        ctx = self._read_prefix + self._read_seq.to_bytes(8, "big")
        try:
            self.kernel.read_index(ctx)
        except ProposalDropped as exc:
            for d in batch:
                _fire(d, Unavailable(str(exc)))
            return
        self.metrics.read_rounds.inc()
        self._reads_in_flight[ctx] = batch
        self._schedule_ready()

    def _queue_reads(self, read_states: Sequence[ReadState], applied: int,
                     resolved: list[tuple[Deferred[Any], Any]]) -> None:
        for rs in read_states:
            waiters = self._reads_in_flight.pop(rs.context, None)
            if waiters is None:  # an answer to a request we gave up on
                continue
            lag = rs.index - applied
            if lag > 0 and self._read_max_lag:
                error = Unavailable(f"{lag} entries behind the read index, retry elsewhere")
                resolved.extend((d, error) for d in waiters
                                if self._read_max_lag.get(d, lag) < lag)
                waiters = [d for d in waiters if self._read_max_lag.get(d, lag) >= lag]
            if waiters:
                heapq.heappush(self._reads_waiting, (rs.index, self._read_seq_of(rs), waiters))

    @staticmethod
    def _read_seq_of(rs: ReadState) -> int:
        return int.from_bytes(rs.context[-8:], "big")

    def _release_reads(self, applied: int,
                       resolved: list[tuple[Deferred[Any], Any]]) -> None:
        while self._reads_waiting and self._reads_waiting[0][0] <= applied:
            index, _, waiters = heapq.heappop(self._reads_waiting)
            self.metrics.reads.inc(len(waiters))
            resolved.extend((d, index) for d in waiters)

    def _fail_reads_in_flight(self, error: Exception) -> None:
        in_flight, self._reads_in_flight = self._reads_in_flight, {}
        for waiters in in_flight.values():
            for d in waiters:
                _fire(d, error)

    # -- compaction (Raft §7) --------------------------------------------------------------------

    def _maybe_snapshot(self, applied: int) -> None:
        """Take a snapshot at ``applied`` if the policy asks, without stalling the reactor.

        In order: the state machine freezes its state (``snapshot_begin``, on the reactor,
        cheap); a worker thread serializes it and stages the image in storage (apart from the
        log writer, if the storage can); the writer thread's ``Storage.compact`` records it
        and drops the log prefix in one short transaction; only then does the kernel drop the
        prefix (``_apply_compaction``). Entries go on being applied and saved meanwhile; a
        crash anywhere leaves the old snapshot with the whole log, or the new one with the
        log after it (Raft §7).
        """
        if self._snapshotting or not self._driving or self._log_entries == 0:
            return
        wanted = self._call_hook("bwraft_should_snapshot", node=self, applied_index=applied,
                                 log_entries=self._log_entries, log_bytes=self._log_bytes)
        if not wanted:
            return
        assert self.kernel is not None
        began = self._timer()
        meta = self.kernel.create_snapshot(applied, b"").meta
        machine = self.state_machine
        try:
            if isinstance(machine, SnapshotsOffReactor):
                serialize = machine.snapshot_begin()
            else:  # all of it on the reactor: the state machine offers no other way
                serialize = _returning(machine.snapshot())
        except Exception:
            # The log stays as long as it is; the policy asks again after the next batch.
            self.log.exception("snapshot_failed", index=applied)
            return
        frozen = self._timer() - began
        self._snapshotting = True
        self._log_entries = self._log_bytes = 0
        d = self._snapshot_worker.run(self._build_snapshot, meta, serialize)
        d.addCallback(self._store_snapshot)
        d.addCallbacks(self._snapshot_stored, self._snapshot_failed, callbackArgs=(frozen,))

    def _build_snapshot(self, meta: SnapshotMeta, serialize: Callable[[], bytes]
                        ) -> tuple[Snapshot, float, float]:
        """Runs on the snapshot worker: serialize, then stage the image if storage can."""
        began = time.perf_counter()
        snapshot = Snapshot(meta, serialize())
        serialized = time.perf_counter()
        if isinstance(self.storage, SnapshotStaging):
            self.storage.stage_snapshot(snapshot)
        return snapshot, serialized - began, time.perf_counter() - serialized

    def _store_snapshot(self, built: tuple[Snapshot, float, float]
                        ) -> Deferred[tuple[Snapshot, float, float, float]]:
        if self._halted:
            raise Unavailable(f"node halted: {self._halted}")
        snapshot = built[0]
        began = self._timer()
        d = self._writer.run(self.storage.compact, snapshot)
        d.addCallback(lambda _: (*built, self._timer() - began))
        return d

    def _snapshot_stored(self, stored: tuple[Snapshot, float, float, float],
                         frozen: float) -> None:
        snapshot, serialized, staged, compacted = stored
        self._snapshotting = False
        self._notify_idle()
        self._compacted = snapshot
        self.metrics.snapshots.inc()
        self.log.info("snapshot_taken", index=snapshot.meta.index, term=snapshot.meta.term,
                      bytes=len(snapshot.data), freeze_ms=round(frozen * 1000, 1),
                      serialize_ms=round(serialized * 1000, 1), stage_ms=round(staged * 1000, 1),
                      compact_ms=round(compacted * 1000, 1))
        self._schedule_ready()

    def _snapshot_failed(self, failure: Failure) -> None:
        self._snapshotting = False
        self._notify_idle()
        # The log is intact, only longer than wanted; a failing disk shows in the next save.
        self.log.error("snapshot_failed", error=f"{type(failure.value).__name__}:"
                                                f" {failure.value}")

    def _apply_compaction(self) -> None:
        # Only between Readies: the kernel drops the log prefix the stored snapshot covers.
        if self._compacted is not None and self.kernel is not None:
            snapshot, self._compacted = self._compacted, None
            self.kernel.compact(snapshot)

    # -- small helpers ---------------------------------------------------------------------------

    def _serving_kernel(self) -> RawNode:
        if self._halted:
            raise Unavailable(f"node halted: {self._halted}")
        if not self._serving or self.kernel is None:
            raise Unavailable("node stopping" if self._stopping else "node not started")
        return self.kernel

    def _state_name(self) -> str:
        if self._halted:
            return "halted"
        if self._stopping:
            return "stopped" if self._stopped else "stopping"
        return "serving" if self._serving else "starting"

    def _add_deadline(self, d: Deferred[Any], timeout: float, what: str,
                      on_timeout: Callable[[], None] | None = None) -> None:
        def expire() -> None:
            if on_timeout is not None:
                on_timeout()
            if what == "proposal":
                self.metrics.proposal_failures.labels("timeout").inc()
            _fire(d, Unavailable(f"{what} timed out after {timeout:g}s"))

        call = self.reactor.callLater(timeout, expire)

        def cancel_timer(result: Any) -> Any:
            if call.active():
                call.cancel()
            return result

        d.addBoth(cancel_timer)

    def _add_proposal_deadline(self, proposal: _Proposal, timeout: float) -> None:
        """Fail ``proposal`` with Unavailable after ``timeout`` seconds unless it fired."""
        when = self.reactor.seconds() + timeout
        self._deadline_seq += 1
        deadlines = self._deadlines
        heapq.heappush(deadlines, (when, self._deadline_seq, timeout, proposal))
        if len(deadlines) > 4096 and \
                len(deadlines) > 2 * (len(self._proposals) + len(self._pending)):
            # Mostly answered proposals: drop them now rather than at their deadlines.
            self._drop_answered_deadlines()
        call = self._deadline_call
        if call is not None and call.active() and call.getTime() <= when:
            return  # the timer fires first for an earlier deadline and re-arms itself
        if call is not None and call.active():
            call.cancel()
        self._deadline_call = self.reactor.callLater(timeout, self._expire_proposals)

    def _expire_proposals(self) -> None:
        self._deadline_call = None
        now = self.reactor.seconds()
        deadlines = self._deadlines
        if deadlines and deadlines[0][3].deferred.called:
            # The answered proposals go all at once, not one by one at their own deadlines:
            # the timer is then armed for the oldest unanswered one, and under a steady load
            # wakes about once per timeout instead of after every batch of proposals. (With
            # nothing answered, as when no quorum answers, there is nothing to drop.)
            deadlines = self._drop_answered_deadlines()
        while deadlines and deadlines[0][0] <= now:
            _, _, timeout, proposal = heapq.heappop(deadlines)
            if proposal.deferred.called:  # answered, and kept above because the oldest was not
                continue
            self._forget_pending(proposal)
            self.metrics.proposal_failures.labels("timeout").inc()
            _fire(proposal.deferred, Unavailable(f"proposal timed out after {timeout:g}s"))
        # A caller told of its timeout may have proposed again (and armed the timer for its
        # own deadline), or the node may have failed every waiter: arm for what is left.
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()
        deadlines = self._deadlines
        if deadlines:
            self._deadline_call = self.reactor.callLater(max(0.0, deadlines[0][0] - now),
                                                         self._expire_proposals)

    def _drop_answered_deadlines(self) -> list[tuple[float, int, float, _Proposal]]:
        """Keep only the deadlines of unanswered proposals (in place); return them."""
        deadlines = self._deadlines
        deadlines[:] = [item for item in deadlines if not item[3].deferred.called]
        heapq.heapify(deadlines)
        return deadlines

    def _forget_pending(self, proposal: _Proposal) -> None:
        """A proposal timed out: drop it from the batch, or stop waiting for its entry."""
        if proposal.index:  # else not yet in the log, and _propose_pending skips it
            self._forget_proposal(proposal.index, proposal.deferred)

    def _forget_proposal(self, index: int, d: Deferred[Any]) -> None:
        waiter = self._proposals.get(index)
        if waiter is not None and waiter.deferred is d:
            del self._proposals[index]

    def _fail_waiters(self, error: Exception) -> None:
        proposals, self._proposals = self._proposals, {}
        pending, self._pending = self._pending, []
        self._deadlines = []
        for waiter in [*proposals.values(), *pending]:
            _fire(waiter.deferred, error)
        batch, self._read_batch = self._read_batch, []
        waiting, self._reads_waiting = self._reads_waiting, []
        for d in batch + [d for _, _, ws in waiting for d in ws]:
            _fire(d, error)
        self._fail_reads_in_flight(error)

    def _wait_idle(self) -> Deferred[None]:
        """Fires once no save, snapshot or snapshot install is in flight on another thread."""
        if not self._busy():
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _busy(self) -> bool:
        return self._saving or self._snapshotting or self._installing

    def _notify_idle(self) -> None:
        if self._busy():
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def _read_kernel_gauges(self) -> None:
        """The kernel's term and indexes are read when the metrics are collected, rather than
        written after every Ready (0 while there is no kernel)."""
        def reading(name: str) -> Callable[[], float]:
            def read() -> float:
                kernel = self.kernel
                return getattr(kernel, name) if kernel is not None else 0
            return read

        def leading() -> float:
            kernel = self.kernel
            return 1 if kernel is not None and kernel.role is StateRole.LEADER else 0

        m = self.metrics
        m.term.set_function(reading("term"))
        m.commit_index.set_function(reading("commit_index"))
        m.applied_index.set_function(reading("applied_index"))
        m.last_index.set_function(reading("last_index"))
        m.is_leader.set_function(leading)

    def _call_hook(self, name: str, **kwargs: Any) -> Any:
        """Call a hook; a plugin's exception is logged, never allowed to break the loop."""
        try:
            return getattr(self.host.hook, name)(**kwargs)
        except Exception:
            self.log.exception("plugin_hook_failed", hook=name)
            return None


def _returning(image: bytes) -> Callable[[], bytes]:
    """A serializer for an image already taken."""
    return lambda: image


def _advertised(host: str, port: int, fallback_host: str) -> Address:
    """The address peers should dial: a wildcard bind host is replaced by ``fallback_host``."""
    if host in ("0.0.0.0", "::") and fallback_host not in ("0.0.0.0", "::"):
        host = fallback_host
    return Address(host, port)


def _default_transport(node: RaftNode) -> Any:
    from bwcore.transport import PeerTransport

    config = node.config
    return PeerTransport(
        node.node_id, node.reactor, node.on_frame,
        secret=config.security.cluster_secret,
        max_frame_bytes=config.limits.max_frame_bytes,
        max_queue_bytes=max(64 * 1024 * 1024, 4 * config.limits.max_frame_bytes),
        cluster_name=config.cluster.name,
        max_inbound_connections=config.limits.max_connections,
        rng=random.Random(node._rng.getrandbits(64)),
        registry=node.registry,
        log=node.log.bind(logger="bwcore.transport"))
