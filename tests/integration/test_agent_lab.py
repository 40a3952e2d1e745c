"""The agent on one host against real emulated faults: each class it can see is produced by the real fault."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
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
    return status.get("local") or {}


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
    # DOWN may first be seen while the supervisor is still stopping it; then the service is inactive
    wait_for(
        lambda: (s := node_status(lab, n2)).get("class") == "DOWN" and s["service"]["state"] == "inactive",
        40,
        "node2's agent to see DOWN with the service inactive",
    )
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
    assert json.loads(as_json.stdout)["local"]["class"] == "HEALTHY"


# ---- storage faults on a real (small) volume ---------------------------------------------------------------------

SMALL_DISK = 72 << 20  # just above the lab agents' low_space (64 MiB)
LAB_LOW_SPACE = 64 << 20


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def _unmount(path: Path) -> None:
    """Unmount for good, even while something still holds it (lazy unmount as the last resort)."""
    deadline = time.monotonic() + 10
    while os.path.ismount(path) and time.monotonic() < deadline:
        if _run("umount", str(path)).returncode != 0:
            time.sleep(0.2)
    if os.path.ismount(path):
        _run("umount", "-l", str(path))
    assert not os.path.ismount(path), f"{path} is still mounted"


def _remount(path: Path, mode: str) -> None:
    """`mount -o remount,MODE`; the kernel refuses ro (busy) while a file is open for writing, e.g. the
    agent's write probe for an instant, so retry within a deadline."""
    last = ""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        proc = _run("mount", "-o", f"remount,{mode}", str(path))
        if proc.returncode == 0:
            return
        last = proc.stderr.strip()
        time.sleep(0.05)
    raise AssertionError(f"remount,{mode} of {path} failed: {last}")


def _fill(directory: Path, name: str, leave: int) -> None:
    """Write zeros until only `leave` bytes are free (0: until the disk is full), fsynced."""
    chunk = b"\0" * (1 << 20)
    with open(directory / name, "wb") as fh:
        try:
            while True:
                vfs = os.statvfs(directory)
                room = vfs.f_bavail * vfs.f_frsize - leave
                if leave and room <= 0:
                    break
                fh.write(chunk[: max(1, min(len(chunk), room))] if leave else chunk)
                fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC or leave:
                raise
        with contextlib.suppress(OSError):
            os.fsync(fh.fileno())


@pytest.fixture
def small_disk_lab(tmp_path: Path) -> Iterator[tuple[Lab, LabNode]]:
    """A lab whose node3 keeps its state on a real 72 MiB tmpfs, mounted before minkms first starts."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts a real tmpfs as a node's storage and remounts it read-only")
    lab = Lab(tmp_path / "lab")
    mounted: list[Path] = []

    def prepare(lab: Lab) -> None:
        data = lab.nodes()[2].data
        proc = _run(
            "mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK},mode=0755", "kmlab-small-disk", str(data)
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {proc.stderr.strip()}")
        mounted.append(data)

    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True, prepare=prepare)
        yield lab, lab.nodes()[2]
    finally:
        lab.down()
        for path in mounted:
            _unmount(path)


def test_low_space_full_and_read_only_storage_from_real_faults(small_disk_lab: tuple[Lab, LabNode]) -> None:
    lab, n3 = small_disk_lab
    assert os.path.ismount(n3.data)
    healthy = wait_class(lab, n3, "HEALTHY")
    assert healthy["storage"]["free_bytes"] > LAB_LOW_SPACE
    assert (n3.data / ".kmagent-marker").is_file()

    # Low space: below the agent's low_space, but writes still work.
    _fill(n3.data, "filler", leave=32 << 20)
    low = wait_class(lab, n3, "DEGRADED")
    assert low["reason"].startswith("low free space: ") and "MiB" in low["reason"], low["reason"]
    assert low["storage"]["probe_ok"] is True and low["storage"]["low_space"] is True

    # Full: the write probe fails with ENOSPC. The emulator keeps running (it is not a crash loop).
    _fill(n3.data, "filler-2", leave=0)
    full = wait_for(
        lambda: "No space left on device" in (s := node_status(lab, n3)).get("reason", "") and s,
        40,
        "node3's agent to see a full disk",
    )
    assert full["class"] == "DEGRADED" and "low free space: 0 B" in full["reason"]
    write = lab.minkms("add-key", "written-while-full", check=False)
    assert write.returncode != 0  # writes need every node, and node3 cannot persist: a real full disk
    assert lab.probe(n3, "live") and node_status(lab, n3)["service"]["restarts_in_window"] == 0

    (n3.data / "filler").unlink()
    (n3.data / "filler-2").unlink()
    wait_class(lab, n3, "HEALTHY")

    # Read-only: the kernel refuses `remount,ro` while minkms holds its database open for writing (as it
    # would on a real disk), so minkms is stopped, the volume remounted read-only, and minkms started again,
    # as after a reboot onto a volume that comes up read-only. The emulator then crash-loops.
    lab.fault(n3.name, "stop")
    wait_class(lab, n3, "DOWN")
    _remount(n3.data, "ro")
    lab.fault(n3.name, "start")
    seen: set[str] = set()

    def crash_looping_on_read_only() -> dict[str, Any] | None:
        status = node_status(lab, n3)
        seen.add(status.get("class", "?"))
        looping = status.get("service", {}).get("restarts_in_window", 0) >= 3
        return status if looping and "needs an operator" in status.get("reason", "") else None

    ro = wait_for(crash_looping_on_read_only, 60, "node3's agent to see a crash loop on read-only storage")
    assert ro["class"] == "DOWN" and "storage is read-only" in ro["reason"], ro["reason"]
    assert ro["storage"]["read_only"] is True
    assert "unable to open database file" in (Path(n3.dir) / "minkms.log").read_text()
    assert "CORRUPT" not in seen, seen  # a REJOIN cannot fix a broken volume: never CORRUPT


def test_cli_says_clearly_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 3 and "not running" in proc.stderr
