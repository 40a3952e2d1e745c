"""The invariants of DESIGN §4 and §6, checked after every event and at the instant of each send, ack and step.

The checker keeps a ghost record that no agent can see: every certificate formed, every step that changed the
world (in order, per action), every destructive minkms command from its fence to its effect, and every action
recorded finished anywhere. Rules that depend on one agent's view (cooldown, budget, the anchor, the last healthy
member, min_members, the pause) are re-checked here, independently of `agent.core.guards`, on the data that agent
decided from, at the moment it proposed or acked.

Fencing (agent/core/fencing.py), from the truth, for every destructive command (remove, add, restore):
* it leaves only while its issuer holds its lease, unless the issuer froze right after its fence (the one gap no
  code can close: the command then leaves late, and what it names must fence it);
* when it lands, it changes only the node its certificate names, and a remove only the node id the certificate
  names (never the host's id of the moment: the host may have been re-added under a new id);
* if it lands after its issuer's lease, it changes nothing (fenced: the id is no longer a member, the host is a
  member already, the node restored already), or it lands on a node no other step or command has changed since
  its fence passed: as if it had landed just in time. A late command that changes a node someone else changed
  in the meantime is the hazard itself (the deposed anchor of the incident).
* rule 4, from the truth: a REJOIN never quarantines a member whose state and marker are intact (only a
  misreading could call for it: a blip frozen by a hung probe, issue 12);
* a node whose state is intact is never quarantined or removed by a REJOIN certified with an ack given while
  that node's newest reading of its storage, in truth, was older than an observation may be used for
  (`stall_margin`: `view.stale_after`, and the report's time in transit), its probe hanging or its agent
  frozen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.core import fencing, playbooks
from agent.core.agreement import certificate_problems
from agent.core.backups import BackupInfo
from agent.core.election import Ballot, quorum
from agent.core.facts import ClusterFacts
from agent.core.messages import Action, Certificate, RestoreApproval, VoteReply, VoteRequest
from agent.core.model import NodeClass
from agent.core.restore import APPROVAL_VALIDITY
from agent.core.view import stale_after
from tests.sim.base import CLUSTER, Command, sim_verify
from tests.sim.world import STATE

if TYPE_CHECKING:
    from tests.sim.node import SimAgent
    from tests.sim.sim import Simulation

HOUR = 3600.0


class Violation(Exception):
    pass


class Checker:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.lease_end: dict[str, float] = {}  # real time until which each agent believed its last lease
        self.certs: dict[str, Certificate] = {}
        self.proposer: dict[str, str] = {}  # action id -> the anchor that first certified it
        self.done: set[str] = set()  # recorded finished (done, failed or aborted) on some agent's disk
        # action id -> agents whose history records it: a close counts (is committed) once a quorum does
        self.recorded: dict[str, set[str]] = {}
        self.dropped: set[str] = set()  # dropped for a total loss or by its target: over at once
        self.steps: dict[str, list[int]] = {}  # action id -> indices of the steps run (begun), in order
        self.completed: dict[str, set[int]] = {}  # action id -> indices of the steps journaled done
        self.started: dict[
            str, list[float]
        ] = {}  # target -> real times its actions were certified (not resumed)
        self.approvals: list[tuple[RestoreApproval, float]] = []  # every operator approval, when given (real)
        self.restore_certs: list[tuple[str, float]] = []  # RESTORE ids, when first certified (real)
        self.restores = 0  # restores that took effect (a node got a backup's state)
        self.restored_at: float | None = None  # real time of the last one
        self.first_acked: dict[str, float] = {}  # action id -> real time of its first ack
        self.lease_since: dict[str, float] = {}  # real time each agent's current unbroken run of leases began
        self.stalled_acks: set[tuple[str, int]] = set()  # (REJOIN id, term) acked on a stalled target
        self.stalled_certs: set[tuple[str, int]] = set()  # (REJOIN id, term) certified with such an ack

    def fail(self, what: str) -> None:
        raise Violation(f"t={self.sim.t:.3f}: {what}")

    def _valid(self, cert: Certificate) -> list[str]:
        cfg = self.sim.cfg
        return certificate_problems(cert, CLUSTER, cfg.names, quorum(cfg.agents), sim_verify)

    # -- after every event -----------------------------------------------------------------------------------

    def after_event(self, touched: SimAgent | None) -> None:
        """Leases: exact, since a lease only starts or grows in an event of its own agent (a tick or a delivered
        reply) and between events beliefs only expire; so checking the touched agent (all after a fault)
        suffices. Membership: never more than one configured node out of it (rule 2)."""
        t = self.sim.t
        for a in self.sim.agents.values() if touched is None else (touched,):
            if not a.alive:
                continue
            now = a.clock(t)
            if not a.election.is_anchor(now):
                continue
            if self.lease_end.get(a.name, -1.0) < t - 1e-9:
                self.lease_since[a.name] = t
            for other, end in self.lease_end.items():
                if other != a.name and end > t + 1e-9:
                    self.fail(
                        f"two anchors: {a.name} holds a lease (term {a.election.ballot.term}) while {other}'s "
                        f"lease lasts until t={end:.3f}"
                    )
            self.lease_end[a.name] = t + a.election.lease_remaining(now) / a.rate
        world = self.sim.world
        out = [n for n, node in world.nodes.items() if n not in world.members and node.data == STATE]
        if len(out) > 1:
            self.fail(
                f"rule 2: {len(out)} nodes that may hold state are out of the membership: {', '.join(out)}"
            )

    # -- elections -------------------------------------------------------------------------------------------

    def vote_sent(self, agent: SimAgent, reply: VoteReply, req: VoteRequest) -> None:
        if agent.disk.ballot != Ballot(reply.term, req.candidate):
            self.fail(
                f"{agent.name} sent a grant for term {reply.term} to {req.candidate} but persisted {agent.disk.ballot}"
            )

    # -- decisions (rules 3, 5, 6, 7), on the deciding agent's own facts ---------------------------------------

    def proposed(self, agent: SimAgent, action: Action, facts: ClusterFacts) -> None:
        self._paused(agent, "proposed", action, facts)

    def ack_given(self, agent: SimAgent, action: Action, facts: ClusterFacts, resume: bool) -> None:
        self.first_acked.setdefault(action.id, self.sim.t)
        if action.kind == "REJOIN" and self.sim.stalled_for(action.target) > self.stall_margin():
            self.stalled_acks.add((action.id, facts.term))
        self._paused(agent, "acked", action, facts)
        if action.kind not in playbooks.TABLES:
            self.fail(f"rule 5: {agent.name} acked {action.kind}, which the simulation does not model")
        restoring = action.kind == "RESTORE"  # runs on the anchor, when no node is HEALTHY (rule 5 below)
        if action.target == facts.anchor and not restoring:
            self.fail(f"rule 3: {agent.name} acked {action.kind} of the anchor {action.target}")
        if resume:
            return  # a resume is licensed by the certificate it continues (see agent.core.guards)
        members = [n for n in facts.nodes if n.is_member and n.verdict is not None]
        healthy = [n for n in members if n.verdict is not None and n.verdict.cls is NodeClass.HEALTHY]
        if not restoring and not any(n.name != action.target for n in healthy):
            self.fail(f"rule 3: {agent.name} acked {action.kind} {action.target}, the last HEALTHY member")
        target = facts.node(action.target)
        dead = (
            target is not None and target.verdict is not None and target.verdict.cls is NodeClass.UNREACHABLE
        )
        if action.kind == "EVICT" and dead and target is not None and target.is_member:
            left = len(members) - 1
            if left < facts.policy.min_members:
                self.fail(
                    f"rule 3: {agent.name} acked EVICT {action.target}, leaving {left} members "
                    f"(min_members {facts.policy.min_members})"
                )
        starts = [e.started_wall for e in facts.history if e.target == action.target]
        # docs/operations.md: the REJOIN after an EVICT that made room does not wait out the cooldown
        recent = [
            e.started_wall
            for e in facts.history
            if e.target == action.target
            and facts.wall_now - e.started_wall < facts.timings.cooldown
            and not (action.kind == "REJOIN" and e.kind == "EVICT")
        ]
        if recent:
            self.fail(
                f"rule 6: {agent.name} acked {action.kind} {action.target} {facts.wall_now - max(recent):.1f}s "
                f"after the last action on it (cooldown {facts.timings.cooldown:g}s)"
            )
        used = sum(1 for s in starts if facts.wall_now - s < HOUR)
        if used >= facts.policy.actions_per_hour:
            self.fail(f"rule 6: {agent.name} acked a {used + 1}th action on {action.target} within an hour")

    def escalated(self, agent: SimAgent, node: str, facts: ClusterFacts) -> None:
        used = sum(1 for e in facts.history if e.target == node and facts.wall_now - e.started_wall < HOUR)
        if used < facts.policy.actions_per_hour:
            self.fail(
                f"rule 6: {agent.name} escalated {node} with {used} actions in the hour (budget not used)"
            )

    def _paused(self, agent: SimAgent, what: str, action: Action, facts: ClusterFacts) -> None:
        if facts.wall_now < facts.paused_until:
            self.fail(f"rule 7: {agent.name} {what} {action.id} while paused")

    # -- certificates and steps (rules 1, 2, 3, 8, and step order) ---------------------------------------------

    def certified(self, anchor: SimAgent, cert: Certificate, resume: bool) -> None:
        if problems := self._valid(cert):
            self.fail(f"invalid certificate formed for {cert.action.id}: {problems}")
        if cert.action.target == anchor.name and cert.action.kind != "RESTORE":
            self.fail(f"rule 3: {anchor.name} certified {cert.action.kind} of itself, the anchor")
        if cert.action.kind == "RESTORE" and cert.action.id not in self.certs:
            self._restore_certified(cert.action)
        others = [i for i in self.certs if i != cert.action.id and i not in self.done]
        if others:
            self.fail(
                f"rule 2: two certificates for different unfinished actions: {others[0]} and {cert.action.id}"
            )
        self.certs.setdefault(cert.action.id, cert)
        self.proposer.setdefault(cert.action.id, anchor.name)
        if (cert.action.id, cert.term) in self.stalled_acks:
            self.stalled_certs.add((cert.action.id, cert.term))

    def stall_margin(self) -> float:
        """Real seconds past which an observation is STALLED for everyone (fix (c)): older than `stale_after`
        (peer_timeout + command_timeout + probe: the longest a working observation loop leaves it) on the clock of
        whoever judges it, give or take the drift, plus the report's time in transit, which its receiver cannot
        see."""
        cfg = self.sim.cfg
        stale = stale_after(cfg.peer_timeout, cfg.probe, cfg.command_timeout)
        return stale / (1 - cfg.drift) + cfg.late_delay

    def _intact(self, name: str) -> bool:
        node = self.sim.world.nodes[name]
        return node.data == STATE and node.marker_ok

    def _stalled_cert(self, cert: Certificate, what: str) -> None:
        target = cert.action.target
        if (cert.action.id, cert.term) in self.stalled_certs and self._intact(target):
            self.fail(
                f"stalled: {what} {target}, whose state is intact, for {cert.action.id} (term {cert.term}), acked "
                f"while {target}'s newest observation was over {self.stall_margin():.1f}s old (its probe hung or "
                "its agent frozen)"
            )

    def step_run(self, agent: SimAgent, cert: Certificate, step: playbooks.Step) -> None:
        """Called just before a step changes the world (target steps on the target, the others on the anchor)."""
        action = cert.action
        problems = self._valid(cert)
        if step.destructive and (action.id not in self.certs or problems):
            self.fail(
                f"rule 1: {step.name} of {action.id} on {agent.name} without a valid certificate: {problems}"
            )
        if step.runs_on == "target" and action.target != agent.name:
            self.fail(f"rule 1: {agent.name} ran {step.name} of {action.id}, which names {action.target}")
        if self.committed(action.id):
            self.fail(f"{agent.name} ran {step.name} of {action.id} after its close counted")
        names = [s.name for s in playbooks.steps(action.kind)]
        i = names.index(step.name)
        ran = self.steps.setdefault(action.id, [])
        last, progress = max(ran, default=-1), max(self.completed.get(action.id, ()), default=-1)
        if i < progress:
            self.fail(
                f"{agent.name} ran {step.name} of {action.id} behind its journaled progress "
                f"({names[progress]} done)"
            )
        if i > last + 1:
            self.fail(f"{agent.name} ran {step.name} of {action.id} before {names[last + 1]}")
        ran.append(i)
        node = self.sim.world.nodes[action.target] if step.runs_on == "target" else None
        if step.name == "quarantine" and node is not None and not node.running:
            self._stalled_cert(cert, f"{agent.name} quarantines")
            members = self.sim.world.members
            if action.kind == "REJOIN" and action.target in members and self._intact(action.target):
                self.fail(
                    f"rule 4: {agent.name} quarantines the intact state of {action.target}, a member with its "
                    f"state and marker (node {members[action.target]}), for {action.id}"
                )

    # -- destructive minkms commands (fencing) ----------------------------------------------------------------

    def command_left(self, agent: SimAgent, cmd: Command) -> None:
        """A command leaves: its issuer holds its lease, unless it froze right after its fence. A target step a
        remote anchor requested (a RESTORE's restore resumed by another anchor) runs under that anchor's lease,
        which the target cannot read: it checks that it follows that anchor, not deposed (`execution.deposed`),
        and the checker judges such a command by its effect only."""
        if cmd.frozen or cmd.holder != agent.name:
            return  # the gap no code can close: what the command names must fence it (command_effect)
        if not agent.election.is_anchor(agent.clock(self.sim.t)):
            end = self.lease_end.get(agent.name)
            ended = f"ended at t={end:.3f}" if end is not None else "never held"
            self.fail(
                f"fencing: {agent.name} sends {cmd.step} of {cmd.cert.action.id} without its lease ({ended}), "
                f"checked at t={cmd.checked_at:.3f}"
            )

    def command_effect(self, cmd: Command, changes: tuple[int, ...]) -> None:
        """Just before a command changes the world (`changes`: the ids a remove takes out; (-1,) for an add or a
        restore that takes effect; empty: it changes nothing, fenced by what it names)."""
        if not changes:
            return
        sim, t = self.sim, self.sim.t
        world, action = sim.world, cmd.cert.action
        host = world.nodes[action.target].host
        what = f"{cmd.step} #{cmd.seq} of {action.id} sent by {cmd.issuer} at t={cmd.left_at:.3f}"
        if cmd.step == "remove":
            certified = fencing.certified_node_id(action)
            for nid in changes:
                if nid != certified or world.hosts_of[nid] != host:
                    self.fail(
                        f"fencing: {what} removes node {nid} ({world.hosts_of[nid]}); its certificate names "
                        f"node {certified} ({host})"
                    )
            self._stalled_cert(cmd.cert, f"{cmd.issuer}'s remove takes")
            if action.kind == "EVICT" and world.nodes[action.target].data == STATE:
                left = len(world.members) - len(changes)
                if left < sim.cfg.min_members:
                    self.fail(
                        f"rule 3: EVICT {action.target} leaves {left} members (min_members {sim.cfg.min_members})"
                    )
        holds = (
            self.lease_since.get(cmd.holder, float("inf")) <= cmd.checked_at
            and self.lease_end.get(cmd.holder, -1.0) >= t
        )
        touched = world.touched.get(action.target, -1.0)
        if not holds and touched > cmd.checked_at:
            self.fail(
                f"fencing: {what} lands after the lease it was sent under ({cmd.holder}'s, to t={cmd.lease_end:.3f}) and changes "
                f"{action.target}, which another step changed at t={touched:.3f}, after its fence (t={cmd.checked_at:.3f})"
            )

    # -- RESTORE (rule 5), from the world's truth and the operator's record ---------------------------------

    def approved(self, approval: RestoreApproval, t: float) -> None:
        self.approvals.append((approval, t))

    def unused_approval(self, t: float) -> RestoreApproval | None:
        """The operator's latest approval while it has not expired and no RESTORE was certified since."""
        if not self.approvals:
            return None
        approval, given = self.approvals[-1]
        if t - given >= APPROVAL_VALIDITY or any(at >= given for _, at in self.restore_certs):
            return None
        return approval

    def _restore_certified(self, action: Action) -> None:
        """At a RESTORE's first certification (a resume of one never certified too): armed, by the policy or an
        approval not used before; an automatic one with every node's state lost for restore_after (real time,
        less the clock drift); no node holding state but those the approval accepts the loss of; and the
        backup no older than the freshest intact copy any live agent holds."""
        sim, t = self.sim, self.sim.t
        params = dict(action.params)
        by = params.get("requested_by")
        given = next(((a, at) for a, at in reversed(self.approvals) if a.by == by), None)
        self._no_state_held(action.id, action.target, given[0].accept_loss_of if given else ())
        if by is None:
            if not sim.policy.auto_restore:
                self.fail(f"rule 5: {action.id} certified unarmed (no auto_restore, no operator approval)")
            self._lost_for_long(f"automatic {action.id} certified")
        elif given is None:
            self.fail(f"rule 5: {action.id} names an approval by {by!r} that no operator gave")
        elif t - given[1] >= APPROVAL_VALIDITY or any(c >= given[1] for _, c in self.restore_certs):
            self.fail(f"rule 5: {action.id} certified on an approval that expired or was used already")
        self.restore_certs.append((action.id, t))
        fresh = self._freshest_intact()  # same commit, same state: which of two such backups does not matter
        if fresh is not None and int(params.get("commit", "-1")) < fresh.commit:
            self.fail(
                f"rule 5: {action.id} restores {params.get('backup')} (commit {params.get('commit')}) while "
                f"{fresh.id} (commit {fresh.commit}) is held intact by a live agent"
            )

    def _lost_for_long(self, what: str) -> None:
        """Every node's state lost for restore_after (real time, less the clock drift), from the world's truth."""
        sim, t = self.sim, self.sim.t
        needed = sim.cfg.restore_after / (1 + sim.cfg.drift)
        for name in sim.cfg.node_names:
            lost = sim.world.nodes[name].lost_at
            if lost is None or t - lost < needed:
                since = "holds state" if lost is None else f"lost {t - lost:.1f}s ago"
                self.fail(f"rule 5: {what} while {name} {since} (restore_after)")

    def superseded(self, agent: SimAgent, action: Action) -> None:
        """An agent dropped an unfinished REJOIN or EVICT for a total loss (released its ack or closed its
        journal): only when, in truth, every node's state has been lost for restore_after (the simulated operator
        accepts no node's loss). From then on the action counts as finished: no step of it may run again, and
        it no longer stands in the way of another certificate (rule 2). Checked at the first drop: a later one,
        by an agent whose view lags (reports take a round to arrive), releases an action that is over already;
        so is an action acked before a restore took effect, which that restore superseded in truth (seed 2624:
        a held ack dropped a second after the restore, by an agent back from the dead)."""
        if action.kind not in ("REJOIN", "EVICT"):
            self.fail(f"{agent.name} superseded {action.kind} {action.id}: only a REJOIN or EVICT may be")
        acked = self.first_acked.get(action.id)
        before_restore = self.restored_at is not None and acked is not None and acked < self.restored_at
        if action.id not in self.done and not before_restore:
            self._lost_for_long(f"{agent.name} superseded {action.id}")
        self.done.add(action.id)
        self.dropped.add(action.id)

    def dropped_by_target(self, agent: SimAgent, action: Action) -> None:
        """The anchor dropped an unfinished EVICT of its own node (`execution.dropped_by_target`): only while, in
        truth, that node is still a member with its state (its remove never ran). From then on it is over."""
        world = self.sim.world
        if action.kind != "EVICT" or action.target != agent.name:
            self.fail(
                f"{agent.name} dropped {action.kind} {action.id} of {action.target}: only an EVICT of itself"
            )
        if agent.name not in world.members or not world.holds_state(agent.name):
            self.fail(f"{agent.name} dropped {action.id} although its node was removed or lost its state")
        self.done.add(action.id)
        self.dropped.add(action.id)

    def _no_state_held(self, what: str, target: str, accepted: tuple[str, ...]) -> None:
        world = self.sim.world
        holding = [n for n in world.nodes if world.holds_state(n) and n not in accepted]
        if holding:
            self.fail(f"rule 5: {what} on {target} while {', '.join(holding)} holds the cluster's state")

    def _freshest_intact(self) -> BackupInfo | None:
        held = [
            c.info for a in self.sim.agents.values() if a.alive for c in a.disk.backups.values() if c.intact
        ]
        return max(held, key=lambda b: b.commit, default=None)

    def restore_effect(self, target: str, backup: BackupInfo, intact: bool) -> None:
        """Just before a node gets a backup's state: from an intact copy, no node holding state, and once."""
        if not intact:
            self.fail(f"rule 5: {target} restores {backup.id} from a corrupt copy")
        approval = next((a for a, _ in reversed(self.approvals)), None)
        self._no_state_held(
            f"the restore of {backup.id}", target, approval.accept_loss_of if approval else ()
        )
        self.restores += 1
        self.restored_at = self.sim.t
        if self.restores > self.sim.stats["total_losses"]:
            self.fail(f"rule 5: {target} restores {backup.id}: a second restore for one total loss")

    def step_done(self, cert: Certificate, step: playbooks.Step) -> None:
        """A step's outcome was journaled done: from now on no earlier step of its action may run."""
        names = [s.name for s in playbooks.steps(cert.action.kind)]
        self.completed.setdefault(cert.action.id, set()).add(names.index(step.name))

    def finished(self, agent: SimAgent, action_id: str) -> None:
        self.done.add(action_id)
        self.recorded.setdefault(action_id, set()).add(agent.name)

    def committed(self, action_id: str) -> bool:
        """No step of an action runs again once its close counts: recorded by a quorum of agents (a resume needs
        a quorum's acks, and one of them refuses it: guard rule `finished`), or dropped. A close fewer recorded
        (an anchor cut off, then dead: seed 471) may be resumed, its steps idempotent and fenced."""
        recorded = len(self.recorded.get(action_id, ()))
        return action_id in self.dropped or recorded >= quorum(self.sim.cfg.agents)

    def histories_complete(self) -> None:
        """Rule 8: every finished action that changed something is in some agent's history with its certificate."""
        for action_id in self.steps:
            if action_id not in self.done:
                continue
            entries = [
                e for a in self.sim.agents.values() for e in a.disk.history if e.action.id == action_id
            ]
            if not entries:
                self.fail(f"rule 8: {action_id} ran steps and finished, but no agent's history has it")
            for e in entries:
                if e.cert.action != e.action or self._valid(e.cert):
                    self.fail(f"rule 8: the history entry of {action_id} carries no valid certificate for it")
