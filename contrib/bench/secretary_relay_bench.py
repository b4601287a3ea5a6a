"""What the leader's side of the secretary plugin costs per round, alone in a tight loop.

One round is what the plugin does on the leader for one batch of writes in the steady state of
``secretary_inproc_bench.py``: route the kernel's APPENDs carrying ``--entries`` new entries to
every follower (the relayed ones packed into one BATCH frame), route the commit notices the
kernel broadcasts once they commit (held for the next batch, which replaces them), and take one
REPORT carrying the acknowledgements of a quorum's worth of relayed followers (decode, check,
fence, turn into replies for the kernel). No network, no kernel, no reactor: the messages are
built before the clock starts, as the kernel would hand them over, and the REPORT payload as a
secretary would send it. The figure is the plugin's own share of what a secretary's leader
spends per write; compare it with the leader CPU per write of ``secretary_inproc_bench.py``.

Usage::

    python contrib/bench/secretary_relay_bench.py [--followers 8] [--local-followers 1]
        [--entries 3] [--value-bytes 1024] [--rounds 5000] [--repeat 5]

Prints µs per round and per write (best of ``--repeat``). Benchmarks assert nothing.
"""

from __future__ import annotations

import argparse
import time

from bwcore.kernel import Entry, Message, MessageType as MT
from bwraft_plugins import secretary_wire as wire
from bwraft_plugins.secretary_leader import DirectoryEntry, LeaderRelay, RelaySettings

LEADER, SECRETARY, TERM = "n1", "sec1", 3
#: Keeps every batch outstanding until the round's report (the report acknowledges them all).
ACK_ALL = 2**62


def relay(east: list[str], local: list[str]) -> LeaderRelay:
    """A leader relay as the plugin builds it: hired, one secretary for ``east``."""
    voters = {v: "127.0.0.1:9" for v in [LEADER, *local, *east]}
    leader = LeaderRelay(LEADER, RelaySettings(commit_delay=0.002), voters)
    leader.member_changed(DirectoryEntry(SECRETARY, "secretary", "east", "alive",
                                         "127.0.0.1:8"), 0.0)
    for node_id in east + local:
        dc = "east" if node_id in east else "west"
        leader.member_changed(DirectoryEntry(node_id, "voter", dc, "alive", "127.0.0.1:9",
                                             relay=True), 0.0)
    leader.set_leadership(TERM, True)
    return leader


def rounds(count: int, local: list[str], east: list[str], entries: int,
           value: bytes) -> list[tuple[list[Message], list[Message], list[object]]]:
    """Each round's APPENDs, commit notices and REPORT payload, built ahead of the clock. The
    report carries what the leader needs from the relayed followers to commit (the hint)."""
    targets = local + east
    quorum = (1 + len(targets)) // 2 + 1
    need = max(1, quorum - 1 - len(local))   # besides the leader and its direct followers
    out = []
    index = 100
    for _ in range(count):
        new = tuple(Entry(TERM, index + k, value) for k in range(1, entries + 1))
        appends = [Message(MT.APPEND, t, LEADER, TERM, log_term=TERM, index=index,
                           entries=new, commit=index) for t in targets]
        index += entries
        notices = [Message(MT.APPEND, t, LEADER, TERM, log_term=TERM, index=index,
                           commit=index) for t in targets]
        acks = [(f, [MT.APPEND_RESP, index, TERM, False, 0, b""]) for f in east[:need]]
        report = wire.encode_report(TERM, ACK_ALL, acks, ())
        out.append((appends, notices, report))
    return out


def one_pass(args: argparse.Namespace) -> float:
    east = [f"e{k}" for k in range(args.followers)]
    local = [f"w{k}" for k in range(args.local_followers)]
    leader = relay(east, local)
    work = rounds(args.rounds, local, east, args.entries, b"v" * args.value_bytes)
    now, step = 1.0, 0.005
    started = time.perf_counter()
    for appends, notices, report in work:
        leader.route(appends, now)
        leader.route(notices, now + step / 2)
        leader.on_report(SECRETARY, wire.decode_report(report, LEADER), now + step / 2)
        now += step
    elapsed = time.perf_counter() - started
    # Every round packed a batch and every report was taken (none fenced off).
    assert leader.stats.frames == args.rounds and leader.stats.reports == args.rounds
    return elapsed / args.rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--followers", type=int, default=8, help="relayed followers (east)")
    ap.add_argument("--local-followers", type=int, default=1,
                    help="direct followers in the leader's datacenter")
    ap.add_argument("--entries", type=int, default=3, help="new entries per round")
    ap.add_argument("--value-bytes", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.followers < 1 or args.entries < 1 or args.rounds < 1:
        ap.error("--followers, --entries and --rounds must be at least 1")
    best = min(one_pass(args) for _ in range(args.repeat))
    print(f"followers {args.followers} relayed + {args.local_followers} direct, "
          f"{args.entries} entries per round: {best * 1e6:.1f} µs per round, "
          f"{best * 1e6 / args.entries:.1f} µs per write")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
