"""The built .deb (make deb): its contents, its metadata, lintian, and the chroot install (slow, root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import ROOT

pytestmark = pytest.mark.packaging


def contents(deb: Path) -> dict[str, str]:
    """path -> mode string, from dpkg-deb -c."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {}
    for line in out.splitlines():
        fields = line.split(maxsplit=5)
        files[fields[5].removeprefix(".").split(" -> ")[0].rstrip("/") or "/"] = fields[0]
    return files


def test_deb_contents(deb: Path) -> None:
    files = contents(deb)
    for path in (
        "/usr/bin/kmagent",
        "/usr/share/kmagent/agent/cli.py",
        "/usr/share/kmagent/agent/core/planner.py",
        "/lib/systemd/system/kmagent.service",
        "/lib/systemd/system/minkms.service.d/kmagent-preflight.conf",
        "/usr/share/doc/kmagent/examples/kmagent.toml.example",
        "/usr/share/doc/kmagent/README.Debian",
        "/usr/share/man/man8/kmagent.8.gz",
        "/usr/share/bash-completion/completions/kmagent",
    ):
        assert path in files, path
    assert files["/usr/bin/kmagent"].startswith("-rwxr-xr-x")
    assert not [p for p in files if "dist-packages" in p or "site-packages" in p], "agent must stay private"
    assert not [p for p in files if "emulator" in p or "/tests/" in p or p.endswith(".pyc")]
    assert not [p for p in files if p.startswith("/var/lib/kmagent")], (
        "the state dir is never dpkg's to remove"
    )


def field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout


def test_deb_depends_only_on_debians_packages(deb: Path) -> None:
    depends = {d.split()[0] for d in field(deb, "Depends").replace("\n", "").split(",")}
    assert depends == {
        "adduser",  # addgroup in postinst
        "python3:any",
        "python3-aiohttp",
        "python3-cryptography",
        "python3-psutil",
        "python3-sdnotify",
    }


def test_deb_scripts_create_the_group_and_enable_the_unit(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path)], check=True)
    postinst = (tmp_path / "postinst").read_text()
    assert "addgroup --system --quiet kmagent-admin" in postinst
    assert "deb-systemd-helper" in postinst and "kmagent.service" in postinst
    assert "py3compile" in postinst
    postrm = (tmp_path / "postrm").read_text()
    assert "rm -rf /var/lib/kmagent" not in postrm and "/var/lib/kmagent is kept" in postrm


def test_lintian_clean(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed (apt-get install lintian)")
    changes = sorted(deb.parent.glob(deb.name.replace("_all.deb", "_*.changes")))
    target = changes[0] if changes else deb
    proc = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(target)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:")], proc.stdout


def test_deb_manpage_renders_without_warnings() -> None:
    if shutil.which("man") is None:
        pytest.skip("man not installed")
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(ROOT / "packaging/kmagent.8")],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "80"},
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = re.sub(r".\x08", "", proc.stdout)  # the overstrike of bold and underlined words
    assert re.search(r"kmagent\s+-\s+node\s+agent", text) and "EXIT STATUS" in text


@pytest.mark.slow
def test_deb_installs_on_a_clean_debian_12_chroot(deb: Path) -> None:
    """scripts/check-deb-install: apt-get install, --help, check-config, remove, purge (README.Debian)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot and mounts)")
    if shutil.which("debootstrap") is None and shutil.which("apt-get") is None:
        pytest.skip("neither debootstrap nor apt-get to install it")
    proc = subprocess.run(
        [str(ROOT / "scripts/check-deb-install"), str(deb)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.rstrip().endswith("check-deb-install: OK")
