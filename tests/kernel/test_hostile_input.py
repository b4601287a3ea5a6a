"""``RawNode.step`` never raises, whatever arrives from the network."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from bwcore.kernel import Entry, EntryType, Message, MessageType, Snapshot, SnapshotMeta, ConfState
from tests.kernel.helpers import drain, make_leader, new_node

ids = st.sampled_from(["a", "b", "c", "x", ""])
small = st.integers(-2, 12)
entries = st.lists(st.builds(Entry, term=small, index=small, data=st.binary(max_size=4),
                             type=st.sampled_from(EntryType)), max_size=4).map(tuple)
snapshots = st.none() | st.builds(
    Snapshot, meta=st.builds(SnapshotMeta, index=small, term=small,
                             conf=st.builds(ConfState, voters=st.frozensets(ids, max_size=3))),
    data=st.binary(max_size=4))
messages = st.builds(Message, type=st.sampled_from(MessageType), to=st.just("a"), frm=ids,
                     term=small, log_term=small, index=small, entries=entries, commit=small,
                     reject=st.booleans(), reject_hint=small, context=st.binary(max_size=3),
                     snapshot=snapshots)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(leader=st.booleans(), batch=st.lists(messages, max_size=8))
def test_step_never_raises(leader, batch):
    """Arbitrary (type-correct) messages, to a follower or a leader: no exception, and the
    node still hands out well-formed Readies afterwards."""
    raw = new_node()
    if leader:
        make_leader(raw)
    for m in batch:
        raw.step(m)
        drain(raw)
    assert raw.commit_index <= raw.last_index
