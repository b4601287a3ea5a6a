"""Conformance with the Raft paper, §5.1-5.4: one test per claim, each citing its section.

Modelled on etcd-io/raft's raft_paper_test.go. Nodes are driven by hand; the bootstrap
configuration occupies indexes 1-3 (term 1), so a first leader's no-op is index 4.
"""

from __future__ import annotations

from bwcore.kernel import Entry, Message, MessageType as MT, StateRole
from tests.kernel.helpers import drain, make_leader, new_node, of_type

BOOT = 3  # bootstrap entries


def test_starts_as_follower():
    """§5.2: "When servers start up, they begin as followers." """
    raw = new_node()
    assert raw.role is StateRole.FOLLOWER and raw.term == 1 and raw.leader is None


def test_higher_term_makes_any_role_follower():
    """§5.1: "If a server receives a request with a higher term, it updates its term and
    reverts to follower state" — from follower, candidate and leader alike."""
    for start in ("follower", "candidate", "leader"):
        raw = new_node(pre_vote=False)
        if start == "candidate":
            for _ in range(20):
                raw.tick()
            assert raw.role is StateRole.CANDIDATE
        elif start == "leader":
            make_leader(raw)
        raw.step(Message(MT.APPEND, "a", "b", 10, log_term=1, index=BOOT))
        assert (raw.role, raw.term, raw.leader) == (StateRole.FOLLOWER, 10, "b"), start


def test_stale_term_message_is_ignored():
    """§5.1: "If a server receives a request with a stale term number, it rejects the
    request." The stale append changes nothing and is answered with our term."""
    raw = new_node()
    raw.step(Message(MT.APPEND, "a", "b", 5, log_term=1, index=BOOT))
    drain(raw)
    raw.step(Message(MT.APPEND, "a", "c", 4, log_term=1, index=BOOT,
                     entries=(Entry(4, BOOT + 1, b"x"),)))
    msgs = drain(raw)
    assert raw.last_index == BOOT and raw.leader == "b"
    assert [(m.type, m.to, m.term) for m in msgs] == [(MT.APPEND_RESP, "c", 5)]


def test_leader_broadcasts_heartbeats():
    """§5.2: "Leaders send periodic heartbeats ... to all followers." """
    raw = new_node(heartbeat_tick=1)
    make_leader(raw)
    raw.tick()
    beats = of_type(drain(raw), MT.HEARTBEAT)
    assert sorted(m.to for m in beats) == ["b", "c"]
    assert all(m.term == raw.term for m in beats)


def test_follower_times_out_and_campaigns():
    """§5.2: a follower that hears nothing for an election timeout increments its term,
    votes for itself and requests votes from every other server."""
    raw = new_node(pre_vote=False, election_tick=10)
    for _ in range(20):
        raw.tick()
    assert raw.role is StateRole.CANDIDATE and raw.term == 2
    votes = of_type(drain(raw), MT.VOTE)
    assert sorted(m.to for m in votes) == ["b", "c"]
    assert all((m.term, m.index, m.log_term) == (2, BOOT, 1) for m in votes)


def test_candidate_times_out_and_starts_new_election():
    """§5.2: "If the election timeout elapses without a winner, the candidate starts a new
    election by incrementing its term." """
    raw = new_node(pre_vote=False, election_tick=10)
    for _ in range(20):
        raw.tick()
    assert raw.term == 2
    drain(raw)
    for _ in range(20):
        raw.tick()
    assert raw.role is StateRole.CANDIDATE and raw.term == 3
    assert sorted(m.to for m in of_type(drain(raw), MT.VOTE)) == ["b", "c"]


def test_election_in_one_round():
    """§5.2: a candidate wins with votes from a majority, loses to a majority of rejections,
    and waits otherwise."""
    cases = [
        ({"b": True}, StateRole.LEADER),
        ({"b": False, "c": False}, StateRole.FOLLOWER),
        ({"b": False}, StateRole.CANDIDATE),
        ({}, StateRole.CANDIDATE),
    ]
    for answers, want in cases:
        raw = new_node(pre_vote=False)
        for _ in range(20):
            raw.tick()
        drain(raw)
        for frm, granted in answers.items():
            raw.step(Message(MT.VOTE_RESP, "a", frm, raw.term, reject=not granted))
        assert raw.role is want, answers


def test_follower_votes_at_most_once_per_term():
    """§5.2: "Each server will vote for at most one candidate in a given term, on a
    first-come-first-served basis." """
    raw = new_node(check_quorum=False)
    raw.step(Message(MT.VOTE, "a", "b", 2, log_term=1, index=BOOT))
    raw.step(Message(MT.VOTE, "a", "c", 2, log_term=1, index=BOOT))
    raw.step(Message(MT.VOTE, "a", "b", 2, log_term=1, index=BOOT))  # a retry: granted again
    resps = of_type(drain(raw), MT.VOTE_RESP)
    assert [(m.to, m.reject) for m in resps] == [("b", False), ("c", True), ("b", False)]


def test_vote_response_waits_for_persistence():
    """§5.1/Figure 2: a vote is durable before it is announced: the grant is a
    persisted_message, released only with the hard state that records it."""
    raw = new_node(check_quorum=False)
    raw.step(Message(MT.VOTE, "a", "b", 2, log_term=1, index=BOOT))
    rd = raw.ready()
    assert rd.hard_state is not None and rd.hard_state.vote == "b"
    assert [m.type for m in rd.persisted_messages] == [MT.VOTE_RESP] and not rd.messages


def test_vote_requests_wait_for_the_candidates_term():
    """Figure 2: a candidate's new term and its vote for itself are durable before it asks for
    votes. Otherwise a crash could take it back to the old term, and it could win the same
    term twice and write two different entries at one index and term."""
    raw = new_node(pre_vote=False, check_quorum=False)
    raw.campaign()
    rd = raw.ready()
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (2, "a")
    assert not rd.messages
    assert sorted((m.type, m.to) for m in rd.persisted_messages) == [(MT.VOTE, "b"),
                                                                      (MT.VOTE, "c")]


def saving(raw):
    """Hand ``raw`` an append from leader b of term 1 and take its Ready, left unsaved."""
    raw.step(Message(MT.APPEND, "a", "b", 1, log_term=1, index=BOOT,
                     entries=(Entry(1, BOOT + 1, b"x"),)))
    return raw.ready()


def test_leader_elected_during_the_save_of_its_term_sends_nothing_before_it():
    """A candidate can win while the Ready with its new term is still being saved only on
    grants from an earlier run of itself (asked before a crash, delivered late): its appends
    wait for that save too, also those a driver takes early (take_messages, dissertation
    §10.2.1)."""
    raw = new_node(check_quorum=False)
    raw.campaign()                                  # pre-vote: no new term yet
    for m in drain(raw):
        raw.step(Message(MT.PRE_VOTE_RESP, "a", m.to, m.term))
    rd = raw.ready()                                # the new term, being saved
    assert rd.hard_state is not None and rd.hard_state.term == 2 and not rd.messages
    for frm in ("b", "c"):
        raw.step(Message(MT.VOTE_RESP, "a", frm, 2))
    assert raw.role is StateRole.LEADER
    assert raw.take_messages() == []
    raw.advance(rd)                                 # saved: now the term is durable
    early = raw.take_messages()
    assert sorted((m.type, m.to, m.term) for m in early) == [(MT.APPEND, "b", 2),
                                                             (MT.APPEND, "c", 2)]


def test_what_a_candidate_said_in_an_unsaved_term_waits_whatever_it_is_now():
    """The rule follows each message's term, not the role when it leaves: a candidate whose
    term is not saved yet and that meanwhile fell back (a higher term, or its election timed
    out into a pre-vote) still holds the vote requests of that term."""
    raw = new_node(pre_vote=False, check_quorum=False)
    raw.campaign()                                  # term 2, not saved
    raw.step(Message(MT.VOTE, "a", "c", 3, log_term=1, index=BOOT))   # now a follower of 3
    rd = raw.ready()
    assert rd.hard_state is not None and rd.hard_state.term == 3
    assert not [m for m in rd.messages if m.type is MT.VOTE]
    assert sorted((m.type, m.to, m.term) for m in rd.persisted_messages
                  if m.type is MT.VOTE) == [(MT.VOTE, "b", 2), (MT.VOTE, "c", 2)]

    raw = new_node(election_tick=10, check_quorum=False)
    rd = saving(raw)
    while raw.role is not StateRole.PRE_CANDIDATE:
        raw.tick()
    for m in raw.take_messages():                   # pre-votes may leave: they change nothing
        assert m.type is MT.PRE_VOTE
        raw.step(Message(MT.PRE_VOTE_RESP, "a", m.to, m.term))
    assert raw.role is StateRole.CANDIDATE
    while raw.role is not StateRole.PRE_CANDIDATE:  # its election times out during the save
        raw.tick()
    assert [m.type for m in raw.take_messages() if m.type is not MT.PRE_VOTE] == []
    raw.advance(rd)
    rd = raw.ready()                                # the Ready that saves term 2 at last
    assert not [m for m in rd.messages if m.type is MT.VOTE]
    assert {(m.to, m.term) for m in rd.persisted_messages if m.type is MT.VOTE} \
        == {("b", 2), ("c", 2)}


def test_a_leader_that_steps_down_before_its_term_is_saved_sends_none_of_its_appends():
    """A leader of an unsaved term (won on late grants) that check-quorum deposes before the
    save: its appends of that term still wait for the save."""
    raw = new_node(election_tick=10, pre_vote=False)
    rd = saving(raw)
    raw.campaign()                                  # term 2, during the save
    for frm in ("b", "c"):
        raw.step(Message(MT.VOTE_RESP, "a", frm, 2))
    assert raw.role is StateRole.LEADER
    for _ in range(25):
        raw.tick()
    assert raw.role is not StateRole.LEADER
    assert not [m for m in raw.take_messages() if m.type in (MT.APPEND, MT.HEARTBEAT)]
    raw.advance(rd)
    rd = raw.ready()                                # they leave once term 2 is saved
    assert not [m for m in rd.messages if m.type is MT.APPEND and m.term == 2]
    assert {m.to for m in rd.persisted_messages if m.type is MT.APPEND and m.term == 2} \
        == {"b", "c"}


def test_a_follower_answers_heartbeats_while_its_new_term_is_saved():
    """Answers are not held: a follower that learned a new term from its leader still
    confirms the leader's heartbeats while the Ready with that term is being saved (or a
    leader's snapshot decoded), or check-quorum could depose a healthy leader."""
    raw = new_node(check_quorum=False)
    raw.step(Message(MT.HEARTBEAT, "a", "b", 2, commit=BOOT))
    rd = raw.ready()
    assert rd.hard_state is not None and rd.hard_state.term == 2
    assert [m.type for m in rd.messages] == [MT.HEARTBEAT_RESP]
    raw.step(Message(MT.HEARTBEAT, "a", "b", 2, commit=BOOT))
    assert [m.type for m in raw.take_messages()] == [MT.HEARTBEAT_RESP]
    raw.advance(rd)


def test_candidate_falls_back_on_leader_of_its_term():
    """§5.2: "If the AppendEntries RPC is from a leader whose term is at least as large as the
    candidate's current term, the candidate ... returns to follower state." """
    raw = new_node(pre_vote=False)
    for _ in range(20):
        raw.tick()
    term = raw.term
    raw.step(Message(MT.APPEND, "a", "b", term, log_term=1, index=BOOT))
    assert (raw.role, raw.leader, raw.term) == (StateRole.FOLLOWER, "b", term)


def test_election_timeouts_are_randomized():
    """§5.2: "election timeouts are chosen randomly from a fixed interval", here
    [election_tick, 2 * election_tick)."""
    seen = set()
    for seed in range(50):
        raw = new_node(seed=seed, pre_vote=False, election_tick=10)
        ticks = 0
        while raw.role is StateRole.FOLLOWER:
            raw.tick()
            ticks += 1
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) >= 5


def test_leader_replicates_proposal():
    """§5.3: the leader appends the command to its log and issues AppendEntries carrying it,
    with the index and term of the preceding entry, to every follower."""
    raw = new_node()
    make_leader(raw)
    index = raw.propose(b"cmd")
    appends = of_type(drain(raw), MT.APPEND)
    assert index == BOOT + 2
    for m in appends:
        assert m.entries == (Entry(raw.term, index, b"cmd"),)
        assert (m.index, m.log_term) == (BOOT + 1, raw.term)


def test_followers_level_with_each_other_share_one_slice_of_the_log():
    """One broadcast cuts the log once for the followers at the same point (§5.3: each gets
    the entries after its own next index), and one still being probed gets nothing more."""
    raw = new_node(voters=("a", "b", "c", "d"))
    make_leader(raw)
    noop = raw.last_index
    _ack(raw, "b", noop)
    _ack(raw, "c", noop)
    drain(raw)
    index = raw.propose(b"x")
    appends = {m.to: m for m in of_type(drain(raw), MT.APPEND)}
    assert set(appends) == {"b", "c"}            # d has not answered its probe
    assert appends["b"].entries == (Entry(raw.term, index, b"x"),)
    assert appends["b"].entries is appends["c"].entries
    assert (appends["c"].index, appends["c"].log_term) == (noop, raw.term)


def _ack(raw, frm, index):
    raw.step(Message(MT.APPEND_RESP, raw.id, frm, raw.term, index=index))


def test_leader_commits_once_a_majority_has_the_entry():
    """§5.3: "A log entry is committed once the leader that created the entry has replicated
    it on a majority of the servers", and the leader tells followers the new commit index."""
    raw = new_node(voters=("a", "b", "c", "d", "e"))
    make_leader(raw)
    index = raw.propose(b"x")
    drain(raw)
    _ack(raw, "b", index)
    drain(raw)
    assert raw.commit_index < index  # leader + 1 of 5
    _ack(raw, "c", index)
    msgs = drain(raw)
    assert raw.commit_index == index
    # Followers in replication hear of it at once; d and e never answered, so they are being
    # probed and learn the commit index with their next successful append.
    assert {m.to for m in of_type(msgs, MT.APPEND) if m.commit == index} == {"b", "c"}


def test_leader_commit_includes_preceding_entries():
    """§5.3: committing an entry "also commits all preceding entries in the leader's log,
    including entries created by previous leaders." """
    raw = new_node()
    raw.step(Message(MT.APPEND, "a", "b", 2, log_term=1, index=BOOT, commit=BOOT,
                     entries=(Entry(2, 4, b"old1"), Entry(2, 5, b"old2"))))
    drain(raw)
    make_leader(raw)
    assert raw.commit_index == BOOT
    _ack(raw, "b", raw.last_index)
    drain(raw)
    assert raw.commit_index == raw.last_index == 6


def test_follower_commits_what_leader_says():
    """§5.3: "Once a follower learns that a log entry is committed, it applies the entry." """
    raw = new_node()
    ents = (Entry(2, 4, b"x"), Entry(2, 5, b"y"))
    raw.step(Message(MT.APPEND, "a", "b", 2, log_term=1, index=BOOT, commit=4, entries=ents))
    rd = raw.ready()
    assert [e.index for e in rd.committed_entries] == [4]  # 1-3 were applied at bootstrap
    raw.advance(rd)
    assert raw.commit_index == 4


def test_follower_rejects_append_without_matching_previous_entry():
    """§5.3: "If the follower does not find an entry in its log with the same index and term,
    then it refuses the new entries", and hints where logs may match."""
    raw = new_node()
    raw.step(Message(MT.APPEND, "a", "b", 2, log_term=1, index=BOOT, commit=BOOT,
                     entries=(Entry(2, 4, b"x"),)))
    drain(raw)
    raw.step(Message(MT.APPEND, "a", "b", 3, log_term=3, index=6))
    (resp,) = of_type(drain(raw), MT.APPEND_RESP)
    assert resp.reject and resp.index == 6
    assert (resp.reject_hint, resp.log_term) == (4, 2)


def test_follower_truncates_conflicting_suffix():
    """§5.3: "If an existing entry conflicts with a new one (same index but different terms),
    delete the existing entry and all that follow it." """
    raw = new_node()
    raw.step(Message(MT.APPEND, "a", "b", 2, log_term=1, index=BOOT,
                     entries=(Entry(2, 4, b"x"), Entry(2, 5, b"y"), Entry(2, 6, b"z"))))
    drain(raw)
    raw.step(Message(MT.APPEND, "a", "c", 3, log_term=2, index=4,
                     entries=(Entry(3, 5, b"new"),)))
    rd = raw.ready()
    assert rd.entries == (Entry(3, 5, b"new"),)
    raw.advance(rd)
    assert raw.last_index == 5 and raw.term_at(5) == 3 and raw.term_at(4) == 2


def test_leader_brings_divergent_follower_in_sync():
    """§5.3, Figure 7: whatever a follower's log looks like, the leader's log wins."""
    from bwcore.sim.network import SimNetwork
    net = SimNetwork(["a", "b", "c"], seed=3)
    lead = net.elect()
    for i in range(5):
        net.propose(lead, b"p%d" % i)
    net.stabilize()
    follower = next(n for n in "abc" if n != lead)
    net.isolate(follower)
    for i in range(5, 20):
        net.propose(lead, b"p%d" % i)
    net.stabilize()
    net.heal()
    for _ in range(3):
        net.tick()
        net.stabilize()
    assert net.applied_commands(follower) == net.applied_commands(lead)
    assert len(net.applied_commands(lead)) == 20


def test_vote_only_for_up_to_date_log():
    """§5.4.1: "the voter denies its vote if its own log is more up-to-date than that of the
    candidate" — by last term first, then by length."""
    cases = [  # (candidate last index, candidate last term, granted)
        (4, 2, True), (5, 2, True), (3, 2, False), (9, 1, False), (2, 3, True),
    ]
    for index, term, granted in cases:
        raw = new_node(check_quorum=False)
        raw.step(Message(MT.APPEND, "a", "b", 2, log_term=1, index=BOOT,
                         entries=(Entry(2, 4, b"x"),)))
        drain(raw)
        raw.step(Message(MT.APPEND, "a", "b", 5, log_term=2, index=4))  # term 5, no leader vote
        raw.step(Message(MT.VOTE, "a", "c", 6, log_term=term, index=index))
        (resp,) = of_type(drain(raw), MT.VOTE_RESP)
        assert resp.reject is (not granted), (index, term)


def test_leader_only_commits_current_term_entries_by_counting():
    """§5.4.2: "Raft never commits log entries from previous terms by counting replicas";
    they commit when an entry of the current term does (Figure 8)."""
    raw = new_node()
    raw.step(Message(MT.APPEND, "a", "b", 2, log_term=1, index=BOOT,
                     entries=(Entry(2, 4, b"old"),)))
    drain(raw)
    make_leader(raw)  # term 3, no-op at 5
    _ack(raw, "b", 4)  # a majority holds the old entry...
    drain(raw)
    assert raw.commit_index == BOOT  # ...which is not enough
    _ack(raw, "b", 5)
    drain(raw)
    assert raw.commit_index == 5


def _pump(net, keep) -> None:
    """Deliver in-flight messages that ``keep`` accepts, drop the rest, until none are left."""
    while net.inflight:
        batch, net.inflight = net.inflight, []
        for m in batch:
            if keep(m):
                net.deliver(m)


def figure_8(net) -> None:
    """The paper's Figure 8, step by step, on five nodes a-e (S1-S5) with one entry per
    append. If the term-4 leader counted its term-2 entry as committed, e would later
    overwrite it and the checker would see two different entries applied at one index."""
    from bwcore.kernel import MessageType as MT
    votes = {MT.VOTE, MT.VOTE_RESP}
    n = net.nodes
    net.campaign("a")
    net.stabilize()
    assert net.leader() == "a"
    # (a) S1 leads term 2 and gets entry X (index 7) only to S2.
    net.partition(["a", "b"], ["c", "d", "e"])
    x = net.propose("a", b"X")
    net.stabilize()
    # (b) S1 crashes; S5 wins term 3 with S3, S4 and appends its own entry at index 7.
    n["a"].crash()
    net.heal()
    net.campaign("e")
    _pump(net, lambda m: m.type in votes and m.to in "cde" and m.frm in "cde")
    assert n["e"].raw.role is StateRole.LEADER and n["e"].raw.term_at(7) == 3
    # (c) S5 crashes; S1 restarts and wins term 4 with S2, S3; X reaches S3 but S1's own
    # term-4 entry does not.
    n["e"].crash()
    n["a"].start()
    for _ in range(2):
        net.campaign("a")
        _pump(net, lambda m: m.type in votes and m.frm in "abcd" and m.to in "abcd")
    assert n["a"].raw.role is StateRole.LEADER and n["a"].raw.term == 4
    net.tick("a")  # a heartbeat: the probes dropped with the vote traffic go out again
    _pump(net, lambda m: m.to in "abc" and m.frm in "abc" and not (
        m.to == "c" and m.type is MT.APPEND and any(e.term == 4 for e in m.entries)
        and n["c"].raw.term_at(x) == 2))
    assert n["c"].raw.term_at(x) == 2
    # (d) S1 crashes; S5 restarts and wins with S3, S4 (its last term 3 beats their 2), then
    # replicates its term-3 entry at index 7 over X.
    n["a"].crash()
    n["e"].start()
    for _ in range(3):
        if n["e"].raw.role is StateRole.LEADER:
            break
        net.campaign("e")
        _pump(net, lambda m: m.type in votes and m.frm in "bcde" and m.to in "bcde")
    assert n["e"].raw.role is StateRole.LEADER
    net.stabilize()
    n["a"].start()
    for _ in range(5):
        net.tick()
        net.stabilize()
    assert len({tuple(net.applied_commands(i)) for i in "abcde"}) == 1


def test_figure_8_scripted():
    """§5.4.2, Figure 8: a leader never commits an entry of an earlier term by counting
    replicas, so the entry overwritten in (d) had never been applied anywhere."""
    from bwcore.sim.network import SimNetwork
    figure_8(SimNetwork("abcde", seed=1, max_append_bytes=1, pre_vote=False, check_quorum=False))
