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
