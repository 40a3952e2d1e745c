"""The cluster as one agent sees it: its own verdict, its peers' reports and its probes of their minkms.

Pure. The daemon keeps the inputs (latest report per peer with the local receipt time) and calls these each
round; election and, later, the planner read the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.core.classify import PeerEvidence, Verdict, classify_peer, human_duration, lists_itself_later
from agent.core.messages import Action, NodeReport, Report
from agent.core.model import NodeClass

LEADER_ROLE = "Leader"
# Commit indexes a HEALTHY member may trail the best one by and still be eligible as anchor.
MAX_COMMIT_LAG = 16


@dataclass(frozen=True)
class Member:
    """One configured agent, as the view needs it (a slice of the config's AgentSpec)."""

    name: str
    minkms_host: str | None  # None for a witness

    @property
    def is_witness(self) -> bool:
        return self.minkms_host is None


@dataclass(frozen=True)
class PeerState:
    """What this agent holds about one peer."""

    report: Report | None = None
    received_at: float | None = None  # this agent's monotonic clock
    minkms_live: bool | None = None  # this agent's own probe of the peer's minkms


@dataclass(frozen=True)
class NodeView:
    name: str
    verdict: Verdict | None  # None for a witness: it has no node to classify
    report_age: float | None  # None for this agent itself, or a peer never heard from
    node: NodeReport | None  # what the node's own agent last said about it (for this agent: its own)


def report_age(peer: PeerState, now: float) -> float | None:
    return None if peer.received_at is None else max(0.0, now - peer.received_at)


def fresh_report(peer: PeerState, now: float, peer_timeout: float) -> Report | None:
    age = report_age(peer, now)
    return peer.report if age is not None and age <= peer_timeout else None


def _anchor_node(
    anchor: str | None, me: str, own: NodeReport | None, peers: Mapping[str, PeerState]
) -> NodeReport | None:
    """The anchor's node, when its minkms can speak for the cluster. An anchor elected among lost nodes (to
    restore) runs a fresh minkms or none: taken as the reference, its cluster of one made a surviving member
    look EVICTED, so nothing served and the lost anchor stayed for ever (simulator seed 265)."""
    if anchor is None:
        return None
    if anchor == me:
        node = own
    else:
        report = peers[anchor].report if anchor in peers else None
        node = report.node if report is not None else None
    return None if node is None or node.cls == NodeClass.STATE_LOST.value else node


def reference_membership(
    anchor: str | None, me: str, own: NodeReport | None, peers: Mapping[str, PeerState]
) -> dict[int, str] | None:
    """The cluster's membership: the one the anchor's minkms reports (DESIGN §3), None without an anchor."""
    node = _anchor_node(anchor, me, own, peers)
    if node is None or not node.members:
        return None
    return dict(node.members)


def reference_commit(
    anchor: str | None, me: str, own: NodeReport | None, peers: Mapping[str, PeerState]
) -> int | None:
    """The commit the anchor's minkms had applied when it read that membership: how new the reference is."""
    node = _anchor_node(anchor, me, own, peers)
    return node.commit if node is not None and node.members else None


def classify_cluster(
    members: Sequence[Member],
    me: str,
    own: NodeReport | None,
    peers: Mapping[str, PeerState],
    reference: Mapping[int, str] | None,
    now: float,
    peer_timeout: float,
    reference_commit: int | None = None,
    stale: float | None = None,
) -> tuple[NodeView, ...]:
    """One NodeView per configured agent, in config order. This agent's own verdict is taken as reported. `stale`:
    how old a peer's observation may be (`stale_after`; None: peer_timeout)."""
    views = []
    for m in members:
        if m.name == me:
            verdict = Verdict(NodeClass(own.cls), own.reason) if own is not None else None
            views.append(NodeView(m.name, verdict, None, own))
            continue
        peer = peers.get(m.name, PeerState())
        node = peer.report.node if peer.report else None
        if m.is_witness:
            views.append(NodeView(m.name, None, report_age(peer, now), node))
            continue
        reported = _reported_verdict(node, peer_timeout if stale is None else stale)
        in_reference = (
            reference is None
            or m.minkms_host in reference.values()
            or (node is not None and lists_itself_later(node, m.minkms_host, reference, reference_commit))
        )
        evidence = PeerEvidence(report_age(peer, now), reported, peer.minkms_live, in_reference)
        views.append(NodeView(m.name, classify_peer(evidence, peer_timeout), report_age(peer, now), node))
    return tuple(views)


def observed_at(view: NodeView, now: float) -> float | None:
    """When the observation behind the view's verdict was taken, on this agent's clock: the node's own report's
    observation (its age when sent, plus the report's age), None when the verdict is not the node's own word
    (inferred here from silence and probes: it holds as of `now`) or the node does not say."""
    node, verdict = view.node, view.verdict
    if node is None or verdict is None or node.observed_seconds is None:
        return None
    if verdict.cls.value != node.cls or verdict.cls is NodeClass.STALLED:  # STALLED holds as of now
        return None
    return now - (view.report_age or 0.0) - max(0.0, node.observed_seconds)


def stale_after(peer_timeout: float, probe_interval: float, command_timeout: float) -> float:
    """How old an observation may be before nobody vouches for it: the longest a working observation loop leaves
    it unrefreshed (a round waits at most peer_timeout for the storage probe, then command_timeout for `minkms
    stat`, then sleeps up to probe_interval). Shorter, a healthy anchor whose `stat` is slow (it asks every member,
    up to a second each, while nodes restart) would flap STALLED and step down mid-action. A hung storage probe is
    STALLED sooner, at its own deadline (peer_timeout), and an unvouched verdict never gains hold time meanwhile
    (`classify.track` holds a class only over its observations)."""
    return peer_timeout + command_timeout + probe_interval


def vouched(verdict: Verdict, observed_age: float | None, stale: float) -> Verdict:
    """The verdict, or STALLED when the observation behind it is older than `stale` (`stale_after`): a round that
    hangs, a stalled or paused agent keeps saying what it last saw, and that is no evidence for anything (not for
    a wipe, not for "healthy"). `observed_age`: the observation's age when it was reported (None: not known,
    trusted as before; never below 0). One rule for this agent's own report and for what peers report."""
    if observed_age is None or max(0.0, observed_age) <= stale or verdict.cls is NodeClass.STALLED:
        return verdict
    return Verdict(
        NodeClass.STALLED,
        f"its newest observation is {human_duration(observed_age)} old (said {verdict.cls}: {verdict.reason})",
    )


def _reported_verdict(node: NodeReport | None, stale: float) -> Verdict | None:
    if node is None:
        return None
    try:
        verdict = Verdict(NodeClass(node.cls), node.reason)
    except ValueError:  # a newer peer's class this version does not know: not evidence of anything
        return Verdict(NodeClass.UNKNOWN, f"reported an unknown class {node.cls!r}")
    return vouched(verdict, node.observed_seconds, stale)


def anchor_candidates(views: Sequence[NodeView], max_lag: int = MAX_COMMIT_LAG) -> tuple[str, ...]:
    """Eligible anchors in order of preference (DESIGN §4.2).

    Eligible: a HEALTHY member whose commit is known and not behind the best commit among HEALTHY members by more
    than `max_lag` (reports sample commits at different instants while writes flow). Preferred: the minkms
    leader, then config order. Commits within the tolerance count as equal: ordering by them would make agents
    that sampled at different instants disagree on who goes first, and both would wait out a back-off. Without
    any HEALTHY node: see `_restore_candidates`.
    """
    healthy = [
        (i, v, v.node.commit)
        for i, v in enumerate(views)
        if v.verdict is not None
        and v.verdict.cls is NodeClass.HEALTHY
        and v.node is not None
        and v.node.commit is not None
    ]
    if not healthy:
        return _restore_candidates(views)
    best = max(commit for _, _, commit in healthy)
    eligible = [(i, v, commit) for i, v, commit in healthy if commit >= best - max_lag]
    eligible.sort(key=lambda e: (e[1].node is None or e[1].node.role != LEADER_ROLE, e[0]))
    return tuple(v.name for _, v, _ in eligible)


def _restore_candidates(views: Sequence[NodeView]) -> tuple[str, ...]:
    """When no node serves (none HEALTHY or DEGRADED), the nodes whose own agent reports their state lost, in
    config order: a total-failure RESTORE needs an anchor among the hosts able to restore (DESIGN §5). Such an
    anchor can do nothing else: REJOIN and EVICT need another HEALTHY member (guard `last-healthy`)."""
    serving = (NodeClass.HEALTHY, NodeClass.DEGRADED)
    if any(v.verdict is not None and v.verdict.cls in serving for v in views):
        return ()
    return tuple(v.name for v in views if v.verdict is not None and v.verdict.cls is NodeClass.STATE_LOST)


def electable(
    views: Sequence[NodeView], restarting: Iterable[str] = (), unfinished: Action | None = None
) -> tuple[str, ...]:
    """`anchor_candidates`, less the agents that could not serve as anchor now, in this agent's own view: one
    within its restart window (it cannot stand: passing over it lets the next one go without a back-off), and
    the target of the unfinished action. That action comes before anything else, and no anchor may act on
    itself (guards, not-the-anchor): as anchor, its target would block the cluster for ever (found by the
    simulator: a REJOIN's target, a HEALTHY member again once its own steps are done, became anchor before the
    verify). Voters apply it too, so such an anchor steps down and another one resumes the action. When the
    target is the only candidate it stays one: no anchor at all would block everything as surely (a REJOIN's
    target that did all its own steps then closes the action itself: `execution.target_closes`). A RESTORE is
    the exception: it runs on its anchor."""
    ready = tuple(c for c in anchor_candidates(views) if c not in set(restarting))
    others = tuple(
        c for c in ready if unfinished is None or unfinished.kind == "RESTORE" or c != unfinished.target
    )
    return others or ready
