"""Kill -9 an agent at every journaled step of REJOIN (and EVICT): the cluster still heals, no step is done twice
in a harmful way, and no acknowledged key is lost (DESIGN §4.4, §8).

Every agent runs with every failpoint armed `crash-once` from its start. A point's marker file means "crashed here
already", so all markers are written first (everything disarmed) and a case arms one point for one role by
deleting its marker; the agent that hits it writes the marker again and dies (SIGKILL), the supervisor restarts it
after a second, as systemd would, and the restarted agent passes the point. One lab serves many cases without
restarting any agent to change its environment, which would itself move the anchor.

Roles: node3 is always the target (its disk is wiped); node1 and node2 share one marker directory, so whichever of
them is the anchor when the step runs crashes there, once (its successor passes). A target step is journaled by
the target and then mirrored in the anchor's journal: "the anchor at a target step" is that mirror.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import failpoints
from agent.core import playbooks
from agent.io.control import ControlError, DaemonNotRunning, call
from emulator.lab.lab import Lab, LabNode, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys

pytestmark = pytest.mark.slow

TARGET = "node3"
PHASES = ("intent", "outcome")
POINTS = tuple(
    f"{kind.lower()}.{step.name}.{phase}"
    for kind, table in playbooks.TABLES.items()
    for step in table
    for phase in PHASES
)
ROLE_OF = {"node1": "anchors", "node2": "anchors", TARGET: "target"}
# Short enough for many actions in one lab: no cooldown to wait out, a budget that one test never uses up.
TIMINGS = {"state_lost_after": "2s", "cooldown": "1s"}
POLICY = {"actions_per_hour": 100}
HEAL_TIMEOUT = (
    300.0  # one REJOIN takes ~20 s here; each anchor crash adds an election; generous for a loaded CI
)
_QUARANTINE_DIR = re.compile(r"\d{8}T\d{6}Z-(?P<action>.+)")


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


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Crashes]]:
    lab = Lab(tmp_path / "lab")
    crashes = Crashes(tmp_path / "failpoints")
    try:
        lab.up(
            3,
            heartbeat="100ms",
            log=lambda _line: None,
            agents=True,
            prepare=crashes.prepare,
            agent_timings=TIMINGS,
            agent_policy=POLICY,
        )
        yield lab, crashes
    finally:
        lab.down()


# ---- what the agents say ------------------------------------------------------------------------------------


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


def outcomes(lab: Lab) -> dict[str, set[str]]:
    """Every recorded action: id -> the outcomes the agents' histories give it (one, unless they disagree)."""
    found: dict[str, set[str]] = {}
    for node in lab.nodes():
        for entry in history(lab, node):
            found.setdefault(entry["action"]["id"], set()).add(entry["outcome"])
    return found


def log_text(node: LabNode) -> str:
    return (Path(node.dir) / "agent" / "kmagent.log").read_text(errors="replace")


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
    """Wait for a cluster at rest whose anchor is not the target (REJOIN never targets the anchor). A target
    that became anchor is made to step down by a kill of its agent: a restarting agent is passed over."""
    anchor: str = wait_for(lambda: quiet(lab), HEAL_TIMEOUT, "the cluster to be at rest")
    if anchor == TARGET:
        lab.fault(TARGET, "agent-kill")
        anchor = wait_for(
            lambda: (a := quiet(lab)) != TARGET and a, HEAL_TIMEOUT, "an anchor other than the target"
        )
    return anchor


# ---- one case -----------------------------------------------------------------------------------------------


def crash_and_heal(lab: Lab, crashes: Crashes, keys: list[DataKey], role: str, *points: str) -> str:
    """Arm `points` for `role`, wipe the target's disk, and check everything the cluster must have once it has
    healed. Returns the id of the action that healed it."""
    settle(lab)
    target = lab.node(TARGET)
    before = outcomes(lab)
    lines_before = {p: crash_lines(lab, role, p) for p in points}
    crashes.arm(role, *points)
    lab.fault(TARGET, "disk-loss")
    what = f"a crash of the {role} at {', '.join(points)}"
    wait_for(lambda: crashes.fired(role, *points), HEAL_TIMEOUT, what)

    def healed() -> bool:
        new = set(outcomes(lab)) - set(before)
        return bool(new) and quiet(lab) is not None

    wait_for(healed, HEAL_TIMEOUT, f"the cluster to heal after {what}")

    # Exactly one new action: a REJOIN of the target, done (an aborted first try that a second one repaired
    # would show here as two).
    new = {i: o for i, o in outcomes(lab).items() if i not in before}
    assert len(new) == 1 and list(new.values()) == [{"done"}], f"after {what}: actions {new}"
    (action,) = new
    entries = [e for n in lab.nodes() for e in history(lab, n) if e["action"]["id"] == action]
    assert {(e["action"]["kind"], e["action"]["target"]) for e in entries} == {("REJOIN", TARGET)}

    # The crash happened where it was armed, and the agent said so before dying.
    for point in points:
        assert crash_lines(lab, role, point) == lines_before[point] + 1, f"no crash line for {point}"

    # Healed: the target HEALTHY and a member of a 3-member cluster that accepts writes (quiet), nothing lost.
    assert verify_keys(lab, keys) == []
    assert lab.agent_view(target)["class"] == "HEALTHY"

    # Each agent's history holds each action once, and every REJOIN is of the target.
    for node in lab.nodes():
        ids = Counter(e["action"]["id"] for e in history(lab, node))
        assert all(c == 1 for c in ids.values()), f"{node.name}'s history repeats {ids.most_common(1)}"
    check_proposals(lab)

    # One quarantine per REJOIN of the target, and never two of one action.
    quarantined = quarantines(target)
    twice = [a for a, c in Counter(quarantined).items() if c > 1]
    assert not twice, f"two quarantines of {twice} in {quarantine_root(target)}"
    done_rejoins = {
        i for i, o in outcomes(lab).items() if i.startswith(f"rejoin-{TARGET}-") and o == {"done"}
    }
    assert set(quarantined) == done_rejoins
    return action


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


def check_proposals(lab: Lab) -> None:
    """No REJOIN of a node that was not STATE_LOST: every new proposal is of the target, seen STATE_LOST, and
    every other one resumes an unfinished action."""
    for node in lab.nodes():
        for line in log_text(node).splitlines():
            if "event=proposed" not in line:
                continue
            assert "kind=REJOIN" in line and f"target={TARGET}" in line, line
            assert f"{TARGET}: STATE_LOST for" in line or 'why="resume unfinished' in line, line


# ---- the cases ----------------------------------------------------------------------------------------------

RUNNER_CASES = [
    ("target" if step.runs_on == "target" else "anchors", f"rejoin.{step.name}.{phase}")
    for step in playbooks.REJOIN
    for phase in PHASES
]


def test_a_rejoin_heals_after_a_crash_of_the_agent_running_any_step(lab: tuple[Lab, Crashes]) -> None:
    """Each journaled point of REJOIN, in turn, kills the agent that runs the step: the target for fence,
    quarantine, start and mark; the anchor for remove, add and verify (a new anchor adopts the action)."""
    cluster, crashes = lab
    keys = create_keys(cluster, 5)
    actions = [crash_and_heal(cluster, crashes, keys, role, point) for role, point in RUNNER_CASES]
    assert len(set(actions)) == len(RUNNER_CASES)


def test_a_rejoin_heals_after_crashes_of_the_anchor_at_the_target_steps(lab: tuple[Lab, Crashes]) -> None:
    """The anchor journals each target step it asked for (a mirror of the target's progress): killed there, at
    every target step of one REJOIN in turn, each new anchor adopts the action and the target's journal keeps
    every step from running twice. Intents in one REJOIN, outcomes in the next."""
    cluster, crashes = lab
    keys = create_keys(cluster, 5)
    target_steps = [s.name for s in playbooks.REJOIN if s.runs_on == "target"]
    for phase in PHASES:
        crash_and_heal(cluster, crashes, keys, "anchors", *(f"rejoin.{s}.{phase}" for s in target_steps))
