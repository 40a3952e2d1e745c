"""Acceptance of automatic recovery (issue 5): real agents against real emulated faults, with a key workload.

Each test is one scenario on its own 3-node lab (a lab start costs seconds, so each scenario chains several
faults). Every scenario ends with the same proof: every key created before the fault still decrypts on every
node, and a write works. Timings are the lab's (LAB_TIMINGS); deadlines are generous because this runs on small,
loaded machines. Observation windows ("nothing happens for N s") poll the agents' logs and histories, so that a
violation fails at once; they are the length of the claim, never synchronisation.
"""

from __future__ import annotations

import datetime
import http.client
import itertools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.control import ControlError, DaemonNotRunning, call
from emulator.lab.lab import LAB_TIMINGS, Lab, LabNode, wait_for
from emulator.lab.workload import DataKey, create_keys, verify_keys

pytestmark = pytest.mark.slow  # whole-cluster scenarios: in `make test`, not in `make test-debian`

STATE_LOST_AFTER = 3.0  # LAB_TIMINGS
CORRUPT_AFTER = 10.0
QUORUM = 2  # of 3 agents
HEAL = 150.0  # deadline for one REJOIN, detection included (about 30 s on an idle machine)
SETTLE = 90.0
QUIET = 2 * STATE_LOST_AFTER + 10  # "never touched" window after a harmless fault

assert LAB_TIMINGS["state_lost_after"] == "3s" and LAB_TIMINGS["corrupt_after"] == "10s"


@pytest.fixture
def make_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(**options: Any) -> Lab:
        lab = Lab(tmp_path / f"lab{len(labs)}")
        labs.append(lab)
        lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True, **options)
        return lab

    yield make
    for lab in labs:
        lab.down()


# ---- looking at the agents --------------------------------------------------------------------------------------


def status(lab: Lab, node: LabNode) -> dict[str, Any] | None:
    try:
        answer: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=5)
    except (DaemonNotRunning, ControlError, OSError, http.client.HTTPException):
        return None
    return answer


def history(lab: Lab, node: LabNode) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = call(lab.agent_socket(node), "GET", "/v1/history", timeout=5)["entries"]
    return entries


def classes(found: dict[str, Any]) -> dict[str, str | None]:
    return {row["name"]: row["class"] for row in found["nodes"]}


def settled(lab: Lab) -> str | None:
    """The anchor, once every agent answers, sees every node HEALTHY and follows that one anchor."""
    found = [status(lab, n) for n in lab.nodes()]
    if any(s is None for s in found):
        return None
    anchors = {s["anchor"] for s in found if s is not None}
    if len(anchors) != 1 or None in anchors:
        return None
    if not all(set(classes(s).values()) == {"HEALTHY"} for s in found if s is not None):
        return None
    anchor: str = anchors.pop()
    return anchor


def healed(lab: Lab) -> str | None:
    """settled() and the minkms cluster itself whole: 3 members up, one leader, equal commits, writes work."""
    anchor = settled(lab)
    return anchor if anchor is not None and lab.formed(3) else None


def seen_by_all(lab: Lab, name: str, cls: str, held: float = 0.0) -> bool:
    """Every agent classifies `name` as `cls`, for at least `held` seconds on its own clock."""
    for node in lab.nodes():
        found = status(lab, node)
        if found is None:
            return False
        row = next(r for r in found["nodes"] if r["name"] == name)
        if row["class"] != cls or (row["since_seconds"] or 0.0) < held:
            return False
    return True


def non_anchors(lab: Lab, anchor: str) -> list[LabNode]:
    return [n for n in lab.nodes() if n.name != anchor]


_TIME = re.compile(r"^time=(\S+) ")


def events(node: LabNode, event: str) -> list[tuple[float, str]]:
    """(wall time, line) of each `event=...` line in the node's agent log."""
    try:
        text = (Path(node.dir) / "agent" / "kmagent.log").read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        stamp = _TIME.match(line)
        if stamp and f" event={event} " in line + " ":
            when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
            found.append((when, line))
    return found


def field(line: str, key: str) -> str | None:
    match = re.search(rf" {key}=(\"(?:[^\"\\\\]|\\\\.)*\"|\S+)", line)
    return None if match is None else match.group(1).strip('"')


def destructive_lines(lab: Lab) -> list[str]:
    """Every proposal and every step any agent logged."""
    return [
        f"{n.name}: {line}"
        for n in lab.nodes()
        for event in ("proposed", "step_started")
        for _, line in events(n, event)
    ]


def assert_quiet(lab: Lab, window: float, why: str, before: int = 0) -> None:
    """For `window` seconds, no agent proposes or runs a step beyond the `before` lines already logged."""
    deadline = time.monotonic() + window
    while True:
        lines = destructive_lines(lab)
        assert len(lines) <= before, f"{why}, yet:\n" + "\n".join(lines[before:])
        if time.monotonic() >= deadline:
            return
        time.sleep(0.5)  # the sampling rate of this observation, not synchronisation


def kmagent(lab: Lab, node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    """The `kmagent` CLI on `node`'s host, as an operator runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(lab.agent_config(node)), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"kmagent {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc


def rejoins(entries: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["action"]["kind"] == "REJOIN" and e["action"]["target"] == target]


def wait_rejoined(lab: Lab, target: LabNode, count: int = 1) -> tuple[str, dict[str, Any]]:
    """Wait for the cluster to be whole again with `count` REJOINs of `target` done in the anchor's history;
    returns the anchor and the last of them. Fails at once when a REJOIN ends otherwise."""

    def done() -> tuple[str, dict[str, Any]] | None:
        anchor = healed(lab)
        if anchor is None:
            return None
        entries = rejoins(history(lab, lab.node(anchor)), target.name)
        bad = [e for e in entries if e["outcome"] != "done"]
        assert not bad, f"a REJOIN of {target.name} ended {bad[0]['outcome']}: {bad[0]['detail']}"
        return (anchor, entries[-1]) if len(entries) >= count else None

    result: tuple[str, dict[str, Any]] = wait_for(done, HEAL, f"{target.name} to be rejoined and healthy")
    return result


def assert_nothing_lost(lab: Lab, keys: list[DataKey]) -> None:
    """Every key made before the fault decrypts on every node, and a write works (and is read everywhere)."""
    assert verify_keys(lab, keys) == []
    fresh = create_keys(lab, 1, prefix="after")
    assert verify_keys(lab, fresh) == []


def assert_certified_rejoin(entry: dict[str, Any], target: str) -> None:
    assert entry["action"]["kind"] == "REJOIN" and entry["action"]["target"] == target
    assert entry["outcome"] == "done", entry["detail"]
    signers = {ack["signer"] for ack in entry["certificate"]["acks"]}
    assert len(signers) >= QUORUM, f"certificate signed by {signers} only"
    steps = [s["step"] for s in entry["steps"]]
    assert steps == ["fence", "quarantine", "remove", "start", "add", "mark", "verify"], steps
    assert all(s["ok"] for s in entry["steps"])


def quarantined(node: LabNode, action_id: str) -> Path:
    """The target's quarantine directory of `action_id`, which must hold its record (nothing deleted)."""
    root = Path(node.dir) / "agent" / "state" / "quarantine"
    dirs = [d for d in root.iterdir() if d.name.endswith(f"-{action_id}")] if root.is_dir() else []
    assert len(dirs) == 1, f"no quarantine directory of {action_id} under {root}"
    record = json.loads((dirs[0] / "QUARANTINE.json").read_text())
    assert record["action_id"] == action_id and record["source"] == str(node.data.resolve())
    assert sorted(p.name for p in dirs[0].iterdir() if p.name != "QUARANTINE.json") == record["entries"]
    return dirs[0]


# ---- 1, 3, 4, 6a, 7: restarts left alone; a paused disk loss waits, then heals; a disk loss while the agent is
# down is held by the preflight and healed when the agent returns -----------------------------------------------


def test_restarts_are_left_alone_and_disk_losses_are_healed(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    anchor = wait_for(lambda: settled(lab), SETTLE, "every agent to see every node HEALTHY under one anchor")
    keys = create_keys(lab, 5)

    # 3. A node merely restarted (kill: the supervisor restarts it) or stopped for a few seconds is never touched.
    bystander = non_anchors(lab, anchor)[0]
    restarts = lab.programs()[bystander.name]["n_restarts"]
    lab.fault(bystander.name, "kill")
    wait_for(
        lambda: lab.programs()[bystander.name]["n_restarts"] > restarts and settled(lab),
        SETTLE,
        f"{bystander.name} to be restarted and HEALTHY again",
    )
    lab.fault(bystander.name, "stop")
    wait_for(
        lambda: seen_by_all(lab, bystander.name, "DOWN"), SETTLE, f"every agent to see {bystander.name} DOWN"
    )
    lab.fault(bystander.name, "start")
    wait_for(lambda: settled(lab), SETTLE, f"{bystander.name} to be HEALTHY again")
    assert_quiet(lab, QUIET, f"{bystander.name} was only restarted and stopped briefly")
    for node in lab.nodes():
        assert history(lab, node) == [], f"{node.name} recorded an action"
        found = status(lab, node)
        assert found is not None and found["actions"]["in_flight"] is None

    # 6a. Paused: a disk loss is seen, explained, and nothing destructive happens.
    anchor = wait_for(lambda: settled(lab), SETTLE, "the cluster to be settled")
    target = non_anchors(lab, anchor)[-1]
    assert "paused on every agent" in kmagent(lab, lab.node(anchor), "pause", "--reason", "acceptance").stdout
    wait_for(
        lambda: all((s := status(lab, n)) is not None and s["paused"] for n in lab.nodes()),
        60,
        "every agent to be paused",
    )
    lab.fault(target.name, "disk-loss")
    wait_for(
        lambda: seen_by_all(lab, target.name, "STATE_LOST", held=2 * STATE_LOST_AFTER + 5),
        SETTLE,
        f"every agent to see {target.name} STATE_LOST for well over state_lost_after",
    )
    assert_quiet(lab, 0, f"automation is paused while {target.name} is STATE_LOST")

    # 7. explain shows the candidate action, the evidence, and what each agent would answer (all refuse: paused).
    text = kmagent(lab, lab.node(anchor), "explain").stdout
    assert f"REJOIN {target.name}" in text and "Paused for another" in text, text
    assert re.search(r"REFUSES\s+paused", text), text
    explained = json.loads(kmagent(lab, lab.node(anchor), "explain", "--json").stdout)
    assert explained["candidate"]["kind"] == "REJOIN" and explained["candidate"]["target"] == target.name
    assert explained["decision"]["action"] is None and explained["paused_for"] > 0
    row = next(n for n in explained["nodes"] if n["name"] == target.name)
    assert row["cls"] == "STATE_LOST" and row["wants"] == "REJOIN" and row["held_seconds"] >= STATE_LOST_AFTER
    assert "empty" in row["reason"] or "marker" in row["reason"], row["reason"]
    assert any(target.name in line and "STATE_LOST" in line for line in explained["decision"]["evidence"])
    assert {a["agent"] for a in explained["agents"]} == {n.name for n in lab.nodes()}
    assert all(not a["agrees"] and "paused" in a["reason"] for a in explained["agents"]), explained["agents"]
    assert explained["quorum"] == QUORUM and explained["agreeing"] == 0
    rules = {r["rule"]: r["ok"] for r in explained["rules"]}
    assert rules["paused"] is False and rules["class"] and rules["threshold"] and rules["not-the-anchor"]

    # 1. Resumed: the disk loss is healed; the node is back, nothing is lost, writes work.
    resumed = time.time()
    kmagent(lab, lab.node(anchor), "resume")
    anchor, entry = wait_rejoined(lab, target)
    assert_certified_rejoin(entry, target.name)
    proposals = [
        t for n in lab.nodes() for t, line in events(n, "proposed") if field(line, "target") == target.name
    ]
    assert proposals and min(proposals) >= resumed - 0.01, "a REJOIN was proposed before the resume"
    assert_nothing_lost(lab, keys)
    members = lab.cluster_status(lab.node(anchor))["nodes_up"]
    assert len(members) == 3
    # `kmagent history` on another host lists it (the anchor shares every finished action).
    other = next(n for n in lab.nodes() if n.name not in (anchor, target.name))
    listed = wait_for(
        lambda: rejoins(json.loads(kmagent(lab, other, "history", "--json").stdout), target.name),
        60,
        f"{other.name}'s history to list the REJOIN",
    )
    assert_certified_rejoin(listed[0], target.name)
    table = kmagent(lab, other, "history").stdout
    assert re.search(rf"REJOIN\s+{target.name}\s+done", table), table
    # The state was moved aside, never deleted: the wiped disk left nothing but the record.
    quarantined(target, entry["action"]["id"])

    # 4. A disk loss while the host's agent is stopped: the preflight keeps minkms from starting as a fresh
    # cluster; the other nodes still serve reads; when the agent returns, the node is rejoined.
    second = next(n for n in non_anchors(lab, anchor) if n.name != target.name)
    lab.fault(second.name, "agent-stop")
    starts = lab.programs()[second.name]["n_starts"]
    lab.fault(second.name, "disk-loss")
    refused = wait_for(
        lambda: (
            (p := lab.programs()[second.name])["n_starts"] >= starts + 2
            and "preflight failed" in (p["last_error"] or "")
            and p
        ),
        60,
        f"the supervisor to report {second.name}'s start refused by the preflight twice",
    )
    assert refused["state"] in ("failed", "activating")
    assert not lab.probe(second, "live")
    assert "refusing to start minkms" in (Path(second.dir) / "minkms.log").read_text()
    assert verify_keys(lab, keys, [n for n in lab.nodes() if n.name != second.name]) == []
    lab.fault(second.name, "agent-start")
    _, entry = wait_rejoined(lab, second)
    assert_certified_rejoin(entry, second.name)
    assert_nothing_lost(lab, keys)


# ---- 2, 6c, 7: a corrupt database healed only after corrupt_after; the anchor's own disk loss healed by a new one


def test_corruption_waits_for_its_threshold_and_the_anchor_is_healed_by_another(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab(agent_timings={"corrupt_after": f"{CORRUPT_AFTER:g}s"})
    anchor = wait_for(lambda: settled(lab), SETTLE, "every agent to see every node HEALTHY under one anchor")
    keys = create_keys(lab, 5)

    # 2. Corrupt: minkms crash-loops; REJOIN only once CORRUPT has held corrupt_after.
    target = non_anchors(lab, anchor)[-1]
    lab.fault(target.name, "corrupt")
    faulted = time.time()  # after the fault: any error in this stamp makes the check below stricter

    # 7. Below the threshold, explain names the candidate, the evidence and each agent's answer.
    def corrupt_below_threshold() -> dict[str, Any] | None:
        found = json.loads(kmagent(lab, lab.node(anchor), "explain", "--json").stdout)
        row = next(n for n in found["nodes"] if n["name"] == target.name)
        return found if row["cls"] == "CORRUPT" else None

    explained = wait_for(corrupt_below_threshold, SETTLE, f"the anchor to see {target.name} CORRUPT")
    assert explained["candidate"]["kind"] == "REJOIN" and explained["candidate"]["target"] == target.name
    row = next(n for n in explained["nodes"] if n["name"] == target.name)
    assert row["wants"] == "REJOIN" and row["needs_seconds"] == CORRUPT_AFTER
    assert {a["agent"] for a in explained["agents"]} == {n.name for n in lab.nodes()}
    if row["held_seconds"] < CORRUPT_AFTER:  # explain was asked in time (nearly always): the threshold holds
        threshold = next(r for r in explained["rules"] if r["rule"] == "threshold")
        assert not threshold["ok"] and "needs 10s" in threshold["reason"], threshold
        mine = next(a for a in explained["agents"] if a["agent"] == anchor)
        assert not mine["agrees"] and "threshold" in mine["reason"] and mine["source"] == "own view"
        assert explained["decision"]["action"] is None
    assert any(target.name in line and "CORRUPT" in line for line in explained["decision"]["evidence"])

    anchor, entry = wait_rejoined(lab, target)
    assert_certified_rejoin(entry, target.name)
    proposed = [(t, line) for n in lab.nodes() for t, line in events(n, "proposed")]
    assert [field(line, "target") for _, line in proposed] == [target.name], proposed
    when, line = proposed[0]
    assert when - faulted >= CORRUPT_AFTER, f"proposed {when - faulted:.1f}s after the fault: {line}"
    assert f"{target.name}: CORRUPT for" in line, line
    # The corrupt database was moved aside, not deleted.
    qdir = quarantined(target, entry["action"]["id"])
    assert (qdir / "kms.db").stat().st_size > 0
    assert_nothing_lost(lab, keys)

    # 6c. The anchor is never the target: its own disk loss is healed by the next anchor.
    old = lab.node(anchor)
    old_term = max(s["term"] for n in lab.nodes() if (s := status(lab, n)) is not None)
    lab.fault(old.name, "disk-loss")

    def new_anchor() -> str | None:
        found = [status(lab, n) for n in lab.nodes() if n.name != old.name]
        names = {s["anchor"] for s in found if s is not None}
        return names.pop() if len(names) == 1 and None not in names and old.name not in names else None

    successor = wait_for(new_anchor, SETTLE, f"an anchor other than {old.name} to be elected")
    _, entry = wait_rejoined(lab, old)
    assert_certified_rejoin(entry, old.name)
    assert entry["agent"] == successor and entry["role"] == "anchor"
    assert entry["certificate"]["term"] > old_term
    by = {
        n.name: [line for _, line in events(n, "proposed") if field(line, "target") == old.name]
        for n in lab.nodes()
    }
    assert by[old.name] == [] and by[successor], by  # proposed by the new anchor, never by the target itself
    assert_nothing_lost(lab, keys)


# ---- 6b: the budget escalates a node that keeps failing; `kmagent ack` releases it --------------------------------


def test_budget_escalates_a_node_that_keeps_failing_until_ack(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(agent_policy={"actions_per_hour": 1})
    anchor = wait_for(lambda: settled(lab), SETTLE, "every agent to see every node HEALTHY under one anchor")
    keys = create_keys(lab, 3)
    target = non_anchors(lab, anchor)[-1]
    lab.fault(target.name, "disk-loss")
    anchor, first = wait_rejoined(lab, target)
    assert_certified_rejoin(first, target.name)

    # The second loss within the hour: over budget, so ESCALATED, and nothing is done.
    done_lines = len(destructive_lines(lab))
    lab.fault(target.name, "disk-loss")
    wait_for(
        lambda: (s := status(lab, lab.node(anchor))) is not None and target.name in s["actions"]["escalated"],
        SETTLE,
        f"the anchor to escalate {target.name}",
    )
    explained = json.loads(kmagent(lab, lab.node(anchor), "explain", "--json").stdout)
    refusals = {r["rule"]: r["reason"] for r in explained["rules"] if not r["ok"]}
    assert explained["candidate"]["target"] == target.name and explained["decision"]["action"] is None
    assert "escalated" in refusals and "budget" in refusals, refusals
    assert "ack" in refusals["escalated"] and "1 per hour" in refusals["budget"]
    assert target.name in explained["decision"]["escalate"] or target.name in refusals["escalated"]
    assert_quiet(lab, QUIET, f"{target.name} is ESCALATED", before=done_lines)
    assert len(rejoins(history(lab, lab.node(anchor)), target.name)) == 1
    assert not lab.probe(target, "live")  # held down by the preflight, not started as a fresh cluster

    # `kmagent ack` on another host than the anchor's releases it everywhere (the ack travels in the reports) and
    # starts its budget afresh: it is healed, and not escalated again.
    other = next(n for n in lab.nodes() if n.name not in (anchor, target.name))
    acked = time.time()
    assert "acknowledged" in kmagent(lab, other, "ack", target.name).stdout

    def healed_or_escalated_again() -> tuple[str, dict[str, Any]] | None:
        again = [t for t, line in events(lab.node(anchor), "escalated") if t >= acked]
        assert not again, f"{target.name} escalated again after the ack: {again}"
        anchor_now = healed(lab)
        entries = rejoins(history(lab, lab.node(anchor_now)), target.name) if anchor_now else []
        return (anchor_now, entries[-1]) if anchor_now and len(entries) == 2 else None

    _, second = wait_for(healed_or_escalated_again, HEAL, f"{target.name} to be healed after the ack")
    assert_certified_rejoin(second, target.name)
    assert_nothing_lost(lab, keys)


# ---- 5: two nodes lose their disks at once -----------------------------------------------------------------------


def test_two_disk_losses_are_healed_one_after_the_other(make_lab: Callable[..., Lab]) -> None:
    """Two of three: the last healthy node (the anchor) is never touched; the lost ones are removed to make room
    and rejoined, one action at a time (docs/operations.md, "Several failed nodes at once")."""
    lab = make_lab()
    anchor = wait_for(lambda: settled(lab), SETTLE, "every agent to see every node HEALTHY under one anchor")
    keys = create_keys(lab, 3)
    lost = {n.name for n in non_anchors(lab, anchor)}
    for name in sorted(lost):
        lab.fault(name, "disk-loss")

    def finished() -> list[dict[str, Any]] | None:
        proposed = [field(line, "target") for n in lab.nodes() for _, line in events(n, "proposed")]
        assert anchor not in proposed, f"the last healthy node {anchor} was proposed as a target: {proposed}"
        # A step that ran out its whole timeout is stuck, not unlucky: fail now rather than after its retries.
        for _, line in events(lab.node(anchor), "step_failed"):
            assert "timed out" not in (field(line, "detail") or ""), f"a step is stuck: {line}"
        entries = history(lab, lab.node(anchor))
        bad = [e for e in entries if e["outcome"] != "done"]
        assert not bad, f"{bad[0]['action']['id']} ended {bad[0]['outcome']}: {bad[0]['detail']}"
        done = {e["action"]["target"] for e in entries if e["action"]["kind"] == "REJOIN"}
        return entries if done == lost and healed(lab) == anchor else None

    entries = wait_for(finished, 3 * HEAL, "both lost nodes to be rejoined and the cluster whole")
    assert {e["action"]["target"] for e in entries} == lost, "an action touched the last healthy node"
    spans = sorted((e["started"], e["finished"], e["action"]["id"]) for e in entries)
    for a, b in itertools.pairwise(spans):
        assert a[1] <= b[0], f"{a[2]} and {b[2]} overlapped: {spans}"
    for name in lost:
        assert_certified_rejoin(rejoins(entries, name)[-1], name)
    assert_nothing_lost(lab, keys)
