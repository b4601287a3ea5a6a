"""The Raft state machine: one ``step`` entry point, a step function per role, ``become_*``
transitions. No I/O, no clock (time is ``tick``), no randomness but the injected ``rng``.

Section numbers refer to the Raft paper (Ongaro & Ousterhout, 2014) unless they say
"dissertation" (Ongaro, 2014).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from bwcore.kernel.log import RaftLog
from bwcore.kernel.progress import (
    Progress,
    ProgressState,
    committed_index,
    has_quorum,
    vote_result,
)
from bwcore.kernel.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType as MT,
    ProposalDropped,
    ReadState,
    Snapshot,
    StateRole,
)

TRANSFER = b"transfer"  # context of a campaign started by TIMEOUT_NOW


class Rng(Protocol):
    """The randomness the kernel needs, injected (a ``random.Random`` will do)."""

    def randrange(self, stop: int) -> int: ...


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Tunables of one node's kernel.

    Attributes:
        id: this node's id.
        election_tick: ticks without a leader before campaigning; the actual timeout is drawn
            from [election_tick, 2 * election_tick) (§5.2 randomized timeouts).
        heartbeat_tick: ticks between leader heartbeats.
        pre_vote: run a pre-vote round first (dissertation §9.6) so that a partitioned node
            rejoining with a higher term does not depose a healthy leader.
        check_quorum: a leader that has not heard from a voter majority within an election
            timeout steps down, and followers ignore votes while they hear from a leader
            (dissertation §6.2 / §4.2.3).
        non_voting: this node is a helper (observer, secretary): it never campaigns and never
            grants a vote, whatever configuration it believes in.
        max_inflight: appends in flight per follower in the replicate state (flow control).
        max_append_bytes: soft cap on the entry bytes of one append.
        max_apply_entries: cap on committed entries handed out in one Ready.
    """

    id: str
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    non_voting: bool = False
    max_inflight: int = 256
    max_append_bytes: int = 1 << 20
    max_apply_entries: int = 4096


@dataclass(slots=True)
class _ReadRound:
    """One ReadIndex confirmation round: the requests it serves and who acknowledged it."""

    index: int
    requests: list[tuple[str, bytes]]
    acks: set[str]


class Raft:
    def __init__(self, cfg: KernelConfig, rng: Rng, hard_state: HardState,
                 snapshot: Snapshot | None, entries: list[Entry], bootstrap: ConfState) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.rng = rng
        snapshot = snapshot or Snapshot()
        if snapshot.meta.index == 0 and not entries and hard_state == HardState() \
                and bootstrap.voters:
            # A brand-new member of the initial configuration: the configuration is written
            # into the log as term-1 entries that every initial voter has identically (as
            # etcd-io/raft's Bootstrap), so nodes added later learn it by replication.
            entries = [Entry(1, i + 1, ConfChange(ConfChangeType.PROMOTE, v).encode(),
                             EntryType.CONF_CHANGE) for i, v in enumerate(sorted(bootstrap.voters))]
            hard_state = HardState(1, None, len(entries))
            self._bootstrapped = True
        else:
            self._bootstrapped = False
        self.log = RaftLog(snapshot, list(entries), hard_state.commit)
        if self._bootstrapped:
            self.log.stable = 0  # the bootstrap entries must be persisted by the first Ready
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.conf = snapshot.meta.conf
        for e in self.log.entries:
            if e.index > self.log.committed:
                break
            if e.type is EntryType.CONF_CHANGE:
                self.conf = ConfChange.decode(e.data).apply(self.conf)
        #: Index up to which committed configuration changes are reflected in ``conf``.
        self.conf_applied = self.log.committed

        self.helpers: set[str] = set()
        self.prs: dict[str, Progress] = {}
        self.votes: dict[str, bool] = {}
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.read_rounds: OrderedDict[bytes, _ReadRound] = OrderedDict()
        #: Read requests not yet sent out as a confirmation round (see flush_read_round).
        self.open_reads: list[tuple[str, bytes]] = []
        self.pending_reads: list[tuple[str, bytes]] = []  # until the leader's no-op commits
        self.read_seq = 0
        self.role = StateRole.FOLLOWER
        self.leader: str | None = None
        self.lead_transferee: str | None = None
        self.pending_conf_index = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = 0
        self.become_follower(self.term, None)

    # -- small helpers -------------------------------------------------------------------

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def promotable(self) -> bool:
        return not self.cfg.non_voting and self.id in self.conf.voters

    def send(self, m: Message) -> None:
        self.msgs.append(m)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = self.cfg.election_tick + self.rng.randrange(self.cfg.election_tick)
        self.votes = {}
        self.lead_transferee = None
        self.read_rounds.clear()
        self.open_reads = []
        self.pending_reads.clear()
        self.prs = {}

    def _replication_targets(self) -> list[str]:
        # Sorted: the kernel's output must not depend on string hashing (PYTHONHASHSEED).
        return sorted((self.conf.members() | self.helpers) - {self.id})

    # -- transitions ---------------------------------------------------------------------

    def become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role = StateRole.FOLLOWER
        self.leader = leader

    def become_pre_candidate(self) -> None:
        # A pre-candidate does not bump its term or change its vote (dissertation §9.6).
        self.role = StateRole.PRE_CANDIDATE
        self.votes = {}
        self.leader = None

    def become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = StateRole.CANDIDATE

    def become_leader(self) -> None:
        self._reset(self.term)
        self.role = StateRole.LEADER
        self.leader = self.id
        last = self.log.last_index()
        for p in self._replication_targets():
            self.prs[p] = Progress(last + 1, self.cfg.max_inflight)
        me = Progress(last + 1, self.cfg.max_inflight)
        me.match = self.log.stable
        me.become_replicate()
        self.prs[self.id] = me
        # Conservatively treat any configuration change in the log as pending (§4.1 of the
        # dissertation: one change at a time).
        self.pending_conf_index = last
        # A no-op of the new term: the leader may commit older entries only by committing one
        # of its own term (§5.4.2), and ReadIndex waits for it (§6.4).
        self.log.append([Entry(self.term, last + 1, b"")])

    # -- the inputs ------------------------------------------------------------------------

    def tick(self) -> None:
        if self.role is StateRole.LEADER:
            self._tick_leader()
            return
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self.randomized_timeout:
            self.election_elapsed = 0
            self.campaign(pre_vote=self.cfg.pre_vote)

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_tick:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                active = [v for v in self.conf.voters
                          if v == self.id or (v in self.prs and self.prs[v].recent_active)]
                for p in self.prs.values():
                    p.recent_active = False
                if not has_quorum(self.conf.voters, active):
                    self.become_follower(self.term, None)
                    return
            # A transfer that did not finish within an election timeout is abandoned (§3.10).
            self.lead_transferee = None
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self.bcast_heartbeat(b"")

    def campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self.become_pre_candidate()
            vote_type, term = MT.PRE_VOTE, self.term + 1
        else:
            self.become_candidate()
            vote_type, term = MT.VOTE, self.term
        self.votes[self.id] = True
        if self._poll() is True:
            self._won(pre_vote)
            return
        ctx = TRANSFER if transfer else b""
        li, lt = self.log.last_index(), self.log.last_term()
        for v in sorted(self.conf.voters):
            if v != self.id:
                self.send(Message(vote_type, v, self.id, term, log_term=lt, index=li, context=ctx))

    def _poll(self) -> bool | None:
        return vote_result(self.conf.voters, self.votes)

    def _won(self, pre_vote: bool) -> None:
        if pre_vote:
            self.campaign(pre_vote=False)
        else:
            self.become_leader()
            self.bcast_append()

    def step(self, m: Message) -> None:
        if m.term > self.term and m.term != 0:
            if m.type in (MT.VOTE, MT.PRE_VOTE):
                in_lease = (self.cfg.check_quorum and self.leader is not None
                            and self.election_elapsed < self.cfg.election_tick)
                if in_lease and m.context != TRANSFER:
                    # We heard from a leader recently: a disruptive candidate is ignored
                    # (dissertation §4.2.3), which also keeps a leader lease sound.
                    return
            if m.type is MT.PRE_VOTE or (m.type is MT.PRE_VOTE_RESP and not m.reject):
                pass  # a pre-vote never changes terms; a granted one carries the future term
            elif m.type in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, None)
        elif m.term < self.term and m.term != 0:
            if m.type in (MT.APPEND, MT.HEARTBEAT) and (self.cfg.check_quorum or self.cfg.pre_vote):
                # A deposed leader learns the new term from our answer and steps down.
                self.send(Message(MT.APPEND_RESP, m.frm, self.id, self.term))
            elif m.type is MT.PRE_VOTE:
                self.send(Message(MT.PRE_VOTE_RESP, m.frm, self.id, self.term, reject=True))
            return

        if m.type in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role is StateRole.LEADER:
            self._step_leader(m)
        elif self.role in (StateRole.CANDIDATE, StateRole.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        resp = MT.VOTE_RESP if m.type is MT.VOTE else MT.PRE_VOTE_RESP
        can_vote = (self.vote == m.frm
                    or (self.vote is None and self.leader is None)
                    or (m.type is MT.PRE_VOTE and m.term > self.term))
        # §5.2: one vote per term; §5.4.1: only for a log at least as up-to-date as ours.
        if can_vote and not self.cfg.non_voting and self.log.is_up_to_date(m.index, m.log_term):
            self.send(Message(resp, m.frm, self.id, m.term))
            if m.type is MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self.send(Message(resp, m.frm, self.id, self.term, reject=True))

    # -- follower --------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is MT.APPEND:
            self.election_elapsed = 0
            self.leader = m.frm
            self._handle_append(m)
        elif t is MT.HEARTBEAT:
            self.election_elapsed = 0
            self.leader = m.frm
            self._commit_to(min(m.commit, self.log.last_index()))
            self.send(Message(MT.HEARTBEAT_RESP, m.frm, self.id, self.term, context=m.context))
        elif t is MT.SNAPSHOT:
            self.election_elapsed = 0
            self.leader = m.frm
            self._handle_snapshot(m)
        elif t is MT.TIMEOUT_NOW:
            # Leadership transfer (dissertation §3.10): campaign at once, skipping pre-vote.
            if self.promotable():
                self.campaign(pre_vote=False, transfer=True)
        elif t is MT.READ_INDEX_RESP:
            if not m.reject:
                self.read_states.append(ReadState(m.index, m.context))

    def _handle_append(self, m: Message) -> None:
        if not _well_formed_append(m):
            return  # a buggy or hostile sender: never let it reach the log
        if m.index < self.log.committed:
            self.send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=self.log.committed))
            return
        before = self.log.committed
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            if self.log.committed != before:
                self._apply_conf_changes()
            self.send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=last_new))
            return
        # Fast backtracking (§5.3): tell the leader the last index at which our log could match
        # its log, and that entry's term, so it can skip a whole term per round trip.
        hint = self.log.find_conflict_by_term(min(m.index, self.log.last_index()), m.log_term)
        self.send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=m.index, reject=True,
                          reject_hint=hint, log_term=self.log.term(hint) or 0))

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is None:
            return
        meta = snap.meta
        if meta.index <= self.log.committed:
            self.send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=self.log.committed))
            return
        if self.log.match_term(meta.index, meta.term):
            # We already have the snapshot's last entry: only the commit index moves (§7). Our
            # entries after it are not known to match the leader's, so acknowledge no further.
            self._commit_to(meta.index)
        else:
            self.log.restore(snap)
            self.conf = meta.conf
            self.conf_applied = meta.index
        self.send(Message(MT.APPEND_RESP, m.frm, self.id, self.term, index=meta.index))

    # -- candidate -------------------------------------------------------------------------

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
            # §5.2: a candidate that hears from a leader of its term returns to follower.
            self.become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        expected = MT.PRE_VOTE_RESP if self.role is StateRole.PRE_CANDIDATE else MT.VOTE_RESP
        if t is not expected:
            return
        if m.frm in self.conf.voters:  # only voters' answers count (invariant 5)
            self.votes.setdefault(m.frm, not m.reject)
        result = self._poll()
        if result is True:
            self._won(self.role is StateRole.PRE_CANDIDATE)
        elif result is False:
            self.become_follower(self.term, None)

    # -- leader ----------------------------------------------------------------------------

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t is MT.READ_INDEX:
            self._read_index(m.frm, m.context)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if t is MT.APPEND_RESP:
            pr.recent_active = True
            self._handle_append_resp(m, pr)
        elif t is MT.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state is ProgressState.SNAPSHOT:
                # The follower is alive but has not acknowledged the snapshot for an election
                # timeout's worth of heartbeats: it was lost (the driver may also report it).
                pr.snapshot_waits += 1
                if pr.snapshot_waits >= self.cfg.election_tick:
                    pr.pending_snapshot = 0
                    pr.become_probe()
            if pr.state is ProgressState.REPLICATE and pr.is_paused():
                pr.free_first()
            if pr.match < self.log.last_index():
                self.send_append(m.frm)
            if m.context:
                self._read_ack(m.frm, m.context)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint = self.log.find_conflict_by_term(hint, m.log_term)
            if pr.maybe_decrease_to(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self.send_append(m.frm)
            return
        was_paused = pr.is_paused()
        if not pr.maybe_update(m.index):
            return
        committed = self.log.committed
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.free_to(m.index)
        # Only an acknowledgement past the commit index can move it.
        if m.index > committed and self.maybe_commit():
            self.bcast_append()
        elif was_paused:
            self.send_append(m.frm)
        if self.role is not StateRole.LEADER or m.frm not in self.prs:
            return  # the commit applied a configuration change that removed them, or us
        while self.send_append(m.frm, send_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self.send(Message(MT.TIMEOUT_NOW, m.frm, self.id, self.term))

    def send_append(self, to: str, send_empty: bool = True,
                    shared: dict[int, tuple[int | None, tuple[Entry, ...] | None]] | None = None
                    ) -> bool:
        pr = self.prs.get(to)
        if pr is None or pr.is_paused():
            return False
        prev = pr.next - 1
        found = shared.get(prev) if shared is not None else None
        if found is None:
            found = (self.log.term(prev),
                     self.log.slice(pr.next, self.log.last_index() + 1, self.cfg.max_append_bytes))
            if shared is not None:
                shared[prev] = found
        prev_term, ents = found
        if prev_term is None or ents is None:
            # What the follower needs was compacted away: send the snapshot (§7).
            snap = self.log.snapshot
            self.send(Message(MT.SNAPSHOT, to, self.id, self.term, snapshot=snap))
            pr.become_snapshot(snap.meta.index)
            return True
        if not ents and not send_empty:
            return False
        self.send(Message(MT.APPEND, to, self.id, self.term, log_term=prev_term, index=prev,
                          entries=ents, commit=self.log.committed))
        if ents:
            pr.sent_entries(ents[-1].index)
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def bcast_append(self) -> None:
        # Followers level with each other (the usual case) need the same slice of the log:
        # it is cut once per broadcast, and their messages share it.
        shared: dict[int, tuple[int | None, tuple[Entry, ...] | None]] = {}
        for p in self.prs:
            if p != self.id:
                self.send_append(p, shared=shared)

    def bcast_heartbeat(self, ctx: bytes) -> None:
        # A read-confirmation round needs only voters: a helper's acknowledgement never counts.
        voters = self.conf.voters
        for p, pr in self.prs.items():
            if p != self.id and (not ctx or p in voters):
                # Never tell a follower to commit past what it is known to hold.
                self.send(Message(MT.HEARTBEAT, p, self.id, self.term,
                                  commit=min(pr.match, self.log.committed), context=ctx))

    def maybe_commit(self) -> bool:
        match = {p: pr.match for p, pr in self.prs.items()}
        index = committed_index(self.conf.voters, match)
        # §5.4.2: only entries of the current term are committed by counting replicas.
        if index > self.log.committed and self.log.term(index) == self.term:
            self._commit_to(index)
            return True
        return False

    def _commit_to(self, index: int) -> None:
        first_in_term = (self.role is StateRole.LEADER
                         and self.log.term(self.log.committed) != self.term)
        if not self.log.commit_to(index):
            return
        self._apply_conf_changes()
        if first_in_term and self.role is StateRole.LEADER \
                and self.log.term(self.log.committed) == self.term:
            pending, self.pending_reads = self.pending_reads, []
            for frm, ctx in pending:
                self._read_index(frm, ctx)

    def _apply_conf_changes(self) -> None:
        """Configuration changes take effect when committed (one at a time, dissertation §4.1)."""
        while self.conf_applied < self.log.committed:
            changes = self.log.conf_changes_between(self.conf_applied, self.log.committed)
            if not changes:
                self.conf_applied = self.log.committed
                return
            # One at a time: switching may commit more (a smaller quorum), which re-enters.
            self.conf_applied = changes[0].index
            self._switch_conf(ConfChange.decode(changes[0].data).apply(self.conf))

    def _switch_conf(self, conf: ConfState) -> None:
        self.conf = conf
        if self.role is not StateRole.LEADER:
            return
        if self.id not in conf.voters:
            # A removed leader steps down once the change is committed (dissertation §4.2.2).
            self.become_follower(self.term, None)
            return
        last = self.log.last_index()
        targets = self._replication_targets()
        for p in list(self.prs):
            if p != self.id and p not in targets:
                del self.prs[p]
        for p in targets:
            if p not in self.prs:
                self.prs[p] = Progress(last + 1, self.cfg.max_inflight)
                self.send_append(p)
        if self.lead_transferee is not None and self.lead_transferee not in conf.voters:
            self.lead_transferee = None
        if self.maybe_commit():
            self.bcast_append()

    # -- ReadIndex (§6.4 of the dissertation) ----------------------------------------------

    def _read_index(self, frm: str, ctx: bytes) -> None:
        if self.log.term(self.log.committed) != self.term:
            # The commit index is only known to be current once this term's no-op committed.
            self.pending_reads.append((frm, ctx))
            return
        if len(self.conf.voters) == 1 and self.id in self.conf.voters:
            self._answer_read(frm, ctx, self.log.committed)
            return
        # Requests arriving before the driver next takes messages share one round.
        self.open_reads.append((frm, ctx))

    def flush_read_round(self) -> None:
        """Send the open read requests out as one confirmation round (called by RawNode when
        the driver takes messages). The round's index is the commit index now, after every
        request in it arrived, so each read covers every write acknowledged before it began."""
        if not self.open_reads or self.role is not StateRole.LEADER:
            self.open_reads = []
            return
        self.read_seq += 1
        round_id = b"r%d" % self.read_seq
        self.read_rounds[round_id] = _ReadRound(self.log.committed, self.open_reads, {self.id})
        self.open_reads = []
        self.bcast_heartbeat(round_id)

    def _read_ack(self, frm: str, round_id: bytes) -> None:
        rnd = self.read_rounds.get(round_id)
        if rnd is None:
            return
        rnd.acks.add(frm)
        if not has_quorum(self.conf.voters, rnd.acks):
            return
        # A quorum acknowledged a heartbeat sent after every earlier round began: they are all
        # confirmed too.
        while self.read_rounds:
            rid, r = self.read_rounds.popitem(last=False)
            for req_from, req_ctx in r.requests:
                self._answer_read(req_from, req_ctx, r.index)
            if rid == round_id:
                break

    def _answer_read(self, frm: str, ctx: bytes, index: int) -> None:
        if frm == self.id:
            self.read_states.append(ReadState(index, ctx))
        else:
            self.send(Message(MT.READ_INDEX_RESP, frm, self.id, self.term, index=index, context=ctx))

    # -- driver-facing operations ------------------------------------------------------------

    def propose(self, datas: list[bytes], etype: EntryType = EntryType.NORMAL) -> int:
        if self.role is not StateRole.LEADER:
            raise ProposalDropped("not the leader")
        if self.lead_transferee is not None:
            raise ProposalDropped("leadership transfer in progress")
        last, term = self.log.last_index(), self.term
        self.log.append([Entry(term, last + 1 + k, d, etype) for k, d in enumerate(datas)])
        # Single-voter clusters (and a leader ahead of its followers) commit once the leader's
        # own copy is durable: see RawNode.advance.
        self.bcast_append()
        return last + len(datas)

    def propose_conf_change(self, cc: ConfChange) -> int:
        if self.role is not StateRole.LEADER:
            raise ProposalDropped("not the leader")
        if self.pending_conf_index > self.log.committed:
            raise ProposalDropped("a configuration change is already in progress")
        if self.log.term(self.log.committed) != self.term:
            # The fix to single-server changes: commit an entry of this term first.
            raise ProposalDropped("the leader has not committed an entry in its term yet")
        if cc.type is ConfChangeType.PROMOTE and cc.node not in self.conf.learners:
            raise ProposalDropped(f"{cc.node} must be a learner before it is promoted")
        if cc.type is ConfChangeType.REMOVE and cc.node not in self.conf.members():
            raise ProposalDropped(f"{cc.node} is not a member")
        if cc.type is ConfChangeType.ADD_LEARNER and cc.node in self.conf.members():
            raise ProposalDropped(f"{cc.node} is already a member")
        index = self.propose([cc.encode()], EntryType.CONF_CHANGE)
        self.pending_conf_index = index
        return index

    def read_index(self, ctx: bytes) -> None:
        if self.role is StateRole.LEADER:
            self._read_index(self.id, ctx)
        elif self.leader is not None:
            self.send(Message(MT.READ_INDEX, self.leader, self.id, 0, context=ctx))
        else:
            raise ProposalDropped("no leader known")

    def transfer_leader(self, to: str) -> None:
        if self.role is not StateRole.LEADER:
            raise ProposalDropped("not the leader")
        if to == self.id or to not in self.conf.voters:
            raise ProposalDropped(f"cannot transfer leadership to {to!r}: not another voter")
        if self.lead_transferee == to:
            return
        self.lead_transferee = to
        self.election_elapsed = 0  # the transfer has one election timeout to succeed
        if self.prs[to].match == self.log.last_index():
            self.send(Message(MT.TIMEOUT_NOW, to, self.id, self.term))
        else:
            self.send_append(to)

    def add_helper(self, node: str) -> None:
        if node == self.id or node in self.helpers:
            return
        self.helpers.add(node)
        if self.role is StateRole.LEADER and node not in self.prs:
            self.prs[node] = Progress(self.log.last_index() + 1, self.cfg.max_inflight)
            self.send_append(node)

    def remove_helper(self, node: str) -> None:
        self.helpers.discard(node)
        if self.role is StateRole.LEADER and node not in self.conf.members():
            self.prs.pop(node, None)

    def report_unreachable(self, node: str) -> None:
        pr = self.prs.get(node)
        if self.role is StateRole.LEADER and pr is not None \
                and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot_failed(self, node: str) -> None:
        pr = self.prs.get(node)
        if self.role is StateRole.LEADER and pr is not None \
                and pr.state is ProgressState.SNAPSHOT:
            pr.pending_snapshot = 0
            pr.become_probe()

    def self_persisted(self) -> None:
        """Our own entries became durable up to ``log.stable``: count ourselves (§5.3)."""
        if self.role is StateRole.LEADER:
            me = self.prs.get(self.id)
            if me is not None and me.maybe_update(self.log.stable) and self.maybe_commit():
                self.bcast_append()


def _well_formed_append(m: Message) -> bool:
    """Entries follow ``m.index`` contiguously, with terms no older than the previous entry's
    and no newer than the sender's."""
    if m.index < 0 or m.commit < 0 or m.log_term < 0:
        return False
    prev_index, prev_term = m.index, m.log_term
    for e in m.entries:
        if e.index != prev_index + 1 or e.term < prev_term or e.term > m.term:
            return False
        prev_index, prev_term = e.index, e.term
    return True
