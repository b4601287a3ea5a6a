"""A linearizability checker for histories of the KV API (put, get, delete, cas).

A history is linearizable (Herlihy and Wing, 1990) if every operation can be given one instant
between its call and its return such that, taken in the order of those instants, the operations
are a legal sequential execution of one key-value map. The model and the search follow porcupine
(Athalye): the history is split per key, because linearizability is local (Herlihy and Wing
§3.3, "locality"), and each key is searched with the Wing-Gong-Lowe algorithm (Lowe, "Testing for
linearizability", 2017), memoising the states explored so that none is explored twice, with
reductions that keep timed-out operations from blowing the search up (see _search). Each key's
search has a time budget and answers "unknown" rather than hang.

Outcomes recorded by a client:

* ``ok=True`` with a ``ret`` time: the operation completed with ``output``.
* ``ok=False``: a definite failure; the operation did not take effect and is dropped.
* ``ok=None`` or ``ret=None``: the outcome is unknown (a timeout). The operation may take effect
  at any instant after its call, or never; its output is not checked. A read with an unknown
  outcome constrains nothing and is dropped.

Outputs: a get returns the value read (None when absent); a cas returns whether it succeeded;
puts and deletes return nothing that is checked. A cas with ``expect_absent`` or with ``expect``
None requires the key to be absent; its ``value`` None deletes the key on success.

See docs/guarantees.md for what the project promises and how to read a report.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CheckResult", "Operation", "UNREAD", "check_history", "dump_history", "load_history",
           "render_window"]

OPS = ("put", "get", "delete", "cas")
_INF = math.inf


class _Unread:
    """The type of UNREAD."""

    def __repr__(self) -> str:
        return "<a value no operation reads>"


#: Stands for any written value that no read returned and no cas expected (in start_values).
UNREAD = _Unread()
# The search consults the clock once per this many steps.
_CLOCK_STRIDE = 256


@dataclass(frozen=True)
class Operation:
    """One client operation as observed by the client.

    Attributes:
        client: The id of the client that issued it (for reports only).
        op: ``"put"``, ``"get"``, ``"delete"`` or ``"cas"``.
        key: The key operated on.
        value: The value a put writes, or a cas writes on success (None = delete).
        expect: The value a cas requires.
        expect_absent: A cas that requires the key to be absent.
        output: A get's value read, or a cas's success flag.
        call: When the client sent the request.
        ret: When the client got the answer, or None if it never did.
        ok: True = completed, False = definitely did not take effect, None = unknown.
    """

    client: int
    op: str
    key: str
    _: KW_ONLY
    value: str | None = None
    expect: str | None = None
    expect_absent: bool = False
    output: Any = None
    call: float
    ret: float | None
    ok: bool | None = True

    @property
    def unknown(self) -> bool:
        """Whether the outcome is unknown (no answer, or an answer that does not tell)."""
        return self.ok is None or self.ret is None


@dataclass
class CheckResult:
    """The verdict on a history.

    Attributes:
        verdict: ``"ok"``, ``"illegal"`` or ``"unknown"`` (a key's search ran out of time and
            no key was illegal).
        per_key: Each key's verdict.
        bad_key: The first illegal key in sorted order, or None.
        window: For ``bad_key``, the smallest bad window (see :func:`check_history`), in call
            order; the key's whole history if the window search ran out of time.
        culprits: The operations of ``window`` whose answer first made the history illegal.
        start_values: The values the key may hold when the window starts (None = absent,
            UNREAD = a value that no operation reads), or None if not computed in time.
        window_start: When the first culprit was called.
        window_end: The time of the culprits' answer; answers after it are not part of the
            window's evidence.
    """

    verdict: str
    per_key: dict[str, str]
    bad_key: str | None = None
    window: list[Operation] = field(default_factory=list)
    culprits: list[Operation] = field(default_factory=list)
    start_values: frozenset[Any] | None = None
    window_start: float | None = None
    window_end: float | None = None


def check_history(ops: Iterable[Operation], *, timeout_s: float = 10.0,
                  clock: Callable[[], float] = time.monotonic) -> CheckResult:
    """Check a history of KV operations for linearizability, key by key.

    For an illegal key the result also carries the smallest bad window. Its end is the
    earliest answer after which the key's history is already illegal (operations answered later
    count as unknown up to there); the answering operations are the culprits. It starts when
    the first culprit was called and holds every operation called from then to its end, and
    every operation still in flight when it starts. No order of the window's operations is legal from any state the key
    may be in at its start: ``start_values`` lists the values it may hold there.

    Args:
        ops: The operations, in any order.
        timeout_s: The search budget for each key (the window of an illegal key gets another
            such budget).
        clock: Monotonic seconds, for the budget.

    Returns:
        The verdict, per key and overall.

    Raises:
        ValueError: An operation is malformed (unknown op, wrong types, ret before call).
    """
    by_key: dict[str, list[Operation]] = {}
    for position, op in enumerate(ops):
        _validate(position, op)
        by_key.setdefault(op.key, []).append(op)
    result = CheckResult(verdict="ok", per_key={})
    for key in sorted(by_key):
        key_ops = by_key[key]
        progress = [-_INF]
        found = _search(_prepare(key_ops), clock() + timeout_s, clock, progress=progress)
        verdict = {True: "ok", False: "illegal", None: "unknown"}[found]
        result.per_key[key] = verdict
        if verdict == "illegal" and result.bad_key is None:
            result.bad_key = key
            _find_window(result, key_ops, progress[0], clock() + timeout_s, clock)
    verdicts = set(result.per_key.values())
    result.verdict = "illegal" if "illegal" in verdicts else (
        "unknown" if "unknown" in verdicts else "ok")
    return result


def _validate(position: int, op: Any) -> None:
    """Raise ValueError unless ``op`` is a well-formed Operation."""
    def bad(why: str) -> ValueError:
        return ValueError(f"operation {position} ({op!r}): {why}")

    if not isinstance(op, Operation):
        raise bad("not an Operation")
    if op.op not in OPS:
        raise bad(f"op must be one of {', '.join(OPS)}")
    if not isinstance(op.key, str):
        raise bad("key must be a string")
    if not _is_time(op.call) or (op.ret is not None and not _is_time(op.ret)):
        raise bad("call and ret must be finite numbers")
    if op.ret is not None and op.ret < op.call:
        raise bad("ret is before call")
    if not (op.ok is None or type(op.ok) is bool) or type(op.expect_absent) is not bool:
        raise bad("ok must be True, False or None and expect_absent a bool")
    if op.op == "put" and not isinstance(op.value, str):
        raise bad("a put needs a string value")
    if op.op == "cas" and not all(v is None or isinstance(v, str) for v in (op.value, op.expect)):
        raise bad("a cas's value and expect must be strings or None")
    if op.unknown or op.ok is False:
        return
    if op.op == "get" and not (op.output is None or isinstance(op.output, str)):
        raise bad("a get's output must be a string or None")
    if op.op == "cas" and type(op.output) is not bool:
        raise bad("a cas's output must be a bool")


def _is_time(t: Any) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)


# --- the model ------------------------------------------------------------------------------

_READ, _WRITE, _CAS, _BARRIER = range(4)


class _Op:
    """An operation ready for the search: what it does to the value and what it saw."""

    __slots__ = ("source", "kind", "arg", "target", "output", "call", "ret", "unknown")

    def __init__(self, source: Operation | None, kind: int, arg: str | None, target: str | None,
                 output: Any, call: float, ret: float, unknown: bool) -> None:
        self.source, self.kind, self.arg, self.target = source, kind, arg, target
        self.output, self.call, self.ret, self.unknown = output, call, ret, unknown

    @classmethod
    def of(cls, op: Operation, unknown: bool) -> _Op:
        ret = _INF if unknown else op.ret
        if op.op == "get":
            return cls(op, _READ, None, None, op.output, op.call, ret, unknown)
        if op.op in ("put", "delete"):
            return cls(op, _WRITE, op.value if op.op == "put" else None, None, None, op.call,
                       ret, unknown)
        target = None if op.expect_absent else op.expect
        return cls(op, _CAS, op.value, target, op.output, op.call, ret, unknown)


def _step(value: str | None, op: _Op) -> tuple[bool, str | None]:
    """Apply ``op`` to the key's value: (whether its output is legal, the new value)."""
    kind = op.kind
    if kind == _WRITE:
        return True, op.arg
    if kind == _READ:
        return op.output == value, value
    if kind == _CAS:
        matches = value == op.target
        if op.unknown or op.output == matches:
            return True, (op.arg if matches else value)
    return False, value


def _prepare(ops: list[Operation], upto: float | None = None) -> list[_Op]:
    """Turn one key's operations into search input, optionally cut at time ``upto``.

    In a cut history, operations called after ``upto`` are left out and those answered after it
    count as unknown: whatever made the full history illegal, the earliest such cut shows it.
    """
    prepared = []
    for op in ops:
        if op.ok is False or (upto is not None and op.call > upto):
            continue
        unknown = op.unknown or (upto is not None and op.ret > upto)
        if unknown and op.op == "get":
            continue
        prepared.append(_Op.of(op, unknown))
    prepared = _drop_unobserved_writes(prepared)
    _bound_sole_producers(prepared)
    _merge_unread_values(prepared)
    return prepared


def _drop_unobserved_writes(ops: list[_Op]) -> list[_Op]:
    """Leave out unknown-outcome puts and deletes that nothing could have observed.

    Timed-out writes are what makes the search exponential: each may take effect at any later
    instant. Such a write W (value v) can be dropped when no operation that may follow it reads
    v, no cas that may follow it matches v, and no completed cas that may follow it failed.
    Then in any linearization containing W, the operations between W and the next write are
    unknown cas that do nothing on v; moving those to the end and dropping W changes no output.
    Conversely a linearization without W stays one with W appended at the end, since W's answer
    never came.
    """
    last_read: dict[str | None, float] = {}
    last_match: dict[str | None, float] = {}
    last_failed_cas = -_INF
    for op in ops:
        if op.kind == _READ:
            last_read[op.output] = max(last_read.get(op.output, -_INF), op.ret)
        elif op.kind == _CAS:
            last_match[op.target] = max(last_match.get(op.target, -_INF), op.ret)
            if not op.unknown and op.output is False:
                last_failed_cas = max(last_failed_cas, op.ret)

    def observable(w: _Op) -> bool:
        return (last_read.get(w.arg, -_INF) >= w.call or last_match.get(w.arg, -_INF) >= w.call
                or last_failed_cas >= w.call)

    return [op for op in ops if not (op.kind == _WRITE and op.unknown and not observable(op))]


def _bound_sole_producers(ops: list[_Op]) -> None:
    """Give an unknown-outcome write a deadline when it alone could produce a value read later.

    If W is the only operation that writes v, every completed read of v (and successful cas
    expecting v) must come after W, so W must be linearized before the first of them returns:
    the history with that return time for W has exactly the same linearizations. Histories whose
    clients write unique values therefore pay for a timed-out write only until it is observed.
    """
    producers: dict[str, int] = {}
    for op in ops:
        if op.kind in (_WRITE, _CAS) and op.arg is not None:
            producers[op.arg] = producers.get(op.arg, 0) + 1
    first_need: dict[str, float] = {}
    for op in ops:
        if op.unknown:
            continue
        if op.kind == _READ and op.output is not None:
            needed = op.output
        elif op.kind == _CAS and op.output is True and op.target is not None:
            needed = op.target
        else:
            continue
        first_need[needed] = min(first_need.get(needed, _INF), op.ret)
    for op in ops:
        deadline = first_need.get(op.arg, _INF) if op.arg is not None else _INF
        if (op.unknown and op.ret == _INF and producers.get(op.arg) == 1
                and op.call <= deadline < _INF):
            op.ret = deadline


def _merge_unread_values(ops: list[_Op]) -> None:
    """Replace every written value that no operation compares against by UNREAD.

    The model only ever compares the value with a read's output or a cas's expectation, so
    values that are neither are indistinguishable: merging them loses nothing and lets the
    search treat, say, forty timed-out writes of never-read values as forty equal ones.
    """
    compared = {op.output for op in ops if op.kind == _READ}
    compared.update(op.target for op in ops if op.kind == _CAS)
    for op in ops:
        if op.arg is not None and op.arg not in compared:
            op.arg = UNREAD


# --- the search -----------------------------------------------------------------------------

_NO_DUTY = object()    # the search state after a linearization that owes nothing


def _differs(op: _Op, value: Any, before: Any) -> bool:
    """Whether the lazy ``op`` acts differently at ``value`` than at ``before``.

    Lazy operations are writes, which act the same everywhere, and cas, which act according to
    whether their expectation matches.
    """
    return op.kind == _CAS and (op.target == value) != (op.target == before)


def _search(ops: list[_Op], deadline: float, clock: Callable[[], float], *,
            exact: bool = False, seen_at_barrier: set | None = None,
            progress: list[float] | None = None) -> bool | None:
    """Wing-Gong-Lowe search: True if linearizable, False if not, None if out of time.

    The history is a doubly linked list of call and return events in time order (a call before
    a return at the same instant, so that touching operations count as concurrent). An
    operation may be linearized next when its call comes before the first return left in the
    list; linearizing it lifts its two events out of the list. Reaching a return means the
    operation it belongs to can no longer be placed: undo the last choice and try the next.
    Search states already explored are remembered and not explored again.

    Three reductions keep histories with concurrency and timeouts tractable; each keeps at
    least one linearization whenever there is one:

    * Forced moves: an operation that leaves the value as it is and whose output is legal now
      (a read of the current value, a failed cas) is linearized at once, with no alternative.
      Everything that had to precede it already has, and placing it earlier changes no other
      operation's view.
    * Lazy unknowns: an operation with unknown outcome and no answer ("lazy") need not be
      linearized at all (it may take effect after everything else), so it is linearized only
      if it changes the value and the next operation then needs that change (is legal or acts
      differently only because of it): the search state's "duty". Any linearization can be
      rewritten to that form by moving such operations later, which their missing answer
      always allows. Lazy operations are kept out of the list: one may be used once it has
      been called, that is, called no later than the first answer still in the list.
    * Interchangeable unknowns: lazy operations with the same effect (a "kind") differ only in
      their call times. The search first lets a kind be used as often as needed, which can
      only admit more histories: a failure is final, and a success is accepted if no kind was
      used, at any point, more often than it had been called by then. Otherwise the exact
      search runs, which uses each kind's operations in call order and counts the uses; a
      state that used at least as many of every kind as an explored state with the same
      completed operations, value and duty is covered by it.

    A _BARRIER operation never linearizes; the value at each attempt is added to
    ``seen_at_barrier``, which makes the search enumerate every value reachable there.
    ``progress[0]`` is raised to the latest first-answer-in-the-list any state had: the cut
    at the answer before it is linearizable (if the search was exact), which tells where the
    first illegal cut is likely to be.
    """
    lazy_kinds: dict[tuple, int] = {}
    kinds: list[_Op] = []                    # one operation standing for each lazy kind
    members: list[list[float]] = []          # each lazy kind's call times, in order
    listed: list[_Op] = []
    every_op = ops
    for op in sorted(ops, key=lambda o: o.call):
        if op.unknown and op.ret == _INF:
            k = lazy_kinds.setdefault((op.kind, op.arg, op.target), len(kinds))
            if k == len(kinds):
                kinds.append(op)
                members.append([])
            members[k].append(op.call)
        else:
            listed.append(op)
    ops = listed
    n = len(ops)
    events = sorted([(op.call, 0, i) for i, op in enumerate(ops)]
                    + [(op.ret, 1, i) for i, op in enumerate(ops)])
    head = 2 * n                   # node ids: 0..2n-1 events (2i call, 2i+1 return), 2n head
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    node = head
    for _, is_return, i in events:
        event = 2 * i + is_return
        nxt[node], prv[event] = event, node
        node = event
    neutral = [op.kind == _READ or (op.kind == _CAS and not op.unknown and op.output is False)
               for op in ops]

    def lift(call: int) -> None:
        for event in (call, call + 1):
            nxt[prv[event]] = nxt[event]
            if nxt[event] != -1:
                prv[nxt[event]] = prv[event]

    def unlift(call: int) -> None:
        for event in (call + 1, call):
            nxt[prv[event]] = event
            if nxt[event] != -1:
                prv[nxt[event]] = event

    def covered(state: tuple, used: tuple) -> bool:
        """Whether an explored state covers this one; if not, remember this one."""
        if not exact:
            size = len(seen)
            seen.add(state)
            return len(seen) == size
        explored = counted.setdefault(state, [])
        if any(all(a <= b for a, b in zip(other, used)) for other in explored):
            return True
        explored.append(used)
        return False

    todo, value, duty, done, steps = n, None, _NO_DUTY, 0, 0
    used, n_kinds = (0,) * len(kinds), len(kinds)
    seen: set[tuple] = set()                 # explored states (relaxed search)
    counted: dict[tuple, list[tuple]] = {}   # explored states -> their uses (exact search)
    # One entry per move: (listed call event or -1 - lazy kind, value, duty, used, forced,
    # the time of the first answer in the list when the move was made).
    stack: list[tuple] = []
    # A state's candidates are tried in two passes: the listed operations (``event`` walks the
    # list), then the lazy kinds (``kind`` counts up), so that linearizations are looked for
    # with as few unknowns as they need.
    event, kind, horizon, fresh = head, -1, _INF, True
    while todo:
        steps += 1
        if steps % _CLOCK_STRIDE == 0 and clock() > deadline:
            return None
        chosen, forced, new_value = None, False, value
        if fresh:                                        # first visit: look for a forced move
            fresh, kind = False, -1
            event = nxt[head]
            while event % 2 == 0:
                op = ops[event // 2]
                if neutral[event // 2] and (op.output == value if op.kind == _READ
                                            else op.target != value):
                    chosen, forced = event, True
                    break
                event = nxt[event]
            if not forced:
                event = nxt[head]
                continue
        elif kind == -1 and event % 2 == 0:              # pass 1: a listed candidate
            # (_step and _differs written out: this is the innermost loop.) A neutral
            # operation legal here would have been forced, so neutral ones are skipped.
            op = ops[event // 2]
            if neutral[event // 2]:
                pass
            elif op.kind == _WRITE:
                if duty is _NO_DUTY:
                    chosen, new_value = event, op.arg
            elif op.kind == _CAS:                        # completed ones here succeeded
                matches = value == op.target
                if (matches or op.unknown) and (
                        duty is _NO_DUTY or matches != (duty == op.target)):
                    chosen, new_value = event, (op.arg if matches else value)
            elif op.kind == _BARRIER:
                seen_at_barrier.add(value)
        elif kind == -1:                                 # end of pass 1
            horizon, kind = ops[event // 2].ret, 0
            if progress is not None and horizon > progress[0]:
                progress[0] = horizon
            continue
        elif kind < n_kinds:                             # pass 2: a lazy kind
            op = kinds[kind]
            if op.call > horizon:        # kinds come by first call: no later one is called yet
                kind = n_kinds
                continue
            _, new_value = _step(value, op)
            if (new_value != value and (duty is _NO_DUTY or _differs(op, value, duty))
                    and (not exact or used[kind] < bisect.bisect_right(members[kind], horizon))):
                chosen = -1 - kind
        if chosen is not None:
            new_duty, new_done, new_used = _NO_DUTY, done, used
            if chosen >= 0:
                new_done = done | (1 << (chosen // 2))
            else:
                new_duty = value
                if exact:
                    new_used = used[:kind] + (used[kind] + 1,) + used[kind + 1:]
            if not covered((new_done, new_value, new_duty), new_used):
                stack.append((chosen, value, duty, used, forced, horizon))
                value, duty, done, used = new_value, new_duty, new_done, new_used
                if chosen >= 0:
                    lift(chosen)
                    todo -= 1
                fresh = True
                continue
        if not forced and kind == -1:
            event = nxt[event]
            continue
        if not forced and kind < n_kinds:
            kind += 1
            continue
        while True:              # no candidate left, or a forced move explored before: back up
            if not stack:
                return False
            chosen, value, duty, used, forced, horizon = stack.pop()
            if chosen >= 0:
                done &= ~(1 << (chosen // 2))
                unlift(chosen)
                todo += 1
            if not forced:                               # a forced move has no alternative
                break
        if chosen >= 0:
            event, kind = nxt[chosen], -1
        else:
            kind = -chosen                               # the next kind after -1 - kind
    if exact or not kinds or _enough_issued(stack, members):
        return True
    return _search(every_op, deadline, clock, exact=True, progress=progress)


def _enough_issued(moves: list[tuple], members: list[list[float]]) -> bool:
    """Whether a linearization found with reused lazy kinds can give each use its own operation.

    ``moves`` are the search's stack entries (see _search). A use may be served by any
    operation of its kind called no later than the move's horizon; the horizons only grow along
    the linearization, so every use can have its own operation exactly when the j-th use of
    each kind has at least j operations of that kind called by its horizon.
    """
    uses = [0] * len(members)
    for chosen, *_, horizon in moves:
        if chosen < 0:
            uses[-1 - chosen] += 1
            if uses[-1 - chosen] > bisect.bisect_right(members[-1 - chosen], horizon):
                return False
    return True


# --- the smallest bad window ----------------------------------------------------------------

def _find_window(result: CheckResult, ops: list[Operation], hint: float, deadline: float,
                 clock: Callable[[], float]) -> None:
    """Fill in ``result``'s window for an illegal key (see check_history).

    ``hint`` is the search's progress on the whole history: the first illegal cut is usually
    at the first answer from there, which two searches confirm; otherwise it is bisected for.
    """
    result.window = sorted(ops, key=lambda o: (o.call, o.client))
    answers = sorted({op.ret for op in ops if not op.unknown and op.ok})
    if not answers:
        return
    # Cuts only gain constraints as the cut moves later (an operation answered after the cut
    # is unknown in it), so there is one earliest illegal cut; the last cut is illegal because
    # the whole history is.
    last = len(answers) - 1
    verdicts: dict[int, bool | None] = {last: True}

    def illegal(k: int) -> bool | None:
        """Whether the history cut at answer k is illegal (None: out of time)."""
        if k not in verdicts:
            found = _search(_prepare(ops, answers[k]), deadline, clock)
            verdicts[k] = None if found is None else not found
        return verdicts[k]

    lo, hi = 0, last             # the earliest illegal cut is in [lo, hi]; hi is illegal
    guess = min(bisect.bisect_left(answers, hint), last)
    if illegal(guess) is None or (guess > 0 and illegal(guess) and illegal(guess - 1) is None):
        return
    if not illegal(guess):
        lo = guess + 1
    elif guess == 0 or not illegal(guess - 1):
        lo = hi = guess
    else:
        hi = guess - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if illegal(mid) is None:
            return
        lo, hi = (lo, mid) if illegal(mid) else (mid + 1, hi)
    end = answers[lo]
    cut = _prepare(ops, end)
    culprits = [op for op in cut if not op.unknown and op.ret == end]
    start = min(op.call for op in culprits)
    barrier = _Op(None, _BARRIER, None, None, None, start, start, False)
    seen: set[Any] = set()
    if _search([op for op in cut if op.call < start] + [barrier], deadline, clock,
               seen_at_barrier=seen) is not None:
        result.start_values = frozenset(seen)
    inside = {id(op.source) for op in cut if op.ret >= start}
    result.window = [op for op in result.window if id(op) in inside]
    result.culprits = [op.source for op in culprits]
    result.window_start, result.window_end = start, end


# --- reports and files ----------------------------------------------------------------------

def render_window(result: CheckResult, width: int = 40) -> str:
    """Render a check result as text: for an illegal history, a timeline of its bad window.

    Each operation of the window is a bar from its call to its answer (``<`` when called
    before the window, ``>`` when answered after it or never). Operations with unknown outcome
    pending since before the window are summarised below the timeline, grouped by effect.
    """
    if result.verdict == "ok":
        return f"linearizable ({len(result.per_key)} keys checked)"
    if result.verdict == "unknown":
        undecided = sorted(k for k, v in result.per_key.items() if v == "unknown")
        return f"undecided: the search ran out of time on keys {undecided}"
    lines = [f"not linearizable: key {result.bad_key!r}"]
    start, end = result.window_start, result.window_end
    if start is None or end is None:
        lines.append("(no time left to narrow it down: the key's whole history follows)")
        start = min((op.call for op in result.window), default=0.0)
        end = max((op.ret for op in result.window if op.ret is not None), default=start)
    else:
        lines.append(f"window: {start:.3f} (the call of the operation marked below) to "
                     f"{end:.3f} (its answer); no order of these operations is legal from "
                     "any state the key may be in at the start")
    if result.start_values is not None:
        values = " or ".join(sorted(_show(v) for v in result.start_values)) or "none"
        lines.append(f"value at the start of the window: {values}")
    pending = [op for op in result.window if op.call < start and op.unknown]
    scale = (width - 1) / (end - start) if end > start else 0.0
    culprits = {id(op) for op in result.culprits}
    for op in result.window:
        if op.call < start and op.unknown:
            continue
        lo = max(0, round((op.call - start) * scale))
        late = op.ret is None or op.ret > end
        hi = width - 1 if late else min(width - 1, round((op.ret - start) * scale))
        bar = " " * lo + ("<" if op.call < start else "[") + "=" * max(0, hi - lo - 1) + (
            ">" if late else "]")
        when = f"{op.call:.3f}..{'?' if op.ret is None else f'{op.ret:.3f}'}"
        note = "   <- cannot be linearized" if id(op) in culprits else ""
        lines.append(f"  c{op.client:<4} {bar:<{width + 1}} {when:<21} {_describe(op)}{note}")
    if pending:
        lines.append("pending since before the window with unknown outcome (each may take "
                     "effect at any point, or never):")
        groups: dict[str, list[Operation]] = {}
        for op in pending:
            groups.setdefault(_describe(op), []).append(op)
        for what, ops in groups.items():
            clients = ", ".join(f"c{c}" for c in sorted({op.client for op in ops}))
            calls = f"{ops[0].call:.3f}" if len(ops) == 1 else (
                f"{len(ops)} of them, called {ops[0].call:.3f}..{ops[-1].call:.3f}")
            lines.append(f"  {what.removesuffix(' (outcome unknown)')}: {calls} by {clients}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return "absent" if value is None else repr(value)


def _describe(op: Operation) -> str:
    if op.op == "get":
        what = f"get -> {_show(op.output)}"
    elif op.op == "put":
        what = f"put {op.value!r}"
    elif op.op == "delete":
        what = "delete"
    else:
        expect = "absent" if op.expect_absent or op.expect is None else repr(op.expect)
        new = "delete" if op.value is None else repr(op.value)
        outcome = "" if op.unknown else (" ok" if op.output else " failed")
        what = f"cas {expect} -> {new}{outcome}"
    return what + (" (outcome unknown)" if op.unknown else "")


def dump_history(ops: Iterable[Operation], path: str | Path) -> None:
    """Write operations to ``path`` as JSON lines, one operation per line."""
    with open(path, "w", encoding="utf-8") as f:
        for op in ops:
            f.write(json.dumps(asdict(op), separators=(",", ":")) + "\n")


def load_history(path: str | Path) -> list[Operation]:
    """Read operations written by :func:`dump_history`.

    Raises:
        ValueError: A line is not a JSON object with Operation's fields.
    """
    names = {f.name for f in fields(Operation)}
    ops = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not record.keys() <= names:
                    raise ValueError(f"expected an object with fields from {sorted(names)}")
                op = Operation(**record)
                _validate(number, op)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not an operation: {exc}") from None
            ops.append(op)
    return ops
