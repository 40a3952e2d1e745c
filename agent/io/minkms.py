"""The minkms adapter: runs the `minkms` CLI, parses `stat --json`, probes `/v1/health/*` (DESIGN §2).

Everything kmagent knows about how to drive minkms lives in this file, so that a difference between the
documentation (reference/minkms.md) and a real binary is corrected here and nowhere else.

Assumptions about undocumented behaviour
-----------------------------------------
Each assumption is encoded by the constant named in brackets, defined right below this docstring.

1. Exit status: 0 means the command succeeded, anything else means it failed [EXIT_OK]. The reason is the last
   non-empty line the CLI wrote on stderr. The CLI never reads stdin and never prompts (it gets /dev/null).
2. Server and credentials come from the environment: `MINIO_KMS_SERVER` and `MINIO_KMS_API_KEY`
   [ENV_SERVER, ENV_API_KEY]; flags may follow positional arguments, so `-k` is appended last [INSECURE_FLAG].
3. Trust: the CLI trusts the system CAs plus every file in `$HOME/.minkms/certs/CAs` [TRUST_STORE]. The
   adapter fills that directory in a private HOME. `MINIO_KMS_TLS_CA=<file>` is also set [ENV_TLS_CA]: the
   emulator reads it, the real binary is assumed to ignore it.
4. `minkms stat --json` [STAT_ARGS] prints the protojson of `ClusterStatusResponse` (reference §2.5):
   `{"nodes_up": {"<id>": ServerStatusResponse}, "nodes_down": {"<id>": "host:port"}}`. Map keys are strings;
   uint64/sint64 are strings ("12", "-1"), uint32 are numbers (numbers and strings are both accepted);
   Durations are "1.500s" (Go durations such as "24m31s" and bare numbers of seconds are accepted too); empty
   maps may be omitted. `leader_id` is negative when there is no leader. The answering node is always in
   `nodes_up`, so an answer without any usable node there is treated as a failure, not as an empty cluster.
   A node's own entry in its `nodes` map is its host, used when `host` is missing.
5. `minkms edit https://HOST --rm ID [--rm ID]...` [EDIT_COMMAND, EDIT_RM_FLAG] is applied by HOST, a surviving
   node, so it is sent there (MINIO_KMS_SERVER=HOST as well).
6. `minkms add https://EXISTING https://NEW` [ADD_COMMAND]: the two-argument form takes the existing member first
   and the new node second (restore-on-linux guide); it is sent to EXISTING.
7. `minkms backup FILE --force` [BACKUP_COMMAND, BACKUP_FORCE_FLAG] writes the snapshot to FILE, overwriting it,
   and exits 0 only when FILE is complete.
8. `minkms restore https://HOST FILE` [RESTORE_COMMAND]: HOST first, then FILE; sent to HOST.
9. Health probes `GET /v1/health/live`, `/v1/health/ready`, `/v1/health/ready?write` [HEALTH_*] need no client
   certificate; 200 means yes [HEALTH_OK], any other status (a not-ready node answers non-200) means no.
10. A host without a port means port 7373 [DEFAULT_PORT]; `http://` is rewritten to `https://` as the SDK does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import signal
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from agent.core.model import HealthObs, MinkmsView, NodeStatus

# ---- the assumptions above, as constants --------------------------------------------------------------------
EXIT_OK = 0
ENV_SERVER = "MINIO_KMS_SERVER"
ENV_API_KEY = "MINIO_KMS_API_KEY"
ENV_TLS_CA = "MINIO_KMS_TLS_CA"
INSECURE_FLAG = "-k"
TRUST_STORE = Path(".minkms", "certs", "CAs")  # relative to $HOME
STAT_ARGS = ("stat", "--json")
EDIT_COMMAND = "edit"
EDIT_RM_FLAG = "--rm"
ADD_COMMAND = "add"
BACKUP_COMMAND = "backup"
BACKUP_FORCE_FLAG = "--force"
RESTORE_COMMAND = "restore"
HEALTH_LIVE = "/v1/health/live"
HEALTH_READY = "/v1/health/ready"
HEALTH_WRITE = "/v1/health/ready?write"
HEALTH_OK = 200
DEFAULT_PORT = 7373

# ---- adapter limits ---------------------------------------------------------------------------------------
OUTPUT_CAP = 4 << 20  # bytes kept of each of stdout and stderr; the rest is read and dropped
ERROR_LINE_CAP = 500  # characters of the one-line error
KILL_GRACE = 2.0  # seconds to wait for the pipes to close after the child has been killed
RC_CANNOT_PREPARE = 125  # the call could not be prepared (API key unreadable, trust store), as `docker run`
RC_NOT_EXECUTABLE = 126  # shell conventions
RC_NOT_FOUND = 127
RC_KILLED = -9
RC_FENCED = 124  # a destructive command refused by its fence (agent.core.fencing): not started, or killed
FENCE_EVERY = 0.2  # seconds between the fence's checks while a fenced command runs

Fence = Callable[[bool], str | None]
"""A destructive command's fence: called with False right before the child starts, then with True while it runs;
returns why it must not start or go on (the child is then not started, or killed), or None."""

# Only these variables of the agent's environment reach the CLI: no proxy (the CLI talks to the local node),
# no stray MINIO_KMS_* of an operator's shell, no NOTIFY_SOCKET.
_ENV_KEEP = frozenset(
    ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME", "SSL_CERT_FILE", "SSL_CERT_DIR")
) | {"PYTHONPATH"}  # PYTHONPATH: only the emulator uses it
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_API_KEY_PATTERN = re.compile(r"\bk[12]:[A-Za-z0-9_\-]{16,}")
_REDACTED = "***"

log = logging.getLogger(__name__)


# ---- results ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MinkmsSettings:
    """How to reach the local minkms. The API key is read through `api_key` at each call, never kept."""

    cli: Sequence[str | os.PathLike[str]]  # argv prefix, e.g. ("/usr/local/bin/minkms",)
    server: str  # https://HOST:PORT of the local minkms
    api_key: Callable[[], str] = field(repr=False)
    ca: Path | None = None  # CA file or directory that signed minkms' server certificate
    insecure: bool = False
    command_timeout: float = 10.0
    probe_timeout: float = 1.0
    home: Path | None = None  # private HOME for the CLI, holding its trust store
    # The local IP the live probes of OTHER nodes come from (peer.source), so that a node cut off the network
    # looks cut off to those probes too; "" lets the system choose. The local node is probed unbound.
    peer_source: str = ""


@dataclass(frozen=True)
class CommandResult:
    """One CLI run. returncode: the exit status; negative: killed by that signal (-9 after a timeout);
    125/126/127: the CLI could not be started (call not prepared / not executable / not found)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out_after: float | None = None  # the timeout that expired, when the adapter killed the child
    truncated: bool = False  # stdout or stderr exceeded OUTPUT_CAP and was cut

    @property
    def ok(self) -> bool:
        return self.returncode == EXIT_OK and self.timed_out_after is None

    @property
    def error(self) -> str | None:
        """One line saying why the command failed, None when it succeeded."""
        if self.timed_out_after is not None:
            return f"timed out after {self.timed_out_after:g}s"
        if self.ok:
            return None
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        if lines:
            line = lines[-1]
            return line if len(line) <= ERROR_LINE_CAP else line[: ERROR_LINE_CAP - 1] + "…"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return f"killed by signal {name}"
        return f"exit code {self.returncode}"

    def check(self) -> CommandResult:
        """Return self when the command succeeded, else raise MinkmsError carrying this result."""
        if not self.ok:
            raise MinkmsError(f"{' '.join(self.argv)} failed: {self.error}", self)
        return self


class MinkmsError(Exception):
    """A minkms operation failed; `result` is the CLI run when there was one."""

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


# ---- the adapter ------------------------------------------------------------------------------------------
class Minkms:
    """The local minkms, through its CLI and its health endpoints. One instance per configuration."""

    def __init__(self, settings: MinkmsSettings) -> None:
        self.settings = settings
        self._server = endpoint(settings.server) if settings.server else ""
        self._session: aiohttp.ClientSession | None = None
        self._peer_session: aiohttp.ClientSession | None = None
        self._trust_signature: tuple[tuple[str, int, int, int], ...] | None = None
        # the API key and trust store are read here, off the loop, one at a time (`_prepared`)
        self._prepare_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._preparing: concurrent.futures.Future[tuple[str, dict[str, str]]] | None = None

    async def __aenter__(self) -> Minkms:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- CLI ------------------------------------------------------------------------------------------
    async def run(
        self, *args: str, server: str | None = None, timeout: float | None = None, fence: Fence | None = None
    ) -> CommandResult:
        """Run `minkms ARGS...` against `server` (default: the local node).

        The API key is read and the trust store synced off the loop (a hung state disk must not freeze it),
        within the command's own limit. `fence`, for a destructive command: called immediately before the child
        starts, after everything that may block, and then every FENCE_EVERY seconds while it runs; when it
        objects, the child is not started, or its process group is killed (RC_FENCED either way). Never raises for
        a failure of the call (see CommandResult); only a malformed `server` is a ValueError.
        """
        limit = self.settings.command_timeout if timeout is None else timeout
        argv = tuple(os.fspath(a) for a in self.settings.cli) + tuple(args)
        if self.settings.insecure:
            argv += (INSECURE_FLAG,)
        started = time.monotonic()

        def failed(returncode: int, message: str) -> CommandResult:
            return CommandResult(argv, returncode, "", message, time.monotonic() - started)

        target = endpoint(server) if server else self._server
        if not target:
            return failed(RC_CANNOT_PREPARE, "no minkms server configured")
        key = ""
        try:
            key, env = await self._prepared(target, limit)
        except Exception as exc:  # the key file and the CA are the caller's files: report, do not raise
            return failed(RC_CANNOT_PREPARE, _redact(f"cannot prepare the minkms call: {_explain(exc)}", key))
        if fence is not None:  # no await, no blocking call from here to the child's start
            refusal = fence(False)
            if refusal is not None:
                return failed(RC_FENCED, f"fenced, not started: {refusal}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole on timeout
            )
        except FileNotFoundError:
            return failed(RC_NOT_FOUND, f"minkms CLI not found: {argv[0]}")
        except PermissionError:
            return failed(RC_NOT_EXECUTABLE, f"minkms CLI not executable: {argv[0]}")
        except OSError as exc:
            return failed(RC_NOT_EXECUTABLE, f"cannot run the minkms CLI {argv[0]}: {exc.strerror or exc}")
        result = await self._collect(proc, argv, limit, started, key, fence)
        log.debug("%s -> %s (%.2fs)", " ".join(argv), result.error or "ok", result.seconds)
        return result

    async def _collect(
        self,
        proc: asyncio.subprocess.Process,
        argv: tuple[str, ...],
        limit: float,
        started: float,
        key: str,
        fence: Fence | None = None,
    ) -> CommandResult:
        """Wait for the child within `limit`, reading both pipes up to OUTPUT_CAP; kill its group on timeout, or
        as soon as `fence` objects."""
        assert proc.stdout is not None and proc.stderr is not None
        out, err = _Capped(), _Capped()
        readers = [
            asyncio.ensure_future(out.drain(proc.stdout)),
            asyncio.ensure_future(err.drain(proc.stderr)),
        ]
        waiter = asyncio.ensure_future(proc.wait())
        timed_out = False
        fenced: str | None = None
        try:
            deadline = started + max(limit, 0.0)
            while True:
                left = deadline - time.monotonic()
                step = left if fence is None else min(left, FENCE_EVERY)
                await asyncio.wait([waiter, *readers], timeout=max(step, 0.0))
                if waiter.done() and all(r.done() for r in readers):
                    break
                if fence is not None and not waiter.done() and (fenced := fence(True)) is not None:
                    break
                if time.monotonic() >= deadline or (fence is None and not waiter.done()):
                    break
            if not waiter.done():
                timed_out = fenced is None
                _kill_group(proc)
                await waiter
                await asyncio.wait(readers, timeout=KILL_GRACE)
        finally:
            if proc.returncode is None:  # cancelled: never leave the child behind, nor a zombie
                _kill_group(proc)
                await asyncio.shield(waiter)
            for task in readers:
                task.cancel()
        if fenced is not None:
            return CommandResult(
                argv,
                RC_FENCED,
                out.text(key),
                f"fenced, killed while running: {fenced}",
                time.monotonic() - started,
            )
        return CommandResult(
            argv=argv,
            returncode=RC_KILLED if timed_out or proc.returncode is None else proc.returncode,
            stdout=out.text(key),
            stderr=err.text(key, redact_pattern=True),
            seconds=time.monotonic() - started,
            timed_out_after=limit if timed_out else None,
            truncated=out.truncated or err.truncated,
        )

    async def _prepared(self, server: str, limit: float) -> tuple[str, dict[str, str]]:
        """The API key and the child's environment, read on a thread of the adapter's own within `limit`. One at a
        time: while a read is stuck (a hung state disk), every call fails at once instead of piling up threads."""
        pending = self._preparing
        if pending is not None and not pending.done():
            raise TimeoutError("reading the API key and the trust store has not returned (a stalled disk?)")
        if self._prepare_pool is None:
            self._prepare_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kmagent-minkms")
        future = self._prepare_pool.submit(self._prepare, server)
        self._preparing = future
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), max(limit, 0.1))
        except TimeoutError:
            raise TimeoutError(f"reading the API key and the trust store took more than {limit:g}s") from None

    def _prepare(self, server: str) -> tuple[str, dict[str, str]]:
        key = self.settings.api_key().strip()
        return key, self._environment(server, key)

    def _environment(self, server: str, key: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith("LC_")}
        env.setdefault("PATH", _DEFAULT_PATH)
        env[ENV_SERVER] = server
        env[ENV_API_KEY] = key
        ca, home = self.settings.ca, self.settings.home
        if home is not None:
            env["HOME"] = str(home)
            if ca is not None:
                self._sync_trust_store(ca, home)
        if ca is not None and not ca.is_dir():
            env[ENV_TLS_CA] = str(ca)
        return env

    def _sync_trust_store(self, ca: Path, home: Path) -> None:
        """Make HOME/.minkms/certs/CAs hold exactly the CA file(s), copied atomically when they change."""
        sources = _ca_files(ca)
        if not sources:
            raise FileNotFoundError(f"no CA certificate in {ca}")
        signature = tuple(
            (p.name, st.st_ino, st.st_size, st.st_mtime_ns) for p, st in ((p, p.stat()) for p in sources)
        )
        store = home / TRUST_STORE
        if signature == self._trust_signature and all((store / p.name).is_file() for p in sources):
            return
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if home.stat().st_mode & 0o077:
            home.chmod(0o700)  # private: nothing else on the host should steer the CLI through its HOME
        store.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = {p.name for p in sources}
        for src in sources:
            fd, tmp = tempfile.mkstemp(prefix=f".{src.name}.", dir=store)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(src.read_bytes())
                os.chmod(tmp, 0o644)
                os.replace(tmp, store / src.name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        for stale in store.iterdir():
            if stale.name not in names and not stale.name.startswith(".") and stale.is_file():
                stale.unlink()
        self._trust_signature = signature

    # ---- cluster commands -----------------------------------------------------------------------------
    async def cluster_status(self) -> MinkmsView:
        """`minkms stat --json` on the local node, parsed. Failures are in MinkmsView.error, never raised."""
        try:
            result = await self.run(*STAT_ARGS)
            if not result.ok:
                return MinkmsView(error=f"minkms {' '.join(STAT_ARGS)} failed: {result.error}")
            if result.truncated:
                return MinkmsView(error=f"stat --json output exceeds {OUTPUT_CAP} bytes")
            return parse_cluster_status(result.stdout)
        except Exception as exc:  # never let the observation loop die on the adapter
            log.exception("unexpected error reading the cluster status")
            return MinkmsView(error=f"cannot read the cluster status: {type(exc).__name__}")

    async def edit_remove(
        self, host: str, node_ids: Sequence[int], fence: Fence | None = None
    ) -> CommandResult:
        """Forced removal of dead nodes, applied by the surviving HOST (runbook step 2)."""
        if not node_ids:
            raise ValueError("edit_remove needs at least one node id")
        args: list[str] = [EDIT_COMMAND, _checked_endpoint(host)]
        for node_id in node_ids:
            if isinstance(node_id, bool) or not isinstance(node_id, int) or node_id < 0:
                raise ValueError(f"invalid node id {node_id!r}")
            args += [EDIT_RM_FLAG, str(node_id)]
        return await self.run(*args, server=_checked_endpoint(host), fence=fence)

    async def add(self, existing: str, new: str, fence: Fence | None = None) -> CommandResult:
        """Add the fresh node NEW to the cluster through its member EXISTING (runbook step 4)."""
        member = _checked_endpoint(existing)
        return await self.run(ADD_COMMAND, member, _checked_endpoint(new), server=member, fence=fence)

    async def backup(self, path: Path) -> CommandResult:
        """Snapshot the key database of the local node into `path` (overwritten)."""
        return await self.run(BACKUP_COMMAND, _path_arg(path), BACKUP_FORCE_FLAG)

    async def restore(self, host: str, path: Path, fence: Fence | None = None) -> CommandResult:
        """Restore the snapshot `path` onto the fresh single node HOST."""
        target = _checked_endpoint(host)
        return await self.run(RESTORE_COMMAND, target, _path_arg(path), server=target, fence=fence)

    # ---- health probes --------------------------------------------------------------------------------
    async def probe(self) -> HealthObs:
        """live / ready / ready-for-write of the local node, concurrently. None: no answer."""
        session = self._http()
        if session is None:
            return HealthObs()
        (live, latency), (ready, _), (write, _) = await asyncio.gather(
            self._get(session, self._server + HEALTH_LIVE),
            self._get(session, self._server + HEALTH_READY),
            self._get(session, self._server + HEALTH_WRITE),
        )
        return HealthObs(live=live, ready=ready, write=write, latency=latency)

    async def probe_live(self, host: str) -> bool | None:
        """Whether another node's minkms answers its live probe: tells AGENT_DOWN from UNREACHABLE (DESIGN §3).
        False when it was probed and did not answer in time; None only when it could not be probed."""
        session = self._peer_http()
        if session is None:
            return None
        try:
            url = endpoint(host) + HEALTH_LIVE
        except ValueError:
            return None
        live, _ = await self._get(session, url)
        return bool(live)

    def _http(self) -> aiohttp.ClientSession | None:
        if self._session is None or self._session.closed:
            self._session = self._new_session(None)
        return self._session

    def _peer_http(self) -> aiohttp.ClientSession | None:
        if self._peer_session is None or self._peer_session.closed:
            source = self.settings.peer_source
            self._peer_session = self._new_session((source, 0) if source else None)
        return self._peer_session

    def _new_session(self, local_addr: tuple[str, int] | None) -> aiohttp.ClientSession | None:
        if not self._server:
            return None
        try:
            ctx = self._ssl_context()
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot load the CA for minkms health probes from %s: %s", self.settings.ca, exc)
            return None
        # Kept alive across probes; no proxy from the environment (trust_env defaults to False).
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=8, local_addr=local_addr))

    def _ssl_context(self) -> ssl.SSLContext:
        if self.settings.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ca = self.settings.ca
        if ca is None:
            return ssl.create_default_context()
        files = _ca_files(ca)
        if not files:
            raise FileNotFoundError(f"no CA certificate in {ca}")
        ctx = ssl.create_default_context(cafile=str(files[0]))
        for extra in files[1:]:
            ctx.load_verify_locations(cafile=str(extra))
        return ctx

    async def _get(self, session: aiohttp.ClientSession, url: str) -> tuple[bool | None, float | None]:
        """(status is 200, seconds to the answer), or (None, None) when nothing answered in time."""
        deadline = time.monotonic() + self.settings.probe_timeout
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                remaining = max(deadline - started, 0.001)
                async with session.get(
                    url, timeout=aiohttp.ClientTimeout(total=remaining), allow_redirects=False
                ) as resp:
                    await resp.content.read(64 * 1024)
                    return resp.status == HEALTH_OK, time.monotonic() - started
            except aiohttp.ServerDisconnectedError:
                if attempt == 2:  # a kept-alive connection the server had closed: retry once on a fresh one
                    return None, None
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                return None, None
        return None, None

    async def close(self) -> None:
        """Close the kept-alive probe connections and the preparation thread (made again if used after)."""
        if self._prepare_pool is not None:
            self._prepare_pool.shutdown(wait=False)
            self._prepare_pool = None
        sessions = (self._session, self._peer_session)
        self._session = self._peer_session = None
        for session in sessions:
            if session is not None and not session.closed:
                await session.close()


# ---- helpers ----------------------------------------------------------------------------------------------
class _Capped:
    """A pipe reader that keeps the first OUTPUT_CAP bytes and drops the rest (a runaway child is harmless)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.truncated = False

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            room = OUTPUT_CAP - len(self.data)
            if room > 0:
                self.data += chunk[:room]
            if len(chunk) > room:
                self.truncated = True

    def text(self, key: str, redact_pattern: bool = False) -> str:
        text = self.data.decode("utf-8", errors="replace")
        return _redact(text, key, redact_pattern)


def _redact(text: str, key: str, pattern: bool = True) -> str:
    """Remove the API key (and, in error text, anything shaped like one) from text that may be shown or logged."""
    if key:
        text = text.replace(key, _REDACTED)
    if pattern:
        text = _API_KEY_PATTERN.sub(lambda m: m.group(0)[:3] + _REDACTED, text)
    return text


def _explain(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _ca_files(ca: Path) -> list[Path]:
    if ca.is_dir():
        return sorted(p for p in ca.iterdir() if p.is_file() and not p.name.startswith("."))
    return [ca] if ca.is_file() else []


def endpoint(host: str) -> str:
    """`HOST[:PORT]` or `http(s)://HOST[:PORT]` -> `https://HOST:PORT` (assumption 10)."""
    text = host.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
            break
    text = "https://" + text.rstrip("/")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid minkms address {host!r}: {exc}") from exc
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
        raise ValueError(f"invalid minkms address {host!r}: expected https://HOST:PORT")
    return text if port else f"{text}:{DEFAULT_PORT}"


def _path_arg(path: Path) -> str:
    """Absolute, so that it cannot be taken for a flag and does not depend on the CLI's working directory."""
    return os.path.abspath(path)


def _checked_endpoint(host: str) -> str:
    if not host or host.lstrip().startswith("-"):
        raise ValueError(f"invalid minkms address {host!r}")
    return endpoint(host)


# ---- parsing `stat --json` -------------------------------------------------------------------------------
_JSON_KINDS: Mapping[type, str] = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _kind(value: object) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def parse_cluster_status(text: str) -> MinkmsView:
    """The protojson of ClusterStatusResponse -> MinkmsView. Pure; never raises; see assumption 4."""
    if not text.strip():
        return MinkmsView(error="stat --json output is empty")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        return MinkmsView(
            error=f"stat --json output is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        )
    except (ValueError, RecursionError) as exc:
        return MinkmsView(error=f"stat --json output is not valid JSON: {type(exc).__name__}")
    if not isinstance(data, dict):
        return MinkmsView(error=f"stat --json output is not a JSON object (got {_kind(data)})")
    up_raw = data.get("nodes_up")
    down_raw = data.get("nodes_down")
    for name, value in (("nodes_up", up_raw), ("nodes_down", down_raw)):
        if value is not None and not isinstance(value, dict):
            return MinkmsView(error=f"stat --json output: {name} is not an object (got {_kind(value)})")
    up = [n for n in (_node(k, v) for k, v in (up_raw or {}).items()) if n is not None]
    if not up:
        return MinkmsView(error="stat --json output has no usable node in nodes_up")
    up.sort(key=lambda n: (n.node_id, n.host))
    return MinkmsView(nodes_up=tuple(up), nodes_down=_id_host_pairs(down_raw or {}))


def _node(key: str, entry: object) -> NodeStatus | None:
    if not isinstance(entry, dict):
        return None
    node_id = _uint(entry.get("node_id"))
    if node_id is None:
        node_id = _uint(key)
    if node_id is None:
        return None
    members = _id_host_pairs(entry.get("nodes"))
    host = entry.get("host")
    if not isinstance(host, str) or not host:
        host = dict(members).get(node_id, "")
    role = entry.get("role")
    return NodeStatus(
        node_id=node_id,
        host=host,
        role=role if isinstance(role, str) else "",
        commit=_uint(entry.get("commit")),
        leader_id=_int(entry.get("leader_id")),
        members=members,
        uptime=parse_duration(entry.get("uptime")),
    )


def _id_host_pairs(value: object) -> tuple[tuple[int, str], ...]:
    """A protojson map<uint32, string> -> sorted (id, host) pairs; bad entries are skipped."""
    if not isinstance(value, dict):
        return ()
    pairs = {(i, h) for k, h in value.items() if (i := _uint(k)) is not None and isinstance(h, str) and h}
    return tuple(sorted(pairs))


def _int(value: object) -> int | None:
    """A protojson integer: a JSON number or a decimal string; anything else is unknown (None)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,30}\s*", value):
        return int(value)
    return None


def _uint(value: object) -> int | None:
    number = _int(value)
    return number if number is not None and number >= 0 else None


def parse_duration(value: object) -> float | None:
    """A protojson Duration ("1.500s"), a Go duration ("24m31s", "233ms") or a number of seconds -> seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    if text == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total if pos else None
