"""agent.backups.BackupService with a fake minkms and fake peers: when the anchor backs up, what a failure leaves
(nothing on disk; a log line, the metric, status, a retry after a delay), and what an agent pulls."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agent import backups as service_module
from agent.backups import BackupService
from agent.config import Config
from agent.core.backups import BackupInfo
from agent.core.messages import Report
from agent.core.model import MinkmsView, NodeStatus
from agent.core.view import PeerState
from agent.io.backups import BackupStore
from agent.io.minkms import CommandResult
from tests.integration import test_peers
from tests.integration.test_peers import PKI, make_config

certs, ports = test_peers.certs, test_peers.ports  # the fixtures, shared


@dataclass
class FakeElection:
    anchor: bool = True

    def is_anchor(self, now: float) -> bool:
        return self.anchor

    def anchor_hint(self, now: float) -> str | None:
        return "km1" if self.anchor else None


@dataclass
class FakeLink:
    state: PeerState = field(default_factory=PeerState)


@dataclass
class FakeCoordinator:
    election: FakeElection = field(default_factory=FakeElection)
    links: dict[str, FakeLink] = field(default_factory=lambda: {"km2": FakeLink(), "km3": FakeLink()})


class FakeMinkms:
    def __init__(self) -> None:
        self.fail = ""
        self.commit = 42
        self.calls = 0

    async def cluster_status(self) -> MinkmsView:
        return MinkmsView(nodes_up=(NodeStatus(1, "127.0.0.1:7373", commit=self.commit),))

    async def backup(self, path: Path) -> CommandResult:
        self.calls += 1
        if self.fail:
            path.write_bytes(b"partial")  # a failed command may leave a partial file behind
            return CommandResult(("minkms", "backup"), 1, "", self.fail, 0.1)
        path.write_bytes(gzip.compress(os.urandom(5000)))
        return CommandResult(("minkms", "backup"), 0, "", "", 0.1)


@dataclass
class FakeHost:
    cfg: Config
    coordinator: Any = field(default_factory=FakeCoordinator)
    minkms: Any = field(default_factory=FakeMinkms)
    my_host: str = "127.0.0.1:7373"


@pytest.fixture
async def svc(tmp_path: Path, certs: PKI, ports: dict[str, int]) -> Any:
    cfg = make_config(tmp_path, certs, ports, "km1")
    cfg = _with_backup_dir(cfg, tmp_path / "backups")
    host = FakeHost(cfg)
    service = BackupService(cfg, lambda: host)  # type: ignore[arg-type, return-value]
    yield service, host
    await service.close()


def _with_backup_dir(cfg: Config, directory: Path) -> Config:
    return replace(cfg, backup=replace(cfg.backup, dir=directory, interval=3600.0, keep=2))


def report(sender: str, held: tuple[BackupInfo, ...]) -> Report:
    return Report("test", sender, 1, "boot", 1, None, None, None, backups=held)


def fresh(host: FakeHost, sender: str, held: tuple[BackupInfo, ...]) -> None:
    host.coordinator.links[sender].state = PeerState(report(sender, held), time.monotonic())


def old_entry(commit: int, created: float, source: str = "km2") -> BackupInfo:
    data = gzip.compress(str(commit).encode())
    return BackupInfo(
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(created)) + f"-{source}",
        created,
        commit,
        len(data),
        hashlib.sha256(data).hexdigest(),
        source,
    )


async def test_only_the_anchor_backs_up_and_only_when_the_newest_is_an_interval_old(svc: Any) -> None:
    service, host = svc
    now = time.monotonic()
    host.coordinator.election.anchor = False
    assert not service.due({}, now)
    host.coordinator.election.anchor = True
    assert service.due({}, now)
    # a backup another agent reports, taken recently (by a former anchor): not due yet
    recent = old_entry(40, time.time() - 60)
    assert not service.due({"km2": (recent,)}, now)
    assert service.due({"km2": (old_entry(40, time.time() - 7200),)}, now)
    assert service.due({"km2": (old_entry(40, time.time() + 86400),)}, now)  # from the future: ignored
    ok, backup = await service.take("test")
    assert ok and backup.endswith("-km1")
    (info,) = service.store.entries()
    assert info.commit == 42 and info.id == backup and service.held() == (info,)
    assert not service.due({}, now)


async def test_a_failed_backup_leaves_nothing_and_is_reported_and_retried_later(
    svc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    service, host = svc
    host.minkms.fail = "connection refused"
    with caplog.at_level(logging.ERROR, logger="kmagent"):
        ok, why = await service.take("schedule")
    assert not ok and "minkms backup failed: connection refused" in why
    assert [p.name for p in service.store.dir.iterdir()] == []
    assert any("event=backup_failed" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    metrics = {m.name: m.samples[0][1] for m in service.metrics()}
    assert metrics["kmagent_backup_failures_total"] == 1 and metrics["kmagent_backup_age_seconds"] == -1
    status = service.status()
    assert status["failures"] == 1 and "connection refused" in status["last_failure"]["error"]
    assert "FAILED" in service.summary()
    assert not service.due({}, time.monotonic())  # retried after the delay, not at once
    assert service.due({}, time.monotonic() + service.retry_delay + 0.1)
    host.minkms.fail = ""
    service.retry_at = time.monotonic() - 1
    assert (await service.take("schedule"))[0]
    assert "FAILED" not in service.summary()


async def test_a_missing_commit_is_a_failure_before_any_backup(svc: Any) -> None:
    service, host = svc
    host.my_host = "127.0.0.9:7373"  # not in stat
    ok, why = await service.take("schedule")
    assert not ok and "cannot read the local commit" in why and host.minkms.calls == 0


async def test_an_agent_pulls_the_newest_backup_it_lacks_from_a_holder(
    svc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service, host = svc
    fetched: list[tuple[str, str]] = []

    async def fake_fetch(client: Any, spec: Any, info: BackupInfo, store: BackupStore) -> None:
        fetched.append((spec.name, info.id))
        data = gzip.compress(str(info.commit).encode())

        async def chunks() -> Any:
            yield data

        await store.receive(info, chunks())

    monkeypatch.setattr(service_module, "fetch_backup", fake_fetch)
    older, newer = old_entry(10, time.time() - 600), old_entry(20, time.time() - 300)
    fresh(host, "km2", (newer, older))
    fresh(host, "km3", (older,))
    service.pull(service.reported(time.monotonic()), time.monotonic())
    await asyncio.gather(*service.tasks)
    assert fetched == [("km2", newer.id)] and service.store.entries() == [newer]
    service.pull(service.reported(time.monotonic()), time.monotonic())  # held now: nothing more
    assert not service.tasks
    just_taken = old_entry(30, time.time())
    fresh(host, "km3", (just_taken,))
    service.pull(service.reported(time.monotonic()), time.monotonic())  # its push is on the way
    assert not service.tasks and len(fetched) == 1
