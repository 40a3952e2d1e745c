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
    ("raw", "want"), [("2", 2), ("0", 0), (None, None), ("-1", None), ("02", None), ("x", None), ("2.0", None)]
)
def test_the_certified_id_is_read_strictly(raw: str | None, want: int | None) -> None:
    assert fencing.certified_node_id(_action(raw)) == want


def test_a_command_is_not_started_without_the_lease() -> None:
    assert fencing.lease_refusal(False, 9.0, 3.0) == "this agent no longer holds the anchor lease"


def test_a_command_is_not_started_unless_the_lease_outlasts_its_timeout() -> None:
    assert fencing.lease_refusal(True, 4.0 + fencing.LEASE_MARGIN, 4.0) is None
    refusal = fencing.lease_refusal(True, 4.0 + fencing.LEASE_MARGIN - 0.01, 4.0)
    assert refusal is not None and "could outlive the lease" in refusal


def test_the_timeout_is_cut_to_fit_the_lease() -> None:
    """A 10 s command under a 5 s lease runs with what the lease leaves, so that it is killed before the lease ends;
    with too little left it is not started at all."""
    assert fencing.command_timeout(4.5, 10.0) == pytest.approx(4.5 - fencing.LEASE_MARGIN)
    assert fencing.command_timeout(30.0, 10.0) == 10.0
    timeout = fencing.command_timeout(1.5, 10.0)
    assert fencing.lease_refusal(True, 1.5, timeout) is not None  # less than MIN_COMMAND_SECONDS to run
    for remaining in (2.5, 4.0, 9.0, 40.0):
        timeout = fencing.command_timeout(remaining, 10.0)
        assert fencing.lease_refusal(True, remaining, timeout) is None
        assert timeout + fencing.LEASE_MARGIN <= remaining
