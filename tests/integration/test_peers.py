"""The peer transport over real TLS on 127.0.0.1: who is let in, what bodies are accepted, and what fails how."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from agent import pki
from agent.config import AgentSpec, Config, load_config
from agent.core import wire
from agent.core.messages import VoteReply, VoteRequest
from agent.io.peers import MAX_BODY, PeerClient, PeerError, PeerServer, Route, TLSSetupError, client_context

DEADLINE = 10.0  # generous: only to turn a hang into a failure, never a timing assertion


# --------------------------------------------------------------------------------------------------------------
# Certificates and configs


@dataclasses.dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class PKI:
    ca: Path
    ids: dict[str, Identity]  # km1..km3 and the bad ones, by label


def _write(directory: Path, label: str, cert: x509.Certificate, key: pki.PrivateKey) -> Identity:
    cert_path, key_path = directory / f"{label}.crt", directory / f"{label}.key"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Identity(cert_path, key_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = pki.build_ca("test CA", now)
    other_cert, other_key = pki.build_ca("another CA", now)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ids: dict[str, Identity] = {}
    for name in ("km1", "km2", "km3"):
        ids[name] = _write(directory, name, *pki.build_leaf(ca_cert, ca_key, name, now, dns=[name]))
    ids["unlisted"] = _write(directory, "unlisted", *pki.build_leaf(ca_cert, ca_key, "km9", now))
    ids["foreign"] = _write(directory, "foreign", *pki.build_leaf(other_cert, other_key, "km2", now))
    long_ago = now - datetime.timedelta(days=30)
    ids["expired"] = _write(directory, "expired", *pki.build_leaf(ca_cert, ca_key, "km2", long_ago, days=1))
    return PKI(directory / "ca.crt", ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("km1", "km2", "km3")}


def make_config(tmp_path: Path, certs: PKI, ports: dict[str, int], name: str, identity: str = "") -> Config:
    """The config of agent `name` (with the certificate `identity`, default its own) in a 3-agent cluster."""
    ident = certs.ids[identity or name]
    agents = "\n".join(
        f'[[agents]]\nname = "{n}"\naddress = "127.0.0.1:{p}"\nminkms_host = "127.0.0.{i}:7373"\n'
        for i, (n, p) in enumerate(ports.items(), 1)
    )
    text = (
        f'cluster = "test"\nname = "{name}"\n\n{agents}\n'
        '[local]\nstorage_path = "/srv/kms"\n\n[minkms]\napi_key_file = "/etc/kmagent/minkms.key"\n\n'
        f'[tls]\nca = "{certs.ca}"\ncert = "{ident.cert}"\nkey = "{ident.key}"\n\n'
        '[timings]\nprobe_interval = "200ms"\npeer_timeout = "2s"\n'
        '[metrics]\naddress = ""\n'
    )
    path = tmp_path / f"{name}-{identity or 'own'}.toml"
    path.write_text(text)
    return load_config(path, check_files=False)


# --------------------------------------------------------------------------------------------------------------
# A server with a few routes


class Recorder:
    """The handlers of the test server; records who called with what."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.calls: list[tuple[str, object]] = []
        self.release = asyncio.Event()

    async def vote(self, peer: str, msg: VoteRequest) -> VoteReply:
        self.calls.append((peer, msg))
        return VoteReply(msg.cluster, msg.term, self.me, True, "", msg.term)

    async def boom(self, peer: str, msg: VoteRequest) -> VoteReply:
        self.calls.append((peer, msg))
        raise RuntimeError("handler bug with secret k1:DO-NOT-LEAK")

    async def hang(self, peer: str, msg: VoteRequest) -> VoteReply:
        self.calls.append((peer, msg))
        await self.release.wait()
        return await self.vote(peer, msg)

    async def invalid(self, peer: str, msg: VoteRequest) -> object:
        self.calls.append((peer, msg))
        return {"not": "a message"}

    def routes(self) -> list[Route]:
        return [
            ("/v1/vote", VoteRequest, self.vote),
            ("/v1/boom", VoteRequest, self.boom),
            ("/v1/hang", VoteRequest, self.hang),
            ("/v1/invalid", VoteRequest, self.invalid),
        ]


Started = Callable[..., Awaitable[tuple[PeerServer, Recorder]]]


@pytest.fixture
async def start_server(tmp_path: Path, certs: PKI, ports: dict[str, int]) -> AsyncIterator[Started]:
    running: list[tuple[PeerServer, Recorder]] = []

    async def start(name: str = "km1", **kwargs: Any) -> tuple[PeerServer, Recorder]:
        recorder = Recorder(name)
        server = PeerServer(make_config(tmp_path, certs, ports, name), recorder.routes(), **kwargs)
        await server.start()
        running.append((server, recorder))
        return server, recorder

    yield start
    for server, recorder in running:
        recorder.release.set()
        await server.stop()


@pytest.fixture
async def client_factory(
    tmp_path: Path, certs: PKI, ports: dict[str, int]
) -> AsyncIterator[Callable[..., PeerClient]]:
    clients: list[PeerClient] = []

    def make(name: str = "km2", identity: str = "") -> PeerClient:
        client = PeerClient(make_config(tmp_path, certs, ports, name, identity))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def spec(client: PeerClient, name: str) -> AgentSpec:
    agent = client.config.agent(name)
    assert agent is not None
    return agent


VOTE = VoteRequest("test", 5, "km2")


# --------------------------------------------------------------------------------------------------------------
# The happy path


async def test_valid_peer_round_trip(
    start_server: Started, client_factory: Callable[..., PeerClient]
) -> None:
    _, recorder = await start_server("km1")
    client = client_factory("km2")
    for term in (5, 6):  # the second one goes over the kept-alive connection
        reply = await client.post(
            spec(client, "km1"), "/v1/vote", dataclasses.replace(VOTE, term=term), VoteReply
        )
        assert reply == VoteReply("test", term, "km1", True, "", term)
    assert recorder.calls == [("km2", VOTE), ("km2", dataclasses.replace(VOTE, term=6))]


# --------------------------------------------------------------------------------------------------------------
# Refused callers: the handler never runs


@pytest.mark.parametrize("identity", ["foreign", "expired"])
async def test_untrusted_client_certificates_are_refused_in_the_handshake(
    identity: str, start_server: Started, client_factory: Callable[..., PeerClient]
) -> None:
    _, recorder = await start_server("km1")
    client = client_factory("km2", identity)
    with pytest.raises(PeerError) as info:
        await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply, timeout=DEADLINE)
    assert info.value.status is None  # refused in TLS, before any HTTP
    assert "did it refuse our certificate?" in str(info.value)
    assert recorder.calls == []


async def test_ca_signed_certificate_with_an_unlisted_name_gets_403(
    start_server: Started, client_factory: Callable[..., PeerClient]
) -> None:
    _, recorder = await start_server("km1")
    client = client_factory("km2", "unlisted")
    with pytest.raises(PeerError) as info:
        await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply)
    assert info.value.status == 403
    assert str(info.value) == "peer km1: HTTP 403: certificate name 'km9' is not a configured agent"
    # refused before routing too: an unknown path gets 403, not 404
    with pytest.raises(PeerError, match="HTTP 403"):
        await client.post(spec(client, "km1"), "/nowhere", VOTE, VoteReply)
    assert recorder.calls == []


async def raw_tls(port: int, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Send raw bytes over TLS and read until the server closes; TLS failures propagate."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), DEADLINE)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


def bare_context(certs: PKI, identity: Identity | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(certs.ca))
    if identity is not None:
        ctx.load_cert_chain(str(identity.cert), str(identity.key))
    return ctx


REQUEST = (
    b"POST /v1/vote HTTP/1.1\r\nHost: km1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


def vote_request_bytes() -> bytes:
    body = wire.dumps(VOTE)
    return REQUEST % (len(body), body)


async def test_client_without_certificate_is_refused(start_server: Started, certs: PKI) -> None:
    server, recorder = await start_server("km1")
    answer = b""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        answer = await raw_tls(server.port, bare_context(certs), vote_request_bytes())
        if not answer:  # TLS 1.3: the client may only see the refusal as a closed connection
            raise ConnectionResetError("closed without an answer")
    assert b"200 OK" not in answer
    assert recorder.calls == []


async def test_tls12_only_client_is_refused(start_server: Started, certs: PKI) -> None:
    server, recorder = await start_server("km1")
    ctx = bare_context(certs, certs.ids["km2"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):  # refused in the handshake itself
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port, ssl=ctx), DEADLINE)
    assert recorder.calls == []


async def test_raw_tls_with_a_valid_certificate_works(start_server: Started, certs: PKI) -> None:
    """The control case of the two tests above: the same raw request with a certificate is answered."""
    server, recorder = await start_server("km1")
    answer = await raw_tls(server.port, bare_context(certs, certs.ids["km2"]), vote_request_bytes())
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert recorder.calls == [("km2", VOTE)]


async def test_client_refuses_a_server_whose_certificate_names_another_agent(
    start_server: Started, client_factory: Callable[..., PeerClient]
) -> None:
    _, recorder = await start_server("km3")
    client = client_factory("km2")
    impostor = dataclasses.replace(spec(client, "km1"), address=spec(client, "km3").address)
    with pytest.raises(PeerError) as info:
        await client.post(impostor, "/v1/vote", VOTE, VoteReply)
    assert "certificate names agent 'km3', not 'km1'" in str(info.value)
    assert recorder.calls == []  # not a byte of the request was sent
    reply = await client.post(spec(client, "km3"), "/v1/vote", VOTE, VoteReply)  # the right name works
    assert reply.voter == "km3"


async def test_client_refuses_a_server_of_another_ca(
    tmp_path: Path, certs: PKI, ports: dict[str, int], client_factory: Callable[..., PeerClient]
) -> None:
    recorder = Recorder("km1")
    server = PeerServer(make_config(tmp_path, certs, ports, "km1", "foreign"), recorder.routes())
    await server.start()
    try:
        client = client_factory("km2")
        with pytest.raises(PeerError, match=r"TLS: the certificate of 127\.0\.0\.1:\d+ is not trusted"):
            await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply)
    finally:
        await server.stop()
    assert recorder.calls == []


# --------------------------------------------------------------------------------------------------------------
# Bodies, paths and methods, from an authenticated peer


@pytest.fixture
async def raw_session(
    certs: PKI, tmp_path: Path, ports: dict[str, int]
) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = client_context(make_config(tmp_path, certs, ports, "km2"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        yield session


async def send(
    session: aiohttp.ClientSession,
    port: int,
    path: str,
    body: Any = b"",
    content_type: str | None = "application/json",
    method: str = "POST",
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    url = URL(f"https://127.0.0.1:{port}{path}", encoded=True)
    async with asyncio.timeout(DEADLINE):
        async with session.request(method, url, data=body, headers=headers) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()


async def test_oversize_body_gets_413(start_server: Started, raw_session: aiohttp.ClientSession) -> None:
    server, recorder = await start_server("km1", max_body=4096)
    status, body = await send(raw_session, server.port, "/v1/vote", b" " * 4097)
    assert (status, body) == (413, {"error": "body larger than 4096 bytes"})

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for _ in range(10):
            yield b" " * 1024

    status, body = await send(raw_session, server.port, "/v1/vote", chunked())
    assert (status, body) == (413, {"error": "body larger than 4096 bytes"})
    assert recorder.calls == []
    assert MAX_BODY == 256 * 1024  # the default


@pytest.mark.parametrize(
    ("body", "content_type", "error"),
    [
        (
            b'{"cluster": "test", "term": 1',
            "application/json",
            "invalid JSON: Expecting ',' delimiter (line 1, column 30)",
        ),
        (b"{}", "text/plain", "expected Content-Type application/json, got 'text/plain'"),
        (b"{}", None, "expected Content-Type application/json, got 'application/octet-stream'"),
        (b"{}", "application/json; charset=latin-1", "expected UTF-8 JSON, got charset 'latin-1'"),
        (
            b'{"cluster": "test", "term": "1", "candidate": "km2"}',
            "application/json",
            'vote_request.term: expected an integer, got "1"',
        ),
        (
            b'{"cluster": "test", "term": 1}',
            "application/json",
            "vote_request.candidate: required field missing",
        ),
        (
            b'{"cluster": "test", "term": 1, "candidate": "km2", "x": 0}',
            "application/json",
            'vote_request: unknown field "x"',
        ),
        (b'{"cluster": "a", "cluster": "b"}', "application/json", 'duplicate key "cluster" in a JSON object'),
    ],
)
async def test_bad_bodies_get_400_with_a_precise_message(
    body: bytes,
    content_type: str | None,
    error: str,
    start_server: Started,
    raw_session: aiohttp.ClientSession,
) -> None:
    server, recorder = await start_server("km1")
    assert await send(raw_session, server.port, "/v1/vote", body, content_type) == (400, {"error": error})
    assert recorder.calls == []


async def test_unknown_path_404_and_wrong_method_405(
    start_server: Started, raw_session: aiohttp.ClientSession
) -> None:
    server, _ = await start_server("km1")
    status, body = await send(raw_session, server.port, "/v1/nothing", wire.dumps(VOTE))
    assert (status, body) == (404, {"error": "Not Found"})
    status, body = await send(raw_session, server.port, "/v1/vote", method="GET")
    assert (status, body) == (405, {"error": "Method Not Allowed"})


async def test_handler_exception_is_500_generic_and_logged_and_the_server_goes_on(
    start_server: Started, client_factory: Callable[..., PeerClient], caplog: pytest.LogCaptureFixture
) -> None:
    await start_server("km1")
    client = client_factory("km2")
    with caplog.at_level(logging.ERROR, logger="agent.io.peers"):
        with pytest.raises(PeerError) as info:
            await client.post(spec(client, "km1"), "/v1/boom", VOTE, VoteReply)
        with pytest.raises(PeerError, match="HTTP 500: internal error"):
            await client.post(spec(client, "km1"), "/v1/invalid", VOTE, VoteReply)
    assert str(info.value) == "peer km1: HTTP 500: internal error"  # nothing of the exception leaks out
    assert info.value.status == 500
    assert any("/v1/boom from km2 failed" in r.getMessage() and r.exc_info for r in caplog.records)
    assert any("returned an invalid reply" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert (await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply)).granted


# --------------------------------------------------------------------------------------------------------------
# Time limits


async def test_client_fails_within_its_timeout_on_a_hung_handler(
    start_server: Started, client_factory: Callable[..., PeerClient]
) -> None:
    _, recorder = await start_server("km1")
    client = client_factory("km2")
    started = time.monotonic()
    with pytest.raises(PeerError, match=r"no reply from 127\.0\.0\.1:\d+ within 0\.5s"):
        await client.post(spec(client, "km1"), "/v1/hang", VOTE, VoteReply, timeout=0.5)
    assert time.monotonic() - started < DEADLINE
    assert len(recorder.calls) == 1


async def test_client_fails_within_its_timeout_on_a_server_that_never_handshakes(
    client_factory: Callable[..., PeerClient], ports: dict[str, int]
) -> None:
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _r, w: accepted.append(w), "127.0.0.1", ports["km1"])
    try:
        client = client_factory("km2")
        started = time.monotonic()
        with pytest.raises(PeerError, match=r"no reply .* within 0\.5s"):
            await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply, timeout=0.5)
        assert time.monotonic() - started < DEADLINE
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_connection_refused_is_a_clear_peer_error(client_factory: Callable[..., PeerClient]) -> None:
    client = client_factory("km2")
    with pytest.raises(PeerError, match=r"^peer km1: cannot connect to 127\.0\.0\.1:\d+: .*[Rr]efused"):
        await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply)


async def _connect(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), DEADLINE)


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends before it closes the connection; a hang past DEADLINE fails the test."""
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    except (ConnectionError, ssl.SSLError):
        return b""


async def test_slow_requests_do_not_hold_the_server(
    start_server: Started, certs: PKI, client_factory: Callable[..., PeerClient]
) -> None:
    # keep-alive far beyond DEADLINE: only the request time limit can close these connections in time
    server, recorder = await start_server("km1", request_timeout=0.5, keepalive_timeout=60.0)
    ctx = bare_context(certs, certs.ids["km2"])
    r1, w1 = await _connect(server.port, ctx)
    w1.write(b"POST /v1/vote HTTP/1.1\r\nHost: km1\r\n")  # headers that never finish
    r2, w2 = await _connect(server.port, ctx)
    w2.write(  # a body that never finishes
        b"POST /v1/vote HTTP/1.1\r\nHost: km1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    client = client_factory("km2")  # meanwhile a real peer is served
    assert (await client.post(spec(client, "km1"), "/v1/vote", VOTE, VoteReply)).granted

    assert await _until_closed(r1) == b""
    answer = await _until_closed(r2)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body not received within 0.5s" in answer
    for w in (w1, w2):
        w.close()
    assert recorder.calls == [("km2", VOTE)]


async def test_idle_connections_are_closed_after_the_keepalive_timeout(
    start_server: Started, certs: PKI
) -> None:
    server, _ = await start_server("km1", request_timeout=30.0, keepalive_timeout=0.5)
    ctx = bare_context(certs, certs.ids["km2"])
    silent_reader, silent = await _connect(server.port, ctx)  # never says anything
    reader, writer = await _connect(server.port, ctx)  # one request, then idle
    body = wire.dumps(VOTE)
    writer.write(
        b"POST /v1/vote HTTP/1.1\r\nHost: km1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    assert (await _until_closed(reader)).startswith(b"HTTP/1.1 200 OK")
    assert await _until_closed(silent_reader) == b""
    writer.close()
    silent.close()


async def test_unusable_own_tls_files_give_a_clear_error(
    tmp_path: Path, certs: PKI, ports: dict[str, int]
) -> None:
    config = make_config(tmp_path, certs, ports, "km1")
    mismatched = dataclasses.replace(config, tls=dataclasses.replace(config.tls, key=certs.ids["km2"].key))
    with pytest.raises(TLSSetupError, match=r"^tls\.cert, tls\.key: cannot use .*km1\.crt with .*km2\.key: "):
        PeerClient(mismatched)
    missing = dataclasses.replace(config, tls=dataclasses.replace(config.tls, ca=tmp_path / "nope.crt"))
    with pytest.raises(
        TLSSetupError, match=r"^tls\.ca: cannot load the cluster CA from .*nope\.crt: No such file"
    ):
        await PeerServer(missing, []).start()


# --------------------------------------------------------------------------------------------------------------
# Fuzzing: whatever an authenticated peer sends, it gets a 4xx and the server keeps answering


@pytest.fixture
def fuzz_target(
    tmp_path: Path, certs: PKI, ports: dict[str, int]
) -> Iterator[tuple[asyncio.AbstractEventLoop, Any]]:
    """A server and a session on a private loop, so that hypothesis (synchronous) can drive them."""
    loop = asyncio.new_event_loop()
    recorder = Recorder("km1")
    server = PeerServer(make_config(tmp_path, certs, ports, "km1"), recorder.routes(), max_body=8192)
    loop.run_until_complete(server.start())
    ctx = client_context(make_config(tmp_path, certs, ports, "km2"))

    async def make_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))

    session = loop.run_until_complete(make_session())
    try:
        yield loop, (server, session)
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(server.stop())
        loop.close()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
VALID = wire.encode(VOTE)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from([*VALID, "x"]), JSON, max_size=4).map(
        lambda d: json.dumps({**VALID, **d}).encode()
    ),
    st.binary(min_size=8193, max_size=9000),
)
PATHS = st.one_of(
    st.sampled_from(["/v1/vote", "/v1/vote/", "/v1/VOTE", "/", "//v1/vote", "/v1/vote/../vote"]),
    st.text(max_size=40).map(lambda t: "/" + urllib.parse.quote(t, safe="/:@!$&'()*+,;=")),
)


def expected_ok(method: str, path: str, body: bytes, content_type: str) -> bool:
    if (
        method != "POST"
        or path != "/v1/vote"
        or content_type not in ("application/json", "application/json; charset=utf-8")
    ):
        return False
    try:
        wire.loads(VoteRequest, body)
    except wire.WireError:
        return False
    return len(body) <= 8192


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"]),
    path=PATHS,
    body=BODIES,
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/x-www-form-urlencoded",
        ]
    ),
)
def test_fuzzed_requests_get_4xx_and_the_server_keeps_answering(
    fuzz_target: tuple[asyncio.AbstractEventLoop, Any], method: str, path: str, body: bytes, content_type: str
) -> None:
    loop, (server, session) = fuzz_target
    status, answer = loop.run_until_complete(send(session, server.port, path, body, content_type, method))
    if expected_ok(method, path, body, content_type):
        assert status == 200, answer
    else:
        assert 400 <= status < 500, (status, answer)
        assert isinstance(answer.get("error"), str) and answer["error"]
    status, answer = loop.run_until_complete(send(session, server.port, "/v1/vote", wire.dumps(VOTE)))
    assert status == 200 and answer["granted"] is True


async def test_a_busy_listen_address_is_a_clear_error(
    start_server: Started, tmp_path: Path, certs: PKI, ports: dict[str, int]
) -> None:
    await start_server("km1")
    second = PeerServer(make_config(tmp_path, certs, ports, "km1"), [])
    with pytest.raises(
        OSError, match=r"^\[Errno \d+\] peer.listen 127\.0\.0\.1:\d+: cannot listen: Address already in use"
    ):
        await second.start()
