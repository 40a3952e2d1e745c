"""The anchor's remove step decides from the membership first, then from the target's class (agent.actions), and
removes only the node id its certificate names (agent.core.fencing)."""

from __future__ import annotations

import pytest

from agent.actions import StepFailed, check_remove
from agent.core.messages import Action
from agent.core.model import NodeClass

HOST = "10.0.0.3:7373"
OTHER = "10.0.0.1:7373"
EVICT = Action("evict-node3-4-1", "EVICT", "node3", (("node_id", "2"), ("host", HOST)))
FAILED = {NodeClass.UNREACHABLE, NodeClass.STATE_LOST, NodeClass.CORRUPT}
REJOIN = Action("rejoin-node3-4-1", "REJOIN", "node3", (("node_id", "2"), ("host", HOST)))
MEMBER = {0: OTHER, 2: HOST}


@pytest.mark.parametrize("cls", [*NodeClass, None])
def test_a_host_already_out_is_removed_whatever_its_class_now(cls: NodeClass | None) -> None:
    """A resumed EVICT whose remove ran before a crash: the node, back from its cut, is EVICTED; the step is done,
    not failed (which would record the eviction that happened as aborted)."""
    for action in (EVICT, REJOIN):
        plan = check_remove(action, HOST, {0: OTHER}, cls)
        assert plan.ids == ()
        assert plan.detail == "node 2 is not a member: nothing to remove"


@pytest.mark.parametrize("cls", sorted(FAILED))
def test_an_evict_removes_a_member_that_is_still_failed(cls: NodeClass) -> None:
    assert check_remove(EVICT, HOST, MEMBER, cls).ids == (2,)


@pytest.mark.parametrize("cls", [c for c in (*NodeClass, None) if c not in FAILED])
def test_an_evict_never_removes_a_member_that_came_back(cls: NodeClass | None) -> None:
    with pytest.raises(StepFailed, match="not evicted"):
        check_remove(EVICT, HOST, MEMBER, cls)


@pytest.mark.parametrize(
    "cls", [c for c in (*NodeClass, None) if c not in (NodeClass.HEALTHY, NodeClass.DEGRADED)]
)
def test_a_rejoin_removes_its_member_target_whatever_its_class(cls: NodeClass | None) -> None:
    """REJOIN's target was fenced and emptied by then: its class says nothing about whether to remove it..."""
    assert check_remove(REJOIN, HOST, MEMBER, cls).ids == (2,)


@pytest.mark.parametrize("cls", [NodeClass.HEALTHY, NodeClass.DEGRADED])
def test_a_rejoin_never_removes_a_target_that_serves(cls: NodeClass) -> None:
    """...unless it serves: then another anchor healed it, and if minkms reused the old id, the certified id names
    the healed node."""
    with pytest.raises(StepFailed, match="it serves"):
        check_remove(REJOIN, HOST, MEMBER, cls)


@pytest.mark.parametrize("cls", [*NodeClass, None])
def test_a_host_re_added_under_a_new_id_is_never_removed(cls: NodeClass | None) -> None:
    """Issue 12 (1): a later anchor finished the same REJOIN, the host is a member again as node 5; the deposed
    anchor waking up must not remove node 5, whatever its class: the certificate names node 2, which is gone."""
    for action in (REJOIN, EVICT):
        plan = check_remove(action, HOST, {0: OTHER, 5: HOST}, cls)
        assert plan.ids == ()
        assert "node 2 is not a member" in plan.detail and "node 5" in plan.detail


def test_an_id_that_now_names_another_host_is_not_removed() -> None:
    plan = check_remove(REJOIN, HOST, {0: OTHER, 2: "10.0.0.9:7373"}, NodeClass.STATE_LOST)
    assert plan.ids == ()


def test_an_action_certified_without_an_id_removes_nothing() -> None:
    """The host was not a member when proposed: there is no certified id, and none is read from the host."""
    action = Action("rejoin-node3-4-2", "REJOIN", "node3", (("host", HOST),))
    assert check_remove(action, HOST, MEMBER, NodeClass.EVICTED).ids == ()
