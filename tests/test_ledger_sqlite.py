"""The SQLite ledger against real database files."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.errors import ConflictError, StoreError
from bridge.ledger.audit import AuditEntry, AuditRecord, patient_pseudonym
from bridge.ledger.errors import TransitionError, UnknownMessage
from bridge.ledger.sqlite import SQLiteStore
from bridge.ledger.states import OutboxState

T0 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
KEY = b"pseudonym-key-for-tests-32-bytes"
PATIENT = patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.3", "110101199001011234")


def rec(action: str, subject: str, t: datetime = T0, **kw: object) -> AuditRecord:
    return AuditRecord(time=t, actor="hospital-a", action=action, subject=subject,
                       partner="insurer-b", patient=PATIENT, categories=["health-payment"],
                       **kw)  # type: ignore[arg-type]


def digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def enqueue(store: SQLiteStore, mid: str, payload: bytes = b"{}", link: str = "a-to-b",
            t: datetime = T0) -> None:
    store.enqueue(message_id=mid, link=link, partner="insurer-b", payload=payload,
                  digest=digest(payload), audit=rec("claim.enqueue", mid, t), now=t)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "ledger.db") as s:
        yield s


def test_file_is_wal_with_full_sync_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with SQLiteStore(path) as s:
        conn = s._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    raw.execute("UPDATE schema_version SET version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError):
        SQLiteStore(path)


def test_full_lifecycle(store: SQLiteStore) -> None:
    payload = b'{"resourceType":"Bundle"}'
    row = store.enqueue(message_id="m1", link="a-to-b", partner="insurer-b", payload=payload,
                        digest=digest(payload), audit=rec("claim.enqueue", "m1"), now=T0)
    assert (row.seq, row.state, row.attempts, row.next_attempt) == (1, OutboxState.QUEUED, 0, T0)
    assert row.payload == payload

    [claimed] = store.claim_due("a-to-b", now=T0)
    assert claimed.state == "sending" and claimed.attempts == 1
    assert claimed.lease_until == T0 + timedelta(seconds=30)

    retry_at = T0 + timedelta(seconds=2)
    row = store.mark_retry("m1", next_attempt=retry_at, error="transport-error", now=T0,
                           audit=None)
    assert row.state == "queued" and row.last_error == "transport-error"
    assert store.claim_due("a-to-b", now=T0 + timedelta(seconds=1)) == []

    [claimed] = store.claim_due("a-to-b", now=retry_at)
    assert claimed.attempts == 2
    row = store.mark_acked("m1", receipt=b"signed-receipt", now=retry_at,
                           audit=rec("claim.ack", "m1", retry_at))
    assert row.state == "acked" and row.receipt == b"signed-receipt" and row.lease_until is None
    assert store.get_outbox("m1") == row
    assert store.outbox_counts("a-to-b")["acked"] == 1
    assert store.highest_contiguous_acked("a-to-b") == 1

    actions = [e.record.action for e in store.audit_entries()]
    assert actions == ["claim.enqueue", "claim.ack"]
    assert store.verify_audit().ok
    assert [e.record.action for e in store.audit_by_patient(PATIENT)] == actions


def test_reject_dead_refuse_and_requeue(store: SQLiteStore) -> None:
    for m in ("r", "d", "f", "q"):
        enqueue(store, m)
    store.claim_due("a-to-b", now=T0, limit=3)
    store.mark_rejected("r", error="fhir-invalid", receipt=b"nack", now=T0,
                        audit=rec("claim.send", "r", outcome="failure", detail="fhir-invalid"))
    store.mark_dead("d", error="transport-error", now=T0, audit=rec("claim.send", "d",
                                                                    outcome="failure"))
    store.mark_refused("f", error="consent-denied", now=T0,
                       audit=rec("claim.refused", "f", outcome="denied"))
    # Revocation also stops a message that is still only queued.
    store.mark_refused("q", error="consent-denied", now=T0,
                       audit=rec("claim.refused", "q", outcome="denied"))
    assert store.outbox_counts() == {"queued": 0, "sending": 0, "acked": 0, "rejected": 1,
                                     "dead": 1, "refused": 2}
    # Nothing in a final state is ever claimed again.
    assert store.claim_due("a-to-b", now=T0 + timedelta(days=1)) == []

    later = T0 + timedelta(hours=1)
    for m in ("r", "d"):
        row = store.requeue(m, now=later, audit=rec("claim.requeue", m, later))
        assert row.state == "queued" and row.attempts == 0 and row.next_attempt == later
    with pytest.raises(TransitionError):
        store.requeue("f", now=later, audit=rec("claim.requeue", "f", later))
    assert [r.message_id for r in store.claim_due("a-to-b", now=later)] == ["r", "d"]
    assert [r.seq for r in store.list_outbox("a-to-b", state="refused")] == [3, 4]


def test_illegal_transitions_raise_and_write_nothing(store: SQLiteStore) -> None:
    enqueue(store, "m1")
    head = store.audit_head()
    with pytest.raises(TransitionError):
        store.mark_acked("m1", receipt=b"r", now=T0, audit=rec("claim.ack", "m1"))
    with pytest.raises(TransitionError):
        store.mark_retry("m1", next_attempt=T0, error="x", now=T0, audit=rec("claim.send", "m1"))
    with pytest.raises(TransitionError):
        store.requeue("m1", now=T0, audit=rec("claim.requeue", "m1"))
    store.claim_due("a-to-b", now=T0)
    store.mark_acked("m1", receipt=b"r", now=T0, audit=rec("claim.ack", "m1"))
    head = store.audit_head()
    with pytest.raises(TransitionError):
        store.mark_dead("m1", error="x", now=T0, audit=rec("claim.send", "m1"))
    with pytest.raises(TransitionError):
        store.mark_refused("m1", error="x", now=T0, audit=rec("claim.refused", "m1"))
    assert store.audit_head() == head
    assert store.get_outbox("m1").state == "acked"  # type: ignore[union-attr]
    with pytest.raises(UnknownMessage):
        store.mark_acked("nope", receipt=b"r", now=T0, audit=rec("claim.ack", "nope"))


def test_enqueue_is_idempotent_and_detects_conflict(store: SQLiteStore) -> None:
    enqueue(store, "m1", b"one")
    again = store.enqueue(message_id="m1", link="a-to-b", partner="insurer-b", payload=b"one",
                          digest=digest(b"one"), audit=rec("claim.enqueue", "m1"), now=T0)
    assert again.seq == 1 and len(store.audit_entries()) == 1
    with pytest.raises(ConflictError):
        enqueue(store, "m1", b"two")
    with pytest.raises(ConflictError):
        enqueue(store, "m1", b"one", link="a-to-c")
    assert store.get_outbox("m1").payload == b"one"  # type: ignore[union-attr]
    assert len(store.audit_entries()) == 1 and store.outbox_counts()["queued"] == 1


def test_highest_contiguous_acked_stops_at_first_gap(store: SQLiteStore) -> None:
    for i in range(1, 5):
        enqueue(store, f"m{i}")
    store.claim_due("a-to-b", now=T0)
    for m in ("m1", "m2", "m4"):
        store.mark_acked(m, receipt=b"r", now=T0, audit=rec("claim.ack", m))
    assert store.highest_contiguous_acked("a-to-b") == 2
    store.mark_acked("m3", receipt=b"r", now=T0, audit=rec("claim.ack", "m3"))
    assert store.highest_contiguous_acked("a-to-b") == 4
    assert store.highest_contiguous_acked("a-to-c") == 0


def test_seq_is_per_link(store: SQLiteStore) -> None:
    for i in range(3):
        enqueue(store, f"b{i}", link="a-to-b")
        enqueue(store, f"c{i}", link="a-to-c")
    assert [r.seq for r in store.list_outbox("a-to-b")] == [1, 2, 3]
    assert [r.message_id for r in store.list_outbox("a-to-c")] == ["c0", "c1", "c2"]


def test_claim_due_order_limit_and_schedule(store: SQLiteStore) -> None:
    for i in range(5):
        enqueue(store, f"m{i}", t=T0 + timedelta(seconds=i))
    assert [r.seq for r in store.claim_due("a-to-b", now=T0 + timedelta(seconds=2))] == [1, 2, 3]
    assert [r.seq for r in store.claim_due("a-to-b", now=T0 + timedelta(seconds=9), limit=1)] == [4]
    assert store.claim_due("a-to-c", now=T0 + timedelta(seconds=9)) == []
    assert store.outbox_counts("a-to-b") == {"queued": 1, "sending": 4, "acked": 0,
                                             "rejected": 0, "dead": 0, "refused": 0}


def test_expired_lease_recovers_crashed_sending_row(store: SQLiteStore) -> None:
    enqueue(store, "m1")
    enqueue(store, "m2")
    store.claim_due("a-to-b", now=T0, lease=timedelta(seconds=30))
    # The worker "crashed": nobody marks the rows. Before the lease ends they stay taken.
    assert store.claim_due("a-to-b", now=T0 + timedelta(seconds=29)) == []
    rows = store.claim_due("a-to-b", now=T0 + timedelta(seconds=30))
    assert [(r.message_id, r.state, r.attempts) for r in rows] == [
        ("m1", "sending", 2), ("m2", "sending", 2)]


def test_inbox_accept_once_and_duplicate_gets_original_receipt(store: SQLiteStore) -> None:
    calls: list[AuditEntry] = []

    def make_receipt(entry: AuditEntry) -> bytes:
        calls.append(entry)
        return f"receipt for audit {entry.seq} {entry.hash}".encode()

    payload = b'{"resourceType":"Bundle","type":"message"}'
    args = dict(sender="hospital-a", message_id="urn:uuid:1", digest=digest(payload),
                payload=payload, make_receipt=make_receipt, now=T0)
    row, fresh = store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"), **args)  # type: ignore[arg-type]
    assert fresh and row.audit_seq == 1 and row.receipt.startswith(b"receipt for audit 1 ")
    assert calls[0].hash.encode() in row.receipt

    dup, fresh2 = store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"), **args)  # type: ignore[arg-type]
    assert not fresh2 and dup == row and len(calls) == 1
    assert len(store.audit_entries()) == 1
    assert store.inbox_lookup("hospital-a", "urn:uuid:1") == row

    # Same id from another sender is another message.
    _, fresh3 = store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"),
                                   **{**args, "sender": "clinic-c"})  # type: ignore[arg-type]
    assert fresh3

    with pytest.raises(ConflictError):
        store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"),
                           **{**args, "digest": digest(b"other")})  # type: ignore[arg-type]
    assert len(store.audit_entries()) == 2 and store.verify_audit().ok


def test_failing_receipt_leaves_nothing_written(store: SQLiteStore) -> None:
    enqueue(store, "before")
    head = store.audit_head()

    def boom(entry: AuditEntry) -> bytes:
        raise RuntimeError("signing key unavailable")

    with pytest.raises(RuntimeError):
        store.inbox_accept(sender="hospital-a", message_id="urn:uuid:9", digest="d",
                           payload=b"x", audit=rec("message.receive", "urn:uuid:9"),
                           make_receipt=boom, now=T0)
    assert store.audit_head() == head
    assert store.inbox_lookup("hospital-a", "urn:uuid:9") is None
    # The store is still usable and the next entry takes the unused seq.
    row, _ = store.inbox_accept(sender="hospital-a", message_id="urn:uuid:9", digest="d",
                                payload=b"x", audit=rec("message.receive", "urn:uuid:9"),
                                make_receipt=lambda e: b"ok", now=T0)
    assert row.audit_seq == head[0] + 1 and store.verify_audit().ok


def test_consents_upsert_and_keep_history(store: SQLiteStore) -> None:
    store.put_consent(consent_id="c1", patient_keys=[PATIENT], status="active",
                      resource=b'{"status":"active"}', now=T0, audit=rec("consent.put", "c1"))
    t1 = T0 + timedelta(days=1)
    store.put_consent(consent_id="c1", patient_keys=[PATIENT], status="inactive",
                      resource=b'{"status":"inactive"}', now=t1, audit=rec("consent.put", "c1", t1))
    assert store.list_consents() == [("c1", "inactive", b'{"status":"inactive"}')]
    current = store.get_consent("c1")
    assert current is not None and current.updated == t1 and current.patient_keys == (PATIENT,)
    assert [c.consent_id for c in store.consents_for_patient(PATIENT)] == ["c1"]
    history = store.consent_history("c1")
    assert [h[0] for h in history] == ["active", "inactive"]
    assert [h[3] for h in history] == [1, 2]
    assert store.get_consent("nope") is None


def test_audit_log_refuses_update_through_sql(store: SQLiteStore, tmp_path: Path) -> None:
    enqueue(store, "m1")
    raw = sqlite3.connect(tmp_path / "ledger.db")
    with pytest.raises(sqlite3.DatabaseError):
        raw.execute("UPDATE audit SET outcome='denied' WHERE seq=1")
    with pytest.raises(sqlite3.DatabaseError):
        raw.execute("DELETE FROM audit WHERE seq=1")
    raw.close()


def _tampered(tmp_path: Path, how: str) -> int | None:
    path = tmp_path / f"{how}.db"
    with SQLiteStore(path) as s:
        for i in range(1, 7):
            enqueue(s, f"m{i}", t=T0 + timedelta(seconds=i))
        assert s.verify_audit().ok
    # Someone with the file drops the guard triggers and rewrites the log.
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute("DROP TRIGGER audit_no_delete")
    k = 4
    if how == "edit":
        raw.execute("UPDATE audit SET outcome='failure' WHERE seq=?", (k,))
    elif how == "delete":
        raw.execute("DELETE FROM audit WHERE seq=?", (k,))
    elif how == "swap":
        raw.execute("UPDATE audit SET seq=-1 WHERE seq=?", (k,))
        raw.execute("UPDATE audit SET seq=? WHERE seq=?", (k, k + 1))
        raw.execute("UPDATE audit SET seq=? WHERE seq=-1", (k + 1,))
    raw.commit()
    raw.close()
    with SQLiteStore(path) as s:
        report = s.verify_audit()
        assert not report.ok and report.count == k - 1
        return report.first_bad_seq


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_tampering_on_disk_names_the_entry(tmp_path: Path, how: str) -> None:
    assert _tampered(tmp_path, how) == 4


def test_store_is_safe_across_threads(store: SQLiteStore) -> None:
    def work(n: int) -> None:
        for i in range(25):
            enqueue(store, f"t{n}-{i}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = store.list_outbox("a-to-b", limit=1000)
    assert sorted(r.seq for r in rows) == list(range(1, 101))
    assert store.verify_audit().count == 100


def test_closed_store_raises(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "x.db")
    s.close()
    s.close()
    with pytest.raises(StoreError):
        s.get_outbox("m")


CHILD = textwrap.dedent("""
    import os, sys
    from datetime import UTC, datetime
    from bridge.ledger.audit import AuditRecord
    from bridge.ledger.sqlite import SQLiteStore
    t = datetime(2026, 3, 1, tzinfo=UTC)
    s = SQLiteStore(sys.argv[1])
    for i in range(1, 6):
        s.enqueue(message_id=f"m{i}", link="a-to-b", partner="insurer-b", payload=b"p%d" % i,
                  digest=f"d{i}", now=t,
                  audit=AuditRecord(time=t, actor="hospital-a", action="claim.enqueue",
                                    subject=f"m{i}"))
    s.claim_due("a-to-b", now=t, limit=2)
    print("committed", flush=True)
    # Die in the middle of a transaction that would have acknowledged m1.
    conn = s._conn
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE outbox SET state='acked' WHERE message_id='m1'")
    os._exit(9)
""")


def test_crash_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 9 and proc.stdout.strip() == "committed", proc.stderr
    with SQLiteStore(path) as s:
        rows = s.list_outbox("a-to-b")
        assert [(r.message_id, r.payload) for r in rows] == [(f"m{i}", b"p%d" % i)
                                                             for i in range(1, 6)]
        # The uncommitted acknowledgement vanished; the claimed rows come back after the lease.
        assert s.outbox_counts() == {"queued": 3, "sending": 2, "acked": 0, "rejected": 0,
                                     "dead": 0, "refused": 0}
        t = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=1)
        recovered = s.claim_due("a-to-b", now=t)
        assert [r.message_id for r in recovered] == [f"m{i}" for i in range(1, 6)]
        report = s.verify_audit()
        assert report.ok and report.count == 5
