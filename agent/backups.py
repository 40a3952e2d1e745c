"""Scheduled backups (DESIGN §5 BACKUP): the anchor takes them, every agent keeps copies.

Not destructive, so no quorum: only the agent holding the anchor lease runs `minkms backup`, when the newest
backup any agent reports is older than `backup.interval` (a new anchor does not back up again at once) or on
`kmagent backup now`. It pushes the copy to every peer; every agent also pulls the freshest backup a fresh
report shows and it lacks, so that an agent that was down during the push catches up. Retention applies on each
agent after each arrival. Failures are retried after a short delay and shown in the log, the metrics, the
systemd STATUS line and `kmagent status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent.config import Config, ConfigError, read_secret
from agent.coordination import Coordinator
from agent.core import wire
from agent.core.backups import REPORTED, BackupInfo, backup_id, newest_first
from agent.core.classify import human_duration
from agent.core.view import fresh_report
from agent.io import logs
from agent.io.backups import CHUNK, BackupStore, fetch_backup, list_backups, peer_streams, push_backup
from agent.io.metrics import Metric
from agent.io.minkms import Minkms, MinkmsSettings
from agent.io.peers import PeerClient, PeerError, Route, StreamRoute

log = logging.getLogger("kmagent")

NOW_PATH = "/v1/peer/backup-now"
RETRY_MAX = 30.0
"""A failed backup or transfer is tried again after min(backup.interval, this) seconds."""
FUTURE_SLACK = 60.0
"""A reported backup created further ahead of this agent's clock than this is ignored by the schedule."""
SCRATCH_START = 30.0
"""How long a scratch minkms may take to accept writes."""
SCRATCH_STOP = 5.0
"""How long a scratch minkms gets to stop on SIGTERM before SIGKILL."""


@dataclass(frozen=True)
class BackupNowRequest:
    """`kmagent backup now` given on a host that is not the anchor, forwarded to the anchor."""

    requested_by: str


@dataclass(frozen=True)
class BackupNowReply:
    ok: bool
    detail: str  # the new backup's id, or why none was taken


class Host(Protocol):
    """What the service needs of the daemon's current Agent (replaced on reload)."""

    cfg: Config
    coordinator: Coordinator
    minkms: Minkms

    @property
    def my_host(self) -> str: ...


class BackupService:
    def __init__(self, cfg: Config, host: Callable[[], Host]) -> None:
        self.cfg = cfg
        self.host = host
        self.store = BackupStore(cfg.backup.dir)
        self.client = PeerClient(cfg)  # its own connections: a long transfer never delays reports or votes
        self.lock = asyncio.Lock()  # one backup at a time
        self.wake = asyncio.Event()
        self.retry_at: float | None = None  # monotonic; set after a failed backup
        self.failures = 0
        self.last_failure: tuple[float, str] | None = None  # (wall time, what failed)
        self.push_errors: dict[str, str] = {}
        self.fetch_retry: dict[str, float] = {}  # backup id -> no fetch before (monotonic)
        self.fetching: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def retry_delay(self) -> float:
        return min(self.cfg.backup.interval, RETRY_MAX)

    async def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: a new store when the directory moved, a new client for new TLS files."""
        if cfg.backup.dir != self.cfg.backup.dir:
            self.store = BackupStore(cfg.backup.dir)
        old, self.cfg, self.client = self.client, cfg, PeerClient(cfg)
        await old.close()
        self.wake.set()

    def held(self) -> tuple[BackupInfo, ...]:
        """What `Report.backups` carries: the newest copies held intact."""
        return tuple(self.store.entries()[:REPORTED])

    def routes(self) -> list[Route]:
        return [(NOW_PATH, BackupNowRequest, self.on_now)]

    def streams(self) -> list[StreamRoute]:
        return peer_streams(lambda: self.store, self.arrived)

    # ---- the loop ----------------------------------------------------------------------------------------
    async def run_forever(self) -> None:
        while True:
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must never stop the agent
                log.exception(logs.kv(event="backup_round_failed"))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.timings.probe_interval):
                    await self.wake.wait()

    def reported(self, now: float) -> dict[str, tuple[BackupInfo, ...]]:
        """The copies each peer with a fresh report holds."""
        links = self.host().coordinator.links
        timeout = self.cfg.timings.peer_timeout
        return {
            name: report.backups
            for name, link in links.items()
            if (report := fresh_report(link.state, now, timeout)) is not None
        }

    async def once(self) -> None:
        now = time.monotonic()
        reported = self.reported(now)
        if self.due(reported, now):
            await self.take("schedule")
        self.pull(reported, time.monotonic())

    def due(self, reported: dict[str, tuple[BackupInfo, ...]], now: float) -> bool:
        """A scheduled backup is due on the anchor when the newest any agent holds is `interval` old."""
        host = self.host()
        if self.cfg.is_witness or not host.coordinator.election.is_anchor(now):
            return False
        if self.retry_at is not None and now < self.retry_at:
            return False
        wall = time.time()
        known = [*self.store.entries(), *(b for held in reported.values() for b in held)]
        # an entry "from the future" (a peer's clock far ahead, or a bogus report) must not stop backups
        newest = max((b.created for b in known if b.created <= wall + FUTURE_SLACK), default=None)
        return newest is None or wall - newest >= self.cfg.backup.interval

    # ---- taking one --------------------------------------------------------------------------------------
    async def take(self, reason: str) -> tuple[bool, str]:
        """Take a backup now (this agent must be the anchor); (True, id) or (False, why not)."""
        if self.cfg.is_witness:
            return False, f"{self.cfg.name} is a witness: it has no minkms to back up"
        async with self.lock:
            host = self.host()
            if not host.coordinator.election.is_anchor(time.monotonic()):
                return False, f"{self.cfg.name} does not hold the anchor lease now; try again"
            tmp: Path | None = None
            try:
                view = await host.minkms.cluster_status()
                me = view.node_by_host(host.my_host)
                if view.error or me is None or me.commit is None:
                    raise _Failed(f"cannot read the local commit: {view.error or 'this node is not in stat'}")
                fd, name = tempfile.mkstemp(prefix=".incoming-", suffix=".gz", dir=self.store.dir)
                os.close(fd)
                tmp = Path(name)
                result = await host.minkms.backup(tmp)
                if not result.ok:
                    raise _Failed(f"minkms backup failed: {result.error}")
                created = time.time()
                if any(b.id == backup_id(created, self.cfg.name) for b in self.store.entries()):
                    await asyncio.sleep(1.0 - created % 1.0)  # ids have a one-second resolution
                    created = time.time()
                info = await asyncio.to_thread(_describe, tmp, created, me.commit, self.cfg.name)
                await asyncio.to_thread(self.store.add_file, info, tmp)
            except (_Failed, OSError, ValueError) as exc:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                return False, self._failed(f"{exc}", reason)
        self.retry_at = None
        log.info(
            logs.kv(event="backup_taken", backup=info.id, commit=info.commit, size=info.size, reason=reason)
        )
        self.arrived(info)
        for spec in self.cfg.peers:
            self._spawn(self._push(spec.name, info))
        return True, info.id

    def _failed(self, problem: str, reason: str) -> str:
        self.failures += 1
        self.last_failure = (time.time(), problem)
        self.retry_at = time.monotonic() + self.retry_delay
        log.error(logs.kv(event="backup_failed", reason=reason, error=problem, retry_in=self.retry_delay))
        return problem

    async def _push(self, peer: str, info: BackupInfo) -> None:
        spec = self.cfg.agent(peer)
        if spec is None:
            return
        try:
            await push_backup(self.client, spec, info, self.store.path(info.id))
            self.push_errors.pop(peer, None)
        except KeyError:
            return  # dropped by retention meanwhile: a newer one goes out
        except PeerError as exc:
            if exc.status == 409:  # it is pulling this very copy
                return
            self.push_errors[peer] = str(exc)
            log.warning(logs.kv(event="backup_push_failed", backup=info.id, peer=peer, error=exc.problem))
        except (OSError, ValueError) as exc:
            self.push_errors[peer] = str(exc)
            log.warning(logs.kv(event="backup_push_failed", backup=info.id, peer=peer, error=exc))

    def arrived(self, info: BackupInfo) -> None:
        """A copy was stored (taken, pushed to us or pulled): apply retention."""
        self.store.apply_retention(self.cfg.backup.keep)
        self.wake.set()

    # ---- pulling what we lack ----------------------------------------------------------------------------
    def pull(self, reported: dict[str, tuple[BackupInfo, ...]], now: float) -> None:
        """Fetch the freshest reported backup newer than our newest, from a holder; the push of a backup taken
        less than peer_timeout ago (on its source's clock) is left to arrive first."""
        mine = self.store.entries()
        offered = newest_first({b for held in reported.values() for b in held if not b.problems()})
        if not offered:
            return
        best = offered[0]
        if mine and newest_first([best, mine[0]])[0] is mine[0]:
            return
        if best.id in self.fetching or best.id in self.store.incoming or self.store.get(best.id) is not None:
            return
        if time.time() - best.created < self.cfg.timings.peer_timeout or now < self.fetch_retry.get(
            best.id, 0.0
        ):
            return  # a new backup: its push is on the way
        holders = sorted(name for name, held in reported.items() if best in held)
        if not holders:
            return
        self.fetching.add(best.id)
        self._spawn(self._fetch(best, holders))

    async def _fetch(self, info: BackupInfo, holders: list[str]) -> None:
        try:
            for peer in holders:
                spec = self.cfg.agent(peer)
                if spec is None:
                    continue
                try:
                    await fetch_backup(self.client, spec, info, self.store)
                except (PeerError, ValueError, OSError) as exc:
                    log.warning(logs.kv(event="backup_fetch_failed", backup=info.id, peer=peer, error=exc))
                    continue
                log.info(logs.kv(event="backup_fetched", backup=info.id, peer=peer))
                self.arrived(info)
                return
            self.fetch_retry[info.id] = time.monotonic() + self.retry_delay
        finally:
            self.fetching.discard(info.id)

    def set_aside(self, backup: str) -> None:
        """A copy failed `verify` and was moved away: do not fetch it again before the retry delay (an operator
        inspecting it sees it stay away a moment; after that a good copy from a peer repairs this agent)."""
        self.fetch_retry[backup] = time.monotonic() + self.retry_delay

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()

    # ---- operator commands -------------------------------------------------------------------------------
    async def now(self) -> tuple[bool, str]:
        """`kmagent backup now`: on the anchor, take it; elsewhere ask the anchor."""
        host = self.host()
        anchor = host.coordinator.election.anchor_hint(time.monotonic())
        if anchor is None:
            return (
                False,
                "no anchor holds the lease now, so no agent may take a backup; try again in a few seconds",
            )
        if anchor == self.cfg.name:
            return await self.take(f"operator on {self.cfg.name}")
        spec = self.cfg.agent(anchor)
        assert spec is not None
        timeout = 2 * self.cfg.minkms.command_timeout + 2 * self.cfg.timings.peer_timeout + 5
        try:
            reply = await host.coordinator.client.post(
                spec,
                NOW_PATH,
                BackupNowRequest(f"operator on {self.cfg.name}"),
                BackupNowReply,
                timeout=timeout,
            )
        except PeerError as exc:
            return False, f"the anchor {anchor} could not be asked: {exc}"
        return reply.ok, reply.detail if reply.ok else f"the anchor {anchor}: {reply.detail}"

    async def on_now(self, peer: str, req: BackupNowRequest) -> BackupNowReply:
        ok, detail = await self.take(req.requested_by)
        return BackupNowReply(ok, detail)

    async def catalogue(self) -> dict[str, Any]:
        """Every backup across the cluster with the agents that hold a copy; peers that did not answer named."""
        held: dict[str, list[BackupInfo]] = {self.cfg.name: self.store.entries()}
        unreachable: dict[str, str] = {}

        async def ask(name: str) -> None:
            spec = self.cfg.agent(name)
            assert spec is not None
            try:
                held[name] = await list_backups(self.client, spec, self.cfg.timings.peer_timeout)
            except PeerError as exc:
                unreachable[name] = exc.problem

        await asyncio.gather(*(ask(p.name) for p in self.cfg.peers))
        return merge_catalogues(held, unreachable, time.time())

    async def verify(self, backup: str) -> dict[str, Any]:
        """`kmagent backup verify ID`: the local copy, then a scratch restore when configured."""
        held = self.store.get(backup) is not None
        ok, detail = await asyncio.to_thread(self.store.verify, backup)
        checks: list[dict[str, Any]] = [{"check": "copy", "ok": ok, "detail": detail}]
        if held and not ok:
            self.set_aside(backup)
        if ok and self.cfg.backup.scratch_server:
            info = self.store.get(backup)
            assert info is not None
            settings = self.host().minkms.settings
            sok, sdetail = await scratch_restore(self.cfg, settings, self.store.path(backup), info)
            checks.append({"check": "scratch restore", "ok": sok, "detail": sdetail})
            ok = sok
        elif ok:
            checks.append(
                {
                    "check": "scratch restore",
                    "ok": None,
                    "detail": "skipped: backup.scratch_server is not set",
                }
            )
        return {"backup": backup, "ok": ok, "checks": checks}

    # ---- presentation ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        entries = self.store.entries()
        newest = entries[0] if entries else None
        now = time.monotonic()
        return {
            "newest": newest.id if newest else None,
            "newest_age_seconds": round(time.time() - newest.created, 3) if newest else None,
            "copies": len(entries),
            "held": [b.id for b in entries],
            "failures": self.failures,
            "last_failure": {"at": self.last_failure[0], "error": self.last_failure[1]}
            if self.last_failure
            else None,
            "push_errors": dict(self.push_errors),
            "peers": {name: [b.id for b in held] for name, held in self.reported(now).items()},
            "interval_seconds": self.cfg.backup.interval,
            "keep": self.cfg.backup.keep,
        }

    def summary(self) -> str:
        """For the systemd STATUS line."""
        entries = self.store.entries()
        text = (
            f"backup {entries[0].id} ({human_duration(time.time() - entries[0].created)} old, {len(entries)} held)"
            if entries
            else "no backup held"
        )
        if self.last_failure and self.retry_at is not None:
            text += f"; last backup FAILED: {self.last_failure[1]}"
        return text

    def metrics(self) -> list[Metric]:
        entries = self.store.entries()
        age = time.time() - entries[0].created if entries else -1.0
        return [
            Metric(
                "kmagent_backup_failures_total",
                "counter",
                "backups that failed on this agent",
                (({}, float(self.failures)),),
            ),
            Metric(
                "kmagent_backup_age_seconds",
                "gauge",
                "age of the newest backup copy held (-1: none)",
                (({}, age),),
            ),
            Metric(
                "kmagent_backup_copies", "gauge", "backup copies held intact", (({}, float(len(entries))),)
            ),
        ]


class _Failed(Exception):
    pass


def _describe(path: Path, created: float, commit: int, source: str) -> BackupInfo:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return BackupInfo(backup_id(created, source), created, commit, size, digest.hexdigest(), source)


def merge_catalogues(
    held: dict[str, list[BackupInfo]], unreachable: dict[str, str], wall_now: float
) -> dict[str, Any]:
    """One row per backup, freshest first, with the agents holding a copy; copies whose entries disagree are
    flagged (they cannot all be the backup they claim)."""
    by_id: dict[str, list[tuple[str, BackupInfo]]] = {}
    for agent, entries in held.items():
        for info in entries:
            by_id.setdefault(info.id, []).append((agent, info))
    rows = []
    for info in newest_first({copies[0][1] for copies in by_id.values()}):
        copies = by_id[info.id]
        rows.append(
            {
                **wire.encode(info),
                "age_seconds": round(wall_now - info.created, 3),
                "holders": sorted(a for a, _ in copies),
                "conflicting": sorted(a for a, other in copies if other != info),
            }
        )
    return {"backups": rows, "unreachable": unreachable, "asked": sorted([*held, *unreachable])}


# ---- the scratch restore of `kmagent backup verify` ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile style, without quoting rules beyond one pair of quotes)."""
    env: dict[str, str] = {}
    for line in read_secret(path, "backup.scratch_env_file").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{path}: expected KEY=VALUE lines, got {line[:40]!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


async def scratch_restore(
    cfg: Config, settings: MinkmsSettings, path: Path, info: BackupInfo
) -> tuple[bool, str]:
    """Restore `path` into a throwaway minkms (backup.scratch_server) and check it holds the backup's commit.
    The scratch instance is stopped and its directory removed whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="kmagent-scratch-"))
    address = f"127.0.0.1:{_free_port()}"
    argv = [
        a.replace("{dir}", str(workdir / "data")).replace("{address}", address)
        for a in cfg.backup.scratch_server
    ]
    (workdir / "data").mkdir(mode=0o700)
    proc: asyncio.subprocess.Process | None = None
    base = Minkms(
        replace(
            settings,  # the agent's own: CLI, API key, timeouts
            server=f"https://{address}",
            insecure=True,  # our own loopback instance; its certificate names the node, not 127.0.0.1
            ca=None,
            home=workdir / "home",
        )
    )
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_KMS_") and k != "NOTIFY_SOCKET"}
        if cfg.backup.scratch_env_file is not None:
            env.update(_env_file(cfg.backup.scratch_env_file))
        logfile = os.open(workdir / "server.log", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )
        finally:
            os.close(logfile)
        deadline = time.monotonic() + SCRATCH_START
        while True:
            if proc.returncode is not None:
                return (
                    False,
                    f"the scratch minkms exited ({proc.returncode}): {_tail(workdir / 'server.log')}",
                )
            health = await base.probe()
            if health.write:
                break
            if time.monotonic() > deadline:
                return (
                    False,
                    f"the scratch minkms did not accept writes within {SCRATCH_START:g}s: {_tail(workdir / 'server.log')}",
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await proc.wait()
        result = await base.restore(address, path)
        if not result.ok:
            return False, f"minkms restore into the scratch instance failed: {result.error}"
        view = await base.cluster_status()
        commits = [n.commit for n in view.nodes_up if n.commit is not None]
        if view.error or not commits:
            return False, f"cannot read the scratch instance's commit: {view.error or 'no commit'}"
        if max(commits) < info.commit:
            return False, f"the scratch instance holds commit {max(commits)}, the backup says {info.commit}"
        return (
            True,
            f"restored into a scratch minkms at {address}: commit {max(commits)} (backup: {info.commit})",
        )
    except (
        OSError,
        ValueError,
        ConfigError,
    ) as exc:  # ConfigError: scratch_env_file unreadable or not private
        return False, f"scratch restore failed: {exc}"
    finally:
        await base.close()
        if proc is not None and proc.returncode is None:
            await _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SCRATCH_STOP):
                await proc.wait()
                return


def _tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"
