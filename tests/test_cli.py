"""The bwraft command line, and local-cluster process management with stand-in node programs.

The KV commands run against the scripted HTTP nodes of test_client. The cluster commands run
real processes, but of a small stand-in for ``python -m twisted ... bwraft``: it writes the pid
file, serves ``/v1/status`` on the configured API address (n1 leads) and exits on SIGTERM, so
that starting, signalling, restarting and tearing down are tested without the node runtime.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bwcore import cluster as local
from bwcore.cli import main
from bwcore.config import load_config
from tests.test_client import FakeNode, dead_endpoint, nodes  # noqa: F401 - fixture
from tests.integration.support import wait_for

STAND_IN = """#!{python}
import json, os, signal, sys, tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
assert args[0] == "-c" and "twistd" in args[1] and args[2] == "-n", args
assert args[args.index("--logfile") + 1] == "-"
assert args[args.index("--logfile") + 2] == "bwraft", args
pidfile, config = args[args.index("--pidfile") + 1], args[args.index("--config") + 1]
if os.environ.get("STAND_IN_EXIT"):
    print("stand-in: refusing to start", flush=True)
    sys.exit(4)
cfg = tomllib.load(open(config, "rb"))
leader = sorted(cfg["cluster"]["voters"])[0]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))

class Status(BaseHTTPRequestHandler):
    def do_GET(self):
        role = "leader" if cfg["id"] == leader else "follower"
        body = json.dumps({{"id": cfg["id"], "role": role, "leader": leader}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def on_term(*_):
    if not os.environ.get("STAND_IN_IGNORE_TERM"):
        os.unlink(pidfile)
        os._exit(0)

signal.signal(signal.SIGTERM, on_term)
host, port = cfg["addresses"]["api"].rsplit(":", 1)
server = HTTPServer((host, int(port)), Status)
print("stand-in", cfg["id"], "serving", flush=True)
server.serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> str:
    path = tmp_path / "stand-in-python"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def clusters() -> Iterator[list[local.Cluster]]:
    """Clusters a test starts; every process is SIGKILLed at the end, whatever happened."""
    started: list[local.Cluster] = []
    yield started
    for cluster in started:
        for process in cluster.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, object, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


# -- key-value commands ---------------------------------------------------------------------


def test_kv_commands_print_json_and_use_exit_codes(nodes: Callable[..., FakeNode],  # noqa: F811
                                                   capsys: pytest.CaptureFixture) -> None:
    """put/get/cas/del print JSON; an absent key and a failed cas exit 1."""
    url = nodes().url
    assert run(capsys, "put", "k", "v1", "--endpoints", url)[:2] == (0, {"key": "k", "index": 1})
    assert run(capsys, "get", "k", "--endpoints", url)[:2] == (
        0, {"key": "k", "value": "v1", "index": 1})
    code, out, _ = run(capsys, "cas", "k", "--expect", "nope", "--value", "x", "--endpoints", url)
    assert (code, out["ok"], out["value"]) == (1, False, "v1")
    code, out, _ = run(capsys, "cas", "k", "--expect", "v1", "--delete", "--endpoints", url)
    assert (code, out["ok"], out["value"]) == (0, True, None)
    assert run(capsys, "del", "k", "--endpoints", url)[:2] == (
        0, {"key": "k", "index": 4, "deleted": False})
    code, out, _ = run(capsys, "get", "k", "--consistency", "stale", "--endpoints", url)
    assert (code, out["error"]) == (1, "not found")


def test_get_read_from_observers_reads_from_observers_only(
        nodes: Callable[..., FakeNode], capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    """`get --read-from observers` reads from the observers among the endpoints, never the
    voter; each command starts at a random observer, so many commands reach both."""
    voter, obs1, obs2 = nodes(), nodes("observer"), nodes("observer")
    for node in (voter, obs1, obs2):
        node.data["k"] = "v"
    endpoints = ",".join(node.url for node in (voter, obs1, obs2))

    def reads(node: FakeNode) -> int:
        return sum(1 for r in node.requests if r[1].startswith("/v1/kv/"))

    for _ in range(64):  # P(one observer never chosen) = 2**-63
        code, out, _ = run(capsys, "get", "k", "--read-from", "observers",
                           "--endpoints", endpoints)
        assert (code, out["value"]) == (0, "v")
        if reads(obs1) and reads(obs2):
            break
    assert reads(voter) == 0 and reads(obs1) and reads(obs2)
    with pytest.raises(SystemExit):
        main(["get", "k", "--read-from", "followers", "--endpoints", endpoints])


def test_endpoints_come_from_the_environment(nodes: Callable[..., FakeNode],  # noqa: F811
                                             capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """BWRAFT_ENDPOINTS is the default; with neither it nor --endpoints, usage error 2."""
    node = nodes()
    monkeypatch.setenv("BWRAFT_ENDPOINTS", node.url.removeprefix("http://"))
    code, out, _ = run(capsys, "cas", "new", "--expect-absent", "--value", "1")
    assert (code, out["ok"]) == (0, True)
    monkeypatch.delenv("BWRAFT_ENDPOINTS")
    code, _, err = run(capsys, "get", "new")
    assert code == 2 and "no endpoints" in err


def test_refused_and_failed_requests(nodes: Callable[..., FakeNode],  # noqa: F811
                                     capsys: pytest.CaptureFixture) -> None:
    """A 400 exits 2; an unreachable cluster exits 3; both explain on stderr."""
    node = nodes()
    node.script = lambda m, p, b: (400, {"error": "key is not valid UTF-8"}, {})
    code, _, err = run(capsys, "put", "k", "v", "--endpoints", node.url)
    assert code == 2 and "not valid UTF-8" in json.loads(err)["error"]
    code, _, err = run(capsys, "get", "k", "--endpoints", dead_endpoint(), "--deadline", "0.3")
    assert code == 3 and "ConnectionRefusedError" in json.loads(err)["error"]
    with pytest.raises(SystemExit) as usage:
        main(["get", "k", "--endpoints", "ftp://x:1"])
    assert usage.value.code == 2


def test_status_reports_every_endpoint(nodes: Callable[..., FakeNode],  # noqa: F811
                                       capsys: pytest.CaptureFixture) -> None:
    """status shows each endpoint's status, an error for a dead one, and then exits 3."""
    alive, dead = nodes().url, dead_endpoint()
    code, out, _ = run(capsys, "status", "--endpoints", f"{alive},{dead}")
    assert code == 3
    assert out[alive]["role"] == "voter" and "error" in out[dead]
    assert run(capsys, "members", "--endpoints", alive)[1] == [{"id": "n1", "state": "alive"}]


# -- local clusters ---------------------------------------------------------------------------


def test_plan_spreads_roles_over_datacenters_and_writes_valid_configs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Voters then each helper role go round-robin over the datacenters; configs validate."""
    monkeypatch.setattr(local, "installed_plugins", lambda: {"kv", "observer", "secretary"})
    cluster = local.plan(tmp_path, voters=3, observers=2, secretaries=1,
                         datacenters=["east", "west"], tick_ms=50)
    placement = {n.id: (n.role, n.datacenter) for n in cluster.nodes.values()}
    assert placement == {"n1": ("voter", "east"), "n2": ("voter", "west"),
                         "n3": ("voter", "east"), "obs1": ("observer", "east"),
                         "obs2": ("observer", "west"), "sec1": ("secretary", "east")}
    ports = [a.rsplit(":", 1)[1] for n in cluster.nodes.values() for a in (n.raft, n.gossip)]
    assert len(set(ports)) == len(ports) == 12
    local.write_files(cluster)
    config = load_config(cluster.nodes["obs2"].config)
    assert (config.role, config.datacenter, config.tick_ms) == ("observer", "west", 50)
    assert config.cluster.voters == {}  # an observer finds the voters through gossip
    assert [str(seed) for seed in config.cluster.seeds] == [
        cluster.nodes[v].gossip for v in ("n1", "n2", "n3")]
    assert config.data_dir == tmp_path / "obs2" / "data"
    voter = load_config(cluster.nodes["n1"].config)
    assert sorted(voter.cluster.voters) == ["n1", "n2", "n3"]
    assert "observer" in voter.plugins  # voters feed the observers gossip announces
    assert sorted(load_config(cluster.nodes["sec1"].config).cluster.voters) == ["n1", "n2", "n3"]
    reloaded = local.load(tmp_path)
    assert reloaded.nodes == cluster.nodes and reloaded.tick_ms == 50


def test_helper_roles_are_refused_without_their_plugins(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Observers need the observer plugin: without it, up fails at once and says so."""
    monkeypatch.setattr(local, "installed_plugins", lambda: {"kv", "sql-storage"})
    code, _, err = run(capsys, "cluster", "up", "--dir", str(tmp_path), "--observers", "1")
    assert code == 3
    assert "'observer' role plugin is not installed (installed bwraft plugins: kv, sql-storage)" \
        in json.loads(err)["error"]
    assert not (tmp_path / "cluster.toml").exists()


def test_commands_on_a_folder_without_a_cluster(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """cluster status/down/stop on an empty folder explain that there is no cluster."""
    for action in (["status"], ["down"], ["stop", "--node", "n1"]):
        code, _, err = run(capsys, "cluster", *action, "--dir", str(tmp_path))
        assert code == 3 and "no cluster in" in err


def test_cluster_lifecycle(tmp_path: Path, stand_in: str, clusters: list,
                           capsys: pytest.CaptureFixture) -> None:
    """up starts every node and waits for a leader; stop/start/status/down act on real pids."""
    folder = str(tmp_path / "c")
    code, out, err = run(capsys, "cluster", "up", "--dir", folder, "--voters", "3",
                         "--python", stand_in, "--wait", "20")
    cluster = local.load(folder)
    clusters.append(cluster)
    assert code == 0 and out["leader"] == "n1" and "export BWRAFT_ENDPOINTS=" in err
    assert out["endpoints"] == ",".join(cluster.endpoints)
    pids = {i: local.running_pid(cluster, i) for i in cluster.nodes}
    assert all(pids.values())

    code, out, _ = run(capsys, "cluster", "stop", "--dir", folder, "--node", "n2",
                       "--signal", "KILL")
    assert (code, out["pid"]) == (0, pids["n2"])
    wait_for(lambda: local.running_pid(cluster, "n2") is None, 10, "n2 to exit")
    code, out, _ = run(capsys, "cluster", "status", "--dir", folder)
    assert code == 3 and out["n2"] == "down" and out["n1"]["role"] == "leader"

    code, out, _ = run(capsys, "cluster", "start", "--dir", folder, "--node", "n2")
    assert code == 0 and out["started"]["n2"] != pids["n2"]
    cluster = local.load(folder)
    clusters.append(cluster)
    assert run(capsys, "cluster", "start", "--dir", folder, "--node", "n2")[0] == 3

    code, out, _ = run(capsys, "cluster", "down", "--dir", folder)
    assert (code, out["stopped"]) == (0, ["n1", "n2", "n3"])
    assert not any(node.pidfile.exists() for node in cluster.nodes.values())
    for pid in pids.values():
        wait_for(lambda: not local._alive(pid), 10, f"pid {pid} to exit")
    assert run(capsys, "cluster", "up", "--dir", folder, "--python", stand_in)[0] == 3


def test_stop_and_continue_a_paused_node(tmp_path: Path, stand_in: str, clusters: list) -> None:
    """SIGSTOP pauses a node (it stops answering); SIGCONT resumes it."""
    cluster = local.up(tmp_path, voters=1, python=stand_in, timeout=20)
    clusters.append(cluster)
    local.stop_node(cluster, "n1", "STOP")
    assert local.node_statuses(cluster, timeout=0.3)["n1"] == "not answering"
    local.stop_node(cluster, "n1", "CONT")
    assert local.node_statuses(cluster)["n1"]["role"] == "leader"
    assert local.down(cluster, grace=5) == ["n1"]


def test_down_kills_a_node_that_ignores_sigterm(tmp_path: Path, stand_in: str, clusters: list,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A node still running after the grace period is SIGKILLed."""
    monkeypatch.setenv("STAND_IN_IGNORE_TERM", "1")
    cluster = local.up(tmp_path, voters=2, python=stand_in, timeout=20)
    clusters.append(cluster)
    assert local.down(cluster, grace=0.5) == ["n1", "n2"]
    # They ignored SIGTERM: only a SIGKILL after the grace period ended them.
    assert all(p.returncode == -signal.SIGKILL for p in cluster.processes.values())


def test_a_node_that_exits_fails_up_and_nothing_is_left_running(
        tmp_path: Path, stand_in: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """If a node process exits during up, up fails with its log and stops the others."""
    monkeypatch.setenv("STAND_IN_EXIT", "1")
    with pytest.raises(local.ClusterError, match="exited with code 4") as failed:
        local.up(tmp_path, voters=2, python=stand_in, timeout=20)
    assert "stand-in: refusing to start" in str(failed.value)


def test_a_pid_file_naming_another_process_is_ignored(tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to another program is never signalled."""
    cluster = local.plan(tmp_path, voters=1)
    local.write_files(cluster)
    cluster.nodes["n1"].pidfile.write_text(str(os.getpid()))
    assert local.running_pid(cluster, "n1") is None
    with pytest.raises(local.ClusterError, match="not running"):
        local.stop_node(cluster, "n1", "KILL")
