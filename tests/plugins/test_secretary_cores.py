"""Unit tests of the secretary relay's pure parts: the frames, the leader's, the secretary's
and the follower's cores (PROTOCOL.md "Secretary")."""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest

from bwcore.kernel import Entry, EntryType, Message, MessageType as MT
from bwraft_plugins import secretary_wire as wire
from bwraft_plugins.secretary_leader import DirectoryEntry, LeaderRelay, RelaySettings
from bwraft_plugins.secretary_relay import (QUIET_FACTOR, STALE_OWED_FACTOR, FollowerRelay,
                                           SecretaryRelay)

SETTINGS = RelaySettings(reply_deadline=0.3, rehire_after=2.0, window=8)
TERM = 4


def entries(first: int, count: int, term: int = TERM) -> tuple[Entry, ...]:
    return tuple(Entry(term, i, b"data-%d" % i) for i in range(first, first + count))


def append(to: str, prev: int, count: int, commit: int = 3, frm: str = "L") -> Message:
    return Message(MT.APPEND, to, frm, TERM, log_term=TERM, index=prev,
                   entries=entries(prev + 1, count), commit=commit)


def heartbeat(to: str, commit: int = 3, context: bytes = b"") -> Message:
    return Message(MT.HEARTBEAT, to, "L", TERM, commit=commit, context=context)


def leader_core(secretaries: dict[str, str] | None = None, **settings) -> LeaderRelay:
    """Leader L in west; followers f1-f3 and observer o1 in east; secretaries as given."""
    core = LeaderRelay("L", dataclasses.replace(SETTINGS, **settings), {"f1": "10.0.0.1:1"})
    for node, dc in {"f0": "west", "f1": "east", "f2": "east", "f3": "east"}.items():
        core.member_changed(DirectoryEntry(node, "voter", dc, "alive", relay=True), 0.0)
    core.member_changed(DirectoryEntry("o1", "observer", "east", "alive", "10.0.0.9:9",
                                       relay=True), 0.0)
    for s, dc in (secretaries if secretaries is not None else {"s1": "east"}).items():
        core.member_changed(DirectoryEntry(s, "secretary", dc, "alive"), 0.0)
    core.set_leadership(TERM, True)
    return core


def through_wire(payload):
    """What the peer receives: the payload after msgpack, as the transport carries it."""
    return msgpack.unpackb(msgpack.packb(payload, use_bin_type=True), raw=False)


# -- frames -----------------------------------------------------------------------------------


def test_batch_carries_shared_entries_once_and_rebuilds_each_message():
    msgs = [append("f1", 10, 3), append("f2", 10, 3), append("f3", 11, 2), heartbeat("o1", 9)]
    payload = wire.encode_batch(7, TERM, "L", msgs, {"f1": "10.0.0.1:1"})
    body = msgpack.unpackb(payload[1])
    assert sum(len(run[1]) for run in body[3]) == 3   # entries 11, 12, 13 travel once
    batch = wire.decode_batch(through_wire(payload))
    assert (batch.seq, batch.term, batch.leader) == (7, TERM, "L")
    assert batch.addresses == {"f1": "10.0.0.1:1"}
    for m, target in zip(msgs, batch.targets, strict=True):
        relay = wire.decode_relay(through_wire(wire.encode_relay(
            TERM, "L", [wire.relay_item(target, batch.wire_entries(target))])), m.to)
        assert relay.messages == (m,)   # the leader's own message, field for field


def test_replies_and_reports_round_trip():
    replies = [Message(MT.APPEND_RESP, "L", "f1", TERM, index=12),
               Message(MT.APPEND_RESP, "L", "f1", TERM, index=9, reject=True, reject_hint=7,
                       log_term=2),
               Message(MT.HEARTBEAT_RESP, "L", "f1", TERM, context=b"r1")]
    got = wire.decode_replies(through_wire(wire.encode_replies(TERM, "L", replies)))
    payload = wire.encode_report(TERM, 5, [("f1", item) for item in got.items], {"f9"})
    report = wire.decode_report(through_wire(payload), "L")
    assert report.replies == tuple(replies)
    assert (report.term, report.ack_seq, report.unreachable) == (TERM, 5, ("f9",))
    assert wire.decode_direct(through_wire(wire.encode_direct(TERM))) == TERM


def raw(kind: int, body) -> list:
    return [kind, msgpack.packb(body, use_bin_type=True)]


@pytest.mark.parametrize("payload", [
    None, [], [0], [99, b""], ["x", b""], [1], [True, b""], [1, []], [1, b"\xc1"],
    [1, msgpack.packb([1, 2, 3])],                                  # too short
    [1, msgpack.ExtType(1, b"x")],
    raw(1, [1, 1, "L", [], [[5, "f1", 0, 0, 1, 0, b""]], {}]),      # entry 1 missing
    raw(1, [1, 1, "L", [], [[6, "f1", 0, 0, 0, 0, b""]], {}]),      # a reply in a batch
    raw(1, [1, 1, "L", [[1, [[1, b"x", 0]]], [1, [[1, b"y", 0]]]], [], {}]),   # entry twice
    raw(1, [1, 1, "L", [[1, [[1, "text", 0]]]], [], {}]),           # data not bytes
    raw(1, [1, 1, "L", [[1, [[1, b"x", 7]]]], [], {}]),             # entry type
    raw(1, [1, 1, "L", [], [[7, "f1", 0, 0, 1, 0, b""]], {}]),      # heartbeat with entries
    raw(1, [-1, 1, "L", [], [], {}]), raw(1, [1, 1, "", [], [], {}]),
    raw(1, [1, 1, "L", [], [], []]), raw(1, [1, 1, "L", [], [], {"f1": 5}]),
    raw(2, [0, "L", []]), raw(2, [1, "L", [[5, 0, 0, 0, b"", "x"]]]),
    raw(2, [1, "L", [[7, 0, 0, 0, b"", [[1, b"x", 0]]]]]), raw(2, [1, "L", [[5, 0, 0, 0, "s",
                                                                            []]]]),
    raw(3, [1, "L", [[5, 1, 1, False, 0, b""]]]), raw(3, [1, "L", [[6, 1, 1, 0, 0, b""]]]),
    raw(4, [1, 1, [["f", 6, 1, 1, False, 0]], []]), raw(4, [1, 1, [], [7]]), raw(5, []),
    raw(5, ["x"]), raw(5, {"a": 1}),
    raw(1, [1, 1, "L", [], [], {}, -1]), raw(1, [1, 1, "L", [], [], {}, True]),   # report_after
    raw(1, [1, 1, "L", [], [], {}, "2"]), raw(1, [1, 1, "L", [], [], {}, 2**64 - 1]),
    raw(1, [1, 1, "L", [], []]),
    raw(1, [1, 1, "L", [], [], {}, 1, 1]), raw(1, [1, 1, "L", [], [], {}, 1, None]),  # settles
])
def test_malformed_payloads_are_wire_errors(payload):
    with pytest.raises(wire.WireError):
        kind = wire.kind_of(payload)
        if kind is wire.Kind.RELAY:
            wire.decode_relay(payload, "f1")
        elif kind is wire.Kind.REPORT:
            wire.decode_report(payload, "L")
        else:
            {wire.Kind.BATCH: wire.decode_batch, wire.Kind.REPLY: wire.decode_replies,
             wire.Kind.DIRECT: wire.decode_direct}[kind](payload)


def test_a_batch_without_a_report_hint_is_read_as_no_hint_and_later_fields_are_ignored():
    body = [1, TERM, "L", [], [[7, "f1", 0, 0, 0, 3, b""]], {}]   # as a leader gives no hint
    plain = wire.decode_batch(raw(1, body))
    assert (plain.report_after, plain.settles) == (0, False)
    hint_only = wire.decode_batch(raw(1, body + [3]))
    assert (hint_only.report_after, hint_only.settles) == (3, False)
    later = wire.decode_batch(raw(1, body + [3, True, "a later leader's field"]))
    assert (later.report_after, later.settles) == (3, True)
    assert [t.to for t in later.targets] == ["f1"]


def test_a_payload_of_another_kind_is_refused():
    with pytest.raises(wire.WireError, match="not a batch"):
        wire.decode_batch(wire.encode_direct(3))


def test_mutated_frames_never_raise_anything_but_wire_errors():
    """Random corruption of valid payloads: a decoder answers or says WireError, never more."""
    rng = random.Random(7)
    batch = wire.encode_batch(1, TERM, "L", [append("f1", 10, 3), heartbeat("f2")], {})
    valid = [batch, wire.encode_relay(TERM, "L", [[5, TERM, 10, 3, b"", [[TERM, b"x", 0]]]]),
             wire.encode_replies(TERM, "L", [Message(MT.APPEND_RESP, "L", "f1", TERM)]),
             wire.encode_report(TERM, 1, [("f1", [MT.APPEND_RESP, 1, 1, False, 0, b""])], ()),
             wire.encode_direct(TERM)]
    junk = [None, True, -1, 2**64 - 1, -2**63, "s", b"b", [], {}, [[]], 1.5]

    def mutate(value):
        if isinstance(value, list) and value and rng.random() < 0.7:
            copy = list(value)
            k = rng.randrange(len(copy))
            copy[k] = mutate(copy[k])
            return copy
        return rng.choice(junk)

    decoders = [wire.decode_batch, lambda p: wire.decode_relay(p, "f1"), wire.decode_replies,
                lambda p: wire.decode_report(p, "L"), wire.decode_direct]
    for _ in range(3000):
        k = rng.randrange(len(valid))
        kind, body = valid[k]
        if rng.random() < 0.8:
            payload = raw(kind, mutate(msgpack.unpackb(body)))
        elif rng.random() < 0.5:
            cut = rng.randrange(len(body))
            payload = [kind, body[:cut] + bytes([rng.randrange(256)]) + body[cut + 1:]]
        else:
            payload = mutate(valid[k])
        try:
            decoders[k](payload)
        except wire.WireError:
            pass


# -- the leader's core ------------------------------------------------------------------------


def test_leader_relays_east_targets_only_once_ready():
    core = leader_core()
    msgs = [append("f0", 10, 2), append("f1", 10, 2), heartbeat("o1"),
            Message(MT.SNAPSHOT, "f2", "L", TERM)]
    core.set_leadership(TERM, False)   # the term's no-op is not committed yet
    batch = list(msgs)
    assert core.route(batch, 1.0) == [] and batch == msgs
    core.set_leadership(TERM, True)
    [(secretary, payload)] = core.route(batch, 1.0)
    assert secretary == "s1"
    assert batch == [msgs[0], msgs[3]]   # west follower and the snapshot go directly
    frame = wire.decode_batch(through_wire(payload))
    assert [t.to for t in frame.targets] == ["f1", "o1"]
    assert frame.addresses == {"f1": "10.0.0.1:1", "o1": "10.0.0.9:9"}
    # Addresses travel once per assignment.
    [(_, payload)] = core.route([heartbeat("f1")], 1.1)
    assert wire.decode_batch(payload).addresses == {}


def test_leader_never_relays_another_terms_or_nodes_messages():
    core = leader_core()
    old = Message(MT.APPEND, "f1", "L", TERM - 1, index=3)
    foreign = Message(MT.APPEND, "f1", "X", TERM, index=3)
    vote = Message(MT.VOTE, "f1", "L", TERM)
    gap = Message(MT.APPEND, "f1", "L", TERM, index=3, entries=(Entry(TERM, 5),))
    batch = [old, foreign, vote, gap]
    assert core.route(batch, 1.0) == [] and len(batch) == 4


def test_frames_respect_the_window_and_oversized_messages_go_directly():
    core = leader_core(window=4)
    big = append("f1", 20, 5)                        # more than the window on its own
    parts = [append("f2", 10, 3), append("f3", 13, 3)]  # 6 distinct entries: two frames
    batch = [big, *parts]
    frames = core.route(batch, 1.0)
    assert batch == [big]
    assert [len(wire.decode_batch(p).entries) for _, p in frames] == [3, 3]


def test_rendezvous_split_is_stable_and_moves_only_the_lost_secretarys_followers():
    core = leader_core({"s1": "east", "s2": "east", "s3": "east"})
    targets = ["f1", "f2", "f3", "o1"]
    before = {t: core.secretary_for(t, 1.0) for t in targets}
    assert len(set(before.values())) > 1   # the work is shared
    again = leader_core({"s3": "east", "s2": "east", "s1": "east"})
    assert {t: again.secretary_for(t, 1.0) for t in targets} == before   # any leader agrees
    lost = before["f1"]
    core.member_changed(DirectoryEntry(lost, "secretary", "east", "dead"), 2.0)
    after = {t: core.secretary_for(t, 2.0) for t in targets}
    assert all(after[t] == before[t] for t in targets if before[t] != lost)
    assert lost not in after.values()


def test_single_split_hands_a_datacenter_to_one_secretary():
    core = leader_core({"s1": "east", "s2": "east"}, split="single")
    assert len({core.secretary_for(t, 1.0) for t in ("f1", "f2", "f3", "o1")}) == 1


def test_datacenter_settings_limit_where_secretaries_are_used():
    assert leader_core(exclude_datacenters=frozenset({"east"})).secretary_for("f1", 1.0) is None
    assert leader_core(datacenters=frozenset({"west"})).secretary_for("f1", 1.0) is None
    assert leader_core(datacenters=frozenset({"east"})).secretary_for("f1", 1.0) == "s1"


def test_followers_without_the_relay_tag_are_served_directly():
    core = leader_core()
    core.member_changed(DirectoryEntry("f2", "voter", "east", "alive", relay=False), 0.0)
    assert core.secretary_for("f2", 1.0) is None and core.secretary_for("f1", 1.0) == "s1"


def test_missed_deadline_takes_followers_back_and_benches_with_backoff():
    core = leader_core()
    core.route([append("f1", 10, 1), heartbeat("f2")], 1.0)
    assert core.check(1.2) == []
    [tb] = core.check(1.31)
    assert (tb.secretary, tb.targets, tb.reason) == ("s1", ("f1", "f2"), "deadline")
    assert core.secretary_for("f1", 1.31) is None       # benched for rehire_after
    assert core.secretary_for("f1", 3.32) == "s1"       # hired again
    core.route([heartbeat("f1")], 3.4)
    [tb] = core.check(3.8)
    assert core.secretary_for("f1", 6.0) is None        # second miss: benched for 4 s
    assert core.secretary_for("f1", 7.9) == "s1"
    assert core.stats.takebacks == {"deadline": 2}


def test_report_fencing_and_acknowledgement():
    core = leader_core()
    [(_, payload)] = core.route([append("f1", 10, 1)], 1.0)
    seq = wire.decode_batch(payload).seq
    reply = [("f1", [MT.APPEND_RESP, 11, 0, False, 0, b""])]
    old = wire.decode_report(wire.encode_report(TERM - 1, seq, reply, ()), "L")
    assert core.on_report("s1", old, 1.1) == []          # another term: ignored
    assert core.on_report("s9", wire.decode_report(
        wire.encode_report(TERM, seq, reply, ()), "L"), 1.1) == []   # not hired: ignored
    assert core.stats.stale_reports == 2
    good = wire.decode_report(wire.encode_report(TERM, seq, reply, ()), "L")
    assert core.on_report("s1", good, 1.2) == [Message(MT.APPEND_RESP, "L", "f1", TERM,
                                                       index=11)]
    assert core.check(5.0) == []   # acknowledged: no deadline pending


def test_silent_follower_is_served_directly_for_a_while():
    core = leader_core()
    core.route([heartbeat("f1"), heartbeat("f2")], 1.0)
    report = wire.decode_report(wire.encode_report(
        TERM, 1, [("f2", [MT.HEARTBEAT_RESP, 0, 0, False, 0, b""])], ()), "L")
    core.on_report("s1", report, 1.1)
    assert core.check(1.44) == []
    [tb] = core.check(1.46)   # f1 said nothing for 1.5 deadlines
    assert (tb.targets, tb.reason) == (("f1",), "follower_silent")
    assert core.secretary_for("f1", 1.5) is None and core.secretary_for("f2", 1.5) == "s1"
    assert core.secretary_for("f1", 3.5) == "s1"


def test_secretary_reporting_a_follower_unreachable_hands_it_back():
    core = leader_core()
    core.route([heartbeat("f1")], 1.0)
    core.on_report("s1", wire.decode_report(wire.encode_report(TERM, 1, [], ["f1"]), "L"), 1.1)
    [tb] = core.check(1.1)
    assert (tb.targets, tb.reason) == (("f1",), "follower_unreachable")


def test_gossip_takes_back_at_once_and_a_new_term_starts_clean():
    core = leader_core()
    core.route([heartbeat("f1")], 1.0)
    [tb] = core.member_changed(DirectoryEntry("s1", "secretary", "east", "suspect"), 1.05)
    assert (tb.reason, tb.targets) == ("suspect", ("f1",))
    core.member_changed(DirectoryEntry("s1", "secretary", "east", "alive"), 1.1)
    core.route([heartbeat("f1")], 1.1)
    core.set_leadership(TERM + 1, False)   # re-elected: nothing outstanding, not relaying
    assert core.check(10.0) == [] and core.route([heartbeat("f1")], 10.0) == []


def targets_of(frames) -> list[tuple[str, str, int, int]]:
    """(secretary, follower, prev index, entry count) of every message in ``frames``."""
    return [(sec, t.to, t.index, t.count)
            for sec, payload in frames for t in wire.decode_batch(through_wire(payload)).targets]


def test_each_batch_says_how_many_acknowledgements_the_leader_needs_to_commit():
    # Six voters (quorum 4): L and w1 in west, e1-e4 in east behind the secretary.
    voters = {v: f"10.0.0.{k}:1" for k, v in enumerate(("L", "w1", "e1", "e2", "e3", "e4"))}

    def hint(relayed: set[str], *targets: str) -> int:
        core = LeaderRelay("L", SETTINGS, voters)
        for node in ("e1", "e2", "e3", "e4", "o1"):
            core.member_changed(DirectoryEntry(node, "observer" if node == "o1" else "voter",
                                               "east", "alive", relay=node in relayed), 0.0)
        core.member_changed(DirectoryEntry("s1", "secretary", "east", "alive"), 0.0)
        core.set_leadership(TERM, True)
        [(_, payload)] = core.route([append(t, 10, 1) for t in targets], 1.0)
        return wire.decode_batch(through_wire(payload)).report_after

    east = {"e1", "e2", "e3", "e4", "o1"}
    assert hint(east, "e1", "e2", "e3", "e4", "o1") == 2   # L and w1, and two of them
    assert hint(east, "e1") == 2                # the same whichever of them a frame is for
    assert hint(east, "o1") == 2
    assert hint({"e1", "e2", "o1"}, "e1", "e2") == 0   # L, w1, e3, e4 (direct) are a quorum

    # Two secretaries share the four east voters: the two acknowledgements needed are shared
    # by how many voters each serves, and together they ask for at least two.
    core = LeaderRelay("L", SETTINGS, voters)
    for node in ("e1", "e2", "e3", "e4"):
        core.member_changed(DirectoryEntry(node, "voter", "east", "alive", relay=True), 0.0)
    for sec in ("s1", "s2"):
        core.member_changed(DirectoryEntry(sec, "secretary", "east", "alive"), 0.0)
    core.set_leadership(TERM, True)
    frames = core.route([append(t, 10, 1) for t in ("e1", "e2", "e3", "e4")], 1.0)
    served = {sec: [t.to for t in wire.decode_batch(through_wire(p)).targets]
              for sec, p in frames}
    assert served == {"s1": ["e3"], "s2": ["e1", "e2", "e4"]}   # the stable hash's split
    hints = {sec: wire.decode_batch(through_wire(p)).report_after for sec, p in frames}
    assert hints == {"s1": 1, "s2": 2}   # 2 x 1/4 and 2 x 3/4, rounded up
    # The hint follows the assignment: with s1 suspected, s2 serves all four.
    core.member_changed(DirectoryEntry("s1", "secretary", "east", "suspect"), 1.1)
    [(sec, payload)] = core.route([append("e1", 11, 1)], 1.1)
    assert (sec, wire.decode_batch(through_wire(payload)).report_after) == ("s2", 2)
    # ... and with e1 served directly for a while (s2 could not reach it), L, w1 and e1 need
    # one acknowledgement more.
    core.on_report("s2", wire.decode_report(through_wire(wire.encode_report(
        TERM, 99, [], {"e1"})), "L"), 1.2)
    [(sec, payload)] = core.route([append("e2", 11, 1)], 1.2)
    assert (sec, wire.decode_batch(through_wire(payload)).report_after) == ("s2", 1)


SIX = ("L", "w1", "e1", "e2", "e3", "e4")
EAST = ("e1", "e2", "e3", "e4")


def test_a_hint_settles_only_when_it_is_all_the_leader_needs():
    # Six voters (quorum 4): L and w1 in west, e1-e4 in east.
    east = {e: ("voter", "east") for e in EAST}
    core = core_of(SIX, {**east, "s1": ("secretary", "east")}, looked=False)
    # Nothing settles before the leader has looked at its followers' progress in the term.
    assert hints_for(core, 0.5, EAST) == {"s1": (2, False)}
    look_at(core, 0.5, 1, SIX)
    assert hints_for(core, 0.5, EAST) == {"s1": (2, True)}   # L and w1, and two of the four

    def look(now: float, commit: int, inactive: tuple[str, ...] = (), **match: int) -> dict:
        """The hints after a look at the kernel (the reply deadline is 0.3 s)."""
        look_at(core, now, commit, SIX, inactive, **match)
        return hints_for(core, now, EAST)

    assert look(1.0, 20) == {"s1": (2, True)}
    # w1 is behind, but for less than a reply deadline: a busy voter is still counted on, but
    # the commits came without it, so two of the four may not be all the leader needs.
    assert look(1.1, 25, w1=19) == {"s1": (2, False)}
    # It still lacks what was committed a deadline ago: the leader needs three of the four.
    assert look(1.3, 30, w1=19) == {"s1": (3, True)}
    assert look(1.4, 40) == {"s1": (2, True)}   # caught up
    # Not heard from since check-quorum's last round is no sign of lagging by itself.
    assert look(1.5, 50, inactive=("w1",)) == {"s1": (2, True)}
    # A relayed voter that is behind changes nothing: the secretary counts who answers.
    assert look(1.9, 60, inactive=("e1",), e1=0) == {"s1": (2, True)}
    # An observer's answer counts for nothing, and the secretary cannot tell it apart.
    assert hints_for(core_of(SIX, {**east, "o1": ("observer", "east"),
                                   "s1": ("secretary", "east")}), 1.0, EAST) == {"s1": (2, False)}
    # Shared among two secretaries, neither count is all the leader needs.
    assert hints_for(core_of(SIX, {**east, "s1": ("secretary", "east"),
                                   "s2": ("secretary", "east")}), 1.0, EAST) == {
        "s1": (1, False), "s2": (2, False)}


FIVE = ("L", "D", "R1", "R2", "R3")
RELAYED = ("R1", "R2", "R3")


def test_a_direct_voter_that_answers_later_than_the_relayed_ones_stops_the_settling():
    # L leads; D, in a datacenter of its own, is served directly; R1-R3 through s1. Quorum 3:
    # with D counted on, one relayed acknowledgement is all the leader needs.
    core = five_voter_core()
    assert hints_for(core, 1.0, RELAYED) == {"s1": (1, True)}
    # D answers some 50 ms late, every time: never a reply deadline behind, so it is still
    # counted on, but each commit needed a second relayed acknowledgement: nothing settles.
    t = 1.0
    for commit in range(10, 60, 5):
        look_at(core, t, commit, FIVE, D=commit - 2)
        assert hints_for(core, t, RELAYED) == {"s1": (1, False)}
        t += 0.1
    look_at(core, t, 60, FIVE)
    assert hints_for(core, t, RELAYED) == {"s1": (1, True)}


def test_the_hints_count_the_voters_the_kernel_has_now():
    core = five_voter_core()
    assert hints_for(core, 1.0, RELAYED) == {"s1": (1, True)}
    # D is removed by a configuration change: L, R1-R3 (quorum 3) need two relayed answers.
    look_at(core, 1.1, 10, ("L", *RELAYED))
    assert hints_for(core, 1.1, RELAYED) == {"s1": (2, True)}


def five_voter_core() -> LeaderRelay:
    return core_of(FIVE, {"D": ("voter", "south"), **{r: ("voter", "east") for r in RELAYED},
                          "s1": ("secretary", "east")})


def core_of(voters: tuple[str, ...], members: dict[str, tuple[str, str]],
            looked: bool = True) -> LeaderRelay:
    """Leader L of ``voters``, once gossip has told it of ``members`` (role, datacenter), and
    (``looked``) once it has seen every voter level at index 1."""
    core = LeaderRelay("L", SETTINGS, {v: f"10.0.0.{k}:1" for k, v in enumerate(voters)})
    for node, (role, datacenter) in members.items():
        core.member_changed(DirectoryEntry(node, role, datacenter, "alive",
                                           relay=role != "secretary"), 0.0)
    core.set_leadership(TERM, True)
    if looked:
        look_at(core, 0.0, 1, voters)
    return core


def look_at(core: LeaderRelay, now: float, commit: int, voters: tuple[str, ...],
            inactive: tuple[str, ...] = (), **match: int) -> None:
    """The leader looks at its kernel at ``now``: every voter at ``commit`` unless given."""
    core.note_progress({"commit_index": commit, "voters": list(voters), "progress": {
        v: {"match": match.get(v, commit), "active": v not in inactive}
        for v in voters if v != "L"}}, now)


def hints_for(core: LeaderRelay, now: float, targets: tuple[str, ...]
              ) -> dict[str, tuple[int, bool]]:
    """The report hint and settling flag of each BATCH that an entry to ``targets`` makes."""
    frames = core.route([append(t, 10, 1) for t in targets], now)
    return {sec: (b.report_after, b.settles) for sec, b in (
        (sec, wire.decode_batch(through_wire(p))) for sec, p in frames)}


def test_commit_notice_waits_for_the_next_batch_and_is_replaced_by_it():
    core = leader_core(commit_delay=0.002)
    notices = [append("f0", 12, 0, commit=12), append("f1", 12, 0, commit=12)]
    batch = list(notices)
    assert core.route(batch, 1.0) == []
    assert batch == [notices[0]]                  # west: direct and at once; f1's waits
    assert core.held_until == pytest.approx(1.002)
    # The next batch to f1 carries a newer commit index: the notice is dropped, not sent.
    frames = core.route([append("f1", 12, 2, commit=12)], 1.001)
    assert targets_of(frames) == [("s1", "f1", 12, 2)]
    assert core.stats.folded_notices == 1 and core.held_until is None
    assert core.flush_held(1.01) == []


def test_commit_notice_rides_along_or_goes_alone_when_its_wait_is_over():
    core = leader_core(commit_delay=0.002)
    core.route([append("f1", 12, 0, commit=12), append("f2", 12, 0, commit=12)], 1.0)
    # A heartbeat to f2 is no APPEND: both notices ride in its frame, f2's before it.
    frames = core.route([heartbeat("f2", commit=12)], 1.0005)
    assert targets_of(frames) == [("s1", "f1", 12, 0), ("s1", "f2", 12, 0), ("s1", "f2", 0, 0)]
    assert core.held_until is None
    core.route([append("f3", 12, 0, commit=12)], 1.001)
    assert core.flush_held(1.0025) == []          # still within its wait
    assert targets_of(core.flush_held(1.003)) == [("s1", "f3", 12, 0)]
    assert core.flush_held(1.01) == []


def test_held_commit_notices_are_dropped_when_their_follower_is_taken_back_or_the_term_ends():
    core = leader_core(commit_delay=0.002)
    core.route([heartbeat("f1")], 1.0)
    core.route([append("f1", 12, 0, commit=12)], 1.0)
    [tb] = core.member_changed(DirectoryEntry("s1", "secretary", "east", "dead"), 1.001)
    assert tb.targets == ("f1",)
    assert core.held_until is None and core.flush_held(1.0, force=True) == []
    core.member_changed(DirectoryEntry("s1", "secretary", "east", "alive"), 1.1)
    core.route([append("f2", 12, 0, commit=12)], 1.1)
    core.set_leadership(TERM + 1, True)
    assert core.held_until is None and core.flush_held(2.0, force=True) == []


def test_without_commit_delay_notices_go_at_once():
    core = leader_core()
    frames = core.route([append("f1", 12, 0, commit=12)], 1.0)
    assert targets_of(frames) == [("s1", "f1", 12, 0)] and core.held_until is None


# -- the secretary's core ---------------------------------------------------------------------


def batch(seq: int, term: int = TERM, leader: str = "L", msgs=None) -> wire.Batch:
    msgs = msgs if msgs is not None else [append("f1", 10, 2), heartbeat("f2")]
    msgs = [Message(m.type, m.to, leader, term, log_term=m.log_term, index=m.index,
                    entries=m.entries, commit=m.commit) for m in msgs]
    return wire.decode_batch(through_wire(wire.encode_batch(seq, term, leader, msgs, {})))


def reply_from(frm: str, term: int = TERM, leader: str = "L", index: int = 12
               ) -> wire.Replies:
    return wire.decode_replies(through_wire(wire.encode_replies(
        term, leader, [Message(MT.APPEND_RESP, leader, frm, term, index=index)])))


def test_secretary_relays_and_reports_once_everyone_answered():
    sec = SecretaryRelay("s1", max_delay=0.002)
    out = sec.on_batch("L", batch(1), 1.0)
    assert [to for to, _ in out] == ["f1", "f2"]
    assert sec.flush_at == pytest.approx(1.0 + QUIET_FACTOR * 0.002)   # no answer yet
    assert sec.on_replies("f1", reply_from("f1"), 1.0005) is False
    assert sec.flush_at == pytest.approx(1.0025)                      # news waits 2 ms
    assert sec.on_replies("f2", reply_from("f2"), 1.001) is True   # all answered
    leader, payload = sec.flush(1.001)
    report = wire.decode_report(through_wire(payload), "L")
    assert leader == "L" and report.ack_seq == 1
    assert [m.frm for m in report.replies] == ["f1", "f2"]
    assert sec.flush(1.001) is None   # nothing new


def test_stragglers_of_a_batch_go_back_together():
    # The deadline sends what came in; the followers still due stay due, so that their
    # replies leave in one more report when the last arrives, not in one report each.
    sec = SecretaryRelay("s1", max_delay=0.002)
    msgs = [append(f, 10, 2) for f in ("f1", "f2", "f3")]
    sec.on_batch("L", batch(1, msgs=msgs), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is False
    _, payload = sec.flush(1.002)                                   # the deadline
    assert [m.frm for m in wire.decode_report(payload, "L").replies] == ["f1"]
    assert sec.on_replies("f2", reply_from("f2"), 1.003) is False   # f3 is still due
    assert sec.flush_at == pytest.approx(1.005)
    assert sec.on_replies("f3", reply_from("f3"), 1.004) is True    # the last straggler
    _, payload = sec.flush(1.004)
    assert [m.frm for m in wire.decode_report(payload, "L").replies] == ["f2", "f3"]


def test_secretary_reports_as_soon_as_the_leader_can_commit():
    sec = SecretaryRelay("s1", max_delay=0.002)
    msgs = [append(f, 10, 2) for f in ("f1", "f2", "f3", "f4")]
    sec.on_batch("L", wire.decode_batch(through_wire(wire.encode_batch(
        1, TERM, "L", msgs, {}, report_after=2))), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.0005) is False
    assert sec.on_replies("f2", reply_from("f2"), 1.0006) is True    # enough to commit
    _, payload = sec.flush(1.0006)
    assert [m.frm for m in wire.decode_report(payload, "L").replies] == ["f1", "f2"]
    assert sec.on_replies("f3", reply_from("f3"), 1.001) is False    # f4 is still due
    assert sec.on_replies("f4", reply_from("f4"), 1.0012) is True    # all in


def hinted(seq: int, prev: int, followers=("f1", "f2"), need: int = 1,
           settles: bool = True) -> wire.Batch:
    """Batch ``seq``: entry ``prev + 1`` to each follower, with a report hint."""
    return wire.decode_batch(through_wire(wire.encode_batch(
        seq, TERM, "L", [append(f, prev, 1) for f in followers], {}, report_after=need,
        settles=settles)))


def twelve_settled() -> SecretaryRelay:
    """f1 and f2 acknowledged 11; then f1 alone acknowledged 12, which a one-follower hint
    settles with the report that carried it."""
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", hinted(1, 10), 1.0)
    sec.on_replies("f1", reply_from("f1", index=11), 1.001)
    sec.on_replies("f2", reply_from("f2", index=11), 1.001)
    sec.flush(1.001)
    sec.on_batch("L", hinted(2, 11), 1.01)
    assert sec.on_replies("f1", reply_from("f1", index=12), 1.011) is True
    sec.flush(1.011)
    return sec


def test_when_the_hint_settles_it_the_stragglers_ride_with_the_next_report():
    followers = ("f1", "f2", "f3", "f4")

    def round_of(sec: SecretaryRelay, seq: int, settles: bool, now: float
                 ) -> tuple[list[bool], list[tuple[str, int]]]:
        """Batch ``seq`` (entry 11 + seq) to all four, hint 2; f1 and f2 answer, the report
        they make leaves, then f3 and f4 answer. Returns what each answer said and what the
        report carried."""
        msgs = [append(f, 10 + seq, 1) for f in followers]
        sec.on_batch("L", wire.decode_batch(through_wire(wire.encode_batch(
            seq, TERM, "L", msgs, {}, report_after=2, settles=settles))), now)
        said = [sec.on_replies(f, reply_from(f, index=11 + seq), now + 0.001)
                for f in followers[:2]]
        _, payload = sec.flush(now + 0.001)
        said += [sec.on_replies(f, reply_from(f, index=11 + seq), now + 0.002)
                 for f in followers[2:]]
        return said, [(m.frm, m.index) for m in wire.decode_report(payload, "L").replies]

    sec = SecretaryRelay("s1", max_delay=0.002)
    # A first acknowledgement is always news (it may end the leader's probing of it).
    assert round_of(sec, 1, True, 1.0)[0] == [False, True, False, True]
    sec.flush(1.002)
    # Then f1 and f2 acknowledge 13 first: the leader commits it; f3's and f4's say no more,
    # and wait for the next report, at the latest the quiet delay ...
    said, reported = round_of(sec, 2, True, 1.01)
    assert said == [False, True, False, False]
    assert reported == [("f1", 13), ("f2", 13)]
    assert sec.flush_at == pytest.approx(1.012 + QUIET_FACTOR * 0.002)
    # ... which is the next batch's.
    said, reported = round_of(sec, 3, True, 1.015)
    assert said == [False, True, False, False]
    assert reported == [("f3", 13), ("f4", 13), ("f1", 14), ("f2", 14)]
    # A leader whose hint no longer settles it hears every acknowledgement again at once
    # (the last one: every follower has answered).
    said, reported = round_of(sec, 4, False, 1.02)
    assert said == [False, True, False, True]
    assert reported == [("f3", 14), ("f4", 14), ("f1", 15), ("f2", 15)]


def test_when_the_hint_settles_it_acknowledgements_wait_for_the_hint():
    # With fewer than the hinted acknowledgements the leader cannot commit: a report of them
    # at the report delay would be one more for nothing.
    sec = SecretaryRelay("s1", max_delay=0.002)
    followers = ("f1", "f2", "f3")
    sec.on_batch("L", hinted(1, 10, followers, 2), 1.0)
    for f in followers:
        sec.on_replies(f, reply_from(f, index=11), 1.001)
    sec.flush(1.001)
    sec.on_batch("L", hinted(2, 11, followers, 2), 1.01)
    assert sec.on_replies("f1", reply_from("f1", index=12), 1.011) is False
    assert sec.flush_at == pytest.approx(1.01 + QUIET_FACTOR * 0.002)   # the batch's, no sooner
    assert sec.on_replies("f2", reply_from("f2", index=12), 1.015) is True   # the hint
    sec.flush(1.015)
    # A rejection is news at once: the leader backs the follower up and probes it.
    rejection = Message(MT.APPEND_RESP, "L", "f3", TERM, index=12, reject=True, reject_hint=9)
    sec.on_replies("f3", wire.decode_replies(through_wire(wire.encode_replies(
        TERM, "L", [rejection]))), 1.016)
    assert sec.flush_at == pytest.approx(1.018)
    sec.flush(1.018)
    # Without a settling hint, an acknowledgement is news within the report delay.
    sec.on_batch("L", hinted(3, 12, followers, 2, settles=False), 1.02)
    assert sec.on_replies("f1", reply_from("f1", index=13), 1.021) is False
    assert sec.flush_at == pytest.approx(1.023)


THREE = ("f1", "f2", "f3")


def three_at_eleven() -> SecretaryRelay:
    """f1, f2 and f3 acknowledged 11 under a one-follower settling hint, and were reported."""
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", hinted(1, 10, THREE), 1.0)
    for f in THREE:
        sec.on_replies(f, reply_from(f, index=11), 1.001)
    sec.flush(1.001)
    return sec


def test_a_new_hint_forgets_what_the_old_one_settled():
    sec = three_at_eleven()
    sec.on_batch("L", hinted(2, 11, THREE), 1.01)
    assert sec.on_replies("f1", reply_from("f1", index=12), 1.011) is True
    sec.flush(1.011)                                        # one acknowledged 12: settled
    assert sec.on_replies("f2", reply_from("f2", index=12), 1.012) is False   # no news
    # A direct voter fell behind: the leader now needs two of them. f2's 12, held back, goes
    # within the report delay; f3's 12 is news again.
    sec.on_batch("L", hinted(3, 12, THREE, 2), 1.02)
    assert sec.flush_at == pytest.approx(1.022)
    sec.on_replies("f3", reply_from("f3", index=12), 1.021)
    _, payload = sec.flush(1.022)
    assert [(m.frm, m.index) for m in wire.decode_report(payload, "L").replies] == [
        ("f2", 12), ("f3", 12)]


def test_a_follower_handed_back_answers_promptly_even_when_settled():
    sec = three_at_eleven()
    # f3 is taken back (the leader's hint changes), then handed back and probed.
    sec.on_batch("L", hinted(2, 11, ("f1", "f2"), settles=False), 1.01)
    sec.on_batch("L", hinted(3, 11, THREE), 1.02)
    assert sec.on_replies("f1", reply_from("f1", index=12), 1.021) is True
    sec.flush(1.021)                                        # one acknowledged 12: settled
    # f3's answer to the probe is no higher, but the leader waits on it: it is news.
    assert sec.on_replies("f3", reply_from("f3", index=12), 1.022) is True
    assert sec.flush_at == pytest.approx(1.024)


def test_after_a_rejection_the_first_acknowledgement_is_news_even_when_settled():
    sec = twelve_settled()
    rejection = Message(MT.APPEND_RESP, "L", "f2", TERM, index=12, reject=True, reject_hint=5)
    sec.on_replies("f2", wire.decode_replies(through_wire(wire.encode_replies(
        TERM, "L", [rejection]))), 1.012)
    sec.flush(1.012)
    assert sec.on_replies("f2", reply_from("f2", index=12), 1.02) is True   # probing ends


def test_a_follower_that_keeps_owing_stops_holding_reports_even_while_it_answers():
    sec = SecretaryRelay("s1", max_delay=0.002)
    # f1 loses one of two relays; it goes on answering the later ones, one short each time.
    sec.on_batch("L", batch(1, msgs=[append("f1", 10, 1), append("f1", 11, 1),
                                     append("f2", 10, 2)]), 1.0)
    sec.on_replies("f1", reply_from("f1"), 1.001)
    assert sec.on_replies("f2", reply_from("f2"), 1.001) is False   # f1 still owes one
    sec.flush(1.002)
    sec.on_batch("L", batch(2, msgs=[append("f1", 12, 1), append("f2", 12, 1)]), 1.01)
    sec.on_replies("f1", reply_from("f1", index=13), 1.011)
    assert sec.on_replies("f2", reply_from("f2", index=13), 1.011) is False   # owing since 1.0
    sec.flush(1.0 + STALE_OWED_FACTOR * 0.002 + 0.001)               # stale: forgotten
    sec.on_batch("L", batch(3, msgs=[append("f1", 13, 1), append("f2", 13, 1)]), 1.03)
    assert sec.on_replies("f1", reply_from("f1", index=14), 1.031) is False
    assert sec.on_replies("f2", reply_from("f2", index=14), 1.031) is True     # counted afresh


def test_an_empty_reply_frame_counts_for_nothing():
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", wire.decode_batch(through_wire(wire.encode_batch(
        1, TERM, "L", [append("f1", 10, 1), append("f2", 10, 1)], {}, report_after=1))), 1.0)
    empty = wire.decode_replies(through_wire(wire.encode_replies(TERM, "L", [])))
    assert sec.on_replies("f2", empty, 1.0005) is False
    assert sec.flush_at == pytest.approx(1.0 + QUIET_FACTOR * 0.002)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is True     # the one it needs


def test_a_follower_that_lost_its_replies_stops_holding_reports():
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", batch(1, msgs=[append("f1", 10, 2), append("f2", 10, 2)]), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is False   # f2 never answers
    sec.flush(1.002)
    sec.flush(1.0 + STALE_OWED_FACTOR * 0.002 + 0.001)              # f2's debt is stale now
    sec.on_batch("L", batch(2, msgs=[append("f1", 12, 1)]), 1.03)
    assert sec.on_replies("f1", reply_from("f1", index=13), 1.031) is True   # f2 not awaited


def test_secretary_acknowledges_batches_even_without_replies():
    sec = SecretaryRelay("s1")
    sec.on_batch("L", batch(3), 1.0)
    _, payload = sec.flush(1.0)
    assert wire.decode_report(payload, "L").ack_seq == 3


def test_an_acknowledgement_of_nothing_new_waits_for_the_next_report():
    # Followers answer a commit notice with the index they acknowledged before: the leader
    # learns nothing from it, so it makes no report of its own and rides with the next one.
    sec = SecretaryRelay("s1", max_delay=0.002)
    msgs = [append(f, 10, 2) for f in ("f1", "f2")]
    sec.on_batch("L", batch(1, msgs=msgs), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is False
    assert sec.on_replies("f2", reply_from("f2"), 1.001) is True
    sec.flush(1.001)
    sec.on_batch("L", batch(2, msgs=[append(f, 12, 0, commit=12) for f in ("f1", "f2")]),
                 1.002)
    assert sec.on_replies("f1", reply_from("f1"), 1.003) is False
    assert sec.on_replies("f2", reply_from("f2"), 1.003) is False   # all in, nothing new
    assert sec.flush_at == pytest.approx(1.002 + QUIET_FACTOR * 0.002)
    sec.on_batch("L", batch(3, msgs=[append(f, 12, 1) for f in ("f1", "f2")]), 1.004)
    assert sec.on_replies("f1", reply_from("f1", index=13), 1.005) is False
    assert sec.flush_at == pytest.approx(1.007)                     # news: 2 ms at most
    assert sec.on_replies("f2", reply_from("f2", index=13), 1.005) is True
    leader, payload = sec.flush(1.005)
    report = wire.decode_report(payload, "L")
    assert report.ack_seq == 3
    assert [(m.frm, m.index) for m in report.replies] == [("f1", 13), ("f2", 13)]


def test_the_last_answer_sends_waiting_news_at_once_even_if_it_is_none_itself():
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", batch(1, msgs=[append("f1", 10, 2), append("f2", 10, 2)]), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is False
    assert sec.on_replies("f2", reply_from("f2"), 1.001) is True
    sec.flush(1.001)
    sec.on_batch("L", batch(2, msgs=[append("f1", 12, 1), append("f2", 12, 0)]), 1.002)
    assert sec.on_replies("f1", reply_from("f1", index=13), 1.003) is False   # f2 still due
    assert sec.on_replies("f2", reply_from("f2"), 1.003) is True    # no news, but f1's waits
    _, payload = sec.flush(1.003)
    assert [(m.frm, m.index) for m in wire.decode_report(payload, "L").replies] == [
        ("f1", 13), ("f2", 12)]


def test_rejections_heartbeat_replies_and_read_acknowledgements_are_always_news():
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", batch(1, msgs=[append("f1", 10, 2), heartbeat("f2", context=b"r1")]),
                 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is False   # f2 still due
    sec.flush(1.002)
    for item in (Message(MT.APPEND_RESP, "L", "f1", TERM, index=12, reject=True,
                         reject_hint=11),
                 Message(MT.HEARTBEAT_RESP, "L", "f1", TERM),
                 Message(MT.HEARTBEAT_RESP, "L", "f1", TERM, context=b"r1")):
        sec.on_batch("L", batch(2, msgs=[append("f1", 12, 0)]), 1.01)
        replies = wire.decode_replies(through_wire(wire.encode_replies(TERM, "L", [item])))
        sec.on_replies("f1", replies, 1.011)
        assert sec.flush_at == pytest.approx(1.013), item
        sec.flush(1.013)


def test_a_rejection_makes_the_followers_acknowledgements_news_again():
    # A follower whose storage was wiped rejects, and the leader lowers its match: its next
    # acknowledgements, even of indexes it acknowledged before, are what the leader needs.
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", batch(1, msgs=[append("f1", 10, 2)]), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is True
    sec.flush(1.001)
    sec.on_batch("L", batch(2, msgs=[append("f1", 12, 0)]), 1.002)
    rejection = Message(MT.APPEND_RESP, "L", "f1", TERM, index=12, reject=True, reject_hint=0)
    sec.on_replies("f1", wire.decode_replies(through_wire(wire.encode_replies(
        TERM, "L", [rejection]))), 1.003)
    sec.flush(1.003)
    sec.on_batch("L", batch(3, msgs=[append("f1", 0, 12)]), 1.004)
    assert sec.on_replies("f1", reply_from("f1", index=12), 1.005) is True


def test_a_report_that_could_not_be_sent_makes_its_acknowledgements_news_again():
    sec = SecretaryRelay("s1", max_delay=0.002)
    sec.on_batch("L", batch(1, msgs=[append("f1", 10, 2)]), 1.0)
    assert sec.on_replies("f1", reply_from("f1"), 1.001) is True
    sec.flush(1.001)
    sec.report_lost()
    sec.on_batch("L", batch(2, msgs=[append("f1", 12, 0)]), 1.002)
    assert sec.on_replies("f1", reply_from("f1"), 1.003) is True    # the leader needs it


def test_a_report_that_could_not_be_sent_settles_nothing():
    sec = twelve_settled()
    sec.report_lost()                                      # the report that settled 12
    sec.on_replies("f2", reply_from("f2", index=11), 1.012)   # late, and first again
    sec.flush(1.012)
    assert sec.on_replies("f2", reply_from("f2", index=12), 1.013) is True   # needed


def test_secretary_fencing():
    sec = SecretaryRelay("s1")
    assert sec.on_batch("X", batch(1), 1.0) == []                    # not from its leader
    sec.on_batch("L", batch(1), 1.0)
    sec.on_replies("f1", reply_from("f1"), 1.0)
    assert sec.on_batch("L", batch(2, term=TERM - 1), 1.0) == []     # older term
    assert sec.on_batch("M", batch(2, leader="M"), 1.0) == []        # same term, other leader
    assert sec.on_replies("f2", reply_from("f2", term=TERM - 1), 1.0) is False
    assert sec.on_replies("f2", reply_from("f2", leader="M"), 1.0) is False
    # A higher term: the old assignment's buffered reply is dropped, never forwarded.
    assert sec.on_batch("M", batch(1, term=TERM + 1, leader="M"), 1.1)
    leader, payload = sec.flush(1.1)
    report = wire.decode_report(payload, "M")
    assert leader == "M" and report.term == TERM + 1 and report.replies == ()
    assert sec.stats.dropped == {"not_from_leader": 1, "stale_term": 1,
                                 "conflicting_leader": 1, "stale_reply": 2}


def test_secretary_refuses_batches_larger_than_its_window():
    sec = SecretaryRelay("s1", window=2)
    assert sec.on_batch("L", batch(1, msgs=[append("f1", 10, 3)]), 1.0) == []
    assert sec.stats.dropped == {"window": 1}


def test_unreachable_follower_is_reported():
    sec = SecretaryRelay("s1")
    sec.on_batch("L", batch(1), 1.0)
    sec.unreachable("f2", 1.0)
    assert sec.flush_at == pytest.approx(1.002)   # told as soon as a reply would be
    _, payload = sec.flush(1.0)
    assert wire.decode_report(payload, "L").unreachable == ("f2",)


# -- the follower's core ----------------------------------------------------------------------


def relay(term: int = TERM, leader: str = "L") -> wire.Relay:
    return wire.decode_relay(wire.encode_relay(term, leader, [[int(MT.HEARTBEAT), 0, 0, 3, b"",
                                                               []]]), "f1")


def test_follower_replies_through_the_secretary_that_relayed():
    fol = FollowerRelay("f1", ttl=0.3)
    [m] = fol.on_relay("s1", relay(), 1.0)
    assert m == Message(MT.HEARTBEAT, "f1", "L", TERM, commit=3)
    out = [Message(MT.HEARTBEAT_RESP, "L", "f1", TERM),
           Message(MT.APPEND_RESP, "L", "f1", TERM + 1),     # another term: direct
           Message(MT.APPEND_RESP, "M", "f1", TERM),         # another leader: direct
           Message(MT.VOTE, "L", "f1", TERM)]
    secretary, picked, payload = fol.take_replies(out, 1.1)
    assert secretary == "s1" and picked == [out[0]]
    assert wire.decode_replies(payload).items[0][0] is MT.HEARTBEAT_RESP


def test_follower_route_expires_and_is_dropped_on_a_direct_notice():
    fol = FollowerRelay("f1", ttl=0.3)
    fol.on_relay("s1", relay(), 1.0)
    reply = [Message(MT.HEARTBEAT_RESP, "L", "f1", TERM)]
    assert fol.take_replies(reply, 1.31) is None       # no relay for longer than the ttl
    fol.on_relay("s1", relay(), 2.0)
    fol.on_direct("X", TERM)                           # only the leader can say so
    assert fol.take_replies(reply, 2.1) is not None
    fol.on_direct("L", TERM)
    assert fol.take_replies(reply, 2.1) is None


def test_follower_route_only_moves_forward_in_terms():
    fol = FollowerRelay("f1", ttl=0.3)
    fol.on_relay("s2", relay(term=TERM + 1, leader="M"), 1.0)
    fol.on_relay("s1", relay(), 1.0)                   # a late relay of the old term
    assert fol.status() == {"leader": "M", "term": TERM + 1, "secretary": "s2"}
    assert fol.on_relay("s1", relay(leader="f1"), 1.0) == []   # nonsense: "from" itself


def test_entries_keep_their_type_through_the_relay():
    conf = Entry(TERM, 11, b"1:n4", EntryType.CONF_CHANGE)
    m = Message(MT.APPEND, "f1", "L", TERM, log_term=TERM, index=10, entries=(conf,), commit=9)
    b = wire.decode_batch(through_wire(wire.encode_batch(1, TERM, "L", [m], {})))
    [t] = b.targets
    got = wire.decode_relay(through_wire(wire.encode_relay(
        TERM, "L", [wire.relay_item(t, b.wire_entries(t))])), "f1")
    assert got.messages == (m,)


def test_reports_carry_each_followers_latest_word():
    """A follower's older accepted APPEND_RESPs and plain HEARTBEAT_RESPs are left out of a
    report; rejections and ReadIndex acknowledgements all go through."""
    sec = SecretaryRelay("s1")
    sec.on_batch("L", batch(1), 1.0)
    replies = [Message(MT.APPEND_RESP, "L", "f1", TERM, index=11),
               Message(MT.HEARTBEAT_RESP, "L", "f1", TERM),
               Message(MT.APPEND_RESP, "L", "f1", TERM, index=13),
               Message(MT.APPEND_RESP, "L", "f1", TERM, index=12),
               Message(MT.APPEND_RESP, "L", "f1", TERM, index=9, reject=True, reject_hint=8),
               Message(MT.HEARTBEAT_RESP, "L", "f1", TERM, context=b"r1"),
               Message(MT.HEARTBEAT_RESP, "L", "f1", TERM),
               Message(MT.APPEND_RESP, "L", "f2", TERM, index=10)]
    for m in replies:
        sec.on_replies(m.frm, wire.decode_replies(wire.encode_replies(TERM, "L", [m])), 1.0)
    _, payload = sec.flush(1.0)
    got = wire.decode_report(payload, "L").replies
    assert got == (replies[2], replies[4], replies[5], replies[6], replies[7])
    assert sec.stats.coalesced == 3
