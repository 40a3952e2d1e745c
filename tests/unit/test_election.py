"""Table tests of agent.core.election: every rule of DESIGN §4.2, one at a time, on explicit clocks."""

from __future__ import annotations

import pytest

from agent.core.election import (
    Ballot,
    Election,
    ElectionTimings,
    ElectionView,
    Role,
    quorum,
    refusal,
)
from agent.core.messages import NodeReport, Report, VoteReply, VoteRequest

T = ElectionTimings(lease=10.0, margin=0.1, backoff_min=10.0, backoff_max=20.0)
NAMES = ("a", "b", "c", "d", "e")
UP = 100.0  # well past every agent's restart window (started at 0)
NO_VOTE = Ballot()


def make(name: str = "a", ballot: Ballot = NO_VOTE, started: float = 0.0, n: int = 3, **kw: bool) -> Election:
    return Election(name, "kc", NAMES[:n], T, ballot, started, **kw)


def view(*eligible: str, claims: tuple[tuple[str, int], ...] = (), max_term: int = 0) -> ElectionView:
    return ElectionView(tuple(eligible), claims, max_term)


def req(term: int, cand: str = "b", rnd: int = 1, cluster: str = "kc") -> VoteRequest:
    return VoteRequest(cluster, term, cand, rnd)


def grant(term: int, voter: str, rnd: int = 1, cand_cluster: str = "kc") -> VoteReply:
    return VoteReply(cand_cluster, term, voter, True, "", term, rnd)


def elected(name: str = "a", now: float = UP, n: int = 3) -> Election:
    """An anchor of term 1, elected by b with requests sent at `now`."""
    e = make(name, n=n)
    out = e.tick(now, view(*NAMES[:n]), 0.5)
    assert out is not None
    for voter in NAMES[1 : quorum(n)]:
        e.on_vote_reply(grant(1, voter), now + 0.1)
    assert e.is_anchor(now + 0.1)
    return e


# -- timings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"lease": 0}, "lease must be > 0"),
        ({"lease": -1}, "lease must be > 0"),
        ({"lease": float("nan")}, "finite number"),
        ({"lease": float("inf")}, "finite number"),
        ({"margin": 0}, "margin must be in"),
        ({"margin": 0.7}, "margin must be in"),
        ({"backoff_min": 5, "backoff_max": 4}, "backoff_min <= backoff_max"),
        ({"backoff_min": -1}, "backoff_min <= backoff_max"),
        ({"lease": True}, "finite number"),
        ({"lease": "10"}, "finite number"),
    ],
)
def test_timings_refuse_bad_values_with_a_clear_message(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ElectionTimings(**kwargs)  # type: ignore[arg-type]


def test_timings_derived_values() -> None:
    assert T.candidate_lease == pytest.approx(9.0)
    assert T.renew_every == pytest.approx(10 / 3)
    assert T.max_drift == pytest.approx(0.1 / 1.9)
    # at the bound, the fastest voter's lease (real time lease/(1+rho)) equals the slowest candidate's
    rho = T.max_drift
    assert T.candidate_lease / (1 - rho) == pytest.approx(T.lease / (1 + rho))
    assert T.backoff(0.0) == 10.0 and T.backoff(0.5) == 15.0
    with pytest.raises(ValueError, match=r"random value must be in \[0, 1\)"):
        T.backoff(1.0)


def test_quorum() -> None:
    assert [quorum(n) for n in range(1, 8)] == [1, 2, 2, 3, 3, 4, 4]


def test_constructor_refuses_inconsistent_configuration() -> None:
    with pytest.raises(ValueError, match="not among the configured members"):
        Election("z", "kc", NAMES, T, Ballot(), 0.0)
    with pytest.raises(ValueError, match="distinct"):
        Election("a", "kc", ("a", "a", "b"), T, Ballot(), 0.0)
    with pytest.raises(ValueError, match="term must be >= 0"):
        Election("a", "kc", NAMES, T, Ballot(-1, None), 0.0)


# -- voter ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ballot", "request_", "eligible", "now", "reason"),
    [
        (Ballot(), req(1, cluster="other"), True, UP, "wrong cluster"),
        (Ballot(), req(1, cand="z"), True, UP, "not a configured peer"),
        (Ballot(), req(1, cand="a"), True, UP, "not a configured peer"),
        (Ballot(), req(0), True, UP, "invalid term 0"),
        (Ballot(), req(1), True, 5.0, "restarted less than a lease ago"),
        (Ballot(), req(1), True, 9.99, "restarted less than a lease ago"),
        (Ballot(5, "c"), req(4), True, UP, "stale term 4: already voted in term 5"),
        (Ballot(5, "c"), req(5), True, UP, "already voted for c in term 5"),
        (Ballot(5, None), req(5), True, UP, "already voted for None in term 5"),
        (Ballot(), req(1), False, UP, "b is not eligible in my view"),
    ],
)
def test_voter_refusals(
    ballot: Ballot, request_: VoteRequest, eligible: bool, now: float, reason: str
) -> None:
    e = make(ballot=ballot)
    reply, persist = e.on_vote_request(request_, now, eligible)
    assert not reply.granted and reason in reply.reason
    assert persist is None
    assert (reply.term, reply.voter, reply.voter_term, reply.round) == (request_.term, "a", ballot.term, 1)
    # a refusal changes nothing: the voter does not adopt the newer term and makes no promise
    assert e.ballot == ballot and e.status(now)["promised_to"] is None


def test_restart_window_ends_after_one_lease() -> None:
    e = make(started=50.0)
    assert not e.on_vote_request(req(1), 59.9, True)[0].granted
    reply, persist = e.on_vote_request(req(1), 60.0, True)
    assert reply.granted and persist == Ballot(1, "b")


def test_grant_persists_promises_and_answers_the_round() -> None:
    e = make(ballot=Ballot(3, "c"))
    reply, persist = e.on_vote_request(req(4, rnd=7), UP, True)
    assert reply == VoteReply("kc", 4, "a", True, "", 4, 7)
    assert persist == Ballot(4, "b") and e.ballot == Ballot(4, "b")
    st = e.status(UP)
    assert st["promised_to"] == "b" and st["promise_remaining"] == 10.0


def test_promise_blocks_other_candidates_until_lease_has_passed_on_the_voters_clock() -> None:
    e = make()
    assert e.on_vote_request(req(1, "b"), UP, True)[0].granted
    for at in (UP, UP + 5, UP + 9.999):
        reply, persist = e.on_vote_request(req(2, "c"), at, True)
        assert not reply.granted and "promised to b" in reply.reason and persist is None
    assert e.ballot == Ballot(1, "b")
    reply, persist = e.on_vote_request(req(2, "c"), UP + 10, True)
    assert reply.granted and persist == Ballot(2, "c")


def test_renewal_same_term_same_candidate_extends_the_promise_without_a_new_fsync() -> None:
    e = make()
    e.on_vote_request(req(1, "b", rnd=1), UP, True)
    reply, persist = e.on_vote_request(req(1, "b", rnd=2), UP + 3, True)
    assert reply.granted and reply.round == 2 and persist is None
    assert e.status(UP + 3)["promise_remaining"] == 10.0
    assert not e.on_vote_request(req(2, "c"), UP + 12, True)[0].granted  # 12 < 3 + 10


def test_same_candidate_newer_term_is_granted_during_its_own_promise() -> None:
    e = make()
    e.on_vote_request(req(1, "b"), UP, True)
    reply, persist = e.on_vote_request(req(2, "b"), UP + 1, True)
    assert reply.granted and persist == Ballot(2, "b")


def test_renewal_refused_when_candidate_is_no_longer_eligible() -> None:
    e = make()
    e.on_vote_request(req(1, "b"), UP, True)
    reply, _ = e.on_vote_request(req(1, "b", rnd=2), UP + 3, False)
    assert not reply.granted and "not eligible" in reply.reason


def test_refusal_helper_turns_a_grant_into_a_refusal() -> None:
    e = make()
    reply, persist = e.on_vote_request(req(1), UP, True)
    assert persist is not None
    e.persist_failed()
    r = refusal(reply, "could not persist the vote")
    assert not r.granted and r.reason == "could not persist the vote" and r.term == 1
    # the ballot is back to the durable one, so a retransmitted request asks for the fsync again
    assert e.ballot == Ballot()
    reply2, persist2 = e.on_vote_request(req(1), UP + 0.1, True)
    assert reply2.granted and persist2 == Ballot(1, "b")


# -- candidate -----------------------------------------------------------------------------------------------


def test_preferred_candidate_stands_at_once_in_term_after_the_highest_known() -> None:
    e = make(ballot=Ballot(4, "c"))
    out = e.tick(UP, view("a", "b", max_term=6), 0.3)
    assert out is not None
    assert out.request == VoteRequest("kc", 7, "a", 1)
    assert out.ballot == Ballot(7, "a") and e.ballot == Ballot(7, "a")
    assert e.role is Role.CANDIDATE and not e.is_anchor(UP)


def test_terms_seen_in_replies_raise_the_next_term() -> None:
    e = make()
    e.on_vote_reply(VoteReply("kc", 1, "b", False, "x", 9, 1), UP)
    assert e.term == 9
    out = e.tick(UP, view("a"), 0.0)
    assert out is not None and out.request.term == 10


@pytest.mark.parametrize(
    ("v", "kw", "started", "why"),
    [
        (view("b", "a"), {}, 0.0, "not preferred and back-off not over"),
        (view("b"), {}, 0.0, "not eligible in its own view"),
        (view(), {}, 0.0, "nobody eligible"),
        (view("a", claims=(("b", 3),)), {}, 0.0, "a fresh report claims the lease"),
        (view("a"), {"witness": True}, 0.0, "a witness never leads"),
        (view("a"), {}, UP - 5, "within one lease of its own restart"),
    ],
)
def test_does_not_stand(v: ElectionView, kw: dict[str, bool], started: float, why: str) -> None:
    e = make(started=started, **kw)
    assert e.tick(UP, v, 0.5) is None, why
    assert e.ballot == Ballot() and e.role is Role.FOLLOWER


def test_own_unexpired_promise_to_another_means_a_live_anchor() -> None:
    e = make()
    e.on_vote_request(req(1, "b"), UP, True)
    assert e.tick(UP + 9, view("a"), 0.5) is None
    assert e.anchor_hint(UP + 9) == "b"
    out = e.tick(UP + 10, view("a"), 0.5)
    assert out is not None and out.request.term == 2


def test_non_preferred_stands_after_its_randomised_back_off() -> None:
    e = make()
    assert e.tick(UP, view("b", "a"), 0.5) is None  # no anchor seen from now on; back-off = 15
    assert e.tick(UP + 14.9, view("b", "a"), 0.9) is None
    out = e.tick(UP + 15, view("b", "a"), 0.9)
    assert out is not None and out.request.term == 1


def test_seeing_an_anchor_resets_the_back_off() -> None:
    e = make()
    e.tick(UP, view("b", "a"), 0.0)  # back-off 10
    e.tick(UP + 5, view("b", "a", claims=(("b", 1),)), 0.0)
    assert e.tick(UP + 10, view("b", "a"), 0.0) is None  # a new back-off started at UP+10
    assert e.tick(UP + 20, view("b", "a"), 0.0) is not None


def test_quorum_of_grants_makes_anchor_until_send_time_plus_lease_times_one_minus_margin() -> None:
    e = make(n=5)
    e.tick(UP, view("a"), 0.0)
    e.on_vote_reply(grant(1, "b"), UP + 1)
    assert not e.is_anchor(UP + 1)  # 2 of 3
    e.on_vote_reply(grant(1, "b"), UP + 1.5)  # a duplicate counts once
    assert not e.is_anchor(UP + 1.5)
    e.on_vote_reply(grant(1, "c"), UP + 2)
    assert e.is_anchor(UP + 2) and e.role is Role.ANCHOR
    assert e.lease_remaining(UP + 2) == pytest.approx(7.0)  # UP + 9 - (UP + 2)
    assert e.is_anchor(UP + 8.999) and not e.is_anchor(UP + 9)
    assert e.anchor_hint(UP + 2) == "a"


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (VoteReply("other", 1, "b", True, "", 1, 1), "foreign cluster"),
        (VoteReply("kc", 1, "z", True, "", 1, 1), "unknown voter"),
        (VoteReply("kc", 1, "a", True, "", 1, 1), "itself"),
        (VoteReply("kc", 0, "b", True, "", 1, 1), "old term"),
        (VoteReply("kc", 1, "b", True, "", 1, 9), "unknown round"),
        (VoteReply("kc", 1, "b", False, "no", 1, 1), "refusal"),
    ],
)
def test_replies_that_must_not_count(reply: VoteReply, why: str) -> None:
    e = make()
    e.tick(UP, view("a"), 0.0)
    e.on_vote_reply(reply, UP + 0.1)
    assert not e.is_anchor(UP + 0.1), why


def test_late_grant_counts_only_from_its_own_rounds_send_time() -> None:
    e = make()
    e.tick(UP, view("a"), 0.0)
    e.on_vote_reply(grant(1, "b"), UP + 8.5)  # very late, but no tick has abandoned the attempt yet
    # the lease still ends at UP + 9: counted from the round's send time, not from the grant's arrival
    assert e.is_anchor(UP + 8.5) and e.lease_remaining(UP + 8.5) == pytest.approx(0.5)


def test_grant_arriving_after_its_rounds_lease_would_end_is_ignored() -> None:
    e = make()
    e.tick(UP, view("a"), 0.0)
    e.on_vote_reply(grant(1, "b"), UP + 9.0)
    assert not e.is_anchor(UP + 9.0)


def test_failed_attempt_is_abandoned_and_retried_in_a_new_term_after_a_wait() -> None:
    e = make()
    e.tick(UP, view("a"), 0.0)
    assert e.tick(UP + 3.0, view("a"), 0.0) is None and e.role is Role.CANDIDATE
    assert e.tick(UP + T.attempt_timeout, view("a"), 0.5) is None  # gives up; retry wait 1.5 renew periods
    assert e.role is Role.FOLLOWER
    e.on_vote_reply(grant(1, "b"), UP + 3.5)  # a late grant for the abandoned attempt: ignored
    assert not e.is_anchor(UP + 3.5)
    retry_at = UP + T.attempt_timeout + 1.5 * T.renew_every
    assert e.tick(retry_at - 0.01, view("a"), 0.0) is None
    out = e.tick(retry_at, view("a"), 0.0)
    assert out is not None and out.request.term == 2 and out.ballot == Ballot(2, "a")


def test_persist_failed_after_tick_abandons_the_candidacy() -> None:
    e = make(ballot=Ballot(3, "c"))
    e.tick(UP, view("a"), 0.0)
    e.persist_failed()
    assert e.role is Role.FOLLOWER and e.ballot == Ballot(3, "c")
    e.on_vote_reply(grant(4, "b"), UP + 0.1)
    assert not e.is_anchor(UP + 0.1)


def test_candidate_votes_for_itself_and_refuses_its_own_term() -> None:
    e = make()
    e.tick(UP, view("a"), 0.0)
    reply, _ = e.on_vote_request(req(1, "b"), UP + 1, True)
    assert not reply.granted and "already voted for a in term 1" in reply.reason


def test_candidate_without_a_lease_yields_to_a_newer_term_and_ignores_its_late_grants() -> None:
    e = make()
    e.tick(UP, view("a"), 0.0)  # stands in term 1, no quorum yet
    reply, ballot = e.on_vote_request(req(2, "b"), UP + 1, True)
    assert reply.granted and ballot == Ballot(2, "b") and e.role is Role.FOLLOWER
    e.on_vote_reply(VoteReply("kc", 1, "b", True, "", 1, 1), UP + 1.1)  # its own round 1, granted late
    assert not e.is_anchor(UP + 1.2)


def test_former_anchor_refuses_until_its_lease_would_have_ended_even_after_stepping_down() -> None:
    e = elected()
    e.tick(UP + 1, view(), 0.0)  # no longer eligible in its own view: steps down at once
    assert not e.is_anchor(UP + 1)
    reply, _ = e.on_vote_request(req(5, "b"), UP + 2, True)
    assert not reply.granted and "held) the anchor lease" in reply.reason
    reply, _ = e.on_vote_request(req(5, "b"), UP + T.lease, True)
    assert reply.granted


def test_single_agent_cluster_is_its_own_quorum() -> None:
    e = Election("a", "kc", ("a",), T, Ballot(), 0.0)
    out = e.tick(UP, view("a"), 0.0)
    assert out is not None and e.is_anchor(UP)


# -- anchor --------------------------------------------------------------------------------------------------


def test_anchor_renews_every_third_of_a_lease_with_the_same_term() -> None:
    e = elected()
    assert e.tick(UP + 3.0, view("a", "b", "c"), 0.0) is None
    out = e.tick(UP + T.renew_every, view("a", "b", "c"), 0.0)
    assert out is not None and out.request == VoteRequest("kc", 1, "a", 2) and out.ballot is None
    e.on_vote_reply(grant(1, "c", rnd=2), UP + 4)
    assert e.lease_remaining(UP + 4) == pytest.approx(T.renew_every + 9 - 4)


def test_renewal_without_quorum_means_stepping_down_when_the_lease_ends() -> None:
    e = elected()
    t = UP
    while t < UP + 8:
        t += 1
        e.tick(t, view("a", "b", "c"), 0.0)  # renewals go out, no grants come back
    assert e.is_anchor(UP + 8.99) and not e.is_anchor(UP + 9)
    e.tick(UP + 9, view("a", "b", "c"), 0.0)
    assert e.role is Role.FOLLOWER and e.lease_remaining(UP + 9) == 0


def test_late_grant_from_an_old_round_never_extends_beyond_its_send_time() -> None:
    e = elected()
    out2 = e.tick(UP + 4, view("a", "b", "c"), 0.0)  # round 2 sent at UP+4
    assert out2 is not None
    e.on_vote_reply(grant(1, "b", rnd=1), UP + 5)  # a duplicate of round 1's grant
    assert e.lease_remaining(UP + 5) == pytest.approx(4.0)  # still UP + 9
    e.on_vote_reply(grant(1, "b", rnd=2), UP + 5)
    assert e.lease_remaining(UP + 5) == pytest.approx(8.0)  # UP + 4 + 9


def test_anchor_steps_down_at_once_when_no_longer_eligible_in_its_own_view() -> None:
    e = elected()
    assert e.tick(UP + 1, view("b", "c"), 0.0) is None
    assert not e.is_anchor(UP + 1) and e.role is Role.FOLLOWER


def test_anchor_ignores_a_claim_by_another_but_keeps_its_lease() -> None:
    e = elected()
    e.tick(UP + 1, view("a", "b", "c", claims=(("b", 0),)), 0.0)
    assert e.is_anchor(UP + 1)


def test_anchor_refuses_other_candidates_during_its_lease() -> None:
    e = elected()
    reply, _ = e.on_vote_request(req(5, "b"), UP + 2, True)
    assert not reply.granted and "anchor lease" in reply.reason


def test_status_is_plain_data() -> None:
    e = elected()
    st = e.status(UP + 1)
    assert st["role"] == "anchor" and st["term"] == 1 and st["anchor"] == "a" and st["voted_for"] == "a"
    assert make().status(UP)["role"] == "follower"


# -- view from reports ---------------------------------------------------------------------------------------


def _report(sender: str, term: int, anchor: str | None, lease: float | None) -> Report:
    return Report("kc", sender, 1, "x", term, anchor, lease, NodeReport("HEALTHY", "", 0.0, "h"))


def test_view_from_reports_takes_only_self_claims_with_lease_left() -> None:
    v = ElectionView.from_reports(
        ["a", "b"],
        [
            _report("b", 4, "b", 5.0),
            _report("c", 6, "b", None),  # follows b: not a claim
            _report("d", 2, "d", 0.0),  # lease over
            _report("e", 3, "e", None),
        ],
    )
    assert v == ElectionView(("a", "b"), (("b", 4),), 6)


def test_an_anchor_that_sees_a_higher_term_moves_its_lease_to_a_new_term() -> None:
    e = elected()
    assert e.ballot == Ballot(1, "a")
    reply = VoteReply(
        "kc", 1, "c", False, "stale term 1: already voted in term 4", 4, 1
    )  # c's failed candidacy
    e.on_vote_reply(reply, UP + 0.5)
    out = e.tick(UP + 1, view("a", "b", "c"), 0.0)
    assert out is not None and out.request.term == 5 and out.ballot == Ballot(5, "a")
    assert e.is_anchor(UP + 1)  # the lease in term 1 still holds while the new term's round is out
    e.on_vote_reply(grant(5, "b", out.request.round), UP + 1.1)
    assert e.is_anchor(UP + 1 + T.candidate_lease - 0.1)  # renewed in term 5


def test_a_failed_fsync_of_a_bumped_term_reuses_no_round_number() -> None:
    e = elected()
    e.on_vote_reply(VoteReply("kc", 1, "c", False, "stale", 4, 1), UP + 0.5)
    out = e.tick(UP + 1, view("a", "b", "c"), 0.0)
    assert out is not None
    e.persist_failed()
    assert e.ballot == Ballot(1, "a") and e.is_anchor(UP + 1)
    late = grant(1, "b", 1)  # a grant of round 1, sent before: must not count for a new round
    e.on_vote_reply(late, UP + 2)
    assert e.lease_remaining(UP + 2) <= T.candidate_lease - 2 + 1e-9
