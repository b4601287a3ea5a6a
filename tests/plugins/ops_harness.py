"""A whole cluster of real RaftNodes in one process, on one ``task.Clock``, for plugin tests.

Every node is a real :class:`bwcore.node.RaftNode` with the real KV state machine and the
plugins under test; only the edges are fakes: an in-memory durable storage that survives a
crash, a storage writer that runs inline (and can hold back chosen calls, to crash a node
between two steps), and a network that encodes every frame with the real codec, enforces the
frame size limit, delivers on the next reactor turn, and can cut links. Time is the clock's:
``run(seconds)`` advances it tick by tick, so tests never sleep.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred

from bwcore.codec import FrameDecoder, encode_frame
from bwcore.config import NodeConfig, config_from_dict
from bwcore.hookspecs import hookimpl
from bwcore.kernel import Entry, HardState, Snapshot, StateRole
from bwcore.node import RaftNode
from bwcore.plugins import PluginHost
from bwcore.storage import PersistedState
from bwraft_plugins.kv import KVStateMachine, encode_command

TICK = 0.05
FRAME_LIMIT = 256 * 1024


class DurableStorage:
    """The storage contract in memory; what it holds is what a crash leaves on disk."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.compactions = 0
        self.snapshot_saves = 0

    def load(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, list(self.entries))

    def save(self, hard_state: HardState | None, entries: Any, snapshot: Snapshot | None
             ) -> None:
        if snapshot is not None:
            self.snapshot, self.entries = snapshot, []
            self.snapshot_saves += 1
        if entries:
            first = entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def compact(self, snapshot: Snapshot) -> None:
        index = snapshot.meta.index
        if self.snapshot is not None and index < self.snapshot.meta.index:
            raise ValueError("older than the stored snapshot")
        self.snapshot = snapshot
        self.entries = [e for e in self.entries if e.index > index]
        self.compactions += 1

    def log_stats(self) -> tuple[int, int]:
        return len(self.entries), sum(len(e.data) for e in self.entries)

    def close(self) -> None:
        pass


class InlineWriter:
    """Runs storage calls at once; calls for which ``hold(fn, args)`` is true wait instead."""

    def __init__(self) -> None:
        self.hold: Callable[[Callable[..., Any], tuple[Any, ...]], bool] = lambda fn, args: False
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.hold(fn, args):
            d: Deferred[Any] = Deferred()
            self.held.append((fn, args, d))
            return d
        try:
            return defer.succeed(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the node like a thread's failure
            return defer.fail(exc)

    def run_held(self, *, notify: bool = True) -> None:
        """Carry out the held calls: the storage work happens, then (if ``notify``) the node
        hears of it. ``notify=False`` followed by a crash is a crash right after the write."""
        held, self.held = self.held, []
        for fn, args, d in held:
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001
                if notify:
                    d.errback(exc)
                continue
            if notify:
                d.callback(result)


class _Port:
    def __init__(self, port: int) -> None:
        self.address = IPv4Address("TCP", "127.0.0.1", port)

    def getHost(self) -> IPv4Address:
        return self.address


class SimTransport:
    """One node's view of the :class:`Net`: real frame encoding, delivery on a later turn."""

    def __init__(self, net: Net, node: RaftNode) -> None:
        self.net = net
        self.node = node
        self.peers: dict[str, tuple[str, int]] = {}
        self.dead = False

    def listen(self, host: str, port: int) -> _Port:
        return _Port(self.net.ports[self.node.node_id])

    def set_peer(self, peer_id: str, host: str, port: int) -> None:
        self.peers[peer_id] = (host, port)

    def remove_peer(self, peer_id: str) -> None:
        self.peers.pop(peer_id, None)

    def send(self, peer_id: str, obj: Any) -> bool:
        if self.dead or peer_id not in self.peers:
            return False
        frame = encode_frame(obj)
        if len(frame) - 4 > FRAME_LIMIT:
            self.net.oversized += 1
            return False
        self.net.frames += 1
        self.net.clock.callLater(self.net.latency, self.net.deliver, self.node.node_id, peer_id,
                                 frame)
        return True

    def stop(self) -> Deferred[None]:
        self.dead = True
        return defer.succeed(None)


class Backend:
    """Storage and the KV state machine for one node (kept across its restarts)."""

    def __init__(self, storage: DurableStorage) -> None:
        self.storage = storage

    @hookimpl
    def bwraft_open_storage(self, config: NodeConfig) -> DurableStorage:
        return self.storage

    @hookimpl
    def bwraft_create_state_machine(self, config: NodeConfig) -> KVStateMachine:
        return KVStateMachine()


class Net:
    """Nodes by id, the clock they share, and the links between them.

    Args:
        voters: Ids of the initial voters.
        plugins: ``factory(node_id) -> [(name, instance), ...]``: the plugins under test for
            one node (called again at each restart: a restarted process has fresh plugins).
        extra_config: Merged into every node's config document.
    """

    def __init__(self, voters: Iterable[str],
                 plugins: Callable[[str], list[tuple[str, Any]]] = lambda node_id: [],
                 extra_config: dict[str, Any] | None = None) -> None:
        self.clock = task.Clock()
        self.voters = list(voters)
        self.plugins = plugins
        self.extra_config = extra_config or {}
        self.ports: dict[str, int] = {}
        self.nodes: dict[str, RaftNode] = {}
        self.storages: dict[str, DurableStorage] = {}
        self.writers: dict[str, InlineWriter] = {}
        self.cut: set[tuple[str, str]] = set()
        self.frames = 0
        self.oversized = 0
        #: Seconds a frame takes to arrive (0: on the next reactor turn).
        self.latency = 0.0
        self.fatal: list[tuple[str, str]] = []
        for node_id in self.voters:
            self.port_of(node_id)

    def port_of(self, node_id: str) -> int:
        return self.ports.setdefault(node_id, 20000 + len(self.ports))

    def config(self, node_id: str, *, voters: Iterable[str] | None = None,
               role: str = "voter", datacenter: str = "dc1") -> NodeConfig:
        voter_ids = self.voters if voters is None else list(voters)
        doc: dict[str, Any] = {
            "id": node_id, "role": role, "datacenter": datacenter,
            "tick_ms": int(TICK * 1000), "election_ticks": 10,
            "addresses": {"raft": f"127.0.0.1:{self.port_of(node_id)}",
                          "api": f"127.0.0.1:{30000 + self.port_of(node_id)}"},
            "cluster": {"voters": {v: {"raft": f"127.0.0.1:{self.port_of(v)}",
                                       "api": f"127.0.0.1:{30000 + self.port_of(v)}"}
                                   for v in voter_ids}},
            "limits": {"max_frame_bytes": FRAME_LIMIT},
        }
        for key, value in self.extra_config.items():
            doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
        return config_from_dict(doc)

    def start(self, node_id: str, config: NodeConfig | None = None) -> RaftNode:
        """Start (or restart from its storage) one node; wait until it serves."""
        config = config or self.config(node_id)
        storage = self.storages.setdefault(node_id, DurableStorage())
        host = PluginHost(config)
        host.register(Backend(storage), "backend")
        for name, plugin in self.plugins(node_id):
            host.register(plugin, name)
        writer = self.writers[node_id] = InlineWriter()
        node = RaftNode(config, host, self.clock,
                        rng=random.Random(zlib.crc32(node_id.encode())),
                        transport_factory=lambda n: SimTransport(self, n), writer=writer,
                        on_fatal=lambda reason: self.fatal.append((node_id, reason)))
        self.nodes[node_id] = node
        node.startService()
        self.clock.advance(0)
        assert node.when_started().called, f"{node_id} did not start"
        return node

    def start_all(self) -> None:
        for node_id in self.voters:
            self.start(node_id)

    def crash(self, node_id: str) -> None:
        """Kill a node: its memory is gone, its storage stays as it is now."""
        node = self.nodes.pop(node_id)
        node.transport.dead = True
        node._halt("crashed by the test")  # stops ticking and driving, like a dead process
        self.fatal = [f for f in self.fatal if f[0] != node_id]

    def wipe(self, node_id: str) -> None:
        """Delete a (crashed) node's data directory."""
        self.storages.pop(node_id, None)

    def deliver(self, src: str, dst: str, frame: bytes) -> None:
        if (src, dst) in self.cut or src not in self.nodes or dst not in self.nodes:
            return
        target = self.nodes[dst]
        if target.transport is None or target.transport.dead:
            return
        decoder = FrameDecoder(max_frame_bytes=FRAME_LIMIT + 1024)
        for obj in decoder.feed(frame):
            target.on_frame(src, obj)

    def partition(self, *groups: Iterable[str]) -> None:
        sides = [set(g) for g in groups]
        self.cut = {(a, b) for i, x in enumerate(sides) for j, y in enumerate(sides) if i != j
                    for a in x for b in y}

    def heal(self) -> None:
        self.cut = set()

    def run(self, seconds: float) -> None:
        steps = max(1, int(round(seconds / TICK)))
        for _ in range(steps):
            self.clock.advance(TICK)
            self.clock.advance(0)

    def run_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        waited = 0.0
        while True:
            result = condition()
            if result:
                return result
            if waited >= timeout:
                raise AssertionError(f"not reached within {timeout:g}s: {what}")
            self.run(TICK)
            waited += TICK

    def leader(self) -> str | None:
        leaders = [n for n, node in self.nodes.items()
                   if node.kernel is not None and node.kernel.role is StateRole.LEADER]
        if len(leaders) != 1:
            return None
        return leaders[0]

    def wait_leader(self, timeout: float = 20.0) -> str:
        return self.run_until(self.leader, timeout, "a leader")

    def put(self, node_id: str, key: str, value: str, timeout: float = 10.0) -> Deferred[Any]:
        command = encode_command("put", key, value=value)
        return Deferred.fromCoroutine(self.nodes[node_id].propose(command, timeout=timeout))

    def write_many(self, count: int, prefix: str = "k", value_bytes: int = 16,
                   batch: int = 50) -> list[int]:
        """Write ``count`` keys through the leader, ``batch`` at a time; their indexes."""
        indexes: list[int] = []
        done = 0
        while done < count:
            leader = self.wait_leader()
            n = min(batch, count - done)
            ds = [self.put(leader, f"{prefix}{done + i}", "v" * value_bytes) for i in range(n)]
            results: list[Any] = []
            for d in ds:
                d.addBoth(results.append)
            self.run_until(lambda: len(results) == n, 20.0, f"{n} writes")
            ok = [r["index"] for r in results if isinstance(r, dict) and "index" in r]
            indexes.extend(ok)
            done += len(ok)
        return indexes

    def kv(self, node_id: str) -> dict[str, str]:
        """The node's key-value data (read from its snapshot image, a documented format)."""
        return msgpack.unpackb(self.nodes[node_id].state_machine.snapshot())["data"]

    def stop_all(self) -> None:
        for node_id in list(self.nodes):
            self.crash(node_id)


class HttpAnswer:
    """What a resource answered: status, headers, decoded JSON body."""

    def __init__(self, request: Any) -> None:
        import json

        self.status = request.responseCode or 200
        self.headers = {k.lower(): v[0] for k, v in request.responseHeaders.getAllRawHeaders()}
        self.body = json.loads(b"".join(request.written)) if request.written else None

    def __repr__(self) -> str:
        return f"<HttpAnswer {self.status} {self.body}>"


def http(net: Net, resource: Any, method: str, path: str, body: Any = None,
         token: str | None = None, timeout: float = 30.0) -> HttpAnswer:
    """Render ``resource`` for one request (``path`` below its mount point), running the
    cluster's clock until it answers."""
    import io
    import json

    from twisted.web.test.requesthelper import DummyRequest

    postpath = [p.encode() for p in path.strip("/").split("/")] if path.strip("/") else []
    request = DummyRequest(postpath)
    request.method = method.encode()
    request.uri = request.path = b"/v1/admin/x/" + path.strip("/").encode()
    request.content = io.BytesIO(json.dumps(body).encode() if body is not None else b"")
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    resource.render(request)
    net.run_until(lambda: request.finished, timeout, f"an answer to {method} {path}")
    return HttpAnswer(request)
