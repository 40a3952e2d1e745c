"""systemd/kmagent.service: systemd accepts every line, and its sandbox rates 3.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import ROOT

pytestmark = pytest.mark.packaging

UNIT = ROOT / "systemd" / "kmagent.service"
SYSTEM_UNITS = Path("/lib/systemd/system")


def systemd_version() -> int:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[1])


def test_verify_reports_nothing(tmp_path: Path) -> None:
    """verify exits 0 even on an unknown key: its stderr must be empty.

    It runs against a root holding the system's units, the unit, and a stand-in /usr/bin/kmagent (the real one
    is installed by the package); the man page is checked by lintian and test_deb, hence --man=no.
    """
    if systemd_version() < 250 or not (SYSTEM_UNITS / "sysinit.target").exists():
        pytest.skip(
            "needs systemd-analyze >= 250 (verify --root) and the system's units in /lib/systemd/system"
        )
    units = tmp_path / "usr/lib/systemd/system"
    shutil.copytree(SYSTEM_UNITS, units, symlinks=True)
    shutil.copy(UNIT, units / "kmagent.service")
    launcher = tmp_path / "usr/bin/kmagent"
    launcher.parent.mkdir(parents=True)
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    proc = _verify(tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    # The check is not blind: a misspelt key is reported.
    (units / "kmagent.service").write_text(UNIT.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    proc = _verify(tmp_path)
    assert "Unknown key 'WatchdogSecs'" in proc.stderr


def exposure(unit: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


def test_security_exposure_at_most_3() -> None:
    if systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert exposure(UNIT) <= 3.0


def test_sandbox_keeps_what_the_agent_needs() -> None:
    """The directives the issue requires, and none that would hide minkms' or a client's /proc from the agent."""
    lines = {line.strip() for line in UNIT.read_text().splitlines() if line and not line.startswith("#")}
    for needed in (
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/usr/bin/kmagent reload",
        "Restart=on-failure",
        "RuntimeDirectory=kmagent",
        "StateDirectory=kmagent",
        "UMask=0077",
        "ConditionPathExists=/etc/kmagent/kmagent.toml",
        "ProtectSystem=strict",
        "ReadWritePaths=-/mnt/minio-kms",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ):
        assert needed in lines, needed
    assert any(line.startswith("WatchdogSec=") for line in lines)
    assert any(line.startswith("StartLimitBurst=") for line in lines)
    text = "\n".join(lines)
    assert "ProtectProc=" not in text and "ProcSubset=" not in text and "PrivatePIDs" not in text
    caps = next(line for line in lines if line.startswith("CapabilityBoundingSet="))
    # Moving and re-owning minkms' files; no CAP_SYS_ADMIN, CAP_KILL, CAP_NET_*, CAP_SYS_PTRACE...
    assert set(caps.split("=", 1)[1].split()) == {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
    }


def test_preflight_drop_in_runs_the_installed_command() -> None:
    text = (ROOT / "systemd/minkms.service.d/kmagent-preflight.conf").read_text()
    assert "ExecStartPre=+/usr/bin/kmagent preflight" in text.splitlines()


def _verify(root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit installed under `root` (it exits 0 even on typos: read stderr)."""
    return subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            f"--root={root}",
            "/usr/lib/systemd/system/kmagent.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
