"""Secretaries on the simulated network: the relay cores of the ``secretary`` plugin, driven
like the plugin drives them, between the kernels of a :class:`bwcore.sim.SimNetwork`.

Each voter runs a :class:`LeaderRelay` (used while it leads) and a :class:`FollowerRelay`;
each secretary is a :class:`SecretaryRelay` that can crash (losing everything) and restart.
Plugin frames travel as encoded :class:`bwcore.codec.PluginFrame` bytes through their own
in-flight list, subject to the network's cuts, isolation and loss, and are delivered in random
order with the kernel messages. Gossip is simulated by telling the leader cores about
secretaries' states. The network's :class:`SafetyChecker` checks every relayed message against
what the leader of its term emitted (invariant 6) before the follower steps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bwcore import codec
from bwcore.kernel import Message, StateRole
from bwcore.sim.network import SimNetwork
from bwraft_plugins import secretary_wire as wire
from bwraft_plugins.secretary_leader import (
    DirectoryEntry,
    LeaderRelay,
    RelaySettings,
    TakeBack,
)
from bwraft_plugins.secretary_relay import FollowerRelay, SecretaryRelay

#: Seconds of the cores' clock per kernel tick (election timeout: 10 ticks = 1 s).
TICK_S = 0.1


@dataclass
class SimFrame:
    src: str
    dst: str
    data: bytes


class RelaySim:
    """A SimNetwork whose leaders replicate through secretaries.

    Args:
        voters: Voter id -> datacenter.
        secretaries: Secretary id -> datacenter.
        helpers: Observer id -> datacenter (non-voting helpers the leaders feed).
        seed: Seeds the network (and so every random choice).
        settings: The leaders' relay policy.
        **kernel: KernelConfig fields for every node.
    """

    def __init__(self, voters: dict[str, str], secretaries: dict[str, str], seed: int = 0, *,
                 helpers: dict[str, str] | None = None, settings: RelaySettings | None = None,
                 async_persist: bool = False, max_delay: float = 0.002, **kernel) -> None:
        self.voters = dict(voters)
        self.helpers = dict(helpers or {})
        self.dcs = {**voters, **self.helpers, **secretaries}
        self.settings = settings or RelaySettings(reply_deadline=3 * TICK_S,
                                                  rehire_after=20 * TICK_S, window=64)
        self.max_delay = max_delay
        self.net = SimNetwork(list(voters), seed, helpers=list(self.helpers),
                              router=self._route, async_persist=async_persist, **kernel)
        self.net.checker.track_relays = True
        self.now = 0.0
        self.frames: list[SimFrame] = []
        self.outbox: dict[str, list[Message]] = {}
        self.secretary_state = {s: "alive" for s in secretaries}
        self.secretaries: dict[str, SecretaryRelay | None] = {}
        self.leaders: dict[str, LeaderRelay] = {}
        self.followers: dict[str, FollowerRelay] = {}
        self.relayed_to_followers = 0
        #: (leader, follower) -> APPEND/HEARTBEAT messages the leader sent it directly.
        self.direct: dict[tuple[str, str], int] = {}
        self.takebacks: list[TakeBack] = []
        self.frames_sent: dict[wire.Kind, int] = {}
        #: BATCH frames whose hint settles what the secretary reports, and the latest hint
        #: each secretary was sent: (report_after, settles).
        self.settling_batches = 0
        self.hints: dict[str, tuple[int, bool]] = {}
        self._progress_seen = float("-inf")
        for s in secretaries:
            self.restart_secretary(s)
        for v in [*voters, *self.helpers]:
            self._fresh_cores(v)

    # -- processes -----------------------------------------------------------------------

    def _fresh_cores(self, node_id: str) -> None:
        """The relay state of a (re)started voter: nothing but what gossip tells it."""
        self.followers[node_id] = FollowerRelay(node_id, ttl=self.settings.reply_deadline)
        if node_id not in self.voters:
            return
        # The voters (no addresses: the simulated network needs none): batches carry the
        # report hint as in a real cluster.
        leader = LeaderRelay(node_id, self.settings, dict.fromkeys(self.voters, ""))
        for n, dc in {**self.voters, **self.helpers}.items():
            role = "voter" if n in self.voters else "observer"
            leader.member_changed(DirectoryEntry(n, role, dc, "alive", relay=True), self.now)
        for s, state in self.secretary_state.items():
            leader.member_changed(DirectoryEntry(s, "secretary", self.dcs[s], state), self.now)
        self.leaders[node_id] = leader

    def crash_voter(self, node_id: str, torn: bool = False) -> None:
        self.net.nodes[node_id].crash(torn=torn)
        self.outbox.pop(node_id, None)

    def restart_voter(self, node_id: str) -> None:
        self._fresh_cores(node_id)
        self.net.nodes[node_id].start()
        self.pump()

    def crash_secretary(self, s: str) -> None:
        """SIGKILL: everything it held is gone; gossip has not noticed yet."""
        self.secretaries[s] = None

    def restart_secretary(self, s: str) -> None:
        self.secretaries[s] = SecretaryRelay(s, window=self.settings.window,
                                             max_delay=self.max_delay)
        self.gossip(s, "alive")

    def gossip(self, s: str, state: str) -> None:
        """Gossip's news about secretary ``s`` reaches every voter."""
        self.secretary_state[s] = state
        entry = DirectoryEntry(s, "secretary", self.dcs[s], state)
        for v, leader in self.leaders.items():
            self._took_back(v, leader.member_changed(entry, self.now))

    # -- the routing hook, as the plugin runs it ----------------------------------------------

    def _route(self, m: Message) -> bool:
        node = self.net.nodes.get(m.frm)
        raw = node.raw if node is not None else None
        if raw is None or m.frm not in self.followers:
            return False
        if m.type in wire.REQUESTS and raw.role is StateRole.LEADER and m.term == raw.term \
                and m.frm in self.leaders:
            self.outbox.setdefault(m.frm, []).append(m)
            return True
        picked = self.followers[m.frm].take_replies([m], self.now)
        if picked is not None:
            secretary, _, payload = picked
            self.send_frame(m.frm, secretary, payload)
            return True
        return False

    def _sync(self, node_id: str) -> bool:
        raw = self.net.nodes[node_id].raw
        leader = self.leaders[node_id]
        if raw is None or raw.role is not StateRole.LEADER:
            leader.set_leadership(None, False)
            return False
        leader.set_leadership(raw.term, raw.term_at(raw.commit_index) == raw.term)
        return True

    def flush_outboxes(self) -> None:
        """The end of a reactor turn: each leader's batch goes through its relay core."""
        while self.outbox:
            node_id, batch = self.outbox.popitem()
            if self.net.nodes[node_id].raw is None:
                continue  # crashed with the batch unsent
            self._sync(node_id)
            for secretary, payload in self.leaders[node_id].route(batch, self.now):
                self.send_frame(node_id, secretary, payload)
            for m in batch:
                key = (m.frm, m.to)
                self.direct[key] = self.direct.get(key, 0) + 1
                self.net.post(m)

    def flush_held(self, force: bool = False) -> None:
        """Held commit notices whose wait is over (``force``: all) go out in frames."""
        for v, leader in self.leaders.items():
            if leader.held_until is not None and self._sync(v):
                for secretary, payload in leader.flush_held(self.now, force=force):
                    self.send_frame(v, secretary, payload)

    def _took_back(self, node_id: str, takebacks: list[TakeBack]) -> None:
        raw = self.net.nodes[node_id].raw
        for tb in takebacks:
            self.takebacks.append(tb)
            if raw is None or raw.role is not StateRole.LEADER:
                continue
            for target in tb.targets:
                raw.report_unreachable(target)
                self.send_frame(node_id, target, wire.encode_direct(raw.term))
        self.net.nodes[node_id].process()

    def check_deadlines(self) -> None:
        look = self.now - self._progress_seen >= TICK_S - 1e-9   # once a tick
        if look:
            self._progress_seen = self.now
        for v, leader in self.leaders.items():
            if self._sync(v):
                self._took_back(v, leader.check(self.now))
                raw = self.net.nodes[v].raw
                if look and raw is not None:
                    leader.note_progress(raw.status(), self.now)   # as the plugin does

    def flush_secretaries(self, force: bool = False) -> None:
        for s, relay in self.secretaries.items():
            if relay is not None and relay.flush_at is not None \
                    and (force or relay.flush_at <= self.now):
                report = relay.flush(self.now)
                if report is not None:
                    self.send_frame(s, *report)

    def pump(self) -> None:
        """What the reactor does between inputs: flush batches, reports and deadlines."""
        self.flush_outboxes()
        self.flush_held()
        self.flush_secretaries()
        self.check_deadlines()
        self.flush_outboxes()

    # -- frames ----------------------------------------------------------------------------

    def send_frame(self, src: str, dst: str, payload: list) -> None:
        net = self.net
        if (src, dst) in net.cut or src in net.isolated or dst in net.isolated:
            return
        if net.drop_rate and net.rng.random() < net.drop_rate:
            return
        kind = wire.kind_of(payload)
        self.frames_sent[kind] = self.frames_sent.get(kind, 0) + 1
        if kind is wire.Kind.BATCH:
            batch = wire.decode_batch(payload)
            self.hints[dst] = (batch.report_after, batch.settles)
            self.settling_batches += batch.settles
        self.frames.append(SimFrame(src, dst, codec.encode(codec.PluginFrame(wire.PLUGIN,
                                                                             payload))))

    def deliver_frame(self, frame: SimFrame) -> None:
        payload = codec.decode(frame.data).payload
        kind = wire.kind_of(payload)
        src, dst = frame.src, frame.dst
        if dst in self.secretaries:
            relay = self.secretaries[dst]
            if relay is None:
                return
            if kind is wire.Kind.BATCH:
                for target, relayed in relay.on_batch(src, wire.decode_batch(payload), self.now):
                    self.send_frame(dst, target, relayed)
            elif kind is wire.Kind.REPLY:
                if relay.on_replies(src, wire.decode_replies(payload), self.now):
                    report = relay.flush(self.now)
                    if report is not None:
                        self.send_frame(dst, *report)
            return
        node = self.net.nodes[dst]
        if node.raw is None:
            return
        if kind is wire.Kind.RELAY:
            relay_frame = wire.decode_relay(payload, dst)
            for m in self.followers[dst].on_relay(src, relay_frame, self.now):
                self.net.checker.on_relayed(dst, m)   # invariant 6, before the kernel sees it
                self.relayed_to_followers += 1
                self.net.deliver(m)
        elif kind is wire.Kind.REPORT:
            report = wire.decode_report(payload, dst)
            if self._sync(dst):
                for m in self.leaders[dst].on_report(src, report, self.now):
                    self.net.deliver(m)
        elif kind is wire.Kind.DIRECT:
            self.followers[dst].on_direct(src, wire.decode_direct(payload))
        self.pump()

    def deliver_random(self) -> bool:
        """Deliver one random message or frame; False if nothing is in flight."""
        total = len(self.net.inflight) + len(self.frames)
        if not total:
            return False
        k = self.net.rng.randrange(total)
        if k < len(self.net.inflight):
            self.net.deliver_random()
        else:
            k -= len(self.net.inflight)
            self.frames[k], self.frames[-1] = self.frames[-1], self.frames[k]
            self.deliver_frame(self.frames.pop())
        self.pump()
        return True

    # -- time and convenience --------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.pump()

    def tick_all(self, n: int = 1) -> None:
        """``n`` ticks of every live node, the clock moving with them."""
        for _ in range(n):
            self.now += TICK_S
            self.net.tick()
            self.pump()

    def stabilize(self, max_rounds: int = 1000) -> None:
        """Persist and deliver everything in flight, in order, frames included."""
        for _ in range(max_rounds):
            self.net.stabilize()
            self.pump()
            self.flush_held(force=True)
            self.flush_secretaries(force=True)
            self.pump()
            if not self.frames and not self.net.inflight:
                return
            batch, self.frames = self.frames, []
            for frame in batch:
                self.deliver_frame(frame)
        raise AssertionError("the network did not settle")

    def propose(self, node_id: str, data: bytes) -> int | None:
        index = self.net.propose(node_id, data)
        self.pump()
        return index

    def leader(self) -> str | None:
        return self.net.leader()


# -- randomized schedules -------------------------------------------------------------------

SCHEDULE_VOTERS = {"w1": "west", "w2": "west", "e1": "east", "e2": "east", "e3": "east"}
SCHEDULE_HELPERS = {"o1": "east"}
SCHEDULE_SECRETARIES = {"s1": "east", "s2": "east", "s3": "west"}
#: Every third schedule: one secretary in east serving voters only, so that its hints settle
#: what it reports (the observer in west is served directly).
SETTLING_HELPERS = {"o1": "west"}
SETTLING_SECRETARIES = {"s1": "east"}


@dataclass
class RelayScheduleStats:
    seed: int
    steps: int = 0
    acked: int = 0
    relayed: int = 0
    takebacks: int = 0
    leaders: int = 0
    checks: int = 0
    settling: int = 0


def run_relay_schedule(seed: int, steps: int = 600, verbose: bool = False) -> RelayScheduleStats:
    """One randomized schedule of a secretary-relayed cluster; raises on any violation.

    Kernel messages and plugin frames are delivered in random order, lost and duplicated; the
    network is partitioned and healed; voters crash (some mid-Ready) and restart; secretaries
    crash, restart and are reported suspect, dead or alive by gossip, sometimes wrongly; logs
    are compacted (snapshots travel directly). At the end everything heals and the cluster must
    commit a final write on every node.
    """
    # Odd seeds hold commit notices for two steps' worth of time (commit_delay), even seeds
    # send them at once: both paths meet the same faults.
    settings = RelaySettings(reply_deadline=5 * TICK_S, rehire_after=5 * TICK_S, window=16,
                             commit_delay=0.02 if seed % 2 else 0.0)
    helpers, secretaries = ((SETTLING_HELPERS, SETTLING_SECRETARIES) if seed % 3 == 2
                            else (SCHEDULE_HELPERS, SCHEDULE_SECRETARIES))
    sim = RelaySim(SCHEDULE_VOTERS, secretaries, seed, helpers=helpers,
                   settings=settings, async_persist=True, election_tick=6, max_inflight=8)
    net, rng = sim.net, sim.net.rng
    st = RelayScheduleStats(seed)
    nodes = [*SCHEDULE_VOTERS, *helpers]
    everyone = [*nodes, *secretaries]
    down: set[str] = set()
    counter = 0
    net.campaign(rng.choice(list(SCHEDULE_VOTERS)))

    def note(what: str) -> None:
        if verbose:
            print(f"[{st.steps}] t={sim.now:.2f} {what}")

    for st.steps in range(1, steps + 1):
        r = rng.random()
        sim.now += 0.01
        if r < 0.50:
            if not sim.deliver_random():
                net.tick(rng.choice(nodes))
        elif r < 0.62:
            net.persist_random()
        elif r < 0.70:
            net.tick(rng.choice(nodes))
        elif r < 0.80:
            lead = sim.leader()
            counter += 1
            if lead is not None and sim.propose(lead, b"c%d" % counter) is not None:
                note(f"propose c{counter} at {lead}")
        elif r < 0.82 and (net.inflight or sim.frames):
            pool = net.inflight if (rng.random() < 0.5 and net.inflight) or not sim.frames \
                else sim.frames
            pool.pop(rng.randrange(len(pool)))
        elif r < 0.83 and (net.inflight or sim.frames):
            pool = net.inflight if (rng.random() < 0.5 and net.inflight) or not sim.frames \
                else sim.frames
            pool.append(rng.choice(pool))
        elif r < 0.845:
            ids = list(everyone)
            rng.shuffle(ids)
            k = rng.randrange(1, len(ids))
            net.partition(ids[:k], ids[k:])
            note(f"partition {ids[:k]} | {ids[k:]}")
        elif r < 0.88:
            net.heal()
            note("heal")
        elif r < 0.89:
            live = [n for n in nodes if n not in down]
            if live:
                v = rng.choice(live)
                sim.crash_voter(v, torn=rng.random() < 0.5)
                down.add(v)
                note(f"crash {v}")
        elif r < 0.91:
            if down:
                v = rng.choice(sorted(down))
                down.discard(v)
                sim.restart_voter(v)
                note(f"restart {v}")
        elif r < 0.93:
            s = rng.choice(list(secretaries))
            if sim.secretaries[s] is None:
                sim.restart_secretary(s)
                note(f"restart secretary {s}")
            else:
                sim.crash_secretary(s)
                note(f"crash secretary {s}")
        elif r < 0.95:
            s = rng.choice(list(secretaries))
            state = rng.choice(["suspect", "dead", "alive", "left"])
            sim.gossip(s, state)   # sometimes wrong: gossip is only a hint
            note(f"gossip {s} {state}")
        elif r < 0.96:
            n = rng.choice([n for n in nodes if n not in down] or nodes)
            if net.nodes[n].up and net.compact(n):
                note(f"compact {n}")
        elif r < 0.985:
            v = rng.choice(list(SCHEDULE_VOTERS))
            net.campaign(v)   # a leader change, as a transfer or an impatient voter causes
            note(f"campaign {v}")
        else:
            sim.advance(rng.choice([0.05, 0.2, 0.5]))   # time passes: deadlines expire
        sim.pump()

    # Liveness: heal, restart everything, and a final write must reach every node.
    net.heal()
    net.drop_rate = 0.0
    for v in sorted(down):
        sim.restart_voter(v)
    for s in secretaries:
        if sim.secretaries[s] is None:
            sim.restart_secretary(s)
        sim.gossip(s, "alive")
    final_index = None
    for _ in range(400):
        sim.tick_all()
        sim.stabilize()
        lead = sim.leader()
        if lead is None:
            continue
        if final_index is None:
            final_index = sim.propose(lead, b"final")
            continue
        raw = net.nodes[lead].raw
        if all(net.nodes[n].raw.applied_index == raw.commit_index for n in nodes) \
                and raw.commit_index >= final_index:
            break
    else:
        raise AssertionError(f"seed {seed}: the cluster did not converge after healing")
    states = {n: net.applied_commands(n) for n in nodes}
    ref = states[sim.leader()]
    for n, state in states.items():
        if state != ref:
            raise AssertionError(f"seed {seed}: {n} applied a different sequence")
    if b"final" not in ref:
        raise AssertionError(f"seed {seed}: the final write was not applied")
    st.acked = len(net.acked)
    st.relayed = sim.relayed_to_followers
    st.takebacks = len(sim.takebacks)
    st.leaders = len(net.checker.leaders)
    st.checks = net.checker.checks
    st.settling = sim.settling_batches
    return st


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Replay randomized secretary schedules.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    for seed in range(args.seed, args.seed + args.seeds):
        st = run_relay_schedule(seed, args.steps, args.verbose)
        print(st)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
