"""A deterministic discrete-event simulator of N agents running the real core (`Election`, agreement).

The world is modelled, the decisions are not: each `SimAgent` is a thin shell like the daemon's (persist, then
send), around the real `agent.core.election.Election` and `agent.core.agreement` functions. Around them:

* a model minkms cluster: one node per non-witness agent, HEALTHY or STATE_LOST; a lost node is healed only by a
  REJOIN whose destructive step runs on the target after it verified a certificate naming it;
* a network that drops, duplicates, delays (reordering) and partitions messages;
* crashes and restarts: what was persisted ("fsynced") survives, memory does not, and the restarted agent gets a
  fresh `Election` that obeys the restart rule;
* clocks: each agent's monotonic clock is `offset + rate * t` with |rate - 1| <= drift.

One `random.Random(seed)` drives everything, so a seed replays exactly: `python -m tests.sim --seed S -v`.
After every event the invariants are checked (see `Checker`); after the faults stop, liveness is checked
against `liveness_bound`.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.core.agreement import (
    AckCollector,
    Held,
    answer_ack,
    certificate_problems,
    next_proposal,
    release,
)
from agent.core.election import Ballot, Election, ElectionTimings, ElectionView, quorum, refusal
from agent.core.messages import (
    Ack,
    AckReply,
    AckRequest,
    Action,
    Certificate,
    NodeReport,
    Report,
    VoteReply,
    VoteRequest,
)

CLUSTER = "sim"
BROKEN_RULES = ("ignore-promise", "skip-fsync", "no-margin")
"""Deliberately broken variants, for tests that prove the checker catches each kind of violation."""


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    agents: int = 3
    witnesses: int = 0  # the last `witnesses` agents have no minkms node: they vote, never lead
    timings: ElectionTimings = field(default_factory=ElectionTimings)
    drift: float = 0.05  # clock rate error bound; must be <= timings.max_drift for safety
    probe: float = 2.0  # report / tick interval (agent clock)
    peer_timeout: float = 5.0  # a report is fresh this long after receipt (agent clock)
    delay: tuple[float, float] = (0.005, 0.4)  # normal one-way delay, real seconds
    late_delay: float = 4.0  # occasional very late delivery (faults phase only), real seconds
    drop: float = 0.08
    duplicate: float = 0.04
    late: float = 0.03
    fault_period: float = 60.0  # faults happen in [0, fault_period); then the network and agents heal
    crash_rate: float = 0.02  # per agent per second
    partition_rate: float = 0.03  # per second
    loss_rate: float = 0.04  # a node loses its state, per second (at least one node always keeps state)
    persist_fail: float = 0.02  # an fsync fails (the agent must then refuse / not stand)
    broken: str | None = None

    def __post_init__(self) -> None:
        if self.agents < 1 or not 0 <= self.witnesses < self.agents:
            raise ValueError(
                f"need >= 1 agent and at least one non-witness, got {self.agents}/{self.witnesses}"
            )
        if self.broken is not None and self.broken not in BROKEN_RULES:
            raise ValueError(f"unknown broken rule {self.broken!r}; choose from {BROKEN_RULES}")

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f"a{i}" for i in range(self.agents))

    def replay(self) -> str:
        cmd = f"python -m tests.sim --seed {self.seed} --agents {self.agents} --witnesses {self.witnesses}"
        if self.drift != SimConfig.drift:
            cmd += f" --drift {self.drift}"
        if self.broken:
            cmd += f" --broken {self.broken}"
        return cmd + " -v"


def liveness_bound(cfg: SimConfig) -> float:
    """Real seconds after the faults stop within which some agent must hold the anchor lease.

    Derivation (docs/protocol.md): one lease for restart windows and for promises made before the faults
    stopped to expire, one peer_timeout + probe for stale claims to go and for views to agree, then the
    preferred candidate needs at most a retry wait (2 renew periods) and one round trip; a competing
    non-preferred candidate only stands after backoff_min, and a split costs one more lease plus a back-off.
    Every duration on an agent clock is stretched by 1/(1-drift) in real time."""
    t = cfg.timings
    stretch = 1 / (1 - cfg.drift)
    local = 2 * t.lease + t.backoff_max + 2 * t.renew_every + cfg.peer_timeout + 2 * cfg.probe
    return local * stretch + 4 * cfg.delay[1]


HEAL_PER_NODE = 30.0
"""Once an anchor exists, each lost node must be rejoined within this many real seconds (a proposal, Q acks, the
step and the Finished notice take a few probe periods; an abandoned action costs an abort round)."""


# -- test-only broken variants of the real state machine -----------------------------------------------------


class PromiseBreakingElection(Election):
    """TEST ONLY: a voter that ignores its promise and its one-vote-per-term rule."""

    def _refusal_reason(self, req: VoteRequest, now: float, candidate_eligible: bool) -> str:
        reason = super()._refusal_reason(req, now, candidate_eligible)
        if reason.startswith(("promised to", "already voted")):
            return ""
        return reason


class NoMarginElection(Election):
    """TEST ONLY: a candidate that counts its lease from the last grant's arrival, not from its send time."""

    def _count(self, rnd: Any, now: float) -> None:
        if len(rnd.grants) >= self.quorum:
            self._lease_end = max(self._lease_end, now + self.timings.lease)
            self._role = type(self._role).ANCHOR


# -- sim-only messages (execution is the daemon's job; the sim models it atomically) -------------------------


@dataclass(frozen=True)
class Execute:
    cert: Certificate


@dataclass(frozen=True)
class Abort:
    action: Action


@dataclass(frozen=True)
class Finished:
    action_id: str


# -- signatures: HMAC with a per-agent secret stands in for the TLS key ----------------------------------------


def _secret(name: str) -> bytes:
    return hashlib.sha256(b"sim-key:" + name.encode()).digest()


def sim_sign(name: str) -> Callable[[bytes], Ack]:
    def sign(payload: bytes) -> Ack:
        return Ack(name, f"sim-cert:{name}", hmac.new(_secret(name), payload, "sha256").hexdigest())

    return sign


def sim_verify(ack: Ack, payload: bytes) -> str | None:
    if ack.certificate != f"sim-cert:{ack.signer}":
        return "certificate does not name the signer"
    if not hmac.compare_digest(ack.signature, hmac.new(_secret(ack.signer), payload, "sha256").hexdigest()):
        return "bad signature"
    return None


# -- the world -------------------------------------------------------------------------------------------------


@dataclass
class Disk:
    """What an agent fsynced: survives crashes."""

    ballot: Ballot = field(default_factory=Ballot)
    held: Held | None = None
    finished: set[str] = field(default_factory=set)  # actions journaled finished (done or aborted)


@dataclass
class Proposal:
    action: Action
    term: int
    collector: AckCollector
    cert: Certificate | None = None


class Violation(Exception):
    pass


@dataclass
class Result:
    cfg: SimConfig
    violation: str | None
    events: int
    trace: list[str]
    anchor_after_quiet: float | None  # real seconds from the end of faults to the first anchor
    healed_after_quiet: float | None
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.violation is None


class SimAgent:
    def __init__(self, sim: Simulation, name: str, witness: bool, rate: float, offset: float) -> None:
        self.sim, self.name, self.witness = sim, name, witness
        self.rate, self.offset = rate, offset
        self.disk = Disk()
        self.alive = False
        self.incarnation = 0
        self.election: Election
        self.reports: dict[str, tuple[Report, float]] = {}
        self.seq = 0
        self.proposal: Proposal | None = None
        self.cooldown: dict[str, float] = {}  # target -> local time before which it proposes nothing for it

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, t: float) -> None:
        cfg = self.sim.cfg
        cls = {"ignore-promise": PromiseBreakingElection, "no-margin": NoMarginElection}.get(
            cfg.broken or "", Election
        )
        self.alive = True
        self.incarnation += 1
        self.election = cls(
            self.name, CLUSTER, cfg.names, cfg.timings, self.disk.ballot, self.clock(t), witness=self.witness
        )
        self.reports, self.seq, self.proposal, self.cooldown = {}, 0, None, {}
        self.sim.schedule(t + self.sim.rng.uniform(0, cfg.probe) / self.rate, self.tick, self.incarnation)

    def crash(self) -> None:
        self.alive = False

    # -- views -----------------------------------------------------------------------------------------------

    def node_class(self, who: str, now: float) -> str | None:
        if self.sim.is_witness(who):
            return None
        if who == self.name:
            return "STATE_LOST" if self.sim.lost[who] else "HEALTHY"
        entry = self.reports.get(who)
        if entry is None or now - entry[1] > self.sim.cfg.peer_timeout or entry[0].node is None:
            return None
        return entry[0].node.cls

    def eligible(self, now: float) -> tuple[str, ...]:
        return tuple(n for n in self.sim.cfg.names if self.node_class(n, now) == "HEALTHY")

    def fresh_reports(self, now: float) -> list[Report]:
        return [r for r, at in self.reports.values() if now - at <= self.sim.cfg.peer_timeout]

    def verdict(self, action: Action, anchor: str, now: float) -> tuple[bool, str]:
        if action.kind != "REJOIN":
            return False, f"the simulation only models REJOIN, not {action.kind}"
        if action.target == anchor:
            return False, "never rejoin the anchor"
        cls = self.node_class(action.target, now)
        if cls != "STATE_LOST":
            return False, f"{action.target} is {cls or 'unknown'} in my view"
        return True, ""

    # -- events ----------------------------------------------------------------------------------------------

    def tick(self, incarnation: int) -> None:
        if not self.alive or incarnation != self.incarnation:
            return
        self.sim.touched = self
        sim, now = self.sim, self.clock(self.sim.t)
        view = ElectionView.from_reports(self.eligible(now), self.fresh_reports(now))
        out = self.election.tick(now, view, sim.rng.random())
        if out is not None:
            if out.ballot is not None and not self.persist_ballot(out.ballot):
                self.election.persist_failed()
            else:
                sim.note(f"{self.name} sends {out.request}")
                self.broadcast(out.request)
        if self.election.is_anchor(now):
            self.anchor_work(now)
        self.send_report(now)
        sim.schedule(sim.t + sim.cfg.probe / self.rate, self.tick, incarnation)

    def persist_ballot(self, ballot: Ballot) -> bool:
        if self.sim.faulty and self.sim.rng.random() < self.sim.cfg.persist_fail:
            self.sim.note(f"{self.name} fsync of {ballot} failed")
            return False
        if self.sim.cfg.broken != "skip-fsync":
            self.disk.ballot = ballot
        return True

    def send_report(self, now: float) -> None:
        self.seq += 1
        e = self.election
        node = None
        if not self.witness:
            cls = "STATE_LOST" if self.sim.lost[self.name] else "HEALTHY"
            node = NodeReport(cls, "sim", 0.0, self.name)
        report = Report(
            CLUSTER,
            self.name,
            self.seq,
            f"boot{self.incarnation}",
            e.term,
            e.anchor_hint(now),
            e.lease_remaining(now) if e.is_anchor(now) else None,
            node,
            self.disk.held.action.id if self.disk.held else None,
        )
        self.broadcast(report)

    def broadcast(self, msg: object) -> None:
        for other in self.sim.cfg.names:
            if other != self.name:
                self.sim.send(self.name, other, msg)

    def receive(self, src: str, msg: object) -> None:
        now = self.clock(self.sim.t)
        if isinstance(msg, Report):
            old = self.reports.get(src)
            if old is None or old[0].boot != msg.boot or old[0].seq < msg.seq:
                self.reports[src] = (msg, now)
            if msg.in_flight is not None and msg.in_flight in self.disk.finished:
                self.sim.send(self.name, src, Finished(msg.in_flight))
        elif isinstance(msg, VoteRequest):
            self.on_vote_request(msg, now)
        elif isinstance(msg, VoteReply):
            self.election.on_vote_reply(msg, now)
        elif isinstance(msg, AckRequest):
            self.on_ack_request(src, msg, now)
        elif isinstance(msg, AckReply):
            self.on_ack_reply(msg, now)
        elif isinstance(msg, Execute):
            self.on_execute(src, msg.cert)
        elif isinstance(msg, Abort):
            self.on_abort(msg.action)
        elif isinstance(msg, Finished):
            self.on_finished(msg.action_id)

    def on_vote_request(self, req: VoteRequest, now: float) -> None:
        eligible = req.candidate in self.eligible(now)
        reply, ballot = self.election.on_vote_request(req, now, eligible)
        if ballot is not None and not self.persist_ballot(ballot):
            self.election.persist_failed()
            reply = refusal(reply, "could not persist the vote")
        if reply.granted:
            self.sim.checker.vote_sent(self, reply, req)
        self.sim.send(self.name, req.candidate, reply)

    # -- agreement -------------------------------------------------------------------------------------------

    def answer(self, req: AckRequest, now: float) -> AckReply:
        held_before = self.disk.held
        reply, held = answer_ack(
            req,
            cluster=CLUSTER,
            ballot=self.election.ballot,
            verdict=self.verdict(req.action, req.anchor, now),
            held=held_before,
            sign=sim_sign(self.name),
        )
        if held is not None:
            if self.sim.faulty and self.sim.rng.random() < self.sim.cfg.persist_fail:
                return AckReply(False, "could not persist the ack")
            self.disk.held = held
        return reply

    def on_ack_request(self, src: str, req: AckRequest, now: float) -> None:
        self.sim.send(self.name, src, self.answer(req, now))

    def on_ack_reply(self, reply: AckReply, now: float) -> None:
        p = self.proposal
        if p is None or p.cert is not None or not self.election.is_anchor(now):
            return
        if reply.granted and reply.ack is not None:
            if p.collector.add(reply.ack) is None:
                self.try_certify(p)
        elif reply.holding is not None and reply.holding.id != p.action.id:
            # another unfinished action blocks ours: abort it through its target's journal (safe: the target
            # either already executed it, or will refuse its certificate forever)
            self.send_to(reply.holding.target, Abort(reply.holding))

    def try_certify(self, p: Proposal) -> None:
        cert = p.collector.certificate()
        if cert is not None and p.cert is None:
            p.cert = cert
            self.sim.checker.certified(cert)
            self.sim.note(f"{self.name} certified {cert.action.id} in term {cert.term}")
            self.send_execute(p)

    def send_execute(self, p: Proposal) -> None:
        assert p.cert is not None
        self.send_to(p.cert.action.target, Execute(p.cert))

    def send_to(self, target: str, msg: Execute | Abort) -> None:
        if isinstance(msg, Abort):
            self.sim.stats["aborts_sent"] += 1
        if target == self.name:
            self.receive(self.name, msg)
        else:
            self.sim.send(self.name, target, msg)

    def anchor_work(self, now: float) -> None:
        term = self.election.ballot.term
        p = self.proposal
        if p is not None and (p.term != term or p.action.id in self.disk.finished):
            p = self.proposal = None
        if p is None:
            held = self.disk.held
            unfinished = (
                held.action if held is not None and held.action.id not in self.disk.finished else None
            )
            action = next_proposal(unfinished, self.wanted(now))
            if action is None:
                return
            collector = AckCollector(CLUSTER, term, action, self.sim.cfg.names, sim_verify)
            p = self.proposal = Proposal(action, term, collector)
            self.sim.stats["proposals"] += 1
            self.sim.note(f"{self.name} proposes {action.id} in term {term}")
        if p.cert is not None:
            self.send_execute(p)
            return
        req = AckRequest(CLUSTER, term, self.name, p.action)
        if self.name not in p.collector.signers:
            own = self.answer(req, now)
            if own.granted and own.ack is not None:
                p.collector.add(own.ack)
                self.try_certify(p)
            elif (
                own.holding is None and self.disk.held is not None and self.disk.held.action.id == p.action.id
            ):
                # our own view no longer supports the unfinished action we hold: abort it through its target
                self.send_to(p.action.target, Abort(p.action))
                return
            if p.cert is not None:
                return
        for other in self.sim.cfg.names:
            if other != self.name and other not in p.collector.signers:
                self.sim.send(self.name, other, req)

    def wanted(self, now: float) -> Action | None:
        for n in self.sim.cfg.names:
            if (
                n != self.name
                and self.node_class(n, now) == "STATE_LOST"
                and now >= self.cooldown.get(n, -math.inf)
            ):
                self.sim.action_no += 1
                return Action(f"rejoin-{n}-{self.name}-{self.sim.action_no}", "REJOIN", n)
        return None

    def on_execute(self, src: str, cert: Certificate) -> None:
        """The target's destructive step: only with a valid certificate naming it, never twice. A request for a
        step already done is answered with Finished again: the first notice may have been lost."""
        problems = certificate_problems(
            cert, CLUSTER, self.sim.cfg.names, quorum(self.sim.cfg.agents), sim_verify
        )
        if problems or cert.action.target != self.name:
            return
        if cert.action.id in self.disk.finished:
            if src != self.name:
                self.sim.send(self.name, src, Finished(cert.action.id))
            return
        self.sim.checker.destructive_step(self, cert)
        self.sim.lost[self.name] = False  # fence, quarantine, rm, fresh start, add: back as a member
        self.sim.stats["rejoins"] += 1
        self.sim.note(f"{self.name} executed {cert.action.id}: REJOIN done")
        self.finish(cert.action.id)

    def on_abort(self, action: Action) -> None:
        if action.target == self.name and action.id not in self.disk.finished:
            self.sim.stats["aborts"] += 1
            self.sim.note(f"{self.name} aborted {action.id}")
            self.finish(action.id)

    def finish(self, action_id: str) -> None:
        self.disk.finished.add(action_id)
        self.sim.checker.finished(action_id)
        self.on_finished(action_id)
        self.broadcast(Finished(action_id))

    def on_finished(self, action_id: str) -> None:
        self.disk.finished.add(action_id)
        self.disk.held = release(self.disk.held, action_id)
        p = self.proposal
        if p is not None and p.action.id == action_id:
            self.cooldown[p.action.target] = self.clock(self.sim.t) + 2 * self.sim.cfg.peer_timeout
            self.proposal = None


class Checker:
    """The invariants, checked after every event (and at the moment of each send / step)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.lease_end: dict[str, float] = {}  # real time until which each agent believed its last lease
        self.certs: dict[str, Certificate] = {}
        self.done: set[str] = set()

    def fail(self, what: str) -> None:
        raise Violation(f"t={self.sim.t:.3f}: {what}")

    def after_event(self, touched: SimAgent | None) -> None:
        """Exact: a lease can only start or grow in an event of its own agent (a tick or a delivered reply), and
        between events beliefs only expire; so checking the touched agent (all after a fault) suffices."""
        t = self.sim.t
        for a in self.sim.agents.values() if touched is None else (touched,):
            if not a.alive:
                continue
            now = a.clock(t)
            if not a.election.is_anchor(now):
                continue
            for other, end in self.lease_end.items():
                if other != a.name and end > t + 1e-9:
                    self.fail(
                        f"two anchors: {a.name} holds a lease (term {a.election.ballot.term}) while {other}'s "
                        f"lease lasts until t={end:.3f}"
                    )
            self.lease_end[a.name] = t + a.election.lease_remaining(now) / a.rate

    def vote_sent(self, agent: SimAgent, reply: VoteReply, req: VoteRequest) -> None:
        if agent.disk.ballot != Ballot(reply.term, req.candidate):
            self.fail(
                f"{agent.name} sent a grant for term {reply.term} to {req.candidate} but persisted {agent.disk.ballot}"
            )

    def certified(self, cert: Certificate) -> None:
        if problems := certificate_problems(
            cert, CLUSTER, self.sim.cfg.names, quorum(self.sim.cfg.agents), sim_verify
        ):
            self.fail(f"invalid certificate formed for {cert.action.id}: {problems}")
        others = [i for i in self.certs if i != cert.action.id and i not in self.done]
        if others:
            self.fail(f"two certificates for different unfinished actions: {others[0]} and {cert.action.id}")
        self.certs[cert.action.id] = cert

    def destructive_step(self, agent: SimAgent, cert: Certificate) -> None:
        known = self.certs.get(cert.action.id)
        problems = certificate_problems(
            cert, CLUSTER, self.sim.cfg.names, quorum(self.sim.cfg.agents), sim_verify
        )
        if known is None or problems or cert.action.target != agent.name:
            self.fail(
                f"destructive step on {agent.name} without a certificate naming it: {problems or cert.action}"
            )

    def finished(self, action_id: str) -> None:
        self.done.add(action_id)


class Simulation:
    def __init__(self, cfg: SimConfig, verbose: bool = False) -> None:
        self.cfg, self.verbose = cfg, verbose
        self.rng = random.Random(cfg.seed)
        self.t = 0.0
        self.queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.trace: list[str] = []
        self.faulty = True
        self.touched: SimAgent | None = None  # the agent the current event ran on (None: check every agent)
        self.groups: dict[str, int] | None = None  # partition: agent -> side
        self.action_no = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("events", "crashes", "partitions", "losses", "proposals", "rejoins", "aborts", "aborts_sent"), 0
        )
        n_nodes = cfg.agents - cfg.witnesses
        self.witness_names = frozenset(cfg.names[n_nodes:])
        self.lost = {n: False for n in cfg.names[:n_nodes]}
        self.agents: dict[str, SimAgent] = {}
        for i, name in enumerate(cfg.names):
            rate = 1 + self.rng.uniform(-cfg.drift, cfg.drift)
            self.agents[name] = SimAgent(self, name, i >= n_nodes, rate, self.rng.uniform(0, 1000))
        self.checker = Checker(self)

    def is_witness(self, name: str) -> bool:
        return name in self.witness_names

    def note(self, line: str) -> None:
        if self.verbose:
            self.trace.append(f"{self.t:9.3f} {line}")

    def schedule(self, at: float, fn: Callable[..., None], *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, fn, args))

    # -- network ---------------------------------------------------------------------------------------------

    def connected(self, a: str, b: str) -> bool:
        return self.groups is None or self.groups[a] == self.groups[b]

    def send(self, src: str, dst: str, msg: object) -> None:
        if not self.connected(src, dst):
            return
        copies = 1
        if self.faulty:
            if self.rng.random() < self.cfg.drop:
                return
            if self.rng.random() < self.cfg.duplicate:
                copies = 2
        for _ in range(copies):
            delay = self.rng.uniform(*self.cfg.delay)
            if self.faulty and self.rng.random() < self.cfg.late:
                delay = self.rng.uniform(self.cfg.delay[1], self.cfg.late_delay)
            self.schedule(self.t + delay, self.deliver, src, dst, msg)

    def deliver(self, src: str, dst: str, msg: object) -> None:
        agent = self.touched = self.agents[dst]
        if agent.alive and self.connected(src, dst):
            agent.receive(src, msg)

    # -- faults ----------------------------------------------------------------------------------------------

    def fault(self) -> None:
        if not self.faulty:
            return
        cfg, rng = self.cfg, self.rng
        n = cfg.agents
        total = cfg.crash_rate * n + cfg.partition_rate + cfg.loss_rate
        kind = rng.uniform(0, total)
        if kind < cfg.crash_rate * n:
            a = self.agents[rng.choice(cfg.names)]
            if a.alive:
                a.crash()
                self.stats["crashes"] += 1
                self.note(f"CRASH {a.name}")
                self.schedule(self.t + rng.uniform(0.5, 15.0), self.restart, a.name)
        elif kind < cfg.crash_rate * n + cfg.partition_rate:
            if self.groups is None and n > 1:
                sides = {name: rng.randrange(2) for name in cfg.names}
                self.groups = sides
                self.stats["partitions"] += 1
                self.note(
                    f"PARTITION {sorted(k for k, v in sides.items() if v == 0)} | "
                    f"{sorted(k for k, v in sides.items() if v == 1)}"
                )
                self.schedule(self.t + rng.uniform(1.0, 25.0), self.heal_partition)
        else:
            healthy = [k for k, lost in self.lost.items() if not lost]
            if len(healthy) >= 2:
                victim = rng.choice(healthy)
                self.lost[victim] = True
                self.stats["losses"] += 1
                self.note(f"STATE LOST on {victim}")
        self.schedule(self.t + rng.expovariate(total), self.fault)

    def restart(self, name: str) -> None:
        a = self.agents[name]
        if not a.alive:
            self.note(f"RESTART {name} with {a.disk.ballot}")
            a.start(self.t)

    def heal_partition(self) -> None:
        if self.groups is not None:
            self.note("PARTITION healed")
        self.groups = None

    def quiet(self) -> None:
        """Faults stop: the network heals and becomes reliable, crashed agents come back."""
        self.faulty = False
        self.heal_partition()
        for name, a in self.agents.items():
            if not a.alive:
                self.restart(name)
        self.note("QUIET: faults stopped")

    # -- run -------------------------------------------------------------------------------------------------

    def run(self) -> Result:
        cfg = self.cfg
        for a in self.agents.values():
            a.start(0.0)
        self.schedule(self.rng.uniform(0, 5), self.fault)
        self.schedule(cfg.fault_period, self.quiet)
        anchor_deadline = cfg.fault_period + liveness_bound(cfg)
        anchor_at: float | None = None
        healed_at: float | None = None
        violation: str | None = None
        events = 0
        try:
            while self.queue:
                at, _, fn, args = heapq.heappop(self.queue)
                self.t = at
                self.touched = None
                fn(*args)
                events += 1
                self.checker.after_event(self.touched)
                if self.faulty:
                    continue
                if anchor_at is None:
                    if any(a.alive and a.election.is_anchor(a.clock(at)) for a in self.agents.values()):
                        anchor_at = at - cfg.fault_period
                        heal_deadline = at + HEAL_PER_NODE * max(1, sum(self.lost.values()))
                    elif at > anchor_deadline:
                        raise Violation(
                            f"liveness: no anchor within {liveness_bound(cfg):.1f}s after the faults stopped"
                        )
                    continue
                if not any(self.lost.values()):
                    healed_at = at - cfg.fault_period
                    break
                if at > heal_deadline:
                    lost = sorted(k for k, v in self.lost.items() if v)
                    raise Violation(
                        f"liveness: {lost} still STATE_LOST {HEAL_PER_NODE:.0f}s per node after an anchor"
                    )
        except Violation as exc:
            violation = str(exc)
            self.note(f"VIOLATION {violation}")
        self.stats["events"] = events
        return Result(cfg, violation, events, self.trace, anchor_at, healed_at, self.stats)


def run(cfg: SimConfig, verbose: bool = False) -> Result:
    return Simulation(cfg, verbose).run()


def describe(result: Result) -> str:
    r = result
    s = r.stats
    line = (
        f"seed {r.cfg.seed} agents {r.cfg.agents} witnesses {r.cfg.witnesses}: "
        f"{'OK' if r.ok else 'VIOLATION'}; {r.events} events, {s['crashes']} crashes, {s['partitions']} partitions, "
        f"{s['losses']} state losses, {s['rejoins']} rejoins, {s['aborts']} aborts; "
        f"anchor {_secs(r.anchor_after_quiet)} and healed {_secs(r.healed_after_quiet)} after faults stopped"
    )
    if r.violation:
        line += f"\n  {r.violation}\n  replay: {r.cfg.replay()}"
    return line


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f}s"


__all__ = [
    "BROKEN_RULES",
    "HEAL_PER_NODE",
    "Result",
    "SimConfig",
    "Simulation",
    "describe",
    "liveness_bound",
    "run",
]
