"""The executor's two answers to the simulator's protocol problems (issue 12), on a real `Actions` over tmp files:

- a close counts once a quorum recorded it: the anchor shares its newest close again, and proposes nothing, until
  a quorum of agents has it (simulator seed 471);
- a REJOIN that started its node fresh leaves a durable note until `mark`; when the REJOIN's `add` lands after
  the action closed (killed in doubt, simulator seed 3492), the node adopts the membership and writes its marker,
  instead of calling itself STATE_LOST and licensing an EVICT of a copy of the state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from agent import pki
from agent.actions import HISTORY_PATH, Actions
from agent.config import StateConfig, TLSConfig, load_config
from agent.coordination import Coordinator
from agent.core.messages import Action, Certificate, NodeReport, Report, StepReply, ack_payload
from agent.core.model import MarkerState, NodeStatus
from agent.io.journal import HistoryEntry
from agent.io.signing import Signer
from agent.io.storage import UNMARKED_NAME, note_unmarked, probe_storage, read_marker, read_unmarked

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "kmagent.toml.example"
ME = "10.0.0.1:7373"  # km1's minkms_host in the example
MEMBERS = ((0, ME), (1, "10.0.0.2:7373"), (2, "10.0.0.3:7373"))
EVICT = Action("evict-km3-4-1", "EVICT", "km3", (("node_id", "2"), ("host", "10.0.0.3:7373")))


class Peers:
    """The coordinator's client: records every post; `ok` names the peers that record a history entry."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str]] = []
        self.ok: set[str] = set()

    async def post(self, spec: Any, path: str, body: Any, reply: type[Any]) -> Any:
        self.posts.append((spec.name, path))
        return StepReply(spec.name in self.ok, "recorded" if spec.name in self.ok else "refused")

    async def close(self) -> None:
        pass


async def never(_host: str) -> bool | None:
    return None


def actions(tmp_path: Path, peers: Peers | None = None) -> Actions:
    ca = tmp_path / "ca"
    if not (ca / "km1.crt").exists():
        pki.init_ca(ca, "prod-kms")
        pki.issue(ca, "km1")
    cfg = load_config(EXAMPLE, check_files=False)  # km1 of km1, km2, km3
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    cfg = dataclasses.replace(
        cfg, state=StateConfig(state), tls=TLSConfig(ca / "ca.crt", ca / "km1.crt", ca / "km1.key")
    )
    coordinator = Coordinator(cfg, peers or Peers(), never, 1000.0)  # type: ignore[arg-type]
    return Actions(cfg, coordinator, lambda: None)  # type: ignore[arg-type,return-value]


def signed(tmp_path: Path, action: Action) -> HistoryEntry:
    """An entry whose certificate checks out: acks of km2 and km3, from the test CA."""
    ca = tmp_path / "ca"
    acks = []
    for name in ("km2", "km3"):
        if not (ca / f"{name}.crt").exists():
            pki.issue(ca, name)
        signer = Signer.from_files(ca / f"{name}.crt", ca / f"{name}.key", name)
        acks.append(signer.sign(ack_payload("prod-kms", 4, action)))
    return dataclasses.replace(entry(action), certificate=Certificate("prod-kms", 4, action, tuple(acks)))


def entry(action: Action) -> HistoryEntry:
    return HistoryEntry(
        action, Certificate("prod-kms", 4, action, ()), "km1", "anchor", (), 1.0, 2.0, 1.0, "done", "", ()
    )


def report(sender: str, finished: tuple[str, ...] = ()) -> Report:
    node = NodeReport("HEALTHY", "ok", 5.0, "10.0.0.2:7373", 1, "Follower", 10, 0, ())
    return Report("prod-kms", sender, 1, "b1", 4, "km1", None, node, finished=finished)


# -- a close counts once a quorum recorded it ----------------------------------------------------------------


async def test_the_anchor_shares_its_close_again_until_a_quorum_recorded_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peers = Peers()
    a = actions(tmp_path, peers)
    assert not await a._close_unconfirmed(1000.0)  # nothing closed yet: nothing to wait for
    a.history.append(signed(tmp_path, EVICT))
    caplog.set_level(logging.WARNING, logger="agent.actions")
    assert await a._close_unconfirmed(1000.0)  # only km1 has it: km2 and km3 are asked, both refuse
    assert sorted(peers.posts) == [("km2", HISTORY_PATH), ("km3", HISTORY_PATH)]
    assert await a._close_unconfirmed(1000.0)  # still 1 of 3: asked again, logged once
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "close_unconfirmed" in caplog.records[0].message and EVICT.id in caplog.records[0].message
    peers.ok = {"km3"}
    assert await a._close_unconfirmed(1000.0)  # km3 records it in this round: counted from the next
    peers.posts.clear()
    assert not await a._close_unconfirmed(1000.0)  # km1 + km3: a quorum; nothing sent
    assert peers.posts == []


async def test_a_fresh_report_that_carries_the_id_counts_as_recorded(tmp_path: Path) -> None:
    peers = Peers()
    a = actions(tmp_path, peers)
    a.history.append(signed(tmp_path, EVICT))
    a.coordinator._receive("km2", report("km2", finished=(EVICT.id,)), 1000.0)
    assert not await a._close_unconfirmed(1000.0 + a.cfg.timings.peer_timeout)
    assert peers.posts == []
    assert await a._close_unconfirmed(
        1001.0 + a.cfg.timings.peer_timeout
    )  # a stale report counts for nothing


async def test_a_close_recorded_here_is_never_acked_again(tmp_path: Path) -> None:
    """Guard rule `finished` sees the history: the facts an agent acks with carry every id it recorded."""
    a = actions(tmp_path)
    a.history.append(entry(EVICT))
    assert EVICT.id in a.recorded_ids()


# -- a late add is adopted --------------------------------------------------------------------------------


def storage(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "raft.db").write_bytes(b"the cluster's state, copied by the join")
    return data, tmp_path / "state" / "marker-record.json"


async def test_a_joined_node_without_its_marker_adopts_its_membership(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = actions(tmp_path)
    note_unmarked(tmp_path / "state", "rejoin-km1-3-9", 1.0)  # the REJOIN's start; it closed failed after
    a = actions(tmp_path)  # a restart reads the note
    assert a.unmarked == "rejoin-km1-3-9" and a.awaiting_mark()
    data, record = storage(tmp_path)
    local = NodeStatus(0, ME, members=MEMBERS)
    caplog.set_level(logging.WARNING, logger="agent.actions")
    assert await a.adopt_marker(data, record, ME, local, dict(MEMBERS)) == 0
    written = read_marker(data)
    assert written is not None and (written.cluster, written.host, written.node_id) == ("prod-kms", ME, 0)
    assert (
        probe_storage(data, cluster="prod-kms", host=ME, record=record, low_space=0).marker is MarkerState.OK
    )
    assert read_unmarked(tmp_path / "state") is None and not a.awaiting_mark()
    assert any("marker_adopted" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("local", "reference", "why"),
    [
        (None, dict(MEMBERS), "its minkms does not answer"),
        (NodeStatus(0, ME, members=((0, ME),)), {0: ME}, "a one-node cluster of its own"),
        (NodeStatus(0, ME, members=MEMBERS), {1: "10.0.0.2:7373", 2: "10.0.0.3:7373"}, "not in the anchor's"),
        (NodeStatus(0, ME, members=MEMBERS), {5: ME, 1: "10.0.0.2:7373"}, "another id in the anchor's"),
        (NodeStatus(0, ME, members=MEMBERS), None, "no reference membership"),
    ],
)
async def test_no_marker_is_adopted_on_a_doubt(
    tmp_path: Path, local: NodeStatus | None, reference: dict[int, str] | None, why: str
) -> None:
    actions(tmp_path)
    note_unmarked(tmp_path / "state", "rejoin-km1-3-9", 1.0)
    a = actions(tmp_path)
    data, record = storage(tmp_path)
    assert await a.adopt_marker(data, record, ME, local, reference) is None, why
    assert read_marker(data) is None and a.awaiting_mark()  # the note stays: still not STATE_LOST for it
    assert (tmp_path / "state" / UNMARKED_NAME).exists()


async def test_nothing_is_adopted_without_the_note_or_while_a_step_runs(tmp_path: Path) -> None:
    a = actions(tmp_path)
    data, record = storage(tmp_path)
    local = NodeStatus(0, ME, members=MEMBERS)
    assert await a.adopt_marker(data, record, ME, local, dict(MEMBERS)) is None  # no REJOIN started it fresh
    note_unmarked(tmp_path / "state", "rejoin-km1-3-9", 1.0)
    a = actions(tmp_path)
    async with a.lock:  # a step runs: the observation round does not wait for it, and tries next round
        assert await asyncio.wait_for(a.adopt_marker(data, record, ME, local, dict(MEMBERS)), 5) is None
    assert read_marker(data) is None
    assert await a.adopt_marker(data, record, ME, local, dict(MEMBERS)) == 0


async def test_a_close_whose_certificate_no_longer_checks_stops_the_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Agents added since (a larger quorum), a signer removed, the CA rotated: peers refuse the entry for good,
    so the anchor must not wait for it (review of issue 12): it logs once and goes on."""
    peers = Peers()
    a = actions(tmp_path, peers)
    a.history.append(entry(EVICT))  # a certificate without acks: it never checks out
    caplog.set_level(logging.ERROR, logger="agent.actions")
    assert not await a._close_unconfirmed(1000.0)
    assert peers.posts == []
    assert any("close_unconfirmable" in r.message for r in caplog.records)


async def test_a_share_of_a_close_recorded_here_is_answered_ok_whatever_its_certificate(
    tmp_path: Path,
) -> None:
    """The quorum or the agents changed since: an entry this agent holds still counts as recorded by it."""
    a = actions(tmp_path)
    a.history.append(entry(EVICT))
    reply = await a.on_history("km2", entry(EVICT))
    assert reply.ok


async def test_a_note_left_beside_a_marker_is_dropped_once_no_rejoin_of_its_own_runs(tmp_path: Path) -> None:
    """A marker written outside `mark` (a fresh volume's, or after `mark` failed to drop the note) must not keep
    the note: it would make a later missing marker read as expected instead of as a replaced volume."""
    actions(tmp_path)
    note_unmarked(tmp_path / "state", "rejoin-km1-3-9", 1.0)
    a = actions(tmp_path)
    rejoin = Action("rejoin-km1-5-1", "REJOIN", "km1", (("host", ME),))
    a.journal.begin(rejoin, Certificate("prod-kms", 5, rejoin, ()), "target")
    assert not await a.settle_unmarked() and a.awaiting_mark()  # its own REJOIN runs: `mark` drops it
    a.journal.finish(rejoin.id, "failed", "test")
    async with a.lock:  # a step runs: the round does not wait
        assert not await asyncio.wait_for(a.settle_unmarked(), 5)
    assert await a.settle_unmarked() and not a.awaiting_mark()
    assert read_unmarked(tmp_path / "state") is None


async def test_a_note_that_cannot_be_removed_stays_counted_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    actions(tmp_path)
    note = tmp_path / "state" / UNMARKED_NAME
    note_unmarked(tmp_path / "state", "rejoin-km1-3-9", 1.0)
    a = actions(tmp_path)
    note.unlink()
    note.mkdir()  # unlink fails (EISDIR): the agent cannot drop its note
    caplog.set_level(logging.ERROR, logger="agent.actions")
    assert not await a.settle_unmarked() and not await a.settle_unmarked()
    assert a.awaiting_mark()  # in doubt: a missing marker still reads as expected, never as a replaced volume
    assert sum("unmarked_note_stuck" in r.message for r in caplog.records) == 1  # logged once, not per round
    note.rmdir()
    assert await a.settle_unmarked() and not a.awaiting_mark()


def test_an_agent_refuses_to_start_over_a_note_that_is_no_file(tmp_path: Path) -> None:
    actions(tmp_path)
    (tmp_path / "state" / UNMARKED_NAME).mkdir()
    with pytest.raises(
        ValueError, match=r"unmarked\.json is the agent's own note and must be a regular file"
    ):
        actions(tmp_path)
