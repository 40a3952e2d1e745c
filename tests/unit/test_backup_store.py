"""agent.io.backups.BackupStore: copies checked on arrival and on verify, set aside when damaged, never half
written, and never named by a peer outside the backup directory."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.core import wire
from agent.core.backups import BackupInfo
from agent.io.backups import BackupStore, GzipCheck, check_file


def payload(seed: int = 1, size: int = 300_000) -> bytes:
    return gzip.compress(hashlib.sha256(str(seed).encode()).digest() * (size // 32))


def entry(
    data: bytes, id_: str = "20260101T000000Z-km1", commit: int = 5, created: float = 1767225600.0
) -> BackupInfo:
    return BackupInfo(id_, created, commit, len(data), hashlib.sha256(data).hexdigest(), "km1")


async def chunks(data: bytes, size: int = 7000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def receive(store: BackupStore, info: BackupInfo, data: bytes) -> None:
    asyncio.run(store.receive(info, chunks(data)))


def only_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def test_receive_stores_the_copy_and_its_entry_privately(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    data = payload()
    info = entry(data)
    receive(store, info, data)
    assert store.entries() == [info]
    assert store.path(info.id).read_bytes() == data
    assert only_files(tmp_path / "b") == [f"{info.id}.gz", f"{info.id}.json"]
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o700
    for name in only_files(tmp_path / "b"):
        assert stat.S_IMODE(os.stat(tmp_path / "b" / name).st_mode) == 0o600
    assert BackupStore(tmp_path / "b").entries() == [info]  # survives a restart
    receive(store, info, data)  # the same copy again: nothing to do
    assert store.entries() == [info]


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda d: d[:-10], "bytes received"),  # truncated: fewer bytes than the entry says
        (lambda d: d + b"x", "more than"),
        (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum mismatch"),
    ],
)
def test_receive_refuses_bytes_that_are_not_the_entry_and_leaves_nothing(
    tmp_path: Path, mangle, error
) -> None:  # type: ignore[no-untyped-def]
    store = BackupStore(tmp_path / "b")
    data = payload()
    with pytest.raises(ValueError, match=error):
        receive(store, entry(data), mangle(data))
    assert store.entries() == [] and only_files(tmp_path / "b") == []
    assert store.incoming == set()


def test_receive_refuses_a_broken_gzip_even_with_a_matching_checksum(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    for bad in (payload()[:-20], b"not gzip at all" * 100):  # truncated stream; no gzip header
        with pytest.raises(ValueError, match="gzip"):
            receive(store, entry(bad), bad)
    assert only_files(tmp_path / "b") == []


def test_a_conflicting_entry_for_a_held_id_is_refused(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    data, other = payload(1), payload(2)
    receive(store, entry(data), data)
    with pytest.raises(ValueError, match="another entry"):
        receive(store, entry(other), other)
    assert store.path(entry(data).id).read_bytes() == data


def test_ids_are_checked_before_any_path_is_built(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    data = payload()
    evil = BackupInfo("../../etc/passwd", 1.0, 1, len(data), hashlib.sha256(data).hexdigest(), "km1")
    with pytest.raises(ValueError, match="backup id"):
        receive(store, evil, data)
    with pytest.raises(ValueError):
        store.verify("../outside")
    with pytest.raises(KeyError):
        store.path("20260101T000000Z-km9")
    assert not (tmp_path / "etc").exists() and only_files(tmp_path / "b") == []


def test_verify_sets_a_damaged_copy_aside_and_stops_listing_it(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    data = payload()
    info = entry(data)
    receive(store, info, data)
    assert store.verify(info.id) == (True, f"{info.id}: sha256 and gzip stream intact ({len(data)} bytes)")
    path = store.path(info.id)
    with open(path, "r+b") as f:  # flip bytes in the middle
        f.seek(len(data) // 2)
        f.write(bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8]))
    ok, detail = store.verify(info.id)
    assert not ok and "sha256" in detail and "differs" in detail and "corrupt" in detail
    assert store.entries() == []
    with pytest.raises(KeyError):
        store.path(info.id)
    kept = only_files(tmp_path / "b" / "corrupt")  # never deleted
    assert len(kept) == 2 and all(name.startswith(info.id) for name in kept)
    assert BackupStore(tmp_path / "b").entries() == []  # nor listed after a restart
    assert store.verify(info.id)[0] is False


def test_retention_keeps_the_freshest(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    infos = []
    for i in range(1, 5):
        data = payload(i)
        info = entry(data, f"2026010{i}T000000Z-km1", commit=i)
        receive(store, info, data)
        infos.append(info)
    dropped = store.apply_retention(2)
    assert {b.commit for b in dropped} == {1, 2}
    assert [b.commit for b in store.entries()] == [4, 3]
    assert only_files(tmp_path / "b") == sorted(f"{b.id}.{ext}" for b in infos[2:] for ext in ("gz", "json"))


def test_start_removes_debris_and_sets_aside_bad_entries(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    data = payload()
    good = entry(data)
    receive(store, good, data)
    d = tmp_path / "b"
    (d / "20260202T000000Z-km1.gz").write_bytes(data)  # a copy without entry: a crash before the commit
    (d / ".incoming-abc.gz").write_bytes(data[:50])  # an interrupted transfer
    (d / "20260303T000000Z-km1.json").write_bytes(wire.dumps(entry(data, "20260303T000000Z-km1")))  # no .gz
    (d / "20260404T000000Z-km1.json").write_text("{broken")
    named = entry(data, "20260505T000000Z-km1")
    (d / "20260606T000000Z-km1.json").write_bytes(wire.dumps(named))  # names another id than its file
    again = BackupStore(d)
    assert again.entries() == [good]
    assert only_files(d) == [f"{good.id}.gz", f"{good.id}.json"]
    assert len(only_files(d / "corrupt")) == 3


def test_add_file_checks_the_file_and_takes_it_in(tmp_path: Path) -> None:
    store = BackupStore(tmp_path / "b")
    data = payload()
    src = tmp_path / "b" / ".incoming-own.gz"
    src.write_bytes(data)
    info = entry(data)
    store.add_file(info, src)
    assert store.entries() == [info] and not src.exists()
    bad = tmp_path / "b" / ".incoming-bad.gz"
    bad.write_bytes(data[:-1])
    with pytest.raises(ValueError):
        store.add_file(entry(data, "20260102T000000Z-km1"), bad)
    assert not bad.exists() and len(store.entries()) == 1


def test_gzip_check_handles_members_and_bombs_in_bounded_steps(tmp_path: Path) -> None:
    check = GzipCheck()
    check.feed(gzip.compress(b"a") + gzip.compress(b"b"))  # concatenated members are one valid stream
    check.finish()
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB: inflated piecewise, never whole
    check = GzipCheck()
    check.feed(bomb)
    check.finish()
    with pytest.raises(ValueError, match="truncated"):
        GzipCheck().finish()
    path = tmp_path / "f.gz"
    path.write_bytes(bomb)
    info = BackupInfo("20260101T000000Z-km1", 1.0, 0, len(bomb), hashlib.sha256(bomb).hexdigest(), "km1")
    assert check_file(path, info) == ""
    assert "differs" in check_file(path, BackupInfo(info.id, 1.0, 0, len(bomb), "0" * 64, "km1"))
    json.dumps(wire.encode(info))
