"""The documented single-node recovery runbook (reference/minkms.md §5), scripted with perfect knowledge.

It is what an operator does by hand: stop the failed node and empty its storage path, `minkms edit --rm` its
ID on a healthy node, start it fresh, `minkms add` it from the healthy node, watch until it has caught up.
It is the manual demo (`python -m emulator.lab.demo --manual`) and the oracle that the agent's recovery time is measured against.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emulator.client import CLIError
from emulator.lab.lab import Lab, LabError, LabNode, wait_for, wipe


@dataclass
class Step:
    name: str
    command: str
    started: float
    seconds: float = 0.0


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(s.seconds for s in self.steps)


def healthy_anchor(lab: Lab, exclude: LabNode) -> tuple[LabNode, dict[str, Any]]:
    """A live member other than `exclude`, preferring the leader, with the cluster status it reports."""
    best: tuple[LabNode, dict[str, Any]] | None = None
    for node in lab.nodes():
        if node.name == exclude.name or not lab.probe(node, "ready"):
            continue
        try:
            status = lab.cluster_status(node)
        except CLIError:
            continue
        me = next((s for s in status.get("nodes_up", {}).values() if s.get("host") == node.host), None)
        if me is None or node.host not in me.get("nodes", {}).values():
            continue
        if me.get("role") == "Leader":
            return node, status
        best = best or (node, status)
    if best is None:
        raise LabError("no healthy member left to recover from: this runbook needs at least one")
    return best


def rejoin(lab: Lab, name: str, log: Callable[[str], None] = print, timeout: float = 60.0) -> Timeline:
    target = lab.node(name)
    anchor, status = healthy_anchor(lab, target)
    timeline = Timeline()

    def step(title: str, command: str, action: Callable[[], object]) -> None:
        log(f"[{time.monotonic() - timeline.started:6.2f}s] {title}\n           $ {command}")
        started = time.monotonic()
        action()
        timeline.steps.append(Step(title, command, started, time.monotonic() - started))

    members: dict[str, str] = {}
    for up in status.get("nodes_up", {}).values():
        if up.get("host") == anchor.host:
            members = up.get("nodes", {})
    node_id = next((nid for nid, host in members.items() if host == target.host), None)
    log(
        f"healthy node: {anchor.name} ({anchor.host}); {target.name} is "
        + (f"node {node_id} of the cluster" if node_id is not None else "not a member any more")
    )

    def stop_and_wipe() -> None:
        lab.fault(target.name, "stop")
        wait_for(lambda: not lab.probe(target, "live", 0.5), timeout, f"{target.name} to stop")
        wipe(target.data)

    step(
        f"1. stop {target.name} and delete everything in its storage path",
        f"systemctl stop minkms && rm -rf {target.data}/*",
        stop_and_wipe,
    )

    if node_id is not None:

        def edit() -> None:
            lab.minkms("edit", anchor.endpoint, "--rm", node_id)
            wait_for(
                lambda: target.host not in _members(lab, anchor).values(),
                timeout,
                f"node {node_id} to leave the cluster definition",
            )

        step(
            f"2. remove node {node_id} through {anchor.name}",
            f"minkms edit {anchor.endpoint} --rm {node_id}",
            edit,
        )

    def start() -> None:
        lab.fault(target.name, "start")
        wait_for(lambda: lab.probe(target, "live"), timeout, f"{target.name} to start")

    step(f"3. start {target.name} fresh", "systemctl start minkms", start)

    step(
        f"4. add {target.name} back through {anchor.name}",
        f"minkms add {anchor.endpoint} {target.endpoint}",
        lambda: lab.minkms("add", anchor.endpoint, target.endpoint),
    )

    def verify() -> None:
        size = len(_members(lab, anchor))  # other nodes may be out of the cluster: wait for its members only
        wait_for(lambda: lab.formed(size), timeout, "the cluster to be whole and writable")

    step("5. wait until every node is up, caught up, and writes work", "minkms stat", verify)
    log(f"[{time.monotonic() - timeline.started:6.2f}s] {target.name} recovered")
    return timeline


def _members(lab: Lab, node: LabNode) -> dict[str, str]:
    status = lab.cluster_status(node)
    for up in status.get("nodes_up", {}).values():
        if up.get("host") == node.host:
            members: dict[str, str] = up.get("nodes", {})
            return members
    return {}
