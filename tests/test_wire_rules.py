"""The pure rules behind the wire: signature-check precedence, per-request certificate
checks, the bounded audit of failed handshakes, and the native TLS settings."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from bridge.conformance.envelope import JWSOptions, SigningKey, build_claim, sign_message
from bridge.errors import CertificateRejected, ConfigError, ReplayError, SignatureError
from bridge.link.handshakes import HandshakeAudit, HandshakeFailure, HandshakeRecord, classify
from bridge.trust.jws import KeyRing, verify_bundle
from bridge.trust.openssl import NativeTLSUnavailable, session_cache_mode, set_groups
from bridge.trust.peercheck import PeerCertificateCheck
from bridge.trust.pki import (
    DevPKI,
    certificate_pem,
    generate_ca,
    init_dev_pki,
    issue_certificate,
    issue_crl,
    load_certificate,
    load_private_key,
)
from bridge.trust.tls import client_context, server_context

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return init_dev_pki(tmp_path_factory.mktemp("pki"), ["hospital-a", "insurer-b"], now=NOW)


def _key(pki: DevPKI, who: str = "hospital-a") -> SigningKey:
    files = pki.controllers[who]
    return SigningKey.from_files(files.sign_key, files.sign_cert)


def _ring(pki: DevPKI) -> KeyRing:
    ring = KeyRing()
    for who in ("hospital-a", "insurer-b"):
        ring.add_certificate(who, pki.controllers[who].sign_cert)
    return ring


def _verify(bundle: dict[str, Any], ring: KeyRing, now: datetime = NOW) -> Any:
    return verify_bundle(
        bundle, ring, expected_issuer="hospital-a", expected_audience="insurer-b", now=now
    )


# --- §5.4: which error wins --------------------------------------------------------------


def test_signature_faults_come_before_replay_faults(pki: DevPKI, tmp_path: Path) -> None:
    ring = _ring(pki)
    claim = build_claim(sender="hospital-a", receiver="insurer-b", now=NOW)
    # A key that was retired before the signature's iat: a bad signature, although the
    # iat is also far outside the window and the audience is wrong.
    ca, ca_key = load_certificate(pki.ca_cert), load_private_key(pki.ca_key)
    old_cert, old_key = issue_certificate(
        ca, ca_key, "hospital-a signing", purpose="signing", partner_id="hospital-a",  # type: ignore[arg-type]
        now=NOW - timedelta(days=400), days=30,
    )
    (tmp_path / "old.pem").write_bytes(certificate_pem(old_cert))
    ring.add_certificate("hospital-a", tmp_path / "old.pem")
    retired = SigningKey(old_key, old_cert)  # type: ignore[arg-type]
    late_iat = int((NOW - timedelta(days=200)).timestamp())
    bundle = sign_message(claim, retired, iss="hospital-a", aud="clinic-x", iat=late_iat)
    with pytest.raises(SignatureError) as err:
        _verify(bundle, ring)
    assert err.value.location == "Bundle.signature.data#kid"
    # The same key, an iat inside its validity but old: now a replay.
    early_iat = int((NOW - timedelta(days=390)).timestamp())
    bundle = sign_message(claim, retired, iss="hospital-a", aud="insurer-b", iat=early_iat)
    with pytest.raises(ReplayError) as err2:
        _verify(bundle, ring)
    assert err2.value.location == "Bundle.signature.data#iat"
    # A wrong audience with a good key: replay, named at aud.
    bundle = sign_message(claim, _key(pki), iss="hospital-a", aud="clinic-x", iat=int(NOW.timestamp()))
    with pytest.raises(ReplayError) as err3:
        _verify(bundle, ring)
    assert err3.value.location == "Bundle.signature.data#aud"


def test_header_checks_come_before_the_key(pki: DevPKI) -> None:
    """An unknown kid with a forbidden member: the member is named first (§5.4 step 5)."""
    claim = build_claim(sender="hospital-a", receiver="insurer-b", now=NOW)
    bundle = sign_message(
        claim, _key(pki), iss="hospital-a", aud="insurer-b", iat=int(NOW.timestamp()),
        options=JWSOptions(overrides={"kid": "unknown"}, extra_headers={"zip": "DEF"}),
    )
    with pytest.raises(SignatureError) as err:
        _verify(bundle, _ring(pki))
    assert err.value.location == "Bundle.signature.data#zip"


def test_repeated_header_members_are_refused(pki: DevPKI) -> None:
    import base64
    import json

    claim = build_claim(sender="hospital-a", receiver="insurer-b", now=NOW)
    good = sign_message(claim, _key(pki), iss="hospital-a", aud="insurer-b", iat=int(NOW.timestamp()))
    compact = base64.b64decode(good["signature"]["data"]).decode()
    header, _, sig = compact.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(header + "=="))
    text = json.dumps(decoded)[:-1] + ', "aud": "insurer-b"}'
    forged = base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()
    good["signature"]["data"] = base64.b64encode(f"{forged}..{sig}".encode()).decode()
    with pytest.raises(SignatureError) as err:
        _verify(good, _ring(pki))
    assert err.value.location == "Bundle.signature.data"


# --- per-request certificate checks ------------------------------------------------------


def test_certificate_checks_per_request(pki: DevPKI, tmp_path: Path) -> None:
    ca, ca_key = load_certificate(pki.ca_cert), load_private_key(pki.ca_key)
    cert, _ = issue_certificate(
        ca, ca_key, "hospital-a", purpose="tls", partner_id="hospital-a", now=NOW, days=10  # type: ignore[arg-type]
    )
    der = cert.public_bytes(Encoding.DER)
    no_crl = PeerCertificateCheck()
    assert no_crl.check(der, NOW).partner_id == "hospital-a"
    with pytest.raises(CertificateRejected, match="expired"):
        no_crl.check(der, NOW + timedelta(days=11))
    with pytest.raises(CertificateRejected, match="not yet valid"):
        no_crl.check(der, NOW - timedelta(days=1))

    crl_file = tmp_path / "crl.pem"
    crl = issue_crl(ca, ca_key, [cert.serial_number], now=NOW, days=7)  # type: ignore[arg-type]
    crl_file.write_bytes(crl.public_bytes(Encoding.PEM))
    with pytest.raises(CertificateRejected, match="revoked"):
        PeerCertificateCheck.from_crl_file(crl_file).check(der, NOW)
    clean = issue_crl(ca, ca_key, [], now=NOW, days=7)  # type: ignore[arg-type]
    crl_file.write_bytes(clean.public_bytes(Encoding.PEM))
    check = PeerCertificateCheck.from_crl_file(crl_file)
    assert check.check(der, NOW).serial_number == cert.serial_number
    with pytest.raises(CertificateRejected, match="out of date"):
        check.check(der, NOW + timedelta(days=8))
    other_ca, other_key = generate_ca("another CA", now=NOW)
    stranger, _ = issue_certificate(
        other_ca, other_key, "hospital-a", purpose="tls", partner_id="hospital-a", now=NOW
    )
    with pytest.raises(CertificateRejected, match="no CRL"):
        check.check(stranger.public_bytes(Encoding.DER), NOW)
    (tmp_path / "empty.pem").write_text("nothing here")
    with pytest.raises(ConfigError):
        PeerCertificateCheck.from_crl_file(tmp_path / "empty.pem")


# --- bounded audit of failed handshakes ------------------------------------------------


async def test_failed_handshakes_write_bounded_rows() -> None:
    rows: list[HandshakeRecord] = []

    async def write(record: HandshakeRecord) -> None:
        rows.append(record)

    clock = [0.0]
    audit = HandshakeAudit(write, listener="tls-listener:1", window=60, max_distinct=3,
                           clock=lambda: clock[0])
    for i in range(1000):
        await audit.failed(HandshakeFailure("dropped", "eof", f"10.0.0.1:{i}"))
        await audit.failed(HandshakeFailure("stalled", "timeout", f"10.0.0.2:{i}"))
        await audit.failed(
            HandshakeFailure("refused", "certificate-expired", f"10.0.0.3:{i}", "sha256:aa")
        )
        await audit.failed(
            HandshakeFailure("refused", "unknown-ca", f"10.0.0.4:{i}", f"sha256:{i:04x}")
        )
    # Immediately: one row per distinct refusal, up to the cap.
    assert [(r.action, r.detail) for r in rows] == [
        ("tls.refused", "certificate-expired"),
        ("tls.refused", "unknown-ca"),
        ("tls.refused", "unknown-ca"),
    ]
    clock[0] = 61.0
    await audit.flush()
    details = [r.detail for r in rows[3:]]
    assert details == [
        "certificate-expired repeated=999",
        "other-refusals count=998",
        "stalled=1000 dropped=1000 aborted=0",
    ]
    assert audit.totals == {"refused": 2000, "stalled": 1000, "dropped": 1000, "aborted": 0}
    await audit.flush()  # nothing new, nothing written
    assert len(rows) == 6


def test_handshake_failures_are_sorted() -> None:
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.verify_code = 10
    assert classify(expired, "a", "sha256:1") == HandshakeFailure(
        "refused", "certificate-expired", "a", "sha256:1"
    )
    assert classify(ConnectionAbortedError("slow"), "a", None).kind == "stalled"
    assert classify(TimeoutError(), "a", None).kind == "stalled"
    assert classify(ConnectionResetError, "a", None).kind == "dropped"  # type: ignore[arg-type]
    assert classify(None, "a", None).kind == "dropped"
    no_cert = ssl.SSLError(1, "peer did not return a certificate")
    no_cert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert classify(no_cert, "a", "sha256:1") == HandshakeFailure("refused", "no-certificate", "a")
    alert = ssl.SSLError(1, "alert")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert classify(alert, "a", None).kind == "aborted"


# --- native TLS settings ---------------------------------------------------------------------


def test_server_context_keeps_no_sessions_and_offers_intermediate_groups(pki: DevPKI) -> None:
    files = pki.controllers["insurer-b"]
    ctx = server_context(files.tls_cert, files.tls_key, pki.ca_cert)
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.num_tickets == 0
    assert session_cache_mode(ctx) == 0
    client = client_context(files.tls_cert, files.tls_key, pki.ca_cert)
    assert session_cache_mode(client) != 0  # clients keep theirs; only the listener is off


def test_native_settings_refuse_what_they_cannot_verify() -> None:
    class NotAContext:
        options = 0
        verify_mode = ssl.CERT_NONE

    with pytest.raises(NativeTLSUnavailable):
        set_groups(NotAContext(), "X25519")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(NativeTLSUnavailable):
        set_groups(ctx, "not-a-group")
