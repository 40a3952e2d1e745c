"""A key workload: create keys, derive data keys, and check later that every one still decrypts everywhere.

This is the end-to-end proof that a recovery lost nothing that had been acknowledged.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass

from emulator import wire
from emulator.client import CLIError
from emulator.lab.lab import Lab, LabNode


@dataclass(frozen=True)
class DataKey:
    key: str
    plaintext: str
    ciphertext: str
    version: int


def create_keys(
    lab: Lab, count: int, prefix: str = "wl", nodes: list[LabNode] | None = None
) -> list[DataKey]:
    """Create `count` keys through the cluster (writes) and one data key from each (reads); through `nodes`
    only when given (e.g. the majority side of a cut)."""
    client = lab.client()
    servers = [n.endpoint for n in nodes or lab.nodes()]
    run = uuid.uuid4().hex[:8]
    made = []
    for i in range(count):
        name = f"{prefix}-{run}-{i}"
        client.kms(servers, wire.KEY_CREATE, {"name": name})
        reply = client.kms(servers, wire.KEY_GENERATE, {"name": name})
        made.append(DataKey(name, reply["plaintext"], reply["ciphertext"], int(reply["version"])))
    return made


def verify_keys(lab: Lab, keys: list[DataKey], nodes: list[LabNode] | None = None) -> list[str]:
    """Decrypt every data key on every node; returns one line per failure (empty: nothing lost)."""
    client = lab.client()
    failures = []
    for node in nodes or lab.nodes():
        for dk in keys:
            try:
                reply = client.kms(
                    [node.endpoint],
                    wire.KEY_DECRYPT,
                    {"name": dk.key, "ciphertext": dk.ciphertext, "version": dk.version},
                )
            except CLIError as exc:
                failures.append(f"{node.name}: {dk.key}: {exc}")
                continue
            if reply.get("plaintext") != dk.plaintext:
                got = base64.b64decode(reply.get("plaintext", "")).hex()[:16]
                failures.append(f"{node.name}: {dk.key}: wrong plaintext {got}…")
    return failures
