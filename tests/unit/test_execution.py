"""agent.core.execution: the executor's rules, shared by agent/actions.py and the simulator."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.core import execution, restore
from agent.core.classify import Verdict
from agent.core.facts import ClusterFacts, NodeFacts
from agent.core.messages import Action, Report, RestoreApproval, StepReply
from agent.core.model import NodeClass, NodeStatus
from agent.core.settings import Timings
from agent.core.view import NodeView
from tests.unit.test_guards import WALL, facts, node

REJOIN = Action("rejoin-a1-1-1", "REJOIN", "a1")
EVICT = Action("evict-a2-1-2", "EVICT", "a2")


def _report(sender: str, action: Action | None = None, finished: tuple[str, ...] = ()) -> Report:
    return Report("c", sender, 1, "b", 1, None, None, None, in_flight_action=action, finished=finished)


def test_unfinished_prefers_held_then_journal_then_reports() -> None:
    reports = [_report("a2", EVICT)]
    assert execution.unfinished_action(REJOIN, [EVICT], reports, set()) == REJOIN
    assert execution.unfinished_action(None, [EVICT], [], set()) == EVICT
    assert execution.unfinished_action(None, [], reports, set()) == EVICT
    assert execution.unfinished_action(None, [], reports, {EVICT.id}) is None  # in our history


def test_a_reported_action_another_report_has_finished_is_not_resumed() -> None:
    """A holder that missed the end still reports it; an agent that missed the history share must not resume it."""
    reports = [_report("a3", EVICT), _report("a1", None, finished=(EVICT.id,))]
    assert execution.unfinished_action(None, [], reports, set()) is None


def _decide(action: Action, step: str, **kw: object) -> execution.TargetDecision:
    args: dict[str, object] = dict(
        cert_term=2, max_cert_term=1, begun=False, finished=False, done=(), own_class=NodeClass.STATE_LOST
    )
    args.update(kw)
    return execution.target_decision(action, step, **args)  # type: ignore[arg-type]


def test_target_refuses_to_begin_a_rejoin_its_own_view_does_not_call_for() -> None:
    assert _decide(REJOIN, "fence").run
    refused = _decide(REJOIN, "fence", own_class=NodeClass.HEALTHY)
    assert not refused.run and not refused.ok and "HEALTHY" in refused.detail
    # once begun, its own steps make it DOWN or STATE_LOST: the class no longer decides
    assert _decide(REJOIN, "quarantine", begun=True, done=("fence",), own_class=NodeClass.DOWN).run


def test_target_answers_older_terms_closed_actions_and_positions() -> None:
    assert "older" in _decide(REJOIN, "fence", cert_term=0).detail
    closed = _decide(REJOIN, "start", begun=True, finished=True, done=("fence", "quarantine"))
    assert execution.already_finished(StepReply(closed.ok, closed.detail))
    assert _decide(REJOIN, "fence", begun=True, done=("fence", "quarantine")) == execution.TargetDecision(
        False, True, "skipped: already past fence (done: fence, quarantine)"
    )
    assert _decide(REJOIN, "quarantine", begun=True, done=("fence", "quarantine")).ok
    assert not _decide(REJOIN, "start", begun=True, done=("fence",)).ok  # ahead


def test_anchor_skips_a_step_its_target_shows_followed() -> None:
    assert execution.done_after("REJOIN", "remove", ("fence", "quarantine", "start")) == "start"
    assert execution.done_after("REJOIN", "remove", ("fence", "quarantine")) is None


def test_evict_remove_only_while_the_target_is_failed() -> None:
    assert execution.evict_remove_refusal(EVICT, NodeClass.UNREACHABLE) is None
    assert execution.evict_remove_refusal(EVICT, NodeClass.HEALTHY) is not None
    assert execution.evict_remove_refusal(REJOIN, NodeClass.DOWN) is None
    assert execution.evict_remove_refusal(REJOIN, NodeClass.HEALTHY) is not None  # healed by another anchor


def test_evict_verify_does_not_wait_for_writes_while_another_failed_member_remains() -> None:
    views = [
        NodeView("a1", Verdict(NodeClass.STATE_LOST, ""), None, None),
        NodeView("a2", Verdict(NodeClass.STATE_LOST, ""), None, None),
        NodeView("a3", Verdict(NodeClass.HEALTHY, ""), None, None),
    ]
    assert execution.writes_wait_for(EVICT, views) == ("a1",)
    assert execution.writes_wait_for(REJOIN, views) == ()


def test_only_a_fresh_uncertified_proposal_gives_way_to_a_held_action() -> None:
    holding = {"a3": EVICT, "a2": REJOIN}
    assert execution.to_adopt(True, False, holding) == REJOIN  # the first refuser by name
    assert execution.to_adopt(False, False, holding) is None
    assert execution.to_adopt(True, True, holding) is None


def test_an_anchor_never_adopts_an_action_it_has_finished() -> None:
    """A refuser that missed the end of an action still holds it: the anchor that closed it must not take it up
    again (it would hold it for ever), but a different held action still comes first."""
    holding = {"a2": REJOIN, "a3": EVICT}
    assert execution.to_adopt(True, False, holding, {REJOIN.id}) == EVICT
    assert execution.to_adopt(True, False, {"a2": REJOIN}, {REJOIN.id}) is None


def test_the_anchor_closes_a_rejoin_of_itself_once_its_own_steps_are_done() -> None:
    mine = ("fence", "quarantine", "start", "mark")
    healthy = NodeClass.HEALTHY
    assert execution.target_closes(REJOIN, "a1", mine, healthy) == ()
    # a crash between running mark and journaling it: mark is run again first (simulator seeds 1153, 1487)
    assert execution.target_closes(REJOIN, "a1", mine[:3], healthy) == ("mark",)
    assert execution.target_closes(REJOIN, "a1", mine[:2], healthy) is None  # start not done: not its doing
    assert execution.target_closes(REJOIN, "a1", ("fence", "start"), healthy) is None  # not in table order
    assert execution.target_closes(REJOIN, "a1", mine, NodeClass.STATE_LOST) is None  # not a HEALTHY member
    assert execution.target_closes(REJOIN, "a1", mine, None) is None
    assert execution.target_closes(REJOIN, "a0", mine, healthy) is None
    assert execution.target_closes(EVICT, "a2", (), healthy) is None  # no target steps: never by itself


def test_a_rejoin_target_awaits_its_mark_between_start_and_mark() -> None:
    assert execution.awaiting_mark("a1", [(REJOIN, ("fence", "quarantine", "start"))])
    assert not execution.awaiting_mark("a1", [(REJOIN, ("fence", "quarantine"))])  # not started fresh yet
    assert not execution.awaiting_mark("a1", [(REJOIN, ("fence", "quarantine", "start", "mark"))])
    assert not execution.awaiting_mark("a0", [(REJOIN, ("fence", "quarantine", "start"))])  # another's
    restore_ = Action("restore-a1-1-3", "RESTORE", "a1")
    assert not execution.awaiting_mark("a1", [(restore_, ("fence", "fetch", "quarantine", "start"))])
    assert not execution.awaiting_mark("a1", [])


def _status(node_id: int, *members: tuple[int, str]) -> NodeStatus:
    return NodeStatus(node_id, "h1", members=members)


def test_a_node_adopts_a_membership_its_rejoin_left_unmarked_only_when_both_views_agree() -> None:
    """Seed 3492: the add of a REJOIN closed failed lands late; the node is a member without its marker."""
    three = ((1, "h0"), (4, "h1"), (2, "h2"))
    reference = dict(three)
    assert execution.adoptable("h1", True, False, _status(4, *three), reference) == 4
    assert execution.adoptable("h1", False, False, _status(4, *three), reference) is None  # no note: no start
    assert execution.adoptable("h1", True, True, _status(4, *three), reference) is None  # its REJOIN marks it
    assert execution.adoptable("h1", True, False, None, reference) is None  # its minkms does not answer
    alone = _status(4, (4, "h1"))  # a fresh one-node cluster of its own: never joined through `add`
    assert execution.adoptable("h1", True, False, alone, {4: "h1"}) is None
    assert execution.adoptable("h1", True, False, _status(4, *three), {1: "h0", 2: "h2"}) is None  # not in it
    assert execution.adoptable("h1", True, False, _status(4, *three), {1: "h0", 3: "h1"}) is None  # other id
    twice = {**reference, 5: "h1"}  # the host under two ids: which one is its own is not clear
    assert execution.adoptable("h1", True, False, _status(4, *three), twice) is None
    assert execution.adoptable("h1", True, False, _status(4, (1, "h0"), (2, "h2")), reference) is None


def test_a_close_counts_once_a_quorum_recorded_it() -> None:
    """Seed 471: an anchor closes on the minority side of a partition; it shares again until a quorum has it."""
    agents = ("a0", "a1", "a2", "a3", "a4")
    alone = execution.close_unconfirmed(EVICT.id, "a0", agents, [])
    assert alone == ("a1", "a2", "a3", "a4")
    one = [_report("a1", finished=(EVICT.id,)), _report("a2", finished=("other",))]
    assert execution.close_unconfirmed(EVICT.id, "a0", agents, one) == ("a2", "a3", "a4")
    assert execution.close_unconfirmed(EVICT.id, "a0", agents, one, confirmed={"a3"}) == ()  # a0, a1, a3
    assert execution.close_unconfirmed(EVICT.id, "a0", agents, [], confirmed={"a9"}) == alone  # not an agent
    assert execution.close_unconfirmed(None, "a0", agents, []) == ()  # nothing closed yet
    assert execution.close_unconfirmed(EVICT.id, "a0", ("a0",), []) == ()  # alone, it is the quorum


def test_the_anchor_drops_an_evict_of_itself_while_it_serves() -> None:
    """Seed 1532: proposed while the node was away, never run; no anchor acts on itself, so it blocked all."""
    assert execution.dropped_by_target(EVICT, "a2", NodeClass.HEALTHY)
    assert execution.dropped_by_target(EVICT, "a2", NodeClass.DEGRADED)
    assert execution.dropped_by_target(EVICT, "a2", NodeClass.EVICTED) is None  # removed after all: not this
    assert execution.dropped_by_target(EVICT, "a2", None) is None
    assert execution.dropped_by_target(EVICT, "a1", NodeClass.HEALTHY) is None  # another node's
    assert execution.dropped_by_target(REJOIN, "a1", NodeClass.HEALTHY) is None  # its target closes it
    assert execution.dropped_by_target(None, "a2", NodeClass.HEALTHY) is None


def test_an_anchor_asks_the_target_again_for_a_target_step_it_journaled() -> None:
    """Its journal may be behind the target's: only the target's answer tells which anchor steps were done."""
    from agent.core.execution import ask_progress
    from agent.core.messages import Action
    from agent.core.playbooks import steps

    rejoin = Action("rejoin-c-3-1", "REJOIN", "c")
    fence, remove = steps("REJOIN")[0], steps("REJOIN")[2]
    assert ask_progress(rejoin, fence, "a", progress_known=False)
    assert not ask_progress(rejoin, fence, "a", progress_known=True)  # asked once in this drive: enough
    assert not ask_progress(rejoin, remove, "a", progress_known=False)  # its own step: its journal decides
    assert not ask_progress(Action("restore-a-3-1", "RESTORE", "a"), steps("RESTORE")[0], "a", False)


# ---- a total loss supersedes an unfinished REJOIN or EVICT ----------------------------------------------------

LOST = NodeClass.STATE_LOST
WAIT = Timings().restore_after  # 120 s


def _lost(*nodes: NodeFacts, **overrides: Any) -> ClusterFacts:
    """Agent a's facts: by default every node's state lost for exactly restore_after."""
    return facts(
        *(nodes or (node("a", LOST, WAIT), node("b", LOST, WAIT), node("c", LOST, WAIT))), **overrides
    )


def test_a_total_loss_held_for_restore_after_supersedes_a_rejoin_or_an_evict_never_a_restore() -> None:
    f = _lost()
    assert execution.superseded(REJOIN, f) == execution.SUPERSEDED
    assert execution.superseded(EVICT, f) == execution.SUPERSEDED
    assert execution.superseded(Action("restore-a-1-1", "RESTORE", "a"), f) is None


def test_the_wait_is_restore_after_on_every_node_inclusive() -> None:
    short = _lost(node("a", LOST, WAIT), node("b", LOST, WAIT - 0.1), node("c", LOST, WAIT))
    assert execution.superseded(REJOIN, short) is None  # a transient, or reports that have not settled


@pytest.mark.parametrize("cls", [NodeClass.HEALTHY, NodeClass.DEGRADED])
def test_never_while_a_node_serves_however_long_the_others_are_lost(cls: NodeClass) -> None:
    """The anchor of the REJOIN, briefly DEGRADED (or serving again) mid-way: the action stays."""
    f = _lost(node("a", LOST, 1e6), node("b", LOST, 1e6), node("c", cls, 0.0))
    assert execution.superseded(REJOIN, f) is None


@pytest.mark.parametrize(
    "cls",
    [
        NodeClass.AGENT_DOWN,  # its minkms answers and is a member: it may well serve, its agent is silent
        NodeClass.UNREACHABLE,  # maybe cut off from this agent only, serving and running the action
        NodeClass.DOWN,  # it may hold state, and so may serve again
        NodeClass.CORRUPT,
        NodeClass.EVICTED,
        NodeClass.UNKNOWN,
    ],
)
def test_a_node_without_evidence_of_loss_keeps_the_action_though_no_node_serves(cls: NodeClass) -> None:
    """`restore.needed` counts these as not serving; dropping the action for them would let an agent that merely
    cannot hear the anchor abort what the anchor still runs. The restore itself is blocked by them too."""
    f = _lost(node("a", LOST, 1e6), node("b", LOST, 1e6), node("c", cls, 1e6))
    assert restore.needed(f)
    assert execution.superseded(REJOIN, f) is None
    assert execution.superseded(EVICT, f) is None


def test_a_node_whose_loss_an_operator_accepted_does_not_keep_it_nor_does_a_witness() -> None:
    nodes = (
        node("a", LOST, WAIT),
        node("b", LOST, WAIT),
        node("c", NodeClass.UNREACHABLE, WAIT),
        node("w", None),
    )
    approval = RestoreApproval(1, WALL + 600, "op", accept_loss_of=("c",))
    assert execution.superseded(EVICT, _lost(*nodes, approval=approval)) == execution.SUPERSEDED
    assert execution.superseded(EVICT, _lost(*nodes)) is None  # without the approval
    expired = dataclasses.replace(approval, until=WALL)
    assert execution.superseded(EVICT, _lost(*nodes, approval=expired)) is None
    recent = (node("a", LOST, WAIT), node("b", LOST, WAIT), node("c", NodeClass.UNREACHABLE, WAIT - 1))
    assert execution.superseded(EVICT, _lost(*recent, approval=approval)) is None  # the wait holds for it too


def test_a_superseded_action_is_skipped_when_choosing_the_unfinished_one() -> None:
    f = _lost()
    skip = execution.superseded_in(_views(f), lambda: f)
    restoring = Action("restore-a-1-1", "RESTORE", "a")
    reports = [_report("b", REJOIN), _report("c", restoring)]
    assert execution.unfinished_action(EVICT, [REJOIN], reports, set(), skip) == restoring
    assert execution.unfinished_action(EVICT, [], [_report("b", REJOIN)], set(), skip) is None
    serving = _lost(node("a", LOST, WAIT), node("b", NodeClass.HEALTHY, WAIT), node("c", LOST, WAIT))
    assert (
        execution.unfinished_action(EVICT, [], [], set(), execution.superseded_in(_views(serving), lambda: f))
        == EVICT
    )


def test_the_facts_are_built_only_when_something_could_be_superseded() -> None:
    def never() -> ClusterFacts:
        raise AssertionError("facts built needlessly")

    serving = _views(_lost(node("a", LOST), node("b", NodeClass.HEALTHY), node("c", LOST)))
    assert not execution.superseded_in(serving, never)(REJOIN)  # a node serves in the views
    assert not execution.superseded_in(_views(_lost()), never)(Action("restore-a-1-1", "RESTORE", "a"))
    assert not execution.superseded_in((), never)(REJOIN)  # no view yet: nothing is skipped


def test_reports_carry_the_superseded_ids_beside_the_history() -> None:
    assert execution.finished_ids(["x", "y"], ["y", "z"]) == ("x", "y", "z")
    many = [f"h{i}" for i in range(20)]
    ids = execution.finished_ids(many, ["s"])
    assert ids == (*many[-execution.RECENT_FINISHED :], "s")
    drops = [f"s{i}" for i in range(40)]
    ids = execution.finished_ids(many, drops)  # a long run of drops never crowds out the newest close
    assert "h19" in ids and "s39" in ids and len(ids) == 2 * execution.RECENT_FINISHED


def _views(f: ClusterFacts) -> tuple[NodeView, ...]:
    return tuple(NodeView(n.name, n.verdict, None, None) for n in f.nodes)


def test_a_resumed_action_gives_way_only_to_one_a_quorum_holds() -> None:
    """Every certified unfinished action is held by a quorum, and no agent holds two: a quorum holding another
    one shows ours was never certified (seed 1013)."""
    from agent.core.execution import to_adopt
    from agent.core.messages import Action

    other = Action("rejoin-c-2-1", "REJOIN", "c")
    assert to_adopt(False, False, {"b": other}, (), quorum=2) is None  # one refuser: ours may be certified
    assert to_adopt(False, False, {"b": other, "c": other}, (), quorum=2) == other
    assert to_adopt(False, True, {"b": other, "c": other}, (), quorum=2) is None  # ours is certified now
    assert to_adopt(False, False, {"b": other, "c": other}, {other.id}, quorum=2) is None  # finished here
    split = {"b": other, "c": Action("evict-d-2-1", "EVICT", "d")}
    assert to_adopt(False, False, split, (), quorum=2) is None


def test_a_target_refuses_a_step_of_a_deposed_anchor() -> None:
    """Issue 12: an anchor that stalled sends a step late; the target follows the anchor of a newer term."""
    assert execution.deposed("a1", 3, "a2", 4) is not None
    assert execution.deposed("a1", 3, "a1", 4) is None  # re-elected itself
    assert execution.deposed("a1", 4, "a2", 4) is None  # not newer: the certificate's own term
    assert execution.deposed("a1", 3, None, 9) is None  # no anchor known: the certificate decides
