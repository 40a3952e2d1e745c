"""sd_notify for a `Type=notify` unit: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

sdnotify sends datagrams but does not read `WATCHDOG_USEC`; the interval logic is here, so that the pings
come from the event loop itself and stop when the loop is wedged.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping

import sdnotify


class Notifier:
    """Reads NOTIFY_SOCKET and WATCHDOG_* from the process environment (sdnotify does the same)."""

    def __init__(self) -> None:
        env = os.environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status = ""

    def _send(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        """Only sends when the line changed: systemd keeps the last one."""
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        self._send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")


async def watchdog_forever(notifier: Notifier, interval: float) -> None:
    """Pings from the event loop itself: a wedged loop stops pinging and systemd restarts the agent."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when no watchdog is armed for us."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
