"""Property tests for the log and the quorum arithmetic."""

from __future__ import annotations

from itertools import combinations

from hypothesis import given, settings, strategies as st

from bwcore.kernel import Entry, Snapshot, SnapshotMeta
from bwcore.kernel.log import RaftLog
from bwcore.kernel.progress import committed_index, has_quorum, quorum_size, vote_result

VOTERS = st.frozensets(st.sampled_from("abcdefg"), min_size=1)


@given(voters=VOTERS, data=st.data())
def test_committed_index_is_the_largest_index_a_majority_holds(voters, data):
    """committed_index == max i such that some majority all have match >= i (brute force)."""
    match = {v: data.draw(st.integers(0, 20)) for v in voters}
    q = quorum_size(len(voters))
    best = 0
    for group in combinations(sorted(voters), q):
        best = max(best, min(match[v] for v in group))
    assert committed_index(voters, match) == best


@given(voters=VOTERS, data=st.data())
def test_any_two_quorums_intersect(voters, data):
    """Two sets that are both quorums of the same voters share a member (§5.2's basis)."""
    a = data.draw(st.frozensets(st.sampled_from(sorted(voters))))
    b = data.draw(st.frozensets(st.sampled_from(sorted(voters))))
    if has_quorum(voters, a) and has_quorum(voters, b):
        assert a & b


@given(voters=VOTERS, data=st.data())
def test_vote_result_is_decided_only_when_certain(voters, data):
    """Won iff a majority granted; lost iff a majority can no longer be reached; non-voters'
    answers never matter (invariant 5)."""
    votes = {v: data.draw(st.sampled_from([True, False, None])) for v in voters}
    votes = {k: v for k, v in votes.items() if v is not None}
    outsiders = {x: True for x in "xyz"}
    res = vote_result(voters, {**votes, **outsiders})
    yes = sum(votes.values())
    undecided = len(voters) - len(votes)
    q = quorum_size(len(voters))
    assert res is (True if yes >= q else False if yes + undecided < q else None)


entries_st = st.lists(st.integers(1, 4), max_size=12)  # entry terms


def _log(terms):
    """A log (no snapshot) with entries of the given terms, sorted as a real log's are."""
    ents = [Entry(t, k + 1, b"%d" % k) for k, t in enumerate(sorted(terms))]
    return RaftLog(Snapshot(SnapshotMeta()), ents, 0), [e.term for e in ents]


@settings(max_examples=300)
@given(mine=entries_st, theirs=entries_st, data=st.data())
def test_maybe_append_leaves_a_prefix_of_the_leader_log(mine, theirs, data):
    """After a successful append the follower holds the leader's entries up to the last new
    index exactly, never loses entries before prev, and only truncates on a conflict."""
    log, my_terms = _log(mine)
    leader_terms = sorted(theirs)
    leader = [Entry(t, k + 1, b"L%d" % k) for k, t in enumerate(leader_terms)]
    prev = data.draw(st.integers(0, len(leader)))
    n = data.draw(st.integers(0, len(leader) - prev))
    prev_term = leader[prev - 1].term if prev else 0
    before = list(log.entries)
    res = log.maybe_append(prev, prev_term, 0, tuple(leader[prev:prev + n]))
    if res is None:
        assert log.entries == before
        assert log.term(prev) != prev_term
        return
    assert res == prev + n
    assert log.entries[:prev] == before[:prev]
    for e in leader[prev:prev + n]:
        assert log.term(e.index) == e.term
    if all(log.term(e.index) == e.term for e in leader[prev:prev + n]) and \
            len(before) > prev + n and all(
                k >= len(before) or before[k].term == leader[k].term for k in range(prev, prev + n)):
        assert log.entries == before  # nothing conflicted: nothing truncated


@given(terms=entries_st, index=st.integers(0, 15), term=st.integers(0, 5))
def test_find_conflict_by_term(terms, index, term):
    """The hint is the largest index <= index whose term is <= term."""
    log, my_terms = _log(terms)
    got = log.find_conflict_by_term(index, term)
    want = 0
    for i in range(1, min(index, len(my_terms)) + 1):
        if my_terms[i - 1] <= term:
            want = i
    assert got == want


@given(terms=entries_st, cut=st.integers(0, 12))
def test_compact_keeps_terms_and_indexes(terms, cut):
    """Compaction drops the prefix and nothing else: every later index keeps its term."""
    log, my_terms = _log(terms)
    cut = min(cut, len(my_terms))
    log.applied = log.committed = len(my_terms)
    if cut == 0:
        return
    log.compact(Snapshot(SnapshotMeta(cut, my_terms[cut - 1])))
    assert log.first_index() == cut + 1 and log.last_index() == len(my_terms)
    for i in range(cut, len(my_terms) + 1):
        assert log.term(i) == (my_terms[i - 1] if i else 0)
    assert log.slice(cut, cut + 1, 0) is None  # compacted: a snapshot is needed
