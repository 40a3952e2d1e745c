"""The agent's configuration: `/etc/kmagent/kmagent.toml` -> frozen dataclasses, strictly validated.

A key manager's agent that acts on a misread setting can destroy state, so nothing is guessed: unknown keys,
wrong types and inconsistent values are all errors, every one reported at once with its key and line, so an
operator fixes the file in one pass (`kmagent check-config`).

The package, by concern: `schema` (the dataclasses, constants and errors), `values` (the value parsers),
`toml_lines` (key paths -> line numbers), `validate` (the checks) and `load` (`load_config`, secrets,
`check-config`). Import from `agent.config` itself: it re-exports the public API below.
"""

from __future__ import annotations

from agent.config.load import (
    check_config_main,
    default_config_path,
    load_config,
    read_secret,
    require_mount_summary,
)
from agent.config.schema import (
    DEFAULT_PATH,
    EVICT_AFTER_FLOOR,
    TWO_AGENTS_WARNING,
    AgentSpec,
    BackupConfig,
    Config,
    ConfigError,
    ConfigIssue,
    ControlConfig,
    LocalConfig,
    MetricsConfig,
    MinkmsConfig,
    PeerConfig,
    Role,
    StateConfig,
    TLSConfig,
)
from agent.config.values import join_hostport, parse_duration, parse_size, split_hostport
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
