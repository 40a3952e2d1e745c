"""Issue 5, EVICT acceptance: a node cut off the network (`kmlab fault NODE isolate`) is evicted by the majority
after `evict_after`, writes work again on the majority, the isolated agent does nothing destructive, and after
the heal the node finds itself evicted and is rejoined. A shorter cut never evicts anyone.

The cut is honest: the agents' peer links, their live probes of other nodes' minkms and the emulated minkms'
own cluster traffic all leave from the node's address, and nftables drops everything between that address and
the other nodes' addresses.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.io.control import ControlError, DaemonNotRunning, call
from agent.io.minkms import Minkms, MinkmsSettings
from emulator import wire
from emulator.client import CLIError
from emulator.lab import cli as kmlab
from emulator.lab.lab import Lab, LabError, LabNode, wait_for
from emulator.lab.workload import create_keys, verify_keys
from emulator.server import _source_address
from tests.integration.crashlab import cannot_isolate, needs_nft

EVICT_AFTER = 30.0  # the config floor; the lab's agents get exactly this
FORBIDDEN_WHILE_CUT = ("event=ack_given", "event=step_started", "event=proposed", "event=certified")


# ---- helpers --------------------------------------------------------------------------------------------------
def status(lab: Lab, node: LabNode) -> dict[str, Any] | None:
    try:
        reply: dict[str, Any] = call(lab.agent_socket(node), "GET", "/v1/status", timeout=5)
        return reply
    except (DaemonNotRunning, ControlError, OSError):
        return None


def classes(lab: Lab, observer: LabNode) -> dict[str, str]:
    found = status(lab, observer)
    return {row["name"]: row["class"] for row in found["nodes"]} if found else {}


def one_anchor_all_healthy(lab: Lab) -> str | None:
    """The anchor's name once every agent follows it and sees every node HEALTHY."""
    names = [n.name for n in lab.nodes()]
    found = [status(lab, n) for n in lab.nodes()]
    if any(s is None for s in found):
        return None
    anchors = {s["anchor"] for s in found if s is not None}
    healthy = all(classes(lab, n) == dict.fromkeys(names, "HEALTHY") for n in lab.nodes())
    return anchors.pop() if len(anchors) == 1 and None not in anchors and healthy else None


def history(lab: Lab, node: LabNode) -> list[dict[str, Any]]:
    found = call(lab.agent_socket(node), "GET", "/v1/history", timeout=5)
    entries: list[dict[str, Any]] = found["entries"]
    return entries


def finished(lab: Lab, observers: list[LabNode], kind: str, target: str) -> dict[str, Any] | None:
    """The first finished `kind` action on `target` in the history of any of `observers`."""
    for node in observers:
        for entry in history(lab, node):
            if entry["action"]["kind"] == kind and entry["action"]["target"] == target:
                return entry
    return None


def leader_of(lab: Lab, node: LabNode) -> int:
    """The leader id `node`'s own minkms reports (-1: none), asked from 127.0.0.1 as an operator would."""
    up = lab.cluster_status(node)["nodes_up"]
    mine = next(s for s in up.values() if s.get("host") == node.host)
    return int(mine["leader_id"])


def members(lab: Lab, node: LabNode) -> dict[str, str]:
    up = lab.cluster_status(node)["nodes_up"]
    mine = next(s for s in up.values() if s.get("host") == node.host)
    found: dict[str, str] = mine["nodes"]
    return found


def write_refused(lab: Lab, via: list[LabNode]) -> str | None:
    """Try one key creation through `via`; the refusal message, or None when the write went through."""
    try:
        lab.client().kms([n.endpoint for n in via], wire.KEY_CREATE, {"name": f"probe-{time.time_ns()}"})
    except CLIError as exc:
        return str(exc)
    return None


def log_of(node: LabNode) -> Path:
    return Path(node.dir) / "agent" / "kmagent.log"


def journal_of(node: LabNode) -> Path:
    return Path(node.dir) / "agent" / "state" / "journal.jsonl"


def sees_itself_evicted(node: LabNode, since: int) -> bool:
    """Its agent logged its own class turning EVICTED after byte `since` of its log."""
    text = read_bytes(log_of(node))[since:].decode(errors="replace")
    return any(
        "event=class_changed" in line and f"node={node.name} " in line and "now=EVICTED" in line
        for line in text.splitlines()
    )


def read_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if cannot_isolate():
        pytest.skip(cannot_isolate() or "")
    lab = Lab(tmp_path_factory.mktemp("evict") / "lab")
    try:
        lab.up(
            3,
            heartbeat="100ms",
            log=lambda _line: None,
            agents=True,
            agent_timings={"evict_after": f"{EVICT_AFTER:g}s"},
        )
        yield lab
    finally:
        lab.down()


def settled(lab: Lab) -> tuple[LabNode, list[LabNode]]:
    """No cut, one anchor, every node HEALTHY: returns a non-anchor target and the majority (the others)."""
    lab.heal()
    anchor = wait_for(lambda: one_anchor_all_healthy(lab), 120, "one anchor and every node HEALTHY")
    nodes = lab.nodes()
    target = [n for n in nodes if n.name != anchor][-1]
    return target, [n for n in nodes if n.name != target.name]


# ---- a short cut is never an eviction ---------------------------------------------------------------------------
@needs_nft
@pytest.mark.slow
def test_a_node_cut_off_for_less_than_evict_after_is_never_evicted(lab: Lab, capsys: Any) -> None:
    target, majority = settled(lab)
    node_id = next(i for i, h in members(lab, majority[0]).items() if h == target.host)
    assert kmlab.main(["fault", "--dir", str(lab.dir), target.name, "isolate"]) == 0
    assert "isolated" in capsys.readouterr().out
    cut = time.monotonic()
    try:
        # The cut reaches both layers: the majority's agents see the node UNREACHABLE (no report, its minkms does
        # not answer their probe), and its own minkms loses the leader, which the majority keeps.
        wait_for(
            lambda: all(classes(lab, n).get(target.name) == "UNREACHABLE" for n in majority),
            60,
            f"the majority to see {target.name} UNREACHABLE",
        )
        wait_for(lambda: leader_of(lab, target) == -1, 60, f"{target.name}'s minkms to lose its leader")
        assert all(leader_of(lab, n) >= 0 for n in majority)
        if time.monotonic() - cut > EVICT_AFTER / 2:
            pytest.skip("the machine is too slow: the cut lasted too close to evict_after to mean anything")
    finally:
        assert kmlab.main(["fault", "--dir", str(lab.dir), target.name, "heal"]) == 0
    wait_for(
        lambda: one_anchor_all_healthy(lab), 120, f"{target.name} HEALTHY again everywhere after the heal"
    )

    # Watch past the moment an eviction would have come had the UNREACHABLE timer not restarted.
    def watched_long_enough() -> bool:
        for node in lab.nodes():
            evict = finished(lab, [node], "EVICT", target.name)
            assert evict is None, f"{target.name} evicted after a short cut: {json.dumps(evict)[:400]}"
            text = log_of(node).read_text(errors="replace")
            assert "event=proposed" not in text, f"{node.name} proposed an action after a short cut"
        assert members(lab, majority[0]).get(node_id) == target.host
        return time.monotonic() > cut + EVICT_AFTER + 15

    wait_for(watched_long_enough, EVICT_AFTER + 120, "the eviction window to pass", interval=1.0)


# ---- a long cut: EVICT, then REJOIN after the heal ----------------------------------------------------------------
@needs_nft
@pytest.mark.slow
def test_an_isolated_node_is_evicted_by_the_majority_and_rejoins_after_the_heal(lab: Lab) -> None:
    target, majority = settled(lab)
    keys = create_keys(lab, 4)
    log_start = len(read_bytes(log_of(target)))
    journal_before = read_bytes(journal_of(target))

    print(lab.fault(target.name, "isolate"))
    cut_wall = time.time()

    # Until the EVICT, the majority has a leader but cannot write (minkms writes need every member).
    def evicted_or_writes_refused() -> dict[str, Any] | None:
        evict = finished(lab, majority, "EVICT", target.name)
        if evict is not None:
            return evict
        refused = write_refused(lab, majority)
        if refused is None:  # it went through: only legitimate once the target is no longer a member
            assert target.host not in members(lab, majority[0]).values(), (
                f"a write succeeded on the majority while {target.name} was cut off and still a member"
            )
        else:
            assert "writes need all" in refused or "not confirmed" in refused, refused
        return None

    evict = wait_for(
        evicted_or_writes_refused, EVICT_AFTER + 150, f"the EVICT of {target.name}", interval=1.0
    )
    assert evict["outcome"] == "done", evict["detail"]
    signers = {ack["signer"] for ack in evict["certificate"]["acks"]}
    assert signers == {n.name for n in majority}
    assert evict["started"] >= cut_wall + EVICT_AFTER, "evicted before evict_after had passed"
    assert all(leader_of(lab, n) >= 0 for n in majority)
    assert leader_of(lab, target) == -1, "the isolated minkms found a leader through the cut"
    assert target.host not in members(lab, majority[0]).values()

    # Writes work again on the majority.
    keys += create_keys(lab, 2, prefix="after-evict", nodes=majority)

    # The isolated agent took no destructive action and acked nothing: its log and journal, and its data.
    cut_log = read_bytes(log_of(target))[log_start:].decode(errors="replace")
    for event in FORBIDDEN_WHILE_CUT:
        assert event not in cut_log, f"{target.name}'s agent logged {event} while cut off"
    assert read_bytes(journal_of(target)) == journal_before
    assert (target.data / "kms.db").exists(), "the isolated node's state is gone"
    assert lab.programs()[target.name]["state"] == "active", "the isolated node's minkms was stopped"

    # After the heal the node finds itself evicted and is rejoined.
    print(lab.fault(target.name, "heal"))
    healed_at = len(read_bytes(log_of(target)))
    wait_for(
        lambda: sees_itself_evicted(target, healed_at), 120, f"{target.name}'s agent to see itself EVICTED"
    )
    rejoin = wait_for(
        lambda: finished(lab, [*majority, target], "REJOIN", target.name), 240, f"the REJOIN of {target.name}"
    )
    assert rejoin["outcome"] == "done", rejoin["detail"]
    wait_for(lambda: one_anchor_all_healthy(lab), 120, "every node HEALTHY after the REJOIN")
    wait_for(lambda: lab.formed(3), 60, "a 3-member cluster that accepts writes")
    assert verify_keys(lab, keys) == []


# ---- the pieces, without root -------------------------------------------------------------------------------------
def test_isolate_needs_another_node(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab")
    lab.create(1)
    with pytest.raises(LabError, match="only node"):
        lab.fault("node1", "isolate")
    with pytest.raises(LabError, match="no node 'node9'"):
        lab.fault("node9", "isolate")


@pytest.mark.parametrize(
    ("bind", "source"),
    [
        ("127.9.9.1", "127.9.9.1"),
        ("", None),
        ("0.0.0.0", None),
        ("[::]", None),
        ("[::1]", "::1"),
        ("kms", None),
    ],
)
def test_emulator_nodes_talk_from_their_listen_address(bind: str, source: str | None) -> None:
    assert _source_address(bind) == source


class _Recorder:
    """A bare TCP listener that records where each connection comes from, then hangs up."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_server((ip, 0))
        self.port = self.sock.getsockname()[1]
        self.sources: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, (addr, _port) = self.sock.accept()
            except OSError:
                return
            self.sources.append(addr)
            conn.close()

    def close(self) -> None:
        self.sock.close()


async def test_live_probes_of_other_nodes_leave_from_peer_source(tmp_path: Path) -> None:
    """The agent's probe of a peer's minkms comes from peer.source, its probe of its own node does not."""
    recorder = _Recorder("127.77.0.2")
    try:
        settings = MinkmsSettings(
            cli=("minkms",),
            server=f"https://127.77.0.2:{recorder.port}",
            api_key=lambda: "",
            insecure=True,
            peer_source="127.77.0.1",
        )
        async with Minkms(settings) as minkms:
            assert await minkms.probe_live(f"127.77.0.2:{recorder.port}") is False  # probed, no answer
            wait_for(lambda: recorder.sources, 10, "the peer probe's connection")
            assert recorder.sources[0] == "127.77.0.1"
            recorder.sources.clear()
            await minkms.probe()
            wait_for(lambda: recorder.sources, 10, "the local probe's connection")
            assert "127.77.0.1" not in recorder.sources
        async with Minkms(
            MinkmsSettings(cli=("minkms",), server=settings.server, api_key=lambda: "", insecure=True)
        ) as minkms:
            recorder.sources.clear()
            await minkms.probe_live(f"127.77.0.2:{recorder.port}")
            wait_for(lambda: recorder.sources, 10, "the unbound peer probe's connection")
            assert "127.77.0.1" not in recorder.sources
    finally:
        recorder.close()
