"""Reading a configuration: `load_config` (file -> validated `Config`), secrets, and `kmagent check-config`.

This is the only module of the package that opens files for their content; it drives `validate.Validator`
over the parsed TOML and assembles the dataclasses of `schema`.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from agent.config.schema import (
    DEFAULT_PATH,
    ENV_CONFIG,
    TWO_AGENTS_WARNING,
    BackupConfig,
    Config,
    ConfigError,
    ConfigIssue,
    ControlConfig,
    LocalConfig,
    MetricsConfig,
    MinkmsConfig,
    PeerConfig,
    StateConfig,
    TLSConfig,
)
from agent.config.toml_lines import scan_lines
from agent.config.validate import TABLES, TOP_KEYS, Validator, check_needed_files, secret_problem
from agent.config.values import endpoint_key, parse_name, show
from agent.core.settings import Policy, Timings

_SECRET_MAX = 64 * 1024


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
    return _build(Path(path), root, Validator(where, scan_lines(text)), check_files)


def _build(path: Path, root: dict[str, Any], v: Validator, check_files: bool) -> Config:
    v.unknown(root, "", (*TOP_KEYS, *TABLES))
    cluster = v.required(root, "", "cluster", parse_name) or ""
    name = v.required(root, "", "name", parse_name) or ""
    agents = v.agents(root)
    s = {table: v.section(root, table) for table in TABLES}

    me = next((a for a in agents if a.name == name), None)
    if name and v.agent_names and name not in v.agent_names and not any(k.endswith(".name") for k in v.bad):
        v.error("name", f"{show(name)} is not one of the [[agents]] ({', '.join(v.agent_names)})")
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
        and endpoint_key(metrics) == endpoint_key(listen)
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
        check_needed_files(v, s, me)
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
        problem = secret_problem(path, os.fstat(fd))
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
