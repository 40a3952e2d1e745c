"""One simulated agent: a thin shell, like the daemon's, around the real core.

Real: `Election`, `classify_cluster` / `anchor_candidates` / `reference_membership`, `planner.decide` on the
anchor, `guards.verdict` in every ack (each agent from its own facts: its class timers, its history, its
escalations, its pause), `answer_ack` / `AckCollector` / `certificate_problems`, the step tables of
`playbooks`, and the executor's rules of `agent.core.execution`, which agent/actions.py calls too: which
unfinished action comes first (reports carry it whole), the target's answer to a step request (older term,
closed action, a REJOIN its own view does not call for, its position against its journal), "already finished",
the anchor's skip of steps a resumed action's target shows done, EVICT's re-check before remove and its verify
that does not wait for writes while another failed member remains, and the adoption of a held action.
Modelled: the minkms world (`world.py`), persistence (a `Disk` that survives crashes, memory that does not),
and the network.

The shell follows agent/actions.py step for step: facts built the same way, the anchor re-deciding every
round, certifying, then running the steps in table order with its lease checked before each, target steps
requested from the target, every step journaled (intent, then outcome, each a durable write with the daemon's
deadline) and idempotent. Destructive minkms commands go through `send_command`, agent/actions.py's `_command`:
the remove's plan is `fencing.remove_plan` against the membership read just before (the certified node id only),
then the fence immediately before the command leaves (`fencing.lease_refusal` with MIN_COMMAND_SECONDS, no
overdue durable write, the step's own precondition read again; a remote anchor's request: `execution.deposed`),
and again every FENCE_EVERY while it runs; a fenced command is not counted against its step's attempts. The
agent's own observation carries its age (`Obs`, `own_report`: the daemon's `verdict` and `node_report`), and a
step that awaited goes on with its drive as the daemon's `_advance` does. Where it differs from the daemon (time
compressed, replies as messages), docs/protocol.md says so ("What the simulator checks").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.core import backups, execution, fencing, guards, planner, playbooks
from agent.core import facts as cf
from agent.core.agreement import AckCollector, Held, answer_ack, certificate_problems, release
from agent.core.backups import BackupInfo
from agent.core.classify import Tracked, Verdict, held_for, track
from agent.core.election import Ballot, Election, ElectionView, quorum, refusal
from agent.core.execution import FINISH_STEP, RECENT_FINISHED
from agent.core.messages import (
    AckReply,
    AckRequest,
    Action,
    Certificate,
    NodeReport,
    Report,
    RestoreApproval,
    StepReply,
    StepRequest,
    VoteReply,
    VoteRequest,
)
from agent.core.model import NodeClass, NodeStatus
from agent.core.view import (
    Member,
    NodeView,
    PeerState,
    classify_cluster,
    electable,
    observed_at,
    reference_membership,
    stale_after,
    vouched,
)
from tests.sim.base import (
    CLUSTER,
    ELECTIONS,
    STEP_WAIT,
    BackupCopy,
    Command,
    StepAnswer,
    sim_sign,
    sim_verify,
)
from tests.sim.world import STATE, StepError

FENCE_EVERY = 0.2  # agent/io/minkms.py's: seconds between the fence's checks while a command runs

if TYPE_CHECKING:
    from tests.sim.sim import Simulation


@dataclass
class JEntry:
    """The journal of one action on one agent (the daemon's agent/io/journal.py, reduced)."""

    action: Action
    cert: Certificate
    started_wall: float
    done: list[str] = field(default_factory=list)
    intent: str | None = None  # a step begun and not yet journaled done or failed
    outcome: str | None = None  # "done", "failed", "aborted" once finished


@dataclass(frozen=True)
class HEntry:
    action: Action
    cert: Certificate
    outcome: str
    started_wall: float
    finished_wall: float


@dataclass(frozen=True)
class Share:
    """The anchor shares a finished action's history entry with every agent."""

    entry: HEntry


@dataclass(frozen=True)
class Recorded:
    """A peer's answer to a Share: it recorded the close, which counts toward its quorum."""

    action_id: str


@dataclass
class Copy:
    """A backup file in the agent's backup directory: `intact` is false once its bytes rotted (the catalogue
    entry, and so the report, still lists it: only a check of its sha256 tells)."""

    info: BackupInfo
    intact: bool = True


KEEP_BACKUPS = 4
"""Copies each agent keeps (retention drops the older ones, never the freshest)."""


@dataclass
class Disk:
    """What an agent fsynced: survives crashes."""

    ballot: Ballot = field(default_factory=Ballot)
    held: Held | None = None
    journal: dict[str, JEntry] = field(default_factory=dict)
    history: list[HEntry] = field(default_factory=list)
    escalated: set[str] = field(default_factory=set)
    acks: dict[str, float] = field(default_factory=dict)  # node -> wall time of the operator's `kmagent ack`
    pause_epoch: int = 0
    paused_until: float = 0.0
    max_cert_term: int = 0
    backups: dict[str, Copy] = field(default_factory=dict)  # backup id -> copy (on the host's disk)
    approval: RestoreApproval | None = None  # the newest operator restore approval known (persisted)
    superseded: list[str] = field(default_factory=list)  # actions dropped for a total loss (the newest ids)
    unmarked: bool = False  # agent/io/storage.py's note_unmarked: a REJOIN started it fresh, no marker since


@dataclass(frozen=True)
class Obs:
    """This agent's newest observation of its own node (agent/daemon.py's `observe`): when it was taken (agent
    clock), the verdict `classify_local` gave it, and what the local `minkms stat` said. While the storage probe
    hangs, no new one is taken until the probe's deadline (peer_timeout), then each round's says STALLED; an
    observation older than `stale_after` is STALLED (`view.vouched`), here and at every peer."""

    at: float
    verdict: Verdict
    members: tuple[tuple[int, str], ...]
    node_id: int | None


@dataclass(frozen=True)
class Outcome:
    """How a step ended. `ran` False: it did not run and is not counted against its attempts (agent/actions.py's
    NotRun): its destructive command was fenced, or the disk did not journal it within the deadline."""

    ok: bool
    detail: str
    ran: bool = True


@dataclass(frozen=True)
class Send:
    """A destructive minkms command a step is about to send (agent/actions.py's `_command`): fenced first."""

    step: str
    ids: tuple[int, ...] = ()
    backup: BackupInfo | None = None  # restore: the backup, and whether the local copy is intact
    intact: bool = True
    still: Callable[[], str | None] | None = None  # the step's own precondition, read again by the fence


Issuer = tuple[str, int] | None
"""Whose lease a command runs under: None for this agent's own; (anchor, certificate term) for a target step a
remote anchor requested (agent/actions.py's `issuer`)."""

Then = Callable[[Outcome], None]
"""What follows a step (never called when its agent crashed on the way)."""


@dataclass
class Drive:
    """The anchor's work on one action in one term (memory only)."""

    action: Action
    term: int
    collector: AckCollector
    resume: bool
    fresh: bool  # proposed with nothing unfinished in this anchor's view: dropped for a held action
    cert: Certificate | None = None
    holding: dict[str, Action] = field(default_factory=dict)  # refusers' different held actions, this round
    attempts: dict[str, int] = field(default_factory=dict)
    waiting: str | None = None  # the step awaiting a reply (or, for verify, its condition)
    sent: float = 0.0
    unanswered: dict[str, float] = field(default_factory=dict)  # step -> when the target first did not answer
    target_done: tuple[str, ...] = ()  # the target's journaled progress, as its replies report it
    progress_known: bool = False  # the target has replied in this drive


class SimAgent:
    def __init__(
        self, sim: Simulation, name: str, witness: bool, rate: float, offset: float, skew: float
    ) -> None:
        self.sim, self.name, self.witness = sim, name, witness
        self.rate, self.offset, self.skew = rate, offset, skew
        self.disk = Disk()
        self.alive = False
        self.incarnation = 0
        self.frozen_until = 0.0  # real time until which this agent's process is frozen (Simulation.freeze)
        self.frozen_since = 0.0
        self.disk_until = 0.0  # real time until which its disk does not answer (it survives a restart)
        self.disk_since = 0.0
        self.members = tuple(
            Member(n, None if sim.is_witness(n) else sim.world.nodes[n].host) for n in sim.cfg.names
        )
        self.election: Election
        self._reset()

    def _reset(self) -> None:
        self.reports: dict[str, tuple[Report, float]] = {}
        self.tracked: dict[str, Tracked] = {}
        self.views: tuple[NodeView, ...] = ()
        self.seq = 0
        self.drive: Drive | None = None
        self.own: NodeReport | None = None
        self.obs: Obs | None = None
        self.read_at = self.sim.t  # real time of the last reading of its storage that returned (the truth)
        self.own_tracked: Tracked | None = None  # agent/daemon.py's `tracked`: its own verdict, from `obs`
        self.probe_started: float | None = None  # agent clock: when the storage probe that hangs began
        self.stepping = False  # a step awaits a journal write or a command (the daemon's busy flag and lock)
        self.write_since: float | None = None  # real time the oldest durable write still outstanding began
        self.confirmed: dict[str, set[str]] = {}  # action id -> peers that answered its Share
        self.unconfirmed_noted: str | None = None

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t

    def wall(self) -> float:
        return 1_000_000.0 + self.sim.t + self.skew

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, t: float) -> None:
        cfg = self.sim.cfg
        self.alive = True
        self.incarnation += 1
        cls = ELECTIONS.get(cfg.broken or "", Election)
        self.election = cls(
            self.name, CLUSTER, cfg.names, cfg.timings, self.disk.ballot, self.clock(t), witness=self.witness
        )
        self._reset()
        self.observe(self.clock(t))  # the daemon classifies before it listens: facts always name every node
        when = t + self.sim.rng.uniform(0, cfg.probe) / self.rate
        self.sim.schedule_for(self.name, when, self.tick, self.incarnation)

    def crash(self) -> None:
        self.alive = False
        self.frozen_until = 0.0  # a frozen process is killed like any other; the next one starts afresh
        self.sim.deferred.pop(self.name, None)  # what waited for it dies with it (messages, timers)

    def frozen(self) -> bool:
        return self.frozen_until > self.sim.t

    # -- the disk (agent/io/durable.py's Writes: in order, each with a deadline) -----------------------------

    def disk_stalled(self) -> bool:
        return self.disk_until > self.sim.t

    def disk_deadline(self) -> float:
        """Writes' deadline, the lease (agent/coordination.py), in real seconds."""
        return self.sim.cfg.timings.lease / self.rate

    def disk_overdue(self) -> bool:
        """A durable write has been outstanding for longer than the deadline (`Writes.overdue`): the disk is
        stalled, and this agent must neither lead nor send a destructive command."""
        if not self.disk_stalled():
            self.write_since = None
            return False
        return self.write_since is not None and self.sim.t - self.write_since > self.disk_deadline()

    def _pending_write(self) -> None:
        if self.write_since is None or self.write_since < self.disk_since:  # none yet in this stall
            self.write_since = self.sim.t

    def quick_write(self, what: str) -> bool:
        """A vote or an ack's held action, fsynced before it is sent: refused while the disk is stalled (the
        daemon waits up to the deadline, then refuses; the sim refuses at once and drops the late write, which
        could only make a restarted agent more careful)."""
        if not self.disk_stalled():
            return True
        self._pending_write()
        self.sim.note(f"{self.name}: {what} not durable: the disk does not answer")
        return False

    def durable(self, what: str, then: Callable[[], None], stalled: Callable[[str], None]) -> None:
        """A journal write: done at once while the disk answers; during a disk stall it returns when the stall
        ends, or raises DiskStalled at the deadline if that comes first (the write itself lands later, and is not
        acted on). The agent's step waits meanwhile (`stepping`)."""
        if not self.disk_stalled():
            then()
            return
        self._pending_write()
        sim, inc = self.sim, self.incarnation
        self.stepping = True
        deadline = sim.t + self.disk_deadline()
        if self.disk_until <= deadline:
            sim.schedule_for(self.name, self.disk_until, self._resume, inc, then)
        else:
            why = f"{what}: the disk has not answered for {sim.cfg.timings.lease:g}s"
            sim.schedule_for(self.name, deadline, self._resume, inc, lambda: stalled(why))

    def _resume(self, incarnation: int, then: Callable[[], None]) -> None:
        if self.alive and incarnation == self.incarnation:
            self.sim.touched = self
            self.stepping = False
            then()

    # -- views and facts ---------------------------------------------------------------------------------------

    def _peers(self) -> dict[str, PeerState]:
        nodes = self.sim.world.nodes
        out = {}
        for n in self.sim.cfg.names:
            if n != self.name:
                entry = self.reports.get(n)
                live = nodes[n].live if n in nodes else None
                out[n] = PeerState(entry[0], entry[1], live) if entry else PeerState(None, None, live)
        return out

    def _reference(self, now: float, peers: dict[str, PeerState]) -> dict[int, str] | None:
        own = None
        if not self.witness:
            host = self.sim.world.nodes[self.name].host
            cls = self.own.cls if self.own is not None else ""  # the last round's, as the daemon's `own`
            members = self.obs.members if self.obs is not None else self.sim.world.local_members(self.name)
            own = NodeReport(cls, "", 0.0, host, members=members)
        return reference_membership(self.election.anchor_hint(now), self.name, own, peers)

    def take_observation(self, now: float, reference: dict[int, str] | None) -> None:
        """agent/daemon.py's observe + decide: the world's truth, in `classify_local`'s order, unless the storage
        probe hangs. Then the round waits for it up to its deadline (peer_timeout) and takes no observation; past
        the deadline each round's observation says STALLED (rule 0), the rest of it (minkms stat) fresh."""
        world, cfg = self.sim.world, self.sim.cfg
        if world.probe_hangs(self.name, self.sim.t):
            node = world.nodes[self.name]
            if self.probe_started is None and node.probe_blip and node.data == STATE:
                # the last probe to return misread the volume (issue 12: a blip), and the next one hangs
                node.probe_blip = False
                self.probe_started = now
                blip = Verdict(
                    NodeClass.STATE_LOST, "storage path is empty (a misread of a volume about to hang)"
                )
                self.obs = Obs(now, blip, world.local_members(self.name), world.members.get(self.name))
                self.own_tracked = track(self.own_tracked, blip, now, seen=now)
                self.read_at = self.sim.t
                return
            if self.probe_started is None:
                self.probe_started = now
            hung = now - self.probe_started
            if hung < cfg.peer_timeout or cfg.broken == "no-stall-age":  # TEST ONLY: waits for ever
                return
            verdict = Verdict(
                NodeClass.STALLED,
                f"the storage probe has not returned for {hung:.1f}s (deadline {cfg.peer_timeout:g}s): "
                "the volume does not answer",
            )
        else:
            self.probe_started = None
            pending = [(j.action, tuple(j.done)) for j in self.disk.journal.values() if j.outcome is None]
            # TEST ONLY (`no-adoption`): the agent before the unmarked note
            unmarked = self.disk.unmarked and cfg.broken != "no-adoption"
            awaiting = execution.awaiting_mark(self.name, pending) or unmarked
            verdict = world.own_verdict(self.name, reference, awaiting)
            self.read_at = self.sim.t
            if verdict.cls is NodeClass.HEALTHY and unmarked:
                self.adopt_marker(reference, [a for a, _ in pending])
        self.obs = Obs(now, verdict, world.local_members(self.name), world.members.get(self.name))
        self.own_tracked = track(self.own_tracked, verdict, now, seen=now)

    def adopt_marker(self, reference: dict[int, str] | None, pending: list[Action]) -> None:
        """agent/actions.py's adopt_marker: a REJOIN's late `add` made this node a member after the REJOIN closed
        without `mark` (seed 3492); it writes its marker outside any action (`execution.adoptable`)."""
        world = self.sim.world
        if self.stepping or not world.nodes[self.name].live:
            return
        host, local = world.nodes[self.name].host, world.local_members(self.name)
        own_id = dict((h, i) for i, h in local).get(host)
        status = None if own_id is None else NodeStatus(own_id, host, members=local)
        rejoin = any(a.kind == "REJOIN" and a.target == self.name for a in pending)
        if execution.adoptable(host, True, rejoin, status, reference or {}) is None:
            return
        world.mark(self.name)
        self.disk.unmarked = False
        self.sim.stats["markers_adopted"] += 1
        self.sim.note(f"{self.name} adopts its membership as node {own_id}: writes its marker")

    def stale(self) -> float:
        """agent/coordination.py's `stale_after`: how old an observation may be before it is STALLED."""
        cfg = self.sim.cfg
        return stale_after(cfg.peer_timeout, cfg.probe, cfg.command_timeout)

    def own_verdict(self, now: float) -> Verdict | None:
        """agent/daemon.py's `verdict`: STALLED once the observation behind it is older than `stale`."""
        if self.obs is None or self.own_tracked is None:
            return None
        if self.sim.cfg.broken == "no-stall-age":  # TEST ONLY: the last verdict, however old
            return self.own_tracked.verdict
        return vouched(self.own_tracked.verdict, now - self.obs.at, self.stale())

    def own_report(self, now: float) -> NodeReport | None:
        """agent/daemon.py's node_report: the vouched verdict, held up to the observation, and its age."""
        verdict = self.own_verdict(now)
        if self.witness or verdict is None or self.obs is None or self.own_tracked is None:
            return None
        if verdict.cls is NodeClass.STALLED and (self.own is None or self.own.cls != verdict.cls):
            self.sim.stats["stalled"] += 1
            self.sim.note(f"{self.name} reports STALLED: {verdict.reason}")
        if self.sim.cfg.broken == "no-stall-age":  # TEST ONLY: held as of now, no age
            held, age = held_for(dataclasses.replace(self.own_tracked, seen=None), now), None
        else:
            held, age = held_for(self.own_tracked, self.obs.at), max(0.0, now - self.obs.at)
        return NodeReport(
            verdict.cls.value,
            verdict.reason,
            held,
            self.sim.world.nodes[self.name].host,
            node_id=self.obs.node_id,
            commit=0,
            members=self.obs.members,
            observed_seconds=age,
        )

    def observe(self, now: float) -> None:
        peers = self._peers()
        reference = self._reference(now, peers)
        if not self.witness:
            self.take_observation(now, reference)
        own = self.own_report(now)
        self.views = classify_cluster(
            self.members, self.name, own, peers, reference, now, self.sim.cfg.peer_timeout, stale=self.stale()
        )
        ageless = self.sim.cfg.broken == "no-stall-age"
        for v in self.views:
            if v.verdict is not None:
                seen = None if ageless else observed_at(v, now)
                self.tracked[v.name] = track(self.tracked.get(v.name), v.verdict, now, seen)
        self.own = own

    def fresh_reports(self, now: float) -> list[Report]:
        return [r for r, at in self.reports.values() if now - at <= self.sim.cfg.peer_timeout]

    def facts(self, anchor: str | None, now: float) -> cf.ClusterFacts:
        """As agent/actions.py builds them: this agent's classes and timers, the anchor's membership, its
        journal, history, escalations and pause; the unfinished action chosen in view of the rest."""
        base = self._facts(anchor, now)
        return dataclasses.replace(base, unfinished=self._unfinished(lambda: base, now))

    def _facts(self, anchor: str | None, now: float) -> cf.ClusterFacts:
        cfg, world = self.sim.cfg, self.sim.world
        reference = self._reference(now, self._peers()) or {}
        hosts = {n: None if self.sim.is_witness(n) else world.nodes[n].host for n in cfg.node_names}
        nodes, removed = cf.node_facts(self.views, hosts, self.tracked, reference, now)
        wall = self.wall()
        d = self.disk
        return cf.ClusterFacts(
            me=self.name,
            anchor=anchor,
            term=self.election.term,
            nodes=nodes,
            unfinished=None,
            removed=removed,
            history=tuple(
                cf.HistoryEntry(e.action.target, e.action.kind, e.started_wall, e.outcome) for e in d.history
            ),
            finished=frozenset(self.finished()),
            escalated=frozenset(d.escalated),
            acked=tuple(sorted(d.acks.items())),
            paused_until=d.paused_until if wall < d.paused_until else 0.0,
            backups=self.holdings(now),
            approval=d.approval,
            now=now,
            wall_now=wall,
            timings=cfg.agent_timings,
            policy=self.sim.policy,
        )

    def reported_backups(self) -> tuple[BackupInfo, ...]:
        """The newest copies this agent holds (as its catalogue lists them: a rotted one too)."""
        return tuple(backups.newest_first(c.info for c in self.disk.backups.values())[: backups.REPORTED])

    def holdings(self, now: float) -> tuple[tuple[str, tuple[BackupInfo, ...]], ...]:
        """agent/actions.py's _holdings: our own copies, and what fresh peer reports say."""
        held = [(self.name, self.reported_backups())]
        held += [(r.sender, r.backups) for r in self.fresh_reports(now) if r.backups]
        return tuple(held)

    def unfinished(self) -> Action | None:
        now = self.clock(self.sim.t)
        return self._unfinished(lambda: self._facts(None, now), now)

    def _unfinished(self, base: Callable[[], cf.ClusterFacts], now: float) -> Action | None:
        """agent/actions.py's: held, journaled, or reported, never one a total loss superseded in this view."""
        d = self.disk
        return execution.unfinished_action(
            d.held.action if d.held is not None else None,
            [j.action for j in d.journal.values() if j.outcome is None],
            self.fresh_reports(now),
            self.finished(),
            skip=execution.superseded_in(self.views, base),
        )

    def remember_superseded(self, action_id: str) -> None:
        if action_id not in self.disk.superseded:
            self.disk.superseded = [*self.disk.superseded, action_id][-RECENT_FINISHED:]
            self.sim.stats["superseded"] += 1

    def supersede(self, now: float) -> None:
        """agent/actions.py's supersede, each round on every agent: an unfinished REJOIN or EVICT that a total loss
        superseded in this agent's view has its held ack released and its journal closed as aborted."""
        d = self.disk
        if not self.views or not execution.none_serves(self.views):
            return
        facts = self._facts(None, now)
        if d.held is not None and (why := execution.superseded(d.held.action, facts)):
            self.sim.checker.superseded(self, d.held.action)
            self.remember_superseded(d.held.action.id)
            self.sim.note(f"{self.name} releases {d.held.action.id}: {why}")
            d.held = release(d.held, d.held.action.id)
        for j in list(d.journal.values()):
            if j.outcome is None and (why := execution.superseded(j.action, facts)):
                self.sim.checker.superseded(self, j.action)
                self.remember_superseded(j.action.id)
                self.record_finished(j, "aborted")
                self.sim.note(f"{self.name} closes {j.action.id}: aborted ({why})")
                if self.drive is not None and self.drive.action.id == j.action.id:
                    self.drive = None

    def drop(self, action: Action, why: str) -> None:
        """agent/actions.py's _drop for `execution.dropped_by_target`: remembered, released, journal aborted."""
        self.sim.checker.dropped_by_target(self, action)
        self.remember_superseded(action.id)
        d = self.disk
        d.held = release(d.held, action.id)
        j = d.journal.get(action.id)
        if j is not None and j.outcome is None:
            self.record_finished(j, "aborted")
        if self.drive is not None and self.drive.action.id == action.id:
            self.drive = None
        self.sim.note(f"{self.name} drops {action.id}: {why}")

    def finished_ids(self) -> tuple[str, ...]:
        history = [e.action.id for e in self.disk.history[-RECENT_FINISHED:]]
        return execution.finished_ids(history, self.disk.superseded)

    def finished(self) -> set[str]:
        """agent/actions.py's _InHistory: the ids in this agent's history, and those it dropped as superseded."""
        return {e.action.id for e in self.disk.history} | set(self.disk.superseded)

    # -- events ----------------------------------------------------------------------------------------------

    def tick(self, incarnation: int) -> None:
        if not self.alive or incarnation != self.incarnation:
            return
        sim = self.sim
        sim.touched = self
        now = self.clock(sim.t)
        self.observe(now)
        self.supersede(now)
        restarting = {r.sender for r in self.fresh_reports(now) if r.restarting}
        eligible = electable(self.views, restarting, self.unfinished())
        if self.disk_overdue():  # it cannot journal: it must not lead (an anchor steps down, stops renewing)
            eligible = tuple(e for e in eligible if e != self.name)
        view = ElectionView.from_reports(eligible, self.fresh_reports(now))
        out = self.election.tick(now, view, sim.rng.random())
        if out is not None:
            if out.ballot is not None and not self.persist_ballot(out.ballot):
                self.election.persist_failed()
            else:
                sim.note(f"{self.name} sends {out.request}")
                self.broadcast(out.request)
        if not self.election.is_anchor(now):
            self.drive = None
        elif not self.stepping:  # agent/actions.py's drive_once: nothing new while a step awaits
            self.anchor_work(now)
        if self.alive:
            self.send_report(now)
            sim.schedule_for(self.name, sim.t + sim.cfg.probe / self.rate, self.tick, incarnation)

    def persist_ballot(self, ballot: Ballot) -> bool:
        if not self.quick_write("ballot"):
            return False
        if self.sim.faulty and self.sim.rng.random() < self.sim.cfg.persist_fail:
            self.sim.note(f"{self.name} fsync of {ballot} failed")
            return False
        if self.sim.cfg.broken != "skip-fsync":
            self.disk.ballot = ballot
        return True

    def send_report(self, now: float) -> None:
        self.seq += 1
        e, d = self.election, self.disk
        unfinished = self.unfinished()
        report = Report(
            CLUSTER,
            self.name,
            self.seq,
            f"boot{self.incarnation}",
            e.term,
            e.anchor_hint(now),
            e.lease_remaining(now) if e.is_anchor(now) else None,
            self.own,
            unfinished.id if unfinished else None,
            unfinished,
            restarting=e.restarting(now),
            pause_epoch=d.pause_epoch,
            paused_until=d.paused_until,
            finished=self.finished_ids(),
            backups=self.reported_backups(),
            restore=d.approval,
        )
        self.broadcast(report)

    def broadcast(self, msg: object) -> None:
        for other in self.sim.cfg.names:
            if other != self.name:
                self.sim.send(self.name, other, msg)

    def send_to(self, dst: str, msg: object) -> None:
        if dst == self.name:
            self.receive(self.name, msg)
        else:
            self.sim.send(self.name, dst, msg)

    def receive(self, src: str, msg: object) -> None:
        now = self.clock(self.sim.t)
        if isinstance(msg, Report):
            old = self.reports.get(src)
            if old is None or old[0].boot != msg.boot or old[0].seq < msg.seq:
                self.reports[src] = (msg, now)
            self.on_peer_finished(msg.finished)
            if msg.pause_epoch > self.disk.pause_epoch:
                self.disk.pause_epoch, self.disk.paused_until = msg.pause_epoch, msg.paused_until
            mine = self.disk.approval
            if msg.restore is not None and msg.restore.epoch > (mine.epoch if mine else 0):
                self.disk.approval = msg.restore  # newest epoch wins, as agent/coordination.py does
        elif isinstance(msg, BackupCopy):
            self.keep_copy(msg.info, msg.intact)
        elif isinstance(msg, VoteRequest):
            self.on_vote_request(msg, now)
        elif isinstance(msg, VoteReply):
            self.election.on_vote_reply(msg, now)
        elif isinstance(msg, AckRequest):
            if msg.anchor == src:
                self.send_to(src, self.answer(msg, now))
        elif isinstance(msg, AckReply):
            self.on_ack_reply(src, msg, now)
        elif isinstance(msg, StepRequest):
            self.on_step_request(src, msg)
        elif isinstance(msg, StepAnswer):
            self.on_step_answer(msg, now)
        elif isinstance(msg, Share):
            if self.on_share(msg.entry):
                self.send_to(src, Recorded(msg.entry.action.id))
        elif isinstance(msg, Recorded):
            self.confirmed.setdefault(msg.action_id, set()).add(src)

    def keep_copy(self, info: BackupInfo, intact: bool) -> None:
        """A pushed copy, checked on arrival (a damaged transfer is not kept), then retention."""
        if not intact or info.id in self.disk.backups:
            return
        self.disk.backups[info.id] = Copy(info)
        for old in backups.to_drop([c.info for c in self.disk.backups.values()], KEEP_BACKUPS):
            del self.disk.backups[old.id]

    def on_vote_request(self, req: VoteRequest, now: float) -> None:
        eligible = req.candidate in electable(self.views, unfinished=self.unfinished())
        reply, ballot = self.election.on_vote_request(req, now, eligible)
        if ballot is not None and not self.persist_ballot(ballot):
            self.election.persist_failed()
            reply = refusal(reply, "could not persist the vote")
        if reply.granted:
            self.sim.checker.vote_sent(self, reply, req)
        self.send_to(req.candidate, reply)

    # -- every agent: acks -------------------------------------------------------------------------------------

    def answer(self, req: AckRequest, now: float) -> AckReply:
        facts = self.facts(req.anchor, now)
        reply, held = answer_ack(
            req,
            cluster=CLUSTER,
            ballot=self.election.ballot,
            verdict=guards.verdict(req.action, facts),
            held=self.disk.held,
            sign=sim_sign(self.name),
        )
        if held is not None:
            if not self.quick_write("held ack") or (
                self.sim.faulty and self.sim.rng.random() < self.sim.cfg.persist_fail
            ):
                return AckReply(False, "could not persist the ack")
            self.disk.held = held
        if reply.granted:
            self.sim.checker.ack_given(self, req.action, facts, guards.is_resume(req.action, facts))
        return reply

    # -- the anchor ------------------------------------------------------------------------------------------

    def anchor_work(self, now: float) -> None:
        """One round of agent/actions.py's drive_once: decide, certify, run the next steps."""
        facts = self.facts(self.name, now)
        own = facts.node(self.name)
        own_class = own.verdict.cls if own is not None and own.verdict is not None else None
        if facts.unfinished is not None and (
            why := execution.dropped_by_target(facts.unfinished, self.name, own_class)
        ):
            self.drop(facts.unfinished, why)
            return
        mine = self.disk.journal.get(facts.unfinished.id) if facts.unfinished is not None else None
        remaining = (
            execution.target_closes(facts.unfinished, self.name, mine.done, own_class)
            if mine is not None
            else None
        )
        if mine is not None and remaining is not None:
            self.close_own(mine.cert, remaining)
            return
        if facts.unfinished is None and self.close_unconfirmed(now):
            self.drive = None
            return
        decision = planner.decide(facts)
        for node in decision.escalate:
            if node not in self.disk.escalated:
                self.sim.checker.escalated(self, node, facts)
                self.disk.escalated.add(node)
                self.sim.stats["escalations"] += 1
                self.sim.note(f"{self.name} escalates {node}: budget used")
        action = decision.action
        if action is None:
            self.drive = None
            return
        term = self.election.ballot.term
        d = self.drive
        if d is None or d.action.id != action.id or d.term != term:
            self.sim.checker.proposed(self, action, facts)
            collector = AckCollector(CLUSTER, term, action, self.sim.cfg.names, sim_verify)
            resume = guards.is_resume(action, facts)
            d = self.drive = Drive(action, term, collector, resume, fresh=facts.unfinished is None)
            self.sim.stats["proposals"] += 1
            self.sim.note(f"{self.name} proposes {action.id} in term {term}: {decision.reason}")
        if d.cert is None:
            self.certify(d, now)
        else:
            self.advance(d, now)

    def close_own(self, cert: Certificate, remaining: tuple[str, ...]) -> None:
        """`execution.target_closes`: the own steps still to run (a trailing mark at most), then close, done."""
        if remaining:
            self.target_step(
                cert, remaining[0], lambda out: self.close_own(cert, remaining[1:]) if out.ok else None
            )  # refused, or not run: tried again next round
            return
        self.sim.stats["self_closed"] += 1
        self.close_action(cert, "done", "closed by its target, anchor now: its own steps all done")

    def certify(self, d: Drive, now: float) -> None:
        """agent/actions.py's _certify, one round: the replies of the last round have arrived (or never will);
        a proposal refused by holders of a different action gives way to it (`execution.to_adopt`)."""
        adopt = execution.to_adopt(
            d.fresh, d.cert is not None, d.holding, self.finished(), quorum(self.sim.cfg.agents)
        )
        if adopt is not None:
            self.disk.held = Held(adopt, d.term)
            self.drive = None
            self.sim.stats["adoptions"] += 1
            self.sim.note(f"{self.name} adopts {adopt.id}, dropping {d.action.id}")
            return
        d.holding = {}
        req = AckRequest(CLUSTER, d.term, self.name, d.action)
        if self.name not in d.collector.signers:
            own = self.answer(req, now)
            if not own.granted or own.ack is None:
                return
            d.collector.add(own.ack)
            if self.try_certify(d, now):
                return
        for other in self.sim.cfg.names:
            if other != self.name and other not in d.collector.signers:
                self.sim.send(self.name, other, req)

    def on_ack_reply(self, src: str, reply: AckReply, now: float) -> None:
        d = self.drive
        if d is None or d.cert is not None or not self.election.is_anchor(now):
            return
        if reply.granted and reply.ack is not None:
            if d.collector.add(reply.ack) is None:
                self.try_certify(d, now)
        elif reply.holding is not None and reply.holding.id != d.action.id:
            d.holding[src] = reply.holding

    def try_certify(self, d: Drive, now: float) -> bool:
        cert = d.collector.certificate()
        if cert is None or d.cert is not None:
            return False
        d.cert = cert
        self.sim.checker.certified(self, cert, d.resume)
        self.sim.note(f"{self.name} certified {cert.action.id} in term {cert.term}")
        self.advance(d, now)
        return True

    def advance(self, d: Drive, now: float, resumed: bool = False) -> None:
        """agent/actions.py's _advance: the steps in order, the lease checked before each. `resumed`: after a step
        that awaited (a journal write, a command), the daemon's loop goes on with its drive whatever happened to
        the anchor's drive meanwhile, as long as it holds a lease."""
        cert = d.cert
        assert cert is not None
        action = cert.action
        for step in playbooks.steps(action.kind):
            if not self.alive or self.stepping or (self.drive is not d and not resumed):
                return
            if not self.election.is_anchor(self.clock(self.sim.t)):
                self.sim.note(f"{self.name} lost its lease before {step.name} of {action.id}")
                return
            j = self.disk.journal.get(action.id)
            done_here = j is not None and step.name in j.done
            if done_here and not execution.ask_progress(action, step, self.name, d.progress_known):
                continue
            if step.runs_on == "target" and action.target != self.name:
                self.request_step(d, step, now)
                return
            if step.runs_on == "target":  # a RESTORE runs on its anchor: the same checks as a peer's request
                self.target_step(cert, step.name, functools.partial(self.after_step, d, step))
                return
            else:
                later = execution.done_after(action.kind, step.name, d.target_done)
                if later is not None and self.sim.cfg.broken != "rerun-anchor-steps":
                    self.mirror(cert, step.name)  # done before this anchor: the target has done `later`
                    continue
                if step.name == "verify" and not self.verified(action):
                    if d.waiting != "verify":
                        d.waiting, d.sent = "verify", now
                    if now - d.sent < 3 * STEP_WAIT * self.sim.cfg.probe:
                        return
                    d.waiting = None
                run = functools.partial(self.run_anchor_step, action, step.name)
                self.journaled(cert, step, run, functools.partial(self.after_step, d, step))
                return
        self.close(d, "done", "every step done")

    def after_step(self, d: Drive, step: playbooks.Step, out: Outcome) -> None:
        """A step of the drive ended: a failure counts against its attempts, one that did not run does not (again
        next round); else the drive goes on with the next step."""
        if not out.ran:
            self.sim.note(f"{self.name}: {step.name} of {d.action.id} held back: {out.detail}")
            return
        if not out.ok:
            self.failed(d, step, out.detail)
            return
        self.advance(d, self.clock(self.sim.t), resumed=True)

    def request_step(self, d: Drive, step: playbooks.Step, now: float) -> None:
        """Ask the target for `step`. A reply is awaited for STEP_WAIT probe periods (the daemon's HTTP timeout,
        compressed); a target that stays silent is asked again, and its silence counts as a failed attempt only
        once the step's own timeout has passed (agent/actions.py's _target_silent: its agent may be restarting)."""
        assert d.cert is not None
        if d.waiting == step.name and now - d.sent < STEP_WAIT * self.sim.cfg.probe:
            return
        if d.waiting == step.name:
            d.waiting = None
            since = d.unanswered.setdefault(step.name, d.sent)
            if now - since >= step.timeout:
                d.unanswered.pop(step.name)
                self.failed(d, step, "no answer within the step's timeout")
                return
        d.waiting, d.sent = step.name, now
        self.sim.send(self.name, d.action.target, StepRequest(d.cert, step.name))

    def verified(self, action: Action) -> bool:
        """The verify step's condition, as agent/actions.py's: a REJOIN's target HEALTHY in the anchor's view,
        then writes, unless an EVICT leaves another failed member behind (`execution.writes_wait_for`)."""
        if action.kind == "REJOIN":
            view = next((v for v in self.views if v.name == action.target), None)
            if not (view and view.verdict and view.verdict.cls is NodeClass.HEALTHY):
                return False
        return bool(execution.writes_wait_for(action, self.views)) or self.sim.world.writable()

    def class_of(self, name: str) -> NodeClass | None:
        view = next((v for v in self.views if v.name == name), None)
        return view.verdict.cls if view is not None and view.verdict is not None else None

    def run_anchor_step(self, action: Action, step: str) -> str | Send:
        world = self.sim.world
        host = world.nodes[action.target].host
        if step == "remove":  # agent/actions.py's check_remove: membership first, then the EVICT's re-check
            membership = world.member_ids()  # `minkms stat` on the anchor, now
            if self.sim.cfg.broken == "remove-by-current-id":  # TEST ONLY: today's remove, by the host's id
                ids = tuple(nid for nid, h in membership.items() if h == host)
                plan = fencing.RemovePlan(
                    ids, f"remove node {ids} ({host})" if ids else f"{host} is not a member"
                )
            else:
                plan = fencing.remove_plan(action, host, membership)
            if not plan.ids:
                return plan.detail
            refusal = execution.evict_remove_refusal(action, self.class_of(action.target))
            if refusal is not None:
                raise StepError(refusal)
            # the target's class again at the last instant (agent/actions.py's `still`)
            return Send(
                "remove",
                plan.ids,
                still=lambda: execution.evict_remove_refusal(action, self.class_of(action.target)),
            )
        if step == "add":
            if host in world.member_ids().values():
                return f"{host} is already a member"
            return Send("add")
        if step == "verify":
            if not self.verified(action):
                raise StepError("timed out waiting for the target to be HEALTHY and writes to work")
            return "verified"
        raise StepError(f"{step} is not a step of the anchor")

    def on_step_answer(self, ans: StepAnswer, now: float) -> None:
        d = self.drive
        if d is None or d.cert is None or d.action.id != ans.action_id or ans.step == FINISH_STEP:
            return
        if d.waiting != ans.step:
            return
        d.waiting = None
        if (
            ans.reply.not_run
        ):  # fenced, not journaled in time, or this anchor is deposed there: not an attempt
            self.sim.note(
                f"{self.name}: {ans.step} of {d.action.id} held back by its target: {ans.reply.detail}"
            )
            return
        d.unanswered.pop(ans.step, None)
        d.target_done = ans.reply.progress or d.target_done
        d.progress_known = True
        if execution.already_finished(ans.reply):
            self.close(d, "done", f"{ans.step}: the target had closed it already")
            return
        step = next(s for s in playbooks.steps(d.action.kind) if s.name == ans.step)
        if ans.reply.ok:
            self.mirror(d.cert, ans.step)
            if self.election.is_anchor(now):
                self.advance(d, now)
        else:
            self.failed(d, step, ans.reply.detail)

    def mirror(self, cert: Certificate, step: str) -> None:
        """Record a step done elsewhere in this agent's journal, so that a resumed drive skips it."""
        j = self.disk.journal.setdefault(cert.action.id, JEntry(cert.action, cert, self.wall()))
        if step not in j.done:
            j.done.append(step)

    def failed(self, d: Drive, step: playbooks.Step, detail: str) -> None:
        attempts = d.attempts[step.name] = d.attempts.get(step.name, 0) + 1
        self.sim.note(
            f"{self.name}: {step.name} of {d.action.id} failed ({attempts}/{step.attempts}): {detail}"
        )
        if attempts < step.attempts:
            return
        self.close(d, "aborted" if step.on_failure == "abort" else "failed", f"{step.name}: {detail}")
        if step.on_failure == "escalate":
            self.disk.escalated.add(d.action.target)
            self.sim.stats["escalations"] += 1

    def close(self, d: Drive, outcome: str, detail: str) -> None:
        assert d.cert is not None
        self.close_action(d.cert, outcome, detail)

    def close_action(self, cert: Certificate, outcome: str, detail: str) -> None:
        """agent/actions.py's _close: history, journal, the target told to close its side, the entry shared."""
        action = cert.action
        j = self.disk.journal.setdefault(action.id, JEntry(action, cert, self.wall()))
        entry = self.record_finished(j, outcome)
        self.sim.stats[outcome] += 1
        self.sim.note(f"{self.name} closes {action.id}: {outcome} ({detail})")
        if action.target != self.name:
            self.sim.send(self.name, action.target, StepRequest(cert, FINISH_STEP))
        self.broadcast(Share(entry))
        self.drive = None

    def record_finished(self, j: JEntry, outcome: str) -> HEntry:
        """agent/io/journal.py's close_action: the history entry (once), then the journal's finish; the held
        ack is released."""
        j.outcome, j.intent = outcome, None
        entry = next((e for e in self.disk.history if e.action.id == j.action.id), None)
        if entry is None:
            entry = HEntry(j.action, j.cert, outcome, j.started_wall, self.wall())
            self.disk.history.append(entry)
        self.disk.held = release(self.disk.held, j.action.id)
        self.sim.checker.finished(self, j.action.id)
        return entry

    def on_share(self, entry: HEntry) -> bool:
        """agent/actions.py's on_history; True: recorded (the answer counts toward the close's quorum)."""
        problems = certificate_problems(
            entry.cert, CLUSTER, self.sim.cfg.names, quorum(self.sim.cfg.agents), sim_verify
        )
        if problems or entry.cert.action != entry.action:
            return False
        if all(e.action.id != entry.action.id for e in self.disk.history):
            self.disk.history.append(entry)
            self.sim.checker.finished(self, entry.action.id)
        self.on_peer_finished((entry.action.id,))
        return True

    def close_unconfirmed(self, now: float) -> bool:
        """agent/actions.py's _close_unconfirmed: share the newest close again while fewer than a quorum recorded
        it; True: nothing new is proposed meanwhile."""
        if not self.disk.history:
            return False
        entry = self.disk.history[-1]
        missing = execution.close_unconfirmed(
            entry.action.id,
            self.name,
            self.sim.cfg.names,
            self.fresh_reports(now),
            self.confirmed.get(entry.action.id, set()),
        )
        if not missing:
            return False
        if self.unconfirmed_noted != entry.action.id:
            self.unconfirmed_noted = entry.action.id
            self.sim.stats["unconfirmed_closes"] += 1
            self.sim.note(
                f"{self.name} waits for a quorum to record {entry.action.id}: shares it with {missing}"
            )
        for name in missing:
            self.send_to(name, Share(entry))
        return True

    def on_peer_finished(self, finished: tuple[str, ...]) -> None:
        """agent/actions.py's on_peer_finished: release the held ack, close our journal of those actions (a
        target whose finish request was lost), except the one this agent drives."""
        d = self.disk
        if d.held is not None and d.held.action.id in finished:
            d.held = release(d.held, d.held.action.id)
        for j in list(d.journal.values()):
            driving = self.drive is not None and self.drive.action.id == j.action.id
            if j.action.id in finished and j.outcome is None and not driving:
                self.record_finished(j, "done")

    # -- the target ----------------------------------------------------------------------------------------

    def on_step_request(self, src: str, req: StepRequest) -> None:
        cert, action = req.certificate, req.certificate.action
        problems = certificate_problems(
            cert, CLUSTER, self.sim.cfg.names, quorum(self.sim.cfg.agents), sim_verify
        )
        if problems or action.target != self.name:
            self.send_to(src, StepAnswer(action.id, req.step, StepReply(False, "certificate refused")))
            return
        if self.stepping:
            return  # a step of its own holds the lock: the request waits, and times out (the anchor asks again)
        now = self.clock(self.sim.t)
        deposed = execution.deposed(src, cert.term, self.election.anchor_hint(now), self.election.term)
        if deposed is not None:
            self.send_to(src, StepAnswer(action.id, req.step, StepReply(False, deposed, not_run=True)))
            return

        def answer(out: Outcome) -> None:
            j = self.disk.journal.get(action.id)
            progress = tuple(j.done) if j is not None else ()
            reply = StepReply(out.ok, out.detail, progress, not_run=not out.ran)
            self.send_to(src, StepAnswer(action.id, req.step, reply))

        self.target_step(cert, req.step, answer, (src, cert.term))

    def target_step(self, cert: Certificate, step_name: str, then: Then, issuer: Issuer = None) -> None:
        """agent/actions.py's _target_step; `then` gets how it ended (never, if this agent crashed on the way).
        A step that did not run (fenced, or not journaled in time) is answered as a failure to a peer, as the
        daemon's step handler does."""
        action, d = cert.action, self.disk
        j = d.journal.get(action.id)
        done = tuple(j.done) if j is not None else ()
        if step_name == FINISH_STEP and cert.term >= d.max_cert_term:
            if j is not None and j.outcome is None:
                self.record_finished(j, "done")
            d.held = release(d.held, action.id)
            then(Outcome(True, "finished"))
            return
        mine = self.own_verdict(self.clock(self.sim.t))  # STALLED once its observation is old: never run
        decision = execution.target_decision(
            action,
            step_name,
            cert_term=cert.term,
            max_cert_term=d.max_cert_term,
            begun=j is not None,
            finished=j is not None and j.outcome is not None,
            done=done,
            own_class=mine.cls if mine is not None else None,
        )
        if not decision.run:
            then(Outcome(decision.ok, decision.detail))
            return
        d.max_cert_term = max(d.max_cert_term, cert.term)
        step = next(s for s in playbooks.steps(action.kind) if s.name == step_name)
        self.journaled(cert, step, lambda: self.run_target_step(action, step_name), then, issuer)

    def run_target_step(self, action: Action, step: str) -> str | Send:
        world, me = self.sim.world, self.name
        restoring = action.kind == "RESTORE"
        run: dict[str, Callable[[], str | Send]] = {
            "fence": lambda: world.fence(me),
            "quarantine": lambda: world.quarantine(me, self.sim.t),
            "start": lambda: self.start_fresh(action),
            "mark": lambda: self.mark(),
            "fetch": lambda: self.fetch(self.backup_of(action)),
            "restore": lambda: self.restore(self.backup_of(action)),
            "verify": lambda: self.verify_restored(self.backup_of(action)),
        }
        if step not in run or (step in ("fetch", "restore", "verify") and not restoring):
            raise StepError(f"{step} is not a step of the target")
        return run[step]()

    def start_fresh(self, action: Action) -> str:
        if action.kind == "REJOIN":  # before minkms starts fresh, as agent/actions.py writes its note
            self.disk.unmarked = True
        return self.sim.world.start(self.name, action.kind == "RESTORE")

    def mark(self) -> str:
        done = self.sim.world.mark(self.name)
        self.disk.unmarked = False
        return done

    # -- RESTORE on the target (agent/actions.py's _backup_of, _fetch, _restore and RESTORE's verify) ----------

    def backup_of(self, action: Action) -> BackupInfo:
        """The catalogue entry of the backup a RESTORE names (id, sha256 and commit are signed into it)."""
        params = dict(action.params)
        want = (params.get("backup"), params.get("sha256"), params.get("commit"))
        for _, held in self.holdings(self.clock(self.sim.t)):
            for b in held:
                if (b.id, b.sha256, str(b.commit)) == want:
                    return b
        raise StepError(f"{action.id} names backup {want[0]!r}, which no fresh agent reports holding")

    def fetch(self, want: BackupInfo) -> str:
        """An intact local copy, else a download from a holder (sha256 checked, kept only when intact). The
        download is instantaneous here; the holder must be up and reachable."""
        mine = self.disk.backups.get(want.id)
        if (
            mine is not None
            and mine.info == want
            and (mine.intact or self.sim.cfg.broken == "no-fetch-check")
        ):
            return f"local copy of {want.id} is intact"
        errors = []
        for name, held in self.holdings(self.clock(self.sim.t)):
            peer = self.sim.agents[name]
            if name == self.name or want not in held:
                continue
            if not peer.alive or not self.sim.connected(self.name, name):
                errors.append(f"{name}: unreachable")
                continue
            copy = peer.disk.backups.get(want.id)
            if copy is None or copy.info != want or not copy.intact:
                errors.append(f"{name}: sha256 mismatch")
                continue
            self.disk.backups[want.id] = Copy(want)
            return f"fetched {want.id} from {name} (sha256 checked)"
        raise StepError(f"no intact copy of {want.id} could be had: " + ("; ".join(errors) or "no holder"))

    def restore(self, want: BackupInfo) -> str | Send:
        """`minkms restore` of the local copy (its effect when it lands: `Simulation.land`)."""
        copy = self.disk.backups.get(want.id)
        if copy is None or copy.info != want:
            raise StepError(f"no local copy of {want.id}: fetch first")
        node = self.sim.world.nodes[self.name]
        if node.live and node.data == STATE and node.commit >= want.commit:
            return f"already restored: commit {node.commit}"  # agent/actions.py's _restore looks first
        return Send("restore", backup=want, intact=copy.intact)

    def verify_restored(self, want: BackupInfo) -> str:
        node = self.sim.world.nodes[self.name]
        if not (self.sim.world.healthy(self.name) and node.commit >= want.commit):
            raise StepError(f"this node's commit has not reached {want.commit}, or it takes no writes")
        return f"verified: commit at least {want.commit}, writes work"

    # -- journaled steps, with crashes between intent, effect and outcome ---------------------------------------

    def journaled(
        self,
        cert: Certificate,
        step: playbooks.Step,
        run: Callable[[], str | Send],
        then: Then,
        issuer: Issuer = None,
    ) -> None:
        """agent/actions.py's _journaled: intent (a durable write), the step, outcome (a durable write); `then`
        gets how it ended, at once or once what it awaited returned; never when the agent crashed on the way. A
        step whose work is a destructive command sends it through its fence (`send_command`)."""
        sim, action = self.sim, cert.action

        def intent_written() -> None:
            j = self.disk.journal.setdefault(action.id, JEntry(action, cert, self.wall()))
            if j.outcome is not None:  # the journal refuses records of a finished action: the drive stops
                sim.note(f"{self.name}: the journal refuses {step.name} of {action.id}: it is finished")
                return
            j.cert, j.intent = cert, step.name
            if self.crash_point(f"after the intent of {step.name}"):
                return
            sim.checker.step_run(self, cert, step)
            sim.note(f"{self.name} runs {step.name} of {action.id}")
            try:
                if sim.faulty and step.name != "verify" and sim.rng.random() < sim.cfg.step_fail:
                    raise StepError("injected failure")
                work = run()
            except StepError as exc:
                self.journal_outcome(cert, step, Outcome(False, str(exc)), then)
                return
            if isinstance(work, Send):
                self.send_command(cert, work, lambda out: self.journal_outcome(cert, step, out, then), issuer)
            else:
                self.journal_outcome(cert, step, Outcome(True, work), then)

        def not_started(why: str) -> None:
            then(Outcome(False, f"{step.name} not started: {why}", ran=False))

        self.durable("journal intent", intent_written, not_started)

    def journal_outcome(self, cert: Certificate, step: playbooks.Step, out: Outcome, then: Then) -> None:
        if self.crash_point(f"after {step.name} ran, before its outcome"):
            return

        def written() -> None:
            j = self.disk.journal.setdefault(cert.action.id, JEntry(cert.action, cert, self.wall()))
            if j.outcome is not None:  # closed meanwhile (superseded, or a peer's finish): refused, as above
                self.sim.note(f"{self.name}: the journal refuses the outcome of {step.name}: it is finished")
                return
            j.intent = None
            if out.ok:
                self.sim.checker.step_done(cert, step)
                if step.name not in j.done:
                    j.done.append(step.name)
            then(out)

        def in_doubt(why: str) -> None:  # the step ran; it runs again next round (idempotent)
            then(Outcome(False, f"{step.name}: outcome not journaled: {why}", ran=False))

        self.durable("journal outcome", written, in_doubt)

    # -- destructive minkms commands (agent/actions.py's _command; agent/core/fencing.py) -----------------------

    def send_command(self, cert: Certificate, send: Send, then: Then, issuer: Issuer) -> None:
        """Fence, send, await (agent/actions.py's `_command`, agent/io/minkms.py's fenced `run`). The command
        starts only if, immediately before, its issuer holds the lease with MIN_COMMAND_SECONDS to spare (a
        step requested by a remote anchor: this agent follows that anchor, which it does not hold deposed), this
        agent's disk answers, and the step's own precondition (`send.still`) still holds. While it runs, the
        lease is checked every FENCE_EVERY and the command killed when it would end within LEASE_MARGIN; it is
        also killed at its own timeout. A killed command is in doubt: it may land later all the same.

        The process may freeze before the fence (the fence then judges on waking) or right after it: the command
        then leaves when it wakes, however late, and nothing watches it meanwhile. Once sent, it lands after its
        latency whatever happens to this agent (minkms has no term fencing): what it names must fence it."""
        sim, inc = self.sim, self.incarnation
        pick = sim.rng.random() if sim.faulty else 1.0
        if pick < sim.cfg.freeze_in_command / 2:  # frozen before the fence (its prepare, its failpoint)
            self.stepping = True
            sim.freeze(self.name, sim.freeze_length(), "before the fence of " + send.step)
            sim.schedule_for(
                self.name, sim.t, self._resume, inc, lambda: self.fence(cert, send, then, issuer, False)
            )
            return
        self.fence(cert, send, then, issuer, pick < sim.cfg.freeze_in_command)

    def fence_refusal(
        self, issuer: Issuer, running: bool, still: Callable[[], str | None] | None
    ) -> str | None:
        """agent/actions.py's `_command.fence`: why the command must not start (or go on running) now."""
        now = self.clock(self.sim.t)
        e = self.election
        if issuer is None:
            needed = 0.0 if running else fencing.MIN_COMMAND_SECONDS
            refusal = fencing.lease_refusal(e.is_anchor(now), e.lease_remaining(now), needed)
        else:
            refusal = execution.deposed(issuer[0], issuer[1], e.anchor_hint(now), e.term)
            if refusal is None and e.anchor_hint(now) not in (None, issuer[0]):
                refusal = f"this agent follows {e.anchor_hint(now)}, not {issuer[0]}, as anchor now"
        if running:
            return refusal
        if refusal is None and self.disk_overdue():
            refusal = "a durable write has not returned within its deadline"
        if refusal is None and still is not None:
            refusal = still()
        return refusal

    def fence(self, cert: Certificate, send: Send, then: Then, issuer: Issuer, freeze_after: bool) -> None:
        sim, cfg = self.sim, self.sim.cfg
        refusal = self.fence_refusal(issuer, False, send.still)
        if (
            cfg.broken == "no-lease-check"
        ):  # TEST ONLY: no fence; the step's own lease check, before its awaits
            refusal = None
        if refusal is not None:
            sim.stats["fenced"] += 1
            then(Outcome(False, f"fenced, not started: {refusal}", ran=False))
            return
        now = self.clock(sim.t)
        holder = self.name if issuer is None else issuer[0]
        if holder == self.name:
            lease_end = (
                sim.t + self.election.lease_remaining(now) / self.rate
                if self.election.is_anchor(now)
                else -1.0
            )
        else:
            lease_end = sim.checker.lease_end.get(holder, -1.0)
        cmd = Command(
            seq=sim.next_command(),
            issuer=self.name,
            holder=holder,
            cert=cert,
            step=send.step,
            target=cert.action.target,
            ids=send.ids,
            checked_at=sim.t,
            lease_end=lease_end,
            backup=send.backup,
            intact=send.intact,
        )
        if not freeze_after:
            self.leave(cmd, issuer, then)
            return
        cmd.frozen = True
        sim.stats["frozen_after_check"] += 1
        self.stepping = True
        sim.freeze(self.name, sim.freeze_length(), f"right after the fence of {send.step}")
        sim.schedule_for(
            self.name, sim.t, self._resume, self.incarnation, lambda: self.leave(cmd, issuer, then)
        )

    def leave(self, cmd: Command, issuer: Issuer, then: Then) -> None:
        sim, world = self.sim, self.sim.world
        if cmd.step == "remove" and sim.cfg.broken == "remove-by-current-id":
            host = world.nodes[cmd.target].host  # TEST ONLY: the host's id of the moment the command leaves
            cmd.ids = tuple(nid for nid, h in world.member_ids().items() if h == host)
            if not cmd.ids:
                then(Outcome(True, f"{host} is not a member: nothing to remove"))
                return
        if not world.nodes[self.name].live:
            then(Outcome(False, f"minkms {cmd.step}: the local minkms does not answer"))
            return
        cmd.left_at = sim.t
        cmd.lands_at = sim.t + sim.command_latency()
        sim.checker.command_left(self, cmd)
        sim.note(
            f"{self.name} sends {cmd.step} {list(cmd.ids) or cmd.target} of {cmd.cert.action.id} #{cmd.seq}"
        )
        sim.schedule(cmd.lands_at, sim.land, cmd)
        self.stepping = True
        sim.waiters[cmd.seq] = (self.name, self.incarnation, then)
        deadline = sim.t + sim.cfg.command_timeout / self.rate
        self.watch(self.incarnation, cmd, issuer, deadline, then)

    def watch(self, incarnation: int, cmd: Command, issuer: Issuer, deadline: float, then: Then) -> None:
        """The fence while the command runs, every FENCE_EVERY, and its own timeout; a frozen agent watches
        nothing (its events wait), so its command runs on unwatched."""
        sim = self.sim
        if not cmd.waiting or not self.alive or incarnation != self.incarnation:
            return
        refusal = None if sim.cfg.broken == "no-lease-check" else self.fence_refusal(issuer, True, None)
        if refusal is not None or sim.t >= deadline:
            cmd.waiting = False
            self.stepping = False
            sim.touched = self
            sim.stats["killed"] += 1
            if refusal is not None:
                then(
                    Outcome(
                        False, f"fenced, killed while running: {refusal}; its effect is in doubt", ran=False
                    )
                )
            else:
                timeout = sim.cfg.command_timeout
                then(
                    Outcome(
                        False,
                        f"minkms {cmd.step}: killed at its {timeout:g}s timeout; its effect is in doubt",
                    )
                )
            return
        at = min(deadline, sim.t + FENCE_EVERY / self.rate)
        if at < cmd.lands_at:
            sim.schedule_for(self.name, at, self.watch, incarnation, cmd, issuer, deadline, then)

    def command_done(self, incarnation: int, cmd: Command, result: Outcome, then: Then) -> None:
        """The command returned (it landed before it was killed): the step goes on from where it awaited."""
        if not cmd.waiting or not self.alive or incarnation != self.incarnation:
            return
        cmd.waiting = False
        self.stepping = False
        self.sim.touched = self
        then(result)

    def crash_point(self, where: str) -> bool:
        sim = self.sim
        if not sim.faulty or sim.rng.random() >= sim.cfg.step_crash / 2:
            return False
        sim.note(f"CRASH {self.name} {where}")
        sim.crash(self.name)
        return True
