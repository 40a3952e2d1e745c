"""Coordination with the peers (DESIGN §4): reports both ways, the anchor lease election, the cluster view.

The decisions are `agent.core` (election, view, classify); this shell keeps their inputs, persists votes before
they are sent, and talks to peers without ever letting a slow peer hold the loop: every send is its own task,
at most one in flight per peer and purpose, bounded by peer_timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from agent import __version__
from agent.config import AgentSpec, Config
from agent.core import wire
from agent.core.backups import BackupInfo
from agent.core.classify import Tracked, held_for, track
from agent.core.election import Ballot, Election, ElectionTimings, ElectionView, refusal
from agent.core.messages import Action, NodeReport, Report, RestoreApproval, VoteReply, VoteRequest
from agent.core.restore import APPROVAL_VALIDITY
from agent.core.view import (
    Member,
    NodeView,
    PeerState,
    classify_cluster,
    electable,
    fresh_report,
    observed_at,
    reference_commit,
    reference_membership,
    report_age,
    stale_after,
)
from agent.io import logs
from agent.io.durable import Writes, read_json, write_json
from agent.io.metrics import Metric
from agent.io.peers import PeerClient, PeerError, Route

log = logging.getLogger("kmagent")

REPORT_PATH = "/v1/peer/report"
# Terms above this are refused: a forged huge term (int64 max) would otherwise spread through the reports and leave
# no next term to stand in. 2**53 terms at one election per second last longer than any cluster.
MAX_TERM = 2**53
VOTE_PATH = "/v1/peer/vote"

Prober = Callable[[str], Awaitable[bool | None]]
"""Probes a peer's minkms (its host) for liveness: True, False, or None when nothing answered."""


def load_ballot(path: Path) -> Ballot:
    """The persisted vote. A damaged file is reported and replaced by an empty ballot: safe, because a restarted
    agent grants nothing for one lease (the restart rule), by which time every lease its lost vote supported
    has ended."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        log.error(logs.kv(event="ballot_unreadable", path=path, error=exc))
        return Ballot()
    if data is None:
        return Ballot()
    term = data.get("term") if isinstance(data, dict) else None
    voted_for = data.get("voted_for") if isinstance(data, dict) else None
    if (
        type(term) is not int
        or not 0 <= term <= MAX_TERM
        or not (voted_for is None or isinstance(voted_for, str))
    ):
        log.error(logs.kv(event="ballot_unreadable", path=path, error="unexpected content"))
        return Ballot()
    return Ballot(term, voted_for)


FOREVER = 253402300799.0  # 9999-12-31: "paused until resumed", as a finite wall time the wire accepts


@dataclass(frozen=True)
class Pause:
    """The cluster-wide pause: the higher epoch wins everywhere, so a pause or resume on any host reaches all."""

    epoch: int = 0
    until: float = 0.0  # wall clock; 0: not paused
    reason: str = ""

    def active(self, wall_now: float) -> bool:
        return wall_now < self.until

    def newer_than(self, other: Pause) -> bool:
        return (self.epoch, self.until) > (other.epoch, other.until)


def load_approval(path: Path) -> RestoreApproval | None:
    """A damaged approval file arms nothing: when in doubt, do not restore (the operator can approve again)."""
    try:
        data = read_json(path)
        return None if data is None else wire.decode(RestoreApproval, data)
    except (OSError, ValueError) as exc:
        log.error(logs.kv(event="approval_unreadable", path=path, error=exc))
        return None


def load_pause(path: Path) -> Pause:
    """A damaged pause file pauses: when in doubt, do not act (the operator can resume)."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        log.error(logs.kv(event="pause_unreadable", path=path, error=exc))
        return Pause(0, FOREVER, f"pause file {path} unreadable: resume to clear")
    if data is None:
        return Pause()
    try:
        epoch, until, reason = data["epoch"], data["until"], data["reason"]
        if type(epoch) is not int or not isinstance(until, int | float) or not isinstance(reason, str):
            raise TypeError("unexpected types")
        return Pause(epoch, float(until), reason)
    except (KeyError, TypeError) as exc:
        log.error(logs.kv(event="pause_unreadable", path=path, error=exc))
        return Pause(0, FOREVER, f"pause file {path} unreadable: resume to clear")


def election_timings(cfg: Config) -> ElectionTimings:
    """Non-preferred candidates wait half a lease to a lease before standing, so the preferred one goes first."""
    lease = cfg.timings.lease
    return ElectionTimings(lease=lease, backoff_min=lease / 2, backoff_max=lease)


class ActionsHooks(Protocol):
    """What the coordinator needs from the executor (agent.actions.Actions), without importing it."""

    def on_peer_finished(self, finished: tuple[str, ...]) -> None: ...
    def finished_ids(self) -> tuple[str, ...]: ...
    def unfinished(self) -> Action | None: ...
    def awaiting_mark(self) -> bool: ...
    def merge_acks(self, acks: tuple[tuple[str, float], ...]) -> None: ...
    def ack_items(self) -> tuple[tuple[str, float], ...]: ...


@dataclass
class PeerLink:
    """What this agent holds about one peer, plus the bookkeeping of talking to it."""

    spec: AgentSpec
    state: PeerState
    boot: str = ""
    seq: int = -1
    error: str | None = None  # the last failure talking to it, for status
    pushing: bool = False
    probing: bool = False


class Coordinator:
    def __init__(self, cfg: Config, client: PeerClient, prober: Prober, now: float) -> None:
        self.cfg = cfg
        self.client = client
        self.prober = prober
        self.boot = secrets.token_hex(8)
        self.seq = 0
        self.rng = random.Random()
        self.links = {a.name: PeerLink(a, PeerState()) for a in cfg.peers}
        self.members = tuple(Member(a.name, a.minkms_host) for a in cfg.agents)
        self.ballot_path = Path(cfg.state.dir) / "ballot.json"
        # every durable write of this agent (ballot, journal, held ack, marker), in order, off the loop; a write
        # outstanding for longer than a lease is a stalled disk, and a stalled disk costs the anchor its lease
        self.disk = Writes(cfg.timings.lease)
        self.election = Election(
            cfg.name,
            cfg.cluster,
            [a.name for a in cfg.agents],
            election_timings(cfg),
            load_ballot(self.ballot_path),
            started_at=now,
            witness=cfg.is_witness,
        )
        self.own: NodeReport | None = None
        self.views: tuple[NodeView, ...] = ()
        self.tracked: dict[str, Tracked] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.ballot_lock = asyncio.Lock()
        self.actions: ActionsHooks | None = None  # set by the daemon once the executor exists
        self.pause_path = Path(cfg.state.dir) / "pause.json"
        self.pause = load_pause(self.pause_path)
        self.approval_path = Path(cfg.state.dir) / "restore-approval.json"
        self.approval = load_approval(self.approval_path)
        # the backup copies this agent holds intact, for its reports (set by the daemon's backup service)
        self.held_backups: Callable[[], tuple[BackupInfo, ...]] = tuple

    def routes(self) -> list[Route]:
        return [(REPORT_PATH, Report, self.on_report), (VOTE_PATH, VoteRequest, self.on_vote)]

    # ---- what peers send us -------------------------------------------------------------------------------
    async def on_report(self, peer: str, report: Report) -> Report:
        """Keep the latest report of `peer`; answer with ours, so one exchange refreshes both sides."""
        self._receive(peer, report, time.monotonic())
        return self.report(time.monotonic())

    def _receive(self, peer: str, report: Report, now: float) -> None:
        if report.sender != peer:  # identity is the certificate, never the message
            raise web.HTTPForbidden(
                reason=f"report names sender {report.sender!r}, certificate says {peer!r}"
            )
        if report.cluster != self.cfg.cluster:
            raise web.HTTPUnprocessableEntity(reason=f"wrong cluster {report.cluster!r}")
        if report.term > MAX_TERM or report.pause_epoch > MAX_TERM:
            raise web.HTTPUnprocessableEntity(reason=f"term or pause epoch beyond {MAX_TERM}")
        link = self.links.get(peer)
        if link is None:  # itself: a configured name, but not a peer
            raise web.HTTPForbidden(reason="an agent does not report to itself")
        if report.boot == link.boot and report.seq <= link.seq:
            return  # a duplicate or a reordered older report: the newer one stands
        link.boot, link.seq = report.boot, report.seq
        link.state = PeerState(report, now, link.state.minkms_live)
        if self.actions is not None and report.finished:
            self.actions.on_peer_finished(report.finished)
        if self.actions is not None and report.acks:
            self.actions.merge_acks(report.acks)
        theirs = Pause(report.pause_epoch, report.paused_until, report.pause_reason)
        if theirs.newer_than(self.pause):
            self._set_pause(theirs)
        approval = report.restore
        if approval is not None and approval.epoch > (self.approval.epoch if self.approval else 0):
            if approval.epoch > MAX_TERM or not 0 <= approval.until < FOREVER:
                raise web.HTTPUnprocessableEntity(reason="restore approval with an invalid epoch or time")
            self._set_approval(approval)

    async def on_vote(self, peer: str, req: VoteRequest) -> VoteReply:
        if req.candidate != peer:
            raise web.HTTPForbidden(reason=f"vote request for {req.candidate!r} sent by {peer!r}")
        if req.term > MAX_TERM:
            raise web.HTTPUnprocessableEntity(reason=f"term {req.term} beyond {MAX_TERM}")
        eligible = req.candidate in electable(self.views, unfinished=self._unfinished())
        async with self.ballot_lock:  # decide and persist as one step: no second grant before the fsync
            reply, ballot = self.election.on_vote_request(req, time.monotonic(), eligible)
            if ballot is not None:
                if not await self._persist():
                    self.election.persist_failed()
                    return refusal(reply, "could not persist the vote")
                log.info(logs.kv(event="vote_granted", term=req.term, candidate=req.candidate))
        return reply

    async def _persist(self) -> bool:
        """fsync the election's current ballot before anyone hears of it (DESIGN §4.2); hold ballot_lock.

        Always the current one: a file written later never holds an older ballot than one written before."""
        ballot = self.election.ballot
        try:
            data = {"term": ballot.term, "voted_for": ballot.voted_for}
            await self.disk.run("ballot.json", write_json, self.ballot_path, data)
        except OSError as exc:  # DiskStalled too: a vote not durable is never sent
            log.error(logs.kv(event="vote_not_persisted", path=self.ballot_path, error=exc))
            return False
        return True

    # ---- our side -----------------------------------------------------------------------------------------
    def report(self, now: float) -> Report:
        self.seq += 1
        anchor = self.election.is_anchor(now)
        return Report(
            cluster=self.cfg.cluster,
            sender=self.cfg.name,
            seq=self.seq,
            boot=self.boot,
            term=self.election.term,
            anchor=self.election.anchor_hint(now),
            anchor_lease_seconds=round(self.election.lease_remaining(now), 3) if anchor else None,
            node=self.own,
            version=__version__,
            restarting=self.election.restarting(now),
            views=tuple(
                (v.name, v.verdict.cls.value, round(held_for(self.tracked[v.name], now), 3))
                for v in self.views
                if v.verdict is not None and v.name in self.tracked
            ),
            in_flight=self._in_flight(),
            in_flight_action=self.actions.unfinished() if self.actions is not None else None,
            finished=self.actions.finished_ids() if self.actions is not None else (),
            acks=self.actions.ack_items() if self.actions is not None else (),
            pause_epoch=self.pause.epoch,
            paused_until=self.pause.until,
            pause_reason=self.pause.reason,
            restore=self.approval,
            backups=self.held_backups(),
        )

    def _unfinished(self) -> Action | None:
        return self.actions.unfinished() if self.actions is not None else None

    def _in_flight(self) -> str | None:
        action = self._unfinished()
        return action.id if action is not None else None

    def reference(self, now: float) -> dict[int, str] | None:
        """The cluster's membership as the anchor's minkms reports it; None while no anchor is known."""
        peers = {name: link.state for name, link in self.links.items()}
        return reference_membership(self.election.anchor_hint(now), self.cfg.name, self.own, peers)

    def reference_commit(self, now: float) -> int | None:
        """The commit at which the anchor's minkms reported that membership (how new it is)."""
        peers = {name: link.state for name, link in self.links.items()}
        return reference_commit(self.election.anchor_hint(now), self.cfg.name, self.own, peers)

    @property
    def stale_after(self) -> float:
        """How old an observation may be before it is STALLED (`view.stale_after`)."""
        t = self.cfg.timings
        return stale_after(t.peer_timeout, t.probe_interval, self.cfg.minkms.command_timeout)

    def tick(self, own: NodeReport | None, now: float) -> None:
        """One coordination round: classify, elect, and send what is due. Never waits for a peer."""
        self.own = own
        peers = {name: link.state for name, link in self.links.items()}
        timeout = self.cfg.timings.peer_timeout
        self.views = classify_cluster(
            self.members,
            self.cfg.name,
            own,
            peers,
            self.reference(now),
            now,
            timeout,
            self.reference_commit(now),
            self.stale_after,
        )
        for v in self.views:
            if v.verdict is not None:
                self.tracked[v.name] = track(self.tracked.get(v.name), v.verdict, now, observed_at(v, now))
        fresh = [r for p in peers.values() if (r := fresh_report(p, now, timeout)) is not None]
        was_anchor = self.election.is_anchor(now)
        restarting = {r.sender for r in fresh if r.restarting}
        eligible = electable(self.views, restarting, self._unfinished())
        stalled = self.disk.overdue(now)
        if stalled is not None:  # it cannot journal: it must not lead (an anchor steps down, stops renewing)
            eligible = tuple(e for e in eligible if e != self.cfg.name)
            if self.election.is_anchor(now):
                log.error(logs.kv(event="disk_stalled", write=stalled[0], seconds=round(stalled[1], 1)))
        view = ElectionView.from_reports(eligible, fresh)
        out = self.election.tick(now, view, self.rng.random())
        if was_anchor and not self.election.is_anchor(now):
            log.warning(logs.kv(event="anchor_lease_lost", term=self.election.term))
        if out is not None:
            self._spawn(self._stand(out.request, out.ballot))
        report = self.report(now)
        for link in self.links.values():
            if not link.pushing:
                link.pushing = True
                self._spawn(self._push(link, report))
            if link.spec.minkms_host and fresh_report(link.state, now, timeout) is None and not link.probing:
                link.probing = True
                self._spawn(self._probe(link))

    async def _stand(self, request: VoteRequest, ballot: Ballot | None) -> None:
        if ballot is not None:
            async with self.ballot_lock:
                if self.election.ballot != ballot:
                    return  # a vote for another candidate came first: this candidacy is over
                if not await self._persist():
                    self.election.persist_failed()
                    return
            log.info(logs.kv(event="election_started", term=request.term))
        await asyncio.gather(*(self._ask(link, request) for link in self.links.values()))

    async def _ask(self, link: PeerLink, request: VoteRequest) -> None:
        try:
            reply = await self.client.post(link.spec, VOTE_PATH, request, VoteReply)
        except PeerError as exc:
            link.error = str(exc)
            return
        if reply.voter_term > MAX_TERM:
            link.error = f"vote reply with term {reply.voter_term} beyond {MAX_TERM}"
            return
        if reply.voter != link.spec.name:
            link.error = f"vote reply names voter {reply.voter!r}"
            return
        if not reply.granted and request.round == 1:  # a renewal refused is visible as a lost lease
            log.info(logs.kv(event="vote_refused", term=request.term, voter=reply.voter, reason=reply.reason))
        was_anchor = self.election.is_anchor(time.monotonic())
        self.election.on_vote_reply(reply, time.monotonic())
        if not was_anchor and self.election.is_anchor(time.monotonic()):
            log.info(logs.kv(event="anchor_elected", term=self.election.term, agent=self.cfg.name))

    async def _push(self, link: PeerLink, report: Report) -> None:
        try:
            theirs = await self.client.post(link.spec, REPORT_PATH, report, Report)
            self._receive(link.spec.name, theirs, time.monotonic())
            link.error = None
        except PeerError as exc:
            if link.error != str(exc):
                log.warning(logs.kv(event="peer_unreachable", peer=link.spec.name, error=exc))
            link.error = str(exc)
        except web.HTTPException as exc:  # their reply broke a rule we check on receipt
            link.error = f"bad report: {exc.reason}"
        finally:
            link.pushing = False

    async def _probe(self, link: PeerLink) -> None:
        try:
            assert link.spec.minkms_host is not None
            live = await self.prober(link.spec.minkms_host)
            link.state = PeerState(link.state.report, link.state.received_at, live)
        finally:
            link.probing = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(logs.kv(event="peer_task_failed", error=repr(task.exception())))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()
        self.disk.close()

    # ---- the cluster-wide pause (DESIGN §6.7) --------------------------------------------------------------
    def set_pause(self, seconds: float | None, reason: str) -> Pause:
        """Pause automation everywhere (seconds None: until resumed); reports carry it to every agent."""
        until = FOREVER if seconds is None else time.time() + seconds
        return self._set_pause(Pause(self.pause.epoch + 1, until, reason))

    def resume(self, reason: str) -> Pause:
        return self._set_pause(Pause(self.pause.epoch + 1, 0.0, reason))

    def persist(self, what: str, path: Path, data: Any) -> None:
        """Write `data` to `path` on the disk thread, in order with every other durable write, never on the loop
        (a peer's report triggers these: a hung disk must not freeze the loop that receives them). For state
        that memory and the reports already carry (pause, approval, escalations): a failure is logged, and the
        next change writes it again."""

        async def write() -> None:
            try:
                await self.disk.run(what, write_json, path, data)
            except OSError as exc:  # DiskStalled too: kept in memory and in reports, peers hold it too
                log.error(logs.kv(event="not_persisted", what=what, path=path, error=exc))

        self._spawn(write())

    def _set_pause(self, pause: Pause) -> Pause:
        self.pause = pause
        self.persist(
            "pause.json",
            self.pause_path,
            {"epoch": pause.epoch, "until": pause.until, "reason": pause.reason},
        )
        log.warning(
            logs.kv(
                event="paused" if pause.until else "resumed", until=pause.until or None, reason=pause.reason
            )
        )
        return pause

    # ---- an operator's restore approval (DESIGN §5 RESTORE) -------------------------------------------------
    def approve_restore(self, by: str, backup: str, accept_loss_of: tuple[str, ...]) -> RestoreApproval:
        """Arm one total-failure restore for an hour, on every agent (reports carry it; the newest epoch wins)."""
        epoch = (self.approval.epoch if self.approval else 0) + 1
        until = time.time() + APPROVAL_VALIDITY
        return self._set_approval(RestoreApproval(epoch, until, by, backup, accept_loss_of))

    def _set_approval(self, approval: RestoreApproval) -> RestoreApproval:
        self.approval = approval
        self.persist("restore-approval.json", self.approval_path, wire.encode(approval))
        log.warning(
            logs.kv(
                event="restore_approved",
                by=approval.by,
                backup=approval.backup or None,
                accept_loss_of=",".join(approval.accept_loss_of) or None,
                until=approval.until,
            )
        )
        return approval

    # ---- presentation -------------------------------------------------------------------------------------
    def metrics(self, now: float) -> list[Metric]:
        timeout = self.cfg.timings.peer_timeout
        ages = [(name, report_age(link.state, now)) for name, link in self.links.items()]
        return [
            Metric(
                "kmagent_anchor",
                "gauge",
                "1 while this agent holds the anchor lease",
                (({}, 1.0 if self.election.is_anchor(now) else 0.0),),
            ),
            Metric(
                "kmagent_term",
                "gauge",
                "the highest election term this agent knows",
                (({}, float(self.election.term)),),
            ),
            Metric(
                "kmagent_peer_up",
                "gauge",
                "1 when the peer's last report is fresh (within peer_timeout)",
                tuple(({"peer": n}, 1.0 if a is not None and a <= timeout else 0.0) for n, a in ages),
            ),
            Metric(
                "kmagent_peer_report_age_seconds",
                "gauge",
                "seconds since the peer's last report (-1: never)",
                tuple(({"peer": n}, -1.0 if a is None else a) for n, a in ages),
            ),
        ]

    def status(self, now: float) -> dict[str, Any]:
        best = max((v.node.commit for v in self.views if v.node and v.node.commit is not None), default=None)
        anchor = self.election.anchor_hint(now)
        nodes = []
        for v in self.views:
            link = self.links.get(v.name)
            t = self.tracked.get(v.name)
            spec = self.cfg.agent(v.name)
            n = v.node
            nodes.append(
                {
                    "name": v.name,
                    "role": spec.role if spec else "?",
                    "host": spec.minkms_host if spec else None,
                    "class": str(v.verdict.cls) if v.verdict else None,
                    "reason": v.verdict.reason if v.verdict else None,
                    "since_seconds": round(held_for(t, now), 3) if t and v.verdict else None,
                    "node_id": n.node_id if n else None,
                    "minkms_role": n.role if n else None,
                    "commit": n.commit if n else None,
                    "lag": best - n.commit if n and n.commit is not None and best is not None else None,
                    "anchor": v.name == anchor,
                    "report_age_seconds": round(v.report_age, 3) if v.report_age is not None else None,
                    "observed_seconds": n.observed_seconds if n else None,
                    "self": v.name == self.cfg.name,
                    "error": link.error if link else None,
                }
            )
        pause = (
            {"until": self.pause.until, "reason": self.pause.reason}
            if self.pause.active(time.time())
            else None
        )
        overdue = self.disk.overdue(now)
        return {
            "election": self.election.status(now),
            "anchor": anchor,
            "term": self.election.term,
            "paused": pause,
            "nodes": nodes,
            # a durable write past its deadline: this agent neither leads nor runs a step until it returns
            "disk_stalled": None
            if overdue is None
            else {"write": overdue[0], "seconds": round(overdue[1], 1)},
        }
