"""A receipt carries the receiver's checkpoint and proves its audit entry is in it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.errors import SignatureError
from bridge.ledger import merkle
from bridge.ledger.audit import GENESIS_HASH, AuditRecord, chain_entry, leaf_of
from bridge.records.fhir import validate_resource
from bridge.trust.checkpoint import origin_for, sign_checkpoint
from bridge.trust.jws import KeyRing, Signer
from bridge.trust.pki import DevPKI, init_dev_pki
from bridge.trust.receipts import make_receipt, verify_receipt

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


def signer(pki: DevPKI, who: str) -> Signer:
    files = pki.controllers[who]
    return Signer.from_files(files.sign_key, files.sign_cert)


def log(n: int) -> list[Any]:
    out, prev = [], GENESIS_HASH
    for i in range(1, n + 1):
        e = chain_entry(prev, i, AuditRecord(time=NOW, actor="insurer-b", action="message.receive",
                                             subject=f"m{i}"))
        out.append(e)
        prev = e.hash
    return out


def receipt(pki: DevPKI, seq: int, *, by: str = "insurer-b", **kw: Any) -> dict[str, Any]:
    entries = log(seq)
    leaves = [leaf_of(e) for e in entries]
    cp = sign_checkpoint(signer(pki, by).private_key, by, origin_for(by), seq,
                         merkle.root(leaves), NOW)
    args: dict[str, Any] = {
        "request_message_id": REQ, "request_digest": DIGEST, "outcome": "ok",
        "receiver": "insurer-b", "sender": "hospital-a", "audit_seq": seq,
        "audit_hash": entries[-1].hash, "signer": signer(pki, "insurer-b"), "now": NOW,
        "audit_checkpoint": cp.note,
        "audit_proof": merkle.inclusion_proof(seq - 1, leaves),
    }
    args.update(kw)
    return make_receipt(**args)


def check(r: dict[str, Any], keyring: KeyRing) -> Any:
    return verify_receipt(json.loads(json.dumps(r)), keyring, expected_issuer="insurer-b",
                          expected_audience="hospital-a", request_message_id=REQ,
                          request_digest=DIGEST, now=NOW)


@pytest.mark.parametrize("seq", [1, 2, 7, 16])
def test_receipt_checkpoint_includes_the_entry(pki: DevPKI, keyring: KeyRing, seq: int) -> None:
    r = receipt(pki, seq)
    validate_resource(r)
    got = check(r, keyring)
    assert got.checkpoint is not None and got.checkpoint.size == seq
    assert got.checkpoint.name == f"ws-fhir-bridge/audit/insurer-b@{seq}"


def test_receipt_checkpoint_must_hold_the_named_entry(pki: DevPKI, keyring: KeyRing) -> None:
    # A checkpoint whose tree does not contain the entry the receipt names.
    r = receipt(pki, 7, audit_hash=log(7)[3].hash)
    with pytest.raises(SignatureError, match="entry 7 is not in the receipt's checkpoint"):
        check(r, keyring)
    r = receipt(pki, 7, audit_proof=[b"\x00" * 32] * 3)
    with pytest.raises(SignatureError, match="not in the receipt's checkpoint"):
        check(r, keyring)


def test_receipt_checkpoint_must_be_the_receivers(pki: DevPKI, keyring: KeyRing) -> None:
    r = receipt(pki, 5, by="hospital-a")
    with pytest.raises(SignatureError, match="receipt checkpoint") as err:
        check(r, keyring)
    assert "audit-checkpoint" in (err.value.location or "")
