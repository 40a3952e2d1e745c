"""Stalls, not crashes (issue 12): real agents in a 3-node lab, frozen or left with a hung volume at the worst
moment. Each case is a defect seen in the lab, and fails on the code before its fix:

1. an anchor frozen (SIGSTOP, as a paused VM or a hung disk) just before the `remove` of a REJOIN, while another
   anchor finishes the same REJOIN and the target is re-added under a new minkms node id: once it wakes, the old
   anchor must not remove the healed node (it removed "the id the host has now");
2. a storage probe that hangs right after a one-round STATE_LOST blip: the node must go STALLED, never be
   rejoined (its last verdict was repeated as fresh); a HEALTHY anchor whose volume hangs must not stay anchor;
3. no STATE_LOST right after `mark` (a probe that missed the marker, classified with a journal that had the mark).

Freezes end when the test says so (SIGCONT), not on a timer: the failpoint's own wake-up is a bound (600 s).
Observation windows ("nothing happens for N s") poll for the violation, so that it fails at once; their length
is the claim, never synchronisation.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent import failpoints
from agent.io.storage import MARKER_NAME
from emulator.lab import supervisor
from emulator.lab.lab import Lab, LabNode, wait_for
from tests.integration.crashlab import (
    HEAL_TIMEOUT,
    TARGET,
    check_histories,
    kinds,
    log_text,
    outcomes,
    quarantines,
    quiet,
    settle,
    status,
)

pytestmark = pytest.mark.slow

STATE_LOST_AFTER = 5.0
# A short cooldown: a needless second REJOIN would follow within seconds, inside the observation windows.
TIMINGS = {"state_lost_after": f"{STATE_LOST_AFTER:g}s", "cooldown": "1s"}
POLICY = {"actions_per_hour": 100}
WINDOW = 3 * STATE_LOST_AFTER
FREEZE = 600  # the failpoint's own bound; the test wakes the agent itself


@contextlib.contextmanager
def stall_lab(directory: Path, env: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[Lab]:
    lab = Lab(directory / "lab")

    def prepare(lab: Lab) -> None:
        for name, variables in (env or {}).items():
            lab.set_agent_env(name, variables)

    try:
        lab.up(
            3,
            heartbeat="100ms",
            log=lambda _line: None,
            agents=True,
            prepare=prepare,
            agent_timings=TIMINGS,
            agent_policy=POLICY,
        )
        yield lab
    finally:
        lab.down()


def row(found: Mapping[str, Any], name: str) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = found.get("nodes", [])
    return next((n for n in nodes if n.get("name") == name), {})


def class_of(lab: Lab, viewer: LabNode, name: str) -> str | None:
    return row(status(lab, viewer), name).get("class")


def member_id(lab: Lab, host: str, viewer: LabNode) -> int | None:
    """The minkms node id of `host` in the membership `viewer`'s own minkms reports (None: not a member, or the
    viewer cannot say)."""
    members = status(lab, viewer).get("local", {}).get("minkms", {}).get("members") or {}
    return next((int(nid) for nid, h in members.items() if h == host), None)


def observe_for(seconds: float, violation: Callable[[], str | None], what: str) -> None:
    """Poll `violation` for `seconds` (the length of the claim): None while all is well, else what went wrong."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        found = violation()
        assert found is None, f"{what}: {found}"
        time.sleep(0.25)


def signal_agent(lab: Lab, node: LabNode, sig: str) -> None:
    reply = supervisor.request(lab.sock, {"op": "kill", "name": f"{node.name}-agent", "signal": sig})
    assert reply.get("ok"), f"{sig} to the agent of {node.name}: {reply.get('error')}"


# ---- 1. a deposed anchor, frozen before `remove` ---------------------------------------------------------------


@pytest.mark.parametrize("phase", ["intent", "command"])
def test_a_frozen_anchor_never_removes_the_node_another_anchor_healed(tmp_path: Path, phase: str) -> None:
    """`rejoin.remove.intent`: frozen after the lease check of its step loop and the intent, before it reads the
    membership; on waking, the certified node id is no longer a member: nothing is removed (the fence by id).
    `rejoin.remove.command`: frozen right before the command would leave; on waking the lease is gone: the command
    is not started (the fence by lease). node1 and node2 share one marker: whichever is anchor freezes, once."""
    point = f"rejoin.remove.{phase}"
    marks = tmp_path / "failpoints"
    marks.mkdir()
    armed = {failpoints.ENV: f"{point}=freeze-once({FREEZE})", failpoints.DIR_ENV: str(marks)}
    with stall_lab(tmp_path, {"node1": armed, "node2": armed}) as lab:
        settle(lab)
        target = lab.node(TARGET)
        before = set(outcomes(lab))
        witness = next(n for n in lab.nodes() if n.name not in (TARGET, "node1"))
        old_id = member_id(lab, target.host, witness)
        assert old_id is not None
        lab.fault(TARGET, "disk-loss")
        wait_for(lambda: (marks / f"{point}.fired").exists(), HEAL_TIMEOUT, f"an anchor to freeze at {point}")
        frozen = next(n for n in lab.nodes() if f"failpoint {point}" in log_text(n))
        others = [n for n in lab.nodes() if n.name != frozen.name]
        viewer = next(n for n in others if n.name != TARGET)  # the anchor that finishes the REJOIN

        def healed_by_another() -> bool:
            new = set(outcomes(lab, others)) - before
            return bool(new) and all(class_of(lab, n, TARGET) == "HEALTHY" for n in others) and lab.formed(3)

        wait_for(
            healed_by_another,
            HEAL_TIMEOUT,
            f"another anchor to finish the REJOIN while {frozen.name} is frozen",
        )
        new_id = member_id(lab, target.host, viewer)
        assert new_id is not None and new_id != old_id, f"{TARGET} re-added as {new_id}, was {old_id}"
        logged = len(log_text(frozen))

        signal_agent(lab, frozen, "CONT")
        stopped = re.compile(
            r"event=command_fenced|event=step_done .*step=remove .*not a member|event=lease_lost_mid_action"
        )
        wait_for(
            lambda: stopped.search(log_text(frozen)[logged:]),
            HEAL_TIMEOUT,
            f"{frozen.name}, woken, to give up the remove",
        )
        after_wake = log_text(frozen)[logged:]
        if phase == "intent":
            assert re.search(rf"step=remove .*node {old_id} is not a member", after_wake), after_wake[-3000:]
        else:
            assert "event=command_fenced" in after_wake, after_wake[-3000:]

        def violation() -> str | None:
            now_id = member_id(lab, target.host, viewer)
            if now_id != new_id:
                return f"{TARGET} is node {now_id} now, was re-added as {new_id}"
            extra = set(outcomes(lab, others)) - before
            if len(extra) > 1:
                return f"a second action: {sorted(extra)}"
            return None

        observe_for(WINDOW, violation, f"after {frozen.name} woke up")
        wait_for(lambda: quiet(lab), HEAL_TIMEOUT, "the cluster to be at rest")
        new = {i: o for i, o in outcomes(lab).items() if i not in before}
        assert len(new) == 1 and list(new.values()) == [{"done"}], new
        assert list(kinds(lab, set(new)).values()) == [("REJOIN", TARGET)]
        assert quarantines(target) == list(new)
        check_histories(lab)


# ---- 2. a hung storage probe -----------------------------------------------------------------------------------


class HungMarker:
    """The node's identity marker replaced by a FIFO that this test holds open: the agent's storage probe blocks
    reading it (as on a volume that stops answering) until `release` puts the marker back and lets the read end."""

    def __init__(self, node: LabNode) -> None:
        self.path = node.data / MARKER_NAME
        self.content = self.path.read_bytes()
        self.fd: int | None = None

    def hang(self) -> None:
        fifo = self.path.with_name(f"{MARKER_NAME}.fifo-test")
        os.mkfifo(fifo, 0o600)
        self.fd = os.open(fifo, os.O_RDWR)  # a writer that never writes: readers block in read()
        os.rename(fifo, self.path)

    def release(self) -> None:
        tmp = self.path.with_name(f"{MARKER_NAME}.tmp-test")
        tmp.write_bytes(self.content)
        os.rename(tmp, self.path)  # new probes read the real marker
        if self.fd is not None:
            os.write(self.fd, self.content)  # the hung read gets it, then EOF
            os.close(self.fd)
            self.fd = None


def test_a_hung_probe_after_a_blip_is_stalled_never_rejoined(tmp_path: Path) -> None:
    """The marker vanishes for one round (a STATE_LOST blip), then the probe hangs. Before the fix, the blip was
    repeated as a fresh verdict for ever, and after state_lost_after the healthy node was fenced and quarantined."""
    with stall_lab(tmp_path) as lab:
        settle(lab)
        target = lab.node(TARGET)
        before = set(outcomes(lab))
        logged = {n.name: len(log_text(n)) for n in lab.nodes()}
        hung = HungMarker(target)
        try:
            hung.path.unlink()
            wait_for(lambda: class_of(lab, target, TARGET) == "STATE_LOST", 60, f"{TARGET} to see the blip")
            hung.hang()
            wait_for(
                lambda: all(class_of(lab, n, TARGET) == "STALLED" for n in lab.nodes()),
                60,
                f"every agent to see {TARGET} STALLED",
            )

            def violation() -> str | None:
                acted = [
                    line
                    for n in lab.nodes()
                    for line in log_text(n)[logged[n.name] :].splitlines()
                    if "event=proposed" in line or "event=ack_given" in line
                ]
                if acted:
                    return f"acted on a stalled node: {acted[:3]}"
                seen = {n.name: class_of(lab, n, TARGET) for n in lab.nodes()}
                if any(c not in ("STALLED", None) for c in seen.values()):
                    return f"{TARGET} is {seen} while its probe hangs"
                return None

            observe_for(WINDOW, violation, f"while {TARGET}'s storage probe hangs")
        finally:
            hung.release()
        wait_for(
            lambda: all(class_of(lab, n, TARGET) == "HEALTHY" for n in lab.nodes()),
            HEAL_TIMEOUT,
            f"{TARGET} HEALTHY again once its volume answers",
        )
        assert set(outcomes(lab)) == before
        assert quarantines(target) == []


def test_an_anchor_whose_volume_hangs_is_not_counted_healthy(tmp_path: Path) -> None:
    """A HEALTHY anchor whose volume stops answering: STALLED for everyone, so no longer eligible: another agent
    becomes anchor; nothing is proposed against it. Before the fix it stayed HEALTHY (and anchor) for ever."""
    with stall_lab(tmp_path) as lab:
        anchor = lab.node(settle(lab))
        before = set(outcomes(lab))
        hung = HungMarker(anchor)
        try:
            hung.hang()
            wait_for(
                lambda: all(class_of(lab, n, anchor.name) == "STALLED" for n in lab.nodes()),
                60,
                f"every agent to see the anchor {anchor.name} STALLED",
            )

            def new_anchor() -> str | None:
                found = {n.name: status(lab, n).get("anchor") for n in lab.nodes()}
                chosen = set(found.values())
                return (
                    chosen.pop()
                    if len(chosen) == 1 and None not in chosen and anchor.name not in chosen
                    else None
                )

            wait_for(new_anchor, HEAL_TIMEOUT, f"an anchor other than {anchor.name}")
            assert set(outcomes(lab)) == before
        finally:
            hung.release()
        wait_for(
            lambda: all(class_of(lab, n, anchor.name) == "HEALTHY" for n in lab.nodes()),
            HEAL_TIMEOUT,
            f"{anchor.name} HEALTHY again",
        )
        assert set(outcomes(lab)) == before


# ---- 3. no STATE_LOST blip after `mark` ------------------------------------------------------------------------

RECOVERIES = int(os.environ.get("KMAGENT_STALL_LAB_RECOVERIES", "3"))


def test_no_state_lost_blip_after_mark(tmp_path: Path) -> None:
    """The target's own verdicts after its REJOIN's `mark`, over several recoveries (KMAGENT_STALL_LAB_RECOVERIES,
    3 in CI; 20 on demand): never STATE_LOST again until the next fault."""
    with stall_lab(tmp_path) as lab:
        target = lab.node(TARGET)
        for round_no in range(RECOVERIES):
            settle(lab)
            before: set[str] = set(outcomes(lab))
            logged = len(log_text(target))
            lab.fault(TARGET, "disk-loss")

            def recovered(before: set[str] = before) -> bool:
                return bool(set(outcomes(lab)) - before) and quiet(lab) is not None

            wait_for(recovered, HEAL_TIMEOUT, f"recovery {round_no + 1} of {RECOVERIES}")
            after = log_text(target)[logged:]
            marked = after.find("step=mark")
            assert marked >= 0, f"recovery {round_no + 1}: no mark step in {TARGET}'s log"
            lost = [
                line
                for line in after[marked:].splitlines()
                if "event=class_changed" in line and "now=STATE_LOST" in line
            ]
            assert not lost, f"recovery {round_no + 1}: STATE_LOST after mark: {lost}"
