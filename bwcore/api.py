"""The client-facing HTTP/JSON API that every node serves (twisted.web).

Routes (the contract in ARCHITECTURE.md, "Client-facing contract")::

    PUT    /v1/kv/{key}        {"value": str, "request_id"?: str}          -> {"index"}
    GET    /v1/kv/{key}?consistency=linearizable|stale                    -> {"value", "index"}
    DELETE /v1/kv/{key}        optional {"request_id"?: str}              -> {"index", "deleted"}
    POST   /v1/kv/{key}/cas    {"expect": str|null, "value": str|null, "request_id"?: str}
                                                              -> {"ok", "value", "index"}
    GET    /v1/status          the node's status()
    GET    /v1/members         the gossip view (``node.members()``; ``[]`` without gossip)
    GET    /metrics            Prometheus text format of ``node.registry``
    GET|POST|DELETE /v1/admin/faults   injected partition (bwcore.admin; 404 unless enabled)

plus whatever plugins return from ``bwraft_http_resources``. Every error is JSON
``{"error": str}``: 400 bad input, 404 absent key or unknown route, 405 wrong method, 413 body too
large, 503 no leader / not ready / timed out.

A write that reaches a follower or a helper is forwarded to the leader's API with the same body
(so the same ``request_id``), and the leader's answer is passed back. If forwarding fails the
client gets 307 with ``Location`` set to the leader's URL. The client may always retry a write with
the same ``request_id``: the state machine applies each id once (Raft paper §8, "Client
interaction").
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from twisted.application import service, strports
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import IResource, Resource
from twisted.web.http import HTTPChannel
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from bwcore.errors import NotLeader, Unavailable

__all__ = [
    "ApiResource", "ApiService", "ApiSite", "FORWARDED_BY_HEADER", "make_api_service",
]

log = structlog.get_logger("bwcore.api")

#: Marks a request one node forwarded to the leader; a forwarded request is never forwarded
#: again (a stale leader hint must not bounce a request around the cluster).
FORWARDED_BY_HEADER = b"X-Bwraft-Forwarded-By"
#: Idle connections to the leader kept for forwarding writes (concurrent forwards reuse them).
FORWARD_POOL_SIZE = 128
MAX_KEY_BYTES = 1024
MAX_REQUEST_ID_CHARS = 256
CONSISTENCY_LEVELS = ("linearizable", "stale")
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_CONNECTIONS = 1024
JSON_TYPE = b"application/json"
# A client that sends a body over the limit gets 413 as soon as the headers are in; the rest of
# its body is read and dropped (never buffered) for at most this long, or this many bytes, so
# that it can finish sending and read the answer instead of seeing a connection reset.
LINGER_SECONDS = 5.0
MAX_DRAIN_BYTES = 256 << 20


class ApiError(Exception):
    """An answer other than 200, raised anywhere in a handler."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra

    def reply(self) -> Reply:
        return json_reply(self.status, {"error": self.message, **self.extra}, self.headers)


@dataclass
class Reply:
    """A complete HTTP answer: status, body bytes, content type and extra headers."""

    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: dict[bytes, bytes] = field(default_factory=dict)


def _json_default(value: Any) -> Any:
    """Make status and member values that json cannot encode (sets, dataclasses, enums) JSON."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "__dataclass_fields__"):
        return {name: getattr(value, name) for name in value.__dataclass_fields__}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def json_reply(status: int, obj: Any, headers: dict[bytes, bytes] | None = None) -> Reply:
    body = json.dumps(obj, default=_json_default, ensure_ascii=False).encode("utf-8") + b"\n"
    return Reply(status, body, JSON_TYPE, headers or {})


def _serve(request: Request, handler: Callable[[Request], Awaitable[Reply]]) -> object:
    """Run ``handler`` as a coroutine and write its reply unless the client has gone away."""
    connection_lost = False

    def on_lost(_reason: object) -> None:
        nonlocal connection_lost
        connection_lost = True

    request.notifyFinish().addErrback(on_lost)

    async def run() -> None:
        try:
            reply = await handler(request)
        except ApiError as exc:
            reply = exc.reply()
        except Exception:  # noqa: BLE001 - one bad request must never take the node down
            log.exception("api_handler_failed", method=request.method, uri=request.uri)
            reply = json_reply(500, {"error": "internal error"})
        if connection_lost:
            log.debug("api_client_gone", method=request.method, uri=request.uri)
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", reply.content_type)
        request.setHeader(b"Content-Length", str(len(reply.body)).encode("ascii"))
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        request.write(reply.body)
        request.finish()

    Deferred.fromCoroutine(run()).addErrback(
        lambda failure: log.error("api_reply_failed", uri=request.uri, error=str(failure.value)))
    return NOT_DONE_YET


class _Container(Resource):
    """An inner node of the route tree; unknown children answer a JSON 404."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound()

    def render(self, request: Request) -> object:
        return _NotFound().render(request)


class _Endpoint(Resource):
    """A leaf route whose answers come from an ``async`` method per HTTP method."""

    isLeaf = True
    allowed: tuple[bytes, ...] = (b"GET",)

    def __init__(self, api: ApiResource) -> None:
        super().__init__()
        self.api = api

    def render(self, request: Request) -> object:
        return _serve(request, self.handle)

    async def handle(self, request: Request) -> Reply:
        if request.postpath not in ([], [b""]):
            raise ApiError(404, f"no such route: {_path_text(request)}")
        method = b"GET" if request.method == b"HEAD" else request.method
        if method not in self.allowed:
            raise ApiError(405, f"method {request.method.decode('ascii', 'replace')} not allowed",
                           {b"Allow": b", ".join(self.allowed)})
        return await self.respond(request, method)

    async def respond(self, request: Request, method: bytes) -> Reply:
        """The answer to an allowed ``method``; routes that answer override this (or
        :meth:`handle`). A route with no answer of its own does not exist: 404."""
        raise ApiError(404, f"no such route: {_path_text(request)}")


class _NotFound(_Endpoint):
    def __init__(self) -> None:
        Resource.__init__(self)

    async def handle(self, request: Request) -> Reply:
        raise ApiError(404, f"no such route: {_path_text(request)}")


class _StatusEndpoint(_Endpoint):
    async def respond(self, request: Request, method: bytes) -> Reply:
        return json_reply(200, self.api.node.status())


class _MembersEndpoint(_Endpoint):
    async def respond(self, request: Request, method: bytes) -> Reply:
        members = getattr(self.api.node, "members", None)
        # Without the gossip service the node has no membership view yet: an empty list.
        return json_reply(200, list(members()) if callable(members) else [])


class _MetricsEndpoint(_Endpoint):
    async def respond(self, request: Request, method: bytes) -> Reply:
        text = generate_latest(self.api.node.registry)
        return Reply(200, text, CONTENT_TYPE_LATEST.encode("ascii"))


class _KeyValueEndpoint(_Endpoint):
    async def handle(self, request: Request) -> Reply:
        key, action = _parse_key_path(request.postpath)
        method = b"GET" if request.method == b"HEAD" else request.method
        if action == "cas":
            if method != b"POST":
                raise ApiError(405, "compare-and-set takes POST", {b"Allow": b"POST"})
            return await self.api.cas(request, key)
        if method == b"GET":
            return await self.api.read(request, key)
        if method == b"PUT":
            return await self.api.put(request, key)
        if method == b"DELETE":
            return await self.api.delete(request, key)
        raise ApiError(405, f"method {method.decode('ascii', 'replace')} not allowed",
                       {b"Allow": b"GET, PUT, DELETE"})


def _path_text(request: Request) -> str:
    return request.path.decode("utf-8", "replace")


def _parse_key_path(postpath: list[bytes]) -> tuple[str, str | None]:
    """Return (key, action) from the segments after /v1/kv/ (already percent-decoded)."""
    if not postpath:
        raise ApiError(400, "missing key: use /v1/kv/{key}")
    if len(postpath) == 2 and postpath[1] == b"cas":
        raw, action = postpath[0], "cas"
    elif len(postpath) == 1:
        raw, action = postpath[0], None
    else:
        raise ApiError(404, "no such route; a key containing '/' must be sent as %2F")
    if not raw:
        raise ApiError(400, "key must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise ApiError(400, f"key is {len(raw)} bytes; the limit is {MAX_KEY_BYTES}")
    try:
        return raw.decode("utf-8"), action
    except UnicodeDecodeError:
        raise ApiError(400, "key is not valid UTF-8") from None


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    """Parse the query string strictly: known names only, each at most once."""
    try:
        pairs = parse_qs(urlsplit(request.uri).query.decode("utf-8"), keep_blank_values=True,
                         strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "query string is not valid UTF-8") from None
    unknown = sorted(set(pairs) - allowed)
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")
    repeated = sorted(name for name, values in pairs.items() if len(values) > 1)
    if repeated:
        raise ApiError(400, f"query parameter(s) given more than once: {', '.join(repeated)}")
    return {name: values[0] for name, values in pairs.items()}


def _optional_str(body: dict, name: str, *, nullable: bool) -> str | None:
    value = body.get(name)
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        kind = "a string or null" if nullable else "a string"
        raise ApiError(400, f"'{name}' must be {kind}")
    return value


def _request_id(body: dict) -> str | None:
    if "request_id" not in body:
        return None
    request_id = body["request_id"]
    if not isinstance(request_id, str) or not request_id:
        raise ApiError(400, "'request_id' must be a non-empty string")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ApiError(400, f"'request_id' is longer than {MAX_REQUEST_ID_CHARS} characters")
    return request_id


@implementer(IBodyProducer)
class _BytesProducer:
    """The body of a forwarded request, written in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ApiResource(Resource):
    """The root of a node's HTTP API.

    Args:
        node: The node facade (``propose``, ``read_barrier``, ``status``, ``state_machine``,
            ``registry``, ``config``; optionally ``members`` and ``host.hook``).
        reactor: Time source for forwarding timeouts and the HTTP client's connections.
        agent: An ``IAgent`` used to forward writes to the leader; by default an ``Agent`` with
            a persistent connection pool, made on first use.
        request_timeout: Seconds a write or a linearizable read may wait for the Raft log. Kept
            below the Python client's default 5 s socket timeout, so that it gets a 503 and
            retries instead of timing out itself.
        forward: Forward writes (and reads a non-leader cannot serve) to the leader; when False,
            answer 307 at once.

    Raises:
        ValueError: A plugin's route collides with a core route or another plugin's route.
    """

    def __init__(self, node: Any, *, reactor: IReactorTime | None = None, agent: Any = None,
                 request_timeout: float = 4.0, forward: bool = True) -> None:
        super().__init__()
        self.node = node
        self.request_timeout = request_timeout
        self.forward_timeout = request_timeout + 0.5
        self.forward = forward
        self._reactor = reactor
        self._agent = agent
        self._pool: Any = None
        limits = getattr(getattr(node, "config", None), "limits", None)
        self.max_body_bytes = int(getattr(limits, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        v1 = _Container()
        self.putChild(b"v1", v1)
        v1.putChild(b"kv", _KeyValueEndpoint(self))
        v1.putChild(b"status", _StatusEndpoint(self))
        v1.putChild(b"members", _MembersEndpoint(self))
        self.putChild(b"metrics", _MetricsEndpoint(self))
        from bwcore.admin import FaultsEndpoint  # bwcore.admin builds on this module

        self.mount("v1/admin/faults", FaultsEndpoint(self))
        self._mount_plugin_resources()

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound()

    def render(self, request: Request) -> object:
        return _NotFound().render(request)

    # -- plugin routes ----------------------------------------------------------------------

    def _mount_plugin_resources(self) -> None:
        hook = getattr(getattr(self.node, "host", None), "hook", None)
        if hook is None or not hasattr(hook, "bwraft_http_resources"):
            return
        for routes in hook.bwraft_http_resources(node=self.node):
            for path, resource in (routes or {}).items():
                self.mount(path, resource)

    def mount(self, path: str, resource: IResource) -> None:
        """Serve ``resource`` at ``/path`` (``"a/b"`` nests), refusing to shadow a route."""
        segments = [part.encode("utf-8") for part in path.strip("/").split("/")]
        if not path.strip("/") or not all(segments):
            raise ValueError(f"invalid HTTP route {path!r}")
        parent: Resource = self
        for segment in segments[:-1]:
            child = parent.children.get(segment)
            if child is None:
                child = _Container()
                parent.putChild(segment, child)
            elif not isinstance(child, _Container):
                raise ValueError(f"HTTP route /{path} would nest under an existing route")
            parent = child
        if segments[-1] in parent.children:
            raise ValueError(f"HTTP route /{path} is already taken")
        parent.putChild(segments[-1], resource)

    # -- key-value operations ---------------------------------------------------------------

    def _read_json(self, request: Request, allowed: set[str], required: set[str]) -> tuple[
            dict, bytes]:
        """Return the body as a JSON object (and its bytes), validating its field names."""
        content = request.content
        if content is None:
            raw = b""
        else:
            content.seek(0)
            raw = content.read(self.max_body_bytes + 1)
        if len(raw) > self.max_body_bytes:
            raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
        if not raw.strip():
            if required:
                fields = ", ".join(sorted(required))
                raise ApiError(400, f"body must be a JSON object with {fields}")
            return {}, b""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
        missing = sorted(required - set(body))
        if missing:
            raise ApiError(400, f"missing field(s): {', '.join(missing)}")
        return body, raw

    async def put(self, request: Request, key: str) -> Reply:
        body, raw = self._read_json(request, {"value", "request_id"}, {"value"})
        value = _optional_str(body, "value", nullable=False)
        command = _encode("put", key, value=value, request_id=_request_id(body))
        return await self._write(request, command, raw)

    async def delete(self, request: Request, key: str) -> Reply:
        body, raw = self._read_json(request, {"request_id"}, set())
        command = _encode("delete", key, request_id=_request_id(body))
        return await self._write(request, command, raw)

    async def cas(self, request: Request, key: str) -> Reply:
        body, raw = self._read_json(request, {"expect", "value", "request_id"},
                                    {"expect", "value"})
        expect = _optional_str(body, "expect", nullable=True)
        value = _optional_str(body, "value", nullable=True)
        command = _encode("cas", key, value=value, expect=expect, expect_absent=expect is None,
                          request_id=_request_id(body))
        return await self._write(request, command, raw)

    async def _write(self, request: Request, command: bytes, raw_body: bytes) -> Reply:
        try:
            result = await self.node.propose(command, timeout=self.request_timeout)
        except NotLeader as exc:
            return await self._to_leader(request, raw_body, exc)
        except Unavailable as exc:
            raise ApiError(503, exc.reason) from None
        if isinstance(result, dict) and "error" in result:
            raise ApiError(400, str(result["error"]))
        return json_reply(200, result)

    async def read(self, request: Request, key: str) -> Reply:
        consistency = _query(request, {"consistency"}).get("consistency", "linearizable")
        if consistency not in CONSISTENCY_LEVELS:
            raise ApiError(400, f"consistency must be one of {', '.join(CONSISTENCY_LEVELS)}")
        # ReadIndex (Raft thesis §6.4): a linearizable read waits until this node has applied
        # everything committed when the read arrived, so the local read below is current. A
        # plugin (the observer role) may serve that wait, and may refuse a stale read too.
        read_ready = getattr(self.node, "read_ready", None)
        try:
            if read_ready is not None:
                await read_ready(consistency, timeout=self.request_timeout)
            elif consistency == "linearizable":
                await self.node.read_barrier(timeout=self.request_timeout)
        except NotLeader as exc:
            return await self._to_leader(request, b"", exc)
        except Unavailable as exc:
            raise ApiError(503, exc.reason) from None
        state_machine = self.node.state_machine
        value, index = state_machine.get(key), state_machine.applied_index
        if value is None:
            raise ApiError(404, "not found", index=index)
        return json_reply(200, {"value": value, "index": index})

    # -- forwarding to the leader -----------------------------------------------------------

    async def _to_leader(self, request: Request, raw_body: bytes, exc: NotLeader) -> Reply:
        if not exc.leader_api:
            raise ApiError(503, "no leader")
        location = exc.leader_api.rstrip("/").encode("utf-8") + request.uri
        redirect = json_reply(307, {"error": "not the leader", "leader": exc.leader_id,
                                    "leader_api": exc.leader_api}, {b"Location": location})
        if not self.forward or request.requestHeaders.hasHeader(FORWARDED_BY_HEADER):
            return redirect
        try:
            forwarded = Deferred.fromCoroutine(self._forward(request.method, location, raw_body))
            return await forwarded.addTimeout(self.forward_timeout, self.reactor)
        except Exception as error:  # noqa: BLE001 - any failure to forward means "go yourself"
            log.info("api_forward_failed", leader=exc.leader_id, url=location, error=repr(error))
            return redirect

    async def _forward(self, method: bytes, url: bytes, body: bytes) -> Reply:
        from twisted.web.client import readBody

        headers = Headers({b"Content-Type": [JSON_TYPE],
                           FORWARDED_BY_HEADER: [str(self.node.node_id).encode("utf-8")]})
        producer = _BytesProducer(body) if body else None
        response = await self.agent.request(method, url, headers, producer)
        data = await readBody(response)
        passed_headers = {}
        location = response.headers.getRawHeaders(b"Location")
        if location:
            passed_headers[b"Location"] = location[0]
        content_type = (response.headers.getRawHeaders(b"Content-Type") or [JSON_TYPE])[0]
        return Reply(response.code, data, content_type, passed_headers)

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor as global_reactor

            self._reactor = global_reactor
        return self._reactor

    @property
    def agent(self) -> Any:
        if self._agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            # Twisted keeps 2 idle connections per host by default: with more concurrent
            # writes than that, every forward beyond the second paid a TCP connect and close.
            self._pool.maxPersistentPerHost = FORWARD_POOL_SIZE
            self._agent = Agent(self.reactor, connectTimeout=self.forward_timeout, pool=self._pool)
        return self._agent

    def close(self) -> Deferred:
        """Close the forwarding agent's cached connections."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()


def _encode(op: str, key: str, **fields: Any) -> bytes:
    from bwraft_plugins.kv import encode_command

    try:
        return encode_command(op, key, **fields)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


class _BodyLimitedRequest(Request):
    """A request that answers 413 as soon as its body is known to exceed the site's limit.

    Twisted buffers a whole body before rendering; this request refuses to: a declared
    Content-Length over the limit is refused when the headers arrive, a chunked body when it
    crosses the limit. The rest of the body is drained without being stored.
    """

    _rejected = False
    _drained = 0
    _linger_call: Any = None

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body_bytes
        if length is not None and length > limit:
            self._reject(f"request body of {length} bytes exceeds the limit of {limit} bytes")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            self._drained += len(data)
            if self._drained > MAX_DRAIN_BYTES:
                self.channel.transport.abortConnection()
            return
        limit = self.channel.site.max_body_bytes
        if self.content.tell() + len(data) > limit:
            self._reject(f"request body exceeds the limit of {limit} bytes")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            # The whole body has been drained; closing now ends with FIN, not a reset.
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        super().connectionLost(reason)

    def _reject(self, message: str) -> None:
        from io import BytesIO

        self._rejected = True
        self.content = BytesIO()
        # The final answer is given: no "100 Continue" may follow it.
        self.requestHeaders.removeHeader(b"Expect")
        body = json.dumps({"error": message}).encode("utf-8") + b"\n"
        self.channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii")
            + b"\r\nConnection: close\r\n\r\n" + body)
        site = self.channel.site
        self._linger_call = site.reactor.callLater(site.linger_seconds,
                                                   self.channel.transport.abortConnection)
        log.info("api_body_too_large", message=message)


class _CountedChannel(HTTPChannel):
    """An HTTP connection that tells its site when it closes (see ApiSite.max_connections)."""

    def connectionLost(self, reason: Any) -> None:
        self.site.connection_closed()
        super().connectionLost(reason)


class ApiSite(Site):
    """The HTTP site of the API: bounded request bodies and connections, quiet logging.

    Args:
        max_connections: Connections open at once; a further one is closed as soon as it is
            accepted (and counted), so that many idle or trickling clients cannot exhaust the
            node's memory and file descriptors.
        on_refused: Called once per connection refused for being over ``max_connections``.
    """

    noisy = False
    protocol = _CountedChannel

    def __init__(self, resource: IResource, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 reactor: IReactorTime | None = None, linger_seconds: float = LINGER_SECONDS,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 on_refused: Callable[[], None] | None = None) -> None:
        super().__init__(resource, requestFactory=_BodyLimitedRequest, reactor=reactor,
                         parsePOSTFormSubmission=False)
        self.max_body_bytes = max_body_bytes
        self.linger_seconds = linger_seconds
        self.max_connections = max_connections
        self.open_connections = 0
        self._on_refused = on_refused

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted)
        if self.open_connections >= self.max_connections:
            log.warning("api_connection_refused", address=str(addr),
                        open_connections=self.open_connections)
            if self._on_refused is not None:
                self._on_refused()
            return None  # Twisted closes the accepted socket at once
        self.open_connections += 1
        return super().buildProtocol(addr)

    def connection_closed(self) -> None:
        self.open_connections = max(0, self.open_connections - 1)

    def log(self, request: Request) -> None:
        """Access lines are not logged: the structured events say what matters."""


class ApiService(service.MultiService):
    """The listening API; on stop it also closes the forwarding agent's connections."""

    def __init__(self, resource: ApiResource) -> None:
        super().__init__()
        self.resource = resource

    def stopService(self) -> Deferred:
        stopped = super().stopService()
        closed = self.resource.close()
        return stopped.addCallback(lambda _: closed)


def _host_port(address: Any) -> tuple[str, int]:
    """Accept ``"host:port"``, ``"[v6]:port"``, a (host, port) pair or an object with both."""
    if hasattr(address, "host") and hasattr(address, "port"):
        return str(address.host), int(address.port)
    if isinstance(address, (tuple, list)):
        return str(address[0]), int(address[1])
    host, _, port = str(address).rpartition(":")
    return host.strip("[]"), int(port)


def make_api_service(node: Any, *, reactor: IReactorTime | None = None) -> service.IService:
    """Build the service that serves the node's API on ``node.config.addresses.api``."""
    reactor = reactor or getattr(node, "reactor", None)
    resource = ApiResource(node, reactor=reactor)
    limits = getattr(node.config, "limits", None)
    refused = Counter("bwraft_api_refused_connections",
                      "HTTP connections closed on arrival: limits.max_api_connections were open",
                      registry=node.registry)
    site = ApiSite(resource, max_body_bytes=resource.max_body_bytes, reactor=reactor,
                   max_connections=int(getattr(limits, "max_api_connections",
                                               DEFAULT_MAX_CONNECTIONS)),
                   on_refused=refused.inc)
    host, port = _host_port(node.config.addresses.api)
    interface = host.replace(":", "\\:")
    api_service = ApiService(resource)
    strports.service(f"tcp:{port}:interface={interface}", site,
                     reactor=reactor).setServiceParent(api_service)
    return api_service
