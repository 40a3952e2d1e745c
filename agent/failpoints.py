"""Failpoints: kill the agent at a named journaled step, so that tests can prove crash recovery (DESIGN §8).

`KMAGENT_FAILPOINTS="rejoin.quarantine.intent=crash,fence=crash-once"` arms points by name:

* `<kind>.<step>.intent` fires right after the step's intent is journaled, before the step runs;
* `<kind>.<step>.outcome` fires after the step ran, before its outcome is journaled;
* a bare `<step>` is an alias for `<kind>.<step>.intent` of every kind.

`crash` sends SIGKILL to the agent itself at once: no cleanup, no buffered output flushed, no `finally` blocks,
exactly what a real crash leaves. `crash-once` does so only the first time: it leaves a marker file in the
directory named by `KMAGENT_FAILPOINTS_DIR`, so that the restarted agent passes the point.

The variable is parsed and checked once, at start (`load`): a typo must refuse the start with a clear message,
not kill the agent at a random later moment, and not silently arm nothing (a test would then pass vacuously).
Names are case-insensitive; kinds must be action kinds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from agent.core.messages import ACTION_KINDS
from agent.io import logs

__all__ = ["DIR_ENV", "ENV", "FailpointError", "Failpoints", "armed", "hit", "load", "parse"]

ENV = "KMAGENT_FAILPOINTS"
DIR_ENV = "KMAGENT_FAILPOINTS_DIR"

Mode = Literal["crash", "crash-once"]
MODES: tuple[Mode, ...] = ("crash", "crash-once")
PHASES = ("intent", "outcome")
_KINDS = tuple(k.lower() for k in ACTION_KINDS)
_STEP = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")

log = logging.getLogger(__name__)


class FailpointError(ValueError):
    """KMAGENT_FAILPOINTS (or its directory) is not valid; the message names the entry and the problem."""


def parse(text: str) -> dict[str, Mode]:
    """`name=mode,...` as {name: mode}, names in lower case; FailpointError naming the bad entry."""
    points: dict[str, Mode] = {}
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
        if mode not in MODES:
            raise FailpointError(
                f"{ENV}: entry {number} {name!r}: unknown mode {mode[:40]!r}, expected one of {', '.join(MODES)}"
            )
        if name in points:
            raise FailpointError(f"{ENV}: {name!r} is given twice")
        points[name] = "crash" if mode == "crash" else "crash-once"
    return points


def _name_problem(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) == 1:
        return None if _STEP.match(name) else "a step name is letters, digits, '-' and '_'"
    if len(parts) != 3:
        return "expected <kind>.<step>.intent, <kind>.<step>.outcome or a bare <step>"
    kind, step, phase = parts
    if kind not in _KINDS:
        return f"unknown action kind {kind!r}, expected one of {', '.join(_KINDS)}"
    if not _STEP.match(step):
        return f"bad step name {step!r}: letters, digits, '-' and '_'"
    if phase not in PHASES:
        return f"unknown phase {phase!r}, expected intent or outcome"
    return None


class Failpoints:
    """The armed points of one agent process."""

    def __init__(self, points: Mapping[str, Mode], once_dir: Path | None = None) -> None:
        if once_dir is None and "crash-once" in points.values():
            raise FailpointError(f"{ENV}: crash-once needs {DIR_ENV}, a directory for its markers")
        if once_dir is not None and "crash-once" in points.values() and not once_dir.is_dir():
            raise FailpointError(f"{DIR_ENV}: {once_dir} is not a directory")
        self.points = dict(points)
        self.once_dir = once_dir

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Failpoints:
        once = environ.get(DIR_ENV)
        return cls(parse(environ.get(ENV, "")), Path(once) if once else None)

    def armed(self) -> dict[str, str]:
        return dict(self.points)

    def describe(self) -> str:
        return ",".join(f"{name}={mode}" for name, mode in self.points.items())

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
        """Crash here when `name` is armed (and, for crash-once, has not crashed yet)."""
        entry = self.match(name)
        if entry is None:
            return
        if self.points[entry] == "crash-once":
            assert self.once_dir is not None
            marker = self.once_dir / f"{entry}.crashed"
            try:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except FileExistsError:
                return  # crashed here once already: pass
        _die(f"kmagent: failpoint {entry} at {name}: crash (SIGKILL)\n")


def _die(message: str) -> None:
    """A real crash: one unbuffered line for the test's logs, then SIGKILL (nothing else runs)."""
    with contextlib.suppress(OSError):
        os.write(2, message.encode())
    os.kill(os.getpid(), signal.SIGKILL)


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


def hit(name: str) -> None:
    """The executor's call at each journaled point, e.g. `hit("rejoin.quarantine.intent")`."""
    _current().hit(name)


def armed() -> dict[str, str]:
    """The armed points, for status and logs."""
    return _current().armed()
