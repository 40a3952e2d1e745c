"""The minkms service as the agent sees and drives it: systemd in production, the kmlab supervisor in the lab.

Both implement `ServiceControl`, so the daemon cannot tell them apart. `status` is an observation and never
raises (UNKNOWN with a logged reason when it cannot tell); `stop`/`start`/`restart` are steps of a playbook
and raise ServiceError, with the service manager's own message, when they did not happen within the timeout.

`status` also carries why the unit last failed (`ServiceObs.last_error`): the tail of the unit's journal, or of
the lab program's log. That text may hold secrets (minkms prints the root API key at every start when no admin
identity is set), so it is redacted (`redact`) and capped before it leaves this module, and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from agent.core.model import ServiceObs, ServiceState

log = logging.getLogger("kmagent.service")

_MAX_LINE = 1 << 20
_POLL = 0.05  # seconds between status polls while waiting for the lab supervisor to settle
_STDERR_LIMIT = 2000

# The last failure's text (ServiceObs.last_error): how much is read, and how much is kept.
_ERROR_READ_BYTES = 64 * 1024  # at most this much of the journal's output or the log's tail is read
_ERROR_LINES = 30  # journalctl -n, and the lines kept
_ERROR_LINE_CHARS = 400
_ERROR_CHARS = 4000
_JOURNAL_TIMEOUT = 5.0  # journalctl must answer within this, or the text is unknown (None)
# Seconds before the text of a stopped or failed unit whose status did not move is read again.
_ERROR_REFRESH = 10.0

# Secrets that minkms or its environment can print, redacted wherever they appear in the text.
_SECRETS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
        ),
        "<private key redacted>",
    ),
    (re.compile(r"\b(k[0-9]):[A-Za-z0-9_\-+/=]+"), r"\1:<redacted>"),  # API keys: the k1: root key, k2:
    # HSM keys; not the banner's `hsm:minio:soft`, which names the kind of HSM.
    (re.compile(r"\bhsm:(\w+):(?!soft(?![A-Za-z0-9_\-+/=]))[A-Za-z0-9_\-+/=]+"), r"hsm:\1:<redacted>"),
    (re.compile(r"\b(MINIO_KMS_[A-Z_]*KEY|MINIO_HSM_KMS_KEY)=\S*"), r"\1=<redacted>"),
    (re.compile(r"(?i)\b(password|passwd|secret|token)\b(\s*[=:]\s*)\S+"), r"\1\2<redacted>"),
)

# systemd ActiveState -> ServiceState. "reloading"/"refreshing" still serve; "maintenance" (systemctl clean)
# does not say whether minkms will be back, so it is not guessed at.
_SYSTEMD_STATES: dict[str, ServiceState] = {
    "active": ServiceState.ACTIVE,
    "reloading": ServiceState.ACTIVE,
    "refreshing": ServiceState.ACTIVE,
    "activating": ServiceState.ACTIVATING,
    "deactivating": ServiceState.DEACTIVATING,
    "inactive": ServiceState.INACTIVE,
    "failed": ServiceState.FAILED,
}
_LAB_STATES: dict[str, ServiceState] = {
    "active": ServiceState.ACTIVE,
    "activating": ServiceState.ACTIVATING,
    "inactive": ServiceState.INACTIVE,
    "failed": ServiceState.FAILED,
}


class ServiceError(Exception):
    """A stop/start/restart that failed or timed out; the message carries the service manager's reason."""


class ServiceControl(Protocol):
    """What the daemon needs from a service manager for the local minkms."""

    name: str

    async def status(self) -> ServiceObs:
        """Never raises: state UNKNOWN (and a logged reason) when it cannot tell."""
        ...

    async def stop(self) -> None:
        """Returns once the service is stopped; raises ServiceError otherwise."""
        ...

    async def start(self) -> None:
        """Returns once the service is started; raises ServiceError otherwise."""
        ...

    async def restart(self) -> None:
        """Stop then start, as one request to the service manager; raises ServiceError otherwise."""
        ...


def redact(text: str) -> str:
    """`text` with every secret it may hold replaced: API keys (`k1:…`), HSM keys (`hsm:aes256:…`), key
    variables (`MINIO_KMS_HSM_KEY=…`), private-key blocks, and `password=`/`token:`-style values."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def error_text(text: str, *, partial_first: bool = False, partial_last: bool = False) -> str | None:
    """Output of the service manager, made fit for `ServiceObs.last_error`: redacted, the last lines only, each
    line and the whole capped; None when nothing is left. `partial_first`/`partial_last`: the text was cut from
    a longer one at that end, so that line is a fragment (a fragment of a key would escape `redact`) and is
    dropped."""
    lines = text.splitlines()
    if partial_first and lines:
        lines = lines[1:]
    if partial_last and lines and not text.endswith("\n"):
        lines = lines[:-1]
    kept = [redact(line).rstrip() for line in lines]
    kept = [line if len(line) <= _ERROR_LINE_CHARS else line[:_ERROR_LINE_CHARS] + "..." for line in kept]
    kept = [line for line in kept if line.strip()][-_ERROR_LINES:]
    out = "\n".join(kept)
    while len(out) > _ERROR_CHARS and "\n" in out:  # drop the oldest lines first: the newest decide
        out = out.split("\n", 1)[1]
    return out[-_ERROR_CHARS:] or None


class _LastError:
    """When `status` reads the last failure's text, and the text last read.

    A service that runs costs nothing: no read while it is active, except once when its restart counter moved
    since the previous status (it restarted in between: a crash loop whose down time fell between two probes).
    A service that is not active (stopped, failed, waiting to restart) is read whenever its state or counter
    moves, and at most every _ERROR_REFRESH seconds while they stand still (its journal can lag the exit). The
    text read is kept while the service runs again after restarts, and dropped when the counter is back at 0.
    """

    def __init__(self) -> None:
        self.seen: int | None = None  # the restart counter at the previous status
        self.key: tuple[ServiceState, int] | None = None  # state and counter at the last read
        self.read_at = 0.0
        self.text: str | None = None

    def due(self, obs: ServiceObs, now: float) -> bool:
        seen, self.seen = self.seen, obs.restarts
        if obs.state is ServiceState.ACTIVE:
            if obs.restarts == 0:
                self.key, self.text = None, None
                return False
            return seen is not None and seen != obs.restarts and self.key != (obs.state, obs.restarts)
        return (obs.state, obs.restarts) != self.key or now - self.read_at >= _ERROR_REFRESH

    def store(self, obs: ServiceObs, now: float, text: str | None) -> None:
        self.key, self.read_at, self.text = (obs.state, obs.restarts), now, text


async def _capture(argv: list[str], timeout: float, limit: int) -> tuple[int | None, bytes, bool]:
    """Run argv in its own session and read at most `limit` bytes of its stdout within `timeout`.

    (exit code, output, truncated); the exit code is None when it had to be killed. Never hangs: on a timeout
    or a full buffer the process group is killed. OSError when it cannot be started."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size, truncated, rc = 0, False, None
    try:
        async with asyncio.timeout(timeout):
            while size < limit:
                chunk = await proc.stdout.read(limit - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            else:
                truncated = True
            if not truncated:
                rc = await proc.wait()
    except TimeoutError:
        truncated = True
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    return rc, b"".join(chunks), truncated


class _ReasonLog:
    """Logs why status is UNKNOWN when the reason changes, not once per probe interval."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last: str | None = None

    def unknown(self, reason: str) -> ServiceObs:
        if reason != self.last:
            log.warning("%s: status unknown: %s", self.what, reason)
            self.last = reason
        return ServiceObs(state=ServiceState.UNKNOWN)

    def known(self, obs: ServiceObs) -> ServiceObs:
        if self.last is not None:
            log.info("%s: status readable again (%s)", self.what, obs.state.value)
            self.last = None
        return obs


# ------------------------------------------------------------------------------------------------ systemd


def _int(value: str | None) -> int | None:
    """systemd prints "[not set]" or nothing for unset numbers; those are unknown, not zero."""
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def parse_show(text: str) -> ServiceObs:
    """Parse `systemctl show --property=...` output (key=value lines); tolerant of unknown or missing keys.

    A unit that systemd does not know (LoadState=not-found) reads as UNKNOWN, not as a stopped service.
    """
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    if props.get("LoadState") == "not-found":
        return ServiceObs(state=ServiceState.UNKNOWN)
    state = _SYSTEMD_STATES.get(props.get("ActiveState", ""), ServiceState.UNKNOWN)
    restarts = _int(props.get("NRestarts"))
    pid = _int(props.get("MainPID"))
    return ServiceObs(
        state=state,
        restarts=restarts if restarts is not None and restarts >= 0 else 0,
        main_pid=pid if pid is not None and pid > 0 else None,
    )


class Systemd:
    """The minkms unit through `systemctl` (a subprocess per call: no D-Bus dependency to ship)."""

    def __init__(
        self,
        unit: str,
        systemctl: str = "systemctl",
        timeout: float = 90.0,
        journalctl: str = "journalctl",
        journal_timeout: float = _JOURNAL_TIMEOUT,
    ) -> None:
        self.name = unit
        self.systemctl = systemctl
        self.timeout = timeout
        self.journalctl = journalctl
        self.journal_timeout = journal_timeout
        self._reason = _ReasonLog(f"systemd unit {unit}")
        self._last_error = _LastError()
        self._journal_problem: str | None = None

    async def _run(self, *args: str) -> tuple[int, str, str]:
        """Run systemctl in its own session, so a timeout can kill it and anything it started."""
        argv = [self.systemctl, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceError(f"cannot run {' '.join(argv)}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
            if isinstance(exc, TimeoutError):
                raise ServiceError(f"{' '.join(argv)} did not finish within {self.timeout:g}s") from None
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    async def status(self) -> ServiceObs:
        props = "--property=LoadState,ActiveState,SubState,NRestarts,MainPID"
        try:
            rc, out, err = await self._run("show", self.name, props, "--no-pager")
        except ServiceError as exc:
            return self._reason.unknown(str(exc))
        if rc != 0:
            return self._reason.unknown(f"systemctl show exited with {rc}: {_brief(err)}")
        obs = parse_show(out)
        if obs.state is ServiceState.UNKNOWN:
            return self._reason.unknown(f"unreadable systemctl show output: {_brief(out)}")
        now = time.monotonic()
        if self._last_error.due(obs, now):
            self._last_error.store(obs, now, await self.last_error())
        return self._reason.known(replace(obs, last_error=self._last_error.text))

    async def last_error(self) -> str | None:
        """The unit's last journal lines (`journalctl -u UNIT -n 30 -o cat`), redacted and capped; None when
        the journal cannot be read in time. Never raises, never logs the text itself."""
        argv = [self.journalctl, "-u", self.name, "-n", str(_ERROR_LINES), "-o", "cat", "--no-pager", "-q"]
        try:
            rc, out, truncated = await _capture(argv, self.journal_timeout, _ERROR_READ_BYTES)
        except OSError as exc:
            return self._journal_unreadable(f"cannot run {self.journalctl}: {exc.strerror or exc}")
        if rc is None and not out:
            return self._journal_unreadable(f"journalctl gave nothing within {self.journal_timeout:g}s")
        if rc not in (0, None):
            return self._journal_unreadable(f"journalctl exited with {rc}")
        self._journal_problem = None
        return error_text(out.decode(errors="replace"), partial_last=truncated)

    def _journal_unreadable(self, problem: str) -> str | None:
        if problem != self._journal_problem:
            log.info("systemd unit %s: the journal cannot be read: %s", self.name, problem)
            self._journal_problem = problem
        return None

    async def _control(self, verb: str) -> None:
        rc, _out, err = await self._run(verb, self.name)
        if rc != 0:
            raise ServiceError(f"systemctl {verb} {self.name} failed (exit {rc}): {_brief(err)}")
        log.info("systemctl %s %s: done", verb, self.name)

    async def stop(self) -> None:
        await self._control("stop")

    async def start(self) -> None:
        # A start refused by ExecStartPre (the preflight) counts as a failure towards the unit's start limit; an
        # explicit start by the agent (a certified REJOIN step) must not be blocked by that count.
        await self._run("reset-failed", self.name)
        await self._control("start")

    async def restart(self) -> None:
        await self._control("restart")


def _brief(text: str) -> str:
    text = text.strip()
    if not text:
        return "(no message)"
    return text if len(text) <= _STDERR_LIMIT else text[:_STDERR_LIMIT] + "..."


# ------------------------------------------------------------------------------------------ lab supervisor


def _lab_obs(program: Any) -> ServiceObs | None:
    """One program's status from the supervisor; None when it is not the expected shape.

    A pending automatic restart (sub_state "auto-restart") reads as ACTIVATING, which is what systemd's
    ActiveState says in the same situation, so the agent sees the same thing in the lab and in production.
    """
    if not isinstance(program, dict):
        return None
    raw = program.get("state")
    if not isinstance(raw, str):
        return None
    state = _LAB_STATES.get(raw, ServiceState.UNKNOWN)
    if program.get("sub_state") == "auto-restart":
        state = ServiceState.ACTIVATING
    pid = program.get("pid")
    restarts = program.get("n_restarts")
    return ServiceObs(
        state=state,
        restarts=restarts
        if isinstance(restarts, int) and not isinstance(restarts, bool) and restarts >= 0
        else 0,
        main_pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
    )


_LAB_START = "--- kmlab: start "
_LAB_ENDS = ("--- kmlab: main process exited", "--- kmlab: preflight failed", "--- kmlab: cannot start")


def lab_last_error(path: Path) -> str | None:
    """The output of the program's last start attempt that ended, from its kmlab log (the supervisor appends
    the child's stdout and stderr between `--- kmlab: start N` and `--- kmlab: main process exited …`).

    The last ended attempt, not the one running now, so a program that restarted keeps showing why it failed.
    Without an ended attempt, the log's last lines. Redacted and capped; None when the log cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            start = max(0, fh.tell() - _ERROR_READ_BYTES)
            fh.seek(start)
            data = fh.read(_ERROR_READ_BYTES)
    except OSError:
        return None
    lines = data.decode(errors="replace").splitlines()
    partial = start > 0
    ends = [i for i, line in enumerate(lines) if line.startswith(_LAB_ENDS)]
    if ends:
        end = ends[-1]
        starts = [i for i in range(end) if lines[i].startswith(_LAB_START)]
        if starts:
            lines, partial = lines[starts[-1] + 1 : end + 1], False
        else:
            lines = lines[: end + 1]
    return error_text("\n".join(lines), partial_first=partial)


class LabSupervisor:
    """A program of the kmlab supervisor, over its control socket (one JSON request / reply per line).

    The protocol is implemented here rather than imported: the agent ships without the emulator package.
    """

    def __init__(self, socket: Path, program: str, timeout: float = 30.0) -> None:
        self.socket = Path(socket)
        self.name = program
        self.timeout = timeout
        self._reason = _ReasonLog(f"lab program {program}")
        self._last_error = _LastError()

    async def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request on a fresh connection; ServiceError when no well-formed reply came in time."""
        where = f"lab supervisor at {self.socket}"
        try:
            async with asyncio.timeout(timeout):
                try:
                    reader, writer = await asyncio.open_unix_connection(str(self.socket), limit=_MAX_LINE)
                except (FileNotFoundError, ConnectionRefusedError):
                    raise ServiceError(f"{where} is not running (nothing listening there)") from None
                try:
                    writer.write((json.dumps(message) + "\n").encode())
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
        except TimeoutError:
            raise ServiceError(f"no answer from the {where} within {timeout:g}s") from None
        except ServiceError:
            raise
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            raise ServiceError(f"cannot talk to the {where}: {exc}") from None
        if not line:
            raise ServiceError(f"the {where} closed the connection without answering")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ServiceError(f"garbled reply from the {where}") from None
        if not isinstance(reply, dict):
            raise ServiceError(f"garbled reply from the {where}")
        return reply

    def _left(self, deadline: float) -> float:
        """Time left for one request; a status read late in a deadline still gets a fair chance."""
        return max(deadline - time.monotonic(), min(1.0, self.timeout))

    async def _program(self, timeout: float) -> dict[str, Any]:
        """This program's raw status; ServiceError with the supervisor's message when it refuses."""
        reply = await self._request({"op": "status", "name": self.name}, timeout)
        if not reply.get("ok"):
            raise ServiceError(f"lab supervisor: {reply.get('error') or 'status refused'}")
        programs = reply.get("programs")
        program = programs.get(self.name) if isinstance(programs, dict) else None
        if not isinstance(program, dict):
            raise ServiceError(f"lab supervisor: no status for program {self.name!r} in its reply")
        return program

    async def status(self) -> ServiceObs:
        try:
            program = await self._program(self.timeout)
        except ServiceError as exc:
            return self._reason.unknown(str(exc))
        obs = _lab_obs(program)
        if obs is None or obs.state is ServiceState.UNKNOWN:
            return self._reason.unknown(f"unexpected status from the lab supervisor: {program!r}")
        now = time.monotonic()
        if self._last_error.due(obs, now):
            log_path = program.get("log")
            text = (
                await asyncio.to_thread(lab_last_error, Path(log_path)) if isinstance(log_path, str) else None
            )
            self._last_error.store(obs, now, text)
        return self._reason.known(replace(obs, last_error=self._last_error.text))

    async def _op(self, op: str, deadline: float) -> None:
        reply = await self._request({"op": op, "name": self.name}, self._left(deadline))
        if not reply.get("ok"):
            raise ServiceError(f"lab supervisor refused to {op} {self.name}: {reply.get('error') or '?'}")

    async def stop(self) -> None:
        """The supervisor answers a stop once the process group is gone; confirm it, as systemctl does."""
        deadline = time.monotonic() + self.timeout
        await self._op("stop", deadline)
        while True:
            program = await self._program(self._left(deadline))
            if program.get("state") in ("inactive", "failed") and program.get("sub_state") != "auto-restart":
                log.info("lab program %s: stopped", self.name)
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"lab program {self.name} not stopped within {self.timeout:g}s "
                    f"(state {program.get('state')}/{program.get('sub_state')})"
                )
            await asyncio.sleep(_POLL)

    async def start(self) -> None:
        await self._start("start")

    async def restart(self) -> None:
        await self._start("restart")

    async def _start(self, op: str) -> None:
        """Wait for the main process to run, like `systemctl start` of a simple unit; a start attempt that
        ends failed (a refusing preflight, an immediate crash) raises with the supervisor's reason."""
        deadline = time.monotonic() + self.timeout
        before = await self._program(self.timeout)
        starts_before = before.get("n_starts")
        await self._op(op, deadline)
        while True:
            program = await self._program(self._left(deadline))
            state = program.get("state")
            if state == "active":
                log.info("lab program %s: %sed, pid %s", self.name, op, program.get("pid"))
                return
            attempted = not isinstance(starts_before, int) or (
                isinstance(program.get("n_starts"), int) and program["n_starts"] > starts_before
            )
            if state in ("failed", "inactive") and attempted:
                reason = program.get("last_error") or f"ended {state}"
                raise ServiceError(f"lab program {self.name} did not {op}: {reason}")
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"lab program {self.name} not active within {self.timeout:g}s (state {state}"
                    + (f", last error: {program['last_error']}" if program.get("last_error") else "")
                    + ")"
                )
            await asyncio.sleep(_POLL)
