"""The agent's configuration: `/etc/kmagent/kmagent.toml` -> frozen dataclasses, strictly validated.

A key manager's agent that acts on a misread setting can destroy state, so nothing is guessed: unknown keys,
wrong types and inconsistent values are all errors, every one reported at once with its key and line, so an
operator fixes the file in one pass (`kmagent check-config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import stat
import sys
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from agent.core.settings import Policy, Timings

__all__ = [
    "DEFAULT_PATH",
    "EVICT_AFTER_FLOOR",
    "TWO_AGENTS_WARNING",
    "AgentSpec",
    "BackupConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ControlConfig",
    "LocalConfig",
    "MetricsConfig",
    "MinkmsConfig",
    "PeerConfig",
    "Policy",
    "Role",
    "StateConfig",
    "TLSConfig",
    "Timings",
    "check_config_main",
    "default_config_path",
    "join_hostport",
    "load_config",
    "parse_duration",
    "parse_size",
    "read_secret",
    "require_mount_summary",
    "split_hostport",
]

DEFAULT_PATH = Path("/etc/kmagent/kmagent.toml")
ENV_CONFIG = "KMAGENT_CONFIG"
EVICT_AFTER_FLOOR = 30.0
"""Evicting sooner than this would remove nodes that are merely rebooting."""

TWO_AGENTS_WARNING = (
    "with 2 agents the quorum is both: nothing automatic can happen while one host is down; add a witness"
)
_SECRET_MAX = 64 * 1024

Role = Literal["member", "witness"]
T = TypeVar("T")


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


# --------------------------------------------------------------------------------------------------------------
# Value parsers (public ones are reused by the CLI, e.g. `pause --for 30m`)

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
_HOSTPORT_HINT = "expected HOST:PORT (IPv6 as [::1]:7443)"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _show(value: object) -> str:
    """A value as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def parse_duration(value: object) -> float:
    """Seconds from a number (> 0) or a string such as "250ms", "1m30s", "7d"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f'expected a duration (seconds, or a string like "1m30s"), got {_describe(value)}')
    if isinstance(value, str):
        text, pos, seconds = value.strip(), 0, 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise ValueError(
                f"invalid duration {_show(value)}: use <number><unit> with units ms, s, m, h, d "
                '(e.g. "250ms", "1m30s", "7d") or a number of seconds'
            )
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be greater than 0 (got {_show(value)})")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer (>= 0) or a string such as "1GiB", "500MB"; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'expected a size (integer bytes, or a string like "1GiB"), got {_describe(value)}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size must not be negative (got {value})")
        return value
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise ValueError(
            f"invalid size {_show(value)}: use integer bytes or <number><unit> with units B, KiB, MiB, GiB, "
            "TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"
        )
    return round(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def split_hostport(text: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host without brackets, port); ValueError when malformed."""
    if not isinstance(text, str):
        raise ValueError(f"{_HOSTPORT_HINT}, got {_describe(text)}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{_HOSTPORT_HINT}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_HOSTPORT_HINT}: {_show(host)} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{_HOSTPORT_HINT}: missing :PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{_HOSTPORT_HINT}: missing :PORT")
        if ":" in host:
            raise ValueError(f"{_HOSTPORT_HINT}: an IPv6 address needs brackets")
        if not host:
            raise ValueError(f"{_HOSTPORT_HINT}: missing HOST")
        if len(host) > 253 or not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{_HOSTPORT_HINT}: {_show(host)} is not a host name or IP address")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{_HOSTPORT_HINT}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def join_hostport(host: str, port: int) -> str:
    """The inverse of split_hostport: brackets around IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint_key(text: str) -> tuple[str, int]:
    """A comparable form of host:port, so that "[::01]:1" and "[::1]:1" count as the same address."""
    host, port = split_hostport(text)
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        host = host.lower().rstrip(".")
    return host, port


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _integer(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if value < minimum:
            raise ValueError(f"must be an integer >= {minimum} (got {value})")
        return value

    return parse


def _duration(floor: float | None = None, why: str = "") -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if floor is not None and seconds < floor:
            raise ValueError(f"must be at least {floor:g}s (got {_show(value)}){why}")
        return seconds

    return parse


def _name(value: object) -> str:
    text = _string(value)
    if not _NAME.fullmatch(text):
        raise ValueError(f"must be 1 to 64 characters from A-Z a-z 0-9 . _ - (got {_show(text)})")
    return text


def _scratch_command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty array of strings (an argv), got {_describe(value)}")
    argv = tuple(_string(item) for item in value)
    if not os.path.isabs(argv[0]):
        raise ValueError(f"the program must be an absolute path (got {_show(argv[0])})")
    if any("\0" in a for a in argv):
        raise ValueError("an argument contains a NUL byte")
    if not any("{address}" in a for a in argv):
        raise ValueError("no argument holds {address}: the scratch server must listen where kmagent looks")
    return argv


def _abspath(value: object) -> Path:
    text = _string(value)
    if "\0" in text or not os.path.isabs(text):
        raise ValueError(f"must be an absolute path (got {_show(text)})")
    return Path(text)


def _hostport(value: object) -> str:
    text = _string(value)
    try:
        split_hostport(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (got {_show(text)})") from None
    return text


def _ip_or_empty(value: object) -> str:
    text = _string(value)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f'expected an IP address or "" (got {_show(text)})') from None
    return text


def _hostport_or_empty(value: object) -> str:
    text = _string(value)
    return text if text == "" else _hostport(text)


def _https_url(value: object) -> str:
    text = _string(value)
    if not text.startswith("https://"):
        raise ValueError(f"must start with https:// (got {_show(text)})")
    try:
        url = urllib.parse.urlsplit(text)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"not a valid https:// URL (got {_show(text)})") from None
    if (
        not url.hostname
        or url.username
        or url.password
        or url.path not in ("", "/")
        or url.query
        or url.fragment
    ):
        raise ValueError(f"expected https://HOST:PORT with nothing after it (got {_show(text)})")
    return text


def _unit_name(value: object) -> str:
    text = _string(value)
    if not text or "/" in text or any(c.isspace() for c in text):
        raise ValueError(f"expected a systemd unit name such as minkms.service (got {_show(text)})")
    return text


def _group_name(value: object) -> str:
    text = _string(value)
    if not text or ":" in text or any(c.isspace() for c in text):
        raise ValueError(f"expected a group name (got {_show(text)})")
    return text


def _role(value: object) -> Role:
    text = _string(value)
    if text == "member":
        return "member"
    if text == "witness":
        return "witness"
    raise ValueError(f'expected "member" or "witness" (got {_show(text)})')


# --------------------------------------------------------------------------------------------------------------
# Line numbers: tomllib gives none, so a small scanner maps key paths to the line that sets them.

_BARE_KEY = r"[A-Za-z0-9_-]+"
_BASIC_KEY = r'"(?:[^"\\]|\\.)*"'
_LITERAL_KEY = r"'[^']*'"
_KEY_PART = re.compile(rf"\s*({_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY})\s*")
_DOTTED = rf"\s*(?:{_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY})\s*(?:\.\s*(?:{_BARE_KEY}|{_BASIC_KEY}|{_LITERAL_KEY})\s*)*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[({_DOTTED})\]\]")
_TABLE_HEADER = re.compile(rf"\s*\[({_DOTTED})\]")
_KEY_VALUE = re.compile(rf"({_DOTTED})=")
_INDEX_SUFFIX = re.compile(r"\[[0-9]+\]$")


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for m in _KEY_PART.finditer(dotted):
        raw = m.group(1)
        if raw.startswith('"'):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = raw[1:-1]
        elif raw.startswith("'"):
            raw = raw[1:-1]
        parts.append(raw)
    return parts


class _ValueScanner:
    """Tracks multi-line strings and arrays so that their contents are never mistaken for keys."""

    def __init__(self) -> None:
        self.depth = 0
        self.multiline: str | None = None

    @property
    def inside(self) -> bool:
        return self.depth > 0 or self.multiline is not None

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            if self.multiline is not None:
                end = text.find(self.multiline, i)
                if end < 0:
                    return
                i, self.multiline = end + 3, None
                continue
            c = text[i]
            if c == "#":
                return
            if text.startswith('"""', i) or text.startswith("'''", i):
                self.multiline = text[i : i + 3]
                i += 3
                continue
            if c == '"':
                i += 1
                while i < len(text) and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
            elif c == "'":
                end = text.find("'", i + 1)
                i = len(text) if end < 0 else end
            elif c in "[{":
                self.depth += 1
            elif c in "]}":
                self.depth = max(0, self.depth - 1)
            i += 1


def _scan_lines(text: str) -> dict[str, int]:
    """Map full key paths ("timings.lease", "agents[1].address", "agents[1]") to 1-based line numbers."""
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}
    table: list[str] = []
    values = _ValueScanner()

    def resolve(parts: list[str], array: bool, lineno: int) -> list[str]:
        out: list[str] = []
        for i, part in enumerate(parts):
            path = ".".join([*out, part])
            last = i == len(parts) - 1
            if array and last:
                index = counts.get(path, 0)
                counts[path] = index + 1
                lines.setdefault(path, lineno)
                part = f"{part}[{index}]"
            elif path in counts:
                part = f"{part}[{counts[path] - 1}]"
            out.append(part)
        return out

    for lineno, raw in enumerate(text.split("\n"), 1):
        if values.inside:
            values.feed(raw)
            continue
        if m := _ARRAY_HEADER.match(raw):
            table = resolve(_key_parts(m.group(1)), True, lineno)
        elif m := _TABLE_HEADER.match(raw):
            table = resolve(_key_parts(m.group(1)), False, lineno)
        elif m := _KEY_VALUE.match(raw):
            parts = [*table, *_key_parts(m.group(1))]
            for n in range(len(table) + 1, len(parts) + 1):
                lines.setdefault(".".join(parts[:n]), lineno)
            values.feed(raw[m.end() :])
            continue
        else:
            continue
        for n in range(1, len(table) + 1):
            lines.setdefault(".".join(table[:n]), lineno)
    return lines


def _parent(key: str) -> str:
    if _INDEX_SUFFIX.search(key):
        return _INDEX_SUFFIX.sub("", key)
    return key.rpartition(".")[0]


# --------------------------------------------------------------------------------------------------------------
# Validation

_TOP_KEYS = ("cluster", "name", "agents")
_TABLES = ("local", "minkms", "tls", "timings", "policy", "backup", "state", "control", "metrics", "peer")
_AGENT_KEYS = ("name", "address", "minkms_host", "role")
_Parser = Callable[[object], object]

_PARSERS: dict[str, dict[str, _Parser]] = {
    "local": {
        "storage_path": _abspath,
        "service": _unit_name,
        "require_mount": _bool,
        "low_space": parse_size,
        "supervisor": _abspath,
    },
    "minkms": {
        "cli": _abspath,
        "server": _https_url,
        "api_key_file": _abspath,
        "ca": _abspath,
        "insecure": _bool,
        "command_timeout": parse_duration,
        "probe_timeout": parse_duration,
    },
    "tls": {"ca": _abspath, "cert": _abspath, "key": _abspath},
    "timings": {
        "probe_interval": parse_duration,
        "peer_timeout": parse_duration,
        "lease": parse_duration,
        "state_lost_after": parse_duration,
        "corrupt_after": parse_duration,
        "evict_after": _duration(
            EVICT_AFTER_FLOOR,
            ": evicting sooner would remove nodes that are only rebooting (the floor is 30s)",
        ),
        "restore_after": parse_duration,
        "cooldown": parse_duration,
        "crash_loop_restarts": _integer(2),
        "crash_loop_window": parse_duration,
    },
    "policy": {
        "actions_per_hour": _integer(1),
        "min_members": _integer(1),
        "auto_restore": _bool,
        "quarantine_keep": parse_duration,
    },
    "backup": {
        "interval": parse_duration,
        "keep": _integer(1),
        "dir": _abspath,
        "scratch_server": _scratch_command,
        "scratch_env_file": _abspath,
    },
    "state": {"dir": _abspath},
    "control": {"socket": _abspath, "group": _group_name},
    "metrics": {"address": _hostport_or_empty},
    "peer": {"listen": _hostport_or_empty, "source": _ip_or_empty},
}
_CLASSES: dict[str, type[Any]] = {
    "local": LocalConfig,
    "minkms": MinkmsConfig,
    "tls": TLSConfig,
    "timings": Timings,
    "policy": Policy,
    "backup": BackupConfig,
    "state": StateConfig,
    "control": ControlConfig,
    "metrics": MetricsConfig,
    "peer": PeerConfig,
}


class _Validator:
    """Collects every issue of one file; values that fail fall back to defaults so later checks still run."""

    def __init__(self, path: str, lines: Mapping[str, int]) -> None:
        self.path = path
        self.lines = lines
        self.issues: list[ConfigIssue] = []
        self.bad: set[str] = set()
        self.warnings: list[str] = []
        self.agent_names: list[str] = []

    def line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = _parent(key)
        return None

    def error(self, key: str, message: str) -> None:
        self.bad.add(key)
        self.issues.append(ConfigIssue(key, self.line(key), message, self.path))

    def unknown(self, data: Mapping[str, object], prefix: str, allowed: Iterable[str]) -> None:
        known = list(allowed)
        for name in data:
            if name in known:
                continue
            key = f"{prefix}.{name}" if prefix else name
            close = difflib.get_close_matches(name, known, n=1)
            if close:
                message = f"unknown key, did you mean {close[0]!r}?"
            elif prefix and name in (*_TOP_KEYS, *_TABLES):
                message = f"unknown key: {name!r} belongs at the top, above the first [table] header"
            else:
                message = f"unknown key (known keys: {', '.join(known)})"
            self.error(key, message)

    def get(self, data: Mapping[str, object], key: str, name: str, parse: Callable[[object], T]) -> T | None:
        """The parsed value of `name`, or None when it is absent or wrong (wrong is reported)."""
        if name not in data:
            return None
        try:
            return parse(data[name])
        except ValueError as exc:
            self.error(f"{key}.{name}" if key else name, str(exc))
            return None

    def required(
        self, data: Mapping[str, object], key: str, name: str, parse: Callable[[object], T]
    ) -> T | None:
        if name not in data:
            self.error(f"{key}.{name}" if key else name, "required key missing")
            return None
        return self.get(data, key, name, parse)

    def section(self, root: Mapping[str, object], name: str) -> dict[str, Any]:
        """Read one [table] with its defaults; missing required keys are reported."""
        parsers = _PARSERS[name]
        raw = root.get(name, {})
        if not isinstance(raw, dict):
            self.error(name, f"expected a table ([{name}]), got {_describe(raw)}")
            raw = {}
        self.unknown(raw, name, parsers)
        fields = dataclasses.fields(_CLASSES[name])
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
        if name not in root and missing:
            self.error(name, f"required table [{name}] missing (it needs {', '.join(missing)})")
            missing = []
        values: dict[str, Any] = {}
        for f in fields:
            if f.name in missing:
                self.error(f"{name}.{f.name}", "required key missing")
            value = self.get(raw, name, f.name, parsers[f.name])
            values[f.name] = (
                value if value is not None else (None if f.default is dataclasses.MISSING else f.default)
            )
        return values

    def agents(self, root: Mapping[str, object]) -> list[AgentSpec]:
        raw = root.get("agents")
        if raw is None:
            self.error(
                "agents", "required: list every agent of the cluster, this one included, as [[agents]]"
            )
            return []
        if not isinstance(raw, list):
            self.error("agents", f"expected an array of tables ([[agents]]), got {_describe(raw)}")
            return []
        if not raw:
            self.error("agents", "at least one agent is required")
            return []
        specs: list[AgentSpec] = []
        owners: dict[str, dict[object, str]] = {"name": {}, "endpoint": {}}
        for i, entry in enumerate(raw):
            key = f"agents[{i}]"
            if not isinstance(entry, dict):
                self.error(key, f"expected a table, got {_describe(entry)}")
                continue
            self.unknown(entry, key, _AGENT_KEYS)
            name = self.required(entry, key, "name", _name)
            address = self.required(entry, key, "address", _hostport)
            role = self.get(entry, key, "role", _role) or ("member" if "role" not in entry else None)
            minkms_host = self.get(entry, key, "minkms_host", _hostport)
            who = f"{key} ({name})" if name else key
            if role == "member" and "minkms_host" not in entry:
                self.error(f"{key}.minkms_host", "required for a member: the --host of its minkms, HOST:PORT")
            if role == "witness" and "minkms_host" in entry:
                self.error(f"{key}.minkms_host", "must be absent for a witness (a witness runs no minkms)")
                minkms_host = None
            if name is not None:
                self.agent_names.append(name)
                if name in owners["name"]:
                    self.error(
                        f"{key}.name", f"duplicate agent name {_show(name)} (also {owners['name'][name]})"
                    )
                else:
                    owners["name"][name] = key
            for field_name, value in (("address", address), ("minkms_host", minkms_host)):
                if value is None:
                    continue
                endpoint = _endpoint_key(value)
                if endpoint in owners["endpoint"]:
                    self.error(
                        f"{key}.{field_name}",
                        f"duplicate address {value} (also {owners['endpoint'][endpoint]})",
                    )
                else:
                    owners["endpoint"][endpoint] = (
                        f"{who}.{field_name}" if name is None else f"{field_name} of {who}"
                    )
            if name is not None and address is not None and role is not None:
                specs.append(AgentSpec(name, address, minkms_host, role))
        if (
            specs
            and not any(a.role == "member" for a in specs)
            and not any(k.endswith(".role") for k in self.bad)
        ):
            self.error("agents", 'at least one agent must have role "member" (witnesses run no minkms)')
        return specs

    def check_file(
        self, key: str, path: Path, *, directory_ok: bool = False, executable: bool = False
    ) -> None:
        try:
            st = os.stat(path)
        except OSError as exc:
            self.error(key, f"cannot read {path}: {exc.strerror}")
            return
        if stat.S_ISDIR(st.st_mode) and directory_ok:
            readable = os.access(path, os.R_OK | os.X_OK)
        elif stat.S_ISREG(st.st_mode):
            readable = os.access(path, os.X_OK if executable else os.R_OK)
        else:
            self.error(key, f"{path} is not a regular file")
            return
        if not readable:
            self.error(key, f"{path} is not {'executable' if executable else 'readable'} by this user")

    def check_secret(self, key: str, path: Path) -> None:
        try:
            st = os.stat(path)
        except OSError as exc:
            self.error(key, f"cannot read {path}: {exc.strerror}")
            return
        problem = _secret_problem(path, st)
        if problem is None and not os.access(path, os.R_OK):
            problem = f"{path} is not readable by this user"
        if problem is not None:
            self.error(key, problem)


def _secret_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a secret file must not be trusted, or None. Never looks at the content."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}: group or others may read it; fix with: chmod 600 {path}"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, who may read it; fix with: chown root {path}"
    return None


def _toml_syntax_issue(path: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigIssue:
    message = str(exc)
    line: int | None = None
    if m := re.search(r"\s*\(at line (\d+), column (\d+)\)$", message):
        line, message = int(m.group(1)), f"{message[: m.start()]} (column {m.group(2)})"
    elif m := re.search(r"\s*\(at end of document\)$", message):
        line, message = text.count("\n") + 1, f"{message[: m.start()]} (at the end of the file)"
    elif isinstance(lineno := getattr(exc, "lineno", None), int):  # Python 3.14+ also has the attribute
        line = lineno
    return ConfigIssue("", line, f"TOML syntax error: {message}", path)


def load_config(path: str | Path, check_files: bool = True) -> Config:
    """Read and validate one agent's configuration; raise ConfigError listing every problem.

    check_files=False skips every look at the files the config names (for examples and tests elsewhere).
    """
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", None, f"cannot read {where}: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError([ConfigIssue("", line, "not valid UTF-8", where)]) from None
    try:
        root = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_syntax_issue(where, text, exc)]) from None
    return _build(Path(path), root, _Validator(where, _scan_lines(text)), check_files)


def _build(path: Path, root: dict[str, Any], v: _Validator, check_files: bool) -> Config:
    v.unknown(root, "", (*_TOP_KEYS, *_TABLES))
    cluster = v.required(root, "", "cluster", _name) or ""
    name = v.required(root, "", "name", _name) or ""
    agents = v.agents(root)
    s = {table: v.section(root, table) for table in _TABLES}

    me = next((a for a in agents if a.name == name), None)
    if name and v.agent_names and name not in v.agent_names and not any(k.endswith(".name") for k in v.bad):
        v.error("name", f"{_show(name)} is not one of the [[agents]] ({', '.join(v.agent_names)})")
    if me is not None and me.role == "member":
        for key, what in (
            ("local.storage_path", "the absolute path of its minkms' storage"),
            ("minkms.api_key_file", "the file that holds minkms' root API key"),
        ):
            table, _, item = key.partition(".")
            if s[table][item] is None and not v.bad & {key, table}:
                v.error(key, f"required for a member: {what}")
        if s["minkms"]["server"] is None and me.minkms_host is not None:
            s["minkms"]["server"] = "https://" + me.minkms_host
    if not s["peer"]["listen"] and me is not None:
        s["peer"]["listen"] = me.address

    timings = s["timings"]
    if timings["peer_timeout"] <= timings["probe_interval"] and not v.bad & {
        "timings.peer_timeout",
        "timings.probe_interval",
    }:
        v.error(
            "timings.peer_timeout",
            f"must be longer than timings.probe_interval ({timings['probe_interval']:g}s): "
            "reports are sent every probe_interval, so peers would look gone between two of them",
        )
    metrics, listen = s["metrics"]["address"], s["peer"]["listen"]
    if (
        metrics
        and listen
        and "metrics.address" not in v.bad
        and _endpoint_key(metrics) == _endpoint_key(listen)
    ):
        v.error("metrics.address", f"{metrics} is also the peer listener (peer.listen)")

    members = [a for a in agents if a.role == "member"]
    if len(agents) == 2:
        v.warnings.append(TWO_AGENTS_WARNING)
    if members and s["policy"]["min_members"] > len(members):
        v.warnings.append(
            f"policy.min_members = {s['policy']['min_members']} is more than the {len(members)} members: "
            "no eviction can ever happen"
        )
    if s["minkms"]["insecure"]:
        v.warnings.append("minkms.insecure = true: minkms' certificate is not verified")

    if check_files:
        _check_files(v, s, me)
    if v.issues:
        raise ConfigError(sorted(v.issues, key=lambda i: (i.line is None, i.line or 0)))
    return Config(
        path=path,
        cluster=cluster,
        name=name,
        agents=tuple(agents),
        local=LocalConfig(**s["local"]),
        minkms=MinkmsConfig(**s["minkms"]),
        tls=TLSConfig(**s["tls"]),
        timings=Timings(**s["timings"]),
        policy=Policy(**s["policy"]),
        backup=BackupConfig(**s["backup"]),
        state=StateConfig(**s["state"]),
        control=ControlConfig(**s["control"]),
        metrics=MetricsConfig(**s["metrics"]),
        peer=PeerConfig(**s["peer"]),
        warnings=tuple(v.warnings),
    )


def _check_files(v: _Validator, s: Mapping[str, dict[str, Any]], me: AgentSpec | None) -> None:
    """The files the agent will need: present, of the right kind, and secrets private."""
    tls, minkms = s["tls"], s["minkms"]
    if tls["key"] is not None:
        v.check_secret("tls.key", tls["key"])
    for item in ("ca", "cert"):
        if tls[item] is not None:
            v.check_file(f"tls.{item}", tls[item])
    if minkms["api_key_file"] is not None:
        v.check_secret("minkms.api_key_file", minkms["api_key_file"])
    if minkms["ca"] is not None:
        v.check_file("minkms.ca", minkms["ca"], directory_ok=True)
    if me is not None and me.role == "member" and "minkms.cli" not in v.bad:
        v.check_file("minkms.cli", minkms["cli"], executable=True)
    backup = s["backup"]
    if backup["scratch_env_file"] is not None:
        v.check_secret("backup.scratch_env_file", backup["scratch_env_file"])
    if backup["scratch_server"] and "backup.scratch_server" not in v.bad:
        v.check_file("backup.scratch_server", Path(backup["scratch_server"][0]), executable=True)


def read_secret(path: Path, key: str = "") -> str:
    """A secret's content, stripped; refused (ConfigError) when others may read it or when it is empty.

    The mode is checked on the open file, so that a swap between check and read cannot slip through.
    """
    where = str(path)

    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigIssue(key, None, message, where)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        problem = _secret_problem(path, os.fstat(fd))
        if problem is not None:
            raise fail(problem)
        data = f.read(_SECRET_MAX + 1)
    if len(data) > _SECRET_MAX:
        raise fail(f"{path} is larger than {_SECRET_MAX // 1024} KiB: not a secret file")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise fail(f"{path} is not valid UTF-8") from None
    if not secret:
        raise fail(f"{path} is empty")
    return secret


def default_config_path() -> Path:
    """$KMAGENT_CONFIG when set, else /etc/kmagent/kmagent.toml."""
    return Path(os.environ.get(ENV_CONFIG) or DEFAULT_PATH)


def check_config_main(path: str | None) -> int:
    """`kmagent check-config`: 0 and a summary when the file is valid, 1 and every issue on stderr otherwise."""
    target = Path(path) if path else default_config_path()
    try:
        config = load_config(target)
    except ConfigError as exc:
        for issue in exc.errors:
            print(issue, file=sys.stderr)
        return 1
    print(
        f"OK: {target} (cluster {config.cluster}, agent {config.name}, {len(config.agents)} agents, "
        f"quorum {config.quorum})"
    )
    warnings = list(config.warnings)
    if not config.is_witness:
        line, warning = require_mount_summary(config)
        print(f"local.require_mount: {line}")
        if warning is not None:
            warnings.append(warning)
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def require_mount_summary(config: Config) -> tuple[str, str | None]:
    """What `local.require_mount` means on this host now, for `check-config`: (one line, a warning or None).

    Unset, it follows the marker record in state.dir (written when the agent marks the node): a storage path that
    was a mount point when marked must be one before its contents are moved aside. Reads the record only.
    """
    from agent.io.storage import StorageError, read_marker  # config stays importable without the I/O layer
    from agent.preflight import record_path

    explicit, storage = config.local.require_mount, config.local.storage_path
    record = record_path(config.state.dir)
    recorded, volume = None, None
    try:
        recorded = read_marker(record)
    except (StorageError, OSError) as exc:
        said, unreadable = f"the marker record {record} cannot be read ({exc})", True
    else:
        unreadable = False
        volume = recorded.volume if recorded is not None else None
        if recorded is None:
            said = f"there is no marker record yet ({record}: the agent writes it when it marks the node)"
        elif volume is None:
            said = (
                f"the marker record {record} has no volume identity (an older agent wrote it; the agent "
                "records it once the node is healthy)"
            )
        else:
            was = "a mount point" if volume.mount_point else "not a mount point"
            said = f"the marker record says {storage} was {was} ({volume.describe()}) when marked"
    if explicit is True:
        return "true (set): the storage path must be a mount point before anything in it is moved aside", None
    if explicit is False:
        warning = None
        if volume is not None and volume.mount_point:
            warning = (
                f"local.require_mount = false, but {said}: remove the setting to have the mount point required "
                "(a missing volume is still VOLUME_MISSING, never lost state)"
            )
        return "false (set): never required, whatever the marker record says", warning
    required = unreadable or (volume is not None and volume.mount_point)
    verdict = "required" if required else "not required"
    return f"unset: from the marker record: {verdict} ({said})", None
