"""`minkms server` start-up: it refuses to run without TLS or an HSM key, and on state it must not serve."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from emulator.hsm import SoftHSM
from emulator.lab import pki
from emulator.lab.lab import Lab, corrupt, wait_for


def server(
    data: Path,
    config: Path | None,
    hsm: str | None,
    host: str = "127.0.0.1:0",
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to refuse to start (it would otherwise block until the timeout)."""
    env = {k: v for k, v in os.environ.items() if k != "MINIO_KMS_HSM_KEY"}
    env["HOME"] = str(data.parent)  # no ~/.minkms/config.yaml to fall back on
    if hsm is not None:
        env["MINIO_KMS_HSM_KEY"] = hsm
    argv = [sys.executable, "-m", "emulator", "server", str(data), "--address", host, "--host", host]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv + (extra or []), env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    pki.create_ca(tmp_path / "ca")
    return pki.issue(tmp_path / "ca", tmp_path / "node", "node", ips=["127.0.0.1"], dns=[])


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_refuses_to_start_without_a_tls_configuration(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    proc = server(tmp_path / "data", None, str(SoftHSM.generate()))
    assert proc.returncode == 1
    assert "kms: no TLS configuration provided" in proc.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: v1\n", "no TLS configuration provided"),
        ("version: v1\ntls:\n  certs: []\n", "no server certificate provided"),
        (
            "version: v1\ntls:\n  certs:\n    - key: /nonexistent.key\n      cert: /nonexistent.crt\n",
            "cannot load",
        ),
        ("tls: {}\n", "'version: v1' is required"),
        ("version: v1\ntls: [\n", "failed to read config file"),
    ],
)
def test_refuses_to_start_with_a_bad_config(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "data").mkdir()
    proc = server(tmp_path / "data", write_config(tmp_path / "config.yaml", text), str(SoftHSM.generate()))
    assert proc.returncode == 1
    assert message in proc.stderr


def test_refuses_to_start_without_an_hsm_key(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(
        tmp_path / "config.yaml",
        f"version: v1\ntls:\n  certs:\n    - key: {certs[1]}\n      cert: {certs[0]}\n",
    )
    proc = server(tmp_path / "data", cfg, None)
    assert proc.returncode == 1 and "kms: no HSM provided" in proc.stderr
    proc = server(tmp_path / "data", cfg, "hsm:aes256:garbage")
    assert proc.returncode == 1 and "invalid HSM key" in proc.stderr


def test_node_state_needs_its_own_hsm_key(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    node = lab.nodes()[0]
    lab.fault(node.name, "stop")
    cfg = Path(node.dir) / "config.yaml"
    proc = server(node.data, cfg, str(SoftHSM.generate()), host=node.host)
    assert proc.returncode == 1 and "cannot unseal" in proc.stderr


def test_host_that_does_not_match_the_membership_fails_at_start(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    node = lab.nodes()[0]
    lab.fault(node.name, "stop")
    other = node.ip.rsplit(".", 1)[0] + ".99:7373"
    proc = server(node.data, Path(node.dir) / "config.yaml", lab.hsm_key(), host=other)
    assert proc.returncode == 1
    assert "server not part of cluster" in proc.stderr and node.host in proc.stderr


def test_corrupt_database_fails_at_every_start_and_the_supervisor_keeps_restarting(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = lab_factory(3)
    node = lab.nodes()[2]
    lab.fault(node.name, "corrupt")
    wait_for(lambda: lab.programs()[node.name]["n_restarts"] >= 2, 30, "a crash loop")
    assert not lab.probe(node, "live")
    log = (Path(node.dir) / "minkms.log").read_text()
    assert "kms: failed to open database" in log or "is corrupt" in log


def test_corrupt_helper_refuses_a_missing_database(tmp_path: Path) -> None:
    from emulator.lab.lab import LabError

    with pytest.raises(LabError, match="does not exist"):
        corrupt(tmp_path)
