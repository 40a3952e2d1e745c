"""Command framing on `POST /v1/kms/…` (reference/minkms.md §2.3).

Each command is `uint16 BE id ‖ uint32 BE length ‖ message`. The real server carries protobuf messages; the
emulator carries their protojson form (JSON), which keeps the framing and the field names without a
protobuf dependency. The CLI and the server are the only parties, so nothing outside sees the difference.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_FRAME = 16 << 20

CLUSTER_ADD_NODE = 1
CLUSTER_REMOVE_NODE = 2
CLUSTER_STATUS = 3
CLUSTER_EDIT = 4
ENCLAVE_CREATE = 101
ENCLAVE_DELETE = 102
ENCLAVE_STATUS = 103
ENCLAVE_LIST = 104
KEY_CREATE = 201
KEY_DELETE = 202
KEY_IMPORT = 203
KEY_STATUS = 204
KEY_ENCRYPT = 205
KEY_DECRYPT = 206
KEY_GENERATE = 207
KEY_LIST = 208

NAMES = {
    CLUSTER_ADD_NODE: "CLUSTER:ADDNODE",
    CLUSTER_REMOVE_NODE: "CLUSTER:REMOVENODE",
    CLUSTER_STATUS: "CLUSTER:STATUS",
    CLUSTER_EDIT: "CLUSTER:EDIT",
    ENCLAVE_CREATE: "ENCLAVE:CREATE",
    ENCLAVE_DELETE: "ENCLAVE:DELETE",
    ENCLAVE_STATUS: "ENCLAVE:STATUS",
    ENCLAVE_LIST: "ENCLAVE:LIST",
    KEY_CREATE: "KEY:CREATE",
    KEY_DELETE: "KEY:DELETE",
    KEY_IMPORT: "KEY:IMPORT",
    KEY_STATUS: "KEY:STATUS",
    KEY_ENCRYPT: "KEY:ENCRYPT",
    KEY_DECRYPT: "KEY:DECRYPT",
    KEY_GENERATE: "KEY:GENERATE",
    KEY_LIST: "KEY:LIST",
}
WRITES = {
    CLUSTER_ADD_NODE,
    CLUSTER_REMOVE_NODE,
    CLUSTER_EDIT,
    ENCLAVE_CREATE,
    ENCLAVE_DELETE,
    KEY_CREATE,
    KEY_DELETE,
    KEY_IMPORT,
}
CLUSTER_LEVEL = {CLUSTER_ADD_NODE, CLUSTER_REMOVE_NODE, CLUSTER_STATUS, CLUSTER_EDIT} | {
    ENCLAVE_CREATE,
    ENCLAVE_DELETE,
    ENCLAVE_STATUS,
    ENCLAVE_LIST,
}

_HEADER = struct.Struct(">HI")


class FrameError(ValueError):
    """A request or response body that is not a sequence of well-formed frames."""


def encode(commands: list[tuple[int, dict[str, Any]]]) -> bytes:
    out = bytearray()
    for command_id, message in commands:
        payload = json.dumps(message, separators=(",", ":")).encode()
        out += _HEADER.pack(command_id, len(payload)) + payload
    return bytes(out)


def decode(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    commands: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < _HEADER.size:
            raise FrameError("truncated command header")
        command_id, length = _HEADER.unpack_from(body, offset)
        offset += _HEADER.size
        if length > MAX_FRAME or offset + length > len(body):
            raise FrameError(f"command {command_id}: truncated or oversized message")
        try:
            message = json.loads(body[offset : offset + length] or b"{}")
        except ValueError as exc:
            raise FrameError(f"command {command_id}: malformed message") from exc
        if not isinstance(message, dict):
            raise FrameError(f"command {command_id}: message is not an object")
        commands.append((command_id, message))
        offset += length
    if not commands:
        raise FrameError("empty request: no command")
    return commands
