"""sd_notify: the messages a Type=notify unit sends, and watchdog pings that stop when the loop is wedged."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.io.notify import Notifier, watchdog_forever


class FakeSystemd:
    """A NOTIFY_SOCKET that records (arrival time, message) from another thread, as systemd would see them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, predicate: object, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(m) for _, m in list(self.messages)):  # type: ignore[operator]
                return
            time.sleep(0.01)
        raise AssertionError(f"no matching notify message; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def notifier(monkeypatch: pytest.MonkeyPatch, **env: str) -> Notifier:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Notifier()


def test_messages(fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch) -> None:
    n = notifier(monkeypatch, NOTIFY_SOCKET=str(fake_systemd.path))
    n.ready("started:\n agent km1")
    n.status("HEALTHY for 3s")
    n.status("HEALTHY for 3s")  # unchanged: not sent again
    n.reloading()
    n.stopping()
    fake_systemd.wait_for(lambda m: m == "STOPPING=1")
    texts = [m for _, m in fake_systemd.messages]
    assert texts[0] == "READY=1\nSTATUS=started: agent km1"
    assert texts[1] == "STATUS=HEALTHY for 3s"
    assert texts[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert texts[3] == "STOPPING=1" and len(texts) == 4


def test_no_socket_means_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    n = notifier(monkeypatch)
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")  # must not raise


@pytest.mark.parametrize(
    "env, interval",
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # armed for another process
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], interval: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert notifier(monkeypatch, **env).watchdog_interval == interval


def test_watchdog_interval_for_our_own_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    n = notifier(monkeypatch, WATCHDOG_USEC="1000000", WATCHDOG_PID=str(os.getpid()))
    assert n.watchdog_interval == 0.5


async def test_watchdog_pings_stop_while_the_event_loop_is_wedged(
    fake_systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = notifier(monkeypatch, NOTIFY_SOCKET=str(fake_systemd.path), WATCHDOG_USEC="100000")
    assert n.watchdog_interval == 0.05
    task = asyncio.ensure_future(watchdog_forever(n, n.watchdog_interval))
    try:
        await asyncio.sleep(0.3)
        stall_start = time.monotonic()
        time.sleep(1.0)  # the wedge under test: a handler that blocks the loop
        stall_end = time.monotonic()
        await asyncio.sleep(0.3)
    finally:
        task.cancel()
    pings = [t for t, m in fake_systemd.messages if m == "WATCHDOG=1"]
    assert len([t for t in pings if t < stall_start]) >= 3
    assert [t for t in pings if stall_start + 0.01 < t < stall_end - 0.01] == []
    assert len([t for t in pings if t > stall_end]) >= 2  # resumes once the loop runs again
