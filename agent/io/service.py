"""The minkms service as the agent sees and drives it: systemd in production, the kmlab supervisor in the lab.

Both implement `ServiceControl`, so the daemon cannot tell them apart. `status` is an observation and never
raises (UNKNOWN with a logged reason when it cannot tell); `stop`/`start`/`restart` are steps of a playbook
and raise ServiceError, with the service manager's own message, when they did not happen within the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Protocol

from agent.core.model import ServiceObs, ServiceState

log = logging.getLogger("kmagent.service")

_MAX_LINE = 1 << 20
_POLL = 0.05  # seconds between status polls while waiting for the lab supervisor to settle
_STDERR_LIMIT = 2000

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

    def __init__(self, unit: str, systemctl: str = "systemctl", timeout: float = 90.0) -> None:
        self.name = unit
        self.systemctl = systemctl
        self.timeout = timeout
        self._reason = _ReasonLog(f"systemd unit {unit}")

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
        return self._reason.known(obs)

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


class LabSupervisor:
    """A program of the kmlab supervisor, over its control socket (one JSON request / reply per line).

    The protocol is implemented here rather than imported: the agent ships without the emulator package.
    """

    def __init__(self, socket: Path, program: str, timeout: float = 30.0) -> None:
        self.socket = Path(socket)
        self.name = program
        self.timeout = timeout
        self._reason = _ReasonLog(f"lab program {program}")

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
        return self._reason.known(obs)

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
