"""agent.core.backups: ids, entry checks, ordering, retention and the choice of the restore backup."""

from __future__ import annotations

import pytest

from agent.core.backups import (
    REPORTED,
    BackupInfo,
    backup_id,
    check_id,
    choose,
    holders,
    newest_first,
    to_drop,
)

SHA = "ab" * 32


def info(
    id_: str = "20260101T000000Z-km1", commit: int = 5, created: float = 1767225600.0, sha: str = SHA
) -> BackupInfo:
    return BackupInfo(id_, created, commit, 100, sha, "km1")


def test_backup_id_is_utc_time_and_source() -> None:
    assert backup_id(1767225600.0, "km1") == "20260101T000000Z-km1"
    assert backup_id(1767225600.9, "km-2.a_b") == "20260101T000000Z-km-2.a_b"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../x",
        "20260101T000000Z-../../etc",
        "20260101T000000Z-a/b",
        "20260101T000000Z-",
        "2026-01-01-km1",
        "20260101T000000Z-km1\n",
        "20260101T000000Z-.hidden",
        "20260101T000000Z-" + "a" * 65,
    ],
)
def test_check_id_refuses_anything_that_could_name_another_file(bad: str) -> None:
    with pytest.raises(ValueError, match="not a backup id"):
        check_id(bad)
    assert info(bad).problems()


@pytest.mark.parametrize("source", ["", "../x", "a/b", ".hidden", "x" * 65, "km1\n"])
def test_backup_id_refuses_a_source_that_is_no_agent_name(source: str) -> None:
    with pytest.raises(ValueError):
        backup_id(1767225600.0, source)


def test_problems_names_each_bad_field() -> None:
    assert info().problems() == []
    bad = BackupInfo("x", 0.0, -1, 0, "AB" * 32, "km1")
    text = " ".join(bad.problems())
    for word in ("backup id", "sha256", "size", "commit", "created"):
        assert word in text


def test_newest_first_orders_by_commit_then_time_then_id() -> None:
    a = info("20260101T000000Z-km1", commit=5, created=10.0)
    b = info("20260101T000001Z-km1", commit=7, created=5.0)  # less recent but holds more
    c = info("20260101T000002Z-km2", commit=5, created=20.0)
    d = info("20260101T000003Z-km3", commit=5, created=20.0)
    assert newest_first([a, b, c, d]) == [b, d, c, a]


def test_to_drop_keeps_the_freshest_and_never_drops_the_newest() -> None:
    entries = [info(f"2026010{i}T000000Z-km1", commit=i) for i in range(1, 6)]
    assert [b.commit for b in to_drop(entries, 2)] == [3, 2, 1]
    assert [b.commit for b in to_drop(entries, 0)] == [4, 3, 2, 1]  # keep < 1 still keeps the newest
    assert to_drop(entries, 10) == []


def test_holders_lists_only_agents_holding_the_id() -> None:
    x, y = info("20260101T000000Z-km1"), info("20260102T000000Z-km1", commit=9)
    assert holders({"km2": [x], "km1": [x, y], "km3": []}, x.id) == ["km1", "km2"]
    assert holders({"km1": [x]}, y.id) == []


def test_choose_takes_the_freshest_and_refuses_an_older_request() -> None:
    old, new = info("20260101T000000Z-km1", commit=5), info("20260102T000000Z-km1", commit=9)
    got = choose({"km1": [old, new], "km2": [new], "km3": [old]})
    assert got.backup == new and got.holders == ("km1", "km2") and got.reason == ""
    refused = choose({"km1": [old, new]}, requested=old.id)
    assert refused.backup is None and "older than" in refused.reason
    assert choose({"km1": [old, new]}, requested=new.id).backup == new
    assert "no agent holds an intact copy" in choose({"km1": [new]}, requested="20250101T000000Z-km9").reason
    assert choose({}).backup is None


def test_choose_skips_an_id_whose_copies_disagree() -> None:
    old = info("20260101T000000Z-km1", commit=5)
    new = info("20260102T000000Z-km1", commit=9)
    forged = info("20260102T000000Z-km1", commit=9, sha="cd" * 32)
    got = choose({"km1": [old, new], "km2": [forged]})
    assert got.backup == old


def test_reported_is_a_small_positive_bound() -> None:
    assert 1 <= REPORTED <= 64
