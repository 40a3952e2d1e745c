"""Pure parts of the emulator: command framing, durations, host names, state store."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from emulator import wire
from emulator.hsm import SoftHSM
from emulator.node import ClusterError, duration, normalize_host
from emulator.server import StartupError, parse_duration
from emulator.store import Entry, Store, StoreError


def test_frames_round_trip_and_several_commands_share_one_body() -> None:
    body = wire.encode([(wire.KEY_CREATE, {"name": "a"}), (wire.KEY_STATUS, {"name": "a"})])
    assert struct.unpack(">HI", body[:6])[0] == wire.KEY_CREATE
    assert wire.decode(body) == [(wire.KEY_CREATE, {"name": "a"}), (wire.KEY_STATUS, {"name": "a"})]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "empty request"),
        (b"\x00\x01\x00", "truncated command header"),
        (struct.pack(">HI", 1, 10) + b"{}", "truncated or oversized"),
        (struct.pack(">HI", 1, 3) + b"{x}", "malformed message"),
        (struct.pack(">HI", 1, 2) + b"[]", "not an object"),
        (struct.pack(">HI", 1, wire.MAX_FRAME + 1), "truncated or oversized"),
    ],
)
def test_malformed_frames_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(wire.FrameError, match=message):
        wire.decode(body)


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("1s", 1.0), ("1m30s", 90.0), ("0", 0.0)])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "fast", "10", "1s2", "ms"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(StartupError):
        parse_duration(text)


def test_protojson_durations() -> None:
    assert duration(1.5) == "1.500s" and duration(-1) == "0.000s"


@pytest.mark.parametrize(
    "text, host",
    [("https://a:7373", "a:7373"), ("a", "a:7373"), ("http://a:1/", "a:1"), ("[::1]", "[::1]:7373")],
)
def test_host_normalisation(text: str, host: str) -> None:
    assert normalize_host(text) == host


def test_empty_host_is_refused() -> None:
    with pytest.raises(ClusterError):
        normalize_host("https://")


def test_store_persists_state_and_log_across_reopen(tmp_path: Path) -> None:
    hsm = SoftHSM.generate()
    store = Store.open(tmp_path, hsm, "h:1")
    assert store.state.node_id == 0 and store.state.members == {0: "h:1"} and store.state.commit == 0
    op = {"op": "create_enclave", "name": "e", "created": "now"}
    store.apply([Entry(1, 1, op)])
    with pytest.raises(StoreError, match="does not follow"):
        store.apply([Entry(3, 1, op)])
    store.close()
    again = Store.open(tmp_path, hsm, "h:1")
    assert again.state.commit == 1 and again.state.last_term == 1
    assert [e for e, _ in again.enclaves()] == ["default", "e"]
    assert again.entries_after(0) == [Entry(1, 1, op)]
    assert again.term_at(1) == 1 and again.term_at(0) == 0
    again.close()


def test_store_membership_epochs_only_move_forward(tmp_path: Path) -> None:
    store = Store.open(tmp_path, SoftHSM.generate(), "h:1")
    assert store.adopt_membership({0: "h:1", 1: "h:2"}, 2, 2)
    assert not store.adopt_membership({0: "h:1"}, 2, 2)  # same epoch: not newer
    assert store.state.members == {0: "h:1", 1: "h:2"} and not store.state.removed
    assert store.adopt_membership({1: "h:2"}, 3, 2)
    assert store.state.removed  # a definition without this node means it was removed
    store.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kms.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError, match=r"kms\.db"):
        Store.open(tmp_path, SoftHSM.generate(), "h:1")


def test_storage_path_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(tmp_path / "missing", SoftHSM.generate(), "h:1")
