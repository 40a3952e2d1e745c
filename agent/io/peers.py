"""The peer API (DESIGN §4): HTTPS with TLS 1.3 and client certificates, both ways signed by the cluster CA.

Identity is the certificate, never what a message claims: the server names the caller from its client
certificate (`agent.pki.cert_agent_name`) and refuses anyone who is not a configured agent before a handler
runs; the client checks that the server's certificate names the agent it meant to reach before it sends a byte
of the request (peers are reached by IP address, so TLS host name checking cannot do it). Bodies are JSON,
size-limited and decoded strictly by `agent.core.wire`; every failure on the client becomes a `PeerError` that
says what went wrong, and no request, however malformed or slow, can crash or hold the server.

Works with aiohttp 3.8.4 (Debian 12) and the newest aiohttp: no `server_hostname=`, no `web.AppKey`.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from cryptography import x509

from agent.config import AgentSpec, Config, join_hostport, split_hostport
from agent.core import wire
from agent.pki import cert_agent_name

__all__ = [
    "MAX_BODY",
    "MAX_REPLY",
    "Handler",
    "PeerClient",
    "PeerError",
    "PeerServer",
    "Route",
    "StreamHandler",
    "StreamRoute",
    "TLSSetupError",
    "client_context",
    "peer_name",
    "server_context",
]

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
"""Largest request body the server reads: a report or a certificate of acks is a few KiB."""
MAX_REPLY = 1024 * 1024
"""Largest reply body the client reads."""
SHUTDOWN_TIMEOUT = 5.0
"""How long stop() lets running handlers finish: peer handlers are quick, and a daemon must stop promptly."""
# aiohttp moved shutdown_timeout from the site (3.8) to the runner (3.9+; a warning on the site since).
_RUNNER_SHUTDOWN = "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters

R = TypeVar("R")
Handler = Callable[[str, Any], Awaitable[object]]
"""A route's handler: (the caller's agent name from its certificate, the decoded request) -> reply message."""
Route = tuple[str, type[Any], Handler]
"""(path, request message class, handler); every route is a POST."""
StreamHandler = Callable[[str, web.Request], Awaitable[web.StreamResponse]]
"""A streaming route's handler: (the caller's agent name from its certificate, the request) -> response. It reads
and writes the bodies itself (backup copies: too large for a message)."""
StreamRoute = tuple[str, str, StreamHandler]
"""(method, path, handler) of a streaming route; the same identity checks run before it as before any route."""
STREAM_IDLE = 30.0
"""Longest wait for the next chunk of a streamed body, both ways: a transfer may be long, but never stalled."""


class PeerError(Exception):
    """A request to a peer failed; the message says how (never a secret). `status` is the HTTP status, if any."""

    def __init__(self, peer: str, problem: str, status: int | None = None) -> None:
        self.peer = peer
        self.problem = problem
        self.status = status
        super().__init__(f"peer {peer}: {problem}")


class TLSSetupError(ValueError):
    """This agent's own TLS files cannot be used (missing, damaged, or a key that does not match)."""


# --------------------------------------------------------------------------------------------------------------
# TLS


def _context(config: Config, purpose: ssl.Purpose) -> ssl.SSLContext:
    """TLS 1.3 only, the cluster CA as the only trust anchor, this agent's certificate as its identity."""
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # peers are reached by IP; the name is checked against the certificate instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(config.tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"tls.ca: cannot load the cluster CA from {config.tls.ca}: {_reason(exc)}"
        ) from None
    try:
        ctx.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"tls.cert, tls.key: cannot use {config.tls.cert} with {config.tls.key}: {_reason(exc)}"
        ) from None
    return ctx


def server_context(config: Config) -> ssl.SSLContext:
    """The server side: a client certificate signed by the cluster CA is required in the handshake."""
    return _context(config, ssl.Purpose.CLIENT_AUTH)


def client_context(config: Config) -> ssl.SSLContext:
    """The client side: the server must present a certificate signed by the cluster CA; ours goes with it."""
    return _context(config, ssl.Purpose.SERVER_AUTH)


def peer_name(transport: asyncio.BaseTransport | None) -> str | None:
    """The agent name in the certificate the other end of a TLS connection presented, or None."""
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return cert_agent_name(x509.load_der_x509_certificate(der))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Server


_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("kmagent_peer_caller", default=None)


class PeerServer:
    """The HTTPS listener on `config.peer.listen`; routes are POSTs of one request message each.

    Time limits (seconds): `request_timeout` for the TLS handshake, for the headers once their first byte has
    arrived, and again for the body; `keepalive_timeout` for an idle kept-alive connection. Both default from
    `timings.peer_timeout`: a request slower than the peer timeout is worthless anyway.
    """

    def __init__(
        self,
        config: Config,
        routes: Iterable[Route],
        *,
        streams: Iterable[StreamRoute] = (),
        max_body: int = MAX_BODY,
        request_timeout: float | None = None,
        keepalive_timeout: float | None = None,
    ) -> None:
        self.config = config
        self.max_body = max_body
        self.request_timeout = request_timeout or max(config.timings.peer_timeout, 1.0)
        self.keepalive_timeout = keepalive_timeout or max(20 * config.timings.peer_timeout, 30.0)
        self.app = web.Application(middlewares=[self._guard], client_max_size=max_body)
        for path, request_cls, handler in routes:
            if not (isinstance(request_cls, type) and dataclasses.is_dataclass(request_cls)):
                raise TypeError(f"route {path}: {request_cls!r} is not a message dataclass")
            self.app.router.add_post(path, self._endpoint(path, request_cls, handler))
        for method, path, stream_handler in streams:
            self.app.router.add_route(method, path, _stream_endpoint(stream_handler))
        self._runner: web.AppRunner | None = None
        self._site: _GuardedSite | None = None
        self._connections: dict[asyncio.BaseTransport, _Connection] = {}

    @property
    def port(self) -> int:
        """The bound port (useful when listening on port 0 in tests)."""
        if self._site is None or self._site.bound is None:
            raise RuntimeError("the peer server is not started")
        return self._site.bound[1]

    async def start(self) -> None:
        host, port = split_hostport(self.config.peer.listen)
        shutdown: dict[str, Any] = {"shutdown_timeout": SHUTDOWN_TIMEOUT}
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.keepalive_timeout,
            # after an early answer (408, 413) aiohttp reads the rest of the body for this long: bounded too
            lingering_time=self.request_timeout,
            **(shutdown if _RUNNER_SHUTDOWN else {}),
        )
        await self._runner.setup()
        self._site = _GuardedSite(
            self._runner,
            self,
            host,
            port,
            server_context(self.config),
            **({} if _RUNNER_SHUTDOWN else shutdown),
        )
        try:
            await self._site.start()
        except OSError as exc:
            await self.stop()
            raise OSError(
                exc.errno, f"peer.listen {self.config.peer.listen}: cannot listen: {_reason(exc)}"
            ) from None
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._site = None

    # ---- the middleware: identity first, JSON errors always, a handler's crash never escapes

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        connection = self._connections.get(request.transport) if request.transport is not None else None
        if connection is not None:
            connection.request_started()
        try:
            name = peer_name(request.transport)
            if name is None:
                log.warning("peer API: refused a caller without a usable client certificate")
                return _unread(
                    request, _error(403, "a client certificate naming a configured agent is required")
                )
            if self.config.agent(name) is None:
                log.warning("peer API: refused certificate name %r: not a configured agent", name)
                return _unread(request, _error(403, f"certificate name {name!r} is not a configured agent"))
            token = _CALLER.set(name)  # a context variable, not request storage: no web.RequestKey in 3.8
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself: the same JSON error shape
                response = _error(exc.status, exc.reason, close=exc.status >= 500)
            except Exception:
                log.exception("peer API: %s %s from %s failed", request.method, request.path, name)
                response = _error(500, "internal error")
            finally:
                _CALLER.reset(token)
            return _unread(request, response)
        finally:
            if connection is not None:
                connection.request_finished()

    def _endpoint(
        self, path: str, request_cls: type[Any], handler: Handler
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def endpoint(request: web.Request) -> web.StreamResponse:
            peer = _CALLER.get()
            assert peer is not None  # the middleware set it, or the request never got here
            if request.content_type != "application/json":
                return _error(400, f"expected Content-Type application/json, got {request.content_type!r}")
            if (request.charset or "utf-8").lower() != "utf-8":
                return _error(400, f"expected UTF-8 JSON, got charset {request.charset!r}")
            if request.content_length is not None and request.content_length > self.max_body:
                return _error(413, f"body larger than {self.max_body} bytes", close=True)
            try:
                async with asyncio.timeout(self.request_timeout):
                    body = await request.read()
            except TimeoutError:
                return _error(408, f"body not received within {self.request_timeout:g}s", close=True)
            except web.HTTPRequestEntityTooLarge:
                return _error(413, f"body larger than {self.max_body} bytes", close=True)
            try:
                msg = wire.loads(request_cls, body)
            except wire.WireError as exc:
                log.warning("peer API: bad request to %s from %s: %s", path, peer, exc)
                return _error(400, str(exc))
            reply = await handler(peer, msg)
            try:
                data = wire.dumps(reply)
            except (TypeError, wire.WireError) as exc:
                raise RuntimeError(f"the handler of {path} returned an invalid reply: {exc}") from exc
            return web.Response(body=data, content_type="application/json")

        return endpoint


def _stream_endpoint(handler: StreamHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        peer = _CALLER.get()
        assert peer is not None  # the middleware set it, or the request never got here
        return await handler(peer, request)

    return endpoint


def error_response(status: int, message: str, *, close: bool = False) -> web.Response:
    """The peer API's JSON error, for streaming handlers (they build their own responses)."""
    return _error(status, message, close=close)


def _unread(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """An error answered before the body was read closes the connection: aiohttp 3.8 would otherwise leave the
    kept-alive connection stalled on the unread body until its idle timeout."""
    if response.status >= 400 and not request.content.at_eof():
        response.force_close()
    return response


def _error(status: int, message: str, *, close: bool = False) -> web.Response:
    response = web.Response(
        status=status,
        body=json.dumps({"error": message}).encode(),
        content_type="application/json",
    )
    if close:  # the rest of the stream is not worth reading (an unread body, a slow client)
        response.force_close()
    return response


class _Connection(asyncio.Protocol):
    """Sits between the TLS transport and aiohttp's protocol and closes connections that hold the server.

    aiohttp (3.8 at least) has no limit on how long a request's headers may take to arrive, so a client that
    dribbles bytes would keep its connection forever. Here, from the first byte of a request to the moment the
    handler starts, at most `request_timeout` may pass; an idle connection lives `keepalive_timeout`.
    """

    def __init__(self, inner: asyncio.Protocol, server: PeerServer) -> None:
        self.inner = inner
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self.idle_since = self.loop.time()
        self.partial_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections[transport] = self
        self.inner.connection_made(transport)
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.server._connections.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.partial_since is None:
            self.partial_since = self.loop.time()
            self._schedule()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_started(self) -> None:
        self.busy += 1
        self.partial_since = None

    def request_finished(self) -> None:
        self.busy -= 1
        self.idle_since = self.loop.time()
        self._schedule()

    def _deadline(self) -> float:
        if self.partial_since is not None:
            return self.partial_since + self.server.request_timeout
        return self.idle_since + self.server.keepalive_timeout

    def _schedule(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if self.busy else self.loop.call_at(self._deadline(), self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.busy or self.transport is None:
            return
        if self.loop.time() < self._deadline():
            self._schedule()
            return
        if self.partial_since is not None:
            log.info("peer API: closed a connection whose request took over %gs", self.server.request_timeout)
        self.transport.abort()


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through `_Connection`, with a bounded TLS handshake."""

    def __init__(
        self,
        runner: web.AppRunner,
        server: PeerServer,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, ssl_context=ctx, **kwargs)
        self.peer_server = server
        self.host = host
        self.port = port
        self.bound: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        return f"https://{join_hostport(self.host, self.port)}"

    async def start(self) -> None:
        await super().start()
        http = self._runner.server
        assert http is not None
        peer_server = self.peer_server
        server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(http(), peer_server),
            self.host,
            self.port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=peer_server.request_timeout,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._server = server
        sockname = server.sockets[0].getsockname()
        self.bound = (sockname[0], sockname[1])


# --------------------------------------------------------------------------------------------------------------
# Client

_EXPECTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("kmagent_peer_expected", default=None)


class _WrongPeer(Exception):
    pass


class _VerifyingConnector(aiohttp.TCPConnector):
    """Checks every connection it hands out (new or kept alive) against the agent the request is meant for."""

    async def connect(
        self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        expected = _EXPECTED.get()
        actual = peer_name(conn.transport)
        if expected is None or actual != expected:
            conn.close()
            shown = "no agent name" if actual is None else f"agent {actual!r}"
            raise _WrongPeer(f"the server's certificate names {shown}, not {expected!r}")
        return conn


class PeerClient:
    """One kept-alive HTTPS session to all peers; `post` sends one message and returns the decoded reply."""

    def __init__(self, config: Config, *, limit_per_host: int = 2, max_reply: int = MAX_REPLY) -> None:
        self.config = config
        self.limit_per_host = limit_per_host
        self.max_reply = max_reply
        self._ssl = client_context(config)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            source = self.config.peer.source
            connector = _VerifyingConnector(
                ssl=self._ssl, limit_per_host=self.limit_per_host, local_addr=(source, 0) if source else None
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # post() bounds every request as a whole
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None

    async def post(
        self, peer: AgentSpec, path: str, msg: object, reply_cls: type[R], timeout: float | None = None
    ) -> R:
        """POST `msg` to `peer` at `path` and decode the reply as `reply_cls`, all within `timeout` seconds
        (default: timings.peer_timeout); PeerError on any failure."""
        body = wire.dumps(msg)  # a WireError here is our own bug: let it surface as such
        limit = self.config.timings.peer_timeout if timeout is None else timeout
        status, content_type, data = await self.call(
            peer, path, lambda session, url: self._exchange(session, url, body), limit
        )
        if status != 200:
            raise PeerError(peer.name, f"HTTP {status}: {_error_text(data)}", status=status)
        if content_type != "application/json":
            raise PeerError(peer.name, f"bad reply: Content-Type {content_type!r}, expected application/json")
        try:
            return wire.loads(reply_cls, data)
        except wire.WireError as exc:
            raise PeerError(peer.name, f"bad reply: {exc}") from None

    async def call(
        self,
        peer: AgentSpec,
        path: str,
        exchange: Callable[[aiohttp.ClientSession, str], Awaitable[R]],
        timeout: float | None,
    ) -> R:
        """Run `exchange(session, url)` against `peer` at `path` within `timeout` seconds (None: no overall limit,
        for streamed transfers that bound each read instead); every connection failure becomes a PeerError.
        The connection is checked to reach the agent named `peer` before a byte of the request is sent."""
        if not path.startswith("/"):
            raise ValueError(f"a peer API path starts with '/', got {path!r}")
        url = f"https://{peer.address}{path}"
        token = _EXPECTED.set(peer.name)
        try:
            async with asyncio.timeout(timeout):
                return await exchange(self._get_session(), url)
        except TimeoutError:
            raise PeerError(peer.name, f"no reply from {peer.address} within {timeout:g}s") from None
        except _WrongPeer as exc:
            raise PeerError(peer.name, f"wrong server at {peer.address}: {exc}") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PeerError(
                peer.name, f"TLS: the certificate of {peer.address} is not trusted: {exc.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise PeerError(peer.name, f"TLS handshake with {peer.address} failed: {_reason(exc)}") from None
        except aiohttp.ClientConnectorError as exc:
            raise PeerError(peer.name, f"cannot connect to {peer.address}: {_reason(exc)}") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # TLS 1.3: a server that refuses our certificate does so after our side of the handshake is done,
            # so all we see is the connection closing.
            raise PeerError(
                peer.name,
                f"{peer.address} closed the connection without a reply ({_reason(exc)}); did it refuse our "
                "certificate? It must be signed by the cluster CA, valid now, and name a configured agent",
            ) from None
        except (aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            raise PeerError(peer.name, f"request to {peer.address} failed: {_reason(exc)}") from None
        finally:
            _EXPECTED.reset(token)

    async def _exchange(
        self, session: aiohttp.ClientSession, url: str, body: bytes
    ) -> tuple[int, str, bytes]:
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            return resp.status, resp.content_type, await self.read_reply(resp)

    async def read_reply(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body of a (small) reply, at most `max_reply` bytes."""
        if resp.content_length is not None and resp.content_length > self.max_reply:
            raise aiohttp.ClientPayloadError(f"reply larger than {self.max_reply} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self.max_reply:
                raise aiohttp.ClientPayloadError(f"reply larger than {self.max_reply} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _reason(exc: BaseException) -> str:
    """The most specific text of a connection failure (aiohttp wraps the OS or SSL error)."""
    inner = getattr(exc, "os_error", None) or exc.__cause__ or exc
    if isinstance(inner, ssl.SSLError) and inner.reason:
        return f"{inner.reason.replace('_', ' ').lower()}"
    if isinstance(inner, OSError) and inner.errno:
        return os.strerror(inner.errno)  # asyncio's strerror is "Connect call failed (...)"
    return str(inner) or type(inner).__name__


def error_text(data: bytes) -> str:
    """The server's error message in a reply body (for callers of `PeerClient.call`)."""
    return _error_text(data)


def _error_text(data: bytes) -> str:
    """The server's error message from a JSON error body, else the start of the body (printable only)."""
    try:
        decoded = json.loads(data)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        text: str = decoded["error"]
    else:
        text = data[:200].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in text[:500])
    return text or "(no message)"
