"""Fuzzing the HTTP API: random methods, paths, query strings, headers and bodies.

Requests are well-formed HTTP/1.1 (Twisted's own parser answers malformed framing before any
of our code runs) sent to a real ``ApiSite`` over StringTransport, with the node facade of
tests/test_api.py (a real KV state machine) and fault injection on. Every answer but the
Prometheus text of ``/metrics`` must be JSON,
an error must be a 4xx or 503 with an ``"error"`` field, never a 500 (a handler that raised),
and the site must go on serving ordinary requests.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from bwcore.api import ApiResource
from bwcore.faults import FaultInjector
from tests.test_api import FakeNode, Http, Response

METHODS = ["GET"] * 3 + ["PUT"] * 3 + ["POST"] * 3 + ["DELETE"] * 2 + [
    "HEAD", "PATCH", "OPTIONS", "TRACE", "CONNECT", "BREW", "get"]
SEGMENTS = ["v1", "kv", "cas", "status", "members", "metrics", "admin", "faults", "x", "",
            "%2F", "%00", "%ff", "%C3%A9", "..", ".", "a" * 1100, "k%20y", "%", "%zz"]
QUERIES = ["", "?consistency=linearizable", "?consistency=stale", "?consistency=weird",
           "?consistency=stale&consistency=stale", "?x=1", "?%ff=1", "?consistency=%ff", "?&&="]
HEADER_NAMES = ["Content-Type", "Authorization", "Accept", "X-Bwraft-Forwarded-By", "Expect",
                "Transfer-Encoding", "X-Random", "Cookie"]

json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["value", "expect", "request_id", "partition", "gossip_addresses", "x"])
        | st.text(max_size=5), inner, max_size=4),
    max_leaves=12).map(lambda v: json.dumps(v).encode())
bodies = st.one_of(st.none(), st.binary(max_size=200), json_bodies, json_bodies,
                   st.sampled_from([b"[" * 1000, b'{"value": ' * 100, b"[" * 100000]))
#: Mostly real routes with random keys, sometimes random segments.
ROUTES = ["/v1/kv/{}", "/v1/kv/{}", "/v1/kv/{}/cas", "/v1/kv/{}/{}", "/v1/status",
          "/v1/members", "/metrics", "/v1/admin/faults", "/v1/admin/faults/{}", "/v1/kv/",
          "/v1/{}", "/{}"]
paths = st.one_of(
    st.tuples(st.sampled_from(ROUTES), st.lists(st.sampled_from(SEGMENTS), min_size=2,
                                                max_size=2)).map(lambda t: t[0].format(*t[1])),
    st.lists(st.sampled_from(SEGMENTS), max_size=5).map(lambda s: "/" + "/".join(s)))
headers = st.dictionaries(st.sampled_from(HEADER_NAMES),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                  max_size=40), max_size=3)


def site() -> tuple[FakeNode, Http]:
    node = FakeNode()
    node.faults = FaultInjector("n1")
    return node, Http(ApiResource(node))



@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(METHODS), paths, st.sampled_from(QUERIES), headers, bodies)
def test_random_requests_get_json_answers_and_the_site_keeps_serving(
        method: str, route: str, query: str, extra: dict[str, str],
        body: bytes | None) -> None:
    node, http = site()  # a site per example: its connections stay open (StringTransport)
    headers = {k: v for k, v in extra.items() if k != "Transfer-Encoding"}
    path = route + query
    _, transport = http.send(Http.build(method, path, body, headers))
    raw = transport.value()
    if raw:  # a 413 or an early close may come before any body; otherwise an answer
        answer = Response(raw)
        assert answer.status != 500, (method, path, answer.body)
        metrics = answer.status == 200 and route.split("?")[0] == "/metrics"
        if method != "HEAD" and not metrics:  # /metrics answers Prometheus text
            decoded = answer.json()
            if answer.status >= 400:
                assert 400 <= answer.status < 500 or answer.status == 503
                assert isinstance(decoded, dict) and isinstance(decoded.get("error"), str)
    node.faults.heal()  # a fuzzed request may have set a partition: that is allowed
    assert http.put("health", {"value": "ok"}).status == 200
    assert http.request("GET", "/v1/kv/health").json()["value"] == "ok"


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_on_the_api_port_never_raise(data: bytes) -> None:
    """Raw garbage on a connection gets at most an error answer or a close, never a crash."""
    _, http = site()
    http.send(data)
    assert http.request("GET", "/v1/status").status == 200
