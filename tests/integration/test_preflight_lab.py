"""The lab supervisor runs `kmagent preflight` before each start of a node: a wiped node stays down, not rogue."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.storage import MARKER_NAME
from agent.preflight import RECORD_NAME, authorise_fresh_start, revoke_fresh_start
from emulator.lab.lab import Lab, LabNode, wait_for
from emulator.lab.workload import create_keys, verify_keys


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True)
        yield lab
    finally:
        lab.down()


def state_dir(node: LabNode) -> Path:
    return Path(node.dir) / "agent" / "state"


def recorded(node: LabNode) -> bool:
    """The agent wrote its marker beside the state and its own record of it."""
    return (node.data / MARKER_NAME).is_file() and (state_dir(node) / RECORD_NAME).is_file()


def program(lab: Lab, node: LabNode) -> dict[str, Any]:
    status: dict[str, Any] = lab.programs()[node.name]
    return status


def test_a_wiped_node_is_refused_until_a_fresh_start_is_authorised(lab: Lab) -> None:
    n1, n2, n3 = lab.nodes()
    keys = create_keys(lab, 5)
    for node in (n1, n2, n3):
        wait_for(functools.partial(recorded, node), 60, f"{node.name}'s agent to record its identity")

    lab.fault(n3.name, "agent-stop")  # nobody is left on node3 to rejoin it (or to write a marker again)
    before = program(lab, n3)
    assert before["state"] == "active" and before["last_start_wall"] is not None
    lab.fault(n3.name, "disk-loss")

    # The supervisor tries to restart node3 (restart=always) and the preflight refuses, again and again.
    refused = wait_for(
        lambda: (
            (p := program(lab, n3))["n_starts"] >= before["n_starts"] + 2
            and "preflight failed with code 1" in (p["last_error"] or "")
            and p
        ),
        60,
        "the supervisor to report node3's start refused twice",
    )
    assert refused["state"] in ("failed", "activating")
    # The main process really never started again: no new start time, no exit of a new run.
    assert refused["last_start_wall"] == before["last_start_wall"]
    assert len(refused["history"]) == len(before["history"]) + 1  # only the exit of the killed process
    assert not lab.probe(n3, "live")
    assert list(n3.data.iterdir()) == []  # nothing started on it, nothing wrote to it
    log = (Path(n3.dir) / "minkms.log").read_text()
    assert f"kmagent preflight: refusing to start minkms: storage path {n3.data} is empty" in log
    assert "fresh single-node cluster" in log and "start refused" in log

    # The survivors still serve every key (reads need one node).
    assert verify_keys(lab, keys, [n1, n2]) == []

    # A REJOIN's "start fresh" step authorises the fresh start: the next retry starts node3, empty.
    authorise_fresh_start(state_dir(n3), "test-rejoin", time.time() + 120)
    try:
        wait_for(lambda: lab.probe(n3, "live"), 60, "node3 to start once a fresh start is authorised")
        started = program(lab, n3)
        assert started["state"] == "active" and started["last_start_wall"] > before["last_start_wall"]
        assert "authorised by action test-rejoin" in (Path(n3.dir) / "minkms.log").read_text()
    finally:
        revoke_fresh_start(state_dir(n3))
