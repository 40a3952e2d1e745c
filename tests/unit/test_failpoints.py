"""Failpoints: strict parsing at start, a real SIGKILL at the armed point, crash-once, sleep (this task only),
freeze (a real SIGSTOP of the whole process), the command phase."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import failpoints
from agent.failpoints import DIR_ENV, ENV, MAX_SECONDS, MODES, Armed, FailpointError, Failpoints, parse

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
        ("rejoin.remove.command=freeze(40)", {"rejoin.remove.command": "freeze(40)"}),
        (
            "evict.rm.command=sleep(0.5), restore.fetch.outcome=sleep-once(12.25),rm=freeze-once(3600)",
            {
                "evict.rm.command": "sleep(0.5)",
                "restore.fetch.outcome": "sleep-once(12.25)",
                "rm": "freeze-once(3600)",
            },
        ),
        ("fence=sleep(007)", {"fence": "sleep(007)"}),  # the text as written
    ],
)
def test_parse_good(text: str, expected: dict[str, str]) -> None:
    assert {name: armed.text for name, armed in parse(text).items()} == expected
    assert Failpoints(parse(text), Path("/")).armed() == expected


@pytest.mark.parametrize(
    ("mode", "armed"),
    [
        ("crash", Armed("crash", None, "crash")),
        ("crash-once", Armed("crash-once", None, "crash-once")),
        ("sleep(40)", Armed("sleep", 40.0, "sleep(40)")),
        ("sleep-once(0.5)", Armed("sleep-once", 0.5, "sleep-once(0.5)")),
        ("freeze(1)", Armed("freeze", 1.0, "freeze(1)")),
        ("freeze-once(3600.0)", Armed("freeze-once", 3600.0, "freeze-once(3600.0)")),
        ("sleep(0.001)", Armed("sleep", 0.001, "sleep(0.001)")),
    ],
)
def test_every_mode_parses_to_its_kind_and_seconds(mode: str, armed: Armed) -> None:
    assert parse(f"fence={mode}") == {"fence": armed}
    assert str(armed) == mode and armed.once == mode.split("(")[0].endswith("-once")
    assert armed.mode in MODES


def test_modes_and_describe_list_the_new_modes(tmp_path: Path) -> None:
    assert MODES == ("crash", "crash-once", "sleep", "sleep-once", "freeze", "freeze-once")
    fp = Failpoints(parse("rejoin.remove.command=freeze-once(40),fence=sleep(0.5),rm=crash"), tmp_path)
    assert fp.describe() == "rejoin.remove.command=freeze-once(40),fence=sleep(0.5),rm=crash"
    assert fp.armed() == {"rejoin.remove.command": "freeze-once(40)", "fence": "sleep(0.5)", "rm": "crash"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fence", "entry 1 'fence' is not name=mode"),
        ("fence=", "is not name=mode"),
        ("=crash", "is not name=mode"),
        (
            "fence=explode",
            r"entry 1 'fence': unknown mode 'explode', expected one of crash, crash-once, sleep\(SECONDS\), "
            r"sleep-once\(SECONDS\), freeze\(SECONDS\), freeze-once\(SECONDS\)",
        ),
        ("fence=CRASH", "entry 1 'fence': unknown mode 'CRASH'"),  # modes are case-sensitive
        ("fence=Sleep(1)", r"entry 1 'fence': unknown mode 'Sleep\(1\)'"),
        ("fence=crash(1)", r"entry 1 'fence': mode 'crash\(1\)': crash takes no argument"),
        ("fence=crash-once()", r"entry 1 'fence': mode 'crash-once\(\)': crash-once takes no argument"),
        (
            "rm=crash,fence=sleep",
            r"entry 2 'fence': bad mode 'sleep': expected sleep\(SECONDS\), SECONDS a positive",
        ),
        ("fence=sleep()", r"entry 1 'fence': bad mode 'sleep\(\)': expected sleep\(SECONDS\)"),
        ("fence=sleep(-1)", r"entry 1 'fence': bad mode 'sleep\(-1\)': expected sleep\(SECONDS\)"),
        ("fence=sleep(abc)", r"entry 1 'fence': bad mode 'sleep\(abc\)'"),
        (
            "fence=sleep(0)",
            r"entry 1 'fence': bad mode 'sleep\(0\)': expected sleep\(SECONDS\), SECONDS a positive",
        ),
        ("fence=sleep(0.000)", r"entry 1 'fence': bad mode 'sleep\(0.000\)'"),
        ("fence=sleep(1.)", r"entry 1 'fence': bad mode 'sleep\(1.\)'"),
        ("fence=sleep(.5)", r"entry 1 'fence': bad mode 'sleep\(.5\)'"),
        ("fence=sleep(1", r"entry 1 'fence': bad mode 'sleep\(1'"),
        ("fence=sleep(1)x", r"entry 1 'fence': bad mode 'sleep\(1\)x'"),
        ("fence=sleep( 1 )", r"entry 1 'fence': bad mode 'sleep\( 1 \)'"),  # no spaces inside
        ("fence=sleep (1)", r"entry 1 'fence': bad mode 'sleep \(1\)'"),
        ("fence=sleep(inf)", r"entry 1 'fence': bad mode 'sleep\(inf\)'"),
        ("fence=sleep(nan)", r"entry 1 'fence': bad mode 'sleep\(nan\)'"),
        ("fence=freeze(1e9)", r"entry 1 'fence': bad mode 'freeze\(1e9\)': expected freeze\(SECONDS\)"),
        ("fence=freeze(3600.5)", rf"entry 1 'fence': bad mode 'freeze\(3600.5\)'.*at most {MAX_SECONDS}"),
        (
            "fence=freeze-once(4000)",
            r"entry 1 'fence': bad mode 'freeze-once\(4000\)': expected freeze-once",
        ),
        ("fence=sleep-twice(1)", r"entry 1 'fence': unknown mode 'sleep-twice\(1\)'"),
        ("fence=crash,,rm=crash", "entry 2 is empty"),
        ("fence=crash,", "entry 2 is empty"),
        ("fence=crash,fence=crash-once", "'fence' is given twice"),
        ("rejoin.fence=crash", "expected <kind>.<step>.intent"),
        ("rejion.fence.intent=crash", "unknown action kind 'rejion'"),
        ("rejoin.fence.before=crash", "unknown phase 'before', expected intent, command or outcome"),
        ("rejoin.fence.commands=freeze(1)", "entry 1 'rejoin.fence.commands': unknown phase 'commands'"),
        (
            "evict.command=crash",
            "entry 1 'evict.command': expected <kind>.<step>.intent, <kind>.<step>.command",
        ),
        ("nope.rm.command=crash", "entry 1 'nope.rm.command': unknown action kind 'nope'"),
        ("rejoin.f e.intent=crash", "bad step name"),
        ("fen ce=crash", "a step name is letters"),
        ("a.b.c.d=crash", "expected <kind>.<step>.intent"),
    ],
)
def test_parse_bad_names_the_entry(text: str, problem: str) -> None:
    with pytest.raises(FailpointError, match=problem) as info:
        parse(text)
    assert str(info.value).startswith(ENV)


@pytest.mark.parametrize("mode", ["crash-once", "sleep-once(1)", "freeze-once(0.5)"])
def test_once_modes_need_an_existing_directory(tmp_path: Path, mode: str) -> None:
    base = mode.split("(")[0]
    with pytest.raises(FailpointError, match=f"'fence': {base} needs {DIR_ENV}"):
        Failpoints.from_environ({ENV: f"rm=crash,fence={mode}"})
    with pytest.raises(FailpointError, match="is not a directory"):
        Failpoints.from_environ({ENV: f"fence={mode}", DIR_ENV: str(tmp_path / "missing")})
    ok = Failpoints.from_environ({ENV: f"fence={mode}", DIR_ENV: str(tmp_path)})
    assert ok.armed() == {"fence": mode}


@pytest.mark.parametrize("mode", ["crash", "sleep(1)", "freeze(0.5)"])
def test_modes_without_once_need_no_directory(mode: str) -> None:
    assert Failpoints.from_environ({ENV: f"fence={mode}"}).armed() == {"fence": mode}


def test_failpoints_built_from_text_validate_it() -> None:
    assert Failpoints({"fence": "sleep(2)"}).points == {"fence": Armed("sleep", 2.0, "sleep(2)")}
    with pytest.raises(FailpointError, match=r"'fence': bad mode 'sleep\(x\)'"):
        Failpoints({"fence": "sleep(x)"})


def test_bare_step_is_the_intent_of_every_kind_and_full_names_are_exact() -> None:
    fp = Failpoints(parse("fence=crash,evict.rm.outcome=crash"))
    assert fp.match("rejoin.fence.intent") == "fence"
    assert fp.match("RESTORE.fence.intent") == "fence"
    assert fp.match("rejoin.fence.outcome") is None
    assert fp.match("evict.rm.outcome") == "evict.rm.outcome"
    assert fp.match("evict.rm.intent") is None
    assert fp.match("rejoin.rm.outcome") is None
    assert Failpoints({}).match("rejoin.fence.intent") is None


def test_command_phase_names_are_exact_and_not_reached_by_a_bare_step() -> None:
    fp = Failpoints(parse("rejoin.remove.command=freeze(1),fence=sleep(1)"))
    assert fp.match("rejoin.remove.command") == "rejoin.remove.command"
    assert fp.match("REJOIN.Remove.Command") == "rejoin.remove.command"
    assert fp.match("rejoin.remove.intent") is None
    assert fp.match("evict.remove.command") is None
    assert fp.match("rejoin.fence.command") is None  # a bare step is the intent only
    assert fp.match("rejoin.fence.outcome") is None
    assert fp.match("rejoin.fence.intent") == "fence"


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
# sleep: in this process, only the reaching task waits


def returns_without_suspending(name: str, fp: Failpoints | None = None) -> bool:
    """Whether `reach(name)` completes on its first step, without ever giving the event loop a turn."""
    coro = failpoints.reach(name) if fp is None else fp.reach(name)
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


async def test_sleep_blocks_only_the_task_that_reaches_it(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    failpoints.load({ENV: "rejoin.remove.command=sleep(0.5)"})
    ticks = 0

    async def other_task() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    other = asyncio.create_task(other_task())
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="agent.failpoints"):
        await failpoints.reach("rejoin.remove.command")
    took = time.monotonic() - start
    seen = ticks
    other.cancel()
    assert 0.45 <= took < 30
    assert seen >= 5  # ~50 expected; a blocked event loop would allow at most 1
    err = capfd.readouterr().err
    assert "kmagent: failpoint rejoin.remove.command at rejoin.remove.command: sleep 0.5s" in err
    assert "event=failpoint_fired" in caplog.text and "mode=sleep(0.5)" in caplog.text


async def test_reach_on_an_unarmed_point_returns_at_once() -> None:
    failpoints.load({ENV: "rejoin.remove.command=sleep(60),fence=freeze(60),rm=crash"})
    assert returns_without_suspending("rejoin.remove.intent")
    assert returns_without_suspending("rejoin.fence.outcome")
    assert returns_without_suspending("evict.rm.command")
    assert returns_without_suspending("rejoin.remove.command") is False  # the armed one does suspend


async def test_sleep_once_fires_once_and_the_marker_outlives_the_process(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fp = Failpoints(parse("fence=sleep-once(0.3)"), tmp_path)
    start = time.monotonic()
    await fp.reach("evict.fence.intent")
    assert time.monotonic() - start >= 0.25
    assert (tmp_path / "fence.fired").exists()
    assert "failpoint fence at evict.fence.intent: sleep 0.3s" in capfd.readouterr().err
    assert returns_without_suspending("evict.fence.intent", fp)  # second reach: passes at once
    restarted = Failpoints(parse("fence=sleep-once(0.3)"), tmp_path)
    assert returns_without_suspending("rejoin.fence.intent", restarted)
    assert capfd.readouterr().err == ""  # passing is silent


def test_hit_on_a_sleep_point_raises_and_consumes_nothing(tmp_path: Path) -> None:
    failpoints.load({ENV: "rejoin.remove.command=sleep(60),fence=sleep-once(60)", DIR_ENV: str(tmp_path)})
    with pytest.raises(FailpointError, match=r"'rejoin.remove.command'=sleep\(60\).*must be reached with"):
        failpoints.hit("rejoin.remove.command")
    with pytest.raises(FailpointError, match=r"'fence'=sleep-once\(60\) is armed at restore.fence.intent"):
        failpoints.hit("restore.fence.intent")
    assert list(tmp_path.iterdir()) == []  # the -once marker was not taken by the wrong call
    (tmp_path / "fence.fired").touch()
    with pytest.raises(FailpointError, match="reach"):  # a programming error even once fired
        failpoints.hit("restore.fence.intent")
    failpoints.hit("rejoin.remove.intent")  # not armed: returns


# ---------------------------------------------------------------------------------------------------------------
# Real crashes, in a child process

CHILD = """
import asyncio
import sys
from agent import failpoints
failpoints.load()
print("before", flush=True)
sys.stdout.write("buffered, never flushed\\n")
try:
    if sys.argv[2] == "hit":
        failpoints.hit(sys.argv[1])
    else:
        asyncio.run(failpoints.reach(sys.argv[1]))
finally:
    print("finally ran", flush=True)
print("after", flush=True)
"""


def run_child(
    name: str, env: dict[str, str], *args: str, script: str = CHILD, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in (ENV, DIR_ENV, "PYTHONUNBUFFERED")}
    full.update({"PYTHONPATH": str(ROOT), **env})  # stdout block-buffered, as for a daemon writing to a pipe
    return subprocess.run(
        [sys.executable, "-c", script, name, *(args or ("hit",))],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("how", ["hit", "reach"])
def test_hit_kills_the_process_with_sigkill_and_nothing_else_runs(how: str) -> None:
    done = run_child("rejoin.quarantine.intent", {ENV: "quarantine=crash"}, how)
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


# ---------------------------------------------------------------------------------------------------------------
# freeze: a real SIGSTOP of the whole child process, every thread

FREEZE_CHILD = """
import asyncio
import subprocess
import sys
import threading
import time
from agent import failpoints

name, how, waker = sys.argv[1:4]
if waker == "broken":
    def broken(*args, **kwargs):
        raise OSError("no waker in this test")
    subprocess.Popen = broken
failpoints.load()
stamps = []
stop = threading.Event()

def record():
    while not stop.is_set():
        stamps.append(time.monotonic())
        time.sleep(0.01)

def wait_for_stamps(count):
    deadline = time.monotonic() + 10
    while len(stamps) < count:
        assert time.monotonic() < deadline, "the recording thread does not run"
        time.sleep(0.005)

thread = threading.Thread(target=record, daemon=True)
thread.start()
wait_for_stamps(5)
start = time.monotonic()
if how == "hit":
    failpoints.hit(name)
else:
    asyncio.run(failpoints.reach(name))
took = time.monotonic() - start
wait_for_stamps(len(stamps) + 5)
stop.set()
thread.join()
gap = max(b - a for a, b in zip(stamps, stamps[1:]))
print(f"{took:.3f} {gap:.3f}", flush=True)
"""

POINT = "rejoin.remove.command"


def run_freeze_child(env: dict[str, str], how: str = "hit", waker: str = "real") -> tuple[float, float, str]:
    """(how long the call took, the largest gap the recording thread saw, stderr); the child must exit 0
    within a generous deadline (a child left stopped would time out here)."""
    done = run_child(POINT, env, how, waker, script=FREEZE_CHILD, timeout=30)
    assert done.returncode == 0, done.stderr
    took, gap = (float(x) for x in done.stdout.split())
    return took, gap, done.stderr


@pytest.mark.parametrize("how", ["hit", "reach"])
def test_freeze_stops_every_thread_of_the_process(how: str) -> None:
    took, gap, err = run_freeze_child({ENV: f"{POINT}=freeze(1)"}, how)
    assert took >= 0.9
    assert gap >= 0.9  # the other thread was stopped too, not just the caller
    assert f"kmagent: failpoint {POINT} at {POINT}: freeze 1s (SIGSTOP, whole process)" in err
    assert "event=failpoint_fired" in err and "mode=freeze(1)" in err


def test_freeze_without_a_waker_falls_back_to_sleeping_the_calling_thread_and_says_so() -> None:
    took, gap, err = run_freeze_child({ENV: f"{POINT}=freeze(1)"}, "hit", "broken")
    assert took >= 0.9
    assert gap < 0.5  # only the caller slept: this is what the gap check above tells apart
    assert "freeze 1s NOT as a process stop: cannot spawn the waker (no waker in this test)" in err


def test_freeze_once_freezes_the_first_time_only(tmp_path: Path) -> None:
    env = {ENV: f"{POINT}=freeze-once(1)", DIR_ENV: str(tmp_path)}
    took, gap, _ = run_freeze_child(env, "reach")
    assert took >= 0.9 and gap >= 0.9
    assert (tmp_path / f"{POINT}.fired").exists()
    took, gap, err = run_freeze_child(env, "reach")
    assert took < 0.5 and gap < 0.5
    assert f"at {POINT}: freeze" not in err and "failpoint_fired" not in err  # passing is silent
