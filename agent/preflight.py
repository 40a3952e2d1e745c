"""`kmagent preflight`: never let a wiped host start minkms as a rogue fresh cluster (DESIGN §5 "Preflight").

minkms started on an empty directory comes up as a fresh single-node cluster that clients behind a load
balancer could read empty answers from and write new keys to. `minkms.service` runs this check as
`ExecStartPre=`; it refuses the start when the storage path is empty, or lacks or contradicts this host's
identity marker, while the agent's record says the host belongs to a cluster. REJOIN and RESTORE lift the
refusal for their "start fresh" step with `authorise_fresh_start` and drop it with `revoke_fresh_start`.
It also refuses, always (whatever the authorisation), a storage path that is not on the volume the record names
(`agent.io.storage.volume_problem`: an unmounted volume, an empty mount point): minkms started there would build
a fresh cluster on the root filesystem while this host's real state sits on the unmounted volume.

`decide` is the whole decision, pure (facts and the wall time in, a verdict out); `gather` reads the facts
without writing anything. It runs before the daemon, and without it, so it reads the config and the files
directly and imports nothing heavy. On any doubt it refuses: a start that waits for an operator costs
minutes, a rogue cluster can cost keys.
"""

from __future__ import annotations

import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Config, StateConfig
from agent.core.messages import action_id_problem
from agent.io.durable import fsync_dir, read_json, write_json
from agent.io.storage import (
    MARKER_NAME,
    Marker,
    StorageError,
    is_agent_file,
    read_marker,
    volume_problem,
)

RECORD_NAME = "marker.json"
"""The agent's own copy of the identity marker, in its state dir (written by the daemon with the marker)."""
FRESH_START_NAME = "fresh-start.json"
FRESH_START_FORMAT = 1


@dataclass(frozen=True)
class Verdict:
    """ok: minkms may start; reason: one paragraph for the operator (and the journal)."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class FreshStart:
    """A REJOIN or RESTORE step's permission to start minkms on an empty storage path, until `until` (wall)."""

    action_id: str
    until: float
    written: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FRESH_START_FORMAT,
            "action_id": self.action_id,
            "until": self.until,
            "written": self.written,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> FreshStart:
        """Strict, like the marker: a doubtful authorisation must not read as valid. ValueError names the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} is damaged: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FRESH_START_FORMAT:
            raise ValueError(f"{where} is damaged: unsupported format {data.get('format')!r}")
        action_id = data.get("action_id")
        if (problem := action_id_problem(action_id)) or not isinstance(action_id, str):
            raise ValueError(f"{where} is damaged: {problem}")
        return cls(
            action_id,
            _wall(data.get("until"), f"{where} is damaged: 'until'"),
            _wall(data.get("written"), f"{where} is damaged: 'written'"),
        )


def _wall(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number (wall time), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Facts:
    """What the preflight looked at; `*_error` set means the thing exists but could not be read or trusted."""

    cluster: str
    host: str
    storage: str
    storage_error: str | None = None  # missing, not a directory, unreadable: nothing else is known
    empty: bool = False  # only the agent's own files (marker, probes) in it
    marker: Marker | None = None
    marker_error: str | None = None
    record_path: str = ""
    record: Marker | None = None
    record_error: str | None = None
    fresh_start: FreshStart | None = None
    fresh_start_error: str | None = None
    volume_missing: str | None = None  # why the storage path is not on the volume the record names

    @property
    def has_record(self) -> bool:
        """The agent has recorded an identity here before (a damaged record still proves that)."""
        return self.record is not None or self.record_error is not None


# ---------------------------------------------------------------------------------------------- decision


def _utc(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def _who(marker: Marker) -> str:
    node = "" if marker.node_id is None else f"node {marker.node_id} of "
    return f"{node}cluster {marker.cluster!r} (host {marker.host!r})"


def decide(facts: Facts, now_wall: float) -> Verdict:
    """Allow or refuse the start of minkms from the facts alone (pure; `now_wall` judges the authorisation)."""
    ours = f"cluster {facts.cluster!r} (host {facts.host!r})"
    if facts.volume_missing is not None:
        # Before everything else, and whatever a fresh-start authorisation says: no state of this host is here.
        return Verdict(
            False,
            f"refusing to start minkms: {facts.volume_missing}. This host's state is on that volume, not "
            f"here: started on {facts.storage}, minkms would come up as a fresh cluster on the wrong "
            "filesystem while the real state sits on the unmounted volume. Mount the volume (check /etc/fstab, "
            f"`findmnt {facts.storage}`, `journalctl -b` for the mount unit), then start minkms again. Only if the "
            "volume was replaced on purpose: `kmagent forget-volume` (it drops the identity recorded in "
            f"{facts.record_path}), and the agents rejoin this node (docs/operations.md, VOLUME_MISSING).",
        )
    if facts.storage_error is not None:
        return Verdict(
            False,
            f"refusing to start minkms: {facts.storage_error}. Started without a verified storage path, minkms "
            "could create a fresh cluster's state where this host's state should be (an unmounted volume, a "
            "wrong path). Mount or fix the storage path, check local.storage_path (kmagent check-config) and "
            "kmagent status, then start minkms again.",
        )

    if facts.marker_error is not None or (
        facts.marker is not None and (facts.marker.cluster, facts.marker.host) != (facts.cluster, facts.host)
    ):
        found = (
            f"the identity marker of {_who(facts.marker)}"
            if facts.marker is not None
            else f"an identity marker that cannot be verified ({facts.marker_error})"
        )
        return Verdict(
            False,
            f"refusing to start minkms: storage path {facts.storage} carries {found}, not the identity of this "
            f"host, {ours}. Started on it, minkms would serve state that belongs to another host or cluster, "
            "and clients could read and write keys the cluster never sees. Check kmagent status and the "
            "volume: mount the right one, or move its contents aside and let the agent rejoin this node.",
        )

    if facts.marker is not None and not facts.empty:
        return Verdict(True, f"storage path {facts.storage} carries this host's identity marker, {ours}")

    # Empty (perhaps but for our marker), or state without a marker: was this host ever in a cluster?
    if not facts.has_record and facts.marker is None:
        # A damaged authorisation is not needed here, so it is no reason to refuse; it is mentioned.
        note = f" (ignored: {facts.fresh_start_error})" if facts.fresh_start_error else ""
        what = "is empty" if facts.empty else "holds state without an identity marker"
        return Verdict(
            True,
            f"storage path {facts.storage} {what} and the agent has no record of this host in a cluster yet "
            f"({facts.record_path} does not exist): a first start, nothing to protect yet{note}",
        )

    auth = facts.fresh_start
    if facts.fresh_start_error is None and auth is not None and now_wall < auth.until:
        what = "is empty" if facts.empty else "holds state without an identity marker (from the fresh start)"
        return Verdict(
            True,
            f"storage path {facts.storage} {what}; a fresh start is authorised by action {auth.action_id} "
            f"until {_utc(auth.until)}",
        )

    return Verdict(False, _refusal(facts, auth))


def _refusal(facts: Facts, auth: FreshStart | None) -> str:
    """What was found, why starting would be dangerous, what to do: one paragraph."""
    if facts.record is not None:
        belongs = (
            f"the agent's record {facts.record_path} says this host holds the state of {_who(facts.record)}"
        )
    elif facts.record_error is not None:
        belongs = (
            f"the agent's record {facts.record_path} cannot be read ({facts.record_error}), but its presence "
            "says this host belongs to a cluster"
        )
    else:
        belongs = "its identity marker says this host belongs to a cluster"
    remove = f"remove {facts.record_path}" if facts.has_record else ""
    if facts.marker is not None:
        marker = f"{facts.storage}/{MARKER_NAME}"
        remove = f"{remove} and {marker}" if remove else f"remove {marker}"
    if facts.fresh_start_error is not None:
        auth_note = f" The fresh-start authorisation is not trusted: {facts.fresh_start_error}."
    elif auth is not None:
        auth_note = (
            f" The fresh-start authorisation of action {auth.action_id} expired at {_utc(auth.until)}."
        )
    else:
        auth_note = ""
    if facts.empty:
        found = "is empty" if facts.marker is None else "is empty but for this host's identity marker"
        danger = (
            "minkms would come up as a fresh single-node cluster that clients could read empty answers from "
            "and write new keys to"
        )
    else:
        found = "holds state without this host's identity marker"
        danger = (
            "minkms would serve state the agent cannot tie to this host (another volume, an old copy), and "
            "clients could read stale answers or write keys the cluster never sees"
        )
    return (
        f"refusing to start minkms: storage path {facts.storage} {found}, but {belongs}.{auth_note} Started "
        f"on it, {danger}. Check kmagent status; let the agent rejoin this node to the cluster (its REJOIN "
        f"authorises the fresh start); or, if this host really left the cluster, {remove} and start minkms "
        "again."
    )


# ---------------------------------------------------------------------------------------------------- I/O


def record_path(state_dir: Path) -> Path:
    return Path(state_dir) / RECORD_NAME


def fresh_start_path(state_dir: Path) -> Path:
    return Path(state_dir) / FRESH_START_NAME


DEFAULT_STATE_DIR = StateConfig().dir
"""state.dir's default: where an unconfigured host's record would be (see `unconfigured`)."""


def unconfigured(config: Path, state_dir: Path | None = None) -> Verdict | None:
    """An allowing verdict when kmagent was installed but never configured here: no config and no record.

    The package installs the minkms.service drop-in with kmagent, before any config exists; refusing then
    would stop a minkms that kmagent never managed at its next restart. Without a record this host never
    belonged to a cluster through kmagent, so there is no identity to protect. A record without a config
    (a deleted or lost config) is still refused by the caller, and so is any error but "does not exist".
    """
    record = record_path(DEFAULT_STATE_DIR if state_dir is None else state_dir)
    for path in (config, record):
        try:
            os.lstat(path)
            return None
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return Verdict(
        True,
        f"kmagent is not configured on this host ({config} and {record} do not exist); "
        "nothing to protect yet",
    )


def authorise_fresh_start(state_dir: Path, action_id: str, until_wall: float) -> Path:
    """Let minkms start on an empty storage path until `until_wall`; durable before it returns.

    Called by the executor of REJOIN/RESTORE just before their "start fresh" step; ValueError on bad input.
    """
    if problem := action_id_problem(action_id):
        raise ValueError(problem)
    until = _wall(until_wall, "until_wall")
    path = fresh_start_path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_json(path, FreshStart(action_id, until, time.time()).to_json(), mode=0o600)
    return path


def revoke_fresh_start(state_dir: Path) -> bool:
    """Drop the authorisation (idempotent; durable before it returns); True if there was one."""
    path = fresh_start_path(state_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def read_fresh_start(state_dir: Path) -> FreshStart | None:
    """The authorisation, None when there is none; ValueError (naming the file) when it cannot be trusted."""
    path = fresh_start_path(state_dir)
    try:
        data = read_json(path)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is damaged: nested too deeply") from None
    return None if data is None else FreshStart.from_json(data, str(path))


def _storage_facts(storage: Path) -> tuple[str | None, bool]:
    """(error, empty), without writing anything: the path must be an existing, listable directory."""
    try:
        st = os.stat(storage)
    except FileNotFoundError:
        return f"storage path {storage} does not exist", False
    except OSError as exc:
        return f"cannot check storage path {storage}: {exc.strerror or exc}", False
    if not stat.S_ISDIR(st.st_mode):
        return f"storage path {storage} is not a directory", False
    try:
        with os.scandir(storage) as it:
            return None, all(is_agent_file(entry.name) for entry in it)
    except OSError as exc:
        return f"cannot list storage path {storage}: {exc.strerror or exc}", False


def _read_record(path: Path) -> tuple[Marker | None, str | None]:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot check {path}: {exc.strerror or exc}"
    if not path.is_file():
        return None, f"{path} is not a regular file"
    try:
        return read_marker(path), None
    except StorageError as exc:
        return None, str(exc)


def gather(storage: Path, state_dir: Path, *, cluster: str, host: str) -> Facts:
    """Read everything `decide` needs; never raises, never writes."""
    storage, state_dir = Path(storage), Path(state_dir)
    storage_error, empty = _storage_facts(storage)
    marker, marker_error = None, None
    if storage_error is None:
        try:
            marker = read_marker(storage)
        except StorageError as exc:
            marker_error = str(exc)
    record = record_path(state_dir)
    record_marker, record_error = _read_record(record)
    fresh, fresh_error = None, None
    try:
        fresh = read_fresh_start(state_dir)
    except ValueError as exc:
        fresh_error = str(exc)
    try:
        volume_missing = volume_problem(storage, record_marker, marker)
    except Exception as exc:  # never raises; a doubt about the volume refuses the start
        volume_missing = f"the volume of {storage} cannot be checked: {exc!r}"
    return Facts(
        cluster=cluster,
        host=host,
        storage=str(storage),
        storage_error=storage_error,
        empty=empty,
        marker=marker,
        marker_error=marker_error,
        record_path=str(record),
        record=record_marker,
        record_error=record_error,
        fresh_start=fresh,
        fresh_start_error=fresh_error,
        volume_missing=volume_missing,
    )


def check(cfg: Config, now_wall: float) -> Verdict:
    """The preflight of this host's minkms under `cfg`; a witness has no minkms to guard."""
    if cfg.is_witness:
        return Verdict(True, f"agent {cfg.name} is a witness: there is no local minkms to guard")
    if cfg.local.storage_path is None:  # load_config requires it for a member
        return Verdict(False, "refusing to start minkms: local.storage_path is not configured")
    try:
        facts = gather(
            cfg.local.storage_path, cfg.state.dir, cluster=cfg.cluster, host=cfg.me.minkms_host or ""
        )
    except Exception as exc:  # gather reports, but a start must never pass on an unexpected error
        return Verdict(False, f"refusing to start minkms: the preflight failed unexpectedly: {exc!r}")
    return decide(facts, now_wall)
