"""The minkms storage path: health probes, the agent's identity marker, and quarantine (DESIGN §3, §5, §6.4).

The storage path is sacred. Nothing here deletes minkms state or touches a path other than the one it is
given: `quarantine` *moves* the contents aside (a copy across filesystems is removed from the source only once
the copy is complete and fsynced), and `prune_quarantine` removes only quarantine directories it recognises
by name. All functions are blocking; the daemon runs them in a thread with its own timeout, because a dead
network volume can hang any system call.
"""

from __future__ import annotations

import calendar
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

from agent.core.model import MarkerState, StorageObs
from agent.io.durable import atomic_write, fsync_dir

log = logging.getLogger("kmagent.storage")

MARKER_NAME = ".kmagent-marker"
PROBE_PREFIX = ".kmagent-probe-"
QUARANTINE_META = "QUARANTINE.json"
MARKER_FORMAT = 1
_MARKER_TMP_PREFIX = f"{MARKER_NAME}.tmp-"
_PARTIAL = ".kmagent-partial"  # an EXDEV copy in progress inside a quarantine dir; its source still exists
_ACTION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_QDIR_RE = re.compile(r"(\d{8}T\d{6}Z)-([A-Za-z0-9._-]{1,64})")
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_MAX_MARKER_BYTES = 64 * 1024
_MOVE_PASSES = 3


class StorageError(Exception):
    """A refused or failed storage operation; the message names the rule or the path."""


@dataclass(frozen=True)
class Marker:
    """Who the state in a storage path belongs to; `written` is wall time (for humans, never compared)."""

    cluster: str
    host: str
    node_id: int | None
    written: float

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MARKER_FORMAT,
            "cluster": self.cluster,
            "host": self.host,
            "node_id": self.node_id,
            "written": self.written,
        }

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
        return cls(cluster=cluster, host=host, node_id=node_id, written=float(written))


# ------------------------------------------------------------------------------------------------- marker


def write_marker(storage: Path, marker: Marker, record: Path) -> None:
    """Write the marker into the storage path, then its copy to `record` in the agent's state dir.

    The storage copy goes first: a record without a marker would read as MISSING (a replaced volume) after a
    crash in between, while a marker without a record is merely OK.
    """
    data = (json.dumps(marker.to_json(), sort_keys=True) + "\n").encode()
    storage = Path(storage)
    if not storage.is_dir():
        raise StorageError(f"cannot write the marker: storage path {storage} is not an existing directory")
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


# -------------------------------------------------------------------------------------------------- probe


def is_agent_file(name: str) -> bool:
    """The agent's own files in the storage path: they do not make it "non-empty"."""
    return name == MARKER_NAME or name.startswith(PROBE_PREFIX) or name.startswith(_MARKER_TMP_PREFIX)


def _marker_state(storage: Path, *, cluster: str, host: str, record: Path) -> tuple[MarkerState, str | None]:
    try:
        marker = _read_marker_file(storage / MARKER_NAME)
    except StorageError as exc:
        # Unverifiable identity is treated as someone else's: it must not pass for ours.
        return MarkerState.MISMATCH, str(exc)
    if marker is not None:
        if marker.cluster == cluster and marker.host == host:
            return MarkerState.OK, None
        return MarkerState.MISMATCH, None
    return (MarkerState.MISSING if _exists(Path(record)) else MarkerState.ABSENT), None


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
      ABSENT (absent and never written). A missing storage path reads MISSING/ABSENT the same way.
    """
    try:
        return _probe(Path(storage), cluster=cluster, host=host, record=Path(record), low_space=low_space)
    except Exception as exc:  # a probe reports, it never raises
        log.exception("storage probe of %s failed unexpectedly", storage)
        return StorageObs(probe_ok=False, error=f"storage probe of {storage} failed: {exc!r}")


def _probe(storage: Path, *, cluster: str, host: str, record: Path, low_space: int) -> StorageObs:
    errors: list[str] = []
    try:
        st = os.stat(storage)
    except FileNotFoundError:
        marker, _ = _marker_state_safe(storage, cluster=cluster, host=host, record=record, exists=False)
        return StorageObs(probe_ok=False, marker=marker, error=f"storage path {storage} does not exist")
    except OSError as exc:
        marker, _ = _marker_state_safe(storage, cluster=cluster, host=host, record=record, exists=False)
        return StorageObs(probe_ok=False, marker=marker, error=f"cannot stat {storage}: {exc}")
    if not stat.S_ISDIR(st.st_mode):
        marker, _ = _marker_state_safe(storage, cluster=cluster, host=host, record=record, exists=False)
        return StorageObs(probe_ok=False, marker=marker, error=f"storage path {storage} is not a directory")

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

    marker, marker_error = _marker_state_safe(storage, cluster=cluster, host=host, record=record, exists=True)
    if marker_error:
        errors.append(marker_error)
    return StorageObs(
        probe_ok=probe_ok,
        read_only=read_only,
        empty=empty,
        free_bytes=free,
        low_space=free is not None and free < low_space,
        marker=marker,
        error="; ".join(errors) or None,
    )


def _marker_state_safe(
    storage: Path, *, cluster: str, host: str, record: Path, exists: bool
) -> tuple[MarkerState, str | None]:
    try:
        if not exists:
            return (MarkerState.MISSING if _exists(Path(record)) else MarkerState.ABSENT), None
        return _marker_state(storage, cluster=cluster, host=host, record=record)
    except Exception as exc:  # never raise from a probe
        return MarkerState.MISMATCH, f"cannot check the marker: {exc!r}"


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
    require_mount: bool = False,
    expected_marker: Marker | None = None,
    now: float,
) -> Path:
    """Move the contents of the storage path into `root/<UTC YYYYmmddTHHMMSSZ>-<action_id>/` (DESIGN §5).

    The storage directory itself stays, with its owner and mode: it may be a mount point. Refuses with
    StorageError, before anything moves, when any guard rail (§6.4) fails. Resumable: a quarantine dir of the
    same action id left by a crash is reused and what is left is moved into it; a completed one (it holds
    QUARANTINE.json) is returned without moving anything, so a replayed step cannot sweep away the fresh state
    a later step created. Nothing already in quarantine is ever overwritten (a clashing name gets a
    `.kmagent-dup-N` suffix). Transient probe files are left in place. Returns the quarantine dir.
    """
    if not isinstance(action_id, str) or not _ACTION_ID_RE.fullmatch(action_id):
        raise StorageError(f"refused: action id {action_id!r} must match [A-Za-z0-9._-]{{1,64}}")
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
    if require_mount and not os.path.ismount(src):
        raise StorageError(f"refused: storage path {src} is not a mount point and require_mount is set")
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
