"""The backup copies this agent holds (DESIGN §5 BACKUP): one `<id>.gz` per copy and its entry `<id>.json`.

The entry is written last and is the commit point: a `.gz` without an entry is debris of a crash or an aborted
transfer, removed on start. Every copy is checked on arrival (size, sha256, a complete gzip stream, read by
streaming decompression so that a large or hostile file never sits in memory) and again by `verify`; a copy that
fails a check is moved to `corrupt/` (never deleted: an operator may want it) and is no longer listed, so it is
no longer reported to the peers. Ids are checked (`check_id`) before any path is built from them: a peer names
copies, and must never name a file outside this directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from agent.config import AgentSpec
from agent.core import wire
from agent.core.backups import BackupInfo, check_id, newest_first, to_drop
from agent.io import logs
from agent.io.durable import atomic_write, fsync_dir
from agent.io.peers import STREAM_IDLE, PeerClient, PeerError, StreamRoute, error_response, error_text

__all__ = [
    "BACKUPS_PATH",
    "CHUNK",
    "CORRUPT_DIR",
    "HEADER",
    "MAX_BACKUP",
    "BackupStore",
    "Catalogue",
    "GzipCheck",
    "check_file",
    "fetch_backup",
    "list_backups",
    "peer_streams",
    "push_backup",
]

log = logging.getLogger("kmagent")

CORRUPT_DIR = "corrupt"
CHUNK = 256 * 1024
"""Bytes read or decompressed at a time: memory use is bounded whatever the size of a copy."""
_TMP_PREFIX = ".incoming-"
MAX_BACKUP = 16 << 30
"""Largest copy an agent accepts from a peer (16 GiB): far above any key database, far below a full disk."""
BACKUPS_PATH = "/v1/peer/backups"
HEADER = "X-Kmagent-Backup"
"""The copy's entry (`BackupInfo`, wire-encoded JSON) travels with its bytes in this header, both ways."""


class GzipCheck:
    """Feeds a gzip stream through decompression, discarding the output: a truncated or damaged stream fails
    at `finish`, at a bounded memory cost per call however much the data inflates. The first error is kept for
    `finish`, so that callers can report a size or checksum mismatch (the likelier story) before it."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(wbits=31)
        self._seen = False
        self._error: str | None = None

    def feed(self, data: bytes) -> None:
        while data and self._error is None:
            self._seen = True
            try:
                self._d.decompress(data, CHUNK)
                while self._d.unconsumed_tail:
                    self._d.decompress(self._d.unconsumed_tail, CHUNK)
            except zlib.error as exc:
                self._error = f"not a valid gzip stream: {exc}"
                return
            data = self._d.unused_data if self._d.eof else b""
            if data:  # a further gzip member (concatenated members are one valid stream)
                self._d = zlib.decompressobj(wbits=31)

    def finish(self) -> None:
        if self._error is not None:
            raise ValueError(self._error)
        if not self._seen or not self._d.eof:
            raise ValueError("the gzip stream is truncated")


def check_file(path: Path, info: BackupInfo) -> str:
    """'' when the file at `path` is `info`'s copy whole (size, sha256, gzip), else what is wrong with it."""
    digest, size, gz = hashlib.sha256(), 0, GzipCheck()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if size > info.size:
                    return f"larger than its entry says ({info.size} bytes)"
                gz.feed(chunk)
        if size != info.size:
            return f"{size} bytes, its entry says {info.size}"
        if digest.hexdigest() != info.sha256:
            return f"sha256 {digest.hexdigest()} differs from its entry's {info.sha256}"
        gz.finish()
    except ValueError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    return ""


class BackupStore:
    """The copies in `dir` (created 0700), as a catalogue kept in memory and on disk."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._entries: dict[str, BackupInfo] = {}
        self.incoming: set[str] = set()  # ids being received now: a second transfer of one is refused
        self._load()

    # ---- paths: only from a checked id -------------------------------------------------------------------
    def _gz(self, backup: str) -> Path:
        return self.dir / f"{check_id(backup)}.gz"

    def _entry(self, backup: str) -> Path:
        return self.dir / f"{check_id(backup)}.json"

    def _load(self) -> None:
        """Read the entries; drop what has no entry (debris) and set aside what does not match its entry."""
        for tmp in self.dir.glob(f"{_TMP_PREFIX}*"):
            _unlink(tmp)
        for entry in sorted(self.dir.glob("*.json")):
            try:
                info = wire.loads(BackupInfo, entry.read_bytes())
                problems = info.problems()
                if not problems and entry.name != f"{info.id}.json":
                    problems = [f"the entry names {info.id}"]
            except (OSError, wire.WireError) as exc:
                problems = [str(exc)]
                info = None
            if problems or info is None:
                self._set_aside(entry.stem, "; ".join(problems), entry_only=True)
                continue
            if not self._gz(info.id).is_file():
                self._set_aside(info.id, "its .gz file is missing", entry_only=True)
                continue
            self._entries[info.id] = info
        for gz in self.dir.glob("*.gz"):
            if gz.stem not in self._entries:
                log.info(logs.kv(event="backup_debris_removed", path=gz))
                _unlink(gz)

    # ---- reading -----------------------------------------------------------------------------------------
    def entries(self) -> list[BackupInfo]:
        """The copies held intact as of their last check, freshest first."""
        return newest_first(self._entries.values())

    def get(self, backup: str) -> BackupInfo | None:
        return self._entries.get(backup)

    def path(self, backup: str) -> Path:
        """The file of the intact copy `backup`; KeyError when this agent holds none."""
        if backup not in self._entries:
            raise KeyError(backup)
        return self._gz(backup)

    # ---- adding ------------------------------------------------------------------------------------------
    async def receive(self, info: BackupInfo, chunks: AsyncIterable[bytes]) -> None:
        """Store the copy `info` streamed in `chunks`; ValueError (nothing left behind) when the bytes are not
        what the entry says: more than `info.size`, another sha256, or a broken gzip stream."""
        if self._held(info):
            return
        if info.id in self.incoming:
            raise ValueError(f"backup {info.id}: a copy is being received already")
        self.incoming.add(info.id)
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".gz", dir=self.dir)
        tmp = Path(name)
        try:
            digest, size, gz = hashlib.sha256(), 0, GzipCheck()
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > info.size:
                        raise ValueError(f"backup {info.id}: more than the {info.size} bytes its entry says")
                    digest.update(chunk)
                    gz.feed(chunk)
                    f.write(chunk)
                if size != info.size:
                    raise ValueError(f"backup {info.id}: {size} bytes received, its entry says {info.size}")
                if digest.hexdigest() != info.sha256:
                    raise ValueError(
                        f"backup {info.id}: checksum mismatch: sha256 {digest.hexdigest()} received, "
                        f"its entry says {info.sha256}"
                    )
                try:
                    gz.finish()
                except ValueError as exc:
                    raise ValueError(f"backup {info.id}: {exc}") from None
                f.flush()
                await asyncio.to_thread(os.fsync, f.fileno())
            await asyncio.to_thread(self._commit, info, tmp)
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            self.incoming.discard(info.id)

    def add_file(self, info: BackupInfo, path: Path) -> None:
        """Take in the file at `path` (this agent's own backup, in this directory) as the copy `info`; it must
        match `info` (ValueError otherwise, and the file is removed)."""
        try:
            if self._held(info):
                raise ValueError(f"backup {info.id}: this agent holds it already")
            problem = check_file(path, info)
            if problem:
                raise ValueError(f"backup {info.id}: {problem}")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            self._commit(info, path)
        except BaseException:
            _unlink(path)
            raise

    def _held(self, info: BackupInfo) -> bool:
        """True when this very copy is held already; ValueError for a bad entry or one that contradicts the
        entry held under the same id (ids are unique: one of the two is not what it claims)."""
        problems = info.problems()
        if problems:
            raise ValueError("; ".join(problems))
        held = self._entries.get(info.id)
        if held is not None and held != info:
            raise ValueError(
                f"backup {info.id}: this agent holds a copy with another entry (sha256 {held.sha256})"
            )
        return held is not None

    def _commit(self, info: BackupInfo, tmp: Path) -> None:
        """Rename the checked file into place, then write its entry: from that instant the copy exists."""
        os.chmod(tmp, 0o600)
        os.rename(tmp, self._gz(info.id))
        fsync_dir(self.dir)
        atomic_write(self._entry(info.id), wire.dumps(info) + b"\n", mode=0o600)
        self._entries[info.id] = info
        log.info(logs.kv(event="backup_stored", backup=info.id, size=info.size, commit=info.commit))

    # ---- checking and dropping ---------------------------------------------------------------------------
    def verify(self, backup: str) -> tuple[bool, str]:
        """Check the copy `backup` again (size, sha256, gzip). One that fails is moved to corrupt/ and is no
        longer listed. Blocking: it reads the whole file (run it in a thread from the event loop)."""
        info = self._entries.get(check_id(backup))
        if info is None:
            return False, f"this agent holds no intact copy of {backup}"
        problem = check_file(self._gz(backup), info)
        if not problem:
            return True, f"{backup}: sha256 and gzip stream intact ({info.size} bytes)"
        where = self._set_aside(backup, problem)
        return False, f"{backup} is damaged: {problem}; moved to {where}"

    def apply_retention(self, keep: int) -> list[BackupInfo]:
        """Remove all but the `keep` freshest copies (never the freshest); returns the removed ones."""
        dropped = to_drop(list(self._entries.values()), keep)
        for info in dropped:
            self._entries.pop(info.id, None)
            _unlink(self._entry(info.id))  # the entry first: a crash in between leaves debris, not a lie
            _unlink(self._gz(info.id))
            log.info(logs.kv(event="backup_dropped", backup=info.id, keep=keep))
        if dropped:
            with contextlib.suppress(OSError):
                fsync_dir(self.dir)
        return dropped

    def _set_aside(self, backup: str, problem: str, *, entry_only: bool = False) -> Path:
        """Move a copy (its files that exist) to corrupt/, under a name that never overwrites an earlier one."""
        self._entries.pop(backup, None)
        corrupt = self.dir / CORRUPT_DIR
        corrupt.mkdir(mode=0o700, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        names: Iterable[str] = [f"{backup}.json"] if entry_only else [f"{backup}.json", f"{backup}.gz"]
        for name in names:
            src = self.dir / name  # `backup` is a checked id, or the stem of a file already in this directory
            if src.exists():
                with contextlib.suppress(OSError):
                    os.rename(src, corrupt / f"{name}.{stamp}-{os.getpid()}")
        with contextlib.suppress(OSError):
            fsync_dir(self.dir)
        log.error(logs.kv(event="backup_corrupt", backup=backup, problem=problem, moved_to=corrupt))
        return corrupt


# ---- the peer API of backups ---------------------------------------------------------------------------------


def encode_header(info: BackupInfo) -> str:
    return wire.dumps(info).decode()


def decode_header(value: str | None) -> BackupInfo:
    """The entry in the `HEADER` of a request or reply; ValueError saying what is wrong."""
    if not value:
        raise ValueError(f"the {HEADER} header with the backup's entry is missing")
    try:
        info = wire.loads(BackupInfo, value.encode())
    except (wire.WireError, UnicodeError) as exc:
        raise ValueError(f"bad {HEADER} header: {exc}") from None
    problems = info.problems()
    if problems:
        raise ValueError(f"bad {HEADER} header: {'; '.join(problems)}")
    return info


async def _chunks(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """A body's chunks, each within STREAM_IDLE seconds."""
    while True:
        async with asyncio.timeout(STREAM_IDLE):
            chunk = await stream.readany()
        if not chunk:
            return
        yield chunk


async def _file_chunks(path: Path) -> AsyncGenerator[bytes, None]:
    """A file's chunks, read off the event loop."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


def peer_streams(
    store: Callable[[], BackupStore], on_arrival: Callable[[BackupInfo], None]
) -> list[StreamRoute]:
    """The backup routes of the peer API: upload (PUT) and download (GET) of one copy, and the catalogue.
    `on_arrival` runs after a copy is stored (retention)."""

    async def put(peer: str, request: web.Request) -> web.StreamResponse:
        try:
            backup = check_id(request.match_info["id"])
            info = decode_header(request.headers.get(HEADER))
            if info.id != backup:
                raise ValueError(f"the path names {backup}, the {HEADER} header {info.id}")
            if info.size > MAX_BACKUP:
                raise ValueError(f"backup {backup} is {info.size} bytes, more than the {MAX_BACKUP} accepted")
            if request.content_length is not None and request.content_length != info.size:
                raise ValueError(
                    f"Content-Length {request.content_length} differs from the entry's {info.size}"
                )
        except ValueError as exc:
            log.warning(logs.kv(event="backup_refused", peer=peer, error=exc))
            return error_response(400, str(exc))
        target = store()
        if backup in target.incoming:
            return error_response(409, f"a copy of {backup} is being received already")
        try:
            await target.receive(info, _chunks(request.content))
        except ValueError as exc:
            log.warning(logs.kv(event="backup_refused", peer=peer, backup=backup, error=exc))
            return error_response(422, str(exc), close=True)
        except TimeoutError:
            return error_response(408, f"no data for {STREAM_IDLE:g}s", close=True)
        except OSError as exc:
            log.error(logs.kv(event="backup_write_failed", backup=backup, error=exc))
            return error_response(507, f"cannot store {backup}: {exc.strerror or exc}", close=True)
        on_arrival(info)
        return web.json_response({"stored": backup})

    async def get(peer: str, request: web.Request) -> web.StreamResponse:
        try:
            backup = check_id(request.match_info["id"])
            held = store()
            info, path = held.get(backup), held.path(backup)
        except ValueError as exc:
            return error_response(400, str(exc))
        except KeyError:
            return error_response(404, f"this agent holds no intact copy of {request.match_info['id']}")
        assert info is not None
        response = web.StreamResponse(
            headers={HEADER: encode_header(info), "Content-Type": "application/gzip"}
        )
        response.content_length = info.size
        chunks = _file_chunks(path)  # opened before the headers go: a copy dropped meanwhile is a 404
        try:
            try:
                first = await chunks.__anext__()
            except (OSError, StopAsyncIteration):
                return error_response(404, f"the copy of {backup} is gone (retention)")
            await response.prepare(request)
            await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            await chunks.aclose()

    async def catalogue(peer: str, request: web.Request) -> web.StreamResponse:
        body = wire.dumps(Catalogue(tuple(store().entries())))
        return web.Response(body=body, content_type="application/json")

    return [
        ("PUT", BACKUPS_PATH + "/{id}", put),
        ("GET", BACKUPS_PATH + "/{id}", get),
        ("GET", BACKUPS_PATH, catalogue),
    ]


async def fetch_backup(client: PeerClient, spec: AgentSpec, info: BackupInfo, store: BackupStore) -> None:
    """Download the copy `info` from the peer `spec` into `store`: PeerError when the transfer fails, ValueError
    when the bytes are not the copy `info` says (nothing is left half-written either way)."""
    check_id(info.id)

    async def exchange(session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(url, allow_redirects=False, timeout=_stream_timeout(client)) as resp:
            if resp.status != 200:
                raise PeerError(
                    spec.name, f"HTTP {resp.status}: {error_text(await client.read_reply(resp))}", resp.status
                )
            theirs = decode_header(resp.headers.get(HEADER))
            if theirs != info:
                raise ValueError(f"backup {info.id}: {spec.name} sent another entry ({theirs})")
            await store.receive(info, _chunks(resp.content))

    await client.call(spec, f"{BACKUPS_PATH}/{info.id}", exchange, None)


async def push_backup(client: PeerClient, spec: AgentSpec, info: BackupInfo, path: Path) -> None:
    """Upload the copy `info` (the file `path`) to the peer `spec`; PeerError saying why it did not take it."""
    check_id(info.id)

    async def exchange(session: aiohttp.ClientSession, url: str) -> None:
        headers = {
            HEADER: encode_header(info),
            "Content-Type": "application/octet-stream",
            "Content-Length": str(info.size),
        }
        async with session.put(
            url,
            data=_file_chunks(path),
            headers=headers,
            allow_redirects=False,
            timeout=_stream_timeout(client),
        ) as resp:
            if resp.status != 200:
                raise PeerError(
                    spec.name, f"HTTP {resp.status}: {error_text(await client.read_reply(resp))}", resp.status
                )
            await client.read_reply(resp)

    await client.call(spec, f"{BACKUPS_PATH}/{info.id}", exchange, None)


@dataclass(frozen=True)
class Catalogue:
    """An agent's whole catalogue, as `GET /v1/peer/backups` answers it."""

    backups: tuple[BackupInfo, ...]


async def list_backups(client: PeerClient, spec: AgentSpec, timeout: float) -> list[BackupInfo]:
    """The peer's whole catalogue; PeerError on any failure."""

    async def exchange(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
        async with session.get(url, allow_redirects=False) as resp:
            return resp.status, resp.content_type, await client.read_reply(resp)

    status, content_type, data = await client.call(spec, BACKUPS_PATH, exchange, timeout)
    if status != 200 or content_type != "application/json":
        raise PeerError(spec.name, f"HTTP {status}: {error_text(data)}", status)
    try:
        return list(wire.loads(Catalogue, data).backups)
    except wire.WireError as exc:
        raise PeerError(spec.name, f"bad catalogue: {exc}") from None


def _stream_timeout(client: PeerClient) -> aiohttp.ClientTimeout:
    """A transfer has no overall limit (a copy may be large), but each connect and each read has one."""
    return aiohttp.ClientTimeout(
        total=None, connect=max(client.config.timings.peer_timeout, 1.0), sock_read=STREAM_IDLE
    )


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
