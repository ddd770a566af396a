"""PostgreSQL: the leases of a process that is gone end early; a live one keeps its own.

Each store holds, on a connection of its own, a session advisory lock named after its
worker; the server drops it when the session ends. A thread of every store looks about
once a second for rows ``sending`` under a running lease whose worker holds no lock,
and ends those leases once the worker has been missing at every look for
``GONE_AFTER_SECONDS``: the claims and hand-offs go again at the next claim round
instead of when the lease runs out. A live process whose session the server ends
connects again at once, by itself, and keeps its leases. Here each store stands for a
process (a closed store's session is gone as a killed process's is); the end-to-end
kill is in tests/test_e2e_crash_resume_postgres.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pg_support import PGSchema, fresh_schema
from test_handoff_ledger import accept

from bridge.errors import StoreError
from bridge.ledger import handoff as q
from bridge.ledger import postgres
from bridge.ledger.audit import AuditRecord
from bridge.ledger.postgres import PostgresStore

# The looks compare leases with the time of day: the rows here are queued and claimed
# at the time of day too (never at a time fixed when the module loads: a lease taken
# then may have run out by the time a test runs).
LEASE = timedelta(minutes=2)
LINK = "claims-out"
GONE_AFTER = 1.0


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture(autouse=True)
def quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "GONE_CHECK_SECONDS", 0.05)
    monkeypatch.setattr(postgres, "GONE_AFTER_SECONDS", GONE_AFTER)


def _enqueue(store: PostgresStore, n: int) -> str:
    mid = f"urn:uuid:00000000-0000-0000-0000-{n:012d}"
    store.enqueue(message_id=mid, link=LINK, partner="insurer-b", payload=b'{"n":%d}' % n,
                  digest=f"sha256:{n}", now=(now := datetime.now(UTC)),
                  audit=AuditRecord(time=now, actor="hospital-a", action="message.enqueue",
                                    subject=mid))
    return mid


def _claim(store: PostgresStore) -> list[str]:
    return [row.message_id for row in store.claim_due(LINK, now=datetime.now(UTC),
                                                       lease=LEASE)]


def _claimed_within(store: PostgresStore, seconds: float) -> list[str]:
    """What claim rounds of ``store`` take within ``seconds`` (the first that takes any)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        taken = _claim(store)
        if taken:
            return taken
        time.sleep(0.05)
    return []


def _outbox(pg: PGSchema) -> dict[str, tuple[str, int, str | None]]:
    with pg.connect() as conn:
        return {m: (s, f, c) for m, s, f, c in conn.execute(
            "SELECT message_id, state, fate_unknown, claimed_by FROM outbox")}


def _backends(pg: PGSchema, worker: str) -> set[int]:
    with pg.connect() as conn:
        return {pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name=%s",
            (f"ws-fhir-bridge {worker}"[:63],))}


def _end_sessions(pg: PGSchema, store: PostgresStore) -> set[int]:
    """End every session of ``store`` from the server's side; which they were."""
    ended = _backends(pg, store.worker_id)
    with pg.connect() as admin:
        for pid in ended:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    return ended


def _sending_and_looking(
    pg: PGSchema, claims: int = 2
) -> tuple[PostgresStore, PostgresStore, list[str]]:
    """Two processes: one holding ``claims`` claims it is sending, one looking; and the
    claims."""
    sender = PostgresStore(pg.dsn, schema=pg.schema)
    looker = PostgresStore(pg.dsn, schema=pg.schema)
    ids = [_enqueue(sender, n) for n in range(1, claims + 1)]
    assert _claim(sender) == ids
    return sender, looker, ids


def test_claims_of_a_process_that_is_gone_are_taken_up_with_their_fate_unknown(
    pg_schema: PGSchema,
) -> None:
    sender, other, ids = _sending_and_looking(pg_schema, claims=3)
    try:
        # While its sender lives, its leases stand, however long the other looks.
        assert _claimed_within(other, GONE_AFTER * 4) == []
        sender.close()  # its session ends, as a killed process's does
        started = time.monotonic()
        assert _claimed_within(other, 10) == ids
        assert time.monotonic() - started >= GONE_AFTER  # missing for the whole wait
        rows = _outbox(pg_schema)
        assert {rows[m] for m in ids} == {("sending", 1, other.worker_id)}
    finally:
        other.close()


def test_a_live_process_whose_session_ends_keeps_its_leases_without_a_call(
    pg_schema: PGSchema,
) -> None:
    sender, other, _ids = _sending_and_looking(pg_schema)
    try:
        # The server ends every session of the sender (a restart ends every one). The
        # sender then makes no call at all, as a dispatcher waiting on its sends does.
        before = _end_sessions(pg_schema, sender)
        assert len(before) == 2  # its store's connection and the one holding its lock
        assert _claimed_within(other, GONE_AFTER * 4) == []
        # Its lock is held again, on a session of its own opened meanwhile.
        assert _backends(pg_schema, sender.worker_id) - before
        assert {s for s, _, _ in _outbox(pg_schema).values()} == {"sending"}
    finally:
        sender.close()
        other.close()


def test_hand_offs_of_a_process_that_is_gone_go_again(pg_schema: PGSchema) -> None:
    worker = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    other = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    try:
        mid = accept(worker, "hospital-a", 1, now=datetime.now(UTC))
        [[held]] = q.claim(worker, "claims-http", now=datetime.now(UTC), limit=10, lease=LEASE)
        assert held.row.message_id == mid
        with pg_schema.connect() as conn:
            assert conn.execute("SELECT claimed_by FROM handoff WHERE destination=%s",
                                ("claims-http",)).fetchone() == (worker.worker_id,)
        time.sleep(GONE_AFTER * 2)
        assert q.claim(other, "claims-http", now=datetime.now(UTC), limit=10,
                       lease=LEASE) == []
        worker.close()
        deadline = time.monotonic() + 10
        while not (lines := q.claim(other, "claims-http", now=(at := datetime.now(UTC)),
                                    limit=10, lease=LEASE)):
            assert time.monotonic() < deadline, "the hand-off was not taken up"
            time.sleep(0.05)
        [[again]] = lines
        assert again.row.message_id == mid and again.row.attempts == 2
        # The worker that is gone could not settle it any more: its lease is not the
        # one the row is held under now.
        assert q.mark_delivered(other, [held.row], now=at, audits=[AuditRecord(
            time=at, actor="insurer-b", action="handoff.delivered", subject=mid)]) == 0
    finally:
        other.close()


def test_several_processes_gone_and_several_looking_take_each_claim_once(
    pg_schema: PGSchema, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "bridge.ledger.postgres")
    senders = [PostgresStore(pg_schema.dsn, schema=pg_schema.schema) for _ in range(2)]
    lookers = [PostgresStore(pg_schema.dsn, schema=pg_schema.schema) for _ in range(2)]
    try:
        ids = []
        for i, sender in enumerate(senders):
            mine = [_enqueue(sender, 10 * i + n) for n in range(1, 4)]
            assert _claim(sender) == mine
            ids += mine
        for sender in senders:
            sender.close()
        taken: list[str] = []
        deadline = time.monotonic() + 10
        while len(taken) < len(ids):
            assert time.monotonic() < deadline, taken
            for looker in lookers:
                taken += _claim(looker)
            time.sleep(0.05)
        assert sorted(taken) == sorted(ids)
        assert "cannot hold" not in caplog.text and "Deadlock" not in caplog.text
    finally:
        for store in lookers:
            store.close()


def _down_until(store: PostgresStore, up: threading.Event) -> None:
    """The server unreachable for ``store``'s liveness thread until ``up`` is set."""
    connect = store._liveness_connection

    def refused() -> object:
        if not up.is_set():
            raise StoreError("cannot connect to PostgreSQL (refused)", location="store.dsn")
        return connect()

    store._liveness_connection = refused  # type: ignore[method-assign]


def _leases_running(pg: PGSchema) -> bool:
    with pg.connect() as conn:
        return all(r for (r,) in conn.execute("SELECT lease_until > now() FROM outbox"))


def test_what_was_seen_before_an_outage_does_not_count_after_it(
    pg_schema: PGSchema, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server restart ends the sessions one after another: the looker saw the sender
    # missing just before its own session ended, and comes back first.
    monkeypatch.setattr(postgres, "GONE_AFTER_SECONDS", 2.0)
    sender, looker, _ids = _sending_and_looking(pg_schema)
    try:
        sender_up, looker_up = threading.Event(), threading.Event()
        _down_until(sender, sender_up)
        _down_until(looker, looker_up)
        _end_sessions(pg_schema, sender)
        deadline = time.monotonic() + 5
        while not looker._missing:
            assert time.monotonic() < deadline, "the looker never saw the sender missing"
            time.sleep(0.01)
        _end_sessions(pg_schema, looker)
        time.sleep(3.0)  # both down for longer than the wait
        looker_up.set()
        time.sleep(0.3)
        sender_up.set()  # well within the wait after the looker came back
        time.sleep(0.5)
        assert _leases_running(pg_schema)
    finally:
        sender.close()
        looker.close()


def test_a_look_held_up_by_a_lock_does_not_count_the_time_it_waited(
    pg_schema: PGSchema, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(postgres, "GONE_AFTER_SECONDS", 2.0)
    sender, looker, _ids = _sending_and_looking(pg_schema)
    try:
        up = threading.Event()
        _down_until(sender, up)
        with pg_schema.connect() as locker, locker.transaction():
            # A look waits on the table (a migration's ALTER TABLE), and the sender's
            # session ends while it waits.
            locker.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
            time.sleep(2.5)
            _end_sessions(pg_schema, sender)
            time.sleep(0.3)
        time.sleep(0.4)
        up.set()  # back well within the wait after the held-up look ended
        time.sleep(0.5)
        assert _leases_running(pg_schema)
    finally:
        sender.close()
        looker.close()

