"""The agent on one host against real emulated faults: each class it can see is produced by the real fault."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.control import DaemonNotRunning, call
from emulator.lab.lab import Lab, LabNode, wait_for


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True)
    yield lab
    lab.down()


def node_status(lab: Lab, node: LabNode) -> dict[str, Any]:
    try:
        status: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=5)
    except DaemonNotRunning:
        return {}
    return status["nodes"][0] if status.get("nodes") else {}


def wait_class(lab: Lab, node: LabNode, cls: str, timeout: float = 40) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (s := node_status(lab, node)).get("class") == cls and s,
        timeout,
        f"{node.name}'s agent to see {cls}",
    )
    return result


def test_classes_from_real_faults(lab: Lab) -> None:
    n1, n2, n3 = lab.nodes()
    for node in (n1, n2, n3):
        wait_class(lab, node, "HEALTHY")
    assert (n1.data / ".kmagent-marker").is_file()  # identity recorded once the node was known good

    lab.fault(n2.name, "stop")
    down = wait_class(lab, n2, "DOWN")
    assert down["service"]["state"] == "inactive"
    lab.fault(n2.name, "start")
    wait_class(lab, n2, "HEALTHY")

    lab.fault(n3.name, "disk-loss")
    lost = wait_class(lab, n3, "STATE_LOST")
    assert "marker" in lost["reason"] or "empty" in lost["reason"]

    lab.fault(n2.name, "corrupt")
    corrupt = wait_class(lab, n2, "CORRUPT")
    assert corrupt["service"]["restarts_in_window"] >= 3

    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(lab.agent_config(n3)), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "STATE_LOST" in proc.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(lab.agent_config(n1)), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(as_json.stdout)["nodes"][0]["class"] == "HEALTHY"


def test_cli_says_clearly_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3 and "not running" in proc.stderr
