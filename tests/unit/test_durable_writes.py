"""Durable writes off the event loop (agent.io.durable.Writes) and a journal whose readers never wait for a stuck
fsync (agent.io.journal): a hung disk stalls the writes, never the loop (issue 12)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from agent.core.agreement import Held
from agent.core.messages import Action, Certificate
from agent.io import journal as journal_module
from agent.io.durable import DiskStalled, Writes
from agent.io.journal import Journal

ACTION = Action("rejoin-n3-1-1", "REJOIN", "n3", (("node_id", "2"), ("host", "h3:7373")))
CERT = Certificate("c", 1, ACTION, ())


def _stuck(release: threading.Event, started: threading.Event) -> str:
    started.set()
    assert release.wait(30), "the test never released the stuck write"
    return "landed"


async def test_a_stuck_write_is_given_up_after_its_deadline_and_the_loop_runs_on() -> None:
    writes = Writes(deadline=0.3)
    release, started = threading.Event(), threading.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    try:
        with pytest.raises(DiskStalled, match="journal intent: the disk has not answered"):
            await writes.run("journal intent", _stuck, release, started)
        assert started.is_set() and ticks >= 5  # the loop went on while the write hung
        overdue = writes.overdue()
        assert overdue is not None and overdue[0] == "journal intent" and overdue[1] > 0.3
    finally:
        release.set()
        task.cancel()
    deadline = time.monotonic() + 30
    while writes.overdue(time.monotonic() + 1.0) is not None:  # done: nothing outstanding any more
        assert time.monotonic() < deadline, "the released write never finished"
        await asyncio.sleep(0.01)
    writes.close()


async def test_writes_land_in_the_order_they_were_asked_for_even_after_a_stall() -> None:
    """A later write of a file must never land before an earlier one that is still stuck (held.json going back)."""
    writes = Writes(deadline=0.2)
    release, started = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        _stuck(release, started)
        order.append("first")

    with pytest.raises(DiskStalled):
        await writes.run("first", first)
    second = asyncio.ensure_future(writes.run("second", order.append, "second"))
    await asyncio.sleep(0)  # the second is queued behind the stuck first
    assert order == []
    release.set()
    await second
    assert order == ["first", "second"]
    writes.close()


async def test_a_fresh_write_answers_and_nothing_is_overdue(tmp_path: Path) -> None:
    writes = Writes(deadline=5.0)
    path = tmp_path / "x"
    await writes.run("x", path.write_text, "y")
    assert path.read_text() == "y" and writes.overdue() is None
    writes.close()


def test_the_journal_state_is_read_while_an_append_hangs_in_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix, `state()` took the writer's lock: every report (which reads the journal) froze the event
    loop behind a hung fsync, lease renewals included. The record is visible once durable, not before."""
    journal = Journal(tmp_path / "journal.jsonl", "n1")
    journal.begin(ACTION, CERT, "anchor")
    release, started = threading.Event(), threading.Event()
    real_fsync = journal_module.os.fsync

    def hung_fsync(fd: int) -> None:
        if threading.current_thread().name == "writer":
            _stuck(release, started)
        real_fsync(fd)

    monkeypatch.setattr(journal_module.os, "fsync", hung_fsync)
    writer = threading.Thread(
        target=journal.intent, args=(ACTION, "fence", 1, CERT), name="writer", daemon=True
    )
    writer.start()
    assert started.wait(30)
    began = time.monotonic()
    state = journal.state()  # must not wait for the writer
    assert time.monotonic() - began < 5.0
    got = state.get(ACTION.id)
    assert got is not None and got.step("fence") is None  # not durable yet: not visible
    release.set()
    writer.join(30)
    got = journal.state().get(ACTION.id)
    assert got is not None and got.step("fence") is not None
    assert journal.replay().get(ACTION.id) is not None


def test_held_is_written_by_one_thread_at_a_time(tmp_path: Path) -> None:
    """Two writes of held.json from different threads use different temporary files (a shared one could tear)."""
    journal = Journal(tmp_path / "journal.jsonl", "n1")
    threads = [threading.Thread(target=journal.save_held, args=(Held(ACTION, term),)) for term in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    held = journal.load_held()
    assert held is not None and held.action == ACTION
    assert not list(tmp_path.glob("held.json.tmp-*"))
