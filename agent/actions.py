"""Destructive actions (DESIGN §4.3, §4.4, §5, §6): acks on every agent, certified steps on the target, and the
anchor driving them. Decisions are `agent.core` (guards, planner, playbooks, agreement); this shell keeps the
journal, signs, verifies, and runs the steps against minkms, the service manager and the storage path.

Every step is journaled (intent with fsync before it runs, outcome after) and idempotent, so that a crash of any
agent at any point ends with the action resumed or cleanly closed. Journal and state-file writes run off the event
loop with a deadline (`agent.io.durable.Writes`): a hung disk stalls the step, never the loop, and a write that
did not return is never acted on. Every destructive minkms command is fenced (`agent.core.fencing`): it names what
it was certified for, and leaves only while this agent's lease outlasts it, checked right before it starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from aiohttp import web

from agent import failpoints
from agent.config import Config
from agent.core import backups, execution, fencing, guards, planner, playbooks, restore
from agent.core import facts as cf
from agent.core.agreement import AckCollector, Held, answer_ack, certificate_problems, release
from agent.core.backups import BackupInfo
from agent.core.execution import FINISH_STEP, RECENT_FINISHED
from agent.core.messages import (
    AckReply,
    AckRequest,
    Action,
    Certificate,
    OperatorRequest,
    StepReply,
    StepRequest,
)
from agent.core.model import NodeClass, NodeStatus, ServiceState
from agent.core.view import fresh_report
from agent.io import logs
from agent.io.backups import fetch_backup
from agent.io.durable import DiskStalled, read_json, write_json
from agent.io.journal import ActionState, History, HistoryEntry, Journal, Outcome, close_action
from agent.io.minkms import RC_FENCED, CommandResult, Fence
from agent.io.peers import PeerError
from agent.io.signing import AckVerifier, Signer
from agent.io.storage import (
    UNMARKED_NAME,
    Marker,
    clear_unmarked,
    note_unmarked,
    quarantine,
    read_unmarked,
    write_marker,
)
from agent.preflight import authorise_fresh_start, revoke_fresh_start

if TYPE_CHECKING:
    from agent.coordination import Coordinator
    from agent.daemon import Agent

log = logging.getLogger("kmagent")
P = ParamSpec("P")
R = TypeVar("R")

ACK_PATH = "/v1/peer/ack"
STEP_PATH = "/v1/peer/step"
HISTORY_PATH = "/v1/peer/history"
REQUEST_PATH = "/v1/peer/request"


class StepFailed(Exception):
    """A step did not reach its goal; the message says what was seen."""


class NotRun(Exception):
    """A step that did not run (or whose command was killed in doubt), and is not counted against its attempts: its
    destructive command was fenced or killed as its lease ended, the disk did not journal it in time, or the target
    holds its issuer deposed. Again next round, by whoever is anchor then."""


@dataclass
class Drive:
    """The anchor's work on one action in one term."""

    action: Action
    term: int
    collector: AckCollector
    certificate: Certificate | None = None
    refusals: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    unanswered: dict[str, float] = field(default_factory=dict)  # step -> when the target first did not answer
    target_done: tuple[str, ...] = ()  # the target's journaled progress, from its last reply
    progress_known: bool = False  # the target has replied in this drive: target_done is its progress
    fresh: bool = (
        False  # proposed by this anchor (nothing was unfinished): no other agent can have acted on it
    )


class Actions:
    def __init__(self, cfg: Config, coordinator: Coordinator, agent: Callable[[], Agent]) -> None:
        self.cfg = cfg
        self.coordinator = coordinator
        self.agent = agent
        state = Path(cfg.state.dir)
        self.journal = Journal(state / "journal.jsonl", cfg.name, held_path=state / "held.json")
        self.history = History(state / "history.jsonl")
        self.escalated_path = state / "escalated.json"
        self.superseded_path = state / "superseded.json"
        self.signer = Signer.from_files(Path(cfg.tls.cert), Path(cfg.tls.key), cfg.name)
        self.verifier = AckVerifier.from_file(Path(cfg.tls.ca), [a.name for a in cfg.agents])
        self.held: Held | None = self.journal.load_held()
        self.since: dict[str, float] = {}
        self.acks: dict[str, float] = {}
        self.escalated: frozenset[str] = self._load_escalated()
        self.superseded: tuple[str, ...] = self._load_superseded()
        note = state / UNMARKED_NAME
        if note.is_symlink() or (
            note.exists() and not note.is_file()
        ):  # `start` could neither write nor clear it
            raise ValueError(f"{note} is the agent's own note and must be a regular file: move it away")
        self.unmarked: str | None = read_unmarked(state)  # a REJOIN started this node fresh; no marker since
        self.unmarked_stuck = False  # the note could not be removed (logged once)
        self.drive: Drive | None = None
        self.requested: Action | None = (
            None  # an operator's request, on the anchor, until proposed or refused
        )
        self.lock = asyncio.Lock()  # one ack decision or step at a time on this agent
        self.disk = coordinator.disk  # durable writes, off the loop, with a deadline
        self.closing: asyncio.Task[None] | None = None  # closing actions a peer recorded finished
        # action id -> peers that answered its history share: the close counts once a quorum recorded it
        self.confirmed: dict[str, set[str]] = {}
        self.unconfirmed_logged: tuple[str, str] | None = None  # (event, close) of the wait last logged
        # the remote anchor (name, certificate term) whose step request runs here now; None: this agent's own
        self.issuer: tuple[str, int] | None = None
        self.max_cert_term = max(
            (s.certificate.term for s in self.journal.state().actions.values()), default=0
        )
        self.busy = False

    def routes(self) -> list[tuple[str, type[Any], Callable[[str, Any], Awaitable[object]]]]:
        return [
            (ACK_PATH, AckRequest, self.on_ack),
            (STEP_PATH, StepRequest, self.on_step),
            (HISTORY_PATH, HistoryEntry, self.on_history),
            (REQUEST_PATH, OperatorRequest, self.on_request),
        ]

    async def on_history(self, peer: str, entry: HistoryEntry) -> StepReply:
        """The anchor shares every finished action, so that `kmagent history` on any host shows it; the
        certificate is verified like any other (a forged entry must not make an audit record)."""
        if self.history.find(entry.action.id) is not None:  # recorded: say so, whatever the config says now
            self.on_peer_finished((entry.action.id,))
            return StepReply(True, "recorded already")
        problems = self.certificate_problems(entry.certificate)
        if problems or entry.certificate.action != entry.action:
            raise web.HTTPForbidden(
                reason="history entry refused: " + ("; ".join(problems) or "action mismatch")[:300]
            )
        if self.history.find(entry.action.id) is None:
            await self._io("history append", self.history.append, entry)
        self.on_peer_finished((entry.action.id,))
        return StepReply(True, "recorded")

    # ---- facts -------------------------------------------------------------------------------------------
    def facts(self, anchor: str | None, now: float | None = None) -> cf.ClusterFacts:
        now = time.monotonic() if now is None else now
        base = self._facts(anchor, now)
        return dataclasses.replace(base, unfinished=self._unfinished(lambda: base, now))

    def _facts(self, anchor: str | None, now: float) -> cf.ClusterFacts:
        """Everything but the unfinished action, which is chosen in view of these (`execution.superseded`)."""
        c = self.coordinator
        reference = c.reference(now) or {}
        hosts = {a.name: a.minkms_host for a in self.cfg.agents}
        nodes, removed = cf.node_facts(c.views, hosts, c.tracked, reference, now)
        history = tuple(
            cf.HistoryEntry(e.action.target, e.action.kind, e.started, e.outcome, e.finished)
            for e in self.history.entries(limit=200)
        )
        pause = c.pause
        return cf.ClusterFacts(
            me=self.cfg.name,
            anchor=anchor,
            term=c.election.term,
            nodes=nodes,
            unfinished=None,
            removed=removed,
            history=history,
            finished=frozenset(self.recorded_ids()),
            escalated=self.escalated,
            acked=self.ack_items(),
            paused_until=pause.until if pause.active(time.time()) else 0.0,
            backups=self._holdings(now),
            approval=c.approval,
            now=now,
            wall_now=time.time(),
            timings=self.cfg.timings,
            policy=self.cfg.policy,
        )

    def unfinished(self) -> Action | None:
        """The unfinished action to resume first (`execution.unfinished_action`): held, journaled, or carried by a
        fresh peer report and not finished in our history; never one a total loss superseded in our view."""
        now = time.monotonic()
        return self._unfinished(lambda: self._facts(None, now), now)

    def _unfinished(self, base: Callable[[], cf.ClusterFacts], now: float) -> Action | None:
        timeout = self.cfg.timings.peer_timeout
        reports = (fresh_report(link.state, now, timeout) for link in self.coordinator.links.values())
        return execution.unfinished_action(
            self.held.action if self.held is not None else None,
            [s.action for s in self.journal.state().unfinished()],
            [r for r in reports if r is not None],
            _InHistory(self.history, self.superseded),
            skip=execution.superseded_in(self.coordinator.views, base),
        )

    def awaiting_mark(self) -> bool:
        """This node's own REJOIN started it fresh and has not marked it yet (see `execution.awaiting_mark`), or
        one did and closed without `mark` (the note of `note_unmarked`, until `adopt_marker`)."""
        pending = [(s.action, s.progress.done) for s in self.journal.state().unfinished()]
        return execution.awaiting_mark(self.cfg.name, pending) or self.unmarked is not None

    async def adopt_marker(
        self,
        storage: Path,
        record: Path,
        my_host: str,
        local: NodeStatus | None,
        reference: Mapping[int, str] | None,
    ) -> int | None:
        """Write the marker of a node that a REJOIN's late `add` made a member after the REJOIN closed without
        `mark` (`execution.adoptable`); the node id it was written under, or None. Never while a step runs: the
        observation round must not wait minutes for the lock."""
        if self.unmarked is None or self.lock.locked():
            return None
        async with self.lock:
            me = execution.adoptable(my_host, True, self._own_rejoin_pending(), local, reference or {})
            if me is None:
                return None
            marker = Marker(self.cfg.cluster, my_host, me, time.time())
            await self._io("identity marker", write_marker, storage, marker, record)
            await self._clear_unmarked()
        log.warning(
            logs.kv(
                event="marker_adopted",
                node_id=me,
                detail="a member without its marker after its REJOIN closed: the late add made it one",
            )
        )
        return me

    async def settle_unmarked(self) -> bool:
        """Drop the note on a node whose marker is in place again with no REJOIN of its own unfinished (a marker
        written outside `mark`, or a note `mark` could not remove): a stale note would keep a later missing
        marker from ever reading as a replaced volume. True when no note is left. Never waits for the lock."""
        if self.unmarked is None:
            return True
        if self.lock.locked():
            return False
        async with self.lock:
            if not self._own_rejoin_pending():
                await self._clear_unmarked()
        return self.unmarked is None

    def _own_rejoin_pending(self) -> bool:
        return any(
            s.action.kind == "REJOIN" and s.action.target == self.cfg.name
            for s in self.journal.state().unfinished()
        )

    async def _clear_unmarked(self) -> None:
        """The marker is written: the note has done its job. A note that cannot be removed fails no step; it
        still counts as present (a missing marker reads as expected, which never licenses a wipe) and
        `settle_unmarked` tries again each round."""
        try:
            await self._io("unmarked note", clear_unmarked, Path(self.cfg.state.dir))
        except OSError as exc:
            if not self.unmarked_stuck:
                log.error(logs.kv(event="unmarked_note_stuck", path=self.cfg.state.dir, error=exc))
            self.unmarked_stuck = True
            return
        self.unmarked = None
        self.unmarked_stuck = False

    def finished_ids(self) -> tuple[str, ...]:
        history = [e.action.id for e in self.history.entries(limit=RECENT_FINISHED)]
        return execution.finished_ids(history, self.superseded)

    def recorded_ids(self) -> tuple[str, ...]:
        """Every id this agent recorded finished that guard rule `finished` refuses: the recent history (more of
        it than the reports carry) and the superseded drops."""
        return (*(e.action.id for e in self.history.entries(limit=200)), *self.superseded)

    def _load_superseded(self) -> tuple[str, ...]:
        try:
            data = read_json(self.superseded_path)
        except (OSError, ValueError) as exc:  # lost ids: a peer's report or history still names most of them
            log.error(logs.kv(event="superseded_unreadable", path=self.superseded_path, error=exc))
            return ()
        return tuple(i for i in data if isinstance(i, str)) if isinstance(data, list) else ()

    async def _remember_superseded(self, action_id: str) -> None:
        """Durable, so that this agent never resumes nor adopts the dropped action again, even after a restart."""
        if action_id not in self.superseded:
            superseded = (*self.superseded, action_id)[-RECENT_FINISHED:]
            await self._io("superseded.json", write_json, self.superseded_path, list(superseded))
            self.superseded = superseded

    async def _io(self, what: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """A blocking durable write, off the loop, in order, within the disk deadline (DiskStalled after it)."""
        return await self.disk.run(what, fn, *args, **kwargs)

    def on_peer_finished(self, finished: tuple[str, ...]) -> None:
        """A peer recorded these actions finished: release ours, and close our journal of them (a target whose
        finish request was lost); reports carry the ids to every acker. Called on receipt of a report: the
        writes run in a task of their own, under the lock (a report repeats the ids, so a round missed is not
        lost)."""
        held = self.held is not None and self.held.action.id in finished
        if not (held or self._to_close(finished)) or (self.closing is not None and not self.closing.done()):
            return
        self.closing = asyncio.ensure_future(self._close_finished(finished))
        self.closing.add_done_callback(_log_failure)

    def _to_close(self, finished: tuple[str, ...]) -> list[ActionState]:
        return [
            state
            for state in self.journal.state().unfinished()
            if state.action.id in finished and (self.drive is None or self.drive.action.id != state.action.id)
        ]

    async def _close_finished(self, finished: tuple[str, ...]) -> None:
        async with self.lock:
            if self.held is not None and self.held.action.id in finished:
                await self._save_held(release(self.held, self.held.action.id))
            for state in self._to_close(finished):
                detail = "closed here: the anchor recorded it finished (its history has the outcome)"
                await self._close_journal(state.action.id, "done", detail, ())
                if state.action.target == self.cfg.name:
                    await self._revoke_fresh_start()

    async def _close_journal(
        self, action_id: str, outcome: Outcome, detail: str, evidence: tuple[str, ...]
    ) -> HistoryEntry:
        """`close_action` (history entry first, then the journal's finish record) on the disk thread."""
        return await self._io(
            "close action", close_action, self.journal, self.history, action_id, outcome, detail, evidence
        )

    async def _revoke_fresh_start(self) -> None:
        await self._io("fresh-start authorisation", revoke_fresh_start, Path(self.cfg.state.dir))

    async def _save_held(self, held: Held | None) -> None:
        """Durable before anyone hears of it (an ack leaves only after this returned)."""
        await self._io("held.json", self.journal.save_held, held)
        self.held = held

    # ---- escalation (DESIGN §6.6) --------------------------------------------------------------------------
    def _load_escalated(self) -> frozenset[str]:
        """Escalated nodes (name -> since, wall) and operators' acks (name -> when), in one file."""
        try:
            data = read_json(self.escalated_path)
        except (OSError, ValueError) as exc:
            log.error(logs.kv(event="escalated_unreadable", path=self.escalated_path, error=exc))
            self.since = {a.name: time.time() for a in self.cfg.members}  # when in doubt, do not act
            return frozenset(self.since)
        data = data if isinstance(data, dict) else {}
        self.since = {k: float(v) for k, v in data.get("escalated", {}).items() if isinstance(v, int | float)}
        self.acks = {k: float(v) for k, v in data.get("acks", {}).items() if isinstance(v, int | float)}
        return frozenset(self.since)

    def _save_escalation(self) -> None:
        """The escalations and acks as they are now: written on the disk thread, in order (`Coordinator.persist`)."""
        self.escalated = frozenset(self.since)
        self.coordinator.persist(
            "escalated.json", self.escalated_path, {"escalated": dict(self.since), "acks": dict(self.acks)}
        )

    def set_escalated(self, names: frozenset[str]) -> None:
        now = time.time()
        self.since = {n: self.since.get(n, now) for n in names}
        self._save_escalation()

    def merge_acks(self, acks: tuple[tuple[str, float], ...]) -> None:
        """Acks given on any host reach every agent through the reports: the latest per node wins, and it
        releases an escalation older than itself."""
        changed = False
        for node, when in acks:
            if self.cfg.agent(node) is None or when <= self.acks.get(node, -math.inf):
                continue
            self.acks[node] = when
            if self.since.get(node, math.inf) <= when:
                del self.since[node]
            changed = True
        if changed:
            self._save_escalation()

    def ack_items(self) -> tuple[tuple[str, float], ...]:
        return tuple(sorted(self.acks.items()))

    # ---- every agent: acks -----------------------------------------------------------------------------------
    async def on_ack(self, peer: str, req: AckRequest) -> AckReply:
        if req.anchor != peer:
            raise web.HTTPForbidden(reason=f"ack request for anchor {req.anchor!r} sent by {peer!r}")
        async with self.lock:
            return await self._answer(req)

    async def _answer(self, req: AckRequest) -> AckReply:
        if not self.coordinator.views:
            return AckReply(False, "not ready: this agent has no view of the cluster yet")
        try:
            verdict = guards.verdict(req.action, self.facts(anchor=req.anchor))
        except ValueError as exc:  # e.g. an anchor name this agent does not know
            return AckReply(False, f"cannot judge the request: {exc}")
        reply, held = answer_ack(
            req,
            cluster=self.cfg.cluster,
            ballot=self.coordinator.election.ballot,
            verdict=verdict,
            held=self.held,
            sign=self.signer.sign,
        )
        if held is not None:
            try:
                await self._save_held(held)  # durable before the ack leaves
            except OSError as exc:  # DiskStalled too: an ack not durable is never given
                log.error(logs.kv(event="ack_not_persisted", action=req.action.id, error=exc))
                return AckReply(False, f"could not persist the ack: {exc}")
        log.log(
            logging.WARNING if reply.granted else logging.INFO,
            logs.kv(
                event="ack_given" if reply.granted else "ack_refused",
                action=req.action.id,
                kind=req.action.kind,
                target=req.action.target,
                term=req.term,
                reason=reply.reason or None,
            ),
        )
        return reply

    # ---- the target: certified steps ---------------------------------------------------------------------
    def certificate_problems(self, cert: Certificate) -> list[str]:
        now = datetime.datetime.now(datetime.UTC)
        return certificate_problems(
            cert, self.cfg.cluster, [a.name for a in self.cfg.agents], self.cfg.quorum, self.verifier.at(now)
        )

    async def on_step(self, peer: str, req: StepRequest) -> StepReply:
        cert, action = req.certificate, req.certificate.action
        problems = self.certificate_problems(cert)
        if problems:
            raise web.HTTPForbidden(reason="certificate refused: " + "; ".join(problems)[:300])
        if action.target != self.cfg.name:
            raise web.HTTPForbidden(reason=f"the certificate names {action.target}, not this agent")
        async with self.lock:  # judged once the lock is ours: a wait for it may have seen a new anchor
            deposed = self._deposed(peer, cert.term)
            if deposed is not None:
                log.warning(
                    logs.kv(event="step_refused", action=action.id, step=req.step, peer=peer, reason=deposed)
                )
                return StepReply(False, deposed, not_run=True)
            self.issuer = (peer, cert.term)
            try:
                return await self._target_step(cert, req.step)
            except NotRun as exc:
                return StepReply(False, str(exc), not_run=True)
            finally:
                self.issuer = None

    def _deposed(self, issuer: str, cert_term: int) -> str | None:
        election = self.coordinator.election
        return execution.deposed(issuer, cert_term, election.anchor_hint(time.monotonic()), election.term)

    async def _target_step(self, cert: Certificate, step_name: str) -> StepReply:
        action = cert.action
        state = self.journal.state().get(action.id)
        done = tuple(state.progress.done) if state is not None else ()
        if step_name == FINISH_STEP and cert.term >= self.max_cert_term:
            try:
                if state is not None and not state.finished:
                    await self._close_journal(action.id, "done", "the anchor recorded it done", ())
                await self._revoke_fresh_start()
                await self._save_held(release(self.held, action.id))
            except OSError as exc:
                return StepReply(False, f"not finished here: {exc}", done)
            return StepReply(True, "finished", done)
        mine = self.agent().verdict(time.monotonic())  # STALLED once its observation is old: never run on it
        decision = execution.target_decision(
            action,
            step_name,
            cert_term=cert.term,
            max_cert_term=self.max_cert_term,
            begun=state is not None,
            finished=state is not None and state.finished,
            done=done,
            own_class=mine.cls if mine is not None else None,
        )
        if not decision.run:
            return StepReply(decision.ok, decision.detail, done)
        self.max_cert_term = max(self.max_cert_term, cert.term)
        ok, detail = await self._journaled(cert, step_name, self._run_target_step)
        state = self.journal.state().get(action.id)
        return StepReply(ok, detail, tuple(state.progress.done) if state else ())

    async def _journaled(
        self,
        cert: Certificate,
        step_name: str,
        run: Callable[[Action, str], Awaitable[str]],
    ) -> tuple[bool, str]:
        action = cert.action
        try:
            if self.journal.state().get(action.id) is None:
                role = "anchor" if action.target != self.cfg.name else "target"
                await self._io("journal begin", self.journal.begin, action, cert, role)
            await self._io("journal intent", self.journal.intent, action, step_name, cert.term, cert)
        except DiskStalled as exc:  # the intent may land later: in doubt, re-run through the step's own check
            raise NotRun(f"{step_name} not started: {exc}") from None
        await failpoints.reach(f"{action.kind}.{step_name}.intent")
        log.warning(logs.kv(event="step_started", action=action.id, step=step_name, target=action.target))
        not_run: NotRun | None = None
        try:
            detail = await run(action, step_name)
            ok = True
        except NotRun as exc:
            ok, detail, not_run = False, str(exc), exc
        except (StepFailed, OSError, RuntimeError, ValueError) as exc:
            ok, detail = False, str(exc)
        await failpoints.reach(f"{action.kind}.{step_name}.outcome")
        try:
            await self._io("journal outcome", self.journal.outcome, action.id, step_name, ok, detail)
        except DiskStalled as exc:  # the outcome is in doubt: the step re-runs (idempotent) next round
            raise NotRun(f"{step_name}: outcome not journaled: {exc}") from None
        if not_run is not None:
            log.warning(logs.kv(event="step_not_run", action=action.id, step=step_name, detail=detail))
            raise not_run
        log.log(
            logging.WARNING if ok else logging.ERROR,
            logs.kv(
                event="step_done" if ok else "step_failed", action=action.id, step=step_name, detail=detail
            ),
        )
        return ok, detail

    async def _run_target_step(self, action: Action, step_name: str) -> str:
        agent = self.agent()
        timeout = _step(action.kind, step_name).timeout
        if step_name == "fence":
            await agent.service.stop()
            await _until(timeout, lambda: self._stopped(agent), "minkms to stop")
            return "minkms stopped"
        if step_name == "quarantine":
            # the marker record says whether the storage path must be a mount point (require_mount unset) and on
            # which volume it was marked: quarantine refuses a path that is not on it (an unmounted volume)
            expected = Marker(self.cfg.cluster, agent.my_host, None, 0.0)
            qdir = await asyncio.to_thread(
                quarantine,
                agent.storage_path,
                agent.storage_path,
                Path(self.cfg.state.dir) / "quarantine",
                action.id,
                require_mount=self.cfg.local.require_mount,
                expected_marker=expected,
                record=agent.marker_record,
                now=time.time(),
            )
            return f"state moved to {qdir}"
        if step_name == "start":
            if action.kind == "REJOIN":  # before minkms may start fresh: outlives the action (`adopt_marker`)
                await self._io(
                    "unmarked note", note_unmarked, Path(self.cfg.state.dir), action.id, time.time()
                )
                self.unmarked = action.id
            until = time.time() + timeout + 60
            await self._io(
                "fresh-start authorisation", authorise_fresh_start, Path(self.cfg.state.dir), action.id, until
            )
            await agent.service.start()
            await _until(timeout, lambda: self._live(agent), "minkms to answer live")
            return "minkms started fresh"
        if step_name == "fetch":
            return await self._fetch(self._backup_of(action))
        if step_name == "restore":
            return await self._restore(agent, self._backup_of(action), timeout)
        if step_name == "verify":  # RESTORE's: the node itself holds the backup's state and takes writes
            want = self._backup_of(action).commit
            await _until(timeout, lambda: _commit_reached(agent, want), f"this node's commit to reach {want}")
            await _until(timeout, lambda: self._writable(agent), "this node to accept writes")
            return f"verified: commit at least {want}, writes work"
        if step_name == "mark":
            alone = action.kind == "RESTORE"  # a restored node is a cluster of one until the others rejoin
            me = await _until(
                timeout, lambda: self._member_id(agent, alone), "this node to see itself a member"
            )
            marker = Marker(self.cfg.cluster, agent.my_host, me, time.time())
            await self._io("identity marker", write_marker, agent.storage_path, marker, agent.marker_record)
            await self._clear_unmarked()
            await self._revoke_fresh_start()
            return f"identity marker written: node {me}"
        raise StepFailed(f"{step_name} is not a step of the target")

    @staticmethod
    async def _stopped(agent: Agent) -> bool:
        service = await agent.service.status()
        health = await agent.minkms.probe()
        return service.state in (ServiceState.INACTIVE, ServiceState.FAILED) and health.live is not True

    @staticmethod
    async def _live(agent: Agent) -> bool:
        return (await agent.minkms.probe()).live is True

    @staticmethod
    async def _member_id(agent: Agent, alone: bool = False) -> int | None:
        view = await agent.minkms.cluster_status()
        me = view.node_by_host(agent.my_host)
        return me.node_id if me is not None and len(me.members) > (0 if alone else 1) else None

    def _backup_of(self, action: Action) -> BackupInfo:
        """The catalogue entry of the backup a RESTORE names (its id, sha256 and commit are signed into it)."""
        params = dict(action.params)
        for _, held in self._holdings(time.monotonic()):
            for b in held:
                if (b.id, b.sha256, str(b.commit)) == (
                    params.get("backup"),
                    params.get("sha256"),
                    params.get("commit"),
                ):
                    return b
        raise StepFailed(
            f"{action.id} names backup {params.get('backup')!r}, which no fresh agent reports holding"
        )

    def _holdings(self, now: float) -> tuple[tuple[str, tuple[BackupInfo, ...]], ...]:
        """The intact copies each agent holds: our own store, and what fresh peer reports say."""
        timeout = self.cfg.timings.peer_timeout
        backups = self.agent().backups
        held = [(self.cfg.name, tuple(backups.store.entries()))] if backups is not None else []
        for name, link in self.coordinator.links.items():
            report = fresh_report(link.state, now, timeout)
            if report is not None and report.backups:
                held.append((name, report.backups))
        return tuple(held)

    async def _fetch(self, want: BackupInfo) -> str:
        """RESTORE's fetch: an intact local copy of the backup, downloaded from a holder when needed."""
        store = self.agent().backup_store
        if any(b == want for b in store.entries()):
            ok, detail = await asyncio.to_thread(store.verify, want.id)
            if ok:
                return f"local copy of {want.id} is intact"
            log.error(logs.kv(event="backup_copy_corrupt", backup=want.id, detail=detail))
        errors = []
        for name, held in self._holdings(time.monotonic()):
            spec = self.cfg.agent(name)
            if name == self.cfg.name or spec is None or want not in held:
                continue
            try:
                await fetch_backup(self.coordinator.client, spec, want, store)
            except (PeerError, ValueError, OSError) as exc:
                errors.append(f"{name}: {exc}")
                continue
            return f"fetched {want.id} from {name} (sha256 checked)"
        raise StepFailed(
            f"no intact copy of {want.id} could be had: " + ("; ".join(errors) or "no holder reports one")
        )

    async def _restore(self, agent: Agent, want: BackupInfo, timeout: float) -> str:
        """RESTORE's restore: once. minkms refuses a restore onto a node that holds state, and a node whose commit
        has reached the backup's was restored already (a repeat after a crash)."""
        if await _commit_reached(agent, want.commit) and want.commit > 0:
            return f"already restored: the node's commit has reached {want.commit}"
        path = self.agent().backup_store.path(want.id)
        result = await self._command(
            "RESTORE", "restore", lambda fence: agent.minkms.restore(agent.my_host, path, fence)
        )
        if not result.ok:
            raise StepFailed(f"minkms restore {want.id}: {result.error}")
        await _until(
            timeout, lambda: _commit_reached(agent, want.commit), f"the commit to reach {want.commit}"
        )
        return f"restored {want.id} (commit {want.commit})"

    # ---- every agent: a total loss supersedes an unfinished REJOIN or EVICT -----------------------------------
    async def supersede(self) -> None:
        """Release the held ack of, and close as aborted in our journal and history, each unfinished REJOIN or EVICT
        that a total loss superseded in this agent's view (`execution.superseded`), so that the RESTORE can be
        acked and proposed. On every agent, every round: holders that are not the anchor must let go too. Under
        the lock, so that it never closes an action while a step of it runs here."""
        views = self.coordinator.views
        if not views or not execution.none_serves(views):
            return
        async with self.lock:
            facts = self._facts(None, time.monotonic())
            held = [self.held.action] if self.held is not None else []
            pending = {
                a.id: a for a in [*held, *(state.action for state in self.journal.state().unfinished())]
            }
            for action in pending.values():
                if why := execution.superseded(action, facts):
                    await self._drop(action, why)

    async def _drop(self, action: Action, why: str) -> None:
        """Never resume nor adopt `action` again: remembered as superseded (reports carry its id, which releases
        every holder), our held ack released, our journal of it closed as aborted. Runs no step. Under the lock."""
        await self._remember_superseded(action.id)
        if self.held is not None and self.held.action.id == action.id:
            await self._save_held(release(self.held, action.id))
        state = self.journal.state().get(action.id)
        if state is not None and not state.finished:
            await self._close_journal(action.id, "aborted", why, ())
            if action.target == self.cfg.name:
                await self._revoke_fresh_start()
        if self.drive is not None and self.drive.action.id == action.id:
            self.drive = None
        log.warning(
            logs.kv(
                event="action_dropped", action=action.id, kind=action.kind, target=action.target, reason=why
            )
        )

    # ---- the anchor --------------------------------------------------------------------------------------
    async def drive_once(self) -> None:
        """One round of this agent's work (the daemon's loop calls it on every agent): let a total loss supersede
        an unfinished action; then, on the anchor, decide, certify and run the next step."""
        c = self.coordinator
        await self.supersede()
        now = time.monotonic()
        if not c.election.is_anchor(now) or self.busy:
            self.drive = None if not c.election.is_anchor(now) else self.drive
            return
        facts = self.facts(anchor=self.cfg.name, now=now)
        own = facts.node(self.cfg.name)
        own_class = own.verdict.cls if own is not None and own.verdict is not None else None
        if facts.unfinished is not None and (
            why := execution.dropped_by_target(facts.unfinished, self.cfg.name, own_class)
        ):
            async with self.lock:
                await self._drop(facts.unfinished, why)
            return
        mine = self.journal.state().get(facts.unfinished.id) if facts.unfinished is not None else None
        remaining = (
            execution.target_closes(facts.unfinished, self.cfg.name, mine.progress.done, own_class)
            if mine is not None
            else None
        )
        if mine is not None and remaining is not None:
            self.busy = True
            try:
                for step_name in remaining:
                    async with self.lock:
                        try:
                            reply = await self._target_step(mine.certificate, step_name)
                        except NotRun as exc:
                            reply = StepReply(False, str(exc))
                    if not reply.ok:
                        log.warning(
                            logs.kv(
                                event="self_close_waits",
                                action=mine.action.id,
                                step=step_name,
                                detail=reply.detail,
                            )
                        )
                        return
                detail = (
                    "closed by its target, anchor now: every step of its own done, a HEALTHY member again"
                )
                await self._close(mine.certificate, "done", detail)
            finally:
                self.busy = False
            return
        if facts.unfinished is None and await self._close_unconfirmed(now):
            self.drive = None
            return
        decision = planner.decide(facts)
        if decision.escalate:
            self.set_escalated(self.escalated | frozenset(decision.escalate))
            log.error(logs.kv(event="escalated", nodes=",".join(decision.escalate)))
        action = decision.action
        if facts.unfinished is None and self.requested is not None:
            refusals = guards.check(self.requested, facts)
            if refusals:  # the cluster changed since it was asked for
                log.warning(
                    logs.kv(event="operator_request_dropped", action=self.requested.id, why=refusals[0])
                )
                self.requested = None
            elif action is None or action.target == self.requested.target:
                action = self.requested
        if action is None:
            self.drive = None
            return
        term = c.election.ballot.term
        d = self.drive
        if d is None or d.action.id != action.id or d.term != term:
            members = [a.name for a in self.cfg.agents]
            now_dt = datetime.datetime.now(datetime.UTC)
            d = self.drive = Drive(
                action,
                term,
                AckCollector(self.cfg.cluster, term, action, members, self.verifier.at(now_dt)),
                fresh=facts.unfinished is None,
            )
            log.warning(
                logs.kv(
                    event="proposed",
                    action=action.id,
                    kind=action.kind,
                    target=action.target,
                    term=term,
                    why=decision.reason,
                )
            )
        self.busy = True
        try:
            if d.certificate is None:
                await self._certify(d)
            if d.certificate is not None:
                await self._advance(d)
        except NotRun as exc:  # fenced, or the disk did not answer: nothing ran; again next round
            log.warning(logs.kv(event="step_held_back", action=d.action.id, detail=exc))
        except DiskStalled as exc:
            log.error(logs.kv(event="disk_stalled", action=d.action.id, detail=exc))
        finally:
            self.busy = False

    async def _certify(self, d: Drive) -> None:
        req = AckRequest(self.cfg.cluster, d.term, self.cfg.name, d.action)
        if self.cfg.name not in d.collector.signers:
            async with self.lock:
                own = await self._answer(req)
            if own.granted and own.ack is not None:
                d.collector.add(own.ack)
            else:
                d.refusals[self.cfg.name] = own.reason
                return

        holding: dict[str, Action] = {}

        async def ask(name: str) -> None:
            spec = self.cfg.agent(name)
            assert spec is not None
            try:
                reply = await self.coordinator.client.post(spec, ACK_PATH, req, AckReply)
            except PeerError as exc:
                d.refusals[name] = str(exc)
                return
            if reply.granted and reply.ack is not None:
                problem = d.collector.add(reply.ack)
                if problem:
                    d.refusals[name] = problem
            else:
                d.refusals[name] = reply.reason
                if reply.holding is not None and reply.holding.id != d.action.id:
                    holding[name] = reply.holding

        await asyncio.gather(*(ask(a.name) for a in self.cfg.peers if a.name not in d.collector.signers))
        d.certificate = d.collector.certificate()
        adopt = execution.to_adopt(
            d.fresh,
            d.certificate is not None,
            holding,
            _InHistory(self.history, self.superseded),
            self.cfg.quorum,
        )
        if adopt is not None:
            await self._adopt(d, adopt)
            return
        if d.certificate is not None:
            log.warning(
                logs.kv(
                    event="certified", action=d.action.id, term=d.term, signers=",".join(d.collector.signers)
                )
            )
        else:
            log.info(
                logs.kv(
                    event="not_certified",
                    action=d.action.id,
                    refusals="; ".join(f"{k}: {v}" for k, v in d.refusals.items()),
                )
            )

    async def _adopt(self, d: Drive, action: Action) -> None:
        """Adopt a held action instead of our proposal (`execution.to_adopt`): from the next round the
        planner resumes it, re-certified in this term, each agent judging it by its own view."""
        async with self.lock:
            await self._save_held(Held(action, d.term))
        self.drive = None
        log.warning(
            logs.kv(
                event="adopted",
                action=action.id,
                kind=action.kind,
                target=action.target,
                dropped=d.action.id,
            )
        )

    async def _advance(self, d: Drive) -> None:
        """Run the steps of the certified action, in order, checking the lease before each one."""
        cert = d.certificate
        assert cert is not None
        action = cert.action
        for step in playbooks.steps(action.kind):
            if not self.coordinator.election.is_anchor(time.monotonic()):
                log.warning(logs.kv(event="lease_lost_mid_action", action=action.id, step=step.name))
                return
            state = self.journal.state().get(action.id)
            done_here = state is not None and step.name in state.progress.done
            if done_here and not execution.ask_progress(action, step, self.cfg.name, d.progress_known):
                continue
            if step.runs_on == "target" and action.target != self.cfg.name:
                reply, answered = await self._remote(cert, step.name, step.timeout)
                ok, detail = reply.ok, reply.detail
                if not answered and self._target_silent(d, step, detail):
                    return  # again next round
                if reply.not_run:  # fenced, not journaled in time, or we are deposed there: not an attempt
                    log.info(
                        logs.kv(event="target_held_back", action=action.id, step=step.name, detail=detail)
                    )
                    return
                d.unanswered.pop(step.name, None)
                d.target_done = reply.progress or d.target_done
                d.progress_known = d.progress_known or answered
                if execution.already_finished(reply):  # closed by an earlier anchor: nothing more to run
                    await self._close(cert, "done", f"{step.name}: the target had closed it already")
                    return
                if ok:
                    # mirror the target's progress in our own journal, so a resumed drive skips it
                    await self._journaled(cert, step.name, _noop(detail))
            elif (
                step.runs_on == "target"
            ):  # a RESTORE runs on its anchor: the same checks as a peer's request
                async with self.lock:
                    reply = await self._target_step(cert, step.name)
                ok, detail = reply.ok, reply.detail
            elif later := execution.done_after(action.kind, step.name, d.target_done):
                ok, detail = await self._journaled(
                    cert, step.name, _noop(f"done before this anchor: the target has done {later}")
                )
            else:
                ok, detail = await self._journaled(cert, step.name, self._run_anchor_step)
            if not ok:
                attempts = d.attempts.get(step.name, 0) + 1
                d.attempts[step.name] = attempts
                if attempts < step.attempts:
                    return  # again next round
                await self._close(
                    cert, "aborted" if step.on_failure == "abort" else "failed", f"{step.name}: {detail}"
                )
                if step.on_failure == "escalate":
                    self.set_escalated(self.escalated | {action.target})
                return
        await self._close(cert, "done", "every step done")

    def _target_silent(self, d: Drive, step: playbooks.Step, detail: str) -> bool:
        """True while the target's agent has given no answer to `step` for less than the step's timeout. Such a
        step is in doubt, not failed: the agent may be restarting after a crash, and its journal makes a repeat
        safe. Counted as attempts, three quick rounds would abort or escalate the action before it is back."""
        since = d.unanswered.setdefault(step.name, time.monotonic())
        if time.monotonic() - since >= step.timeout:
            return False
        log.info(logs.kv(event="target_silent", action=d.action.id, step=step.name, detail=detail))
        return True

    async def _remote(self, cert: Certificate, step_name: str, timeout: float) -> tuple[StepReply, bool]:
        """The target's reply, and whether it answered at all (False: no reply, its agent may be down)."""
        spec = self.cfg.agent(cert.action.target)
        assert spec is not None
        try:
            reply = await self.coordinator.client.post(
                spec, STEP_PATH, StepRequest(cert, step_name), StepReply, timeout=timeout + 10
            )
        except PeerError as exc:
            return StepReply(False, str(exc)), exc.status is not None
        return reply, True

    async def _close(self, cert: Certificate, outcome: Outcome, detail: str) -> None:
        evidence = tuple(planner.decide(self.facts(anchor=self.cfg.name)).evidence)
        if self.journal.state().get(cert.action.id) is None:
            await self._io("journal begin", self.journal.begin, cert.action, cert, "anchor")
        entry = await self._close_journal(cert.action.id, outcome, detail, evidence)
        if cert.action.target != self.cfg.name:
            await self._remote(cert, FINISH_STEP, 30.0)

        await self._share(entry, [a.name for a in self.cfg.peers])
        await self._save_held(release(self.held, cert.action.id))
        if self.requested is not None and self.requested.id == cert.action.id:
            self.requested = None
        self.drive = None
        log.warning(logs.kv(event="action_finished", action=cert.action.id, outcome=outcome, detail=detail))

    async def _share(self, entry: HistoryEntry, names: Sequence[str]) -> None:
        """Send a close to these peers; those that recorded it count toward its quorum (`close_unconfirmed`)."""

        async def share(name: str) -> None:
            spec = self.cfg.agent(name)
            assert spec is not None
            try:
                reply = await self.coordinator.client.post(spec, HISTORY_PATH, entry, StepReply)
            except PeerError as exc:  # shared again until a quorum recorded it
                log.info(logs.kv(event="history_not_shared", peer=name, error=exc))
                return
            if reply.ok:
                self.confirmed.setdefault(entry.action.id, set()).add(name)

        await asyncio.gather(*(share(n) for n in names))
        for stale in [k for k in self.confirmed if k != entry.action.id]:
            del self.confirmed[stale]

    async def _close_unconfirmed(self, now: float) -> bool:
        """Share the newest close again while fewer than a quorum recorded it (`execution.close_unconfirmed`);
        True: the anchor proposes nothing meanwhile."""
        newest = self.history.entries(limit=1)
        if not newest:
            return False
        entry = newest[0]
        timeout = self.cfg.timings.peer_timeout
        reports = [fresh_report(link.state, now, timeout) for link in self.coordinator.links.values()]
        missing = execution.close_unconfirmed(
            entry.action.id,
            self.cfg.name,
            [a.name for a in self.cfg.agents],
            [r for r in reports if r is not None],
            self.confirmed.get(entry.action.id, ()),
        )
        if not missing:
            return False
        if problems := self.certificate_problems(entry.certificate):
            # the config changed since (agents added, a signer removed, the CA rotated): peers refuse the entry
            # now, and waiting would stop automation for good; the close stands as recorded
            self._log_once(
                logging.ERROR, "close_unconfirmable", action=entry.action.id, why="; ".join(problems)
            )
            return False
        self._log_once(
            logging.WARNING,
            "close_unconfirmed",
            action=entry.action.id,
            sharing_with=",".join(missing),
            detail="fewer than a quorum recorded it: nothing new is proposed until they do",
        )
        await self._share(entry, [m for m in missing if not self._is_witness(m)])  # witnesses keep no history
        return True

    def _log_once(self, level: int, event: str, action: str, **fields: object) -> None:
        """One line per close and event: the wait repeats every round."""
        if self.unconfirmed_logged != (event, action):
            self.unconfirmed_logged = (event, action)
            log.log(level, logs.kv(event=event, action=action, **fields))

    def _is_witness(self, name: str) -> bool:
        spec = self.cfg.agent(name)
        return spec is not None and spec.is_witness

    async def _run_anchor_step(self, action: Action, step_name: str) -> str:
        agent = self.agent()
        target = self.cfg.agent(action.target)
        assert target is not None and target.minkms_host is not None
        host = target.minkms_host
        timeout = _step(action.kind, step_name).timeout
        if step_name == "remove":
            membership = await _membership(agent)
            plan = check_remove(action, host, membership, self._class_of(action.target))
            if not plan.ids:
                return plan.detail
            result = await self._command(
                action.kind,
                step_name,
                lambda fence: agent.minkms.edit_remove(agent.my_host, plan.ids, fence),
                # the target's class again at the last instant: the stat above may have taken seconds
                still=lambda: execution.evict_remove_refusal(action, self._class_of(action.target)),
            )
            if not result.ok:
                raise StepFailed(f"minkms edit --rm {list(plan.ids)}: {result.error}")
            gone = plan.ids[0]
            await _until(timeout, lambda: _id_gone(agent, gone), f"node {gone} to leave the membership")
            return f"removed node {gone} ({host})"
        if step_name == "add":
            if host in (await _membership(agent)).values():
                return f"{host} is already a member"
            result = await self._command(
                action.kind, step_name, lambda fence: agent.minkms.add(agent.my_host, host, fence)
            )
            if not result.ok:
                raise StepFailed(f"minkms add {host}: {result.error}")
            await _until(timeout, lambda: _is_member(agent, host, True), f"{host} to be a member")
            return f"added {host}"
        if step_name == "verify":
            if action.kind == "REJOIN":
                await _until(timeout, lambda: self._healthy(action.target), f"{action.target} to be HEALTHY")
            waiting = execution.writes_wait_for(action, self.coordinator.views)
            if waiting:
                # another failed node is still a member (several failures: it is removed next): writes wait for it
                return f"verified: {host} is out; writes wait for {', '.join(waiting)}"
            await _until(timeout, lambda: self._writable(agent), "the anchor to accept writes")
            return "verified: writes work" + (f", {action.target} HEALTHY" if action.kind == "REJOIN" else "")
        raise StepFailed(f"{step_name} is not a step of the anchor")

    def _class_of(self, name: str) -> NodeClass | None:
        view = next((v for v in self.coordinator.views if v.name == name), None)
        return view.verdict.cls if view is not None and view.verdict is not None else None

    async def _command(
        self,
        kind: str,
        step_name: str,
        run: Callable[[Fence], Awaitable[CommandResult]],
        still: Callable[[], str | None] | None = None,
    ) -> CommandResult:
        """A destructive minkms command of `step_name`, fenced: the `.command` failpoint, then `run(fence)`. The
        adapter calls the fence immediately before the child starts (after its last await) and then every
        fraction of a second while it runs. It starts only while its issuer holds the lease with at least
        MIN_COMMAND_SECONDS to spare, this agent's disk answers, and `still` (the step's own precondition, read
        again) finds nothing against it; it is killed as soon as the lease would end within LEASE_MARGIN. The
        issuer is this agent, or the remote anchor whose step request runs here (a RESTORE's `restore` resumed by
        another anchor): the target cannot read that lease, so it requires that it follows that anchor and holds
        it not deposed. NotRun when fenced: the step runs again next round (a command killed while running is in
        doubt: its step's own idempotency check decides then)."""
        await failpoints.reach(f"{kind}.{step_name}.command")
        election = self.coordinator.election
        issuer = self.issuer

        def fence(running: bool) -> str | None:
            now = time.monotonic()
            if issuer is None:
                needed = 0.0 if running else fencing.MIN_COMMAND_SECONDS
                refusal = fencing.lease_refusal(
                    election.is_anchor(now), election.lease_remaining(now), needed
                )
            else:
                refusal = self._deposed(*issuer)
                if refusal is None and election.anchor_hint(now) not in (None, issuer[0]):
                    refusal = (
                        f"this agent follows {election.anchor_hint(now)}, not {issuer[0]}, as anchor now"
                    )
            if running:
                return refusal
            stalled = self.disk.overdue(now)
            if refusal is None and stalled is not None:
                refusal = f"a durable write ({stalled[0]}) has not returned for {stalled[1]:.0f}s"
            if refusal is None and still is not None:
                refusal = still()
            return refusal

        result = await run(fence)
        if result.returncode == RC_FENCED:
            log.warning(logs.kv(event="command_fenced", step=step_name, detail=result.error))
            raise NotRun(result.error)
        return result

    async def _healthy(self, name: str) -> bool:
        t = self.coordinator.tracked.get(name)
        view = next((v for v in self.coordinator.views if v.name == name), None)
        return bool(view and view.verdict and view.verdict.cls is NodeClass.HEALTHY and t is not None)

    @staticmethod
    async def _writable(agent: Agent) -> bool:
        return (await agent.minkms.probe()).write is True

    # ---- operators -----------------------------------------------------------------------------------------
    def explain(self) -> tuple[dict[str, Any], str]:
        """What would happen next and why, as JSON-able data and as text (`kmagent explain`)."""
        now = time.monotonic()
        c = self.coordinator
        anchor = c.election.anchor_hint(now)
        fresh = {
            name: link.state.report
            for name, link in c.links.items()
            if link.state.report is not None and fresh_report(link.state, now, self.cfg.timings.peer_timeout)
        }
        e = planner.explain(self.facts(anchor=anchor, now=now), fresh)
        return _plain(dataclasses.asdict(e)) | {"anchor": anchor}, (
            f"Anchor: {anchor or 'none'} (term {c.election.term})\n" + planner.render(e)
        )

    async def request(self, kind: str, node: str) -> tuple[bool, str]:
        """`kmagent rejoin|evict NODE`: checked here against every rule but the wait (the class must still call
        for it), then handed to the anchor, which checks again and proposes it; every acker checks it too."""
        now = time.monotonic()
        anchor = self.coordinator.election.anchor_hint(now)
        facts = self.facts(anchor=anchor, now=now)
        target = facts.node(node)
        if target is None or target.verdict is None:
            return False, f"{node!r} is not a configured member"
        params = (*guards.expected_params(target), (guards.REQUESTED_BY, f"operator on {self.cfg.name}"))
        action = Action(planner.action_id(kind, node, facts.term, facts.wall_now), kind, node, params)
        refusals = guards.check(action, facts)
        if refusals:
            return False, "refused: " + "; ".join(str(r) for r in refusals)
        if anchor is None:
            return False, "refused: no anchor holds the lease now; try again in a few seconds"
        if anchor == self.cfg.name:
            return self._accept(action)
        spec = self.cfg.agent(anchor)
        assert spec is not None
        try:
            reply = await self.coordinator.client.post(spec, REQUEST_PATH, OperatorRequest(action), StepReply)
        except PeerError as exc:
            return False, f"the anchor {anchor} could not be asked: {exc}"
        return reply.ok, reply.detail

    async def on_request(self, peer: str, req: OperatorRequest) -> StepReply:
        action = req.action
        if guards.requested_by(action) is None:
            raise web.HTTPUnprocessableEntity(reason="an operator request must name who requested it")
        if not self.coordinator.election.is_anchor(time.monotonic()):
            return StepReply(False, f"refused: {self.cfg.name} does not hold the anchor lease now; try again")
        refusals = guards.check(action, self.facts(anchor=self.cfg.name))
        if refusals:
            return StepReply(False, "refused by the anchor: " + "; ".join(str(r) for r in refusals))
        ok, detail = self._accept(action)
        return StepReply(ok, detail)

    def _accept(self, action: Action) -> tuple[bool, str]:
        if self.requested is not None and self.requested.target != action.target:
            return False, f"refused: an operator request for {self.requested.target} is pending"
        self.requested = action
        log.warning(
            logs.kv(event="operator_request", action=action.id, kind=action.kind, target=action.target)
        )
        return True, (
            f"{action.kind} {action.target} accepted by the anchor ({action.id}); it needs a quorum's acks: "
            "follow it with `kmagent status` and `kmagent history`"
        )

    def restore(self, approve: bool, backup: str | None, accept_loss_of: tuple[str, ...]) -> tuple[bool, str]:
        """`kmagent restore [--backup ID] [--approve] [--accept-loss-of NODE]...`: without --approve, what a restore
        would do; with it, an approval that travels to every agent (the anchor proposes the RESTORE, and each
        acker checks guard rail 5 from its own view). Refused while any node serves in this agent's view."""
        now = time.monotonic()
        facts = self.facts(anchor=self.coordinator.election.anchor_hint(now), now=now)
        for name in accept_loss_of:
            node = facts.node(name)
            if node is None or node.verdict is None:
                return False, f"--accept-loss-of {name}: not a configured member"
        serving = [
            n.name
            for n in facts.nodes
            if n.verdict is not None and n.verdict.cls in (NodeClass.HEALTHY, NodeClass.DEGRADED)
        ]
        if serving:
            return (
                False,
                f"refused: {', '.join(serving)} serve(s) in this agent's view: the cluster needs no restore",
            )
        chosen = backups.choose(dict(facts.backups), backup)
        if chosen.backup is None:
            return False, f"refused: {chosen.reason}"
        plan = (
            restore.advice(facts)
            or "a restore needs an anchor among the nodes whose state is lost; none holds the lease yet"
        )
        if not approve:
            return True, plan + "\nNothing was done: add --approve to arm the restore."
        by = f"operator on {self.cfg.name}"
        approval = self.coordinator.approve_restore(by, backup or "", accept_loss_of)
        until = datetime.datetime.fromtimestamp(approval.until, datetime.UTC).strftime("%H:%M:%S UTC")
        return True, (
            f"restore of {chosen.backup.id} approved on every agent until {until}; the anchor proposes it and a "
            "quorum must agree (follow with `kmagent status` and `kmagent history`).\n" + plan
        )

    def ack(self, node: str) -> str:
        """`kmagent ack NODE`: release an ESCALATED node and start its budget afresh, on every agent (the ack
        travels in the reports)."""
        if self.cfg.agent(node) is None:
            raise ValueError(f"{node!r} is not a configured agent")
        was = node in self.escalated
        self.merge_acks(((node, time.time()),))
        log.warning(logs.kv(event="escalation_acknowledged", node=node, was_escalated_here=was))
        return (
            f"{node} acknowledged: its escalation is released and its hourly budget starts afresh on every agent "
            "(the cooldown still applies)"
        )

    # ---- status --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        d = self.drive
        return {
            "in_flight": None
            if d is None
            else {
                "action": d.action.id,
                "kind": d.action.kind,
                "target": d.action.target,
                "term": d.term,
                "certified": d.certificate is not None,
                "signers": sorted(d.collector.signers),
                "refusals": d.refusals,
            },
            "held": self.held.action.id if self.held else None,
            "restore": restore.advice(
                self.facts(anchor=self.coordinator.election.anchor_hint(time.monotonic()))
            ),
            "escalated": sorted(self.escalated),
        }


class _InHistory:
    """The ids of the actions this agent finished (its history) or dropped as superseded, as a container."""

    def __init__(self, history: History, superseded: tuple[str, ...]) -> None:
        self.history, self.superseded = history, superseded

    def __contains__(self, action_id: object) -> bool:
        return isinstance(action_id, str) and (
            action_id in self.superseded or self.history.find(action_id) is not None
        )


def check_remove(
    action: Action, host: str, membership: dict[int, str], cls: NodeClass | None
) -> fencing.RemovePlan:
    """Before the anchor's `minkms edit --rm`: what to remove (`fencing.remove_plan`: only the node id the
    certificate names, while it is a member at the host; nothing, with the step's detail, otherwise), StepFailed
    when it must not run.

    Membership comes first. A certified id already out was removed, by this action before a crash left the step's
    outcome in doubt, or otherwise (a later anchor that also re-added the host under a new id): the remove is done
    whatever the target's class is now. A node back from a cut is EVICTED by then, and refusing would record an
    eviction that did happen as aborted. Only a removal still to run needs the EVICT's target to be failed still
    (a resumed EVICT must never remove a node that came back).
    """
    plan = fencing.remove_plan(action, host, membership)
    if not plan.ids:
        return plan
    refusal = execution.evict_remove_refusal(action, cls)
    if refusal is not None:
        raise StepFailed(refusal)
    return plan


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(logs.kv(event="close_finished_failed", error=repr(task.exception())))


def _plain(value: Any) -> Any:
    """dataclasses.asdict output made JSON-able (enums by value, tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _step(kind: str, name: str) -> playbooks.Step:
    return next(s for s in playbooks.steps(kind) if s.name == name)


def _noop(detail: str) -> Callable[[Action, str], Awaitable[str]]:
    async def run(_action: Action, _step: str) -> str:
        return detail

    return run


async def _commit_reached(agent: Agent, commit: int) -> bool:
    view = await agent.minkms.cluster_status()
    me = view.node_by_host(agent.my_host)
    return me is not None and me.commit is not None and me.commit >= commit


async def _membership(agent: Agent) -> dict[int, str]:
    """The membership as the anchor's own minkms reports it; StepFailed when it cannot be read."""
    view = await agent.minkms.cluster_status()
    me = view.node_by_host(agent.my_host)
    if me is None or not me.members:
        raise StepFailed(
            f"cannot read the anchor's membership: {view.error or 'this node is not in its own status'}"
        )
    return dict(me.members)


async def _id_gone(agent: Agent, node_id: int) -> bool:
    try:
        return node_id not in await _membership(agent)
    except StepFailed:
        return False


async def _is_member(agent: Agent, host: str, wanted: bool) -> bool:
    try:
        return (host in (await _membership(agent)).values()) == wanted
    except StepFailed:
        return False


async def _until(timeout: float, check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll `check` until it returns something other than None or False (a node id may be 0: the first node of a
    cluster), within `timeout`; StepFailed naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise StepFailed(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.5)
