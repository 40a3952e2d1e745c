"""Kill -9 an agent at every journaled step of REJOIN: the cluster still heals, no step is done twice in a
harmful way, and no acknowledged key is lost (DESIGN §4.4, §8). EVICT's steps: test_evict_failpoints_lab.py.

The lab, its failpoint markers and roles are those of `tests.integration.crashlab`: node3 is always the target
(its disk is wiped); node1 and node2 share one marker directory, so whichever of them is the anchor when the step
runs crashes there, once (its successor passes). A target step is journaled by the target and then mirrored in
the anchor's journal: "the anchor at a target step" is that mirror.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import playbooks
from emulator.lab.lab import Lab, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys
from tests.integration.crashlab import (
    HEAL_TIMEOUT,
    PHASES,
    TARGET,
    Crashes,
    check_histories,
    check_proposals,
    check_quarantines,
    crash_lab,
    crash_lines,
    kinds,
    outcomes,
    quiet,
    settle,
)

pytestmark = pytest.mark.slow

# Short enough for many actions in one lab: no cooldown to wait out.
TIMINGS = {"state_lost_after": "2s", "cooldown": "1s"}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Crashes]]:
    with crash_lab(tmp_path, TIMINGS) as found:
        yield found


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
    assert kinds(lab, {action}) == {action: ("REJOIN", TARGET)}

    # The crash happened where it was armed, and the agent said so before dying.
    for point in points:
        assert crash_lines(lab, role, point) == lines_before[point] + 1, f"no crash line for {point}"

    # Healed: the target HEALTHY and a member of a 3-member cluster that accepts writes (quiet), nothing lost.
    assert verify_keys(lab, keys) == []
    own = lab.agent_view(target)
    assert own["class"] == "HEALTHY", f"after {what}: the target says {own}"

    check_histories(lab)
    check_proposals(lab, {"REJOIN": "STATE_LOST"})
    check_quarantines(lab)
    return action


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
