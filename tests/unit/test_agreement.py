"""Table tests of agent.core.agreement: the ack rules, the anchor's tally, and certificate checks alone."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import pytest

from agent.core.agreement import (
    AckCollector,
    Held,
    answer_ack,
    certificate_problems,
    next_proposal,
    release,
)
from agent.core.election import Ballot
from agent.core.messages import Ack, AckReply, AckRequest, Action, Certificate, ack_payload

NAMES = ("a", "b", "c", "d", "e")
A1 = Action("act-1", "REJOIN", "c")
A2 = Action("act-2", "EVICT", "d")
OK = (True, "")
VOTED_A = Ballot(3, "a")


def sign_as(name: str) -> Callable[[bytes], Ack]:
    def sign(payload: bytes) -> Ack:
        return Ack(name, f"cert:{name}", hashlib.sha256(name.encode() + payload).hexdigest())

    return sign


def verify(ack: Ack, payload: bytes) -> str | None:
    if ack.certificate != f"cert:{ack.signer}":
        return "certificate does not name the signer"
    if ack.signature != hashlib.sha256(ack.signer.encode() + payload).hexdigest():
        return "bad signature"
    return None


def ack_req(term: int = 3, anchor: str = "a", action: Action = A1, cluster: str = "kc") -> AckRequest:
    return AckRequest(cluster, term, anchor, action)


def answer(
    req: AckRequest, *, ballot: Ballot = VOTED_A, verdict: tuple[bool, str] = OK, held: Held | None = None
) -> tuple[AckReply, Held | None]:
    return answer_ack(req, cluster="kc", ballot=ballot, verdict=verdict, held=held, sign=sign_as("b"))


@pytest.mark.parametrize(
    ("req", "ballot", "verdict", "held", "reason"),
    [
        (ack_req(cluster="x"), Ballot(3, "a"), OK, None, "wrong cluster"),
        (
            ack_req(action=Action("i", "DELETE", "c")),
            Ballot(3, "a"),
            OK,
            None,
            "unknown action kind 'DELETE'",
        ),
        (ack_req(action=Action("", "REJOIN", "c")), Ballot(3, "a"), OK, None, "without id or target"),
        (ack_req(term=2), Ballot(3, "a"), OK, None, "term 2 is not my current term 3"),
        (ack_req(term=4), Ballot(3, "a"), OK, None, "term 4 is not my current term 3"),
        (ack_req(anchor="e"), Ballot(3, "a"), OK, None, "granted my vote to a, not e"),
        (ack_req(), Ballot(3, None), OK, None, "granted my vote to None, not a"),
        (ack_req(), Ballot(3, "a"), (False, "c is HEALTHY"), None, "does not support REJOIN c: c is HEALTHY"),
        (ack_req(), Ballot(3, "a"), OK, Held(A2, 2), "holding unfinished action act-2 (EVICT d)"),
        (
            ack_req(action=dataclasses.replace(A1, target="d")),
            Ballot(3, "a"),
            OK,
            Held(A1, 2),
            "acked with different content",
        ),
    ],
)
def test_refusals_give_a_reason_and_persist_nothing(
    req: AckRequest, ballot: Ballot, verdict: tuple[bool, str], held: Held | None, reason: str
) -> None:
    reply, persist = answer(req, ballot=ballot, verdict=verdict, held=held)
    assert not reply.granted and reason in reply.reason
    assert reply.ack is None and persist is None


def test_refusal_for_a_different_unfinished_action_names_it_so_the_anchor_can_adopt_it() -> None:
    reply, _ = answer(ack_req(), held=Held(A2, 2))
    assert reply.holding == A2
    assert answer(ack_req(term=2))[0].holding is None


def test_ack_signs_the_canonical_payload_and_returns_what_to_persist() -> None:
    reply, persist = answer(ack_req())
    assert reply.granted and reply.ack is not None
    assert verify(reply.ack, ack_payload("kc", 3, A1)) is None
    assert persist == Held(A1, 3)


def test_same_action_re_certified_in_a_newer_term_is_acked() -> None:
    reply, persist = answer(ack_req(term=5), ballot=Ballot(5, "a"), held=Held(A1, 3))
    assert reply.granted and persist == Held(A1, 5)
    reply, persist = answer(ack_req(), held=Held(A1, 3))  # the same term again: nothing new to persist
    assert reply.granted and persist is None


def test_release_only_for_the_held_action() -> None:
    assert release(Held(A1, 3), "act-1") is None
    assert release(Held(A1, 3), "act-2") == Held(A1, 3)
    assert release(None, "act-1") is None


def test_next_proposal_puts_the_unfinished_action_first() -> None:
    assert next_proposal(A1, A2) == A1
    assert next_proposal(None, A2) == A2
    assert next_proposal(None, None) is None


def _acks(action: Action, term: int, *names: str) -> list[Ack]:
    return [sign_as(n)(ack_payload("kc", term, action)) for n in names]


def test_collector_needs_quorum_of_distinct_configured_valid_signers() -> None:
    c = AckCollector("kc", 3, A1, NAMES, verify)
    a, b, _ = _acks(A1, 3, "a", "b", "c")
    assert c.add(a) is None and c.add(a) is None  # a duplicate counts once
    assert c.certificate() is None
    assert "not a configured agent" in (c.add(_acks(A1, 3, "z")[0]) or "")
    assert "bad signature" in (c.add(_acks(A1, 2, "c")[0]) or "")  # an ack for an old term
    assert "bad signature" in (c.add(_acks(A2, 3, "d")[0]) or "")  # an ack for another action
    assert c.certificate() is None
    assert c.add(b) is None and c.certificate() is None  # 2 of 3
    assert c.add(_acks(A1, 3, "e")[0]) is None
    cert = c.certificate()
    assert cert is not None and [x.signer for x in cert.acks] == ["a", "b", "e"]
    assert certificate_problems(cert, "kc", NAMES, 3, verify) == []


def _cert(*names: str, term: int = 3, action: Action = A1) -> Certificate:
    return Certificate("kc", term, action, tuple(_acks(action, term, *names)))


@pytest.mark.parametrize(
    ("cert", "problem"),
    [
        (dataclasses.replace(_cert("a", "b", "c"), cluster="x"), "certificate for cluster 'x'"),
        (_cert("a", "b"), "only 2 valid acks of distinct configured agents, 3 needed"),
        (_cert("a", "b", "b"), "duplicate ack by b"),
        (_cert("a", "b", "z"), "not a configured agent"),
        (dataclasses.replace(_cert("a", "b", "c"), term=4), "bad signature"),  # acks over another term
        (dataclasses.replace(_cert("a", "b", "c"), action=A2), "bad signature"),  # or another action
        (_cert("a", "b", "c", action=Action("x", "NUKE", "c")), "unknown action kind"),
    ],
)
def test_certificate_problems_are_each_reported(cert: Certificate, problem: str) -> None:
    problems = certificate_problems(cert, "kc", NAMES, 3, verify)
    assert problems and any(problem in p for p in problems), problems


def test_certificate_with_a_forged_ack_is_invalid_even_with_enough_others() -> None:
    cert = _cert("a", "b", "c")
    forged = dataclasses.replace(cert.acks[0], signature="00")
    bad = dataclasses.replace(cert, acks=(forged, *cert.acks[1:]))
    assert certificate_problems(bad, "kc", NAMES, 3, verify) == [
        "ack by a: bad signature",
        "only 2 valid acks of distinct configured agents, 3 needed",
    ]
