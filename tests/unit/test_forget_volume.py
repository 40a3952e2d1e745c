"""`kmagent forget-volume`: drops the recorded volume identity only when asked with --yes, as root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.io.storage import Marker, read_marker, write_marker
from agent.preflight import record_path
from tests.packaging.conftest import ROOT

CONFIG = """\
cluster = "c1"
name = "n1"
[tls]
ca = "{d}/ca.crt"
cert = "{d}/n1.crt"
key = "{d}/n1.key"
[[agents]]
name = "n1"
address = "127.0.0.1:7444"
minkms_host = "127.0.0.1:7373"
[minkms]
api_key_file = "{d}/api.key"
[local]
storage_path = "{d}/data"
[state]
dir = "{d}/state"
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "--config",
            str(tmp_path / "kmagent.toml"),
            "forget-volume",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def marked(tmp_path: Path) -> Path:
    (tmp_path / "kmagent.toml").write_text(CONFIG.format(d=tmp_path))
    (tmp_path / "data").mkdir()
    record = record_path(tmp_path / "state")
    write_marker(tmp_path / "data", Marker("c1", "127.0.0.1:7373", 0, 1.0), record)
    return record


def test_without_yes_it_only_says_what_it_would_forget(tmp_path: Path, marked: Path) -> None:
    before = marked.read_bytes()
    proc = run(tmp_path)
    assert (
        proc.returncode == 1
        and "Run again with --yes" in proc.stdout
        and str(tmp_path / "data") in proc.stdout
    )
    assert marked.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="forget-volume changes the agent's state: it needs root")
def test_with_yes_it_drops_the_identity_and_keeps_the_record(tmp_path: Path, marked: Path) -> None:
    proc = run(tmp_path, "--yes")
    assert proc.returncode == 0, proc.stderr
    recorded = read_marker(marked)
    assert recorded is not None and recorded.volume is None and recorded.cluster == "c1"
    assert "volume" not in json.loads(marked.read_text())
    again = run(tmp_path, "--yes")
    assert again.returncode == 0 and "nothing to forget" in again.stdout
