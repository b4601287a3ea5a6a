"""The built-in key-value state machine: put, delete and compare-and-set over str keys.

Every replica (voter or observer) applies the same committed log through
:meth:`KVStateMachine.apply`, so ``apply`` must be a pure function of the state and the entry:
no clock, no randomness, no dependence on dict iteration of anything but the state itself.
Exactly-once delivery of client retries (Raft paper §8, "Client interaction") is part of that
state: the table of applied request ids travels inside snapshots, and its eviction order is the
apply order, so every replica forgets the same ids at the same index.

Commands are msgpack maps with short keys (see :func:`encode_command`). Anything in a log entry
that is not a well-formed command yields an ``{"error": ...}`` result; ``apply`` never raises on
entry data, because one bad entry must not stop every replica that applies it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgpack

from bwcore.hookspecs import hookimpl

__all__ = ["KVPlugin", "KVStateMachine", "encode_command", "OPS"]

#: Operations a command may carry. Reads are not commands: they are served through ReadIndex.
OPS = ("put", "delete", "cas")

# Field names inside an encoded command, kept short because every command is stored in the log
# of every replica.
_F_OP, _F_KEY, _F_VALUE, _F_EXPECT, _F_ABSENT, _F_ID = "o", "k", "v", "e", "a", "r"
_FIELDS_BY_OP = {
    "put": frozenset({_F_OP, _F_KEY, _F_VALUE, _F_ID}),
    "delete": frozenset({_F_OP, _F_KEY, _F_ID}),
    "cas": frozenset({_F_OP, _F_KEY, _F_VALUE, _F_EXPECT, _F_ABSENT, _F_ID}),
}
_SNAPSHOT_FORMAT = 1


class CommandError(ValueError):
    """A command that cannot be applied; its message becomes the ``error`` result."""


def encode_command(op: str, key: str, *, value: str | None = None, expect: str | None = None,
                   expect_absent: bool = False, request_id: str | None = None) -> bytes:
    """Encode one KV command as log entry data.

    Args:
        op: ``"put"``, ``"delete"`` or ``"cas"``.
        key: The key, a non-empty str.
        value: For ``put``, the value to store (required). For ``cas``, the value to store on
            success, or None to delete the key on success. Not allowed for ``delete``.
        expect: For ``cas``, the value the key must currently hold.
        expect_absent: For ``cas``, require the key to be absent instead (exclusive with
            ``expect``).
        request_id: A client-chosen id that makes the command exactly-once: applying a command
            whose id was already applied returns the first result and changes nothing.

    Returns:
        The msgpack encoding of the command.

    Raises:
        ValueError: The arguments do not form a valid command (the same checks ``apply`` makes,
            so a caller learns of a bad command before it reaches the log).
    """
    command: dict[str, Any] = {_F_OP: op, _F_KEY: key}
    if value is not None:
        command[_F_VALUE] = value
    if expect is not None:
        command[_F_EXPECT] = expect
    if expect_absent:
        command[_F_ABSENT] = expect_absent
    if request_id is not None:
        command[_F_ID] = request_id
    _validate(command)
    return msgpack.packb(command)


def _validate(command: Any) -> None:
    """Raise CommandError unless ``command`` is a well-formed decoded command."""
    if not isinstance(command, dict):
        raise CommandError("command must be a map")
    op = command.get(_F_OP)
    if op not in _FIELDS_BY_OP:
        raise CommandError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    unknown = command.keys() - _FIELDS_BY_OP[op]
    if unknown:
        raise CommandError(f"fields not allowed for {op}: {sorted(map(str, unknown))}")
    key = command.get(_F_KEY)
    if not isinstance(key, str) or not key:
        raise CommandError("key must be a non-empty string")
    if _F_VALUE in command and not isinstance(command[_F_VALUE], str):
        raise CommandError("value must be a string")
    if op == "put" and _F_VALUE not in command:
        raise CommandError("put needs a value")
    request_id = command.get(_F_ID)
    if _F_ID in command and (not isinstance(request_id, str) or not request_id):
        raise CommandError("request_id must be a non-empty string")
    if op == "cas":
        has_expect = _F_EXPECT in command
        absent = command.get(_F_ABSENT, False)
        if has_expect and not isinstance(command[_F_EXPECT], str):
            raise CommandError("expect must be a string")
        if type(absent) is not bool:
            raise CommandError("expect_absent must be a boolean")
        if has_expect == absent:
            raise CommandError("cas needs exactly one of expect or expect_absent")


class KVStateMachine:
    """A replicated map from str keys to str values with exactly-once commands.

    Attributes:
        applied_index: The index of the last log entry applied (0 before any).
    """

    def __init__(self, dedup_window: int = 100_000) -> None:
        """Create an empty state machine.

        Args:
            dedup_window: How many of the most recently applied request ids are remembered for
                exactly-once retries; 0 disables deduplication.

        Raises:
            ValueError: ``dedup_window`` is negative or not an int.
        """
        if type(dedup_window) is not int or dedup_window < 0:
            raise ValueError(f"dedup_window must be an int >= 0, got {dedup_window!r}")
        self.dedup_window = dedup_window
        self.applied_index = 0
        self._data: dict[str, str] = {}
        # Insertion order is apply order; the oldest id is evicted first on every replica.
        self._applied_requests: OrderedDict[str, dict] = OrderedDict()

    def __len__(self) -> int:
        """Return the number of keys present."""
        return len(self._data)

    def get(self, key: str) -> str | None:
        """Return the value of ``key`` as of ``applied_index``, or None when absent."""
        return self._data.get(key)

    def apply(self, index: int, data: bytes) -> dict:
        """Apply the committed entry at ``index`` and return its result.

        Results: ``put`` -> ``{"index"}``; ``delete`` -> ``{"index", "deleted"}``; ``cas`` ->
        ``{"ok", "value", "index"}`` where ``value`` is the key's value after the command. A
        command whose ``request_id`` was applied before returns that first result unchanged.
        Empty data (the leader's no-op entry, Raft §8) returns ``{"index"}`` and changes nothing.

        Args:
            index: The entry's log index; must exceed ``applied_index``.
            data: The entry data, normally from :func:`encode_command`.

        Returns:
            The result dict, or ``{"error": str}`` for data that is not a valid command or an
            index that was already applied (in which case nothing changes at all).
        """
        if type(index) is not int or index <= self.applied_index:
            return {"error": f"index {index!r} is not after applied index {self.applied_index}"}
        self.applied_index = index
        if not data:
            return {"index": index}
        try:
            command = _decode(data)
            _validate(command)
        except CommandError as exc:
            return {"error": str(exc)}
        request_id = command.get(_F_ID)
        if request_id is not None:
            first = self._applied_requests.get(request_id)
            if first is not None:
                return dict(first)
        result = self._execute(index, command)
        if request_id is not None and self.dedup_window:
            self._applied_requests[request_id] = result
            if len(self._applied_requests) > self.dedup_window:
                self._applied_requests.popitem(last=False)
            return dict(result)
        return result

    def _execute(self, index: int, command: dict) -> dict:
        op, key = command[_F_OP], command[_F_KEY]
        if op == "put":
            self._data[key] = command[_F_VALUE]
            return {"index": index}
        if op == "delete":
            return {"index": index, "deleted": self._data.pop(key, None) is not None}
        current = self._data.get(key)
        if command.get(_F_ABSENT, False):
            matches = current is None
        else:
            matches = current == command[_F_EXPECT]
        if matches:
            new = command.get(_F_VALUE)
            if new is None:
                self._data.pop(key, None)
            else:
                self._data[key] = new
            current = new
        return {"ok": matches, "value": current, "index": index}

    def snapshot(self) -> bytes:
        """Serialize the whole state: data, the exactly-once table and ``applied_index``."""
        return msgpack.packb({
            "format": _SNAPSHOT_FORMAT,
            "applied_index": self.applied_index,
            "data": self._data,
            "requests": [[rid, result] for rid, result in self._applied_requests.items()],
        })

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot taken by :meth:`snapshot`.

        The snapshot is checked completely before anything changes, so a corrupt snapshot
        leaves the state machine as it was. If this replica's ``dedup_window`` is smaller than
        the snapshot's table, the oldest ids are dropped.

        Raises:
            ValueError: ``data`` is not a valid snapshot.
        """
        try:
            snap = _decode(data)
        except CommandError as exc:
            raise ValueError(f"invalid KV snapshot: {exc}") from None
        applied_index, kv, requests = _check_snapshot(snap)
        table: OrderedDict[str, dict] = OrderedDict(requests)
        while len(table) > self.dedup_window:
            table.popitem(last=False)
        self.applied_index, self._data, self._applied_requests = applied_index, kv, table


def _decode(data: bytes) -> Any:
    """Decode msgpack data, turning any decoding failure into CommandError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CommandError(f"data must be bytes, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    # msgpack signals malformed input through several unrelated exception types (ExtraData,
    # FormatError, StackError, OutOfData, ValueError, TypeError, UnicodeDecodeError): the
    # input is arbitrary bytes, so every failure of this one call means "not a command".
    except Exception as exc:  # noqa: BLE001
        raise CommandError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


def _check_snapshot(snap: Any) -> tuple[int, dict[str, str], list[tuple[str, dict]]]:
    """Validate a decoded snapshot and return its parts, or raise ValueError."""
    if not isinstance(snap, dict) or snap.get("format") != _SNAPSHOT_FORMAT:
        raise ValueError("invalid KV snapshot: not a format-1 snapshot map")
    applied_index = snap.get("applied_index")
    kv = snap.get("data")
    requests = snap.get("requests")
    if type(applied_index) is not int or applied_index < 0:
        raise ValueError("invalid KV snapshot: applied_index must be an int >= 0")
    if not isinstance(kv, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in kv.items()):
        raise ValueError("invalid KV snapshot: data must map strings to strings")
    if not isinstance(requests, list) or not all(
            isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], dict) for item in requests):
        raise ValueError("invalid KV snapshot: requests must be [request_id, result] pairs")
    return applied_index, kv, [(rid, result) for rid, result in requests]


class KVPlugin:
    """Plugin providing :class:`KVStateMachine` as the node's state machine.

    Settings:
        dedup_window: How many recent request ids each replica remembers (default 100,000).
    """

    settings_defaults = {"dedup_window": 100_000}

    def __init__(self, settings: dict) -> None:
        """Keep the plugin's settings (defaults already merged by the host).

        Raises:
            ValueError: ``dedup_window`` is not an int >= 0.
        """
        window = settings.get("dedup_window", self.settings_defaults["dedup_window"])
        if type(window) is not int or window < 0:
            raise ValueError(f"kv: dedup_window must be an int >= 0, got {window!r}")
        self.dedup_window = window

    @hookimpl
    def bwraft_create_state_machine(self, config: Any) -> KVStateMachine:
        """Return a fresh, empty KV state machine for this node."""
        return KVStateMachine(dedup_window=self.dedup_window)
