"""What the RESTORE lab tests share: the kmagent CLI of a lab node, a backup taken now and copied everywhere,
every node's storage wiped, the RESTOREs the agents recorded, and a rebuilt cluster."""

from __future__ import annotations

from emulator.lab.lab import Lab, LabNode, wait_for
from tests.integration.crashlab import history, kmagent, status


def held(lab: Lab, node: LabNode) -> list[str]:
    backups = status(lab, node).get("backups") or {}
    return list(backups.get("held") or [])


def backup_everywhere(lab: Lab) -> str:
    """A backup taken now (after the keys), on every agent: the one a restore must use."""
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


def restored_from(lab: Lab, action: str) -> str:
    entry = next(e for n in lab.nodes() for e in history(lab, n) if e["action"]["id"] == action)
    return str(dict(entry["action"]["params"])["backup"])


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
