"""The emulator fails where minkms fails, and the agent can tell why.

Each misconfiguration (no TLS, no server certificate, a config that does not parse, no HSM key, an external HSM
that does not answer) makes `minkms server` exit non-zero at start with its message on stderr; a damaged state
fails with a different message. In a lab, the agent's LabSupervisor shows that message as the service's last
error, the matcher calls it an operator matter (or not, for damage), and the state survives it all.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.classify import Thresholds, classify_local
from agent.core.model import (
    HealthObs,
    MarkerState,
    MinkmsView,
    NodeClass,
    Observation,
    ServiceObs,
    ServiceState,
    StorageObs,
)
from agent.core.startup import operator_startup_failure
from agent.io.service import LabSupervisor
from emulator.hsm import SoftHSM
from emulator.lab import pki, supervisor
from emulator.lab.lab import Lab, LabNode, wait_for

DEADLINE = 30.0  # seconds a refused start may take (a Python start-up on a loaded CI machine)


def refused_start(
    tmp_path: Path, config: str | None, hsm: str | None, data: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `minkms server` that must refuse to start; it has DEADLINE seconds to exit."""
    data = data or tmp_path / "data"
    data.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MINIO_KMS_HSM_KEY"}
    env["HOME"] = str(tmp_path)  # no ~/.minkms/config.yaml to fall back on
    if hsm is not None:
        env["MINIO_KMS_HSM_KEY"] = hsm
    argv = [sys.executable, "-m", "emulator", "server", str(data), "--address", "127.0.0.1:0"]
    argv += ["--host", "127.0.0.1:7373"]
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(config)
        argv += ["--config", str(path)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=DEADLINE)


@pytest.fixture
def tls(tmp_path: Path) -> str:
    """The `tls:` part of a valid config."""
    pki.create_ca(tmp_path / "ca")
    cert, key = pki.issue(tmp_path / "ca", tmp_path / "node", "node", ips=["127.0.0.1"], dns=[])
    return f"tls:\n  certs:\n    - key: {key}\n      cert: {cert}\n"


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hsm_server() -> Iterator[Callable[[int], str]]:
    """Start HTTP servers that answer every GET with a given status; returns their URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(status: int) -> str:
        handler = type("Answer", (_Answer,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/health"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_hsm() -> Iterator[str]:
    """An HSM endpoint that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


# --- standalone: every misconfiguration exits at start with its message ----------------------------------------


def assert_operator_side(proc: subprocess.CompletedProcess[str], message: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert message in proc.stderr, proc.stderr
    found = operator_startup_failure(proc.stderr)
    assert found is not None and message in found, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, like the Go binary's errors


def test_no_tls_configuration(tmp_path: Path) -> None:
    assert_operator_side(
        refused_start(tmp_path, None, str(SoftHSM.generate())), "kms: no TLS configuration provided"
    )
    assert_operator_side(
        refused_start(tmp_path, "version: v1\n", str(SoftHSM.generate())),
        "kms: no TLS configuration provided",
    )


def test_no_server_certificate(tmp_path: Path) -> None:
    hsm = str(SoftHSM.generate())
    assert_operator_side(
        refused_start(tmp_path, "version: v1\ntls:\n  certs: []\n", hsm),
        "kms: no server certificate provided",
    )
    missing = "version: v1\ntls:\n  certs:\n    - key: /nonexistent.key\n      cert: /nonexistent.crt\n"
    assert_operator_side(
        refused_start(tmp_path, missing, hsm), "kms: no server certificate provided: cannot load"
    )


@pytest.mark.parametrize("text", ["version: v1\ntls: [\n", "version: v1\n  tls: {certs: [}\n", ": : :\n"])
def test_config_that_does_not_parse(tmp_path: Path, text: str) -> None:
    assert_operator_side(
        refused_start(tmp_path, text, str(SoftHSM.generate())), "kms: failed to read config file"
    )


def test_no_hsm_key(tmp_path: Path, tls: str) -> None:
    config = f"version: v1\n{tls}"
    assert_operator_side(refused_start(tmp_path, config, None), "kms: no HSM provided")
    assert_operator_side(refused_start(tmp_path, config, ""), "kms: no HSM provided")
    assert_operator_side(refused_start(tmp_path, config, "hsm:aes256:garbage"), "kms: invalid HSM key")


def test_hsm_endpoint_refusing_connections(tmp_path: Path, tls: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}/"
    proc = refused_start(tmp_path, f"version: v1\n{tls}hsm:\n  endpoint: {url}\n", str(SoftHSM.generate()))
    assert_operator_side(proc, f"kms: cannot reach the HSM at {url}: ")


def test_hsm_endpoint_that_never_answers(tmp_path: Path, tls: str, silent_hsm: str) -> None:
    config = f"version: v1\n{tls}hsm:\n  endpoint: {silent_hsm}\n  timeout: 500ms\n"
    started = time.monotonic()
    proc = refused_start(tmp_path, config, str(SoftHSM.generate()))
    assert_operator_side(proc, f"kms: cannot reach the HSM at {silent_hsm}: no answer within 0.5s")
    assert time.monotonic() - started < DEADLINE


def test_hsm_endpoint_answering_5xx(tmp_path: Path, tls: str, hsm_server: Callable[[int], str]) -> None:
    url = hsm_server(503)
    proc = refused_start(tmp_path, f"version: v1\n{tls}hsm:\n  endpoint: {url}\n", str(SoftHSM.generate()))
    assert_operator_side(proc, f"kms: cannot reach the HSM at {url}: it answered HTTP 503")


@pytest.mark.parametrize(
    "section, message",
    [
        ("hsm: https://hsm.example\n", "'hsm' must be a mapping"),
        ("hsm:\n  endpoint: ftp://hsm.example\n", "hsm.endpoint must be an http:// or https:// URL"),
        ("hsm:\n  endpoint: http://127.0.0.1:1/\n  timeout: [1]\n", "hsm.timeout must be a duration"),
    ],
)
def test_hsm_section_that_is_wrong(tmp_path: Path, tls: str, section: str, message: str) -> None:
    assert_operator_side(
        refused_start(tmp_path, f"version: v1\n{tls}{section}", str(SoftHSM.generate())), message
    )


def test_unreachable_hsm_is_found_before_the_state_is_read(tmp_path: Path, tls: str) -> None:
    """A damaged disk behind an unreachable HSM: the HSM is what minkms reports (it never got to the disk)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "kms.db").write_bytes(os.urandom(8192))
    url = f"http://127.0.0.1:{closed_port()}/"
    config = f"version: v1\n{tls}hsm:\n  endpoint: {url}\n"
    assert_operator_side(
        refused_start(tmp_path, config, str(SoftHSM.generate()), data), "cannot reach the HSM"
    )


def test_damaged_state_fails_differently(tmp_path: Path, tls: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "kms.db").write_bytes(os.urandom(8192))
    proc = refused_start(tmp_path, f"version: v1\n{tls}", str(SoftHSM.generate()), data)
    assert proc.returncode != 0
    assert "kms: failed to open database" in proc.stderr and "file is not a database" in proc.stderr
    assert operator_startup_failure(proc.stderr) is None


# --- in a lab: the supervisor's log shows it, the agent reads it -----------------------------------------------


def crash_looping(obs: ServiceObs) -> Observation:
    return Observation(
        at=0.0,
        service=ServiceObs(obs.state, obs.restarts, obs.main_pid, max(obs.restarts, 3), obs.last_error),
        health=HealthObs(live=None, ready=None, write=None),
        storage=StorageObs(probe_ok=True, marker=MarkerState.OK),
        minkms=MinkmsView(error="minkms is not answering"),
    )


async def last_error_until(svc: LabSupervisor, ok: Callable[[str], bool], what: str) -> ServiceObs:
    """Poll the agent's view of the lab program until its last error satisfies ok, within DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        obs = await svc.status()
        if obs.restarts >= 1 and obs.last_error is not None and ok(obs.last_error):
            return obs
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}; last status {obs}")
        await asyncio.sleep(0.1)  # poll interval of a deadline loop


def rewrite_config(node: LabNode, change: Callable[[dict[str, Any]], Any]) -> None:
    path = Path(node.dir) / "config.yaml"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def replace_program(lab: Lab, node: LabNode, env: dict[str, str]) -> None:
    """Run the node's minkms with another environment (the supervisor starts it at once)."""
    program = lab.program(node)
    program["env"] = {**program["env"], **env}
    for request in (
        {"op": "remove", "name": node.name},
        {"op": "add", "name": node.name, "program": program},
    ):
        reply = supervisor.request(lab.sock, request, timeout=30)
        assert reply.get("ok"), reply


async def test_lab_supervisor_shows_why_minkms_cannot_start(
    lab_factory: Callable[..., Lab], hsm_server: Callable[[int], str]
) -> None:
    lab = lab_factory(1)
    node = lab.nodes()[0]
    svc = LabSupervisor(lab.sock, node.name, timeout=30)
    config_path = Path(node.dir) / "config.yaml"
    original = config_path.read_text()
    lab.minkms("add-key", "survivor", node=node)  # state that a REJOIN would have thrown away

    async def expect(message: str) -> None:
        obs = await last_error_until(
            svc, lambda text: message in (operator_startup_failure(text) or ""), f"{node.name}: {message!r}"
        )
        assert obs.state in (ServiceState.ACTIVATING, ServiceState.ACTIVE, ServiceState.FAILED)
        assert lab.hsm_key().split(":")[2] not in (obs.last_error or "")
        verdict = classify_local(crash_looping(obs), node.host, {0: node.host}, Thresholds())
        assert verdict.cls is NodeClass.DOWN and message in verdict.reason, verdict

    url = f"http://127.0.0.1:{closed_port()}/"
    cases: list[tuple[str, Callable[[], object]]] = [
        (
            "kms: cannot reach the HSM at",
            lambda: rewrite_config(node, lambda c: c.update(hsm={"endpoint": url})),
        ),
        ("kms: failed to read config file", lambda: config_path.write_text("version: v1\ntls: [\n")),
        ("kms: no TLS configuration provided", lambda: rewrite_config(node, lambda c: c.pop("tls"))),
    ]
    for message, breakage in cases:
        lab.fault(node.name, "stop")
        breakage()
        lab.fault(node.name, "start")
        await expect(message)
        lab.fault(node.name, "stop")
        config_path.write_text(original)

    replace_program(lab, node, {"MINIO_KMS_HSM_KEY": ""})
    await expect("kms: no HSM provided")
    replace_program(lab, node, {})  # the lab's own program again: started at once

    # The state survived every refused start: the node comes back as it was, on a reachable HSM too.
    lab.fault(node.name, "stop")
    rewrite_config(node, lambda c: c.update(hsm={"endpoint": hsm_server(200)}))
    lab.fault(node.name, "start")
    wait_for(lambda: lab.probe(node, "ready"), DEADLINE, f"{node.name} ready again")
    assert "survivor" in lab.minkms("ls-key", node=node).stdout.split()
    assert (await svc.status()).state is ServiceState.ACTIVE

    # Damage is not an operator matter: the last error names it, and the matcher leaves it to CORRUPT.
    lab.fault(node.name, "corrupt")
    obs = await last_error_until(svc, lambda text: "file is not a database" in text, "the damaged database")
    assert operator_startup_failure(obs.last_error) is None
    assert (
        classify_local(crash_looping(obs), node.host, {0: node.host}, Thresholds()).cls is NodeClass.CORRUPT
    )
