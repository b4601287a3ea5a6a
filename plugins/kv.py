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

from collections.abc import Callable
from typing import Any

import msgpack

from bwcore.hookspecs import hookimpl
from bwraft_plugins.kv_snapshot import decode_image, encode_image, yield_gil

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


#: In the overlay: the key was deleted while a snapshot was being serialized.
_DELETED: Any = object()


class _Freeze:
    """A snapshot being serialized from the frozen dict; ``done`` once it no longer reads it."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class KVStateMachine:
    """A replicated map from str keys to str values with exactly-once commands.

    Snapshots do not copy the state (Raft §7 allows "copy-on-write techniques" so that writes
    go on while a snapshot is written). :meth:`snapshot_begin` freezes the dict as it is, in
    O(1), and hands out a serializer that reads only the frozen dict; until that serializer
    has finished, writes go to an overlay that every read consults first, and the first call
    after it finished merges the overlay back in O(writes made meanwhile). The exactly-once
    table is an append-only list (plus an index by request id), so a snapshot just keeps
    that list and the bounds of its live part.

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
        # The state is _data overlaid by _overlay; _overlay is None unless a snapshot is being
        # serialized from _data, which then must not change.
        self._data: dict[str, str] = {}
        self._overlay: dict[str, Any] | None = None
        # Overlay keys that were absent when last written: a plain dict would have put them
        # last, so the merge does too, and every replica's image stays byte for byte the same.
        self._appended: set[str] = set()
        self._size = 0  # the number of keys while _overlay is not None
        self._freeze: _Freeze | None = None
        # Exactly-once: (request_id, result) in apply order, live from _requests_start on; the
        # oldest id is forgotten first on every replica. The list is only appended to, and
        # replaced (never cut in place) when its forgotten prefix is dropped, so a serializer
        # can go on reading the list it was given.
        self._requests: list[tuple[str, dict]] = []
        self._requests_start = 0
        self._results: dict[str, dict] = {}

    def __len__(self) -> int:
        """Return the number of keys present."""
        self._settle()
        return len(self._data) if self._overlay is None else self._size

    def get(self, key: str) -> str | None:
        """Return the value of ``key`` as of ``applied_index``, or None when absent."""
        self._settle()
        return self._lookup(key)

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
        self._settle()
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
            first = self._results.get(request_id)
            if first is not None:
                return dict(first)
        result = self._execute(index, command)
        if request_id is not None and self.dedup_window:
            self._remember(request_id, result)
            return dict(result)
        return result

    def _execute(self, index: int, command: dict) -> dict:
        op, key = command[_F_OP], command[_F_KEY]
        if op == "put":
            self._put(key, command[_F_VALUE])
            return {"index": index}
        if op == "delete":
            return {"index": index, "deleted": self._delete(key)}
        current = self._lookup(key)
        if command.get(_F_ABSENT, False):
            matches = current is None
        else:
            matches = current == command[_F_EXPECT]
        if matches:
            new = command.get(_F_VALUE)
            if new is None:
                self._delete(key)
            else:
                self._put(key, new)
            current = new
        return {"ok": matches, "value": current, "index": index}

    def _remember(self, request_id: str, result: dict) -> None:
        self._requests.append((request_id, result))
        self._results[request_id] = result
        if len(self._results) > self.dedup_window:
            oldest, _ = self._requests[self._requests_start]
            del self._results[oldest]
            self._requests_start += 1
            if self._requests_start >= max(self.dedup_window, 1024):
                # A new list, amortized O(1) per id: a serializer may hold the old one.
                self._requests = self._requests[self._requests_start:]
                self._requests_start = 0

    # -- the key-value state, overlaid while a snapshot is being serialized ----------------------

    def _lookup(self, key: str) -> str | None:
        overlay = self._overlay
        if overlay is not None and key in overlay:
            value = overlay[key]
            return None if value is _DELETED else value
        return self._data.get(key)

    def _put(self, key: str, value: str) -> None:
        overlay = self._overlay
        if overlay is None:
            self._data[key] = value
            return
        if self._lookup(key) is None:
            overlay.pop(key, None)  # to the end, as a plain dict would put a new key
            self._appended.add(key)
            self._size += 1
        overlay[key] = value

    def _delete(self, key: str) -> bool:
        overlay = self._overlay
        if overlay is None:
            return self._data.pop(key, None) is not None
        if self._lookup(key) is None:
            return False
        overlay[key] = _DELETED
        self._size -= 1
        return True

    def _settle(self) -> None:
        """Merge the overlay back once the serializer that froze ``_data`` has finished."""
        freeze = self._freeze
        if freeze is not None and freeze.done:
            self._merge_overlay_into(self._data)

    def _merge_overlay_into(self, data: dict[str, str]) -> None:
        overlay, appended = self._overlay, self._appended
        assert overlay is not None
        for key, value in overlay.items():
            if value is _DELETED:
                data.pop(key, None)
            else:
                if key in appended:
                    data.pop(key, None)
                data[key] = value
        self._data = data
        self._overlay, self._appended, self._freeze = None, set(), None

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_begin(self) -> Callable[[], bytes]:
        """Freeze the whole state as it is now and return its serializer.

        Called on the reactor thread, in O(1) (O(keys) only if the previous serializer has not
        finished yet: the new snapshot then needs a frozen dict of its own). The serializer
        may run on any thread, once, while ``apply`` goes on: it reads only what was frozen
        here, packing it a few thousand keys per msgpack call and handing the GIL over
        between two (:mod:`bwraft_plugins.kv_snapshot`), so that it never keeps the reactor
        waiting for long.

        Returns:
            A callable returning the image: data, the exactly-once table and
            ``applied_index``, exactly as :meth:`snapshot` would have returned it now.
        """
        return self._freeze_state(pause=yield_gil)

    def _freeze_state(self, pause: Callable[[], None] | None) -> Callable[[], bytes]:
        self._settle()
        if self._freeze is not None:
            self._merge_overlay_into(dict(self._data))
        freeze = _Freeze()
        data, applied_index = self._data, self.applied_index
        requests, start, end = self._requests, self._requests_start, len(self._requests)
        self._overlay, self._appended, self._size, self._freeze = {}, set(), len(data), freeze

        def serialize() -> bytes:
            try:
                return encode_image(applied_index, data, requests[start:end], pause=pause)
            finally:
                freeze.done = True

        return serialize

    def snapshot(self) -> bytes:
        """Serialize the whole state: data, the exactly-once table and ``applied_index``."""
        image = self._freeze_state(pause=None)()
        self._settle()
        return image

    def restore_prepare(self, data: bytes) -> Callable[[], None]:
        """Decode and check a snapshot without touching the state; return the install step.

        Safe on any thread: it reads nothing of this state machine but ``dedup_window``. The
        returned callable (run on the reactor thread) swaps the decoded state in, in O(1). If
        this replica's ``dedup_window`` is smaller than the snapshot's table, the oldest ids
        are dropped.

        Raises:
            ValueError: ``data`` is not a valid snapshot (nothing changes).
        """
        return self._prepare(data, pause=yield_gil)

    def _prepare(self, data: bytes, pause: Callable[[], None] | None) -> Callable[[], None]:
        applied_index, kv, pairs = decode_image(data, pause=pause)
        results = dict(pairs)
        if len(results) != len(pairs):
            raise ValueError("invalid KV snapshot: a request id appears twice")
        if len(pairs) > self.dedup_window:
            pairs = pairs[len(pairs) - self.dedup_window:]
            results = dict(pairs)

        def install() -> None:
            # A serializer still running keeps the dict it froze; nothing here touches it.
            self._overlay, self._appended, self._freeze = None, set(), None
            self.applied_index, self._data = applied_index, kv
            self._requests, self._requests_start, self._results = pairs, 0, results

        return install

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot taken by :meth:`snapshot`.

        The snapshot is checked completely before anything changes, so a corrupt snapshot
        leaves the state machine as it was. If this replica's ``dedup_window`` is smaller than
        the snapshot's table, the oldest ids are dropped.

        Raises:
            ValueError: ``data`` is not a valid snapshot.
        """
        self._prepare(data, pause=None)()


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
