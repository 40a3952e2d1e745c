"""A tiny PKI for the lab: one CA and the leaf certificates the emulator nodes and agents present.

minkms only speaks TLS, so a lab needs certificates whose SANs match the addresses the nodes listen on and
that chain to a CA every participant trusts. Only cryptography 38 APIs are used, the oldest version
kmagent supports.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
LEAF_CERT = "public.crt"
LEAF_KEY = "private.key"

CA_VALIDITY = datetime.timedelta(days=3650)
# Shorter than the CA so a leaf never outlives its issuer.
LEAF_VALIDITY = datetime.timedelta(days=825)
# Backdated so a host whose clock lags slightly still accepts a freshly issued certificate.
BACKDATE = datetime.timedelta(hours=1)


class PKIError(Exception):
    """The CA directory is unusable: half-written, foreign key type, or key and certificate don't match."""


def create_ca(directory: Path, name: str = "kmlab CA") -> tuple[Path, Path]:
    """Create the lab CA once; later calls reuse it so already issued certificates stay valid."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        # Loading validates both files, so a damaged CA is reported here rather than at issue time.
        _load_ca(directory)
        return cert_path, key_path

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash in between leaves a lone key, which create_ca reports instead of silently
    # pairing a new certificate with a key nobody trusts.
    _write_file(key_path, _key_pem(key), 0o600)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def issue(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    ips: list[str],
    dns: list[str],
    server: bool = True,
    client: bool = True,
) -> tuple[Path, Path]:
    """Issue a leaf for one lab participant; TLS clients check SANs, not the CN, so every address goes in."""
    if not (server or client):
        raise ValueError("a certificate needs at least one of server or client usage")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as exc:
        raise ValueError(f"invalid IP address for {name!r}: {exc}") from None
    ca_cert, ca_key = _load_ca(Path(ca_dir))

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    general_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    general_names += [x509.IPAddress(a) for a in addresses]
    if general_names:
        # An empty SAN extension is invalid (RFC 5280), so a pure client identity simply has none.
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    out_dir = Path(out_dir)
    if not out_dir.exists():
        out_dir.mkdir(parents=True, mode=0o700)
        os.chmod(out_dir, 0o700)  # mkdir's mode is filtered by the umask
    cert_path, key_path = out_dir / LEAF_CERT, out_dir / LEAF_KEY
    _write_file(key_path, _key_pem(key), 0o600)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load and cross-check the CA so a mismatched pair fails loudly instead of issuing unverifiable certs."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    missing = [p.name for p in (cert_path, key_path) if not p.exists()]
    if missing:
        raise PKIError(f"CA in {directory} is incomplete: {', '.join(missing)} missing")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise PKIError(f"CA in {directory} is unreadable: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"CA key {key_path} is not an ECDSA key")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise PKIError(f"CA key {key_path} does not match certificate {cert_path}")
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write via a same-directory temp file created with its final mode: never readable by others, even
    briefly, and never left half-written for a later load to choke on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a stale temp file could carry a laxer mode; O_EXCL then makes a fresh one
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 for certificates)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
