"""The node's Prometheus metrics, on a per-node ``CollectorRegistry``.

A registry per node (not the process-global default) keeps in-process test clusters apart and
lets ``/metrics`` show exactly one node. The peer transport and plugins add their own
collectors to the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["NodeMetrics"]

#: Buckets for durations from sub-millisecond (memory, page cache) to seconds (slow disks).
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class NodeMetrics:
    """Every core metric of one node.

    Attributes:
        registry: Where they are registered (serve it with ``generate_latest(registry)``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.term = Gauge("bwraft_term", "Current Raft term.", registry=r)
        self.commit_index = Gauge("bwraft_commit_index", "Highest log index known committed.",
                                  registry=r)
        self.applied_index = Gauge("bwraft_applied_index",
                                   "Highest log index applied to the state machine.", registry=r)
        self.last_index = Gauge("bwraft_last_index", "Index of the last entry in the log.",
                                registry=r)
        self.is_leader = Gauge("bwraft_is_leader", "1 if this node is the leader, else 0.",
                               registry=r)
        self.proposals = Counter("bwraft_proposals_total",
                                 "Proposals accepted into the leader's log.", registry=r)
        self.proposal_failures = Counter(
            "bwraft_proposal_failures_total",
            "Proposals that failed (not_leader, transfer, lost_leadership, timeout, stopped).",
            ["reason"], registry=r)
        self.reads = Counter("bwraft_read_barriers_total",
                             "Linearizable read barriers served.", registry=r)
        self.read_rounds = Counter("bwraft_read_index_rounds_total",
                                   "ReadIndex requests made to the kernel (shared by the reads"
                                   " of one reactor turn).", registry=r)
        self.storage_fsync_seconds = Histogram(
            "bwraft_storage_fsync_seconds",
            "Duration of each storage save transaction (one per Ready, fsync included).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.save_entries = Histogram("bwraft_storage_save_entries",
                                      "Entries written by each save (group commit size).",
                                      buckets=_BATCH_BUCKETS, registry=r)
        self.apply_latency_seconds = Histogram(
            "bwraft_apply_latency_seconds",
            "Time from proposal to its application on the leader.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.ready_reactor_seconds = Histogram(
            "bwraft_ready_reactor_seconds",
            "Reactor-thread time spent handling one Ready (the stall other events see).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.readies = Counter("bwraft_readies_total", "Ready batches processed.", registry=r)
        self.applied_entries = Counter("bwraft_applied_entries_total",
                                       "Entries applied to the state machine.", registry=r)
        self.snapshots = Counter("bwraft_snapshots_total",
                                 "Snapshots taken locally (log compactions).", registry=r)
        self.snapshots_installed = Counter("bwraft_snapshots_installed_total",
                                           "Snapshots received from a leader and installed.",
                                           registry=r)
        self.leader_changes = Counter("bwraft_leader_changes_total",
                                      "Times the known leader changed.", registry=r)
        self.dropped_inbound = Counter("bwraft_dropped_inbound_messages_total",
                                       "Inbound messages dropped before the kernel.",
                                       ["reason"], registry=r)
