"""A local multi-process cluster: one ``twistd`` process per node, everything in one folder.

Layout of the cluster folder::

    DIR/cluster.toml            the nodes: role, datacenter, API URL, config, pid file, log
    DIR/<id>/node.toml          the node's configuration
    DIR/<id>/data/              its data directory (Raft log, snapshots)
    DIR/<id>/node.log           its log (standard output and error of the process)
    DIR/<id>/twistd.pid         its pid while it runs

Nodes are started detached (their own session), so they outlive the command that started them;
every later command finds them through ``cluster.toml`` and the pid files, and signals a pid only
after checking that the process runs that node's config.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = [
    "CLUSTER_FILE", "Cluster", "ClusterError", "NodeInfo", "down", "free_ports", "load",
    "node_statuses", "plan", "running_pid", "start_node", "stop_node", "up", "wait_for_leader",
    "write_files",
]

CLUSTER_FILE = "cluster.toml"
HELPER_ROLES = ("observer", "secretary")
_ID_PREFIX = {"voter": "n", "observer": "obs", "secretary": "sec"}
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "STOP": signal.SIGSTOP,
           "CONT": signal.SIGCONT}
_POLL_SECONDS = 0.05


class ClusterError(Exception):
    """A cluster command cannot be carried out; the message says why and what to do."""


@dataclass(frozen=True)
class NodeInfo:
    """One node of a local cluster, as recorded in ``cluster.toml``."""

    id: str
    role: str
    datacenter: str
    api: str                 # http://host:port
    raft: str                # host:port
    gossip: str              # host:port
    config: Path
    pidfile: Path
    logfile: Path

    @property
    def folder(self) -> Path:
        return self.config.parent


@dataclass
class Cluster:
    """A local cluster: its folder, nodes, and the processes this Python process started."""

    dir: Path
    nodes: dict[str, NodeInfo]
    tick_ms: int = 100
    python: str = sys.executable
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def endpoints(self) -> list[str]:
        return [node.api for node in self.nodes.values()]

    @property
    def voters(self) -> list[str]:
        return [node.id for node in self.nodes.values() if node.role == "voter"]


# -- planning and files -------------------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free for both TCP and UDP on ``host``, chosen by the OS (bind port 0).

    The sockets are closed before returning, so another program could take a port before the
    node binds it; the node then fails to start and says so in its log.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 20):
            if len(ports) == count:
                break
            tcp = socket.socket(family, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(family, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind((host, port))  # gossip needs the UDP side of the port as well
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) < count:
        raise ClusterError(f"could not find {count} free ports on {host}")
    return ports


def installed_plugins() -> set[str]:
    return {ep.name for ep in entry_points(group="bwraft")}


def plan(directory: str | Path, *, voters: int = 3, observers: int = 0, secretaries: int = 0,
         datacenters: Iterable[str] = ("dc1",), tick_ms: int = 100, host: str = "127.0.0.1",
         python: str | None = None) -> Cluster:
    """Decide node ids, roles, datacenters and ports (nothing is written or started).

    Voters are ``n1..nN``, observers ``obs1..``, secretaries ``sec1..``; each role is spread
    round-robin over ``datacenters``.

    Raises:
        ClusterError: Bad counts, no datacenter, or a helper role whose plugin is missing.
    """
    dcs = [dc.strip() for dc in datacenters if dc.strip()]
    if not dcs:
        raise ClusterError("at least one datacenter is needed")
    if voters < 1 or observers < 0 or secretaries < 0:
        raise ClusterError("need at least 1 voter, and no negative helper counts")
    if tick_ms < 1:
        raise ClusterError("tick_ms must be positive")
    counts = {"voter": voters, "observer": observers, "secretary": secretaries}
    installed = installed_plugins()
    for role in HELPER_ROLES:
        if counts[role] and role not in installed:
            raise ClusterError(
                f"cannot start {role}s: the '{role}' role plugin is not installed "
                f"(installed bwraft plugins: {', '.join(sorted(installed)) or 'none'})")
    total = sum(counts.values())
    ports = iter(free_ports(3 * total, host))
    shown_host = f"[{host}]" if ":" in host else host
    base = Path(directory).resolve()
    nodes: dict[str, NodeInfo] = {}
    for role, count in counts.items():
        for i in range(count):
            node_id = f"{_ID_PREFIX[role]}{i + 1}"
            folder = base / node_id
            raft, gossip, api = (f"{shown_host}:{next(ports)}" for _ in range(3))
            nodes[node_id] = NodeInfo(
                id=node_id, role=role, datacenter=dcs[i % len(dcs)], api=f"http://{api}",
                raft=raft, gossip=gossip, config=folder / "node.toml",
                pidfile=folder / "twistd.pid", logfile=folder / "node.log")
    return Cluster(base, nodes, tick_ms, python or sys.executable)


def node_config(cluster: Cluster, node: NodeInfo) -> dict[str, Any]:
    """The node's config document (see docs/configuration.md for every key)."""
    voters = {v.id: {"raft": v.raft, "api": v.api.removeprefix("http://")}
              for v in cluster.nodes.values() if v.role == "voter"}
    seeds = [v.gossip for v in cluster.nodes.values() if v.role == "voter"]
    # An observer needs no voter list: it finds the cluster through the gossip seeds.
    members = {"name": "bwraft-local", "seeds": seeds}
    if node.role != "observer":
        members["voters"] = voters
    doc: dict[str, Any] = {
        "id": node.id, "role": node.role, "datacenter": node.datacenter, "data_dir": "data",
        "tick_ms": cluster.tick_ms,
        "addresses": {"raft": node.raft, "api": node.api.removeprefix("http://"),
                      "gossip": node.gossip},
        "cluster": members,
        "log": {"format": "json"},
    }
    if node.role == "voter" and "observer" in installed_plugins():
        # Voters feed the observers gossip announces, also those started later.
        doc["plugins"] = {"observer": {}}
    if node.role != "secretary" and any(n.role == "secretary" for n in cluster.nodes.values()):
        # The leader hands replication to secretaries, and followers answer through them.
        doc.setdefault("plugins", {})["secretary"] = {}
    return doc


def write_files(cluster: Cluster) -> None:
    """Write every node's ``node.toml`` (and folder) and then ``cluster.toml``."""
    for node in cluster.nodes.values():
        node.folder.mkdir(parents=True, exist_ok=True)
        node.config.write_text(_toml(node_config(cluster, node)), encoding="utf-8")
    doc: dict[str, Any] = {"tick_ms": cluster.tick_ms, "python": cluster.python, "nodes": {
        node.id: {"role": node.role, "datacenter": node.datacenter, "api": node.api,
                  "raft": node.raft, "gossip": node.gossip, "config": str(node.config),
                  "pidfile": str(node.pidfile), "logfile": str(node.logfile)}
        for node in cluster.nodes.values()}}
    header = "# A local bwraft cluster, written by `bwraft cluster up`.\n"
    (cluster.dir / CLUSTER_FILE).write_text(header + _toml(doc), encoding="utf-8")


def load(directory: str | Path) -> Cluster:
    """Read ``DIR/cluster.toml``.

    Raises:
        ClusterError: There is no cluster in ``directory``, or its file is damaged.
    """
    base = Path(directory).resolve()
    path = base / CLUSTER_FILE
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        nodes = {}
        for node_id, entry in doc["nodes"].items():
            nodes[node_id] = NodeInfo(
                id=node_id, role=entry["role"], datacenter=entry["datacenter"], api=entry["api"],
                raft=entry["raft"], gossip=entry["gossip"], config=Path(entry["config"]),
                pidfile=Path(entry["pidfile"]), logfile=Path(entry["logfile"]))
        return Cluster(base, nodes, int(doc["tick_ms"]), str(doc["python"]))
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {base} (no {CLUSTER_FILE}); "
                           f"start one with `bwraft cluster up --dir {directory}`") from None
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError,
            AttributeError) as exc:
        raise ClusterError(f"{path} is damaged: {type(exc).__name__}: {exc}") from None


def _toml(doc: dict[str, Any], prefix: str = "") -> str:
    """Render a document of str/int/bool/list values and nested tables as TOML."""
    out = "".join(f"{_toml_key(key)} = {_toml_value(value)}\n" for key, value in doc.items()
                  if not isinstance(value, dict))
    for key, table in doc.items():
        if not isinstance(table, dict):
            continue
        name = prefix + _toml_key(key)
        # A table holding only sub-tables needs no header of its own.
        if not table or any(not isinstance(value, dict) for value in table.values()):
            out += f"\n[{name}]\n"
        out += _toml(table, name + ".")
    return out


def _toml_key(key: str) -> str:
    bare = key.isascii() and key.replace("-", "").replace("_", "").isalnum()
    return key if bare else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # A JSON string with non-ASCII left as is is a valid TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# -- processes ----------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """The environment of a node process.

    twistd finds the ``bwraft`` plugin in ``twisted/plugins`` on ``sys.path``. An installed
    project has it in site-packages; in a source checkout it sits beside ``bwcore``, so that
    folder is put on PYTHONPATH.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = Path(__file__).resolve().parent.parent
    if (root / "twisted" / "plugins" / "bwraft_dropin.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(
            [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


#: Runs twistd with the chosen interpreter (``python -m twisted`` is ``twist``, not twistd).
TWISTD_BOOTSTRAP = ("import sys; from twisted.scripts.twistd import run;"
                    " sys.argv[0] = 'twistd'; run()")


def node_command(cluster: Cluster, node: NodeInfo) -> list[str]:
    """``twistd -n --pidfile P --logfile - bwraft --config C`` under ``cluster.python``."""
    # twistd's own options come before the plugin name, the plugin's after it. "--logfile -"
    # sends twistd's log to standard output, which goes to node.log with everything else.
    return [cluster.python, "-c", TWISTD_BOOTSTRAP, "-n", "--pidfile", str(node.pidfile),
            "--logfile", "-", "bwraft", "--config", str(node.config)]


def start_node(cluster: Cluster, node_id: str) -> subprocess.Popen:
    """Start one node from its config and data folder (a restart recovers its state).

    Raises:
        ClusterError: Unknown id, or the node is already running.
    """
    node = _node(cluster, node_id)
    pid = running_pid(cluster, node_id)
    if pid is not None:
        raise ClusterError(f"{node_id} is already running (pid {pid})")
    node.pidfile.unlink(missing_ok=True)  # left behind by a SIGKILL
    with open(node.logfile, "ab") as log:
        process = subprocess.Popen(
            node_command(cluster, node), cwd=node.folder, env=_child_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    cluster.processes[node_id] = process
    return process


def running_pid(cluster: Cluster, node_id: str) -> int | None:
    """The pid of the node's live process, or None when it is not running."""
    node = _node(cluster, node_id)
    process = cluster.processes.get(node_id)
    if process is not None and process.poll() is None:
        return process.pid
    try:
        pid = int(node.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _runs_config(pid, node.config) else None


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child that has exited, so that it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _runs_config(pid: int, config: Path) -> bool:
    """Whether ``pid`` runs this node's config: never signal a process that reused the pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc on this system: trust the pid file
        return True
    return os.fsencode(str(config)) in cmdline


def stop_node(cluster: Cluster, node_id: str, sig: str = "TERM", *, wait: float = 0.0) -> int:
    """Send ``sig`` (TERM, KILL, STOP or CONT) to a node; return its pid.

    Args:
        wait: For TERM and KILL, seconds to wait for the process to exit.

    Raises:
        ClusterError: Unknown id or signal, the node is not running, or it outlived ``wait``.
    """
    if sig not in SIGNALS:
        raise ClusterError(f"unknown signal {sig!r}; use one of {', '.join(SIGNALS)}")
    pid = running_pid(cluster, node_id)
    if pid is None:
        raise ClusterError(f"{node_id} is not running")
    if sig == "TERM":
        _signal(pid, signal.SIGCONT)  # a stopped process cannot act on TERM
    _signal(pid, SIGNALS[sig])
    if sig in ("TERM", "KILL") and wait > 0:
        if not _wait_gone(cluster, [node_id], wait):
            raise ClusterError(f"{node_id} (pid {pid}) did not exit within {wait:g}s")
    return pid


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(cluster: Cluster, node_ids: list[str], timeout: float) -> bool:
    give_up_at = time.monotonic() + timeout
    while True:
        if all(running_pid(cluster, node_id) is None for node_id in node_ids):
            return True
        if time.monotonic() >= give_up_at:
            return False
        time.sleep(_POLL_SECONDS)


def down(cluster: Cluster, *, grace: float = 10.0) -> list[str]:
    """Stop every node: SIGTERM, then SIGKILL whatever is left after ``grace`` seconds.

    Returns:
        The ids of the nodes that were running.
    """
    running = {node_id: pid for node_id in cluster.nodes
               if (pid := running_pid(cluster, node_id)) is not None}
    for pid in running.values():
        _signal(pid, signal.SIGCONT)
        _signal(pid, signal.SIGTERM)
    if not _wait_gone(cluster, list(running), grace):
        for node_id in running:
            pid = running_pid(cluster, node_id)
            if pid is not None:
                _signal(pid, signal.SIGKILL)
        _wait_gone(cluster, list(running), 5.0)
    for node_id, process in cluster.processes.items():
        if process.poll() is None:
            process.wait(timeout=5.0)
    for node in cluster.nodes.values():
        node.pidfile.unlink(missing_ok=True)
    return sorted(running)


# -- status and readiness -----------------------------------------------------------------


def fetch_status(api: str, timeout: float = 1.0) -> dict | None:
    """``GET /v1/status`` of one node, or None if it does not answer."""
    host_port = api.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        connection.request("GET", "/v1/status")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        status = json.loads(body)
        return status if isinstance(status, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


def node_statuses(cluster: Cluster, timeout: float = 1.0) -> dict[str, dict | str]:
    """Each node's status, or ``"down"`` (no process) / ``"not answering"``."""
    out: dict[str, dict | str] = {}
    for node_id, node in cluster.nodes.items():
        if running_pid(cluster, node_id) is None:
            out[node_id] = "down"
        else:
            out[node_id] = fetch_status(node.api, timeout) or "not answering"
    return out


def _is_leader(status: dict) -> bool:
    return (status.get("raft_role") or status.get("role")) == "leader"


def wait_for_leader(cluster: Cluster, timeout: float = 30.0, *,
                    among: Iterable[str] | None = None,
                    clock: Callable[[], float] = time.monotonic) -> str:
    """Wait until the nodes ``among`` (default: every running node) answer and agree on a leader.

    Every listed voter must name the same leader, which must answer and call itself leader;
    every listed helper must answer its status.

    Returns:
        The leader's id.

    Raises:
        ClusterError: A node process exited, or no agreement before ``timeout``.
    """
    ids = list(among) if among is not None else [
        node_id for node_id in cluster.nodes if running_pid(cluster, node_id) is not None]
    give_up_at = clock() + timeout
    seen: dict[str, Any] = {}
    while True:
        for node_id in ids:
            process = cluster.processes.get(node_id)
            if process is not None and process.poll() is not None:
                raise ClusterError(f"{node_id} exited with code {process.returncode}\n"
                                   + log_tail(cluster.nodes[node_id]))
        seen = {node_id: fetch_status(cluster.nodes[node_id].api) for node_id in ids}
        voters = [node_id for node_id in ids if cluster.nodes[node_id].role == "voter"]
        leaders = {(seen[v] or {}).get("leader") for v in voters}
        if all(seen.values()) and len(leaders) == 1:
            leader = leaders.pop()
            # Followers keep naming a dead leader until they time out: ask the leader itself.
            if leader in seen:
                leader_status = seen[leader]
            elif leader in cluster.nodes:
                leader_status = fetch_status(cluster.nodes[leader].api)
            else:
                leader_status = None
            if leader_status and _is_leader(leader_status):
                return str(leader)
        if clock() >= give_up_at:
            views = ", ".join(f"{node_id}: {_summary(status)}" for node_id, status in seen.items())
            raise ClusterError(f"no agreed leader within {timeout:g}s ({views})\n"
                               + "\n".join(log_tail(cluster.nodes[i]) for i in ids))
        time.sleep(_POLL_SECONDS)


def _summary(status: dict | None) -> str:
    if not status:
        return "not answering"
    return f"{status.get('role')} term {status.get('term')} leader {status.get('leader')}"


def log_tail(node: NodeInfo, lines: int = 8) -> str:
    try:
        with open(node.logfile, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            tail = log.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError as exc:
        return f"--- {node.id}: no log ({errno.errorcode.get(exc.errno or 0, exc)})"
    return f"--- {node.id} ({node.logfile}):\n" + "\n".join(tail)


def up(directory: str | Path, *, voters: int = 3, observers: int = 0, secretaries: int = 0,
       datacenters: Iterable[str] = ("dc1",), tick_ms: int = 100, host: str = "127.0.0.1",
       python: str | None = None, timeout: float = 60.0) -> Cluster:
    """Create, start and wait for a new cluster in ``directory``.

    If the cluster does not come up (a node exits, or no leader within ``timeout``), every
    process it started is stopped again and ClusterError says why, with the nodes' log tails.

    Raises:
        ClusterError: ``directory`` already holds a cluster, bad arguments, or start-up failed.
    """
    base = Path(directory).resolve()
    if (base / CLUSTER_FILE).exists():
        raise ClusterError(f"{base} already holds a cluster; use `bwraft cluster start` or "
                           f"`bwraft cluster down`, or choose another --dir")
    cluster = plan(base, voters=voters, observers=observers, secretaries=secretaries,
                   datacenters=datacenters, tick_ms=tick_ms, host=host, python=python)
    base.mkdir(parents=True, exist_ok=True)
    write_files(cluster)
    try:
        for node_id in cluster.nodes:
            start_node(cluster, node_id)
        wait_for_leader(cluster, timeout, among=list(cluster.nodes))
    except BaseException:
        down(cluster, grace=5.0)
        raise
    return cluster


def _node(cluster: Cluster, node_id: str) -> NodeInfo:
    try:
        return cluster.nodes[node_id]
    except KeyError:
        raise ClusterError(f"no node {node_id!r} in {cluster.dir} "
                           f"(nodes: {', '.join(cluster.nodes)})") from None
