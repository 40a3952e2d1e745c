"""Immutable snapshots the pure core works on: what one agent observed, and the health class it derives.

Times are monotonic seconds of the observing agent, passed in, never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class NodeClass(StrEnum):
    """DESIGN §3. The value is what status shows and what peers exchange."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    DOWN = "DOWN"
    CORRUPT = "CORRUPT"
    STATE_LOST = "STATE_LOST"
    EVICTED = "EVICTED"
    UNREACHABLE = "UNREACHABLE"
    AGENT_DOWN = "AGENT_DOWN"
    UNKNOWN = "UNKNOWN"
    # The observation cannot be vouched for: a probe exceeded its deadline, or the newest observation is older
    # than peer_timeout (a hung volume, a stalled agent). Never acted on, never counted as healthy.
    STALLED = "STALLED"
    # The storage path is not on the filesystem the node was marked on (an unmounted volume, an empty mount
    # point): an operator matter, never STATE_LOST, never a REJOIN, and it blocks an automatic restore.
    VOLUME_MISSING = "VOLUME_MISSING"


class ServiceState(StrEnum):
    """The service manager's view of the minkms unit (systemd ActiveState, or the lab supervisor's)."""

    ACTIVE = "active"
    ACTIVATING = "activating"
    DEACTIVATING = "deactivating"
    INACTIVE = "inactive"
    FAILED = "failed"
    UNKNOWN = "unknown"


class MarkerState(StrEnum):
    """The agent's identity marker beside the minkms state (DESIGN §3)."""

    OK = "ok"  # present, and names this cluster, node and host
    ABSENT = "absent"  # never written (first start of the agent on this host)
    MISSING = "missing"  # was written before (the agent's own record says so) and is gone: the volume changed
    MISMATCH = "mismatch"  # names another cluster or host: a wrong or replaced volume


@dataclass(frozen=True)
class ServiceObs:
    state: ServiceState
    restarts: int = 0  # the service manager's restart counter (NRestarts)
    main_pid: int | None = None
    restarts_in_window: int = 0  # restarts seen within timings.crash_loop_window, counted by the daemon
    # The service manager's record of the last failed start (the unit's journal tail, the lab's log), secrets
    # redacted and capped; None while the service runs without a restart, or when it cannot be read. Only ever
    # matched (agent.core.startup): an operator-side start-up failure makes a crash loop DOWN, not CORRUPT.
    last_error: str | None = None


@dataclass(frozen=True)
class HealthObs:
    """HTTPS probes of /v1/health/*; None means the probe could not get an answer."""

    live: bool | None = None
    ready: bool | None = None
    write: bool | None = None
    latency: float | None = None  # seconds, of the live probe


@dataclass(frozen=True)
class StorageObs:
    probe_ok: bool  # a write+fsync+delete in the storage path worked
    read_only: bool = False
    empty: bool = False  # no minkms state in the storage path
    free_bytes: int | None = None
    low_space: bool = False
    marker: MarkerState = MarkerState.ABSENT
    error: str | None = None  # why the probe failed, for humans
    stalled: bool = False  # the probe did not return within its deadline: nothing above can be vouched for
    # The storage path is not on the volume recorded when the node was marked (an unmounted volume, an empty mount
    # point, another filesystem): the reason comes first in `error`. Never lost state (DESIGN §6 rail 11).
    volume_missing: bool = False
    # The marker in place is the record's own, but the record lacks the volume identity (an older agent's) or
    # records another one (renumbered devices): the daemon marks the node again (storage.refresh_identity).
    identity_stale: bool = False


@dataclass(frozen=True)
class NodeStatus:
    """One node as `minkms stat --json` reports it (ServerStatusResponse)."""

    node_id: int
    host: str
    role: str = ""  # Leader | Follower | Candidate
    commit: int | None = None
    leader_id: int | None = None  # None: unknown; negative: no leader
    members: tuple[tuple[int, str], ...] = ()  # this node's own view of the membership (id, host)
    uptime: float | None = None


@dataclass(frozen=True)
class MinkmsView:
    """The cluster as seen through the local minkms (CLUSTER:STATUS), or why it could not be read."""

    error: str | None = None
    nodes_up: tuple[NodeStatus, ...] = ()
    nodes_down: tuple[tuple[int, str], ...] = ()  # (id, host)

    def node_by_host(self, host: str) -> NodeStatus | None:
        return next((n for n in self.nodes_up if n.host == host), None)


@dataclass(frozen=True)
class Observation:
    """Everything one agent saw of its own host in one probe round."""

    at: float
    service: ServiceObs
    health: HealthObs
    storage: StorageObs
    minkms: MinkmsView = field(default_factory=MinkmsView)
    # This node's own REJOIN has started it fresh and not marked it yet (`execution.awaiting_mark`), read from the
    # journal before the storage probe: one snapshot with it, so that a `mark` finishing between the probe and the
    # classification cannot make "marker missing" look like a lost volume.
    awaiting_mark: bool = False
