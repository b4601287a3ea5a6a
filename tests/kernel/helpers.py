"""Small tools for driving one RawNode by hand, as etcd-io/raft's paper tests do."""

from __future__ import annotations

import random

from bwcore.kernel import ConfState, KernelConfig, Message, MessageType, RawNode, StateRole


def new_node(node_id: str = "a", voters=("a", "b", "c"), seed: int = 0, **cfg) -> RawNode:
    """A bootstrapped node whose first Ready (the bootstrap entries) is already handled."""
    raw = RawNode(KernelConfig(id=node_id, **cfg), random.Random(seed),
                  bootstrap=ConfState(voters=frozenset(voters)))
    drain(raw)
    return raw


def drain(raw: RawNode) -> list[Message]:
    """Handle every pending Ready as a driver with instant storage would; return the messages."""
    out: list[Message] = []
    while raw.has_ready():
        rd = raw.ready()
        out.extend(rd.messages)
        out.extend(rd.persisted_messages)
        raw.advance(rd)
    return out


def of_type(msgs: list[Message], t: MessageType) -> list[Message]:
    return [m for m in msgs if m.type is t]


def make_leader(raw: RawNode) -> list[Message]:
    """Elect ``raw`` (pre-vote off or on) by answering its vote requests with grants."""
    for _ in range(10 * 10):
        raw.tick()
        if raw.role is not StateRole.FOLLOWER:
            break
    for _ in range(2):
        msgs = drain(raw)
        for m in msgs:
            if m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
                resp = MessageType.PRE_VOTE_RESP if m.type is MessageType.PRE_VOTE \
                    else MessageType.VOTE_RESP
                raw.step(Message(resp, raw.id, m.to, m.term))
    assert raw.role is StateRole.LEADER, raw.role
    return drain(raw)
