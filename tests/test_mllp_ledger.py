"""The HL7 inbox of the SQLite ledger: stored once, original ACK kept, one transaction."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.errors import ConflictError, StoreError
from bridge.ledger.audit import AuditEntry, AuditRecord
from bridge.ledger.sqlite import SQLiteStore

T0 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
MSG = b"MSH|^~\\&|HIS|HOSP-A|BRIDGE|HOSP-A|20260301083000||ADT^A01|M1|P|2.5\rPID|1\r"


def rec() -> AuditRecord:
    return AuditRecord(time=T0, actor="hospital-a", action="hl7.receive", subject="hl7:HIS|HOSP-A/M1")


def accept(store: SQLiteStore, message: bytes = MSG, record: bytes | None = b'{"dataset":"x"}',
           ack: bytes = b"MSH|ACK\rMSA|AA|M1\r") -> tuple[object, bool]:
    def make_ack(entry: AuditEntry) -> bytes:
        return ack + str(entry.seq).encode()

    return store.hl7_accept(sender="HIS|HOSP-A", control_id="M1",
                            digest=hashlib.sha256(message).hexdigest(), message=message,
                            record=record, audit=rec(), make_ack=make_ack, now=T0)


def test_accept_once_then_original_ack(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "l.db") as store:
        row, created = accept(store)
        assert created and row.ack == b"MSH|ACK\rMSA|AA|M1\r1" and row.audit_seq == 1  # type: ignore[attr-defined]
        again, created2 = accept(store, ack=b"something else")
        assert not created2 and again == row
        assert store.hl7_count() == 1 and store.hl7_count("HIS|HOSP-A") == 1
        assert store.hl7_lookup("HIS|HOSP-A", "M1") == row
        assert store.hl7_lookup("HIS|HOSP-B", "M1") is None
        assert [e.record.action for e in store.audit_entries()] == ["hl7.receive"]


def test_same_control_id_other_content_is_a_conflict_and_writes_nothing(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "l.db") as store:
        accept(store)
        with pytest.raises(ConflictError) as info:
            accept(store, message=MSG + b"PV1|1\r")
        assert info.value.location == "MSH-10"
        assert store.hl7_count() == 1 and len(store.audit_entries()) == 1


def test_failing_ack_builder_leaves_nothing(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "l.db") as store:
        def boom(entry: AuditEntry) -> bytes:
            raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            store.hl7_accept(sender="s", control_id="c", digest="d", message=MSG, record=None,
                             audit=rec(), make_ack=boom, now=T0)
        assert store.hl7_count() == 0 and store.audit_entries() == []


def test_record_may_be_null_and_row_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with SQLiteStore(path) as store:
        row, _ = accept(store, record=None)
    with SQLiteStore(path) as store:
        assert store.hl7_lookup("HIS|HOSP-A", "M1") == row
        assert row.record is None and row.message == MSG  # type: ignore[attr-defined]
        assert store.verify_audit().ok


def test_store_made_before_the_hl7_table_gains_it_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with SQLiteStore(path):
        pass
    raw = sqlite3.connect(path)
    # A store written before the HL7 inbox and before migrations were recorded.
    raw.execute("DROP TABLE hl7_inbox")
    raw.execute("DROP TABLE schema_migrations")
    raw.commit()
    raw.close()
    with SQLiteStore(path) as store:
        accept(store)
        assert store.hl7_count() == 1
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    raw.close()


def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "l.db")
    store.close()
    with pytest.raises(StoreError):
        accept(store)
    with pytest.raises(StoreError):
        store.hl7_lookup("a", "b")
