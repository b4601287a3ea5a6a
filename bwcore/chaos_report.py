"""What a chaos run found: the verdict, lost writes, availability, and the summary printed.

Two checks decide the verdict:

1. Linearizability of the whole history, final reads included
   (:func:`bwcore.linearizability.check_history`).
2. No lost acknowledged write (:func:`lost_writes`): after the faults stop and the cluster
   heals, every key is read; a write the cluster acknowledged is lost when the value finally
   read could only have been written before that write even began. This is implied by (1),
   but it is the promise users care about most, so it is checked and reported on its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bwcore.chaos_nemesis import FaultEvent
from bwcore.linearizability import CheckResult, Operation, render_window

__all__ = ["FINAL_READER", "Availability", "availability", "lost_writes", "render_summary",
           "summarize"]

#: The client id of the final reads in a history file.
FINAL_READER = -1
#: A stretch without any successful operation longer than this is an availability gap.
GAP_SECONDS = 1.0


def _takes_effect(op: Operation) -> bool:
    """Whether ``op`` is a write that may have changed its key (acknowledged or unknown)."""
    if op.op in ("put", "delete"):
        return op.ok is not False
    if op.op == "cas":
        return op.unknown or (op.ok is True and op.output is True)
    return False


def _acknowledged_write(op: Operation) -> bool:
    if op.unknown or op.ok is not True:
        return False
    return op.op in ("put", "delete") or (op.op == "cas" and op.output is True)


def _written(op: Operation) -> str | None:
    return None if op.op == "delete" else op.value


def lost_writes(history: Iterable[Operation]) -> list[Operation]:
    """Acknowledged writes that the final reads prove lost.

    For each key, the last final read (client :data:`FINAL_READER`) gives the value ``v`` the
    cluster ended with. The operations that could have left ``v`` are the writes of ``v``
    (acknowledged or with unknown outcome), and for an absent key also the initial state. An
    acknowledged write W is lost when every such operation had already returned before W was
    called: W then certainly came after all of them, yet its effect is gone.
    """
    ops = list(history)
    final: dict[str, Operation] = {}
    for op in ops:
        if op.client == FINAL_READER and op.op == "get" and op.ok is True and not op.unknown:
            if op.key not in final or op.ret >= final[op.key].ret:  # type: ignore[operator]
                final[op.key] = op
    lost = []
    for key, read in final.items():
        value = read.output
        writes = [op for op in ops if op.key == key and op.client != FINAL_READER]
        producers = [op for op in writes if _takes_effect(op) and _written(op) == value]
        # The last moment at which a producer may take effect (an unknown one: any time).
        latest = max((math.inf if op.unknown else op.ret for op in producers),
                     default=-math.inf if value is None else None)
        if latest is None:
            continue  # a value nobody wrote: the linearizability check reports it
        for op in writes:
            if _acknowledged_write(op) and _written(op) != value and latest < op.call:
                lost.append(op)
    return sorted(lost, key=lambda o: o.call)


@dataclass
class Availability:
    """When the cluster served nothing.

    Attributes:
        gaps: ``(start, length)`` of every stretch longer than :data:`GAP_SECONDS` without a
            successful operation, in the fault phase.
        after_leader_kill: For each SIGKILL of the leader, seconds from the kill to the next
            acknowledged write.
        after_leader_loss: The same for every fault that took the leader out (kill, pause, or a
            partition leaving it without a majority).
    """

    gaps: list[tuple[float, float]] = field(default_factory=list)
    after_leader_kill: list[float] = field(default_factory=list)
    after_leader_loss: list[float] = field(default_factory=list)


def availability(history: Sequence[Operation], events: Sequence[FaultEvent],
                 start: float, end: float) -> Availability:
    """Measure availability gaps between ``start`` and ``end`` (the fault phase)."""
    done = sorted(op.ret for op in history
                  if op.ok is True and op.ret is not None and op.client != FINAL_READER)
    result = Availability()
    previous = start
    for t in [t for t in done if start <= t <= end] + [end]:
        if t - previous > GAP_SECONDS:
            result.gaps.append((round(previous, 3), round(t - previous, 3)))
        previous = max(previous, t)
    writes = sorted(op.ret for op in history if _acknowledged_write(op)
                    and op.client != FINAL_READER)
    for event in events:
        if not event.hit_leader:
            continue
        # An answer within 10 ms of the fault may have left before it: not evidence of a
        # new leader.
        after = next((t for t in writes if t > event.start + 0.01), None)
        if after is None:
            continue
        wait = round(after - event.start, 3)
        result.after_leader_loss.append(wait)
        if event.kind == "kill":
            result.after_leader_kill.append(wait)
    return result


def summarize(*, history: Sequence[Operation], check: CheckResult, lost: Sequence[Operation],
              events: Sequence[FaultEvent], avail: Availability, problems: Sequence[str],
              settings: dict[str, Any]) -> dict[str, Any]:
    """The run's summary (written as summary.json, printed by :func:`render_summary`)."""
    if check.verdict == "illegal" or lost:
        verdict = "violation"
    elif check.verdict != "ok":
        verdict = "undecided"
    elif problems:
        verdict = "incomplete"  # no recovery, unreadable keys, a client or fault that failed
    else:
        verdict = "ok"
    outcome = Counter("unknown" if op.unknown else ("ok" if op.ok else "fail")
                      for op in history if op.client != FINAL_READER)
    kinds = Counter(op.op for op in history if op.client != FINAL_READER)
    leader_kills = [e for e in events if e.kind == "kill" and e.hit_leader]
    return {
        "verdict": verdict,
        "settings": settings,
        "operations": {"total": sum(outcome.values()), "ok": outcome["ok"],
                       "fail": outcome["fail"], "unknown": outcome["unknown"],
                       "by_kind": dict(sorted(kinds.items())),
                       "final_reads": sum(1 for op in history if op.client == FINAL_READER)},
        "faults": {"total": len(events), "by_kind": dict(sorted(Counter(e.kind
                                                                       for e in events).items())),
                   "on_leader": sum(1 for e in events if e.hit_leader),
                   "leader_kills": len(leader_kills)},
        "linearizability": {"verdict": check.verdict, "bad_key": check.bad_key,
                            "keys": len(check.per_key)},
        "lost_writes": len(lost),
        "availability": {
            "gaps_over_1s": len(avail.gaps),
            "longest_gap_s": max((length for _, length in avail.gaps), default=0.0),
            "longest_unavailability_after_leader_kill_s": max(avail.after_leader_kill,
                                                              default=None),
            "mean_unavailability_after_leader_kill_s": (
                round(sum(avail.after_leader_kill) / len(avail.after_leader_kill), 3)
                if avail.after_leader_kill else None),
            "longest_unavailability_after_leader_loss_s": max(avail.after_leader_loss,
                                                              default=None),
        },
        "problems": list(problems),
    }


def render_summary(summary: dict[str, Any], check: CheckResult | None = None,
                   lost: Sequence[Operation] = ()) -> str:
    """The summary as text for the terminal."""
    ops, faults, avail = summary["operations"], summary["faults"], summary["availability"]
    lines = [
        f"verdict: {summary['verdict'].upper()}",
        f"operations: {ops['total']} ({ops['ok']} ok, {ops['fail']} failed, {ops['unknown']}"
        f" unknown) {_pairs(ops['by_kind'])}; final reads: {ops['final_reads']}",
        f"faults: {faults['total']} {_pairs(faults['by_kind'])}; {faults['on_leader']} took"
        f" the leader out ({faults['leader_kills']} leader kills)",
        f"linearizability: {summary['linearizability']['verdict']} over"
        f" {summary['linearizability']['keys']} keys; lost acknowledged writes:"
        f" {summary['lost_writes']}",
        f"availability: {avail['gaps_over_1s']} gaps over 1 s, longest"
        f" {avail['longest_gap_s']:.2f} s; longest unavailability after a leader kill:"
        f" {_seconds(avail['longest_unavailability_after_leader_kill_s'])} (mean"
        f" {_seconds(avail['mean_unavailability_after_leader_kill_s'])})",
    ]
    lines += [f"problem: {p}" for p in summary["problems"]]
    for op in lost[:10]:
        lines.append(f"lost write: client {op.client} {op.op} {op.key}={op.value!r} "
                     f"acknowledged at {op.ret:.3f}s")
    if check is not None and check.verdict != "ok":
        lines.append(render_window(check))
    return "\n".join(lines)


def _pairs(counts: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")" if counts else ""


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"
