"""Acks (DESIGN §4.3): every key type signs and verifies; everything else is refused with the signer named."""

from __future__ import annotations

import base64
import dataclasses
import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import pki
from agent.core.messages import Ack, Action, ack_payload
from agent.io.signing import AckVerifier, Signer, SigningError

NAMES = ("node1", "node2", "node3")
NOW = datetime.datetime.now(datetime.UTC)
PAYLOAD = ack_payload("prod", 7, Action(id="a-1", kind="REJOIN", target="node2", params=(("reason", "x"),)))


def make_signer(
    ca_dir: Path, name: str, key_type: str = "ec", now: datetime.datetime = NOW, days: int = 30
) -> Signer:
    """A signer whose certificate the CA in `ca_dir` issued at `now`, without touching the files' names."""
    ca_cert, ca_key = pki.load_ca(ca_dir)
    cert, key = pki.build_leaf(ca_cert, ca_key, name, now, dns=[name], key_type=key_type, days=days)
    out = ca_dir / "leaves" / f"{name}-{key_type}-{now:%Y%m%d}"
    pki.make_private_dir(out)
    pki.write_pair(out / "c.crt", out / "c.key", cert, key)
    return Signer.from_files(out / "c.crt", out / "c.key", name)


@pytest.fixture(scope="module", params=["ec", "rsa", "ed25519"])
def ca_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA of each key type: the CA's own signature scheme is checked by hand (PKCS#1 v1.5, ECDSA,
    Ed25519)."""
    directory = tmp_path_factory.mktemp("ca") / "ca"
    pki.init_ca(directory, "prod", key_type=str(request.param))
    return directory


@pytest.fixture(scope="module")
def verifier(ca_dir: Path) -> AckVerifier:
    return AckVerifier.from_file(ca_dir / "ca.crt", NAMES)


@pytest.mark.parametrize("key_type", ["ec", "rsa", "ed25519"])
def test_sign_and_verify_every_key_type(ca_dir: Path, verifier: AckVerifier, key_type: str) -> None:
    signer = make_signer(ca_dir, "node1", key_type)
    ack = signer.sign(PAYLOAD)
    assert ack.signer == "node1" and ack.certificate.startswith("-----BEGIN CERTIFICATE-----")
    assert verifier.verify(ack, PAYLOAD, NOW) is None
    assert verifier.at(NOW)(ack, PAYLOAD) is None  # the quorum check's verify_ack(ack, payload)
    assert "PRIVATE" not in repr(signer)


def test_files_issued_by_kmagent_pki_sign(ca_dir: Path, verifier: AckVerifier) -> None:
    cert, key = pki.issue(ca_dir, "node2", force=True)
    ack = Signer.from_files(cert, key, "node2").sign(PAYLOAD)
    assert verifier.verify(ack, PAYLOAD, datetime.datetime.now(datetime.UTC)) is None


def test_another_ca_with_the_same_name_is_refused(
    ca_dir: Path, verifier: AckVerifier, tmp_path: Path
) -> None:
    impostor_ca = tmp_path / "impostor"
    pki.init_ca(impostor_ca, "prod")  # same subject "prod CA", different key
    assert pki.load_ca(impostor_ca)[0].subject == pki.load_ca(ca_dir)[0].subject
    ack = make_signer(impostor_ca, "node1").sign(PAYLOAD)
    problem = verifier.verify(ack, PAYLOAD, NOW)
    assert problem is not None and "'node1'" in problem
    assert "not from the cluster CA" in problem and "does not verify with the cluster CA's key" in problem


def test_a_ca_with_another_name_is_refused(verifier: AckVerifier, tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "other", "staging")
    problem = verifier.verify(make_signer(tmp_path / "other", "node1").sign(PAYLOAD), PAYLOAD, NOW)
    assert problem is not None and "'node1'" in problem and "issued by 'CN=staging CA'" in problem


def test_validity_period(ca_dir: Path, verifier: AckVerifier) -> None:
    expired = make_signer(ca_dir, "node1", now=NOW - datetime.timedelta(days=40), days=30).sign(PAYLOAD)
    problem = verifier.verify(expired, PAYLOAD, NOW)
    assert problem is not None and "'node1'" in problem and "expired" in problem

    future = make_signer(ca_dir, "node1", now=NOW + datetime.timedelta(days=2)).sign(PAYLOAD)
    problem = verifier.verify(future, PAYLOAD, NOW)
    assert problem is not None and "'node1'" in problem and "not valid before" in problem
    assert verifier.verify(future, PAYLOAD, NOW + datetime.timedelta(days=3)) is None  # time is a parameter

    ca_end = pki.validity(verifier.ca_cert)[1]
    problem = verifier.verify(future, PAYLOAD, ca_end + datetime.timedelta(seconds=1))
    assert problem is not None and "'node1'" in problem and "cluster CA certificate expired" in problem

    with pytest.raises(ValueError, match="timezone-aware"):
        verifier.verify(future, PAYLOAD, datetime.datetime(2030, 1, 1))  # naive: refused


def test_signer_must_be_the_name_in_the_certificate(ca_dir: Path, verifier: AckVerifier) -> None:
    ack = make_signer(ca_dir, "node2").sign(PAYLOAD)
    forged = dataclasses.replace(ack, signer="node1")  # node2's valid signature, claimed as node1's
    assert verifier.verify(forged, PAYLOAD, NOW) == (
        "ack from 'node1': the certificate names 'node2', not the signer"
    )


def test_signer_must_be_configured(ca_dir: Path, verifier: AckVerifier) -> None:
    ack = make_signer(ca_dir, "node9").sign(PAYLOAD)  # issued by the right CA, but not in the config
    assert verifier.verify(ack, PAYLOAD, NOW) == "ack from 'node9': 'node9' is not a configured agent"
    assert AckVerifier(pki.load_ca(ca_dir)[0], [*NAMES, "node9"]).verify(ack, PAYLOAD, NOW) is None


def test_tampering_is_refused(ca_dir: Path, verifier: AckVerifier) -> None:
    signer = make_signer(ca_dir, "node1")
    ack = signer.sign(PAYLOAD)
    other = ack_payload("prod", 8, Action(id="a-1", kind="REJOIN", target="node2", params=(("reason", "x"),)))
    problem = verifier.verify(ack, other, NOW)  # a valid ack replayed for another term
    assert problem is not None and "'node1'" in problem and "signature does not verify" in problem

    raw = bytearray(base64.b64decode(ack.signature))
    raw[len(raw) // 2] ^= 0x01
    flipped = dataclasses.replace(ack, signature=base64.b64encode(bytes(raw)).decode())
    problem = verifier.verify(flipped, PAYLOAD, NOW)
    assert problem is not None and "'node1'" in problem and "signature does not verify" in problem

    stranger = ec.generate_private_key(ec.SECP256R1())
    swapped = dataclasses.replace(signer, key=stranger).sign(PAYLOAD)  # right certificate, wrong key
    problem = verifier.verify(swapped, PAYLOAD, NOW)
    assert problem is not None and "signature does not verify" in problem


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("certificate", "not a certificate", "not a valid PEM certificate"),
        ("certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid PEM"),
        ("certificate", "A" * 20_000, "missing or too large"),
        ("signature", "!!!not base64!!!", "not valid base64"),
        ("signature", "AAA", "not valid base64"),  # bad padding
        ("signature", "", "signature does not verify"),
        ("signer", "", "is not a configured agent"),
    ],
)
def test_garbage_is_refused(
    ca_dir: Path, verifier: AckVerifier, field: str, value: str, expected: str
) -> None:
    ack = dataclasses.replace(make_signer(ca_dir, "node1").sign(PAYLOAD), **{field: value})
    problem = verifier.verify(ack, PAYLOAD, NOW)
    assert problem is not None and expected in problem
    assert problem.startswith(f"ack from {ack.signer!r}:")


def test_wrong_types_from_a_decoded_message_are_refused_not_raised(verifier: AckVerifier) -> None:
    problem = verifier.verify(Ack(signer=7, certificate="x", signature="y"), PAYLOAD, NOW)  # type: ignore[arg-type]
    assert problem == "ack from '7': '7' is not a configured agent"
    problem = verifier.verify(Ack(signer="x" * 10_000, certificate="x", signature="y"), PAYLOAD, NOW)
    assert problem is not None and len(problem) < 200 and "is not a configured agent" in problem
    problem = verifier.verify(Ack(signer="node1", certificate=None, signature="y"), PAYLOAD, NOW)  # type: ignore[arg-type]
    assert problem == "ack from 'node1': the certificate is missing or too large"


@settings(max_examples=25, deadline=None)
@given(payload=st.binary(max_size=512), flip=st.integers(min_value=0))
def test_any_payload_verifies_and_any_changed_byte_does_not(
    tmp_path_factory: pytest.TempPathFactory, payload: bytes, flip: int
) -> None:
    signer, verifier = _shared_ec_signer(tmp_path_factory)
    ack = signer.sign(payload)
    assert verifier.verify(ack, payload, NOW) is None
    changed = bytearray(payload or b"\x00")
    changed[flip % len(changed)] ^= 0xFF
    assert verifier.verify(ack, bytes(changed), NOW) is not None


_SHARED: dict[str, tuple[Signer, AckVerifier]] = {}


def _shared_ec_signer(factory: pytest.TempPathFactory) -> tuple[Signer, AckVerifier]:
    """One CA for every hypothesis example (function fixtures are not reset between examples)."""
    if "ec" not in _SHARED:
        directory = factory.mktemp("hypothesis") / "ca"
        pki.init_ca(directory, "prod")
        _SHARED["ec"] = make_signer(directory, "node1"), AckVerifier.from_file(directory / "ca.crt", NAMES)
    return _SHARED["ec"]


# ------------------------------------------------------------------------------------------------- load


def test_load_refuses_a_key_that_is_not_the_certificates(ca_dir: Path) -> None:
    cert, _ = pki.issue(ca_dir, "node1", force=True)
    _, other_key = pki.issue(ca_dir, "node2", force=True)
    with pytest.raises(SigningError, match=r"node2\.key does not match certificate .*node1\.crt"):
        Signer.from_files(cert, other_key, "node1")


def test_load_refuses_a_certificate_for_another_agent(ca_dir: Path) -> None:
    cert, key = pki.issue(ca_dir, "node1", force=True)
    with pytest.raises(SigningError, match="names agent 'node1', but this agent is 'node2'"):
        Signer.from_files(cert, key, "node2")


def test_load_explains_unreadable_files(ca_dir: Path, tmp_path: Path) -> None:
    cert, key = pki.issue(ca_dir, "node1", force=True)
    with pytest.raises(SigningError, match="cannot read key"):
        Signer.from_files(cert, tmp_path / "missing.key", "node1")
    (tmp_path / "garbage").write_text("garbage")
    with pytest.raises(SigningError, match="not a PEM private key"):
        Signer.from_files(cert, tmp_path / "garbage", "node1")
    with pytest.raises(SigningError, match="not a PEM certificate"):
        Signer.from_files(tmp_path / "garbage", key, "node1")
    with pytest.raises(SigningError, match="cannot read certificate"):
        AckVerifier.from_file(tmp_path / "missing.crt", NAMES)
