"""Software HSM, API keys and identities, as documented for minkms (reference/minkms.md §2.1, §3.1).

The real derivation of the root API key from the HSM key is not public; the emulator derives it with
HKDF so that it is deterministic, as the documentation requires (`minkms identity HSM-KEY`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HSM_PREFIX = "hsm:aes256:"
API_KEY_PREFIX = "k1:"
IDENTITY_PREFIX = "h1:"


class KeyFormatError(ValueError):
    """A key or identity string that does not have the documented format."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=b"minkms-emulator", info=info).derive(key)


@dataclass(frozen=True)
class SoftHSM:
    """`hsm:aes256:<base64 of 32 bytes>`: seals the node's state and derives the root API key."""

    key: bytes

    @staticmethod
    def generate() -> SoftHSM:
        return SoftHSM(os.urandom(32))

    @staticmethod
    def parse(text: str) -> SoftHSM:
        text = text.strip()
        if not text.startswith(HSM_PREFIX):
            raise KeyFormatError(f"invalid HSM key: expected the prefix {HSM_PREFIX!r}")
        try:
            raw = base64.b64decode(text[len(HSM_PREFIX) :], validate=True)
        except ValueError as exc:
            raise KeyFormatError("invalid HSM key: the value is not base64") from exc
        if len(raw) != 32:
            raise KeyFormatError(f"invalid HSM key: expected 32 bytes, got {len(raw)}")
        return SoftHSM(raw)

    def __str__(self) -> str:
        return HSM_PREFIX + base64.b64encode(self.key).decode()

    def __repr__(self) -> str:  # never print key material by accident
        return "SoftHSM(<sealed>)"

    def root_api_key(self) -> str:
        return API_KEY_PREFIX + _b64url(_hkdf(self.key, b"root api key"))

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(_hkdf(self.key, b"seal")).encrypt(nonce, plaintext, context)

    def unseal(self, sealed: bytes, context: bytes) -> bytes:
        """Raises `InvalidTag` when the data was sealed by another HSM key or altered."""
        if len(sealed) < 28:
            raise InvalidTag()
        return AESGCM(_hkdf(self.key, b"seal")).decrypt(sealed[:12], sealed[12:], context)


def parse_api_key(text: str) -> ed25519.Ed25519PrivateKey:
    text = text.strip()
    if not text.startswith(API_KEY_PREFIX):
        if text.startswith("k2:"):
            raise KeyFormatError("k2: API keys are not supported by this emulator (only the root k1: key)")
        raise KeyFormatError("invalid API key: expected the prefix 'k1:'")
    try:
        seed = _b64url_decode(text[len(API_KEY_PREFIX) :])
    except ValueError as exc:
        raise KeyFormatError("invalid API key: the value is not base64url") from exc
    if len(seed) != 32:
        raise KeyFormatError(f"invalid API key: expected a 32-byte seed, got {len(seed)} bytes")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def api_key_of(private_key: ed25519.Ed25519PrivateKey) -> str:
    raw = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return API_KEY_PREFIX + _b64url(raw)


def new_api_key() -> str:
    return api_key_of(ed25519.Ed25519PrivateKey.generate())


def identity_of_public_key(public_key: ed25519.Ed25519PublicKey) -> str:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return IDENTITY_PREFIX + _b64url(hashlib.sha256(spki).digest())


def identity_of_api_key(api_key: str) -> str:
    return identity_of_public_key(parse_api_key(api_key).public_key())


def identity_of_certificate(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return IDENTITY_PREFIX + _b64url(hashlib.sha256(spki).digest())


def client_certificate(api_key: str) -> tuple[bytes, bytes]:
    """The self-signed TLS client certificate that stands for an API key: (cert PEM, key PEM).

    Deterministic (fixed serial and validity, Ed25519 signatures are deterministic), so that a server
    built on Python's ssl module, which has no verification callback, can trust exactly this certificate.
    """
    private_key = parse_api_key(api_key)
    identity = identity_of_public_key(private_key.public_key())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
    digest = hashlib.sha256(identity.encode()).digest()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(int.from_bytes(digest[:16], "big") >> 1)
        .not_valid_before(datetime.datetime(2024, 1, 1))
        .not_valid_after(datetime.datetime(2124, 1, 1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(private_key, None)
    )
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
