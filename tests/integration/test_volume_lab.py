"""Volume identity in a real lab (DESIGN §6 rail 11): hosts that boot without their data volume.

Each node's storage path is a real volume: a tmpfs of its own (under `volumes/`), bound onto the node's data
directory before minkms first starts. "Booting without the volume" is: stop the node's minkms and agent, unmount
the bind (the state stays on the tmpfs, the storage path is now an empty directory of the root filesystem), and
start them again. A bind rather than `mount --move`: a move is refused under a shared parent mount (systemd
hosts), a bind works everywhere and leaves the same filesystem (same st_dev) to come back.

A. One host without its volume: VOLUME_MISSING in every agent's view, never STATE_LOST, nothing quarantined, no
   REJOIN proposed, minkms held down by the preflight, for a window of many agent rounds; with the volume back,
   HEALTHY again with every key.
B. Every host without its volume, `policy.auto_restore = true` and a backup on every agent: no restore (nothing in
   any history), the state on the volumes untouched, for a window of several `restore_after`; volumes back, the
   cluster is whole with every key.

Observation windows poll the agents and fail at the first violation; they end on a condition (rounds counted by
the agent's own metric and the class's age in every view), never on a sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.storage import is_agent_file
from emulator.lab.lab import Lab, LabNode, wait_for
from emulator.lab.workload import create_keys, verify_keys
from tests.integration.crashlab import history, kmagent, log_text, quarantine_root, status
from tests.integration.restorelab import backup_everywhere, restores

pytestmark = pytest.mark.slow

STATE_LOST_AFTER, RESTORE_AFTER = 2.0, 6.0
TIMINGS = {"state_lost_after": "2s", "restore_after": "6s", "cooldown": "1s"}
POLICY: dict[str, Any] = {"actions_per_hour": 100, "auto_restore": True}
BACKUP: dict[str, str | int] = {"interval": "1h", "keep": 3}  # backups on demand only (`kmagent backup now`)
SETTLE = 120.0  # lab start to every node HEALTHY under one anchor; generous for a loaded CI
SEEN = 90.0  # deadline for every agent to classify a node after a change
# The claims: VOLUME_MISSING held this long (on every agent's clock) and this many rounds of the agents...
WINDOW_A, ROUNDS_A = 10 * STATE_LOST_AFTER, 15  # ... ten times the wait of a REJOIN
WINDOW_B, ROUNDS_B = 4 * RESTORE_AFTER, 20  # ... four times the wait of an automatic restore
WINDOW_DEADLINE = 240.0  # for the window's condition itself to be met
DESTRUCTIVE = ("proposed", "step_started", "step_done", "step_failed")


def cannot_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root: mounts a tmpfs volume under each node's storage path and unmounts it"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount(8) and umount(8) are not installed"
    return None


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


class Volumes:
    """A tmpfs per node at <root>/<node>, bound onto the node's storage path (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.binds: list[Path] = []
        self.volumes: dict[str, Path] = {}

    def of(self, node: LabNode) -> Path:
        return self.volumes[node.name]

    def prepare(self, lab: Lab) -> None:
        """Lab.up's `prepare`: the lab's files exist, no process runs yet."""
        for node in lab.nodes():
            vol = self.root / node.name
            vol.mkdir(parents=True)
            proc = _run(
                "mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", f"kmlab-vol-{node.name}", str(vol)
            )
            if proc.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {proc.stderr.strip()}")
            self.volumes[node.name] = vol
            self.attach(node)

    def attach(self, node: LabNode) -> None:
        """The volume mounted at the storage path (as at a normal boot)."""
        proc = _run("mount", "--bind", str(self.of(node)), str(node.data))
        assert proc.returncode == 0, f"bind {self.of(node)} onto {node.data}: {proc.stderr}"
        self.binds.append(node.data)
        assert os.path.ismount(node.data)

    def detach(self, node: LabNode) -> None:
        """The storage path without its volume (as at a boot where the volume did not mount)."""
        proc = _run("umount", str(node.data))
        assert proc.returncode == 0, f"umount {node.data}: {proc.stderr} (is something still using it?)"
        assert not os.path.ismount(node.data) and os.listdir(node.data) == []

    def cleanup(self) -> None:
        for path in [*reversed(self.binds), *self.volumes.values()]:
            while os.path.ismount(path):
                if _run("umount", str(path)).returncode != 0:
                    _run("umount", "-l", str(path))  # still busy after the lab is down: detach it anyway
                    break


@pytest.fixture
def volume_lab(tmp_path: Path) -> Iterator[tuple[Lab, Volumes]]:
    reason = cannot_mount()
    if reason:
        pytest.skip(reason)
    lab = Lab(tmp_path / "lab")
    volumes = Volumes(tmp_path / "volumes")
    try:
        lab.up(
            3,
            heartbeat="100ms",
            log=lambda _line: None,
            agents=True,
            prepare=volumes.prepare,
            agent_timings=TIMINGS,
            agent_policy=POLICY,
            agent_backup=BACKUP,
        )
        yield lab, volumes
    finally:
        with contextlib.suppress(Exception):
            lab.down()
        volumes.cleanup()


# ---- looking at the agents -------------------------------------------------------------------------------------


def views(lab: Lab) -> dict[str, dict[str, dict[str, Any]]] | None:
    """Every agent's view of every node (agent -> node -> row), None while an agent does not answer."""
    found = {}
    for node in lab.nodes():
        s = status(lab, node)
        if not s:
            return None
        found[node.name] = {row["name"]: row for row in s.get("nodes", [])}
    return found


def settled(lab: Lab) -> str | None:
    """The anchor, once every agent sees every node HEALTHY and follows that one anchor."""
    found = [status(lab, n) for n in lab.nodes()]
    anchors = {s.get("anchor") for s in found}
    if not all(found) or len(anchors) != 1 or None in anchors:
        return None
    if any(row.get("class") != "HEALTHY" for s in found for row in s.get("nodes", [])):
        return None
    return str(anchors.pop())


def seen_by_all(lab: Lab, names: list[str], cls: str, held: float = 0.0) -> bool:
    found = views(lab)
    return found is not None and all(
        found[agent][name]["class"] == cls and (found[agent][name].get("since_seconds") or 0.0) >= held
        for agent in found
        for name in names
    )


def rounds(node: LabNode) -> int:
    """The agent's probe rounds since it started (its kmagent_observation_rounds_total metric)."""
    with urllib.request.urlopen(f"http://{node.ip}:9464/metrics", timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(r"^kmagent_observation_rounds_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert match is not None, "no kmagent_observation_rounds_total in the agent's metrics"
    return int(float(match[1]))


def destructive(lab: Lab) -> list[str]:
    """Every proposal and step any agent logged."""
    return [
        f"{n.name}: {line}"
        for n in lab.nodes()
        for line in log_text(n).splitlines()
        if any(f" event={e} " in line + " " for e in DESTRUCTIVE)
    ]


def record(node: LabNode) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads((Path(node.dir) / "agent" / "state" / "marker.json").read_text())
    except (OSError, ValueError):
        return None
    return found


def marked_on_a_mount_point(node: LabNode) -> bool:
    r = record(node)
    return r is not None and (r.get("volume") or {}).get("mount_point") is True


def written(node: LabNode) -> list[str]:
    """What is in the node's storage path but the agent's own probe files (created and deleted each round)."""
    return [name for name in os.listdir(node.data) if not is_agent_file(name)]


def snapshot(root: Path) -> dict[str, str]:
    """Every file below root and its sha256: what "untouched" means for a volume."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".kmagent-probe-")
    }


def stop(lab: Lab, node: LabNode) -> None:
    lab.fault(node.name, "agent-stop")
    lab.fault(node.name, "stop")
    wait_for(
        lambda: all(
            lab.programs()[p]["state"] in ("inactive", "failed") for p in (node.name, f"{node.name}-agent")
        ),
        60,
        f"{node.name}'s minkms and agent to stop",
    )


def start(lab: Lab, node: LabNode) -> None:
    lab.fault(node.name, "start")  # the preflight runs before every attempt, as systemd's ExecStartPre
    lab.fault(node.name, "agent-start")


def observe(
    lab: Lab,
    names: list[str],
    window: float,
    min_rounds: int,
    check: Callable[[], None],
) -> int:
    """Until every agent has seen `names` VOLUME_MISSING for `window` seconds and run `min_rounds` rounds since
    now: each sample, every view says VOLUME_MISSING, nothing destructive was logged, and `check` holds.
    Returns the rounds the slowest agent ran."""
    start_rounds = {n.name: rounds(n) for n in lab.nodes()}
    deadline = time.monotonic() + WINDOW_DEADLINE
    while True:
        assert destructive(lab) == [], "an agent proposed or ran a step:\n" + "\n".join(destructive(lab))
        check()
        found = views(lab)
        if found is not None:
            wrong = {
                (agent, name): found[agent][name]["class"]
                for agent in found
                for name in names
                if found[agent][name]["class"] != "VOLUME_MISSING"
            }
            assert not wrong, f"not VOLUME_MISSING in every view: {wrong}"
            ran = min(rounds(n) - start_rounds[n.name] for n in lab.nodes())
            held = min(found[agent][name].get("since_seconds") or 0.0 for agent in found for name in names)
            if ran >= min_rounds and held >= window:
                return ran
        assert time.monotonic() < deadline, f"the observation window did not complete in {WINDOW_DEADLINE:g}s"
        time.sleep(0.5)  # the sampling rate of the observation, not synchronisation


# ---- A: one host boots without its volume ----------------------------------------------------------------------


def test_a_host_without_its_volume_is_volume_missing_never_rejoined(volume_lab: tuple[Lab, Volumes]) -> None:
    lab, volumes = volume_lab
    anchor = wait_for(lambda: settled(lab), SETTLE, "every agent to see every node HEALTHY under one anchor")
    keys = create_keys(lab, 4)
    target = next(n for n in reversed(lab.nodes()) if n.name != anchor)
    wait_for(lambda: marked_on_a_mount_point(target), 60, f"{target.name}'s record to say: a mount point")
    identity = (record(target) or {})["volume"]
    assert identity["fstype"] == "tmpfs" and identity["source"] == f"kmlab-vol-{target.name}", identity

    stop(lab, target)
    before = snapshot(volumes.of(target))
    assert "kms.db" in before
    volumes.detach(target)
    start(lab, target)

    wait_for(lambda: seen_by_all(lab, [target.name], "VOLUME_MISSING"), SEEN, f"{target.name} VOLUME_MISSING")
    mine = status(lab, target).get("local") or {}
    assert mine["storage"]["volume_missing"] is True and mine["storage"]["empty"] is True
    assert mine["reason"].startswith(f"volume missing: storage path {target.data} was a mount point of tmpfs")
    assert "is a plain directory now" in mine["reason"], mine["reason"]

    def untouched() -> None:
        assert written(target) == [], "something was written on the root filesystem under the mount point"
        assert not quarantine_root(target).exists() or os.listdir(quarantine_root(target)) == []
        assert not lab.probe(target, "live"), "minkms started without its volume"

    ran = observe(lab, [target.name], WINDOW_A, ROUNDS_A, untouched)
    assert ran >= ROUNDS_A
    assert all(history(lab, n) == [] for n in lab.nodes())
    assert json.loads(kmagent(lab, lab.node(anchor), "history", "--json").stdout) == []
    explained = json.loads(kmagent(lab, lab.node(anchor), "explain", "--json").stdout)
    row = next(r for r in explained["nodes"] if r["name"] == target.name)
    assert row["cls"] == "VOLUME_MISSING" and row["wants"] is None, row
    assert explained["decision"]["action"] is None
    minkms_log = (Path(target.dir) / "minkms.log").read_text()
    assert "refusing to start minkms: volume missing" in minkms_log and "Mount the volume" in minkms_log
    assert snapshot(volumes.of(target)) == before  # the state waited on the volume, untouched

    # The volume is back: minkms starts on it (the supervisor retries, as systemd's Restart= does) and the node
    # is HEALTHY again, without any action; nothing was lost.
    volumes.attach(target)
    wait_for(lambda: settled(lab) and lab.formed(3), SEEN, f"{target.name} HEALTHY on its volume again")
    assert verify_keys(lab, keys) == []
    assert verify_keys(lab, create_keys(lab, 1, prefix="after")) == []
    assert destructive(lab) == [] and all(history(lab, n) == [] for n in lab.nodes())
    assert not quarantine_root(target).exists() or os.listdir(quarantine_root(target)) == []


# ---- B: every host boots without its volume, auto_restore armed --------------------------------------------------


def test_every_host_without_its_volume_never_restores_a_backup(volume_lab: tuple[Lab, Volumes]) -> None:
    lab, volumes = volume_lab
    wait_for(lambda: settled(lab), SETTLE, "every agent to see every node HEALTHY under one anchor")
    keys = create_keys(lab, 4)
    backup = backup_everywhere(lab)
    later = create_keys(lab, 2, prefix="after-backup")  # newer than the backup: a restore would lose them
    nodes = lab.nodes()
    wait_for(lambda: all(marked_on_a_mount_point(n) for n in nodes), 60, "every record to say: a mount point")

    for node in nodes:
        stop(lab, node)
    before = {n.name: snapshot(volumes.of(n)) for n in nodes}
    for node in nodes:
        volumes.detach(node)
    for node in nodes:
        start(lab, node)

    names = [n.name for n in nodes]
    wait_for(lambda: seen_by_all(lab, names, "VOLUME_MISSING"), SEEN, "every node VOLUME_MISSING everywhere")

    def untouched() -> None:
        assert restores(lab) == {}, (
            f"a restore was recorded although every volume holds state: {restores(lab)}"
        )
        for node in nodes:
            assert written(node) == [], f"{node.name}: written on the root filesystem"
            assert not quarantine_root(node).exists() or os.listdir(quarantine_root(node)) == []
            s = status(lab, node)
            assert not ((s.get("actions") or {}).get("restore")), f"{node.name} advises a restore: {s}"

    observe(lab, names, WINDOW_B, ROUNDS_B, untouched)
    assert all(history(lab, n) == [] for n in nodes)
    assert {n.name: snapshot(volumes.of(n)) for n in nodes} == before  # the newer state, untouched
    assert any(backup in (status(lab, n).get("backups") or {}).get("held", []) for n in nodes)  # it was there

    for node in nodes:
        volumes.attach(node)
    wait_for(lambda: settled(lab) and lab.formed(3), SETTLE, "the cluster whole on its volumes again")
    assert verify_keys(lab, keys + later) == []  # including the keys newer than the backup
    assert destructive(lab) == [] and all(history(lab, n) == [] for n in nodes)
