"""What is particular to the SQLite ledger: its file settings, threads and crashes.

The behaviour both stores share is in tests/test_ledger_contract.py, which runs
against SQLite and PostgreSQL alike.
"""

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

from bridge.errors import StoreError
from bridge.ledger.audit import AuditRecord, patient_pseudonym
from bridge.ledger.sqlite import SQLiteStore

T0 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
KEY = b"pseudonym-key-for-tests-32-bytes"
PATIENT = patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.3", "110101199001011234")


def rec(action: str, subject: str, t: datetime = T0, **kw: object) -> AuditRecord:
    return AuditRecord(
        time=t,
        actor="hospital-a",
        action=action,
        subject=subject,
        partner="insurer-b",
        patient=PATIENT,
        categories=["health-payment"],
        **kw,
    )  # type: ignore[arg-type]


def digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def enqueue(
    store: SQLiteStore, mid: str, payload: bytes = b"{}", link: str = "a-to-b", t: datetime = T0
) -> None:
    store.enqueue(
        message_id=mid,
        link=link,
        partner="insurer-b",
        payload=payload,
        digest=digest(payload),
        audit=rec("claim.enqueue", mid, t),
        now=t,
    )


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
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 9 and proc.stdout.strip() == "committed", proc.stderr
    with SQLiteStore(path) as s:
        rows = s.list_outbox("a-to-b")
        assert [(r.message_id, r.payload) for r in rows] == [
            (f"m{i}", b"p%d" % i) for i in range(1, 6)
        ]
        # The uncommitted acknowledgement vanished; the claimed rows come back after the lease.
        assert s.outbox_counts() == {
            "queued": 3,
            "sending": 2,
            "acked": 0,
            "rejected": 0,
            "dead": 0,
            "refused": 0,
        }
        t = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=1)
        recovered = s.claim_due("a-to-b", now=t)
        assert [r.message_id for r in recovered] == [f"m{i}" for i in range(1, 6)]
        report = s.verify_audit()
        assert report.ok and report.count == 5


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_rows_answered_by_writes_are_the_rows_read_back(tmp_path: Path, sealed: bool) -> None:
    """Enqueue and every state change answer with the row they wrote, made from what
    they wrote rather than read again: it must be exactly what a read finds, through
    every transition, with an encrypting sealer as without."""
    from bridge.ledger.seal import AESGCMSealer

    sealer = AESGCMSealer(bytes(range(32))) if sealed else None
    with SQLiteStore(tmp_path / "ledger.db", sealer=sealer) as s:
        if sealer is not None:
            with s.transaction("load data keys") as tx:
                sealer.load(tx)
        later = T0 + timedelta(minutes=5, microseconds=123_457)

        def same(answer: object, mid: str) -> None:
            assert answer == s.get_outbox(mid)

        for mid in ("m1", "m2", "m3", "m4", "m5"):
            same(s.enqueue(message_id=mid, link="a-to-b", partner="insurer-b",
                           payload=b'{"x":"\xc3\xa9"}', digest=digest(mid.encode()),
                           audit=rec("claim.enqueue", mid), now=T0), mid)
        # The same enqueue again answers with the row that stands.
        same(s.enqueue(message_id="m1", link="a-to-b", partner="insurer-b", payload=b"{}",
                       digest=digest(b"m1"), audit=rec("claim.enqueue", "m1"), now=later), "m1")
        assert len(s.claim_due("a-to-b", now=T0)) == 5
        same(s.mark_acked("m1", receipt=b'{"r":1}', now=later, audit=rec("claim.ack", "m1")), "m1")
        same(s.mark_retry("m2", next_attempt=later + timedelta(seconds=7), error="http-503",
                          now=later, audit=None, fate_unknown=True, answer="HTTP 503"), "m2")
        same(s.mark_rejected("m3", error="invalid", receipt=None, now=later,
                             audit=rec("claim.rejected", "m3")), "m3")
        same(s.mark_dead("m4", error="gave-up:x", answer="no answer: timeout", now=later,
                         audit=rec("claim.dead", "m4")), "m4")
        same(s.mark_refused("m5", error="consent-denied", now=later,
                            audit=rec("claim.refused", "m5")), "m5")
        same(s.requeue("m4", now=later + timedelta(hours=1), audit=rec("claim.requeue", "m4")),
             "m4")
        same(s.mark_refused("m2", error="consent-denied", now=later,
                             audit=rec("claim.refused", "m2")), "m2")
        assert len(s.claim_due("a-to-b", now=later + timedelta(hours=1))) == 1
        many = s.mark_acked_many([
            {"message_id": "m4", "receipt": b'{"r":4}', "now": later,
             "audit": rec("claim.ack", "m4")},
            {"message_id": "m1", "receipt": b'{"r":5}', "now": later,
             "audit": rec("claim.ack", "m1")},
        ])
        same(many[0], "m4")
        assert not isinstance(many[0], Exception) and isinstance(many[1], Exception)
        rows = s.enqueue_many([
            {"message_id": m, "link": "a-to-b", "partner": "insurer-b", "payload": b"[1]",
             "digest": digest(b"[1]"), "audit": rec("claim.enqueue", m), "now": later}
            for m in ("m6", "m7")
        ])
        same(rows[0], "m6")
        same(rows[1], "m7")
