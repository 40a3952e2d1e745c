"""Why minkms cannot start: an operator-side start-up failure (config, HSM/KMS backend) or something else.

Pure: text in, verdict out. A minkms that exits at every start crash-loops under `Restart=always` whatever the
reason. When the reason is its configuration or its HSM/KMS backend, its state is intact and a REJOIN (which
quarantines that state and starts a fresh node with the same configuration) cannot help: the fresh node fails the
same way. `classify_local` uses `operator_startup_failure` to call such a loop DOWN, never CORRUPT; the simulator
can use it the same way.

The text is the service manager's record of the last start attempts (the unit's journal, the lab supervisor's log),
oldest line first. The most recent *decisive* line wins: a line that matches a known operator-side failure, a known
sign of damaged state, or any other `kms: …` fatal line (minkms prints its start-up errors with that prefix,
reference §3.2). So an operator error that has since been fixed and followed by another failure does not keep the
node out of the CORRUPT path; an unknown failure keeps today's behaviour.
"""

from __future__ import annotations

import re

__all__ = ["OPERATOR_STARTUP_FAILURES", "STATE_DAMAGE", "operator_startup_failure"]

_MAX_REASON = 240

# (pattern, where it comes from). Searched case-insensitively in each line of minkms's start-up output.
OPERATOR_STARTUP_FAILURES: tuple[tuple[str, str], ...] = (
    # The three start-up errors the minkms troubleshooting page documents (reference §3.2 and §2.1, [D]).
    (r"no TLS configuration provided", "minkms docs, troubleshooting [D]; emulator §2.9"),
    (r"no HSM provided", "minkms docs, troubleshooting [D]; emulator §2.9"),
    (r"no server certificate provided", "minkms docs, troubleshooting [D]; emulator §2.9"),
    # Config file errors. The emulator's messages (docs/emulator.md §2.8), and Go's yaml package, whose errors
    # read "yaml: line N: …" (minkms is written in Go; its exact wording is a GAP) [I].
    (r"failed to read config file", "emulator §2.8 (unreadable or unparsable YAML)"),
    (r"config file .*: (not a YAML mapping|'version: v1' is required|'hsm' must|hsm\.)", "emulator §2.8"),
    (r"\byaml: (line \d+|unmarshal errors)", "Go yaml parse errors [I]"),
    (r"\binvalid duration\b", "emulator §2.8 (heartbeat)"),
    (r"admin\.identity is not supported", "emulator §2.8"),
    (r"cannot load the CA certificates", "emulator §2.8 (tls.ca)"),
    # A malformed MINIO_KMS_HSM_KEY, and state sealed by another HSM key: the state is intact, the key is wrong
    # (reference §3.1, §5: "All nodes share the HSM key") [D]; messages from emulator §2.9.
    (r"invalid HSM key", "emulator §2.9 (malformed MINIO_KMS_HSM_KEY)"),
    (r"HSM key cannot unseal", "emulator §2.9 (another HSM key: a configuration error, not damage)"),
    # An external HSM / KMS backend that does not answer at start-up: the emulator's `hsm.endpoint` (emulator
    # §2.8, a decision), and Go's network errors naming such a backend [I].
    (r"cannot reach the (HSM|KMS|KES|Vault)\b", "emulator §2.8 (hsm.endpoint)"),
    (
        r"\b(HSM|KES|Vault|key ?store)\b.*\b(unreachable|connection refused|no route to host|i/o timeout"
        r"|timed out|failed to connect|dial tcp|no such host)\b",
        "Go network errors naming an HSM/KMS backend [I]",
    ),
    # The listen address is taken or not on this host (emulator §2.9; Go's "bind: address already in use" [I]).
    (r"cannot listen on|address already in use|cannot assign requested address", "emulator §2.9, Go [I]"),
)

# Signs that the state itself is damaged: never an operator-side verdict, even if another line matches.
STATE_DAMAGE: tuple[tuple[str, str], ...] = (
    (r"file is not a database", "SQLite, via emulator §2.9 (kmlab `corrupt` fault)"),
    (r"database disk image is malformed", "SQLite"),
    (r"\bis corrupt\b|incomplete or corrupt", "emulator §2.9 (quick_check, unreadable metadata)"),
)

_OPERATOR = tuple(re.compile(p, re.IGNORECASE) for p, _ in OPERATOR_STARTUP_FAILURES)
_DAMAGE = tuple(re.compile(p, re.IGNORECASE) for p, _ in STATE_DAMAGE)
_FATAL = re.compile(r"^\s*kms:\s")


def operator_startup_failure(text: str | None) -> str | None:
    """The most recent start-up error in `text` when it is an operator matter, as one short line; else None.

    None for no text, for state damage, and for a `kms:` error not in OPERATOR_STARTUP_FAILURES (unknown: the
    caller keeps its default). Lines that decide nothing (banners, systemd's own messages, kmlab markers) are
    skipped.
    """
    if not text:
        return None
    for raw in reversed(text.splitlines()):
        line = " ".join(raw.split())
        if not line:
            continue
        if any(p.search(line) for p in _DAMAGE):
            return None
        if any(p.search(line) for p in _OPERATOR):
            return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."
        if _FATAL.match(line):
            return None
    return None
