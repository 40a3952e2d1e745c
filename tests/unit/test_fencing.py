"""Fencing of the anchor's destructive commands (agent.core.fencing): the lease must outlast the command, checked
right before it leaves; a malformed certified id names nothing."""

from __future__ import annotations

import pytest

from agent.core import fencing
from agent.core.messages import Action


def _action(node_id: str | None) -> Action:
    params = (("node_id", node_id),) if node_id is not None else ()
    return Action("rejoin-n3-1-1", "REJOIN", "n3", (*params, ("host", "h3:7373")))


@pytest.mark.parametrize(
    ("raw", "want"),
    [("2", 2), ("0", 0), (None, None), ("-1", None), ("02", None), ("x", None), ("2.0", None)],
)
def test_the_certified_id_is_read_strictly(raw: str | None, want: int | None) -> None:
    assert fencing.certified_node_id(_action(raw)) == want


def test_a_command_is_not_started_without_the_lease() -> None:
    assert fencing.lease_refusal(False, 9.0, fencing.MIN_COMMAND_SECONDS) == (
        "this agent no longer holds the anchor lease"
    )


def test_a_command_starts_only_with_time_to_spare_and_runs_while_the_lease_holds() -> None:
    start = fencing.MIN_COMMAND_SECONDS
    assert fencing.lease_refusal(True, start + fencing.LEASE_MARGIN, start) is None
    refusal = fencing.lease_refusal(True, start + fencing.LEASE_MARGIN - 0.01, start)
    assert refusal is not None and "could outlive the lease" in refusal
    # running: killed only once the lease would end within the margin (renewals extend it meanwhile)
    assert fencing.lease_refusal(True, fencing.LEASE_MARGIN + 0.01, 0.0) is None
    assert fencing.lease_refusal(True, fencing.LEASE_MARGIN - 0.01, 0.0) is not None
    assert fencing.lease_refusal(False, 30.0, 0.0) is not None
