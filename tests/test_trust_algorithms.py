"""Signature algorithms are a registry keyed by the JWS ``alg``: each one signs the same
envelope, a partner is accepted only under the algorithms configured for it, and a
token cannot pick an algorithm of its own."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from bridge.errors import ConfigError, SignatureError
from bridge.trust import algorithms
from bridge.trust.algorithms import SignatureAlgorithm
from bridge.trust.jws import KeyRing, Signer, sign_bundle, verify_bundle
from bridge.trust.pki import generate_ca, issue_certificate

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
MSG = "urn:uuid:7a0f4c1e-2b3d-5e6f-8a9b-0c1d2e3f4a5b"


def bundle() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": MSG},
        "type": "message",
        "entry": [{"resource": {"resourceType": "Patient", "name": [{"text": "李四"}]}}],
    }


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, Any]:
    return generate_ca("algorithms test CA", now=NOW)


def signing_pair(ca: tuple[x509.Certificate, Any], alg: str) -> tuple[x509.Certificate, Any]:
    return issue_certificate(ca[0], ca[1], f"hospital-a {alg}", purpose="signing", now=NOW,
                             partner_id="hospital-a", key_algorithm=alg)  # type: ignore[arg-type]


def sign(cert: x509.Certificate, key: Any) -> dict[str, Any]:
    return sign_bundle(bundle(), Signer.from_certificate(key, cert), issuer="hospital-a",
                       audience="insurer-b", message_id=MSG, now=NOW)


def verify(signed: dict[str, Any], ring: KeyRing) -> Any:
    # As the receiver parses it from the wire.
    return verify_bundle(json.loads(json.dumps(signed)), ring, expected_issuer="hospital-a",
                         expected_audience="insurer-b", now=NOW)


def header_of(signed: dict[str, Any]) -> dict[str, Any]:
    compact = base64.b64decode(signed["signature"]["data"]).decode()
    head = compact.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))  # type: ignore[no-any-return]


def test_the_registry_holds_es256_and_ed25519_and_nothing_symmetric() -> None:
    assert algorithms.names() == ("ES256", "Ed25519")
    for name in ("none", "HS256", "RS256", "ES384", "EdDSA", "SM2"):
        assert algorithms.get(name) is None


@pytest.mark.control("T20")
@pytest.mark.parametrize("alg", ["ES256", "Ed25519"])
def test_every_registered_algorithm_signs_the_same_envelope(
    ca: tuple[x509.Certificate, Any], alg: str
) -> None:
    cert, key = signing_pair(ca, alg)
    ring = KeyRing()
    ring.add_certificate("hospital-a", cert)
    signed = sign(cert, key)
    header = header_of(signed)
    assert sorted(header) == ["alg", "aud", "iat", "iss", "kid", "msgid"]
    assert header["alg"] == alg
    assert verify(signed, ring).algorithm == alg
    # The signature bytes are the algorithm's: flipping one bit breaks it.
    compact = base64.b64decode(signed["signature"]["data"]).decode()
    head, _, sig = compact.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[5] ^= 1
    bad = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    signed["signature"]["data"] = base64.b64encode(f"{head}..{bad}".encode()).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify(signed, ring)


def forged(signed: dict[str, Any], alg: str, make_signature: Any) -> dict[str, Any]:
    """``signed`` with its header's alg replaced and a signature made by ``make_signature``."""
    header = {**header_of(signed), "alg": alg}
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
    from bridge.trust.jws import signed_payload

    payload = base64.urlsafe_b64encode(signed_payload(signed)).rstrip(b"=")
    sig = base64.urlsafe_b64encode(make_signature(head + b"." + payload)).rstrip(b"=")
    out = dict(signed)
    out["signature"] = {**signed["signature"],
                        "data": base64.b64encode(head + b".." + sig).decode()}
    return out


@pytest.mark.control("T20")
def test_a_token_cannot_choose_hmac_or_none_with_the_public_key_as_secret(
    ca: tuple[x509.Certificate, Any],
) -> None:
    cert, key = signing_pair(ca, "ES256")
    ring = KeyRing()
    ring.add_certificate("hospital-a", cert)
    signed = sign(cert, key)
    public_pem = cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    attacks = {
        "HS256": lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        "none": lambda data: b"x",
        "es256": lambda data: b"x" * 64,
    }
    for alg, make in attacks.items():
        with pytest.raises(SignatureError) as refused:
            verify(forged(signed, alg, make), ring)
        assert refused.value.location == "Bundle.signature.data#alg"
        assert refused.value.message == "signature algorithm not allowed"


@pytest.mark.control("T20")
def test_a_partner_narrowed_to_ed25519_is_refused_under_its_es256_key(
    ca: tuple[x509.Certificate, Any],
) -> None:
    es_cert, es_key = signing_pair(ca, "ES256")
    ed_cert, ed_key = signing_pair(ca, "Ed25519")
    ring = KeyRing()
    ring.add_certificate("hospital-a", es_cert)
    ring.add_certificate("hospital-a", ed_cert)
    assert verify(sign(es_cert, es_key), ring).algorithm == "ES256"  # not narrowed yet
    ring.accept("hospital-a", {"Ed25519"})
    with pytest.raises(SignatureError) as refused:
        verify(sign(es_cert, es_key), ring)
    assert refused.value.location == "Bundle.signature.data#alg"
    assert "not one configured for this partner" in refused.value.message
    assert verify(sign(ed_cert, ed_key), ring).algorithm == "Ed25519"
    # Evidence signed before the link changed algorithm (a receipt returned to a resend)
    # is held to the algorithm of the key that made it; a fresh receipt is not.
    old = json.loads(json.dumps(sign(es_cert, es_key)))
    with pytest.raises(SignatureError, match="not one configured"):
        verify_bundle(old, ring, expected_issuer="hospital-a", expected_audience="insurer-b",
                      now=NOW, check_time=False)
    later = NOW + timedelta(minutes=6)
    assert verify_bundle(old, ring, expected_issuer="hospital-a", expected_audience="insurer-b",
                         now=later, check_time=False).algorithm == "ES256"
    # An Ed25519 header over the ES256 key is a key mismatch, whatever is accepted.
    with pytest.raises(SignatureError, match="does not match the key"):
        verify(forged(sign(es_cert, es_key), "Ed25519", lambda data: b"x" * 64), ring)


def test_the_partner_registry_builds_a_key_ring_narrowed_to_each_partners_algorithms(
    ca: tuple[x509.Certificate, Any],
) -> None:
    from bridge.trust.pki import certificate_pem
    from bridge.trust.registry import Partner, PartnerRegistry

    es_cert, es_key = signing_pair(ca, "ES256")
    ed_cert, ed_key = signing_pair(ca, "Ed25519")
    pems = (certificate_pem(es_cert), certificate_pem(ed_cert))
    open_ring = PartnerRegistry([Partner("hospital-a", "A", "", signing_certificates=pems)])
    narrowed = PartnerRegistry([Partner("hospital-a", "A", "", signing_certificates=pems,
                                        signature_algorithms=frozenset({"Ed25519"}))])
    assert verify(sign(es_cert, es_key), open_ring.keyring()).algorithm == "ES256"
    with pytest.raises(SignatureError, match="not one configured"):
        verify(sign(es_cert, es_key), narrowed.keyring())
    assert verify(sign(ed_cert, ed_key), narrowed.keyring()).algorithm == "Ed25519"


def test_accepting_an_unregistered_algorithm_is_a_configuration_error() -> None:
    ring = KeyRing()
    with pytest.raises(ConfigError) as bad:
        ring.accept("hospital-a", {"ES256", "HS256"})
    assert bad.value.location == "partners.hospital-a.signature_algorithms"
    assert "HS256" in bad.value.message
    with pytest.raises(ConfigError):
        ring.accept("hospital-a", set())


class ES384(SignatureAlgorithm):
    """ECDSA on P-384 with SHA-384 (RFC 7518 §3.4), registered by a test only."""

    name = "ES384"
    key_kind = "EC P-384"

    def owns(self, key: Any) -> bool:
        return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and (
            isinstance(key.curve, ec.SECP384R1))

    def sign(self, private_key: Any, signing_input: bytes) -> bytes:
        r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        return r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def verify(self, public_key: Any, signature: bytes, signing_input: bytes) -> bool:
        if len(signature) != 96:
            return False
        der = encode_dss_signature(int.from_bytes(signature[:48], "big"),
                                   int.from_bytes(signature[48:], "big"))
        try:
            public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            return False
        return True


@pytest.fixture
def es384() -> Iterator[None]:
    algorithms.register(ES384())
    try:
        yield
    finally:
        algorithms.unregister("ES384")


def p384_signing_certificate(ca: tuple[x509.Certificate, Any]) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hospital-a P-384")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(ca[0].subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
        .sign(ca[1], hashes.SHA256())
    )
    return cert, key


@pytest.mark.control("T20")
def test_a_registered_algorithm_plugs_in_without_touching_the_envelope(
    ca: tuple[x509.Certificate, Any], es384: None, tmp_path: Path,
) -> None:
    """What an SM2 signer would do: register, then sign and verify with no other change."""
    cert, key = p384_signing_certificate(ca)
    ring = KeyRing()
    ring.add_certificate("hospital-a", cert)
    ring.accept("hospital-a", {"ES384"})
    signed = sign(cert, key)
    assert header_of(signed)["alg"] == "ES384"
    assert sorted(header_of(signed)) == ["alg", "aud", "iat", "iss", "kid", "msgid"]
    assert verify(signed, ring).algorithm == "ES384"
    # A link may name it in the configuration once it is registered.
    from bridge.config import LinkConfig

    assert LinkConfig(id="l", partner="p", direction="inbound",
                      signature_algorithm="ES384").signature_algorithm == "ES384"
    algorithms.unregister("ES384")
    with pytest.raises(SignatureError) as refused:
        verify(signed, ring)
    assert refused.value.location == "Bundle.signature.data#alg"
    algorithms.register(ES384())  # for the fixture's own unregister


def test_built_in_algorithms_cannot_be_replaced_or_removed() -> None:
    with pytest.raises(ValueError):
        algorithms.register(algorithms.ES256())
    with pytest.raises(ValueError):
        algorithms.unregister("ES256")


def test_importing_the_algorithms_leaves_the_network_out() -> None:
    import subprocess
    import sys

    code = ("import sys, bridge.trust.algorithms, bridge.trust.jws;"
            "print(sorted({'aiohttp', 'asyncio', 'ssl'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
