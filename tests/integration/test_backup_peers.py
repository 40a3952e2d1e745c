"""The backup routes of the peer API over real TLS: upload, download and catalogue; bad ids, bad entries and
mismatched bytes are refused with a clear 4xx and leave nothing on disk; strangers are refused before any of it."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from agent.core import wire
from agent.core.backups import BackupInfo
from agent.io.backups import (
    BACKUPS_PATH,
    HEADER,
    BackupStore,
    fetch_backup,
    list_backups,
    peer_streams,
    push_backup,
)
from agent.io.peers import PeerClient, PeerError, PeerServer, client_context
from tests.integration import test_peers
from tests.integration.test_peers import DEADLINE, PKI, make_config

certs, ports = test_peers.certs, test_peers.ports  # the fixtures, shared

DATA = gzip.compress(os.urandom(200_000))
INFO = BackupInfo("20260101T000000Z-km1", 1767225600.0, 7, len(DATA), hashlib.sha256(DATA).hexdigest(), "km1")


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file())


class Node:
    def __init__(self, server: PeerServer, store: BackupStore, arrivals: list[BackupInfo]) -> None:
        self.server, self.store, self.arrivals = server, store, arrivals


@pytest.fixture
async def km1(tmp_path: Path, certs: PKI, ports: dict[str, int]) -> AsyncIterator[Node]:
    store = BackupStore(tmp_path / "km1-backups")
    arrivals: list[BackupInfo] = []
    server = PeerServer(
        make_config(tmp_path, certs, ports, "km1"), [], streams=peer_streams(lambda: store, arrivals.append)
    )
    await server.start()
    yield Node(server, store, arrivals)
    await server.stop()


@pytest.fixture
async def client(tmp_path: Path, certs: PKI, ports: dict[str, int]) -> AsyncIterator[PeerClient]:
    c = PeerClient(make_config(tmp_path, certs, ports, "km2"))
    yield c
    await c.close()


def spec(client: PeerClient, name: str = "km1"):  # type: ignore[no-untyped-def]
    found = client.config.agent(name)
    assert found is not None
    return found


async def test_push_then_fetch_then_list(km1: Node, client: PeerClient, tmp_path: Path) -> None:
    src = tmp_path / "src.gz"
    src.write_bytes(DATA)
    await push_backup(client, spec(client), INFO, src)
    assert km1.store.entries() == [INFO] and km1.arrivals == [INFO]
    assert km1.store.path(INFO.id).read_bytes() == DATA
    assert await list_backups(client, spec(client), DEADLINE) == [INFO]
    mine = BackupStore(tmp_path / "km2-backups")
    await fetch_backup(client, spec(client), INFO, mine)
    assert mine.entries() == [INFO] and mine.path(INFO.id).read_bytes() == DATA


async def test_fetch_of_an_unknown_copy_is_a_peer_error_and_leaves_nothing(
    km1: Node, client: PeerClient, tmp_path: Path
) -> None:
    mine = BackupStore(tmp_path / "km2-backups")
    with pytest.raises(PeerError, match="404"):
        await fetch_backup(client, spec(client), INFO, mine)
    assert files(tmp_path / "km2-backups") == []


async def test_fetch_refuses_a_copy_whose_entry_differs(
    km1: Node, client: PeerClient, tmp_path: Path
) -> None:
    src = tmp_path / "src.gz"
    src.write_bytes(DATA)
    await push_backup(client, spec(client), INFO, src)
    mine = BackupStore(tmp_path / "km2-backups")
    forged = BackupInfo(INFO.id, INFO.created, INFO.commit + 1, INFO.size, INFO.sha256, INFO.source)
    with pytest.raises(ValueError, match="another entry"):
        await fetch_backup(client, spec(client), forged, mine)
    assert mine.entries() == [] and files(tmp_path / "km2-backups") == []


@pytest.fixture
async def raw(certs: PKI, tmp_path: Path, ports: dict[str, int]) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = client_context(make_config(tmp_path, certs, ports, "km2"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        yield session


async def put(
    session: aiohttp.ClientSession, port: int, path: str, body: bytes, header: str | None
) -> tuple[int, str]:
    headers = {"Content-Type": "application/octet-stream"}
    if header is not None:
        headers[HEADER] = header
    url = URL(f"https://127.0.0.1:{port}{path}", encoded=True)
    async with asyncio.timeout(DEADLINE):
        async with session.put(url, data=body, headers=headers) as resp:
            return resp.status, (await resp.json())["error"] if resp.status != 200 else ""


def header(info: BackupInfo) -> str:
    return wire.dumps(info).decode()


@pytest.mark.parametrize(
    ("path", "body", "head", "status", "message"),
    [
        (f"{BACKUPS_PATH}/{INFO.id}", DATA, None, 400, "header with the backup's entry is missing"),
        (f"{BACKUPS_PATH}/{INFO.id}", DATA, "{not json", 400, f"bad {HEADER} header"),
        (f"{BACKUPS_PATH}/{INFO.id}", DATA, '{"id": 1}', 400, f"bad {HEADER} header"),
        (f"{BACKUPS_PATH}/..%2F..%2Fetc%2Fpasswd", DATA, header(INFO), 400, "not a backup id"),
        (f"{BACKUPS_PATH}/20260101T000000Z-km9", DATA, header(INFO), 400, "the path names"),
        (f"{BACKUPS_PATH}/{INFO.id}", DATA[:-1], header(INFO), 400, "Content-Length"),
        (
            f"{BACKUPS_PATH}/{INFO.id}",
            DATA,
            header(BackupInfo(INFO.id, INFO.created, 7, INFO.size, "0" * 64, "km1")),
            422,
            "checksum mismatch",
        ),
        (
            f"{BACKUPS_PATH}/{INFO.id}",
            DATA,
            header(BackupInfo(INFO.id, INFO.created, 7, 17 << 30, INFO.sha256, "km1")),
            400,
            "more than",
        ),
    ],
)
async def test_bad_uploads_get_a_clear_4xx_and_leave_nothing(
    km1: Node, raw: aiohttp.ClientSession, path: str, body: bytes, head: str | None, status: int, message: str
) -> None:
    got, error = await put(raw, km1.server.port, path, body, head)
    assert got == status and message in error, error
    assert km1.store.entries() == [] and files(km1.store.dir) == [] and km1.arrivals == []


async def test_a_broken_gzip_with_a_matching_checksum_is_refused(
    km1: Node, raw: aiohttp.ClientSession
) -> None:
    bad = DATA[:-30]
    info = BackupInfo(INFO.id, INFO.created, 7, len(bad), hashlib.sha256(bad).hexdigest(), "km1")
    got, error = await put(raw, km1.server.port, f"{BACKUPS_PATH}/{INFO.id}", bad, header(info))
    assert got == 422 and "gzip" in error
    assert files(km1.store.dir) == []


async def test_a_stranger_is_refused_before_the_backup_routes(
    km1: Node, certs: PKI, tmp_path: Path, ports: dict[str, int]
) -> None:
    stranger = PeerClient(make_config(tmp_path, certs, ports, "km2", identity="unlisted"))
    try:
        with pytest.raises(PeerError, match="403"):
            await list_backups(stranger, spec(stranger), DEADLINE)
    finally:
        await stranger.close()
