"""What every admin route of the HTTP API shares: the token check, JSON bodies, leader hints.

Admin routes (``/v1/admin/...``) change the cluster itself: leadership, voter membership. When
the node's config sets ``security.admin_token``, each admin request must carry it as
``Authorization: Bearer <token>`` or is answered 401 without being looked at further. A plugin
adds an admin route by returning a subclass of :class:`AdminResource` from
``bwraft_http_resources`` (``{"v1/admin/transfer-leader": TransferResource(node)}``) and
implementing :meth:`AdminResource.respond`; the check runs before it, once, here.

Admin operations go through the leader. A node that is not the leader answers 307 with the
leader's URL in ``Location`` (the Python client and the CLI follow it, sending the token
again); it never forwards an admin request itself, so the token only travels to the node the
client chose to trust with it.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from bwcore.api import ApiError, Reply, _serve, json_reply
from bwcore.errors import NotLeader

__all__ = ["AdminResource", "FaultsEndpoint", "check_admin_token", "leader_redirect"]

AUTH_HEADER = b"Authorization"
BEARER = b"Bearer "
#: Admin bodies are small JSON objects; a larger one is a mistake or an attack.
MAX_ADMIN_BODY_BYTES = 64 * 1024


def check_admin_token(request: Request, token: str) -> None:
    """Refuse ``request`` unless it carries ``token`` as a bearer token (no token: allow all).

    Raises:
        ApiError: 401, with ``WWW-Authenticate: Bearer``, when the token is missing or wrong.
    """
    if not token:
        return
    header = request.getHeader(AUTH_HEADER)
    given = header.encode("utf-8", "replace") if isinstance(header, str) else header
    challenge = {b"WWW-Authenticate": b'Bearer realm="bwraft-admin"'}
    if not given or not given.startswith(BEARER):
        raise ApiError(401, "admin token required (Authorization: Bearer <token>)", challenge)
    # Constant-time comparison: the answer time must not tell how much of a guess was right.
    if not hmac.compare_digest(given[len(BEARER):].strip(), token.encode("utf-8")):
        raise ApiError(401, "wrong admin token", challenge)


def leader_redirect(request: Request, exc: NotLeader) -> Reply:
    """Answer 307 to the leader's API (same path), or 503 when no leader is known."""
    if not exc.leader_api:
        raise ApiError(503, "no leader known, retry")
    location = exc.leader_api.rstrip("/").encode("utf-8") + request.uri
    return json_reply(307, {"error": "not the leader", "leader": exc.leader_id,
                            "leader_api": exc.leader_api}, {b"Location": location})


class AdminResource(Resource):
    """Base of an admin route: token check, then :meth:`respond` for the allowed methods.

    Subclasses set ``allowed`` (HTTP methods) and implement :meth:`respond`. The remaining
    path segments are in ``request.postpath`` (``/v1/admin/members/n4/promote`` mounted at
    ``v1/admin/members`` gives ``[b"n4", b"promote"]``). ``NotLeader`` raised from
    ``respond`` becomes a 307 to the leader.

    Args:
        node: The node (``config.security.admin_token`` is read from it on every request).
    """

    isLeaf = True
    allowed: tuple[bytes, ...] = (b"POST",)

    def __init__(self, node: Any) -> None:
        super().__init__()
        self.node = node

    def render(self, request: Request) -> object:
        return _serve(request, self._handle)

    async def _handle(self, request: Request) -> Reply:
        security = getattr(getattr(self.node, "config", None), "security", None)
        check_admin_token(request, getattr(security, "admin_token", "") or "")
        if request.method not in self.allowed:
            raise ApiError(405, f"method {request.method.decode('ascii', 'replace')} not"
                                f" allowed", {b"Allow": b", ".join(self.allowed)})
        try:
            return await self.respond(request, [p.decode("utf-8", "replace")
                                                for p in request.postpath if p])
        except NotLeader as exc:
            return leader_redirect(request, exc)

    async def respond(self, request: Request, path: list[str]) -> Reply:
        """Answer an authorised request; ``path`` is the rest of the URL path, decoded.
        Admin routes override this; the base answers that there is no such route."""
        raise ApiError(404, f"no such admin route: /{'/'.join(path)}")

    @staticmethod
    def read_json(request: Request, allowed: set[str], required: set[str] = frozenset()
                  ) -> dict[str, Any]:
        """The body as a JSON object with only ``allowed`` fields (an empty body is ``{}``).

        Raises:
            ApiError: 400 for a body that is not such an object, 413 for one too large.
        """
        content = request.content
        raw = b""
        if content is not None:
            content.seek(0)
            raw = content.read(MAX_ADMIN_BODY_BYTES + 1)
        if len(raw) > MAX_ADMIN_BODY_BYTES:
            raise ApiError(413, f"admin request body exceeds {MAX_ADMIN_BODY_BYTES} bytes")
        body: Any = {}
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise ApiError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
        missing = sorted(set(required) - set(body))
        if missing:
            raise ApiError(400, f"missing field(s): {', '.join(missing)}")
        return body


class FaultsEndpoint(AdminResource):
    """``/v1/admin/faults``: the fault-injection partition of this node (:mod:`bwcore.faults`).

    ``GET`` shows it, ``POST {"partition": [ids], "gossip_addresses"?: [...]}`` replaces it,
    ``DELETE`` heals. Answers 404 unless the node's config enables fault injection. Unlike the
    other admin routes it acts on the node it is sent to, never on the leader.

    Args:
        api: The :class:`bwcore.api.ApiResource` it is mounted on (its ``node`` is used).
    """

    allowed = (b"GET", b"POST", b"DELETE")

    def __init__(self, api: Any) -> None:
        super().__init__(getattr(api, "node", api))

    async def respond(self, request: Request, path: list[str]) -> Reply:
        from bwcore.faults import FaultsRequestError, parse_faults_request

        injector = getattr(self.node, "faults", None)
        if injector is None or path:
            raise ApiError(404, "fault injection is not enabled on this node"
                           if injector is None else f"no such route: {request.path!r}")
        if request.method == b"POST":
            try:
                peers, addresses = parse_faults_request(
                    self.read_json(request, {"partition", "gossip_addresses"}))
            except FaultsRequestError as exc:
                raise ApiError(400, str(exc)) from None
            injector.partition(peers, addresses)
        elif request.method == b"DELETE":
            injector.heal()
        return json_reply(200, injector.status())
