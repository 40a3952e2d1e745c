"""The coordination shell's rules on what peers send: identity from the certificate, order, durable votes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import Config, StateConfig, load_config
from agent.coordination import Coordinator, load_ballot
from agent.core.election import Ballot
from agent.core.messages import NodeReport, Report, VoteRequest

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "kmagent.toml.example"


class NoPeers:
    """The coordinator's client, for tests that only feed it messages: nothing may be sent."""

    config: Config

    async def post(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no peer traffic expected in this test")

    async def close(self) -> None:
        pass


async def never(_host: str) -> bool | None:
    return None


def coordinator(tmp_path: Path, now: float = 1000.0) -> Coordinator:
    cfg = load_config(EXAMPLE, check_files=False)  # km1 of km1, km2, km3
    cfg = dataclasses.replace(cfg, state=StateConfig(tmp_path))
    return Coordinator(cfg, NoPeers(), never, now)  # type: ignore[arg-type]


def report(sender: str = "km2", seq: int = 1, boot: str = "b1", cluster: str = "prod-kms") -> Report:
    node = NodeReport("HEALTHY", "ok", 5.0, "10.0.0.2:7373", 1, "Follower", 10, 0, ())
    return Report(cluster, sender, seq, boot, 0, None, None, node)


async def test_a_report_is_accepted_only_from_the_agent_its_certificate_names(tmp_path: Path) -> None:
    c = coordinator(tmp_path)
    mine = await c.on_report("km2", report())
    assert mine.sender == "km1" and mine.cluster == "prod-kms"  # answered with our own report
    assert c.links["km2"].state.report == report()
    with pytest.raises(web.HTTPForbidden):
        await c.on_report("km3", report(sender="km2"))  # km3 speaking for km2
    with pytest.raises(web.HTTPUnprocessableEntity):
        await c.on_report("km2", report(cluster="other"))
    with pytest.raises(web.HTTPForbidden):
        await c.on_report("km1", report(sender="km1"))  # our own name: not a peer


async def test_older_and_duplicate_reports_are_dropped_but_a_restart_starts_over(tmp_path: Path) -> None:
    c = coordinator(tmp_path)
    await c.on_report("km2", report(seq=5))
    await c.on_report("km2", dataclasses.replace(report(seq=4), term=9))  # reordered: older
    await c.on_report("km2", dataclasses.replace(report(seq=5), term=9))  # duplicate
    state = c.links["km2"].state.report
    assert state is not None and state.seq == 5 and state.term == 0
    await c.on_report("km2", report(seq=1, boot="b2"))  # the peer restarted: a new boot, seq starts again
    state = c.links["km2"].state.report
    assert state is not None and state.boot == "b2"


async def test_a_vote_is_on_disk_before_the_grant_is_returned(tmp_path: Path) -> None:
    c = coordinator(tmp_path, now=-1e9)  # started long ago: past the restart rule
    c.views = ()  # nobody eligible yet
    refused = await c.on_vote("km2", VoteRequest("prod-kms", 1, "km2", 1))
    assert not refused.granted and "not eligible" in refused.reason
    assert not (tmp_path / "ballot.json").exists()  # a refusal changes nothing, on disk either

    c.tick(None, 0.0)  # no own node; classify the peers from what arrived
    await c.on_report("km2", report())
    c.tick(None, 0.0)
    assert c.views  # km2 is HEALTHY with a commit: eligible
    granted = await c.on_vote("km2", VoteRequest("prod-kms", 1, "km2", 1))
    assert granted.granted, granted.reason
    assert json.loads((tmp_path / "ballot.json").read_text()) == {"term": 1, "voted_for": "km2"}
    assert load_ballot(tmp_path / "ballot.json") == Ballot(1, "km2")


async def test_a_vote_that_cannot_be_persisted_is_refused(tmp_path: Path) -> None:
    c = coordinator(tmp_path, now=-1e9)
    c.ballot_path = tmp_path / "missing-dir" / "ballot.json"  # the write fails: no such directory
    await c.on_report("km2", report())
    c.tick(None, 0.0)
    reply = await c.on_vote("km2", VoteRequest("prod-kms", 1, "km2", 1))
    assert not reply.granted and "persist" in reply.reason


async def test_a_vote_request_for_another_candidate_is_forbidden(tmp_path: Path) -> None:
    c = coordinator(tmp_path, now=-1e9)
    with pytest.raises(web.HTTPForbidden):
        await c.on_vote("km3", VoteRequest("prod-kms", 1, "km2", 1))


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "[]",
        '{"term": "1", "voted_for": null}',
        '{"term": -1, "voted_for": null}',
        '{"term": 1, "voted_for": 5}',
    ],
)
def test_a_damaged_ballot_is_reported_and_replaced_by_an_empty_one(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ballot.json"
    path.write_text(content)
    assert load_ballot(path) == Ballot()  # safe: the restart rule withholds votes for a lease


def test_no_ballot_file_is_an_empty_ballot(tmp_path: Path) -> None:
    assert load_ballot(tmp_path / "ballot.json") == Ballot()
