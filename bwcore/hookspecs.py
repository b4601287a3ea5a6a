"""The bwraft plugin contract: every hook a plugin may implement, in one module.

A plugin is a class named in the ``bwraft`` entry-point group. The host instantiates it with its
settings (``Cls(settings)``, see :mod:`bwcore.plugins`) and registers the instance; its methods
marked with :data:`hookimpl` and named like a hook below are then called by the node.

Every hook states its calling mode:

- *firstresult*: implementations are called (last registered first) until one returns
  something other than None; that value is the result.
- *broadcast*: every implementation is called; return values are ignored.
- *collect*: every implementation is called; the non-None results come back as a list.

Hooks run on the reactor thread and must not block: hand slow work to a thread and return.
An exception raised by an implementation is logged by the node; for the replication and apply
hooks it is treated as a bug in that plugin (see each hook). The plugin-author guide is
docs/plugins.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry
    from twisted.application.service import IService
    from twisted.internet.defer import Deferred
    from twisted.web.resource import IResource

    from bwcore.config import NodeConfig
    from bwcore.kernel import Message, StateRole
    from bwcore.node import RaftNode
    from bwcore.storage import Storage

PROJECT = "bwraft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@runtime_checkable
class StateMachine(Protocol):
    """What :func:`bwraft_create_state_machine` returns: the replicated application.

    ``apply`` must be deterministic (every replica applies the same entries in the same order
    and must end in the same state) and must not raise for bad data: it returns an error value
    instead. The node calls it on the reactor thread.
    """

    applied_index: int

    def apply(self, index: int, data: bytes) -> Any:
        """Apply the committed command ``data`` at log ``index``; return its result."""

    def snapshot(self) -> bytes:
        """The whole state (including ``applied_index``) as bytes."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state with one produced by :meth:`snapshot`."""


@runtime_checkable
class SnapshotsOffReactor(Protocol):
    """Optional for a :class:`StateMachine`: snapshots that do not stop the reactor thread.

    Without these methods the node calls :meth:`StateMachine.snapshot` and
    :meth:`StateMachine.restore` on the reactor thread, which serves nothing else meanwhile.
    With them, the slow halves run on a worker thread while the node goes on applying:

    - taking a snapshot: ``serialize = snapshot_begin()`` on the reactor thread, at the
      applied index, then ``serialize()`` once on a worker thread;
    - installing one: ``install = restore_prepare(data)`` on a worker thread, then
      ``install()`` on the reactor thread.

    The built-in KV state machine implements both (copy-on-write, see
    ``bwraft_plugins.kv.KVStateMachine``).
    """

    def snapshot_begin(self) -> Callable[[], bytes]:
        """Freeze the state as of ``applied_index``, cheaply, and return its serializer.

        Called on the reactor thread; must be quick (no O(state) copy). The serializer is
        called once, on a worker thread, while :meth:`StateMachine.apply` goes on: it must
        read only what was frozen here and return what :meth:`StateMachine.snapshot` would
        have returned at this point. It should not hold the GIL for long stretches (no single
        C call over the whole state), or the reactor thread waits for it anyway.
        """

    def restore_prepare(self, data: bytes) -> Callable[[], None]:
        """Decode and check an image, without touching the live state; return the install step.

        Called on a worker thread while the reactor thread may read the state. Raises
        ValueError for an image that is not valid (nothing changed). The returned callable is
        run on the reactor thread and must quickly swap the decoded state in.
        """


# -------------------------------------------------------------------------------------------
# Node lifecycle
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_node_started(node: RaftNode) -> None:
    """The node has loaded its state and is running: ticking, listening, applying.

    Called once, after storage, state machine, kernel, transport and role service are up.

    :param node: The running node.

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """


@hookspec
def bwraft_node_stopping(node: RaftNode) -> None:
    """The node is about to stop: release what :func:`bwraft_node_started` acquired.

    Called once, before ticking stops and before storage and transport are closed.

    :param node: The node being stopped.

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Storage
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def bwraft_open_storage(config: NodeConfig) -> Storage | None:
    """Open the durable Raft log store for this node.

    Called once when the node starts, before anything is loaded. The built-in ``sql-storage``
    plugin answers with SQLite in ``config.data_dir`` (or the URL in its settings); a plugin
    registered later (named under ``[plugins]``) is asked first and may answer instead.

    :param config: The node's configuration.
    :return: A :class:`bwcore.storage.Storage`, or None to let another plugin answer.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# State machine
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def bwraft_create_state_machine(config: NodeConfig) -> StateMachine | None:
    """Create the replicated state machine (empty; the node restores or replays into it).

    Called once when the node starts, after storage is opened. The built-in ``kv`` plugin
    answers with the key-value store.

    :param config: The node's configuration.
    :return: A :class:`StateMachine`, or None to let another plugin answer.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Roles
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def bwraft_role_service(node: RaftNode) -> IService | None:
    """Return the service that runs this node's role, when the role is yours.

    Called once when the node starts. ``node.config.role`` names the role; ``voter`` is core
    and needs no plugin. The plugin providing a role (registered under the role's name) returns
    a service; every other implementation must return None. The node adds the service as its
    child, so it starts and stops with the node. A node whose non-voter role gets no service
    refuses to start.

    :param node: The node (not yet started).
    :return: An ``IService`` or None.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Replication routing and plugin frames
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_route_messages(node: RaftNode, messages: list[Message]) -> None:
    """Deliver some of this node's outgoing kernel messages yourself.

    Called on every node with each batch of outgoing kernel messages, before they are sent
    (in BW-Raft, secretaries take log synchronization off the leader: the leader hands its
    APPEND and HEARTBEAT messages to a secretary, and a follower sends its APPEND_RESP and
    HEARTBEAT_RESP back through the secretary that relayed the request). An implementation
    removes from ``messages`` (in place) the ones it takes over and delivers them by other
    means; on the leader, it feeds the replies it collects back through ``node.step``. The
    node sends what is left directly. Taking a message over and then losing it is safe (Raft
    tolerates lost messages and retransmits) but delays that peer. If an implementation
    raises, the node sends the whole original batch directly.

    :param node: This node.
    :param messages: The batch; mutate it in place.

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def bwraft_plugin_frame(node: RaftNode, peer: str, frame: Any) -> bool | None:
    """A plugin frame arrived from a peer.

    Called on the reactor thread for each :class:`bwcore.transport.PluginFrame` received.
    Plugins send such frames with ``node.send_plugin_frame(peer, plugin, payload)``.
    ``frame.plugin`` names the plugin it is for; ``frame.payload`` is any msgpack value and
    comes from the network: validate it and never raise for bad input.

    :param node: This node.
    :param peer: The sending peer's node id (from its hello).
    :param frame: The frame, with attributes ``plugin`` and ``payload``.
    :return: True if handled; None to let another plugin look at it.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Leadership and terms
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_role_changed(node: RaftNode, role: StateRole, term: int, leader: str | None) -> None:
    """The node's Raft role or its known leader changed.

    Called after the change, on every soft-state change the kernel reports (becoming leader,
    follower, candidate; learning of a new leader).

    :param node: This node.
    :param role: The new role (a :class:`bwcore.kernel.StateRole`).
    :param term: The current term.
    :param leader: The leader's id, or None if none is known.

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def bwraft_transfer_target(node: RaftNode, reason: str) -> str | None:
    """Choose the voter that should take over leadership from this node.

    Called on the leader with ``reason="shutdown"`` when it is stopping, so that a clean stop
    hands leadership over instead of making the cluster wait an election timeout (Raft
    dissertation §3.10). The node then transfers and waits at most one election timeout.

    :param node: The leader.
    :param reason: Why a transfer is wanted (``"shutdown"``).
    :return: A voter id, or None for no transfer.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Commit and apply
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_applied(node: RaftNode, index: int) -> None:
    """Entries up to ``index`` have been applied to the state machine.

    Called once per Ready after its committed entries are applied (not once per entry).

    :param node: This node.
    :param index: The new applied index.

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Client reads
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def bwraft_read_barrier(node: RaftNode, consistency: str, timeout: float
                        ) -> Deferred[int] | None:
    """Decide when a client read may be served from this node's state machine.

    Called by ``node.read_ready`` for each key-value read (``GET /v1/kv/{key}``) before the
    value is taken from the local state machine. The built-in ``observer`` plugin answers on
    observer nodes: it shares one ReadIndex request among concurrent linearizable reads and
    refuses quickly when the node lags (PROTOCOL.md "Observer"). Without an answer, a
    ``linearizable`` read waits for ``node.read_barrier`` and a ``stale`` one does not wait.
    A linearizable answer must fire only once the state machine has applied at least the
    read index the leader confirmed after the read began (Raft dissertation §6.4).

    :param node: This node.
    :param consistency: ``"linearizable"`` or ``"stale"``.
    :param timeout: Seconds the caller waits at most.
    :return: A Deferred firing with the index the read is served at (errback with
        :class:`bwcore.errors.Unavailable` for a 503), or None to let the node decide.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Compaction and snapshots
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def bwraft_should_snapshot(node: RaftNode, applied_index: int, log_entries: int,
                           log_bytes: int) -> bool | None:
    """Decide whether to snapshot the state machine now and compact the log.

    Called after each batch of applied entries, unless a snapshot is already being taken.
    On True the node takes a snapshot of the state machine at ``applied_index`` (off the
    reactor thread if it implements :class:`SnapshotsOffReactor`), stores it and drops the log
    up to it (Raft §7). Without any plugin answering, the log is not compacted.

    :param node: This node.
    :param applied_index: The index a snapshot would cover.
    :param log_entries: Entries applied since the last snapshot (what it would remove).
    :param log_bytes: Their total data size in bytes.
    :return: True to snapshot, False not to, None to let another plugin decide.

    **Mode:** firstresult.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Membership
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_member_event(node: RaftNode, event: str, member: Any) -> None:
    """Gossip reported a change in cluster membership.

    :param node: This node.
    :param event: One of ``joined``, ``updated``, ``suspect``, ``alive``, ``dead``, ``left``.
    :param member: The gossip member (id, role, datacenter, addresses, incarnation, state).

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# HTTP API
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_http_resources(node: RaftNode) -> dict[str, IResource] | None:
    """Add routes to the node's HTTP API.

    Called once when the API is built. Keys are top-level path segments (``"secretary"``
    serves ``/secretary/...``); a key clashing with a core route or another plugin's stops the
    node.

    :param node: This node.
    :return: Path segment -> ``twisted.web`` resource, or None.

    **Mode:** collect.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Status
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_status(node: RaftNode) -> dict[str, Any] | None:
    """Add plugin state to the node's status (``GET /v1/status``).

    Called each time the status is built. Return a small JSON-ready dict, keyed by something
    that names your plugin (``{"secretaries": {...}}``); its keys are merged into the status.
    A key the node itself reports (``id``, ``role``, ``term``, ...) is never overwritten.

    :param node: This node.
    :return: Extra status fields, or None.

    **Mode:** collect.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------------------------


@hookspec
def bwraft_metrics(registry: CollectorRegistry) -> None:
    """Register your Prometheus metrics on the node's registry (served at ``/metrics``).

    Called once when the node starts, after the core metrics exist.

    :param registry: The node's ``prometheus_client.CollectorRegistry``.

    **Mode:** broadcast.

    .. versionadded:: 0.1
    """
