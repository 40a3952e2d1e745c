"""Validation: the key tables and `Validator`, which collects every issue of one file with its key and line.

The checks that look at the files a configuration names (`check_needed_files`, `secret_problem`) are here too;
`load.read_secret` applies the same secret rule to the file it opens.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent.config.schema import (
    EVICT_AFTER_FLOOR,
    AgentSpec,
    BackupConfig,
    ConfigIssue,
    ControlConfig,
    LocalConfig,
    MetricsConfig,
    MinkmsConfig,
    PeerConfig,
    StateConfig,
    TLSConfig,
)
from agent.config.toml_lines import parent_key
from agent.config.values import (
    describe,
    duration_at_least,
    endpoint_key,
    integer_at_least,
    parse_abspath,
    parse_bool,
    parse_duration,
    parse_group_name,
    parse_hostport,
    parse_hostport_or_empty,
    parse_https_url,
    parse_ip_or_empty,
    parse_name,
    parse_role,
    parse_scratch_command,
    parse_size,
    parse_unit_name,
    show,
)
from agent.core.settings import Policy, Timings

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# Validation

TOP_KEYS = ("cluster", "name", "agents")
TABLES = ("local", "minkms", "tls", "timings", "policy", "backup", "state", "control", "metrics", "peer")
_AGENT_KEYS = ("name", "address", "minkms_host", "role")
_Parser = Callable[[object], object]

_PARSERS: dict[str, dict[str, _Parser]] = {
    "local": {
        "storage_path": parse_abspath,
        "service": parse_unit_name,
        "require_mount": parse_bool,
        "low_space": parse_size,
        "supervisor": parse_abspath,
    },
    "minkms": {
        "cli": parse_abspath,
        "server": parse_https_url,
        "api_key_file": parse_abspath,
        "ca": parse_abspath,
        "insecure": parse_bool,
        "command_timeout": parse_duration,
        "probe_timeout": parse_duration,
    },
    "tls": {"ca": parse_abspath, "cert": parse_abspath, "key": parse_abspath},
    "timings": {
        "probe_interval": parse_duration,
        "peer_timeout": parse_duration,
        "lease": parse_duration,
        "state_lost_after": parse_duration,
        "corrupt_after": parse_duration,
        "evict_after": duration_at_least(
            EVICT_AFTER_FLOOR,
            ": evicting sooner would remove nodes that are only rebooting (the floor is 30s)",
        ),
        "restore_after": parse_duration,
        "cooldown": parse_duration,
        "crash_loop_restarts": integer_at_least(2),
        "crash_loop_window": parse_duration,
    },
    "policy": {
        "actions_per_hour": integer_at_least(1),
        "min_members": integer_at_least(1),
        "auto_restore": parse_bool,
        "quarantine_keep": parse_duration,
    },
    "backup": {
        "interval": parse_duration,
        "keep": integer_at_least(1),
        "dir": parse_abspath,
        "scratch_server": parse_scratch_command,
        "scratch_env_file": parse_abspath,
    },
    "state": {"dir": parse_abspath},
    "control": {"socket": parse_abspath, "group": parse_group_name},
    "metrics": {"address": parse_hostport_or_empty},
    "peer": {"listen": parse_hostport_or_empty, "source": parse_ip_or_empty},
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


class Validator:
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
            key = parent_key(key)
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
            elif prefix and name in (*TOP_KEYS, *TABLES):
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
            self.error(name, f"expected a table ([{name}]), got {describe(raw)}")
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
            self.error("agents", f"expected an array of tables ([[agents]]), got {describe(raw)}")
            return []
        if not raw:
            self.error("agents", "at least one agent is required")
            return []
        specs: list[AgentSpec] = []
        owners: dict[str, dict[object, str]] = {"name": {}, "endpoint": {}}
        for i, entry in enumerate(raw):
            key = f"agents[{i}]"
            if not isinstance(entry, dict):
                self.error(key, f"expected a table, got {describe(entry)}")
                continue
            self.unknown(entry, key, _AGENT_KEYS)
            name = self.required(entry, key, "name", parse_name)
            address = self.required(entry, key, "address", parse_hostport)
            role = self.get(entry, key, "role", parse_role) or ("member" if "role" not in entry else None)
            minkms_host = self.get(entry, key, "minkms_host", parse_hostport)
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
                        f"{key}.name", f"duplicate agent name {show(name)} (also {owners['name'][name]})"
                    )
                else:
                    owners["name"][name] = key
            for field_name, value in (("address", address), ("minkms_host", minkms_host)):
                if value is None:
                    continue
                endpoint = endpoint_key(value)
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
        problem = secret_problem(path, st)
        if problem is None and not os.access(path, os.R_OK):
            problem = f"{path} is not readable by this user"
        if problem is not None:
            self.error(key, problem)


def secret_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a secret file must not be trusted, or None. Never looks at the content."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}: group or others may read it; fix with: chmod 600 {path}"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, who may read it; fix with: chown root {path}"
    return None


def check_needed_files(v: Validator, s: Mapping[str, dict[str, Any]], me: AgentSpec | None) -> None:
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
