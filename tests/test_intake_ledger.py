"""Intake tables on both stores: accept once, file parts with their visit, route by version.

Every test runs on SQLite and on the real PostgreSQL server. Messages are read by the
HL7 v2 room as the listener reads them; the store functions are called as the
listener and the router call them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from hl7_feeds import Charge, InpatientVisit, standard_charges
from pg_support import PGSchema, fresh_schema

from bridge.errors import ConflictError, MappingError
from bridge.ledger import Store
from bridge.ledger import intake as intake_db
from bridge.ledger.audit import AuditRecord
from bridge.ledger.postgres import PostgresStore
from bridge.ledger.sqlite import SQLiteStore
from bridge.mapping.hl7v2 import HL7Reader

NOW = datetime(2026, 3, 9, 2, 0, tzinfo=UTC)
READER = HL7Reader()


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "intake.db")
    schema: PGSchema = request.getfixturevalue("pg_schema")
    return PostgresStore(schema.dsn, schema=schema.schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = _open(request.param, tmp_path, request)
    try:
        yield s
    finally:
        s.close()


def _audit(action: str, subject: str) -> AuditRecord:
    return AuditRecord(time=NOW, actor="hospital-a", action=action, subject=subject)


def accept(store: Store, message: bytes, *, digest: str | None = None,
           correction_days: int = 30) -> intake_db.Accepted:
    sender = "HIS|HOSP"
    taken = READER.intake(message, sender=sender)  # as the listener reads it
    control = taken.message.control_id  # type: ignore[union-attr]
    filing = (intake_db.Filing(taken.visit, taken.part, correction_days)
              if taken.visit is not None and taken.part is not None else None)
    own = None
    if taken.record is not None and taken.dataset:
        own = intake_db.OwnRecord(taken.message_type, taken.dataset, taken.facility,
                                  orjson.dumps(taken.record), "unrouted")
    return intake_db.accept(
        store, sender=sender, control_id=control, digest=digest or str(hash(message)),
        message=message, record=orjson.dumps(taken.record) if taken.record else None,
        warnings=taken.warnings, audit=_audit("hl7.receive", control),
        duplicate_audit=_audit("hl7.duplicate", control),
        make_ack=lambda entry, warnings: f"ACK {control} {entry.seq}".encode(),
        filing=filing, own=own, now=NOW)


def actions(store: Store) -> list[str]:
    return [e.record.action for e in store.audit_entries()]


def test_accept_once_then_the_original_ack_and_an_audit_entry_per_answer(store: Store) -> None:
    visit = InpatientVisit()
    first = accept(store, visit.a01(), digest="d1")
    again = accept(store, visit.a01(), digest="d1")
    assert first.created and not again.created and again.ack == first.ack
    assert actions(store) == ["hl7.receive", "hl7.duplicate"]
    with pytest.raises(ConflictError):
        accept(store, visit.a01(), digest="other")
    assert actions(store) == ["hl7.receive", "hl7.duplicate"]
    assert store.verify_audit().ok


def test_a_visit_becomes_pending_only_when_complete(store: Store) -> None:
    visit = InpatientVisit()
    assert not accept(store, visit.a01()).route
    assert not accept(store, visit.dft("D1", standard_charges())).route
    [held] = [r for r in intake_db.list_records(store) if r.kind == "visit"]
    assert held.state == "held" and held.version == 0
    assert accept(store, visit.a03()).route
    [pending] = intake_db.claim_pending(store, now=NOW)
    assert pending.source == held.source and pending.version == 1
    parts = intake_db.visit_parts(store, int(pending.source[6:]))
    assert sorted(p.message_type for p in parts) == ["ADT^A01", "ADT^A03", "DFT^P03"]
    [v] = intake_db.list_visits(store)
    assert v.completed and v.parts == 3 and v.summary.number == visit.visit


def test_a_refused_part_leaves_nothing_behind(store: Store) -> None:
    visit = InpatientVisit()
    accept(store, visit.a03())
    head = store.audit_head()
    with pytest.raises(MappingError) as info:
        accept(store, visit.dft("LATE", [Charge("01", "1.00")], ts="20260501080000"))
    assert info.value.location == "MSH[1]-7"
    assert store.audit_head() == head
    assert intake_db.lookup(store, "HIS|HOSP", "LATE") is None
    [v] = intake_db.list_visits(store)
    assert v.parts == 1


def test_a_pass_finishes_only_at_the_version_it_took(store: Store) -> None:
    visit = InpatientVisit()
    for message in (visit.a01(), visit.dft("D1", standard_charges()), visit.a03()):
        accept(store, message)
    [row] = intake_db.claim_pending(store, now=NOW)
    assert intake_db.claim_pending(store, now=NOW) == []  # leased
    accept(store, visit.dft("D2", [Charge("13", "-10.00", kind="CD")], ts="20260310080000"))
    assert not intake_db.finish(store, row, state="routed", detail=None, record=b"{}", now=NOW)
    [again] = intake_db.claim_pending(store, now=NOW)
    assert again.version == row.version + 1
    assert intake_db.finish(store, again, state="routed", detail=None, record=b"{}", now=NOW)
    assert intake_db.claim_pending(store, now=NOW + timedelta(minutes=5)) == []
    assert intake_db.record_counts(store) == {"routed": 1, "unrouted": 2}


def test_deliveries_are_revisions_per_link(store: Store) -> None:
    visit = InpatientVisit()
    accept(store, visit.a03())
    [row] = intake_db.claim_pending(store, now=NOW)
    assert intake_db.add_delivery(store, record_id=row.id, link="l", message_id="m1",
                                  digest="a", replaces=None, state="queued", detail=None,
                                  now=NOW) == 1
    assert intake_db.add_delivery(store, record_id=row.id, link="l", message_id="",
                                  digest="b", replaces="m1", state="refused", detail="x",
                                  now=NOW) == 2
    latest = intake_db.latest_sent(store, row.id, "l")
    assert latest is not None and latest.message_id == "m1"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_messages_of_one_visit_filed_concurrently_make_one_visit(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    visit = InpatientVisit()
    messages = [visit.a01()] + [
        visit.dft(f"C{i}", [Charge("01", "10.00")], ts=f"202603051{i:03d}") for i in range(12)
    ] + [visit.a03()]
    errors: list[BaseException] = []
    stores = [_open(kind, tmp_path, request) for _ in range(3 if kind == "postgresql" else 1)]

    def worker(index: int) -> None:
        try:
            for message in messages[index::3]:
                accept(stores[index % len(stores)], message)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        [v] = intake_db.list_visits(stores[0])
        assert v.parts == len(messages) and v.completed
        parts = intake_db.visit_parts(stores[0], v.id)
        assert len({p.control_id for p in parts}) == len(messages)
        assert stores[0].verify_audit().ok
    finally:
        for s in stores:
            s.close()



def test_visits_and_parts_survive_reopening(tmp_path: Path) -> None:
    visit = InpatientVisit()
    with SQLiteStore(tmp_path / "r.db") as first:
        accept(first, visit.a01())
        accept(first, visit.dft("D1", standard_charges()))
    with SQLiteStore(tmp_path / "r.db") as again:
        accept(again, visit.a03())
        [row] = intake_db.claim_pending(again, now=NOW)
        assert len(intake_db.visit_parts(again, int(row.source[6:]))) == 3


def test_a_visit_filed_without_transactions_is_taken_over_at_its_next_part(
        store: Store) -> None:
    visit = InpatientVisit()
    accept(store, visit.a01())
    accept(store, visit.dft("D1", standard_charges()))
    # As a version that kept no transaction ids filed them: every FT1 in the part's fees.
    with store.transaction("legacy") as tx:
        [(visit_id, control_id, sealed)] = tx.all(
            "SELECT visit_id, control_id, part FROM visit_part WHERE message_type=?",
            ("DFT^P03",))
        part = orjson.loads(tx.unseal(sealed, context="visit_part.part") or b"")
        fees: dict[str, Decimal] = {}
        for charge in part.pop("charges"):
            for element in charge["rows"]:
                fees[element] = fees.get(element, Decimal(0)) + Decimal(charge["amount"])
        part["fees"] = {e: format(v, ".2f") for e, v in fees.items()}
        tx.execute("UPDATE visit_part SET part=? WHERE control_id=?",
                   (tx.seal(orjson.dumps(part), context="visit_part.part"), control_id))
        [(sealed,)] = tx.all("SELECT summary FROM visit")
        summary = orjson.loads(tx.unseal(sealed, context="visit.summary") or b"")
        del summary["charges"]
        tx.execute("UPDATE visit SET summary=?",
                   (tx.seal(orjson.dumps(summary), context="visit.summary"),))
    accept(store, visit.dft("D1R", standard_charges(), transactions="D1"))
    [row] = intake_db.list_visits(store)
    assert len(row.summary.charges) == 8
    parts = {p.control_id: p for p in intake_db.visit_parts(store, int(visit_id))}
    assert parts["D1"].charges == parts["D1R"].charges and len(parts["D1"].charges) == 8
