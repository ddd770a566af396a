"""The audit hash chain, verified in memory."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bridge.ledger.audit import (
    GENESIS_HASH,
    PSEUDONYM_MEMO,
    PSEUDONYM_MEMO_TEXT,
    AuditEntry,
    AuditRecord,
    chain_entry,
    entry_hash,
    patient_pseudonym,
    pseudonymizer,
    verify_chain,
)

T0 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
KEY = b"k" * 32


def record(i: int) -> AuditRecord:
    return AuditRecord(time=T0 + timedelta(seconds=i), actor="hospital-a", action="claim.enqueue",
                       subject=f"urn:uuid:{i:08d}", partner="insurer-b",
                       patient=patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.3", f"id{i}"),
                       categories=["personal-attribute", "health-payment"],
                       digest=f"sha256:{i}")


def chain(n: int) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    prev = GENESIS_HASH
    for i in range(1, n + 1):
        e = chain_entry(prev, i, record(i))
        out.append(e)
        prev = e.hash
    return out


def test_intact_chain_verifies() -> None:
    entries = chain(6)
    report = verify_chain(entries)
    assert report.ok and report.count == 6 and report.head_hash == entries[-1].hash
    assert entries[0].prev_hash == "0" * 64


def test_every_field_is_covered_by_the_hash() -> None:
    base = record(1)
    h = entry_hash(GENESIS_HASH, 1, base)
    changes = {"time": T0 + timedelta(microseconds=1), "actor": "x", "action": "claim.ack",
               "subject": "s", "partner": None, "patient": "pp:00", "categories": ["x"],
               "outcome": "failure", "detail": "timeout", "digest": None,
               "operator": "os:someone"}
    assert set(changes) == {f.name for f in dataclasses.fields(AuditRecord)}
    for name, value in changes.items():
        assert entry_hash(GENESIS_HASH, 1, dataclasses.replace(base, **{name: value})) != h, name
    assert entry_hash(GENESIS_HASH, 2, base) != h
    assert entry_hash("1" * 64, 1, base) != h


def test_same_instant_in_another_zone_hashes_the_same() -> None:
    cst = timezone(timedelta(hours=8))
    a = record(1)
    b = dataclasses.replace(a, time=a.time.astimezone(cst))
    assert entry_hash(GENESIS_HASH, 1, a) == entry_hash(GENESIS_HASH, 1, b)


def test_edited_entry_is_named() -> None:
    entries = chain(6)
    edited = dataclasses.replace(entries[3].record, outcome="denied")
    entries[3] = dataclasses.replace(entries[3], record=edited)
    report = verify_chain(entries)
    assert not report.ok and report.first_bad_seq == 4 and "hash" in (report.reason or "")
    assert report.count == 3 and report.head_hash == entries[2].hash


def test_deleted_entry_is_named() -> None:
    entries = chain(6)
    del entries[2]
    report = verify_chain(entries)
    assert not report.ok and report.first_bad_seq == 3 and "missing" in (report.reason or "")


def test_deleted_and_renumbered_entry_is_named() -> None:
    entries = chain(6)
    del entries[2]
    entries = [dataclasses.replace(e, seq=i) for i, e in enumerate(entries, start=1)]
    report = verify_chain(entries)
    assert not report.ok and report.first_bad_seq == 3


def test_reordered_entries_are_named() -> None:
    entries = chain(6)
    entries[2], entries[3] = entries[3], entries[2]
    report = verify_chain(entries)
    assert not report.ok and report.first_bad_seq == 3


def test_truncated_head_is_not_detectable_without_an_outside_head() -> None:
    # Dropping the newest entries leaves a valid chain: this is why the head must be
    # cosigned by the partner. The report's head hash is what gets compared.
    entries = chain(6)
    report = verify_chain(entries[:4])
    assert report.ok and report.head_hash != entries[-1].hash


def test_tail_verifies_from_an_anchor() -> None:
    entries = chain(6)
    assert verify_chain(entries[3:], anchor_seq=3, anchor_hash=entries[2].hash).ok
    assert not verify_chain(entries[3:], anchor_seq=3, anchor_hash=entries[1].hash).ok


def test_pseudonym_is_keyed_and_system_scoped() -> None:
    p = patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.3", "110101199001011234")
    assert p.startswith("pp:") and len(p) == 35 and "110101199001011234" not in p
    # The audit format: the first 32 hex digits of HMAC-SHA256(key, system NUL value).
    expected = hmac.new(KEY, b"urn:oid:2.16.156.10011.1.3\x00110101199001011234",
                        hashlib.sha256).hexdigest()[:32]
    assert p == "pp:" + expected
    assert p == patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.3", "110101199001011234")
    assert p != patient_pseudonym(b"j" * 32, "urn:oid:2.16.156.10011.1.3", "110101199001011234")
    assert p != patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.13", "110101199001011234")
    with pytest.raises(ValueError):
        patient_pseudonym(b"short", "urn:oid:2.16.156.10011.1.3", "x")


def test_a_pseudonymizer_gives_what_patient_pseudonym_gives_beyond_its_memory() -> None:
    """The keyed function a controller uses (which remembers recent identifiers) names
    every identifier as patient_pseudonym does, also once it has forgotten one, and
    refuses what patient_pseudonym refuses."""
    of = pseudonymizer(KEY)
    systems = ["urn:oid:2.16.156.10011.1.3", "urn:oid:2.16.156.10011.1.13"]
    asked = [(systems[i % 2], f"{110101199001010000 + i}") for i in range(PSEUDONYM_MEMO * 2 + 7)]
    for system, value in asked + asked[:20] + asked[-20:]:
        assert of(system, value) == patient_pseudonym(KEY, system, value)
    assert of(*asked[0]) != pseudonymizer(b"j" * 32)(*asked[0])
    with pytest.raises(ValueError):
        pseudonymizer(b"short")
    for system, value in [("", "x"), (systems[0], ""), (None, "x"), (systems[0], None)]:
        with pytest.raises(ValueError):
            of(system, value)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            patient_pseudonym(KEY, system, value)  # type: ignore[arg-type]
    # An identifier too long to be remembered is named all the same, every time.
    long = (systems[0], "9" * (PSEUDONYM_MEMO_TEXT + 1))
    assert of(*long) == of(*long) == patient_pseudonym(KEY, *long)


def test_record_refuses_clear_identifier_and_naive_time() -> None:
    with pytest.raises(ValueError):
        AuditRecord(time=T0, actor="a", action="claim.enqueue", subject="m",
                    patient="110101199001011234")
    with pytest.raises(ValueError):
        AuditRecord(time=datetime(2026, 3, 1), actor="a", action="claim.enqueue", subject="m")
    with pytest.raises(ValueError):
        AuditRecord(time=T0, actor="a", action="claim.enqueue", subject="m",
                    outcome="maybe")  # type: ignore[arg-type]
