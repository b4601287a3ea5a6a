"""Randomized fault schedules over a :class:`SimNetwork`, checked after every step.

One schedule: clients propose and read while the schedule delivers, drops, duplicates and
reorders messages, cuts the network, crashes nodes (sometimes midway through a Ready) and
restarts them, compacts logs and changes the voter configuration. At the end the network heals
and the cluster must elect a leader, commit a final entry and converge (liveness).

Replay a failing seed with ``python -m bwcore.sim.schedule --seed N -v``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from bwcore.kernel import ConfChange, ConfChangeType
from bwcore.sim.network import SimNetwork


@dataclass
class ScheduleStats:
    seed: int
    steps: int = 0
    faults: int = 0
    proposals: int = 0
    acked: int = 0
    reads: int = 0
    reads_served: int = 0
    leaders: int = 0
    conf_changes: int = 0
    checks: int = 0
    log: list[str] = field(default_factory=list)


def run_schedule(seed: int, steps: int = 400, *, voters: int = 3, spares: int = 1,
                 helpers: int = 1, verbose: bool = False, **kernel) -> ScheduleStats:
    names = [f"n{i}" for i in range(1, voters + 1)]
    helper_names = [f"o{i}" for i in range(1, helpers + 1)]
    kernel = {"election_tick": 6, "max_inflight": 8, **kernel}
    net = SimNetwork(names, seed, helpers=helper_names, async_persist=True, **kernel)
    for i in range(spares):
        net.add_node(f"s{i + 1}")
    rng = net.rng
    st = ScheduleStats(seed)
    down: set[str] = set()
    counter = 0

    def note(msg: str) -> None:
        if verbose:
            print(f"[{st.steps}] {msg}", file=sys.stderr)

    def live() -> list[str]:
        return [n for n in net.nodes if n not in down]

    for st.steps in range(1, steps + 1):
        r = rng.random()
        if r < 0.35:
            if not net.deliver_random():
                net.tick(rng.choice(live()) if live() else None)
        elif r < 0.42:
            net.persist_random()
        elif r < 0.45:
            net.send_eager_random()
        elif r < 0.60:
            net.tick(rng.choice(list(net.nodes)))
        elif r < 0.72:
            lead = net.leader()
            target = lead if lead and rng.random() < 0.8 else rng.choice(list(net.nodes))
            counter += 1
            if net.propose(target, b"c%d" % counter) is not None:
                st.proposals += 1
        elif r < 0.78:
            counter += 1
            if net.read(rng.choice(list(net.nodes)), b"q%d" % counter):
                st.reads += 1
        elif r < 0.82 and net.inflight:
            net.inflight.pop(rng.randrange(len(net.inflight)))
            st.faults += 1
        elif r < 0.84 and net.inflight:
            net.inflight.append(rng.choice(net.inflight))
            st.faults += 1
        elif r < 0.87:
            ids = list(net.nodes)
            rng.shuffle(ids)
            k = rng.randrange(1, len(ids))
            net.partition(ids[:k], ids[k:])
            note(f"partition {ids[:k]} | {ids[k:]}")
            st.faults += 1
        elif r < 0.91:
            net.heal()
            note("heal")
        elif r < 0.94:
            victims = live()
            if victims:
                v = rng.choice(victims)
                net.nodes[v].crash(torn=rng.random() < 0.5)
                down.add(v)
                note(f"crash {v}")
                st.faults += 1
        elif r < 0.97:
            if down:
                v = rng.choice(sorted(down))
                down.discard(v)
                net.nodes[v].start()
                note(f"restart {v}")
        elif r < 0.985:
            n = rng.choice(live() or list(net.nodes))
            if net.nodes[n].up and net.compact(n):
                note(f"compact {n}")
        else:
            lead = net.leader()
            if lead is not None:
                cc = _random_conf_change(net, lead, rng)
                if cc is not None and net.conf_change(lead, cc) is not None:
                    st.conf_changes += 1
                    note(f"conf change {cc.type.name} {cc.node}")

    _converge(net, down)
    st.acked = len(net.acked)
    st.reads_served = sum(len(n.served_reads) for n in net.nodes.values())
    st.leaders = len(net.checker.leaders)
    st.checks = net.checker.checks
    return st


def _random_conf_change(net: SimNetwork, lead: str, rng) -> ConfChange | None:
    conf = net.nodes[lead].raw.conf
    spares = [n for n in net.nodes if n not in conf.members() and n not in net.helpers]
    choices = []
    if spares:
        choices.append(ConfChange(ConfChangeType.ADD_LEARNER, rng.choice(spares)))
    if conf.learners:
        choices.append(ConfChange(ConfChangeType.PROMOTE, rng.choice(sorted(conf.learners))))
    if len(conf.voters) > 3:
        choices.append(ConfChange(ConfChangeType.REMOVE, rng.choice(sorted(conf.voters))))
    return rng.choice(choices) if choices else None


def _converge(net: SimNetwork, down: set[str]) -> None:
    """Liveness: once healed and restarted, the cluster acknowledges a new write and every
    member converges on the same applied sequence."""
    net.heal()
    net.drop_rate = net.dup_rate = 0.0
    for v in sorted(down):
        net.nodes[v].start()
    down.clear()
    acked_before = len(net.acked)
    lead = None
    # A proposal may be lost without being acknowledged (its leader removed itself or was
    # deposed before it committed): keep proposing until one is acknowledged.
    for attempt in range(40):
        lead = net.elect(max_ticks=2000)
        net.propose(lead, b"final-%d" % attempt)
        for _ in range(20):
            net.tick()
            net.stabilize()
            if len(net.acked) > acked_before:
                break
        if len(net.acked) > acked_before:
            break
    else:
        raise AssertionError("no write was acknowledged after healing")
    for _ in range(200):
        net.tick()
        net.stabilize()
        lead = net.leader() or net.elect(max_ticks=2000)
        raw = net.nodes[lead].raw
        members = raw.conf.members() | set(net.helpers)
        if all(net.nodes[m].raw.applied_index == raw.commit_index for m in members) \
                and raw.applied_index == raw.commit_index:
            break
    else:
        raise AssertionError("members did not converge after healing")
    ref = net.applied_commands(lead)
    for m in members:
        if net.applied_commands(m) != ref:
            raise AssertionError(f"{m} applied a different sequence than leader {lead}")
    for _, _, data in net.acked:
        if data not in ref:
            raise AssertionError(f"acknowledged write {data!r} is missing after healing")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run or replay randomized kernel schedules.")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds from --seed")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    total = ScheduleStats(-1)
    for seed in range(args.seed, args.seed + args.seeds):
        st = run_schedule(seed, args.steps, verbose=args.verbose)
        for f in ("steps", "faults", "proposals", "acked", "reads", "reads_served",
                  "conf_changes", "checks"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
    print(f"{args.seeds} schedules: {total.steps} steps, {total.faults} faults, "
          f"{total.proposals} proposals ({total.acked} acknowledged), {total.reads_served}/"
          f"{total.reads} reads served, {total.conf_changes} configuration changes, "
          f"{total.checks} invariant checks, 0 violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
