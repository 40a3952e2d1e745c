"""Guard rail 5 and the total-failure RESTORE decision (agent.core.restore, through guards and the planner)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.core import planner, restore
from agent.core.backups import BackupInfo
from agent.core.guards import check
from agent.core.messages import Action, RestoreApproval
from agent.core.model import NodeClass
from agent.core.settings import Policy
from tests.unit.test_guards import WALL, ago, facts, node

LOST = NodeClass.STATE_LOST
OLD = BackupInfo("20261125T100000Z-a", WALL - 7200, 40, 1000, "1" * 64, "a")
NEW = BackupInfo("20261125T110000Z-a", WALL - 3600, 50, 1000, "2" * 64, "a")
ARMED = Policy(auto_restore=True)


def lost_cluster(*extra: Any, **overrides: Any) -> Any:
    """Every node's state lost for long, the anchor `a` among them; b and c hold both backups."""
    nodes = extra or (node("a", LOST), node("b", LOST), node("c", LOST))
    base: dict[str, Any] = {"backups": (("b", (NEW, OLD)), ("c", (NEW,))), "policy": ARMED}
    base.update(overrides)
    return facts(*nodes, **base)


def proposed(f: Any) -> Action:
    action = restore.proposal(f)
    assert action is not None
    return action


def refusal(action: Action, f: Any) -> str:
    return "; ".join(f"{r.rule}: {r.reason}" for r in check(action, f))


def test_armed_total_loss_restores_the_freshest_backup_on_the_anchor() -> None:
    f = lost_cluster()
    action = proposed(f)
    assert (action.kind, action.target) == ("RESTORE", "a")
    assert dict(action.params)["backup"] == NEW.id and dict(action.params)["sha256"] == NEW.sha256
    assert check(action, f) == []
    assert planner.decide(f).action == action


def test_not_armed_it_is_refused_and_explain_gives_the_exact_command() -> None:
    f = lost_cluster(policy=Policy())
    action = proposed(f)
    assert "restore is not armed" in refusal(action, f)
    assert planner.decide(f).action is None
    text = planner.render(planner.explain(f, {}))
    assert "RESTORE NEEDED" in text and f"kmagent restore --backup {NEW.id} --approve" in text
    assert "commit 50" in text and "1h" in text  # what is lost: everything after the backup, taken 1 h ago


def test_an_operator_approval_arms_it_and_is_used_once() -> None:
    approval = RestoreApproval(1, WALL + 600, "operator on b")
    f = lost_cluster(policy=Policy(), approval=approval)
    action = proposed(f)
    assert dict(action.params)["requested_by"] == "operator on b"
    assert check(action, f) == []
    used = dataclasses.replace(f, history=(ago("a", 10.0, "RESTORE", "done"),))
    assert restore.active_approval(used) is None
    assert "not armed" in refusal(dataclasses.replace(action, params=(action.params[:3])), used)
    expired = dataclasses.replace(f, approval=dataclasses.replace(approval, until=WALL))
    assert "does not know" in refusal(action, expired)


@pytest.mark.parametrize(
    "cls",
    [
        NodeClass.UNREACHABLE,
        NodeClass.AGENT_DOWN,
        NodeClass.DOWN,
        NodeClass.CORRUPT,
        NodeClass.VOLUME_MISSING,
        NodeClass.STALLED,
    ],
)
def test_a_node_without_evidence_of_loss_blocks_even_an_armed_restore(cls: NodeClass) -> None:
    f = lost_cluster(node("a", LOST), node("b", LOST), node("c", cls))
    assert "c is " + str(cls) in refusal(proposed(f), f) and "--accept-loss-of c" in refusal(proposed(f), f)
    assert "--accept-loss-of c" in restore.command(f)


def test_only_an_operator_can_accept_a_nodes_loss() -> None:
    nodes = (node("a", LOST), node("b", LOST), node("c", NodeClass.UNREACHABLE))
    approval = RestoreApproval(2, WALL + 600, "operator on a", accept_loss_of=("c",))
    f = lost_cluster(*nodes, approval=approval, policy=Policy())
    action = proposed(f)
    assert dict(action.params)["accept_loss_of"] == "c" and check(action, f) == []
    # the same acceptance without the approval: refused, even armed
    forged = Action(action.id, "RESTORE", "a", tuple(p for p in action.params if p[0] != "requested_by"))
    assert "only an operator's approval" in refusal(
        forged, dataclasses.replace(f, approval=None, policy=ARMED)
    )
    # an approval that accepts another node does not cover c
    other = dataclasses.replace(f, approval=dataclasses.replace(approval, accept_loss_of=("b",)))
    assert "differ from the operator's approval" in refusal(action, other)


@pytest.mark.parametrize("cls", [NodeClass.HEALTHY, NodeClass.DEGRADED])
def test_never_while_a_node_serves_even_when_named(cls: NodeClass) -> None:
    approval = RestoreApproval(2, WALL + 600, "op", accept_loss_of=("c",))
    f = lost_cluster(node("a", LOST), node("b", LOST), node("c", cls), approval=approval)
    assert restore.proposal(f) is None  # not called for
    action = Action(
        "restore-a-7-1",
        "RESTORE",
        "a",
        (
            ("backup", NEW.id),
            ("sha256", NEW.sha256),
            ("commit", "50"),
            ("accept_loss_of", "c"),
            ("requested_by", "op"),
        ),
    )
    assert "the cluster still serves" in refusal(action, f)


def test_never_over_a_node_that_holds_state() -> None:
    f = lost_cluster(node("a", NodeClass.DOWN), node("b", LOST), node("c", LOST), anchor="b")
    action = Action("restore-a-7-1", "RESTORE", "a", proposed(f).params)
    assert "a is DOWN: a restore never runs over a node that may hold state" in refusal(action, f)


def test_automatic_restore_waits_restore_after_on_every_node_an_approval_does_not() -> None:
    nodes = (node("a", LOST), node("b", LOST, 119.0), node("c", LOST))
    f = lost_cluster(*nodes)
    assert "b has been STATE_LOST for" in refusal(proposed(f), f)
    approved = lost_cluster(*nodes, approval=RestoreApproval(1, WALL + 60, "op"))
    assert check(proposed(approved), approved) == []


def test_never_an_older_backup_while_a_newer_one_is_available() -> None:
    f = lost_cluster()
    older = Action(
        "restore-a-7-1", "RESTORE", "a", (("backup", OLD.id), ("sha256", OLD.sha256), ("commit", "40"))
    )
    assert "never an older backup" in refusal(older, f)
    pinned = lost_cluster(approval=RestoreApproval(1, WALL + 60, "op", backup=OLD.id))
    assert restore.choice(pinned).backup is None and "older than" in restore.choice(pinned).reason


def test_copies_that_disagree_are_skipped_for_the_next_freshest() -> None:
    forged = dataclasses.replace(NEW, sha256="3" * 64)
    f = lost_cluster(backups=(("b", (NEW, OLD)), ("c", (forged,))))
    assert restore.choice(f).backup == OLD


def test_no_backup_no_restore() -> None:
    f = lost_cluster(backups=())
    assert "no backup to restore" in refusal(proposed(f), f)
    assert "no agent holds an intact backup" in (restore.advice(f) or "")


def test_a_restore_anchor_never_starts_a_rejoin() -> None:
    f = lost_cluster()
    rejoin = Action("rejoin-b-7-1", "REJOIN", "b", (("node_id", "1"), ("host", "b.kms:7373")))
    assert "anchor-serves" in [r.rule for r in check(rejoin, f)]


def test_a_loss_older_than_the_nodes_last_restore_never_licenses_another() -> None:
    """A second after a RESTORE of a, a view that has not caught up still shows a STATE_LOST since long ago."""
    done = ago("a", 5.0, "RESTORE", "done")
    f = lost_cluster(history=(done,))
    assert "a was restored 5s ago" in refusal(proposed(f), f)
    # a new loss of a, after its restore (held 3 s < 5 s ago), is evidence again
    again = lost_cluster(node("a", LOST, 3.0), node("b", LOST), node("c", LOST), history=(done,))
    assert "was restored" not in refusal(proposed(again), again)


def test_a_loss_seen_during_the_last_restore_never_licenses_another() -> None:
    """Found by the restore crash lab (issue 12): the RESTORE of a ran 40 s, its quarantine (or a crash of a's
    agent) restarted a's STATE_LOST evidence 10 s before it ended; one second after the end, views that had not
    caught up licensed a second RESTORE. Evidence that began before the last RESTORE ended is that loss."""
    done = ago("a", 41.0, "RESTORE", "done")._replace(finished_wall=WALL - 1.0)
    seen_during = lost_cluster(node("a", LOST, 11.0), node("b", LOST), node("c", LOST), history=(done,))
    why = restore._restored(seen_during.nodes[0], seen_during)
    assert why is not None and "a was restored" in why
    after = lost_cluster(node("a", LOST, 0.5), node("b", LOST), node("c", LOST), history=(done,))
    assert restore._restored(after.nodes[0], after) is None  # a new loss, after the end: evidence again
    unknown_end = lost_cluster(
        node("a", LOST, 11.0), node("b", LOST), node("c", LOST), history=(ago("a", 41.0, "RESTORE", "done"),)
    )
    assert restore._restored(unknown_end.nodes[0], unknown_end) is None  # as before: measured from the start


# ---- DESIGN §6 rail 11: a host whose volume is not mounted may still hold the newest state ----------------------

MISSING, STALLED = NodeClass.VOLUME_MISSING, NodeClass.STALLED


def test_every_host_booted_without_its_volume_is_no_total_loss() -> None:
    """All three VOLUME_MISSING, auto_restore armed, backups everywhere: nothing is called for, nothing proposed."""
    f = lost_cluster(node("a", MISSING), node("b", MISSING), node("c", MISSING))
    assert not restore.needed(f) and not restore.called_for(f) and not restore.established(f)
    assert restore.proposal(f) is None and restore.advice(f) is None
    assert planner.decide(f).action is None
    assert planner.candidates(f) == ()


@pytest.mark.parametrize("cls", [MISSING, STALLED])
def test_a_missing_volume_or_a_hung_probe_blocks_like_an_unreachable_host(cls: NodeClass) -> None:
    f = lost_cluster(node("a", LOST), node("b", LOST), node("c", cls))
    assert restore.needed(f) and not restore.established(f)
    why = refusal(proposed(f), f)
    assert f"c is {cls}: " in why and "may still" in why and "--accept-loss-of c" in why
    assert planner.decide(f).action is None
    advice = restore.advice(f) or ""
    assert "c may hold newer state than that backup" in advice and "not armed" in advice
    assert "--accept-loss-of c" in restore.command(f)
    # an operator's approval that does not name it: still refused
    approval = RestoreApproval(3, WALL + 600, "root on a")
    approved = lost_cluster(
        node("a", LOST), node("b", LOST), node("c", cls), approval=approval, policy=Policy()
    )
    assert f"c is {cls}" in refusal(proposed(approved), approved)
    # named (--accept-loss-of c) after explain said what that loses: allowed, as for an unreachable host
    named = dataclasses.replace(approved, approval=dataclasses.replace(approval, accept_loss_of=("c",)))
    assert check(proposed(named), named) == []


def test_a_restore_never_runs_on_a_node_whose_volume_is_missing() -> None:
    f = lost_cluster(node("a", LOST), node("b", MISSING), node("c", LOST))
    action = Action("restore-b-7-1", "RESTORE", "b", proposed(f).params)
    assert "b is VOLUME_MISSING: a restore never runs over a node that may hold state" in refusal(action, f)
    # nor is such a node a restore anchor
    assert restore.proposal(dataclasses.replace(f, anchor="b")) is None


def test_the_volume_missing_reason_says_where_the_state_may_be() -> None:
    f = lost_cluster(node("a", LOST), node("b", LOST), node("c", MISSING))
    assert "not on the volume it was marked on, and its state may still be on that volume" in refusal(
        proposed(f), f
    )
