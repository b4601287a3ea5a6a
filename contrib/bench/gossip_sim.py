#!/usr/bin/env python3
"""SWIM gossip at scale, simulated: failure-detection time and per-member load.

    python contrib/bench/gossip_sim.py [--sizes 10 100 1000] [--crashes 5] [--seed 1]
                                       [--loss 0.0] [--window 20] [--soak SECONDS]

Runs ``n`` real :class:`bwcore.gossip.SwimMember` objects with default settings on a simulated
clock and an in-memory datagram network (0.5-5 ms latency, optional loss; no sockets). Each
member starts knowing all others: their records are delivered to it as push-pull datagrams,
and the news this puts in its queue of pending updates is then discarded, as if it had been
gossiped long ago (gossiping n records to n members first would cost O(n^2 log n) simulated
datagrams before the measurement starts). After 5 simulated seconds:

* load: datagrams and bytes each member sends per simulated second, over ``--window``
  seconds of a quiet cluster (no datagram lost unless ``--loss``), split into failure detection (ping, ack, ping-req, nack, with
  piggybacked updates) and anti-entropy (push-pull);
* detection: ``--crashes`` times, one random member stops; the time until every other member
  declares it dead (median and maximum), and until the first one suspects it.

With ``--soak`` it instead runs each size for that many simulated seconds with no crash and
counts suspicions and false deaths (a live member declared dead in some view).

Prints a line per size and a Markdown table. The clock is a heap of timers, since Twisted's
``task.Clock`` re-sorts its list on every ``callLater``, which is too slow for 1,000 members.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import platform
import random
import statistics
import time
from collections import Counter
from typing import Any, Callable

import structlog
from twisted.internet.base import DelayedCall

from bwcore.gossip import GossipConfig, Member, MemberState, SwimMember
from bwcore.gossip_codec import Alive, PushPull, WireCodec, encode_message, encode_update

Address = tuple[str, int]
_PROBE_TYPES = {1, 2, 3, 4}   # ping, ack, ping-req, nack (see bwcore/gossip_codec.py)


class HeapClock:
    """``IReactorTime`` with timers in a heap; cancelled timers are skipped when popped."""

    def __init__(self) -> None:
        self._now = 0.0
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def seconds(self) -> float:
        return self._now

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any,  # noqa: N802
                  **kw: Any) -> DelayedCall:
        call = DelayedCall(self._now + delay, f, args, kw, lambda c: None, self._push,
                           seconds=self.seconds)
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        heapq.heappush(self._heap, (call.getTime(), next(self._order), call))

    def getDelayedCalls(self) -> list[DelayedCall]:  # noqa: N802
        return [c for _, _, c in self._heap if c.active()]

    def run_until(self, end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end:
            when, _, call = heapq.heappop(heap)
            if call.cancelled or call.called or call.getTime() != when:
                continue
            self._now = when
            call.called = 1
            call.func(*call.args, **call.kw)
        self._now = max(self._now, end)


class Network:
    """In-memory datagrams with latency and loss; counts what each member sends."""

    def __init__(self, clock: HeapClock, rng: random.Random, loss: float) -> None:
        self.clock = clock
        self.rng = rng
        self.loss = loss
        self.nodes: dict[Address, Callable[[bytes, Address], None]] = {}
        self.counting = False
        self.datagrams: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def sender(self, src: Address) -> Callable[[Address, bytes], None]:
        def send(dst: Address, data: bytes) -> None:
            if self.counting:
                kind = "probe" if data[2] in _PROBE_TYPES else "push_pull"
                self.datagrams[kind] += 1
                self.bytes[kind] += len(data)
            if self.rng.random() >= self.loss:
                self.clock.callLater(self.rng.uniform(0.0005, 0.005), self.deliver, src, dst,
                                     data)
        return send

    def deliver(self, src: Address, dst: Address, data: bytes) -> None:
        receiver = self.nodes.get(dst)
        if receiver is not None:
            receiver(data, src)


def member_record(i: int) -> Member:
    host = f"10.{i // 65536}.{i // 256 % 256}.{i % 256 + 1}"
    return Member(id=f"node-{i:04d}", role=("voter", "secretary", "observer")[i % 3],
                  datacenter=f"dc{i % 3}", raft_addr=f"{host}:7000", api_addr=f"{host}:8000",
                  gossip_addr=f"{host}:7946")


def build(n: int, seed: int, loss: float) -> tuple[HeapClock, Network, dict[str, SwimMember]]:
    clock = HeapClock()
    rng = random.Random(seed)
    net = Network(clock, random.Random(seed + 1), loss)
    config = GossipConfig()
    locals_ = [member_record(i) for i in range(n)]
    members: dict[str, SwimMember] = {}
    for local in locals_:
        host, port = local.gossip_addr.rsplit(":", 1)
        address = (host, int(port))
        member = SwimMember(local, net.sender(address), clock,
                            random.Random(rng.getrandbits(64)), config)
        members[local.id] = member
        net.nodes[address] = member.datagram_received
    # Everyone learns everyone: the full state as push-pull datagrams of 10 records each.
    codec = WireCodec(None, config.max_datagram)
    datagrams = []
    for start in range(0, n, 10):
        body = encode_message(PushPull(locals_[0].id, False)) + b"".join(
            encode_update(Alive(m)) for m in locals_[start:start + 10])
        datagrams.append(codec.seal(body))
    source = ("10.255.255.254", 7946)
    for member in members.values():
        member.start()
        for data in datagrams:
            member.datagram_received(data, source)
        # Start converged: the bootstrap news counts as gossiped already (bench only).
        member._broadcasts = type(member._broadcasts)()
    return clock, net, members


def run(n: int, crashes: int, seed: int, loss: float, window: float) -> dict[str, float]:
    started = time.perf_counter()
    clock, net, members = build(n, seed, loss)
    clock.run_until(5.0)
    net.counting = True
    clock.run_until(clock.seconds() + window)
    net.counting = False
    alive = len(members)
    per_member = {k: v / alive / window for k, v in net.datagrams.items()}
    per_member_bytes = {k: v / alive / window for k, v in net.bytes.items()}

    rng = random.Random(seed + 2)
    detections, first_suspicions = [], []
    for _ in range(crashes):
        victim_id = rng.choice(sorted(members))
        victim = members.pop(victim_id)
        host, port = victim.local.gossip_addr.rsplit(":", 1)
        del net.nodes[(host, int(port))]
        victim.stop()
        crashed_at = clock.seconds()
        dead_seen: set[str] = set()
        suspected: list[float] = []

        def listener(event: str, m: Member, observer: str, victim_id: str = victim_id) -> None:
            if m.id != victim_id:
                return
            if event == "dead":
                dead_seen.add(observer)
            elif event == "suspect" and not suspected:
                suspected.append(clock.seconds())

        hooks = {}
        for name, member in members.items():
            hooks[name] = (lambda e, m, name=name: listener(e, m, name))
            member.add_listener(hooks[name])
        while len(dead_seen) < len(members):
            clock.run_until(clock.seconds() + 0.05)
            if clock.seconds() - crashed_at > 120:
                raise RuntimeError(f"crash of {victim_id} not detected by all in 120 s")
        detections.append(max(0.0, clock.seconds() - crashed_at))
        first_suspicions.append(suspected[0] - crashed_at if suspected else float("nan"))
        for name, member in members.items():
            member.remove_listener(hooks[name])
        clock.run_until(clock.seconds() + 5)   # let the news settle before the next crash
    false_dead = sum(1 for m in members.values() for v in m.members()
                     if v.state is MemberState.DEAD and v.id in members)
    return {
        "n": n,
        "probe_msgs": per_member.get("probe", 0.0),
        "probe_bytes": per_member_bytes.get("probe", 0.0),
        "pp_msgs": per_member.get("push_pull", 0.0),
        "pp_bytes": per_member_bytes.get("push_pull", 0.0),
        "detect_median": statistics.median(detections),
        "detect_max": max(detections),
        "suspect_median": statistics.median(first_suspicions),
        "false_dead": false_dead,
        "wall_s": time.perf_counter() - started,
    }


def soak(n: int, seconds: float, seed: int, loss: float) -> dict[str, float]:
    """Run a healthy cluster for ``seconds``: count suspicions and false deaths."""
    started = time.perf_counter()
    clock, net, members = build(n, seed, loss)
    events: Counter[str] = Counter()
    for member in members.values():
        member.add_listener(lambda event, m: events.update([event]))
    clock.run_until(seconds)
    return {"n": n, "seconds": seconds, "suspect_events": events["suspect"],
            "suspicions": events["suspect"] / (n - 1), "false_dead_events": events["dead"],
            "wall_s": time.perf_counter() - started}


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os
    return (f"{os.cpu_count()} CPUs, {model}, {platform.system()} {platform.release()}, "
            f"CPython {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--crashes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--soak", type=float, default=0.0)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"machine: {machine()}; date: {time.strftime('%Y-%m-%d')}; loss: {args.loss:.0%}; "
          f"crashes per size: {args.crashes}; seed: {args.seed}")
    if args.soak:
        for n in args.sizes:
            row = soak(n, args.soak, args.seed, args.loss)
            print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()},
                  flush=True)
        return
    rows = []
    for n in args.sizes:
        row = run(n, args.crashes, args.seed, args.loss, args.window)
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
    print()
    print("| members | datagrams/member/s (probe + push-pull) | bytes/member/s (probe + push-pull)"
          " | first suspicion (median) | all declare dead: median | max |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['probe_msgs']:.1f} + {r['pp_msgs']:.1f} | "
              f"{r['probe_bytes']:,.0f} + {r['pp_bytes']:,.0f} | {r['suspect_median']:.2f} s | "
              f"{r['detect_median']:.2f} s | {r['detect_max']:.2f} s |")


if __name__ == "__main__":
    main()
