"""`make demo`: the story really happens (the agents heal the lost node step by step, nothing is lost), and the
lab is always torn down: at the end, on Ctrl-C, and in the older manual-runbook variant."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import playbooks
from agent.io.logs import kv
from emulator.lab.demo import LogTail, Story, parse_line
from tests.emulator.test_kmlab import lab_processes

DEMO_TIMEOUT = 300.0  # a demo takes 40-60 s on a quiet machine
MARKS = ["detected", "proposed", "certified", *(f"{s.name} done" for s in playbooks.REJOIN), "healed"]
_TIMELINE_ROW = re.compile(r"^\s+(?P<seconds>\d+\.\d)s  (?P<mark>[\w ]+?)(?::|$)")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: short, since the agents' control sockets live in the lab (a unix socket path has at
    most 107 bytes, and pytest's own directories are long)."""
    path = Path(tempfile.mkdtemp(prefix="kmdemo-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def demo(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "emulator.lab.demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        # As an operator's shell starts it: Ctrl-C delivered. A runner started in the background (`cmd &` in a
        # script) ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the demo did not finish within {DEMO_TIMEOUT:.0f}s:\n" + out)
    return out


def section(out: str, title: str) -> list[str]:
    """The lines of the demo's section whose heading starts with `title`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"=== {title}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("=== ")), len(lines))
    return lines[start + 1 : end]


def assert_torn_down(tmp_path: Path) -> None:
    assert lab_processes(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # purged


@pytest.mark.slow
def test_the_agents_heal_a_lost_disk_step_by_step_and_nothing_is_lost(short_tmp: Path) -> None:
    out = finish(demo(short_tmp, "--keys", "5"))
    assert "=== done" in out, out
    fault = re.search(r"^=== fault: (node\d) loses its disk \((node\d) is the anchor\)", out, re.M)
    assert fault, out
    victim, anchor = fault.groups()
    assert victim != anchor

    # live: every agent saw the node lost, the anchor proposed, every step was done, the agents saw it healed
    live = "\n".join(section(out, "the agents detect it"))
    assert set(re.findall(rf"(node\d) +sees {victim} STATE_LOST", live)) == {"node1", "node2", "node3"}, live
    assert re.search(rf"{anchor} +proposes REJOIN {victim}", live), live
    assert len(set(re.findall(r"(node\d) +agrees: signs REJOIN", live))) >= 2, live  # a quorum of 3
    for step in playbooks.REJOIN:
        assert re.search(rf"step {step.name} done", live), f"no step {step.name} in:\n{live}"
    assert "FAILED" not in live and f"every agent sees {victim} HEALTHY again" in live, live

    # the timeline has every mark, in the order of the story
    rows = [m for line in section(out, "timeline") if (m := _TIMELINE_ROW.match(line))]
    assert [m["mark"] for m in rows] == MARKS, out
    seconds = {m["mark"]: float(m["seconds"]) for m in rows}
    assert seconds["detected"] <= seconds["certified"] and seconds["proposed"] <= seconds["certified"], out
    in_order = [seconds[m] for m in MARKS[2:]]
    assert in_order == sorted(in_order), out
    assert "time to recover" in out

    # nothing lost, and the history records it with its certificate
    assert "5 keys x 3 nodes decrypted; failures: 0" in out, out
    history = "\n".join(section(out, "kmagent history"))
    assert re.search(rf"REJOIN +{victim} +done .*node\d,node\d", history), history
    assert_torn_down(short_tmp)


@pytest.mark.slow
def test_ctrl_c_tears_the_lab_down(short_tmp: Path) -> None:
    proc = demo(short_tmp, "--keys", "3")
    watchdog = threading.Timer(DEMO_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:  # until the lab and its agents are up
            seen.append(line)
            if line.startswith("=== workload"):
                break
        assert seen and seen[-1].startswith("=== workload"), "".join(seen)
        proc.send_signal(signal.SIGINT)
        out = "".join(seen) + finish(proc)
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, out
    assert "interrupted" in out and "=== tearing down" in out, out
    assert_torn_down(short_tmp)


@pytest.mark.slow
def test_manual_runbook_demo_runs_end_to_end_and_tears_down(tmp_path: Path) -> None:
    proc = demo(tmp_path, "--manual", "--keys", "5")
    out = finish(proc)
    assert proc.returncode == 0, out
    assert "failures: 0" in out and "fault to healthy cluster" in out, out
    assert_torn_down(tmp_path)


def test_a_lab_path_too_long_for_the_agents_sockets_is_refused_before_anything_starts(tmp_path: Path) -> None:
    long_tmp = tmp_path / ("x" * 80)
    long_tmp.mkdir()
    proc = demo(long_tmp, "--keys", "1")
    out = finish(proc)
    assert proc.returncode == 1, out
    assert "longer than a unix socket path may be" in out and "set TMPDIR to a shorter directory" in out, out
    assert_torn_down(long_tmp)


# ---- the pieces, without a lab ------------------------------------------------------------------------------


def test_parse_line_reads_what_the_agents_log() -> None:
    detail = 'state moved to "/q/a b"\nnext\\'
    fields = parse_line(f"time=2026-01-02T03:04:05.678 level=warning {kv(event='step_done', detail=detail)}")
    assert fields == {
        "time": "2026-01-02T03:04:05.678",
        "level": "warning",
        "event": "step_done",
        "detail": detail,
    }


def test_log_tail_returns_only_complete_new_lines(tmp_path: Path) -> None:
    log = tmp_path / "kmagent.log"
    log.write_text("before the tail\n")
    tail = LogTail(log)
    assert tail.new_lines() == []
    with log.open("a") as f:
        f.write("one\ntw")
        f.flush()
        assert tail.new_lines() == ["one"]
        f.write("o\n")
    assert tail.new_lines() == ["two"]


def test_story_follows_one_node_and_tells_a_mirrored_step_once() -> None:
    fault = datetime.datetime(2026, 1, 2, 3, 4, 5)  # local time, as the agents log it
    story = Story("node3", fault.timestamp())

    def line(agent: str, seconds: float, **fields: str) -> None:
        stamp = (fault + datetime.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        story.from_log(agent, parse_line(f"time={stamp} level=warning {kv(**fields)}"))

    line("node1", 0.0, event="ack_given", action="a0", kind="REJOIN", target="node3", term="1")
    line("node2", -0.5, event="step_done", action="a0", step="fence", detail="before the fault")
    line("node1", 0.0, event="proposed", action="a1", kind="REJOIN", target="node3", term="2")
    line("node1", 1.5, event="proposed", action="b1", kind="REJOIN", target="node2", term="2")
    line("node3", 2.0, event="step_done", action="a1", step="fence", detail="minkms stopped")
    line("node1", 2.1, event="step_done", action="a1", step="fence", detail="minkms stopped")
    line("node1", 2.2, event="step_done", action="b1", step="quarantine", detail="elsewhere")
    texts = [(e.agent, e.text) for e in story.events]
    assert texts == [
        ("node1", "agrees: signs REJOIN node3 (term 1)"),
        ("node1", "proposes REJOIN node3 as a1 (term 2)"),
        ("node3", "step fence done: minkms stopped"),
    ]
    timeline = dict((label, seconds) for label, seconds, _ in story.timeline())
    assert timeline["proposed"] == pytest.approx(0.0) and timeline["fence done"] == pytest.approx(2.0)
    assert timeline["certified"] is None and timeline["healed"] is None
