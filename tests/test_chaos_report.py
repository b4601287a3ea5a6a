"""The chaos tool's verdict: lost writes, availability, summaries, re-checking a history file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bwcore import cli
from bwcore.chaos import ChaosError, ChaosOptions, check_file, validate
from bwcore.chaos_nemesis import FaultEvent
from bwcore.chaos_report import (FINAL_READER, availability, lost_writes, render_summary,
                                 summarize)
from bwcore.linearizability import Operation, check_history, dump_history


def put(client: int, key: str, value: str, call: float, ret: float | None,
        ok: bool | None = True) -> Operation:
    return Operation(client, "put", key, value=value, call=call, ret=ret,
                     ok=ok if ret is not None else None)


def get(client: int, key: str, output: str | None, call: float, ret: float) -> Operation:
    return Operation(client, "get", key, output=output, call=call, ret=ret)


def final(key: str, output: str | None, at: float = 100.0) -> Operation:
    return get(FINAL_READER, key, output, at, at + 0.1)


def test_a_write_acknowledged_after_the_final_value_was_written_is_lost() -> None:
    """The final value came from a write that returned before the lost one was even called."""
    old = put(0, "x", "old", 1, 2)
    acked = put(1, "x", "new", 3, 4)
    history = [old, acked, final("x", "old")]
    assert lost_writes(history) == [acked]
    assert check_history(history).verdict == "illegal"  # the checker agrees


def test_a_concurrent_or_unknown_write_can_explain_the_final_value() -> None:
    """No loss when the final value's write may have come after the acknowledged one."""
    concurrent = [put(0, "x", "a", 1, 5), put(1, "x", "b", 2, 3), final("x", "a")]
    assert lost_writes(concurrent) == []
    unknown = [put(1, "x", "b", 2, 3), put(0, "x", "late", 1, None), final("x", "late")]
    assert lost_writes(unknown) == []
    failed = [put(0, "x", "a", 1, 2), put(1, "x", "b", 3, 4, ok=False), final("x", "a")]
    assert lost_writes(failed) == []  # a write that definitely failed cannot be lost


def test_an_absent_final_value_needs_a_delete_after_every_acknowledged_write() -> None:
    never_deleted = [put(0, "x", "a", 1, 2), final("x", None)]
    assert lost_writes(never_deleted) == [never_deleted[0]]
    deleted = [put(0, "x", "a", 1, 2), Operation(1, "delete", "x", call=3, ret=4),
               final("x", None)]
    assert lost_writes(deleted) == []
    cas_delete = [put(0, "x", "a", 1, 2),
                  Operation(1, "cas", "x", expect="a", value=None, output=True, call=3, ret=4),
                  final("x", None)]
    assert lost_writes(cas_delete) == []
    failed_cas = [put(0, "x", "a", 1, 2), Operation(1, "cas", "x", expect="b", value="c",
                                                    output=False, call=3, ret=4),
                  final("x", "a")]
    assert lost_writes(failed_cas) == []


def test_availability_reports_gaps_and_the_wait_after_a_leader_kill() -> None:
    history = [put(0, "x", f"v{i}", t - 0.05, t) for i, t in enumerate((0.5, 1.0, 4.0, 4.2))]
    kill = FaultEvent("kill", ["n1"], start=1.5, end=2.0, leader="n1", hit_leader=True)
    pause = FaultEvent("pause", ["n2"], start=1.6, end=2.0, leader="n1", hit_leader=False)
    result = availability(history, [kill, pause], start=0.0, end=5.0)
    assert result.gaps == [(1.0, 3.0)]
    assert result.after_leader_kill == [2.5] and result.after_leader_loss == [2.5]


def summary_of(history: list[Operation], problems: tuple[str, ...] = ()) -> dict:
    return summarize(history=history, check=check_history(history), lost=lost_writes(history),
                     events=[], avail=availability(history, [], 0, 10), problems=problems,
                     settings={})


def test_the_verdict_is_a_violation_for_a_lost_write_and_ok_otherwise() -> None:
    good = [put(0, "x", "a", 1, 2), final("x", "a")]
    assert summary_of(good)["verdict"] == "ok"
    assert summary_of(good, ("no leader",))["verdict"] == "incomplete"
    bad = summary_of([put(0, "x", "a", 1, 2), put(0, "x", "b", 3, 4), final("x", "a")])
    assert bad["verdict"] == "violation" and bad["lost_writes"] == 1
    text = render_summary(bad)
    assert text.startswith("verdict: VIOLATION") and "lost acknowledged writes: 1" in text


def test_rechecking_a_history_file_flags_a_stale_read(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """``bwraft chaos --check`` exits 1 on a stale read and shows the bad window."""
    path = tmp_path / "history.jsonl"
    dump_history([put(0, "x", "new", 1, 2), get(1, "x", None, 3, 4)], path)
    assert cli.main(["chaos", "--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "not linearizable: key 'x'" in out and "cannot be linearized" in out
    dump_history([put(0, "x", "new", 1, 2), get(1, "x", "new", 3, 4)], path)
    assert check_file(path, log=lambda _: None) == 0
    path.write_text("not json\n")
    assert cli.main(["chaos", "--check", str(path)]) == 3
    assert "cannot read" in json.loads(capsys.readouterr().err)["error"]


@pytest.mark.parametrize("changes, message", [
    ({"faults": ("kill", "flood")}, "unknown fault kind"),
    ({"faults": ()}, "unknown fault kind"),
    ({"clients": 0}, "at least one client"),
    ({"faults": ("helpers",)}, "the helpers fault kills and replaces observers"),
])
def test_options_that_cannot_work_are_refused_before_anything_starts(
        tmp_path: Path, changes: dict, message: str) -> None:
    options = ChaosOptions(dir=tmp_path, **changes)
    with pytest.raises(ChaosError, match=message):
        validate(options, None)


def test_the_chaos_command_needs_a_folder(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["chaos"]) == 2
    assert "--dir is required" in capsys.readouterr().err
