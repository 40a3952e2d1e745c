"""A deterministic discrete-event simulator of N agents running the real core, in a modelled minkms world.

The world is modelled (`world.py`), the decisions are not: each `SimAgent` (`node.py`) is a thin shell like the
daemon's around the real election, classification, planner, guard rails, agreement and step tables. Around them:

* a model minkms cluster: nodes lose their state (REJOIN), hosts die for longer than evict_after (EVICT) and
  come back removed (EVICTED, then REJOIN); every action runs step by step from `playbooks.steps(kind)`;
* a network that drops, duplicates, delays (reordering) and partitions messages;
* crashes and restarts, also between a step's intent, its effect and its outcome: what was persisted
  ("fsynced": ballot, held ack, journal, history, escalations, pause) survives, memory does not;
* steps that fail, operator pauses and resumes, clocks with drift and offset, wall clocks with skew;
* backups (the HEALTHY anchor takes one every `backup_every`, pushed to every agent, a copy may rot on disk),
  and in some seeds a total loss (every node's state, sometimes with one host dead), restored by a RESTORE
  armed by `policy.auto_restore` or by an operator's approval once the faults stop (`Scenario`);
* time between a destructive minkms command and its effect (`land`): remove, add and restore leave through the
  issuer's fence (`agent.core.fencing`) and land after a latency drawn per command, mostly under half a second,
  sometimes seconds, now and then longer than a lease (the issuer kills it at its timeout: in doubt). They land
  whatever happened to the issuer meanwhile (deposed, frozen, crashed after sending): minkms has no term fencing;
* stalls: an agent's process freezes (`freeze`: its events wait, its clock runs on; also inside a command, before
  its fence or right after it, so that the command leaves when it wakes); an agent's disk stops answering
  (journal writes wait up to the lease, then the step is not run; votes and acks are not sent; the anchor steps
  down once a write is overdue); a node's storage probe hangs (its observation stops, then says STALLED, and its
  reports carry the observation's age, classified STALLED by its peers past peer_timeout, by the real core).
  Every stall ends when the faults stop.

One `random.Random(seed)` drives everything, so a seed replays exactly: `python -m tests.sim --seed S -v`
(`--set NAME=VALUE` changes a numeric setting; a replay command names those that differ from the defaults).
After every event the invariants are checked (`checker.py`); after the faults stop, liveness is checked:
an anchor within `liveness_bound`, then every node HEALTHY within `heal_bound` per node needing care.

Not modelled: a hung volume's effect on minkms itself (only the agent's probe hangs), durable writes other than
the journal's, the ballot and the held ack (history, escalations, superseded ids are written at once), the ack
path waiting for the step lock, commands that minkms applies partly, and clock steps.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.core import backups, guards, restore
from agent.core.facts import ClusterFacts
from agent.core.messages import RestoreApproval
from agent.core.model import NodeClass
from agent.core.settings import Policy
from tests.sim.base import (
    BROKEN_RULES,
    GUARDS_REMOVED,
    BackupCopy,
    Command,
    SimConfig,
    heal_bound,
    liveness_bound,
    restore_bound,
)
from tests.sim.checker import Checker, Violation
from tests.sim.node import Outcome, SimAgent, Then
from tests.sim.world import STATE, StepError, World

OPERATOR_DELAY = 5.0  # seconds from an escalation to the operator's `kmagent ack`, once the faults stopped
MAX_PAGES = 2  # a node that escalates again after that many acks is left to its escalation (excused)

STATS = (
    "events",
    "crashes",
    "partitions",
    "losses",
    "host_deaths",
    "pauses",
    "proposals",
    "done",
    "failed",
    "aborted",
    "adoptions",
    "self_closed",
    "unconfirmed_closes",
    "markers_adopted",
    "superseded",
    "escalations",
    "rejoins",
    "evicts",
    "backups",
    "total_losses",
    "approvals",
    "restores",
    "stranded",
    "freezes",
    "disk_stalls",
    "probe_hangs",
    "stalled",
    "commands",
    "late_commands",
    "killed",
    "fenced",
    "frozen_after_check",
)


@dataclass(frozen=True)
class Scenario:
    """The seed's RESTORE story, drawn from its own generator (so the other faults' schedule is unchanged).

    total_loss_at: when every node loses its state (None: never); spread: over how many seconds, one node after
    the other (0: all at once); dead: a host that also dies then (it returns at `dead_back` or when the faults
    stop), and keeps its state unless `dead_loses` (holding it, it must block every restore; losing it, it
    blocks the automatic one until it is back and seen STATE_LOST); auto: `policy.auto_restore`, else the
    operator approves once the faults stop; rot: one copy of the freshest backup rots on some agent's disk
    at the total loss (another agent always holds it intact then)."""

    total_loss_at: float | None = None
    spread: float = 0.0
    dead: bool = False
    dead_loses: bool = False
    dead_back: float = 0.0
    auto: bool = False
    rot: bool = False

    @staticmethod
    def draw(cfg: SimConfig) -> Scenario:
        rng = random.Random(f"restore:{cfg.seed}")
        if rng.random() >= cfg.total_loss:
            return Scenario(rot=rng.random() < 0.3)
        at = rng.uniform(15.0, 0.75 * cfg.fault_period)
        return Scenario(
            total_loss_at=at,
            spread=rng.choice((0.0, rng.uniform(1.0, 10.0))),
            dead=rng.random() < 0.4,
            dead_loses=rng.random() < 0.5,
            dead_back=at + rng.uniform(10.0, 60.0),
            auto=rng.random() < 0.5,
            rot=rng.random() < 0.5,
        )


@dataclass
class Result:
    cfg: SimConfig
    violation: str | None
    events: int
    trace: list[str]
    anchor_after_quiet: float | None  # real seconds from the end of faults to the first anchor
    healed_after_quiet: float | None  # ... to every node HEALTHY (or escalated for its budget)
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return self.violation is None


class Simulation:
    def __init__(self, cfg: SimConfig, verbose: bool = False) -> None:
        self.cfg, self.verbose = cfg, verbose
        self.rng = random.Random(cfg.seed)
        self.t = 0.0
        self.queue: list[tuple[float, int, str | None, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = 0
        self.deferred: dict[str, list[tuple[Callable[..., None], tuple[Any, ...]]]] = {}  # a frozen agent's
        self.commands = 0
        self.waiters: dict[int, tuple[str, int, Then]] = {}  # command -> (issuer, incarnation, what follows)
        self.trace: list[str] = []
        self.faulty = True
        self.paged: set[str] = set()  # escalated nodes an operator will ack (after the faults stopped)
        self.pages: collections.Counter[str] = collections.Counter()
        self.touched: SimAgent | None = None  # the agent the current event ran on (None: check every agent)
        self.groups: dict[str, int] | None = None  # partition: agent -> side
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self.scenario = Scenario.draw(cfg)
        self.last_backup = -cfg.backup_every
        self.policy = Policy(
            actions_per_hour=cfg.budget, min_members=cfg.min_members, auto_restore=self.scenario.auto
        )
        self.witness_names = frozenset(cfg.names[len(cfg.node_names) :])
        self.world = World(cfg.node_names, lambda: self.t)
        self.agents: dict[str, SimAgent] = {}
        for i, name in enumerate(cfg.names):
            rate = 1 + self.rng.uniform(-cfg.drift, cfg.drift)
            offset, skew = self.rng.uniform(0, 1000), self.rng.uniform(-cfg.wall_skew, cfg.wall_skew)
            self.agents[name] = SimAgent(self, name, i >= len(cfg.node_names), rate, offset, skew)
        self.checker = Checker(self)
        self.landing: Command | None = None  # the restore command landing now
        self.world.on_restore = self.restore_effect

    def is_witness(self, name: str) -> bool:
        return name in self.witness_names

    def note(self, line: str) -> None:
        if self.verbose:
            self.trace.append(f"{self.t:9.3f} {line}")

    def schedule(self, at: float, fn: Callable[..., None], *args: Any) -> None:
        """An event of the world (faults, the network's timing, a command landing): it runs whoever is frozen."""
        self.schedule_for(None, at, fn, *args)

    def schedule_for(self, owner: str | None, at: float, fn: Callable[..., None], *args: Any) -> None:
        """An event of the agent `owner` (a tick, a delivery to it, the return of something it awaits): while
        that agent is frozen it waits, and runs when it wakes, in order."""
        self.seq += 1
        heapq.heappush(self.queue, (at, self.seq, owner, fn, args))

    # -- stalls ------------------------------------------------------------------------------------------------

    def freeze(self, name: str, seconds: float, why: str) -> None:
        """The agent's process stops (a GC pause, SIGSTOP, a VM stall): no ticks, no messages, its clock runs on;
        it wakes with whatever it was doing. Its events wait (`schedule_for`)."""
        a = self.agents[name]
        if not a.frozen():
            a.frozen_since = self.t
        a.frozen_until = max(a.frozen_until, self.t + seconds)
        self.stats["freezes"] += 1
        self.note(f"FREEZE {name} for {seconds:.1f}s ({why})")
        self.schedule(self.t + seconds, self.unfreeze, name)

    def unfreeze(self, name: str, early: bool = False) -> None:
        a = self.agents[name]
        if early:
            a.frozen_until = min(a.frozen_until, self.t)
        if a.frozen_until > self.t or name not in self.deferred:
            return
        self.note(f"WAKE {name}")
        for fn, args in self.deferred.pop(name):
            self.schedule_for(name, self.t, fn, *args)

    def freeze_length(self) -> float:
        """Mostly a few seconds, sometimes a lease or two, now and then a minute (the incident: a ~50 s stall)."""
        r = self.rng.random()
        if r < self.cfg.long_freeze:
            return self.rng.uniform(20.0, 60.0)
        if r < 0.6:
            return self.rng.uniform(0.5, 5.0)
        return self.rng.uniform(5.0, 20.0)

    def freeze_random(self) -> None:
        live = [a for a in self.agents.values() if a.alive and not a.frozen()]
        if live:
            self.freeze(self.rng.choice(live).name, self.freeze_length(), "stall")

    def stall_disk(self) -> None:
        """One agent's durable writes stop returning for a while (a hung fsync)."""
        a = self.agents[self.rng.choice(self.cfg.names)]
        if a.disk_stalled():
            return
        seconds = self.freeze_length()
        a.disk_since, a.disk_until = self.t, self.t + seconds
        self.stats["disk_stalls"] += 1
        self.note(f"DISK STALL on {a.name} for {seconds:.1f}s")

    def hang_probe(self) -> None:
        """One node's storage probe stops returning for a while (a hung volume)."""
        node = self.world.nodes[self.rng.choice(self.cfg.node_names)]
        if node.probe_hang_until > self.t:
            return
        seconds = self.rng.uniform(1.0, 8.0) if self.rng.random() < 0.5 else self.rng.uniform(8.0, 40.0)
        node.probe_hung_since, node.probe_hang_until = self.t, self.t + seconds
        node.probe_blip = self.rng.random() < self.cfg.probe_blip
        self.stats["probe_hangs"] += 1
        self.note(
            f"PROBE HANG on {node.name} for {seconds:.1f}s{' after a misread' if node.probe_blip else ''}"
        )

    def stalled_for(self, name: str) -> float:
        """How old, in real seconds, the node's newest reading of its storage is while its probe hangs or its
        agent is frozen (0: neither): the truth behind STALLED."""
        node, a = self.world.nodes[name], self.agents[name]
        if a.alive and (node.probe_hang_until > self.t or a.frozen()):
            return self.t - a.read_at
        return 0.0

    # -- destructive minkms commands ---------------------------------------------------------------------------

    def next_command(self) -> int:
        self.commands += 1
        self.stats["commands"] += 1
        return self.commands

    def command_latency(self) -> float:
        """From the moment a command leaves to the moment minkms applies it."""
        r, cfg = self.rng.random(), self.cfg
        if not self.faulty or r >= cfg.slow_command + cfg.stuck_command:
            return self.rng.uniform(0.02, 0.5)
        if r < cfg.stuck_command:
            return self.rng.uniform(1.0, 2.5) * cfg.timings.lease
        return self.rng.uniform(0.5, 5.0)

    def land(self, cmd: Command) -> None:
        """minkms applies a command, to the world as it is now, by what it names (no term fencing); the issuer
        hears of it unless it was killed at its timeout."""
        world, checker = self.world, self.checker
        if self.t > cmd.lease_end:
            self.stats["late_commands"] += 1
        try:
            if cmd.step == "remove":
                checker.command_effect(cmd, tuple(world.removable(cmd.issuer, cmd.ids).values()))
                detail = world.remove(cmd.issuer, cmd.ids)
            elif cmd.step == "add":
                checker.command_effect(cmd, (-1,) if world.addable(cmd.issuer, cmd.target) else ())
                detail = world.add(cmd.issuer, cmd.target)
            else:
                assert cmd.backup is not None
                self.landing = cmd
                try:
                    detail = world.restore(cmd.target, cmd.backup, cmd.intact)
                finally:
                    self.landing = None
                if detail.startswith("already"):
                    checker.command_effect(cmd, ())
            result = Outcome(True, detail)
        except StepError as exc:
            result = Outcome(False, f"minkms {cmd.step}: {exc}")
        cmd.effect = result.detail
        self.note(f"LANDS #{cmd.seq} {cmd.step} of {cmd.cert.action.id} by {cmd.issuer}: {result.detail}")
        waiter = self.waiters.pop(cmd.seq, None)
        if waiter is not None and cmd.waiting:
            issuer, incarnation, then = waiter
            agent = self.agents[issuer]
            self.schedule_for(issuer, self.t, agent.command_done, incarnation, cmd, result, then)

    def restore_effect(self, target: str, backup: backups.BackupInfo, intact: bool) -> None:
        """World.restore's hook, just before a restore takes effect."""
        if self.landing is not None:
            self.checker.command_effect(self.landing, (-1,))
        self.checker.restore_effect(target, backup, intact)

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
            self.schedule_for(dst, self.t + delay, self.deliver, src, dst, msg)

    def deliver(self, src: str, dst: str, msg: object) -> None:
        agent = self.touched = self.agents[dst]
        if agent.alive and self.connected(src, dst):
            agent.receive(src, msg)

    # -- faults ----------------------------------------------------------------------------------------------

    def fault(self) -> None:
        if not self.faulty:
            return
        cfg, rng = self.cfg, self.rng
        kinds: list[tuple[float, Callable[[], None]]] = [
            (cfg.crash_rate * cfg.agents, self.crash_random),
            (cfg.partition_rate, self.partition),
            (cfg.loss_rate, self.lose_state),
            (cfg.host_rate, self.kill_host),
            (cfg.pause_rate, self.pause),
            (cfg.freeze_rate * cfg.agents, self.freeze_random),
            (cfg.disk_rate * cfg.agents, self.stall_disk),
            (cfg.probe_hang_rate * len(cfg.node_names), self.hang_probe),
        ]
        total = sum(rate for rate, _ in kinds)
        pick = rng.uniform(0, total)
        for rate, action in kinds:
            if pick < rate:
                action()
                break
            pick -= rate
        self.schedule(self.t + rng.expovariate(total), self.fault)

    def crash(self, name: str, restart_after: tuple[float, float] = (0.5, 15.0)) -> None:
        a = self.agents[name]
        if a.alive:
            a.crash()
            self.stats["crashes"] += 1
            self.note(f"CRASH {name}")
            self.schedule(self.t + self.rng.uniform(*restart_after), self.restart, name)

    def crash_random(self) -> None:
        self.crash(self.rng.choice(self.cfg.names))

    def partition(self) -> None:
        if self.groups is None and self.cfg.agents > 1:
            sides = {name: self.rng.randrange(2) for name in self.cfg.names}
            self.groups = sides
            self.stats["partitions"] += 1
            self.note(
                f"PARTITION {sorted(k for k, v in sides.items() if v == 0)} | "
                f"{sorted(k for k, v in sides.items() if v == 1)}"
            )
            self.schedule(self.t + self.rng.uniform(1.0, 25.0), self.heal_partition)

    def _keeps_state(self) -> list[str]:
        return [n for n in self.cfg.node_names if self.world.healthy(n)]

    def lose_state(self) -> None:
        """At least one node keeps the cluster's state (a total loss is the scenario's, see `total_loss`)."""
        healthy = self._keeps_state()
        if len(healthy) >= 2:
            victim = self.rng.choice(healthy)
            self.world.lose_state(victim, self.t)
            self.stats["losses"] += 1
            self.note(f"STATE LOST on {victim}")

    def kill_host(self) -> None:
        """A host dies (agent and minkms) for long enough to be evicted; it may come back before or after."""
        healthy = self._keeps_state()
        if len(healthy) >= 2:
            victim = self.rng.choice(healthy)
            self.world.host_down(victim)
            self.agents[victim].crash()
            self.stats["host_deaths"] += 1
            self.note(f"HOST DOWN {victim}")
            self.schedule(self.t + self.rng.uniform(10.0, 90.0), self.host_back, victim)

    def host_back(self, name: str) -> None:
        if not self.world.nodes[name].up:
            self.world.host_up(name)
            self.note(f"HOST UP {name}")
            self.restart(name)

    def pause(self) -> None:
        """An operator runs `kmagent pause --for D` (or `resume`) on some live agent; reports spread it."""
        live = [a for a in self.agents.values() if a.alive and not a.frozen()]  # frozen: the CLI would hang
        if not live:
            return
        a = self.rng.choice(live)
        resume = a.wall() < a.disk.paused_until and self.rng.random() < 0.5
        a.disk.pause_epoch += 1
        a.disk.paused_until = 0.0 if resume else a.wall() + self.rng.uniform(3.0, 20.0)
        self.stats["pauses"] += 1
        self.note(f"{'RESUME' if resume else 'PAUSE'} on {a.name} (epoch {a.disk.pause_epoch})")

    # -- backups and the total loss (RESTORE) ---------------------------------------------------------------

    def write(self) -> None:
        self.world.write()
        self.schedule(self.t + self.cfg.write_every, self.write)

    def take_backup(self) -> None:
        """The HEALTHY anchor runs `minkms backup` every backup_every and pushes the copy to every agent (over
        the network); looked at every probe period, so that the first comes soon after an anchor exists."""
        anchor = self.current_anchor()
        due = self.t - self.last_backup >= self.cfg.backup_every
        awake = anchor is not None and not anchor.frozen()
        if due and awake and anchor is not None and not anchor.witness and self.world.healthy(anchor.name):
            self.last_backup = self.t
            created = anchor.wall()
            bid = backups.backup_id(created, anchor.name)
            commit = self.world.commit
            digest = hashlib.sha256(f"{bid}:{commit}".encode()).hexdigest()
            info = backups.BackupInfo(bid, created, commit, 1000 + commit, digest, anchor.name)
            anchor.keep_copy(info, True)
            anchor.broadcast(BackupCopy(info))
            self.stats["backups"] += 1
            self.note(f"BACKUP {bid} (commit {commit}) by {anchor.name}")
        self.schedule(self.t + self.cfg.probe, self.take_backup)

    def total_loss(self) -> None:
        """Every node loses its state, at once or one after the other; maybe one host dies too."""
        sc = self.scenario
        self.stats["total_losses"] += 1
        self.note("TOTAL LOSS begins")
        if sc.rot:
            self.rot_copy()
        names = list(self.cfg.node_names)
        self.rng.shuffle(names)
        if sc.dead:
            dead = names.pop()
            if sc.dead_loses:
                self.world.lose_state(dead, self.t)
            if self.world.nodes[dead].up:
                self.world.host_down(dead)
                self.agents[dead].crash()
                self.note(f"HOST DOWN {dead} ({'state lost' if sc.dead_loses else 'holding its state'})")
                self.schedule(max(sc.dead_back, self.t + 1.0), self.host_back, dead)
        for i, name in enumerate(names):
            self.schedule(self.t + sc.spread * i / max(1, len(names) - 1), self.lose_one, name)

    def lose_one(self, name: str) -> None:
        if self.world.holds_state(name):
            self.world.lose_state(name, self.t)
            self.stats["losses"] += 1
            self.note(f"STATE LOST on {name} (total loss)")

    def rot_copy(self) -> None:
        """One agent's copy of the freshest backup rots on its disk, when another agent holds it intact."""
        held = [(a, c) for a in self.agents.values() for c in a.disk.backups.values() if c.intact]
        if not held:
            return
        best = backups.newest_first(c.info for _, c in held)[0]
        holders = sorted(a.name for a, c in held if c.info == best)
        if len(holders) >= 2:
            victim = self.rng.choice(holders)
            self.agents[victim].disk.backups[best.id].intact = False
            self.note(f"ROT {victim}'s copy of {best.id}")

    def restore_pending(self) -> bool:
        """No node holds the cluster's state: only a RESTORE brings it back."""
        return self.stats["total_losses"] > 0 and not any(
            self.world.holds_state(n) for n in self.cfg.node_names
        )

    def operator_approve(self) -> None:
        """`kmagent restore --approve` on a random live agent, as agent/actions.py's `restore` does it (refused
        while a node serves in that agent's view, or without a backup); the operator tries again 10 s later
        while no node holds state and no approval is pending (an unused one, not expired)."""
        if not self.restore_pending():
            return
        live = [a for a in self.agents.values() if a.alive and not a.frozen()]
        pending = self.checker.unused_approval(self.t)
        if live and not pending:
            a = self.rng.choice(live)
            facts = a.facts(a.election.anchor_hint(a.clock(self.t)), a.clock(self.t))
            if _approvable(facts):
                epoch = max(
                    (x.disk.approval.epoch for x in self.agents.values() if x.disk.approval), default=0
                )
                approval = RestoreApproval(
                    epoch + 1, a.wall() + restore.APPROVAL_VALIDITY, f"operator on {a.name}"
                )
                a.disk.approval = approval
                self.checker.approved(approval, self.t)
                self.stats["approvals"] += 1
                self.note(f"OPERATOR approves the restore on {a.name} (epoch {approval.epoch})")
        self.schedule(self.t + 10.0, self.operator_approve)

    def restart(self, name: str) -> None:
        a, node = self.agents[name], self.world.nodes.get(name)
        if a.alive or (node is not None and not node.up):
            return  # a dead host's agent comes back with the host
        self.note(f"RESTART {name} with {a.disk.ballot}")
        a.start(self.t)

    def heal_partition(self) -> None:
        if self.groups is not None:
            self.note("PARTITION healed")
        self.groups = None

    def quiet(self) -> None:
        """Faults stop: the network heals and becomes reliable, hosts and agents come back, and the operator
        does their part: resumes automation, acknowledges escalations, starts a minkms left stopped by a failed
        action (a fenced node with its state, which no action will touch again)."""
        self.faulty = False
        self.heal_partition()
        for name, node in self.world.nodes.items():
            if not node.up:
                self.world.host_up(name)
            node.probe_hang_until = min(node.probe_hang_until, self.t)
        for name, a in self.agents.items():
            a.disk_until = min(a.disk_until, self.t)
            self.unfreeze(name, early=True)
        epoch = max(a.disk.pause_epoch for a in self.agents.values()) + 1
        in_flight = {
            j.action.target
            for a in self.agents.values()
            for j in a.disk.journal.values()
            if j.outcome is None
        }
        for name, a in self.agents.items():
            a.disk.pause_epoch, a.disk.paused_until = epoch, 0.0
            a.disk.escalated.clear()
            if not a.alive:
                self.restart(name)
        for name, node in self.world.nodes.items():
            if node.up and not node.running and node.data == STATE and name not in in_flight:
                node.running = True
                self.note(f"OPERATOR starts minkms on {name}")
        if self.scenario.total_loss_at is not None and not self.policy.auto_restore:
            self.schedule(self.t + OPERATOR_DELAY, self.operator_approve)
        self.note("QUIET: faults stopped")

    def unacknowledged(self) -> list[str]:
        """Nodes escalated since the faults stopped that no operator has been paged for yet."""
        escalated = {n for a in self.agents.values() if a.alive for n in a.disk.escalated}
        new = sorted(n for n in escalated - self.paged if self.pages[n] < MAX_PAGES)
        self.pages.update(new)
        return new

    def operator_ack(self, name: str) -> None:
        """`kmagent ack NODE` as the daemon does it: on every agent (reports carry it), the escalation released
        and the node's hourly budget started afresh."""
        for a in self.agents.values():
            a.disk.escalated.discard(name)
            a.disk.acks[name] = a.wall()
        self.paged.discard(name)
        self.note(f"OPERATOR acks {name}")

    # -- run -------------------------------------------------------------------------------------------------

    def excused(self, anchor: SimAgent | None) -> set[str]:
        """Nodes automation legitimately stopped for: escalated by the anchor once their budget was used; every
        node after a total loss when no agent holds an intact backup (restored by hand, docs/operations.md);
        every node when no member holds the cluster's state and a node out of the membership does (evicted while
        its host was down, then every member lost its state): it blocks the restore, as it may hold newer state
        than any backup, and only an operator can decide (`--accept-loss-of`, or rebuild from it by hand)."""
        if self.stranded() or (
            self.restore_pending()
            and not any(c.intact for a in self.agents.values() for c in a.disk.backups.values())
        ):
            return set(self.cfg.node_names)
        return set(anchor.disk.escalated) if anchor is not None else set()

    def stranded(self) -> bool:
        """After a total loss, the cluster's state is only on nodes out of the membership (evicted while their
        host was down): no automatic action applies (a REJOIN needs a HEALTHY member, the restore is blocked by
        a node that may hold newer state, and that node, live but out, is no restore candidate: there may be
        no anchor at all). An operator's matter: excused."""
        world = self.world
        if not self.stats["total_losses"] or any(world.holds_state(m) for m in world.members):
            return False
        return any(world.holds_state(n) for n in self.cfg.node_names)

    def current_anchor(self) -> SimAgent | None:
        return next(
            (a for a in self.agents.values() if a.alive and a.election.is_anchor(a.clock(self.t))), None
        )

    def run(self) -> Result:
        cfg = self.cfg
        for a in self.agents.values():
            a.start(0.0)
        self.schedule(self.rng.uniform(0, 5), self.fault)
        self.schedule(cfg.fault_period, self.quiet)
        self.schedule(cfg.write_every, self.write)
        self.schedule(cfg.probe, self.take_backup)
        if self.scenario.total_loss_at is not None:
            self.schedule(self.scenario.total_loss_at, self.total_loss)
        anchor_deadline = cfg.fault_period + liveness_bound(cfg)
        anchor_at: float | None = None
        healed_at: float | None = None
        heal_deadline = 0.0
        violation: str | None = None
        events = 0
        try:
            while self.queue:
                at, _, owner, fn, args = heapq.heappop(self.queue)
                self.t = at
                if owner is not None and self.agents[owner].frozen():
                    self.deferred.setdefault(owner, []).append((fn, args))
                    continue
                self.touched = None
                fn(*args)
                events += 1
                self.checker.after_event(self.touched)
                if self.faulty:
                    continue
                for name in self.unacknowledged():
                    # An escalation pages a human: they look, and `kmagent ack` it a little later.
                    self.paged.add(name)
                    self.schedule(self.t + OPERATOR_DELAY, self.operator_ack, name)
                    heal_deadline = max(heal_deadline, self.t + OPERATOR_DELAY + heal_bound(cfg))
                anchor = self.current_anchor()
                if anchor_at is None:
                    if anchor is not None:
                        anchor_at = at - cfg.fault_period
                        heal_deadline = at + heal_bound(cfg) * max(1, len(self.world.needs_care()))
                        if self.restore_pending():  # the restore replaces one node's REJOIN
                            heal_deadline += restore_bound(cfg) - heal_bound(cfg)
                            heal_deadline += 0.0 if self.policy.auto_restore else OPERATOR_DELAY
                    elif at > anchor_deadline:
                        if not cfg.liveness or self.stranded():
                            break
                        raise Violation(
                            f"liveness: no anchor within {liveness_bound(cfg):.1f}s after the faults stopped"
                        )
                    continue
                waiting = set(self.world.needs_care()) - self.excused(anchor)
                if not waiting:
                    healed_at = at - cfg.fault_period
                    break
                if at > heal_deadline:
                    if not cfg.liveness:
                        break
                    raise Violation(
                        f"liveness: {sorted(waiting)} not HEALTHY {heal_bound(cfg):.0f}s per node after an anchor"
                    )
            self.checker.histories_complete()
        except Violation as exc:
            violation = str(exc)
            self.note(f"VIOLATION {violation}")
        self.stats["events"] = events
        self.stats["rejoins"] = sum(1 for c in self.checker.certs.values() if c.action.kind == "REJOIN")
        self.stats["evicts"] = sum(1 for c in self.checker.certs.values() if c.action.kind == "EVICT")
        self.stats["restores"] = self.checker.restores
        self.stats["stranded"] = int(self.stranded())
        return Result(cfg, violation, events, self.trace, anchor_at, healed_at, self.stats)


@contextlib.contextmanager
def _guards_for(cfg: SimConfig) -> Iterator[None]:
    """TEST ONLY: a broken variant runs with one guard rail removed from the planner and every ack."""
    removed = GUARDS_REMOVED.get(cfg.broken or "")
    if removed is None:
        yield
        return
    saved = guards.RULES
    guards.RULES = tuple(r for r in saved if r[0] != removed)
    try:
        yield
    finally:
        guards.RULES = saved


def _approvable(facts: ClusterFacts) -> bool:
    serving = (NodeClass.HEALTHY, NodeClass.DEGRADED)
    if any(n.verdict is not None and n.verdict.cls in serving for n in facts.nodes):
        return False
    return backups.choose(dict(facts.backups)).backup is not None


def _oldest_choice(facts: ClusterFacts) -> backups.Choice:
    """TEST ONLY (`--broken oldest-backup`): the oldest backup any agent reports, not the freshest."""
    held = [b for _, h in facts.backups for b in h]
    if not held:
        return backups.Choice(None, (), "no agent holds an intact backup")
    oldest = backups.newest_first(held)[-1]
    return backups.Choice(oldest, tuple(backups.holders(dict(facts.backups), oldest.id)), "")


@contextlib.contextmanager
def _choice_for(cfg: SimConfig) -> Iterator[None]:
    if cfg.broken != "oldest-backup":
        yield
        return
    saved = restore.choice
    restore.choice = _oldest_choice
    try:
        yield
    finally:
        restore.choice = saved


def run(cfg: SimConfig, verbose: bool = False) -> Result:
    with _guards_for(cfg), _choice_for(cfg):
        return Simulation(cfg, verbose).run()


def describe(result: Result) -> str:
    r = result
    s = r.stats
    line = (
        f"seed {r.cfg.seed} agents {r.cfg.agents} witnesses {r.cfg.witnesses}: "
        f"{'OK' if r.ok else 'VIOLATION'}; {r.events} events, {s['crashes']} crashes, {s['partitions']} partitions, "
        f"{s['losses']} state losses, {s['host_deaths']} host deaths, {s['pauses']} pauses; "
        f"certified {s['rejoins']} REJOIN {s['evicts']} EVICT; {s['backups']} backups, "
        f"{s['total_losses']} total losses, {s['approvals']} approvals, {s['restores']} restored; {s['done']} done, {s['aborted']} aborted, "
        f"{s['failed']} failed, {s['escalations']} escalations; {s['freezes']} freezes, {s['disk_stalls']} disk "
        f"stalls, {s['probe_hangs']} probe hangs; {s['commands']} commands, {s['late_commands']} landed late, "
        f"{s['fenced']} fenced, {s['killed']} killed; "
        f"anchor {_secs(r.anchor_after_quiet)} and healed {_secs(r.healed_after_quiet)} after faults stopped"
    )
    if r.violation:
        line += f"\n  {r.violation}\n  replay: {r.cfg.replay()}"
    return line


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f}s"


__all__ = [
    "BROKEN_RULES",
    "Result",
    "SimConfig",
    "Simulation",
    "describe",
    "heal_bound",
    "liveness_bound",
    "run",
]
