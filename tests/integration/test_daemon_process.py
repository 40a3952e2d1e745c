"""The real daemon process against a live lab node: the systemd notify sequence, reloads good and bad, a clean
stop, and a minkms CLI that misbehaves in every way a parser can be fed (the daemon must never die of it)."""

from __future__ import annotations

import functools
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.io.control import ControlError, DaemonNotRunning, call
from emulator.lab.lab import Lab, LabError, LabNode, wait_for
from tests.unit.test_notify import FakeSystemd

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A 3-node lab whose own agents are stopped: the agent under test is alone, so no anchor is ever elected
    and it judges membership from its own minkms only (what these tests are about)."""
    lab = Lab(tmp_path_factory.mktemp("daemon") / "lab")
    try:
        lab.up(3, heartbeat="100ms", log=lambda _line: None, agents=True)
        for node in lab.nodes():
            lab.fault(node.name, "agent-stop")
        yield lab
    finally:
        lab.down()


def agent_config(lab: Lab, node: LabNode, path: Path, **replace: str) -> Path:
    """A copy of the lab's config of `node`, with whole `key = value` lines replaced (key -> new value text)."""
    text = lab.agent_config(node).read_text()
    for key, value in replace.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, f"no single {key} line in the lab's agent config"
    path.write_text(text)
    return path


class Daemon:
    """`python -m agent.cli --config X daemon` as systemd would run it; its output goes to a log file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.log = config, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(config), "daemon"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError("the daemon did not stop within 20s of SIGTERM") from None
        return self.proc.returncode


def status(socket: Path, timeout: float = 5) -> dict[str, Any]:
    """The node entry of /v1/status; {} while the daemon does not answer."""
    try:
        answer: dict[str, Any] = call(socket, "GET", "/v1/status", timeout=timeout)
    except DaemonNotRunning:
        return {}
    return answer.get("local") or {}


def kmagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


# ---- the notify sequence ----------------------------------------------------------------------------------------


class ReadyProbe(FakeSystemd):
    """A NOTIFY_SOCKET that, the moment READY=1 arrives, asks the daemon's control socket whether it answers."""

    def __init__(self, path: Path, control: Path) -> None:
        self.control = control
        self.answer_at_ready: Any = None
        super().__init__(path)
        self.messages = _Hooked(self._on_message)

    def _on_message(self, text: str) -> None:
        if text.startswith("READY=1") and self.answer_at_ready is None:
            try:
                self.answer_at_ready = call(self.control, "GET", "/v1/version", timeout=5)
            except (DaemonNotRunning, ControlError, OSError) as exc:
                self.answer_at_ready = exc

    def texts(self) -> list[str]:
        return [m for _, m in list(self.messages)]

    def after(self, index: int, predicate: Callable[[str], bool], timeout: float = 30) -> int:
        """Wait for a message after position `index` (-1: any) that matches; return its position."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, text in enumerate(self.texts()):
                if i > index and predicate(text):
                    return i
            time.sleep(0.02)
        raise AssertionError(f"no matching notify message after #{index}; got {self.texts()}")


class _Hooked(list[tuple[float, str]]):
    """The recorder's message list, calling back on every arrival (in the receiving thread, in order)."""

    def __init__(self, hook: Callable[[str], None]) -> None:
        super().__init__()
        self.hook = hook

    def append(self, item: tuple[float, str]) -> None:
        self.hook(item[1])
        super().append(item)


def one_line_fields(text: str) -> bool:
    """Every line of a notify datagram is one VAR=value: a STATUS with a newline would break the protocol."""
    return all(re.fullmatch(r"[A-Z_]+=[^\n]*", line) for line in text.split("\n"))


def test_notify_sequence_reloads_and_stop_of_the_real_daemon(lab: Lab, tmp_path: Path) -> None:
    node = lab.nodes()[0]
    config = agent_config(lab, node, tmp_path / "kmagent.toml")
    socket = lab.agent_socket(node)
    systemd = ReadyProbe(tmp_path / "notify.sock", socket)
    daemon = Daemon(
        config, tmp_path / "daemon.log", {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000"}
    )
    try:
        ready = systemd.after(-1, lambda m: m.startswith("READY=1"))
        assert isinstance(systemd.answer_at_ready, dict), systemd.answer_at_ready  # bound before READY
        assert "started: agent node1 of cluster kmlab" in systemd.texts()[ready]
        wait_for(lambda: status(socket).get("class") == "HEALTHY", 40, "node1 to be HEALTHY")

        # Watchdog pings from the loop at about half of WATCHDOG_USEC, never late enough for systemd to kill.
        systemd.wait_for(lambda _m: len([t for t, m in list(systemd.messages) if m == "WATCHDOG=1"]) >= 6)
        pings = [t for t, m in list(systemd.messages) if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 0.3 < sum(gaps) / len(gaps) < 0.8 and max(gaps) < 1.0, gaps

        # SIGHUP: RELOADING=1 (with the MONOTONIC_USEC of Type=notify-reload), then READY=1.
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = systemd.after(ready, lambda m: m.startswith("RELOADING=1"))
        usec = int(
            dict(line.split("=", 1) for line in systemd.texts()[reloading].split("\n"))["MONOTONIC_USEC"]
        )
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        ready = systemd.after(reloading, lambda m: m.startswith("READY=1"))
        assert "STATUS=reloaded: " in systemd.texts()[ready]

        # `kmagent reload` with a good change: the same sequence, exit 0, and the new value in effect.
        agent_config(lab, node, config, low_space='"1000TiB"')
        proc = kmagent("--config", str(config), "reload")
        assert proc.returncode == 0 and "reloaded" in proc.stdout, proc.stderr
        reloading = systemd.after(ready, lambda m: m.startswith("RELOADING=1"))
        ready = systemd.after(reloading, lambda m: m.startswith("READY=1"))
        low = wait_for(
            lambda: (s := status(socket)).get("class") == "DEGRADED" and s, 20, "the new low_space to apply"
        )
        assert "low free space" in low["reason"]

        # A bad config on disk: `kmagent reload` exits 1 naming the error; the daemon keeps the old config.
        agent_config(lab, node, config, low_space='"64MiB"\nbogus_key = 1')  # would be HEALTHY if applied
        # no --socket: the CLI still finds the daemon's socket in the invalid file
        proc = kmagent("--config", str(config), "reload")
        assert proc.returncode == 1 and "bogus_key" in proc.stderr and "unknown key" in proc.stderr, (
            proc.stderr
        )
        rejected = systemd.after(ready, lambda m: m.startswith("READY=1"))
        assert "STATUS=reload rejected, running config kept:" in systemd.texts()[rejected]
        assert "bogus_key" in systemd.texts()[rejected]
        assert daemon.alive()
        uptime = call(socket, "GET", "/v1/status", timeout=5)["uptime_seconds"]

        def observed_since_rejection() -> dict[str, Any] | None:
            answer = call(socket, "GET", "/v1/status", timeout=5)
            node_status: dict[str, Any] = answer["local"]
            fresh = answer["uptime_seconds"] - node_status["observed_seconds_ago"] > uptime + 2.5
            return node_status if fresh else None

        kept = wait_for(observed_since_rejection, 20, "an observation made after the rejected reload")
        assert kept["class"] == "DEGRADED" and "low free space" in kept["reason"]  # still the old 1000TiB

        # Every datagram so far: one VAR=value per line.
        assert all(one_line_fields(m) for m in systemd.texts()), systemd.texts()

        # SIGTERM: STOPPING=1, exit code 0, the control socket removed.
        assert daemon.stop() == 0, daemon.log.read_text()[-2000:]
        systemd.after(rejected, lambda m: m == "STOPPING=1", timeout=5)
        assert not socket.exists()
        assert lab.api_key() not in daemon.log.read_text()
    finally:
        daemon.stop()
        systemd.close()


# ---- a misbehaving minkms CLI -----------------------------------------------------------------------------------

FAKE_CLI = """#!/bin/sh
# A minkms CLI that misbehaves as ./mode says; every pid it starts is recorded in ./pids.
here=$(dirname "$0")
echo $$ >> "$here/pids"
case "$(cat "$here/mode")" in
  garbage) echo '<html>502 Bad Gateway</html>' ;;
  truncated) printf '{"nodes_up": {"0": {"node_id": 0, "host": "127.0' ;;
  wrong-shape) echo '{"nodes_up": {"0": "up", "1": ["Leader"]}, "nodes_down": {}}' ;;
  array) echo '[{"nodes_up": {}}]' ;;
  empty) ;;
  huge) head -c 6000000 /dev/zero | tr '\\0' ' ' ; echo '{}' ;;
  error) echo "minkms: error: access denied for API key $MINIO_KMS_API_KEY" >&2; exit 3 ;;
  hang) sleep 3600 & echo $! >> "$here/pids"; wait ;;
esac
"""

# mode -> words the agent's reason must contain (the class is DEGRADED: live, but no readable membership)
MODES = [
    ("garbage", "not valid JSON: line 1 column 1"),
    ("truncated", "not valid JSON: line 1 column 43: Unterminated string"),
    ("wrong-shape", "no usable node in nodes_up"),
    ("array", "not a JSON object (got an array)"),
    ("empty", "stat --json output is empty"),
    ("huge", "output exceeds"),
    ("error", "minkms stat --json failed: minkms: error: access denied for API key ***"),
    ("hang", "minkms stat --json failed: timed out after 2s"),
]


def recorded_pids(directory: Path) -> set[int]:
    try:
        return {int(line) for line in (directory / "pids").read_text().split()}
    except FileNotFoundError:
        return set()


def running(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_malformed_minkms_output_never_crashes_the_daemon(lab: Lab, tmp_path: Path) -> None:
    node = lab.nodes()[1]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "minkms").write_text(FAKE_CLI)
    (fake / "minkms").chmod(0o755)
    (fake / "mode").write_text("garbage")
    config = agent_config(
        lab, node, tmp_path / "kmagent.toml", cli=f'"{fake / "minkms"}"', command_timeout='"2s"'
    )
    socket = lab.agent_socket(node)
    daemon = Daemon(config, tmp_path / "daemon.log")
    seen: set[str] = set()
    latest: dict[str, Any] = {}

    def reports(words: str) -> dict[str, Any] | None:
        current = latest["status"] = status(socket)
        seen.add(current.get("class", "?"))
        return current if words in current.get("reason", "") else None

    try:
        for mode, words in MODES:
            (fake / "mode").write_text(mode)
            if mode == "hang":
                # While the CLI hangs, the control socket still answers at once.
                hung = wait_for(lambda: running(recorded_pids(fake)), 20, "the fake CLI to hang")
                assert status(socket, timeout=1.5)["class"] == "DEGRADED"
                assert running(hung)
            try:
                reached = wait_for(
                    functools.partial(reports, words), 30, f"the agent to report {mode} output"
                )
            except LabError as exc:
                raise AssertionError(f"{exc}; its last status: {latest.get('status')}") from None
            assert reached["class"] == "DEGRADED", (mode, reached["reason"], reached)
            assert reached["health"]["live"] is True  # the node itself is fine: only its CLI output is not
            assert daemon.alive(), daemon.log.read_text()[-2000:]
        # A hung CLI is killed with its whole process group at command_timeout: nothing leaks.
        (fake / "mode").write_text("empty")
        wait_for(lambda: not running(recorded_pids(fake)), 20, "every fake CLI process to be gone")
        assert "HEALTHY" not in seen, seen
        assert daemon.stop() == 0
        log = daemon.log.read_text()
        assert lab.api_key() not in log and "Traceback" not in log, log[-2000:]
    finally:
        daemon.stop()
