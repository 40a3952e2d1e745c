"""Control-socket authorisation by SO_PEERCRED, with real client processes running as other users."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from aiohttp import web

from agent.io.control import Access, ControlServer, Peer, access_of

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run clients as other users (CI runs as root)"
)

GROUP = "users"  # exists on Debian; stands in for kmagent-admin
STRANGER_UID = 64002
MEMBER_UID = 64001
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# The client runs as another user, so it is plain standard library: that user cannot read root's venv.
CLIENT = """
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
try:
    c = Conn("localhost", timeout=10)
    c.request(sys.argv[2], sys.argv[3])
    r = c.getresponse()
    body = json.loads(r.read())
    print(json.dumps({"ok": body} if r.status == 200 else {"status": r.status, "error": body.get("error")}))
except PermissionError as exc:
    print(json.dumps({"status": 403, "error": str(exc)}))
"""


def as_user(sock: Path, method: str, route: str, uid: int, groups: list[int]) -> dict[str, object]:
    def drop() -> None:
        os.setgroups(groups)
        os.setgid(65534)
        os.setuid(uid)

    proc = subprocess.run(
        [PYTHON, "-c", CLIENT, str(sock), method, route],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=drop if uid else None,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


async def run_in_thread(*args: object) -> dict[str, object]:
    return await asyncio.to_thread(as_user, *args)  # type: ignore[arg-type]


async def test_root_member_stranger() -> None:
    gid = grp.getgrnam(GROUP).gr_gid
    # pytest's tmp_path lies under a 0700 directory that other users cannot traverse
    base = Path(tempfile.mkdtemp(prefix="kmagent-auth-"))
    base.chmod(0o755)
    sock = base / "control.sock"
    server = ControlServer(sock, GROUP)

    async def status(_req: web.Request) -> web.Response:
        return web.json_response({"status": "fine"})

    async def change(_req: web.Request) -> web.Response:
        return web.json_response({"changed": True})

    server.route("GET", "/v1/status", Access.READ, status)
    server.route("POST", "/v1/reload", Access.ADMIN, change)
    await server.start()
    try:
        st = sock.stat()
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == gid and st.st_uid == 0

        assert await run_in_thread(sock, "GET", "/v1/status", 0, []) == {"ok": {"status": "fine"}}
        assert await run_in_thread(sock, "POST", "/v1/reload", 0, []) == {"ok": {"changed": True}}

        member_read = await run_in_thread(sock, "GET", "/v1/status", MEMBER_UID, [gid])
        assert member_read == {"ok": {"status": "fine"}}
        member_write = await run_in_thread(sock, "POST", "/v1/reload", MEMBER_UID, [gid])
        assert member_write["status"] == 403 and "needs root" in str(member_write["error"])

        stranger = await run_in_thread(sock, "GET", "/v1/status", STRANGER_UID, [])
        assert stranger["status"] == 403  # refused by the socket's mode before any request
        # even with the file mode opened up, the per-request check refuses a stranger
        sock.chmod(0o666)
        stranger = await run_in_thread(sock, "GET", "/v1/status", STRANGER_UID, [])
        assert stranger["status"] == 403 and "neither root nor in group" in str(stranger["error"])
    finally:
        await server.stop()
        assert not sock.exists()
        shutil.rmtree(base)


def test_access_rules_table() -> None:
    def peer(uid: int, *groups: int) -> Peer:
        return Peer(pid=1, uid=uid, gid=groups[0] if groups else 65534, groups=frozenset(groups))

    assert access_of(peer(0), 100, 0) is Access.ADMIN
    assert access_of(peer(1000), 100, 1000) is Access.ADMIN  # the daemon's own user (a lab without root)
    assert access_of(peer(1001, 100), 100, 0) is Access.READ
    assert access_of(peer(1001, 5, 100), 100, 0) is Access.READ
    assert access_of(peer(1001, 5), 100, 0) is None
    assert access_of(peer(1001, 100), None, 0) is None  # no such group on this host: nobody but root
