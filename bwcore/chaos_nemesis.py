"""The nemesis: injects one fault at a time into a running local cluster, at random.

Kinds (``--faults``):

* ``kill``: SIGKILL a node (the leader half of the time), restart it from its data a moment
  later. Nothing acknowledged may be lost: the node recovers its durable state.
* ``pause``: SIGSTOP a node (the leader half of the time) for longer than the longest election
  timeout (2 x ``election_ticks`` ticks, Raft §5.2), then SIGCONT. A paused leader wakes up
  deposed and must not serve a stale read (Jepsen's etcd 0.4 bug, TESTS.md).
* ``partition``: cut the cluster in two through each node's fault-injection layer
  (``POST /v1/admin/faults``, bwcore.faults): either one node (the leader half of the time)
  against the rest, or a random split. Heals after a while.
* ``helpers``: SIGKILL an observer or a secretary and bring up a replacement, either the same
  node with its data wiped (helpers are stateless, PROTOCOL.md) or a new node with a new id.

Between two faults the cluster gets a quiet period and must elect a leader again. Durations
scale with the election timeout so that every fault outlasts it.
"""

from __future__ import annotations

import http.client
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from bwcore import cluster as local
from bwcore.chaos_clients import Endpoints, http_request

__all__ = ["FAULT_KINDS", "FaultEvent", "Nemesis"]

FAULT_KINDS = ("kill", "pause", "partition", "helpers")
_ELECTION_TICKS = 10  # the config default; local clusters do not change it


@dataclass
class FaultEvent:
    """One injected fault, for the report (times in seconds since the run started)."""

    kind: str
    targets: list[str]
    start: float
    end: float | None = None
    leader: str | None = None            # the leader when the fault started
    hit_leader: bool = False             # whether a target was that leader
    detail: str = ""
    recovered_after: float | None = None  # seconds from the end of the fault to a leader

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Nemesis:
    """Injects faults of ``kinds`` into ``cluster`` until stopped.

    Attributes:
        cluster: The running local cluster.
        endpoints: The clients' view of the cluster, updated when helpers are replaced.
        kinds: Which faults to inject.
        rng: Seeded randomness: the same seed chooses the same faults.
        clock: Seconds since the run started.
        admin_token: Sent to ``/v1/admin/faults`` when the nodes require one.
        log: Called with one line per fault.
    """

    cluster: local.Cluster
    endpoints: Endpoints
    kinds: tuple[str, ...]
    rng: random.Random
    clock: Callable[[], float]
    admin_token: str = ""
    log: Callable[[str], None] = print
    events: list[FaultEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _paused: set[str] = field(default_factory=set)
    _partitioned: bool = False   # whether a partition may be in place (nodes may lack the route)
    _connections: dict[str, http.client.HTTPConnection] = field(default_factory=dict)

    @property
    def election_timeout(self) -> float:
        """The longest election timeout in seconds (2 x election_ticks x tick)."""
        return 2 * _ELECTION_TICKS * self.cluster.tick_ms / 1000

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Alternate quiet periods and faults until ``stop`` is set, then heal everything."""
        try:
            while not stop.is_set():
                if stop.wait(self._scaled(1.5, 4.0)):
                    break
                kind = self.rng.choice(self.kinds)
                try:
                    event = self.inject(kind, stop)
                except local.ClusterError as exc:
                    # A node that would not die or start: say so, heal, and go on.
                    self.problems.append(f"{kind} failed: {str(exc).splitlines()[0]}")
                    self.heal_all()
                    continue
                if event is not None:
                    self._recover(event)
        finally:
            self.heal_all()

    def inject(self, kind: str, stop: threading.Event) -> FaultEvent | None:
        """Inject one fault of ``kind`` and wait out its duration (or ``stop``)."""
        leader = self.leader()
        if kind == "kill":
            return self._kill(leader, stop)
        if kind == "pause":
            return self._pause(leader, stop)
        if kind == "partition":
            return self._partition(leader, stop)
        if kind == "helpers":
            return self._replace_helper(leader, stop)
        raise ValueError(f"unknown fault kind {kind!r}")

    def _target(self, leader: str | None, candidates: list[str]) -> str | None:
        if not candidates:
            return None
        if leader in candidates and self.rng.random() < 0.5:
            return leader
        return self.rng.choice(candidates)

    # -- kinds ------------------------------------------------------------------------------

    def _kill(self, leader: str | None, stop: threading.Event) -> FaultEvent | None:
        target = self._target(leader, self.running())
        if target is None:
            return None
        event = self._begin("kill", [target], leader)
        local.stop_node(self.cluster, target, "KILL", wait=10)
        stop.wait(self._scaled(1.0, 3.0))
        local.start_node(self.cluster, target)
        self._end(event)
        return event

    def _pause(self, leader: str | None, stop: threading.Event) -> FaultEvent | None:
        target = self._target(leader, self.running())
        if target is None:
            return None
        event = self._begin("pause", [target], leader)
        local.stop_node(self.cluster, target, "STOP")
        self._paused.add(target)
        stop.wait(self._scaled(1.25, 3.0))
        local.stop_node(self.cluster, target, "CONT")
        self._paused.discard(target)
        self._end(event)
        return event

    def _partition(self, leader: str | None, stop: threading.Event) -> FaultEvent | None:
        nodes = self.running()
        if len(nodes) < 2:
            return None
        if self.rng.random() < 0.5:
            alone = self._target(leader, nodes)
            side = {alone}
            shape = f"{alone} alone"
        else:
            shuffled = self.rng.sample(nodes, len(nodes))
            cut = self.rng.randrange(1, len(nodes))
            side = set(shuffled[:cut])
            shape = "random split"
        other = set(nodes) - side
        # The leader is hit when its side holds no majority of the voters: it must step down.
        voters = {n for n in nodes if self.cluster.nodes[n].role == "voter"}
        leader_side = side if leader in side else other
        hit = leader is not None and 2 * len(leader_side & voters) <= len(self.cluster.voters)
        event = self._begin("partition", sorted(side), leader, hit_leader=hit,
                            detail=f"{shape}: {sorted(side)} | {sorted(other)}")
        self._partitioned = True
        failed = [node_id for node_id in nodes
                  if not self._set_partition(node_id, other if node_id in side else side)]
        if failed:
            event.detail += f" (could not reach {failed})"
        stop.wait(self._scaled(1.5, 4.0))
        self._heal_partitions()
        self._end(event)
        return event

    def _replace_helper(self, leader: str | None, stop: threading.Event) -> FaultEvent | None:
        helpers = [node_id for node_id in self.running()
                   if self.cluster.nodes[node_id].role in local.HELPER_ROLES]
        if not helpers:
            return None
        target = self.rng.choice(helpers)
        old = self.cluster.nodes[target]
        event = self._begin("helpers", [target], leader)
        local.stop_node(self.cluster, target, "KILL", wait=10)
        stop.wait(self._scaled(0.5, 2.0))
        # Helpers are stateless: a replacement starts with nothing, here or under a new id.
        shutil.rmtree(old.folder / "data", ignore_errors=True)
        if self.rng.random() < 0.5:
            from bwcore.chaos import add_node

            new = add_node(self.cluster, old.role, old.datacenter)
            event.detail = f"replaced by new node {new.id}"
            local.start_node(self.cluster, new.id)
        else:
            new = old
            event.detail = "restarted with its data wiped"
            local.start_node(self.cluster, target)
        if old.role == "observer":
            self.endpoints.replace_observer(old.api, new.api)
        self._end(event)
        return event

    # -- partitions through the admin route -------------------------------------------------

    def _set_partition(self, node_id: str, blocked: set[str]) -> bool:
        addresses = [self.cluster.nodes[b].gossip for b in sorted(blocked)]
        body = {"partition": sorted(blocked), "gossip_addresses": addresses}
        return self._admin(node_id, "POST", body)

    def _heal_partitions(self) -> None:
        if not self._partitioned:
            return
        for node_id in self.running():
            self._admin(node_id, "DELETE", None)

    def _admin(self, node_id: str, method: str, body: dict | None) -> bool:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        for _ in range(3):
            outcome = http_request(self._connections, self.cluster.nodes[node_id].api, method,
                                   "/v1/admin/faults", body, 2.0, headers)
            if outcome.status == 200:
                return True
            if outcome.status is not None:
                self.problems.append(f"{method} /v1/admin/faults on {node_id}: HTTP "
                                     f"{outcome.status} {outcome.body}")
                return False
            time.sleep(0.1)
        return False

    # -- cluster state ----------------------------------------------------------------------

    def running(self) -> list[str]:
        """Ids of nodes with a live process that is not paused."""
        return [node_id for node_id in self.cluster.nodes
                if node_id not in self._paused
                and local.running_pid(self.cluster, node_id) is not None]

    def leader(self) -> str | None:
        """The node that calls itself leader, asked of each running voter."""
        for node_id in self.running():
            node = self.cluster.nodes[node_id]
            if node.role != "voter":
                continue
            status = local.fetch_status(node.api, timeout=0.5)
            if status and (status.get("raft_role") or status.get("role")) == "leader":
                return node_id
        return None

    def heal_all(self) -> None:
        """Resume paused nodes, heal partitions, restart nodes that are down."""
        for node_id in list(self._paused):
            try:
                local.stop_node(self.cluster, node_id, "CONT")
            except local.ClusterError:
                pass
            self._paused.discard(node_id)
        self._heal_partitions()
        for node_id in self.cluster.nodes:
            if local.running_pid(self.cluster, node_id) is None and not self._retired(node_id):
                try:
                    local.start_node(self.cluster, node_id)
                except local.ClusterError as exc:
                    self.problems.append(f"restart of {node_id} failed: {exc}")

    def _retired(self, node_id: str) -> bool:
        """A helper that a new one replaced stays down."""
        return any(e.kind == "helpers" and e.targets == [node_id]
                   and e.detail.startswith("replaced") for e in self.events)

    def _recover(self, event: FaultEvent) -> None:
        """Wait for an agreed leader after a fault; a cluster that does not recover is noted."""
        try:
            local.wait_for_leader(self.cluster, 30.0, among=[
                n for n in self.running() if self.cluster.nodes[n].role == "voter"])
        except local.ClusterError as exc:
            self.problems.append(f"no leader 30 s after {event.kind} of {event.targets}: "
                                 f"{str(exc).splitlines()[0]}")
            return
        event.recovered_after = round(self.clock() - (event.end or self.clock()), 3)

    def _begin(self, kind: str, targets: list[str], leader: str | None, detail: str = "",
               hit_leader: bool | None = None) -> FaultEvent:
        if hit_leader is None:
            hit_leader = leader in targets
        event = FaultEvent(kind, targets, round(self.clock(), 3), leader=leader,
                           hit_leader=hit_leader, detail=detail)
        self.events.append(event)
        self.log(f"[{event.start:8.2f}s] {kind} {' '.join(targets)}"
                 f"{' (takes the leader out)' if event.hit_leader else ''} {detail}".rstrip())
        return event

    def _end(self, event: FaultEvent) -> None:
        event.end = round(self.clock(), 3)

    def _scaled(self, low: float, high: float) -> float:
        """A random duration between ``low`` and ``high`` election timeouts, at least 0.5 s."""
        return max(0.5, self.rng.uniform(low, high) * self.election_timeout)
