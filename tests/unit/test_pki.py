"""The cluster PKI: files, modes, refusals, and certificates that real TLS accepts with the agent's name."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import pki
from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from agent.io.signing import issued_by

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_077() -> Iterator[None]:
    """A strict umask must make certificates neither unreadable nor keys readable."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca", "prod")
    return tmp_path / "ca"


def name_cert(*common_names: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_cert_agent_name_is_the_single_common_name() -> None:
    assert pki.cert_agent_name(name_cert("node1")) == "node1"
    assert pki.cert_agent_name(name_cert()) is None
    assert pki.cert_agent_name(name_cert("node1", "node2")) is None  # ambiguous: no name, not the first


def test_init_ca_files_modes_and_extensions(tmp_path: Path, umask_077: None) -> None:
    cert_path, key_path = pki.init_ca(tmp_path / "ca", "prod")
    assert (cert_path, key_path) == (tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key")
    assert mode(tmp_path / "ca") == 0o700 and mode(cert_path) == 0o644 and mode(key_path) == 0o600
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.crt", "ca.key"]  # no temp files left

    ca, key = pki.load_ca(tmp_path / "ca")
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "prod CA"
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert issued_by(ca, ca) is None
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    start, end = pki.validity(ca)
    assert end - start > datetime.timedelta(days=3600)


def test_init_ca_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    cert_path, key_path = pki.init_ca(tmp_path / "ca", "prod")
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(pki.PKIError, match=r"already exists .*no longer be trusted.*--force"):
        pki.init_ca(tmp_path / "ca", "prod")
    key_path.unlink()  # a lone certificate is still a CA someone may trust: refused too
    with pytest.raises(pki.PKIError, match="already exists"):
        pki.init_ca(tmp_path / "ca", "prod")
    assert cert_path.read_bytes() == before[0]

    pki.init_ca(tmp_path / "ca", "prod", force=True)
    assert cert_path.read_bytes() != before[0] and key_path.read_bytes() != before[1]
    pki.load_ca(tmp_path / "ca")  # the replacement is a consistent pair


def test_init_ca_rejects_a_bad_cluster_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid agent name"):
        pki.init_ca(tmp_path / "ca", "my cluster")
    assert not (tmp_path / "ca").exists()


@pytest.mark.parametrize(
    ("key_type", "key_class"),
    [("ec", ec.EllipticCurvePublicKey), ("rsa", rsa.RSAPublicKey), ("ed25519", ed25519.Ed25519PublicKey)],
)
def test_issue_names_sans_usages_and_chain(
    ca_dir: Path, key_type: str, key_class: type, umask_077: None
) -> None:
    cert_path, key_path = pki.issue(
        ca_dir, "node1", ["10.0.0.1", "node1.example.net", "::1", "node1", "10.0.0.1"], key_type
    )
    assert (cert_path, key_path) == (ca_dir / "node1.crt", ca_dir / "node1.key")
    assert mode(cert_path) == 0o644 and mode(key_path) == 0o600

    ca, _ = pki.load_ca(ca_dir)
    cert = pki.load_certificate(cert_path)
    assert issued_by(cert, ca) is None
    assert pki.cert_agent_name(cert) == "node1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node1", "node1.example.net"]  # duplicates dropped
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), key_class)
    assert pki.key_matches(cert, pki.load_private_key(key_path))
    assert pki.validity(cert)[1] <= pki.validity(ca)[1]


def test_issue_clamps_validity_to_the_ca_and_writes_elsewhere(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, _ = pki.issue(ca_dir, "node2", days=100_000, out_dir=tmp_path / "out" / "node2")
    assert cert_path.parent == tmp_path / "out" / "node2" and mode(cert_path.parent) == 0o700
    ca, _ = pki.load_ca(ca_dir)
    assert pki.validity(pki.load_certificate(cert_path))[1] == pki.validity(ca)[1]


def test_issue_refuses_to_overwrite_unless_forced(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue(ca_dir, "node1")
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(pki.PKIError, match=r"certificate for node1 already exists .*--force"):
        pki.issue(ca_dir, "node1", ["10.0.0.9"])
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    pki.issue(ca_dir, "node1", ["10.0.0.9"], force=True)
    assert cert_path.read_bytes() != before[0] and key_path.read_bytes() != before[1]


@pytest.mark.parametrize("name", ["", "a" * 65, "node 1", "../etc", "nöde", "x/y"])
def test_issue_rejects_bad_names_and_writes_nothing(ca_dir: Path, name: str) -> None:
    before = sorted(p.name for p in ca_dir.iterdir())
    with pytest.raises(ValueError, match="invalid agent name"):
        pki.issue(ca_dir, name)
    assert sorted(p.name for p in ca_dir.iterdir()) == before


def test_issue_rejects_bad_addresses_and_key_types(ca_dir: Path) -> None:
    for bad in ["", "a b", "host..example", "-x", "10.0.0.1/24"]:
        with pytest.raises(ValueError, match="neither an IP address nor a host name"):
            pki.issue(ca_dir, "node1", [bad])
    with pytest.raises(ValueError, match="unknown key type 'dsa'"):
        pki.issue(ca_dir, "node1", key_type="dsa")
    with pytest.raises(ValueError, match="at least 1 day"):
        pki.issue(ca_dir, "node1", days=0)
    assert not (ca_dir / "node1.crt").exists() and not (ca_dir / "node1.key").exists()


def test_issue_explains_a_missing_or_damaged_ca(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"ca\.crt, ca\.key missing; create one with: kmagent pki init"):
        pki.issue(tmp_path / "none", "node1")

    ca = tmp_path / "ca"
    pki.init_ca(ca, "prod")
    key = (ca / "ca.key").read_bytes()
    (ca / "ca.key").unlink()
    with pytest.raises(pki.PKIError, match=r"incomplete: ca\.key missing"):
        pki.issue(ca, "node1")
    (ca / "ca.key").write_bytes(b"garbage")
    with pytest.raises(pki.PKIError, match=r"ca\.key is not a PEM private key"):
        pki.issue(ca, "node1")
    other = ec.generate_private_key(ec.SECP256R1())
    (ca / "ca.key").write_bytes(pki.key_pem(other))
    with pytest.raises(pki.PKIError, match="does not match certificate"):
        pki.issue(ca, "node1")
    (ca / "ca.key").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(pki.PKIError, match="is encrypted"):
        pki.issue(ca, "node1")
    (ca / "ca.key").write_bytes(key)
    (ca / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(pki.PKIError, match=r"ca\.crt is not a PEM certificate"):
        pki.issue(ca, "node1")
    assert not (ca / "node1.crt").exists()


def test_issue_refuses_an_expired_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca", "prod", now=NOW - datetime.timedelta(days=4000))
    with pytest.raises(pki.PKIError, match="expired on"):
        pki.issue(tmp_path / "ca", "node1", now=NOW)


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, pipes: tuple[ssl.MemoryBIO, ...]) -> None:
    """Drive a TLS handshake in memory: no sockets, no threads; a bounded number of rounds."""
    c_in, c_out, s_in, s_out = pipes
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_issued_certificates_pass_mutual_tls_by_agent_name(ca_dir: Path, key_type: str) -> None:
    """What the peer transport relies on: TLS 1.3, client certificates, and the name checked by SAN."""
    server_cert, server_key = pki.issue(ca_dir, "node1", ["127.0.0.1"], key_type)
    client_cert, client_key = pki.issue(ca_dir, "node2", key_type=key_type)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx, (cert, key) in (
        (server_ctx, (server_cert, server_key)),
        (client_ctx, (client_cert, client_key)),
    ):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=str(ca_dir / "ca.crt"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED

    pipes = tuple(ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(pipes[0], pipes[1], server_hostname="node1")
    server = server_ctx.wrap_bio(pipes[2], pipes[3], server_side=True)
    _handshake(client, server, pipes)
    peer = server.getpeercert(binary_form=True)
    assert peer is not None and pki.cert_agent_name(x509.load_der_x509_certificate(peer)) == "node2"

    pipes = tuple(ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(pipes[0], pipes[1], server_hostname="node3")  # not a name it carries
    server = server_ctx.wrap_bio(pipes[2], pipes[3], server_side=True)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(client, server, pipes)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(tmp_path / "ca")
    assert main(["pki", "init", "--dir", ca, "--cluster", "prod"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"wrote {ca}/ca.crt" in out and f"next: kmagent pki issue NAME --dir {ca}" in out

    assert main(["pki", "issue", "node1", "--dir", ca, "--address", "10.0.0.1", "--key-type", "ed25519"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {ca}/node1.crt" in out and 'cert = "/etc/kmagent/tls/node1.crt"' in out
    cert = pki.load_certificate(tmp_path / "ca" / "node1.crt")
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert "PRIVATE" not in out  # never print key material


def test_cli_errors_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = str(tmp_path / "ca")
    assert main(["pki", "issue", "node1", "--dir", ca]) == EXIT_FAILED
    assert "kmagent pki: CA in" in capsys.readouterr().err
    assert main(["pki", "init", "--dir", ca]) == EXIT_OK
    assert main(["pki", "init", "--dir", ca]) == EXIT_FAILED
    assert "already exists" in capsys.readouterr().err
    assert main(["pki", "init", "--dir", ca, "--force"]) == EXIT_OK
    assert main(["pki", "issue", "bad name", "--dir", ca]) == EXIT_USAGE
    assert "invalid agent name 'bad name'" in capsys.readouterr().err
    assert main(["pki", "issue", "node1", "--dir", ca, "--address", "a b"]) == EXIT_USAGE
    assert main(["pki"]) == EXIT_USAGE
    assert "init" in capsys.readouterr().err
    for argv in (["pki", "issue", "node1"], ["pki", "issue", "node1", "--dir", ca, "--key-type", "dsa"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main(["pki", "issue", "--help"])
    assert exc.value.code == 0
    assert "--address HOST_OR_IP" in capsys.readouterr().out
