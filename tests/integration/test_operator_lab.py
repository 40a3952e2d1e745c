"""Operator-requested actions (`kmagent rejoin|evict NODE`): only the wait is waived; every rule still holds, a
quorum must agree, and a refusal names the rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.control import call
from emulator.lab.lab import Lab, LabNode, wait_for
from tests.integration.crashlab import kmagent
from tests.integration.test_election_lab import one_anchor_followed_by_all


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab")
    # a long state_lost_after: nothing automatic happens within the test, only what the operator asks for
    lab.up(
        3, heartbeat="100ms", log=lambda _line: None, agents=True, agent_timings={"state_lost_after": "1h"}
    )
    yield lab
    lab.down()


def status(lab: Lab, node: LabNode) -> dict[str, Any]:
    answer: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=10)
    return answer


def classes(lab: Lab, node: LabNode) -> dict[str, str]:
    return {n["name"]: n["class"] for n in status(lab, node)["nodes"]}


def test_operator_rejoin_waives_the_wait_only(lab: Lab) -> None:
    n1 = lab.nodes()[0]
    names = [n.name for n in lab.nodes()]
    anchor = wait_for(lambda: one_anchor_followed_by_all(lab, names), 60, "an anchor")
    other = next(n for n in lab.nodes() if n.name != anchor)

    healthy = kmagent(lab, other, "rejoin", other.name)
    assert healthy.returncode == 1 and "class:" in healthy.stderr, healthy.stderr  # a HEALTHY node: never
    of_anchor = kmagent(lab, other, "rejoin", anchor)
    assert of_anchor.returncode == 1 and "not-the-anchor" in of_anchor.stderr, of_anchor.stderr
    unknown = kmagent(lab, other, "evict", "node9")
    assert unknown.returncode == 1 and "not a configured member" in unknown.stderr

    target = next(n for n in lab.nodes() if n.name not in (anchor, other.name))
    lab.fault(target.name, "disk-loss")
    wait_for(  # on every other agent: the anchor checks the request again from its own view
        lambda: all(
            classes(lab, n)[target.name] == "STATE_LOST" for n in lab.nodes() if n.name != target.name
        ),
        60,
        f"{target.name} to look STATE_LOST to the other agents",
    )
    assert not status(lab, other)["actions"]["in_flight"]  # state_lost_after is an hour: nothing on its own

    asked = kmagent(lab, other, "rejoin", target.name)  # asked on a host that is not the anchor
    assert asked.returncode == 0 and "accepted by the anchor" in asked.stdout, asked.stderr
    wait_for(lambda: all(c == "HEALTHY" for c in classes(lab, n1).values()), 120, "the cluster to be healed")

    def recorded() -> list[dict[str, Any]]:  # the anchor shares it with every agent once the action is closed
        entries = call(lab.agent_socket(other), "GET", "/v1/history")["entries"]
        return [e for e in entries if e["action"]["target"] == target.name]

    (entry,) = wait_for(recorded, 60, "the REJOIN in the history of every agent")
    assert entry["outcome"] == "done" and entry["action"]["kind"] == "REJOIN"
    assert ["requested_by", f"operator on {other.name}"] in entry["action"]["params"]
    assert len(entry["certificate"]["acks"]) >= 2
