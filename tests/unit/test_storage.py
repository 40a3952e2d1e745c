"""Storage probes, the identity marker and quarantine: the storage path is sacred (DESIGN §6 rail 4)."""

from __future__ import annotations

import errno
import json
import os
import shutil
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
    probe_storage,
    prune_quarantine,
    quarantine,
    read_marker,
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


# -------------------------------------------------------------------------------------------------- marker


def test_marker_roundtrip_writes_storage_and_record(paths: tuple[Path, Path, Path]) -> None:
    storage, record, _ = paths
    m = marker()
    write_marker(storage, m, record)
    assert read_marker(storage / MARKER_NAME) == m
    assert read_marker(record) == m
    assert read_marker(storage) == m  # a directory means the marker inside it
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
    _refused(paths, "not a mount point and require_mount", require_mount=True)


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


@pytest.mark.parametrize("action_id", ["", "a/b", "../x", "x" * 65, "a b", "é", "a\n", "a\x00"])
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
