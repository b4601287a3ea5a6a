"""In-process fault injection: a node that drops its traffic to and from chosen peers.

Partitions are what a consensus system must survive most often and what is hardest to test
without root (iptables, network namespaces). With ``[faults] enabled = true`` in its config a
node builds a :class:`FaultInjector` and plugs it in at its edges:

* the peer transport is wrapped (:meth:`FaultInjector.wrap_transport`): frames to a blocked
  peer are dropped silently, as a lossy network would, and the sender is not told (Raft
  retransmits what is not acknowledged, Raft §5.3);
* the node's ``on_frame`` asks :meth:`FaultInjector.drops_frame_from` before handling a frame;
* the gossip UDP socket is wrapped (:meth:`FaultInjector.attach_gossip`): datagrams to or from
  a blocked peer's gossip address are dropped, so SWIM sees the partition too.

The set of blocked peers is set through ``/v1/admin/faults`` (``bwcore.admin.FaultsEndpoint``,
an admin route: see :mod:`bwcore.admin` for who may call it); ``bwraft chaos`` uses it to cut
a cluster into two sides. Client HTTP traffic is not affected, and neither is a write a
follower forwards to the leader's API over HTTP: only Raft frames and gossip datagrams are cut.

Nothing here is active unless the config enables it, and ``enabled`` defaults to false.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["FaultInjector", "FaultsRequestError", "parse_faults_request"]

#: Most peers (ids or gossip addresses) one request may name; a cluster is far smaller.
MAX_BLOCKED = 1024
_MAX_NAME_CHARS = 256


class FaultsRequestError(ValueError):
    """A fault request body that does not describe a partition; the message says why."""


def parse_faults_request(body: Any) -> tuple[frozenset[str], frozenset[tuple[str, int]]]:
    """Validate ``{"partition": [ids], "gossip_addresses"?: ["host:port", ...]}``.

    Returns:
        The peer ids to cut off and the extra gossip addresses to cut off.

    Raises:
        FaultsRequestError: The body is not of that form.
    """
    from bwcore.config import parse_address

    if not isinstance(body, dict):
        raise FaultsRequestError("body must be a JSON object")
    unknown = sorted(set(body) - {"partition", "gossip_addresses"})
    if unknown:
        raise FaultsRequestError(f"unknown field(s): {', '.join(map(str, unknown))}")
    if "partition" not in body:
        raise FaultsRequestError("missing field: partition (a list of peer ids; [] heals)")
    peers = _string_list(body["partition"], "partition")
    addresses = set()
    for text in _string_list(body.get("gossip_addresses", []), "gossip_addresses"):
        try:
            addresses.add(tuple(parse_address(text)))
        except ValueError as exc:
            raise FaultsRequestError(f"gossip_addresses: {exc}") from None
    return frozenset(peers), frozenset(addresses)  # type: ignore[arg-type]


def _string_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_BLOCKED:
        raise FaultsRequestError(f"'{name}' must be a list of at most {MAX_BLOCKED} strings")
    if not all(isinstance(v, str) and 0 < len(v) <= _MAX_NAME_CHARS for v in value):
        raise FaultsRequestError(f"'{name}' must hold non-empty strings of at most "
                                 f"{_MAX_NAME_CHARS} characters")
    return value


class FaultInjector:
    """The set of peers a node is cut off from, and the filters that enforce it.

    Args:
        node_id: This node's id (never blocked: a node always reaches itself).
        registry: Where the drop counters go (``bwraft_faults_dropped_total``).
        log: A structlog logger for partition changes.
    """

    def __init__(self, node_id: str, *, registry: CollectorRegistry | None = None,
                 log: Any = None) -> None:
        self.node_id = node_id
        self._log = log
        self._blocked: frozenset[str] = frozenset()
        self._extra_gossip: frozenset[tuple[str, int]] = frozenset()
        self._gossip_members: Callable[[], Iterable[Any]] = lambda: ()
        self.dropped = Counter("bwraft_faults_dropped", "Frames and datagrams dropped by fault"
                               " injection, by channel (raft, gossip) and direction (in, out)",
                               ["channel", "direction"], registry=registry)
        self._counts: dict[str, int] = {}
        for channel in ("raft", "gossip"):
            for direction in ("in", "out"):
                self.dropped.labels(channel, direction)
                self._counts[f"{channel}_{direction}"] = 0
        Gauge("bwraft_faults_blocked_peers", "Peers this node is cut off from by fault"
              " injection", registry=registry).set_function(lambda: len(self._blocked))

    # -- the partition ----------------------------------------------------------------------

    @property
    def blocked(self) -> frozenset[str]:
        """The ids of the peers this node is cut off from."""
        return self._blocked

    def partition(self, peers: Iterable[str],
                  gossip_addresses: Iterable[tuple[str, int]] = ()) -> None:
        """Cut this node off from ``peers`` (replacing any earlier partition); ``[]`` heals.

        Args:
            peers: Peer ids whose frames and datagrams are dropped both ways.
            gossip_addresses: Gossip addresses to cut off as well, for peers whose address
                this node's gossip view does not know yet.
        """
        self._blocked = frozenset(p for p in peers if p != self.node_id)
        self._extra_gossip = frozenset((str(h), int(p)) for h, p in gossip_addresses)
        if self._log is not None:
            self._log.warning("faults_partition", blocked=sorted(self._blocked),
                              gossip_addresses=sorted(f"{h}:{p}" for h, p in self._extra_gossip))

    def heal(self) -> None:
        """Drop nothing any more."""
        self.partition(())

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/admin/faults`` answers: the partition and the drop counts."""
        return {"enabled": True, "partition": sorted(self._blocked),
                "gossip_addresses": sorted(f"{h}:{p}" for h, p in self._extra_gossip),
                "dropped": dict(self._counts)}

    def _count(self, channel: str, direction: str) -> None:
        self._counts[f"{channel}_{direction}"] += 1
        self.dropped.labels(channel, direction).inc()

    # -- peer frames ------------------------------------------------------------------------

    def drops_frame_to(self, peer: str) -> bool:
        """Whether a frame to ``peer`` is dropped (and counted)."""
        if peer in self._blocked:
            self._count("raft", "out")
            return True
        return False

    def drops_frame_from(self, peer: str) -> bool:
        """Whether a frame from ``peer`` (the id its connection said hello with) is dropped."""
        if peer in self._blocked:
            self._count("raft", "in")
            return True
        return False

    def wrap_transport(self, transport: Any) -> Any:
        """Return ``transport`` with ``send`` filtered; everything else passes through."""
        return _FilteredTransport(transport, self)

    # -- gossip datagrams -------------------------------------------------------------------

    def attach_gossip(self, gossip_service: Any) -> None:
        """Filter the datagrams of a started :class:`bwcore.gossip.GossipService`.

        The service's UDP protocol hands datagrams to ``protocol.member`` and writes through
        ``protocol.transport``; both are replaced by filtering proxies. Peer ids are mapped to
        gossip addresses through the member's own view, looked up per datagram, so a peer
        that moves is still cut off.
        """
        port = gossip_service.port
        protocol = getattr(port, "protocol", None)
        member = gossip_service.member
        if protocol is None or member is None:
            raise RuntimeError("attach_gossip needs a started gossip service")
        self._gossip_members = lambda: member.members
        protocol.member = _FilteredMember(member, self)
        protocol.transport = _FilteredDatagramTransport(protocol.transport, self)

    def drops_datagram(self, addr: Any, direction: str) -> bool:
        """Whether a datagram to or from ``addr`` (``(host, port)``) is dropped (and counted)."""
        if not self._blocked and not self._extra_gossip:
            return False
        try:
            key = (str(addr[0]), int(addr[1]))
        except (TypeError, ValueError, IndexError):
            return False
        if key in self._extra_gossip or key in self._blocked_gossip_addresses():
            self._count("gossip", direction)
            return True
        return False

    def _blocked_gossip_addresses(self) -> set[tuple[str, int]]:
        from bwcore.gossip_codec import parse_addr

        found = set()
        for member in self._gossip_members():
            if getattr(member, "id", None) in self._blocked:
                try:
                    found.add(parse_addr(member.gossip_addr))
                except ValueError:
                    continue
        return found


class _FilteredTransport:
    """A peer transport whose ``send`` drops frames to blocked peers, reporting success."""

    def __init__(self, inner: Any, injector: FaultInjector) -> None:
        self._inner = inner
        self._injector = injector

    def send(self, peer_id: str, obj: Any) -> bool:
        if self._injector.drops_frame_to(peer_id):
            return True  # a partition loses frames silently; it does not refuse them
        return bool(self._inner.send(peer_id, obj))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _FilteredMember:
    """Stands for a SwimMember in its UDP protocol: datagrams from blocked peers vanish."""

    def __init__(self, inner: Any, injector: FaultInjector) -> None:
        self._inner = inner
        self._injector = injector

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self._injector.drops_datagram(addr, "in"):
            self._inner.datagram_received(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _FilteredDatagramTransport:
    """A UDP port whose ``write`` drops datagrams to blocked peers."""

    def __init__(self, inner: Any, injector: FaultInjector) -> None:
        self._inner = inner
        self._injector = injector

    def write(self, data: bytes, addr: Any = None) -> Any:
        if addr is not None and self._injector.drops_datagram(addr, "out"):
            return None
        return self._inner.write(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

