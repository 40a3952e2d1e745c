"""The configuration's shape: the frozen dataclasses `load_config` returns, its constants and its errors.

Nothing here parses or validates, so every other module of the package can import it (and it imports none of
them). `Timings` and `Policy` live in the core (`agent.core.settings`), which must not import the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.core.settings import Policy, Timings

DEFAULT_PATH = Path("/etc/kmagent/kmagent.toml")
ENV_CONFIG = "KMAGENT_CONFIG"
EVICT_AFTER_FLOOR = 30.0
"""Evicting sooner than this would remove nodes that are merely rebooting."""

TWO_AGENTS_WARNING = (
    "with 2 agents the quorum is both: nothing automatic can happen while one host is down; add a witness"
)

Role = Literal["member", "witness"]


# --------------------------------------------------------------------------------------------------------------
# Dataclasses


@dataclass(frozen=True)
class AgentSpec:
    """One agent of the cluster, as every agent's config lists it (membership is static)."""

    name: str
    address: str
    minkms_host: str | None
    role: Role = "member"

    @property
    def is_witness(self) -> bool:
        return self.role == "witness"


@dataclass(frozen=True)
class LocalConfig:
    """Facts about this host; `storage_path` is None only on a witness.

    `supervisor` (development only) is the kmlab supervisor's control socket: when set, `service` names a lab
    program driven through it instead of a systemd unit.

    `require_mount` is tri-state: True or False as set; None (unset, the default) means "from the marker record":
    the storage path must be a mount point to be quarantined when it was one when the node was marked
    (`agent.io.storage.mount_required`). An explicit value always wins.
    """

    storage_path: Path | None = None
    service: str = "minkms.service"
    require_mount: bool | None = None
    low_space: int = 1024**3
    supervisor: Path | None = None


@dataclass(frozen=True)
class MinkmsConfig:
    """How to reach the local minkms; `server` and `api_key_file` are None only on a witness."""

    cli: Path = Path("/usr/local/bin/minkms")
    server: str | None = None
    api_key_file: Path | None = None
    ca: Path | None = None
    insecure: bool = False
    command_timeout: float = 10.0
    probe_timeout: float = 1.0


@dataclass(frozen=True)
class TLSConfig:
    """The agents' mutual TLS material; the key also signs acks."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class BackupConfig:
    """Scheduled backups: every `interval` seconds, `keep` copies in `dir`."""

    interval: float = 3600.0
    keep: int = 48
    dir: Path = Path("/var/lib/kmagent/backups")
    # `kmagent backup verify` restores a copy into a throwaway minkms started with this argv ({dir}: a fresh
    # temp dir, {address}: 127.0.0.1:<free port>); () skips that check. It runs with the variables of
    # scratch_env_file (KEY=VALUE lines: the node's HSM key), since a backup opens only with the same HSM key.
    scratch_server: tuple[str, ...] = ()
    scratch_env_file: Path | None = None


@dataclass(frozen=True)
class StateConfig:
    """Where the journal, votes and marker copies live."""

    dir: Path = Path("/var/lib/kmagent")


@dataclass(frozen=True)
class ControlConfig:
    """The control socket and the group allowed to read status through it."""

    socket: Path = Path("/run/kmagent/control.sock")
    group: str = "kmagent-admin"


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus listener; an empty address disables it."""

    address: str = "127.0.0.1:9464"

    @property
    def enabled(self) -> bool:
        return self.address != ""


@dataclass(frozen=True)
class PeerConfig:
    """The peer API listener, resolved: never empty after load_config (defaults to this agent's address)."""

    listen: str = ""
    source: str = ""  # the local IP outbound peer connections come from; "" lets the system choose


@dataclass(frozen=True)
class Config:
    """The whole configuration of one agent, validated."""

    path: Path
    cluster: str
    name: str
    agents: tuple[AgentSpec, ...]
    local: LocalConfig
    minkms: MinkmsConfig
    tls: TLSConfig
    timings: Timings
    policy: Policy
    backup: BackupConfig
    state: StateConfig
    control: ControlConfig
    metrics: MetricsConfig
    peer: PeerConfig
    warnings: tuple[str, ...] = ()

    @property
    def me(self) -> AgentSpec:
        for agent in self.agents:
            if agent.name == self.name:
                return agent
        raise LookupError(f"agent {self.name!r} is not in the configuration")  # load_config prevents it

    @property
    def peers(self) -> tuple[AgentSpec, ...]:
        return tuple(a for a in self.agents if a.name != self.name)

    @property
    def members(self) -> tuple[AgentSpec, ...]:
        return tuple(a for a in self.agents if a.role == "member")

    @property
    def quorum(self) -> int:
        """floor(N/2)+1 over all agents: witnesses vote, so they count."""
        return len(self.agents) // 2 + 1

    @property
    def is_witness(self) -> bool:
        return self.me.is_witness

    def agent(self, name: str) -> AgentSpec | None:
        """The agent called `name`, or None (peer names come from certificates: never trust them blindly)."""
        for agent in self.agents:
            if agent.name == name:
                return agent
        return None


# --------------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem, located as precisely as the file allows so that the operator can go straight to it."""

    key: str
    line: int | None
    message: str
    path: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        return ": ".join(part for part in (where, self.key, self.message) if part)


class ConfigError(Exception):
    """Every problem found in a configuration (never only the first)."""

    def __init__(self, errors: list[ConfigIssue]) -> None:
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)
