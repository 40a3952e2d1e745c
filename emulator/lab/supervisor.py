"""A small systemd stand-in for the lab: keeps named programs (emulator nodes, agents) running.

kmagent is built to heal nodes that systemd restarts with `Restart=always`; the lab has no systemd, so this
supervisor reproduces the parts the agent can observe: restart policies and delays, NRestarts, ExecStartPre
failures, stop/kill semantics and the active/activating/inactive/failed states. It runs in the background
and is driven over a Unix socket with one JSON object per line, so kmlab and tests can inject faults the
same way an operator would with systemctl.

Spec file::

    {"programs": {"node1": {"argv": ["minkms", "server", ...], "env": {"K": "V"}, "cwd": "/lab/node1",
                            "log": "/lab/node1.log", "restart": "always", "restart_sec": 0.5,
                            "preflight": null}}}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("kmlab.supervisor")

RESTART_POLICIES = ("always", "on-failure", "no")
DEFAULT_RESTART_SEC = 0.1  # systemd's RestartSec default
STOP_TIMEOUT = 5.0  # systemd's TimeoutStopSec is longer, but a lab node that ignores SIGTERM is a bug to see
HISTORY_LEN = 20
MAX_REQUEST_BYTES = 1 << 20
POLL_INTERVAL = 0.05
# Exits by these signals count as clean, as in systemd (they are how a service is normally asked to stop).
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
_PROGRAM_KEYS = frozenset({"argv", "env", "cwd", "log", "restart", "restart_sec", "preflight"})
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL


class SupervisorError(Exception):
    """A request the supervisor refuses, a bad spec, or a supervisor that is not reachable."""


@dataclass(frozen=True)
class ProgramSpec:
    """How to run one program; the JSON form is what spec files and the `add` request carry."""

    argv: tuple[str, ...]
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    restart: str = "always"
    restart_sec: float = DEFAULT_RESTART_SEC
    preflight: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, data: Any, name: str = "program") -> ProgramSpec:
        """Validate strictly: a typo in a lab spec should fail at load time, not as a silent default."""
        where = f"program {name!r}"
        if not isinstance(data, dict):
            raise SupervisorError(f"{where}: must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _PROGRAM_KEYS)
        if unknown:
            raise SupervisorError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_PROGRAM_KEYS))}"
            )
        argv = _argv(data.get("argv"), f"{where}: argv")
        log_path = data.get("log")
        if not isinstance(log_path, str) or not log_path:
            raise SupervisorError(f"{where}: log must be a non-empty path string")
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and k for k in env):
            raise SupervisorError(f"{where}: env must be an object with non-empty string keys")
        for key, value in env.items():
            if not isinstance(value, str) or "=" in key or "\0" in key + value:
                raise SupervisorError(f"{where}: env[{key!r}] must be a string (and the name has no '=')")
        cwd = data.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd):
            raise SupervisorError(f"{where}: cwd must be a non-empty path string or null")
        restart = data.get("restart", "always")
        if restart not in RESTART_POLICIES:
            raise SupervisorError(f"{where}: restart must be one of {', '.join(RESTART_POLICIES)}")
        restart_sec = data.get("restart_sec", DEFAULT_RESTART_SEC)
        if (
            isinstance(restart_sec, bool)
            or not isinstance(restart_sec, int | float)
            or not math.isfinite(restart_sec)
            or restart_sec < 0
        ):
            raise SupervisorError(f"{where}: restart_sec must be a number >= 0")
        preflight = data.get("preflight")
        return cls(
            argv=argv,
            log=Path(log_path),
            env=dict(env),
            cwd=Path(cwd) if cwd is not None else None,
            restart=restart,
            restart_sec=float(restart_sec),
            preflight=None if preflight is None else _argv(preflight, f"{where}: preflight"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": None if self.cwd is None else str(self.cwd),
            "log": str(self.log),
            "restart": self.restart,
            "restart_sec": self.restart_sec,
            "preflight": None if self.preflight is None else list(self.preflight),
        }


def load_spec(path: Path) -> dict[str, ProgramSpec]:
    """Read a spec file; keys other than "programs" are ignored so kmlab can keep metadata next to it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SupervisorError(f"cannot read spec {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SupervisorError(f"spec {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("programs"), dict):
        raise SupervisorError(f'spec {path} must be an object with a "programs" object')
    programs = data["programs"]
    for name in programs:
        _check_name(name)
    return {name: ProgramSpec.from_json(program, name) for name, program in programs.items()}


@dataclass(eq=False)
class _Program:
    """Runtime record of one program: what systemd would report for a unit."""

    name: str
    spec: ProgramSpec
    state: str = "inactive"
    sub_state: str = "dead"
    proc: asyncio.subprocess.Process | None = None  # the current child: preflight or main process
    main_pid: int | None = None
    n_restarts: int = 0
    n_starts: int = 0
    flush_n_restarts: bool = False
    escalated: bool = False
    last_exit_code: int | None = None
    last_exit_signal: str | None = None
    last_start_monotonic: float | None = None
    last_start_wall: float | None = None
    last_error: str | None = None
    history: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    runner: asyncio.Task[None] | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "sub_state": self.sub_state,
            "pid": self.main_pid,  # the main process, like systemd's MainPID
            "n_restarts": self.n_restarts,
            "n_starts": self.n_starts,
            "restart": self.spec.restart,
            "restart_sec": self.spec.restart_sec,
            "last_exit_code": self.last_exit_code,
            "last_exit_signal": self.last_exit_signal,
            "last_start_monotonic": self.last_start_monotonic,
            "last_start_wall": self.last_start_wall,
            "last_start": None if self.last_start_wall is None else _iso(self.last_start_wall),
            "last_error": self.last_error,
            # Return codes use subprocess's convention: -N means killed by signal N.
            "history": [[wall, rc] for wall, rc in self.history],
            "argv": list(self.spec.argv),
            "log": str(self.spec.log),
        }


class Supervisor:
    """Runs programs with systemd-like restart semantics; all methods must be called on one event loop.

    `n_restarts` counts automatic restarts since the last manual start, like systemd's NRestarts: it stays
    readable after a stop and is reset by the next `start`/`restart`. While a restart is pending the state is
    "failed" (or "inactive" after a clean exit) with sub_state "auto-restart", so a crash is observable.
    """

    def __init__(
        self, programs: Mapping[str, ProgramSpec] | None = None, *, stop_timeout: float = STOP_TIMEOUT
    ) -> None:
        self.stop_timeout = stop_timeout
        self._programs: dict[str, _Program] = {}
        for name, spec in (programs or {}).items():
            _check_name(name)
            self._programs[name] = _Program(name, spec)
        self._closing = False
        self.closed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._socket_path: Path | None = None
        self._socket_id: tuple[int, int] | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_spec_file(cls, path: Path, *, stop_timeout: float = STOP_TIMEOUT) -> Supervisor:
        return cls(load_spec(path), stop_timeout=stop_timeout)

    @property
    def names(self) -> list[str]:
        return list(self._programs)

    # ----------------------------------------------------------------------------------------- operations

    async def start_all(self) -> None:
        for name in list(self._programs):
            await self.start(name)

    async def start(self, name: str) -> None:
        """Like `systemctl start`: a no-op when running or when an automatic restart is already pending."""
        self._check_open()
        prog = self._get(name)
        async with prog.lock:
            self._check_open()
            self._check_current(prog)
            self._start_locked(prog)

    async def stop(self, name: str) -> None:
        """Like `systemctl stop`: TERM the process group, KILL after stop_timeout; stays down until start."""
        prog = self._get(name)
        async with prog.lock:
            await self._stop_locked(prog)

    async def restart(self, name: str) -> None:
        """Like `systemctl restart`: a manual stop and start, so n_restarts starts again from zero."""
        self._check_open()
        prog = self._get(name)
        async with prog.lock:
            self._check_current(prog)
            await self._stop_locked(prog)
            self._check_open()
            self._start_locked(prog)

    async def kill(self, name: str, sig: int | str = "TERM", whom: str = "all") -> None:
        """Like `systemctl kill`: signal the running process (its whole group unless whom="main") and let
        the restart policy decide what happens next."""
        self._check_open()
        prog = self._get(name)
        signum = parse_signal(sig)
        if whom not in ("all", "main"):
            raise SupervisorError(f'whom must be "all" or "main", not {whom!r}')
        proc = prog.proc
        if proc is None or proc.returncode is not None:
            raise SupervisorError(f"program {name!r} has no running process (state {prog.state})")
        try:
            if whom == "all":
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)
        except ProcessLookupError:
            raise SupervisorError(f"program {name!r} exited before it could be signalled") from None

    async def add(self, name: str, program: ProgramSpec | Mapping[str, Any]) -> None:
        """Add and start a program at run time (an agent joining the lab, say)."""
        self._check_open()
        _check_name(name)
        if name in self._programs:
            raise SupervisorError(f"program {name!r} already exists; remove it first")
        spec = program if isinstance(program, ProgramSpec) else ProgramSpec.from_json(dict(program), name)
        self._programs[name] = _Program(name, spec)
        await self.start(name)

    async def remove(self, name: str) -> None:
        """Stop a program and forget it."""
        prog = self._get(name)
        async with prog.lock:
            await self._stop_locked(prog)
            if self._programs.get(name) is prog:
                del self._programs[name]

    def status(self, name: str | None = None) -> dict[str, Any]:
        """One program's status, or a mapping name -> status of all of them."""
        if name is None:
            return {n: p.status() for n, p in self._programs.items()}
        return self._get(name).status()

    async def shutdown(self) -> None:
        """Stop everything, including any process left in a child's process group; idempotent."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        try:
            results = await asyncio.gather(
                *(self._stop_program(p) for p in list(self._programs.values())), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.error("error while stopping a program: %r", result)
        finally:
            self.closed.set()

    async def _stop_program(self, prog: _Program) -> None:
        async with prog.lock:
            await self._stop_locked(prog)

    def _start_locked(self, prog: _Program) -> None:
        if prog.runner is not None and not prog.runner.done():
            return
        if prog.flush_n_restarts:
            prog.n_restarts = 0
            prog.flush_n_restarts = False
        prog.stop_requested.clear()
        prog.state, prog.sub_state = "activating", "start"
        prog.runner = asyncio.create_task(self._run(prog), name=f"kmlab-supervisor:{prog.name}")

    async def _stop_locked(self, prog: _Program) -> None:
        prog.stop_requested.set()
        if prog.runner is not None and not prog.runner.done():
            # Shielded: a cancelled caller (a client that went away) must not abort the stop halfway.
            await asyncio.shield(prog.runner)

    def _get(self, name: Any) -> _Program:
        if not isinstance(name, str):
            raise SupervisorError(f'"name" must be a string, got {type(name).__name__}')
        try:
            return self._programs[name]
        except KeyError:
            known = ", ".join(sorted(self._programs)) or "none"
            raise SupervisorError(f"unknown program {name!r} (known: {known})") from None

    def _check_current(self, prog: _Program) -> None:
        """A start queued behind a remove must not resurrect a program nobody can stop any more."""
        if self._programs.get(prog.name) is not prog:
            raise SupervisorError(f"program {prog.name!r} was removed")

    def _check_open(self) -> None:
        if self._closing:
            raise SupervisorError("supervisor is shutting down")

    # -------------------------------------------------------------------------------------- the run loop

    async def _run(self, prog: _Program) -> None:
        """Start, wait, and restart per policy until stopped; never raises, so one program can't take
        the supervisor down."""
        try:
            while True:
                success = await self._start_once(prog)
                end = "inactive" if success else "failed"
                if prog.stop_requested.is_set() or not _should_restart(prog.spec.restart, success):
                    prog.state, prog.sub_state = end, "dead" if success else "failed"
                    break
                prog.state, prog.sub_state = end, "auto-restart"
                log.info(
                    "%s: %s, restarting in %gs", prog.name, prog.last_error or end, prog.spec.restart_sec
                )
                if await _wait_event(prog.stop_requested, prog.spec.restart_sec):
                    prog.state, prog.sub_state = "inactive", "dead"
                    break
                prog.n_restarts += 1
        except asyncio.CancelledError:
            prog.state, prog.sub_state = "failed", "failed"
            raise
        except Exception as exc:
            log.exception("%s: supervisor bug while running the program", prog.name)
            prog.last_error = f"supervisor error: {type(exc).__name__}: {exc}"
            prog.state, prog.sub_state = "failed", "failed"
        finally:
            prog.proc = None
            prog.main_pid = None
            # Keep the counter readable until the next manual start, as systemd does.
            prog.flush_n_restarts = True

    async def _start_once(self, prog: _Program) -> bool:
        """One start attempt (preflight, then the main process until it exits); True if it ended cleanly."""
        if prog.stop_requested.is_set():
            return True
        prog.n_starts += 1
        prog.escalated = False
        prog.last_error = None
        prog.state = "activating"
        spec = prog.spec
        try:
            fd = _open_log(spec.log)
        except OSError as exc:
            prog.last_error = f"cannot open log {spec.log}: {exc.strerror or exc}"
            return False
        try:
            _log_line(fd, f"--- kmlab: start {prog.n_starts} at {_iso(time.time())} ---")
            env = {**os.environ, **spec.env}
            if spec.preflight is not None:
                prog.sub_state = "start-pre"
                rc = await self._spawn_and_wait(prog, spec.preflight, fd, env, main=False)
                if rc is None:
                    return False
                if rc != 0:  # as systemd's ExecStartPre: no main process; the restart policy retries
                    prog.last_error = f"preflight failed with {_describe(rc)}; its reason is in {spec.log}"
                    _log_line(fd, f"--- kmlab: preflight failed with {_describe(rc)}: start refused ---")
                    return False
                if prog.stop_requested.is_set():
                    return True
            prog.sub_state = "start"
            rc = await self._spawn_and_wait(prog, spec.argv, fd, env, main=True)
            if rc is None:
                return False
            _log_line(fd, f"--- kmlab: main process exited with {_describe(rc)} at {_iso(time.time())} ---")
            if prog.escalated:
                prog.last_error = f"did not stop within {self.stop_timeout:g}s of SIGTERM; killed"
                return False
            if not _clean_exit(rc):
                prog.last_error = f"main process exited with {_describe(rc)}"
                return False
            return True
        finally:
            os.close(fd)

    async def _spawn_and_wait(
        self, prog: _Program, argv: tuple[str, ...], fd: int, env: dict[str, str], *, main: bool
    ) -> int | None:
        """Run one child in its own session until it exits or a stop is requested; None if it never ran."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd=prog.spec.cwd,
                env=env,
                start_new_session=True,  # a signal aimed at the supervisor must not reach the children
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            what = "main process" if main else "preflight"
            prog.last_error = f"cannot start {what} {argv[0]!r}: {exc}"
            _log_line(fd, f"--- kmlab: {prog.last_error} ---")
            return None
        prog.proc = proc
        if main:
            prog.main_pid = proc.pid
            prog.last_start_monotonic, prog.last_start_wall = time.monotonic(), time.time()
            prog.state, prog.sub_state = "active", "running"
        try:
            rc = await self._wait_or_stop(prog, proc)
        except BaseException:
            # Cancelled (loop torn down without shutdown()) or a bug: never leave the child behind.
            _signal_group(proc, signal.SIGKILL)
            raise
        finally:
            prog.proc = None
            if main:
                prog.main_pid = None
        if main:
            prog.last_exit_code = rc if rc >= 0 else None
            prog.last_exit_signal = _signame(-rc) if rc < 0 else None
            prog.history.append((time.time(), rc))
        # What the main process left behind in its group goes too (systemd's KillMode=control-group).
        await self._reap_group(proc.pid)
        return rc

    async def _wait_or_stop(self, prog: _Program, proc: asyncio.subprocess.Process) -> int:
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(prog.stop_requested.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                prog.sub_state = "stop-sigterm"
                _signal_group(proc, signal.SIGTERM)
                done, _ = await asyncio.wait({waiter}, timeout=self.stop_timeout)
                if not done:
                    prog.sub_state = "stop-sigkill"
                    prog.escalated = True
                    _signal_group(proc, signal.SIGKILL)
            return await waiter
        finally:
            stopper.cancel()
            if not waiter.done():
                waiter.cancel()

    async def _reap_group(self, pgid: int) -> None:
        if not _group_alive(pgid):
            return
        _killpg(pgid, signal.SIGTERM)
        if await _wait_until(lambda: not _group_alive(pgid), self.stop_timeout):
            return
        _killpg(pgid, signal.SIGKILL)
        if not await _wait_until(lambda: not _group_alive(pgid), self.stop_timeout):
            log.error("process group %d survived SIGKILL", pgid)

    # ------------------------------------------------------------------------------------ control socket

    async def handle(self, message: Any) -> dict[str, Any]:
        """Answer one control request; every failure becomes {"ok": false, "error": ...}, never an exception."""
        try:
            return await self._dispatch(message)
        except SupervisorError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("internal error handling %r", message)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    async def _dispatch(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            raise SupervisorError('a request must be a JSON object such as {"op": "status"}')
        op = message.get("op")
        if not isinstance(op, str) or op not in _OPS:
            raise SupervisorError(f'"op" must be one of {", ".join(sorted(_OPS))}; got {op!r}')
        unknown = sorted(set(message) - _OPS[op] - {"op"})
        if unknown:
            allowed = ", ".join(sorted(_OPS[op])) or "nothing else"
            raise SupervisorError(f"unexpected field(s) for {op}: {', '.join(unknown)} (allowed: {allowed})")
        name = message.get("name")
        if op == "status":
            if name is None:
                return {"ok": True, "pid": os.getpid(), "programs": self.status()}
            return {"ok": True, "pid": os.getpid(), "programs": {name: self._get(name).status()}}
        if op == "shutdown":
            await self.shutdown()
            return {"ok": True}
        if "name" not in message:
            raise SupervisorError(f'{op} needs a "name"')
        if not isinstance(name, str):
            raise SupervisorError(f'"name" must be a string, got {type(name).__name__}')
        if op == "start":
            await self.start(name)
        elif op == "stop":
            await self.stop(name)
        elif op == "restart":
            await self.restart(name)
        elif op == "kill":
            sig = message.get("signal", "TERM")
            whom = message.get("whom", "all")
            if not isinstance(whom, str):
                raise SupervisorError('"whom" must be "all" or "main"')
            await self.kill(name, sig, whom)
        elif op == "add":
            program = message.get("program")
            if not isinstance(program, dict):
                raise SupervisorError('add needs a "program" object')
            await self.add(name, program)
        elif op == "remove":
            await self.remove(name)
            return {"ok": True}
        return {"ok": True, "program": self._get(name).status()}

    async def serve(self, socket_path: Path) -> asyncio.AbstractServer:
        """Listen for control requests; refuses to steal the socket of a supervisor that is still alive."""
        path = Path(socket_path)
        _claim_socket_path(path)
        server = await asyncio.start_unix_server(
            self._serve_connection, path=str(path), limit=MAX_REQUEST_BYTES
        )
        self._server, self._socket_path, self._socket_id = server, path, _restrict_socket(path)
        return server

    async def close_server(self, grace: float = 2.0) -> None:
        """Stop listening, let in-flight answers (the shutdown reply) go out, then remove the socket."""
        if self._server is not None:
            self._server.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
        if self._socket_path is not None and self._socket_id is not None:
            with contextlib.suppress(OSError):
                st = self._socket_path.stat()
                if (st.st_dev, st.st_ino) == self._socket_id:  # not a successor's socket
                    self._socket_path.unlink()
        self._server = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    await _send(
                        writer, {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}
                    )
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    response: dict[str, Any] = {"ok": False, "error": f"request is not valid JSON: {exc}"}
                else:
                    response = await self.handle(message)
                await _send(writer, response)
                if self._closing and self.closed.is_set():
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# Allowed request fields per op, besides "op" itself.
_OPS: dict[str, frozenset[str]] = {
    "status": frozenset({"name"}),
    "start": frozenset({"name"}),
    "stop": frozenset({"name"}),
    "restart": frozenset({"name"}),
    "kill": frozenset({"name", "signal", "whom"}),
    "add": frozenset({"name", "program"}),
    "remove": frozenset({"name"}),
    "shutdown": frozenset(),
}


# ------------------------------------------------------------------------------------------------ helpers


def parse_signal(value: Any) -> signal.Signals:
    """Accept what people type: "KILL", "SIGKILL", "kill", 9 or "9"."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SupervisorError(f'"signal" must be a name like "KILL" or a number, got {value!r}')
    try:
        if isinstance(value, int) or value.strip().isdigit():
            return signal.Signals(int(value))
        text = value.strip().upper()
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise SupervisorError(f"unknown signal {value!r}") from None


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SupervisorError(
            f"invalid program name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ : - (starting alphanumeric)"
        )


def _argv(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise SupervisorError(f"{where} must be a non-empty list of strings")
    if not value[0] or any("\0" in a for a in value):
        raise SupervisorError(f"{where}: empty program or NUL byte in an argument")
    return tuple(value)


def _should_restart(policy: str, success: bool) -> bool:
    return policy == "always" or (policy == "on-failure" and not success)


def _clean_exit(rc: int) -> bool:
    return rc == 0 or (rc < 0 and -rc in CLEAN_SIGNALS)


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        return str(signum)


def _describe(rc: int) -> str:
    return f"signal {_signame(-rc)}" if rc < 0 else f"code {rc}"


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="milliseconds")


def _open_log(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_APPEND: several writers (preflight, main, leftovers of a previous start) never clobber each other.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _log_line(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):  # a full disk must not stop supervision
        os.write(fd, (text + "\n").encode())


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Signal the child's process group (it is its own group leader), or just the child if the group is gone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def _group_alive(pgid: int) -> bool:
    """True while a non-zombie process is in the group; zombies can linger when PID 1 does not reap."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # the pgid now belongs to someone else's processes
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


async def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL)
    return True


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to timeout for event; True if it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a killed supervisor, but never one a live supervisor listens on."""
    if len(os.fsencode(str(path))) > _SUN_PATH_MAX:
        raise SupervisorError(f"socket path {path} is longer than {_SUN_PATH_MAX} bytes")
    if path.exists() or path.is_symlink():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()
            else:
                raise SupervisorError(f"another supervisor is already listening on {path}")
    path.parent.mkdir(parents=True, exist_ok=True)


def _restrict_socket(path: Path) -> tuple[int, int]:
    """Owner only (whoever can connect can kill the lab); returns its identity for a safe unlink later."""
    os.chmod(path, 0o600)
    st = path.stat()
    return st.st_dev, st.st_ino


async def _send(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    writer.write((json.dumps(response, default=str) + "\n").encode())
    await writer.drain()


# ------------------------------------------------------------------------------------------------- client


def request(socket_path: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply; raises SupervisorError only when no reply could be had."""
    deadline = time.monotonic() + timeout
    try:
        data = (json.dumps(message) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise SupervisorError(f"request is not JSON-serialisable: {exc}") from None
    buf = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise SupervisorError(f"supervisor is not running (nothing listening on {socket_path})") from None
        except OSError as exc:
            raise SupervisorError(f"cannot reach the supervisor at {socket_path}: {exc}") from None
        try:
            sock.sendall(data)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise SupervisorError(
                        f"supervisor at {socket_path} closed the connection without answering"
                    )
                buf += chunk
        except TimeoutError:
            raise SupervisorError(
                f"no answer from the supervisor at {socket_path} within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise SupervisorError(f"lost the connection to the supervisor at {socket_path}: {exc}") from None
    try:
        reply = json.loads(bytes(buf).split(b"\n", 1)[0])
    except ValueError:
        raise SupervisorError(f"garbled reply from the supervisor at {socket_path}") from None
    if not isinstance(reply, dict):
        raise SupervisorError(f"garbled reply from the supervisor at {socket_path}")
    return reply


def spawn_detached(spec: Path, socket_path: Path, pidfile: Path, log: Path, timeout: float = 15.0) -> int:
    """Start a background supervisor that outlives the caller (kmlab up returns at once) and return its pid
    once it answers on its socket, so callers never race its startup."""
    spec, socket_path, pidfile, log_path = (Path(p).absolute() for p in (spec, socket_path, pidfile, log))
    try:
        running = request(socket_path, {"op": "status"}, timeout=2.0)
    except SupervisorError:
        pass
    else:
        raise SupervisorError(
            f"a supervisor (pid {running.get('pid')}) is already listening on {socket_path}"
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Works from a plain checkout too, where emulator is importable only from the repository root.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "emulator.lab.supervisor", "--spec", str(spec)]
    argv += ["--socket", str(socket_path), "--pidfile", str(pidfile)]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env, start_new_session=True
        )
    finally:
        os.close(fd)

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SupervisorError(
                f"supervisor exited with status {proc.returncode} before answering; log {log_path}:\n"
                + _tail(log_path)
            )
        try:
            reply = request(
                socket_path, {"op": "status"}, timeout=max(0.1, min(2.0, deadline - time.monotonic()))
            )
        except SupervisorError:
            reply = {}
        if reply.get("ok") and reply.get("pid") == proc.pid:
            break
        if time.monotonic() >= deadline:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise SupervisorError(
                f"supervisor did not answer on {socket_path} within {timeout:g}s; log {log_path}:\n"
                + _tail(log_path)
            )
        time.sleep(POLL_INTERVAL)  # poll interval of a deadline loop, not a synchronisation delay
    # Reap it when it eventually exits, so a long-lived caller (a test run) collects no zombie.
    threading.Thread(target=proc.wait, name=f"kmlab-supervisor-reaper-{proc.pid}", daemon=True).start()
    return proc.pid


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


# -------------------------------------------------------------------------------------------- entry point


def _write_pidfile(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():  # never a successor's pidfile
            path.unlink()


async def _run_foreground(supervisor: Supervisor, socket_path: Path, pidfile: Path) -> None:
    loop = asyncio.get_running_loop()
    quit_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, quit_requested.set)
    await supervisor.serve(socket_path)
    try:
        _write_pidfile(pidfile)
        await supervisor.start_all()
        waits = [
            asyncio.ensure_future(quit_requested.wait()),
            asyncio.ensure_future(supervisor.closed.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        log.info("shutting down")
    finally:
        await supervisor.shutdown()
        await supervisor.close_server()
        _remove_pidfile(pidfile)


def main(argv: list[str] | None = None) -> int:
    """Run a supervisor in the foreground until SIGTERM/SIGINT/SIGHUP or a shutdown request."""
    parser = argparse.ArgumentParser(
        prog="python -m emulator.lab.supervisor", description="Keep the kmlab programs running."
    )
    parser.add_argument("--spec", type=Path, required=True, help="JSON file describing the programs")
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket for control requests")
    parser.add_argument("--pidfile", type=Path, required=True, help="written once the socket is bound")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kmlab-supervisor[%(process)d] %(message)s")
    try:
        supervisor = Supervisor.from_spec_file(args.spec)
        asyncio.run(_run_foreground(supervisor, args.socket, args.pidfile))
    except SupervisorError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
