"""The cluster PKI: one CA per cluster and one certificate per agent (`kmagent pki init|issue`).

An agent's identity is its certificate: CN = agent name, and a SAN DNS name = agent name so that TLS name
checks work too. Peers learn each other's names from certificates, never from what a message claims (DESIGN
§4). Only cryptography 38 APIs are used (Debian 12), so there is no chain verifier here: `agent.io.signing`
checks the CA's signature by hand.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The same rules as the config's names and hosts: a name the config accepts can be issued, and vice versa.
from agent.config.values import HOSTNAME_RE, NAME_RE
from agent.io.durable import atomic_write

KeyType = Literal["ec", "rsa", "ed25519"]
KEY_TYPES: tuple[str, ...] = get_args(KeyType)
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 825  # the CA/Browser limit of old; a leaf never outlives its CA anyway (clamped)
RSA_BITS = 3072
# Backdated so a host whose clock lags slightly still accepts a freshly issued certificate.
BACKDATE = datetime.timedelta(hours=1)
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


class PKIError(Exception):
    """A CA or certificate file is missing, damaged, mismatched or would be overwritten."""


# ------------------------------------------------------------------------------------------- inspection


def cert_agent_name(cert: x509.Certificate) -> str | None:
    """The agent name a certificate carries (its subject CN), or None without exactly one string CN."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1:
        return None  # several CNs would make the identity ambiguous: no name rather than a guess
    value = attributes[0].value
    return value if isinstance(value, str) and value else None


def validity(cert: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) as aware UTC datetimes; the `_utc` properties are newer than cryptography 38."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        start, end = cert.not_valid_before, cert.not_valid_after
    return start.replace(tzinfo=datetime.UTC), end.replace(tzinfo=datetime.UTC)


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether `key` is the private half of the certificate's public key."""
    return bool(cert.public_key().public_bytes(*_SPKI) == key.public_key().public_bytes(*_SPKI))


def check_name(name: str) -> str:
    """An agent name, by the config's rule; ValueError naming the problem otherwise."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid agent name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")
    return name


def parse_addresses(addresses: Iterable[str]) -> tuple[list[str], list[IPAddress]]:
    """Split extra SANs into DNS names and IP addresses; ValueError for anything that is neither."""
    dns: list[str] = []
    ips: list[IPAddress] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            host = text.rstrip(".")
            if len(text) > 253 or not HOSTNAME_RE.fullmatch(text) or not host:
                raise ValueError(f"address {text!r} is neither an IP address nor a host name") from None
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


# --------------------------------------------------------------------------------- building (no files)


def new_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    # Ed25519 signs the message itself; RSA (PKCS#1 v1.5) and ECDSA sign its SHA-256 digest.
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca(
    common_name: str, now: datetime.datetime, key_type: str = "ec", days: int = CA_DAYS
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed CA that may sign leaves only (path length 0)."""
    if days < 1:
        raise ValueError(f"validity must be at least 1 day (got {days})")
    key = new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _sign(builder, key), key


def build_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    now: datetime.datetime,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[IPAddress] = (),
    server: bool = True,
    client: bool = True,
    key_type: str = "ec",
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, PrivateKey]:
    """A TLS leaf signed by the CA; TLS clients check SANs, not the CN, so every address goes in."""
    if not (server or client):
        raise ValueError("a certificate needs at least one of server or client usage")
    if days < 1:
        raise ValueError(f"validity must be at least 1 day (got {days})")
    key = new_key(key_type)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), validity(ca_cert)[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ip) for ip in ips]
    if names:
        # An empty SAN extension is invalid (RFC 5280), so a pure client identity simply has none.
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _sign(builder, ca_key), key


# ----------------------------------------------------------------------------------------------- files


def load_private_key(path: Path) -> PrivateKey:
    """An unencrypted PEM key of a supported type, or PKIError saying what is wrong with the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(f"key {path} is encrypted; kmagent needs an unencrypted key (mode 0600)") from None
    except ValueError:
        raise PKIError(f"key {path} is not a PEM private key (damaged or wrong file?)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise PKIError(f"key {path} is a {type(key).__name__}; use an ECDSA, RSA or Ed25519 key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PKIError(f"certificate {path} is not a PEM certificate (damaged or wrong file?)") from None


def load_ca(directory: Path) -> tuple[x509.Certificate, PrivateKey]:
    """Load and cross-check the CA, so a damaged pair fails loudly instead of issuing unverifiable certs."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    missing = [p.name for p in (cert_path, key_path) if not p.exists()]
    if missing:
        hint = f"; create one with: kmagent pki init --dir {directory}" if len(missing) == 2 else ""
        raise PKIError(f"CA in {directory} is incomplete: {', '.join(missing)} missing{hint}")
    cert, key = load_certificate(cert_path), load_private_key(key_path)
    if not key_matches(cert, key):
        raise PKIError(f"CA key {key_path} does not match certificate {cert_path}")
    return cert, key


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) 0700; an existing directory is left as its owner set it."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically (agent.io.durable), then with exactly `mode`: the umask may have removed bits we want
    (0644 for certificates); it can only remove them, so a key is never readable by others on the way."""
    atomic_write(path, data, mode)
    os.chmod(path, mode)


def _refuse_existing(paths: Iterable[Path], what: str, why: str = "") -> None:
    present = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if present:
        raise PKIError(
            f"{what} already exists ({', '.join(present)}); refusing to overwrite it{why}; "
            "use --force to replace it"
        )


def write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: PrivateKey) -> None:
    """Key first: a crash in between leaves a lone key, which load_ca reports, rather than a certificate
    without its key. Callers refuse to overwrite before building anything (`_refuse_existing`)."""
    write_file(key_path, key_pem(key), 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def init_ca(
    directory: Path,
    cluster_name: str,
    force: bool = False,
    *,
    key_type: str = "ec",
    common_name: str | None = None,
    now: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Create the cluster CA (`ca.crt` 0644, `ca.key` 0600) in `directory` (created 0700).

    An existing CA is never replaced without `force`: every certificate it issued would stop being trusted.
    """
    check_name(cluster_name)
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force:
        why = ": the certificates it issued would no longer be trusted"
        _refuse_existing((cert_path, key_path), f"a CA in {directory}", why)
    now = now or datetime.datetime.now(datetime.UTC)
    cert, key = build_ca(common_name or f"{cluster_name} CA", now, key_type)
    make_private_dir(directory)
    write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def issue(
    directory: Path,
    name: str,
    addresses: Iterable[str] = (),
    key_type: str = "ec",
    days: int = LEAF_DAYS,
    force: bool = False,
    *,
    out_dir: Path | None = None,
    now: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue agent `name` a server+client certificate from the CA in `directory`: `NAME.crt` (0644) and
    `NAME.key` (0600) in `out_dir` (default: `directory`). CN and a SAN DNS name are `name`; `addresses`
    adds IP SANs (IP addresses) and DNS SANs (host names)."""
    check_name(name)
    if key_type not in KEY_TYPES:
        raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    extra_dns, ips = parse_addresses(addresses)
    dns = [name, *(d for d in extra_dns if d != name)]
    directory = Path(directory)
    out = Path(out_dir) if out_dir is not None else directory
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    if not force:
        _refuse_existing((cert_path, key_path), f"a certificate for {name}")
    ca_cert, ca_key = load_ca(directory)
    now = now or datetime.datetime.now(datetime.UTC)
    if validity(ca_cert)[1] <= now:
        raise PKIError(f"the CA in {directory} expired on {validity(ca_cert)[1]:%Y-%m-%d}; create a new one")
    cert, key = build_leaf(ca_cert, ca_key, name, now, dns=dns, ips=ips, key_type=key_type, days=days)
    make_private_dir(out)
    write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path
