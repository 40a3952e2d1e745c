"""The lab PKI must produce certificates real TLS stacks accept, or every lab node is unreachable."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulator.lab import pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def not_after(cert: x509.Certificate) -> datetime.datetime:
    """Naive UTC; the property is deprecated in recent cryptography but is what version 38 offers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cert.not_valid_after


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """Check the signature with the issuer's key (cryptography 38 has no chain verifier)."""
    public_key = issuer.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == issuer.subject


@pytest.fixture
def umask_077() -> Iterator[None]:
    """A strict umask must not make certificates unreadable nor keys readable."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_create_ca(tmp_path: Path, umask_077: None) -> None:
    cert_path, key_path = pki.create_ca(tmp_path / "ca")
    assert (cert_path.name, key_path.name) == ("ca.crt", "ca.key")
    assert mode(cert_path) == 0o644 and mode(key_path) == 0o600

    ca = load_cert(cert_path)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kmlab CA"
    verify_issued_by(ca, ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert not_after(ca) - now > datetime.timedelta(days=3600)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    before = cert_path.read_bytes(), key_path.read_bytes()
    assert pki.create_ca(tmp_path / "ca", name="another name") == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before  # reused, not overwritten


def test_create_ca_refuses_a_broken_ca(tmp_path: Path) -> None:
    _, key_path = pki.create_ca(tmp_path / "ca")
    key_path.unlink()
    with pytest.raises(pki.PKIError, match=r"ca\.key missing"):
        pki.create_ca(tmp_path / "ca")
    _, other_key = pki.create_ca(tmp_path / "other")
    key_path.write_bytes(other_key.read_bytes())
    with pytest.raises(pki.PKIError, match="does not match"):
        pki.issue(tmp_path / "ca", tmp_path / "leaf", "n", ["127.0.0.1"], [])


def test_issue_chains_to_the_ca_with_sans_and_ekus(tmp_path: Path, umask_077: None) -> None:
    pki.create_ca(tmp_path / "ca")
    out = tmp_path / "node1" / "certs"
    cert_path, key_path = pki.issue(
        tmp_path / "ca", out, "node1", ips=["127.0.0.1", "::1"], dns=["node1", "localhost"]
    )
    assert (cert_path, key_path) == (out / "public.crt", out / "private.key")
    assert mode(key_path) == 0o600 and mode(cert_path) == 0o644 and mode(out) == 0o700

    ca = load_cert(tmp_path / "ca" / "ca.crt")
    cert = load_cert(cert_path)
    verify_issued_by(cert, ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1"

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert not_after(cert) < not_after(ca)

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def test_issue_usage_variants_and_bad_input(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "ca")
    cert_path, _ = pki.issue(tmp_path / "ca", tmp_path / "client", "agent", [], [], server=False)
    cert = load_cert(cert_path)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):  # no names given: no (invalid, empty) SAN extension
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    cert_path, _ = pki.issue(tmp_path / "ca", tmp_path / "server", "s", ["10.0.0.1"], [], client=False)
    eku = load_cert(cert_path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    with pytest.raises(ValueError, match="invalid IP address"):
        pki.issue(tmp_path / "ca", tmp_path / "x", "x", ["not-an-ip"], [])
    with pytest.raises(ValueError, match="at least one"):
        pki.issue(tmp_path / "ca", tmp_path / "x", "x", [], ["x"], server=False, client=False)
    with pytest.raises(pki.PKIError, match="incomplete"):
        pki.issue(tmp_path / "no-ca", tmp_path / "x", "x", [], ["x"])


def test_real_mutual_tls_handshake_on_an_ip(tmp_path: Path) -> None:
    ca_cert, _ = pki.create_ca(tmp_path / "ca")
    server_cert, server_key = pki.issue(
        tmp_path / "ca", tmp_path / "server", "node1", ["127.0.0.1"], ["node1"]
    )
    client_cert, client_key = pki.issue(tmp_path / "ca", tmp_path / "agent", "agent", [], [], server=False)

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.load_verify_locations(cafile=ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the client's certificate must chain too
    client_ctx = ssl.create_default_context(cafile=str(ca_cert))
    client_ctx.load_cert_chain(client_cert, client_key)

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(tls.recv(16).upper())
        except Exception as exc:  # reported by the main thread
            seen["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"ping")
            assert tls.recv(16) == b"PING"
            subject = dict(item[0] for item in tls.getpeercert()["subject"])  # type: ignore[index, misc]
            assert subject["commonName"] == "node1"
    finally:
        thread.join(10)
        listener.close()
    assert "error" not in seen, seen.get("error")
    peer = seen["peer"]
    assert isinstance(peer, dict) and dict(item[0] for item in peer["subject"])["commonName"] == "agent"


def test_handshake_fails_for_a_name_not_in_the_certificate(tmp_path: Path) -> None:
    """The SANs are what the client checks: an address that is not listed must be refused."""
    ca_cert, _ = pki.create_ca(tmp_path / "ca")
    server_cert, server_key = pki.issue(tmp_path / "ca", tmp_path / "server", "node1", ["127.0.0.2"], [])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server_cert, server_key)
    client_ctx = ssl.create_default_context(cafile=str(ca_cert))

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass  # the client aborts the handshake

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"),
        ):
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        thread.join(10)
        listener.close()
