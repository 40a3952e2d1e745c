"""What the guard rails and the planner decide from: one agent's view of the cluster, as plain frozen data.

Pure. The daemon builds `ClusterFacts` each round from its own classification (agent.core.view), the anchor's
membership, its journal and history, and the cluster-wide pause. Its own module so that `guards` and `planner`
share it without importing each other. Construction validates, so that a daemon bug shows up as a clear
ValueError naming the field rather than as a silently wrong decision (a NaN duration compares false with every
threshold, and a missing node would otherwise look like "nothing to do").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from agent.core.backups import BackupInfo
from agent.core.classify import Tracked, Verdict, held_for
from agent.core.election import quorum
from agent.core.messages import Action, RestoreApproval
from agent.core.settings import Policy, Timings
from agent.core.view import NodeView

__all__ = ["ClusterFacts", "HistoryEntry", "NodeFacts", "node_facts"]


@dataclass(frozen=True)
class NodeFacts:
    """One configured agent's node, as the deciding agent sees it."""

    name: str
    host: str | None  # its minkms host; None for a witness
    verdict: Verdict | None  # None for a witness: it has no node to act on
    held_seconds: float  # how long the class has held, on the deciding agent's monotonic clock
    is_member: bool  # its host is in the anchor's membership
    node_id: int | None = None  # its minkms node id in that membership, when it is a member

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("node facts without a name")
        _duration(f"held_seconds of {self.name}", self.held_seconds)
        if self.node_id is not None and (
            not isinstance(self.node_id, int) or isinstance(self.node_id, bool) or self.node_id < 0
        ):
            raise ValueError(f"node_id of {self.name} must be a non-negative integer, got {self.node_id!r}")


class HistoryEntry(NamedTuple):
    """One recent action on a node (finished or not), from the history: what cooldown and budget count."""

    target: str
    kind: str
    started_wall: float  # wall-clock epoch seconds
    outcome: str  # "done", "aborted", "escalated", or "" while unfinished
    finished_wall: float = 0.0  # wall-clock epoch seconds; 0 while unfinished (or not known)


@dataclass(frozen=True, kw_only=True)
class ClusterFacts:
    """Everything one decision needs; keyword-only, so that no two floats can be swapped unnoticed."""

    me: str  # the deciding agent
    anchor: str | None  # the agent holding (or, for an ack, asking under) the lease; None when none is known
    term: int  # the deciding agent's current term (part of new action ids)
    nodes: tuple[NodeFacts, ...]  # every configured agent, in config order
    unfinished: Action | None  # an action not yet finished anywhere we know of
    removed: tuple[str, ...]  # configured member hosts missing from the anchor's membership
    history: tuple[HistoryEntry, ...]  # recent actions, any order
    # ids this agent recorded finished (its history, its superseded drops): guard rule `finished` refuses them
    finished: frozenset[str] = frozenset()
    escalated: frozenset[str]  # nodes automation has stopped for, until `kmagent ack`
    acked: tuple[
        tuple[str, float], ...
    ] = ()  # (node, wall time of its last `kmagent ack`): the budget restarts
    paused_until: float  # wall-clock epoch seconds; 0: not paused
    # Backup copies each agent holds intact (its own store, and the fresh reports of its peers), by agent.
    backups: tuple[tuple[str, tuple[BackupInfo, ...]], ...] = ()
    approval: RestoreApproval | None = None  # the newest operator's restore approval this agent knows
    now: float  # monotonic: the instant held_seconds were measured at
    wall_now: float  # wall clock: for history, cooldown, budget and pause
    timings: Timings
    policy: Policy

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names in the facts: {', '.join(duplicates)}")
        if self.me not in names:
            raise ValueError(f"the deciding agent {self.me!r} is not among the nodes")
        if self.anchor is not None and self.anchor not in names:
            raise ValueError(f"the anchor {self.anchor!r} is not among the nodes")
        if isinstance(self.term, bool) or not isinstance(self.term, int) or self.term < 0:
            raise ValueError(f"term must be a non-negative integer, got {self.term!r}")
        for field in ("now", "wall_now"):
            _finite(field, getattr(self, field))
        _duration("paused_until", self.paused_until)
        for entry in self.history:
            _finite(f"started_wall of the history entry for {entry.target}", entry.started_wall)

    def node(self, name: str) -> NodeFacts | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def quorum(self) -> int:
        """Q = floor(N/2)+1 over every configured agent (witnesses vote)."""
        return quorum(len(self.nodes))


def _finite(field: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")


def _duration(field: str, value: float) -> None:
    _finite(field, value)
    if value < 0:
        raise ValueError(f"{field} must not be negative, got {value!r}")


def node_facts(
    views: Sequence[NodeView],
    hosts: Mapping[str, str | None],
    tracked: Mapping[str, Tracked],
    reference: Mapping[int, str],
    now: float,
) -> tuple[tuple[NodeFacts, ...], tuple[str, ...]]:
    """The nodes as one agent sees them, and the configured member hosts out of the anchor's membership.

    `hosts`: every configured agent's minkms host (None for a witness); `reference`: the anchor's membership
    (empty when unknown: every member then counts as a member). One construction for the daemon and the
    simulator, so that the simulator checks the daemon's facts."""
    by_host = {host: nid for nid, host in reference.items()}
    nodes = []
    for v in views:
        host = hosts.get(v.name)
        t = tracked.get(v.name)
        nodes.append(
            NodeFacts(
                name=v.name,
                host=host,
                verdict=v.verdict,
                held_seconds=held_for(t, now) if t is not None and v.verdict is not None else 0.0,
                is_member=host in by_host if reference else host is not None,
                node_id=by_host.get(host) if host else None,
            )
        )
    removed = tuple(h for h in hosts.values() if reference and h is not None and h not in by_host)
    return tuple(nodes), removed
