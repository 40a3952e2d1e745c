"""Per-node health classes (DESIGN §3), derived from one observation or from a peer's evidence.

Pure: no I/O, no clock reads. Every verdict carries a one-line reason with its evidence, because an operator
(and `explain`) must see *why* a node is in a class before anything destructive follows from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from agent.core.messages import NodeReport
from agent.core.model import MarkerState, NodeClass, NodeStatus, Observation, ServiceState
from agent.core.startup import operator_startup_failure

__all__ = [
    "PeerEvidence",
    "Thresholds",
    "Tracked",
    "Verdict",
    "classify_local",
    "classify_peer",
    "held_for",
    "lists_itself_later",
    "prune_samples",
    "restarts_within",
    "track",
]


@dataclass(frozen=True)
class Thresholds:
    """Tunables of classification; validated here so that no config can make every node look crash-looping."""

    crash_loop_restarts: int = 3  # K restarts within the crash-loop window make CORRUPT

    def __post_init__(self) -> None:
        if self.crash_loop_restarts < 1:
            raise ValueError(f"crash_loop_restarts must be >= 1, got {self.crash_loop_restarts}")


@dataclass(frozen=True)
class Verdict:
    """A class and the evidence for it, in one short human line."""

    cls: NodeClass
    reason: str

    def __str__(self) -> str:
        return f"{self.cls}: {self.reason}"


# ---------------------------------------------------------------------------------------------------------------
# The local node


def classify_local(
    obs: Observation,
    my_host: str,
    reference: Mapping[int, str] | None,
    thresholds: Thresholds,
    reference_commit: int | None = None,
    awaiting_mark: bool = False,
) -> Verdict:
    """Classify this agent's own node; the rules of DESIGN §3 in precedence order, first match wins.

    `reference` is the anchor's membership (node id -> host); None (or empty, which no real cluster reports)
    means no anchor is known, and the local node's own member list stands in for it. `reference_commit` is the
    anchor's commit when it read that membership (see `lists_itself_later`). `awaiting_mark`: this node is the
    target of its own unfinished REJOIN whose `start` is done and whose `mark` is not (see `_state_lost`).
    """
    local = obs.minkms.node_by_host(my_host)
    cluster_error = obs.minkms.error

    # 0. STALLED: the storage probe did not return within its deadline (a hung volume). Its last answer, whatever
    # it was, cannot be vouched for: never evidence for a wipe, never counted as healthy.
    if obs.storage.stalled:
        return Verdict(NodeClass.STALLED, obs.storage.error or "the storage probe did not return in time")

    # 0b. VOLUME_MISSING: the storage path is not on the volume this node was marked on (an unmounted volume shows
    # an empty directory of the root filesystem under its mount point). Whatever else is seen there, it is not
    # this node's state: never STATE_LOST (a REJOIN would mark the wrong filesystem, a restore would overwrite
    # state that still exists), never CORRUPT. An operator mounts the volume (DESIGN §6 rail 11).
    if obs.storage.volume_missing:
        return Verdict(
            NodeClass.VOLUME_MISSING,
            obs.storage.error or "the storage path is not on the volume this node was marked on",
        )

    # 1. STATE_LOST: the state this node should hold is gone or is not ours.
    lost = _state_lost(obs, my_host, local, reference, awaiting_mark)
    if lost is not None:
        return Verdict(NodeClass.STATE_LOST, lost)

    # 2. CORRUPT: crash loop with state present (state presence is guaranteed by rule 1, checked again for clarity).
    # Not when the volume itself is broken: CORRUPT leads to a REJOIN that quarantines the state, which cannot
    # help a read-only or failing volume and would throw away state that may be intact. That is DOWN, for a human.
    # Nor when minkms answers live and ready right now: the loop is over, and restarts that are still inside the
    # window must not carry a recovered node to a REJOIN.
    restarts = obs.service.restarts_in_window
    broken = _storage_broken(obs)
    recovered = obs.health.live is True and obs.health.ready is True
    if restarts >= thresholds.crash_loop_restarts and not obs.storage.empty and not recovered:
        if broken:
            return Verdict(
                NodeClass.DOWN,
                f"{restarts} restarts within the crash-loop window on broken storage ({'; '.join(broken)}): "
                "not treated as corruption, the volume needs an operator",
            )
        # Nor when minkms says why it cannot start and the reason is its config or its HSM/KMS backend: a
        # REJOIN would throw away intact state and the fresh node would fail the same way.
        startup = operator_startup_failure(obs.service.last_error)
        if startup is not None:
            return Verdict(
                NodeClass.DOWN,
                f"crash loop ({restarts} restarts within the window): minkms cannot start: {startup} "
                "(config or HSM/KMS backend: an operator matter, not corruption)",
            )
        return Verdict(
            NodeClass.CORRUPT, f"{restarts} restarts within the crash-loop window with state present"
        )

    # 3. DOWN: stopped, restarting or not answering (with the storage's fault, if any, as the likely cause).
    down: list[str] = []
    if obs.service.state is not ServiceState.ACTIVE:
        down.append(f"service is {obs.service.state.value}")
        if startup := operator_startup_failure(obs.service.last_error):
            down.append(f"minkms cannot start: {startup}")
    if obs.health.live is None:
        down.append("minkms does not answer the live probe")
    elif not obs.health.live:
        down.append("minkms reports not live")
    if down:
        return Verdict(NodeClass.DOWN, "; ".join(down + broken))

    # 4. EVICTED: live, but the membership does not list this host. Unknown membership is not evidence.
    members, whose = _membership(reference, local)
    if local is not None and lists_itself_later(local, my_host, reference, reference_commit):
        members, whose = dict(local.members), "its own"
    if members is not None and my_host not in members.values():
        return Verdict(NodeClass.EVICTED, f"not in {whose} membership")

    # 5. DEGRADED: live, but not fully serviceable, or a storage warning.
    issues: list[str] = []
    if obs.health.ready is None:
        issues.append("live but the ready probe got no answer")
    elif not obs.health.ready:
        issues.append("live but not ready")
    issues += broken
    if obs.storage.low_space:
        free = obs.storage.free_bytes
        issues.append(f"low free space: {_bytes(free)}" if free is not None else "low free space")
    # A local `stat` failure never demotes a live node below DEGRADED: it is not evidence of lost state.
    unavailable = f"cluster status unavailable: {cluster_error}" if cluster_error else None
    if members is None:
        # Membership cannot be confirmed, so the node cannot be called HEALTHY.
        issues.append(unavailable or "membership unknown: no anchor and no local member list")
    if issues:
        if members is not None and unavailable:
            issues.append(unavailable)  # membership confirmed by the anchor: shown, but decides nothing
        return Verdict(NodeClass.DEGRADED, "; ".join(issues))

    # 6. HEALTHY.
    reason = "live, ready, a member, storage ok"
    return Verdict(NodeClass.HEALTHY, f"{reason}; {unavailable}" if unavailable else reason)


def _storage_broken(obs: Observation) -> list[str]:
    """What makes the storage unusable for minkms (not a mere warning such as low space); empty when fine."""
    storage, problems = obs.storage, []
    if not storage.probe_ok:
        problems.append(f"storage probe failed: {storage.error}" if storage.error else "storage probe failed")
    if storage.read_only:
        problems.append("storage is read-only")
    return problems


def _state_lost(
    obs: Observation,
    my_host: str,
    local: NodeStatus | None,
    reference: Mapping[int, str] | None,
    awaiting_mark: bool = False,
) -> str | None:
    """Why this node's state is lost or foreign, or None; the only class that licenses a REJOIN of a live node.

    A missing marker means a replaced volume, except on a node its own REJOIN has started fresh and added (it is
    a member of a cluster of two or more again) but not yet marked: that state is the cluster's, copied by the
    join, and the marker comes at `mark`. Called lost, a crash before `mark` followed by the loss of every other
    node would have had it quarantined and the cluster restored from an older backup (simulator seed 1731)."""
    if obs.storage.empty:
        return "storage path is empty"
    joined = local is not None and len(local.members) >= 2 and my_host in dict(local.members).values()
    if obs.storage.marker is MarkerState.MISSING and not (awaiting_mark and joined):
        return "identity marker is missing: the volume was replaced"
    if obs.storage.marker is MarkerState.MISMATCH:
        return "identity marker names another cluster or host: a wrong or replaced volume"
    # minkms started on an empty directory comes up as a fresh single-node cluster (node 0), while the cluster
    # still lists this host: the one hazard that storage probes alone cannot see once minkms has written state.
    if local is None or len(local.members) != 1 or not reference or len(reference) < 2:
        return None
    known_as = sorted(nid for nid, host in reference.items() if host == my_host)
    if not known_as:
        return None  # the cluster does not list this host: that is EVICTED, decided later
    return (
        f"minkms is node {local.node_id} of a 1-node cluster, "
        f"but the cluster knows this host as node {known_as[0]} of {len(reference)}"
    )


def lists_itself_later(
    node: NodeStatus | NodeReport,
    host: str | None,
    reference: Mapping[int, str] | None,
    reference_commit: int | None,
) -> bool:
    """The node's own minkms shows it just added to the reference cluster, at a commit past the reference's.

    The anchor's membership reaches the others a probe round and a report late, so a node just added sees itself
    a member before the anchor's report says so; without this, a freshly rejoined node would look EVICTED for a
    few seconds (seen in the crash lab). The later view wins only when it is the reference plus this node, under
    a leader the reference lists, at a later commit (membership changes are committed entries; ties go to the
    reference). A node removed while it listened is told and no longer lists itself; one cut off has an older
    commit or no leader; a node of an older cluster replaced by a restore has no leader the new one lists.
    """
    if not reference or host is None or node.commit is None or reference_commit is None:
        return False
    members = dict(node.members)
    return (
        node.commit > reference_commit
        and host in members.values()
        and host not in reference.values()
        and all(members.get(i) == h for i, h in reference.items())
        and node.leader_id in reference
    )


def _membership(
    reference: Mapping[int, str] | None, local: NodeStatus | None
) -> tuple[Mapping[int, str] | None, str]:
    """The membership to judge against and whose it is; None when nothing trustworthy is known."""
    if reference:
        return reference, "the cluster's"
    if local is not None and local.members:
        return dict(local.members), "its own"
    return None, ""


def _bytes(n: int) -> str:
    """Binary units, as `df -h` users read them: 512 MiB, 1.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------------
# Peers


@dataclass(frozen=True)
class PeerEvidence:
    """What this agent knows of a peer node: its last report, and our own probe of its minkms."""

    report_age: float | None  # seconds since its last report was received; None if never
    reported: Verdict | None  # the class it reported for itself
    minkms_live: bool | None  # our direct probe of its minkms; None if not probed
    in_reference: bool  # its host is in the reference membership


def classify_peer(e: PeerEvidence, peer_timeout: float) -> Verdict:
    """Classify a peer. A fresh report is trusted (the peer sees its own disk); without one, only our probe counts.

    A peer whose agent is silent but whose minkms answers and is a member is AGENT_DOWN, never UNREACHABLE:
    a healthy node must never be acted on because its agent died.
    """
    fresh = e.report_age is not None and e.report_age <= peer_timeout
    if fresh:
        if e.reported is None:
            return Verdict(NodeClass.UNKNOWN, "its agent reports, but without a class")
        if e.reported.cls in (NodeClass.HEALTHY, NodeClass.DEGRADED) and not e.in_reference:
            return Verdict(
                NodeClass.EVICTED, f"reports {e.reported.cls}, but not in the cluster's membership"
            )
        return e.reported

    silence = "never reported" if e.report_age is None else f"no report for {human_duration(e.report_age)}"
    if e.minkms_live is True and e.in_reference:
        return Verdict(NodeClass.AGENT_DOWN, f"{silence}, but its minkms answers and is a member")
    if e.minkms_live is True:
        probe = "its minkms answers but is not in the cluster's membership"
    elif e.minkms_live is False:
        probe = "its minkms does not answer"
    else:
        probe = "its minkms was not probed"
    return Verdict(NodeClass.UNREACHABLE, f"{silence}; {probe}")


def human_duration(seconds: float) -> str:
    """Short human duration: 2.5s, 45s, 3m05s, 2h07m."""
    if seconds < 10:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


# ---------------------------------------------------------------------------------------------------------------
# "Since" timers


@dataclass(frozen=True)
class Tracked:
    """A verdict and when its class began, on the observer's monotonic clock; `seen`: when the newest observation
    behind it was taken (None: the verdict is this agent's own inference of the moment, e.g. UNREACHABLE)."""

    verdict: Verdict
    since: float
    seen: float | None = None


def track(previous: Tracked | None, verdict: Verdict, now: float, seen: float | None = None) -> Tracked:
    """Carry `since` over while the class holds, so that a changing reason does not restart a grace timer.

    `seen`: when the observation behind `verdict` was taken (a report's observation is older than its receipt).
    A class then begins when it was first observed and holds up to its newest observation, never beyond: one
    STATE_LOST blip followed by a hung probe is one observation, held for 0 s however long the reports repeat it
    (issue 12: a node rejoined on a blip frozen by a hung probe)."""
    at = now if seen is None else min(now, seen)
    if previous is not None and previous.verdict.cls == verdict.cls:
        newest = seen if seen is None or previous.seen is None else max(previous.seen, seen)
        return Tracked(verdict, previous.since, newest)
    return Tracked(verdict, at, seen)


def held_for(t: Tracked, now: float) -> float:
    """Seconds the class has held, up to its newest observation; never negative, so that a confused caller cannot
    make a timer look expired."""
    end = now if t.seen is None else min(now, t.seen)
    return max(0.0, end - t.since)


# ---------------------------------------------------------------------------------------------------------------
# Crash-loop counting


def restarts_within(samples: Sequence[tuple[float, int]], now: float, window: float) -> int:
    """Restarts observed within (now - window, now], from (time, NRestarts) readings in time order.

    An increment counts at the time of the reading that shows it, measured against the previous reading, which
    may lie before the window (see `prune_samples`). A counter that goes down was reset by the service manager
    (e.g. a manual start): it becomes the new baseline and contributes nothing, never a negative number.
    """
    start = now - window
    count = 0
    for (_, before), (at, after) in pairwise(samples):
        if start < at <= now and after > before:
            count += after - before
    return count


def prune_samples(
    samples: Sequence[tuple[float, int]], now: float, window: float
) -> tuple[tuple[float, int], ...]:
    """Keep just what `restarts_within` needs: the last reading at or before now - window, and all newer ones."""
    start = now - window
    first = 0
    for i, (at, _) in enumerate(samples):
        if at <= start:
            first = i
        else:
            break
    return tuple(samples[first:])
