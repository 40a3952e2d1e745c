"""The client side of the emulated `minkms` CLI: HTTPS with the API key as a TLS client certificate.

Synchronous (`http.client`): a CLI invocation makes one or two requests, and a short start-up time matters
because kmagent runs the CLI often.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from emulator import wire
from emulator.hsm import KeyFormatError, client_certificate

DEFAULT_SERVER = "https://localhost:7373"


class CLIError(Exception):
    """A failure reported to the user as one line on stderr, with exit code 1."""


def endpoints(explicit: str | None = None) -> list[str]:
    raw = explicit or os.environ.get("MINIO_KMS_SERVER") or DEFAULT_SERVER
    result = [normalize_endpoint(e) for e in raw.split(",") if e.strip()]
    if not result:
        raise CLIError("no server: set MINIO_KMS_SERVER")
    return result


def normalize_endpoint(text: str) -> str:
    text = text.strip().rstrip("/")
    if text.startswith("http://"):
        text = "https://" + text[len("http://") :]
    if not text.startswith("https://"):
        text = "https://" + text
    parts = urlsplit(text)
    if not parts.hostname:
        raise CLIError(f"invalid server address {text!r}")
    return text if parts.port else f"{text}:7373"


def host_of(endpoint: str) -> str:
    """`https://a:7373` -> `a:7373`, the form minkms uses for node hosts."""
    return normalize_endpoint(endpoint)[len("https://") :]


class Client:
    def __init__(self, api_key: str | None, insecure: bool = False, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.presents_key = bool(api_key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx.load_default_certs()
            for ca in _trusted_ca_files():
                try:
                    ctx.load_verify_locations(cafile=str(ca))
                except (OSError, ssl.SSLError) as exc:
                    raise CLIError(f"cannot load CA certificate {ca}: {exc}") from exc
        if api_key:
            # TLS 1.2 reports a refused client certificate in the handshake; under TLS 1.3 the refusal
            # races with the request and often arrives as a bare connection reset.
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            try:
                cert_pem, key_pem = client_certificate(api_key)
            except KeyFormatError as exc:
                raise CLIError(str(exc)) from exc
            with tempfile.TemporaryDirectory(prefix="minkms-") as tmp:
                cert_file, key_file = Path(tmp, "c.pem"), Path(tmp, "k.pem")
                cert_file.write_bytes(cert_pem)
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key_pem)
                ctx.load_cert_chain(str(cert_file), str(key_file))
        self.ctx = ctx

    def call(
        self, endpoint: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(normalize_endpoint(endpoint))
        assert parts.hostname is not None
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port or 7373, context=self.ctx, timeout=self.timeout
        )
        try:
            try:
                conn.connect()
            except ssl.SSLError as exc:
                if self.presents_key and "EOF" in (exc.reason or str(exc)).upper():
                    raise CLIError(
                        f"access denied: {endpoint} refused the TLS client certificate of this API key"
                    ) from exc
                raise
            conn.request(method, path, body=body, headers={"Accept": "application/*", **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        except ssl.SSLCertVerificationError as exc:
            raise CLIError(
                f"cannot verify the TLS certificate of {endpoint}: {exc.verify_message}; "
                "trust its CA in ~/.minkms/certs/CAs or use --insecure"
            ) from exc
        except ssl.SSLError as exc:
            reason = (exc.reason or str(exc)).upper()
            if any(
                r in reason
                for r in ("UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")
            ):
                raise CLIError(f"access denied: {endpoint} does not accept this API key") from exc
            raise CLIError(f"TLS error talking to {endpoint}: {exc.reason or exc}") from exc
        except ConnectionRefusedError as exc:
            raise CLIError(f"cannot reach {endpoint}: connection refused") from exc
        except TimeoutError as exc:
            raise CLIError(f"cannot reach {endpoint}: timed out") from exc
        except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
            raise CLIError(f"{endpoint} closed the connection (access denied or server stopping)") from exc
        except OSError as exc:
            raise CLIError(f"cannot reach {endpoint}: {exc.strerror or exc}") from exc
        finally:
            conn.close()

    def call_any(
        self,
        servers: list[str],
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """Try each endpoint in turn, as the SDK does with a list of servers."""
        error: CLIError | None = None
        for endpoint in servers:
            try:
                return self.call(endpoint, method, path, body, headers)
            except CLIError as exc:
                if str(exc).startswith("access denied"):
                    raise
                error = exc
        assert error is not None
        raise error

    def ok(
        self,
        servers: list[str],
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], bytes]:
        status, resp_headers, data = self.call_any(servers, method, path, body, headers)
        if status != 200:
            raise CLIError(error_message(status, data))
        return resp_headers, data

    def kms(
        self, servers: list[str], command: int, message: dict[str, Any], enclave: str = ""
    ) -> dict[str, Any]:
        _, data = self.ok(
            servers,
            "POST",
            "/v1/kms/" + enclave,
            wire.encode([(command, message)]),
            {"Content-Type": "application/octet-stream"},
        )
        try:
            replies = wire.decode(data)
        except wire.FrameError as exc:
            raise CLIError(f"malformed response from the server: {exc}") from exc
        return replies[0][1]


def error_message(status: int, data: bytes) -> str:
    try:
        message = json.loads(data)["message"]
    except (ValueError, KeyError, TypeError):
        message = data.decode(errors="replace").strip() or http.client.responses.get(status, "error")
    return f"{message} (HTTP {status})"


def _trusted_ca_files() -> list[Path]:
    files: list[Path] = []
    ca_dir = Path.home() / ".minkms" / "certs" / "CAs"
    if ca_dir.is_dir():
        files += sorted(p for p in ca_dir.iterdir() if p.is_file())
    extra = os.environ.get("MINIO_KMS_TLS_CA")
    if extra:
        files.append(Path(extra))
    return files
