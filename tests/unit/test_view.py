"""The cluster view: peers classified from reports and probes; anchor eligibility and preference."""

from __future__ import annotations

import pytest

from agent.core.messages import NodeReport, Report
from agent.core.model import NodeClass
from agent.core.view import (
    Member,
    PeerState,
    anchor_candidates,
    classify_cluster,
    fresh_report,
    reference_commit,
    reference_membership,
)

MEMBERS = (Member("a", "10.0.0.1:7373"), Member("b", "10.0.0.2:7373"), Member("c", "10.0.0.3:7373"))
FULL = ((0, "10.0.0.1:7373"), (1, "10.0.0.2:7373"), (2, "10.0.0.3:7373"))


def node(cls: str = "HEALTHY", commit: int | None = 10, role: str = "Follower", host: str = "", members=FULL):
    return NodeReport(cls, "r", 1.0, host, 0, role, commit, 0, members)


def report(sender: str, n: NodeReport | None) -> Report:
    return Report("c1", sender, 1, "boot", 1, None, None, n)


def peer(n: NodeReport | None, received_at: float | None = 99.0, live: bool | None = None) -> PeerState:
    return PeerState(report("x", n) if received_at is not None else None, received_at, live)


def test_fresh_report_expires_after_peer_timeout() -> None:
    p = peer(node(), received_at=10.0)
    assert fresh_report(p, 12.9, 3.0) is not None
    assert fresh_report(p, 13.1, 3.0) is None
    assert fresh_report(PeerState(), 13.0, 3.0) is None


@pytest.mark.parametrize(
    ("b_state", "expected"),
    [
        (peer(node("HEALTHY")), NodeClass.HEALTHY),
        (peer(node("STATE_LOST")), NodeClass.STATE_LOST),
        (peer(node("BOGUS")), NodeClass.UNKNOWN),  # a class this version does not know
        (peer(node("HEALTHY"), received_at=90.0, live=True), NodeClass.AGENT_DOWN),  # stale, minkms answers
        (peer(node("HEALTHY"), received_at=90.0, live=False), NodeClass.UNREACHABLE),
        (peer(None, received_at=None, live=None), NodeClass.UNREACHABLE),  # never heard, not probed
    ],
)
def test_peers_are_classified_from_reports_and_probes(b_state: PeerState, expected: NodeClass) -> None:
    views = classify_cluster(MEMBERS, "a", node(), {"b": b_state}, dict(FULL), now=100.0, peer_timeout=3.0)
    assert [v.name for v in views] == ["a", "b", "c"]
    verdict = views[1].verdict
    assert verdict is not None and verdict.cls is expected


def test_a_peer_missing_from_the_anchors_membership_is_evicted() -> None:
    reference = dict(FULL[:2])  # c was removed
    views = classify_cluster(MEMBERS, "a", node(), {"c": peer(node())}, reference, 100.0, 3.0)
    assert views[2].verdict is not None and views[2].verdict.cls is NodeClass.EVICTED


@pytest.mark.parametrize(
    ("c_commit", "c_members", "expected"),
    [
        (12, FULL, NodeClass.HEALTHY),  # c lists itself at a later commit: the anchor's report is older news
        (10, FULL, NodeClass.EVICTED),  # the same commit: the reference wins the tie
        (9, FULL, NodeClass.EVICTED),  # c is behind: it missed its own removal
        (None, FULL, NodeClass.EVICTED),  # no commit: nothing to order by
        (12, FULL[:2], NodeClass.EVICTED),  # c no longer lists itself (it was told)
        (12, FULL[2:], NodeClass.EVICTED),  # c alone: a 1-node cluster proves nothing
    ],
)
def test_a_newer_membership_of_a_peer_beats_a_lagging_reference(
    c_commit: int | None, c_members: tuple[tuple[int, str], ...], expected: NodeClass
) -> None:
    """A node just added sees itself a member before the anchor's next report says so (seen in the crash lab:
    a freshly rejoined node flickered EVICTED); commits order the two views."""
    c = node(commit=c_commit, host=MEMBERS[2].minkms_host or "", members=c_members)
    reference = dict(FULL[:2])
    views = classify_cluster(MEMBERS, "a", node(), {"c": peer(c)}, reference, 100.0, 3.0, reference_commit=10)
    assert views[2].verdict is not None and views[2].verdict.cls is expected


def test_witness_has_no_verdict_but_its_report_age() -> None:
    members = (*MEMBERS[:2], Member("w", None))
    views = classify_cluster(members, "a", node(), {"w": peer(None, received_at=98.0)}, None, 100.0, 3.0)
    assert views[2].verdict is None and views[2].report_age == pytest.approx(2.0)


def test_reference_membership_is_the_anchors() -> None:
    own = node(members=FULL[:1])
    peers = {"b": PeerState(report("b", node(members=FULL)), 99.0)}
    assert reference_membership("b", "a", own, peers) == dict(FULL)
    assert reference_membership("a", "a", own, peers) == dict(FULL[:1])
    assert reference_membership(None, "a", own, peers) is None
    assert reference_membership("c", "a", own, peers) is None  # no report from the anchor yet
    assert reference_commit("b", "a", own, peers) == 10
    assert reference_commit("c", "a", own, peers) is None
    assert reference_commit("b", "a", own, {"b": PeerState(report("b", node(members=())), 99.0)}) is None


def test_a_lost_anchor_speaks_for_no_membership() -> None:
    """Seed 265: an anchor elected among lost nodes runs a fresh minkms; its cluster of one is no reference."""
    lost = {"b": PeerState(report("b", node("STATE_LOST", members=FULL[1:2])), 99.0)}
    assert reference_membership("b", "a", node(), lost) is None
    assert reference_commit("b", "a", node(), lost) is None
    assert reference_membership("a", "a", node("STATE_LOST", members=FULL[:1]), {}) is None
    assert reference_membership("a", "a", node("DEGRADED", members=FULL[:1]), {}) == dict(FULL[:1])


def view(name: str, cls: str, commit: int | None, role: str = "Follower"):
    from agent.core.classify import Verdict
    from agent.core.view import NodeView

    return NodeView(name, Verdict(NodeClass(cls), ""), 0.0, node(cls, commit, role))


@pytest.mark.parametrize(
    ("views", "expected"),
    [
        # the minkms leader first, then config order; commits within the tolerance count as equal
        (
            (view("a", "HEALTHY", 10), view("b", "HEALTHY", 10, "Leader"), view("c", "HEALTHY", 10)),
            ("b", "a", "c"),
        ),
        ((view("a", "HEALTHY", 10), view("b", "HEALTHY", 12), view("c", "HEALTHY", 11)), ("a", "b", "c")),
        # far behind the best healthy commit: not eligible
        ((view("a", "HEALTHY", 10), view("b", "HEALTHY", 100, "Leader")), ("b",)),
        # only HEALTHY members with a known commit
        ((view("a", "DEGRADED", 50), view("b", "HEALTHY", None), view("c", "HEALTHY", 3)), ("c",)),
        # no HEALTHY node: the nodes whose state is lost, for a total-failure restore (which b, DOWN, blocks)
        ((view("a", "STATE_LOST", 0), view("b", "DOWN", 10)), ("a",)),
        ((view("a", "UNREACHABLE", 0), view("b", "STATE_LOST", 0), view("c", "STATE_LOST", 0)), ("b", "c")),
        # ... but never while a node serves
        ((view("a", "STATE_LOST", 0), view("b", "DEGRADED", 10)), ()),
        ((view("a", "DOWN", 0), view("b", "CORRUPT", 10)), ()),
    ],
)
def test_anchor_candidates(views, expected) -> None:
    assert anchor_candidates(views) == expected


def test_electable_passes_over_restarting_agents_and_the_unfinished_actions_target() -> None:
    """The target of the unfinished action cannot resume it as anchor (not-the-anchor), and nothing else may
    happen first: it is passed over, unless it is the only candidate (then it closes the action itself)."""
    from agent.core.messages import Action
    from agent.core.view import electable

    views = (view("a", "HEALTHY", 10), view("b", "HEALTHY", 10), view("c", "HEALTHY", 10))
    rejoin_a = Action("rejoin-a-1-1", "REJOIN", "a")
    assert electable(views) == ("a", "b", "c")
    assert electable(views, {"b"}) == ("a", "c")
    assert electable(views, (), rejoin_a) == ("b", "c")
    assert electable(views, {"b", "c"}, rejoin_a) == ("a",)  # the only candidate stays one
