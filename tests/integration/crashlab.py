"""What the failpoint (crash) tests of REJOIN and EVICT share: a 3-node lab whose agents all run with every
journaled point armed `crash-once`, the markers that arm one point for one role, and the checks of a healed
cluster (DESIGN §4.4, §8).

Every agent runs with every failpoint armed `crash-once` from its start. A point's marker file means "crashed here
already", so all markers are written first (everything disarmed) and a case arms one point for one role by
deleting its marker; the agent that hits it writes the marker again and dies (SIGKILL), the supervisor restarts it
after a second, as systemd would, and the restarted agent passes the point. One lab serves many cases without
restarting any agent to change its environment, which would itself move the anchor.

Roles: node3 is always the target; node1 and node2 share one marker directory ("anchors"), so whichever of them
is the anchor when the step runs crashes there, once (its successor passes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent import failpoints
from agent.core import playbooks
from agent.io.control import ControlError, DaemonNotRunning, call
from emulator.lab.lab import Lab, LabNode, wait_for

TARGET = "node3"
PHASES = ("intent", "outcome")
POINTS = tuple(
    f"{kind.lower()}.{step.name}.{phase}"
    for kind, table in playbooks.TABLES.items()
    for step in table
    for phase in PHASES
)
ROLE_OF = {"node1": "anchors", "node2": "anchors", TARGET: "target"}
# A budget that one module never uses up.
POLICY = {"actions_per_hour": 100}
# One action takes ~20 s here; each anchor crash adds an election; generous for a loaded CI.
HEAL_TIMEOUT = 300.0
_QUARANTINE_DIR = re.compile(r"\d{8}T\d{6}Z-(?P<action>.+)")


def cannot_isolate() -> str | None:
    """Why this machine cannot cut a lab node off the network (`Lab.fault(node, "isolate")`), if it cannot."""
    if os.geteuid() != 0:
        return "isolating a node needs root (nftables rules on the lab's loopback addresses)"
    if shutil.which("nft") is None:
        return "isolating a node needs the nft command (apt-get install nftables)"
    return None


needs_nft = pytest.mark.skipif(cannot_isolate() is not None, reason=cannot_isolate() or "")


class Crashes:
    """The failpoint markers of the lab's two roles (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def marker(self, role: str, point: str) -> Path:
        return self.root / role / f"{point}.crashed"

    def prepare(self, lab: Lab) -> None:
        """Before any agent starts: every point armed in every agent, every marker present (nothing fires)."""
        for role in set(ROLE_OF.values()):
            (self.root / role).mkdir(parents=True)
            for point in POINTS:
                self.marker(role, point).touch()
        for node, role in ROLE_OF.items():
            lab.set_agent_env(
                node,
                {
                    failpoints.ENV: ",".join(f"{p}=crash-once" for p in POINTS),
                    failpoints.DIR_ENV: str(self.root / role),
                },
            )

    def arm(self, role: str, *points: str) -> None:
        for point in points:
            self.marker(role, point).unlink()

    def fired(self, role: str, *points: str) -> bool:
        return all(self.marker(role, p).exists() for p in points)


@contextlib.contextmanager
def crash_lab(
    directory: Path,
    timings: Mapping[str, str],
    policy: Mapping[str, Any] | None = None,
    backup: Mapping[str, str | int] | None = None,
) -> Iterator[tuple[Lab, Crashes]]:
    """A running 3-node lab with agents, every failpoint armed and disarmed (see Crashes); torn down after."""
    lab = Lab(directory / "lab")
    crashes = Crashes(directory / "failpoints")
    try:
        lab.up(
            3,
            heartbeat="100ms",
            log=lambda _line: None,
            agents=True,
            prepare=crashes.prepare,
            agent_timings=timings,
            agent_policy={**POLICY, **(policy or {})},
            agent_backup=backup,
        )
        yield lab, crashes
    finally:
        lab.down()


# ---- what the agents say ------------------------------------------------------------------------------------


def kmagent(lab: Lab, node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    """The `kmagent` command of `node`'s agent, as an operator on that host runs it."""
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(lab.agent_config(node)), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def status(lab: Lab, node: LabNode) -> dict[str, Any]:
    try:
        found: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=5)
    except (DaemonNotRunning, ControlError, OSError):
        return {}
    return found


def history(lab: Lab, node: LabNode) -> list[dict[str, Any]]:
    """The node's agent's history entries; [] while it does not answer (it may be restarting)."""
    try:
        found = call(lab.agent_socket(node), "GET", "/v1/history", timeout=5)
    except (DaemonNotRunning, ControlError, OSError):
        return []
    entries: list[dict[str, Any]] = found.get("entries", [])
    return entries


def outcomes(lab: Lab, nodes: list[LabNode] | None = None) -> dict[str, set[str]]:
    """Every recorded action in the histories of `nodes` (default: all): id -> the outcomes they give it (one,
    unless they disagree)."""
    found: dict[str, set[str]] = {}
    for node in lab.nodes() if nodes is None else nodes:
        for entry in history(lab, node):
            found.setdefault(entry["action"]["id"], set()).add(entry["outcome"])
    return found


def kinds(lab: Lab, ids: set[str]) -> dict[str, tuple[str, str]]:
    """Action id -> (kind, target), as the agents' histories record them."""
    found: dict[str, set[tuple[str, str]]] = {}
    for node in lab.nodes():
        for e in history(lab, node):
            if e["action"]["id"] in ids:
                found.setdefault(e["action"]["id"], set()).add((e["action"]["kind"], e["action"]["target"]))
    assert all(len(v) == 1 for v in found.values()), f"histories disagree on what an action is: {found}"
    return {i: v.pop() for i, v in found.items()}


def log_path(node: LabNode) -> Path:
    return Path(node.dir) / "agent" / "kmagent.log"


def log_text(node: LabNode) -> str:
    return log_path(node).read_text(errors="replace")


def crash_lines(lab: Lab, role: str, point: str) -> int:
    """How many times the agents of `role` logged a crash at `point` (the failpoint's own stderr line)."""
    line = re.compile(rf"failpoint {re.escape(point)} at {re.escape(point)}: crash", re.IGNORECASE)
    return sum(len(line.findall(log_text(n))) for n in lab.nodes() if ROLE_OF[n.name] == role)


def quiet(lab: Lab) -> str | None:
    """The anchor, once the cluster is at rest: every agent follows it, nothing in flight or held, the target
    HEALTHY in every agent's view, three members that all accept writes. None otherwise."""
    found = {n.name: status(lab, n) for n in lab.nodes()}
    if not all(found.values()):
        return None
    anchor = found["node1"].get("anchor")
    if anchor is None or any(s.get("anchor") != anchor for s in found.values()):
        return None
    for s in found.values():
        actions = s.get("actions") or {}
        if actions.get("in_flight") or actions.get("held") or actions.get("escalated"):
            return None
        target: dict[str, Any] = next((n for n in s.get("nodes", []) if n.get("name") == TARGET), {})
        if target.get("class") != "HEALTHY":
            return None
    return anchor if lab.formed(3) else None


def settle(lab: Lab) -> str:
    """Wait for a cluster at rest whose anchor is not the target (no action ever targets the anchor). A target
    that became anchor is made to step down by a kill of its agent: a restarting agent is passed over."""
    anchor: str = wait_for(lambda: quiet(lab), HEAL_TIMEOUT, "the cluster to be at rest")
    if anchor == TARGET:
        lab.fault(TARGET, "agent-kill")
        anchor = wait_for(
            lambda: (a := quiet(lab)) != TARGET and a, HEAL_TIMEOUT, "an anchor other than the target"
        )
    return anchor


# ---- checks of a healed cluster -----------------------------------------------------------------------------


def check_histories(lab: Lab) -> None:
    """Each agent's history holds each action once."""
    for node in lab.nodes():
        ids = Counter(e["action"]["id"] for e in history(lab, node))
        assert all(c == 1 for c in ids.values()), f"{node.name}'s history repeats {ids.most_common(1)}"


def check_proposals(lab: Lab, licensed_by: Mapping[str, str]) -> None:
    """Every new proposal is of the target, by a kind in `licensed_by`, seen in the class that licenses that kind
    (kind -> class); every other one resumes an unfinished action."""
    for node in lab.nodes():
        for line in log_text(node).splitlines():
            if "event=proposed" not in line:
                continue
            assert f"target={TARGET}" in line, line
            kind = re.search(r"\bkind=(\w+)", line)
            assert kind is not None and kind[1] in licensed_by, line
            assert f"{TARGET}: {licensed_by[kind[1]]} for" in line or 'why="resume unfinished' in line, line


def quarantine_root(node: LabNode) -> Path:
    return Path(node.dir) / "agent" / "state" / "quarantine"


def quarantines(node: LabNode) -> list[str]:
    """The action id of each quarantine directory of the node (names are `<UTC time>-<action id>`)."""
    root = quarantine_root(node)
    found = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        match = _QUARANTINE_DIR.fullmatch(entry.name)
        assert entry.is_dir() and match, f"unexpected entry {entry} in quarantine"
        found.append(match["action"])
    return found


def check_quarantines(lab: Lab) -> None:
    """One quarantine of the target per REJOIN of it done, and never two of one action."""
    target = lab.node(TARGET)
    quarantined = quarantines(target)
    twice = [a for a, c in Counter(quarantined).items() if c > 1]
    assert not twice, f"two quarantines of {twice} in {quarantine_root(target)}"
    done_rejoins = {
        i for i, o in outcomes(lab).items() if i.startswith(f"rejoin-{TARGET}-") and o == {"done"}
    }
    assert set(quarantined) == done_rejoins
