"""`minkms server`: the emulated key manager node (HTTPS, mutual-TLS authentication, real state on disk)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ipaddress
import logging
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from cryptography.exceptions import InvalidTag

from emulator import wire
from emulator.hsm import SoftHSM, client_certificate, identity_of_api_key, identity_of_certificate
from emulator.node import VERSION, ClusterError, Node, normalize_host
from emulator.store import DEFAULT_ENCLAVE, Store, StoreError, now_iso

log = logging.getLogger("minkms")

DEFAULT_HEARTBEAT = 0.25
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


class StartupError(Exception):
    """The server refuses to start; the message is printed as `kms: <message>`."""


DEFAULT_HSM_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServerConfig:
    cert: Path
    key: Path
    ca: Path | None
    heartbeat: float
    # The emulator's stand-in for an external HSM/KMS backend (`hsm.endpoint`, docs/emulator.md §2.8): a URL
    # that must answer at start-up, or the server refuses to start as minkms does without its HSM.
    hsm_endpoint: str | None = None
    hsm_timeout: float = DEFAULT_HSM_TIMEOUT


def parse_duration(text: str) -> float:
    """Go-style durations: `250ms`, `1s`, `1m30s`."""
    text = str(text).strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        value, unit = float(match.group(1)), match.group(2)
        total += value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = match.end()
    if pos != len(text) or not text:
        raise StartupError(f"invalid duration {text!r}")
    return total


def load_config(path: Path | None) -> ServerConfig:
    if path is None:
        default = Path.home() / ".minkms" / "config.yaml"
        path = default if default.exists() else None
    if path is None:
        raise StartupError("no TLS configuration provided")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        # One line, as Go's yaml errors are ("yaml: line 2: …"): PyYAML's message spans several.
        raise StartupError(f"failed to read config file {path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise StartupError(f"config file {path}: not a YAML mapping")
    if data.get("version") != "v1":
        raise StartupError(f"config file {path}: 'version: v1' is required")
    admin = data.get("admin") or {}
    if isinstance(admin, dict) and admin.get("identity"):
        raise StartupError("admin.identity is not supported by the emulator: the root API key is used")
    tls = data.get("tls")
    if not isinstance(tls, dict):
        raise StartupError("no TLS configuration provided")
    certs = tls.get("certs")
    if not isinstance(certs, list) or not certs or not isinstance(certs[0], dict):
        raise StartupError("no server certificate provided")
    first = certs[0]
    if not first.get("cert") or not first.get("key"):
        raise StartupError("no server certificate provided: tls.certs needs 'cert' and 'key'")
    heartbeat = data.get("heartbeat", DEFAULT_HEARTBEAT)
    hb = parse_duration(heartbeat) if isinstance(heartbeat, str) else float(heartbeat)
    endpoint, hsm_timeout = _hsm_section(path, data.get("hsm"))
    return ServerConfig(
        cert=Path(first["cert"]),
        key=Path(first["key"]),
        ca=Path(tls["ca"]) if tls.get("ca") else None,
        heartbeat=hb if hb > 0 else DEFAULT_HEARTBEAT,
        hsm_endpoint=endpoint,
        hsm_timeout=hsm_timeout,
    )


def _hsm_section(path: Path, section: Any) -> tuple[str | None, float]:
    """`hsm: {endpoint: URL, timeout: 2s}`, the emulator's external HSM/KMS backend (a decision: the real
    config keys are a GAP). No section, or one without `endpoint`, means the software HSM alone."""
    if section is None:
        return None, DEFAULT_HSM_TIMEOUT
    if not isinstance(section, dict):
        raise StartupError(f"config file {path}: 'hsm' must be a mapping")
    endpoint = section.get("endpoint")
    if endpoint is None:
        return None, DEFAULT_HSM_TIMEOUT
    if not isinstance(endpoint, str) or not re.match(r"https?://[^/\s]+", endpoint):
        raise StartupError(f"config file {path}: hsm.endpoint must be an http:// or https:// URL")
    raw = section.get("timeout", DEFAULT_HSM_TIMEOUT)
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise StartupError(f"config file {path}: hsm.timeout must be a duration")
    timeout = parse_duration(raw) if isinstance(raw, str) else float(raw)
    return endpoint, timeout if timeout > 0 else DEFAULT_HSM_TIMEOUT


async def check_hsm_endpoint(cfg: ServerConfig) -> None:
    """The external HSM must answer at start-up: any HTTP answer below 500 within `hsm.timeout`.

    An https endpoint is verified against `tls.ca` (or the system CAs). Nothing is sent but a GET; the answer's
    body is ignored. A refused connection, a timeout, a TLS failure or a 5xx answer stop the server."""
    if cfg.hsm_endpoint is None:
        return
    url = cfg.hsm_endpoint
    ctx = ssl.create_default_context()
    if cfg.ca is not None:
        _load_verify(ctx, cfg.ca)
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.hsm_timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, ssl=ctx, allow_redirects=False) as reply,
        ):
            status = reply.status
    except TimeoutError:
        raise StartupError(f"cannot reach the HSM at {url}: no answer within {cfg.hsm_timeout:g}s") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise StartupError(f"cannot reach the HSM at {url}: {reason}") from None
    if status >= 500:
        raise StartupError(f"cannot reach the HSM at {url}: it answered HTTP {status}")


def _load_verify(ctx: ssl.SSLContext, ca: Path) -> None:
    """The CA file, or every file of a CA directory; StartupError naming it when it cannot be loaded."""
    try:
        if ca.is_dir():
            for item in sorted(ca.iterdir()):
                if item.is_file():
                    ctx.load_verify_locations(cafile=str(item))
        else:
            ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the CA certificates {ca}: {exc}") from exc


def _load_identity_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="minkms-") as tmp:
        cert_file, key_file = Path(tmp, "c.pem"), Path(tmp, "k.pem")
        cert_file.write_bytes(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        ctx.load_cert_chain(str(cert_file), str(key_file))


def tls_contexts(cfg: ServerConfig, root_key: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, inter-node client context). Both trust the HSM-derived root identity."""
    root_cert, root_private = client_certificate(root_key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        server.load_cert_chain(str(cfg.cert), str(cfg.key))
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"no server certificate provided: cannot load {cfg.cert}: {exc}") from exc
    server.verify_mode = ssl.CERT_OPTIONAL
    server.load_verify_locations(cadata=root_cert.decode())
    peer = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    peer.minimum_version = ssl.TLSVersion.TLSv1_2
    # As in the CLI: under TLS 1.2 a node that refuses our identity says so in the handshake.
    peer.maximum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca is not None:
        _load_verify(peer, cfg.ca)
    else:
        peer.load_default_certs()
    _load_identity_chain(peer, root_cert, root_private)
    return server, peer


class KMS:
    """Request handlers: the `/v1/kms` command set, health, backup/restore, restart, inter-node RPC."""

    def __init__(self, node: Node, hsm: SoftHSM, root_identity: str) -> None:
        self.node = node
        self.store = node.store
        self.hsm = hsm
        self.root_identity = root_identity
        self.requests = 0
        self.inflight = 0
        self.restart_hook: Callable[[], None] | None = None

    # ---- authentication ------------------------------------------------------------------------------
    def identity(self, request: web.Request) -> str | None:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj else None
        return identity_of_certificate(der) if der else None

    def require_sysadmin(self, request: web.Request) -> None:
        identity = self.identity(request)
        if identity is None:
            raise ClusterError(401, "not authenticated: no client certificate (API key) provided")
        if identity != self.root_identity:
            raise ClusterError(403, "access denied: insufficient permissions")

    # ---- health ----------------------------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": VERSION,
                "commit": "emulator",
                "api_version": "v1",
                "host": self.node.host,
                "fips140": False,
            }
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self.store.state.removed:
            return _error(503, "server not part of cluster")
        if "write" in request.query:
            blocker = self.node.write_blocker()
            if blocker:
                return _error(503, f"not ready for writes: {blocker}")
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        self.require_sysadmin(request)
        s = self.store.state
        lines = [
            "# TYPE http counter",
            f"http_total {self.requests}",
            "# TYPE http_request_inflight gauge",
            f"http_request_inflight {self.inflight}",
            "# TYPE minkms_cluster_commit gauge",
            f"minkms_cluster_commit {s.commit}",
            "# TYPE minkms_cluster_nodes gauge",
            f"minkms_cluster_nodes {len(s.members)}",
            "# TYPE minkms_cluster_leader gauge",
            f"minkms_cluster_leader {1 if self.node.role == 'Leader' else 0}",
            "# EOF",
        ]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="application/openmetrics-text", charset="utf-8"
        )

    # ---- /v1/kms ---------------------------------------------------------------------------------------
    async def kms(self, request: web.Request) -> web.Response:
        self.require_sysadmin(request)
        enclave = request.match_info.get("enclave") or DEFAULT_ENCLAVE
        body = await request.read()
        try:
            commands = wire.decode(body)
        except wire.FrameError as exc:
            raise ClusterError(400, f"invalid request: {exc}") from exc
        writes = [c for c, _ in commands if c in wire.WRITES and c != wire.CLUSTER_EDIT]
        if writes and len(writes) != len(commands):
            raise ClusterError(400, "invalid request: read and write commands cannot be mixed")
        if writes and self.node.role != "Leader":
            return await self._forward(request, enclave, body)
        replies = []
        for command_id, message in commands:
            replies.append((command_id, await self._run(command_id, message, enclave)))
        return web.Response(body=wire.encode(replies), content_type="application/octet-stream")

    async def _forward(self, request: web.Request, enclave: str, body: bytes) -> web.Response:
        node = self.node
        if not node.has_leader() or node.leader_id not in node.state.members:
            raise ClusterError(503, "cluster has no leader")
        host = node.state.members[node.leader_id]
        path = "/v1/kms/" + (request.match_info.get("enclave") or "")
        try:
            async with node.session.post(
                f"https://{host}{path}", data=body, timeout=aiohttp.ClientTimeout(total=70)
            ) as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ClusterError(503, f"cannot reach the leader {host}: {exc or 'timed out'}") from exc

    async def _run(self, command_id: int, m: dict[str, Any], enclave: str) -> dict[str, Any]:
        node, store = self.node, self.store
        if command_id == wire.CLUSTER_STATUS:
            return await node.cluster_status()
        if command_id == wire.CLUSTER_ADD_NODE:
            new_id = await node.add_node(_str(m, "host"))
            return {"node_id": new_id}
        if command_id == wire.CLUSTER_REMOVE_NODE:
            return {"node_id": await node.remove_node(_str(m, "host"))}
        if command_id == wire.CLUSTER_EDIT:
            remove = m.get("remove")
            if not isinstance(remove, list) or not all(isinstance(i, int) for i in remove):
                raise ClusterError(400, "invalid request: 'remove' must be a list of node IDs")
            return {"nodes": await node.edit(remove)}
        if command_id == wire.ENCLAVE_CREATE:
            name = _name(m)

            def create_enclave() -> dict[str, Any]:
                if any(e == name for e, _ in store.enclaves()):
                    raise ClusterError(409, f"enclave '{name}' already exists")
                return {"op": "create_enclave", "name": name, "created": now_iso()}

            await node.write(create_enclave)
            return {}
        if command_id == wire.ENCLAVE_LIST:
            return {"enclaves": [{"name": n, "created_at": c} for n, c in store.enclaves()]}
        if not any(e == enclave for e, _ in store.enclaves()):
            raise ClusterError(404, f"enclave '{enclave}' does not exist")
        if command_id == wire.KEY_CREATE or command_id == wire.KEY_IMPORT:
            return await self._create_key(command_id, m, enclave)
        if command_id == wire.KEY_DELETE:
            name = _name(m)

            def delete() -> dict[str, Any]:
                if not store.key_versions(enclave, name):
                    raise ClusterError(404, f"key '{name}' does not exist")
                return {"op": "delete_key", "enclave": enclave, "name": name}

            await node.write(delete)
            return {}
        if command_id == wire.KEY_LIST:
            prefix = str(m.get("prefix", ""))
            return {"names": store.key_names(enclave, prefix)}
        if command_id == wire.KEY_STATUS:
            name = _name(m)
            versions = self._versions(enclave, name)
            version, algorithm, created, _ = versions[-1]
            return {"name": name, "version": version, "algorithm": algorithm, "created_at": created}
        if command_id in (wire.KEY_GENERATE, wire.KEY_ENCRYPT):
            return self._encrypt(command_id, m, enclave)
        if command_id == wire.KEY_DECRYPT:
            return self._decrypt(m, enclave)
        raise ClusterError(400, f"unsupported command {wire.NAMES.get(command_id, command_id)}")

    def _versions(self, enclave: str, name: str) -> list[tuple[int, str, str, bytes]]:
        versions = self.store.key_versions(enclave, name)
        if not versions:
            raise ClusterError(404, f"key '{name}' does not exist")
        return versions

    async def _create_key(self, command_id: int, m: dict[str, Any], enclave: str) -> dict[str, Any]:
        name = _name(m)
        algorithm = str(m.get("algorithm") or "AES256")
        if algorithm not in ("AES256", "ChaCha20"):
            raise ClusterError(400, f"invalid key type {algorithm!r}: use AES256 or ChaCha20")
        if command_id == wire.KEY_IMPORT:
            try:
                material = base64.b64decode(_str(m, "key"), validate=True)
            except ValueError as exc:
                raise ClusterError(400, "invalid key: not base64") from exc
            if len(material) != 32:
                raise ClusterError(400, "invalid key: expected 32 bytes")
        else:
            material = os.urandom(32)
        add_version = bool(m.get("add_version"))
        store = self.store
        result: dict[str, Any] = {}

        def op() -> dict[str, Any]:
            versions = store.key_versions(enclave, name)
            if versions and not add_version:
                raise ClusterError(409, f"key '{name}' already exists")
            if add_version and not versions:
                raise ClusterError(404, f"key '{name}' does not exist")
            version = versions[-1][0] + 1 if versions else 1
            result["version"] = version
            sealed = self.hsm.seal(material, f"{enclave}/{name}/{version}".encode())
            return {
                "op": "create_key",
                "enclave": enclave,
                "name": name,
                "version": version,
                "algorithm": algorithm,
                "created": now_iso(),
                "material": base64.b64encode(sealed).decode(),
            }

        await self.node.write(op)
        return result

    def _key_material(self, enclave: str, name: str, version: int | None) -> tuple[int, bytes]:
        versions = self._versions(enclave, name)
        chosen = versions[-1] if version is None else next((v for v in versions if v[0] == version), None)
        if chosen is None:
            raise ClusterError(404, f"key '{name}' version {version} does not exist")
        try:
            return chosen[0], self.hsm.unseal(chosen[3], f"{enclave}/{name}/{chosen[0]}".encode())
        except InvalidTag as exc:
            raise ClusterError(500, f"key '{name}' cannot be unsealed") from exc

    def _encrypt(self, command_id: int, m: dict[str, Any], enclave: str) -> dict[str, Any]:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        name = _name(m)
        version, material = self._key_material(enclave, name, _opt_int(m, "version"))
        if command_id == wire.KEY_GENERATE:
            plaintext = os.urandom(int(m.get("length") or 32))
        else:
            plaintext = base64.b64decode(_str(m, "plaintext"))
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(material).encrypt(nonce, plaintext, name.encode())
        return {
            "version": version,
            "plaintext": base64.b64encode(plaintext).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
        }

    def _decrypt(self, m: dict[str, Any], enclave: str) -> dict[str, Any]:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        name = _name(m)
        version = _opt_int(m, "version")
        try:
            data = base64.b64decode(_str(m, "ciphertext"), validate=True)
        except ValueError as exc:
            raise ClusterError(400, "invalid ciphertext") from exc
        version, material = self._key_material(enclave, name, version)
        try:
            plaintext = AESGCM(material).decrypt(data[:12], data[12:], name.encode())
        except (InvalidTag, ValueError) as exc:
            raise ClusterError(400, "invalid ciphertext") from exc
        return {"version": version, "plaintext": base64.b64encode(plaintext).decode()}

    # ---- backup and restore -------------------------------------------------------------------------
    async def backup(self, request: web.Request) -> web.Response:
        self.require_sysadmin(request)
        data = self.store.backup()
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(
                body=gzip.compress(data),
                headers={"Content-Encoding": "gzip"},
                content_type="application/octet-stream",
            )
        return web.Response(body=data, content_type="application/octet-stream")

    async def restore(self, request: web.Request) -> web.Response:
        self.require_sysadmin(request)
        data = await request.read()
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise ClusterError(400, f"backup is corrupt: {exc}") from exc
        async with self.node.write_lock:
            try:
                commit = self.store.restore(data)
            except StoreError as exc:
                raise ClusterError(409, str(exc)) from exc
        log.info("restored backup at commit %s", commit)
        return web.json_response({"commit": commit})

    # ---- restart ----------------------------------------------------------------------------------------
    async def restart(self, request: web.Request) -> web.Response:
        self.require_sysadmin(request)
        if "self" not in request.query:
            node = self.node
            await asyncio.gather(
                *(
                    _post(node, h, "/v1/debug/restart?self")
                    for i, h in node.state.members.items()
                    if i != node.state.node_id
                ),
                return_exceptions=True,
            )
        if self.restart_hook:
            asyncio.get_running_loop().call_later(0.2, self.restart_hook)
        return web.Response(status=200)

    # ---- inter-node RPC -----------------------------------------------------------------------------
    async def rpc(self, request: web.Request) -> web.Response:
        self.require_sysadmin(request)
        name = request.match_info["name"]
        try:
            payload = await request.json()
            if not isinstance(payload, dict):
                raise ValueError("not an object")
            node = self.node
            if name == "status":
                return web.json_response(node.on_status())
            if name == "vote":
                return web.json_response(node.on_vote(payload))
            if name == "append":
                return web.json_response(await node.on_append(payload))
            if name == "membership":
                return web.json_response(node.on_membership(payload))
            if name == "join":
                return web.json_response(await node.on_join(payload))
        except (ValueError, KeyError, TypeError) as exc:
            raise ClusterError(400, f"invalid RPC request: {exc!r}") from exc
        raise ClusterError(404, f"unknown RPC {name}")


async def _post(node: Node, host: str, path: str) -> None:
    async with node.session.post(f"https://{host}{path}", timeout=aiohttp.ClientTimeout(total=2)) as resp:
        await resp.read()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _str(m: dict[str, Any], key: str) -> str:
    value = m.get(key)
    if not isinstance(value, str) or not value:
        raise ClusterError(400, f"invalid request: '{key}' is required")
    return value


def _name(m: dict[str, Any]) -> str:
    name = _str(m, "name")
    if len(name) > 128 or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ClusterError(400, f"invalid name {name!r}: use letters, digits, '-', '_' and '.'")
    return name


def _opt_int(m: dict[str, Any], key: str) -> int | None:
    value = m.get(key)
    if value in (None, 0):
        return None
    if not isinstance(value, int):
        raise ClusterError(400, f"invalid request: '{key}' must be an integer")
    return value


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    kms: KMS = request.app["kms"]
    kms.requests += 1
    kms.inflight += 1
    try:
        return await handler(request)
    except ClusterError as exc:
        return _error(exc.status, exc.message)
    finally:
        kms.inflight -= 1


def build_app(kms: KMS) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=256 << 20)
    app["kms"] = kms
    app.router.add_get("/version", kms.version)
    app.router.add_get("/v1/health/live", kms.live)
    app.router.add_get("/v1/health/ready", kms.ready)
    app.router.add_get("/v1/health/metrics", kms.metrics)
    app.router.add_post("/v1/kms/", kms.kms)
    app.router.add_post("/v1/kms/{enclave}", kms.kms)
    app.router.add_get("/v1/db", kms.backup)
    app.router.add_put("/v1/db", kms.restore)
    app.router.add_post("/v1/debug/restart", kms.restart)
    app.router.add_post("/v1/rpc/{name}", kms.rpc)
    return app


def default_host(address: str) -> str:
    port = address.rsplit(":", 1)[1] if ":" in address else "7373"
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = "127.0.0.1"
    return f"{ip}:{port}"


def _banner(store: Store, endpoint: str, root_key: str) -> str:
    s = store.state
    lines = [
        "INFO  Starting server instance...",
        f"Version        {VERSION} commit=emulator",
        "HSM            hsm:minio:soft",
        f"Cluster        ID      {s.cluster_id}",
    ]
    for nid, h in sorted(s.members.items()):
        lines.append(f"               Node {nid}: {h}{' <-' if nid == s.node_id else ''}")
    lines += [
        "Documentation  Web: https://docs.min.io/enterprise/aistor-key-manager   CLI: $ minkms help",
        f"Endpoint       https://{endpoint}",
        f"API Key        {root_key}",
        "=> Server is up and running...",
    ]
    return "\n".join(lines)


async def serve(directory: Path, address: str, host: str | None, config: Path | None) -> int:
    cfg = load_config(config)
    hsm_text = os.environ.get("MINIO_KMS_HSM_KEY", "")
    if not hsm_text:
        raise StartupError("no HSM provided: set MINIO_KMS_HSM_KEY")
    try:
        hsm = SoftHSM.parse(hsm_text)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    await check_hsm_endpoint(cfg)  # before the state is read: an unreachable HSM is not a damaged disk
    if ":" not in address:
        address += ":7373"
    bind_host, bind_port = address.rsplit(":", 1)
    my_host = normalize_host(host) if host else default_host(address)
    root_key = hsm.root_api_key()
    server_ctx, peer_ctx = tls_contexts(cfg, root_key)
    _check_bind(bind_host or "0.0.0.0", int(bind_port), address)  # before any state is created
    try:
        store = Store.open(directory, hsm, my_host)
    except StoreError as exc:
        raise StartupError(str(exc)) from exc
    s = store.state
    if s.removed or s.node_id not in s.members:
        store.close()
        raise StartupError(
            f"server not part of cluster: node {s.node_id} was removed from cluster {s.cluster_id}"
        )
    if s.members[s.node_id] != my_host:
        store.close()
        raise StartupError(
            f"server not part of cluster: node {s.node_id} of cluster {s.cluster_id} is "
            f"{s.members[s.node_id]}, but this server was started with --host {my_host}"
        )
    node = Node(store, my_host, cfg.heartbeat, peer_ctx, source=_source_address(bind_host))
    kms = KMS(node, hsm, identity_of_api_key(root_key))
    app = build_app(kms)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, bind_host or "0.0.0.0", int(bind_port), ssl_context=server_ctx)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        store.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    await node.start()
    print(_banner(store, my_host, root_key), file=sys.stderr, flush=True)

    stop = asyncio.Event()
    restart = False

    def on_restart() -> None:
        nonlocal restart
        restart = True
        stop.set()

    kms.restart_hook = on_restart
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await node.stop()
    await runner.cleanup()
    store.close()
    if restart:
        print("INFO  Restarting server instance...", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return 0


def _source_address(bind_host: str) -> str | None:
    """The listen address as the source of node-to-node connections, so that a firewall rule on a node's
    address cuts its cluster traffic both ways; None (the system chooses) for a wildcard or a name."""
    try:
        ip = ipaddress.ip_address(bind_host.strip("[]"))
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


def _check_bind(host: str, port: int, address: str) -> None:
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    finally:
        probe.close()


def run(directory: str, address: str, host: str | None, config: str | None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)-5s %(message)s", stream=sys.stderr, force=True
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        return asyncio.run(serve(Path(directory), address, host, Path(config) if config else None))
    except StartupError as exc:
        print(f"kms: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        log.debug("ran for %.1fs", time.monotonic() - started)
