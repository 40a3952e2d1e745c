"""kmagent preflight: a wiped or foreign storage path never starts minkms while this host belongs to a cluster."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from agent import cli, preflight
from agent.config import Config, load_config
from agent.io.storage import MARKER_NAME, Marker, write_marker
from agent.preflight import Facts, FreshStart, Verdict, authorise_fresh_start, decide, revoke_fresh_start

CLUSTER, HOST = "prod-kms", "10.0.0.1:7373"
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
OURS = Marker(CLUSTER, HOST, 2, NOW - 3600)
RECORD = "/var/lib/kmagent/marker.json"
ROOT = Path(__file__).resolve().parents[2]


def facts(**changes: object) -> Facts:
    """A host that belongs to the cluster, with its state and marker in place; tests change one thing."""
    base = Facts(
        cluster=CLUSTER,
        host=HOST,
        storage="/mnt/minio-kms",
        empty=False,
        marker=OURS,
        record_path=RECORD,
        record=OURS,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def refused(verdict: Verdict, *needles: str) -> str:
    assert not verdict.ok, verdict.reason
    assert verdict.reason.startswith("refusing to start minkms: ")
    for needle in needles:
        assert needle in verdict.reason, f"{needle!r} not in: {verdict.reason}"
    return verdict.reason


# ------------------------------------------------------------------------------------------- the decision


def test_marker_ok_allows() -> None:
    verdict = decide(facts(), NOW)
    assert verdict.ok and "carries this host's identity marker" in verdict.reason


def test_marker_ok_without_a_record_allows() -> None:
    assert decide(facts(record=None), NOW).ok


@pytest.mark.parametrize("empty", [True, False])
def test_first_install_allows(empty: bool) -> None:
    verdict = decide(facts(empty=empty, marker=None, record=None), NOW)
    assert verdict.ok, verdict.reason
    assert "first start, nothing to protect yet" in verdict.reason and RECORD in verdict.reason


def test_empty_storage_with_a_record_is_refused_with_what_why_and_what_to_do() -> None:
    reason = refused(
        decide(facts(empty=True, marker=None), NOW),
        "storage path /mnt/minio-kms is empty",  # what was found
        f"the agent's record {RECORD} says this host holds the state of node 2 of cluster 'prod-kms'",
        "fresh single-node cluster",  # why it is dangerous
        "read empty answers",
        "kmagent status",  # what to do
        "rejoin this node",
        f"remove {RECORD}",
    )
    assert "\n" not in reason  # one paragraph


def test_state_without_a_marker_while_a_record_exists_is_refused() -> None:
    refused(
        decide(facts(marker=None), NOW),
        "holds state without this host's identity marker",
        "cannot tie to this host",
        f"remove {RECORD}",
    )


@pytest.mark.parametrize("record", [OURS, None], ids=["record", "no-record"])
def test_only_our_marker_left_in_an_empty_path_is_refused(record: Marker | None) -> None:
    """A marker proves membership as well as the record does; alone in the path it guards nothing."""
    reason = refused(
        decide(facts(empty=True, record=record), NOW), "empty but for this host's identity marker"
    )
    assert f"/mnt/minio-kms/{MARKER_NAME}" in reason


@pytest.mark.parametrize(
    "other",
    [Marker("other-cluster", HOST, 0, NOW), Marker(CLUSTER, "10.0.0.9:7373", 3, NOW)],
    ids=["other-cluster", "other-host"],
)
@pytest.mark.parametrize("record", [OURS, None], ids=["record", "no-record"])
def test_another_identity_is_refused(other: Marker, record: Marker | None) -> None:
    refused(
        decide(facts(marker=other, record=record), NOW),
        f"carries the identity marker of node {other.node_id} of cluster {other.cluster!r} (host {other.host!r})",
        f"not the identity of this host, cluster {CLUSTER!r} (host {HOST!r})",
        "belongs to another host or cluster",
    )


def test_an_unverifiable_marker_is_refused() -> None:
    refused(
        decide(facts(marker=None, marker_error="malformed marker /x: not valid JSON"), NOW),
        "an identity marker that cannot be verified (malformed marker /x: not valid JSON)",
    )


@pytest.mark.parametrize(
    "error",
    ["storage path /mnt/minio-kms does not exist", "cannot list storage path /mnt/minio-kms: Permission"],
)
def test_a_missing_or_unreadable_storage_path_is_refused_even_on_a_first_install(error: str) -> None:
    refused(decide(facts(storage_error=error, record=None, marker=None), NOW), error, "local.storage_path")


def test_a_damaged_record_still_proves_membership() -> None:
    refused(
        decide(facts(empty=True, marker=None, record=None, record_error="malformed marker x: not JSON"), NOW),
        "cannot be read (malformed marker x: not JSON), but its presence says this host belongs to a cluster",
    )


# ---- the fresh-start authorisation


def auth(until: float) -> FreshStart:
    return FreshStart("rejoin-7", until, NOW - 10)


@pytest.mark.parametrize("empty", [True, False], ids=["empty", "fresh-state-without-marker"])
def test_a_valid_authorisation_allows_a_fresh_start(empty: bool) -> None:
    verdict = decide(facts(empty=empty, marker=None, fresh_start=auth(NOW + 60)), NOW)
    assert verdict.ok, verdict.reason
    assert "authorised by action rejoin-7 until 2023-11-14T22:14:20Z" in verdict.reason


@pytest.mark.parametrize("until", [NOW, NOW - 1], ids=["at-expiry", "after"])
def test_an_expired_authorisation_is_refused(until: float) -> None:
    refused(
        decide(facts(empty=True, marker=None, fresh_start=auth(until)), NOW),
        "The fresh-start authorisation of action rejoin-7 expired at",
        "fresh single-node cluster",
    )


def test_a_damaged_authorisation_is_refused() -> None:
    refused(
        decide(facts(empty=True, marker=None, fresh_start_error="/s/fresh-start.json is damaged: x"), NOW),
        "The fresh-start authorisation is not trusted: /s/fresh-start.json is damaged: x",
    )


def test_a_damaged_authorisation_does_not_refuse_what_needs_none() -> None:
    assert decide(facts(fresh_start_error="damaged"), NOW).ok
    first = decide(facts(empty=True, marker=None, record=None, fresh_start_error="damaged"), NOW)
    assert first.ok and "(ignored: damaged)" in first.reason


def test_an_authorisation_never_covers_another_identity_or_a_bad_path() -> None:
    valid = auth(NOW + 60)
    refused(decide(facts(marker=Marker("other", HOST, 0, NOW), fresh_start=valid), NOW), "other")
    refused(decide(facts(marker=None, marker_error="unreadable", fresh_start=valid), NOW), "unreadable")
    refused(decide(facts(storage_error="storage path /x does not exist", fresh_start=valid), NOW), "/x")


# ---- the volume (DESIGN §6 rail 11): an unmounted volume's empty mount point never starts minkms


VOLUME_GONE = (
    "volume missing: storage path /mnt/minio-kms was a mount point of xfs /dev/sdb1 (dev 8:17) when marked, "
    "and is a plain directory now, on ext4 /dev/vda (dev 254:0): the volume is probably not mounted"
)


@pytest.mark.parametrize(
    "changes",
    [
        {"empty": True, "marker": None},
        {"empty": True, "marker": None, "fresh_start": FreshStart("rejoin-7", NOW + 60, NOW - 10)},
        {"empty": False, "marker": OURS, "fresh_start": FreshStart("restore-1", NOW + 60, NOW - 10)},
        {"empty": True, "marker": None, "record": None, "record_error": "damaged"},
    ],
    ids=["empty", "authorised", "state-and-authorised", "damaged-record"],
)
def test_a_missing_volume_is_refused_whatever_else(changes: dict[str, object]) -> None:
    """Before every other rule, and whatever a REJOIN or RESTORE authorised: a fresh start there would mark the
    root filesystem as this node's volume, while its state sits on the unmounted one."""
    reason = refused(
        decide(facts(volume_missing=VOLUME_GONE, **changes), NOW),
        VOLUME_GONE,  # what was found, naming both filesystems
        "fresh cluster on the wrong filesystem",  # why
        "Mount the volume",  # what to do
        "findmnt /mnt/minio-kms",
        f"`kmagent forget-volume` (it drops the identity recorded in {RECORD})",  # if replaced on purpose
    )
    assert "\n" not in reason


markers = hs.sampled_from([None, OURS, Marker("other", HOST, 0, NOW), Marker(CLUSTER, "h:1", 1, NOW)])


@given(
    empty=hs.booleans(),
    marker=markers,
    marker_error=hs.sampled_from([None, "unreadable"]),
    record=markers,
    record_error=hs.sampled_from([None, "damaged"]),
    until=hs.sampled_from([None, NOW - 5, NOW, NOW + 5]),
    fresh_start_error=hs.sampled_from([None, "damaged"]),
    storage_error=hs.sampled_from([None, "gone"]),
    volume_missing=hs.sampled_from([None, "volume missing: not a mount point now"]),
)
def test_never_allows_an_empty_path_of_a_member_without_a_valid_authorisation(
    empty: bool,
    marker: Marker | None,
    marker_error: str | None,
    record: Marker | None,
    record_error: str | None,
    until: float | None,
    fresh_start_error: str | None,
    storage_error: str | None,
    volume_missing: str | None,
) -> None:
    f = facts(
        empty=empty,
        marker=None if marker_error else marker,
        marker_error=marker_error,
        record=None if record_error else record,
        record_error=record_error,
        fresh_start=None if until is None else auth(until),
        fresh_start_error=fresh_start_error,
        storage_error=storage_error,
        volume_missing=volume_missing,
    )
    verdict = decide(f, NOW)
    member = f.has_record or f.marker is not None
    authorised = until is not None and until > NOW and fresh_start_error is None
    foreign = marker_error is not None or (f.marker is not None and f.marker.host != HOST)
    foreign = foreign or (f.marker is not None and f.marker.cluster != CLUSTER)
    if (
        volume_missing
        or storage_error
        or foreign
        or (member and (empty or f.marker is None) and not authorised)
    ):
        assert not verdict.ok, verdict.reason
    else:
        assert verdict.ok, verdict.reason


# -------------------------------------------------------------------------------------- files and config


def config_text(storage: Path, state: Path, role: str = "member") -> str:
    local = f'[local]\nstorage_path = "{storage}"\n\n' if role == "member" else ""
    minkms = '[minkms]\napi_key_file = "/nonexistent/minkms.key"\n\n' if role == "member" else ""
    host = f'minkms_host = "{HOST}"\n' if role == "member" else ""
    return (
        f'cluster = "{CLUSTER}"\nname = "km1"\n\n'
        f'[[agents]]\nname = "km1"\naddress = "10.0.0.1:7443"\nrole = "{role}"\n{host}\n'
        '[[agents]]\nname = "km2"\naddress = "10.0.0.2:7443"\nminkms_host = "10.0.0.2:7373"\n\n'
        '[[agents]]\nname = "km3"\naddress = "10.0.0.3:7443"\nminkms_host = "10.0.0.3:7373"\n\n'
        f"{local}{minkms}"
        '[tls]\nca = "/nonexistent/ca.crt"\ncert = "/nonexistent/a.crt"\nkey = "/nonexistent/a.key"\n\n'
        f'[state]\ndir = "{state}"\n'
    )


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(config path, storage path, state dir) of a member whose files the test arranges."""
    storage, state = tmp_path / "data", tmp_path / "state"
    storage.mkdir()
    path = tmp_path / "kmagent.toml"
    path.write_text(config_text(storage, state))
    return path, storage, state


def cfg_of(path: Path) -> Config:
    return load_config(path, check_files=False)


def join_cluster(storage: Path, state: Path) -> None:
    """What the daemon does once its node is HEALTHY: state present, marker and record written."""
    (storage / "kms.db").write_bytes(b"state")
    write_marker(storage, OURS, state / preflight.RECORD_NAME)


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def test_check_follows_a_host_through_install_join_and_disk_loss(host: tuple[Path, Path, Path]) -> None:
    path, storage, state = host
    cfg = cfg_of(path)
    assert preflight.check(cfg, NOW).ok  # first install: nothing recorded yet
    join_cluster(storage, state)
    assert preflight.check(cfg, NOW).ok
    for entry in storage.iterdir():  # the disk is replaced
        entry.unlink()
    before = tree(storage.parent)
    refused(preflight.check(cfg, NOW), f"storage path {storage} is empty", str(state / "marker.json"))
    assert tree(storage.parent) == before  # the preflight writes nothing (no probe files, no marker)

    authorise_fresh_start(state, "rejoin-1", NOW + 30)
    assert preflight.check(cfg, NOW).ok
    refused(preflight.check(cfg, NOW + 30), "expired at 2023-11-14T22:13:50Z")
    assert revoke_fresh_start(state) is True
    refused(preflight.check(cfg, NOW), "is empty")


def record_volume(state: Path, storage: Path, **changes: object) -> None:
    """Rewrite the record as if the node had been marked on another volume (`changes` to its identity)."""
    path = state / preflight.RECORD_NAME
    data = json.loads(path.read_text())
    data["volume"] = {**data["volume"], **changes}
    path.write_text(json.dumps(data))


def test_check_refuses_an_empty_mount_point_even_when_authorised(host: tuple[Path, Path, Path]) -> None:
    """The record says the storage path was a mount point; now it is a plain, empty directory."""
    path, storage, state = host
    join_cluster(storage, state)
    record_volume(state, storage, mount_point=True)
    for entry in storage.iterdir():  # the volume is not mounted: what is left is the directory under it
        entry.unlink()
    refused(preflight.check(cfg_of(path), NOW), f"volume missing: storage path {storage} was a mount point")
    authorise_fresh_start(state, "rejoin-1", NOW + 30)
    refused(preflight.check(cfg_of(path), NOW), "volume missing", "Mount the volume")
    storage.rmdir()  # the mount point directory itself gone: still the volume's absence, said as such
    refused(preflight.check(cfg_of(path), NOW), "volume missing", "is absent now")


def test_check_refuses_another_filesystem_than_recorded(host: tuple[Path, Path, Path]) -> None:
    path, storage, state = host
    join_cluster(storage, state)
    record_volume(state, storage, dev="4095:4095", fstype="xfs", source="/dev/sdz1")
    assert preflight.check(cfg_of(path), NOW).ok  # the record's own marker is there: it is the marked volume
    (storage / MARKER_NAME).unlink()
    refused(
        preflight.check(cfg_of(path), NOW),
        f"volume missing: storage path {storage} is on another filesystem than when marked: "
        "marked on xfs /dev/sdz1 (dev 4095:4095), now on",
    )


def test_check_with_an_old_record_without_identity_behaves_as_before(host: tuple[Path, Path, Path]) -> None:
    path, storage, state = host
    join_cluster(storage, state)
    record = state / preflight.RECORD_NAME
    data = json.loads(record.read_text())
    del data["volume"]
    record.write_text(json.dumps(data))
    for entry in storage.iterdir():
        entry.unlink()
    reason = refused(preflight.check(cfg_of(path), NOW), "is empty")
    assert "volume" not in reason
    authorise_fresh_start(state, "rejoin-1", NOW + 30)
    assert preflight.check(cfg_of(path), NOW).ok


def test_check_on_a_real_unmounted_volume(tmp_path: Path) -> None:
    """A tmpfs bound onto the storage path (root only): marked there, then unmounted as at a boot without it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    vol, storage, state = tmp_path / "vol", tmp_path / "data", tmp_path / "state"
    vol.mkdir()
    storage.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "kmagent-pf", str(vol)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["mount", "--bind", str(vol), str(storage)], check=True, capture_output=True)
        path = tmp_path / "kmagent.toml"
        path.write_text(config_text(storage, state))
        join_cluster(storage, state)
        assert preflight.check(cfg_of(path), NOW).ok
        subprocess.run(["umount", str(storage)], check=True, capture_output=True)
        authorise_fresh_start(state, "rejoin-1", NOW + 30)
        refused(
            preflight.check(cfg_of(path), NOW), "was a mount point of tmpfs kmagent-pf", "plain directory"
        )
        subprocess.run(["mount", "--bind", str(vol), str(storage)], check=True, capture_output=True)
        assert preflight.check(cfg_of(path), NOW).ok
    finally:
        for mounted in (storage, vol):
            while os.path.ismount(mounted):
                if subprocess.run(["umount", str(mounted)], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", str(mounted)], capture_output=True)
                    break


def test_check_refuses_a_volume_of_another_cluster(host: tuple[Path, Path, Path]) -> None:
    path, storage, state = host
    join_cluster(storage, state)
    (storage / MARKER_NAME).write_text(
        json.dumps({"cluster": "other", "host": HOST, "node_id": 0, "written": 1})
    )
    refused(preflight.check(cfg_of(path), NOW), "the identity marker of node 0 of cluster 'other'")
    (storage / MARKER_NAME).write_text("{not json")
    refused(
        preflight.check(cfg_of(path), NOW), "an identity marker that cannot be verified (malformed marker"
    )


def test_check_refuses_a_missing_or_non_directory_storage_path(host: tuple[Path, Path, Path]) -> None:
    path, storage, _state = host
    storage.rmdir()
    refused(preflight.check(cfg_of(path), NOW), f"storage path {storage} does not exist")
    storage.write_text("not a directory")
    refused(preflight.check(cfg_of(path), NOW), f"storage path {storage} is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 directory anyway")
def test_check_refuses_an_unreadable_storage_path(host: tuple[Path, Path, Path]) -> None:
    path, storage, _state = host
    storage.chmod(0)
    try:
        refused(preflight.check(cfg_of(path), NOW), f"cannot list storage path {storage}: Permission denied")
    finally:
        storage.chmod(0o755)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_text("{not json"),
        lambda p: p.write_text("[]"),
        lambda p: p.write_text('{"format": 1, "cluster": 3, "host": "h", "node_id": 1, "written": 1}'),
        lambda p: p.mkdir(),
    ],
    ids=["not-json", "not-an-object", "bad-field", "a-directory"],
)
def test_a_damaged_record_refuses_an_empty_path(host: tuple[Path, Path, Path], damage: object) -> None:
    path, _storage, state = host
    state.mkdir()
    damage(state / preflight.RECORD_NAME)  # type: ignore[operator]
    refused(preflight.check(cfg_of(path), NOW), "its presence says this host belongs to a cluster")


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"format": 2, "action_id": "a", "until": NOW + 60, "written": NOW}),
        json.dumps({"format": 1, "action_id": "../x", "until": NOW + 60, "written": NOW}),
        json.dumps({"format": 1, "action_id": "a", "until": "tomorrow", "written": NOW}),
        json.dumps({"format": 1, "action_id": "a", "until": True, "written": NOW}),
        json.dumps({"format": 1, "action_id": "a", "until": NOW + 60}),
        '{"format": 1, "action_id": "a", "until": Infinity, "written": 1}',
        "[" * 100_000,
        b'{"format": 1, "action_id": "\xff"}',
    ],
    ids=[
        "not-json",
        "list",
        "format",
        "action-id",
        "until-str",
        "until-bool",
        "no-written",
        "until-inf",
        "deep",
        "not-utf8",
    ],
)
def test_a_damaged_authorisation_file_is_refused(host: tuple[Path, Path, Path], content: str | bytes) -> None:
    path, storage, state = host
    join_cluster(storage, state)
    for entry in storage.iterdir():
        entry.unlink()
    target = preflight.fresh_start_path(state)
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(
        preflight.check(cfg_of(path), NOW), "The fresh-start authorisation is not trusted", "fresh-start.json"
    )


def test_authorise_and_revoke(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    written = authorise_fresh_start(state, "restore-2024.01_x", NOW + 60)
    assert written == state / "fresh-start.json"
    assert written.stat().st_mode & 0o777 == 0o600 and state.stat().st_mode & 0o777 == 0o700
    got = preflight.read_fresh_start(state)
    assert got is not None and (got.action_id, got.until) == ("restore-2024.01_x", NOW + 60)
    assert revoke_fresh_start(state) is True
    assert preflight.read_fresh_start(state) is None
    assert revoke_fresh_start(state) is False  # idempotent


@pytest.mark.parametrize(
    ("action_id", "until"),
    [
        ("", NOW),
        ("a/b", NOW),
        ("x" * 129, NOW),
        (7, NOW),
        ("ok", float("nan")),
        ("ok", float("inf")),
        ("ok", True),
    ],
)
def test_authorise_refuses_bad_input(tmp_path: Path, action_id: object, until: object) -> None:
    with pytest.raises(ValueError, match=r"action id|until_wall"):
        authorise_fresh_start(tmp_path, action_id, until)  # type: ignore[arg-type]
    assert not (tmp_path / "fresh-start.json").exists()


def test_a_witness_has_nothing_to_guard(tmp_path: Path) -> None:
    path = tmp_path / "kmagent.toml"
    path.write_text(config_text(tmp_path / "none", tmp_path / "state", role="witness"))
    verdict = preflight.check(cfg_of(path), NOW)
    assert verdict.ok and "witness" in verdict.reason


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_exit_codes_and_messages(
    host: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, storage, state = host
    assert cli.main(["--config", str(path), "preflight"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("kmagent preflight: ok: ") and out.err == ""

    join_cluster(storage, state)
    (storage / "kms.db").unlink()
    assert cli.main(["preflight", "--config", str(path)]) == 1  # either place for --config
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("kmagent preflight: refusing to start minkms: ")
    assert out.err.count("\n") == 1  # one paragraph

    bad = path.with_name("bad.toml")
    bad.write_text('cluster = "c"\nbogus = 1\n')
    assert cli.main(["preflight", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and "bogus" in err
    assert cli.main(["preflight", "--config", str(path.with_name("missing.toml"))]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["preflight", "--bogus"])
    assert exc.value.code == 2


def test_cli_uses_kmagent_config_from_the_environment(
    host: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _storage, _state = host
    monkeypatch.setenv("KMAGENT_CONFIG", str(path))
    assert cli.main(["preflight"]) == 0
    assert "first start" in capsys.readouterr().out


def test_unconfigured_host_allows_only_without_config_and_without_record(tmp_path: Path) -> None:
    """The package installs the drop-in before any config exists: minkms must still start then."""
    config, state = tmp_path / "kmagent.toml", tmp_path / "state"
    verdict = preflight.unconfigured(config, state)
    assert verdict is not None and verdict.ok and "not configured" in verdict.reason
    state.mkdir()
    (state / preflight.RECORD_NAME).write_text("{}")  # the host joined a cluster, then lost its config
    assert preflight.unconfigured(config, state) is None
    (state / preflight.RECORD_NAME).unlink()
    config.write_text("")  # a config exists (even a broken one): the caller loads and judges it
    assert preflight.unconfigured(config, state) is None


def test_cli_default_config_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The drop-in's plain `kmagent preflight`: allowed when unconfigured, refused once the host has a record."""
    state = tmp_path / "state"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "kmagent.toml"))
    monkeypatch.setattr(preflight, "DEFAULT_STATE_DIR", state)
    monkeypatch.delenv("KMAGENT_CONFIG", raising=False)
    assert cli.main(["preflight"]) == 0
    assert "not configured" in capsys.readouterr().out
    state.mkdir()
    (state / preflight.RECORD_NAME).write_text("{}")
    assert cli.main(["preflight"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_witness_notes_and_allows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "kmagent.toml"
    path.write_text(config_text(tmp_path / "none", tmp_path / "state", role="witness"))
    assert cli.main(["--config", str(path), "preflight"]) == 0
    assert "witness: there is no local minkms to guard" in capsys.readouterr().out


def test_cli_preflight_runs_without_the_daemon_and_without_aiohttp(host: tuple[Path, Path, Path]) -> None:
    """It runs before every start of minkms: no daemon, and none of the daemon's heavy imports."""
    path, _storage, _state = host
    code = (
        "import sys; from agent.cli import main; rc = main(['--config', sys.argv[1], 'preflight']); "
        "print('aiohttp' in sys.modules, 'agent.io.control' in sys.modules, rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "KMAGENT_SOCKET": "/nonexistent/control.sock"},
    )
    assert proc.stdout.strip().splitlines()[-1] == "False False 0", proc.stdout + proc.stderr


def test_cli_help_lists_preflight(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "preflight" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["preflight", "--help"])
    assert "exit codes: 0 minkms may start, 1 refused" in capsys.readouterr().out
