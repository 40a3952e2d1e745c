"""The service shells against the real things: the kmlab supervisor process, and systemctl (fake or real)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from agent.core.model import ServiceObs, ServiceState
from agent.io.service import LabSupervisor, ServiceControl, ServiceError, Systemd, parse_show
from emulator.lab.supervisor import request, spawn_detached

SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]


def gone(pid: int) -> bool:
    """Dead or a zombie (PID 1 in a container may never reap an orphan)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # poll interval of a deadline loop


async def until(
    probe: Callable[[], Awaitable[ServiceObs]],
    ok: Callable[[ServiceObs], bool],
    what: str,
    timeout: float = 10.0,
) -> ServiceObs:
    """Poll an async status until it satisfies ok, or fail after the deadline with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        obs = await probe()
        if ok(obs):
            return obs
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}; last status {obs}")
        await asyncio.sleep(0.02)


async def until_true(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------- lab supervisor


class Lab:
    def __init__(self, sock: Path, tmp: Path, pid: int) -> None:
        self.sock, self.tmp, self.pid = sock, tmp, pid

    def add(self, name: str, **program: object) -> None:
        spec = {
            "argv": SLEEPER,
            "log": str(self.tmp / f"{name}.log"),
            "restart": "always",
            "restart_sec": 0.2,
        }
        spec.update(program)
        reply = request(self.sock, {"op": "add", "name": name, "program": spec})
        assert reply.get("ok"), reply


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    # A short directory: a Unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    short = Path(tempfile.mkdtemp(prefix="kmsvc-"))
    sock = short / "sup.sock"
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "programs": {
                    "svc": {
                        "argv": SLEEPER,
                        "log": str(tmp_path / "svc.log"),
                        "restart": "always",
                        "restart_sec": 0.2,
                    }
                }
            }
        )
    )
    try:
        pid = spawn_detached(spec, sock, tmp_path / "sup.pid", tmp_path / "sup.log")
    except BaseException:
        shutil.rmtree(short, ignore_errors=True)
        raise
    try:
        yield Lab(sock, tmp_path, pid)
    finally:
        try:
            request(sock, {"op": "shutdown"})
        finally:
            wait_for(lambda: gone(pid), "the supervisor to exit")
            shutil.rmtree(short, ignore_errors=True)


def test_lab_supervisor_is_a_service_control(lab: Lab) -> None:
    svc: ServiceControl = LabSupervisor(lab.sock, "svc")
    assert svc.name == "svc"


async def test_lab_status_active_with_pid(lab: Lab) -> None:
    svc = LabSupervisor(lab.sock, "svc")
    obs = await until(svc.status, lambda o: o.state is ServiceState.ACTIVE, "svc active")
    assert obs.main_pid is not None and psutil.pid_exists(obs.main_pid)
    assert obs.restarts == 0 and obs.restarts_in_window == 0


async def test_lab_stop_then_start(lab: Lab) -> None:
    svc = LabSupervisor(lab.sock, "svc")
    first = await until(svc.status, lambda o: o.state is ServiceState.ACTIVE, "svc active")
    assert first.main_pid is not None
    await svc.stop()
    obs = await svc.status()  # stop returns only once stopped: no waiting here
    assert obs.state is ServiceState.INACTIVE and obs.main_pid is None
    await until_true(lambda: gone(first.main_pid or 0), "the old process to be gone")
    await svc.stop()  # idempotent
    await svc.start()
    obs = await svc.status()  # start returns once the main process runs
    assert obs.state is ServiceState.ACTIVE and obs.main_pid not in (None, first.main_pid)
    await svc.start()  # a no-op when running
    assert (await svc.status()).main_pid == obs.main_pid


async def test_lab_restart_replaces_the_process(lab: Lab) -> None:
    svc = LabSupervisor(lab.sock, "svc")
    first = await until(svc.status, lambda o: o.state is ServiceState.ACTIVE, "svc active")
    await svc.restart()
    obs = await svc.status()
    assert obs.state is ServiceState.ACTIVE and obs.main_pid not in (None, first.main_pid)


async def test_lab_killed_process_is_restarted_and_counted(lab: Lab) -> None:
    svc = LabSupervisor(lab.sock, "svc")
    first = await until(svc.status, lambda o: o.state is ServiceState.ACTIVE, "svc active")
    assert first.main_pid is not None
    os.kill(first.main_pid, signal.SIGKILL)
    obs = await until(
        svc.status,
        lambda o: (
            o.state is ServiceState.ACTIVE and o.restarts > first.restarts and o.main_pid != first.main_pid
        ),
        "svc restarted after a kill",
    )
    assert obs.restarts == first.restarts + 1


async def test_lab_pending_restart_reads_activating_like_systemd(lab: Lab) -> None:
    lab.add("slow", restart_sec=60)
    svc = LabSupervisor(lab.sock, "slow")
    first = await until(svc.status, lambda o: o.state is ServiceState.ACTIVE, "slow active")
    assert first.main_pid is not None
    os.kill(first.main_pid, signal.SIGKILL)
    obs = await until(svc.status, lambda o: o.state is not ServiceState.ACTIVE, "slow down")
    assert obs.state is ServiceState.ACTIVATING and obs.main_pid is None
    await svc.stop()  # cancels the pending restart
    assert (await svc.status()).state is ServiceState.INACTIVE


async def test_lab_start_refused_by_preflight_raises_with_reason(lab: Lab) -> None:
    lab.add("guarded", preflight=["false"], restart="no")
    svc = LabSupervisor(lab.sock, "guarded", timeout=10)
    await until(svc.status, lambda o: o.state is ServiceState.FAILED, "guarded failed")
    with pytest.raises(ServiceError, match="preflight failed"):
        await svc.start()


async def test_lab_unknown_program(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    svc = LabSupervisor(lab.sock, "nope")
    for op in (svc.stop, svc.start, svc.restart):
        with pytest.raises(ServiceError, match=r"unknown program 'nope' \(known: svc\)"):
            await op()
    with caplog.at_level(logging.WARNING, logger="kmagent.service"):
        assert (await svc.status()).state is ServiceState.UNKNOWN
        assert (await svc.status()).state is ServiceState.UNKNOWN
    reasons = [r.getMessage() for r in caplog.records if "status unknown" in r.getMessage()]
    assert len(reasons) == 1 and "unknown program 'nope'" in reasons[0]  # logged once, not every probe


async def test_lab_missing_socket(tmp_path: Path) -> None:
    svc = LabSupervisor(tmp_path / "none.sock", "svc", timeout=2)
    obs = await svc.status()
    assert obs.state is ServiceState.UNKNOWN
    with pytest.raises(ServiceError, match=r"lab supervisor at .*none\.sock is not running"):
        await svc.stop()
    with pytest.raises(ServiceError, match="not running"):
        await svc.start()


async def test_lab_silent_supervisor_times_out() -> None:
    short = Path(tempfile.mkdtemp(prefix="kmsvc-"))
    path = short / "mute.sock"
    held: list[asyncio.StreamWriter] = []

    async def mute(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never answers

    server = await asyncio.start_unix_server(mute, path=str(path))
    try:
        svc = LabSupervisor(path, "svc", timeout=0.3)
        assert (await svc.status()).state is ServiceState.UNKNOWN
        with pytest.raises(ServiceError, match="no answer"):
            await svc.stop()
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
        shutil.rmtree(short, ignore_errors=True)


async def test_lab_garbled_reply() -> None:
    short = Path(tempfile.mkdtemp(prefix="kmsvc-"))
    path = short / "garbled.sock"

    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"this is not json\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(garble, path=str(path))
    try:
        svc = LabSupervisor(path, "svc", timeout=2)
        assert (await svc.status()).state is ServiceState.UNKNOWN
        with pytest.raises(ServiceError, match="garbled reply"):
            await svc.stop()
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(short, ignore_errors=True)


# ---------------------------------------------------------------------------------------- systemd parser

SHOW_RUNNING = "MainPID=1234\nNRestarts=0\nLoadState=loaded\nActiveState=active\nSubState=running\n"
SHOW_AUTO_RESTART = (
    "MainPID=0\nNRestarts=7\nLoadState=loaded\nActiveState=activating\nSubState=auto-restart\n"
)
SHOW_FAILED = "MainPID=0\nNRestarts=3\nLoadState=loaded\nActiveState=failed\nSubState=failed\n"
SHOW_STOPPED = "MainPID=0\nNRestarts=0\nLoadState=loaded\nActiveState=inactive\nSubState=dead\n"
SHOW_STOPPING = "MainPID=99\nNRestarts=1\nLoadState=loaded\nActiveState=deactivating\nSubState=stop-sigterm\n"
SHOW_RELOADING = "MainPID=55\nNRestarts=0\nLoadState=loaded\nActiveState=reloading\nSubState=reload\n"
SHOW_NOT_FOUND = "MainPID=0\nNRestarts=0\nLoadState=not-found\nActiveState=inactive\nSubState=dead\n"
SHOW_OLD_SYSTEMD = "MainPID=42\nActiveState=active\nSubState=running\n"  # before NRestarts (systemd < 235)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SHOW_RUNNING, ServiceObs(ServiceState.ACTIVE, restarts=0, main_pid=1234)),
        (SHOW_AUTO_RESTART, ServiceObs(ServiceState.ACTIVATING, restarts=7, main_pid=None)),
        (SHOW_FAILED, ServiceObs(ServiceState.FAILED, restarts=3, main_pid=None)),
        (SHOW_STOPPED, ServiceObs(ServiceState.INACTIVE)),
        (SHOW_STOPPING, ServiceObs(ServiceState.DEACTIVATING, restarts=1, main_pid=99)),
        (SHOW_RELOADING, ServiceObs(ServiceState.ACTIVE, main_pid=55)),
        (SHOW_NOT_FOUND, ServiceObs(ServiceState.UNKNOWN)),
        (SHOW_OLD_SYSTEMD, ServiceObs(ServiceState.ACTIVE, restarts=0, main_pid=42)),
        ("ActiveState=active\r\nNRestarts=[not set]\r\nMainPID=\r\n", ServiceObs(ServiceState.ACTIVE)),
        ("ActiveState=maintenance\nSubState=cleaning\n", ServiceObs(ServiceState.UNKNOWN)),
        ("", ServiceObs(ServiceState.UNKNOWN)),
        ("garbage\n=\nActiveState=failed\nExtra=a=b\n", ServiceObs(ServiceState.FAILED)),
    ],
)
def test_parse_show(text: str, expected: ServiceObs) -> None:
    assert parse_show(text) == expected


# ----------------------------------------------------------------------------------- systemd, fake binary


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> Callable[[str], Path]:
    """Write an executable stand-in for systemctl; it logs its arguments to calls.log."""

    def make(body: str) -> Path:
        path = tmp_path / "systemctl"
        path.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.log"}\n{body}\n')
        path.chmod(0o755)
        return path

    return make


def calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


async def test_systemd_fake_success(tmp_path: Path, fake_systemctl: Callable[[str], Path]) -> None:
    script = fake_systemctl(
        'case "$1" in\n'
        "  show) printf 'MainPID=4242\\nNRestarts=3\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\n';;\n"
        "  *) exit 0;;\n"
        "esac"
    )
    svc: ServiceControl = Systemd("minkms.service", systemctl=str(script), timeout=10)
    assert svc.name == "minkms.service"
    assert await svc.status() == ServiceObs(ServiceState.ACTIVE, restarts=3, main_pid=4242)
    await svc.stop()
    await svc.start()
    await svc.restart()
    assert calls(tmp_path) == [
        "show minkms.service --property=LoadState,ActiveState,SubState,NRestarts,MainPID --no-pager",
        "stop minkms.service",
        "reset-failed minkms.service",  # a start by the agent is not blocked by refused preflight starts
        "start minkms.service",
        "restart minkms.service",
    ]


async def test_systemd_fake_failure(tmp_path: Path, fake_systemctl: Callable[[str], Path]) -> None:
    message = "Job for minkms.service failed because the control process exited with error code."
    script = fake_systemctl(f'echo "{message}" >&2\nexit 1')
    svc = Systemd("minkms.service", systemctl=str(script), timeout=10)
    for op in (svc.stop, svc.start, svc.restart):
        with pytest.raises(ServiceError, match=r"failed \(exit 1\): Job for minkms.service failed"):
            await op()
    assert (await svc.status()).state is ServiceState.UNKNOWN


async def test_systemd_fake_unreadable_output(fake_systemctl: Callable[[str], Path]) -> None:
    script = fake_systemctl("echo 'Failed to connect to bus: No such file or directory'")
    svc = Systemd("minkms.service", systemctl=str(script), timeout=10)
    assert (await svc.status()).state is ServiceState.UNKNOWN


async def test_systemd_fake_timeout_kills_it_all(
    tmp_path: Path, fake_systemctl: Callable[[str], Path]
) -> None:
    # A systemctl that hangs, with a child holding its output pipes: both must be killed.
    script = fake_systemctl(f"sleep 3600 &\necho $! > {tmp_path / 'child.pid'}\nwait")
    svc = Systemd("minkms.service", systemctl=str(script), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceError, match=r"did not finish within 0.5s"):
        await svc.stop()
    assert (await svc.status()).state is ServiceState.UNKNOWN
    assert time.monotonic() - started < 30  # not a timing assertion: only "it did not hang"
    child = int((tmp_path / "child.pid").read_text())
    await until_true(lambda: gone(child), "the hung systemctl's child to be killed")


async def test_systemd_missing_binary(tmp_path: Path) -> None:
    svc = Systemd("minkms.service", systemctl=str(tmp_path / "no-systemctl"), timeout=5)
    assert (await svc.status()).state is ServiceState.UNKNOWN
    with pytest.raises(ServiceError, match="cannot run"):
        await svc.start()


# -------------------------------------------------------------------------------------- systemd, the real one

HAS_SYSTEMD = Path("/run/systemd/system").is_dir() and shutil.which("systemd-run") is not None


@pytest.fixture
def transient_unit() -> Iterator[str]:
    if not HAS_SYSTEMD:
        pytest.skip("systemd is not PID 1 here (no /run/systemd/system)")
    if os.geteuid() != 0:
        pytest.skip("needs root to create a transient system unit")
    unit = f"kmagent-test-{uuid.uuid4().hex[:12]}.service"
    subprocess.run(
        ["systemd-run", f"--unit={unit}", "--property=Restart=always", "sleep", "3600"],
        check=True,
        capture_output=True,
    )
    try:
        yield unit
    finally:
        subprocess.run(["systemctl", "stop", unit], check=False, capture_output=True)
        subprocess.run(["systemctl", "reset-failed", unit], check=False, capture_output=True)


async def test_systemd_real_transient_unit(transient_unit: str) -> None:
    svc = Systemd(transient_unit, timeout=30)
    obs = await until(svc.status, lambda o: o.state is ServiceState.ACTIVE, "transient unit active")
    assert obs.main_pid is not None
    await svc.stop()
    # A stopped transient unit may be garbage-collected at once: then systemd no longer knows it.
    assert (await svc.status()).state in (ServiceState.INACTIVE, ServiceState.UNKNOWN)
