"""HSM keys, root API keys and identities (reference/minkms.md §1.2 identity, §2.1)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from emulator.hsm import (
    KeyFormatError,
    SoftHSM,
    client_certificate,
    identity_of_api_key,
    identity_of_certificate,
    parse_api_key,
)


def minkms(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emulator", *args], capture_output=True, text=True, timeout=30
    )


def test_soft_hsm_prints_a_bare_key_without_a_terminal() -> None:
    proc = minkms("--soft-hsm")
    assert proc.returncode == 0
    key = proc.stdout.strip()
    assert key.startswith("hsm:aes256:") and len(key) == len("hsm:aes256:") + 44
    assert len(base64.b64decode(key.split(":", 2)[2])) == 32
    assert SoftHSM.parse(key).key != SoftHSM.parse(minkms("--soft-hsm").stdout).key


def test_identity_of_an_hsm_key_is_deterministic_and_well_formed() -> None:
    hsm = str(SoftHSM.generate())
    first = json.loads(minkms("identity", "--json", hsm).stdout)
    second = json.loads(minkms("identity", "--json", hsm).stdout)
    assert first == second
    assert first["api_key"].startswith("k1:") and len(first["api_key"]) == 46
    assert first["identity"].startswith("h1:") and len(first["identity"]) == 46
    assert first["api_key"] == SoftHSM.parse(hsm).root_api_key()
    # identity = base64url(sha256(SubjectPublicKeyInfo)) of the key
    spki = (
        parse_api_key(first["api_key"])
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    digest = base64.urlsafe_b64encode(hashlib.sha256(spki).digest()).rstrip(b"=").decode()
    assert first["identity"] == "h1:" + digest
    plain = minkms("identity", first["api_key"]).stdout
    assert first["identity"] in plain


def test_identity_without_argument_makes_a_new_key() -> None:
    a = json.loads(minkms("identity", "--json").stdout)
    b = json.loads(minkms("identity", "--json").stdout)
    assert a["api_key"] != b["api_key"]
    assert identity_of_api_key(a["api_key"]) == a["identity"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("hsm:aes128:AAAA", "prefix"),
        ("hsm:aes256:not*base64", "not base64"),
        ("hsm:aes256:" + base64.b64encode(b"x" * 16).decode(), "expected 32 bytes"),
    ],
)
def test_malformed_hsm_keys_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(KeyFormatError, match=message):
        SoftHSM.parse(text)
    proc = minkms("identity", text)
    assert proc.returncode == 1 and message in proc.stderr


@pytest.mark.parametrize("text", ["k1:short", "x1:" + "A" * 43, "k2:" + "A" * 43, ""])
def test_malformed_api_keys_are_refused(text: str) -> None:
    with pytest.raises(KeyFormatError):
        parse_api_key(text)


def test_client_certificate_is_self_signed_deterministic_and_names_the_identity() -> None:
    key = SoftHSM.generate().root_api_key()
    cert_pem, key_pem = client_certificate(key)
    assert (cert_pem, key_pem) == client_certificate(key)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject == cert.issuer
    identity = identity_of_api_key(key)
    assert cert.subject.rfc4514_string() == f"CN={identity}"
    assert identity_of_certificate(cert.public_bytes(serialization.Encoding.DER)) == identity


def test_sealed_state_needs_the_same_hsm_key() -> None:
    from cryptography.exceptions import InvalidTag

    a, b = SoftHSM.generate(), SoftHSM.generate()
    sealed = a.seal(b"secret", b"ctx")
    assert a.unseal(sealed, b"ctx") == b"secret"
    with pytest.raises(InvalidTag):
        b.unseal(sealed, b"ctx")
    with pytest.raises(InvalidTag):
        a.unseal(sealed, b"other context")
    assert "secret" not in repr(a) and str(a.key) not in repr(a)
