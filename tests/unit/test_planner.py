"""Table tests of agent.core.planner: the decision table, one action at a time, priorities, and `explain`."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

import pytest

from agent.core.facts import ClusterFacts
from agent.core.guards import check, expected_params
from agent.core.messages import Action, Report
from agent.core.model import NodeClass
from agent.core.planner import action_id, candidates, decide, explain, render
from tests.unit.test_guards import LONG, WALL, ago, facts, host, node

LOST, CORRUPT, EVICTED = NodeClass.STATE_LOST, NodeClass.CORRUPT, NodeClass.EVICTED
UNREACHABLE, HEALTHY = NodeClass.UNREACHABLE, NodeClass.HEALTHY


def chosen(f: ClusterFacts) -> tuple[str, str] | None:
    a = decide(f).action
    return None if a is None else (a.kind, a.target)


# ---------------------------------------------------------------------------------------------------------------
# The decision table


def test_nothing_to_do_on_a_healthy_cluster() -> None:
    d = decide(facts())
    assert d.action is None and d.refusals == () and d.escalate == ()
    assert d.reason == "nothing to do: no node needs an action"
    assert len(d.evidence) == 4 and d.evidence[0].startswith("a: HEALTHY for")


def test_rejoin_carries_a_stable_unique_id_and_the_node_params() -> None:
    f = facts(node("a"), node("b"), node("c", LOST), node("d"))
    d = decide(f)
    assert d.action == Action(
        "rejoin-c-7-1700000000000", "REJOIN", "c", (("node_id", "2"), ("host", host("c")))
    )
    assert check(d.action, f) == []
    assert d.reason.startswith("REJOIN c (rejoin-c-7-1700000000000): c: STATE_LOST for 2h46m")
    # another anchor (a later term) or a later proposal gets another id
    assert action_id("REJOIN", "c", 8, WALL) != d.action.id
    assert action_id("REJOIN", "c", 7, WALL + 0.001) != d.action.id


def test_rejoin_of_an_evicted_node_has_no_node_id() -> None:
    f = facts(node("a"), node("b"), node("c", EVICTED, 0.0), node("d"))
    d = decide(f)
    assert d.action is not None and d.action.params == (("host", host("c")),)


@pytest.mark.parametrize("cls", [LOST, CORRUPT])
def test_two_failed_members_are_removed_one_after_the_other_then_rejoined(cls: NodeClass) -> None:
    """As the runbook does for several failed nodes: remove them one at a time, then add them back; an add (a
    write) cannot succeed while a failed node is still a member."""
    nodes = (node("a"), node("b", cls), node("c"), node("d", LOST), node("e"))
    first = decide(facts(*nodes))
    assert first.action is not None and (first.action.kind, first.action.target) == ("EVICT", "b")
    # while b's EVICT is unfinished it is the only action; d waits
    during = decide(facts(*nodes, unfinished=first.action))
    assert during.action == first.action
    # b out: d makes room in turn, then b and d are rejoined one after the other
    b_out = (node("a"), node("b", cls, member=False), node("c"), node("d", LOST), node("e"))
    assert chosen(facts(*b_out, history=(ago("b", 60.0, "EVICT"),))) == ("EVICT", "d")
    both_out = (node("a"), node("b", cls, member=False), node("c"), node("d", LOST, member=False), node("e"))
    assert chosen(facts(*both_out)) == ("REJOIN", "b")


def test_an_evicted_node_waits_while_a_failed_member_makes_room() -> None:
    nodes = (node("a"), node("b", EVICTED), node("c"), node("d", LOST), node("e"))
    assert chosen(facts(*nodes)) == ("EVICT", "d")


def test_config_order_not_name_order() -> None:
    f = facts(node("z"), node("y", LOST), node("a"), node("x", LOST), me="z", anchor="z")
    assert [(a.kind, a.target) for a in candidates(f)] == [("EVICT", "y"), ("EVICT", "x")]
    assert chosen(f) == ("EVICT", "y")


def test_evict_comes_before_rejoin() -> None:
    nodes = (node("a"), node("b", LOST), node("c"), node("d", UNREACHABLE), node("e"))
    f = facts(*nodes)
    assert [(a.kind, a.target) for a in candidates(f)] == [("EVICT", "d"), ("REJOIN", "b")]
    assert chosen(f) == ("EVICT", "d")


def test_rejoin_waits_while_an_unreachable_member_is_not_yet_evictable() -> None:
    nodes = (node("a"), node("b", LOST), node("c"), node("d", UNREACHABLE, 30.0), node("e"))
    d = decide(facts(*nodes))
    assert d.action is None
    assert [[r.rule for r in c.refusals] for c in d.refusals] == [["threshold"], ["evict-first"]]
    assert d.reason.startswith("nothing allowed yet; next in line is EVICT d")


def test_refused_evict_lets_nothing_else_through_while_its_target_is_a_member() -> None:
    """min_members forbids the EVICT, and the REJOIN would stall at its add: nothing, and explain says why."""
    nodes = (node("a"), node("b", LOST), node("d", UNREACHABLE))
    d = decide(facts(*nodes, policy=dataclasses.replace(facts().policy, min_members=3)))
    assert d.action is None
    assert [c.action.kind for c in d.refusals] == ["EVICT", "REJOIN"]
    assert "min-members" in [r.rule for r in d.refusals[0].refusals]


def test_a_later_candidate_goes_when_an_earlier_one_is_refused() -> None:
    """b is escalated: automation stops for b only; d still gets its action (an EVICT making room first)."""
    nodes = (node("a"), node("b", LOST), node("c"), node("d", CORRUPT), node("e"))
    f = facts(*nodes, escalated=frozenset({"b"}))
    d = decide(f)
    assert chosen(f) == ("EVICT", "d")
    assert [r.rule for r in d.refusals[0].refusals] == ["escalated"]


def test_unfinished_action_comes_first_even_before_an_evict() -> None:
    nodes = (
        node("a"),
        node("b", NodeClass.DOWN, 0.0, member=False),
        node("c"),
        node("d", UNREACHABLE),
        node("e"),
    )
    unfinished = Action("rejoin-b-3-99", "REJOIN", "b", (("node_id", "1"), ("host", host("b"))))
    d = decide(facts(*nodes, unfinished=unfinished, history=(ago("b", 20.0, outcome=""),)))
    assert d.action == unfinished
    assert d.reason.startswith("resume unfinished REJOIN b (rejoin-b-3-99)")


def test_unfinished_action_refused_blocks_everything_else() -> None:
    nodes = (node("a"), node("b", LOST), node("c"), node("d", UNREACHABLE), node("e"))
    unfinished = Action("rejoin-b-3-99", "REJOIN", "b", expected_params(node("b", LOST)))
    d = decide(facts(*nodes, unfinished=unfinished, paused_until=WALL + 60))
    assert d.action is None
    assert [c.action for c in d.refusals] == [unfinished]
    assert "cannot be resumed: paused" in d.reason


def test_paused_refuses_every_candidate() -> None:
    nodes = (node("a"), node("b", LOST), node("c", CORRUPT), node("d", UNREACHABLE), node("e", EVICTED))
    d = decide(facts(*nodes, paused_until=WALL + 1))
    assert d.action is None
    assert len(d.refusals) == 4
    assert all(c.refusals[0].rule == "paused" for c in d.refusals)
    # once the pause ends, failed members are removed first, in config order (b makes room for c and e)
    after = decide(facts(*nodes, paused_until=WALL))
    assert all("paused" not in [r.rule for r in c.refusals] for c in after.refusals)
    assert chosen(facts(*nodes[:4], paused_until=WALL)) == ("EVICT", "b")


def test_cooldown_and_budget_hold_the_node_back() -> None:
    nodes = (node("a"), node("b"), node("c", LOST), node("d"))
    assert chosen(facts(*nodes, history=(ago("c", 599.0),))) is None
    assert chosen(facts(*nodes, history=(ago("c", 600.0),))) == ("REJOIN", "c")
    spent = (ago("c", 3000.0), ago("c", 2000.0), ago("c", 1000.0))
    d = decide(facts(*nodes, history=spent))
    assert d.action is None and d.escalate == ("c",)
    assert [r.rule for r in d.refusals[0].refusals] == ["budget"]


def test_no_anchor_no_action() -> None:
    d = decide(facts(node("a"), node("b"), node("c", LOST), anchor=None))
    assert d.action is None and d.refusals[0].refusals[0].rule == "no-anchor"


# Exhaustive: every assignment of classes to a 3-member cluster (plus a witness), with every anchor choice.
CLASSES = list(NodeClass)


def _all_clusters() -> Any:
    for classes in itertools.product(CLASSES, repeat=3):
        for anchor in ("a", "b", "c", None):
            nodes = tuple(
                node(n, cls, held) for n, cls, held in zip("abc", classes, (LONG, LONG, LONG), strict=True)
            )
            yield facts(*nodes, node("w", None), me="w", anchor=anchor)


def test_exhaustive_never_the_anchor_never_healthy_never_the_last_healthy() -> None:
    seen = 0
    for f in _all_clusters():
        d = decide(f)
        if d.action is None:
            continue
        seen += 1
        target = f.node(d.action.target)
        assert target is not None and target.verdict is not None
        assert d.action.target != f.anchor
        assert target.verdict.cls not in (HEALTHY, NodeClass.DEGRADED, NodeClass.DOWN, NodeClass.AGENT_DOWN)
        others_healthy = [
            n
            for n in f.nodes
            if n.name != target.name and n.is_member and n.verdict is not None and n.verdict.cls is HEALTHY
        ]
        assert others_healthy, f
        assert check(d.action, f) == []
        assert len(f.removed) <= 1 or (d.action.kind == "REJOIN" and not target.is_member)
    assert seen > 50  # the property was exercised, not vacuous


# ---------------------------------------------------------------------------------------------------------------
# explain


def report(sender: str, views: tuple[tuple[str, str, float], ...], **kw: Any) -> Report:
    return Report("kc", sender, 1, "boot", 7, "a", None, None, views=views, **kw)


THREE = (node("a"), node("b"), node("c", LOST, 10.0))


def test_explain_quorum_reached_with_agents_named() -> None:
    f = facts(*THREE)
    reports = {
        "b": report("b", (("a", "HEALTHY", 99.0), ("b", "HEALTHY", 99.0), ("c", "STATE_LOST", 8.0))),
        "c": report("c", (("a", "HEALTHY", 99.0), ("b", "HEALTHY", 99.0), ("c", "STATE_LOST", 1.0))),
    }
    e = explain(f, reports)
    assert e.candidate == decide(f).action and e.candidate is not None
    assert [(a.agent, a.agrees, a.source) for a in e.agents] == [
        ("a", True, "own view"),
        ("b", True, "its report"),
        ("c", False, "its report"),
    ]
    assert e.agents[2].reason.startswith("threshold: c has been STATE_LOST for 1s")
    assert (e.quorum, e.agreeing, e.quorum_reached) == (2, 2, True)
    assert all(r.ok for r in e.rules) and [r.rule for r in e.rules][:2] == ["paused", "kind"]
    text = render(e)
    assert "Next: REJOIN c" in text
    assert "b: would agree (its report)" in text
    assert "c: would refuse: threshold" in text
    assert "=> 2 of 3 would agree, 2 needed: quorum reached" in text


def test_explain_no_quorum_and_each_kind_of_refusal() -> None:
    f = facts(*THREE, node("d"), node("e"))
    good = (("a", "HEALTHY", 9.0), ("b", "HEALTHY", 9.0), ("c", "STATE_LOST", 9.0))
    reports = {
        "b": report("b", (("a", "HEALTHY", 9.0), ("b", "HEALTHY", 9.0), ("c", "HEALTHY", 9.0))),
        "c": report("c", good, in_flight="evict-x-1-1"),
        "d": report("d", good, paused_until=WALL + 100),
        # e: no fresh report
    }
    e = explain(f, reports)
    lines = {a.agent: a for a in e.agents}
    assert lines["a"].agrees
    assert lines["b"].reason.startswith("class: c is HEALTHY")
    assert lines["c"].reason == "it holds unfinished action evict-x-1-1"
    assert lines["d"].reason.startswith("paused: ")
    assert (lines["e"].agrees, lines["e"].source) == (False, "no fresh report")
    assert (e.quorum, e.agreeing, e.quorum_reached) == (3, 1, False)
    assert "=> 1 of 5 would agree, 3 needed: no quorum" in render(e)


def test_explain_peer_views_missing_or_odd() -> None:
    f = facts(*THREE, node("d"), node("e"))
    reports = {
        "b": report("b", ()),
        "c": report("c", (("a", "HEALTHY", 9.0),)),
        "d": report("d", (("a", "HEALTHY", 9.0), ("b", "HEALTHY", 9.0), ("c", "NEWCLASS", 9.0))),
        "e": report("e", (("a", "HEALTHY", 9.0), ("b", "HEALTHY", 9.0), ("c", "STATE_LOST", float("nan")))),
    }
    lines = {a.agent: a for a in explain(f, reports).agents}
    assert lines["b"].reason == "its report carries no views of the cluster (an older version?)"
    assert lines["c"].reason == "its report carries no view of c"
    assert lines["d"].reason.startswith("class: c is UNKNOWN")
    assert lines["e"].reason.startswith("threshold: c has been STATE_LOST for 0s")


def test_explain_peer_sees_other_nodes_its_own_way() -> None:
    """b's view of d (UNREACHABLE) makes it refuse a REJOIN that a, who sees d HEALTHY, would ack."""
    f = facts(*THREE, node("d"))
    views = (
        ("a", "HEALTHY", 9.0),
        ("b", "HEALTHY", 9.0),
        ("c", "STATE_LOST", 9.0),
        ("d", "UNREACHABLE", 2.0),
    )
    e = explain(f, {"b": report("b", views)})
    b = next(a for a in e.agents if a.agent == "b")
    assert not b.agrees and b.reason.startswith("evict-first: d failed")


def test_explain_for_the_unfinished_action_and_for_nothing() -> None:
    unfinished = Action("rejoin-c-3-5", "REJOIN", "c", expected_params(node("c", LOST)))
    f = facts(node("a"), node("b"), node("c", NodeClass.DOWN, 0.0), unfinished=unfinished)
    views = (("a", "HEALTHY", 9.0), ("b", "HEALTHY", 9.0), ("c", "DOWN", 1.0))
    e = explain(f, {"b": report("b", views, in_flight="rejoin-c-3-5")})
    assert e.candidate == unfinished and e.quorum_reached
    assert [r.rule for r in e.rules] == [
        "paused",
        "kind",
        "finished",
        "target",
        "no-anchor",
        "not-the-anchor",
        "anchor-serves",
    ]

    idle = explain(facts(), {})
    assert idle.candidate is None and idle.agents == () and not idle.quorum_reached
    assert render(idle).startswith("Next: nothing\nWhy: nothing to do")


def test_explain_when_nothing_is_allowed_judges_the_next_in_line() -> None:
    f = facts(node("a"), node("b"), node("c", LOST, 2.0), paused_until=WALL + 90)
    e = explain(f, {})
    assert e.decision.action is None and e.candidate is not None and e.candidate.target == "c"
    refusing = [r.rule for r in e.rules if not r.ok]
    assert refusing == ["paused", "threshold"]
    text = render(e)
    assert text.startswith("Next: nothing yet (next in line: REJOIN c")
    assert "Paused for another 1m30s" in text
    assert "REFUSES  threshold: c has been STATE_LOST for 2s" in text


def test_explain_nodes_thresholds_and_json() -> None:
    f = facts(node("a"), node("c", UNREACHABLE, 30.0), node("w", None))
    e = explain(f, {})
    c = e.nodes[1]
    assert (c.cls, c.wants, c.needs_seconds, c.held_seconds, c.node_id, c.member) == (
        "UNREACHABLE",
        "EVICT",
        120.0,
        30.0,
        2,
        True,
    )
    assert (e.nodes[2].cls, e.nodes[2].wants) == (None, None)
    assert dict(e.thresholds)["evict_after"] == 120.0
    text = render(e)
    assert "EVICT after 2m00s" in text and "witness" in text
    assert "Thresholds: state_lost_after 5s · corrupt_after 1m00s · evict_after 2m00s" in text
    json.dumps(dataclasses.asdict(e))  # plain data: the --json form


def test_explain_trusts_the_key_not_the_sender_field() -> None:
    """A report filed under b that names another sender is judged as b's, never a crash."""
    f = facts(*THREE)
    views = (("a", "HEALTHY", 9.0), ("b", "HEALTHY", 9.0), ("c", "STATE_LOST", 9.0))
    e = explain(f, {"b": report("someone-else", views)})
    assert [(a.agent, a.agrees) for a in e.agents] == [("a", True), ("b", True), ("c", False)]
