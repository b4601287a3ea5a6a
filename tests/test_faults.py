"""The in-process fault-injection layer (bwcore.faults) and its admin route."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bwcore.api import ApiResource
from bwcore.config import ConfigError, config_from_dict
from bwcore.faults import FaultInjector, FaultsRequestError, parse_faults_request
from bwcore.gossip import GossipProtocol
from tests.test_api import FakeNode, Http


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.peers = {"n2": ("127.0.0.1", 1)}

    def send(self, peer: str, obj: Any) -> bool:
        self.sent.append((peer, obj))
        return True


def test_a_partition_drops_frames_both_ways_and_counts_them() -> None:
    """Frames to and from a blocked peer are dropped and counted; others pass."""
    registry = CollectorRegistry()
    injector = FaultInjector("n1", registry=registry)
    inner = RecordingTransport()
    transport = injector.wrap_transport(inner)
    injector.partition(["n2", "n1"])
    assert injector.blocked == frozenset({"n2"})  # a node never cuts itself off
    assert transport.send("n2", "m1") is True     # lost silently, like on a real network
    assert transport.send("n3", "m2") is True
    assert inner.sent == [("n3", "m2")]
    assert injector.drops_frame_from("n2") and not injector.drops_frame_from("n3")
    assert transport.peers == {"n2": ("127.0.0.1", 1)}  # everything else passes through
    assert injector.status()["dropped"] == {"raft_out": 1, "raft_in": 1, "gossip_in": 0,
                                            "gossip_out": 0}
    text = generate_latest(registry).decode()
    assert 'bwraft_faults_dropped_total{channel="raft",direction="out"} 1.0' in text
    assert "bwraft_faults_blocked_peers 1.0" in text
    injector.heal()
    assert transport.send("n2", "m3") and inner.sent[-1] == ("n2", "m3")
    assert not injector.drops_frame_from("n2")


class FakePort:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.written.append((data, addr))


class FakeMember:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.members = [SimpleNamespace(id="n2", gossip_addr="127.0.0.1:7102"),
                        SimpleNamespace(id="n3", gossip_addr="127.0.0.1:7103")]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))


def test_a_partition_drops_gossip_datagrams_by_the_peers_gossip_address() -> None:
    """Datagrams to and from a blocked member's address (from the gossip view) are dropped."""
    protocol = GossipProtocol()
    port, member = FakePort(), FakeMember()
    protocol.transport, protocol.member = port, member
    port.protocol = protocol
    injector = FaultInjector("n1")
    injector.attach_gossip(SimpleNamespace(port=port, member=member))
    injector.partition(["n2"], [("127.0.0.1", 7200)])
    for addr in (("127.0.0.1", 7102), ("127.0.0.1", 7103), ("127.0.0.1", 7200)):
        protocol.send(addr, b"ping")
        protocol.datagramReceived(b"ack", addr)
    assert port.written == [(b"ping", ("127.0.0.1", 7103))]
    assert member.received == [(b"ack", ("127.0.0.1", 7103))]
    assert injector.status()["dropped"]["gossip_out"] == 2
    assert injector.status()["dropped"]["gossip_in"] == 2
    injector.heal()
    protocol.datagramReceived(b"ack", ("127.0.0.1", 7102))
    assert member.received[-1] == (b"ack", ("127.0.0.1", 7102))


def test_attach_gossip_refuses_a_gossip_service_that_has_not_started() -> None:
    with pytest.raises(RuntimeError, match="started gossip service"):
        FaultInjector("n1").attach_gossip(SimpleNamespace(port=None, member=None))


@pytest.mark.parametrize("body, message", [
    ([], "must be a JSON object"),
    ({}, "missing field: partition"),
    ({"partition": "n2"}, "'partition' must be a list"),
    ({"partition": [2]}, "non-empty strings"),
    ({"partition": [""]}, "non-empty strings"),
    ({"partition": [], "gossip_addresses": ["nowhere"]}, "gossip_addresses: 'nowhere'"),
    ({"partition": [], "other": 1}, "unknown field(s): other"),
    ({"partition": ["n"] * 1025}, "at most 1024"),
])
def test_a_bad_fault_request_is_refused_with_the_reason(body: Any, message: str) -> None:
    with pytest.raises(FaultsRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_faults_request(body)


def test_fault_injection_is_off_unless_the_config_enables_it() -> None:
    base = {"id": "n1", "addresses": {"raft": "127.0.0.1:1", "api": "127.0.0.1:2"}}
    assert config_from_dict(base).faults.enabled is False
    assert config_from_dict({**base, "faults": {"enabled": True}}).faults.enabled is True
    with pytest.raises(ConfigError, match="faults.enabled: expected a boolean"):
        config_from_dict({**base, "faults": {"enabled": "yes"}})
    with pytest.raises(ConfigError, match="unknown key.*faults.drop"):
        config_from_dict({**base, "faults": {"drop": 1}})


# -- the admin route ------------------------------------------------------------------------

def route(token: str = "", enabled: bool = True) -> tuple[FakeNode, Http]:
    node = FakeNode()
    node.config.security.admin_token = token
    node.faults = FaultInjector("n1") if enabled else None
    return node, Http(ApiResource(node))


def test_the_faults_route_sets_shows_and_heals_a_partition() -> None:
    node, http = route()
    answer = http.request("POST", "/v1/admin/faults",
                          json.dumps({"partition": ["n2", "n3"],
                                      "gossip_addresses": ["127.0.0.1:7102"]}).encode())
    assert answer.status == 200, answer.body
    assert answer.json()["partition"] == ["n2", "n3"]
    assert node.faults.blocked == {"n2", "n3"}
    shown = http.request("GET", "/v1/admin/faults").json()
    assert shown["gossip_addresses"] == ["127.0.0.1:7102"] and shown["enabled"] is True
    assert http.request("DELETE", "/v1/admin/faults").json()["partition"] == []
    assert node.faults.blocked == frozenset()


def test_the_faults_route_answers_404_when_fault_injection_is_disabled() -> None:
    _, http = route(enabled=False)
    answer = http.request("POST", "/v1/admin/faults", b'{"partition": ["n2"]}')
    assert answer.status == 404 and "not enabled" in answer.json()["error"]


@pytest.mark.parametrize("body, status", [
    (b"not json", 400), (b'{"partition": 5}', 400), (b'{"block": []}', 400),
    (b"x" * 2000, 413),
])
def test_the_faults_route_refuses_bad_bodies_as_json_errors(body: bytes, status: int) -> None:
    node, http = route()
    answer = http.request("POST", "/v1/admin/faults", body)
    assert answer.status == status and "error" in answer.json()
    assert node.faults.blocked == frozenset()


def test_the_faults_route_needs_the_admin_token_when_one_is_configured() -> None:
    """No token or a wrong one: 401 and nothing changes; the right one: the partition is set."""
    node, http = route(token="s3cret-token")
    body = b'{"partition": ["n2"]}'
    missing = http.request("POST", "/v1/admin/faults", body)
    assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = http.request("POST", "/v1/admin/faults", body,
                         {"Authorization": "Bearer guess"})
    assert wrong.status == 401
    assert http.request("GET", "/v1/admin/faults").status == 401
    assert node.faults.blocked == frozenset()
    right = http.request("POST", "/v1/admin/faults", body,
                         {"Authorization": "Bearer s3cret-token"})
    assert right.status == 200 and node.faults.blocked == {"n2"}

