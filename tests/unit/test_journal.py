"""The intent journal, the held action and the history: replay after a crash at every byte, damage, compaction."""

from __future__ import annotations

import itertools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.agreement import Held
from agent.core.messages import Ack, Action, Certificate
from agent.io.journal import (
    History,
    HistoryEntry,
    Journal,
    JournalError,
    JournalState,
    StepEntry,
    close_action,
    history_entry,
)

AGENT = "kms1"


def action(aid: str = "a1", target: str = "kms2", kind: str = "REJOIN") -> Action:
    return Action(aid, kind, target, (("reason", "state lost"),))


def cert(act: Action, term: int = 3, signers: tuple[str, ...] = ("kms1", "kms3")) -> Certificate:
    acks = tuple(
        Ack(s, f"-----BEGIN CERTIFICATE-----\n{s}\n-----END CERTIFICATE-----\n", "c2ln") for s in signers
    )
    return Certificate("prod", term, act, acks)


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.5
        return self.now


def journal(tmp_path: Path, **kw: object) -> Journal:
    return Journal(tmp_path / "journal.jsonl", AGENT, clock=Clock(), **kw)  # type: ignore[arg-type]


def fresh(j: Journal) -> JournalState:
    """What an agent restarted on the same files sees."""
    return Journal(j.path, AGENT).replay()


def same(a: JournalState, b: JournalState) -> bool:
    return a.actions == b.actions and a.tombstones == b.tombstones


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------------------------
# Writing and replaying


def test_steps_replay_in_order_with_outcomes_and_certificate(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a), "target")
    j.intent(a, "fence", 3, cert(a))
    j.outcome(a.id, "fence", True, "stopped")
    j.intent(a, "quarantine", 3, cert(a))
    j.outcome(a.id, "quarantine", False, "disk full")
    state = fresh(j)
    assert [s.action.id for s in state.unfinished()] == ["a1"]
    got = state.get("a1")
    assert got is not None and got.action == a and got.certificate == cert(a) and got.role == "target"
    assert [(s.step, s.ok, s.detail, s.term) for s in got.steps] == [
        ("fence", True, "stopped", 3),
        ("quarantine", False, "disk full", 3),
    ]
    progress = state.progress("a1")
    assert progress.done == ("fence",) and progress.failed == ("quarantine",) and progress.in_doubt is None
    assert state.progress("unknown").done == ()


def test_intent_without_outcome_is_in_doubt_and_a_rerun_counts_attempts(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a), "target")
    j.intent(a, "fence", 3, cert(a))
    assert fresh(j).progress("a1").in_doubt == "fence"
    # after a restart the caller re-runs the step through its idempotency check
    j2 = Journal(j.path, AGENT, clock=Clock())
    j2.intent(a, "fence", 4, cert(a))
    j2.outcome(a.id, "fence", True, "already stopped")
    step = fresh(j).get("a1").step("fence")  # type: ignore[union-attr]
    assert step is not None and step.ok is True and step.attempts == 2 and step.term == 4


def test_new_certificate_is_kept_and_an_unchanged_one_is_not_written_again(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a, 3), "anchor")
    j.intent(a, "fence", 3, cert(a, 3))
    lines = j.path.read_bytes().splitlines()
    assert json.loads(lines[-1])["certificate"] is None  # the same certificate: not repeated
    j.outcome(a.id, "fence", True, "")
    j.intent(a, "quarantine", 5, cert(a, 5, ("kms2", "kms3")))  # a new anchor re-certified it in term 5
    got = fresh(j).get("a1")
    assert got is not None and got.certificate == cert(a, 5, ("kms2", "kms3"))
    j.begin(a, cert(a, 6), "target")
    got = fresh(j).get("a1")
    assert got is not None and got.certificate.term == 6 and got.role == "target"


def test_finish_releases_the_action(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a), "anchor")
    j.finish(a.id, "aborted", "target recovered by itself")
    state = fresh(j)
    assert state.unfinished() == [] and state.is_finished("a1")
    got = state.get("a1")
    assert got is not None and got.outcome == "aborted" and got.detail == "target recovered by itself"


def begun(j: Journal, a: Action) -> None:
    j.begin(a, cert(a), "anchor")


def in_doubt(j: Journal, a: Action) -> None:
    begun(j, a)
    j.intent(a, "fence", 3, cert(a))


def finished(j: Journal, a: Action) -> None:
    begun(j, a)
    j.finish(a.id, "done", "")


def nothing(j: Journal, a: Action) -> None:
    pass


Op = Callable[[Journal, Action], object]


@pytest.mark.parametrize(
    ("setup", "op", "problem"),
    [
        (nothing, lambda j, a: j.outcome(a.id, "fence", True, ""), "never begun"),
        (nothing, lambda j, a: j.finish(a.id, "done", ""), "never begun"),
        (nothing, lambda j, a: j.intent(a, "fence", 3, cert(a)), "never begun"),
        (nothing, lambda j, a: j.begin(a, cert(action("other")), "anchor"), "certificate for another action"),
        (nothing, lambda j, a: j.begin(a, cert(a), ""), "empty role"),
        (begun, lambda j, a: j.outcome(a.id, "fence", True, ""), "without an open intent"),
        (begun, lambda j, a: j.finish(a.id, "ok", ""), "outcome must be one of"),
        (begun, lambda j, a: j.begin(action(target="kms3"), cert(action(target="kms3")), "x"), "different"),
        (begun, lambda j, a: j.intent(action(target="kms3"), "fence", 3, cert(a)), "differs"),
        (
            begun,
            lambda j, a: j.intent(a, "fence", 3, cert(action("other"))),
            "certificate for another action",
        ),
        (begun, lambda j, a: j.intent(a, "no spaces", 3, cert(a)), "bad step name"),
        (begun, lambda j, a: j.intent(a, "", 3, cert(a)), "bad step name"),
        (in_doubt, lambda j, a: j.intent(a, "rm", 3, cert(a)), "while step 'fence' is in doubt"),
        (finished, lambda j, a: j.begin(a, cert(a), "anchor"), "already finished"),
        (finished, lambda j, a: j.intent(a, "fence", 3, cert(a)), "already finished"),
        (finished, lambda j, a: j.finish(a.id, "done", ""), "already finished"),
    ],
)
def test_a_record_that_cannot_follow_is_refused_and_not_written(
    tmp_path: Path, setup: Op, op: Op, problem: str
) -> None:
    j = journal(tmp_path)
    a = action()
    setup(j, a)
    before = j.path.read_bytes() if j.path.exists() else b""
    state = j.state()
    with pytest.raises(ValueError, match=problem):
        op(j, a)
    assert (j.path.read_bytes() if j.path.exists() else b"") == before
    assert same(j.state(), state) and same(fresh(j), state)


def test_long_detail_is_clipped_not_refused(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a), "target")
    j.intent(a, "fence", 3, cert(a))
    j.outcome(a.id, "fence", False, "x" * 100_000)
    step = fresh(j).get("a1").step("fence")  # type: ignore[union-attr]
    assert step is not None and 0 < len(step.detail) <= 4096 and step.detail.endswith("...")


# ---------------------------------------------------------------------------------------------------------------
# Crashes: a torn last record at every byte offset


def scenario(j: Journal) -> list[Callable[[], object]]:
    a, b = action("a1"), action("b2", target="kms3", kind="EVICT")
    return [
        lambda: j.begin(a, cert(a), "target"),
        lambda: j.intent(a, "fence", 3, cert(a)),
        lambda: j.outcome(a.id, "fence", True, "stopped ✓"),
        lambda: j.intent(a, "quarantine", 3, cert(a)),
        lambda: j.outcome(a.id, "quarantine", True, "moved to /var/lib/kmagent/quarantine/x"),
        lambda: j.intent(a, "start", 4, cert(a, 4)),
        lambda: j.begin(b, cert(b), "anchor"),
        lambda: j.outcome(a.id, "start", False, "timeout"),
        lambda: j.finish(a.id, "failed", "start timed out"),
        lambda: j.finish(b.id, "done", ""),
    ]


def test_replay_after_a_crash_at_every_byte_of_every_record(tmp_path: Path) -> None:
    j = journal(tmp_path)
    checkpoints: list[tuple[bytes, JournalState]] = [(b"", JournalState())]
    for op in scenario(j):
        op()
        checkpoints.append((j.path.read_bytes(), j.state()))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    torn = crashed / "journal.jsonl"
    for (before, state_before), (after, state_after) in itertools.pairwise(checkpoints):
        assert after.startswith(before)
        for offset in range(len(before), len(after)):
            torn.write_bytes(after[:offset])
            state = Journal(torn, AGENT).replay()
            assert same(state, state_before), f"offset {offset} of {len(before)}..{len(after)}"
            assert bool(state.warnings) == (offset > len(before))
        torn.write_bytes(after)
        assert same(Journal(torn, AGENT).replay(), state_after)


def test_the_next_append_cuts_a_torn_tail_off(tmp_path: Path) -> None:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a), "target")
    good = j.path.read_bytes()
    for tail in (b'{"kind":"intent","v":1,"ti', b"\0" * 300, b"\0" * 40 + b"\n", b"garbage\n"):
        j.path.write_bytes(good + tail)
        restarted = Journal(j.path, AGENT, clock=Clock())
        assert restarted.replay().warnings
        restarted.intent(a, "fence", 3, cert(a))
        state = fresh(j)
        assert state.warnings == () and state.progress("a1").in_doubt == "fence"
        j.path.write_bytes(good)


@settings(max_examples=60, deadline=None)
@given(tail=st.binary(min_size=1, max_size=200).filter(lambda b: b"\n" not in b))
def test_any_bytes_left_by_a_torn_append_are_ignored(
    tmp_path_factory: pytest.TempPathFactory, tail: bytes
) -> None:
    j = journal(tmp_path_factory.mktemp("j"))
    a = action()
    j.begin(a, cert(a), "target")
    before = j.state()
    with open(j.path, "ab") as f:
        f.write(tail)
    state = fresh(j)
    assert same(state, before) and state.warnings


# ---------------------------------------------------------------------------------------------------------------
# Damage that is not a torn tail


def written(tmp_path: Path) -> Journal:
    j = journal(tmp_path)
    a = action()
    j.begin(a, cert(a), "target")
    j.intent(a, "fence", 3, cert(a))
    j.outcome(a.id, "fence", True, "")
    return j


def replace_line(path: Path, number: int, text: bytes) -> None:
    lines = path.read_bytes().splitlines()
    lines[number - 1] = text
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b'{"kind":"intent","v":1,"time":1,"agen', "damaged record"),
        (b"", "damaged record"),
        (b"\0\0\0\0", "damaged record"),
        (b"[1,2]", "not a JSON object"),
        (b'{"kind":"checkpoint","v":1}', "unknown record kind 'checkpoint'"),
        (b'{"kind":"intent","v":2}', "version 2 was written by a newer kmagent"),
        (b'{"kind":"intent"}', "without a valid version"),
        (b'{"kind":"intent","v":1,"time":1,"agent":"kms1"}', "required field missing"),
    ],
)
def test_a_damaged_middle_line_names_the_file_and_the_line(tmp_path: Path, text: bytes, problem: str) -> None:
    j = written(tmp_path)
    replace_line(j.path, 2, text)
    with pytest.raises(JournalError, match=problem) as info:
        fresh(j)
    assert info.value.line == 2 and info.value.path == j.path
    assert str(info.value).startswith(f"{j.path}, line 2: ")


def test_an_unknown_kind_in_the_last_line_is_an_error_not_a_torn_line(tmp_path: Path) -> None:
    j = written(tmp_path)
    with open(j.path, "ab") as f:
        f.write(b'{"kind":"checkpoint","v":1}\n')
    with pytest.raises(JournalError, match="line 4: unknown record kind"):
        fresh(j)


def test_records_that_contradict_each_other_are_reported_with_their_line(tmp_path: Path) -> None:
    j = written(tmp_path)
    lines = j.path.read_bytes().splitlines()
    j.path.write_bytes(b"\n".join([lines[0], lines[2], lines[1]]) + b"\n")  # outcome before its intent
    with pytest.raises(JournalError, match="line 2: outcome of step 'fence' of a1 without an open intent"):
        fresh(j)


def test_a_journal_of_another_agent_is_refused(tmp_path: Path) -> None:
    j = written(tmp_path)
    with pytest.raises(JournalError, match="line 1: record written by agent 'kms1', this is 'kms9'"):
        Journal(j.path, "kms9").replay()


def test_an_unreadable_journal_is_a_journal_error(tmp_path: Path) -> None:
    (tmp_path / "journal.jsonl").mkdir()
    with pytest.raises(JournalError, match="cannot read"):
        Journal(tmp_path / "journal.jsonl", AGENT).replay()


# ---------------------------------------------------------------------------------------------------------------
# Compaction


def test_compaction_keeps_unfinished_actions_and_remembers_finished_ids(tmp_path: Path) -> None:
    j = journal(tmp_path, compact_bytes=2000)
    live = action("live", target="kms3")
    j.begin(live, cert(live), "anchor")
    j.intent(live, "fence", 3, cert(live))
    for i in range(6):
        a = action(f"old{i}")
        j.begin(a, cert(a), "target")
        j.intent(a, "fence", 3, cert(a))
        j.outcome(a.id, "fence", True, "stopped")
        j.finish(a.id, "done", "")
    records = [json.loads(line) for line in j.path.read_bytes().splitlines()]
    assert len(records) < 4 * 6 + 2  # compacted at least once
    bodies = {r.get("action", {}).get("id") or r.get("action_id") for r in records if r["kind"] != "finish"}
    assert "old0" not in bodies and "live" in bodies  # old0 finished before the file first grew past 2000
    assert j.path.stat().st_size < 2000 + 1500
    state = fresh(j)
    assert [s.action.id for s in state.unfinished()] == ["live"]
    assert state.progress("live").in_doubt == "fence"
    assert all(state.is_finished(f"old{i}") for i in range(6)) and not state.is_finished("live")
    assert "old0" not in state.actions  # its records are gone, its id is not
    with pytest.raises(ValueError, match="already finished"):
        j.begin(action("old0"), cert(action("old0")), "target")
    # the live action goes on after compaction, and a restarted agent resumes it
    j.outcome(live.id, "fence", True, "")
    again = Journal(j.path, AGENT, clock=Clock())
    again.intent(live, "rm", 3, cert(live))
    assert fresh(j).progress("live").done == ("fence",)
    assert mode(j.path) == 0o600


def test_no_compaction_while_nothing_is_finished(tmp_path: Path) -> None:
    j = journal(tmp_path, compact_bytes=10)
    a = action()
    j.begin(a, cert(a), "anchor")
    j.intent(a, "fence", 3, cert(a))
    before = j.path.read_bytes()
    j.compact()
    assert j.path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# The held action


def test_held_round_trip(tmp_path: Path) -> None:
    j = journal(tmp_path)
    assert j.load_held() is None  # never written
    held = Held(action(), 7)
    j.save_held(held)
    assert Journal(j.path, AGENT).load_held() == held
    assert mode(j.held_path) == 0o600
    j.save_held(None)
    assert Journal(j.path, AGENT).load_held() is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"v":1,"held":{"action":{"id":"a"', "damaged"),
        (b"[]", "unexpected content"),
        (b'{"v":2,"held":null}', "unexpected content"),
        (b'{"v":1,"held":{"action":{"id":"a","kind":"REJOIN","target":"x"},"term":"7"}}', "held.term"),
    ],
)
def test_a_damaged_held_file_is_an_error_never_holding_nothing(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    j = journal(tmp_path)
    j.held_path.write_bytes(content)
    with pytest.raises(JournalError, match=problem) as info:
        j.load_held()
    assert str(j.held_path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# File modes


def test_files_are_created_0600_and_a_wider_journal_is_narrowed(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        j = written(tmp_path)
        h = History(tmp_path / "history.jsonl")
        h.append(entry())
    finally:
        os.umask(old)
    assert mode(j.path) == 0o600 and mode(h.path) == 0o600
    os.chmod(j.path, 0o644)
    j.intent(action(), "rm", 3, cert(action()))
    assert mode(j.path) == 0o600


# ---------------------------------------------------------------------------------------------------------------
# History


def entry(
    aid: str = "a1", target: str = "kms2", finished: float = 1000.0, outcome: str = "done"
) -> HistoryEntry:
    a = action(aid, target=target)
    return HistoryEntry(
        action=a,
        certificate=cert(a),
        agent=AGENT,
        role="anchor",
        evidence=("kms2 STATE_LOST for 6s (storage empty)",),
        started=finished - 30,
        finished=finished,
        duration=30.0,
        outcome=outcome,  # type: ignore[arg-type]
        detail="",
        steps=(StepEntry("fence", True, 1.5, 1, "stopped"),),
    )


def test_history_append_and_list_newest_last(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl")
    assert h.entries() == []
    for i in range(5):
        h.append(entry(f"a{i}", finished=1000.0 + i))
    again = History(h.path)
    assert [e.action.id for e in again.entries()] == ["a0", "a1", "a2", "a3", "a4"]
    assert [e.action.id for e in again.entries(limit=2)] == ["a3", "a4"]
    assert again.entries(limit=0) == []
    assert again.entries()[0] == entry("a0", finished=1000.0)
    assert again.entries()[0].signers == ("kms1", "kms3")
    assert again.find("a2") == entry("a2", finished=1002.0) and again.find("zz") is None


def test_history_recent_selects_target_and_window(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl")
    h.append(entry("a1", "kms2", finished=100.0))
    h.append(entry("a2", "kms3", finished=200.0))
    h.append(entry("a3", "kms2", finished=300.0))
    assert [e.action.id for e in h.recent("kms2", 150.0)] == ["a3"]
    assert [e.action.id for e in h.recent("kms2", 100.0)] == ["a1", "a3"]
    assert h.recent("kms9", 0.0) == []


def test_history_tolerates_a_torn_last_line_and_the_next_append_cuts_it(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl")
    h.append(entry("a1"))
    with open(h.path, "ab") as f:
        f.write(b'{"kind":"history","v":1,"entry":{"act')
    again = History(h.path)
    assert [e.action.id for e in again.entries()] == ["a1"]
    again.append(entry("a2"))
    assert [e.action.id for e in History(h.path).entries()] == ["a1", "a2"]


def test_history_damaged_middle_line_is_an_error(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl")
    for i in range(3):
        h.append(entry(f"a{i}"))
    replace_line(h.path, 2, b'{"kind":"history","v":1,"entry":{}}')
    with pytest.raises(JournalError, match=r"line 2: damaged record: .*required field missing"):
        History(h.path).entries()


def test_history_clips_long_evidence(tmp_path: Path) -> None:
    h = History(tmp_path / "history.jsonl")
    long = entry()
    h.append(HistoryEntry(**{**long.__dict__, "evidence": ("e" * 10_000,) * 300}))
    got = History(h.path).entries()[0]
    assert len(got.evidence) == 256 and all(len(e) <= 4096 for e in got.evidence)


def test_close_action_writes_history_then_finish_and_is_idempotent(tmp_path: Path) -> None:
    j = journal(tmp_path)
    h = History(tmp_path / "history.jsonl")
    a = action()
    j.begin(a, cert(a), "anchor")
    j.intent(a, "fence", 3, cert(a))
    j.outcome(a.id, "fence", True, "stopped")
    j.intent(a, "quarantine", 3, cert(a))  # in doubt when the action is aborted
    # a crash after the history entry, before the finish record:
    h.append(
        history_entry(
            j.state().get("a1"), agent=AGENT, outcome="aborted", detail="x", evidence=["e"], finished=9e9
        )
    )  # type: ignore[arg-type]
    assert fresh(j).unfinished()
    got = close_action(Journal(j.path, AGENT), History(h.path), "a1", "done", "ignored", ["other"])
    assert got.outcome == "aborted" and len(History(h.path).entries()) == 1
    assert fresh(j).get("a1").outcome == "aborted"  # type: ignore[union-attr]
    assert close_action(Journal(j.path, AGENT), History(h.path), "a1", "done", "", []) == got
    with pytest.raises(ValueError, match="never begun"):
        close_action(j, h, "nope", "done", "", [])


def test_close_action_records_steps_durations_and_signers(tmp_path: Path) -> None:
    j = journal(tmp_path)  # the clock advances 1.5 s per record
    h = History(tmp_path / "history.jsonl")
    a = action()
    j.begin(a, cert(a), "anchor")
    j.intent(a, "fence", 3, cert(a))
    j.outcome(a.id, "fence", True, "stopped")
    j.intent(a, "quarantine", 3, cert(a))
    got = close_action(j, h, "a1", "aborted", "operator paused", ["kms2 STATE_LOST"])
    assert [(s.step, s.ok, s.seconds, s.attempts) for s in got.steps] == [
        ("fence", True, 1.5, 1),
        ("quarantine", None, 0.0, 1),
    ]
    assert got.duration == pytest.approx(6.0) and got.finished - got.started == pytest.approx(6.0)
    assert got.signers == ("kms1", "kms3") and got.evidence == ("kms2 STATE_LOST",)
    assert History(h.path).entries() == [got]
    assert fresh(j).is_finished("a1")
