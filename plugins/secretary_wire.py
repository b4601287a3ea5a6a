"""The secretary relay's frames: what travels between leader, secretary and followers.

Every frame is a :class:`bwcore.codec.PluginFrame` for the plugin ``"secretary"`` whose payload
is ``[kind, body]``: the :class:`Kind`, and the body packed with msgpack into one byte string
(so that the peer codec's check of plugin payloads looks at one value, not at every entry of a
batch). The bodies, shown with their kind in front:

- ``BATCH`` leader -> secretary: ``1: [seq, term, leader, runs, targets, addresses,
  report_after, settles]``. ``runs`` holds each distinct entry of the batch once, as
  ``[first_index, [[term, data, type], ...]]`` runs of consecutive indexes; ``targets`` holds
  one ``[type, to, log_term, index, count, commit, context]`` per kernel message, whose entries
  are ``index + 1 .. index + count``; ``addresses`` maps a follower id to its raft
  ``host:port`` (sent once per assignment); ``report_after`` (optional, 0: none) is how many
  of these followers' acknowledgements the leader needs to commit: report as soon as that many
  have answered; ``settles`` (optional, false) says that is all it needs: no other secretary
  shares the count, the secretary serves no observer, and every voter the count relies on
  answering directly is keeping up, so an acknowledgement of what that many followers have
  acknowledged already may wait for the next report. A secretary ignores any further fields
  (a later leader's additions).
- ``RELAY`` secretary -> follower: ``2: [term, leader, [[type, log_term, index, commit,
  context, [[term, data, type], ...]], ...]]``: the leader's messages to this follower.
- ``REPLY`` follower -> secretary: ``3: [term, leader, [[type, index, log_term, reject,
  reject_hint, context], ...]]``: its replies to the leader of ``term``.
- ``REPORT`` secretary -> leader: ``4: [term, ack_seq, [[from, type, index, log_term, reject,
  reject_hint, context], ...], unreachable]``: the replies collected, and the highest batch
  ``seq`` the secretary has handled.
- ``DIRECT`` leader -> follower: ``5: [term]``: "send your replies of ``term`` to me directly".

Only APPEND and HEARTBEAT travel in BATCH and RELAY frames, only APPEND_RESP and HEARTBEAT_RESP
in REPLY and REPORT frames; the leader's term and id are never rewritten on the way (BW-Raft:
followers run their unchanged handler on the leader's own message). Payloads come from the
network: every decoder checks every field and raises :class:`WireError`, and nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from bwcore.kernel import Entry, EntryType, Message, MessageType as MT

__all__ = [
    "PLUGIN", "Batch", "Kind", "Relay", "Replies", "Report", "WireError", "decode_batch",
    "decode_direct", "decode_relay", "decode_replies", "decode_report", "distinct_entries",
    "encode_batch",
    "encode_direct", "encode_relay", "encode_replies", "encode_report", "kind_of",
]

PLUGIN = "secretary"
#: What a secretary relays, and what comes back.
REQUESTS = frozenset({MT.APPEND, MT.HEARTBEAT})
RESPONSES = frozenset({MT.APPEND_RESP, MT.HEARTBEAT_RESP})
_MAX_ID = 64      # node ids are at most 64 characters (bwcore.config.NAME_PATTERN)
_MAX_INT = 2**63 - 1
_MAX_CONTEXT = 1024
_ENTRY_TYPES = {int(t): t for t in EntryType}
_TYPES = {int(t): t for t in MT}


class Kind(enum.IntEnum):
    BATCH = 1
    RELAY = 2
    REPLY = 3
    REPORT = 4
    DIRECT = 5


class WireError(ValueError):
    """A payload that is not a well-formed secretary frame."""


# -- field checks ---------------------------------------------------------------------------


def _int(value: Any, name: str) -> int:
    # ``type(...) is int``: msgpack booleans decode to bool, a subclass of int.
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise WireError(f"{name} must be a non-negative integer")
    return value


def _id(value: Any, name: str) -> str:
    if type(value) is not str or not 0 < len(value) <= _MAX_ID:
        raise WireError(f"{name} must be a node id")
    return value


def _list(value: Any, name: str, length: int | None = None) -> list[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        raise WireError(f"{name} must be an array" + (f" of {length}" if length else ""))
    return value


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{name} must be a boolean")
    return value


def _context(value: Any) -> bytes:
    if type(value) is not bytes or len(value) > _MAX_CONTEXT:
        raise WireError("context must be bytes")
    return value


def _type(value: Any, allowed: frozenset[MT]) -> MT:
    kind = _TYPES.get(value) if type(value) is int else None
    if kind not in allowed:
        raise WireError(f"message type {value!r} not allowed here")
    return kind


def _check_entries(raw: Any) -> list[list[Any]]:
    """Validate ``[[term, data, type], ...]`` in one flat loop (it runs for every entry)."""
    if type(raw) is not list:
        raise WireError("entries must be an array")
    for item in raw:
        if type(item) is not list or len(item) != 3:
            raise WireError("an entry must be an array of 3")
        term, data, etype = item
        if type(term) is not int or not 0 <= term <= _MAX_INT:
            raise WireError("entry term must be a non-negative integer")
        if type(data) is not bytes:
            raise WireError("entry data must be bytes")
        if type(etype) is not int or etype not in _ENTRY_TYPES:
            raise WireError(f"unknown entry type {etype!r}")
    return raw


def _entries(raw: list[list[Any]], first_index: int) -> tuple[Entry, ...]:
    """Checked wire entries -> Entry values with consecutive indexes from ``first_index``."""
    types = _ENTRY_TYPES
    return tuple(Entry(term, first_index + k, data, types[etype])
                 for k, (term, data, etype) in enumerate(raw))


def _wire_entries(entries: Iterable[Entry]) -> list[list[Any]]:
    return [[e.term, e.data, int(e.type)] for e in entries]


def kind_of(payload: Any) -> Kind:
    """The kind of a secretary payload.

    Raises:
        WireError: Not ``[kind, body]`` with a known kind and a byte-string body.
    """
    if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not int \
            or type(payload[1]) is not bytes:
        raise WireError("a secretary payload is [kind, body bytes]")
    try:
        return Kind(payload[0])
    except ValueError:
        raise WireError(f"unknown secretary frame kind {payload[0]!r}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _pack(kind: Kind, body: list[Any]) -> list[Any]:
    return [int(kind), msgpack.packb(body, use_bin_type=True)]


def _body(payload: Any, kind: Kind, name: str, length: int | None) -> list[Any]:
    """Check the kind and unpack the body of ``payload`` (an array of ``length``; None: of
    any length, which the caller checks)."""
    if kind_of(payload) is not kind:
        raise WireError(f"not {name}")
    try:
        body = msgpack.unpackb(payload[1], raw=False, use_list=True, strict_map_key=True,
                               ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises many types for bad input; all mean one thing
        raise WireError(f"{name} body is not msgpack ({type(exc).__name__})") from None
    return _list(body, name, length)


# -- BATCH: leader -> secretary ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One of the leader's messages, as the secretary must rebuild it for ``to``."""

    type: MT
    to: str
    log_term: int
    index: int
    count: int
    commit: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    """A checked BATCH frame. ``entries`` maps an index to its checked wire form."""

    seq: int
    term: int
    leader: str
    entries: dict[int, list[Any]]
    targets: tuple[Target, ...]
    addresses: dict[str, str]
    report_after: int = 0
    settles: bool = False

    def wire_entries(self, target: Target) -> list[list[Any]]:
        """The wire entries ``target`` carries (present: :func:`decode_batch` checked it)."""
        return [self.entries[i] for i in range(target.index + 1, target.index + 1 + target.count)]


def appendable(m: Message) -> bool:
    """Whether ``m`` can travel in a BATCH: its entries are ``index + 1 .. index + count``.

    Only the ends are looked at: the leader's messages carry slices of its log, whose indexes
    are consecutive by construction, and a batch is rebuilt on the far side by these numbers
    alone (the secretary checks that every target's entries are in the batch).
    """
    if m.type not in REQUESTS:
        return False
    entries = m.entries
    return not entries or (entries[0].index == m.index + 1
                           and entries[-1].index == m.index + len(entries))


def distinct_entries(messages: Iterable[Message]) -> dict[int, Entry]:
    """Index -> entry over ``messages``' entries; messages of one batch mostly carry the same
    slice of the log, which is looked at once."""
    distinct: dict[int, Entry] = {}
    seen: set[tuple[int, int]] = set()
    for m in messages:
        span = (m.index, len(m.entries))
        if span[1] and span not in seen:
            seen.add(span)
            for e in m.entries:
                distinct.setdefault(e.index, e)
    return distinct


def encode_batch(seq: int, term: int, leader: str, messages: Sequence[Message],
                 addresses: Mapping[str, str],
                 distinct: Mapping[int, Entry] | None = None, report_after: int = 0,
                 settles: bool = False) -> list[Any]:
    """The BATCH payload carrying ``messages`` (all :func:`appendable`, of ``term``).

    Entries several messages share travel once. ``distinct``: their
    :func:`distinct_entries`, if the caller has them already. ``report_after``: the
    acknowledgements the leader needs from these followers to commit (0: no hint);
    ``settles``: that many are all it needs (see the module's docstring).
    """
    if distinct is None:
        distinct = distinct_entries(messages)
    targets = [[int(m.type), m.to, m.log_term, m.index, len(m.entries), m.commit, m.context]
               for m in messages]
    runs: list[list[Any]] = []
    run_start, run = -2, None
    for index in sorted(distinct):
        if run is None or index != run_start + len(run):
            run = []
            run_start = index
            runs.append([index, run])
        e = distinct[index]
        run.append([e.term, e.data, int(e.type)])
    return _pack(Kind.BATCH, [seq, term, leader, runs, targets, dict(addresses), report_after,
                              settles])


def decode_batch(payload: Any) -> Batch:
    """Check a BATCH payload.

    Raises:
        WireError: Malformed, or a target needs an entry the batch does not carry.
    """
    body = _body(payload, Kind.BATCH, "a batch", None)
    if len(body) < 6:
        raise WireError("a batch must be an array of at least 6")
    # A leader may give no hint (6 fields) or no ``settles`` (7); fields after the eighth are
    # a later leader's additions: they are left alone.
    seq, term, leader, runs, targets, addresses, report_after, settles = (
        body + [0, False][len(body) - 6:])[:8]
    seq, term, leader = _int(seq, "seq"), _int(term, "term"), _id(leader, "leader")
    entries: dict[int, list[Any]] = {}
    for run in _list(runs, "runs"):
        first, raw = _list(run, "a run", 2)
        first = _int(first, "run index")
        for k, item in enumerate(_check_entries(raw)):
            if entries.setdefault(first + k, item) is not item:
                raise WireError(f"entry {first + k} appears twice")
    checked = []
    for t in _list(targets, "targets"):
        mtype, to, log_term, index, count, commit, context = _list(t, "a target", 7)
        target = Target(_type(mtype, REQUESTS), _id(to, "to"), _int(log_term, "log_term"),
                        _int(index, "index"), _int(count, "count"), _int(commit, "commit"),
                        _context(context))
        if target.type is MT.HEARTBEAT and target.count:
            raise WireError("a heartbeat carries no entries")
        if any(i not in entries for i in range(target.index + 1,
                                               target.index + 1 + target.count)):
            raise WireError(f"target {target.to} needs entries the batch lacks")
        checked.append(target)
    if type(addresses) is not dict:
        raise WireError("addresses must be a map")
    for node, address in addresses.items():
        _id(node, "address key")
        if type(address) is not str or len(address) > 300:
            raise WireError("an address must be a string")
    return Batch(seq, term, leader, entries, tuple(checked), addresses,
                 _int(report_after, "report_after"), _bool(settles, "settles"))


# -- RELAY: secretary -> follower -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Relay:
    """A checked RELAY frame: the leader's messages, rebuilt for the receiving follower."""

    term: int
    leader: str
    messages: tuple[Message, ...]


def relay_item(target: Target, wire_entries: list[list[Any]]) -> list[Any]:
    """One message of a RELAY payload, from a checked batch target and its entries."""
    return [int(target.type), target.log_term, target.index, target.commit, target.context,
            wire_entries]


def encode_relay(term: int, leader: str, items: Sequence[list[Any]]) -> list[Any]:
    return _pack(Kind.RELAY, [term, leader, list(items)])


def decode_relay(payload: Any, me: str) -> Relay:
    """Check a RELAY payload and rebuild the leader's messages to ``me``.

    Raises:
        WireError: Malformed.
    """
    term, leader, items = _body(payload, Kind.RELAY, "a relay", 3)
    term, leader = _int(term, "term"), _id(leader, "leader")
    if term == 0:
        raise WireError("a relayed message carries the leader's term")
    messages = []
    for item in _list(items, "messages"):
        mtype, log_term, index, commit, context, raw = _list(item, "a relayed message", 6)
        mtype = _type(mtype, REQUESTS)
        index = _int(index, "index")
        raw = _check_entries(raw)
        if mtype is MT.HEARTBEAT and raw:
            raise WireError("a heartbeat carries no entries")
        messages.append(Message(mtype, me, leader, term, log_term=_int(log_term, "log_term"),
                                index=index, entries=_entries(raw, index + 1),
                                commit=_int(commit, "commit"), context=_context(context)))
    return Relay(term, leader, tuple(messages))


# -- REPLY: follower -> secretary, REPORT: secretary -> leader --------------------------------


@dataclass(frozen=True, slots=True)
class Replies:
    """A checked REPLY frame: one follower's replies to the leader of ``term``."""

    term: int
    leader: str
    items: tuple[list[Any], ...]   # [type, index, log_term, reject, reject_hint, context]


def _reply_fields(m: Message) -> list[Any]:
    return [int(m.type), m.index, m.log_term, m.reject, m.reject_hint, m.context]


def _check_reply(item: Any) -> list[Any]:
    mtype, index, log_term, reject, reject_hint, context = _list(item, "a reply", 6)
    return [_type(mtype, RESPONSES), _int(index, "index"), _int(log_term, "log_term"),
            _bool(reject, "reject"), _int(reject_hint, "reject_hint"), _context(context)]


def encode_replies(term: int, leader: str, messages: Sequence[Message]) -> list[Any]:
    return _pack(Kind.REPLY, [term, leader, [_reply_fields(m) for m in messages]])


def decode_replies(payload: Any) -> Replies:
    term, leader, items = _body(payload, Kind.REPLY, "a reply frame", 3)
    return Replies(_int(term, "term"), _id(leader, "leader"),
                   tuple(_check_reply(i) for i in _list(items, "replies")))


@dataclass(frozen=True, slots=True)
class Report:
    """A checked REPORT frame, its replies rebuilt as messages to the leader."""

    term: int
    ack_seq: int
    replies: tuple[Message, ...]
    unreachable: tuple[str, ...]


def encode_report(term: int, ack_seq: int, replies: Sequence[tuple[str, list[Any]]],
                  unreachable: Iterable[str]) -> list[Any]:
    """``replies``: (follower id, checked reply fields) pairs, in arrival order."""
    items = [[frm, int(f[0]), f[1], f[2], f[3], f[4], f[5]] for frm, f in replies]
    return _pack(Kind.REPORT, [term, ack_seq, items, sorted(unreachable)])


def decode_report(payload: Any, me: str) -> Report:
    term, ack_seq, items, unreachable = _body(payload, Kind.REPORT, "a report", 4)
    term = _int(term, "term")
    replies = []
    for item in _list(items, "replies"):
        if type(item) is not list or len(item) != 7:
            raise WireError("a reported reply must be an array of 7")
        frm = _id(item[0], "from")
        mtype, index, log_term, reject, hint, context = _check_reply(item[1:])
        replies.append(Message(mtype, me, frm, term, log_term=log_term, index=index,
                               reject=reject, reject_hint=hint, context=context))
    return Report(term, _int(ack_seq, "ack_seq"), tuple(replies),
                  tuple(_id(u, "unreachable") for u in _list(unreachable, "unreachable")))


# -- DIRECT: leader -> follower ---------------------------------------------------------------


def encode_direct(term: int) -> list[Any]:
    return _pack(Kind.DIRECT, [term])


def decode_direct(payload: Any) -> int:
    [term] = _body(payload, Kind.DIRECT, "a direct notice", 1)
    return _int(term, "term")
