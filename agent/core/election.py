"""The anchor lease election (DESIGN §4.2), as a pure sans-IO state machine: one instance per agent.

Why leases and promises rather than a log: the anchor only needs *mutual exclusion in time*. A voter that grants
a vote promises, on its own monotonic clock, no vote to anybody else for `lease`; a candidate with a quorum of
grants takes the lease for only `lease*(1-margin)` counted from when *it sent* the request, so that with bounded
clock drift its lease ends before the promises it rests on (see docs/protocol.md for the bound). Any two quora
share a voter, so two leases never overlap.

The shell's duties, which this module cannot do itself:
* persist (fsync) the `Ballot` returned by `on_vote_request` / `tick` *before* sending the reply or requests;
  when that fails, call `persist_failed()` and send `refusal(reply, ...)` instead of the grant (or nothing,
  after `tick`);
* construct the instance with the persisted ballot and `started_at` = its monotonic clock at process start
  (the restart rule: it may have forgotten a promise, so it grants nothing for one lease);
* pass a fresh random value in [0, 1) to every `tick` (back-off jitter), and the clock as `now`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from agent.core.messages import Report, VoteReply, VoteRequest

__all__ = [
    "Ballot",
    "Election",
    "ElectionTimings",
    "ElectionView",
    "Outbound",
    "Role",
    "quorum",
    "refusal",
]


def quorum(members: int) -> int:
    """Q = floor(N/2) + 1: any two quora share at least one agent."""
    return members // 2 + 1


@dataclass(frozen=True)
class ElectionTimings:
    """Election timings, in seconds of each agent's own monotonic clock."""

    lease: float = 10.0
    margin: float = 0.1  # the candidate keeps lease*(1-margin): the room left for clock drift
    backoff_min: float = 10.0  # a non-preferred agent waits this long (at least) before standing
    backoff_max: float = 20.0

    def __post_init__(self) -> None:
        for name in ("lease", "margin", "backoff_min", "backoff_max"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"election timing {name} must be a finite number, got {value!r}")
        if self.lease <= 0:
            raise ValueError(f"lease must be > 0, got {self.lease}")
        # renew_every (lease/3) must leave room for a renewal inside the candidate's lease: margin < 2/3
        if not 0 < self.margin < 2 / 3:
            raise ValueError(f"margin must be in (0, 2/3), got {self.margin}")
        if not 0 <= self.backoff_min <= self.backoff_max:
            raise ValueError(
                f"back-off must satisfy 0 <= backoff_min <= backoff_max, got {self.backoff_min}..{self.backoff_max}"
            )

    @property
    def candidate_lease(self) -> float:
        """How long a quorum of grants makes the candidate anchor, counted from when it sent the requests."""
        return self.lease * (1 - self.margin)

    @property
    def renew_every(self) -> float:
        return self.lease / 3

    @property
    def attempt_timeout(self) -> float:
        """A candidacy without a quorum after this long is abandoned (and retried after a wait)."""
        return self.renew_every

    @property
    def max_drift(self) -> float:
        """The largest clock rate error rho (each clock runs at 1±rho) for which leases never overlap:
        (1+rho)/(1-rho) <= 1/(1-margin), i.e. rho <= margin/(2-margin)."""
        return self.margin / (2 - self.margin)

    def backoff(self, rand: float) -> float:
        return self.backoff_min + _unit(rand) * (self.backoff_max - self.backoff_min)

    def retry_wait(self, rand: float, preferred: bool) -> float:
        """After a failed attempt: the preferred candidate retries soon, the others wait a full back-off."""
        if preferred:
            return self.renew_every * (1 + _unit(rand))
        return self.backoff(rand)


def _unit(rand: float) -> float:
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"random value must be in [0, 1), got {rand!r}")
    return rand


@dataclass(frozen=True)
class Ballot:
    """The persisted part: the highest term this agent voted in and for whom (itself when it stood)."""

    term: int = 0
    voted_for: str | None = None


@dataclass(frozen=True)
class ElectionView:
    """What the agent currently knows from outside the election, computed by the caller from fresh reports."""

    eligible: tuple[str, ...] = ()  # eligible candidates in this agent's own view, preferred first
    claims: tuple[tuple[str, int], ...] = ()  # (agent, term) that fresh reports say hold the anchor lease
    max_term: int = 0  # the highest term in fresh reports

    @classmethod
    def from_reports(cls, eligible: Sequence[str], fresh: Iterable[Report]) -> ElectionView:
        """Claims are reports whose sender names itself anchor with lease left; the caller passes only fresh ones."""
        reports = list(fresh)
        claims = tuple(
            (r.sender, r.term)
            for r in reports
            if r.anchor == r.sender and r.anchor_lease_seconds is not None and r.anchor_lease_seconds > 0
        )
        return cls(tuple(eligible), claims, max((r.term for r in reports), default=0))


@dataclass(frozen=True)
class Outbound:
    """From `tick`: persist `ballot` first (when not None), then send `request` to every peer."""

    request: VoteRequest
    ballot: Ballot | None


class Role(StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    ANCHOR = "anchor"


@dataclass
class _Round:
    sent: float  # the candidate's clock when it sent this round's requests
    grants: set[str] = field(default_factory=set)


def refusal(reply: VoteReply, reason: str) -> VoteReply:
    """The reply to send when the grant could not be persisted: a grant must never outrun its fsync."""
    return dataclasses.replace(reply, granted=False, reason=reason)


class Election:
    """One agent's side of the election: voter, candidate and anchor in one object."""

    def __init__(
        self,
        name: str,
        cluster: str,
        members: Sequence[str],
        timings: ElectionTimings,
        ballot: Ballot,
        started_at: float,
        *,
        witness: bool = False,
    ) -> None:
        if name not in members:
            raise ValueError(f"agent {name!r} is not among the configured members {list(members)}")
        if len(set(members)) != len(members):
            raise ValueError(f"configured members must be distinct, got {list(members)}")
        if ballot.term < 0:
            raise ValueError(f"persisted ballot term must be >= 0, got {ballot.term}")
        self.name = name
        self.cluster = cluster
        self.members = frozenset(members)
        self.quorum = quorum(len(members))
        self.timings = timings
        self.witness = witness
        self._ballot = ballot
        self._durable = ballot  # the ballot before the last one handed out for persisting
        self._started_at = started_at
        self._promise_to: str | None = None
        self._promise_until = -math.inf
        self._role = Role.FOLLOWER
        self._rounds: dict[int, _Round] = {}
        self._round_no = 0
        self._attempt_sent = -math.inf
        self._last_round_sent = -math.inf
        self._lease_end = -math.inf
        self._held_until = -math.inf  # the natural end of the last lease won, kept across a step-down
        self._max_term = ballot.term
        self._no_anchor_since: float | None = None
        self._backoff = 0.0
        self._wait_until = -math.inf
        self._claim: tuple[str, int] | None = None

    # -- read-only state -------------------------------------------------------------------------------------

    @property
    def ballot(self) -> Ballot:
        return self._ballot

    @property
    def term(self) -> int:
        """The highest term this agent knows (voted in, or seen in reports and replies)."""
        return max(self._ballot.term, self._max_term)

    @property
    def role(self) -> Role:
        return self._role

    def is_anchor(self, now: float) -> bool:
        return self._role is Role.ANCHOR and now < self._lease_end

    def lease_remaining(self, now: float) -> float:
        return max(0.0, self._lease_end - now) if self.is_anchor(now) else 0.0

    def anchor_hint(self, now: float) -> str | None:
        """Whom this agent follows: itself while anchor, else the last claimant it saw, else its promise."""
        if self.is_anchor(now):
            return self.name
        if self._claim is not None:
            return self._claim[0]
        if self._promise_to not in (None, self.name) and now < self._promise_until:
            return self._promise_to
        return None

    def restarting(self, now: float) -> bool:
        """Within one lease of (re)start: it may have forgotten a promise, so it votes for nobody."""
        return now < self._started_at + self.timings.lease

    def status(self, now: float) -> dict[str, object]:
        promise = self._promise_to if now < self._promise_until else None
        return {
            "role": Role.FOLLOWER.value
            if self._role is Role.ANCHOR and not self.is_anchor(now)
            else self._role.value,
            "term": self.term,
            "ballot_term": self._ballot.term,
            "voted_for": self._ballot.voted_for,
            "anchor": self.anchor_hint(now),
            "lease_remaining": round(self.lease_remaining(now), 3),
            "promised_to": promise,
            "promise_remaining": round(max(0.0, self._promise_until - now), 3) if promise else 0.0,
            "restarting": self.restarting(now),
        }

    # -- candidate / anchor ----------------------------------------------------------------------------------

    def tick(self, now: float, view: ElectionView, rand: float) -> Outbound | None:
        """Advance timers; returns the requests to send (after persisting its ballot) when it stands or renews."""
        _unit(rand)
        self._max_term = max(self._max_term, view.max_term)
        others = [c for c in view.claims if c[0] != self.name]
        self._claim = max(others, key=lambda c: c[1]) if others else None
        me_eligible = not self.witness and self.name in view.eligible
        preferred = me_eligible and view.eligible[0] == self.name

        if self._role is Role.ANCHOR:
            if now >= self._lease_end or not me_eligible:
                self._role = Role.FOLLOWER  # lease lost, or no longer fit to lead: step down
                self._lease_end = -math.inf
                self._wait_until = now + self.timings.retry_wait(rand, preferred)
                return None
            if self._max_term > self._ballot.term:
                return self._bump(now)
            if now >= self._last_round_sent + self.timings.renew_every:
                return self._new_round(now, persist=None)
            return None
        if self._role is Role.CANDIDATE:
            if now < self._attempt_sent + self.timings.attempt_timeout:
                return None
            self._role = Role.FOLLOWER  # no quorum in time: retry later, in a new term
            self._wait_until = now + self.timings.retry_wait(rand, preferred)

        live = self._claim is not None or (
            self._promise_to not in (None, self.name) and now < self._promise_until
        )
        if live or not me_eligible:
            self._no_anchor_since = None
            return None
        if self.restarting(now):
            return None  # the back-off starts once it may vote again, so the preferred candidate still goes first
        if self._no_anchor_since is None:
            self._no_anchor_since = now
            self._backoff = self.timings.backoff(rand)
        if now < self._wait_until:
            return None
        if not preferred and now < self._no_anchor_since + self._backoff:
            return None
        return self._stand(now)

    def persist_failed(self) -> None:
        """The shell could not persist the ballot just returned (by `tick` or `on_vote_request`): the ballot goes
        back to the durable one, so that a retransmitted request asks for the fsync again; a candidacy is
        abandoned. The shell sends nothing (from `tick`) or `refusal(reply, ...)` (for a vote). The in-memory
        promise is kept: it only makes the agent more cautious."""
        self._ballot = self._durable
        if self._role is Role.CANDIDATE:
            self._role = Role.FOLLOWER
            self._rounds.clear()

    def _stand(self, now: float) -> Outbound:
        term = self.term + 1
        self._durable, self._ballot = self._ballot, Ballot(term, self.name)
        self._role = Role.CANDIDATE
        self._rounds.clear()
        self._round_no = 0
        self._attempt_sent = now
        self._lease_end = -math.inf
        self._no_anchor_since = None
        return self._new_round(now, persist=self._ballot)

    def _bump(self, now: float) -> Outbound:
        """An anchor that sees a higher term (someone's failed candidacy) moves its lease to a new term.

        Voters that voted in that higher term refuse renewals in the old one, so without this the lease would
        rest on fewer and fewer voters. The current lease stays: it rests on promises to this agent, which a new
        term does not change; the new term's rounds renew it as usual."""
        self._durable, self._ballot = self._ballot, Ballot(self.term + 1, self.name)
        self._rounds.clear()  # round numbers go on: if the fsync fails and the old term stays, none repeats
        return self._new_round(now, persist=self._ballot)

    def _new_round(self, now: float, persist: Ballot | None) -> Outbound:
        self._round_no += 1
        self._rounds[self._round_no] = _Round(now, {self.name})
        # its own vote, with the same promise any voter gives
        self._promise_to, self._promise_until = self.name, now + self.timings.lease
        self._last_round_sent = now
        for k in [k for k, r in self._rounds.items() if r.sent + self.timings.candidate_lease <= now]:
            del self._rounds[k]
        self._count(self._rounds[self._round_no], now)  # a one-agent cluster is its own quorum
        request = VoteRequest(self.cluster, self._ballot.term, self.name, self._round_no)
        return Outbound(request, persist)

    def on_vote_reply(self, reply: VoteReply, now: float) -> None:
        """Count a grant for the round it answers; late or foreign replies never extend the lease."""
        if reply.cluster != self.cluster or reply.voter not in self.members or reply.voter == self.name:
            return
        self._max_term = max(self._max_term, reply.voter_term)
        if not reply.granted or self._role is Role.FOLLOWER or reply.term != self._ballot.term:
            return
        rnd = self._rounds.get(reply.round)
        if rnd is not None:
            rnd.grants.add(reply.voter)
            self._count(rnd, now)

    def _count(self, rnd: _Round, now: float) -> None:
        if len(rnd.grants) < self.quorum:
            return
        end = rnd.sent + self.timings.candidate_lease
        if end > now:
            self._lease_end = max(self._lease_end, end)
            self._held_until = max(self._held_until, end)
            self._role = Role.ANCHOR

    # -- voter -----------------------------------------------------------------------------------------------

    def on_vote_request(
        self, req: VoteRequest, now: float, candidate_eligible: bool
    ) -> tuple[VoteReply, Ballot | None]:
        """Grant or refuse. On a grant, persist the returned ballot (when not None) before sending the reply.

        A refusal changes nothing here: the voter does not adopt the newer term, so an agent cut off from the
        anchor cannot disrupt a working lease by starting elections."""
        reason = self._refusal_reason(req, now, candidate_eligible)
        if reason:
            return self._reply(req, False, reason), None
        new = Ballot(req.term, req.candidate)
        persist = None if new == self._ballot else new
        self._durable, self._ballot = self._ballot, new
        self._max_term = max(self._max_term, req.term)
        self._promise_to, self._promise_until = req.candidate, now + self.timings.lease
        if self._role is not Role.FOLLOWER:  # a candidate yielding, or an anchor whose lease ran out
            self._role = Role.FOLLOWER
            self._lease_end = -math.inf
            self._rounds.clear()
        return self._reply(req, True, ""), persist

    def _refusal_reason(self, req: VoteRequest, now: float, candidate_eligible: bool) -> str:
        b = self._ballot
        if req.cluster != self.cluster:
            return f"wrong cluster {req.cluster!r} (this is {self.cluster!r})"
        if req.candidate not in self.members or req.candidate == self.name:
            return f"candidate {req.candidate!r} is not a configured peer"
        if req.term < 1:
            return f"invalid term {req.term}"
        if self.restarting(now):
            left = self._started_at + self.timings.lease - now
            return f"restarted less than a lease ago (may have forgotten a promise): no vote for {left:.1f}s"
        if req.term < b.term:
            return f"stale term {req.term}: already voted in term {b.term}"
        if req.term == b.term and b.voted_for != req.candidate:
            return f"already voted for {b.voted_for} in term {b.term}"
        if self._promise_to == self.name:
            # Its own vote protects only a lease it won, until that lease's natural end (even after a step-down).
            # A candidate that never won one yields to a newer term: a refused rival would otherwise keep both
            # waiting out a whole lease, again and again.
            if now < self._held_until:
                return f"I hold (or held) the anchor lease until {self._held_until - now:.1f}s from now"
        elif self._promise_to not in (None, req.candidate) and now < self._promise_until:
            left = self._promise_until - now
            return f"promised to {self._promise_to} for {left:.1f}s more"
        if not candidate_eligible:
            return f"{req.candidate} is not eligible in my view"
        return ""

    def _reply(self, req: VoteRequest, granted: bool, reason: str) -> VoteReply:
        return VoteReply(self.cluster, req.term, self.name, granted, reason, self._ballot.term, req.round)
