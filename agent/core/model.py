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
