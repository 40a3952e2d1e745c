"""A crash loop whose cause is minkms's config or HSM/KMS backend is DOWN (an operator matter), never CORRUPT.

The matcher (agent.core.startup), classify_local's rule 2 with it, and the service shell's failure text: secrets
redacted, output capped, the last ended start attempt picked out of a lab log, journalctl never waited on for
ever.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.core.classify import Thresholds, classify_local
from agent.core.model import (
    HealthObs,
    MarkerState,
    MinkmsView,
    NodeClass,
    NodeStatus,
    Observation,
    ServiceObs,
    ServiceState,
    StorageObs,
)
from agent.core.startup import OPERATOR_STARTUP_FAILURES, STATE_DAMAGE, operator_startup_failure
from agent.io.service import Systemd, error_text, lab_last_error, redact

ME, A, B = "127.9.9.3:7373", "127.9.9.1:7373", "127.9.9.2:7373"
REF = {0: A, 1: B, 2: ME}
ROOT = "k1:" + "A" * 20 + "_-" + "b" * 21  # 46 characters, as a k1: key is
HSM = "hsm:aes256:" + "x" * 30 + "+/" + "y" * 11 + "="

# What the emulator prints at each refused start (docs/emulator.md §2.8-2.9; the emulator tests run them for real).
OPERATOR_SIDE = [
    "kms: no TLS configuration provided",
    "kms: no HSM provided: set MINIO_KMS_HSM_KEY",
    "kms: no server certificate provided",
    "kms: no server certificate provided: tls.certs needs 'cert' and 'key'",
    "kms: no server certificate provided: cannot load /etc/minkms/public.crt: [Errno 2] No such file",
    "kms: failed to read config file /etc/minkms/config.yaml: while parsing a flow sequence in "
    "\"<unicode string>\", line 2, column 6 expected ',' or ']', but got '<stream end>'",
    "kms: config file /etc/minkms/config.yaml: not a YAML mapping",
    "kms: config file /etc/minkms/config.yaml: 'version: v1' is required",
    "kms: config file /etc/minkms/config.yaml: hsm.endpoint must be an http:// or https:// URL",
    "kms: invalid duration 'fast'",
    "kms: invalid HSM key: expected the prefix 'hsm:aes256:'",
    "kms: the HSM key cannot unseal this node's state (another HSM key?)",
    "kms: cannot reach the HSM at https://hsm.example:8443/: Cannot connect to host hsm.example:8443",
    "kms: cannot reach the HSM at http://127.0.0.1:9/: no answer within 2s",
    "kms: cannot reach the HSM at http://127.0.0.1:9/: it answered HTTP 503",
    "kms: cannot listen on 127.0.0.1:7373: Address already in use",
    # What a Go minkms would plausibly print (the wording is a GAP; patterns marked [I]).
    "Error: yaml: line 3: did not find expected key",
    "kms: failed to connect to KES server: dial tcp 10.0.0.5:7373: connect: connection refused",
    "kms: vault: Get https://vault:8200/v1/sys/health: dial tcp: lookup vault: no such host",
]
STATE_SIDE = [
    "kms: failed to open database /mnt/minio-kms/kms.db: file is not a database",
    "kms: database /mnt/minio-kms/kms.db is corrupt: *** in database main *** Page 3: btree",
    "kms: database /mnt/minio-kms/kms.db is incomplete or corrupt: KeyError('cluster_id')",
    "kms: failed to open database /mnt/minio-kms/kms.db: database disk image is malformed",
]
UNKNOWN = [
    "kms: server not part of cluster: node 2 was removed from cluster 5f0c…",
    "kms: something nobody has seen before",
    "panic: runtime error: invalid memory address or nil pointer dereference",
]


# --- the matcher -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", OPERATOR_SIDE)
def test_operator_side_failures_are_recognised(line: str) -> None:
    assert operator_startup_failure(line) == line


@pytest.mark.parametrize("line", STATE_SIDE + UNKNOWN)
def test_state_damage_and_unknown_failures_are_not(line: str) -> None:
    assert operator_startup_failure(line) is None


def test_every_pattern_says_where_it_comes_from() -> None:
    for pattern, source in OPERATOR_STARTUP_FAILURES + STATE_DAMAGE:
        assert pattern and source.strip(), pattern


def test_the_most_recent_decisive_line_wins() -> None:
    banner = "INFO  Starting server instance...\nHSM            hsm:minio:soft\n"
    systemd = "minkms.service: Main process exited, code=exited, status=1/FAILURE\n"
    old_hsm = "kms: no HSM provided: set MINIO_KMS_HSM_KEY\n"
    corrupt = "kms: failed to open database /d/kms.db: file is not a database\n"
    # An operator error, then noise that decides nothing: still the operator error.
    text = banner + old_hsm + systemd + "minkms.service: Scheduled restart job, restart counter is at 4.\n"
    assert operator_startup_failure(text) == old_hsm.strip()
    # The key was fixed, and now the state is damaged: that is what counts.
    assert operator_startup_failure(old_hsm + systemd + corrupt + systemd) is None
    # An unknown fatal error after an old operator error: unknown (today's behaviour), not the stale one.
    assert operator_startup_failure(old_hsm + "kms: something new\n" + systemd) is None
    # A damaged state fixed by hand, then a config mistake: the config mistake.
    assert operator_startup_failure(corrupt + "kms: no TLS configuration provided\n") is not None
    # A damage line wins over an operator line in the same line.
    assert operator_startup_failure("kms: no HSM provided; file is not a database") is None
    assert operator_startup_failure(None) is None
    assert operator_startup_failure("") is None
    assert operator_startup_failure(banner + systemd) is None


def test_a_long_line_is_shortened_for_the_reason() -> None:
    line = "kms: no server certificate provided: cannot load " + "/x" * 400
    found = operator_startup_failure(line)
    assert found is not None and found.startswith("kms: no server certificate provided") and len(found) <= 240


# --- classify_local, rule 2 ------------------------------------------------------------------------------------


def crash_loop(last_error: str | None, *, restarts: int = 5, probe_ok: bool = True) -> Observation:
    """A node whose minkms exits at every start, state present and marked: what rule 2 looks at."""
    return Observation(
        at=100.0,
        service=ServiceObs(
            ServiceState.ACTIVATING, restarts=restarts, restarts_in_window=restarts, last_error=last_error
        ),
        health=HealthObs(live=None, ready=None, write=None),
        storage=StorageObs(probe_ok=probe_ok, marker=MarkerState.OK, free_bytes=1 << 34),
        minkms=MinkmsView(error="minkms is not answering"),
    )


@pytest.mark.parametrize("line", OPERATOR_SIDE)
def test_a_crash_loop_with_an_operator_side_error_is_down(line: str) -> None:
    v = classify_local(crash_loop(f"INFO  x\n{line}\n--- kmlab: main process exited"), ME, REF, Thresholds())
    assert v.cls is NodeClass.DOWN
    assert v.reason.startswith("crash loop (5 restarts within the window): minkms cannot start: ")
    assert line[:60] in v.reason and "an operator matter, not corruption" in v.reason


@pytest.mark.parametrize("text", [None, "", *STATE_SIDE, *UNKNOWN])
def test_a_crash_loop_with_damage_or_an_unknown_error_stays_corrupt(text: str | None) -> None:
    v = classify_local(crash_loop(text), ME, REF, Thresholds())
    assert v.cls is NodeClass.CORRUPT and "5 restarts within the crash-loop window" in v.reason


def test_below_the_threshold_the_error_changes_nothing_of_rule_2() -> None:
    v = classify_local(crash_loop("kms: no HSM provided", restarts=2), ME, REF, Thresholds())
    assert v.cls is NodeClass.DOWN and "crash loop" not in v.reason  # rule 3: service is activating


def test_broken_storage_still_names_the_volume() -> None:
    v = classify_local(crash_loop("kms: no HSM provided", probe_ok=False), ME, REF, Thresholds())
    assert v.cls is NodeClass.DOWN and "broken storage" in v.reason


def test_a_recovered_node_is_not_held_by_an_old_error() -> None:
    o = crash_loop("kms: no HSM provided")
    me = NodeStatus(node_id=2, host=ME, role="Follower", members=tuple(sorted(REF.items())))
    o = Observation(
        at=o.at,
        service=ServiceObs(ServiceState.ACTIVE, 5, 99, 5, "kms: no HSM provided"),
        health=HealthObs(live=True, ready=True, write=True),
        storage=o.storage,
        minkms=MinkmsView(nodes_up=(me,)),
    )
    assert classify_local(o, ME, REF, Thresholds()).cls is NodeClass.HEALTHY


def test_existing_constructors_still_work() -> None:
    assert ServiceObs(ServiceState.ACTIVE, 1, 2, 3).last_error is None


# --- the service text: redacted, capped ------------------------------------------------------------------------


BANNER = f"""INFO  Starting server instance...
Version        2025-11-12T19-14-51Z commit=emulator
HSM            hsm:minio:soft
Cluster        ID      0d9c7c6e-1b7a-4a43-9d0f-8f1f9e0e2a11
Endpoint       https://127.9.9.3:7373
API Key        {ROOT}
=> Server is up and running...
"""


def test_secrets_are_redacted() -> None:
    text = (
        BANNER
        + f"MINIO_KMS_HSM_KEY={HSM}\nexport MINIO_KMS_API_KEY={ROOT}\n"
        + f"identity of {HSM} is h1:abc\nk2:{'Z' * 40} password=hunter2 token: abc.def\n"
        + "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n"
        + "kms: no HSM provided: set MINIO_KMS_HSM_KEY\n"
    )
    out = redact(text)
    for secret in (ROOT, ROOT[3:], HSM[11:], "Z" * 40, "hunter2", "abc.def", "MIGHAgEAMBMGByqGSM49"):
        assert secret not in out, secret
    assert "API Key        k1:<redacted>" in out
    assert "MINIO_KMS_HSM_KEY=<redacted>" in out and "hsm:aes256:<redacted>" in out
    assert "HSM            hsm:minio:soft" in out  # the kind of HSM is no secret
    assert "h1:abc" in out  # an identity is public
    assert "kms: no HSM provided: set MINIO_KMS_HSM_KEY" in out  # the error itself survives


def test_error_text_caps_lines_and_size_and_drops_fragments() -> None:
    text = "".join(f"line {i} " + "x" * 1000 + "\n" for i in range(100))
    out = error_text(text)
    assert out is not None
    lines = out.splitlines()
    assert len(lines) <= 30 and len(out) <= 4000
    assert lines[-1].startswith("line 99 ")  # the newest lines are kept
    # A key cut in half at either end of a read must not survive as a fragment.
    assert (
        error_text(
            f"{ROOT[10:]}\nkms: no TLS configuration provided\nAPI Key {ROOT[:9]}",
            partial_first=True,
            partial_last=True,
        )
        == "kms: no TLS configuration provided"
    )
    assert error_text("\n  \n") is None


def test_lab_log_gives_the_last_ended_attempt(tmp_path: Path) -> None:
    log = tmp_path / "minkms.log"
    log.write_text(
        "--- kmlab: start 1 at 2026-01-01T00:00:00Z ---\n"
        + BANNER
        + "--- kmlab: main process exited with signal SIGKILL at 2026-01-01T00:01:00Z ---\n"
        + "--- kmlab: start 2 at 2026-01-01T00:01:01Z ---\n"
        + "kms: no HSM provided: set MINIO_KMS_HSM_KEY\n"
        + "--- kmlab: main process exited with code 1 at 2026-01-01T00:01:02Z ---\n"
        + "--- kmlab: start 3 at 2026-01-01T00:01:03Z ---\n"  # running now, nothing printed yet
    )
    out = lab_last_error(log)
    assert out == (
        "kms: no HSM provided: set MINIO_KMS_HSM_KEY\n"
        "--- kmlab: main process exited with code 1 at 2026-01-01T00:01:02Z ---"
    )
    # Only the first attempt ended: its banner, with the root key redacted.
    log.write_text(
        "--- kmlab: start 1 at T ---\n" + BANNER + "--- kmlab: main process exited with code 0 at T ---\n"
    )
    first = lab_last_error(log)
    assert first is not None and ROOT not in first and "k1:<redacted>" in first
    assert lab_last_error(tmp_path / "missing.log") is None


def test_lab_log_tail_of_a_huge_log(tmp_path: Path) -> None:
    log = tmp_path / "minkms.log"
    with open(log, "w") as fh:
        fh.write("--- kmlab: start 1 at T ---\n")
        for _ in range(5000):
            fh.write(f"API Key        {ROOT}\n")
        fh.write("kms: no TLS configuration provided\n--- kmlab: main process exited with code 1 at T ---\n")
    out = lab_last_error(log)
    assert out is not None and ROOT[3:] not in out and ROOT[20:] not in out
    assert operator_startup_failure(out) == "kms: no TLS configuration provided"


# --- systemd: journalctl, faked --------------------------------------------------------------------------------


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


SHOW_AUTO_RESTART = (
    "MainPID=0\\nNRestarts=4\\nLoadState=loaded\\nActiveState=activating\\nSubState=auto-restart\\n"
)


async def test_systemd_reads_the_journal_of_a_failing_unit(tmp_path: Path) -> None:
    systemctl = script(tmp_path / "systemctl", f"printf '{SHOW_AUTO_RESTART}'")
    journal = tmp_path / "journal.txt"
    journal.write_text(BANNER + "kms: no HSM provided: set MINIO_KMS_HSM_KEY\n")
    journalctl = script(tmp_path / "journalctl", f'echo "$@" > {tmp_path / "args"}\ncat {journal}')
    svc = Systemd("minkms.service", systemctl=str(systemctl), journalctl=str(journalctl), timeout=10)
    obs = await svc.status()
    assert obs.state is ServiceState.ACTIVATING and obs.restarts == 4
    assert obs.last_error is not None and ROOT not in obs.last_error
    assert operator_startup_failure(obs.last_error) == "kms: no HSM provided: set MINIO_KMS_HSM_KEY"
    assert (tmp_path / "args").read_text().split() == [
        "-u",
        "minkms.service",
        "-n",
        "30",
        "-o",
        "cat",
        "--no-pager",
        "-q",
    ]


async def test_systemd_does_not_read_the_journal_of_a_running_unit(tmp_path: Path) -> None:
    show = "MainPID=42\\nNRestarts=0\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\n"
    systemctl = script(tmp_path / "systemctl", f"printf '{show}'")
    journalctl = script(tmp_path / "journalctl", f"touch {tmp_path / 'called'}\necho 'kms: no HSM provided'")
    svc = Systemd("minkms.service", systemctl=str(systemctl), journalctl=str(journalctl), timeout=10)
    for _ in range(3):
        assert await svc.status() == ServiceObs(ServiceState.ACTIVE, restarts=0, main_pid=42)
    assert not (tmp_path / "called").exists()


async def test_systemd_journal_that_hangs_is_given_up(tmp_path: Path) -> None:
    systemctl = script(tmp_path / "systemctl", f"printf '{SHOW_AUTO_RESTART}'")
    journalctl = script(tmp_path / "journalctl", "exec sleep 3600")
    svc = Systemd(
        "minkms.service",
        systemctl=str(systemctl),
        journalctl=str(journalctl),
        timeout=10,
        journal_timeout=0.3,
    )
    started = time.monotonic()
    obs = await svc.status()
    assert obs.state is ServiceState.ACTIVATING and obs.last_error is None
    assert time.monotonic() - started < 20  # not a timing assertion: only "it did not hang"


async def test_systemd_journal_output_is_capped(tmp_path: Path) -> None:
    systemctl = script(tmp_path / "systemctl", f"printf '{SHOW_AUTO_RESTART}'")
    journalctl = script(tmp_path / "journalctl", f"while :; do echo 'API Key        {ROOT}'; done")
    svc = Systemd("minkms.service", systemctl=str(systemctl), journalctl=str(journalctl), timeout=10)
    obs = await svc.status()
    assert obs.last_error is not None and len(obs.last_error) <= 4000 and ROOT[3:] not in obs.last_error


async def test_systemd_without_journalctl_has_no_text(tmp_path: Path) -> None:
    systemctl = script(tmp_path / "systemctl", f"printf '{SHOW_AUTO_RESTART}'")
    svc = Systemd("minkms.service", systemctl=str(systemctl), journalctl=str(tmp_path / "none"), timeout=10)
    obs = await svc.status()
    assert obs.state is ServiceState.ACTIVATING and obs.last_error is None
