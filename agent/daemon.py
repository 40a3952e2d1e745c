"""The agent's main loop on one host: observe -> classify -> report; systemd notify, reload, clean stop.

Decisions live in `agent.core`; this module only gathers observations, keeps the timers' state and serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from agent import __version__, failpoints
from agent.actions import Actions
from agent.backups import BackupService
from agent.config import Config, ConfigError, load_config, read_secret, split_hostport
from agent.coordination import Coordinator
from agent.core import wire
from agent.core.backups import check_id
from agent.core.classify import (
    Thresholds,
    Tracked,
    Verdict,
    classify_local,
    held_for,
    human_duration,
    prune_samples,
    restarts_within,
    track,
)
from agent.core.messages import NodeReport
from agent.core.model import (
    MarkerState,
    MinkmsView,
    NodeClass,
    Observation,
    ServiceObs,
    StorageObs,
)
from agent.core.view import vouched
from agent.io import logs
from agent.io.backups import BackupStore
from agent.io.control import Access, ControlServer, json_response
from agent.io.metrics import Metric, MetricsServer
from agent.io.minkms import Minkms, MinkmsSettings
from agent.io.notify import Notifier, watchdog_forever
from agent.io.peers import PeerClient, PeerServer, Route
from agent.io.service import LabSupervisor, ServiceControl, Systemd
from agent.io.storage import Marker, StorageError, probe_storage, refresh_identity, write_marker
from agent.preflight import record_path

log = logging.getLogger("kmagent")


def build_service(cfg: Config) -> ServiceControl:
    if cfg.local.supervisor:
        return LabSupervisor(Path(cfg.local.supervisor), cfg.local.service)
    return Systemd(cfg.local.service)


def build_minkms(cfg: Config) -> Minkms:
    api_key_file = cfg.minkms.api_key_file
    return Minkms(
        MinkmsSettings(
            cli=(cfg.minkms.cli,),
            server=cfg.minkms.server or "",
            api_key=lambda: read_secret(Path(api_key_file)) if api_key_file else "",
            ca=Path(cfg.minkms.ca) if cfg.minkms.ca else None,
            insecure=cfg.minkms.insecure,
            command_timeout=cfg.minkms.command_timeout,
            probe_timeout=cfg.minkms.probe_timeout,
            home=Path(cfg.state.dir) / "minkms-home",
            peer_source=cfg.peer.source,
        )
    )


class Agent:
    """The state of one agent between probe rounds. Everything it serves is derived from here."""

    def __init__(
        self,
        cfg: Config,
        service: ServiceControl,
        minkms: Minkms,
        notifier: Notifier,
        coordinator: Coordinator,
    ) -> None:
        self.cfg = cfg
        self.coordinator = coordinator
        self.service = service
        self.minkms = minkms
        self.notifier = notifier
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.tracked: Tracked | None = None
        self.observation: Observation | None = None
        self.restart_samples: tuple[tuple[float, int], ...] = ()
        self.rounds = 0
        self.round_seconds = 0.0
        self.backups: BackupService | None = None  # set by the daemon
        # the storage probe's thread, while it runs: a hung volume hangs it, and the next rounds wait for it (one
        # thread, never a pile of them) and report STALLED from its deadline on
        self.storage_probe: asyncio.Future[StorageObs] | None = None
        self.storage_probe_started = 0.0
        self._stalled_logged: float | None = None

    @property
    def backup_store(self) -> BackupStore:
        """The copies this host holds (RESTORE fetches and restores from it)."""
        if self.backups is None:
            raise RuntimeError("the backup service is not running")
        return self.backups.store

    @property
    def my_host(self) -> str:
        return self.cfg.me.minkms_host or ""

    @property
    def storage_path(self) -> Path:
        path = self.cfg.local.storage_path
        if path is None:  # config validation requires it for a member; a witness never observes
            raise RuntimeError("no storage path configured")
        return path

    @property
    def marker_record(self) -> Path:
        return record_path(Path(self.cfg.state.dir))  # the record preflight reads

    # ---- observation ------------------------------------------------------------------------------------
    async def observe(self) -> Observation:
        started = time.monotonic()
        # Read before the storage probe starts (one snapshot, see Observation.awaiting_mark): `mark` writes the
        # marker before it journals its outcome, so a probe that misses the marker sees awaiting_mark still set.
        actions = self.coordinator.actions
        awaiting_mark = actions.awaiting_mark() if actions is not None else False
        service_task = asyncio.ensure_future(self.service.status())
        health_task = asyncio.ensure_future(self.minkms.probe())
        storage_task = asyncio.ensure_future(self.probe_storage())
        service, health, storage = await asyncio.gather(service_task, health_task, storage_task)
        view = (
            await self.minkms.cluster_status() if health.live else MinkmsView(error="minkms is not answering")
        )
        now = time.monotonic()
        self.restart_samples = prune_samples(
            (*self.restart_samples, (now, service.restarts)), now, self.cfg.timings.crash_loop_window
        )
        in_window = restarts_within(self.restart_samples, now, self.cfg.timings.crash_loop_window)
        service = ServiceObs(service.state, service.restarts, service.main_pid, in_window, service.last_error)
        obs = Observation(
            at=now, service=service, health=health, storage=storage, minkms=view, awaiting_mark=awaiting_mark
        )
        self.round_seconds = now - started
        return obs

    async def probe_storage(self) -> StorageObs:
        """The storage probe, in a thread, within its deadline (peer_timeout): past it, a stalled observation
        (STALLED), never the last answer. A probe still running from an earlier round is waited for, not
        started again."""
        if self.storage_probe is None or self.storage_probe.done():
            self.storage_probe_started = time.monotonic()
            self.storage_probe = asyncio.ensure_future(
                asyncio.to_thread(
                    probe_storage,
                    self.storage_path,
                    cluster=self.cfg.cluster,
                    host=self.my_host,
                    record=self.marker_record,
                    low_space=self.cfg.local.low_space,
                )
            )
        deadline = self.cfg.timings.peer_timeout
        remaining = self.storage_probe_started + deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(self.storage_probe), max(0.0, remaining))
        except TimeoutError:
            hung = time.monotonic() - self.storage_probe_started
            return StorageObs(
                probe_ok=False,
                stalled=True,
                error=f"the storage probe of {self.storage_path} has not returned for {human_duration(hung)} "
                f"(deadline {human_duration(deadline)}): the volume does not answer",
            )

    def verdict(self, now: float) -> Verdict | None:
        """This node's verdict as it may be used now: STALLED once the observation behind it is older than
        `view.stale_after` (a round that hangs), whatever it said. For reports and for the target's own checks."""
        if self.tracked is None or self.observation is None:
            return None
        return vouched(self.tracked.verdict, now - self.observation.at, self.coordinator.stale_after)

    def decide(self, obs: Observation) -> Verdict:
        reference = self.coordinator.reference(obs.at)
        verdict = classify_local(
            obs,
            self.my_host,
            reference,
            Thresholds(self.cfg.timings.crash_loop_restarts),
            self.coordinator.reference_commit(obs.at),
            awaiting_mark=obs.awaiting_mark,
        )
        previous = self.tracked.verdict.cls if self.tracked else None
        self.tracked = track(self.tracked, verdict, obs.at, seen=obs.at)
        self.observation = obs
        self.rounds += 1
        if previous != verdict.cls:
            log.log(
                logging.INFO if verdict.cls is NodeClass.HEALTHY else logging.WARNING,
                logs.kv(
                    event="class_changed",
                    node=self.cfg.name,
                    previous=previous,
                    now=verdict.cls,
                    reason=verdict.reason,
                ),
            )
        return verdict

    async def maintain_marker(self, obs: Observation, verdict: Verdict) -> None:
        """Record this host's identity beside the state once the node is known good (DESIGN §3), and the volume
        it is on: again when the record lacks it (an older agent's) or names another one (renumbered devices).
        A marker missing on a healthy node is one a REJOIN's late `add` left unwritten (`Actions.adopt_marker`)."""
        if verdict.cls is not NodeClass.HEALTHY:
            return
        actions = self.coordinator.actions if isinstance(self.coordinator.actions, Actions) else None
        try:
            if obs.storage.marker is MarkerState.ABSENT:
                me = obs.minkms.node_by_host(self.my_host)
                marker = Marker(self.cfg.cluster, self.my_host, me.node_id if me else None, time.time())
                await self.coordinator.disk.run(
                    "identity marker", write_marker, self.storage_path, marker, self.marker_record
                )
                log.info(logs.kv(event="marker_written", path=self.cfg.local.storage_path))
                if actions is not None:
                    await actions.settle_unmarked()
            elif obs.storage.marker is MarkerState.MISSING and actions is not None:
                await actions.adopt_marker(
                    self.storage_path,
                    self.marker_record,
                    self.my_host,
                    obs.minkms.node_by_host(self.my_host),
                    self.coordinator.reference(obs.at),
                )
            elif obs.storage.marker is MarkerState.OK and obs.storage.identity_stale:
                await self.coordinator.disk.run(
                    "identity marker", refresh_identity, self.storage_path, self.marker_record
                )
                log.info(logs.kv(event="volume_identity_recorded", path=self.cfg.local.storage_path))
            if obs.storage.marker is MarkerState.OK and actions is not None:
                await actions.settle_unmarked()
        except (OSError, StorageError) as exc:
            log.warning(logs.kv(event="marker_failed", error=exc))

    async def round(self) -> None:
        if self.cfg.is_witness:
            self.notifier.status(self.status_line())
            return
        obs = await self.observe()
        verdict = self.decide(obs)
        await self.maintain_marker(obs, verdict)
        self.notifier.status(self.status_line())

    def node_report(self, now: float) -> NodeReport | None:
        """What this agent tells its peers about its own node; None on a witness or before the first round."""
        verdict = self.verdict(now)
        if verdict is None or self.observation is None or self.tracked is None:
            return None
        if verdict.cls is not self.tracked.verdict.cls:
            self._log_stalled(verdict)
        me = self.observation.minkms.node_by_host(self.my_host)
        return NodeReport(
            cls=verdict.cls.value,
            reason=verdict.reason,
            held_seconds=round(held_for(self.tracked, self.observation.at), 3),
            host=self.my_host,
            node_id=me.node_id if me else None,
            role=me.role if me else "",
            commit=me.commit if me else None,
            leader_id=me.leader_id if me else None,
            members=me.members if me else (),
            observed_seconds=round(max(0.0, now - self.observation.at), 3),
        )

    def _log_stalled(self, verdict: Verdict) -> None:
        """Once per stalled observation: the log says when this agent stopped vouching for its own verdict."""
        assert self.observation is not None
        if self._stalled_logged != self.observation.at:
            self._stalled_logged = self.observation.at
            log.warning(logs.kv(event="observation_stalled", node=self.cfg.name, reason=verdict.reason))

    # ---- presentation -----------------------------------------------------------------------------------
    def status_line(self) -> str:
        now = time.monotonic()
        election = self.coordinator.election
        anchor = election.anchor_hint(now)
        lead = f"; anchor {anchor}, term {election.term}" if anchor else f"; no anchor (term {election.term})"
        backup = f"; {self.backups.summary()}" if self.backups is not None else ""
        if self.cfg.is_witness:
            return f"witness of cluster {self.cfg.cluster}{lead}{backup}"
        if self.tracked is None or self.observation is None:
            return "starting: no observation yet"
        t = self.tracked
        held = held_for(t, now)
        verdict = self.verdict(now) or t.verdict
        me = self.observation.minkms.node_by_host(self.my_host)
        where = f"; node {me.node_id}, {me.role}, commit {me.commit}" if me else ""
        return f"{verdict.cls} for {human_duration(held)}: {verdict.reason}{where}{lead}{backup}"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        obs = self.observation
        node: dict[str, Any] = {"name": self.cfg.name, "host": self.my_host, "role": self.cfg.me.role}
        verdict = self.verdict(now)
        if self.tracked is not None and verdict is not None:
            node.update(
                {
                    "class": str(verdict.cls),
                    "reason": verdict.reason,
                    "since_seconds": round(held_for(self.tracked, now), 3),
                }
            )
        if obs is not None:
            me = obs.minkms.node_by_host(self.my_host)
            node.update(
                {
                    "observed_seconds_ago": round(now - obs.at, 3),
                    "storage_probe_running_seconds": round(now - self.storage_probe_started, 3)
                    if self.storage_probe is not None and not self.storage_probe.done()
                    else None,
                    "service": _plain(asdict(obs.service)),
                    "health": _plain(asdict(obs.health)),
                    "storage": _plain(asdict(obs.storage)),
                    "minkms": {
                        "error": obs.minkms.error,
                        "node_id": me.node_id if me else None,
                        "role": me.role if me else None,
                        "commit": me.commit if me else None,
                        "leader_id": me.leader_id if me else None,
                        "members": dict(me.members) if me else {},
                        "nodes_down": dict(obs.minkms.nodes_down),
                    },
                }
            )
        return {
            "version": __version__,
            "cluster": self.cfg.cluster,
            "agent": self.cfg.name,
            "config": str(self.cfg.path),
            "uptime_seconds": round(now - self.started, 3),
            "status_line": self.status_line(),
            "local": node,
            **self.coordinator.status(now),
            "actions": self.coordinator.actions.status()
            if isinstance(self.coordinator.actions, Actions)
            else None,
            "backups": self.backups.status() if self.backups is not None else None,
        }

    def metrics(self) -> list[Metric]:
        labels = {"node": self.cfg.name}
        verdict = self.verdict(time.monotonic())
        current = verdict.cls if verdict is not None else NodeClass.UNKNOWN
        metrics = [
            Metric("kmagent_up", "gauge", "1 while the agent runs", (({}, 1.0),)),
            Metric(
                "kmagent_node_class",
                "gauge",
                "1 for the node's current health class",
                tuple(({**labels, "class": c.value}, 1.0 if c is current else 0.0) for c in NodeClass),
            ),
            Metric(
                "kmagent_observation_rounds_total",
                "counter",
                "probe rounds completed",
                (({}, float(self.rounds)),),
            ),
            Metric(
                "kmagent_observation_seconds",
                "gauge",
                "duration of the last probe round",
                (({}, self.round_seconds),),
            ),
        ]
        obs = self.observation
        if obs is not None:
            metrics += [
                Metric(
                    "kmagent_minkms_service_restarts",
                    "gauge",
                    "the service manager's restart counter",
                    ((labels, float(obs.service.restarts)),),
                ),
                Metric(
                    "kmagent_minkms_health",
                    "gauge",
                    "minkms health probes (1 ok, 0 failed, -1 no answer)",
                    tuple(
                        ({**labels, "probe": p}, _tri(getattr(obs.health, p)))
                        for p in ("live", "ready", "write")
                    ),
                ),
                Metric(
                    "kmagent_storage_free_bytes",
                    "gauge",
                    "free bytes in the storage path",
                    ((labels, float(obs.storage.free_bytes if obs.storage.free_bytes is not None else -1)),),
                ),
                Metric(
                    "kmagent_storage_probe_ok",
                    "gauge",
                    "1 when the write+fsync probe worked",
                    ((labels, 1.0 if obs.storage.probe_ok else 0.0),),
                ),
            ]
            metrics.append(
                Metric(
                    "kmagent_observation_age_seconds",
                    "gauge",
                    "age of the newest observation of the local node (STALLED past view.stale_after)",
                    ((labels, time.monotonic() - obs.at),),
                )
            )
        overdue = self.coordinator.disk.overdue()
        metrics.append(
            Metric(
                "kmagent_disk_write_overdue_seconds",
                "gauge",
                "how long the oldest durable write past its deadline has been outstanding (0: the disk answers)",
                (({}, overdue[1] if overdue is not None else 0.0),),
            )
        )
        if self.tracked is not None:
            metrics.append(
                Metric(
                    "kmagent_node_class_seconds",
                    "gauge",
                    "how long the current class has held",
                    ((labels, held_for(self.tracked, time.monotonic())),),
                )
            )
        if self.backups is not None:
            metrics += self.backups.metrics()
        return metrics + self.coordinator.metrics(time.monotonic())


def _tri(value: bool | None) -> float:
    return -1.0 if value is None else (1.0 if value else 0.0)


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}


class Daemon:
    """Owns the listeners and the loop; swaps the Agent's config on reload."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.notifier = Notifier()
        self.agent: Agent | None = None
        self.control: ControlServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.peer_server: PeerServer | None = None
        self.backups: BackupService | None = None
        self.stop_event = asyncio.Event()
        self.reload_lock = asyncio.Lock()

    async def run(self) -> int:
        try:
            cfg = load_config(self.config_path)
        except ConfigError as exc:
            log.error(logs.kv(event="config_invalid", path=self.config_path, errors=str(exc)))
            print(str(exc), file=sys.stderr)
            return 1
        for warning in cfg.warnings:
            log.warning(logs.kv(event="config_warning", message=warning))
        try:
            failpoints.load()  # a bad KMAGENT_FAILPOINTS refuses to start now, not at some later step
        except failpoints.FailpointError as exc:
            log.error(logs.kv(event="failpoints_invalid", error=exc))
            print(f"kmagent: {exc}", file=sys.stderr)
            return 1
        try:
            os.makedirs(cfg.state.dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            log.error(logs.kv(event="state_dir_failed", path=cfg.state.dir, error=exc))
            print(f"cannot create state.dir {cfg.state.dir}: {exc}", file=sys.stderr)
            return 1
        try:
            self.backups = BackupService(cfg, lambda: self._current())
            self.agent = self._agent(cfg, self._coordinator(cfg))
        except (OSError, ValueError, RuntimeError) as exc:  # TLS files, journal, state files, backup dir
            log.error(logs.kv(event="start_failed", error=exc))
            print(f"kmagent: cannot start: {exc}", file=sys.stderr)
            return 1
        self.peer_server = self._peer_server(cfg, self.agent)
        self.control = ControlServer(Path(cfg.control.socket), cfg.control.group)
        self.control.route("GET", "/v1/status", Access.READ, self._status)
        self.control.route("GET", "/v1/version", Access.READ, self._version)
        self.control.route("POST", "/v1/reload", Access.ADMIN, self._reload)
        self.control.route("GET", "/v1/explain", Access.READ, self._explain)
        self.control.route("GET", "/v1/history", Access.READ, self._history)
        self.control.route("POST", "/v1/ack", Access.ADMIN, self._ack)
        self.control.route("POST", "/v1/request", Access.ADMIN, self._request)
        self.control.route("POST", "/v1/pause", Access.ADMIN, self._pause)
        self.control.route("POST", "/v1/restore", Access.ADMIN, self._restore)
        self.control.route("POST", "/v1/resume", Access.ADMIN, self._resume)
        self.control.route("POST", "/v1/backup/now", Access.ADMIN, self._backup_now)
        self.control.route("GET", "/v1/backups", Access.READ, self._backup_list)
        self.control.route("POST", "/v1/backup/verify", Access.ADMIN, self._backup_verify)
        try:
            await self.control.start()
            await self.peer_server.start()
            if cfg.metrics.address:
                host, port = split_hostport(cfg.metrics.address)
                self.metrics_server = MetricsServer(
                    host, port, lambda: self.agent.metrics() if self.agent else []
                )
                await self.metrics_server.start()
        except (OSError, RuntimeError) as exc:
            log.error(logs.kv(event="listen_failed", error=exc))
            await self._close()
            return 1
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        self.notifier.ready(f"started: agent {cfg.name} of cluster {cfg.cluster}")
        log.info(
            logs.kv(
                event="started", agent=cfg.name, cluster=cfg.cluster, version=__version__, pid=os.getpid()
            )
        )
        tasks = [
            asyncio.ensure_future(self._observe_forever()),
            asyncio.ensure_future(self._coordinate_forever()),
            asyncio.ensure_future(self._drive_forever()),
            asyncio.ensure_future(self.backups.run_forever()),
        ]
        if self.notifier.watchdog_interval:
            tasks.append(
                asyncio.ensure_future(watchdog_forever(self.notifier, self.notifier.watchdog_interval))
            )
        await self.stop_event.wait()
        self.notifier.stopping()
        log.info(logs.kv(event="stopping"))
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()
        return 0

    def _coordinator(self, cfg: Config) -> Coordinator:
        def probe(host: str) -> Awaitable[bool | None]:
            assert self.agent is not None
            return self.agent.minkms.probe_live(host)

        coordinator = Coordinator(cfg, PeerClient(cfg), probe, time.monotonic())
        if self.backups is not None:
            coordinator.held_backups = self.backups.held
        return coordinator

    def _current(self) -> Agent:
        assert self.agent is not None
        return self.agent

    def _agent(self, cfg: Config, coordinator: Coordinator) -> Agent:
        agent = Agent(cfg, build_service(cfg), build_minkms(cfg), self.notifier, coordinator)
        agent.backups = self.backups
        if coordinator.actions is None and not cfg.is_witness:
            coordinator.actions = Actions(cfg, coordinator, lambda: self.agent or agent)
        return agent

    def _peer_server(self, cfg: Config, agent: Agent) -> PeerServer:
        actions = agent.coordinator.actions
        routes: list[Route] = agent.coordinator.routes()
        routes += actions.routes() if isinstance(actions, Actions) else []
        assert self.backups is not None
        return PeerServer(cfg, routes + self.backups.routes(), streams=self.backups.streams())

    async def _close(self) -> None:
        if self.control:
            await self.control.stop()
        if self.peer_server:
            await self.peer_server.stop()
        if self.metrics_server:
            await self.metrics_server.stop()
        if self.agent:
            await self.agent.minkms.close()
            await self.agent.coordinator.close()
        if self.backups:
            await self.backups.close()

    async def _observe_forever(self) -> None:
        while True:
            agent = self.agent
            assert agent is not None
            started = time.monotonic()
            try:
                await agent.round()
            except asyncio.CancelledError:
                raise
            except Exception:  # an observation bug must never stop the agent
                log.exception(logs.kv(event="round_failed"))
            interval = agent.cfg.timings.probe_interval
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))

    async def _drive_forever(self) -> None:
        """The anchor's destructive work, on its own task: a step may take minutes, elections must not wait."""
        while True:
            agent = self.agent
            assert agent is not None
            try:
                if isinstance(agent.coordinator.actions, Actions):
                    await agent.coordinator.actions.drive_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must never stop the agent; the journal lets the next round resume
                log.exception(logs.kv(event="drive_failed"))
            await asyncio.sleep(agent.cfg.timings.probe_interval)

    async def _coordinate_forever(self) -> None:
        """Election and reports on their own beat, so that a slow minkms command never delays a lease renewal."""
        while True:
            agent = self.agent
            assert agent is not None
            now = time.monotonic()
            try:
                agent.coordinator.tick(agent.node_report(now), now)
            except Exception:  # a coordination bug must never stop the agent
                log.exception(logs.kv(event="coordination_failed"))
            await asyncio.sleep(agent.cfg.timings.probe_interval)

    async def reload(self) -> list[str]:
        """Load the config again; a bad one is rejected and the running one kept. Returns the errors."""
        async with self.reload_lock:
            self.notifier.reloading()
            try:
                cfg = load_config(self.config_path)
            except ConfigError as exc:
                errors = [str(i) for i in exc.errors]
                log.error(logs.kv(event="reload_rejected", errors="; ".join(errors)))
                self.notifier.ready(f"reload rejected, running config kept: {errors[0] if errors else ''}")
                return errors
            assert self.agent is not None and self.peer_server is not None
            old = self.agent
            coordinator = old.coordinator
            if _coordination(cfg) != _coordination(old.cfg):
                # Peers, TLS or the lease changed: a new election state (its restart rule keeps it safe) and a
                # new listener. If the listener cannot start, the old one comes back and the reload fails.
                coordinator = self._coordinator(cfg)
                try:
                    candidate = self._agent(cfg, coordinator)
                except (OSError, ValueError, RuntimeError) as exc:
                    await coordinator.close()
                    error = f"cannot apply the new config: {exc}"
                    log.error(logs.kv(event="reload_rejected", errors=error))
                    self.notifier.ready(f"reload rejected, running config kept: {error}")
                    return [error]
                server = self._peer_server(cfg, candidate)
                await self.peer_server.stop()
                try:
                    await server.start()
                except (OSError, RuntimeError) as exc:
                    await self.peer_server.start()
                    await coordinator.close()
                    error = f"peer.listen {cfg.peer.listen}: cannot listen: {exc}"
                    log.error(logs.kv(event="reload_rejected", errors=error))
                    self.notifier.ready(f"reload rejected, running config kept: {error}")
                    return [error]
                await old.coordinator.close()
                self.peer_server = server
            else:
                coordinator.cfg = coordinator.client.config = cfg
                if isinstance(coordinator.actions, Actions):
                    coordinator.actions.cfg = cfg
            await old.minkms.close()
            assert self.backups is not None
            try:
                await self.backups.reconfigure(cfg)
            except (OSError, ValueError) as exc:  # a new backup.dir that cannot be made: keep the old one
                log.error(logs.kv(event="backup_dir_failed", path=cfg.backup.dir, error=exc))
            self.agent = self._agent(cfg, coordinator)
            self.agent.tracked, self.agent.restart_samples = old.tracked, old.restart_samples
            self.agent.started, self.agent.started_wall = old.started, old.started_wall
            log.info(logs.kv(event="reloaded", path=self.config_path))
            self.notifier.ready("reloaded: " + self.agent.status_line())
            return []

    async def _status(self, request: web.Request) -> web.Response:
        assert self.agent is not None
        return json_response(self.agent.status())

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": __version__})

    def _actions(self) -> Actions | None:
        assert self.agent is not None
        actions = self.agent.coordinator.actions
        return actions if isinstance(actions, Actions) else None

    @staticmethod
    def _witness() -> web.Response:
        return json_response(
            {"error": "this agent is a witness: it runs no actions; ask a member's agent"}, 409
        )

    async def _explain(self, request: web.Request) -> web.Response:
        actions = self._actions()
        if actions is None:
            return self._witness()
        data, text = actions.explain()
        return json_response(data | {"text": text})

    async def _history(self, request: web.Request) -> web.Response:
        actions = self._actions()
        if actions is None:
            return self._witness()
        entries = actions.history.entries(limit=500)
        return json_response({"entries": [json.loads(wire.dumps(e)) for e in entries]})

    async def _ack(self, request: web.Request) -> web.Response:
        actions = self._actions()
        if actions is None:
            return self._witness()
        try:
            body = await request.json()
            node = body["node"]
            if not isinstance(node, str):
                raise TypeError("node must be a string")
            message = actions.ack(node)
        except (ValueError, KeyError, TypeError) as exc:
            return json_response({"error": f"bad ack request: {exc}"}, 400)
        return json_response({"message": message})

    async def _request(self, request: web.Request) -> web.Response:
        actions = self._actions()
        if actions is None:
            return self._witness()
        try:
            body = await request.json()
            kind, node = body["kind"], body["node"]
            if kind not in ("REJOIN", "EVICT") or not isinstance(node, str):
                raise ValueError("kind must be REJOIN or EVICT and node a string")
        except (ValueError, KeyError, TypeError) as exc:
            return json_response({"error": f"bad request: {exc}"}, 400)
        ok, message = await actions.request(kind, node)
        return json_response({"message": message} if ok else {"error": message}, 200 if ok else 409)

    async def _restore(self, request: web.Request) -> web.Response:
        actions = self._actions()
        if actions is None:
            return self._witness()
        try:
            body = await request.json()
            approve, backup, accept = body["approve"], body.get("backup"), body.get("accept_loss_of", [])
            if not isinstance(approve, bool):
                raise TypeError("approve must be true or false")
            if backup is not None:
                check_id(backup)
            if (
                not isinstance(accept, list)
                or not all(isinstance(n, str) for n in accept)
                or len(accept) > 64
            ):
                raise TypeError("accept_loss_of must be a list of node names")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return json_response({"error": f"bad restore request: {exc}"}, 400)
        ok, message = actions.restore(approve, backup, tuple(dict.fromkeys(accept)))
        return json_response({"message": message} if ok else {"error": message}, 200 if ok else 409)

    async def _pause(self, request: web.Request) -> web.Response:
        assert self.agent is not None
        try:
            body = await request.json()
            seconds, reason = body.get("seconds"), body.get("reason", "")
            if seconds is not None and (
                not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0
            ):
                raise ValueError(f"seconds must be a positive number, got {seconds!r}")
            if not isinstance(reason, str) or len(reason) > 500:
                raise ValueError("reason must be a string of at most 500 characters")
        except (ValueError, AttributeError) as exc:
            return json_response({"error": f"bad pause request: {exc}"}, 400)
        who = f"paused on {self.agent.cfg.name}" + (f": {reason}" if reason else "")
        pause = self.agent.coordinator.set_pause(float(seconds) if seconds is not None else None, who)
        return json_response({"paused_until": pause.until, "reason": pause.reason})

    async def _resume(self, request: web.Request) -> web.Response:
        assert self.agent is not None
        self.agent.coordinator.resume(f"resumed on {self.agent.cfg.name}")
        return json_response({"ok": True})

    async def _backup_now(self, request: web.Request) -> web.Response:
        assert self.backups is not None
        ok, detail = await self.backups.now()
        return json_response({"backup": detail} if ok else {"error": detail}, 200 if ok else 409)

    async def _backup_list(self, request: web.Request) -> web.Response:
        assert self.backups is not None
        return json_response(await self.backups.catalogue())

    async def _backup_verify(self, request: web.Request) -> web.Response:
        assert self.backups is not None
        try:
            body = await request.json()
            backup = check_id(body["backup"] if isinstance(body.get("backup"), str) else "")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return json_response({"error": f"bad verify request: {exc}"}, 400)
        return json_response(await self.backups.verify(backup))

    async def _reload(self, request: web.Request) -> web.Response:
        errors = await self.reload()
        if errors:
            # The first error is in the message itself, so that `kmagent reload` can name it.
            message = f"new config rejected, the running config is kept: {errors[0] if errors else '?'}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more)"
            return json_response({"error": message, "errors": errors}, 422)
        return json_response({"ok": True})


def _coordination(cfg: Config) -> tuple[object, ...]:
    """The settings that the peer listener and the election state are built from."""
    return (cfg.cluster, cfg.name, cfg.agents, cfg.tls, cfg.peer, cfg.timings.lease, cfg.state.dir)


def main(config_path: Path) -> int:
    logs.setup()
    return asyncio.run(Daemon(config_path).run())
