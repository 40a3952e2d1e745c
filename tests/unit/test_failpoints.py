"""Failpoints: strict parsing at start, a real SIGKILL at the armed point, crash-once."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import failpoints
from agent.failpoints import DIR_ENV, ENV, FailpointError, Failpoints, parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_installed_failpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failpoints, "_active", None)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(DIR_ENV, raising=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("   ", {}),
        ("fence=crash", {"fence": "crash"}),
        (
            " REJOIN.Quarantine.intent = crash , evict.rm.outcome=crash-once ",
            {"rejoin.quarantine.intent": "crash", "evict.rm.outcome": "crash-once"},
        ),
        ("start_fresh=crash,add-node=crash", {"start_fresh": "crash", "add-node": "crash"}),
    ],
)
def test_parse_good(text: str, expected: dict[str, str]) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fence", "entry 1 'fence' is not name=mode"),
        ("fence=", "is not name=mode"),
        ("=crash", "is not name=mode"),
        ("fence=explode", "unknown mode 'explode', expected one of crash, crash-once"),
        ("fence=crash,,rm=crash", "entry 2 is empty"),
        ("fence=crash,", "entry 2 is empty"),
        ("fence=crash,fence=crash-once", "'fence' is given twice"),
        ("rejoin.fence=crash", "expected <kind>.<step>.intent"),
        ("rejion.fence.intent=crash", "unknown action kind 'rejion'"),
        ("rejoin.fence.before=crash", "unknown phase 'before'"),
        ("rejoin.f e.intent=crash", "bad step name"),
        ("fen ce=crash", "a step name is letters"),
        ("a.b.c.d=crash", "expected <kind>.<step>.intent"),
    ],
)
def test_parse_bad_names_the_entry(text: str, problem: str) -> None:
    with pytest.raises(FailpointError, match=problem) as info:
        parse(text)
    assert str(info.value).startswith(ENV)


def test_crash_once_needs_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(FailpointError, match=f"crash-once needs {DIR_ENV}"):
        Failpoints.from_environ({ENV: "fence=crash-once"})
    with pytest.raises(FailpointError, match="is not a directory"):
        Failpoints.from_environ({ENV: "fence=crash-once", DIR_ENV: str(tmp_path / "missing")})
    ok = Failpoints.from_environ({ENV: "fence=crash-once", DIR_ENV: str(tmp_path)})
    assert ok.armed() == {"fence": "crash-once"}


def test_bare_step_is_the_intent_of_every_kind_and_full_names_are_exact() -> None:
    fp = Failpoints(parse("fence=crash,evict.rm.outcome=crash"))
    assert fp.match("rejoin.fence.intent") == "fence"
    assert fp.match("RESTORE.fence.intent") == "fence"
    assert fp.match("rejoin.fence.outcome") is None
    assert fp.match("evict.rm.outcome") == "evict.rm.outcome"
    assert fp.match("evict.rm.intent") is None
    assert fp.match("rejoin.rm.outcome") is None
    assert Failpoints({}).match("rejoin.fence.intent") is None


def test_load_validates_installs_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FailpointError, match="unknown mode"):
        failpoints.load({ENV: "fence=sometimes"})
    with caplog.at_level(logging.WARNING, logger="agent.failpoints"):
        failpoints.load({ENV: "rejoin.fence.outcome=crash"})
    assert failpoints.armed() == {"rejoin.fence.outcome": "crash"}
    assert "failpoints_armed" in caplog.text and "rejoin.fence.outcome=crash" in caplog.text
    failpoints.hit("rejoin.fence.intent")  # not armed: returns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent.failpoints"):
        failpoints.load({})
    assert failpoints.armed() == {} and caplog.text == ""


def test_without_load_the_environment_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "fence=crash")
    assert failpoints.armed() == {"fence": "crash"}
    monkeypatch.setenv(ENV, "rm=crash")
    assert failpoints.armed() == {"fence": "crash"}


# ---------------------------------------------------------------------------------------------------------------
# Real crashes, in a child process

CHILD = """
import sys
from agent import failpoints
failpoints.load()
print("before", flush=True)
sys.stdout.write("buffered, never flushed\\n")
try:
    failpoints.hit(sys.argv[1])
finally:
    print("finally ran", flush=True)
print("after", flush=True)
"""


def run_child(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in (ENV, DIR_ENV, "PYTHONUNBUFFERED")}
    full.update({"PYTHONPATH": str(ROOT), **env})  # stdout block-buffered, as for a daemon writing to a pipe
    return subprocess.run(
        [sys.executable, "-c", CHILD, name], env=full, capture_output=True, text=True, timeout=60, check=False
    )


def test_hit_kills_the_process_with_sigkill_and_nothing_else_runs() -> None:
    done = run_child("rejoin.quarantine.intent", {ENV: "quarantine=crash"})
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout == "before\n"  # no buffered output flushed, no finally block, nothing after
    assert "failpoint quarantine at rejoin.quarantine.intent" in done.stderr


def test_an_unarmed_point_passes() -> None:
    done = run_child("rejoin.quarantine.outcome", {ENV: "quarantine=crash"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before", "buffered, never flushed", "finally ran", "after"]


def test_crash_once_crashes_the_first_time_only(tmp_path: Path) -> None:
    env = {ENV: "rejoin.fence.outcome=crash-once", DIR_ENV: str(tmp_path)}
    first = run_child("rejoin.fence.outcome", env)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert (tmp_path / "rejoin.fence.outcome.crashed").exists()
    second = run_child("rejoin.fence.outcome", env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == "after"


def test_a_bad_value_fails_at_load_in_the_child() -> None:
    done = run_child("rejoin.fence.intent", {ENV: "fence=crahs"})
    assert done.returncode == 1 and "FailpointError" in done.stderr and "unknown mode 'crahs'" in done.stderr
    assert done.stdout == ""
