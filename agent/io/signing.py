"""Acks as signatures (DESIGN §4.3): an agent signs with its TLS key; anyone verifies against the cluster CA.

Signature schemes, one per key type, for signing and verifying alike:
* RSA: RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32 (the digest length; fixed so verification is exact);
* ECDSA: ECDSA with SHA-256 (DER signature);
* Ed25519: Ed25519 over the payload itself.

The CA's signature on a certificate is whatever the CA made (RSA PKCS#1 v1.5, ECDSA or Ed25519); cryptography 38
has no chain verifier, so `issued_by` checks it by hand. An AckVerifier holds no clock: `now` is a parameter.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from agent.core.messages import Ack
from agent.pki import (
    PKIError,
    PrivateKey,
    cert_agent_name,
    key_matches,
    load_certificate,
    load_private_key,
    validity,
)

MAX_CERT_PEM = 16 * 1024  # agent certificates are ~1 KiB (RSA ~2 KiB); more is not a certificate of ours
_RSA_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class SigningError(Exception):
    """The agent's own certificate or key cannot be used to sign acks."""


def _verify_signature(public_key: object, signature: bytes, payload: bytes) -> bool:
    """An ack signature made by `Signer.sign`, checked with the scheme of the key's type."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, payload, _RSA_PSS, hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, payload)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> str | None:
    """Why `cert` was not issued by `ca`, or None: the issuer name must equal the CA's subject AND the CA's
    public key must verify the certificate's signature (a name alone is forgeable by any other CA)."""
    if cert.issuer != ca.subject:
        return f"issued by {cert.issuer.rfc4514_string()!r}, not by the cluster CA"
    public_key = ca.public_key()
    try:
        if cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
            return "signed with RSA-PSS, which kmagent does not verify on certificates (use PKCS#1 v1.5)"
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes)
            return None
        digest = cert.signature_hash_algorithm
        if digest is None:
            return "its signature algorithm does not match the cluster CA's key"
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), digest)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(digest))
        else:
            return f"the cluster CA's key type ({type(public_key).__name__}) is not supported"
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return "its signature does not verify with the cluster CA's key (issued by another CA?)"
    return None


@dataclass(frozen=True)
class Signer:
    """This agent's ack signer: its TLS key and the certificate that vouches for it."""

    name: str
    certificate_pem: str
    key: PrivateKey

    @classmethod
    def from_files(cls, cert_path: Path, key_path: Path, name: str) -> Signer:
        """Load and cross-check the agent's TLS certificate and key; SigningError says what is wrong."""
        try:
            cert = load_certificate(Path(cert_path))
            key = load_private_key(Path(key_path))
        except PKIError as exc:
            raise SigningError(str(exc)) from None
        if not key_matches(cert, key):
            raise SigningError(f"key {key_path} does not match certificate {cert_path}")
        carried = cert_agent_name(cert)
        if carried != name:
            # Peers would refuse every ack: better to say so at startup than at the first recovery.
            raise SigningError(f"certificate {cert_path} names agent {carried!r}, but this agent is {name!r}")
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return cls(name=name, certificate_pem=pem, key=key)

    def sign(self, payload: bytes) -> Ack:
        if isinstance(self.key, rsa.RSAPrivateKey):
            signature = self.key.sign(payload, _RSA_PSS, hashes.SHA256())
        elif isinstance(self.key, ec.EllipticCurvePrivateKey):
            signature = self.key.sign(payload, ec.ECDSA(hashes.SHA256()))
        else:
            signature = self.key.sign(payload)
        return Ack(
            signer=self.name,
            certificate=self.certificate_pem,
            signature=base64.b64encode(signature).decode("ascii"),
        )

    def __repr__(self) -> str:  # never print the key
        return f"Signer(name={self.name!r})"


class AckVerifier:
    """Checks one ack alone: certificate from the cluster CA, valid at `now`, naming a configured agent that
    is the claimed signer, and a valid signature over the payload."""

    def __init__(self, ca_cert: x509.Certificate, configured_names: Iterable[str]) -> None:
        self.ca_cert = ca_cert
        self.names = frozenset(configured_names)

    def verify(self, ack: Ack, payload: bytes, now: datetime.datetime) -> str | None:
        """None if the ack is good, else the problem, naming the signer."""
        if now.tzinfo is None:
            raise ValueError("now must be a timezone-aware datetime")
        shown = repr(ack.signer if isinstance(ack.signer, str) else str(ack.signer))
        shown = shown if len(shown) <= 70 else shown[:66] + "...'"  # the signer is untrusted input
        who = f"ack from {shown}"
        if not isinstance(ack.signer, str) or ack.signer not in self.names:
            return f"{who}: {shown} is not a configured agent"
        try:
            return self._problem(ack, payload, now, who)
        except ValueError as exc:  # a certificate that parses but holds malformed fields, read lazily
            return f"{who}: the certificate is malformed ({exc})"

    def _problem(self, ack: Ack, payload: bytes, now: datetime.datetime, who: str) -> str | None:
        if not isinstance(ack.certificate, str) or len(ack.certificate) > MAX_CERT_PEM:
            return f"{who}: the certificate is missing or too large"
        try:
            cert = x509.load_pem_x509_certificate(ack.certificate.encode("utf-8"))
        except ValueError:
            return f"{who}: the certificate is not a valid PEM certificate"
        problem = issued_by(cert, self.ca_cert)
        if problem:
            return f"{who}: the certificate is not from the cluster CA: {problem}"
        ca_end = validity(self.ca_cert)[1]
        if now > ca_end:
            return f"{who}: the cluster CA certificate expired at {ca_end:%Y-%m-%d %H:%M:%S} UTC"
        start, end = validity(cert)
        if now < start:
            return f"{who}: the certificate is not valid before {start:%Y-%m-%d %H:%M:%S} UTC"
        if now > end:
            return f"{who}: the certificate expired at {end:%Y-%m-%d %H:%M:%S} UTC"
        carried = cert_agent_name(cert)
        if carried != ack.signer:
            return f"{who}: the certificate names {carried!r}, not the signer"
        try:
            signature = base64.b64decode(ack.signature, validate=True)
        except (binascii.Error, ValueError, TypeError):
            return f"{who}: the signature is not valid base64"
        if not _verify_signature(cert.public_key(), signature, payload):
            return f"{who}: the signature does not verify (tampered, or signed over something else)"
        return None

    def at(self, now: datetime.datetime) -> Callable[[Ack, bytes], str | None]:
        """`verify` with `now` bound: the `verify_ack(ack, payload)` callable the quorum check takes."""
        return lambda ack, payload: self.verify(ack, payload, now)

    @classmethod
    def from_file(cls, ca_path: Path, configured_names: Iterable[str]) -> AckVerifier:
        try:
            return cls(load_certificate(Path(ca_path)), configured_names)
        except PKIError as exc:
            raise SigningError(str(exc)) from None
