"""Proposals, acks and certificates (DESIGN §4.3), pure: signing and signature checks are injected.

Why one held action per agent: two certificates need two quora of acks, any two quora share an agent, and an
agent acks no different action while it holds an unfinished one. So at most one unfinished action is ever
certified. The held action is persisted (the shell fsyncs `Held` before sending the ack) and released only when
the action is recorded finished (done or aborted, in the target's journal).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from agent.core.election import Ballot, quorum
from agent.core.messages import ACTION_KINDS, Ack, AckReply, AckRequest, Action, Certificate, ack_payload

__all__ = [
    "AckCollector",
    "Held",
    "Sign",
    "VerifyAck",
    "answer_ack",
    "certificate_problems",
    "next_proposal",
    "release",
]

Sign = Callable[[bytes], Ack]
"""Signs an ack payload with this agent's key (agent/io/signing.py)."""
VerifyAck = Callable[[Ack, bytes], "str | None"]
"""Checks one ack over a payload: the signer's certificate chains to the cluster CA, names `ack.signer`, and the
signature is valid. Returns a problem, or None."""


@dataclass(frozen=True)
class Held:
    """The persisted unfinished action this agent acked, and the latest term it acked it in."""

    action: Action
    term: int


def answer_ack(
    req: AckRequest,
    *,
    cluster: str,
    ballot: Ballot,
    verdict: tuple[bool, str],
    held: Held | None,
    sign: Sign,
) -> tuple[AckReply, Held | None]:
    """Ack or refuse `req`. On an ack, persist the returned `Held` (when not None) before sending the reply.

    `ballot` is the election's: the term must be the agent's current term and the requester the agent it voted
    for in it. `verdict` is the caller's own view of the action (class, durations, guard rails)."""
    action = req.action
    if req.cluster != cluster:
        return AckReply(False, f"wrong cluster {req.cluster!r} (this is {cluster!r})"), None
    if action.kind not in ACTION_KINDS:
        return AckReply(False, f"unknown action kind {action.kind!r}"), None
    if not action.id or not action.target:
        return AckReply(False, "action without id or target"), None
    if req.term != ballot.term:
        return AckReply(False, f"term {req.term} is not my current term {ballot.term}"), None
    if req.anchor != ballot.voted_for:
        return AckReply(
            False, f"in term {ballot.term} I granted my vote to {ballot.voted_for}, not {req.anchor}"
        ), None
    if held is not None and held.action.id == action.id and held.action != action:
        return AckReply(False, f"action id {action.id} was acked with different content"), None
    if held is not None and held.action.id != action.id:
        reason = f"holding unfinished action {held.action.id} ({held.action.kind} {held.action.target})"
        return AckReply(False, reason, holding=held.action), None
    ok, why = verdict
    if not ok:
        return AckReply(False, f"my view does not support {action.kind} {action.target}: {why}"), None
    new = Held(action, req.term)
    ack = sign(ack_payload(cluster, req.term, action))
    return AckReply(True, "", ack=ack), (None if new == held else new)


def release(held: Held | None, finished_id: str) -> Held | None:
    """The held action after `finished_id` was recorded finished (persist the result when it changed)."""
    return None if held is not None and held.action.id == finished_id else held


def next_proposal(unfinished: Action | None, wanted: Action | None) -> Action | None:
    """A new anchor re-certifies the unfinished action in its term before it proposes anything else."""
    return unfinished if unfinished is not None else wanted


class AckCollector:
    """The anchor's tally for one (cluster, term, action): a certificate once Q distinct configured signers acked."""

    def __init__(
        self, cluster: str, term: int, action: Action, members: Collection[str], verify_ack: VerifyAck
    ) -> None:
        self.cluster, self.term, self.action = cluster, term, action
        self.members = frozenset(members)
        self.quorum = quorum(len(self.members))
        self._verify = verify_ack
        self._payload = ack_payload(cluster, term, action)
        self._acks: dict[str, Ack] = {}

    def add(self, ack: Ack) -> str | None:
        """Count one ack; returns why it was not counted, or None."""
        problem = _ack_problem(ack, self.members, self._payload, self._verify)
        if problem is None:
            self._acks.setdefault(ack.signer, ack)
        return problem

    @property
    def signers(self) -> frozenset[str]:
        return frozenset(self._acks)

    def certificate(self) -> Certificate | None:
        if len(self._acks) < self.quorum:
            return None
        acks = tuple(self._acks[s] for s in sorted(self._acks))
        return Certificate(self.cluster, self.term, self.action, acks)


def _ack_problem(ack: Ack, members: Collection[str], payload: bytes, verify: VerifyAck) -> str | None:
    if ack.signer not in members:
        return f"ack by {ack.signer!r}, who is not a configured agent"
    problem = verify(ack, payload)
    return None if problem is None else f"ack by {ack.signer}: {problem}"


def certificate_problems(
    cert: Certificate, cluster: str, configured_names: Sequence[str], quorum_size: int, verify_ack: VerifyAck
) -> list[str]:
    """Everything wrong with `cert`, checked alone (empty list = valid): cluster, action, and at least
    `quorum_size` distinct configured signers whose signatures over the same payload verify."""
    problems: list[str] = []
    if cert.cluster != cluster:
        problems.append(f"certificate for cluster {cert.cluster!r}, this is {cluster!r}")
    if cert.action.kind not in ACTION_KINDS:
        problems.append(f"unknown action kind {cert.action.kind!r}")
    if not cert.action.id or not cert.action.target:
        problems.append("action without id or target")
    payload = ack_payload(cert.cluster, cert.term, cert.action)
    valid: set[str] = set()
    for ack in cert.acks:
        if ack.signer in valid:
            problems.append(f"duplicate ack by {ack.signer} (counted once)")
            continue
        problem = _ack_problem(ack, configured_names, payload, verify_ack)
        if problem is None:
            valid.add(ack.signer)
        else:
            problems.append(problem)
    if len(valid) < quorum_size:
        problems.append(f"only {len(valid)} valid acks of distinct configured agents, {quorum_size} needed")
    return problems
