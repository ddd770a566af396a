"""Schema migrations and the dialect-neutral transaction API, on both stores.

A store made by an older bridge is brought up to date when it opens; one made by a
newer bridge is refused with the step named; SQL written once through ``Tx`` runs the
same on SQLite and PostgreSQL, commits with its audit entry or not at all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pg_support import PGSchema, fresh_schema

from bridge.errors import StoreError
from bridge.ledger import Store
from bridge.ledger.audit import AuditRecord, format_time
from bridge.ledger.migrations import MIGRATIONS, Migration, check_names
from bridge.ledger.postgres import PostgresStore
from bridge.ledger.sqlite import SQLiteStore

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "m.db")
    else:
        schema: PGSchema = request.getfixturevalue("pg_schema")
        s = PostgresStore(schema.dsn, schema=schema.schema)
    try:
        yield s
    finally:
        s.close()


def _audit(subject: str) -> AuditRecord:
    return AuditRecord(time=NOW, actor="hospital-a", action="test.put", subject=subject)


def test_a_new_store_records_every_migration(store: Store) -> None:
    assert store.applied_migrations() == [m.name for m in MIGRATIONS]


def test_sql_written_once_commits_with_its_audit_entry(store: Store) -> None:
    with store.transaction("make") as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS scratch (k TEXT PRIMARY KEY, v "
                   + ("BYTEA" if tx.dialect == "postgresql" else "BLOB") + ", t TEXT)")
    with store.transaction("put") as tx:
        entry = tx.append_audit(_audit("scratch:a"))
        tx.execute("INSERT INTO scratch (k, v, t) VALUES (?,?,?)"
                   " ON CONFLICT (k) DO UPDATE SET v=excluded.v",
                   ("a", tx.seal(b"payload", context="scratch.v"), format_time(NOW)))
    with store.read("get") as tx:
        row = tx.one("SELECT v, t FROM scratch WHERE k=?", ("a",))
        assert tx.unseal(row[0], context="scratch.v") == b"payload"
        assert row[1] == format_time(NOW)
    assert store.audit_head()[0] == entry.seq


def test_a_failed_transaction_leaves_neither_row_nor_audit_entry(store: Store) -> None:
    with store.transaction("make") as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS scratch2 (k TEXT PRIMARY KEY)")
    head = store.audit_head()
    with pytest.raises(RuntimeError), store.transaction("put") as tx:
        tx.append_audit(_audit("scratch2:a"))
        tx.execute("INSERT INTO scratch2 (k) VALUES (?)", ("a",))
        raise RuntimeError("caller failed after writing")
    assert store.audit_head() == head
    with store.read("count") as tx:
        assert tx.one("SELECT COUNT(*) FROM scratch2")[0] == 0


def test_engine_errors_name_the_operation_not_the_values(store: Store) -> None:
    with pytest.raises(StoreError) as info, store.transaction("bad-step") as tx:
        tx.execute("INSERT INTO no_such_table (k) VALUES (?)", ("secret-value",))
    assert "bad-step" in str(info.value)
    assert "secret-value" not in str(info.value)


def test_a_store_from_a_newer_bridge_is_refused_naming_the_step(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    SQLiteStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO schema_migrations (name, applied) VALUES ('9999-future', 'x')")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError) as info:
        SQLiteStore(path)
    assert "9999-future" in str(info.value)


def test_a_newer_postgres_schema_is_refused_too(pg_schema: PGSchema) -> None:
    PostgresStore(pg_schema.dsn, schema=pg_schema.schema).close()
    with pg_schema.connect() as conn:
        conn.execute("INSERT INTO schema_migrations (name, applied) VALUES ('9999-future', 'x')")
    with pytest.raises(StoreError) as info:
        PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    assert "9999-future" in str(info.value)


def test_an_older_store_gains_a_later_migration_once(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    extra = Migration(name="9998-extra", ddl="CREATE TABLE extra (id {autoid}, body {blob})")
    monkeypatch.setattr("bridge.ledger.sqlite.MIGRATIONS", (*MIGRATIONS, extra))
    with SQLiteStore(path) as store:
        assert store.applied_migrations()[-1] == "9998-extra"
    with SQLiteStore(path) as store:  # a second open applies nothing again
        assert store.applied_migrations().count("9998-extra") == 1


def test_migration_names_must_be_unique_and_ordered() -> None:
    check_names()
    with pytest.raises(ValueError):
        check_names((Migration("0002-b"), Migration("0001-a")))
    with pytest.raises(ValueError):
        check_names((Migration("0001-a"), Migration("0001-a")))


def test_an_outbox_written_before_its_payloads_were_kept_apart_keeps_every_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store queued by a bridge whose outbox rows held their payloads: after the step
    that keeps payloads apart, every message reads back whole, in its state, with its
    receipt; the outbox row holds no payload; the next message follows on."""
    path = tmp_path / "older.db"
    before = tuple(m for m in MIGRATIONS if m.name < "1503-outbox-payload-apart")
    monkeypatch.setattr("bridge.ledger.sqlite.MIGRATIONS", before)
    payloads = {f"m-{i}": bytes([i]) * (30_000 + i) for i in range(3)}
    SQLiteStore(path).close()
    t = format_time(NOW)
    raw = sqlite3.connect(path)
    assert "payload" in [c[1] for c in raw.execute("PRAGMA table_info(outbox)")]
    for seq, (mid, payload) in enumerate(payloads.items(), start=1):
        # As the older bridge wrote a row: the payload in it.
        raw.execute(
            "INSERT INTO outbox (message_id, link, seq, partner, payload, digest, state,"
            " attempts, next_attempt, lease_until, last_error, receipt, created, updated)"
            " VALUES (?, 'a-to-b', ?, 'insurer-b', ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?)",
            (mid, seq, payload, f"sha256:{mid}", "acked" if seq == 1 else "queued",
             int(seq == 1), t, b"signed receipt" if seq == 1 else None, t, t))
    raw.commit()
    raw.close()
    monkeypatch.setattr("bridge.ledger.sqlite.MIGRATIONS", MIGRATIONS)
    with SQLiteStore(path) as store:
        assert store.applied_migrations()[-1] >= "1503-outbox-payload-apart"
        # The copy went through the journal; its space is given back once moved.
        assert path.with_name(path.name + "-wal").stat().st_size == 0
        rows = {r.message_id: r for r in store.list_outbox("a-to-b")}
        assert {m: r.payload for m, r in rows.items()} == payloads
        assert [(r.seq, r.state.value) for r in rows.values()] == [
            (1, "acked"), (2, "queued"), (3, "queued")]
        assert rows["m-0"].receipt == b"signed receipt"
        store.enqueue(message_id="m-3", link="a-to-b", partner="insurer-b", payload=b"{}",
                      digest="sha256:m-3", audit=_audit("m-3"), now=NOW)
        assert [r.seq for r in store.list_outbox("a-to-b")] == [1, 2, 3, 4]
        assert store.get_outbox("m-3").payload == b"{}"
    raw = sqlite3.connect(path)
    assert "payload" not in [c[1] for c in raw.execute("PRAGMA table_info(outbox)")]
    assert raw.execute("SELECT count(*) FROM outbox_payload").fetchone() == (4,)
    raw.close()


def test_a_store_whose_record_of_the_payload_step_was_lost_opens_with_its_messages(
        tmp_path: Path) -> None:
    path = tmp_path / "lost.db"
    with SQLiteStore(path) as store:
        store.enqueue(message_id="m-1", link="a-to-b", partner="insurer-b", payload=b"[1]",
                      digest="sha256:m-1", audit=_audit("m-1"), now=NOW)
    raw = sqlite3.connect(path)
    raw.execute("DELETE FROM schema_migrations WHERE name = '1503-outbox-payload-apart'")
    raw.commit()
    raw.close()
    with SQLiteStore(path) as store:  # the payload column is gone already: nothing to do
        assert "1503-outbox-payload-apart" in store.applied_migrations()
        assert store.get_outbox("m-1").payload == b"[1]"


def test_an_outbox_row_whose_payload_row_was_removed_is_reported_not_hidden(
        tmp_path: Path) -> None:
    """Damage from outside the bridge (a payload row deleted by hand) is named where it
    is, and fails only what touches that message."""
    path = tmp_path / "damaged.db"
    with SQLiteStore(path) as store:
        for mid in ("m-1", "m-2"):
            store.enqueue(message_id=mid, link="a-to-b", partner="insurer-b", payload=b"[1]",
                          digest=f"sha256:{mid}", audit=_audit(mid), now=NOW)
    raw = sqlite3.connect(path)
    raw.execute("DELETE FROM outbox_payload WHERE message_id = 'm-1'")
    raw.commit()
    raw.close()
    with SQLiteStore(path) as store:
        with pytest.raises(StoreError) as info:
            store.get_outbox("m-1")
        assert info.value.location == "outbox[m-1].payload"
        with pytest.raises(StoreError):
            store.list_outbox("a-to-b")
        with pytest.raises(StoreError):  # nothing is taken for sending around it silently
            store.claim_due("a-to-b", now=NOW, limit=10)
        assert store.outbox_counts("a-to-b")["queued"] == 2
        again = store.enqueue_many([
            {"message_id": "m-1", "link": "a-to-b", "partner": "insurer-b", "payload": b"[1]",
             "digest": "sha256:m-1", "audit": _audit("m-1"), "now": NOW},
            {"message_id": "m-3", "link": "a-to-b", "partner": "insurer-b", "payload": b"[3]",
             "digest": "sha256:m-3", "audit": _audit("m-3"), "now": NOW},
        ])
        assert isinstance(again[0], StoreError)
        assert not isinstance(again[1], Exception)
        assert store.get_outbox("m-3").payload == b"[3]"
