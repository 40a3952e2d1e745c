"""Table tests of agent.core.playbooks: the step tables, next_step and is_behind for every prefix."""

from __future__ import annotations

import pytest

from agent.core.playbooks import TABLES, is_behind, next_step, position, steps

REJOIN_ORDER = [
    ("fence", "target", True, "abort"),
    ("quarantine", "target", True, "escalate"),
    ("remove", "anchor", True, "escalate"),
    ("start", "target", False, "escalate"),
    ("add", "anchor", True, "escalate"),
    ("mark", "target", False, "escalate"),
    ("verify", "anchor", False, "escalate"),
]
EVICT_ORDER = [
    ("remove", "anchor", True, "abort"),
    ("verify", "anchor", False, "escalate"),
]


@pytest.mark.parametrize(("kind", "expected"), [("REJOIN", REJOIN_ORDER), ("EVICT", EVICT_ORDER)])
def test_tables(kind: str, expected: list[tuple[str, str, bool, str]]) -> None:
    table = steps(kind)
    assert [(s.name, s.runs_on, s.destructive, s.on_failure) for s in table] == expected
    for s in table:
        assert s.timeout > 0 and s.attempts >= 1
        assert s.precondition and s.idempotency  # shown by explain and history


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_once_escalating_never_abort_again(kind: str) -> None:
    """After the first step whose failure escalates, state or membership has moved: no later step may abort."""
    policies = [s.on_failure for s in steps(kind)]
    first = policies.index("escalate")
    assert all(p == "escalate" for p in policies[first:])
    assert all(p == "abort" for p in policies[:first])
    assert steps(kind)[0].on_failure == "abort"  # the first step changed nothing when it failed


def test_the_shared_remove_step_differs_only_in_its_failure_policy() -> None:
    rejoin = next(s for s in steps("REJOIN") if s.name == "remove")
    evict = next(s for s in steps("EVICT") if s.name == "remove")
    assert rejoin.precondition == evict.precondition and rejoin.idempotency == evict.idempotency
    assert (rejoin.on_failure, evict.on_failure) == ("escalate", "abort")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("DELETE", "unknown action kind 'DELETE'"),
        ("", "unknown"),
    ],
)
def test_steps_of_an_unknown_kind(kind: str, message: str) -> None:
    for call in (lambda: steps(kind), lambda: next_step(kind, []), lambda: is_behind(kind, "fence", [])):
        with pytest.raises(ValueError, match=message):
            call()


def _prefixes(kind: str) -> list[tuple[list[str], int]]:
    names = [s.name for s in steps(kind)]
    return [(names[:k], k) for k in range(len(names) + 1)]


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_next_step_for_every_prefix(kind: str) -> None:
    table = steps(kind)
    for done, k in _prefixes(kind):
        step = next_step(kind, done)
        assert step == (table[k] if k < len(table) else None), done


def test_next_step_rejoin_explicitly() -> None:
    def name(done: list[str]) -> str | None:
        s = next_step("REJOIN", done)
        return None if s is None else s.name

    assert name([]) == "fence"
    assert name(["fence", "quarantine"]) == "remove"
    assert name(["fence", "quarantine", "remove", "start", "add"]) == "mark"
    assert name(["fence", "quarantine", "remove", "start", "add", "mark"]) == "verify"
    assert name(["fence", "quarantine", "remove", "start", "add", "mark", "verify"]) is None
    assert next_step("EVICT", ("remove",)) == steps("EVICT")[1]


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_position_and_is_behind_for_every_prefix_and_step(kind: str) -> None:
    names = [s.name for s in steps(kind)]
    for done, k in _prefixes(kind):
        for i, step in enumerate(names):
            expected = "behind" if i < k - 1 else "repeat" if i == k - 1 else "next" if i == k else "ahead"
            assert position(kind, step, done) == expected, (done, step)
            assert is_behind(kind, step, done) is (expected == "behind")


def test_a_delayed_quarantine_never_follows_a_fresh_start() -> None:
    """The hazard is_behind exists for: an old anchor's late quarantine would move the fresh node's state aside."""
    done = ["fence", "quarantine", "remove", "start"]
    assert is_behind("REJOIN", "quarantine", done)
    assert is_behind("REJOIN", "fence", done)
    assert not is_behind("REJOIN", "start", done)  # a retry of the last step: answered, not run again
    assert position("REJOIN", "start", done) == "repeat"
    assert position("REJOIN", "add", done) == "next"
    assert position("REJOIN", "verify", done) == "ahead"


@pytest.mark.parametrize(
    ("done", "message"),
    [
        (["quarantine"], "not a prefix"),
        (["fence", "remove"], "not a prefix"),
        (["fence", "fence"], "not a prefix"),
        (["fence", "quarantine", "remove", "start", "add", "mark", "verify", "verify"], "not a prefix"),
        (["FENCE"], "not a prefix"),
    ],
)
def test_damaged_progress_is_named(done: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next_step("REJOIN", done)
    with pytest.raises(ValueError, match=message):
        is_behind("REJOIN", "fence", done)


def test_unknown_step_is_named() -> None:
    with pytest.raises(ValueError, match="EVICT has no step 'fence'"):
        is_behind("EVICT", "fence", [])
