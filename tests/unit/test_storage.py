"""Storage probes, the identity marker and quarantine: the storage path is sacred (DESIGN §6 rail 4)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from agent.core.model import MarkerState, StorageObs
from agent.io import storage as st
from agent.io.storage import (
    MARKER_NAME,
    QUARANTINE_META,
    Marker,
    StorageError,
    VolumeId,
    forget_volume,
    mount_required,
    probe_storage,
    prune_quarantine,
    quarantine,
    read_marker,
    refresh_identity,
    volume_identity,
    volume_problem,
    write_marker,
)

CLUSTER, HOST = "kms-prod", "kms1.example.net"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
STAMP = "20231114T221320Z"


def tree(root: Path) -> dict[str, tuple[str, bytes | str | None, int]]:
    """Every entry below root: kind, content (bytes, link target, None for a dir) and mode."""
    out: dict[str, tuple[str, bytes | str | None, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            s = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), 0)
            elif p.is_dir():
                out[rel] = ("dir", None, s.st_mode & 0o7777)
            else:
                out[rel] = ("file", p.read_bytes(), s.st_mode & 0o7777)
    return out


def populate(storage: Path) -> None:
    """Something like minkms state: a database, a nested dir, a symlink, odd modes."""
    (storage / "kms.db").write_bytes(os.urandom(4096))
    (storage / "wal").mkdir()
    (storage / "wal" / "000001.log").write_bytes(b"log entry\n" * 100)
    (storage / "wal" / "empty").mkdir()
    (storage / "secret.key").write_bytes(b"k1:abc")
    os.chmod(storage / "secret.key", 0o600)
    (storage / "current").symlink_to("wal/000001.log")
    (storage / ".hidden").write_text("dotfile")


def probe(storage: Path, record: Path, low_space: int = 0) -> StorageObs:
    return probe_storage(storage, cluster=CLUSTER, host=HOST, record=record, low_space=low_space)


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path, Path]:
    storage = tmp_path / "storage"
    storage.mkdir()
    os.chmod(storage, 0o750)
    state = tmp_path / "state"
    state.mkdir()
    return storage, state / "marker.json", state / "quarantine"


def marker(cluster: str = CLUSTER, host: str = HOST, node_id: int | None = 2) -> Marker:
    return Marker(cluster=cluster, host=host, node_id=node_id, written=NOW)


def dev_of(path: Path) -> str:
    st_dev = os.stat(path).st_dev
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


# -------------------------------------------------------------------------------------------------- marker


def test_marker_roundtrip_writes_storage_and_record(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    m = marker()
    written = write_marker(storage, m, record)
    # what was written is the marker with the storage path's volume identity, measured now
    assert written == dataclasses.replace(m, volume=written.volume) and written.same_mark(m)
    assert written.volume is not None and written.volume.dev == dev_of(storage)
    assert written.volume.mount_point is False  # a directory of tmp_path's filesystem
    assert read_marker(storage / MARKER_NAME) == written
    assert read_marker(record) == written
    assert read_marker(storage) == written  # a directory means the marker inside it
    assert sorted(os.listdir(storage)) == [MARKER_NAME]  # no temporary file left behind
    assert sorted(os.listdir(record.parent)) == [record.name]


def test_marker_with_unknown_node_id(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(node_id=None), record)
    found = read_marker(record)
    assert found is not None and found.node_id is None


def test_read_marker_absent(tmp_path: Path) -> None:
    assert read_marker(tmp_path / "nope") is None
    assert read_marker(tmp_path) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"cluster": "", "host": "h", "node_id": 1, "written": 1}', "'cluster'"),
        ('{"cluster": "c", "node_id": 1, "written": 1}', "'host'"),
        ('{"cluster": "c", "host": "h", "node_id": true, "written": 1}', "'node_id'"),
        ('{"cluster": "c", "host": "h", "node_id": 1, "written": "yesterday"}', "'written'"),
        ('{"format": 99, "cluster": "c", "host": "h", "node_id": 1, "written": 1}', "format"),
    ],
)
def test_malformed_marker_raises(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / MARKER_NAME
    path.write_text(content)
    with pytest.raises(StorageError, match="malformed marker") as info:
        read_marker(path)
    assert reason in str(info.value)
    assert str(path) in str(info.value)


def test_write_marker_into_missing_storage_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not an existing directory"):
        write_marker(tmp_path / "missing", marker(), tmp_path / "record")
    assert not (tmp_path / "record").exists()


# --------------------------------------------------------------------------------------------------- probe


def test_probe_ok_empty_dir(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    obs = probe(storage, record)
    assert obs.probe_ok and obs.empty and not obs.read_only and not obs.low_space
    assert obs.free_bytes is not None and obs.free_bytes > 0
    assert obs.marker is MarkerState.ABSENT and obs.error is None
    assert os.listdir(storage) == []  # the probe file is gone


def test_probe_own_files_do_not_make_it_non_empty(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(), record)
    (storage / ".kmagent-probe-999999").write_text("stale probe of a crashed agent")
    obs = probe(storage, record)
    assert obs.probe_ok and obs.empty and obs.marker is MarkerState.OK


def test_probe_non_empty(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    populate(storage)
    obs = probe(storage, record)
    assert obs.probe_ok and not obs.empty


@pytest.mark.parametrize("content", ["x", ""])
def test_probe_any_foreign_entry_is_state(paths: tuple[Path, Path, Path], content: str) -> None:
    storage, record, _ = paths
    (storage / "a").write_text(content)
    assert not probe(storage, record).empty


def test_probe_missing_dir(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    storage.rmdir()
    obs = probe(storage, record)
    assert not obs.probe_ok and not obs.empty
    assert obs.error is not None and "does not exist" in obs.error and str(storage) in obs.error
    assert obs.marker is MarkerState.ABSENT


def test_probe_missing_dir_with_record_is_missing_marker(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(), record)
    shutil.rmtree(storage)
    obs = probe(storage, record)
    assert not obs.probe_ok and obs.marker is MarkerState.MISSING


def test_probe_not_a_directory(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    storage.rmdir()
    storage.write_text("a file where a directory should be")
    obs = probe(storage, record)
    assert not obs.probe_ok and not obs.empty
    assert obs.error is not None and "not a directory" in obs.error
    assert storage.read_text() == "a file where a directory should be"


def test_probe_low_space(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    obs = probe(storage, record, low_space=1 << 62)
    assert obs.probe_ok and obs.low_space and obs.free_bytes is not None
    assert not probe(storage, record, low_space=1).low_space


def test_probe_free_bytes_matches_statvfs(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    vfs = os.statvfs(storage)
    obs = probe(storage, record)
    assert obs.free_bytes is not None
    # Other processes write to the same filesystem; allow some drift.
    assert abs(obs.free_bytes - vfs.f_bavail * vfs.f_frsize) < 256 * 1024 * 1024


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ((CLUSTER, HOST), MarkerState.OK),
        (("other-cluster", HOST), MarkerState.MISMATCH),
        ((CLUSTER, "kms2.example.net"), MarkerState.MISMATCH),
    ],
)
def test_probe_marker_states(
    paths: tuple[Path, Path, Path], written: tuple[str, str], expected: MarkerState
) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(*written), record)
    obs = probe(storage, record)
    assert obs.marker is expected and obs.probe_ok


def test_probe_marker_node_id_change_is_still_ok(paths: tuple[Path, Path, Path]) -> None:
    """Node ids change on every rejoin; the marker's identity is cluster + host."""
    storage, record, _ = paths
    write_marker(storage, marker(node_id=7), record)
    assert probe(storage, record).marker is MarkerState.OK


def test_probe_marker_missing_after_volume_change(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(), record)
    (storage / MARKER_NAME).unlink()  # the volume was replaced: the record remembers the marker
    assert probe(storage, record).marker is MarkerState.MISSING


def test_probe_marker_absent_without_record(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    populate(storage)
    assert probe(storage, record).marker is MarkerState.ABSENT


def test_probe_malformed_marker_is_mismatch_with_error(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    (storage / MARKER_NAME).write_text("garbage")
    obs = probe(storage, record)
    assert obs.marker is MarkerState.MISMATCH
    assert obs.probe_ok and obs.error is not None and "malformed marker" in obs.error


def test_probe_never_raises(paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    storage, record, _ = paths

    def boom(_path: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(st, "_write_probe", boom)
    obs = probe(storage, record)
    assert not obs.probe_ok and obs.error is not None and "bug" in obs.error


def test_probe_erofs_sets_read_only(paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    storage, record, _ = paths

    def erofs(_path: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(st, "_write_probe", erofs)
    obs = probe(storage, record)
    assert not obs.probe_ok and obs.read_only and obs.error is not None


def _can_mount() -> str | None:
    """None when tmpfs mounts work here, else why not."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount(8) is not installed"
    return None


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An empty tmpfs mount point; skips the test (with the reason) when mounting is not possible."""
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    mounts: list[Path] = []

    def mount(path: Path, *opts: str) -> None:
        path.mkdir(exist_ok=True)
        args = ["mount", "-t", "tmpfs", *(["-o", ",".join(opts)] if opts else []), "tmpfs", str(path)]
        res = subprocess.run(args, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounts.append(path)

    path = tmp_path / "mnt"
    mount(path, "mode=0750")
    try:
        yield path
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], check=False, capture_output=True)


def test_probe_read_only_mount(tmpfs: Path, tmp_path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True, capture_output=True)
    obs = probe_storage(tmpfs, cluster=CLUSTER, host=HOST, record=tmp_path / "record", low_space=0)
    assert obs.read_only and not obs.probe_ok and obs.empty
    assert obs.error is not None and "write probe" in obs.error


# ---------------------------------------------------------------------------------------------- quarantine


def test_quarantine_moves_contents_and_deletes_nothing(paths: tuple[Path, Path, Path]) -> None:
    storage, record, root = paths
    populate(storage)
    write_marker(storage, marker(), record)
    before = tree(storage)
    st_before = storage.stat()
    qdir = quarantine(storage, storage, root, "act-1", expected_marker=marker(), now=NOW)

    assert qdir == root.resolve() / f"{STAMP}-act-1"
    assert os.listdir(storage) == []
    after = tree(qdir)
    after.pop(QUARANTINE_META)
    meta = json.loads((qdir / QUARANTINE_META).read_text())
    assert after == before  # every byte, link and mode is there
    st_after = storage.stat()  # the directory itself is untouched: same inode, owner and mode
    assert (st_after.st_ino, st_after.st_uid, st_after.st_gid, st_after.st_mode) == (
        st_before.st_ino,
        st_before.st_uid,
        st_before.st_gid,
        st_before.st_mode,
    )
    assert qdir.stat().st_mode & 0o777 == 0o700
    assert meta["action_id"] == "act-1" and meta["source"] == str(storage.resolve())
    assert meta["time"] == NOW and meta["cross_device"] is False
    assert meta["entries"] == sorted(before_top(before))


def test_quarantine_empty_storage(paths: tuple[Path, Path, Path]) -> None:
    storage, _, root = paths
    qdir = quarantine(storage, storage, root, "a", now=NOW)
    assert os.listdir(qdir) == [QUARANTINE_META]
    assert json.loads((qdir / QUARANTINE_META).read_text())["entries"] == []


def test_quarantine_leaves_probe_files(paths: tuple[Path, Path, Path]) -> None:
    storage, _, root = paths
    populate(storage)
    probe_file = storage / ".kmagent-probe-4242"
    probe_file.write_text("in flight")
    quarantine(storage, storage, root, "a", now=NOW)
    assert os.listdir(storage) == [probe_file.name]


def test_quarantine_through_symlink_that_resolves_equal(
    paths: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    storage, _, root = paths
    populate(storage)
    link = tmp_path / "link-to-storage"
    link.symlink_to(storage)
    quarantine(link, storage, root, "a", now=NOW)
    assert link.is_symlink() and storage.is_dir() and os.listdir(storage) == []


def _refused(paths: tuple[Path, Path, Path], match: str, **kwargs: object) -> None:
    """Assert a refusal that changed nothing."""
    storage, _, root = paths
    before = tree(storage)
    args: dict[str, object] = {"storage": storage, "configured": storage, "root": root, "action_id": "a"}
    args.update(kwargs)
    with pytest.raises(StorageError, match=match):
        quarantine(now=NOW, **args)  # type: ignore[arg-type]
    assert tree(storage) == before
    assert not root.exists() or os.listdir(root) == []


def test_refuse_not_the_configured_path(paths: tuple[Path, Path, Path], tmp_path: Path) -> None:
    storage, _, _ = paths
    populate(storage)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    _refused(paths, "is not the configured storage path", storage=other)
    assert (other / "x").read_text() == "x"


def test_refuse_symlink_pointing_elsewhere(paths: tuple[Path, Path, Path], tmp_path: Path) -> None:
    storage, _, _ = paths
    populate(storage)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    link = tmp_path / "looks-like-storage"
    link.symlink_to(other)
    _refused(paths, "not the configured storage path", storage=link)
    assert os.listdir(other) == ["x"]


def test_refuse_configured_symlink_to_elsewhere(paths: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The configured path names another directory once resolved: the storage path is not it."""
    storage, _, _ = paths
    populate(storage)
    other = tmp_path / "other"
    other.mkdir()
    conf = tmp_path / "configured"
    conf.symlink_to(other)
    _refused(paths, "not the configured storage path", configured=conf)


def test_refuse_missing_storage(paths: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, root = paths
    with pytest.raises(StorageError, match="cannot be resolved"):
        quarantine(tmp_path / "nope", tmp_path / "nope", root, "a", now=NOW)


def test_refuse_root_inside_storage(paths: tuple[Path, Path, Path]) -> None:
    storage, _, _ = paths
    populate(storage)
    _refused(paths, "must not contain each other", root=storage / "q")
    assert not (storage / "q").exists()


def test_refuse_storage_inside_root(paths: tuple[Path, Path, Path]) -> None:
    storage, _, _ = paths
    populate(storage)
    _refused(paths, "must not contain each other", root=storage.parent)


def test_refuse_root_is_storage(paths: tuple[Path, Path, Path]) -> None:
    storage, _, _ = paths
    populate(storage)
    _refused(paths, "must not contain each other", root=storage)


def test_refuse_not_a_mount_point(paths: tuple[Path, Path, Path]) -> None:
    storage, _, _ = paths
    populate(storage)
    _refused(paths, "not a mount point, and it must be: local.require_mount is set", require_mount=True)


def test_require_mount_accepts_a_mount_point(tmpfs: Path, tmp_path: Path) -> None:
    populate(tmpfs)
    before = tree(tmpfs)
    mode = tmpfs.stat().st_mode
    qdir = quarantine(tmpfs, tmpfs, tmp_path / "q", "a", require_mount=True, now=NOW)
    assert os.path.ismount(tmpfs) and os.listdir(tmpfs) == [] and tmpfs.stat().st_mode == mode
    after = tree(qdir)
    after.pop(QUARANTINE_META)
    assert after == before


def test_refuse_foreign_marker(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    populate(storage)
    write_marker(storage, marker(cluster="someone-else"), record)
    _refused(paths, "marker of cluster 'someone-else'", expected_marker=marker())


def test_same_cluster_other_host_marker_is_allowed(paths: tuple[Path, Path, Path]) -> None:
    storage, record, root = paths
    populate(storage)
    write_marker(storage, marker(host="kms9"), record)
    qdir = quarantine(storage, storage, root, "a", expected_marker=marker(), now=NOW)
    assert (qdir / MARKER_NAME).exists()


def test_refuse_unreadable_marker(paths: tuple[Path, Path, Path]) -> None:
    storage, _, _ = paths
    populate(storage)
    (storage / MARKER_NAME).write_text("garbage")
    _refused(paths, "identity of .* cannot be checked", expected_marker=marker())


def test_foreign_marker_without_expected_marker_is_moved(paths: tuple[Path, Path, Path]) -> None:
    storage, record, root = paths
    write_marker(storage, marker(cluster="someone-else"), record)
    qdir = quarantine(storage, storage, root, "a", now=NOW)
    assert (qdir / MARKER_NAME).exists()


@pytest.mark.parametrize("action_id", ["", "a/b", "../x", "x" * 129, "a b", "é", "a\n", "a\x00"])
def test_refuse_bad_action_id(paths: tuple[Path, Path, Path], action_id: str) -> None:
    storage, _, _ = paths
    populate(storage)
    _refused(paths, "action id", action_id=action_id)


def test_dots_in_action_id_stay_inside_root(paths: tuple[Path, Path, Path]) -> None:
    """ ".." matches the pattern, but the time prefix makes it an ordinary name inside the root."""
    storage, _, root = paths
    qdir = quarantine(storage, storage, root, "..", now=NOW)
    assert qdir.parent == root.resolve() and qdir.name == f"{STAMP}-.."


def test_refuse_mount_point_inside_storage(tmpfs: Path, paths: tuple[Path, Path, Path]) -> None:
    storage, _, root = paths
    # Put the mount inside the storage path by bind-mounting it there.
    inner = storage / "data"
    inner.mkdir()
    res = subprocess.run(["mount", "--bind", str(tmpfs), str(inner)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {res.stderr.strip()}")
    try:
        (inner / "f").write_text("on the inner mount")
        with pytest.raises(StorageError, match="is a mount point"):
            quarantine(storage, storage, root, "a", now=NOW)
        assert (inner / "f").read_text() == "on the inner mount"
    finally:
        subprocess.run(["umount", str(inner)], check=False, capture_output=True)


def test_resume_after_partial_move(paths: tuple[Path, Path, Path]) -> None:
    storage, record, root = paths
    populate(storage)
    write_marker(storage, marker(), record)
    before = tree(storage)
    # A crash mid-way, an hour earlier: the dir exists and holds some of the entries.
    earlier = NOW - 3600
    qdir = root / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(earlier))}-act-7"
    qdir.mkdir(parents=True, mode=0o700)
    os.rename(storage / "kms.db", qdir / "kms.db")
    os.rename(storage / "wal", qdir / "wal")

    got = quarantine(storage, storage, root, "act-7", expected_marker=marker(), now=NOW)
    assert got == qdir.resolve()
    assert os.listdir(root) == [qdir.name]  # no second dir for the same action
    assert os.listdir(storage) == []
    after = tree(qdir)
    after.pop(QUARANTINE_META)
    assert after == before
    meta = json.loads((qdir / QUARANTINE_META).read_text())
    assert meta["entries"] == sorted(before_top(before))


def before_top(t: Mapping[str, object]) -> list[str]:
    return [k for k in t if "/" not in k]


def test_completed_quarantine_is_not_repeated(paths: tuple[Path, Path, Path]) -> None:
    """A replayed step must not sweep away the fresh state a later step created."""
    storage, _, root = paths
    populate(storage)
    qdir = quarantine(storage, storage, root, "act-1", now=NOW)
    (storage / "fresh.db").write_text("new node state")
    again = quarantine(storage, storage, root, "act-1", now=NOW + 60)
    assert again == qdir
    assert (storage / "fresh.db").read_text() == "new node state"


def test_resume_never_overwrites_a_clashing_name(paths: tuple[Path, Path, Path]) -> None:
    storage, _, root = paths
    qdir = root / f"{STAMP}-a"
    qdir.mkdir(parents=True)
    (qdir / "kms.db").write_text("copied before the crash")
    (storage / "kms.db").write_text("still in storage")
    (storage / QUARANTINE_META).write_text("a user file with our record's name")
    quarantine(storage, storage, root, "a", now=NOW)
    assert (qdir / "kms.db").read_text() == "copied before the crash"
    assert (qdir / "kms.db.kmagent-dup-1").read_text() == "still in storage"
    assert (qdir / f"{QUARANTINE_META}.kmagent-dup-1").read_text() == "a user file with our record's name"
    assert json.loads((qdir / QUARANTINE_META).read_text())["action_id"] == "a"


def test_quarantine_keeps_storage_dir_owner_and_mode(paths: tuple[Path, Path, Path]) -> None:
    storage, _, root = paths
    populate(storage)
    os.chmod(storage, 0o2711)
    if os.geteuid() == 0:
        os.chown(storage, 4321, 4321)
    s0 = storage.stat()
    quarantine(storage, storage, root, "a", now=NOW)
    s1 = storage.stat()
    assert (s1.st_mode, s1.st_uid, s1.st_gid, s1.st_ino) == (s0.st_mode, s0.st_uid, s0.st_gid, s0.st_ino)


def test_quarantine_exdev_copies_then_removes_source(tmpfs: Path, paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    root = tmpfs / "quarantine"  # another filesystem: every rename fails with EXDEV
    populate(storage)
    write_marker(storage, marker(), record)
    if os.geteuid() == 0:
        os.chown(storage / "kms.db", 4321, 4322)
        os.lchown(storage / "current", 4321, 4322)
        os.chown(storage / "wal" / "000001.log", 4321, 4322)
    before = tree(storage)
    owners = {rel: (os.lstat(storage / rel).st_uid, os.lstat(storage / rel).st_gid) for rel in before}
    qdir = quarantine(storage, storage, root, "x-dev", now=NOW)
    assert os.listdir(storage) == []
    after = tree(qdir)
    after.pop(QUARANTINE_META)
    assert after == before
    assert {rel: (os.lstat(qdir / rel).st_uid, os.lstat(qdir / rel).st_gid) for rel in after} == owners
    meta = json.loads((qdir / QUARANTINE_META).read_text())
    assert meta["cross_device"] is True
    assert not (qdir / ".kmagent-partial").exists()


def test_quarantine_exdev_resume_drops_partial_copy(tmpfs: Path, paths: tuple[Path, Path, Path]) -> None:
    """A crash during a cross-device copy leaves a partial copy whose source is intact; resuming redoes it."""
    storage, _, _ = paths
    root = tmpfs / "quarantine"
    populate(storage)
    before = tree(storage)
    qdir = root / f"{STAMP}-a"
    qdir.mkdir(parents=True)
    (qdir / ".kmagent-partial").mkdir()
    (qdir / ".kmagent-partial" / "half").write_text("torn")
    quarantine(storage, storage, root, "a", now=NOW)
    after = tree(qdir)
    after.pop(QUARANTINE_META)
    assert after == before


def test_quarantine_exdev_failure_keeps_source(
    paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without root: simulate EXDEV, then a copy that fails (disk full); the source must be untouched."""
    storage, _, root = paths
    populate(storage)
    before = tree(storage)
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src).parent == storage.resolve():
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_rename(src, dst)

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "copy2", full)
    monkeypatch.setattr(shutil, "copytree", full)
    with pytest.raises(StorageError, match="No space left"):
        quarantine(storage, storage, root, "a", now=NOW)
    assert tree(storage) == before


def test_quarantine_exdev_simulated(paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The EXDEV path without root: renames out of the storage path fail as across filesystems."""
    storage, _, root = paths
    populate(storage)
    before = tree(storage)
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src).parent == storage.resolve():
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    qdir = quarantine(storage, storage, root, "a", now=NOW)
    after = tree(qdir)
    after.pop(QUARANTINE_META)
    assert after == before and os.listdir(storage) == []


# ------------------------------------------------------------------------------------------------- prune


def test_prune_removes_only_old_well_named_dirs(tmp_path: Path) -> None:
    root = tmp_path / "q"
    root.mkdir()
    day = 86400.0

    def qd(age: float, action: str) -> Path:
        p = root / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(NOW - age))}-{action}"
        p.mkdir()
        (p / "kms.db").write_text("old state")
        os.utime(p, (NOW, NOW))  # mtime says "new": the name must win
        return p

    old1, old2 = qd(8 * day, "a1"), qd(30 * day, "a2")
    young = qd(1 * day, "a3")
    (root / "notes.txt").write_text("operator notes")
    (root / "20200101T000000Z").mkdir()  # no action id
    (root / "2020-01-01-a").mkdir()
    (root / "20200101T000000Z-bad id").mkdir()
    (root / "20201301T000000Z-a").mkdir()  # month 13: not a time
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("keep")
    (root / "20200101T000000Z-link").symlink_to(target)

    removed = prune_quarantine(root, 7 * day, NOW)
    assert sorted(removed) == sorted([old1, old2])
    assert not old1.exists() and not old2.exists() and young.exists()
    left = sorted(os.listdir(root))
    assert left == sorted(
        [
            young.name,
            "notes.txt",
            "20200101T000000Z",
            "2020-01-01-a",
            "20200101T000000Z-bad id",
            "20201301T000000Z-a",
            "20200101T000000Z-link",
        ]
    )
    assert (target / "keep").read_text() == "keep"


def test_prune_missing_root(tmp_path: Path) -> None:
    assert prune_quarantine(tmp_path / "none", 0, NOW) == []


def test_prune_then_quarantine_roundtrip(paths: tuple[Path, Path, Path]) -> None:
    storage, _, root = paths
    populate(storage)
    qdir = quarantine(storage, storage, root, "a", now=NOW)
    assert prune_quarantine(root, 3600, NOW + 60) == []
    assert prune_quarantine(root, 3600, NOW + 7200) == [qdir]


def test_probe_marker_that_is_a_directory_is_mismatch(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    (storage / MARKER_NAME).mkdir()
    obs = probe(storage, record)
    assert (
        obs.marker is MarkerState.MISMATCH and obs.error is not None and "cannot read the marker" in obs.error
    )


# ------------------------------------------------------------------------------------------ volume identity
# DESIGN §6 rail 11: a host that boots without its data volume shows an empty directory under the mount point.
# Hand-written records below stand for "marked on another disk": the record is the only thing the probe compares.


def write_record(record: Path, volume: dict[str, object] | None, **fields: object) -> Marker:
    """A record as an agent wrote it: with `volume` (None: an older agent's, without identity)."""
    data: dict[str, object] = {"format": 1, "cluster": CLUSTER, "host": HOST, "node_id": 2, "written": NOW}
    data.update(fields)
    if volume is not None:
        data["volume"] = volume
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data))
    found = read_marker(record)
    assert found is not None
    return found


def here(path: Path, **changes: object) -> dict[str, object]:
    """The volume identity of `path` as a record holds it, with `changes` (another dev, uuid, mount point)."""
    data: dict[str, object] = {
        "dev": dev_of(path),
        "mount_point": os.path.ismount(path),
        "fstype": None,
        "uuid": None,
    }
    data.update(changes)
    return data


def test_marker_without_identity_is_the_old_format(tmp_path: Path) -> None:
    """A marker without a volume serialises as before (format 1, no new key), and older files read back."""
    assert "volume" not in marker().to_json() and marker().to_json()["format"] == 1
    path = tmp_path / MARKER_NAME
    path.write_text(json.dumps({"format": 1, "cluster": CLUSTER, "host": HOST, "node_id": 2, "written": NOW}))
    old = read_marker(path)
    assert old == marker() and old is not None and old.volume is None
    path.write_text(json.dumps({**marker().to_json(), "volume": None}))
    assert read_marker(path) == marker()


@pytest.mark.parametrize(
    ("volume", "reason"),
    [
        ("8:17", "'volume' must be an object"),
        ({"mount_point": True}, "'volume.dev'"),
        ({"dev": "sdb1", "mount_point": True}, "'volume.dev'"),
        ({"dev": "8:17", "mount_point": "yes"}, "'volume.mount_point'"),
        ({"dev": "8:17", "mount_point": True, "uuid": ""}, "'volume.uuid'"),
        ({"dev": "8:17", "mount_point": True, "fstype": 4}, "'volume.fstype'"),
    ],
)
def test_malformed_volume_identity_raises(tmp_path: Path, volume: object, reason: str) -> None:
    path = tmp_path / MARKER_NAME
    path.write_text(json.dumps({**marker().to_json(), "volume": volume}))
    with pytest.raises(StorageError, match="malformed marker") as info:
        read_marker(path)
    assert reason in str(info.value)


def test_volume_identity_of_a_directory(tmp_path: Path) -> None:
    found = volume_identity(tmp_path)
    assert found.dev == dev_of(tmp_path) and found.mount_point is False
    assert found.fstype  # this test machine's /proc/self/mountinfo names the filesystem of tmp_path


def test_fs_type_and_source_from_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deepest mount above the path, its own device's entry first; escaped names decoded."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
        "40 27 8:17 / /mnt/minio\\040kms rw,relatime shared:5 - xfs /dev/sdb1 rw\n"
        "41 27 0:50 / /mnt rw - tmpfs tmpfs rw\n"
        "garbage line\n"
    )
    monkeypatch.setattr(st, "MOUNTINFO", info)
    assert st._mount_of("/mnt/minio kms/data", "8:17") == ("xfs", "/dev/sdb1")
    assert st._mount_of("/mnt/other", "0:50") == ("tmpfs", "tmpfs")
    assert st._mount_of("/srv/kms", "254:0") == ("ext4", "/dev/vda")
    assert st._mount_of("/mnt/minio kms", "99:1") == (
        "xfs",
        "/dev/sdb1",
    )  # no entry of its device: the deepest
    monkeypatch.setattr(st, "MOUNTINFO", tmp_path / "absent")
    assert st._mount_of("/srv/kms", "254:0") == (None, None)


def test_uuid_from_the_by_uuid_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The by-uuid link whose block device is st_dev; this machine has no /dev/disk/by-uuid, so the test builds
    one pointing at the real block device of the root filesystem."""
    root_dev = os.stat("/").st_dev
    source = st._mount_of("/", dev_of(Path("/")))[1]
    try:
        real = os.stat(source) if source else None
    except OSError:
        real = None
    if real is None or not stat.S_ISBLK(real.st_mode) or real.st_rdev != root_dev:
        pytest.skip(f"the root filesystem's source {source!r} is not a block device node here")
    links = tmp_path / "by-uuid"
    links.mkdir()
    (links / "1111-2222").symlink_to("/dev/null")
    (links / "5c1e0f2a-aaaa").symlink_to(str(source))
    (links / "dangling").symlink_to(tmp_path / "nothing")
    monkeypatch.setattr(st, "BY_UUID", links)
    assert st._uuid_of(root_dev) == "5c1e0f2a-aaaa"
    assert st._uuid_of(os.makedev(4095, 4095)) is None
    monkeypatch.setattr(st, "BY_UUID", tmp_path / "absent")
    assert st._uuid_of(root_dev) is None


def test_same_filesystem_prefers_the_uuid() -> None:
    a = VolumeId("8:17", True, "xfs", "u-1")
    assert a.same_filesystem(VolumeId("8:33", True, "xfs", "u-1"))  # renumbered across a reboot
    assert not a.same_filesystem(VolumeId("8:17", True, "xfs", "u-2"))  # another disk at the same device
    assert a.same_filesystem(VolumeId("8:17", True, "xfs", None))  # no UUID now: the device decides
    assert not a.same_filesystem(VolumeId("8:17", True, "ext4", None))  # ... and the type, when both known
    assert not a.same_filesystem(VolumeId("254:0", False, "ext4", None))


def test_probe_on_the_marked_filesystem_sees_no_missing_volume(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(), record)
    obs = probe(storage, record)
    assert (
        obs.marker is MarkerState.OK
        and not obs.volume_missing
        and not obs.identity_stale
        and obs.error is None
    )
    # State lost on the same filesystem (the contents and the marker gone): STATE_LOST as before, not a volume
    (storage / MARKER_NAME).unlink()
    obs = probe(storage, record)
    assert obs.empty and obs.marker is MarkerState.MISSING and not obs.volume_missing and obs.error is None


def test_probe_another_filesystem_than_recorded_is_volume_missing(paths: tuple[Path, Path, Path]) -> None:
    """The record says the node was marked on device 4095:4095; the empty storage path is on this one."""
    storage, record, _ = paths
    write_record(record, here(storage, dev="4095:4095", fstype="xfs", source="/dev/sdz1"))
    obs = probe(storage, record)
    assert obs.volume_missing and obs.empty and obs.marker is MarkerState.MISSING and obs.probe_ok
    assert obs.error is not None and obs.error.startswith("volume missing: ")
    assert (
        "marked on xfs /dev/sdz1 (dev 4095:4095), now on" in obs.error
        and f"(dev {dev_of(storage)}" in obs.error
    )


def test_probe_lost_mount_point_is_volume_missing(paths: tuple[Path, Path, Path]) -> None:
    """Marked on a mount point; now a plain directory on the same device as its parent (the root filesystem)."""
    storage, record, _ = paths
    write_record(record, here(storage, mount_point=True))
    obs = probe(storage, record)
    assert obs.volume_missing and "was a mount point of" in (obs.error or "")
    assert "is a plain directory now" in (obs.error or "")


def test_probe_missing_storage_path_of_a_mount_point_is_volume_missing(
    paths: tuple[Path, Path, Path],
) -> None:
    storage, record, _ = paths
    write_record(record, here(storage, mount_point=True))
    storage.rmdir()
    obs = probe(storage, record)
    assert obs.volume_missing and not obs.probe_ok and obs.marker is MarkerState.MISSING
    assert obs.error is not None and "is absent now" in obs.error and "does not exist" in obs.error


def test_probe_missing_storage_path_judged_by_its_parent(paths: tuple[Path, Path, Path]) -> None:
    """A storage path below a mount point (/srv mounted, /srv/minkms the path) that failed to mount: the path is
    gone and its nearest parent is on another filesystem."""
    storage, record, _ = paths
    write_record(record, here(storage, dev="4095:4095"))
    storage.rmdir()
    obs = probe(storage, record)
    assert obs.volume_missing and obs.error is not None and f"its parent {storage.parent}" in obs.error
    write_record(record, here(storage.parent))  # the same filesystem: a deleted directory, as before
    assert not probe(storage, record).volume_missing


def test_probe_old_record_without_identity_behaves_as_before(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_record(record, None)
    obs = probe(storage, record)
    assert (
        obs.empty and obs.marker is MarkerState.MISSING and not obs.volume_missing and not obs.identity_stale
    )
    # its marker in place: the identity is to be recorded (refresh_identity)
    (storage / MARKER_NAME).write_text(record.read_text())
    populate(storage)
    obs = probe(storage, record)
    assert obs.marker is MarkerState.OK and obs.identity_stale and not obs.volume_missing


def test_marker_of_the_record_proves_the_volume_whatever_its_device(paths: tuple[Path, Path, Path]) -> None:
    """Device numbers may change across reboots: the very marker of the record, on the volume, proves it is the
    marked one. The node is then marked again with the identity measured now, under a new `written`."""
    storage, record, _ = paths
    populate(storage)
    old = write_record(record, here(storage, dev="4095:4095"))
    (storage / MARKER_NAME).write_text(record.read_text())
    obs = probe(storage, record)
    assert not obs.volume_missing and obs.identity_stale and obs.marker is MarkerState.OK
    fresh = refresh_identity(storage, record)
    assert fresh is not None and fresh.volume is not None and fresh.volume.dev == dev_of(storage)
    assert not fresh.same_mark(old) and fresh.written > NOW and fresh.node_id == old.node_id
    assert read_marker(record) == fresh == read_marker(storage)
    obs = probe(storage, record)
    assert not obs.identity_stale and not obs.volume_missing
    assert refresh_identity(storage, record) is None  # nothing left to refresh


def test_a_stale_copy_of_an_old_marker_does_not_prove_the_volume(paths: tuple[Path, Path, Path]) -> None:
    """Once marked again, an old copy of the previous marker (left on the root filesystem under a mount point) is
    not the record's own: the storage path is judged by its filesystem."""
    storage, record, _ = paths
    write_record(record, None)
    stale = record.read_text()
    (storage / MARKER_NAME).write_text(stale)
    assert refresh_identity(storage, record) is not None
    write_record(record, here(storage, mount_point=True), written=NOW + 10)  # re-marked on a mount point
    (storage / MARKER_NAME).write_text(stale)  # the old copy in the directory under the unmounted mount point
    obs = probe(storage, record)
    assert obs.volume_missing and obs.marker is MarkerState.OK and not obs.identity_stale


def test_refresh_identity_writes_nothing_for_another_mark(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    write_record(record, None)
    assert refresh_identity(storage, record) is None  # no marker in the storage path
    write_marker(storage, marker(node_id=5), tmp := storage.parent / "other-record.json")
    before = record.read_text()
    assert refresh_identity(storage, record) is None and record.read_text() == before
    assert tmp.exists()


def test_probe_uuid_decides_over_the_device(
    paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With both UUIDs known, the UUID decides (the host's by-uuid lookup is stood in for: this machine has none)."""
    storage, record, _ = paths
    monkeypatch.setattr(st, "_uuid_of", lambda _dev: "uuid-now")
    write_record(record, here(storage, dev="4095:4095", uuid="uuid-now"))
    assert not probe(storage, record).volume_missing  # renumbered, the same filesystem
    write_record(record, here(storage, uuid="uuid-then"))
    obs = probe(storage, record)  # the same device numbers, another filesystem (a new disk at the same place)
    assert (
        obs.volume_missing and "UUID uuid-then" in (obs.error or "") and "UUID uuid-now" in (obs.error or "")
    )


def test_probe_damaged_record_without_our_marker_is_unverifiable(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    record.write_text("{damaged")
    obs = probe(storage, record)
    assert obs.volume_missing and obs.marker is MarkerState.MISSING
    assert obs.error is not None and obs.error.startswith("volume unverifiable: malformed marker")
    # our own marker in place: the volume is ours, whatever the record's state
    write_marker(storage, marker(), storage.parent / "elsewhere.json")
    record.write_text("{damaged")
    assert not probe(storage, record).volume_missing


def test_probe_never_raises_from_the_volume_check(
    paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, record, _ = paths
    write_marker(storage, marker(), record)

    def boom(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(st, "volume_problem", boom)
    monkeypatch.setattr(st, "_stale", boom)
    obs = probe(storage, record)
    assert obs.probe_ok and obs.marker is MarkerState.OK and not obs.volume_missing and not obs.identity_stale


def test_volume_problem_costs_nothing_while_the_marker_is_in_place(
    paths: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual case (the record's own marker on the volume) makes no system call at all."""
    storage, record, _ = paths
    written = write_marker(storage, marker(), record)

    def no_call(*_args: object) -> None:
        raise AssertionError("a system call in the usual case")

    monkeypatch.setattr(st, "_nearest", no_call)
    monkeypatch.setattr(st, "_mount_of", no_call)
    assert volume_problem(storage, written, written) is None
    assert volume_problem(storage, None, None) is None
    assert volume_problem(storage, marker(), None) is None  # identity unknown: as before


def test_mount_required_is_tri_state(tmp_path: Path) -> None:
    record = tmp_path / "marker.json"
    assert mount_required(record, None) is False  # no record: not required (as before)
    assert mount_required(None, None) is False
    write_record(record, None)
    assert mount_required(record, None) is False  # an older agent's record: not required (as before)
    write_record(record, here(tmp_path, mount_point=True))
    assert mount_required(record, None) is True
    assert mount_required(record, False) is False  # an explicit setting wins
    write_record(record, here(tmp_path, mount_point=False))
    assert mount_required(record, None) is False
    assert mount_required(record, True) is True
    record.write_text("{damaged")
    assert mount_required(record, None) is True  # in doubt, required


def test_quarantine_requires_the_mount_the_record_names(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    populate(storage)
    write_record(record, here(storage, mount_point=True))
    _refused(paths, "the marker record says it was one", require_mount=None, record=record)
    _refused(paths, "local.require_mount is set", require_mount=True, record=record)


def test_quarantine_refuses_a_storage_path_off_its_volume(paths: tuple[Path, Path, Path]) -> None:
    storage, record, root = paths
    populate(storage)
    write_record(record, here(storage, dev="4095:4095"))
    _refused(paths, "volume missing: .* is on another filesystem", require_mount=None, record=record)
    write_record(record, here(storage))  # the marked filesystem: allowed
    qdir = quarantine(storage, storage, root, "a", require_mount=None, record=record, now=NOW)
    assert os.listdir(storage) == [] and (qdir / "kms.db").is_file()


def test_forget_volume_drops_only_the_identity(paths: tuple[Path, Path, Path]) -> None:
    """The operator's "replaced on purpose": the node is then judged as before (an empty path is lost state)."""
    storage, record, _ = paths
    kept = write_record(record, here(storage, dev="4095:4095"))
    assert probe(storage, record).volume_missing
    assert forget_volume(record) is True
    found = read_marker(record)
    assert found is not None and found.volume is None and found.same_mark(kept)
    obs = probe(storage, record)
    assert not obs.volume_missing and obs.empty and obs.marker is MarkerState.MISSING
    assert forget_volume(record) is False and forget_volume(storage / "none.json") is False


# ---- real mounts (root): the storage path a bind of a tmpfs "volume", unmounted as at a boot without it ----


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(storage, the volume's own mount, record): a tmpfs mounted at tmp_path/vol and bound onto the storage path
    (a bind, not a move, so that it works whatever the propagation of the parent mount)."""
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    vol, storage = tmp_path / "vol", tmp_path / "storage"
    vol.mkdir()
    storage.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "kmagent-test-vol", str(vol)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        subprocess.run(["mount", "--bind", str(vol), str(storage)], check=True, capture_output=True)
        yield storage, vol, tmp_path / "state" / "marker.json"
    finally:
        for path in (storage, vol):
            while os.path.ismount(path):
                if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
                    break


def test_real_unmounted_volume_is_missing_and_its_return_is_not(volume: tuple[Path, Path, Path]) -> None:
    storage, vol, record = volume
    populate(storage)
    written = write_marker(storage, marker(), record)
    assert written.volume is not None and written.volume.mount_point and written.volume.fstype == "tmpfs"
    assert written.volume.dev == dev_of(vol) != dev_of(storage.parent)
    assert not probe(storage, record).volume_missing
    assert mount_required(record, None) is True

    subprocess.run(["umount", str(storage)], check=True, capture_output=True)  # "booted without the volume"
    obs = probe(storage, record)
    assert obs.volume_missing and obs.empty and obs.marker is MarkerState.MISSING
    assert obs.error is not None and "was a mount point of tmpfs kmagent-test-vol (dev " in obs.error
    assert "is a plain directory now" in obs.error
    assert (vol / "kms.db").is_file()  # the state is still on the volume

    subprocess.run(["mount", "--bind", str(vol), str(storage)], check=True, capture_output=True)
    obs = probe(storage, record)
    assert (
        not obs.volume_missing and obs.marker is MarkerState.OK and not obs.empty and not obs.identity_stale
    )


def test_real_new_volume_over_a_marked_directory_is_missing(
    tmp_path: Path, volume: tuple[Path, Path, Path]
) -> None:
    """Marked on a directory of the root filesystem; an empty volume mounted over it later: another filesystem."""
    storage, _, record = volume
    subprocess.run(["umount", str(storage)], check=True, capture_output=True)
    write_marker(storage, marker(), record)
    (storage / MARKER_NAME).rename(tmp_path / "hidden-marker")  # what a mount over it would hide
    subprocess.run(
        ["mount", "-t", "tmpfs", "kmagent-test-new", str(storage)], check=True, capture_output=True
    )
    obs = probe(storage, record)
    assert obs.volume_missing and obs.empty
    assert "is on another filesystem than when marked" in (obs.error or "") and "now on tmpfs" in (
        obs.error or ""
    )


# ------------------------------------------------------------------------------------------ the unmarked note


def test_the_unmarked_note_round_trips_and_is_private(tmp_path: Path) -> None:
    assert st.read_unmarked(tmp_path) is None
    path = st.note_unmarked(tmp_path, "rejoin-node2-3-1", NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert st.read_unmarked(tmp_path) == "rejoin-node2-3-1"
    assert st.clear_unmarked(tmp_path) and st.read_unmarked(tmp_path) is None
    assert not st.clear_unmarked(tmp_path)  # idempotent


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"format": 2, "action_id": "x"}', '{"format": 1, "action_id": "../x"}', "null"],
)
def test_a_damaged_unmarked_note_counts_as_present(tmp_path: Path, content: str) -> None:
    """It only ever keeps a joined node from being called STATE_LOST: in doubt, it is there."""
    (tmp_path / st.UNMARKED_NAME).write_text(content)
    assert st.read_unmarked(tmp_path) == "unreadable"


def test_an_unmarked_note_needs_a_valid_action_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="action id"):
        st.note_unmarked(tmp_path, "../../etc", NOW)
    assert not (tmp_path / st.UNMARKED_NAME).exists()


def test_the_longest_action_id_the_planner_makes_is_accepted_everywhere(
    paths: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Agent names are up to 64 characters; an id built from one (and a large term) must pass every check that
    reads ids back, or a REJOIN would quarantine and remove a node and then fail to start it."""
    from agent import preflight
    from agent.core.planner import action_id

    storage, _, root = paths
    ident = action_id("RESTORE", "n" * 64, 2**63, 4.0e12)
    populate(storage)
    qdir = quarantine(storage, storage, root, ident, now=NOW)
    assert qdir.name.endswith(ident) and st._find_existing(root, ident) == qdir
    state = tmp_path / "agent-state"
    state.mkdir()
    st.note_unmarked(state, ident, NOW)
    assert st.read_unmarked(state) == ident
    preflight.authorise_fresh_start(state, ident, time.time() + 60)
    fresh = preflight.read_fresh_start(state)
    assert fresh is not None and fresh.action_id == ident
