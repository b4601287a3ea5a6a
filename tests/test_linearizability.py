"""Tests for the linearizability checker (bwcore.linearizability)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bwcore.linearizability import (
    UNREAD, CheckResult, Operation, check_history, dump_history, load_history, render_window)
from bwcore.linearizability import _prepare, _search

O = Operation


def put(client, key, value, call, ret, ok=True):
    return O(client, "put", key, value=value, call=call, ret=ret, ok=ok)


def get(client, key, output, call, ret, ok=True):
    return O(client, "get", key, output=output, call=call, ret=ret, ok=ok)


def delete(client, key, call, ret, ok=True):
    return O(client, "delete", key, call=call, ret=ret, ok=ok)


def cas(client, key, expect, value, output, call, ret, ok=True):
    return O(client, "cas", key, expect=expect, expect_absent=expect is None, value=value,
             output=output, call=call, ret=ret, ok=ok)


def verdict(*ops: Operation) -> str:
    return check_history(ops).verdict


# --- hand-made histories: linearizable ------------------------------------------------------

def test_empty_history_is_linearizable():
    """No operations, nothing to contradict."""
    assert check_history([]) == CheckResult(verdict="ok", per_key={})


def test_overlapping_puts_and_gets_in_any_order():
    """Reads overlapping two writes may see them in either order, but only one order overall."""
    a, b = put(1, "x", "a", 0, 10), put(2, "x", "b", 1, 9)
    assert verdict(a, b, get(3, "x", "b", 2, 3), get(3, "x", "a", 4, 5)) == "ok"
    assert verdict(a, b, get(3, "x", "a", 2, 3), get(3, "x", "b", 4, 5)) == "ok"
    # Having seen b then a, a later read cannot go back to b.
    assert verdict(a, b, get(3, "x", "b", 2, 3), get(3, "x", "a", 4, 5),
                   get(3, "x", "b", 11, 12)) == "illegal"


def test_operations_touching_at_one_instant_are_concurrent():
    """A read called at the instant a write returns may be ordered before it."""
    assert verdict(put(1, "x", "a", 0, 5), get(2, "x", None, 5, 6)) == "ok"
    assert verdict(put(1, "x", "a", 0, 5), get(2, "x", None, 5.001, 6)) == "illegal"


def test_cas_race_with_one_winner():
    """Two cas from the same expected value: one succeeds, the other fails."""
    assert verdict(put(1, "x", "a", 0, 1),
                   cas(2, "x", "a", "b", True, 2, 5), cas(3, "x", "a", "c", False, 2, 5),
                   get(1, "x", "b", 6, 7)) == "ok"


def test_cas_expect_absent_and_cas_delete():
    """expect None means absent; value None deletes on success."""
    assert verdict(cas(1, "x", None, "a", True, 0, 1), cas(1, "x", None, "b", False, 2, 3),
                   cas(1, "x", "a", None, True, 4, 5), get(1, "x", None, 6, 7)) == "ok"


def test_unknown_write_observed_later():
    """A timed-out write may take effect long after the client gave up."""
    assert verdict(put(1, "x", "a", 0, 1), put(2, "x", "b", 2, None),
                   get(3, "x", "a", 10, 11), get(3, "x", "b", 20, 21)) == "ok"


def test_unknown_write_never_observed():
    """A timed-out write may also never take effect."""
    assert verdict(put(1, "x", "a", 0, 1), put(2, "x", "b", 2, None, ok=None),
                   get(3, "x", "a", 10, 11), get(3, "x", "a", 20, 21)) == "ok"


def test_unknown_cas_observed_later():
    """A timed-out cas takes effect only if its expectation holds when it does."""
    history = [put(1, "x", "a", 0, 1), cas(2, "x", "a", "b", None, 2, None, ok=None)]
    assert verdict(*history, get(3, "x", "b", 10, 11)) == "ok"
    assert verdict(put(1, "x", "z", 0, 1), *history[1:], get(3, "x", "b", 10, 11)) == "illegal"


def test_unknown_operations_may_take_effect_one_after_another():
    """A timed-out cas may act on the value a timed-out put left: b, then b -> c, then c read."""
    unknown = [put(2, "x", "b", 2, None), put(3, "x", "b", 2, None),
               cas(4, "x", "b", "c", None, 2, None, ok=None),
               cas(5, "x", "b", "c", None, 2, None, ok=None)]
    assert verdict(put(1, "x", "a", 0, 1), *unknown, get(6, "x", "c", 5, 6)) == "ok"
    assert verdict(put(1, "x", "a", 0, 1), *unknown[2:], get(6, "x", "c", 5, 6)) == "illegal"


def test_definitely_failed_operations_are_dropped():
    """An operation that failed did not take effect, so reading its value is illegal."""
    failed = put(2, "x", "b", 2, 3, ok=False)
    assert verdict(put(1, "x", "a", 0, 1), failed, get(3, "x", "a", 4, 5)) == "ok"
    assert verdict(put(1, "x", "a", 0, 1), failed, get(3, "x", "b", 4, 5)) == "illegal"


def test_reads_with_unknown_outcome_constrain_nothing():
    """A read that never answered may carry any output."""
    assert verdict(put(1, "x", "a", 0, 1), get(2, "x", "nonsense", 2, None, ok=None)) == "ok"


# --- hand-made histories: not linearizable --------------------------------------------------

def test_stale_read_after_acknowledged_write():
    """A read that starts after a write was acknowledged must see it (or something newer)."""
    assert verdict(put(1, "x", "a", 0, 1), put(1, "x", "b", 2, 3),
                   get(2, "x", "a", 4, 5)) == "illegal"


def test_read_of_a_value_never_written():
    """A read can only return a value some write wrote."""
    assert verdict(put(1, "x", "a", 0, 1), get(2, "x", "ghost", 0, 5)) == "illegal"


def test_two_successful_cas_from_the_same_value():
    """Only one of two cas expecting the same value can succeed."""
    assert verdict(put(1, "x", "a", 0, 1), cas(2, "x", "a", "b", True, 2, 5),
                   cas(3, "x", "a", "c", True, 3, 6)) == "illegal"


def test_lost_acknowledged_write():
    """An acknowledged write that later reads never see (the old value comes back) was lost."""
    assert verdict(put(1, "x", "a", 0, 1), get(2, "x", "a", 2, 3), put(1, "x", "b", 4, 5),
                   get(2, "x", "a", 6, 7), get(2, "x", "a", 8, 9)) == "illegal"


def test_failed_cas_on_the_expected_value():
    """A cas that failed while the key held the expected value is illegal."""
    assert verdict(put(1, "x", "a", 0, 1), cas(2, "x", "a", "b", False, 2, 3)) == "illegal"


def test_one_unknown_write_cannot_take_effect_twice():
    """A single timed-out delete can explain one failed cas, not two separated by a put."""
    history = [put(1, "x", "a", 0, 1), delete(2, "x", 1.5, None, ok=None),
               cas(3, "x", "a", "c", False, 2, 3), put(1, "x", "a", 4, 5),
               cas(3, "x", "a", "d", False, 6, 7)]
    assert verdict(*history) == "illegal"
    assert verdict(*history, delete(4, "x", 1.6, None, ok=None)) == "ok"


# --- keys, windows and reports --------------------------------------------------------------

def test_keys_are_checked_separately():
    """Each key gets its own verdict; bad_key is the first illegal key in sorted order."""
    result = check_history([put(1, "b", "1", 0, 1), get(1, "b", "2", 2, 3),
                            put(1, "a", "1", 0, 1), get(1, "a", "1", 2, 3),
                            put(1, "c", "1", 0, 1), get(1, "c", None, 2, 3)])
    assert result.verdict == "illegal"
    assert result.per_key == {"a": "ok", "b": "illegal", "c": "illegal"}
    assert result.bad_key == "b"


def long_prefix(rounds: int) -> list[Operation]:
    """A correct sequential history of alternating writes and reads on key x."""
    ops = []
    for i in range(rounds):
        ops += [put(1, "x", f"v{i}", 4 * i, 4 * i + 1), get(2, "x", f"v{i}", 4 * i + 2, 4 * i + 3)]
    return ops


def test_window_is_the_failing_operation_and_what_overlaps_it():
    """After a long correct prefix, the window holds only the stale read and its overlaps."""
    late = put(3, "x", "late", 199, 210)       # still in flight when the stale read fails
    stale = get(2, "x", "v10", 200, 201)
    sees_late = get(4, "x", "late", 200.2, 200.8)
    result = check_history(long_prefix(50) + [late, stale, sees_late,
                                              get(2, "x", "late", 211, 212)])
    assert result.verdict == "illegal"
    assert result.culprits == [stale]
    assert result.window == [late, stale, sees_late]
    assert (result.window_start, result.window_end) == (200, 201)
    assert result.start_values == {"v49", "late"}
    text = render_window(result)
    assert "not linearizable: key 'x'" in text
    assert "get -> 'v10'   <- cannot be linearized" in text
    assert "put 'late'" in text and "'late' or 'v49'" in text


def test_writes_nothing_could_observe_stay_out_of_the_window():
    """An unknown write whose value nothing reads cannot matter, so it is not shown."""
    stale = get(2, "x", "v10", 200, 201)
    result = check_history(long_prefix(50) + [put(3, "x", "unseen", 150, None), stale])
    assert result.window == [stale]
    assert result.start_values == {"v49"}


def test_window_lists_unknown_operations_pending_from_before():
    """Timed-out writes that may land inside the window are summarised, grouped by effect."""
    lost = [put(4, "x", "v3", 9.5, None, ok=None), put(5, "x", "v3", 9.6, None, ok=None)]
    stale = get(2, "x", "v10", 200, 201)
    result = check_history(long_prefix(50) + lost + [stale])
    assert result.verdict == "illegal"
    assert set(result.window) == {stale, *lost}
    assert result.start_values == {"v49", "v3"}
    assert "put 'v3': 2 of them, called 9.500..9.600 by c4, c5" in render_window(result)


def test_start_values_name_unread_values_as_such():
    """A value nothing reads is reported as UNREAD, and rendered readably."""
    result = check_history([put(1, "x", "a", 0, 1), put(1, "x", "b", 2, 3),
                            get(2, "x", "a", 4, 5)])
    assert result.start_values == {UNREAD}
    assert "a value no operation reads" in render_window(result)


def test_search_gives_up_with_unknown_when_out_of_time():
    """A search over its budget answers "unknown" instead of running on."""
    writes = [put(i, "x", f"v{i}", 0, 10) for i in range(16)]
    ticks = itertools.count()
    result = check_history(writes + [get(99, "x", "ghost", 11, 12), put(1, "y", "1", 0, 1)],
                           timeout_s=5, clock=lambda: next(ticks))
    assert result.verdict == "unknown"
    assert result.per_key == {"x": "unknown", "y": "ok"}
    assert render_window(result) == "undecided: the search ran out of time on keys ['x']"


def test_illegal_beats_unknown():
    """One illegal key makes the whole history illegal even if another key is undecided."""
    writes = [put(i, "x", f"v{i}", 0, 10) for i in range(16)]
    ticks = itertools.count()
    result = check_history(writes + [get(99, "x", "ghost", 11, 12), get(1, "w", "1", 0, 1)],
                           timeout_s=5, clock=lambda: next(ticks))
    assert result.verdict == "illegal" and result.bad_key == "w"


def test_render_ok():
    """An ok result renders as one line."""
    assert render_window(check_history([put(1, "x", "a", 0, 1)])) == \
        "linearizable (1 keys checked)"


# --- input checks and files -----------------------------------------------------------------

@pytest.mark.parametrize("op, message", [
    (O(1, "append", "x", call=0, ret=1), "op must be"),
    (O(1, "get", 5, call=0, ret=1), "key"),
    (O(1, "get", "x", call=2, ret=1), "ret is before call"),
    (O(1, "get", "x", call=math.nan, ret=1), "finite"),
    (O(1, "get", "x", call=0, ret=1, ok=1), "ok must be"),
    (O(1, "put", "x", call=0, ret=1), "put needs"),
    (O(1, "cas", "x", expect="a", value="b", output="yes", call=0, ret=1), "cas's output"),
    (O(1, "get", "x", output=3, call=0, ret=1), "get's output"),
    ("not an operation", "not an Operation"),
])
def test_malformed_operations_are_refused(op, message):
    """check_history names the first malformed operation instead of guessing."""
    with pytest.raises(ValueError, match=message):
        check_history([put(1, "x", "a", 0, 1), op])


def test_dump_and_load_round_trip(tmp_path):
    """A history written as JSON lines reads back equal, ready for replay."""
    history = [put(1, "x", "a", 0, 1.5), get(2, "x", "a", 2, 3), delete(3, "x", 4, None, ok=None),
               cas(4, "x", None, "b", True, 5, 6), get(5, "x", None, 7, 8, ok=False)]
    path = tmp_path / "history.jsonl"
    dump_history(history, path)
    assert len(path.read_text().splitlines()) == len(history)
    assert load_history(path) == history


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "expected an object"),
    ('{"client": 1, "op": "get", "key": "x", "call": 0, "ret": 1, "colour": "red"}',
     "expected an object"),
    ('{"client": 1, "op": "get", "key": "x"}', "not an operation"),
    ("{not json", "not an operation"),
    ('{"client": 1, "op": "get", "key": "x", "call": 5, "ret": 1}', "ret is before call"),
])
def test_load_reports_the_bad_line(tmp_path, line, message):
    """A malformed line is reported with its file and line number."""
    path = tmp_path / "history.jsonl"
    good = json.dumps(dataclasses.asdict(put(1, "x", "a", 0, 1)))
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as raised:
        load_history(path)
    assert ":3" in str(raised.value)


# --- generated histories --------------------------------------------------------------------

@st.composite
def executed_histories(draw, overlap: bool = True, outcomes: bool = True):
    """Operations run one after another on a real map, then given windows around that order.

    Operation i takes effect at instant 10 * i; its call and answer are drawn around that
    instant (apart from one another when ``overlap`` is False). With ``outcomes``, some
    operations fail (no effect) or time out (with or without effect).
    """
    state: dict[str, str] = {}
    ops = []
    for i in range(draw(st.integers(1, 24))):
        at = 10.0 * i
        key = draw(st.sampled_from(["x", "y"]))
        kind = draw(st.sampled_from(["put", "get", "get", "delete", "cas"]))
        value = draw(st.sampled_from(["1", "2", f"u{i}"]))
        spread = 20 if overlap else 4
        call, ret = at - draw(st.integers(0, spread)), at + draw(st.integers(0, spread))
        fate = draw(st.sampled_from(["done"] * 4 + ["failed", "lost", "landed"])
                    if outcomes else st.just("done"))
        takes_effect = fate in ("done", "landed")
        current = state.get(key)
        fields: dict = {}
        if kind == "put":
            fields = {"value": value}
            if takes_effect:
                state[key] = value
        elif kind == "delete":
            if takes_effect:
                state.pop(key, None)
        elif kind == "get":
            fields = {"output": current}
        else:
            expect = draw(st.sampled_from([current, None, "1", "2"]))
            new = draw(st.sampled_from([value, None]))
            fields = {"expect": expect, "expect_absent": expect is None, "value": new,
                      "output": current == expect}
            if takes_effect and current == expect:
                if new is None:
                    state.pop(key, None)
                else:
                    state[key] = new
        unknown = fate in ("lost", "landed")
        ops.append(O(i, kind, key, call=call, ret=None if unknown else ret,
                     ok=False if fate == "failed" else (None if unknown and i % 2 else True),
                     **fields))
    return draw(st.permutations(ops))


@given(executed_histories())
@settings(max_examples=150, deadline=None)
def test_histories_of_a_real_execution_are_linearizable(history):
    """Whatever the windows, outcomes and input order, a real execution passes."""
    assert check_history(history).verdict == "ok"


@given(executed_histories(), st.data())
@settings(max_examples=100, deadline=None)
def test_a_read_of_a_value_nobody_wrote_is_caught(history, data):
    """Changing one completed read to return an unwritten value makes the history illegal."""
    reads = [i for i, op in enumerate(history) if op.op == "get" and op.ok and op.ret is not None]
    assume(reads)
    i = data.draw(st.sampled_from(reads))
    history[i] = dataclasses.replace(history[i], output="never written")
    result = check_history(history)
    assert result.verdict == "illegal"
    assert history[i] in result.window and history[i] in result.culprits


@given(executed_histories(overlap=False, outcomes=False), st.data())
@settings(max_examples=100, deadline=None)
def test_any_changed_output_of_a_sequential_history_is_caught(history, data):
    """Without overlap the order is forced: any other read value or cas outcome is illegal."""
    checked = [i for i, op in enumerate(history) if op.op in ("get", "cas")]
    assume(checked)
    i = data.draw(st.sampled_from(checked))
    op = history[i]
    if op.op == "cas":
        wrong = not op.output
    else:
        wrong = data.draw(st.sampled_from([v for v in (None, "1", "2", "u0") if v != op.output]))
    history[i] = dataclasses.replace(op, output=wrong)
    assert check_history(history).verdict == "illegal"


def brute_force(ops: list[Operation]) -> bool:
    """Linearizability by the definition: try every subset of unknowns and every order."""
    ops = [op for op in ops if op.ok is not False]
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    return all(_brute_force_key(key_ops) for key_ops in by_key.values())


def _brute_force_key(ops: list[Operation]) -> bool:
    definite = [op for op in ops if not op.unknown]
    unknown = [op for op in ops if op.unknown]
    end = {id(op): math.inf if op.unknown else op.ret for op in ops}
    for size in range(len(unknown) + 1):
        for took_effect in itertools.combinations(unknown, size):
            for order in itertools.permutations(definite + list(took_effect)):
                if any(end[id(later)] < earlier.call
                       for i, earlier in enumerate(order) for later in order[i + 1:]):
                    continue
                if _legal_sequence(order):
                    return True
    return False


def _legal_sequence(order) -> bool:
    value = None
    for op in order:
        if op.op == "put":
            value = op.value
        elif op.op == "delete":
            value = None
        elif op.op == "get":
            if not op.unknown and op.output != value:
                return False
        else:
            matches = value == (None if op.expect_absent else op.expect)
            if not op.unknown and op.output != matches:
                return False
            if matches:
                value = op.value
    return True


@st.composite
def small_histories(draw):
    """Up to six arbitrary operations on one or two keys, with ties, unknowns and failures."""
    ops = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["put", "get", "delete", "cas"]))
        read = st.sampled_from([None, "1", "2"])
        call = draw(st.integers(0, 6))
        ret = call + draw(st.integers(0, 4))
        ok = draw(st.sampled_from([True, True, True, None, False]))
        if ok and draw(st.integers(0, 5)) == 0:
            ret = None
        fields: dict = {}
        if kind == "put":
            fields = {"value": draw(st.sampled_from(["1", "2", "3"]))}
        elif kind == "get":
            fields = {"output": draw(read)}
        elif kind == "cas":
            expect = draw(read)
            fields = {"expect": expect, "expect_absent": expect is None,
                      "value": draw(st.sampled_from([None, "1", "2", "3"])),
                      "output": draw(st.booleans())}
        ops.append(O(i, kind, draw(st.sampled_from(["x", "x", "y"])), call=call, ret=ret,
                     ok=ok, **fields))
    return ops


@given(small_histories())
@settings(max_examples=400, deadline=None)
def test_checker_agrees_with_the_definition(history):
    """On small histories the verdict is exactly that of trying every order."""
    assert (check_history(history).verdict == "ok") == brute_force(history)


@given(small_histories())
@settings(max_examples=300, deadline=None)
def test_exact_search_agrees_with_the_definition(history):
    """The exact search (used when unknowns of one kind would be reused) is right on its own."""
    keys = {op.key for op in history}
    exact = all(_search(_prepare([op for op in history if op.key == key]), math.inf,
                        lambda: 0.0, exact=True) for key in keys)
    assert exact == brute_force(history)


# --- larger histories -----------------------------------------------------------------------

def concurrent_history(rng: random.Random, ops: int, keys: int, clients: int,
                       p_unknown: float = 0.0, p_failed: float = 0.0) -> list[Operation]:
    """A history of clients each running one operation at a time against a correct map."""
    plans = []
    for client in range(clients):
        t = rng.random()
        for _ in range(ops // clients):
            call = t + rng.random() * 0.5
            effect = call + rng.random() * 2
            t = effect + rng.random() * 2
            plans.append((effect, client, call, t))
    state: dict[str, str] = {}
    history = []
    for i, (_, client, call, ret) in enumerate(sorted(plans)):
        key, kind = f"k{rng.randrange(keys)}", rng.choice(["put", "get", "get", "delete", "cas"])
        draw = rng.random()
        unknown, failed = draw < p_unknown, p_unknown <= draw < p_unknown + p_failed
        applies = not failed and not (unknown and rng.random() < 0.5)
        current, fields = state.get(key), {}
        if kind == "put":
            fields = {"value": f"c{client}-{i}"}
            if applies:
                state[key] = fields["value"]
        elif kind == "delete" and applies:
            state.pop(key, None)
        elif kind == "get":
            fields = {"output": current}
        elif kind == "cas":
            expect = current if rng.random() < 0.5 else rng.choice([None, "c0-0"])
            fields = {"expect": expect, "expect_absent": expect is None,
                      "value": f"c{client}-{i}", "output": current == expect}
            if applies and current == expect:
                state[key] = fields["value"]
        history.append(O(client, kind, key, call=call, ret=None if unknown else ret,
                         ok=False if failed else True, **fields))
    return history


def test_ten_thousand_operations_over_a_hundred_keys():
    """A 10-client history of 10,000 operations over 100 keys, with timeouts, passes."""
    history = concurrent_history(random.Random(1), 10_000, 100, 10, p_unknown=0.03,
                                 p_failed=0.03)
    result = check_history(history, timeout_s=60)
    assert result.verdict == "ok" and len(result.per_key) == 100


def test_a_thousand_operations_on_one_key_with_timeouts():
    """One key with 1,000 operations and 5% timeouts is decided both ways, not left unknown."""
    history = concurrent_history(random.Random(3), 1_000, 1, 10, p_unknown=0.05, p_failed=0.02)
    assert check_history(history, timeout_s=60).verdict == "ok"
    reads = [i for i, op in enumerate(history) if op.op == "get" and op.ok and op.ret]
    middle = reads[len(reads) // 2]
    history[middle] = dataclasses.replace(history[middle], output="never written")
    result = check_history(history, timeout_s=60)
    assert result.verdict == "illegal"
    assert result.culprits == [history[middle]]
    assert len([op for op in result.window if not op.unknown]) <= 20
