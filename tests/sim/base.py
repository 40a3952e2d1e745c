"""What every part of the simulator shares: its configuration, bounds, sim-only messages and signatures."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.core.backups import BackupInfo
from agent.core.election import Election, ElectionTimings
from agent.core.messages import Ack, Certificate, StepReply, VoteRequest
from agent.core.settings import Timings

CLUSTER = "sim"
BROKEN_RULES = (
    "ignore-promise",  # a voter that ignores its promise (election)
    "skip-fsync",  # a shell that sends a grant it did not persist (election)
    "no-margin",  # a candidate that counts its lease from the grant (election)
    "no-min-members",  # guards without rule min-members (planner and every ack)
    "no-cooldown",  # guards without rule cooldown
    "no-pause",  # guards without rule paused
    "no-one-removed",  # guards without rule one-removed
    "rerun-anchor-steps",  # a resuming anchor that re-runs anchor steps the target's progress shows done
    "no-restore-guard",  # guards without rule restore (guard rail 5)
    "oldest-backup",  # a restore that picks the oldest intact backup instead of the freshest
    "no-fetch-check",  # a RESTORE's fetch that uses its local copy without checking its sha256
    "remove-by-current-id",  # the anchor's remove takes the host's id when it is sent, not the certified one
    "no-lease-check",  # no fence before a destructive command leaves, nor while it runs (the step's own check only)
    "no-stall-age",  # observations without an age: a hung probe keeps reporting its last reading, never STALLED
    "no-adoption",  # no unmarked note: a REJOIN's late add leaves a member without a marker (STATE_LOST)
)
"""Deliberately broken variants, for tests that prove the checker catches each kind of violation."""

STEP_WAIT = 2.0
"""Probe periods the anchor waits for a step's reply before it counts the attempt as failed (the daemon's HTTP
timeout, compressed); the verify step waits 3 times as long for its condition."""


@dataclass(frozen=True)
class SimConfig:
    seed: int = 0
    agents: int = 3
    witnesses: int = 0  # the last `witnesses` agents have no minkms node: they vote, never lead
    timings: ElectionTimings = field(default_factory=ElectionTimings)
    drift: float = 0.05  # clock rate error bound; must be <= timings.max_drift for safety
    probe: float = 2.0  # report / tick interval (agent clock)
    peer_timeout: float = 5.0  # a report is fresh this long after receipt (agent clock)
    state_lost_after: float = 5.0
    evict_after: float = 30.0  # the config's floor
    cooldown: float = 15.0
    budget: int = 4  # actions per node per hour
    min_members: int = 2
    wall_skew: float = 0.5  # each agent's wall clock is off by up to this (NTP-level), real seconds
    delay: tuple[float, float] = (0.005, 0.4)  # normal one-way delay, real seconds
    late_delay: float = 4.0  # occasional very late delivery (faults phase only), real seconds
    drop: float = 0.08
    duplicate: float = 0.04
    late: float = 0.03
    fault_period: float = 60.0  # faults happen in [0, fault_period); then the network and agents heal
    crash_rate: float = 0.02  # an agent crashes, per agent per second
    partition_rate: float = 0.03  # per second
    loss_rate: float = 0.04  # a node loses its state, per second (at least one node always keeps state)
    host_rate: float = 0.01  # a host dies (agent and minkms) until after evict_after, per second
    pause_rate: float = 0.01  # an operator pauses automation on some agent, per second
    persist_fail: float = 0.02  # an fsync fails (the agent must then refuse / not stand)
    step_fail: float = 0.05  # a step fails although its precondition holds (faults phase only)
    step_crash: float = 0.04  # the agent running a step crashes right after its intent / its effect
    restore_after: float = 20.0  # every node STATE_LOST this long before an automatic restore
    total_loss: float = 0.3  # share of seeds in which every node loses its state once (RESTORE)
    backup_every: float = 10.0  # a HEALTHY anchor takes a backup this often (real seconds)
    write_every: float = 1.0  # a client write commits this often while the cluster takes writes
    # Destructive minkms commands (remove, add, restore) take effect a while after they leave (faults phase):
    # most within half a second, `slow_command` of them within 0.5-5 s, `stuck_command` of them 1-2.5 leases
    # later (past their timeout, the agent's minkms.command_timeout: killed, in doubt, they land all the same).
    command_timeout: float = 10.0
    slow_command: float = 0.12
    stuck_command: float = 0.03
    # Stalls (faults phase; all end when the faults stop). An agent process freezes (no ticks, no messages, its
    # clock runs on), per agent per second, and within a destructive command, before its fence or right after
    # it (the command then leaves when it wakes: the worst case the fencing must survive).
    freeze_rate: float = 0.004
    freeze_in_command: float = 0.06
    long_freeze: float = 0.1  # share of freezes and disk stalls that last 20-60 s (the rest: 0.5-20 s)
    disk_rate: float = 0.004  # an agent's durable writes stop returning for a while, per agent per second
    probe_hang_rate: float = 0.006  # a node's storage probe hangs for a while, per node per second
    probe_blip: float = 0.5  # share of those hangs that begin with one misread (the storage path looks empty)
    broken: str | None = None
    liveness: bool = True  # False: stop quietly at the heal deadline (safety-only sweeps)

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

    @functools.cached_property
    def node_names(self) -> tuple[str, ...]:
        return self.names[: self.agents - self.witnesses]

    @functools.cached_property
    def agent_timings(self) -> Timings:
        return Timings(
            probe_interval=self.probe,
            peer_timeout=self.peer_timeout,
            lease=self.timings.lease,
            state_lost_after=self.state_lost_after,
            evict_after=self.evict_after,
            cooldown=self.cooldown,
            restore_after=self.restore_after,
        )

    def replay(self) -> str:
        cmd = f"python -m tests.sim --seed {self.seed} --agents {self.agents} --witnesses {self.witnesses}"
        if self.drift != SimConfig.drift:
            cmd += f" --drift {self.drift}"
        for name in TUNABLE:
            if getattr(self, name) != getattr(SimConfig, name):
                cmd += f" --set {name}={getattr(self, name)!r}"
        if self.broken:
            cmd += f" --broken {self.broken}"
        return cmd + " -v"


TUNABLE = tuple(
    f.name
    for f in dataclasses.fields(SimConfig)
    if f.type in ("float", "int") and f.name not in ("seed", "agents", "witnesses", "drift")
)
"""Numeric settings `python -m tests.sim --set NAME=VALUE` takes (a replay names those that differ)."""


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


def restore_bound(cfg: SimConfig) -> float:
    """Real seconds, once an anchor holds the lease, within which an armed total-failure RESTORE must be done.

    Every node must be seen STATE_LOST for restore_after (an approval waives it) after a report reaches the
    anchor (peer_timeout), a cooldown from the target's last action may still run, then a proposal, the acks
    (a probe period) and the seven steps, all on the anchor itself and so in one round, unless a crash or a
    lost lease interrupts them (a lease and a back-off, and a few probe periods to resume)."""
    t = cfg.timings
    local = cfg.restore_after + cfg.peer_timeout + cfg.cooldown + 10 * cfg.probe
    return (local + t.lease + t.backoff_max) / (1 - cfg.drift)


def heal_bound(cfg: SimConfig) -> float:
    """Real seconds, once an anchor holds the lease, within which each node needing care must be HEALTHY.

    Per node: its class must be seen for state_lost_after (or, for a returning EVICTED node, at once) after a
    report reaches the anchor (peer_timeout), a cooldown from its last action may still run, then a proposal,
    the acks (a probe period), seven steps (the target's four each a round trip at the next probe, the
    anchor's at once, verify once the target reports HEALTHY: about 8 probe periods), and the anchor's
    lease renewals in between (a lost lease costs one election: a lease and a back-off)."""
    t = cfg.timings
    local = cfg.state_lost_after + cfg.peer_timeout + cfg.cooldown + 10 * cfg.probe
    return (local + t.lease + t.backoff_max) / (1 - cfg.drift)


# -- test-only broken variants of the real election ------------------------------------------------------------


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


ELECTIONS: dict[str, type[Election]] = {
    "ignore-promise": PromiseBreakingElection,
    "no-margin": NoMarginElection,
}
GUARDS_REMOVED = {
    "no-restore-guard": "restore",
    "no-min-members": "min-members",
    "no-cooldown": "cooldown",
    "no-pause": "paused",
    "no-one-removed": "one-removed",
}


# -- sim-only messages: what the daemon's HTTP exchanges carry implicitly ---------------------------------------


@dataclass(frozen=True)
class BackupCopy:
    """The anchor pushes each backup it takes to every agent (the daemon's copy, sha256 checked on arrival)."""

    info: BackupInfo
    intact: bool = True


@dataclass
class Command:
    """A destructive minkms command from the moment its fence passed: what it names, who sent it under which
    lease, and what it did when it landed. The checker's record (`Checker.command_left`, `command_effect`)."""

    seq: int
    issuer: str  # the agent that sent it
    holder: str  # whose lease it runs under: the issuer, or the anchor that requested the target step
    cert: Certificate
    step: str  # remove | add | restore
    target: str  # the node its certificate names
    ids: tuple[int, ...]  # remove: the minkms node ids it names
    checked_at: float  # real time its fence passed (or, without one, its step's own lease check)
    lease_end: float  # real time the holder's lease ended as it believed at that check (-1: no lease)
    frozen: bool = False  # the issuer froze between the check and the send
    left_at: float = 0.0  # real time it left
    lands_at: float = 0.0  # real time minkms applies it
    waiting: bool = True  # the issuer still waits for it (False: killed at its timeout, in doubt)
    effect: str = ""  # what it did when it landed
    backup: BackupInfo | None = None  # restore: the backup it restores, and whether the file was intact
    intact: bool = True


@dataclass(frozen=True)
class StepAnswer:
    """The reply to a StepRequest, with what it answers (HTTP pairs them; the sim's network does not)."""

    action_id: str
    step: str
    reply: StepReply


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
