"""Table tests of agent.core.guards: every class x kind x threshold boundary, each rule refusing by its name
alone, resumes, escalation, and the validation of the facts. The builders here are shared with test_planner."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from agent.core.classify import Verdict
from agent.core.facts import ClusterFacts, HistoryEntry, NodeFacts
from agent.core.guards import (
    RULES,
    Refusal,
    check,
    evaluate,
    expected_params,
    should_escalate,
    threshold,
    verdict,
)
from agent.core.messages import Action
from agent.core.model import NodeClass
from agent.core.settings import Policy, Timings

WALL = 1_700_000_000.0
LONG = 10_000.0  # held far past every threshold
TIMINGS = Timings()  # state_lost_after 5, corrupt_after 60, evict_after 120, cooldown 600
POLICY = Policy()  # 3 actions per hour, min_members 2

_MEMBER_CLASSES = {c for c in NodeClass if c is not NodeClass.EVICTED}


def host(name: str) -> str:
    return f"{name}.kms:7373"


def node(
    name: str,
    cls: NodeClass | None = NodeClass.HEALTHY,
    held: float = LONG,
    member: bool | None = None,
    node_id: int | None = -1,
) -> NodeFacts:
    """A node; by default a member (with id = its letter's position) unless EVICTED, a witness when cls is None."""
    if cls is None:
        return NodeFacts(name, None, None, 0.0, False, None)
    is_member = cls in _MEMBER_CLASSES if member is None else member
    nid = (ord(name[0]) - ord("a") if is_member else None) if node_id == -1 else node_id
    return NodeFacts(name, host(name), Verdict(cls, f"{cls.lower()} for the test"), held, is_member, nid)


def facts(*nodes: NodeFacts, **overrides: Any) -> ClusterFacts:
    """Facts as agent `a` (the anchor) sees them; `removed` follows the nodes' membership unless given."""
    if not nodes:
        nodes = (node("a"), node("b"), node("c"), node("d"))
    base: dict[str, Any] = dict(
        me="a",
        anchor="a",
        term=7,
        nodes=tuple(nodes),
        unfinished=None,
        removed=tuple(n.host for n in nodes if n.host is not None and not n.is_member),
        history=(),
        escalated=frozenset(),
        paused_until=0.0,
        now=500.0,
        wall_now=WALL,
        timings=TIMINGS,
        policy=POLICY,
    )
    base.update(overrides)
    return ClusterFacts(**base)


def ago(target: str, seconds: float, kind: str = "REJOIN", outcome: str = "done") -> HistoryEntry:
    return HistoryEntry(target, kind, WALL - seconds, outcome)


def with_node(f: ClusterFacts, replacement: NodeFacts) -> ClusterFacts:
    nodes = tuple(replacement if n.name == replacement.name else n for n in f.nodes)
    return dataclasses.replace(f, nodes=nodes)


def act(kind: str, target: str, f: ClusterFacts, action_id: str = "") -> Action:
    """The action the planner would build for `target` in `f` (params from f's view)."""
    n = f.node(target)
    params = expected_params(n) if n is not None else ()
    return Action(action_id or f"{kind.lower()}-{target}", kind, target, params)


def rules(action: Action, f: ClusterFacts) -> list[str]:
    return [r.rule for r in check(action, f)]


# ---------------------------------------------------------------------------------------------------------------
# Rule 1: class x kind x threshold, exhaustively

SUPPORTED = {
    ("REJOIN", NodeClass.STATE_LOST): TIMINGS.state_lost_after,
    ("REJOIN", NodeClass.CORRUPT): TIMINGS.corrupt_after,
    ("REJOIN", NodeClass.EVICTED): 0.0,
    ("EVICT", NodeClass.UNREACHABLE): TIMINGS.evict_after,
}
HELDS = (0.0, 4.999, 5.0, 59.999, 60.0, 119.999, 120.0, LONG)


@pytest.mark.parametrize("kind", ["REJOIN", "EVICT"])
@pytest.mark.parametrize("cls", list(NodeClass))
@pytest.mark.parametrize("held", HELDS)
def test_class_kind_threshold(kind: str, cls: NodeClass, held: float) -> None:
    f = facts(node("a"), node("b"), node("c", cls, held), node("d"))
    refused = rules(act(kind, "c", f), f)
    needed = SUPPORTED.get((kind, cls))
    if needed is None:
        assert refused == ["class"]
    elif held < needed:
        assert refused == ["threshold"]
    else:
        assert refused == []


@pytest.mark.parametrize(
    ("cls", "needed"),
    [
        (NodeClass.STATE_LOST, 5.0),
        (NodeClass.CORRUPT, 60.0),
        (NodeClass.UNREACHABLE, 120.0),
        (NodeClass.EVICTED, 0.0),
    ],
)
def test_threshold_is_inclusive_and_from_the_config(cls: NodeClass, needed: float) -> None:
    timings = Timings(state_lost_after=7.0, corrupt_after=70.0, evict_after=170.0)
    scaled = {5.0: 7.0, 60.0: 70.0, 120.0: 170.0, 0.0: 0.0}[needed]
    assert threshold(cls, timings) == scaled
    kind = "EVICT" if cls is NodeClass.UNREACHABLE else "REJOIN"
    for held, ok in ((scaled, True), (math.nextafter(scaled, -1.0), False)):
        if held < 0:
            continue
        f = facts(node("a"), node("b"), node("c", cls, held), node("d"), timings=timings)
        assert (rules(act(kind, "c", f), f) == []) is ok, (held, ok)


def test_threshold_reason_names_both_durations() -> None:
    f = facts(node("a"), node("b"), node("c", NodeClass.CORRUPT, 12.0), node("d"))
    (refusal,) = check(act("REJOIN", "c", f), f)
    assert refusal.rule == "threshold"
    assert "CORRUPT for 12s" in refusal.reason and "needs 1m00s" in refusal.reason


def test_evict_needs_a_member() -> None:
    f = facts(node("a"), node("b"), node("c", NodeClass.UNREACHABLE, member=False), node("d"))
    (refusal,) = check(act("EVICT", "c", f), f)
    assert refusal.rule == "class" and "no longer a member" in refusal.reason


# ---------------------------------------------------------------------------------------------------------------
# Each rule alone, by its name

LOST = NodeClass.STATE_LOST
FOUR = (node("a"), node("b"), node("c", LOST), node("d"))


def _case(desc: str, action: Action, f: ClusterFacts, rule: str) -> Any:
    return pytest.param(action, f, rule, id=desc)


def _rejoin_c(nodes: tuple[NodeFacts, ...] = FOUR, **overrides: Any) -> tuple[Action, ClusterFacts]:
    f = facts(*nodes, **overrides)
    return act("REJOIN", "c", f), f


def _evict_c(*nodes: NodeFacts, **overrides: Any) -> tuple[Action, ClusterFacts]:
    f = facts(*nodes, **overrides)
    return act("EVICT", "c", f), f


OTHER = Action("rejoin-b-3-1", "REJOIN", "b", (("node_id", "1"), ("host", host("b"))))
DOWN_D = node("d", NodeClass.EVICTED)  # d out of the membership
SINGLE_RULE_CASES = [
    ("paused", *_rejoin_c(paused_until=WALL + 60)),
    ("kind", Action("x", "DELETE", "c"), facts(*FOUR)),
    ("finished", *_rejoin_c(finished=frozenset({"rejoin-c"}))),
    ("restore", Action("x", "RESTORE", "c", (("backup", "b1"),)), facts(*FOUR)),
    ("target", Action("x", "REJOIN", "zz"), facts(*FOUR)),
    ("target", Action("x", "REJOIN", "w"), facts(*FOUR, node("w", None))),
    ("no-anchor", *_rejoin_c(anchor=None)),
    ("not-the-anchor+anchor-serves", *_rejoin_c(anchor="c")),  # a target's class never serves: both refuse
    (
        "anchor-serves",
        *_rejoin_c(anchor="b", nodes=(node("a"), node("b", NodeClass.DOWN), node("c", LOST), node("d"))),
    ),
    ("one-at-a-time", *_rejoin_c(unfinished=OTHER)),
    ("one-at-a-time", *_rejoin_c(unfinished=dataclasses.replace(OTHER, id="rejoin-c"))),
    ("one-removed", *_evict_c(node("a"), node("b"), node("c", NodeClass.UNREACHABLE), DOWN_D)),
    ("class", *_rejoin_c(nodes=(node("a"), node("b"), node("c"), node("d")))),
    ("threshold", *_rejoin_c(nodes=(node("a"), node("b"), node("c", LOST, 4.0), node("d")))),
    ("params", Action("x", "REJOIN", "c", (("node_id", "1"), ("host", host("c")))), facts(*FOUR)),
    ("params", Action("x", "REJOIN", "c"), facts(*FOUR)),
    ("last-healthy", *_rejoin_c(nodes=(node("a", NodeClass.DEGRADED), node("c", LOST)))),
    ("min-members", *_evict_c(node("a"), node("c", NodeClass.UNREACHABLE))),
    (
        "evict-first",
        *_rejoin_c(nodes=(node("a"), node("b"), node("c", LOST), node("d", NodeClass.UNREACHABLE, 1.0))),
    ),
    ("escalated", *_rejoin_c(escalated=frozenset({"c"}))),
    ("cooldown", *_rejoin_c(history=(ago("c", 599.0),))),
    ("budget", *_rejoin_c(history=(ago("c", 3599.0), ago("c", 3000.0), ago("c", 601.0, "EVICT", "aborted")))),
]


@pytest.mark.parametrize(("rule", "action", "f"), SINGLE_RULE_CASES, ids=[c[0] for c in SINGLE_RULE_CASES])
def test_each_rule_refuses_alone_with_its_name(rule: str, action: Action, f: ClusterFacts) -> None:
    refusals = check(action, f)
    assert [r.rule for r in refusals] == rule.split("+")
    assert refusals[0].reason  # a human line, never empty
    ok, why = verdict(action, f)
    assert not ok and why.startswith(f"{rule.split('+')[0]}: ")


def test_every_rule_has_a_refusing_case() -> None:
    assert {r for c in SINGLE_RULE_CASES for r in c[0].split("+")} == {name for name, _, _ in RULES}


def test_the_baseline_of_those_cases_is_allowed() -> None:
    """Each case above differs from an allowed action by one fact: so each refusal is that fact's doing."""
    for action, f in (
        _rejoin_c(),
        _evict_c(node("a"), node("b"), node("c", NodeClass.UNREACHABLE), node("d")),
    ):
        assert check(action, f) == []
        assert verdict(action, f) == (True, "")


def test_refusals_accumulate_in_rule_order() -> None:
    f = facts(node("a"), node("c", NodeClass.DOWN), paused_until=WALL + 1, escalated=frozenset({"c"}))
    names = rules(Action("x", "REJOIN", "c"), f)
    assert names == ["paused", "class", "params", "escalated"]
    order = [name for name, _, _ in RULES]
    assert names == sorted(names, key=order.index)


def test_refusal_text() -> None:
    assert str(Refusal("cooldown", "too soon")) == "cooldown: too soon"


# ---------------------------------------------------------------------------------------------------------------
# Rules 2 and 3 in more detail


def test_rejoin_of_the_node_that_is_out_is_fine_even_with_another_out() -> None:
    """Adding a node back never makes two removed; removing one more (EVICT, or REJOIN of a member) would."""
    nodes = (node("a"), node("b"), node("c", NodeClass.EVICTED), DOWN_D, node("e"))
    f = facts(*nodes)
    assert set(f.removed) == {host("c"), host("d")}
    assert rules(act("REJOIN", "c", f), f) == []
    assert rules(act("REJOIN", "d", f), f) == []


def test_one_removed_names_the_host_that_is_out() -> None:
    action, f = _evict_c(node("a"), node("b"), node("c", NodeClass.UNREACHABLE), DOWN_D)
    (refusal,) = check(action, f)
    assert host("d") in refusal.reason


@pytest.mark.parametrize(
    ("members", "min_members", "ok"), [(3, 2, True), (3, 3, False), (2, 2, False), (4, 3, True)]
)
def test_min_members_boundary(members: int, min_members: int, ok: bool) -> None:
    nodes = [node("a"), node("b"), node("c", NodeClass.UNREACHABLE), node("d")][:members]
    if members == 2:
        nodes = [node("a"), node("c", NodeClass.UNREACHABLE)]
    action, f = _evict_c(*nodes, policy=Policy(min_members=min_members))
    assert ("min-members" not in rules(action, f)) is ok


def test_last_healthy_counts_only_healthy_members_other_than_the_target() -> None:
    # b is HEALTHY by its class but out of the membership: it does not count.
    nodes = (node("a", NodeClass.DEGRADED), node("b", NodeClass.HEALTHY, member=False), node("c", LOST))
    f = facts(*nodes, removed=())
    assert "last-healthy" in rules(act("REJOIN", "c", f), f)
    healthy_d = facts(*nodes, node("d"), removed=())
    assert "last-healthy" not in rules(act("REJOIN", "c", healthy_d), healthy_d)


def test_unfinished_same_id_different_content_is_named() -> None:
    action, f = _rejoin_c(unfinished=dataclasses.replace(OTHER, id="rejoin-c"))
    (refusal,) = check(action, f)
    assert "different content" in refusal.reason


def test_evict_is_not_held_back_by_an_unreachable_peer() -> None:
    """evict-first holds REJOINs only: evicting one dead member while another is dead is min-members' business."""
    nodes = (
        node("a"),
        node("b"),
        node("c", NodeClass.UNREACHABLE),
        node("d", NodeClass.UNREACHABLE),
        node("e"),
    )
    f = facts(*nodes)
    assert rules(act("EVICT", "c", f), f) == []


# ---------------------------------------------------------------------------------------------------------------
# Rules 6 and 7: cooldown, budget, pause


@pytest.mark.parametrize(
    ("seconds_ago", "refused"), [(0.0, True), (599.999, True), (600.0, False), (601.0, False)]
)
def test_cooldown_boundary(seconds_ago: float, refused: bool) -> None:
    action, f = _rejoin_c(history=(ago("c", seconds_ago),))
    assert ("cooldown" in rules(action, f)) is refused


def test_cooldown_is_per_node_and_a_rejoin_does_not_wait_for_the_evict_that_made_room() -> None:
    action, f = _rejoin_c(history=(ago("b", 10.0), ago("d", 20.0, "EVICT")))
    assert rules(action, f) == []
    action, f = _rejoin_c(history=(ago("c", 10.0, "EVICT", "aborted"),))
    assert rules(action, f) == []  # the EVICT was the first half of c's recovery
    action, f = _rejoin_c(history=(ago("c", 10.0, "REJOIN", "done"),))
    assert rules(action, f) == ["cooldown"]


def test_a_lost_member_is_evicted_only_to_make_room_for_another_rejoin() -> None:
    alone = facts(node("a"), node("b"), node("c", LOST), node("d"))
    assert [r.rule for r in check(act("EVICT", "c", alone), alone)] == ["class"]
    two = facts(node("a"), node("b", LOST), node("c", LOST), node("d"))
    assert rules(act("EVICT", "c", two), two) == []
    # the REJOIN of b waits while c is a failed member: its add would stall
    assert "evict-first" in rules(act("REJOIN", "b", two), two)
    # min_members does not hold back a node whose state is lost (removing it loses nothing)
    small = facts(
        node("a"), node("b", LOST), node("c", LOST), policy=dataclasses.replace(facts().policy, min_members=3)
    )
    assert rules(act("EVICT", "c", small), small) == []


def test_history_in_the_future_counts_as_recent() -> None:
    """A wall clock that stepped back must not open the cooldown early."""
    action, f = _rejoin_c(history=(ago("c", -300.0),))
    (refusal,) = check(action, f)
    assert refusal.rule == "cooldown" and "stepped back" in refusal.reason


@pytest.mark.parametrize(
    ("ages", "budget", "refused"),
    [
        ((3599.0, 3000.0), 3, False),
        ((3599.0, 3000.0, 2000.0), 3, True),
        ((3600.0, 3000.0, 2000.0), 3, False),  # exactly an hour ago is outside the window
        ((3599.999, 3000.0, 2000.0), 3, True),
        ((3000.0,), 1, True),
        ((7200.0, 5000.0, 4000.0, 3700.0), 1, False),
    ],
)
def test_budget_boundary(ages: tuple[float, ...], budget: int, refused: bool) -> None:
    history = tuple(ago("c", a) for a in ages)
    action, f = _rejoin_c(history=history, policy=Policy(actions_per_hour=budget))
    assert ("budget" in rules(action, f)) is refused


@pytest.mark.parametrize(
    ("until", "refused"), [(0.0, False), (WALL - 1, False), (WALL, False), (WALL + 0.001, True)]
)
def test_pause_boundary(until: float, refused: bool) -> None:
    action, f = _rejoin_c(paused_until=until)
    assert ("paused" in rules(action, f)) is refused


@pytest.mark.parametrize("kind", ["REJOIN", "EVICT", "RESTORE", "DELETE"])
def test_pause_refuses_every_kind_and_target(kind: str) -> None:
    nodes = (node("a"), node("b"), node("c", NodeClass.UNREACHABLE), node("d", LOST), node("e"))
    f = facts(*nodes, paused_until=WALL + 3600)
    for target in ("a", "b", "c", "d", "e", "zz"):
        assert "paused" in rules(act(kind, target, f), f)


# ---------------------------------------------------------------------------------------------------------------
# A resume of the unfinished action


def test_resume_is_not_held_to_what_licensed_the_start() -> None:
    """Mid-REJOIN the target is fenced (DOWN), out of the membership, and its own start is in the history."""
    start = facts(*FOUR)
    unfinished = act("REJOIN", "c", start, "rejoin-c-7-1")
    mid = facts(
        node("a"),
        node("b"),
        node("c", NodeClass.DOWN, 0.0, member=False),
        node("d"),
        unfinished=unfinished,
        history=(ago("c", 30.0, outcome=""), ago("c", 700.0), ago("c", 900.0)),
    )
    assert check(unfinished, mid) == []
    assert [name for name, _ in evaluate(unfinished, mid)] == [
        "paused",
        "kind",
        "finished",
        "target",
        "no-anchor",
        "not-the-anchor",
        "anchor-serves",
    ]
    # ...except where the agent recorded it finished (its close reached this agent, a quorum's share of it):
    closed = dataclasses.replace(mid, finished=frozenset({unfinished.id}))
    assert rules(unfinished, closed) == ["finished"]
    # ...but a different action in the same state is checked by every rule, and one-at-a-time stops it.
    other = act("REJOIN", "c", mid, "rejoin-c-8-2")
    assert "one-at-a-time" in rules(other, mid)


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        ({"paused_until": WALL + 5}, "paused"),
        ({"anchor": None}, "no-anchor"),
        ({"anchor": "c"}, "not-the-anchor+anchor-serves"),
    ],
)
def test_resume_still_obeys_pause_and_anchor(overrides: dict[str, Any], rule: str) -> None:
    start = facts(*FOUR)
    unfinished = act("REJOIN", "c", start, "rejoin-c-7-1")
    f = facts(*FOUR, unfinished=unfinished, **overrides)
    assert rules(unfinished, f) == rule.split("+")


# ---------------------------------------------------------------------------------------------------------------
# Escalation


def _spent(cls: NodeClass = LOST, held: float = LONG, **overrides: Any) -> ClusterFacts:
    history = (ago("c", 3000.0), ago("c", 2000.0), ago("c", 1000.0))
    return facts(node("a"), node("b"), node("c", cls, held), node("d"), history=history, **overrides)


def test_should_escalate_when_the_budget_is_spent_and_the_node_needs_an_action() -> None:
    assert should_escalate("c", _spent())
    assert should_escalate("c", _spent(NodeClass.UNREACHABLE))


@pytest.mark.parametrize(
    ("f", "why"),
    [
        (_spent(NodeClass.HEALTHY), "recovered"),
        (_spent(NodeClass.DOWN), "no action for its class"),
        (_spent(LOST, 1.0), "below the threshold"),
        (_spent(escalated=frozenset({"c"})), "already escalated"),
        (_spent(policy=Policy(actions_per_hour=4)), "budget left"),
        (_spent(unfinished=Action("rejoin-c-7-1", "REJOIN", "c")), "its own action in flight"),
    ],
)
def test_should_not_escalate(f: ClusterFacts, why: str) -> None:
    assert not should_escalate("c", f), why


def test_should_escalate_unknown_or_witness_is_false() -> None:
    f = facts(*FOUR, node("w", None))
    assert not should_escalate("zz", f)
    assert not should_escalate("w", f)


# ---------------------------------------------------------------------------------------------------------------
# The facts themselves


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: node("c", LOST, math.nan), "held_seconds of c"),
        (lambda: node("c", LOST, -1.0), "held_seconds of c"),
        (lambda: node("c", LOST, math.inf), "held_seconds of c"),
        (lambda: node("c", LOST, node_id=-3), "node_id of c"),
        (lambda: NodeFacts("", None, None, 0.0, False), "without a name"),
        (lambda: facts(node("a"), node("a")), "duplicate node names"),
        (lambda: facts(node("b")), "deciding agent 'a'"),
        (lambda: facts(*FOUR, anchor="zz"), "anchor 'zz'"),
        (lambda: facts(*FOUR, term=-1), "term"),
        (lambda: facts(*FOUR, wall_now=math.nan), "wall_now"),
        (lambda: facts(*FOUR, now=math.inf), "now"),
        (lambda: facts(*FOUR, paused_until=-5.0), "paused_until"),
        (lambda: facts(*FOUR, history=(HistoryEntry("c", "REJOIN", math.nan, ""),)), "history entry for c"),
    ],
)
def test_bad_facts_are_named(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_quorum_counts_witnesses() -> None:
    assert facts(node("a"), node("b"), node("w", None)).quorum == 2
    assert facts(*FOUR).quorum == 3
    assert facts(*FOUR, node("e")).quorum == 3


def test_an_ack_starts_the_budget_afresh() -> None:
    spent = (ago("c", 3000.0), ago("c", 2000.0), ago("c", 1000.0))
    action, f = _rejoin_c(history=spent)
    assert "budget" in rules(action, f)
    action, f = _rejoin_c(history=spent, acked=(("c", WALL - 900.0),))  # acked after the last of them
    assert "budget" not in rules(action, f)
    action, f = _rejoin_c(
        history=spent, acked=(("c", WALL - 2500.0),)
    )  # two actions since the ack: still 2 < 3
    assert "budget" not in rules(action, f)
    action, f = _rejoin_c(history=spent, acked=(("b", WALL - 900.0),))  # another node's ack changes nothing
    assert "budget" in rules(action, f)


# ---------------------------------------------------------------------------------------------------------------
# DESIGN §6 rail 11: a VOLUME_MISSING node (its volume is not mounted) is never acted on, nor a STALLED one


@pytest.mark.parametrize("cls", [NodeClass.VOLUME_MISSING, NodeClass.STALLED])
@pytest.mark.parametrize("kind", ["REJOIN", "EVICT"])
def test_a_missing_volume_or_a_hung_probe_is_never_acted_on_even_when_asked(
    kind: str, cls: NodeClass
) -> None:
    f = facts(node("a"), node("b"), node("c", cls), node("d"))
    asked = act(kind, "c", f)
    asked = dataclasses.replace(asked, params=(*asked.params, ("requested_by", "root on a")))
    assert rules(asked, f) == ["class"]
    assert "only for" in check(asked, f)[0].reason


def test_a_rejoin_waits_while_a_volume_missing_member_cannot_serve() -> None:
    """Its minkms cannot run (the preflight refuses) and it stays a member: another node's add would stall."""
    f = facts(node("a"), node("b"), node("c", LOST), node("d", NodeClass.VOLUME_MISSING))
    (refusal,) = check(act("REJOIN", "c", f), f)
    assert refusal.rule == "evict-first"
    assert "d is VOLUME_MISSING and still a member" in refusal.reason and "mount its volume" in refusal.reason
    # and it is never evicted to make room
    assert rules(act("EVICT", "d", f), f) == ["class"]
    # not a member any more (an operator removed it): nothing to wait for
    out = facts(node("a"), node("b"), node("c", LOST), node("d", NodeClass.VOLUME_MISSING, member=False))
    assert rules(act("REJOIN", "c", out), out) == []
