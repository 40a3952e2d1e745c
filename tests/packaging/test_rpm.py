"""The built .rpm (make rpm): file list, requirements and scriptlets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging


def query(rpm: Path, *args: str) -> str:
    if shutil.which("rpm") is None:
        pytest.skip("rpm not installed (apt-get install rpm)")
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True, check=True).stdout


def test_rpm_file_list(rpm: Path) -> None:
    files = set(query(rpm, "-l").split())
    for path in (
        "/usr/bin/kmagent",
        "/usr/share/kmagent/agent/cli.py",
        "/usr/share/kmagent/agent/io/service.py",
        "/usr/lib/systemd/system/kmagent.service",
        "/usr/lib/systemd/system/minkms.service.d/kmagent-preflight.conf",
        "/usr/share/bash-completion/completions/kmagent",
        "/var/lib/kmagent",
        "/etc/kmagent",
    ):
        assert path in files, path
    assert any(p.startswith("/usr/share/man/man8/kmagent.8") for p in files)
    assert any(p.endswith("/kmagent.toml.example") for p in files)
    assert not [p for p in files if "site-packages" in p or "emulator" in p or "/tests/" in p]
    modes = query(rpm, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]")
    assert "drwx------ /var/lib/kmagent" in modes.splitlines()
    assert "-rwxr-xr-x /usr/bin/kmagent" in modes.splitlines()


def test_rpm_requirements(rpm: Path) -> None:
    requires = {line.split()[0] for line in query(rpm, "-R").splitlines() if not line.startswith("rpmlib(")}
    assert {"python3-aiohttp", "python3-cryptography", "python3-psutil", "python3-sdnotify"} <= requires
    assert "python3" in requires and "shadow-utils" in requires
    assert not [
        r
        for r in requires
        if r.startswith("python3-")
        and r not in {"python3-aiohttp", "python3-cryptography", "python3-psutil", "python3-sdnotify"}
    ]


def test_rpm_scriptlets(rpm: Path) -> None:
    scripts = query(rpm, "--scripts")
    assert "groupadd -r kmagent-admin" in scripts
    for scriptlet in ("postinstall", "preuninstall", "postuninstall"):
        assert scriptlet in scripts
    assert "kmagent.service" in scripts and "preset" in scripts
    assert "/var/lib/kmagent" not in scripts, "no scriptlet may remove the agent's state"
