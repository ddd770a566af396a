"""Signed receipts: round trip, tampering, and evidence checked long after the fact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bridge.errors import ReplayError, SignatureError
from bridge.records.fhir import validate_resource
from bridge.trust.jws import KeyRing, Signer
from bridge.trust.pki import DevPKI, init_dev_pki
from bridge.trust.receipts import make_receipt, receipt_id, verify_receipt

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
REQ = "urn:uuid:5d1c0f4e-8a8b-5c44-9a57-1f3c7f5d2b10"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPKI:
    return init_dev_pki(tmp_path_factory.mktemp("pki"), ["hospital-a", "insurer-b"], now=NOW)


@pytest.fixture(scope="module")
def keyring(pki: DevPKI) -> KeyRing:
    ring = KeyRing()
    for who in ("hospital-a", "insurer-b"):
        ring.add_certificate(who, pki.controllers[who].sign_cert)
    return ring


def receipt(pki: DevPKI, **kw: Any) -> dict[str, Any]:
    files = pki.controllers["insurer-b"]
    args: dict[str, Any] = {
        "request_message_id": REQ,
        "request_digest": DIGEST,
        "outcome": "ok",
        "receiver": "insurer-b",
        "sender": "hospital-a",
        "audit_seq": 42,
        "audit_hash": "sha256:" + "cd" * 32,
        "signer": Signer.from_files(files.sign_key, files.sign_cert),
        "now": NOW,
    }
    args.update(kw)
    return make_receipt(**args)


def check(r: dict[str, Any], keyring: KeyRing, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "expected_issuer": "insurer-b",
        "expected_audience": "hospital-a",
        "request_message_id": REQ,
        "request_digest": DIGEST,
        "now": NOW,
    }
    args.update(kw)
    return verify_receipt(json.loads(json.dumps(r)), keyring, **args)


def test_receipt_round_trip(pki: DevPKI, keyring: KeyRing) -> None:
    r = receipt(pki)
    got = check(r, keyring)
    assert (got.outcome, got.audit_seq, got.audit_hash) == ("ok", 42, "sha256:" + "cd" * 32)
    assert got.claims.issuer == "insurer-b" and got.claims.audience == "hospital-a"
    assert got.receipt_id == r["identifier"]["value"] == receipt_id(REQ, "insurer-b")
    header = r["entry"][0]["resource"]
    assert header["eventCoding"] == {"system": "urn:ws-fhir-bridge:event", "code": "receipt"}
    assert header["response"] == {"identifier": REQ.removeprefix("urn:uuid:"), "code": "ok"}


def test_receipt_is_deterministic_per_request_and_receiver(pki: DevPKI) -> None:
    assert receipt(pki)["identifier"] == receipt(pki, now=NOW + timedelta(hours=1))["identifier"]
    assert receipt_id(REQ, "insurer-b") != receipt_id(REQ, "hospital-a")
    assert receipt_id(REQ, "insurer-b") != receipt_id("urn:uuid:other", "insurer-b")


def test_receipt_is_valid_fhir(pki: DevPKI) -> None:
    issues = [{"severity": "error", "code": "invalid", "expression": ["Bundle.entry[3].resource"]}]
    r = receipt(pki, outcome="fatal-error", issues=issues)
    validate_resource(r)
    assert r["entry"][1]["resource"]["resourceType"] == "OperationOutcome"


def test_issues_travel_in_the_receipt(pki: DevPKI, keyring: KeyRing) -> None:
    issues = [{"severity": "error", "code": "invalid", "expression": ["Bundle.entry[3].resource"]}]
    got = check(receipt(pki, outcome="fatal-error", issues=issues), keyring)
    assert got.outcome == "fatal-error"
    assert got.issues == tuple(issues)


def test_tampered_receipt_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    r = receipt(pki, outcome="fatal-error")
    r["entry"][0]["resource"]["response"]["code"] = "ok"
    with pytest.raises(SignatureError, match="does not verify"):
        check(r, keyring)
    r2 = receipt(pki)
    r2["entry"][0]["resource"]["extension"][2]["valueInteger"] = 41
    with pytest.raises(SignatureError):
        check(r2, keyring)


def test_receipt_for_another_request_or_content_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    r = receipt(pki)
    with pytest.raises(SignatureError):
        check(r, keyring, request_message_id="urn:uuid:00000000-0000-5000-8000-000000000000")
    with pytest.raises(SignatureError, match="different content"):
        check(r, keyring, request_digest="sha256:" + "00" * 32)
    assert check(r, keyring, request_digest=None).request_digest == DIGEST


def test_receipt_signed_by_the_sender_itself_is_refused(pki: DevPKI, keyring: KeyRing) -> None:
    files = pki.controllers["hospital-a"]
    forged = receipt(pki, signer=Signer.from_files(files.sign_key, files.sign_cert))
    with pytest.raises(SignatureError, match="another partner"):
        check(forged, keyring)


def test_old_receipt_resent_for_a_duplicate(pki: DevPKI, keyring: KeyRing) -> None:
    r = receipt(pki)
    later = NOW + timedelta(days=3)
    with pytest.raises(ReplayError):
        check(r, keyring, now=later)
    assert check(r, keyring, now=later, check_time=False).audit_seq == 42
