"""The ``bwraft`` command: key-value operations, node status and local clusters.

    bwraft demo --dir ./cluster                     # start 3 voters and show writes and reads
    bwraft put color blue --endpoints http://127.0.0.1:8001
    bwraft cluster up --voters 3 --dir ./cluster

Results are printed as JSON on standard output, errors as JSON on standard error. Exit codes:
0 success, 1 a negative answer (absent key, compare-and-set not applied), 2 invalid usage or a
request the cluster refused as invalid, 3 failure (no leader, nodes unreachable, cluster
command failed). See docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, TextIO

from bwcore import cluster as local
from bwcore.client import (
    READ_FROM, BadRequest, Client, ClientError, NotFound, normalize_endpoint,
)

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE, EXIT_FAILURE = 0, 1, 2, 3
ENDPOINTS_ENV = "BWRAFT_ENDPOINTS"
ADMIN_TOKEN_ENV = "BWRAFT_ADMIN_TOKEN"


def _print(obj: Any, stream: TextIO | None = None) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str), file=stream or sys.stdout)


def _client(args: argparse.Namespace) -> Client:
    raw = args.endpoints or os.environ.get(ENDPOINTS_ENV, "")
    endpoints = [e for e in raw.split(",") if e.strip()]
    if not endpoints:
        raise _UsageError(f"no endpoints: pass --endpoints URL[,URL...] or set {ENDPOINTS_ENV}")
    try:
        token = getattr(args, "admin_token", None) or os.environ.get(ADMIN_TOKEN_ENV, "")
        return Client(endpoints, timeout=args.timeout, deadline=args.deadline,
                      read_from=getattr(args, "read_from", "any"), admin_token=token)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


class _UsageError(Exception):
    pass


# -- key-value commands -------------------------------------------------------------------


def _put(args: argparse.Namespace) -> int:
    with _client(args) as client:
        index = client.put(args.key, args.value, request_id=args.request_id)
    _print({"key": args.key, "index": index})
    return EXIT_OK


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            result = client.get(args.key, consistency=args.consistency)
        except NotFound as exc:
            _print({"key": args.key, "error": "not found", "index": exc.index})
            return EXIT_NEGATIVE
    _print({"key": args.key, "value": result.value, "index": result.index})
    return EXIT_OK


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.delete(args.key, request_id=args.request_id)
    _print({"key": args.key, "index": result.index, "deleted": result.deleted})
    return EXIT_OK


def _cas(args: argparse.Namespace) -> int:
    expect = None if args.expect_absent else args.expect
    value = None if args.delete else args.value
    with _client(args) as client:
        result = client.cas(args.key, expect, value, request_id=args.request_id)
    _print({"key": args.key, "ok": result.ok, "value": result.value, "index": result.index})
    return EXIT_OK if result.ok else EXIT_NEGATIVE


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.endpoint:
            _print(client.status(args.endpoint))
            return EXIT_OK
        statuses: dict[str, Any] = {}
        for endpoint in client.endpoints:
            try:
                statuses[endpoint] = client.status(endpoint)
            except ClientError as exc:
                statuses[endpoint] = {"error": exc.message}
    _print(statuses)
    return EXIT_OK if all("error" not in s for s in statuses.values()) else EXIT_FAILURE


def _members(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.members())
    return EXIT_OK


# -- cluster administration ----------------------------------------------------------------


def _transfer_leader(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print(client.transfer_leader(args.to))
    return EXIT_OK


def _member(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "add":
            result = client.member_add(args.id, args.raft_addr, args.api_addr or "",
                                       as_learner=args.as_role == "learner")
        elif args.action == "promote":
            result = client.member_promote(args.id)
        elif args.action == "remove":
            result = client.member_remove(args.id)
        else:
            result = client.member_list()
    _print(result)
    return EXIT_OK


# -- local clusters -----------------------------------------------------------------------


def _cluster_summary(cluster: local.Cluster, leader: str | None) -> dict:
    return {"dir": str(cluster.dir), "leader": leader,
            "endpoints": ",".join(cluster.endpoints),
            "nodes": {n.id: {"role": n.role, "datacenter": n.datacenter, "api": n.api,
                             "log": str(n.logfile)} for n in cluster.nodes.values()}}


def _cluster_up(args: argparse.Namespace) -> int:
    cluster = local.up(args.dir, voters=args.voters, observers=args.observers,
                       secretaries=args.secretaries, datacenters=args.datacenters.split(","),
                       tick_ms=args.tick_ms, python=args.python, timeout=args.wait)
    leader = local.wait_for_leader(cluster, args.wait)
    _print(_cluster_summary(cluster, leader))
    print(f"export {ENDPOINTS_ENV}={','.join(cluster.endpoints)}", file=sys.stderr)
    return EXIT_OK


def _cluster_down(args: argparse.Namespace) -> int:
    cluster = local.load(args.dir)
    _print({"stopped": local.down(cluster, grace=args.grace)})
    return EXIT_OK


def _cluster_status(args: argparse.Namespace) -> int:
    statuses = local.node_statuses(local.load(args.dir))
    _print(statuses)
    return EXIT_OK if all(isinstance(s, dict) for s in statuses.values()) else EXIT_FAILURE


def _cluster_stop(args: argparse.Namespace) -> int:
    cluster = local.load(args.dir)
    pid = local.stop_node(cluster, args.node, args.signal, wait=args.grace)
    _print({"node": args.node, "pid": pid, "signal": args.signal})
    return EXIT_OK


def _cluster_start(args: argparse.Namespace) -> int:
    cluster = local.load(args.dir)
    node_ids = [args.node] if args.node else [
        node_id for node_id in cluster.nodes if local.running_pid(cluster, node_id) is None]
    pids = {node_id: local.start_node(cluster, node_id).pid for node_id in node_ids}
    _wait_answering(cluster, node_ids, args.wait)
    _print({"started": pids})
    return EXIT_OK


def _wait_answering(cluster: local.Cluster, node_ids: list[str], timeout: float) -> None:
    """Wait until each started node serves its status (it need not see a leader)."""
    import time

    give_up_at = time.monotonic() + timeout
    pending = list(node_ids)
    while pending:
        for node_id in list(pending):
            process = cluster.processes[node_id]
            if process.poll() is not None:
                raise local.ClusterError(f"{node_id} exited with code {process.returncode}\n"
                                         + local.log_tail(cluster.nodes[node_id]))
            if local.fetch_status(cluster.nodes[node_id].api) is not None:
                pending.remove(node_id)
        if pending and time.monotonic() >= give_up_at:
            raise local.ClusterError(f"{', '.join(pending)} not answering after {timeout:g}s")
        if pending:
            time.sleep(0.05)


def _demo(args: argparse.Namespace) -> int:
    say: Callable[[str], None] = print
    try:
        cluster = local.load(args.dir)
        down = [i for i in cluster.nodes if local.running_pid(cluster, i) is None]
        if down:
            say(f"starting {', '.join(down)} in {cluster.dir}")
            for node_id in down:
                local.start_node(cluster, node_id)
    except local.ClusterError:
        say(f"starting 3 voters in {args.dir} (configs, data and logs go there)")
        cluster = local.up(args.dir, voters=3, tick_ms=args.tick_ms, timeout=args.wait)
    leader = local.wait_for_leader(cluster, args.wait)
    say(f"leader elected: {leader}; endpoints {','.join(cluster.endpoints)}")
    with Client(cluster.endpoints) as client:
        for key, value in (("color", "blue"), ("shape", "circle"), ("size", "large")):
            index = client.put(key, value)
            say(f"put {key}={value!r}: committed at index {index}")
        for node in cluster.nodes.values():
            with Client([node.api], retries=5) as one_node:
                result = one_node.get("color")
            say(f"linearizable get color through {node.id} ({node.role}): "
                f"{result.value!r} at index {result.index}")
        cas = client.cas("color", "blue", "green")
        say(f"cas color blue->green: ok={cas.ok}, value now {cas.value!r}")
        cas = client.cas("color", "blue", "red")
        say(f"cas color blue->red: ok={cas.ok} (it is {cas.value!r})")
        deleted = client.delete("shape")
        say(f"delete shape: deleted={deleted.deleted} at index {deleted.index}")
        try:
            client.get("shape")
        except NotFound as exc:
            say(f"get shape: not found (as of index {exc.index})")
    say(f"the cluster keeps running; try:\n  export {ENDPOINTS_ENV}="
        f"{','.join(cluster.endpoints)}\n  bwraft get color\n"
        f"  bwraft cluster down --dir {args.dir}")
    return EXIT_OK


def _chaos(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bwcore import chaos

    try:
        if args.check:
            return chaos.check_file(Path(args.check), check_timeout=args.check_timeout)
        if not args.dir:
            raise _UsageError("--dir is required (or --check HISTORY to re-check a history)")
        settings = chaos.ClientSettings(
            keys=tuple(f"k{i}" for i in range(args.keys)),
            read_consistency="stale" if args.stale_reads else "linearizable")
        options = chaos.ChaosOptions(
            dir=Path(args.dir), duration=args.duration, clients=args.clients,
            faults=tuple(k.strip() for k in args.faults.split(",") if k.strip()),
            seed=args.seed, voters=args.voters, observers=args.observers,
            secretaries=args.secretaries,
            datacenters=tuple(d.strip() for d in args.datacenters.split(",") if d.strip()),
            tick_ms=args.tick_ms, keep=args.keep,
            admin_token=args.admin_token or os.environ.get("BWRAFT_ADMIN_TOKEN", ""),
            check_timeout=args.check_timeout, out=Path(args.out) if args.out else None,
            client_settings=settings, log=lambda line: print(line, flush=True))
        code, _ = chaos.run_chaos(options)
        return code
    except chaos.ChaosError as exc:
        _print({"error": str(exc)}, sys.stderr)
        return chaos.EXIT_FAILED


# -- parser ---------------------------------------------------------------------------------


def _endpoint_list(text: str) -> str:
    try:
        return ",".join(normalize_endpoint(e) for e in text.split(",") if e.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``bwraft`` argument parser (each subcommand sets ``handler``)."""
    parser = argparse.ArgumentParser(prog="bwraft", description="BW-Raft cluster client.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--endpoints", type=_endpoint_list,
                     help=f"comma-separated API URLs (default: ${ENDPOINTS_ENV})")
    net.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    net.add_argument("--deadline", type=float, default=20.0,
                     help="seconds per command, retries included")
    rid = argparse.ArgumentParser(add_help=False)
    rid.add_argument("--request-id", help="make the write exactly-once under this id")

    sub = commands.add_parser("put", parents=[net, rid], help="write a key")
    sub.add_argument("key")
    sub.add_argument("value")
    sub.set_defaults(handler=_put)
    sub = commands.add_parser("get", parents=[net], help="read a key")
    sub.add_argument("key")
    sub.add_argument("--consistency", choices=("linearizable", "stale"), default="linearizable")
    sub.add_argument("--read-from", choices=READ_FROM, default="any",
                     help="any endpoint, the leader, or the observers among the endpoints"
                          " (round-robin)")
    sub.set_defaults(handler=_get)
    sub = commands.add_parser("del", parents=[net, rid], help="delete a key")
    sub.add_argument("key")
    sub.set_defaults(handler=_delete)
    sub = commands.add_parser("cas", parents=[net, rid], help="compare-and-set a key")
    sub.add_argument("key")
    expect = sub.add_mutually_exclusive_group(required=True)
    expect.add_argument("--expect", help="the value the key must hold")
    expect.add_argument("--expect-absent", action="store_true", help="the key must be absent")
    value = sub.add_mutually_exclusive_group(required=True)
    value.add_argument("--value", help="the new value")
    value.add_argument("--delete", action="store_true", help="delete the key on success")
    sub.set_defaults(handler=_cas)
    sub = commands.add_parser("status", parents=[net], help="status of each endpoint")
    sub.add_argument("--endpoint", type=_endpoint_list, help="only this endpoint")
    sub.set_defaults(handler=_status)
    sub = commands.add_parser("members", parents=[net], help="gossip membership view")
    sub.set_defaults(handler=_members)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--admin-token", help=f"the cluster's admin token (default:"
                                             f" ${ADMIN_TOKEN_ENV})")
    sub = commands.add_parser("transfer-leader", parents=[net, admin],
                              help="hand leadership to another voter")
    sub.add_argument("--to", help="the voter to lead (default: the most up-to-date one)")
    sub.set_defaults(handler=_transfer_leader)
    member = commands.add_parser("member", help="change the voting membership")
    member_actions = member.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub = member_actions.add_parser("add", parents=[net, admin],
                                    help="add a node (a learner, promoted once caught up)")
    sub.add_argument("id")
    sub.add_argument("--raft-addr", required=True, help="the new node's raft host:port")
    sub.add_argument("--api-addr", help="the new node's API host:port")
    sub.add_argument("--as", dest="as_role", choices=("voter", "learner"), default="voter",
                     help="stay a learner instead of being promoted")
    # The leader answers once the new voter is promoted, which may take a snapshot's time.
    sub.set_defaults(handler=_member, timeout=40.0, deadline=60.0)
    sub = member_actions.add_parser("promote", parents=[net, admin],
                                    help="promote a learner once caught up")
    sub.add_argument("id")
    sub.set_defaults(handler=_member, timeout=40.0, deadline=60.0)
    sub = member_actions.add_parser("remove", parents=[net, admin],
                                    help="remove a voter or learner (the leader too)")
    sub.add_argument("id")
    sub.set_defaults(handler=_member)
    sub = member_actions.add_parser("list", parents=[net, admin],
                                    help="voters, learners and their progress")
    sub.set_defaults(handler=_member)

    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("--dir", required=True, help="the cluster's folder")
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument("--wait", type=float, default=60.0, help="seconds to wait for nodes")
    sub = commands.add_parser("demo", parents=[folder, wait],
                              help="start 3 voters in DIR (unless up) and show writes and reads")
    sub.add_argument("--tick-ms", type=int, default=100)
    sub.set_defaults(handler=_demo)

    cluster = commands.add_parser("cluster", help="run a local multi-process cluster")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub = actions.add_parser("up", parents=[folder, wait], help="create and start a cluster")
    sub.add_argument("--voters", type=int, default=3)
    sub.add_argument("--observers", type=int, default=0)
    sub.add_argument("--secretaries", type=int, default=0)
    sub.add_argument("--datacenters", default="dc1", help="comma-separated names")
    sub.add_argument("--tick-ms", type=int, default=100)
    sub.add_argument("--python", help="interpreter that runs the nodes (default: this one)")
    sub.set_defaults(handler=_cluster_up)
    sub = actions.add_parser("down", parents=[folder], help="stop every node")
    sub.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL")
    sub.set_defaults(handler=_cluster_down)
    sub = actions.add_parser("status", parents=[folder], help="each node's status or 'down'")
    sub.set_defaults(handler=_cluster_status)
    sub = actions.add_parser("stop", parents=[folder], help="signal one node")
    sub.add_argument("--node", required=True)
    sub.add_argument("--signal", choices=tuple(local.SIGNALS), default="TERM")
    sub.add_argument("--grace", type=float, default=10.0,
                     help="seconds to wait for TERM/KILL to end the process")
    sub.set_defaults(handler=_cluster_stop)
    sub = actions.add_parser("start", parents=[folder, wait],
                             help="start one node (or every stopped node) from its data")
    sub.add_argument("--node")
    sub.set_defaults(handler=_cluster_start)

    sub = commands.add_parser(
        "chaos", help="inject faults into a local cluster and check linearizability",
        description="Run clients against a local cluster (DIR: reused if it holds one, else"
                    " created with fault injection on) while killing, pausing and"
                    " partitioning nodes; check the history for linearizability and lost"
                    " writes. Exit 0: passed; 1: violation or lost write; 3: could not run,"
                    " no recovery, or undecided. See docs/chaos.md.")
    sub.add_argument("--dir", help="the cluster's folder")
    sub.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    sub.add_argument("--clients", type=int, default=4)
    sub.add_argument("--faults", default="kill,pause,partition",
                     help="comma-separated: kill, pause, partition, helpers")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--keys", type=int, default=6, help="size of the key set")
    sub.add_argument("--voters", type=int, default=3)
    sub.add_argument("--observers", type=int, default=0)
    sub.add_argument("--secretaries", type=int, default=0)
    sub.add_argument("--datacenters", default="dc1", help="comma-separated names")
    sub.add_argument("--tick-ms", type=int, default=100)
    sub.add_argument("--keep", action="store_true",
                     help="leave a cluster this run created running")
    sub.add_argument("--admin-token", help="token for /v1/admin/faults"
                                           " (default: $BWRAFT_ADMIN_TOKEN)")
    sub.add_argument("--check-timeout", type=float, default=120.0,
                     help="seconds the linearizability search may spend per key")
    sub.add_argument("--out", help="folder for the history and report"
                                   " (default: DIR/chaos-runs/<time>-seed<N>)")
    sub.add_argument("--check", metavar="HISTORY",
                     help="only re-check a recorded history.jsonl")
    sub.add_argument("--stale-reads", action="store_true",
                     help="self-check: read with consistency=stale, which is not"
                          " linearizable, so that the run must find a violation")
    sub.set_defaults(handler=_chaos)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        _print({"error": str(exc)}, sys.stderr)
        return EXIT_USAGE
    except BadRequest as exc:
        _print({"error": exc.message, "status": exc.status}, sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        _print({"error": exc.message, "status": exc.status}, sys.stderr)
        return EXIT_FAILURE
    except local.ClusterError as exc:
        _print({"error": str(exc)}, sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`bwraft status | head`): not an error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
