"""Files that survive a crash at any instant: written whole or not at all, and synced before anyone relies on them.

Votes, the journal's side files and the identity marker all need this; one implementation. `Writes` runs such
writes off the event loop, in order, each with a deadline: a disk that stops answering stalls the writes, never
the loop, and says so (`overdue`), so that an anchor stops renewing a lease it cannot journal under.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class DiskStalled(OSError):
    """A durable write did not return within its deadline. It may still complete later: what it records is in
    doubt, like a step whose outcome was not journaled; the caller does not act on it."""


class Writes:
    """Blocking durable writes (journal appends, fsyncs, marker and record writes), one at a time on one thread of
    their own, in the order they were asked for: a later write of a file never lands before an earlier one that
    is still stuck. Each `run` waits at most `deadline` seconds."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.deadline = deadline
        self.clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmagent-disk")
        self._pending: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count()
        self._guard = threading.Lock()

    async def run(self, what: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args)` on the disk thread; DiskStalled naming `what` when it has not returned by the deadline."""
        token = next(self._ids)
        with self._guard:
            self._pending[token] = (what, self.clock())
        future = self._pool.submit(fn, *args, **kwargs)
        future.add_done_callback(lambda _f: self._done(token))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.deadline)
        except TimeoutError:
            raise DiskStalled(f"{what}: the disk has not answered for {self.deadline:g}s") from None

    def _done(self, token: int) -> None:
        with self._guard:
            self._pending.pop(token, None)

    def overdue(self, now: float | None = None) -> tuple[str, float] | None:
        """The oldest write still outstanding past the deadline (what, seconds), or None: the disk answers."""
        now = self.clock() if now is None else now
        with self._guard:
            oldest = min(self._pending.values(), key=lambda p: p[1], default=None)
        if oldest is None or now - oldest[1] <= self.deadline:
            return None
        return oldest[0], now - oldest[1]

    def close(self) -> None:
        """Stop taking writes; one stuck in the kernel is left to finish (nothing can cancel it)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def fsync_dir(path: Path) -> None:
    """A rename or unlink is durable only once the directory holding it is synced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """tmp + fsync + rename + fsync dir: a reader sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    atomic_write(path, json.dumps(data, sort_keys=True, indent=1).encode() + b"\n", mode)


def read_json(path: Path) -> Any:
    """The parsed file, or None when it does not exist; a damaged file raises ValueError naming it."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is damaged: {exc}") from None
