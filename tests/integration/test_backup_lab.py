"""Scheduled backups in a lab with agents: taken by the anchor on schedule, copied to every agent with retention,
`kmagent backup now|list|verify`, a damaged copy set aside and no longer reported, and an agent that was down
catching up. Backups every few seconds, keep 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.control import DaemonNotRunning, call
from emulator.lab.lab import Lab, LabNode, wait_for
from emulator.lab.workload import create_keys
from tests.integration.crashlab import kmagent
from tests.integration.test_election_lab import one_anchor_followed_by_all

INTERVAL = 6  # seconds between scheduled backups


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    lab.up(
        3,
        heartbeat="100ms",
        log=lambda _line: None,
        agents=True,
        agent_timings={"state_lost_after": "1h"},  # nothing destructive happens while agents are stopped
        agent_backup={"interval": f"{INTERVAL}s", "keep": 2},
    )
    yield lab
    lab.down()


def backups(lab: Lab, node: LabNode) -> dict[str, Any]:
    answer: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=10)["backups"]
    return answer


def held(lab: Lab, node: LabNode) -> list[str]:
    return list(backups(lab, node)["held"])


def on_disk(lab: Lab, node: LabNode) -> list[str]:
    return sorted(p.stem for p in (Path(node.dir) / "agent" / "backups").glob("*.gz"))


def test_backups_on_schedule_everywhere_with_retention_commands_and_repair(lab: Lab) -> None:
    nodes = lab.nodes()
    names = [n.name for n in nodes]
    create_keys(lab, 5)
    anchor = wait_for(lambda: one_anchor_followed_by_all(lab, names), 60, "an anchor")
    others = [n for n in nodes if n.name != anchor]

    # on schedule, on every agent, retention applied: a third backup pushes the first one out everywhere
    first = wait_for(lambda: held(lab, lab.node(anchor))[-1:], 60, "the first backup on the anchor")[0]
    assert first.endswith("-" + anchor)
    wait_for(
        lambda: all(
            len(h := held(lab, n)) == 2 and first not in h and h == held(lab, lab.node(anchor)) for n in nodes
        ),
        6 * INTERVAL + 30,
        "two newer backups on every agent, the first one dropped",
    )
    for n in nodes:
        assert len(on_disk(lab, n)) <= 3  # keep 2 (a third may be arriving this instant)
        assert first not in on_disk(lab, n)

    # `backup now` on a host that is not the anchor: forwarded to the anchor, then copied everywhere
    asked = kmagent(lab, others[0], "backup", "now")
    assert asked.returncode == 0, asked.stderr
    new = asked.stdout.split()[1]
    assert new.endswith("-" + anchor), asked.stdout
    wait_for(lambda: all(new in held(lab, n) for n in nodes), 30, f"{new} on every agent")

    listed = kmagent(lab, others[1], "backup", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    catalogue = json.loads(listed.stdout)
    row = next(b for b in catalogue["backups"] if b["id"] == new)
    assert row["holders"] == sorted(names) and row["source"] == anchor and row["commit"] > 0
    assert catalogue["unreachable"] == {}
    human = kmagent(lab, others[1], "backup", "list")
    assert new in human.stdout and ",".join(sorted(names)) in human.stdout and "3 answered" in human.stdout

    bad = kmagent(lab, others[1], "backup", "verify", "../../etc/passwd")
    assert bad.returncode == 2 and "not a backup id" in bad.stderr, bad.stderr
    shown = kmagent(lab, others[1], "status")
    assert shown.returncode == 0 and "backups: newest " in shown.stdout, shown.stdout

    # verify: sha256, gzip, and a scratch restore that must hold the backup's commit
    verified = kmagent(lab, others[1], "backup", "verify", new)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "scratch restore: ok" in verified.stdout and "verified" in verified.stdout

    # a copy damaged on disk: verify finds it, sets it aside, and the agent stops reporting it
    victim, watcher = others
    newest = held(lab, victim)[0]
    path = Path(victim.dir) / "agent" / "backups" / f"{newest}.gz"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    damaged = kmagent(lab, victim, "backup", "verify", newest, "--json")
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    answer = json.loads(damaged.stdout)
    assert answer["ok"] is False and "sha256" in answer["checks"][0]["detail"]
    assert newest not in held(lab, victim)
    assert any(p.name.startswith(newest) for p in (path.parent / "corrupt").iterdir())
    wait_for(
        lambda: newest not in backups(lab, watcher)["peers"].get(victim.name, [newest]),
        10,
        f"{watcher.name} to see {victim.name} no longer report {newest}",
    )

    # an agent stopped during backups catches up once started (it pulls what it lacks)
    lab.fault(victim.name, "agent-stop")
    assert held_when_up(lab, victim) == []
    before = set(held(lab, lab.node(anchor)))
    missed = wait_for(
        lambda: next((b for b in held(lab, lab.node(anchor))[:1] if b not in before), None),
        3 * INTERVAL + 30,
        "a backup taken while the agent was down",
    )
    assert missed not in on_disk(lab, victim)
    lab.fault(victim.name, "agent-start")
    wait_for(lambda: missed in held_when_up(lab, victim), 60, f"{victim.name} to fetch {missed}")
    log = (Path(victim.dir) / "agent" / "kmagent.log").read_text()
    assert f"event=backup_fetched backup={missed}" in log  # pulled: the anchor pushed it while it was down
    assert len(held(lab, victim)) <= 2


def held_on_disk(lab: Lab, node: LabNode) -> list[str]:
    return on_disk(lab, node)


def held_when_up(lab: Lab, node: LabNode) -> list[str]:
    """What the agent holds; [] while it is still starting."""
    try:
        return held(lab, node)
    except DaemonNotRunning:
        return []
