"""The lab supervisor must behave like systemd with Restart=... for the agent tests built on it to mean anything."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from emulator.lab.supervisor import ProgramSpec, Supervisor, SupervisorError, request, spawn_detached

FAST = 0.05  # restart_sec in tests
SLEEP = "import time; time.sleep(60)"
IGNORE_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def program(tmp_path: Path, name: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "argv": [sys.executable, "-c", code],
        "log": str(tmp_path / f"{name}.log"),
        "restart_sec": FAST,
        **extra,
    }


def read(path: Path) -> str:
    """A log that does not exist yet reads as empty: the program may not have started."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def gone(pid: int) -> bool:
    """Dead or a zombie: PID 1 in a container may never reap an orphan."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def stays(predicate: Callable[[], bool], what: str, duration: float = 0.3) -> None:
    """Check that something does *not* happen over several restart delays (a negative, not a sync wait)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), what
        await asyncio.sleep(0.02)


def wait_sync(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
async def sup() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(stop_timeout=1.0)
    try:
        yield supervisor
    finally:
        await supervisor.shutdown()
        await supervisor.close_server()


def st(sup: Supervisor, name: str) -> dict[str, Any]:
    return sup.status(name)


async def test_exiting_program_is_restarted_and_counted(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("crash", program(tmp_path, "crash", "import sys; print('up', flush=True); sys.exit(3)"))
    await until(lambda: st(sup, "crash")["n_restarts"] >= 2, "two automatic restarts")
    s = st(sup, "crash")
    assert s["last_exit_code"] == 3 and s["last_exit_signal"] is None
    assert s["history"] and all(rc == 3 for _, rc in s["history"])
    assert s["last_start_monotonic"] <= time.monotonic() and abs(s["last_start_wall"] - time.time()) < 10
    text = (tmp_path / "crash.log").read_text()
    assert "--- kmlab: start 1 at " in text and "--- kmlab: start 2 at " in text
    assert text.count("up\n") >= 2
    assert json.loads(json.dumps(sup.status()))  # JSON-able


async def test_history_keeps_the_last_20_exits(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("crash", program(tmp_path, "crash", "import sys; sys.exit(5)", restart_sec=0))
    await until(lambda: st(sup, "crash")["n_restarts"] >= 22, "22 restarts", timeout=15)
    history = st(sup, "crash")["history"]
    assert len(history) == 20
    assert [t for t, _ in history] == sorted(t for t, _ in history)


async def test_stop_keeps_it_stopped_and_start_brings_it_back(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")
    first = st(sup, "node")["pid"]
    await sup.stop("node")
    s = st(sup, "node")
    assert (s["state"], s["pid"], s["last_exit_signal"]) == ("inactive", None, "TERM")
    assert gone(first)
    await stays(lambda: st(sup, "node")["state"] == "inactive", "a stopped program must not restart")
    assert st(sup, "node")["n_starts"] == 1

    await sup.start("node")
    await until(lambda: st(sup, "node")["state"] == "active", "node active again")
    assert st(sup, "node")["pid"] not in (None, first)
    await sup.start("node")  # like systemctl start on an active unit: nothing happens
    assert st(sup, "node")["n_starts"] == 2


async def test_restart_is_manual_and_resets_the_counter(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")
    await sup.kill("node", "KILL")
    await until(lambda: st(sup, "node")["n_restarts"] == 1 and st(sup, "node")["pid"], "auto restart")
    pid = st(sup, "node")["pid"]
    await sup.restart("node")
    await until(lambda: st(sup, "node")["pid"] not in (None, pid), "new main process")
    assert st(sup, "node")["n_restarts"] == 0  # systemd flushes NRestarts on a manual start
    assert gone(pid)


async def test_kill_with_sigkill_leads_to_a_restart(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")
    pid = st(sup, "node")["pid"]
    await sup.kill("node", "KILL")
    await until(lambda: st(sup, "node")["n_restarts"] == 1, "restart after SIGKILL")
    await until(lambda: st(sup, "node")["state"] == "active", "node active again")
    s = st(sup, "node")
    assert s["pid"] != pid and gone(pid)
    assert s["last_exit_signal"] == "KILL" and s["last_exit_code"] is None
    assert s["history"][-1][1] == -signal.SIGKILL


async def test_failing_preflight_prevents_start_and_is_retried(sup: Supervisor, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    pre = (
        "import os, sys; print('preflight in', os.getcwd(), os.environ['LAB_VAR'], flush=True); "
        f"sys.exit(0 if os.path.exists({str(marker)!r}) else 7)"
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    spec = program(
        tmp_path,
        "node",
        "import os, time; print('main', os.environ['LAB_VAR'], flush=True); time.sleep(60)",
        preflight=[sys.executable, "-c", pre],
        env={"LAB_VAR": "lab-value"},
        cwd=str(workdir),
    )
    await sup.add("node", spec)
    await until(lambda: st(sup, "node")["n_restarts"] >= 2, "preflight retries")
    s = st(sup, "node")
    assert s["state"] in ("failed", "activating")
    assert s["history"] == [] and s["last_start_monotonic"] is None  # the main process never ran
    await until(lambda: st(sup, "node")["state"] == "failed", "failed between attempts")
    assert "preflight failed with code 7" in (st(sup, "node")["last_error"] or "")

    marker.touch()
    await until(lambda: st(sup, "node")["state"] == "active", "start once the preflight passes")
    log = tmp_path / "node.log"
    assert f"preflight in {workdir} lab-value" in log.read_text()
    await until(lambda: "main lab-value" in read(log), "the main process's output in the log")


async def test_restart_no_behaves_like_systemd(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("bad", program(tmp_path, "bad", "import sys; sys.exit(3)", restart="no"))
    await sup.add("good", program(tmp_path, "good", "import sys; sys.exit(0)", restart="no"))
    await until(lambda: st(sup, "bad")["state"] == "failed", "bad failed")
    await until(lambda: st(sup, "good")["state"] == "inactive" and st(sup, "good")["history"], "good done")
    await stays(
        lambda: st(sup, "bad")["n_starts"] == 1 and st(sup, "good")["n_starts"] == 1, "no restart at all"
    )
    await sup.start("bad")  # a manual start still works, as `systemctl start` on a failed unit
    await until(lambda: st(sup, "bad")["n_starts"] == 2, "manual start")


async def test_restart_on_failure_behaves_like_systemd(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("clean", program(tmp_path, "clean", "import sys; sys.exit(0)", restart="on-failure"))
    await sup.add("crash", program(tmp_path, "crash", "import sys; sys.exit(2)", restart="on-failure"))
    await sup.add("node", program(tmp_path, "node", SLEEP, restart="on-failure"))
    await until(lambda: st(sup, "crash")["n_restarts"] >= 2, "crash restarted")
    await until(lambda: st(sup, "clean")["state"] == "inactive" and st(sup, "clean")["history"], "clean done")
    await until(lambda: st(sup, "node")["state"] == "active", "node active")

    await sup.kill("node", "TERM")  # a clean signal: on-failure does not restart
    await until(lambda: st(sup, "node")["state"] == "inactive", "node down after SIGTERM")
    await stays(lambda: st(sup, "node")["n_starts"] == 1 and st(sup, "clean")["n_starts"] == 1, "no restart")

    await sup.start("node")
    await until(lambda: st(sup, "node")["state"] == "active", "node active again")
    await sup.kill("node", 9)  # an unclean signal: restarted
    await until(lambda: st(sup, "node")["n_restarts"] == 1 and st(sup, "node")["pid"], "restart after KILL")


async def test_restart_always_restarts_after_a_clean_exit(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")
    await sup.kill("node", "SIGTERM")
    await until(lambda: st(sup, "node")["n_restarts"] == 1 and st(sup, "node")["pid"], "restart after TERM")


async def test_stop_escalates_to_sigkill(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("stubborn", program(tmp_path, "stubborn", IGNORE_TERM))
    await until(lambda: "ready" in read(tmp_path / "stubborn.log"), "SIGTERM ignored")
    pid = st(sup, "stubborn")["pid"]
    started = time.monotonic()
    await sup.stop("stubborn")
    assert 0.9 <= time.monotonic() - started < 5  # stop_timeout=1.0 in the fixture
    s = st(sup, "stubborn")
    assert (s["state"], s["last_exit_signal"]) == ("failed", "KILL") and gone(pid)


async def test_unstartable_program_fails_and_is_retried(sup: Supervisor, tmp_path: Path) -> None:
    spec = {"argv": [str(tmp_path / "missing-binary")], "log": str(tmp_path / "m.log"), "restart_sec": FAST}
    await sup.add("missing", spec)
    await until(lambda: st(sup, "missing")["n_restarts"] >= 2, "retries")
    assert "cannot start main process" in (st(sup, "missing")["last_error"] or "")
    assert "kmlab: cannot start" in (tmp_path / "m.log").read_text()


async def test_shutdown_leaves_no_process_alive(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    spawner = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    supervisor = Supervisor(
        {
            "spawner": ProgramSpec.from_json(program(tmp_path, "spawner", spawner)),
            "stubborn": ProgramSpec.from_json(program(tmp_path, "stubborn", IGNORE_TERM)),
            "plain": ProgramSpec.from_json(program(tmp_path, "plain", SLEEP)),
        },
        stop_timeout=0.5,
    )
    await supervisor.start_all()
    await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", "grandchild started")
    await until(lambda: "ready" in read(tmp_path / "stubborn.log"), "stubborn ready")
    await until(lambda: all(s["state"] == "active" for s in supervisor.status().values()), "all active")
    pids = [s["pid"] for s in supervisor.status().values()] + [int(pidfile.read_text())]
    assert all(not gone(p) for p in pids)

    await supervisor.shutdown()
    await until(lambda: all(gone(p) for p in pids), "every process, grandchild included, to be gone")
    assert {s["state"] for s in supervisor.status().values()} <= {"inactive", "failed"}
    with pytest.raises(SupervisorError, match="shutting down"):
        await supervisor.start("plain")


async def test_a_cancelled_runner_kills_its_child(sup: Supervisor, tmp_path: Path) -> None:
    """If the event loop goes away without shutdown(), children must not outlive the supervisor."""
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")
    pid = st(sup, "node")["pid"]
    runner = sup._programs["node"].runner
    assert runner is not None
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    await until(lambda: gone(pid), "the child killed with its runner")


async def test_add_and_remove(sup: Supervisor, tmp_path: Path) -> None:
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")
    pid = st(sup, "node")["pid"]
    with pytest.raises(SupervisorError, match="already exists"):
        await sup.add("node", program(tmp_path, "node", SLEEP))
    await sup.remove("node")
    assert gone(pid) and sup.names == []
    with pytest.raises(SupervisorError, match="unknown program 'node'"):
        sup.status("node")


async def _ask(path: Path, message: Any) -> dict[str, Any]:
    """The synchronous client must not block the loop that serves it."""
    return await asyncio.to_thread(request, path, message, 10.0)


async def _raw(path: Path, payload: bytes) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the supervisor hung up on an oversized request; its reply is still readable
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, "connection closed without a reply"
                buf += chunk
        reply: dict[str, Any] = json.loads(buf.split(b"\n")[0])
        return reply

    return await asyncio.to_thread(go)


async def test_control_socket_rejects_bad_requests_and_keeps_working(sup: Supervisor, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    await sup.serve(sock)
    assert sock.stat().st_mode & 0o777 == 0o600
    await sup.add("node", program(tmp_path, "node", SLEEP))
    await until(lambda: st(sup, "node")["state"] == "active", "node active")

    bad: list[tuple[Any, str]] = [
        ([1, 2], "JSON object"),
        ({}, '"op" must be one of'),
        ({"op": "explode"}, '"op" must be one of'),
        ({"op": 3}, '"op" must be one of'),
        ({"op": "stop"}, 'needs a "name"'),
        ({"op": "stop", "name": "ghost"}, "unknown program 'ghost' (known: node)"),
        ({"op": "stop", "name": 7}, '"name" must be a string'),
        ({"op": "status", "name": "ghost"}, "unknown program"),
        ({"op": "kill", "name": "node", "signal": "NOPE"}, "unknown signal"),
        ({"op": "kill", "name": "node", "signal": None}, '"signal" must be'),
        ({"op": "kill", "name": "node", "whom": "everyone"}, "whom"),
        ({"op": "stop", "name": "node", "force": True}, "unexpected field(s) for stop: force"),
        ({"op": "add", "name": "x"}, 'add needs a "program"'),
        ({"op": "add", "name": "x", "program": {"argv": []}}, "argv must be a non-empty list"),
        ({"op": "add", "name": "x", "program": {"argv": ["true"]}}, "log must be"),
        (
            {
                "op": "add",
                "name": "x",
                "program": {"argv": ["true"], "log": "/tmp/x", "restart": "sometimes"},
            },
            "restart",
        ),
        (
            {"op": "add", "name": "x", "program": {"argv": ["true"], "log": "/tmp/x", "bogus": 1}},
            "unknown key",
        ),
        ({"op": "add", "name": "../evil", "program": program(tmp_path, "x", SLEEP)}, "invalid program name"),
        ({"op": "add", "name": "node", "program": program(tmp_path, "x", SLEEP)}, "already exists"),
    ]
    for message, error in bad:
        reply = await _ask(sock, message)
        assert reply["ok"] is False, message
        assert error in reply["error"], (message, reply)

    for payload, error in [
        (b"this is not json\n", "not valid JSON"),
        (b"\xff\xfe\n", "not valid JSON"),
        (b"[" * 100_000 + b"\n", "not valid JSON"),
    ]:
        reply = await _raw(sock, payload)
        assert reply["ok"] is False and error in reply["error"], reply
    reply = await _raw(sock, b"x" * (2 << 20) + b"\n")
    assert reply["ok"] is False and "longer than" in reply["error"]

    # Still alive and serving, the program untouched.
    reply = await _ask(sock, {"op": "status"})
    assert reply["ok"] and reply["pid"] == os.getpid() and reply["programs"]["node"]["state"] == "active"
    assert (await _ask(sock, {"op": "status", "name": "node"}))["programs"].keys() == {"node"}


async def test_control_socket_operations(sup: Supervisor, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    await sup.serve(sock)
    reply = await _ask(sock, {"op": "add", "name": "node", "program": program(tmp_path, "node", SLEEP)})
    assert reply["ok"] and reply["program"]["name"] == "node"
    await until(lambda: st(sup, "node")["state"] == "active", "node active")

    reply = await _ask(sock, {"op": "kill", "name": "node", "signal": "KILL"})
    assert reply["ok"]
    await until(lambda: st(sup, "node")["n_restarts"] == 1 and st(sup, "node")["pid"], "restart after kill")

    reply = await _ask(sock, {"op": "stop", "name": "node"})
    assert reply["ok"] and reply["program"]["state"] == "inactive"
    reply = await _ask(sock, {"op": "kill", "name": "node", "signal": "KILL"})
    assert not reply["ok"] and "no running process" in reply["error"]
    reply = await _ask(sock, {"op": "start", "name": "node"})
    assert reply["ok"]
    await until(lambda: st(sup, "node")["state"] == "active", "node active again")
    pid = st(sup, "node")["pid"]
    assert (await _ask(sock, {"op": "restart", "name": "node"}))["ok"]
    await until(lambda: st(sup, "node")["pid"] not in (None, pid), "restarted by request")

    pid = st(sup, "node")["pid"]
    assert (await _ask(sock, {"op": "remove", "name": "node"}))["ok"]
    assert gone(pid) and sup.names == []

    assert await _ask(sock, {"op": "shutdown"}) == {"ok": True}
    assert sup.closed.is_set()


def test_request_without_supervisor_raises_clearly(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="not running"):
        request(tmp_path / "nothing.sock", {"op": "status"}, timeout=1)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a killed supervisor leaves behind
    with pytest.raises(SupervisorError, match="not running"):
        request(stale, {"op": "status"}, timeout=1)


def test_spawn_detached_request_and_shutdown(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"programs": {"node1": program(tmp_path, "node1", SLEEP)}}))
    sock, pidfile, log = tmp_path / "sup.sock", tmp_path / "sup.pid", tmp_path / "sup.log"

    pid = spawn_detached(spec, sock, pidfile, log)
    assert pid != os.getpid() and int(pidfile.read_text()) == pid
    assert os.getsid(pid) != os.getsid(0)  # detached: its own session
    with pytest.raises(SupervisorError, match="already listening"):
        spawn_detached(spec, sock, pidfile, log)

    wait_sync(
        lambda: request(sock, {"op": "status"})["programs"]["node1"]["state"] == "active", "node1 active"
    )
    child = request(sock, {"op": "status", "name": "node1"})["programs"]["node1"]["pid"]
    assert psutil.Process(child).ppid() == pid and os.getsid(child) == child

    assert request(sock, {"op": "kill", "name": "node1", "signal": "KILL"})["ok"]
    wait_sync(lambda: request(sock, {"op": "status"})["programs"]["node1"]["n_restarts"] == 1, "restart")

    child = request(sock, {"op": "status"})["programs"]["node1"]["pid"]
    assert request(sock, {"op": "shutdown"}) == {"ok": True}
    wait_sync(lambda: gone(pid), "supervisor exit")
    assert gone(child) and not pidfile.exists() and not sock.exists()
    with pytest.raises(SupervisorError, match="not running"):
        request(sock, {"op": "status"})


def test_sigterm_to_supervisor_stops_children(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"programs": {"a": program(tmp_path, "a", SLEEP)}}))
    sock, pidfile = tmp_path / "sup.sock", tmp_path / "sup.pid"
    pid = spawn_detached(spec, sock, pidfile, tmp_path / "sup.log")
    wait_sync(lambda: bool(request(sock, {"op": "status"})["programs"]["a"]["pid"]), "a running")
    child = request(sock, {"op": "status"})["programs"]["a"]["pid"]
    os.kill(pid, signal.SIGTERM)
    wait_sync(lambda: gone(pid), "supervisor exit")
    assert gone(child) and not pidfile.exists() and not sock.exists()


def test_spawn_detached_reports_a_bad_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"programs": {"a": {"argv": "not a list", "log": "x"}}}))
    with pytest.raises(SupervisorError, match="argv must be a non-empty list") as info:
        spawn_detached(spec, tmp_path / "s.sock", tmp_path / "s.pid", tmp_path / "s.log")
    assert "exited with status 1" in str(info.value)
    assert not (tmp_path / "s.pid").exists()
