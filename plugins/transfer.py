"""The ``leadership-transfer`` plugin: hand leadership over on request, on shutdown, by policy.

Leadership transfer is the Raft dissertation's §3.10: the leader stops taking proposals, brings
the target's log up to date, sends it TIMEOUT_NOW, and the target campaigns at once (skipping
pre-vote and the leader lease, which the transfer context allows). The kernel abandons a
transfer that has not finished within an election timeout and takes proposals again.

This plugin adds, on top of the kernel's mechanism:

* ``POST /v1/admin/transfer-leader`` with ``{"to": "n2"}`` or ``{"to": null}`` (null: the most
  up-to-date voter). The answer waits for the outcome: 200 with the new leader once one is
  known, 409 when the kernel abandoned the transfer (the old leader kept leading), 504 when
  neither was seen in time. A non-leader answers 307 to the leader (bwcore.admin).
* The shutdown policy: a leader stopping cleanly (SIGTERM) hands over to the most up-to-date
  voter first (``bwraft_transfer_target`` with ``reason="shutdown"``; the node waits up to an
  election timeout for it).
* An optional preferred datacenter: with ``preferred_datacenter = "east"``, a leader outside
  ``east`` that sees a healthy, caught-up voter inside it transfers leadership there.

Settings (``[plugins.leadership-transfer]``): ``on_shutdown`` (true), ``preferred_datacenter``
(""), ``check_seconds`` (2.0, how often the datacenter policy looks), ``max_lag`` (0, entries a
preferred-datacenter target may lag behind the leader's log and still be chosen).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.web.server import Request

from bwcore.admin import AdminResource
from bwcore.api import ApiError, Reply, json_reply
from bwcore.errors import NotLeader, Unavailable
from bwcore.hookspecs import hookimpl
from bwcore.kernel import StateRole

__all__ = ["LeadershipTransferPlugin", "TransferResource", "pick_target", "transfer_and_wait"]


def voter_datacenters(node: Any) -> dict[str, str]:
    """Datacenter of each node this node knows of: itself, and gossip members."""
    found = {str(m.get("id")): str(m.get("datacenter")) for m in node.members()
             if isinstance(m, dict) and m.get("id")}
    found[node.node_id] = node.config.datacenter
    return found


def pick_target(node: Any, *, datacenter: str | None = None, max_lag: int | None = None
                ) -> str | None:
    """The best voter to lead instead of this leader: active, most caught up, then by id.

    A voter the leader has not heard from lately comes last (a transfer to it is abandoned
    after an election timeout if it is really gone).

    Args:
        node: The leader.
        datacenter: Only voters known to be in this datacenter.
        max_lag: Only voters whose match is within this many entries of the leader's log.
    """
    kernel = node.kernel
    if kernel is None or kernel.role is not StateRole.LEADER:
        return None
    progress = kernel.status().get("progress", {})
    places = voter_datacenters(node) if datacenter else {}
    candidates = []
    for voter in sorted(kernel.conf.voters - {node.node_id}):
        pr = progress.get(voter)
        if pr is None:
            continue
        if datacenter and places.get(voter) != datacenter:
            continue
        if max_lag is not None and kernel.last_index - pr["match"] > max_lag:
            continue
        # "active" is cleared at every check-quorum round and set again by the next answer:
        # an inactive voter is a last resort, not excluded, unless a policy asks for health.
        if not pr.get("active") and (datacenter or max_lag is not None):
            continue
        candidates.append((not pr.get("active"), -pr["match"], voter))
    return min(candidates)[2] if candidates else None


async def transfer_and_wait(node: Any, target: str, timeout: float) -> dict[str, Any]:
    """Transfer leadership to ``target`` and wait for the outcome.

    Returns:
        ``{"outcome": "transferred" | "aborted" | "unknown", "leader", "term", "elapsed_ms"}``.

    Raises:
        NotLeader: This node is not the leader.
        Unavailable: The kernel refused (``target`` is not another voter, ...).
    """
    began = node.reactor.seconds()
    node.transfer_leader(target)
    tick = node.config.tick_ms / 1000
    outcome = "unknown"
    while node.reactor.seconds() - began < timeout:
        await task.deferLater(node.reactor, tick, lambda: None)
        kernel = node.kernel
        if kernel is None:
            break
        if kernel.role is not StateRole.LEADER:
            if kernel.leader is not None:
                outcome = "transferred"
                break
            continue  # stepped down; the new leader is not known here yet
        if kernel.status().get("lead_transferee") is None:
            outcome = "aborted"  # the kernel gave up after an election timeout (§3.10)
            break
    kernel = node.kernel
    return {"outcome": outcome, "target": target,
            "leader": kernel.leader if kernel is not None else None,
            "term": kernel.term if kernel is not None else 0,
            "elapsed_ms": round((node.reactor.seconds() - began) * 1000)}


class TransferResource(AdminResource):
    """``POST /v1/admin/transfer-leader`` ``{"to": id | null}``."""

    allowed = (b"POST",)

    async def respond(self, request: Request, path: list[str]) -> Reply:
        if path:
            raise ApiError(404, "no such route")
        body = self.read_json(request, {"to"})
        target = body.get("to")
        if target is not None and not isinstance(target, str):
            raise ApiError(400, "'to' must be a node id or null")
        node = self.node
        kernel = node.kernel
        if kernel is None:
            raise ApiError(503, "node not started")
        if kernel.role is not StateRole.LEADER:
            raise NotLeader(kernel.leader, node.leader_api())
        if target == node.node_id:
            return json_reply(200, {"outcome": "already_leader", "leader": node.node_id,
                                    "term": kernel.term, "elapsed_ms": 0})
        if target is None:
            target = pick_target(node)
            if target is None:
                raise ApiError(409, "no other active voter to transfer leadership to")
        elif target not in kernel.conf.voters:
            raise ApiError(400, f"{target!r} is not a voter (voters:"
                                f" {', '.join(sorted(kernel.conf.voters))})")
        election = node.config.election_ticks * node.config.tick_ms / 1000
        try:
            result = await transfer_and_wait(node, target, 2 * election + 1.0)
        except Unavailable as exc:
            raise ApiError(409, exc.reason) from None
        if result["outcome"] == "transferred":
            return json_reply(200, result)
        if result["outcome"] == "aborted":
            raise ApiError(409, f"transfer to {target} abandoned after an election timeout;"
                                f" {node.node_id} still leads", **result)
        raise ApiError(504, "transfer outcome not known yet, check the status", **result)


class LeadershipTransferPlugin:
    """Transfer on request (HTTP), on clean shutdown, and to a preferred datacenter."""

    settings_defaults = {"on_shutdown": True, "preferred_datacenter": "",
                         "check_seconds": 2.0, "max_lag": 0}

    def __init__(self, settings: dict[str, Any]) -> None:
        if settings["check_seconds"] <= 0:
            raise ValueError(f"check_seconds must be positive, got {settings['check_seconds']}")
        if settings["max_lag"] < 0:
            raise ValueError(f"max_lag must be >= 0, got {settings['max_lag']}")
        self.on_shutdown: bool = settings["on_shutdown"]
        self.preferred: str = settings["preferred_datacenter"]
        self.check_seconds = float(settings["check_seconds"])
        self.max_lag: int = settings["max_lag"]
        self._loop: task.LoopingCall | None = None
        self.policy_transfers = 0

    @hookimpl
    def bwraft_http_resources(self, node: Any) -> dict[str, Any]:
        return {"v1/admin/transfer-leader": TransferResource(node)}

    @hookimpl
    def bwraft_transfer_target(self, node: Any, reason: str) -> str | None:
        if reason == "shutdown" and not self.on_shutdown:
            return None
        if self.preferred:
            target = pick_target(node, datacenter=self.preferred)
            if target is not None:
                return target
        return pick_target(node)

    @hookimpl
    def bwraft_node_started(self, node: Any) -> None:
        if self.preferred:
            self._loop = task.LoopingCall(self.check_datacenter, node)
            self._loop.clock = node.reactor
            self._loop.start(self.check_seconds, now=False)

    @hookimpl
    def bwraft_node_stopping(self, node: Any) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check_datacenter(self, node: Any) -> None:
        """On a leader outside the preferred datacenter, move leadership into it if a voter
        there is healthy and caught up (``max_lag``)."""
        kernel = node.kernel
        if kernel is None or kernel.role is not StateRole.LEADER \
                or node.config.datacenter == self.preferred \
                or kernel.status().get("lead_transferee") is not None:
            return
        target = pick_target(node, datacenter=self.preferred, max_lag=self.max_lag)
        if target is None:
            return
        try:
            node.transfer_leader(target)
        except (NotLeader, Unavailable) as exc:
            node.log.info("preferred_datacenter_transfer_refused", target=target,
                          reason=str(exc))
            return
        self.policy_transfers += 1
        node.log.info("preferred_datacenter_transfer", target=target,
                      datacenter=self.preferred)
