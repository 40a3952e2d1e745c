"""The guard rails of DESIGN §6, each a named predicate over one action and one agent's `ClusterFacts`.

Pure. The same `check` runs in the planner (before proposing) and in every agent's ack decision (on its own
facts), so no action can gather a certificate while a rule forbids it in a quorum's views. Rule names are
stable: history, metrics, `explain` and the tests refer to them.

Where the other rules of §6 live: 1 (a certificate before any destructive local step) is checked by the step
executor with `agreement.certificate_problems`; 4 (never delete, storage identity) where the state is moved,
`agent.io.storage.quarantine`; 8 (history) in the journal.

A *resume* (re-certifying the unfinished action itself) is checked only by the rules that do not depend on its
progress: its own steps change the target's class (fenced: DOWN; quarantined: STATE_LOST; removed: EVICTED;
restored: HEALTHY) and add to its history, so requiring again what licensed its start would strand a fenced,
emptied node. RESTORE's own rule (guard rail 5) lives in `agent.core.restore`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from agent.core import restore
from agent.core.classify import human_duration
from agent.core.facts import ClusterFacts, NodeFacts
from agent.core.messages import ACTION_KINDS, Action
from agent.core.model import NodeClass
from agent.core.settings import Timings

__all__ = [
    "HOUR",
    "REQUESTED_BY",
    "RULES",
    "Refusal",
    "check",
    "evaluate",
    "expected_params",
    "is_resume",
    "makes_room",
    "requested_by",
    "should_escalate",
    "threshold",
    "verdict",
    "wanted_kind",
]

HOUR = 3600.0

REJOIN, EVICT, RESTORE = "REJOIN", "EVICT", "RESTORE"
# The classes each kind may act on (rule 1); anything else (HEALTHY, DEGRADED, DOWN, AGENT_DOWN, UNKNOWN) never.
# EVICTED comes only from a fresh report (classify_peer), so "only while it reports fresh" holds by construction.
# EVICT also takes a STATE_LOST or CORRUPT member, but only to make room (see `makes_room`).
_SUPPORTS: dict[str, frozenset[NodeClass]] = {
    REJOIN: frozenset({NodeClass.STATE_LOST, NodeClass.CORRUPT, NodeClass.EVICTED}),
    EVICT: frozenset({NodeClass.UNREACHABLE, NodeClass.STATE_LOST, NodeClass.CORRUPT}),
}
# Members in these classes do not serve: while one is a member, minkms writes (an add among them) cannot succeed.
_FAILED = frozenset({NodeClass.UNREACHABLE, NodeClass.STATE_LOST, NodeClass.CORRUPT})
# VOLUME_MISSING (DESIGN §6 rail 11) is never acted on: it is in no class set of _SUPPORTS, and it is not "failed"
# either (that would make it evictable to make room). Its minkms cannot run (the preflight refuses an unmounted
# volume) and it stays a member, so another node's REJOIN would stall at its add: `evict-first` waits for it.
_VOLUME_MISSING = frozenset({NodeClass.VOLUME_MISSING})


@dataclass(frozen=True)
class Refusal:
    """Why a rule forbids an action: `rule` is a stable short name, `reason` one human line with the evidence."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason}"


Predicate = Callable[[Action, ClusterFacts], "str | None"]
"""A rule: the reason it refuses the action, or None."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared with the planner


def makes_room(node: NodeFacts, facts: ClusterFacts) -> bool:
    """True for a STATE_LOST or CORRUPT member that must leave the membership so that another node's REJOIN can
    add it back: minkms writes need every member. The documented runbook for several failed nodes does the same:
    remove the failed nodes one at a time, then add them back (reference/minkms.md §5)."""
    if (
        not node.is_member
        or node.verdict is None
        or node.verdict.cls not in (NodeClass.STATE_LOST, NodeClass.CORRUPT)
    ):
        return False
    return any(o.name != node.name and wanted_kind(o) == REJOIN for o in facts.nodes)


def wanted_kind(node: NodeFacts) -> str | None:
    """The action a node's class calls for, if any: EVICT for an UNREACHABLE member, REJOIN for lost state."""
    if node.verdict is None:
        return None
    cls = node.verdict.cls
    if cls is NodeClass.UNREACHABLE:
        return EVICT if node.is_member else None
    return REJOIN if cls in _SUPPORTS[REJOIN] else None


def threshold(cls: NodeClass, timings: Timings) -> float:
    """How long `cls` must have held before it licenses an action (EVICTED: at once)."""
    return {
        NodeClass.STATE_LOST: timings.state_lost_after,
        NodeClass.CORRUPT: timings.corrupt_after,
        NodeClass.UNREACHABLE: timings.evict_after,
    }.get(cls, 0.0)


def expected_params(node: NodeFacts) -> tuple[tuple[str, str], ...]:
    """An action's parameters for `node`: its minkms node id and host, when known."""
    params: list[tuple[str, str]] = []
    if node.node_id is not None:
        params.append(("node_id", str(node.node_id)))
    if node.host is not None:
        params.append(("host", node.host))
    return tuple(params)


# The param naming the operator request (`kmagent rejoin|evict NODE`, `restore --approve`), signed with it.
REQUESTED_BY = restore.REQUESTED_BY


def requested_by(action: Action) -> str | None:
    """Who asked for the action, when an operator did (it is part of what every ack signs)."""
    return next((v for k, v in action.params if k == REQUESTED_BY), None)


def is_resume(action: Action, facts: ClusterFacts) -> bool:
    return facts.unfinished is not None and action == facts.unfinished


def _target(action: Action, facts: ClusterFacts) -> NodeFacts | None:
    """The target when it is a node one can act on; rule `target` reports every other case."""
    node = facts.node(action.target)
    return node if node is not None and node.verdict is not None else None


def _actions_within(target: str, facts: ClusterFacts, window: float) -> list[float]:
    """Start times of the target's actions less than `window` ago (a start in the future counts: clock steps)."""
    return [
        e.started_wall
        for e in facts.history
        if e.target == target and facts.wall_now - e.started_wall < window
    ]


# ---------------------------------------------------------------------------------------------------------------
# The rules, in the order they are reported


def _paused(action: Action, facts: ClusterFacts) -> str | None:
    if facts.wall_now < facts.paused_until:
        left = human_duration(facts.paused_until - facts.wall_now)
        return f"automation is paused for another {left} (kmagent resume ends it): no destructive proposal or ack"
    return None


def _finished(action: Action, facts: ClusterFacts) -> str | None:
    """A resume too: an agent never acks an action it recorded finished. A close counts once a quorum recorded
    it, so a later resume, which needs a quorum's acks, always meets one refusal (`execution.close_unconfirmed`)."""
    if action.id in facts.finished:
        return f"{action.id} is recorded finished here: a closed action never runs again"
    return None


def _kind(action: Action, facts: ClusterFacts) -> str | None:
    if action.kind not in ACTION_KINDS:
        return f"unknown action kind {action.kind!r} (known: {', '.join(ACTION_KINDS)})"
    return None


def _restore(action: Action, facts: ClusterFacts) -> str | None:
    return restore.problem(action, facts) if action.kind == RESTORE else None


def _target_rule(action: Action, facts: ClusterFacts) -> str | None:
    node = facts.node(action.target)
    if node is None:
        return f"{action.target!r} is not a configured agent"
    if node.verdict is None:
        return f"{node.name} is a witness: it runs no minkms to act on"
    return None


def _no_anchor(action: Action, facts: ClusterFacts) -> str | None:
    if facts.anchor is None:
        return "no anchor holds the lease: the membership is unknown and no one can run the cluster steps"
    return None


def _not_the_anchor(action: Action, facts: ClusterFacts) -> str | None:
    if action.target == facts.anchor and action.kind != RESTORE:  # a restore runs on the anchor itself
        return f"{action.target} is the anchor: the cluster steps run through it"
    return None


def _anchor_serves(action: Action, facts: ClusterFacts) -> str | None:
    """REJOIN and EVICT run their cluster steps through the anchor's minkms. An anchor elected while no node
    serves (for a total-failure restore) has none: it must not start or resume them."""
    anchor = facts.node(facts.anchor) if facts.anchor is not None else None
    if action.kind == RESTORE or anchor is None or anchor.verdict is None:
        return None  # a witness as anchor cannot happen (witnesses never stand); no anchor: rule `no-anchor`
    if anchor.verdict.cls not in (NodeClass.HEALTHY, NodeClass.DEGRADED):
        return f"the anchor {anchor.name} is {anchor.verdict.cls}: its minkms cannot run the cluster steps"
    return None


def _one_at_a_time(action: Action, facts: ClusterFacts) -> str | None:
    other = facts.unfinished
    if other is None or other == action:
        return None
    if other.id == action.id:
        return f"action {other.id} is unfinished with different content ({other.kind} {other.target})"
    return f"unfinished action {other.id} ({other.kind} {other.target}) comes first"


def _one_removed(action: Action, facts: ClusterFacts) -> str | None:
    node = _target(action, facts)
    if node is None:
        return None
    # Only a dead member's eviction waits for the others to be back: it removes a node that may hold state.
    # Nodes whose state is lost are removed one after the other to make room, as the runbook does.
    removes = action.kind == EVICT and node.verdict is not None and node.verdict.cls is NodeClass.UNREACHABLE
    others = [h for h in facts.removed if h != node.host]
    if removes and others:
        return (
            f"{', '.join(others)} already out of the membership: "
            f"{action.kind} {node.name} would remove a second node"
        )
    return None


def _class(action: Action, facts: ClusterFacts) -> str | None:
    node = _target(action, facts)
    if node is None or action.kind not in _SUPPORTS or node.verdict is None:
        return None
    cls, allowed = node.verdict.cls, _SUPPORTS[action.kind]
    if cls not in allowed:
        names = " or ".join(sorted(allowed))
        return f"{node.name} is {cls} ({node.verdict.reason}); {action.kind} is only for {names}"
    if action.kind == EVICT and not node.is_member:
        return f"{node.name} is no longer a member: there is nothing to evict"
    if action.kind == EVICT and cls is not NodeClass.UNREACHABLE and not makes_room(node, facts):
        return f"{node.name} is {cls}: it is evicted only to make room for another node's REJOIN, and none needs one"
    return None


def _threshold(action: Action, facts: ClusterFacts) -> str | None:
    node = _target(action, facts)
    if node is None or node.verdict is None or _class(action, facts) is not None:
        return None
    if action.kind not in _SUPPORTS:
        return None
    needed = threshold(node.verdict.cls, facts.timings)
    if node.held_seconds >= needed or requested_by(action):
        return None  # an operator's request waives the wait, and only the wait: every other rule still holds
    return (
        f"{node.name} has been {node.verdict.cls} for {human_duration(node.held_seconds)} on this agent's clock; "
        f"{action.kind} needs {human_duration(needed)}"
    )


def _params(action: Action, facts: ClusterFacts) -> str | None:
    node = _target(action, facts)
    if node is None or action.kind not in _SUPPORTS:
        return None
    expected = expected_params(node)
    if tuple(p for p in action.params if p[0] != REQUESTED_BY) != expected:
        return f"parameters {_show(action.params)} do not match this agent's view of {node.name}: {_show(expected)}"
    return None


def _last_healthy(action: Action, facts: ClusterFacts) -> str | None:
    node = _target(action, facts)
    if node is None or action.kind == RESTORE:  # a restore is for when no node is HEALTHY (rule `restore`)
        return None
    others = [
        n
        for n in facts.nodes
        if n.name != node.name
        and n.is_member
        and n.verdict is not None
        and n.verdict.cls is NodeClass.HEALTHY
    ]
    if not others:
        return f"no HEALTHY member other than {node.name}: it would be acted on as the last healthy one"
    return None


def _min_members(action: Action, facts: ClusterFacts) -> str | None:
    node = _target(action, facts)
    if node is None or action.kind != EVICT or not node.is_member:
        return None
    if node.verdict is not None and node.verdict.cls is not NodeClass.UNREACHABLE:
        return None  # its state is lost (positive evidence): removing it loses nothing, whatever remains
    left = sum(1 for n in facts.nodes if n.is_member) - 1
    if left < facts.policy.min_members:
        return f"evicting {node.name} would leave {left} members, below policy.min_members = {facts.policy.min_members}"
    return None


def _evict_first(action: Action, facts: ClusterFacts) -> str | None:
    """A REJOIN's add is a write, and minkms writes need every member: a failed member would strand the target."""
    if action.kind != REJOIN or _target(action, facts) is None:
        return None
    dead = [
        n.name
        for n in facts.nodes
        if n.name != action.target and n.is_member and n.verdict is not None and n.verdict.cls in _FAILED
    ]
    if dead:
        return (
            f"{', '.join(dead)} failed and still a member: minkms writes need every member, "
            "so the add would stall; it must return or be evicted first"
        )
    unmounted = [
        n.name
        for n in facts.nodes
        if n.name != action.target
        and n.is_member
        and n.verdict is not None
        and n.verdict.cls in _VOLUME_MISSING
    ]
    if unmounted:
        return (
            f"{', '.join(unmounted)} is VOLUME_MISSING and still a member: minkms writes need every member, so "
            "the add would stall; an operator must mount its volume first"
        )
    return None


def _escalated(action: Action, facts: ClusterFacts) -> str | None:
    if action.target in facts.escalated:
        return f"{action.target} is ESCALATED: automation stops for it until `kmagent ack {action.target}`"
    return None


def _cooldown(action: Action, facts: ClusterFacts) -> str | None:
    # An EVICT that made room is the first half of the node's recovery: its REJOIN does not wait for it.
    recent = [
        e.started_wall
        for e in facts.history
        if e.target == action.target
        and facts.wall_now - e.started_wall < facts.timings.cooldown
        and not (action.kind == REJOIN and e.kind == EVICT)
    ]
    if recent:
        ago = facts.wall_now - max(recent)
        since = f"{human_duration(ago)} ago" if ago >= 0 else "in the future (the wall clock stepped back)"
        return (
            f"the last action on {action.target} started {since}; "
            f"cooldown is {human_duration(facts.timings.cooldown)}"
        )
    return None


def _budget(action: Action, facts: ClusterFacts) -> str | None:
    # An operator's `kmagent ack` starts the node's budget afresh: the actions before it were looked at.
    since = dict(facts.acked).get(action.target, -math.inf)
    used = len([t for t in _actions_within(action.target, facts, HOUR) if t > since])
    budget = facts.policy.actions_per_hour
    if used >= budget:
        return f"{used} actions on {action.target} within the last hour: the budget is {budget} per hour"
    return None


# (name, predicate, checked on a resume too)
RULES: tuple[tuple[str, Predicate, bool], ...] = (
    ("paused", _paused, True),
    ("kind", _kind, True),
    ("finished", _finished, True),
    ("restore", _restore, False),
    ("target", _target_rule, True),
    ("no-anchor", _no_anchor, True),
    ("not-the-anchor", _not_the_anchor, True),
    ("anchor-serves", _anchor_serves, True),
    ("one-at-a-time", _one_at_a_time, False),
    ("one-removed", _one_removed, False),
    ("class", _class, False),
    ("threshold", _threshold, False),
    ("params", _params, False),
    ("last-healthy", _last_healthy, False),
    ("min-members", _min_members, False),
    ("evict-first", _evict_first, False),
    ("escalated", _escalated, False),
    ("cooldown", _cooldown, False),
    ("budget", _budget, False),
)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def evaluate(action: Action, facts: ClusterFacts) -> tuple[tuple[str, Refusal | None], ...]:
    """Every rule that applies to `action` and its verdict (None: allows), in order; for `explain`."""
    resume = is_resume(action, facts)
    results: list[tuple[str, Refusal | None]] = []
    for name, predicate, on_resume in RULES:
        if resume and not on_resume:
            continue
        reason = predicate(action, facts)
        results.append((name, None if reason is None else Refusal(name, reason)))
    return tuple(results)


def check(action: Action, facts: ClusterFacts) -> list[Refusal]:
    """Every rule that forbids `action` in this agent's view; empty: allowed."""
    return [r for _, r in evaluate(action, facts) if r is not None]


def verdict(action: Action, facts: ClusterFacts) -> tuple[bool, str]:
    """`check` in the form `agreement.answer_ack` takes."""
    refusals = check(action, facts)
    return (not refusals, "; ".join(str(r) for r in refusals))


def should_escalate(target: str, facts: ClusterFacts) -> bool:
    """True when `target` needs an action now but has used its budget: the daemon then marks it ESCALATED.

    A node that used its budget but has recovered needs nobody; the node of the unfinished action is never
    escalated by its own action's progress.
    """
    node = _target(Action("", "", target), facts)
    if node is None or target in facts.escalated:
        return False
    if facts.unfinished is not None and facts.unfinished.target == target:
        return False
    kind = wanted_kind(node)
    if kind is None:
        return False
    probe = Action("", kind, target)
    return (
        _budget(probe, facts) is not None
        and _class(probe, facts) is None
        and _threshold(probe, facts) is None
    )


def _show(params: tuple[tuple[str, str], ...]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in params) + ")" if params else "(none)"
