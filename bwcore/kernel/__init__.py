"""The consensus kernel: a deterministic Raft state machine with no I/O, clock or randomness
of its own. See docs/kernel.md for the contract."""

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
    Snapshot,
    SnapshotMeta,
    SoftState,
    StateRole,
)

__all__ = [
    "ConfChange", "ConfChangeType", "ConfState", "Entry", "EntryType", "HardState", "Message",
    "MessageType", "ProposalDropped", "ReadState", "RESPONSES_AFTER_PERSIST", "Snapshot",
    "SnapshotMeta", "SoftState", "StateRole",
]
