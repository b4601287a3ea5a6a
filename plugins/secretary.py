"""The ``secretary`` plugin: BW-Raft secretaries take log replication off the leader.

One plugin, three parts, on whichever node they apply to:

- on the leader, :class:`~bwraft_plugins.secretary_leader.LeaderRelay` hands the APPEND and
  HEARTBEAT messages for the followers of a datacenter to that datacenter's secretary, one
  BATCH frame per outgoing batch, steps the replies the secretary reports, and takes the
  followers back when the secretary is gone or late;
- on a node whose ``role = "secretary"``, :class:`SecretaryService` runs a
  :class:`~bwraft_plugins.secretary_relay.SecretaryRelay`: it relays each batch to the
  followers and reports their replies back, aggregated;
- on every voter and observer, :class:`~bwraft_plugins.secretary_relay.FollowerRelay` steps the
  relayed messages and sends the replies back through the secretary that brought them.

The relay logic lives in those pure cores (the simulated tests run the same code); this module
wires them to the node: hooks, timers on ``node.reactor``, metrics and status. How it works and
how to deploy it: docs/secretaries.md. The rules: PROTOCOL.md "Secretary".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import task

from bwcore.config import parse_address
from bwcore.errors import ConfigError
from bwcore.hookspecs import hookimpl
from bwcore.kernel import StateRole
from bwcore.logs import get_logger
from bwraft_plugins import secretary_wire as wire
from bwraft_plugins.secretary_leader import (
    RELAY_TAG,
    RELAY_TAG_VALUE,
    DirectoryEntry,
    LeaderRelay,
    RelaySettings,
    TakeBack,
)
from bwraft_plugins.secretary_relay import QUIET_FACTOR, FollowerRelay, SecretaryRelay

__all__ = ["SecretaryPlugin", "SecretaryService"]

ROLE = "secretary"
SPLITS = ("rendezvous", "single")


class SecretaryService(Service):
    """The secretary role: relays batches to followers and reports their replies.

    Reports leave when every follower of the batches in hand has answered, or as many as the
    leader needs to commit (the batch's hint) have answered with news (at the end of that
    reactor turn), or ``max_delay`` after the first unreported news at the latest; a batch
    nobody has answered yet, answers that are no news, and (when the hint settles it)
    acknowledgements waiting for the hint are reported within the relay's ``quiet_delay``
    (``QUIET_FACTOR`` delays, at most a quarter of the reply deadline), so that the leader hears
    from a live secretary well within its reply deadline.
    """

    def __init__(self, node: Any, relay: SecretaryRelay) -> None:
        self.setName("secretary")
        self.node = node
        self.relay = relay
        self._flush_call: Any = None
        self._addresses: dict[str, str] = {}

    def stopService(self) -> Any:  # noqa: N802 (Twisted)
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        return super().stopService()

    def on_batch(self, peer: str, batch: wire.Batch) -> None:
        node, relay = self.node, self.relay
        for target, address in batch.addresses.items():
            self._learn_address(target, address)
        now = node.reactor.seconds()
        for target, payload in relay.on_batch(peer, batch, now):
            if not node.send_plugin_frame(target, wire.PLUGIN, payload):
                relay.unreachable(target, now)
        self._schedule_flush(now, immediately=False)

    def on_replies(self, peer: str, replies: wire.Replies) -> None:
        now = self.node.reactor.seconds()
        self._schedule_flush(now, immediately=self.relay.on_replies(peer, replies, now))

    def _learn_address(self, target: str, address: str) -> None:
        if self._addresses.get(target) == address or target == self.node.node_id:
            return
        try:
            host, port = parse_address(address)
        except ValueError:
            return
        self._addresses[target] = address
        self.node.set_peer_address(target, host, port)

    def _schedule_flush(self, now: float, *, immediately: bool) -> None:
        due = self.relay.flush_at
        if due is None or not self.running:
            return
        delay = 0.0 if immediately else max(0.0, due - now)
        call = self._flush_call
        if call is not None and call.active():
            if call.getTime() <= now + delay:
                return
            call.cancel()
        self._flush_call = self.node.reactor.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        report = self.relay.flush(self.node.reactor.seconds())
        if report is not None:
            leader, payload = report
            if not self.node.send_plugin_frame(leader, wire.PLUGIN, payload):
                self.relay.report_lost()


class SecretaryPlugin:
    """The ``secretary`` entry point (settings: ``[plugins.secretary]``, docs/secretaries.md).

    Loaded on a node whose role is ``secretary`` (it runs the role) and on every voter and
    observer named ``[plugins.secretary]`` in its config (the leader's and the followers'
    sides). A datacenter gets secretaries once the leader sees one alive in gossip.
    """

    settings_defaults: dict[str, Any] = {
        "reply_deadline_ms": 0,        # 0: 30% of the election timeout
        "rehire_after_ms": 0,          # 0: two election timeouts
        "window": 4096,
        "max_report_delay_ms": 2.0,
        "commit_delay_ms": 2.0,
        "split": "rendezvous",
        "datacenters": [],
        "exclude_datacenters": [],
    }

    def __init__(self, settings: dict[str, Any]) -> None:
        for key in ("reply_deadline_ms", "rehire_after_ms"):
            if settings[key] < 0:
                raise ValueError(f"{key} must be 0 (automatic) or positive")
        if settings["window"] < 1:
            raise ValueError("window must be at least 1 entry")
        for key in ("max_report_delay_ms", "commit_delay_ms"):
            if settings[key] < 0:
                raise ValueError(f"{key} must not be negative")
        if settings["split"] not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}")
        for key in ("datacenters", "exclude_datacenters"):
            if not all(isinstance(dc, str) for dc in settings[key]):
                raise ValueError(f"{key} must be a list of datacenter names")
        self.settings = settings
        self.node: Any = None
        self.leader: LeaderRelay | None = None
        self.follower: FollowerRelay | None = None
        self.service: SecretaryService | None = None
        self.malformed = 0
        self._checker: task.LoopingCall | None = None
        self._held_call: Any = None
        self._log = get_logger()

    # -- start and stop ----------------------------------------------------------------------

    def _resolve(self, node: Any) -> RelaySettings:
        """The settings in seconds, checked against the node's election timeout."""
        config, s = node.config, self.settings
        election = config.election_ticks * config.tick_ms / 1000
        deadline = s["reply_deadline_ms"] / 1000 or 0.3 * election
        if deadline >= election / 2:
            raise ConfigError(
                f"{config.source or '<config>'}: plugins.secretary.reply_deadline_ms: "
                f"{deadline * 1000:g} ms is not well under the election timeout "
                f"({election * 1000:g} ms); use less than half of it")
        return RelaySettings(
            reply_deadline=deadline,
            rehire_after=s["rehire_after_ms"] / 1000 or 2 * election,
            window=s["window"],
            max_frame_bytes=max(1, config.limits.max_frame_bytes // 2),
            split=s["split"], datacenters=frozenset(s["datacenters"]),
            exclude_datacenters=frozenset(s["exclude_datacenters"]),
            commit_delay=s["commit_delay_ms"] / 1000)

    @hookimpl(tryfirst=True)
    def bwraft_role_service(self, node: Any) -> SecretaryService | None:
        """Runs on every node at start-up (first, so that another role plugin's answer does
        not skip it): check the settings, build this node's side of the relay, and run the
        secretary role if it is this node's."""
        settings = self._resolve(node)
        self.node = node
        self._log = node.log.bind(logger="bwraft_plugins.secretary")
        if node.config.role == ROLE:
            max_delay = self.settings["max_report_delay_ms"] / 1000
            # Quiet reports (a batch nobody has answered yet, answers without news) must
            # still reach the leader well within its reply deadline.
            relay = SecretaryRelay(node.node_id, window=settings.window, max_delay=max_delay,
                                   max_relay_bytes=settings.max_frame_bytes,
                                   quiet_delay=min(QUIET_FACTOR * max_delay,
                                                   settings.reply_deadline / 4))
            self.service = SecretaryService(node, relay)
            return self.service
        voters = {vid: str(v.raft) for vid, v in node.config.cluster.voters.items()}
        if node.config.is_voter:
            self.leader = LeaderRelay(node.node_id, settings, voters)
        heartbeat = node.config.heartbeat_ticks * node.config.tick_ms / 1000
        self.follower = FollowerRelay(node.node_id,
                                      ttl=max(settings.reply_deadline, 2 * heartbeat))
        return None

    @hookimpl
    def bwraft_node_started(self, node: Any) -> None:
        if self.follower is None:
            return
        member = getattr(getattr(node, "gossip", None), "member", None)
        if member is not None:
            # Tell the leader this node can take relayed messages (docs/secretaries.md).
            tags = dict(member.local.tags)
            tags[RELAY_TAG] = RELAY_TAG_VALUE
            member.update_local(tags=tags)
            if self.leader is not None:
                now = node.reactor.seconds()
                for m in member.members():
                    self._member(node, m, now)
        if self.leader is not None:
            interval = min(self.leader.settings.reply_deadline / 3,
                           node.config.tick_ms / 1000)
            self._checker = task.LoopingCall(self._check_deadlines)
            self._checker.clock = node.reactor
            self._checker.start(interval, now=False)

    @hookimpl
    def bwraft_node_stopping(self, node: Any) -> None:
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._cancel_held_call()

    def _cancel_held_call(self) -> None:
        if self._held_call is not None and self._held_call.active():
            self._held_call.cancel()
        self._held_call = None

    # -- leader and follower sides -----------------------------------------------------------

    def _leading(self, node: Any) -> bool:
        """Sync the leader core with the kernel; True while this node leads."""
        kernel, leader = node.kernel, self.leader
        if leader is None or kernel is None:
            return False
        if kernel.role is not StateRole.LEADER:
            leader.set_leadership(None, False)
            return False
        if leader.ready and leader.term == kernel.term:
            return True   # the term's own entry, once committed, stays committed in the term
        leader.set_leadership(kernel.term, kernel.term_at(kernel.commit_index) == kernel.term)
        return True

    @hookimpl
    def bwraft_role_changed(self, node: Any, role: StateRole, term: int,
                            leader: str | None) -> None:
        self._leading(node)

    @hookimpl
    def bwraft_route_messages(self, node: Any, messages: list[Any]) -> None:
        now = node.reactor.seconds()
        if self._leading(node):
            assert self.leader is not None
            self._send_batches(node, self.leader.route(messages, now), now)
            held_until = self.leader.held_until
            if held_until is None:
                # A batch took the held notices along: under load that is every round, and a
                # timer left to fire would cost the leader a wake-up for nothing each time.
                self._cancel_held_call()
            elif self._held_call is None:
                self._held_call = node.reactor.callLater(max(0.0, held_until - now),
                                                         self._flush_held)
        if self.follower is not None:
            picked = self.follower.take_replies(messages, now)
            if picked is not None:
                secretary, replies, payload = picked
                if node.send_plugin_frame(secretary, wire.PLUGIN, payload):
                    gone = {id(m) for m in replies}
                    messages[:] = [m for m in messages if id(m) not in gone]

    def _send_batches(self, node: Any, frames: list[tuple[str, list[Any]]], now: float) -> None:
        assert self.leader is not None
        for secretary, payload in frames:
            if not node.send_plugin_frame(secretary, wire.PLUGIN, payload):
                self._took_back(node, self.leader.send_failed(secretary, now))

    def _flush_held(self) -> None:
        """The commit notices no batch took along in time go in frames of their own."""
        self._held_call = None
        node = self.node
        if node is not None and self.leader is not None and self._leading(node):
            now = node.reactor.seconds()
            self._send_batches(node, self.leader.flush_held(now, force=True), now)

    def _check_deadlines(self) -> None:
        node = self.node
        if node is not None and self.leader is not None and self._leading(node):
            now = node.reactor.seconds()
            self._took_back(node, self.leader.check(now))
            self.leader.note_progress(node.kernel.status(), now)

    def _took_back(self, node: Any, takebacks: Iterable[TakeBack]) -> None:
        """Followers of a secretary that is gone or late: probe them at once (the kernel
        resends what the secretary may have lost), and tell them to reply directly."""
        kernel = node.kernel
        for tb in takebacks:
            self._log.info("secretary_taken_back", secretary=tb.secretary, reason=tb.reason,
                           followers=list(tb.targets))
            if kernel is None or kernel.role is not StateRole.LEADER:
                continue
            for target in tb.targets:
                node.report_unreachable(target)
                node.send_plugin_frame(target, wire.PLUGIN, wire.encode_direct(kernel.term))

    @hookimpl
    def bwraft_member_event(self, node: Any, event: str, member: Any) -> None:
        if self.leader is not None:
            self._member(node, member, node.reactor.seconds())

    def _member(self, node: Any, member: Any, now: float) -> None:
        assert self.leader is not None
        fields = [getattr(member, name, None) for name in ("id", "role", "datacenter")]
        if not all(isinstance(f, str) and f for f in fields):
            return
        tags = getattr(member, "tags", None)
        raft = getattr(member, "raft_addr", "")
        entry = DirectoryEntry(
            id=fields[0], role=fields[1], datacenter=fields[2],
            state=str(getattr(member, "state", "")), raft_addr=raft if isinstance(raft, str)
            else "", relay=isinstance(tags, dict) and tags.get(RELAY_TAG) == RELAY_TAG_VALUE)
        self._took_back(node, self.leader.member_changed(entry, now))

    # -- frames ------------------------------------------------------------------------------

    @hookimpl
    def bwraft_plugin_frame(self, node: Any, peer: str, frame: Any) -> bool | None:
        if getattr(frame, "plugin", None) != wire.PLUGIN:
            return None
        payload = getattr(frame, "payload", None)
        try:
            kind = wire.kind_of(payload)
            if kind is wire.Kind.BATCH and self.service is not None:
                self.service.on_batch(peer, wire.decode_batch(payload))
            elif kind is wire.Kind.REPLY and self.service is not None:
                self.service.on_replies(peer, wire.decode_replies(payload))
            elif kind is wire.Kind.RELAY and self.follower is not None:
                relay = wire.decode_relay(payload, node.node_id)
                for m in self.follower.on_relay(peer, relay, node.reactor.seconds()):
                    node.step(m)
            elif kind is wire.Kind.DIRECT and self.follower is not None:
                self.follower.on_direct(peer, wire.decode_direct(payload))
            elif kind is wire.Kind.REPORT and self.leader is not None:
                report = wire.decode_report(payload, node.node_id)
                if self._leading(node):
                    for m in self.leader.on_report(peer, report, node.reactor.seconds()):
                        node.step(m)
                else:
                    self.leader.stats.stale_reports += 1
        except wire.WireError as exc:
            self.malformed += 1
            self._log.debug("secretary_frame_rejected", peer=peer, error=str(exc))
        return True

    # -- status and metrics ------------------------------------------------------------------

    @hookimpl
    def bwraft_status(self, node: Any) -> dict[str, Any] | None:
        now = node.reactor.seconds()
        if self.service is not None:
            return {"secretary": self.service.relay.status()}
        out: dict[str, Any] = {}
        if self.leader is not None and self._leading(node):
            out["secretaries"] = self.leader.status(now)
        route = self.follower.status() if self.follower is not None else None
        if route is not None:
            out["secretary_route"] = route
        return out or None

    @hookimpl
    def bwraft_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))


class _Collector:
    """Reads the cores' counters at scrape time (the cores stay free of prometheus)."""

    def __init__(self, plugin: SecretaryPlugin) -> None:
        self.plugin = plugin

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        p = self.plugin

        def counter(name: str, doc: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(f"bwraft_secretary_{name}", doc, value=value)

        if p.leader is not None:
            st = p.leader.stats
            yield counter("leader_frames", "BATCH frames the leader sent to secretaries.",
                          st.frames)
            yield counter("leader_relayed_messages",
                          "Leader messages handed to secretaries instead of sent directly.",
                          st.relayed_messages)
            yield counter("leader_relayed_entries",
                          "Entries in those messages: one per follower that receives it.",
                          st.relayed_entries)
            yield counter("leader_sent_entries",
                          "Distinct entries the leader sent in BATCH frames.", st.sent_entries)
            yield counter("leader_reports", "REPORT frames accepted from secretaries.",
                          st.reports)
            yield counter("leader_folded_notices",
                          "Entry-less APPENDs (commit notices) replaced by a later APPEND.",
                          st.folded_notices)
            yield counter("leader_stale_reports",
                          "REPORT frames ignored: another term, or not a hired secretary.",
                          st.stale_reports)
            takebacks = CounterMetricFamily(
                "bwraft_secretary_takebacks",
                "Times the leader took followers back from a secretary, by reason.",
                labels=["reason"])
            for reason in ("deadline", "unreachable", "suspect", "dead", "left",
                           "follower_silent", "follower_unreachable"):
                takebacks.add_metric([reason], st.takebacks.get(reason, 0))
            yield takebacks
            node = p.node
            now = node.reactor.seconds() if node is not None else 0.0
            assigned = sum(len(v) for v in p.leader.assignment(now).values()) \
                if p.leader.ready else 0
            yield GaugeMetricFamily("bwraft_secretary_assigned_followers",
                                    "Followers the leader currently serves through secretaries.",
                                    value=assigned)
        if p.service is not None:
            st2 = p.service.relay.stats
            yield counter("batches", "BATCH frames this secretary accepted.", st2.batches)
            yield counter("relayed_messages", "Messages this secretary delivered to followers.",
                          st2.relayed_messages)
            yield counter("relayed_entries", "Entries in them.", st2.relayed_entries)
            yield counter("replies_forwarded", "Follower replies reported to the leader.",
                          st2.replies)
            yield counter("reports", "REPORT frames this secretary sent.", st2.reports)
            dropped = CounterMetricFamily("bwraft_secretary_dropped_frames",
                                          "Frames this secretary dropped, by reason.",
                                          labels=["reason"])
            for reason in ("not_from_leader", "stale_term", "conflicting_leader", "window",
                           "stale_reply"):
                dropped.add_metric([reason], st2.dropped.get(reason, 0))
            yield dropped
        if p.follower is not None:
            st3 = p.follower.stats
            yield counter("follower_relays", "RELAY frames this node accepted.", st3.relays)
            yield counter("follower_replies",
                          "Replies this node sent back through a secretary.", st3.replies)
        yield counter("malformed_frames", "Secretary frames that failed validation.",
                      p.malformed)
