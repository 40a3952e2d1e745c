"""What the RESTORE lab tests share: the kmagent CLI of a lab node, a backup taken now and copied everywhere,
every node's storage wiped, the RESTOREs the agents recorded, a rebuilt cluster, and the crashes each agent
logged at a failpoint."""

from __future__ import annotations

import re
from typing import Any

from emulator.lab.lab import Lab, LabNode, wait_for
from tests.integration.crashlab import history, kmagent, log_text, status


def held(lab: Lab, node: LabNode) -> list[str]:
    backups = status(lab, node).get("backups") or {}
    return list(backups.get("held") or [])


def backup_everywhere(lab: Lab) -> str:
    """A backup taken now (after the keys), on every agent: the one a restore must use.

    A lab's first anchor takes a scheduled backup at once (none is known yet: `agent.backups` `due`); it may run
    while ours does and end after it, as the newest. So this first waits for that one on every agent (at once
    after the first call), then takes ours: no other scheduled backup comes within `backup.interval` (1h here)."""
    wait_for(
        lambda: all(held(lab, n) for n in lab.nodes()), 90, "the lab's first scheduled backup everywhere"
    )
    wait_for(
        lambda: kmagent(lab, lab.nodes()[0], "backup", "now").returncode == 0, 90, "a backup to be taken"
    )
    newest = wait_for(lambda: held(lab, lab.nodes()[0])[:1], 30, "the backup on node1")[0]
    wait_for(lambda: all(held(lab, n)[:1] == [newest] for n in lab.nodes()), 60, f"{newest} on every agent")
    return str(newest)


def restores(lab: Lab) -> dict[str, set[str]]:
    """Every RESTORE any agent recorded: id -> outcomes."""
    found: dict[str, set[str]] = {}
    for node in lab.nodes():
        for entry in history(lab, node):
            if entry["action"]["kind"] == "RESTORE":
                found.setdefault(entry["action"]["id"], set()).add(entry["outcome"])
    return found


def _recorded(lab: Lab, action: str) -> dict[str, Any]:
    """The action `action` as the first history that holds it records it."""
    entry = next(e for n in lab.nodes() for e in history(lab, n) if e["action"]["id"] == action)
    found: dict[str, Any] = entry["action"]
    return found


def restored_from(lab: Lab, action: str) -> str:
    return str(dict(_recorded(lab, action)["params"])["backup"])


def restored_on(lab: Lab, action: str) -> str:
    """The node a RESTORE restored (its target: the anchor that proposed it), as the histories record it."""
    return str(_recorded(lab, action)["target"])


def crashes_by_node(lab: Lab, point: str) -> dict[str, int]:
    """node -> how many times its agent logged a crash at `point` (the failpoint's own stderr line; the log is
    appended across the agent's restarts, so callers compare with a count taken before)."""
    line = re.compile(rf"failpoint {re.escape(point)} at {re.escape(point)}: crash", re.IGNORECASE)
    return {n.name: len(line.findall(log_text(n))) for n in lab.nodes()}


def rebuilt(lab: Lab) -> bool:
    """Three members, every agent's view of every node HEALTHY, nothing in flight."""
    for node in lab.nodes():
        s = status(lab, node)
        if not s or (s.get("actions") or {}).get("in_flight"):
            return False
        if any(n.get("class") != "HEALTHY" for n in s.get("nodes", [])):
            return False
    return lab.formed(3)


def wipe_all(lab: Lab, nodes: list[LabNode] | None = None) -> None:
    for node in nodes or lab.nodes():
        lab.fault(node.name, "disk-loss")
