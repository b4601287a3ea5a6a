"""Wire format of SWIM gossip: member records, messages, and their datagram encoding.

A datagram is::

    header (1 byte) | MAC (32 bytes, only when authenticated) | body

The header's high bit says whether the datagram is authenticated; its low seven bits are the
wire version. The MAC is HMAC-SHA256 over header and body, keyed with the cluster secret. The
body is a sequence of msgpack arrays: first the primary message (ping, ack, ping-req, nack or
push-pull), then zero or more membership updates (alive, suspect, dead, left). Updates ride on
every message, as SWIM's infection-style dissemination piggybacks them on the failure
detector's own traffic (SWIM paper §4.1); a push-pull carries a sender's state as updates too.

Decoding never trusts the sender: every field is type- and range-checked, sizes are bounded,
and any failure raises :class:`DatagramRejected` with a short reason that the caller counts.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Union

import msgpack

__all__ = [
    "Ack", "Alive", "Datagram", "DatagramRejected", "Dead", "Left", "Member", "MemberState",
    "Message", "Nack", "Ping", "PingReq", "PushPull", "Suspect", "Update", "WIRE_VERSION",
    "WireCodec", "encode_message", "encode_update", "format_addr", "parse_addr",
]

#: Version of this wire format; a datagram of another version is dropped as ``"version"``.
WIRE_VERSION = 1
_AUTH_FLAG = 0x80
_MAC_LEN = 32

MAX_ID_LEN = 128
MAX_LABEL_LEN = 64          # role, datacenter, tag keys
MAX_ADDR_LEN = 300
MAX_TAGS = 16
MAX_TAG_VALUE_LEN = 256
MAX_UPDATES = 512           # per datagram, far above what fits in one
_MAX_SEQ = 2**32 - 1
_MAX_INCARNATION = 2**63 - 1

# Reasons a datagram is dropped (label values of bwraft_gossip_dropped_datagrams_total).
REASON_OVERSIZED = "oversized"
REASON_AUTH = "auth"
REASON_VERSION = "version"
REASON_MALFORMED = "malformed"
REASON_UNKNOWN = "unknown"


class MemberState(enum.StrEnum):
    """What a member's gossip view says about another member (SWIM §4.2, §4.3)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True)
class Member:
    """One gossip member as seen in a view.

    Attributes:
        id: The node id (unique in the cluster).
        role: ``voter``, ``secretary``, ``observer`` or a third-party role name.
        datacenter: The datacenter name, used by the leader to group followers.
        raft_addr: ``host:port`` of the peer transport ("" if none).
        api_addr: ``host:port`` of the HTTP API ("" if none).
        gossip_addr: ``host:port`` of the gossip UDP socket; must be an IP address.
        incarnation: Only the member itself raises it, to refute suspicion (SWIM §4.2).
        state: Alive, suspect, dead or left.
        tags: A few small string pairs a plugin wants every member to know.
    """

    id: str
    role: str
    datacenter: str
    raft_addr: str
    api_addr: str
    gossip_addr: str
    incarnation: int = 0
    state: MemberState = MemberState.ALIVE
    tags: dict[str, str] = field(default_factory=dict, hash=False)

    def same_metadata(self, other: Member) -> bool:
        """Whether role, datacenter, addresses and tags are equal (id and state aside)."""
        return (self.role, self.datacenter, self.raft_addr, self.api_addr, self.gossip_addr,
                self.tags) == (other.role, other.datacenter, other.raft_addr, other.api_addr,
                               other.gossip_addr, other.tags)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form served by ``GET /v1/members``."""
        return {"id": self.id, "role": self.role, "datacenter": self.datacenter,
                "raft_addr": self.raft_addr, "api_addr": self.api_addr,
                "gossip_addr": self.gossip_addr, "incarnation": self.incarnation,
                "state": str(self.state), "tags": dict(self.tags)}

    def validate(self) -> None:
        """Raise ValueError unless every field is within the wire limits."""
        # The common case in one expression (every received alive record passes here); the
        # field-by-field checks below run only to name what is wrong.
        tags = self.tags
        if (type(self.id) is str and 0 < len(self.id) <= MAX_ID_LEN
                and type(self.role) is str and 0 < len(self.role) <= MAX_LABEL_LEN
                and type(self.datacenter) is str and len(self.datacenter) <= MAX_LABEL_LEN
                and type(self.incarnation) is int
                and 0 <= self.incarnation <= _MAX_INCARNATION
                and _addr_ok(self.raft_addr, True) and _addr_ok(self.api_addr, True)
                and _addr_ok(self.gossip_addr, False)
                and type(tags) is dict and len(tags) <= MAX_TAGS
                and all(type(k) is str and 0 < len(k) <= MAX_LABEL_LEN and type(v) is str
                        and len(v) <= MAX_TAG_VALUE_LEN for k, v in tags.items())):
            return
        _check_str(self.id, "id", MAX_ID_LEN, allow_empty=False)
        _check_str(self.role, "role", MAX_LABEL_LEN, allow_empty=False)
        _check_str(self.datacenter, "datacenter", MAX_LABEL_LEN)
        for name in ("raft_addr", "api_addr"):
            value = getattr(self, name)
            _check_str(value, name, MAX_ADDR_LEN)
            if value:
                parse_addr(value)
        _check_str(self.gossip_addr, "gossip_addr", MAX_ADDR_LEN, allow_empty=False)
        parse_addr(self.gossip_addr)
        _check_int(self.incarnation, "incarnation", _MAX_INCARNATION)
        if not isinstance(self.tags, dict) or len(self.tags) > MAX_TAGS:
            raise ValueError(f"tags must be a dict of at most {MAX_TAGS} entries")
        for key, value in self.tags.items():
            _check_str(key, "tag key", MAX_LABEL_LEN, allow_empty=False)
            _check_str(value, f"tag {key!r}", MAX_TAG_VALUE_LEN)


# --- messages ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ping:
    """Direct probe of ``target`` (SWIM §3.1). ``target`` lets a reused address be noticed."""

    seq: int
    target: str
    source: str


@dataclass(frozen=True)
class Ack:
    """Answer to a ping; ``source`` is the member that was probed, even when relayed."""

    seq: int
    source: str


@dataclass(frozen=True)
class PingReq:
    """Ask the receiver to probe ``target`` on the sender's behalf (SWIM §3.1, indirect probe).

    With ``nack`` set the receiver answers with a :class:`Nack` when the target stays silent
    (Lifeguard §IV-A: the requester learns that its own messages get through).
    """

    seq: int
    target: str
    target_addr: str
    source: str
    nack: bool


@dataclass(frozen=True)
class Nack:
    """A relay could not reach the target of a ping-req in time (Lifeguard)."""

    seq: int
    source: str


@dataclass(frozen=True)
class PushPull:
    """Anti-entropy: the updates of this datagram are (part of) the sender's state.

    ``want_reply`` asks the receiver to answer with its own state.
    """

    source: str
    want_reply: bool


Message = Union[Ping, Ack, PingReq, Nack, PushPull]


# --- updates -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alive:
    """``member`` is alive at ``member.incarnation`` (carries all its metadata)."""

    member: Member


@dataclass(frozen=True)
class Suspect:
    """``source`` suspects member ``id`` at ``incarnation`` (SWIM §4.2)."""

    id: str
    incarnation: int
    source: str


@dataclass(frozen=True)
class Dead:
    """``source`` declared member ``id`` dead at ``incarnation`` (SWIM §4.2 "confirm")."""

    id: str
    incarnation: int
    source: str


@dataclass(frozen=True)
class Left:
    """Member ``id`` left gracefully at ``incarnation``."""

    id: str
    incarnation: int


Update = Union[Alive, Suspect, Dead, Left]


@dataclass(frozen=True)
class Datagram:
    """A decoded datagram: its primary message and the updates that rode along."""

    message: Message
    updates: tuple[Update, ...]


class DatagramRejected(Exception):
    """A datagram failed a check; ``reason`` is one of the ``REASON_*`` labels."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Type(enum.IntEnum):
    PING = 1
    ACK = 2
    PING_REQ = 3
    NACK = 4
    PUSH_PULL = 5
    ALIVE = 16
    SUSPECT = 17
    DEAD = 18
    LEFT = 19


_KNOWN_TYPES = frozenset(int(t) for t in _Type)


# --- addresses -----------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def parse_addr(text: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port`` (``[v6addr]:port`` for IPv6) into a ``(host, port)`` tuple.

    Raises:
        ValueError: The text is not an address.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"{text!r} is not a host:port address")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address as [addr]:port")
    port = int(port_text)
    if not host or port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"{text!r} is not a usable address")
    return host, port


def _addr_ok(value: Any, allow_empty: bool) -> bool:
    if type(value) is not str or len(value) > MAX_ADDR_LEN:
        return False
    if not value:
        return allow_empty
    try:
        parse_addr(value)
    except ValueError:
        return False
    return True


def format_addr(host: str, port: int) -> str:
    """The inverse of :func:`parse_addr`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- encoding ------------------------------------------------------------------------------

def _pack(items: list[Any]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def encode_message(message: Message) -> bytes:
    """The msgpack encoding of a primary message."""
    match message:
        case Ping(seq, target, source):
            return _pack([_Type.PING, seq, target, source])
        case Ack(seq, source):
            return _pack([_Type.ACK, seq, source])
        case PingReq(seq, target, target_addr, source, nack):
            return _pack([_Type.PING_REQ, seq, target, target_addr, source, nack])
        case Nack(seq, source):
            return _pack([_Type.NACK, seq, source])
        case PushPull(source, want_reply):
            return _pack([_Type.PUSH_PULL, source, want_reply])
    raise TypeError(f"not a gossip message: {message!r}")


def encode_update(update: Update) -> bytes:
    """The msgpack encoding of one membership update (sized for piggybacking)."""
    match update:
        case Alive(m):
            return _pack([_Type.ALIVE, m.id, m.incarnation, m.role, m.datacenter, m.raft_addr,
                          m.api_addr, m.gossip_addr, m.tags])
        case Suspect(member_id, incarnation, source):
            return _pack([_Type.SUSPECT, member_id, incarnation, source])
        case Dead(member_id, incarnation, source):
            return _pack([_Type.DEAD, member_id, incarnation, source])
        case Left(member_id, incarnation):
            return _pack([_Type.LEFT, member_id, incarnation])
    raise TypeError(f"not a gossip update: {update!r}")


class WireCodec:
    """Seals and opens datagrams: header, optional HMAC, size bound, strict decoding.

    Args:
        secret: The cluster secret; when set, every datagram sent carries an HMAC-SHA256 and
            every datagram received must carry a valid one.
        max_datagram: The largest datagram sent or accepted, in bytes.
    """

    def __init__(self, secret: bytes | None, max_datagram: int) -> None:
        if secret is not None and not secret:
            raise ValueError("an empty cluster secret protects nothing; pass None")
        self._secret = secret
        self.max_datagram = max_datagram
        #: Bytes a datagram spends before its body.
        self.overhead = 1 + (_MAC_LEN if secret else 0)

    def seal(self, body: bytes) -> bytes:
        """Header (and MAC) + ``body``. The caller keeps the result under ``max_datagram``."""
        if self._secret is None:
            return bytes([WIRE_VERSION]) + body
        header = bytes([WIRE_VERSION | _AUTH_FLAG])
        mac = hmac.new(self._secret, header + body, hashlib.sha256).digest()
        return header + mac + body

    def open(self, data: bytes) -> Datagram:
        """Check and decode a received datagram.

        Raises:
            DatagramRejected: For any datagram that is too large, unauthenticated, of another
                version, malformed or of an unknown type.
        """
        if len(data) > self.max_datagram:
            raise DatagramRejected(REASON_OVERSIZED, f"{len(data)} bytes")
        if not data:
            raise DatagramRejected(REASON_MALFORMED, "empty datagram")
        header = data[0]
        authenticated = bool(header & _AUTH_FLAG)
        if header & ~_AUTH_FLAG != WIRE_VERSION:
            raise DatagramRejected(REASON_VERSION, f"wire version {header & ~_AUTH_FLAG}")
        if self._secret is None:
            if authenticated:
                raise DatagramRejected(REASON_AUTH, "authenticated datagram, no secret set")
            body = data[1:]
        else:
            if not authenticated:
                raise DatagramRejected(REASON_AUTH, "datagram without MAC")
            mac, body = data[1:1 + _MAC_LEN], data[1 + _MAC_LEN:]
            expected = hmac.new(self._secret, data[:1] + body, hashlib.sha256).digest()
            if len(mac) != _MAC_LEN or not hmac.compare_digest(mac, expected):
                raise DatagramRejected(REASON_AUTH, "bad MAC")
        return decode_body(body)


def decode_body(body: bytes) -> Datagram:
    """Decode the msgpack body of a datagram (see the module docstring).

    Raises:
        DatagramRejected: Malformed or unknown content.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(body), 1),
                                strict_map_key=True, use_list=True)
    try:
        unpacker.feed(body)
        objects = []
        for obj in unpacker:
            objects.append(obj)
            if len(objects) > MAX_UPDATES + 1:
                raise DatagramRejected(REASON_MALFORMED, "too many updates")
        complete = unpacker.tell() == len(body)
    except DatagramRejected:
        raise
    except Exception as exc:  # msgpack raises many types (ValueError, UnicodeError, ...)
        raise DatagramRejected(REASON_MALFORMED, f"msgpack: {exc!r}"[:200]) from None
    if not complete:
        raise DatagramRejected(REASON_MALFORMED, "truncated body")
    if not objects:
        raise DatagramRejected(REASON_MALFORMED, "no message")
    try:
        message = _decode_message(objects[0])
        updates = tuple(_decode_update(obj) for obj in objects[1:])
    except (ValueError, TypeError) as exc:
        raise DatagramRejected(REASON_MALFORMED, str(exc)[:200]) from None
    return Datagram(message, updates)


def _type_of(obj: Any) -> int:
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
        raise ValueError("an item is not a typed array")
    return obj[0]


def _fields(obj: list[Any], count: int, name: str) -> list[Any]:
    if len(obj) != count + 1:
        raise ValueError(f"{name} has {len(obj) - 1} fields, not {count}")
    return obj[1:]


def _decode_message(obj: Any) -> Message:
    kind = _type_of(obj)
    if kind == _Type.PING:
        seq, target, source = _fields(obj, 3, "ping")
        return Ping(_seq(seq), _id(target), _id(source))
    if kind == _Type.ACK:
        seq, source = _fields(obj, 2, "ack")
        return Ack(_seq(seq), _id(source))
    if kind == _Type.PING_REQ:
        seq, target, target_addr, source, nack = _fields(obj, 5, "ping-req")
        _check_str(target_addr, "target_addr", MAX_ADDR_LEN, allow_empty=False)
        parse_addr(target_addr)
        return PingReq(_seq(seq), _id(target), target_addr, _id(source), _bool(nack))
    if kind == _Type.NACK:
        seq, source = _fields(obj, 2, "nack")
        return Nack(_seq(seq), _id(source))
    if kind == _Type.PUSH_PULL:
        source, want_reply = _fields(obj, 2, "push-pull")
        return PushPull(_id(source), _bool(want_reply))
    if kind in _KNOWN_TYPES:
        raise ValueError(f"an update ({kind}) where a message belongs")
    raise DatagramRejected(REASON_UNKNOWN, f"message type {kind}")


def _decode_update(obj: Any) -> Update:
    kind = _type_of(obj)
    if kind == _Type.ALIVE:
        member_id, inc, role, dc, raft, api, gossip, tags = _fields(obj, 8, "alive")
        member = Member(id=member_id, role=role, datacenter=dc, raft_addr=raft, api_addr=api,
                        gossip_addr=gossip, incarnation=inc, tags=tags)
        member.validate()
        return Alive(member)
    if kind == _Type.SUSPECT:
        member_id, inc, source = _fields(obj, 3, "suspect")
        return Suspect(_id(member_id), _incarnation(inc), _id(source))
    if kind == _Type.DEAD:
        member_id, inc, source = _fields(obj, 3, "dead")
        return Dead(_id(member_id), _incarnation(inc), _id(source))
    if kind == _Type.LEFT:
        member_id, inc = _fields(obj, 2, "left")
        return Left(_id(member_id), _incarnation(inc))
    if kind in _KNOWN_TYPES:
        raise ValueError(f"a message ({kind}) where an update belongs")
    raise DatagramRejected(REASON_UNKNOWN, f"update type {kind}")


# --- field checks --------------------------------------------------------------------------

def _check_str(value: Any, name: str, max_len: int, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if len(value) > max_len or (not value and not allow_empty):
        raise ValueError(f"{name} must be {'' if allow_empty else '1-'}{max_len} characters")


def _check_int(value: Any, name: str, maximum: int) -> None:
    if type(value) is not int or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in 0..{maximum}")


def _id(value: Any) -> str:
    _check_str(value, "member id", MAX_ID_LEN, allow_empty=False)
    return value


def _seq(value: Any) -> int:
    _check_int(value, "seq", _MAX_SEQ)
    return value


def _incarnation(value: Any) -> int:
    _check_int(value, "incarnation", _MAX_INCARNATION)
    return value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("flag must be a boolean")
    return value
