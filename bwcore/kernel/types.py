"""Values that cross the kernel's boundary: log entries, persisted state, messages.

Everything here is an immutable value. Node ids are strings (the ``id`` of a node's
config). Terms and indexes are ints; index 0 / term 0 mean "nothing".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. ``data`` is opaque to the kernel (a leader's no-op has ``b""``)."""

    term: int
    index: int
    data: bytes = b""
    type: EntryType = EntryType.NORMAL


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it leaves (Raft §5, Figure 2)."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The voting configuration. Learners receive the log but never vote or count.

    Helpers (secretaries, observers) are not here at all: they come and go by gossip and the
    leader feeds them through :meth:`bwcore.kernel.RawNode.add_helper`.
    """

    voters: frozenset[str] = frozenset()
    learners: frozenset[str] = frozenset()

    def members(self) -> frozenset[str]:
        return self.voters | self.learners


class ConfChangeType(enum.IntEnum):
    ADD_LEARNER = 0
    PROMOTE = 1  # learner -> voter (a voter is always added as a learner first)
    REMOVE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server configuration change (Raft dissertation §4.1)."""

    type: ConfChangeType
    node: str

    def encode(self) -> bytes:
        return b"%d:%s" % (self.type, self.node.encode())

    @classmethod
    def decode(cls, data: bytes) -> "ConfChange":
        kind, _, node = data.partition(b":")
        return cls(ConfChangeType(int(kind)), node.decode())

    def apply(self, conf: ConfState) -> ConfState:
        voters, learners = set(conf.voters), set(conf.learners)
        if self.type is ConfChangeType.ADD_LEARNER:
            if self.node not in voters:
                learners.add(self.node)
        elif self.type is ConfChangeType.PROMOTE:
            learners.discard(self.node)
            voters.add(self.node)
        else:
            voters.discard(self.node)
            learners.discard(self.node)
        return ConfState(frozenset(voters), frozenset(learners))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine image at ``meta.index``. ``data`` is opaque to the kernel."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: bytes = b""


class MessageType(enum.IntEnum):
    VOTE = 1
    VOTE_RESP = 2
    PRE_VOTE = 3
    PRE_VOTE_RESP = 4
    APPEND = 5
    APPEND_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAPSHOT = 9
    TIMEOUT_NOW = 10
    READ_INDEX = 11
    READ_INDEX_RESP = 12


#: Responses whose content depends on state that must be durable first (Raft §5.1: "respond
#: to RPCs only after updating stable storage").
RESPONSES_AFTER_PERSIST = frozenset(
    {MessageType.VOTE_RESP, MessageType.PRE_VOTE_RESP, MessageType.APPEND_RESP}
)

#: What a node sends as a candidate or a leader: only in a term it cannot forget, one whose
#: vote for itself is durable (see :mod:`bwcore.kernel.rawnode`).
SENT_AS_CANDIDATE_OR_LEADER = frozenset(
    {MessageType.VOTE, MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT,
     MessageType.TIMEOUT_NOW, MessageType.READ_INDEX_RESP}
)


@dataclass(frozen=True, slots=True)
class Message:
    """One kernel message. Which fields matter depends on ``type``.

    - VOTE / PRE_VOTE: ``index``/``log_term`` = candidate's last entry; ``context`` is
      ``b"transfer"`` for a campaign started by TIMEOUT_NOW (bypasses the leader lease).
    - VOTE_RESP / PRE_VOTE_RESP: ``reject``.
    - APPEND: ``index``/``log_term`` = the entry before ``entries``; ``commit``.
    - APPEND_RESP: accepted -> ``index`` = last index now matching; rejected ->
      ``index`` = the rejected probe index, ``reject_hint``/``log_term`` = where the
      follower's log could match (fast backtracking, Raft §5.3 "optimization").
    - HEARTBEAT: ``commit``; ``context`` = the ReadIndex round it confirms, if any.
    - HEARTBEAT_RESP: ``context`` echoed.
    - SNAPSHOT: ``snapshot``. Answered by APPEND_RESP.
    - READ_INDEX: ``context`` from a follower or helper. READ_INDEX_RESP: ``index``,
      ``context``; ``reject`` if the leader could not serve it.
    """

    type: MessageType
    to: str
    frm: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""
    snapshot: Snapshot | None = None


class StateRole(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver may want to show or react to; never persisted."""

    leader: str | None
    role: StateRole


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once ``applied >= index`` (Raft §6.4 ReadIndex)."""

    index: int
    context: bytes


class ProposalDropped(Exception):
    """The node cannot take the proposal now (not leader, transfer in progress, ...)."""
