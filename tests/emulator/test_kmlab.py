"""kmlab: the lab launcher, its faults, and the scripted manual runbook."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from emulator.lab import runbook
from emulator.lab.lab import Lab, wait_for
from emulator.lab.workload import create_keys, verify_keys


def kmlab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emulator.lab.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def lab_processes(lab_dir: Path) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(str(lab_dir) in part for part in proc.info.get("cmdline") or []):
            found.append(proc.info["pid"])
    return found


def test_kmlab_up_status_env_down_leaves_nothing_running(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    try:
        up = kmlab("up", "--dir", str(lab_dir), "--nodes", "3")
        assert up.returncode == 0, up.stderr
        assert up.stdout.count("Leader") == 1 and up.stdout.count("Follower") == 2
        status = json.loads(kmlab("status", "--dir", str(lab_dir), "--json").stdout)
        assert status["running"] is True
        nodes = status["nodes"]
        assert [n["name"] for n in nodes] == ["node1", "node2", "node3"]
        assert all(n["write"] and n["members"] == 3 and n["state"] == "active" for n in nodes)
        assert all(n["agent"] is None for n in nodes)  # no agents in this lab: no agent column either
        assert "AGENT" not in kmlab("status", "--dir", str(lab_dir)).stdout
        assert len({n["host"].rsplit(".", 1)[0] for n in nodes}) == 1  # one loopback /24
        assert (lab_dir / "api.key").stat().st_mode & 0o077 == 0
        assert (lab_dir / "hsm.key").stat().st_mode & 0o077 == 0

        env = kmlab("env", "--dir", str(lab_dir)).stdout
        assert "MINIO_KMS_SERVER=" in env and "MINIO_KMS_API_KEY=" in env

        again = kmlab("up", "--dir", str(lab_dir))
        assert again.returncode == 1 and "already running" in again.stderr
        assert lab_processes(lab_dir)
    finally:
        down = kmlab("down", "--dir", str(lab_dir))
    assert down.returncode == 0, down.stderr
    assert lab_processes(lab_dir) == []
    assert not (lab_dir / "supervisor.sock").exists()


def test_kmlab_status_shows_what_each_agent_sees(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    try:
        lab.up(2, heartbeat="100ms", log=lambda _line: None, agents=True)

        def status() -> list[dict[str, Any]]:
            out = kmlab("status", "--dir", str(lab.dir), "--json").stdout
            nodes: list[dict[str, Any]] = json.loads(out)["nodes"]
            return nodes

        def status_when(
            ok: Callable[[list[dict[str, Any]]], bool],
        ) -> Callable[[], list[dict[str, Any]] | None]:
            return lambda: rows if ok(rows := status()) else None

        healthy = status_when(lambda r: all((n["agent"] or {}).get("class") == "HEALTHY" for n in r))
        rows = wait_for(healthy, 60, "both agents to report HEALTHY through kmlab status")
        assert all("a member" in n["agent"]["reason"] for n in rows)
        table = kmlab("status", "--dir", str(lab.dir)).stdout
        header, *lines = table.splitlines()
        assert header.split()[-1] == "AGENT" and lines[0].split()[-1] == "HEALTHY"
        assert "node1 agent: live, ready, a member" in table

        assert "kmagent stopped" in lab.fault("node2", "agent-stop")
        gone = status_when(lambda r: r[1]["agent"]["class"] is None)
        rows = wait_for(gone, 30, "node2's agent to be gone")
        assert rows[1]["agent"]["reason"] == "agent not running"
        assert rows[0]["agent"]["class"] == "HEALTHY"
        table = kmlab("status", "--dir", str(lab.dir)).stdout
        assert "node2 agent: agent not running" in table
        assert [line.split()[-1] for line in table.splitlines()[1:3]] == ["HEALTHY", "-"]

        lab.fault("node2", "agent-start")
        wait_for(lambda: status()[1]["agent"]["class"] == "HEALTHY", 60, "node2's agent to be back")
    finally:
        lab.down()


def test_agent_faults_need_a_lab_with_agents(lab3: Lab) -> None:
    proc = kmlab("fault", "--dir", str(lab3.dir), "node1", "agent-stop")
    assert proc.returncode == 1 and "runs no agents" in proc.stderr


def test_kmlab_errors_are_one_clear_line(tmp_path: Path) -> None:
    proc = kmlab("status", "--dir", str(tmp_path / "none"))
    assert proc.returncode == 1 and "no lab in" in proc.stderr and "kmlab up" in proc.stderr
    proc = kmlab("fault", "--dir", str(tmp_path / "none"), "node1", "melt")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = kmlab("up", "--dir", str(tmp_path / "x"), "--nodes", "0")
    assert proc.returncode == 1 and "between 1 and 50" in proc.stderr


def test_faults_stop_start_kill(lab3: Lab) -> None:
    n1, n2, _ = lab3.nodes()
    pid = lab3.programs()[n2.name]["pid"]
    lab3.fault(n2.name, "kill")
    wait_for(lambda: lab3.programs()[n2.name]["pid"] not in (None, pid), 20, "the supervisor to restart it")
    wait_for(lambda: lab3.formed(3), 20, "the cluster to be whole after a plain restart")
    lab3.fault(n2.name, "stop")
    assert lab3.programs()[n2.name]["state"] == "inactive"
    assert not lab3.probe(n2, "live")
    lab3.fault(n2.name, "start")
    wait_for(lambda: lab3.formed(3), 20, "the cluster to be whole after start")
    assert lab3.probe(n1, "ready?write")


def test_runbook_rejoin_heals_a_disk_loss_and_loses_no_key(lab3: Lab) -> None:
    keys = create_keys(lab3, 10)
    victim = lab3.nodes()[2]
    lab3.fault(victim.name, "disk-loss")
    wait_for(lambda: not lab3.probe(lab3.nodes()[0], "ready?write"), 20, "writes to stop")
    lines: list[str] = []
    timeline = runbook.rejoin(lab3, victim.name, log=lines.append)
    assert [s.name.split(".")[0] for s in timeline.steps] == ["1", "2", "3", "4", "5"]
    assert any("minkms edit" in line for line in lines) and any("minkms add" in line for line in lines)
    assert lab3.formed(3)
    assert verify_keys(lab3, keys) == []
    assert create_keys(lab3, 1)  # writes work


def test_runbook_cli_rejoins_a_node_with_perfect_knowledge(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(3)
    proc = kmlab("runbook", "rejoin", "node3", "--dir", str(lab.dir))
    assert proc.returncode == 0, proc.stderr
    assert "recovered" in proc.stdout
    assert lab.formed(3)


def test_runbook_refuses_when_no_healthy_member_is_left(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    proc = kmlab("runbook", "rejoin", "node1", "--dir", str(lab.dir))
    assert proc.returncode == 1 and "no healthy member" in proc.stderr
