"""One consistent snapshot per decision (issue 12 (3)): the journal's "awaiting mark" is read before the storage
probe, so a `mark` that finishes while the probe runs cannot turn "marker missing" into STATE_LOST.

The interleaving is reproduced exactly: the fake probe returns "marker missing" (what it read before the marker
was written) and, while it runs, the REJOIN's `mark` completes (the journal stops saying "awaiting mark")."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent import daemon
from agent.config import Config
from agent.core.model import (
    HealthObs,
    MarkerState,
    MinkmsView,
    NodeClass,
    NodeStatus,
    ServiceObs,
    ServiceState,
    StorageObs,
)
from agent.core.settings import Timings
from agent.core.view import stale_after

ME = "10.0.0.3:7373"
STALE = stale_after(Timings().peer_timeout, Timings().probe_interval, 10.0)
FULL = ((0, "10.0.0.1:7373"), (1, "10.0.0.2:7373"), (5, ME))


class FakeActions:
    def __init__(self) -> None:
        self.pending_mark = True

    def awaiting_mark(self) -> bool:
        return self.pending_mark


class FakeService:
    async def status(self) -> ServiceObs:
        return ServiceObs(ServiceState.ACTIVE)


class FakeMinkms:
    async def probe(self) -> HealthObs:
        return HealthObs(True, True, True, 0.01)

    async def cluster_status(self) -> MinkmsView:
        me = NodeStatus(5, ME, "Follower", 12, 0, FULL)
        return MinkmsView(nodes_up=(me,))


def agent(tmp_path: Path, actions: FakeActions) -> daemon.Agent:
    cfg = SimpleNamespace(
        name="node3",
        cluster="c1",
        is_witness=False,
        timings=Timings(),
        me=SimpleNamespace(minkms_host=ME),
        local=SimpleNamespace(storage_path=tmp_path / "data", low_space=0),
        state=SimpleNamespace(dir=str(tmp_path / "state")),
    )
    coordinator = SimpleNamespace(
        actions=actions,
        reference=lambda _at: dict(FULL),
        reference_commit=lambda _at: 10,
        stale_after=STALE,
    )
    return daemon.Agent(
        cast(Config, cfg),
        cast(Any, FakeService()),
        cast(Any, FakeMinkms()),
        cast(Any, None),
        cast(Any, coordinator),
    )


async def test_a_mark_finishing_during_the_probe_is_no_state_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    actions = FakeActions()

    def probe(*_args: object, **_kwargs: object) -> StorageObs:
        actions.pending_mark = False  # the mark step wrote the marker and journaled its outcome meanwhile
        return StorageObs(probe_ok=True, marker=MarkerState.MISSING)  # read before the marker was there

    monkeypatch.setattr(daemon, "probe_storage", probe)
    a = agent(tmp_path, actions)
    obs = await a.observe()
    assert obs.awaiting_mark is True  # the journal as it was when the probe started
    verdict = a.decide(obs)
    assert verdict.cls is not NodeClass.STATE_LOST, verdict


async def test_a_marker_missing_outside_a_rejoin_is_still_state_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot excuses only what the journal said when the probe started."""
    actions = FakeActions()
    actions.pending_mark = False
    monkeypatch.setattr(
        daemon, "probe_storage", lambda *_a, **_k: StorageObs(probe_ok=True, marker=MarkerState.MISSING)
    )
    a = agent(tmp_path, actions)
    verdict = a.decide(await a.observe())
    assert verdict.cls is NodeClass.STATE_LOST


async def test_a_hung_probe_is_stalled_after_its_deadline_and_not_started_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12 (2): the probe's thread hangs; the round reports STALLED at the deadline, never the last answer,
    and the next round waits for the same thread instead of starting another."""
    import threading

    release = threading.Event()
    calls = 0

    def hung(*_args: object, **_kwargs: object) -> StorageObs:
        nonlocal calls
        calls += 1
        release.wait(30)
        return StorageObs(probe_ok=True, marker=MarkerState.OK)

    monkeypatch.setattr(daemon, "probe_storage", hung)
    a = agent(tmp_path, FakeActions())
    a.cfg = cast(Config, SimpleNamespace(**{**vars(a.cfg), "timings": Timings(peer_timeout=0.3)}))
    try:
        for _ in range(2):
            obs = await a.observe()
            assert obs.storage.stalled and "has not returned" in (obs.storage.error or "")
            assert a.decide(obs).cls is NodeClass.STALLED
        assert calls == 1
    finally:
        release.set()
    assert a.storage_probe is not None
    await a.storage_probe
    obs = await a.observe()  # the thread has returned: its answer is used, and a new probe starts after
    assert not obs.storage.stalled


async def test_an_old_observation_is_reported_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that hangs elsewhere (past every probe's deadline): the report says STALLED once the observation is
    older than `stale_after`, and says how old it is; a slow round within its deadlines does not."""
    monkeypatch.setattr(
        daemon, "probe_storage", lambda *_a, **_k: StorageObs(probe_ok=True, marker=MarkerState.OK)
    )
    a = agent(tmp_path, FakeActions())
    obs = await a.observe()
    a.decide(obs)
    slow = a.node_report(obs.at + STALE - 0.5)
    assert slow is not None and slow.cls != "STALLED" and slow.observed_seconds == STALE - 0.5
    old = a.node_report(obs.at + STALE + 1.0)
    assert old is not None and old.cls == "STALLED" and old.observed_seconds == STALE + 1.0
