"""The local control socket: an HTTP API on a Unix socket, authorised per request by SO_PEERCRED.

Root (and the daemon's own user, for a daemon run without root in a lab) may do everything; members of the
admin group may read; anyone else is refused before a handler runs. The socket's mode and group are set
explicitly, so the file system permissions and the per-request check agree.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Access(StrEnum):
    READ = "read"
    ADMIN = "admin"


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, frozenset({gid, *_process_groups(pid)}))


def _process_groups(pid: int) -> set[int]:
    """The peer process's supplementary groups, as the kernel has them (not the group database)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def admin_gid(group: str) -> int | None:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def access_of(peer: Peer, group_gid: int | None, owner_uid: int) -> Access | None:
    if peer.uid in (0, owner_uid):
        return Access.ADMIN
    if group_gid is not None and group_gid in peer.groups:
        return Access.READ
    return None


class ControlServer:
    """Routes are added with the access they need; authorisation happens in a middleware."""

    def __init__(self, path: Path, group: str) -> None:
        self.path = path
        self.group = group
        self.app = web.Application(middlewares=[self._authorise], client_max_size=1 << 20)
        self._needs: dict[tuple[str, str], Access] = {}
        self._runner: web.AppRunner | None = None

    def route(self, method: str, path: str, access: Access, handler: Handler) -> None:
        self.app.router.add_route(method, path, handler)
        self._needs[(method, path)] = access

    @web.middleware
    async def _authorise(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport else None
        if sock is None:
            return _json({"error": "cannot identify the caller"}, 403)
        peer = peer_credentials(sock)
        granted = access_of(peer, admin_gid(self.group), os.getuid())
        route = request.match_info.route.resource
        needed = self._needs.get((request.method, route.canonical if route else ""), Access.ADMIN)
        if granted is None:
            return _json(
                {"error": f"permission denied: uid {peer.uid} is neither root nor in group {self.group}"}, 403
            )
        if needed is Access.ADMIN and granted is not Access.ADMIN:
            return _json({"error": "permission denied: this command needs root"}, 403)
        return await handler(request)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket() or self.path.exists():
            self._remove_stale()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        old = os.umask(0o177)  # never world-accessible, not even between bind and chmod
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)
        gid = admin_gid(self.group)
        if gid is not None and os.geteuid() == 0:
            os.chown(self.path, 0, gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

    def _remove_stale(self) -> None:
        """A socket left by a crashed daemon is replaced; one that still answers is another daemon."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise RuntimeError(f"another kmagent daemon is listening on {self.path}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.path.unlink(missing_ok=True)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=2, sort_keys=True))


json_response = _json


# ---- client -------------------------------------------------------------------------------------------
class DaemonNotRunning(Exception):
    """No daemon answers on the control socket."""


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def call(path: Path, method: str, route: str, body: Any = None, timeout: float = 30.0) -> Any:
    """One request to the daemon; raises DaemonNotRunning, or ControlError with the daemon's message."""
    conn = _UnixConnection(path, timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, route, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(f"the kmagent daemon is not running (no answer on {path})") from exc
    except PermissionError as exc:
        raise ControlError(
            403, f"permission denied on {path}: use root or a member of the admin group"
        ) from exc
    except TimeoutError as exc:
        raise ControlError(504, f"the kmagent daemon did not answer within {timeout:.0f}s") from exc
    finally:
        conn.close()
    try:
        decoded = json.loads(data) if data else {}
    except ValueError as exc:
        raise ControlError(resp.status, f"malformed answer from the daemon: {data[:100]!r}") from exc
    if resp.status != 200:
        message = decoded.get("error") if isinstance(decoded, dict) else None
        raise ControlError(resp.status, str(message or f"HTTP {resp.status}"))
    return decoded
