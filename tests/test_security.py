"""Security of the wire and the API, checked on real node processes configured from files.

A three-voter cluster runs with a cluster secret, small limits, fault injection and an admin
token, all set in its node.toml files. The tests then act as an attacker on the network: frames
and datagrams without the secret's MAC, oversized frames, bodies and datagrams, too many
connections, admin requests without the token. Each must be refused and counted, and the
cluster must keep serving. See docs/security.md.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from typing import Iterator

import pytest

from bwcore import cluster as local
from bwcore.client import Client
from bwcore.codec import Hello, encode_frame
from bwcore.gossip_codec import Ping, WireCodec, encode_message
from tests.integration.support import wait_for

SECRET = b"a-cluster-secret-for-the-security-tests"
ADMIN_TOKEN = "admin-token-for-the-security-tests"
MAX_CONNECTIONS = 8
MAX_API_CONNECTIONS = 16
MAX_BODY = 4096
TICK_MS = 50

SECURITY_TABLES = f"""
[security]
cluster_secret_file = "../cluster.secret"
admin_token = "{ADMIN_TOKEN}"

[limits]
max_connections = {MAX_CONNECTIONS}
max_api_connections = {MAX_API_CONNECTIONS}
max_body_bytes = {MAX_BODY}

[faults]
enabled = true
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local.Cluster]:
    base = tmp_path_factory.mktemp("secure") / "cluster"
    cluster = local.plan(base, voters=3, tick_ms=TICK_MS)
    base.mkdir(parents=True)
    local.write_files(cluster)
    (base / "cluster.secret").write_bytes(SECRET + b"\n")
    for node in cluster.nodes.values():
        node.config.write_text(node.config.read_text() + SECURITY_TABLES)
    try:
        for node_id in cluster.nodes:
            local.start_node(cluster, node_id)
        local.wait_for_leader(cluster, 60, among=list(cluster.nodes))
        yield cluster
    finally:
        local.down(cluster, grace=5.0)
        for node in cluster.nodes.values():
            print(local.log_tail(node, lines=10))


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("http://").rpartition(":")
    return host, int(port)


def metric(node: local.NodeInfo, name: str, **labels: str) -> float:
    """One sample of the node's /metrics (0 when absent)."""
    with urllib.request.urlopen(node.api + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                     if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def wait_metric_above(node: local.NodeInfo, before: float, name: str, **labels: str) -> float:
    def above() -> float | None:
        value = metric(node, name, **labels)
        return value if value > before else None
    return wait_for(above, 10, f"{name}{labels} above {before}")


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the other side closes ``sock`` within ``timeout`` (reading discards data)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_the_cluster_runs_with_its_secret(cluster: local.Cluster) -> None:
    """Authenticated frames and datagrams pass: a leader, a write, a full gossip view."""
    with Client(cluster.endpoints, timeout=2, deadline=20) as client:
        client.put("secured", "yes")
        assert client.get("secured").value == "yes"
    node = cluster.nodes["n1"]

    def alive_members() -> set[str]:
        with urllib.request.urlopen(node.api + "/v1/members", timeout=5) as response:
            return {m["id"] for m in json.load(response) if m["state"] == "alive"}

    wait_for(lambda: alive_members() == set(cluster.nodes), 20, "every member alive")


@pytest.mark.parametrize("data, reason", [
    (encode_frame(Hello("intruder", "bwraft-local")), "missing_mac"),
    (encode_frame(Hello("intruder", "bwraft-local"), b"not-the-cluster-secret"), "bad_mac"),
], ids=["no-mac", "wrong-secret"])
def test_an_unauthenticated_frame_is_rejected_and_counted(cluster: local.Cluster, data: bytes,
                                                          reason: str) -> None:
    node = cluster.nodes["n2"]
    name = "bwraft_transport_rejected_frames_total"
    before = metric(node, name, reason=reason)
    with socket.create_connection(host_port(node.raft), timeout=5) as sock:
        sock.sendall(data)
        assert closed_by_peer(sock)
    wait_metric_above(node, before, name, reason=reason)


def test_an_oversized_frame_is_refused_from_its_length_alone(cluster: local.Cluster) -> None:
    """A length above max_frame_bytes closes the connection before any body is buffered."""
    node = cluster.nodes["n3"]
    name = "bwraft_transport_rejected_frames_total"
    before = metric(node, name, reason="oversize")
    with socket.create_connection(host_port(node.raft), timeout=5) as sock:
        sock.sendall((2**31).to_bytes(4, "big"))
        assert closed_by_peer(sock)
    wait_metric_above(node, before, name, reason="oversize")


@pytest.mark.parametrize("data, reason", [
    (WireCodec(None, 1400).seal(encode_message(Ping(1, "n1", "intruder"))), "auth"),
    (WireCodec(b"not-the-cluster-secret", 1400).seal(encode_message(Ping(1, "n1", "x"))),
     "auth"),
    (b"\x81" + b"\x00" * 2000, "oversized"),
], ids=["no-mac", "wrong-secret", "oversized"])
def test_a_bad_datagram_is_dropped_and_counted(cluster: local.Cluster, data: bytes,
                                               reason: str) -> None:
    node = cluster.nodes["n1"]
    name = "bwraft_gossip_dropped_datagrams_total"
    before = metric(node, name, reason=reason)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(data, host_port(node.gossip))
    wait_metric_above(node, before, name, reason=reason)


def test_connections_above_the_limit_are_closed_and_counted(cluster: local.Cluster) -> None:
    """With max_connections open, further peer connections are closed on arrival."""
    node = cluster.nodes["n1"]
    name = "bwraft_transport_rejected_frames_total"
    before = metric(node, name, reason="too_many_connections")
    sockets = [socket.create_connection(host_port(node.raft), timeout=5)
               for _ in range(MAX_CONNECTIONS + 2)]
    try:
        wait_metric_above(node, before, name, reason="too_many_connections")
        assert closed_by_peer(sockets[-1])
    finally:
        for sock in sockets:
            sock.close()
    with Client([node.api], timeout=2, deadline=20) as client:
        client.put("after-flood", "ok")  # the node still serves


def test_api_connections_above_the_limit_are_closed_and_counted(cluster: local.Cluster) -> None:
    """Idle HTTP connections cannot pile up: past the limit they are closed on arrival."""
    node = cluster.nodes["n2"]
    name = "bwraft_api_refused_connections_total"
    before = metric(node, name)
    sockets = [socket.create_connection(host_port(node.api), timeout=5)
               for _ in range(MAX_API_CONNECTIONS + 4)]
    try:
        assert closed_by_peer(sockets[-1])
        assert not closed_by_peer(sockets[0], timeout=0.5)  # those within the limit stay
    finally:
        for sock in sockets:
            sock.close()
    assert wait_metric_above(node, before, name) >= before + 1
    with Client([node.api], timeout=2, deadline=20) as client:
        client.put("after-api-flood", "ok")  # closed connections make room again


def test_the_api_site_counts_its_connections() -> None:
    """The limit counts open connections: a closed one makes room for the next."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource

    from bwcore.api import ApiSite

    refused: list[int] = []
    # Its own clock: the channels' idle timers must not be left on the global reactor.
    site = ApiSite(Resource(), max_connections=2, reactor=Clock(),
                   on_refused=lambda: refused.append(1))
    address = IPv4Address("TCP", "127.0.0.1", 5000)
    first, second = site.buildProtocol(address), site.buildProtocol(address)
    for channel in (first, second):
        channel.makeConnection(StringTransport())
    assert site.buildProtocol(address) is None and refused == [1]
    first.connectionLost(None)
    third = site.buildProtocol(address)
    assert third is not None and site.open_connections == 2


def test_a_body_over_the_limit_is_refused_with_413(cluster: local.Cluster) -> None:
    host, port = host_port(cluster.nodes["n1"].api)
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        body = json.dumps({"value": "x" * (MAX_BODY + 10)}).encode()
        connection.request("PUT", "/v1/kv/big", body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 413
        assert "limit" in json.loads(response.read())["error"]
    finally:
        connection.close()


def admin_request(node: local.NodeInfo, token: str | None) -> tuple[int, dict]:
    host, port = host_port(node.api)
    connection = http.client.HTTPConnection(host, port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request("POST", "/v1/admin/faults", body=b'{"partition": ["n2"]}',
                           headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_fault_route_needs_the_admin_token(cluster: local.Cluster) -> None:
    """Without the token nobody can partition a node, even with fault injection enabled.

    (The rejections above also show the secret is wired from the config file: without it a
    frame lacking a MAC would be accepted, and a datagram lacking one processed.)
    """
    node = cluster.nodes["n3"]
    for token in (None, "guess"):
        status, answer = admin_request(node, token)
        assert status == 401 and "error" in answer
    status, answer = admin_request(node, ADMIN_TOKEN)
    assert status == 200 and answer["partition"] == ["n2"]
    host, port = host_port(node.api)
    connection = http.client.HTTPConnection(host, port, timeout=5)
    connection.request("DELETE", "/v1/admin/faults",
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert json.loads(connection.getresponse().read())["partition"] == []
    connection.close()

