"""The ``membership`` plugin: add, promote and remove voters through the leader.

Voter membership changes only through Raft configuration changes, one server at a time
(dissertation §4.1, as the kernel implements it: a change takes effect when committed, the
next may start only after it, and none before the leader committed an entry of its term). A
new voter always joins as a learner — it receives the log (by snapshot when the log was
compacted) but neither votes nor counts — and is promoted only once its log is within
``promote_lag`` entries of the leader's (§4.2.1: a server without the log would stall commits).

Routes (admin: ``security.admin_token`` applies; a non-leader answers 307 to the leader)::

    GET    /v1/admin/members                 voters, learners, the leader's view of progress
    POST   /v1/admin/members                 {"id", "raft_addr", "api_addr", "as_learner"?}
    POST   /v1/admin/members/{id}/promote    learner -> voter, once caught up
    DELETE /v1/admin/members/{id}            remove a voter or learner (the leader too)

Addresses. A configuration-change entry carries only the node id. The new node's addresses
reach the others two ways: the node gossips them itself (it starts with gossip seeds and no
voter list), and the leader that takes the request sends them to every member in a plugin frame
(``{"k": "addr", ...}``), together with whether it is to be promoted automatically, so that a
later leader finishes a promotion the old one began.

Removing the leader: it first hands leadership to the most caught-up other voter and answers
307, so the client repeats the removal at the new leader; if the transfer fails it proposes its
own removal and steps down once that commits (§4.2.2).

Settings (``[plugins.membership]``): ``promote_lag`` (100 entries), ``wait_seconds`` (30.0: how
long a request waits for its change), ``check_seconds`` (0.2: how often the leader looks for
learners to promote).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.web.server import Request

from bwcore.admin import AdminResource
from bwcore.api import ApiError, Reply, json_reply
from bwcore.config import NAME_PATTERN, Address, parse_address
from bwcore.errors import NotLeader, Unavailable
from bwcore.hookspecs import hookimpl
from bwcore.kernel import ConfChange, ConfChangeType, StateRole
from bwraft_plugins.transfer import pick_target, transfer_and_wait

__all__ = ["MembershipPlugin", "MembersResource"]

PLUGIN = "membership"
#: How often a leader re-sends the members' addresses to a learner that has not caught up.
INTRODUCE_SECONDS = 2.0
_MAX_ADDR_CHARS = 300


class MembershipPlugin:
    """Voter membership changes: routes, automatic promotion, address distribution."""

    settings_defaults = {"promote_lag": 100, "wait_seconds": 30.0, "check_seconds": 0.2}

    def __init__(self, settings: dict[str, Any]) -> None:
        if settings["promote_lag"] < 0:
            raise ValueError(f"promote_lag must be >= 0, got {settings['promote_lag']}")
        for name in ("wait_seconds", "check_seconds"):
            if settings[name] <= 0:
                raise ValueError(f"{name} must be positive, got {settings[name]}")
        self.promote_lag: int = settings["promote_lag"]
        self.wait_seconds = float(settings["wait_seconds"])
        self.check_seconds = float(settings["check_seconds"])
        #: Learners to promote as soon as they catch up (kept by every member, see above).
        self.auto_promote: set[str] = set()
        #: Addresses announced for members: id -> (raft, api).
        self.addresses: dict[str, tuple[str, str]] = {}
        self._loop: task.LoopingCall | None = None
        self._node: Any = None
        #: When each lagging learner was last told the members' addresses.
        self._introduced: dict[str, float] = {}
        self.promotions = 0

    # -- hooks ------------------------------------------------------------------------------

    @hookimpl
    def bwraft_http_resources(self, node: Any) -> dict[str, Any]:
        return {"v1/admin/members": MembersResource(node, self)}

    @hookimpl
    def bwraft_node_started(self, node: Any) -> None:
        self._node = node
        self._loop = task.LoopingCall(self.promote_caught_up, node)
        self._loop.clock = node.reactor
        self._loop.start(self.check_seconds, now=False)

    @hookimpl
    def bwraft_node_stopping(self, node: Any) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    @hookimpl
    def bwraft_plugin_frame(self, node: Any, peer: str, frame: Any) -> bool | None:
        if getattr(frame, "plugin", None) != PLUGIN:
            return None
        payload = getattr(frame, "payload", None)
        if isinstance(payload, dict) and payload.get("k") == "addr":
            try:
                member, raft, api, promote = _addr_frame(payload)
            except ValueError as exc:
                node.log.warning("membership_frame_invalid", peer=peer, error=str(exc))
                return True
            self.learn(node, member, raft, api, promote)
        return True

    # -- addresses -------------------------------------------------------------------------

    def learn(self, node: Any, member: str, raft: str, api: str, promote: bool) -> None:
        """Record where ``member`` is (and whether to promote it) and tell the transport."""
        if member == node.node_id:
            return
        address = parse_address(raft)
        self.addresses[member] = (raft, api)
        node.set_peer_address(member, address.host, address.port,
                              api=f"http://{api}" if api else None)
        if promote:
            self.auto_promote.add(member)
        else:
            self.auto_promote.discard(member)

    def announce(self, node: Any, member: str, raft: str, api: str, promote: bool) -> None:
        """Send ``member``'s addresses to every other member and helper the leader knows."""
        kernel = node.kernel
        payload = {"k": "addr", "id": member, "raft": raft, "api": api, "promote": promote}
        for peer in sorted((kernel.conf.members() | kernel.helpers) - {node.node_id, member}):
            node.send_plugin_frame(peer, PLUGIN, payload)
        self.introduce(node, member)

    def introduce(self, node: Any, member: str) -> None:
        """Tell ``member`` where the others are, so that it can answer the leader even before
        gossip told it anything (sent again while it lags: frames to it may have been lost)."""
        self._introduced[member] = node.reactor.seconds()
        for known, (k_raft, k_api) in sorted(self.known_addresses(node).items()):
            if known != member:
                node.send_plugin_frame(member, PLUGIN, {
                    "k": "addr", "id": known, "raft": k_raft, "api": k_api,
                    "promote": known in self.auto_promote})

    def known_addresses(self, node: Any) -> dict[str, tuple[str, str]]:
        """Addresses of the members this node knows: initial voters, announced members, and
        itself when it is bound to a definite host."""
        found = {vid: (str(v.raft), str(v.api) if v.api else "")
                 for vid, v in node.config.cluster.voters.items()}
        found.update(self.addresses)
        own = node.config.addresses
        if own.raft.host not in ("0.0.0.0", "::") and node.raft_port:
            api = str(own.api) if own.api.port else ""
            found[node.node_id] = (str(Address(own.raft.host, node.raft_port)), api)
        return found

    # -- automatic promotion ---------------------------------------------------------------

    def caught_up(self, node: Any, member: str) -> bool:
        """Whether the leader sees ``member``'s log within ``promote_lag`` of its own."""
        kernel = node.kernel
        pr = kernel.status().get("progress", {}).get(member)
        return bool(pr and pr.get("active") and pr.get("state") == "replicate"
                    and kernel.last_index - pr["match"] <= self.promote_lag)

    def promote_caught_up(self, node: Any) -> None:
        """On the leader: propose the promotion of one caught-up learner marked for it."""
        kernel = node.kernel
        if kernel is None or kernel.role is not StateRole.LEADER:
            return
        for member in sorted(self.auto_promote):
            if member in kernel.conf.voters:
                self.auto_promote.discard(member)
                continue
            if member not in kernel.conf.learners:
                continue  # not added yet, or removed since
            if not self.caught_up(node, member):
                last = self._introduced.get(member)
                if member in self.addresses and (
                        last is None or node.reactor.seconds() - last >= INTRODUCE_SECONDS):
                    self.introduce(node, member)
                continue
            d = _defer(node.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, member),
                                                timeout=self.wait_seconds))
            d.addCallbacks(self._promoted, self._promotion_failed,
                           callbackArgs=(node, member), errbackArgs=(node, member))
            return  # one change at a time (§4.1)

    def _promoted(self, index: int, node: Any, member: str) -> None:
        self.promotions += 1
        self.auto_promote.discard(member)
        node.log.info("member_promoted", member=member, index=index)

    def _promotion_failed(self, failure: Any, node: Any, member: str) -> None:
        # Another change pending, leadership lost, ...: the loop tries again.
        failure.trap(Unavailable, NotLeader)

    async def wait_until(self, node: Any, condition: Any, seconds: float) -> bool:
        deadline = node.reactor.seconds() + seconds
        while not condition():
            if node.reactor.seconds() >= deadline:
                return False
            await task.deferLater(node.reactor, node.config.tick_ms / 1000, lambda: None)
        return True


def _defer(coroutine: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coroutine)


def _addr_frame(payload: dict[str, Any]) -> tuple[str, str, str, bool]:
    member, raft, api, promote = (payload.get(k) for k in ("id", "raft", "api", "promote"))
    if not isinstance(member, str) or not NAME_PATTERN.match(member):
        raise ValueError("id must be a node id")
    if not isinstance(raft, str) or len(raft) > _MAX_ADDR_CHARS:
        raise ValueError("raft must be host:port")
    parse_address(raft)
    if not isinstance(api, str) or len(api) > _MAX_ADDR_CHARS:
        raise ValueError("api must be host:port or empty")
    if api:
        parse_address(api)
    if not isinstance(promote, bool):
        raise ValueError("promote must be a boolean")
    return member, raft, api, promote


class MembersResource(AdminResource):
    """``/v1/admin/members`` and ``/v1/admin/members/{id}[/promote]``."""

    allowed = (b"GET", b"POST", b"DELETE")

    def __init__(self, node: Any, plugin: MembershipPlugin) -> None:
        super().__init__(node)
        self.plugin = plugin

    def _leader_kernel(self) -> Any:
        kernel = self.node.kernel
        if kernel is None:
            raise ApiError(503, "node not started")
        if kernel.role is not StateRole.LEADER:
            raise NotLeader(kernel.leader, self.node.leader_api())
        return kernel

    async def respond(self, request: Request, path: list[str]) -> Reply:
        method = request.method
        if method == b"GET" and not path:
            kernel = self._leader_kernel()
            status = kernel.status()
            return json_reply(200, {
                "leader": self.node.node_id, "term": kernel.term,
                "voters": status["voters"], "learners": status["learners"],
                "progress": status.get("progress", {}),
                "auto_promote": sorted(self.plugin.auto_promote)})
        if method == b"POST" and not path:
            return await self.add(request)
        if method == b"POST" and len(path) == 2 and path[1] == "promote":
            return await self.promote(_member_id(path[0]))
        if method == b"DELETE" and len(path) == 1:
            return await self.remove(request, _member_id(path[0]))
        raise ApiError(404, f"no such route: {request.method.decode()} {request.path.decode()}")

    async def _change(self, change: ConfChange) -> int:
        try:
            return await self.node.propose_conf_change(change, timeout=self.plugin.wait_seconds)
        except Unavailable as exc:
            raise ApiError(503, exc.reason) from None

    async def add(self, request: Request) -> Reply:
        body = self.read_json(request, {"id", "raft_addr", "api_addr", "as_learner"},
                              {"id", "raft_addr"})
        member = _member_id(body["id"])
        raft, api = body["raft_addr"], body.get("api_addr", "")
        as_learner = body.get("as_learner", False)
        if not isinstance(as_learner, bool):
            raise ApiError(400, "as_learner must be a boolean")
        try:
            _addr_frame({"id": member, "raft": raft, "api": api or "", "promote": False})
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        kernel = self._leader_kernel()
        node, plugin = self.node, self.plugin
        plugin.learn(node, member, raft, api or "", not as_learner)
        plugin.announce(node, member, raft, api or "", not as_learner)
        index = None
        if member not in kernel.conf.members():
            index = await self._change(ConfChange(ConfChangeType.ADD_LEARNER, member))
        elif member in kernel.conf.voters:
            return json_reply(200, {"id": member, "role": "voter", "index": index})
        if as_learner:
            return json_reply(200, {"id": member, "role": "learner", "index": index})
        # Promotion happens in promote_caught_up once the learner's log is close enough.
        promoted = await plugin.wait_until(
            node, lambda: member in node.kernel.conf.voters, plugin.wait_seconds)
        role = "voter" if promoted else "learner"
        return json_reply(200 if promoted else 202, {
            "id": member, "role": role, "index": index,
            **({} if promoted else {"promotion": "pending: promoted once caught up"})})

    async def promote(self, member: str) -> Reply:
        kernel = self._leader_kernel()
        if member in kernel.conf.voters:
            return json_reply(200, {"id": member, "role": "voter"})
        if member not in kernel.conf.learners:
            raise ApiError(404, f"{member!r} is not a learner")
        node, plugin = self.node, self.plugin
        if not await plugin.wait_until(node, lambda: plugin.caught_up(node, member),
                                       plugin.wait_seconds):
            raise ApiError(503, f"{member} has not caught up within {plugin.wait_seconds:g}s")
        self._leader_kernel()
        index = await self._change(ConfChange(ConfChangeType.PROMOTE, member))
        plugin.auto_promote.discard(member)
        return json_reply(200, {"id": member, "role": "voter", "index": index})

    async def remove(self, request: Request, member: str) -> Reply:
        kernel = self._leader_kernel()
        node = self.node
        if member not in kernel.conf.members():
            raise ApiError(404, f"{member!r} is not a member")
        if kernel.conf.voters == {member}:
            raise ApiError(400, f"{member} is the last voter")
        self.plugin.auto_promote.discard(member)
        if member == node.node_id:
            target = pick_target(node)
            if target is not None:
                election = node.config.election_ticks * node.config.tick_ms / 1000
                try:
                    result = await transfer_and_wait(node, target, 2 * election)
                except (Unavailable, NotLeader):
                    result = {"outcome": "refused"}
                if result["outcome"] == "transferred":
                    # The new leader removes us: the client repeats the request there.
                    raise NotLeader(node.kernel.leader, node.leader_api())
            node.log.info("removing_self_as_leader", transfer=target)
        index = await self._change(ConfChange(ConfChangeType.REMOVE, member))
        return json_reply(200, {"id": member, "removed": True, "index": index})


def _member_id(value: Any) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ApiError(400, f"{value!r} is not a valid node id")
    return value
