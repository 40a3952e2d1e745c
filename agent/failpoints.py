"""Failpoints: crash, slow down or freeze the agent at a named journaled step, so that tests can prove crash
recovery and lease safety (DESIGN §8).

`KMAGENT_FAILPOINTS="rejoin.quarantine.intent=crash,fence=crash-once,rejoin.remove.command=freeze(40)"` arms
points by name, `name=mode` entries separated by commas.

Names (case-insensitive; kinds must be action kinds: rejoin, evict, restore):

* `<kind>.<step>.intent` fires right after the step's intent is journaled, before the step runs;
* `<kind>.<step>.command` fires right before a destructive minkms command of that step leaves;
* `<kind>.<step>.outcome` fires after the step ran, before its outcome is journaled;
* a bare `<step>` is an alias for `<kind>.<step>.intent` of every kind (never for `command` or `outcome`).

Modes (case-sensitive, written exactly so, no spaces inside; SECONDS is a positive decimal number such as
`40` or `0.5`, digits with an optional fraction, at most 3600):

* `crash`: SIGKILL to the agent itself at once: no cleanup, no buffered output flushed, no `finally` blocks,
  exactly what a real crash leaves. Use it to prove recovery from the journal.
* `sleep(SECONDS)`: only the task that reaches the point waits (`await asyncio.sleep`); the rest of the agent
  (leases, heartbeats, HTTP) goes on. Use it for a slow step: a command that takes long, while the agent is
  otherwise healthy.
* `freeze(SECONDS)`: the whole agent process stops, every thread, as under a hung disk or a paused VM: a
  detached waker process is spawned to send SIGCONT after SECONDS, then the agent sends itself SIGSTOP.
  Monotonic time passes during the freeze, exactly like a paused VM, so the agent wakes up with its lease
  expired and timers overdue. Use it for a stalled agent whose lease expires while it is stopped. If the
  waker cannot be spawned, the calling thread sleeps instead (only that thread blocks) and the stderr line
  says so.
* `crash-once`, `sleep-once(SECONDS)`, `freeze-once(SECONDS)`: the same, the first time only. Each needs
  the directory named by `KMAGENT_FAILPOINTS_DIR`, where firing leaves a marker file per entry (created with
  O_EXCL: `<entry>.crashed` for crash-once, `<entry>.fired` for the others); while it exists, the point
  passes, also in a restarted agent.

The executor calls `await reach(name)` at every point. `hit(name)` is its synchronous form, for crash and
freeze only: a point armed with a sleep mode cannot be waited for without an event loop, so `hit` raises
FailpointError there (a programming error, which the tests catch).

Each firing writes one unbuffered line to stderr before acting (`kmagent: failpoint <entry> at <name>: ...`);
sleep and freeze also log a `failpoint_fired` warning.

The variable is parsed and checked once, at start (`load`): a typo must refuse the start with a clear message,
not kill the agent at a random later moment, and not silently arm nothing (a test would then pass vacuously).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.core.messages import ACTION_KINDS
from agent.io import logs

__all__ = [
    "DIR_ENV",
    "ENV",
    "MAX_SECONDS",
    "MODES",
    "PHASES",
    "Armed",
    "FailpointError",
    "Failpoints",
    "Mode",
    "armed",
    "hit",
    "load",
    "parse",
    "parse_mode",
    "reach",
]

ENV = "KMAGENT_FAILPOINTS"
DIR_ENV = "KMAGENT_FAILPOINTS_DIR"

Mode = Literal["crash", "crash-once", "sleep", "sleep-once", "freeze", "freeze-once"]
MODES: tuple[Mode, ...] = ("crash", "crash-once", "sleep", "sleep-once", "freeze", "freeze-once")
_TIMED: frozenset[Mode] = frozenset({"sleep", "sleep-once", "freeze", "freeze-once"})
_SPELLED = ", ".join(f"{m}(SECONDS)" if m in _TIMED else m for m in MODES)
MAX_SECONDS = 3600
PHASES = ("intent", "outcome", "command")
_KINDS = tuple(k.lower() for k in ACTION_KINDS)
_STEP = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
_MODE = re.compile(r"([a-z-]*)(.*)\Z", re.DOTALL)
_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,12})?\Z")

log = logging.getLogger(__name__)


class FailpointError(ValueError):
    """KMAGENT_FAILPOINTS (or its directory) is not valid, or a point is reached the wrong way; the message
    names the entry and the problem."""


@dataclass(frozen=True)
class Armed:
    """One armed mode: `mode` without its argument, `seconds` for sleep and freeze (None for crash), `text` as
    written. Build it with `parse_mode`, which validates."""

    mode: Mode
    seconds: float | None
    text: str

    def __str__(self) -> str:
        return self.text

    @property
    def once(self) -> bool:
        return self.mode.endswith("-once")

    @property
    def number(self) -> str:
        """SECONDS as written (validated digits, safe in a shell command); empty for crash."""
        return self.text[self.text.index("(") + 1 : -1] if "(" in self.text else ""

    @property
    def action(self) -> str:
        """crash, sleep or freeze."""
        return self.mode.removesuffix("-once")


def parse_mode(text: str, where: str = "") -> Armed:
    """One mode as written (`crash`, `freeze-once(40)`, ...); FailpointError prefixed with `where`."""
    prefix = f"{ENV}: {where}: " if where else f"{ENV}: "
    match = _MODE.match(text)
    assert match is not None  # the pattern matches any text
    base, rest = match.groups()
    if base not in MODES:
        raise FailpointError(f"{prefix}unknown mode {text[:40]!r}, expected one of {_SPELLED}")
    mode = MODES[MODES.index(base)]
    if mode not in _TIMED:
        if rest:
            raise FailpointError(f"{prefix}mode {text[:40]!r}: {mode} takes no argument, write just {mode}")
        return Armed(mode, None, mode)
    expected = (
        f"expected {mode}(SECONDS), SECONDS a positive decimal number of at most {MAX_SECONDS} "
        f"(e.g. {mode}(40) or {mode}(0.5))"
    )
    if not (rest.startswith("(") and rest.endswith(")")) or not _SECONDS.match(rest[1:-1]):
        raise FailpointError(f"{prefix}bad mode {text[:40]!r}: {expected}")
    number = rest[1:-1]
    seconds = float(number)
    if not 0 < seconds <= MAX_SECONDS:
        raise FailpointError(f"{prefix}bad mode {text[:40]!r}: {expected}")
    return Armed(mode, seconds, f"{mode}({number})")


def parse(text: str) -> dict[str, Armed]:
    """`name=mode,...` as {name: Armed}, names in lower case; FailpointError naming the bad entry."""
    points: dict[str, Armed] = {}
    for number, raw in enumerate(text.split(","), 1):
        entry = raw.strip()
        if not entry:
            if text.strip():
                raise FailpointError(f"{ENV}: entry {number} is empty (a stray comma?)")
            continue
        name, sep, mode = (part.strip() for part in entry.partition("="))
        name = name.lower()
        if not sep or not name or not mode:
            raise FailpointError(f"{ENV}: entry {number} {entry[:80]!r} is not name=mode (e.g. fence=crash)")
        problem = _name_problem(name)
        if problem is not None:
            raise FailpointError(f"{ENV}: entry {number} {name[:80]!r}: {problem}")
        armed = parse_mode(mode, f"entry {number} {name!r}")
        if name in points:
            raise FailpointError(f"{ENV}: {name!r} is given twice")
        points[name] = armed
    return points


def _name_problem(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) == 1:
        return None if _STEP.match(name) else "a step name is letters, digits, '-' and '_'"
    if len(parts) != 3:
        return "expected <kind>.<step>.intent, <kind>.<step>.command, <kind>.<step>.outcome or a bare <step>"
    kind, step, phase = parts
    if kind not in _KINDS:
        return f"unknown action kind {kind!r}, expected one of {', '.join(_KINDS)}"
    if not _STEP.match(step):
        return f"bad step name {step!r}: letters, digits, '-' and '_'"
    if phase not in PHASES:
        return f"unknown phase {phase!r}, expected intent, command or outcome"
    return None


class Failpoints:
    """The armed points of one agent process."""

    def __init__(self, points: Mapping[str, Armed | str], once_dir: Path | None = None) -> None:
        self.points: dict[str, Armed] = {
            name: value if isinstance(value, Armed) else parse_mode(value, repr(name))
            for name, value in points.items()
        }
        for name, armed in self.points.items():
            if not armed.once:
                continue
            if once_dir is None:
                raise FailpointError(
                    f"{ENV}: {name!r}: {armed.mode} needs {DIR_ENV}, a directory for its markers"
                )
            if not once_dir.is_dir():
                raise FailpointError(f"{DIR_ENV}: {once_dir} is not a directory")
        self.once_dir = once_dir

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Failpoints:
        once = environ.get(DIR_ENV)
        return cls(parse(environ.get(ENV, "")), Path(once) if once else None)

    def armed(self) -> dict[str, str]:
        """{name: mode as written}, e.g. {"rejoin.remove.command": "freeze-once(40)"}."""
        return {name: armed.text for name, armed in self.points.items()}

    def describe(self) -> str:
        return ",".join(f"{name}={armed.text}" for name, armed in self.points.items())

    def match(self, name: str) -> str | None:
        """The armed entry that `name` (a full `<kind>.<step>.<phase>` name) triggers, if any."""
        if not self.points:
            return None
        name = name.lower()
        if name in self.points:
            return name
        parts = name.split(".")
        if len(parts) == 3 and parts[2] == "intent" and parts[1] in self.points:
            return parts[1]
        return None

    def hit(self, name: str) -> None:
        """The synchronous form of `reach`, for crash and freeze: crash or freeze here when `name` is armed
        (and, for a -once mode, has not fired yet). FailpointError when `name` is armed with a sleep mode."""
        entry = self.match(name)
        if entry is None:
            return
        armed = self.points[entry]
        if armed.action == "sleep":
            raise FailpointError(
                f"{ENV}: {entry!r}={armed.text} is armed at {name}: a sleep point must be reached with "
                "`await failpoints.reach(...)`, not `hit`"
            )
        self._fire_sync(entry, name, armed)

    async def reach(self, name: str) -> None:
        """The executor's call at every point: crash (SIGKILL) or freeze (the whole process stops, at once,
        before any await) or sleep (only this task awaits) when `name` is armed and, for a -once mode, has
        not fired yet; otherwise return at once."""
        entry = self.match(name)
        if entry is None:
            return
        armed = self.points[entry]
        if armed.action != "sleep":
            self._fire_sync(entry, name, armed)
            return
        if not self._first_time(entry, armed):
            return
        assert armed.seconds is not None
        _say(f"kmagent: failpoint {entry} at {name}: sleep {armed.number}s (this task only)\n")
        _fired(entry, name, armed)
        await asyncio.sleep(armed.seconds)

    def _fire_sync(self, entry: str, name: str, armed: Armed) -> None:
        if not self._first_time(entry, armed):
            return
        if armed.action == "crash":
            _die(f"kmagent: failpoint {entry} at {name}: crash (SIGKILL)\n")
        else:
            _freeze(entry, name, armed)

    def _first_time(self, entry: str, armed: Armed) -> bool:
        """True unless `armed` is a -once mode that fired already; creates its marker (O_EXCL)."""
        if not armed.once:
            return True
        assert self.once_dir is not None
        marker = self.once_dir / f"{entry}.{'crashed' if armed.action == 'crash' else 'fired'}"
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            return False  # fired here once already: pass
        return True


def _say(message: str) -> None:
    """One unbuffered line on stderr, even when the logging setup is wedged."""
    with contextlib.suppress(OSError):
        os.write(2, message.encode())


def _fired(entry: str, name: str, armed: Armed) -> None:
    log.warning(
        logs.kv(
            event="failpoint_fired",
            failpoint=entry,
            at=name,
            mode=armed.text,
            seconds=armed.seconds,
            note="FOR TESTS ONLY",
        )
    )


def _die(message: str) -> None:
    """A real crash: one unbuffered line for the test's logs, then SIGKILL (nothing else runs)."""
    _say(message)
    os.kill(os.getpid(), signal.SIGKILL)


def _freeze(entry: str, name: str, armed: Armed) -> None:
    """A real pause of the whole process: a detached waker sends SIGCONT after the delay, then SIGSTOP.

    The log line comes before the waker starts, so that only the one stderr write lies between the waker's
    start and the SIGSTOP (a SIGCONT arriving before the SIGSTOP would leave the process stopped for good)."""
    assert armed.seconds is not None
    number = armed.number
    pid = os.getpid()
    _fired(entry, name, armed)
    _wakers[:] = [w for w in _wakers if w.poll() is None]  # reap the wakers of earlier freezes
    try:
        waker = subprocess.Popen(
            ["/bin/sh", "-c", f"sleep {number}; kill -CONT {pid}"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        _say(
            f"kmagent: failpoint {entry} at {name}: freeze {number}s NOT as a process stop: cannot spawn "
            f"the waker ({exc}); time.sleep on the calling thread only, the other threads run on\n"
        )
        time.sleep(armed.seconds)
        return
    _say(f"kmagent: failpoint {entry} at {name}: freeze {number}s (SIGSTOP, whole process)\n")
    os.kill(pid, signal.SIGSTOP)
    if waker.poll() is None:  # woken early by someone else, or the waker has not exited yet
        _wakers.append(waker)


_wakers: list[subprocess.Popen[bytes]] = []


_active: Failpoints | None = None


def load(environ: Mapping[str, str] | None = None) -> Failpoints:
    """Parse and install the process's failpoints; call at start. FailpointError: refuse to start.
    Logs a loud warning when any point is armed (a production agent must never run like this)."""
    global _active
    points = Failpoints.from_environ(os.environ if environ is None else environ)
    _active = points
    if points.points:
        log.warning(logs.kv(event="failpoints_armed", failpoints=points.describe(), note="FOR TESTS ONLY"))
    return points


def _current() -> Failpoints:
    return _active if _active is not None else load()


async def reach(name: str) -> None:
    """The executor's call at each point, e.g. `await reach("rejoin.remove.command")`; see Failpoints.reach."""
    await _current().reach(name)


def hit(name: str) -> None:
    """The synchronous call at a point armed only for crash or freeze, e.g. `hit("rejoin.quarantine.intent")`;
    FailpointError when the point is armed with a sleep mode (use `reach`)."""
    _current().hit(name)


def armed() -> dict[str, str]:
    """The armed points, for status and logs."""
    return _current().armed()
