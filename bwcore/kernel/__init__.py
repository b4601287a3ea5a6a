"""The consensus kernel: a deterministic Raft state machine with no I/O, clock or randomness
of its own. See docs/kernel.md for the contract."""

from bwcore.kernel.raft import KernelConfig
from bwcore.kernel.rawnode import RawNode, Ready
from bwcore.kernel.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ProposalDropped,
    ReadState,
    RESPONSES_AFTER_PERSIST,
    SENT_AS_CANDIDATE_OR_LEADER,
    Snapshot,
    SnapshotMeta,
    SoftState,
    StateRole,
)

__all__ = [
    "KernelConfig", "RawNode", "Ready",
    "ConfChange", "ConfChangeType", "ConfState", "Entry", "EntryType", "HardState", "Message",
    "MessageType", "ProposalDropped", "ReadState", "RESPONSES_AFTER_PERSIST",
    "SENT_AS_CANDIDATE_OR_LEADER", "Snapshot", "SnapshotMeta", "SoftState", "StateRole",
]
