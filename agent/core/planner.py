"""The decision table (what the anchor proposes next) and `explain` (why, and who would agree). Pure.

One action at a time. An unfinished action always comes first (a new anchor resumes and re-certifies it before
anything else). Then EVICT of an UNREACHABLE member (minkms writes need every member, so a dead member blocks
the add of every REJOIN), then REJOIN in config order. Every candidate goes through `guards.check`, the same
rules each agent applies to its ack, so the planner never proposes what a quorum would have to refuse.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from agent.core import restore
from agent.core.classify import Verdict, human_duration
from agent.core.facts import ClusterFacts, NodeFacts
from agent.core.guards import (
    Refusal,
    check,
    evaluate,
    expected_params,
    makes_room,
    should_escalate,
    threshold,
    wanted_kind,
)
from agent.core.messages import Action, Report
from agent.core.model import NodeClass

__all__ = [
    "AgentLine",
    "Considered",
    "Decision",
    "Explanation",
    "NodeLine",
    "RuleLine",
    "action_id",
    "candidates",
    "decide",
    "explain",
    "render",
]

_PRIORITY = ("EVICT", "REJOIN")


@dataclass(frozen=True)
class Considered:
    """One candidate action and every rule that refused it (empty: allowed)."""

    action: Action
    refusals: tuple[Refusal, ...]


@dataclass(frozen=True)
class Decision:
    action: Action | None  # what to propose (or resume) now; None: nothing
    reason: str  # one human line
    refusals: tuple[Considered, ...]  # every candidate considered, in priority order
    evidence: tuple[str, ...]  # per node: its class, for how long, and why
    escalate: tuple[str, ...] = ()  # nodes that used their budget and need an action: mark them ESCALATED


def action_id(kind: str, target: str, term: int, wall_now: float) -> str:
    """Unique across anchors (one anchor per term, one proposal at a time) and readable in history."""
    return f"{kind.lower()}-{target}-{term}-{round(wall_now * 1000)}"


def candidates(facts: ClusterFacts) -> tuple[Action, ...]:
    """Every action a node's class calls for, thresholds aside: a total-failure RESTORE (agent.core.restore), then
    EVICTs, then REJOINs, each in config order. A failed member that must make room for another node's REJOIN is
    evicted first (see guards.makes_room)."""
    wanted = [("EVICT" if makes_room(n, facts) else wanted_kind(n), n) for n in facts.nodes]
    restoring = restore.proposal(facts)
    return ((restoring,) if restoring is not None else ()) + tuple(
        Action(action_id(kind, n.name, facts.term, facts.wall_now), kind, n.name, expected_params(n))
        for priority in _PRIORITY
        for kind, n in wanted
        if kind == priority
    )


def decide(facts: ClusterFacts) -> Decision:
    """The next action for the anchor to propose (or resume), and why."""
    evidence = tuple(_evidence(n) for n in facts.nodes if n.verdict is not None)
    escalate = tuple(n.name for n in facts.nodes if should_escalate(n.name, facts))
    if facts.unfinished is not None:
        action = facts.unfinished
        refusals = tuple(check(action, facts))
        reason = (
            f"unfinished {_describe(action)} cannot be resumed: {_join(refusals)}"
            if refusals
            else f"resume unfinished {_describe(action)}: it comes before anything else"
        )
        only = (Considered(action, refusals),)
        return Decision(None if refusals else action, reason, only, evidence, escalate)

    considered = tuple(Considered(a, tuple(check(a, facts))) for a in candidates(facts))
    chosen = next((c for c in considered if not c.refusals), None)
    if chosen is not None:
        node = facts.node(chosen.action.target)
        why = _evidence(node) if node is not None else ""
        reason = f"{_describe(chosen.action)}: {why}"
    elif considered:
        first = considered[0]
        reason = f"nothing allowed yet; next in line is {_describe(first.action)}: {_join(first.refusals)}"
    else:
        reason = "nothing to do: no node needs an action"
    return Decision(chosen.action if chosen else None, reason, considered, evidence, escalate)


# ---------------------------------------------------------------------------------------------------------------
# explain


@dataclass(frozen=True)
class NodeLine:
    name: str
    host: str | None
    cls: str | None  # None for a witness
    reason: str
    held_seconds: float
    member: bool
    node_id: int | None
    wants: str | None  # the action its class calls for
    needs_seconds: float | None  # how long the class must hold first


@dataclass(frozen=True)
class RuleLine:
    rule: str
    ok: bool
    reason: str  # why it refuses; "" when it allows


@dataclass(frozen=True)
class AgentLine:
    agent: str
    agrees: bool
    reason: str  # why it would refuse; "" when it would agree
    source: str  # "own view", "its report", or "no fresh report"


@dataclass(frozen=True)
class Explanation:
    """What would happen next and why; plain data (dataclasses.asdict gives the --json form)."""

    me: str
    decision: Decision
    candidate: Action | None  # the action the rules and the agents are judged on
    nodes: tuple[NodeLine, ...]
    thresholds: tuple[tuple[str, float], ...]
    rules: tuple[RuleLine, ...]
    agents: tuple[AgentLine, ...]
    quorum: int
    agreeing: int
    paused_for: float  # seconds of pause left; 0: not paused
    restore: str | None = None  # while no node holds state: the backup, what is lost, and the command

    @property
    def quorum_reached(self) -> bool:
        return self.candidate is not None and self.agreeing >= self.quorum


def explain(facts: ClusterFacts, reports_by_agent: Mapping[str, Report]) -> Explanation:
    """`decide`, with everything behind it, and which agents would ack the candidate.

    `reports_by_agent` holds the *fresh* peer reports only (a stale one cannot be asked). A peer's answer is
    predicted from the `views` in its report (its own class of each node and how long it held there), its
    pause state and its in-flight action, with the cluster-wide facts (membership, history, escalations) taken
    as this agent knows them.
    """
    decision = decide(facts)
    candidate = decision.action or (decision.refusals[0].action if decision.refusals else None)
    rules: tuple[RuleLine, ...] = ()
    agents: tuple[AgentLine, ...] = ()
    if candidate is not None:
        rules = tuple(
            RuleLine(name, r is None, "" if r is None else r.reason) for name, r in evaluate(candidate, facts)
        )
        agents = tuple(_opinion(candidate, facts, n.name, reports_by_agent.get(n.name)) for n in facts.nodes)
    t, p = facts.timings, facts.policy
    return Explanation(
        me=facts.me,
        decision=decision,
        candidate=candidate,
        nodes=tuple(_node_line(n, facts) for n in facts.nodes),
        thresholds=(
            ("state_lost_after", t.state_lost_after),
            ("corrupt_after", t.corrupt_after),
            ("evict_after", t.evict_after),
            ("restore_after", t.restore_after),
            ("cooldown", t.cooldown),
            ("actions_per_hour", float(p.actions_per_hour)),
            ("min_members", float(p.min_members)),
        ),
        rules=rules,
        agents=agents,
        quorum=facts.quorum,
        agreeing=sum(1 for a in agents if a.agrees),
        paused_for=max(0.0, facts.paused_until - facts.wall_now),
        restore=restore.advice(facts),
    )


def _opinion(action: Action, facts: ClusterFacts, agent: str, report: Report | None) -> AgentLine:
    if agent == facts.me:
        refusals = check(action, facts)
        return AgentLine(agent, not refusals, _join(refusals), "own view")
    if report is None:
        return AgentLine(agent, False, "no fresh report: it cannot be asked", "no fresh report")
    refusal = _peer_refusal(action, facts, agent, report)
    return AgentLine(agent, refusal == "", refusal, "its report")


def _peer_refusal(action: Action, facts: ClusterFacts, agent: str, report: Report) -> str:
    """Why `agent` would refuse `action` ("" when it would ack), from its report."""
    views = {name: (cls, held) for name, cls, held in report.views}
    if action.target not in views:
        if not report.views:
            return "its report carries no views of the cluster (an older version?)"
        return f"its report carries no view of {action.target}"
    if report.in_flight and report.in_flight != action.id:
        return f"it holds unfinished action {report.in_flight}"
    if not (math.isfinite(report.paused_until) and report.paused_until >= 0):
        return f"its report carries an invalid pause state ({report.paused_until!r})"
    nodes = tuple(_as_seen(n, views, agent) for n in facts.nodes)
    seen = dataclasses.replace(facts, me=agent, nodes=nodes, paused_until=report.paused_until)
    return _join(check(action, seen))


def _as_seen(node: NodeFacts, views: Mapping[str, tuple[str, float]], peer: str) -> NodeFacts:
    """`node` with the class and duration `peer` reported for it; membership stays the anchor's."""
    if node.verdict is None:
        return node
    if node.name not in views:
        return dataclasses.replace(
            node, verdict=Verdict(NodeClass.UNKNOWN, f"not in {peer}'s report"), held_seconds=0.0
        )
    cls_text, held = views[node.name]
    try:
        cls = NodeClass(cls_text)
    except ValueError:
        cls = NodeClass.UNKNOWN
    held = held if isinstance(held, int | float) and math.isfinite(held) and held >= 0 else 0.0
    return dataclasses.replace(node, verdict=Verdict(cls, f"as {peer} sees it"), held_seconds=float(held))


def _node_line(n: NodeFacts, facts: ClusterFacts) -> NodeLine:
    wants = wanted_kind(n)
    needs = threshold(n.verdict.cls, facts.timings) if wants is not None and n.verdict is not None else None
    return NodeLine(
        name=n.name,
        host=n.host,
        cls=None if n.verdict is None else str(n.verdict.cls),
        reason="witness" if n.verdict is None else n.verdict.reason,
        held_seconds=n.held_seconds,
        member=n.is_member,
        node_id=n.node_id,
        wants=wants,
        needs_seconds=needs,
    )


# ---------------------------------------------------------------------------------------------------------------
# Text for humans


def render(e: Explanation) -> str:
    """`kmagent explain` as text: the next action, the nodes, the rules and who would agree."""
    d = e.decision
    if d.action is not None:
        head = f"Next: {_describe(d.action)}"
    elif e.candidate is not None:
        head = f"Next: nothing yet (next in line: {_describe(e.candidate)})"
    else:
        head = "Next: nothing"
    lines = [head, f"Why: {d.reason}"]
    if e.restore is not None:
        lines += ["", e.restore]
    if e.paused_for > 0:
        lines.append(f"Paused for another {human_duration(e.paused_for)}: no destructive proposal or ack.")
    lines += ["", "Nodes (as seen by " + e.me + "):"]
    rows: list[tuple[str, ...]] = [("NODE", "ID", "MEMBER", "CLASS", "HELD", "WANTS", "REASON")]
    for n in e.nodes:
        wants = "" if n.wants is None else f"{n.wants} after {human_duration(n.needs_seconds or 0.0)}"
        rows.append(
            (
                n.name,
                "-" if n.node_id is None else str(n.node_id),
                "yes" if n.member else "no",
                n.cls or "witness",
                "-" if n.cls is None else human_duration(n.held_seconds),
                wants,
                "" if n.cls is None else n.reason,
            )
        )
    lines += _table(rows)
    lines.append("Thresholds: " + " · ".join(_threshold_text(k, v) for k, v in e.thresholds))
    if e.candidate is not None:
        lines += ["", f"Rules for {_describe(e.candidate)}:"]
        lines += [
            f"  {'ok' if r.ok else 'REFUSES':8} {r.rule}{'' if r.ok else ': ' + r.reason}" for r in e.rules
        ]
        lines += ["", f"Agents (quorum {e.quorum} of {len(e.agents)}):"]
        for a in e.agents:
            verdict = "would agree" if a.agrees else f"would refuse: {a.reason}"
            lines.append(f"  {a.agent}: {verdict} ({a.source})")
        reached = "quorum reached" if e.quorum_reached else "no quorum"
        lines.append(f"  => {e.agreeing} of {len(e.agents)} would agree, {e.quorum} needed: {reached}")
    if d.escalate:
        lines += ["", f"To escalate (budget used, still needs an action): {', '.join(d.escalate)}"]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _threshold_text(key: str, value: float) -> str:
    if key in ("actions_per_hour", "min_members"):
        return f"{key} {int(value)}"
    return f"{key} {human_duration(value)}"


def _describe(action: Action) -> str:
    return f"{action.kind} {action.target} ({action.id})"


def _evidence(n: NodeFacts) -> str:
    if n.verdict is None:
        return f"{n.name}: witness"
    return f"{n.name}: {n.verdict.cls} for {human_duration(n.held_seconds)} ({n.verdict.reason})"


def _join(refusals: tuple[Refusal, ...] | list[Refusal]) -> str:
    return "; ".join(str(r) for r in refusals)
