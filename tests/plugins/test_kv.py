"""Tests for the KV state machine plugin (bwraft_plugins.kv)."""

from __future__ import annotations

import msgpack
import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bwcore import hookspecs
from bwcore.hookspecs import PROJECT
from bwraft_plugins.kv import KVPlugin, KVStateMachine, encode_command


def applied(sm: KVStateMachine, *commands: bytes) -> list[dict]:
    """Apply commands at the indexes following ``sm.applied_index``; return their results."""
    return [sm.apply(sm.applied_index + 1, command) for command in commands]


# --- operations -----------------------------------------------------------------------------

def test_put_stores_the_value_and_reports_the_index():
    """A put makes the value readable and answers with the entry's index."""
    sm = KVStateMachine()
    assert sm.apply(7, encode_command("put", "k", value="v")) == {"index": 7}
    assert sm.get("k") == "v"
    assert sm.applied_index == 7
    assert len(sm) == 1


def test_put_overwrites():
    """A second put to a key replaces its value."""
    sm = KVStateMachine()
    applied(sm, encode_command("put", "k", value="1"), encode_command("put", "k", value="2"))
    assert sm.get("k") == "2"
    assert len(sm) == 1


def test_delete_reports_whether_the_key_existed():
    """A delete removes the key and says whether there was one to remove."""
    sm = KVStateMachine()
    _, second = applied(sm, encode_command("put", "k", value="v"),
                        encode_command("delete", "k"))
    assert second == {"index": 2, "deleted": True}
    assert sm.get("k") is None
    assert applied(sm, encode_command("delete", "k")) == [{"index": 3, "deleted": False}]
    assert len(sm) == 0


def test_cas_succeeds_only_on_the_expected_value():
    """A cas writes when the current value is the expected one, and otherwise changes nothing."""
    sm = KVStateMachine()
    applied(sm, encode_command("put", "k", value="a"))
    assert applied(sm, encode_command("cas", "k", expect="x", value="b")) == [
        {"ok": False, "value": "a", "index": 2}]
    assert sm.get("k") == "a"
    assert applied(sm, encode_command("cas", "k", expect="a", value="b")) == [
        {"ok": True, "value": "b", "index": 3}]
    assert sm.get("k") == "b"


def test_cas_expect_absent():
    """expect_absent succeeds only while the key is absent (create-if-missing)."""
    sm = KVStateMachine()
    create = encode_command("cas", "k", expect_absent=True, value="first")
    assert applied(sm, create) == [{"ok": True, "value": "first", "index": 1}]
    again = encode_command("cas", "k", expect_absent=True, value="second")
    assert applied(sm, again) == [{"ok": False, "value": "first", "index": 2}]
    assert sm.get("k") == "first"


def test_cas_with_no_value_deletes_on_success():
    """A cas whose new value is None deletes the key when the expectation holds."""
    sm = KVStateMachine()
    applied(sm, encode_command("put", "k", value="a"))
    assert applied(sm, encode_command("cas", "k", expect="a")) == [
        {"ok": True, "value": None, "index": 2}]
    assert sm.get("k") is None
    assert len(sm) == 0


def test_empty_entry_is_a_no_op():
    """The leader's empty entry advances applied_index and changes nothing else."""
    sm = KVStateMachine()
    assert sm.apply(1, b"") == {"index": 1}
    assert sm.applied_index == 1
    assert len(sm) == 0


def test_an_index_already_applied_is_refused_without_effect():
    """Applying at or below applied_index is an error and leaves the state as it was."""
    sm = KVStateMachine()
    sm.apply(5, encode_command("put", "k", value="v"))
    before = sm.snapshot()
    result = sm.apply(5, encode_command("put", "k", value="other"))
    assert "error" in result
    assert sm.snapshot() == before


# --- exactly-once ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    encode_command("put", "k", value="v", request_id="r1"),
    encode_command("delete", "k", request_id="r1"),
    encode_command("cas", "k", expect="old", value="new", request_id="r1"),
])
def test_a_retried_request_returns_the_first_result_and_changes_nothing(command):
    """A command whose request_id was applied returns its first result, even after changes."""
    sm = KVStateMachine()
    applied(sm, encode_command("put", "k", value="old"))
    [first] = applied(sm, command)
    applied(sm, encode_command("put", "k", value="later"))
    [retry] = applied(sm, command)
    assert retry == first
    assert sm.get("k") == "later"


def test_the_request_id_is_what_deduplicates_not_the_command():
    """A different command under a used request_id still answers with the first result."""
    sm = KVStateMachine()
    [first] = applied(sm, encode_command("put", "k", value="1", request_id="r"))
    [second] = applied(sm, encode_command("put", "other", value="2", request_id="r"))
    assert second == first
    assert sm.get("other") is None


def test_returned_results_cannot_alter_the_dedup_table():
    """Mutating a returned result dict does not change what a retry returns."""
    sm = KVStateMachine()
    command = encode_command("put", "k", value="v", request_id="r")
    [first] = applied(sm, command)
    first["index"] = 999
    [retry] = applied(sm, command)
    assert retry == {"index": 1}


def test_dedup_window_evicts_the_oldest_ids_in_apply_order():
    """Only the dedup_window most recently applied ids are remembered."""
    sm = KVStateMachine(dedup_window=2)
    for rid in ("a", "b", "c"):
        applied(sm, encode_command("put", "k", value=rid, request_id=rid))
    # "b" and "c" are remembered: retrying them changes nothing.
    applied(sm, encode_command("put", "k", value="b", request_id="b"))
    assert sm.get("k") == "c"
    # "a" was evicted: the retry applies again.
    [result] = applied(sm, encode_command("put", "k", value="a", request_id="a"))
    assert result == {"index": 5}
    assert sm.get("k") == "a"


def test_dedup_window_zero_disables_deduplication():
    """With dedup_window 0 a repeated request_id is applied again."""
    sm = KVStateMachine(dedup_window=0)
    command = encode_command("put", "k", value="v", request_id="r")
    assert applied(sm, command, command) == [{"index": 1}, {"index": 2}]


@pytest.mark.parametrize("window", [-1, 1.5, "10", True])
def test_dedup_window_must_be_a_non_negative_int(window):
    """An invalid dedup_window is refused at construction."""
    with pytest.raises(ValueError, match="dedup_window"):
        KVStateMachine(dedup_window=window)


# --- bad input ------------------------------------------------------------------------------

def raw(command: object) -> bytes:
    return msgpack.packb(command)


@pytest.mark.parametrize("data, reason", [
    (b"\xc1", "malformed"),
    (b"\x92\x01", "malformed"),                       # truncated array
    (raw({"o": "put", "k": "k", "v": "v"}) + b"x", "malformed"),   # trailing bytes
    (raw([1, 2, 3]), "map"),
    (raw({"o": "get", "k": "k"}), "unknown op"),
    (raw({"o": "put", "k": 3, "v": "v"}), "key"),
    (raw({"o": "put", "k": "", "v": "v"}), "key"),
    (raw({"o": "put", "k": b"bytes", "v": "v"}), "key"),
    (raw({"o": "put", "k": "k"}), "needs a value"),
    (raw({"o": "put", "k": "k", "v": 5}), "value"),
    (raw({"o": "put", "k": "k", "v": "v", "r": 7}), "request_id"),
    (raw({"o": "delete", "k": "k", "v": "v"}), "not allowed"),
    (raw({"o": "cas", "k": "k", "v": "v"}), "exactly one"),
    (raw({"o": "cas", "k": "k", "e": "x", "a": True}), "exactly one"),
    (raw({"o": "cas", "k": "k", "e": 1}), "expect"),
    (raw({"o": "cas", "k": "k", "a": 1}), "boolean"),
    (raw({1: 2}), "malformed"),                       # non-string map key
    ("not bytes", "bytes"),
])
def test_malformed_commands_yield_an_error_result(data, reason):
    """Data that is not a valid command gives {"error": ...}, consumes the index, changes nothing."""
    sm = KVStateMachine()
    applied(sm, encode_command("put", "k", value="v"))
    result = sm.apply(2, data)
    assert set(result) == {"error"}
    assert reason in result["error"]
    assert sm.get("k") == "v" and len(sm) == 1
    assert sm.applied_index == 2


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_apply_never_raises_on_arbitrary_bytes(data):
    """Any bytes at all give a result dict, never an exception."""
    sm = KVStateMachine()
    result = sm.apply(1, data)
    assert isinstance(result, dict)
    assert sm.applied_index == 1


@pytest.mark.parametrize("kwargs", [
    {"op": "get", "key": "k"},
    {"op": "put", "key": "k"},
    {"op": "put", "key": 1, "value": "v"},
    {"op": "put", "key": "k", "value": 1},
    {"op": "cas", "key": "k", "value": "v"},
    {"op": "cas", "key": "k", "expect": "a", "expect_absent": True},
    {"op": "delete", "key": "k", "value": "v"},
    {"op": "put", "key": "k", "value": "v", "request_id": ""},
])
def test_encode_command_refuses_what_apply_would_refuse(kwargs):
    """encode_command raises ValueError for a command apply would answer with an error."""
    op, key = kwargs.pop("op"), kwargs.pop("key")
    with pytest.raises(ValueError):
        encode_command(op, key, **kwargs)


# --- snapshots and determinism --------------------------------------------------------------

@st.composite
def commands(draw) -> bytes:
    """Valid commands over few keys, values and request ids, so that they interact."""
    op = draw(st.sampled_from(["put", "delete", "cas"]))
    key = draw(st.sampled_from(["a", "b", "c"]))
    request_id = draw(st.one_of(st.none(), st.sampled_from(["r1", "r2", "r3", "r4"])))
    values = st.sampled_from(["1", "2"])
    if op == "put":
        return encode_command(op, key, value=draw(values), request_id=request_id)
    if op == "delete":
        return encode_command(op, key, request_id=request_id)
    absent = draw(st.booleans())
    return encode_command(op, key, value=draw(st.none() | values),
                          expect=None if absent else draw(values), expect_absent=absent,
                          request_id=request_id)


@given(st.lists(commands(), max_size=40), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_snapshot_then_restore_continues_exactly_like_the_original(log, split):
    """A replica restored from a snapshot at any point ends in the same state and results."""
    original = KVStateMachine(dedup_window=3)
    for command in log[:split]:
        applied(original, command)
    replica = KVStateMachine(dedup_window=3)
    replica.restore(original.snapshot())
    assert replica.applied_index == original.applied_index
    for command in log[split:]:
        assert applied(replica, command) == applied(original, command)
    assert replica.snapshot() == original.snapshot()


@given(st.lists(commands(), max_size=40))
@settings(max_examples=100, deadline=None)
def test_replicas_applying_the_same_log_agree_byte_for_byte(log):
    """apply is deterministic: two replicas produce equal results and equal snapshots."""
    one, two = KVStateMachine(dedup_window=2), KVStateMachine(dedup_window=2)
    for command in log:
        assert applied(one, command) == applied(two, command)
    assert one.snapshot() == two.snapshot()


def test_snapshot_carries_the_dedup_table():
    """A retry reaching a replica restored from a snapshot still returns the first result."""
    original = KVStateMachine()
    command = encode_command("put", "k", value="v", request_id="r")
    [first] = applied(original, command)
    applied(original, encode_command("put", "k", value="later"))
    replica = KVStateMachine()
    replica.restore(original.snapshot())
    assert applied(replica, command) == [first]
    assert replica.get("k") == "later"


def test_restore_into_a_smaller_window_keeps_the_newest_ids():
    """Restoring into a smaller dedup_window drops the oldest ids first."""
    original = KVStateMachine(dedup_window=10)
    for rid in ("a", "b", "c"):
        applied(original, encode_command("put", "k", value=rid, request_id=rid))
    replica = KVStateMachine(dedup_window=1)
    replica.restore(original.snapshot())
    applied(replica, encode_command("put", "k", value="c", request_id="c"))   # remembered
    assert replica.applied_index == 4
    [result] = applied(replica, encode_command("put", "k", value="b", request_id="b"))
    assert result == {"index": 5} and replica.get("k") == "b"


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",
    raw({"format": 2, "applied_index": 0, "data": {}, "requests": []}),
    raw({"format": 1, "applied_index": -1, "data": {}, "requests": []}),
    raw({"format": 1, "applied_index": 0, "data": {"k": 1}, "requests": []}),
    raw({"format": 1, "applied_index": 0, "data": {}, "requests": [["r"]]}),
    raw({"format": 1, "applied_index": 0, "data": {}}),
])
def test_restore_refuses_a_bad_snapshot_and_keeps_the_state(data):
    """A corrupt snapshot raises ValueError and leaves the state machine untouched."""
    sm = KVStateMachine()
    applied(sm, encode_command("put", "k", value="v", request_id="r"))
    before = sm.snapshot()
    with pytest.raises(ValueError, match="snapshot"):
        sm.restore(data)
    assert sm.snapshot() == before


# --- the plugin -----------------------------------------------------------------------------

def test_plugin_creates_state_machines_with_its_dedup_window():
    """The hook returns a fresh KVStateMachine configured from the plugin's settings."""
    plugin = KVPlugin({"dedup_window": 5})
    sm = plugin.bwraft_create_state_machine(config={})
    other = plugin.bwraft_create_state_machine(config={})
    assert isinstance(sm, KVStateMachine) and sm is not other
    assert sm.dedup_window == 5


def test_plugin_defaults_match_its_declared_settings():
    """The settings the host merges in are exactly the ones the plugin declares."""
    assert KVPlugin.settings_defaults == {"dedup_window": 100_000}
    plugin = KVPlugin(dict(KVPlugin.settings_defaults))
    assert plugin.bwraft_create_state_machine(config={}).dedup_window == 100_000


def test_plugin_refuses_a_bad_dedup_window():
    """A bad setting stops the plugin with a message naming it."""
    with pytest.raises(ValueError, match="kv: dedup_window"):
        KVPlugin({"dedup_window": -5})


def test_plugin_registers_with_the_bwraft_plugin_manager():
    """The hook implementation matches the spec and answers through pluggy."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(KVPlugin(dict(KVPlugin.settings_defaults)), name="kv")
    machine = pm.hook.bwraft_create_state_machine(config={})
    assert isinstance(machine, KVStateMachine)
    assert isinstance(machine, hookspecs.StateMachine)


def test_plugin_is_declared_under_the_bwraft_entry_point_group():
    """The installed distribution names KVPlugin as the `kv` entry point."""
    from importlib.metadata import entry_points

    [kv] = [ep for ep in entry_points(group="bwraft") if ep.name == "kv"]
    assert kv.load() is KVPlugin
