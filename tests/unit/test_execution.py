"""agent.core.execution: the executor's rules, shared by agent/actions.py and the simulator."""

from __future__ import annotations

from agent.core import execution
from agent.core.classify import Verdict
from agent.core.messages import Action, Report, StepReply
from agent.core.model import NodeClass
from agent.core.view import NodeView

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
    assert execution.evict_remove_refusal(REJOIN, NodeClass.HEALTHY) is None


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
    assert execution.target_closes(REJOIN, "a1", mine)
    assert not execution.target_closes(REJOIN, "a1", mine[:3])
    assert not execution.target_closes(REJOIN, "a0", mine)
    assert not execution.target_closes(EVICT, "a2", ())  # no target steps: never by itself


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
