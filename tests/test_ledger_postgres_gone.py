"""PostgreSQL: the leases of a process that is gone end early; a live one keeps its own.

Each store holds a session advisory lock named after its worker for as long as its
connection is open; the server drops it when the session ends. A claim round that
finds rows ``sending`` under a running lease whose worker holds no lock, at two looks
``GONE_AFTER_SECONDS`` apart, ends those leases, so the claims and hand-offs go again
at once instead of when the lease runs out. Here each store stands for a process (a
closed store's session is gone as a killed process's is); the end-to-end kill is in
tests/test_e2e_crash_resume_postgres.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pg_support import PGSchema, fresh_schema
from test_handoff_ledger import accept

from bridge.ledger import handoff as q
from bridge.ledger import postgres
from bridge.ledger.audit import AuditRecord
from bridge.ledger.postgres import PostgresStore

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
LEASE = timedelta(minutes=2)
LINK = "claims-out"
GONE_AFTER = 0.3


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture(autouse=True)
def quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "GONE_CHECK_SECONDS", 0.0)
    monkeypatch.setattr(postgres, "GONE_AFTER_SECONDS", GONE_AFTER)


def _enqueue(store: PostgresStore, n: int) -> str:
    mid = f"urn:uuid:00000000-0000-0000-0000-{n:012d}"
    store.enqueue(message_id=mid, link=LINK, partner="insurer-b", payload=b'{"n":%d}' % n,
                  digest=f"sha256:{n}", now=NOW,
                  audit=AuditRecord(time=NOW, actor="hospital-a", action="message.enqueue",
                                    subject=mid))
    return mid


def _claim(store: PostgresStore, at: datetime = NOW) -> list[str]:
    return [row.message_id for row in store.claim_due(LINK, now=at, lease=LEASE)]


def _looks(store: PostgresStore, times: int = 2) -> list[str]:
    """Claim rounds ``GONE_AFTER`` apart and more: what the last one took."""
    taken: list[str] = []
    for i in range(times):
        if i:
            time.sleep(GONE_AFTER + 0.1)
        taken = _claim(store, NOW + timedelta(seconds=1))
    return taken


def _outbox(pg: PGSchema) -> dict[str, tuple[str, int, str | None]]:
    with pg.connect() as conn:
        return {m: (s, f, c) for m, s, f, c in conn.execute(
            "SELECT message_id, state, fate_unknown, claimed_by FROM outbox")}


def test_claims_of_a_process_that_is_gone_are_taken_up_with_their_fate_unknown(
    pg_schema: PGSchema,
) -> None:
    sender = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    other = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    try:
        ids = [_enqueue(sender, n) for n in range(1, 4)]
        assert _claim(sender) == ids
        # While its sender lives, its leases stand, however often the other looks.
        assert _looks(other, times=3) == []
        sender.close()  # its session ends, as a killed process's does
        taken = _looks(other)
        assert taken == ids
        rows = _outbox(pg_schema)
        assert {rows[m] for m in ids} == {("sending", 1, other.worker_id)}
    finally:
        other.close()


def test_one_look_is_not_enough_a_process_may_be_connecting_again(pg_schema: PGSchema) -> None:
    sender = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    other = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    try:
        ids = [_enqueue(sender, n) for n in range(1, 3)]
        assert _claim(sender) == ids
        # The server ends the sender's session (a restart drops every one): its lock is
        # gone until it connects again.
        with pg_schema.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name=%s",
                          (f"ws-fhir-bridge {sender.worker_id}"[:63],))
        assert _claim(other, NOW + timedelta(seconds=1)) == []  # missing, once
        # The sender connects again on its next call (which fails on the dead session
        # first) and takes its lock again before the other looks a second time.
        for _ in range(2):
            try:
                sender.applied_migrations()
                break
            except Exception:  # noqa: BLE001,S112 - the broken session's own error
                continue
        time.sleep(GONE_AFTER + 0.1)
        assert _claim(other, NOW + timedelta(seconds=1)) == []
        assert {s for s, _, _ in _outbox(pg_schema).values()} == {"sending"}
    finally:
        sender.close()
        other.close()


def test_hand_offs_of_a_process_that_is_gone_go_again(pg_schema: PGSchema) -> None:
    worker = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    other = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    try:
        mid = accept(worker, "hospital-a", 1, now=NOW)
        [[held]] = q.claim(worker, "claims-http", now=NOW, limit=10, lease=LEASE)
        assert held.row.message_id == mid
        with pg_schema.connect() as conn:
            assert conn.execute("SELECT claimed_by FROM handoff WHERE destination=%s",
                                ("claims-http",)).fetchone() == (
                worker.worker_id,)
        at = NOW + timedelta(seconds=1)
        assert q.claim(other, "claims-http", now=at, limit=10, lease=LEASE) == []
        worker.close()
        assert q.claim(other, "claims-http", now=at, limit=10, lease=LEASE) == []
        time.sleep(GONE_AFTER + 0.1)
        [[again]] = q.claim(other, "claims-http", now=at, limit=10, lease=LEASE)
        assert again.row.message_id == mid and again.row.attempts == 2
        # The worker that is gone could not settle it any more: its lease is not the
        # one the row is held under now.
        assert q.mark_delivered(other, [held.row], now=at, audits=[AuditRecord(
            time=at, actor="insurer-b", action="handoff.delivered", subject=mid)]) == 0
    finally:
        other.close()


def test_a_live_process_keeps_its_leases_with_several_stores_open(pg_schema: PGSchema) -> None:
    # Three processes: two claim, one only looks; none is gone.
    one = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    two = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    looker = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    try:
        first = [_enqueue(one, n) for n in range(1, 3)]
        assert _claim(one) == first
        second = [_enqueue(two, n) for n in range(3, 5)]
        assert _claim(two) == second
        assert _looks(looker, times=3) == []
        assert {c for _, _, c in _outbox(pg_schema).values()} == {one.worker_id, two.worker_id}
    finally:
        for store in (one, two, looker):
            store.close()
