"""The minkms storage path: health probes, the agent's identity marker, and quarantine (DESIGN §3, §5, §6.4).

The storage path is sacred. Nothing here deletes minkms state or touches a path other than the one it is
given: `quarantine` *moves* the contents aside (a copy across filesystems is removed from the source only once
the copy is complete and fsynced), and `prune_quarantine` removes only quarantine directories it recognises
by name. All functions are blocking; the daemon runs them in a thread with its own timeout, because a dead
network volume can hang any system call.

Volume identity (DESIGN §6 rail 11). When the node is marked, the marker and its record also keep the storage
path's filesystem identity (`VolumeId`: st_dev, whether it was a mount point, and, when cheaply found, the fs type,
the mounted source and the filesystem UUID). A host that boots without its data volume shows an empty directory
of the root filesystem under the mount point: `volume_problem` tells it from lost state, so that the node is
VOLUME_MISSING (an operator matter), never STATE_LOST, and the preflight refuses to start minkms on it. The
marker format stays 1: the identity is an optional "volume" object, ignored by older agents; markers and records
without it read as "identity unknown", and the agent then behaves as before.
"""

from __future__ import annotations

import calendar
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.messages import ACTION_ID_RE, action_id_problem
from agent.core.model import MarkerState, StorageObs
from agent.io.durable import atomic_write, fsync_dir

log = logging.getLogger("kmagent.storage")

MARKER_NAME = ".kmagent-marker"
PROBE_PREFIX = ".kmagent-probe-"
QUARANTINE_META = "QUARANTINE.json"
MARKER_FORMAT = 1
_MARKER_TMP_PREFIX = f"{MARKER_NAME}.tmp-"
_PARTIAL = ".kmagent-partial"  # an EXDEV copy in progress inside a quarantine dir; its source still exists
_QDIR_RE = re.compile(rf"(\d{{8}}T\d{{6}}Z)-({ACTION_ID_RE.pattern})")
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_MAX_MARKER_BYTES = 64 * 1024
_MOVE_PASSES = 3
_DEV_RE = re.compile(r"\d{1,10}:\d{1,10}")
MOUNTINFO = Path("/proc/self/mountinfo")
BY_UUID = Path("/dev/disk/by-uuid")
_MAX_UUID_LINKS = 4096  # a bound on the by-uuid scan, whatever a host has


class StorageError(Exception):
    """A refused or failed storage operation; the message names the rule or the path."""


@dataclass(frozen=True)
class VolumeId:
    """The filesystem a storage path was on when the node was marked (DESIGN §6 rail 11).

    `dev` is the path's st_dev as "major:minor"; `mount_point` whether the (resolved) path was a mount point
    (os.path.ismount). `fstype` and `source` come from /proc/self/mountinfo, `uuid` from /dev/disk/by-uuid: both
    are optional (None when not found; never required, never waited for).
    """

    dev: str
    mount_point: bool
    fstype: str | None = None
    uuid: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dev": self.dev,
            "mount_point": self.mount_point,
            "fstype": self.fstype,
            "uuid": self.uuid,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> VolumeId:
        if not isinstance(data, dict):
            raise StorageError(f"malformed marker {where}: 'volume' must be an object or null")
        dev, mount_point = data.get("dev"), data.get("mount_point")
        if not isinstance(dev, str) or not _DEV_RE.fullmatch(dev):
            raise StorageError(f"malformed marker {where}: 'volume.dev' must be \"major:minor\"")
        if not isinstance(mount_point, bool):
            raise StorageError(f"malformed marker {where}: 'volume.mount_point' must be true or false")
        optional: dict[str, str | None] = {}
        for key in ("fstype", "uuid", "source"):
            value = data.get(key)
            if value is not None and (not isinstance(value, str) or not value or len(value) > 4096):
                raise StorageError(
                    f"malformed marker {where}: 'volume.{key}' must be a non-empty string or null"
                )
            optional[key] = value
        return cls(dev, mount_point, optional["fstype"], optional["uuid"], optional["source"])

    def describe(self) -> str:
        """For humans: "xfs /dev/sdb1 (dev 8:17, UUID 5c1e...)"."""
        source = self.source if self.source != self.fstype else None  # tmpfs, proc...: the name is the type
        what = " ".join(x for x in (self.fstype, source) if x) or "a filesystem"
        uuid = f", UUID {self.uuid}" if self.uuid else ""
        return f"{what} (dev {self.dev}{uuid})"

    def same_filesystem(self, other: VolumeId) -> bool:
        """The same filesystem: the same UUID when both are known (whatever the device numbers: they may change
        across reboots), else the same st_dev and, when both are known, the same fs type."""
        if self.uuid is not None and other.uuid is not None:
            return self.uuid == other.uuid
        if self.dev != other.dev:
            return False
        return self.fstype is None or other.fstype is None or self.fstype == other.fstype


@dataclass(frozen=True)
class Marker:
    """Who the state in a storage path belongs to; `written` is wall time (for humans, and to tell one mark from
    another: `same_mark`). `volume` is the storage path's filesystem identity when it was written (None: unknown,
    an older agent's marker)."""

    cluster: str
    host: str
    node_id: int | None
    written: float
    volume: VolumeId | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": MARKER_FORMAT,
            "cluster": self.cluster,
            "host": self.host,
            "node_id": self.node_id,
            "written": self.written,
        }
        if self.volume is not None:
            data["volume"] = self.volume.to_json()
        return data

    def same_mark(self, other: Marker) -> bool:
        """Written by the same mark (a marker and its record, or a faithful copy of them), whatever `volume`."""
        return (self.cluster, self.host, self.node_id, self.written) == (
            other.cluster,
            other.host,
            other.node_id,
            other.written,
        )

    @classmethod
    def from_json(cls, data: Any, where: str) -> Marker:
        """Strict: a marker decides whether state is ours, so a doubtful one must not read as valid."""
        if not isinstance(data, dict):
            raise StorageError(f"malformed marker {where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", MARKER_FORMAT) != MARKER_FORMAT:
            raise StorageError(f"malformed marker {where}: unsupported format {data.get('format')!r}")
        cluster, host, node_id, written = (data.get(k) for k in ("cluster", "host", "node_id", "written"))
        if not isinstance(cluster, str) or not cluster:
            raise StorageError(f"malformed marker {where}: 'cluster' must be a non-empty string")
        if not isinstance(host, str) or not host:
            raise StorageError(f"malformed marker {where}: 'host' must be a non-empty string")
        if node_id is not None and (isinstance(node_id, bool) or not isinstance(node_id, int)):
            raise StorageError(f"malformed marker {where}: 'node_id' must be an integer or null")
        if isinstance(written, bool) or not isinstance(written, int | float) or not math.isfinite(written):
            raise StorageError(f"malformed marker {where}: 'written' must be a number (wall time)")
        raw_volume = data.get("volume")
        volume = None if raw_volume is None else VolumeId.from_json(raw_volume, where)
        return cls(cluster=cluster, host=host, node_id=node_id, written=float(written), volume=volume)


# ------------------------------------------------------------------------------------------------- marker


def write_marker(storage: Path, marker: Marker, record: Path) -> Marker:
    """Write the marker into the storage path, then its copy to `record` in the agent's state dir; returns what
    was written: `marker` with the storage path's filesystem identity measured now (`volume_identity`; whatever
    `marker.volume` said).

    The storage copy goes first: a record without a marker would read as MISSING (a replaced volume) after a
    crash in between, while a marker without a record is merely OK.
    """
    storage = Path(storage)
    if not storage.is_dir():
        raise StorageError(f"cannot write the marker: storage path {storage} is not an existing directory")
    try:
        volume: VolumeId | None = volume_identity(storage)
    except OSError as exc:  # it was a directory an instant ago: write what we know, as older agents did
        log.warning("cannot record the volume identity of %s: %s", storage, exc)
        volume = None
    marker = dataclasses.replace(marker, volume=volume)
    data = (json.dumps(marker.to_json(), sort_keys=True) + "\n").encode()
    try:
        atomic_write(storage / MARKER_NAME, data)
    except OSError as exc:
        raise StorageError(f"cannot write the marker in {storage}: {exc}") from exc
    record = Path(record)
    try:
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(record, data, mode=0o600)
    except OSError as exc:
        raise StorageError(f"cannot write the marker record {record}: {exc}") from exc
    return marker


def read_marker(path: Path) -> Marker | None:
    """Read a marker file (or the marker inside a directory); None when there is none.

    Raises StorageError when it exists but cannot be read or is malformed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MARKER_NAME
    return _read_marker_file(path)


def _read_marker_file(path: Path) -> Marker | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_MARKER_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read the marker {path}: {exc}") from exc
    if len(raw) > _MAX_MARKER_BYTES:
        raise StorageError(f"malformed marker {path}: larger than {_MAX_MARKER_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise StorageError(f"malformed marker {path}: not valid JSON ({exc})") from None
    return Marker.from_json(data, str(path))


def refresh_identity(storage: Path, record: Path) -> Marker | None:
    """Mark the node again, with the volume identity measured now, when the marker in the storage path is the very
    one of the record (`Marker.same_mark`) and the record lacks the identity (written by an older agent) or
    records another one (device numbers renumbered across a reboot, or the state copied to a new volume by an
    operator, marker included). Returns the new marker, or None when nothing was written.

    The new marker has a new `written`, so that a stale copy of the old one (left on the root filesystem under a
    mount point, say) is no longer taken for the marked volume. The daemon calls this for a HEALTHY node whose
    probe says `identity_stale`; it re-checks everything itself, so a late call after a change does no harm.
    """
    storage, record = Path(storage), Path(record)
    recorded = _read_marker_file(record)
    found = _read_marker_file(storage / MARKER_NAME)
    if recorded is None or found is None or not found.same_mark(recorded):
        return None
    current = volume_identity(storage)
    if recorded.volume == current and found.volume == current:
        return None
    fresh = Marker(recorded.cluster, recorded.host, recorded.node_id, time.time())
    written = write_marker(storage, fresh, record)
    log.info(
        "re-marked %s with its volume identity %s (recorded: %s)",
        storage,
        current.describe(),
        recorded.volume.describe() if recorded.volume else "none",
    )
    return written


def forget_volume(record: Path) -> bool:
    """Drop the volume identity from the record (the operator's "this volume was replaced on purpose"): the node
    then behaves as without identity (an empty storage path is STATE_LOST, and its REJOIN marks the new volume).
    The record itself stays, so that the preflight still refuses a fresh start. True if there was one to drop."""
    record = Path(record)
    recorded = _read_marker_file(record)
    if recorded is None or recorded.volume is None:
        return False
    data = (json.dumps(dataclasses.replace(recorded, volume=None).to_json(), sort_keys=True) + "\n").encode()
    atomic_write(record, data, mode=0o600)
    return True


def mount_required(record: Path | None, explicit: bool | None) -> bool:
    """Whether the storage path must be a mount point to be touched (`quarantine`): `local.require_mount` when
    set (true or false wins), else what the marker record says — required when the storage path was a mount
    point when the node was marked. No record, or one without identity (an older agent's): not required, as
    before. A record that exists but cannot be read: required (when in doubt, do not touch)."""
    if explicit is not None:
        return explicit
    if record is None:
        return False
    try:
        recorded = _read_marker_file(Path(record))
    except StorageError as exc:
        log.warning("require_mount from the marker record: %s; a mount point is required", exc)
        return True
    return recorded is not None and recorded.volume is not None and recorded.volume.mount_point


UNMARKED_NAME = "unmarked.json"
"""In the agent's state dir: a REJOIN started this node fresh and no marker was written since (`note_unmarked`)."""
UNMARKED_FORMAT = 1


def note_unmarked(state_dir: Path, action_id: str, now: float) -> Path:
    """Record, durably and before minkms starts fresh, that this node is about to run without its marker.

    Kept when the REJOIN closes without `mark` (its `add` killed in doubt may land later): until the marker is
    written (`mark`, or `execution.adoptable`), a missing marker on a joined node is expected, not a replaced
    volume. ValueError on a bad action id."""
    if problem := action_id_problem(action_id):
        raise ValueError(problem)
    path = Path(state_dir) / UNMARKED_NAME
    data = {"format": UNMARKED_FORMAT, "action_id": action_id, "written": now}
    atomic_write(path, (json.dumps(data, sort_keys=True) + "\n").encode(), mode=0o600)
    return path


def read_unmarked(state_dir: Path) -> str | None:
    """The action id of the note, None without one. A note that cannot be read or trusted counts as present
    ("unreadable"): it only ever keeps a joined node from being called STATE_LOST (when in doubt, do not wipe)."""
    path = Path(state_dir) / UNMARKED_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read %s: %s; taken as present", path, exc)
        return "unreadable"
    try:
        data = json.loads(raw)
        action_id = data["action_id"] if data.get("format") == UNMARKED_FORMAT else None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
        action_id = None
    if action_id_problem(action_id):
        log.error("%s is damaged; taken as present", path)
        return "unreadable"
    return action_id


def clear_unmarked(state_dir: Path) -> bool:
    """Drop the note once the marker is written (idempotent, durable); True if there was one."""
    path = Path(state_dir) / UNMARKED_NAME
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


# ------------------------------------------------------------------------------------------ volume identity


def _dev(st_dev: int) -> str:
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


def volume_identity(path: Path) -> VolumeId:
    """The filesystem identity of `path` now (raises OSError when it cannot be stat'ed).

    st_dev and ismount are stat/lstat calls; the fs type and source come from /proc/self/mountinfo and the UUID
    from /dev/disk/by-uuid (kernel pseudo-filesystems: they never wait for the volume), each None when not found.
    """
    st = os.stat(path)
    real = os.path.realpath(path)
    fstype, source = _mount_of(real, _dev(st.st_dev))
    return VolumeId(_dev(st.st_dev), os.path.ismount(real), fstype, _uuid_of(st.st_dev), source)


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def _mount_of(real: str, dev: str) -> tuple[str | None, str | None]:
    """(fs type, source) of the mount holding `real`: the deepest mount point above it, preferring the entries
    of its own device; (None, None) when /proc/self/mountinfo cannot be read."""
    try:
        text = MOUNTINFO.read_text(errors="replace")
    except OSError:
        return None, None
    best: tuple[bool, int, str, str] | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        point = _unescape(fields[4])
        if not (real == point or point == "/" or real.startswith(point.rstrip("/") + "/")):
            continue
        key = (fields[2] == dev, len(point), tail[0], _unescape(tail[1]))
        if best is None or key[:2] >= best[:2]:  # later entries over-mount earlier ones: the last one wins
            best = key
    return (best[2], best[3]) if best is not None else (None, None)


def _uuid_of(st_dev: int) -> str | None:
    """The filesystem UUID of a block-device filesystem (the /dev/disk/by-uuid link to the device that st_dev
    names), None for anything else (tmpfs, NFS, overlay, btrfs subvolumes) or when udev keeps no such links."""
    try:
        with os.scandir(BY_UUID) as it:
            for n, entry in enumerate(it):
                if n >= _MAX_UUID_LINKS:
                    break
                try:
                    st = os.stat(entry.path)
                except OSError:
                    continue
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == st_dev:
                    return entry.name
    except OSError:
        return None
    return None


def _nearest(path: Path) -> tuple[Path, os.stat_result] | None:
    """`path` or, when it does not exist, its nearest existing parent, with its stat; None when unknowable."""
    for candidate in (path, *path.parents):
        try:
            return candidate, os.stat(candidate)
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def volume_problem(storage: Path, recorded: Marker | None, found: Marker | None) -> str | None:
    """Why the storage path is not on the volume this node was marked on (VOLUME_MISSING), or None.

    `recorded` is the agent's record, `found` the marker now in the storage path (None: none or unreadable).
    None when the record carries no identity (an older agent's: as before), or when `found` is the very marker of
    the record (it travels with the volume: this is the marked volume, whatever its device number now). Else the
    storage path is missing when it was a mount point at mark time and is not one now (an empty mount point, or a
    directory on the root filesystem), or when it is on another filesystem (`VolumeId.same_filesystem`). A path
    that does not exist is judged by its nearest existing parent. The usual case costs no system call; the rest
    stat/lstat calls, and /proc/self/mountinfo and /dev/disk/by-uuid reads to name the filesystems.
    """
    volume = recorded.volume if recorded is not None else None
    if volume is None:
        return None
    if found is not None and recorded is not None and found.same_mark(recorded):
        return None
    storage = Path(storage)
    near = _nearest(storage)
    if near is None:
        return None  # nothing can be said; the probe reports why the path cannot be checked
    where, st = near
    exists = where == storage
    real = os.path.realpath(where)
    dev = _dev(st.st_dev)
    fstype, source = _mount_of(real, dev)
    uuid = _uuid_of(st.st_dev) if volume.uuid is not None else None
    now = VolumeId(dev, exists and os.path.ismount(real), fstype, uuid, source)
    marked = f"{volume.describe()}{', a mount point' if volume.mount_point else ''}"
    here = (
        f"storage path {storage}"
        if exists
        else f"storage path {storage} does not exist and its parent {where}"
    )
    if volume.mount_point and not now.mount_point:
        what = "a plain directory" if exists else "absent"
        return (
            f"volume missing: storage path {storage} was a mount point of {volume.describe()} when marked, "
            f"and is {what} now, on {now.describe()}: the volume is probably not mounted"
        )
    if not volume.same_filesystem(now):
        return (
            f"volume missing: {here} is on another filesystem than when marked: marked on {marked}, "
            f"now on {now.describe()}"
        )
    return None


# -------------------------------------------------------------------------------------------------- probe


def is_agent_file(name: str) -> bool:
    """The agent's own files in the storage path: they do not make it "non-empty"."""
    return name == MARKER_NAME or name.startswith(PROBE_PREFIX) or name.startswith(_MARKER_TMP_PREFIX)


def _marker_state(
    storage: Path, *, cluster: str, host: str, record: Path
) -> tuple[MarkerState, str | None, Marker | None]:
    try:
        marker = _read_marker_file(storage / MARKER_NAME)
    except StorageError as exc:
        # Unverifiable identity is treated as someone else's: it must not pass for ours.
        return MarkerState.MISMATCH, str(exc), None
    if marker is not None:
        if marker.cluster == cluster and marker.host == host:
            return MarkerState.OK, None, marker
        return MarkerState.MISMATCH, None, marker
    return (MarkerState.MISSING if _exists(Path(record)) else MarkerState.ABSENT), None, None


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def _write_probe(storage: Path) -> None:
    probe = storage / f"{PROBE_PREFIX}{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"kmagent storage probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(probe)


def probe_storage(storage: Path, *, cluster: str, host: str, record: Path, low_space: int) -> StorageObs:
    """Observe the storage path; never raises (a failure is an observation, reported in `error`).

    * probe_ok: a small file `.kmagent-probe-<pid>` could be created, written, fsynced and deleted;
    * read_only: the filesystem is mounted read-only (statvfs ST_RDONLY) or the probe failed with EROFS;
    * free_bytes / low_space: statvfs f_bavail * f_frsize (what an unprivileged writer gets), < low_space;
    * empty: True only when the path is an existing directory whose only entries (if any) are the agent's
      own marker and probe files. A path that does not exist, is not a directory or cannot be listed is
      *not* empty: probe_ok is False and `error` says why;
    * marker: OK (present, this cluster and host), MISMATCH (another cluster or host, or unreadable),
      MISSING (absent here but `record` exists: a marker was written before, so the volume changed),
      ABSENT (absent and never written). A missing storage path reads MISSING/ABSENT the same way;
    * volume_missing: the record carries the volume identity, and the storage path is not on that volume
      (`volume_problem`, whose reason comes first in `error`); checked whatever else the probe found;
    * identity_stale: the marker in place is the record's own, but the record lacks the identity or records
      another one (`refresh_identity` marks the node again).
    A record that exists but cannot be read is volume_missing too ("volume unverifiable") unless this host's own
    marker is in place: it proves the host was marked, no longer on which volume.
    """
    try:
        return _probe(Path(storage), cluster=cluster, host=host, record=Path(record), low_space=low_space)
    except Exception as exc:  # a probe reports, it never raises
        log.exception("storage probe of %s failed unexpectedly", storage)
        return StorageObs(probe_ok=False, error=f"storage probe of {storage} failed: {exc!r}")


def _recorded(record: Path) -> Marker | None:
    return _read_record(record)[0]


def _read_record(record: Path) -> tuple[Marker | None, str | None]:
    """(the record, why it exists but cannot be trusted); (None, None) when there is none."""
    try:
        return _read_marker_file(record), None
    except StorageError as exc:
        return None, str(exc)


def _unverifiable(record_error: str | None, marker: MarkerState) -> str | None:
    """A damaged record proves this host was marked, but no longer on which volume: without our own marker in
    place, the storage path cannot be told from an unmounted volume's empty mount point."""
    if marker is MarkerState.OK or record_error is None:
        return None
    return f"volume unverifiable: {record_error}; the volume this node was marked on cannot be checked"


def _volume_safe(storage: Path, recorded: Marker | None, found: Marker | None) -> str | None:
    try:
        return volume_problem(storage, recorded, found)
    except Exception as exc:  # never raise from a probe; an unknown identity is judged as before
        log.warning("cannot check the volume of %s: %r", storage, exc)
        return None


def _stale(recorded: Marker | None, found: Marker | None, st: os.stat_result, storage: Path) -> bool:
    if recorded is None or found is None or not found.same_mark(recorded):
        return False
    volume = recorded.volume
    if volume is None or found.volume != volume:
        return True
    return volume.dev != _dev(st.st_dev) or volume.mount_point != os.path.ismount(os.path.realpath(storage))


def _probe(storage: Path, *, cluster: str, host: str, record: Path, low_space: int) -> StorageObs:
    errors: list[str] = []
    recorded, record_error = _read_record(record)

    def early(error: str) -> StorageObs:
        marker = _no_path_marker(record)
        missing = _volume_safe(storage, recorded, None) or _unverifiable(record_error, marker)
        return StorageObs(
            probe_ok=False,
            marker=marker,
            error=f"{missing}; {error}" if missing else error,
            volume_missing=missing is not None,
        )

    try:
        st = os.stat(storage)
    except FileNotFoundError:
        return early(f"storage path {storage} does not exist")
    except OSError as exc:
        return early(f"cannot stat {storage}: {exc}")
    if not stat.S_ISDIR(st.st_mode):
        return early(f"storage path {storage} is not a directory")

    read_only = False
    free: int | None = None
    try:
        vfs = os.statvfs(storage)
        free = vfs.f_bavail * vfs.f_frsize
        read_only = bool(vfs.f_flag & os.ST_RDONLY)
    except OSError as exc:
        errors.append(f"statvfs {storage}: {exc}")

    probe_ok = True
    try:
        _write_probe(storage)
    except OSError as exc:
        probe_ok = False
        read_only = read_only or exc.errno == errno.EROFS
        errors.append(f"write probe in {storage} failed: {exc.strerror or exc}")

    empty = False
    try:
        with os.scandir(storage) as it:
            empty = all(is_agent_file(entry.name) for entry in it)
    except OSError as exc:
        probe_ok = False
        errors.append(f"cannot list {storage}: {exc.strerror or exc}")

    found: Marker | None = None
    try:
        marker, marker_error, found = _marker_state(storage, cluster=cluster, host=host, record=record)
    except Exception as exc:  # never raise from a probe
        marker, marker_error = MarkerState.MISMATCH, f"cannot check the marker: {exc!r}"
    if marker_error:
        errors.append(marker_error)
    missing = _volume_safe(storage, recorded, found) or _unverifiable(record_error, marker)
    if missing is not None:
        errors.insert(0, missing)
    try:
        stale = missing is None and _stale(recorded, found, st, storage)
    except Exception:  # a probe reports, it never raises; a stale identity is refreshed another time
        stale = False
    return StorageObs(
        probe_ok=probe_ok,
        read_only=read_only,
        empty=empty,
        free_bytes=free,
        low_space=free is not None and free < low_space,
        marker=marker,
        error="; ".join(errors) or None,
        volume_missing=missing is not None,
        identity_stale=stale,
    )


def _no_path_marker(record: Path) -> MarkerState:
    """The marker state of a storage path that is not a directory: MISSING once a record exists, else ABSENT."""
    try:
        return MarkerState.MISSING if _exists(Path(record)) else MarkerState.ABSENT
    except Exception:  # never raise from a probe
        return MarkerState.MISMATCH


# ---------------------------------------------------------------------------------------------- quarantine


def _qdir_name(now: float, action_id: str) -> str:
    return f"{time.strftime(_TIME_FORMAT, time.gmtime(now))}-{action_id}"


def _find_existing(root: Path, action_id: str) -> Path | None:
    """A quarantine dir of this action left by an earlier (crashed) attempt, whatever its time."""
    if not root.is_dir():
        return None
    found = sorted(
        Path(e.path)
        for e in os.scandir(root)
        if (m := _QDIR_RE.fullmatch(e.name)) and m.group(2) == action_id and e.is_dir(follow_symlinks=False)
    )
    return found[0] if found else None


def _free_name(qdir: Path, name: str) -> Path:
    """Never overwrite anything already in quarantine (os.rename would, silently)."""
    dst = qdir / name
    n = 0
    while _exists(dst) or dst.name in (QUARANTINE_META, _PARTIAL):
        n += 1
        dst = qdir / f"{name}.kmagent-dup-{n}"
    return dst


def _sync_tree(path: Path) -> None:
    """fsync every file and directory of a copied tree, so the source can go."""
    if path.is_symlink():
        return
    if path.is_file():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                _sync_tree(p)
        fsync_dir(Path(dirpath))


def _copy_owner(src: Path, dst: Path) -> None:
    """copy2/copytree keep modes and times but not owners; minkms runs as its own user."""

    def chown(s: Path, d: Path) -> None:
        st = os.lstat(s)
        try:
            os.lchown(d, st.st_uid, st.st_gid)
        except PermissionError:
            pass  # not root: the copy is owned by us, which is all we can do

    chown(src, dst)
    if src.is_dir() and not src.is_symlink():
        for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
            rel = Path(dirpath).relative_to(src)
            for name in dirnames + filenames:
                chown(Path(dirpath) / name, dst / rel / name)


def _move_entry(src: Path, qdir: Path) -> tuple[str, bool]:
    """Move one entry into qdir; returns (name in quarantine, crossed filesystems)."""
    dst = _free_name(qdir, src.name)
    try:
        os.rename(src, dst)
        return dst.name, False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = qdir / _PARTIAL
    _remove_partial(partial)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, partial, symlinks=True)
    else:
        shutil.copy2(src, partial, follow_symlinks=False)
    _copy_owner(src, partial)
    _sync_tree(partial)
    os.rename(partial, dst)
    fsync_dir(qdir)
    # Only now, with a complete and durable copy in quarantine, does the source go: a move, not a deletion.
    if src.is_dir() and not src.is_symlink():
        shutil.rmtree(src)
    else:
        os.unlink(src)
    return dst.name, True


def _remove_partial(partial: Path) -> None:
    """An unfinished copy from a crash: its source was never removed, so dropping it loses nothing."""
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    elif _exists(partial):
        os.unlink(partial)


def quarantine(
    storage: Path,
    configured: Path,
    root: Path,
    action_id: str,
    *,
    require_mount: bool | None = False,
    expected_marker: Marker | None = None,
    record: Path | None = None,
    now: float,
) -> Path:
    """Move the contents of the storage path into `root/<UTC YYYYmmddTHHMMSSZ>-<action_id>/` (DESIGN §5).

    The storage directory itself stays, with its owner and mode: it may be a mount point. Refuses with
    StorageError, before anything moves, when any guard rail (§6.4) fails. Resumable: a quarantine dir of the
    same action id left by a crash is reused and what is left is moved into it; a completed one (it holds
    QUARANTINE.json) is returned without moving anything, so a replayed step cannot sweep away the fresh state
    a later step created. Nothing already in quarantine is ever overwritten (a clashing name gets a
    `.kmagent-dup-N` suffix). Transient probe files are left in place. Returns the quarantine dir.

    `require_mount`: True or False as configured (`local.require_mount`); None: from the marker `record`
    (`mount_required`). With `record`, it also refuses a storage path that is not on the volume the record names
    (`volume_problem`): what is there is not this node's state, and its real state may sit on that volume.
    """
    if problem := action_id_problem(action_id):
        raise StorageError(f"refused: {problem}")
    storage, configured, root = Path(storage), Path(configured), Path(root)
    try:
        src = storage.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise StorageError(f"refused: storage path {storage} cannot be resolved: {exc}") from exc
    conf = configured.resolve()
    if src != conf:
        raise StorageError(
            f"refused: storage path {storage} (resolves to {src}) is not the configured storage path {conf}"
        )
    if not src.is_dir():
        raise StorageError(f"refused: storage path {src} is not a directory")
    qroot = root.resolve()
    if qroot == src or qroot.is_relative_to(src) or src.is_relative_to(qroot):
        raise StorageError(
            f"refused: quarantine root {qroot} and storage path {src} must not contain each other"
        )
    if mount_required(record, require_mount) and not os.path.ismount(src):
        why = (
            "local.require_mount is set"
            if require_mount
            else "the marker record says it was one when this node was marked (local.require_mount unset)"
        )
        raise StorageError(f"refused: storage path {src} is not a mount point, and it must be: {why}")
    if record is not None:
        try:
            found = _read_marker_file(src / MARKER_NAME)
        except StorageError:
            found = None
        problem = volume_problem(src, _recorded(Path(record)), found)
        if problem is not None:
            raise StorageError(f"refused: {problem}")
    if expected_marker is not None:
        try:
            marker = _read_marker_file(src / MARKER_NAME)
        except StorageError as exc:
            raise StorageError(f"refused: the identity of {src} cannot be checked: {exc}") from exc
        if marker is not None and marker.cluster != expected_marker.cluster:
            raise StorageError(
                f"refused: storage path {src} carries the marker of cluster {marker.cluster!r} "
                f"(host {marker.host!r}), not of this cluster {expected_marker.cluster!r}"
            )

    try:
        qdir = _find_existing(qroot, action_id)
        if qdir is not None and _exists(qdir / QUARANTINE_META):
            log.info("quarantine of action %s already completed in %s", action_id, qdir)
            return qdir
        names = _movable(src)
        for name in names:
            if os.path.ismount(src / name):
                raise StorageError(f"refused: {src / name} is a mount point; it cannot be moved")
        if qdir is None:
            qroot.mkdir(mode=0o700, parents=True, exist_ok=True)
            qdir = qroot / _qdir_name(now, action_id)
            qdir.mkdir(mode=0o700)
            os.chmod(qdir, 0o700)  # whatever the umask: quarantined key state is secret
            fsync_dir(qroot)
        else:
            log.info("resuming the quarantine of action %s into %s", action_id, qdir)

        cross = False
        for _ in range(_MOVE_PASSES):
            if not names:
                break
            for name in names:
                moved, crossed = _move_entry(src / name, qdir)
                cross = cross or crossed
                log.info("quarantine %s: moved %s to %s", action_id, src / name, qdir / moved)
            names = _movable(src)
        if names:
            raise StorageError(
                f"storage path {src} still has entries after {_MOVE_PASSES} passes ({', '.join(names[:5])}): "
                "something keeps writing to it; is minkms stopped?"
            )
        fsync_dir(src)
        fsync_dir(qdir)
        entries = sorted(
            n
            for n in os.listdir(qdir)
            if n not in (QUARANTINE_META, _PARTIAL) and not n.startswith(f"{QUARANTINE_META}.tmp-")
        )
        meta = {
            "action_id": action_id,
            "source": str(src),
            "time": now,
            "time_utc": time.strftime(_TIME_FORMAT, time.gmtime(now)),
            "entries": entries,
            "cross_device": cross,
        }
        atomic_write(qdir / QUARANTINE_META, (json.dumps(meta, indent=2) + "\n").encode(), mode=0o600)
        fsync_dir(qroot)
    except StorageError:
        raise
    except (OSError, shutil.Error) as exc:
        raise StorageError(f"quarantine of {src} (action {action_id}) failed: {exc}") from exc
    return qdir


def _movable(src: Path) -> list[str]:
    """Everything in the storage path but transient probe files (moving one would fail a running probe)."""
    return sorted(n for n in os.listdir(src) if not n.startswith(PROBE_PREFIX))


def prune_quarantine(root: Path, keep_seconds: float, now: float) -> list[Path]:
    """Remove quarantine dirs whose name says they are older than keep_seconds; never anything else.

    The age comes from the name, not mtime (a move keeps the contents' old mtimes, and a restored backup
    of the agent's state dir would reset them). Entries that do not match the naming pattern, or are not
    real directories, are left alone. A dir that cannot be removed is logged and skipped.
    """
    root = Path(root)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    except OSError as exc:
        raise StorageError(f"cannot list the quarantine root {root}: {exc}") from exc
    for entry in sorted(entries, key=lambda e: e.name):
        m = _QDIR_RE.fullmatch(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            made = calendar.timegm(time.strptime(m.group(1), _TIME_FORMAT))
        except ValueError:
            continue
        if now - made <= keep_seconds:
            continue
        path = Path(entry.path)
        try:
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("cannot prune quarantine dir %s: %s", path, exc)
            continue
        log.info("pruned quarantine dir %s (older than %gs)", path, keep_seconds)
        removed.append(path)
    return removed
