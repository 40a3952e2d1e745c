"""Observations have an age (issue 12): a verdict whose observation is older than peer_timeout is STALLED for
everyone, and a class holds only as long as observations show it (a blip repeated by a hung probe holds 0 s)."""

from __future__ import annotations

from agent.core import guards
from agent.core.classify import Tracked, Verdict, held_for, track
from agent.core.messages import NodeReport, Report
from agent.core.model import NodeClass
from agent.core.view import (
    Member,
    NodeView,
    PeerState,
    anchor_candidates,
    classify_cluster,
    observed_at,
    vouched,
)

MEMBERS = (Member("a", "10.0.0.1:7373"), Member("b", "10.0.0.2:7373"), Member("c", "10.0.0.3:7373"))
FULL = ((0, "10.0.0.1:7373"), (1, "10.0.0.2:7373"), (2, "10.0.0.3:7373"))
LOST = Verdict(NodeClass.STATE_LOST, "identity marker is missing: the volume was replaced")


def node(cls: str = "HEALTHY", observed: float | None = 0.5, host: str = "10.0.0.2:7373") -> NodeReport:
    return NodeReport(cls, "r", 1.0, host, 1, "Follower", 10, 0, FULL, observed_seconds=observed)


def views(b: NodeReport, received_at: float = 99.0, now: float = 100.0) -> tuple[NodeView, ...]:
    report = Report("c1", "b", 1, "boot", 1, None, None, b)
    own = node(host="10.0.0.1:7373")
    return classify_cluster(
        MEMBERS, "a", own, {"b": PeerState(report, received_at)}, dict(FULL), now=now, peer_timeout=3.0
    )


def test_a_fresh_observation_is_taken_as_said() -> None:
    assert vouched(LOST, 2.9, 3.0) == LOST
    assert vouched(LOST, None, 3.0) == LOST  # an agent that does not say: as before


def test_an_old_observation_is_stalled_whatever_it_said() -> None:
    for cls in (NodeClass.HEALTHY, NodeClass.STATE_LOST, NodeClass.CORRUPT, NodeClass.DEGRADED):
        verdict = vouched(Verdict(cls, "x"), 3.5, 3.0)
        assert verdict.cls is NodeClass.STALLED and str(cls) in verdict.reason


def test_a_peer_reporting_an_old_observation_is_stalled_not_lost() -> None:
    """A fresh report (received 1 s ago) of an observation taken 10 s ago: the peer's probe hangs."""
    b = views(node("STATE_LOST", observed=10.0))[1]
    assert b.verdict is not None and b.verdict.cls is NodeClass.STALLED
    assert views(node("STATE_LOST", observed=1.0))[1].verdict == Verdict(NodeClass.STATE_LOST, "r")


def test_a_stalled_node_is_never_anchor_nor_acted_on() -> None:
    vs = views(node("HEALTHY", observed=10.0))
    assert "b" not in anchor_candidates(vs)
    assert NodeClass.STALLED not in guards._SUPPORTS["REJOIN"] | guards._SUPPORTS["EVICT"]


def test_the_observation_time_of_a_view() -> None:
    b = views(node("STATE_LOST", observed=2.0), received_at=99.0, now=100.0)[1]
    assert observed_at(b, 100.0) == 100.0 - 1.0 - 2.0
    silent = views(node("STATE_LOST"), received_at=90.0, now=100.0)[1]  # UNREACHABLE: inferred here, now
    assert observed_at(silent, 100.0) is None


def test_a_blip_repeated_by_a_hung_probe_holds_for_no_time() -> None:
    """Issue 12 (2): one STATE_LOST observation at t=10, then the probe hangs: reports keep repeating it. Held up
    to its newest observation, it never reaches state_lost_after; before, it held for ever."""
    t = track(None, LOST, now=10.5, seen=10.0)
    for now in (11.5, 12.5, 13.5, 20.0):
        t = track(t, LOST, now=now, seen=10.0)
        assert held_for(t, now) == 0.0


def test_a_class_holds_over_the_span_of_its_observations() -> None:
    t = track(None, LOST, now=10.5, seen=10.0)
    for seen in (11.0, 12.0, 13.0):
        t = track(t, LOST, now=seen + 0.5, seen=seen)
    assert held_for(t, 13.5) == 3.0
    assert held_for(t, 1000.0) == 3.0  # no newer observation: no more time
    changed = track(t, Verdict(NodeClass.HEALTHY, "ok"), now=14.5, seen=14.0)
    assert changed.since == 14.0 and held_for(changed, 15.0) == 0.0


def test_an_inferred_class_holds_as_of_now() -> None:
    t = track(None, Verdict(NodeClass.UNREACHABLE, "silent"), now=10.0)
    assert held_for(t, 25.0) == 15.0
    assert Tracked(LOST, 1.0).seen is None
