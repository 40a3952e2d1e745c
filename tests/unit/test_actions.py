"""The anchor's remove step decides from the membership first, then from the target's class (agent.actions)."""

from __future__ import annotations

import pytest

from agent.actions import StepFailed, check_remove
from agent.core.messages import Action
from agent.core.model import NodeClass

HOST = "10.0.0.3:7373"
EVICT = Action("evict-node3-4-1", "EVICT", "node3", (("node_id", "2"), ("host", HOST)))
FAILED = {NodeClass.UNREACHABLE, NodeClass.STATE_LOST, NodeClass.CORRUPT}
REJOIN = Action("rejoin-node3-4-1", "REJOIN", "node3", (("node_id", "2"), ("host", HOST)))


@pytest.mark.parametrize("cls", [*NodeClass, None])
def test_a_host_already_out_is_removed_whatever_its_class_now(cls: NodeClass | None) -> None:
    """A resumed EVICT whose remove ran before a crash: the node, back from its cut, is EVICTED; the step is done,
    not failed (which would record the eviction that happened as aborted)."""
    for action in (EVICT, REJOIN):
        assert check_remove(action, HOST, [], cls) == f"{HOST} is not a member: nothing to remove"


@pytest.mark.parametrize("cls", sorted(FAILED))
def test_an_evict_removes_a_member_that_is_still_failed(cls: NodeClass) -> None:
    assert check_remove(EVICT, HOST, [2], cls) is None


@pytest.mark.parametrize("cls", [c for c in (*NodeClass, None) if c not in FAILED])
def test_an_evict_never_removes_a_member_that_came_back(cls: NodeClass | None) -> None:
    with pytest.raises(StepFailed, match="not evicted"):
        check_remove(EVICT, HOST, [2], cls)


def test_a_rejoin_removes_its_member_target_whatever_its_class() -> None:
    """REJOIN's target was fenced and emptied by then: its class says nothing about whether to remove it."""
    assert check_remove(REJOIN, HOST, [2], NodeClass.DOWN) is None
