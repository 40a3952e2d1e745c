"""Kill -9 the agent running a RESTORE at every journaled step of it (DESIGN §4.4, §5 RESTORE): the cluster is
still rebuilt to full size from the freshest backup, the backup is restored exactly once, and every key created
before it decrypts on every node.

One lab, `auto_restore` on: each case takes a backup, wipes every node's storage, and arms one point. The RESTORE
runs on the anchor elected among the lost nodes, which may be any of them, so the point is armed in both marker
directories (crashlab's roles): whichever agent runs the step crashes there once, and the supervisor restarts it.

So one case sees one crash or two. The RESTORE's target (its first anchor) runs every step, so it always crashes
at the point. While it restarts, another agent may win the election and resume the RESTORE: it drives the steps on
the target and mirrors each one the target reports done in its own journal, and that mirror reaches the same
journaled point (as the anchor's does in a REJOIN, test_failpoints_lab). The other agent of the target's role
passes (their shared marker says "crashed here already"); an agent of the other role crashes there too, once. Which
one wins depends on timing (node2 is preferred after node1, but if its candidacy fails, e.g. under load, node3
stands after its back-off), so the check is per role: each role crashed as often as its marker says (0 or 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator.lab.lab import Lab, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys
from tests.integration.crashlab import PHASES, ROLE_OF, Crashes, crash_lab
from tests.integration.restorelab import (
    backup_everywhere,
    crashes_by_node,
    rebuilt,
    restored_from,
    restored_on,
    restores,
    wipe_all,
)

pytestmark = pytest.mark.slow

TIMINGS = {"state_lost_after": "2s", "restore_after": "4s", "cooldown": "1s"}
POINTS = [
    f"restore.{step}.{phase}"
    for step in ("fence", "fetch", "quarantine", "start", "restore", "mark", "verify")
    for phase in PHASES
]
ROLES = sorted(set(ROLE_OF.values()))
REBUILD_TIMEOUT = (
    420.0  # a restore with an agent crash (an election), then two REJOINs; generous for a loaded CI
)


def restored_lines(lab: Lab) -> int:
    """How many restores the emulator nodes performed (each logs one line per restore it accepted)."""
    return sum(
        (Path(n.dir) / "minkms.log").read_text(errors="replace").count("restored backup at commit")
        for n in lab.nodes()
    )


def crash_and_rebuild(lab: Lab, crashes: Crashes, keys: list[DataKey], point: str) -> None:
    keys += create_keys(lab, 2, prefix=point.replace(".", "-"))
    backup = backup_everywhere(lab)
    before, lines_before = set(restores(lab)), restored_lines(lab)
    crashes_before = crashes_by_node(lab, point)
    for role in ROLES:
        crashes.arm(role, point)
    wipe_all(lab)
    wait_for(
        lambda: any(crashes.fired(role, point) for role in ROLES), REBUILD_TIMEOUT, f"a crash at {point}"
    )
    wait_for(
        lambda: rebuilt(lab) and set(restores(lab)) - before, REBUILD_TIMEOUT, f"the rebuild after {point}"
    )
    # Nothing runs any more (no action in flight anywhere): which roles crashed, before the markers are reset.
    fired = {role: crashes.fired(role, point) for role in ROLES}
    crashed = {name: n - crashes_before[name] for name, n in crashes_by_node(lab, point).items()}
    for role in ROLES:  # disarm the directory whose agents did not reach the point
        crashes.marker(role, point).touch()

    new = {i: o for i, o in restores(lab).items() if i not in before}
    assert list(new.values()) == [{"done"}], f"after a crash at {point}: restores {new}"
    (action,) = new
    assert restored_from(lab, action) == backup
    assert restored_lines(lab) == lines_before + 1, (
        f"after a crash at {point}: the backup restored more than once"
    )
    # crash-once per marker directory: each role crashed once if its marker was written, else never; the target
    # ran the step, so its agent is one that crashed (see the module docstring for the other role's crash)
    target = restored_on(lab, action)
    seen = f"after a crash at {point} of the RESTORE on {target}: crashes {crashed}, markers {fired}"
    assert crashed[target] == 1, seen
    for role in ROLES:
        assert sum(crashed[n] for n, r in ROLE_OF.items() if r == role) == int(fired[role]), seen
    assert verify_keys(lab, keys) == []


def test_a_restore_rebuilds_the_cluster_after_a_crash_at_each_of_its_steps(tmp_path: Path) -> None:
    with crash_lab(
        tmp_path, TIMINGS, policy={"auto_restore": True}, backup={"interval": "1h", "keep": 3}
    ) as (
        lab,
        crashes,
    ):
        keys: list[DataKey] = []
        for point in POINTS:
            crash_and_rebuild(lab, crashes, keys, point)
