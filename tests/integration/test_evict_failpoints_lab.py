"""Kill -9 the anchor at every journaled step of EVICT: the isolated node is still removed exactly once, writes
work again on the survivors, nothing acknowledged is lost, and after the heal it is rejoined (DESIGN §4.4, §5, §8;
REJOIN's steps: test_failpoints_lab.py).

The lab, its failpoint markers and roles are those of `tests.integration.crashlab`. Each case cuts node3 (never
the anchor) off the network with nftables; after `evict_after` (30 s, its floor) the two others evict it. Every
EVICT step runs on the anchor, so the crash is armed for the "anchors" role: whichever of node1 and node2 is the
anchor dies there, once. With one node cut off, quorum is 2 of 3: while the dead anchor's agent restarts, the
other agent cannot act alone. The restarted agent grants no vote for one lease, but the other one still grants
it its vote (its promise was to that very candidate), so in practice the crashed anchor is elected again and
resumes the action from its own journal, re-certified in its new term. Expected, hence the generous deadlines.

What each point proves:
* `remove.intent`: the journal holds an intent and nothing happened; the resumed remove runs `edit --rm` once.
* `remove.outcome`: the node was removed but the outcome never journaled (in doubt); the resumed remove finds
  the node's host out of the membership and does nothing ("not a member: nothing to remove").
* `verify.*`: the remove is journaled done and is not run again; the read-only verify runs again.
* the last case: `remove.outcome` again, but the cut heals at once, so that the node is back (EVICTED) when the
  remove is resumed, typically by the other agent, elected with the returning node's vote and holding only its
  ack: no journal of the steps, so it re-runs the remove through the same membership check.
In every case the first certified EVICT is the one recorded, done: the crash never aborts it (an abort would
leave the dead node a member and need a second EVICT, or record a removal that happened as if it had not).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from agent.core import playbooks
from emulator.lab.lab import Lab, LabNode, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys
from tests.integration.crashlab import (
    HEAL_TIMEOUT,
    PHASES,
    TARGET,
    Crashes,
    cannot_isolate,
    check_histories,
    check_proposals,
    check_quarantines,
    crash_lab,
    crash_lines,
    kinds,
    log_path,
    log_text,
    outcomes,
    quiet,
    settle,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(cannot_isolate() is not None, reason=cannot_isolate() or ""),
]

EVICT_AFTER = 30.0  # the config floor
# No cooldown to wait out between the cases' EVICTs of the same node.
TIMINGS = {"evict_after": f"{EVICT_AFTER:g}s", "cooldown": "1s"}
CASES = [
    ("target" if step.runs_on == "target" else "anchors", f"evict.{step.name}.{phase}")
    for step in playbooks.EVICT
    for phase in PHASES
]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Crashes]]:
    """One lab for every case: each starts from a cluster at rest (`settle`) and leaves one behind."""
    with crash_lab(tmp_path_factory.mktemp("evict-failpoints"), TIMINGS) as found:
        yield found


@pytest.fixture(scope="module")
def keys(lab: tuple[Lab, Crashes]) -> list[DataKey]:
    """Keys acknowledged before any case: every case checks that they still decrypt everywhere."""
    return create_keys(lab[0], 4)


def ls_hosts(lab: Lab, node: LabNode) -> list[str]:
    """The member hosts `minkms ls` lists through `node`, as an operator would read them."""
    rows = lab.minkms("ls", node=node).stdout.splitlines()[1:]
    return [row.split()[-1] for row in rows if row.strip()]


def removals(lab: Lab, action: str) -> list[tuple[str, str]]:
    """(time, detail) of every remove step the anchors logged done for `action` (times sort as strings: one
    host's clock, one format)."""
    line = re.compile(rf"^time=(\S+) .*event=step_done action={re.escape(action)} step=remove detail=(.*)$")
    found = [
        m for n in lab.nodes() if n.name != TARGET for m in map(line.search, log_text(n).splitlines()) if m
    ]
    return [(m[1], m[2]) for m in found]


def saw_itself_evicted(node: LabNode, since: int) -> str | None:
    """The time at which the node's agent first logged its own class turning EVICTED after byte `since`."""
    text = log_path(node).read_bytes()[since:].decode(errors="replace")
    stamps = re.findall(
        rf"^time=(\S+) .*event=class_changed node={node.name} .*now=EVICTED", text, re.MULTILINE
    )
    return stamps[0] if stamps else None


def new_actions(lab: Lab, before: set[str], nodes: list[LabNode] | None = None) -> dict[str, set[str]]:
    """The actions recorded since `before` in the histories of `nodes` (default: all), with their outcomes."""
    return {i: o for i, o in outcomes(lab, nodes).items() if i not in before}


def wait_rejoined(lab: Lab, before: set[str], what: str) -> dict[str, set[str]]:
    """Once the cut is healed: wait for the target's REJOIN and a cluster at rest, and check what it must be: one
    EVICT and one REJOIN of the target since `before`, both done, three members, every key there, each action
    once in each history, proposals only of what the classes called for, one quarantine per REJOIN."""

    def rejoined() -> bool:
        return len(new_actions(lab, before)) > 1 and quiet(lab) is not None

    wait_for(rejoined, HEAL_TIMEOUT, f"{TARGET} to rejoin after {what}")
    new = new_actions(lab, before)
    assert all(o == {"done"} for o in new.values()), f"after {what}: actions {new}"
    assert sorted(kinds(lab, set(new)).values()) == [("EVICT", TARGET), ("REJOIN", TARGET)], new
    assert sorted(ls_hosts(lab, lab.node(TARGET))) == sorted(n.host for n in lab.nodes())
    check_histories(lab)
    check_proposals(lab, {"EVICT": "UNREACHABLE", "REJOIN": "EVICTED"})
    check_quarantines(lab)
    return new


@pytest.mark.parametrize(("role", "point"), CASES, ids=[p for _, p in CASES])
def test_an_eviction_completes_once_after_a_crash_of_the_anchor_at(
    lab: tuple[Lab, Crashes], keys: list[DataKey], role: str, point: str
) -> None:
    cluster, crashes = lab
    settle(cluster)
    survivors = [n for n in cluster.nodes() if n.name != TARGET]
    before = set(outcomes(cluster))
    lines_before = crash_lines(cluster, role, point)
    crashes.arm(role, point)
    what = f"a crash of the {role} at {point}"

    cluster.fault(TARGET, "isolate")
    try:
        wait_for(lambda: crashes.fired(role, point), EVICT_AFTER + HEAL_TIMEOUT, what)
        evicted = wait_for(
            lambda: new_actions(cluster, before, survivors), HEAL_TIMEOUT, f"the EVICT to finish after {what}"
        )

        # One EVICT of the target, done: not an aborted try followed by another one.
        assert list(evicted.values()) == [{"done"}], f"after {what}: actions {evicted}"
        (evict,) = evicted
        assert kinds(cluster, {evict}) == {evict: ("EVICT", TARGET)}

        # The target is out, once: `minkms ls` on each survivor lists the two of them, and exactly one remove
        # ran `edit --rm` (in doubt after an outcome crash, the rerun found nothing to remove).
        for node in survivors:
            assert sorted(ls_hosts(cluster, node)) == sorted(n.host for n in survivors), node.name
        done = [detail for _, detail in removals(cluster, evict)]
        assert done, f"no remove step done for {evict}"
        expected = 0 if point == "evict.remove.outcome" else 1
        assert sum(d.startswith('"removed node') for d in done) == expected, done
        assert all(d.startswith('"removed node') or "nothing to remove" in d for d in done), done

        # Writes work again on the survivors, and what was acknowledged before is still there.
        assert all(cluster.probe(n, "ready?write") for n in survivors)
        assert (
            verify_keys(cluster, [*keys, *create_keys(cluster, 1, "after-evict", survivors)], survivors) == []
        )
    finally:
        cluster.fault(TARGET, "heal")

    # After the heal the target finds itself evicted and is rejoined: three healthy members again.
    wait_rejoined(cluster, before, what)
    # The crash happened where it was armed, once, and the agent said so before dying.
    assert crash_lines(cluster, role, point) == lines_before + 1, f"no crash line for {point}"
    assert verify_keys(cluster, keys) == []


def test_an_eviction_whose_node_returns_during_the_anchor_crash_after_its_remove_is_done(
    lab: tuple[Lab, Crashes], keys: list[DataKey]
) -> None:
    """The anchor dies after `edit --rm` ran and before its outcome was journaled, and the cut heals at once:
    when an anchor resumes the EVICT, the node is back, reporting itself EVICTED. The remove is in doubt, so it
    runs again: its host is no longer a member, so there is nothing to remove, and the EVICT is done (it did
    remove the node) whatever the node's class is now. Then the node is rejoined. A class check before the
    membership check would fail that remove three times and record the EVICT as aborted: a history that says
    the node was never removed, when it was (the daemon did so until `actions.check_remove`)."""
    cluster, crashes = lab
    settle(cluster)
    point = "evict.remove.outcome"
    before = set(outcomes(cluster))
    log_start = len(log_path(cluster.node(TARGET)).read_bytes())
    crashes.arm("anchors", point)
    cluster.fault(TARGET, "isolate")
    try:
        wait_for(lambda: crashes.fired("anchors", point), EVICT_AFTER + HEAL_TIMEOUT, f"a crash at {point}")
    finally:
        cluster.fault(TARGET, "heal")
    new = wait_rejoined(cluster, before, f"a crash at {point} and an immediate heal")
    (evict,) = (i for i, kind in kinds(cluster, set(new)).items() if kind[0] == "EVICT")
    done = removals(cluster, evict)
    assert done and all("nothing to remove" in detail for _, detail in done), done
    # The case happened: the node saw itself EVICTED before the resumed remove ran. Not forced, but a restart
    # and a new election take several seconds (the restarted agent grants no vote for one lease), while the
    # node is back within a probe or two of the heal.
    evicted_at = saw_itself_evicted(cluster.node(TARGET), log_start)
    assert evicted_at is not None and evicted_at < min(t for t, _ in done), (evicted_at, done)
    assert verify_keys(cluster, keys) == []
