"""The hand-off queue in the store, on SQLite and PostgreSQL.

A claim acknowledged with a receipt is always queued for hand-off (same
transaction as the inbox row), nothing is queued that was not stored, and the queue
hands a sender's claims out in the order they were accepted, never two of one line
in flight out of order.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pg_support import PGSchema, fresh_schema

from bridge.handoff import HandoffState, Route
from bridge.ledger import Store
from bridge.ledger import handoff as q
from bridge.ledger.audit import AuditRecord
from bridge.ledger.postgres import PostgresStore
from bridge.ledger.sqlite import SQLiteStore

NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
ROUTES = (Route("claims-http"), Route("claims-amqp", senders=frozenset({"hospital-a"})))
LEASE = timedelta(seconds=30)


@pytest.fixture
def pg_schema() -> Iterator[PGSchema]:
    yield from fresh_schema()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "h.db")
    else:
        schema: PGSchema = request.getfixturevalue("pg_schema")
        s = PostgresStore(schema.dsn, schema=schema.schema)
    try:
        yield s
    finally:
        s.close()


def _audit(action: str, subject: str) -> AuditRecord:
    return AuditRecord(time=NOW, actor="insurer-b", action=action, subject=subject)


def accept(store: Store, sender: str, n: int, *, now: datetime = NOW, hook: bool = True) -> str:
    mid = f"urn:uuid:00000000-0000-0000-0000-{n:012d}"
    store.inbox_accept(
        sender=sender, message_id=mid, digest=f"sha256:{n}", payload=b'{"n":%d}' % n,
        audit=_audit("message.receive", mid), make_receipt=lambda e: b'{"receipt":%d}' % e.seq,
        now=now,
        within=q.queue_hook(ROUTES, sender=sender, link="in", now=now) if hook else None,
    )
    return mid


def states(store: Store, destination: str) -> dict[str, str]:
    entries = q.list_inbox(store, q.Filter(destination=destination), limit=1000)
    return {
        e.message_id: next(h.state.value for h in e.handoffs if h.destination == destination)
        for e in entries
    }


def test_a_received_claim_is_queued_for_every_destination_that_takes_it(store: Store) -> None:
    a = accept(store, "hospital-a", 1)
    c = accept(store, "clinic-x", 2)
    entries = {e.message_id: e for e in q.list_inbox(store, q.Filter())}
    assert {h.destination for h in entries[a].handoffs} == {"claims-http", "claims-amqp"}
    assert {h.destination for h in entries[c].handoffs} == {"claims-http"}
    assert all(h.state == HandoffState.QUEUED for e in entries.values() for h in e.handoffs)


def test_a_failing_hand_off_insert_leaves_no_inbox_row_and_no_audit_entry(store: Store) -> None:
    head = store.audit_head()

    def broken(tx: object, row: object) -> None:
        raise RuntimeError("queue insert failed")

    with pytest.raises(RuntimeError):
        store.inbox_accept(sender="hospital-a", message_id="urn:uuid:x", digest="sha256:x",
                           payload=b"{}", audit=_audit("message.receive", "x"),
                           make_receipt=lambda e: b"{}", now=NOW, within=broken)
    assert store.inbox_lookup("hospital-a", "urn:uuid:x") is None
    assert store.audit_head() == head


def test_a_failed_receipt_leaves_nothing_queued(store: Store) -> None:
    def no_receipt(entry: object) -> bytes:
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        store.inbox_accept(sender="hospital-a", message_id="urn:uuid:y", digest="sha256:y",
                           payload=b"{}", audit=_audit("message.receive", "y"),
                           make_receipt=no_receipt, now=NOW,
                           within=q.queue_hook(ROUTES, sender="hospital-a", link="in", now=NOW))
    assert q.list_inbox(store, q.Filter()) == []
    assert q.destination_status(store, "claims-http").counts["queued"] == 0


def test_a_duplicate_delivery_queues_nothing_twice(store: Store) -> None:
    accept(store, "hospital-a", 1)
    accept(store, "hospital-a", 1)  # the sender's retry: the original receipt, nothing new
    assert q.destination_status(store, "claims-http").counts["queued"] == 1


def test_claims_come_out_in_acceptance_order_per_sender(store: Store) -> None:
    a = [accept(store, "hospital-a", n) for n in (5, 3, 9, 1)]
    c = [accept(store, "clinic-x", n) for n in (20, 10)]
    lines = q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE)
    got = {line[0].row.sender: [x.row.message_id for x in line] for line in lines}
    assert got == {"hospital-a": a, "clinic-x": c}
    assert [x.row.seq for x in lines[1]] == [1, 2, 3, 4]
    first = lines[1][0]
    assert first.inbox is not None and first.inbox.payload == b'{"n":5}'
    # While they are out, nothing of either line is handed out again.
    assert q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE) == []


def test_a_line_waits_behind_its_retrying_head(store: Store) -> None:
    ids = [accept(store, "hospital-a", n) for n in range(1, 4)]
    [line] = q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE)
    head = line[0].row
    q.mark_failed(store, head, error="http-503", answer=b"HTTP 503 busy", now=NOW,
                  retry_at=NOW + timedelta(seconds=10), audit=None)
    q.release(store, [x.row for x in line[1:]], now=NOW)
    # The head is not due yet, so the line stays put rather than overtaking it.
    assert q.claim(store, "claims-http", now=NOW + timedelta(seconds=5), limit=10,
                   lease=LEASE) == []
    [again] = q.claim(store, "claims-http", now=NOW + timedelta(seconds=11), limit=10,
                      lease=LEASE)
    assert [x.row.message_id for x in again] == ids
    assert [x.row.attempts for x in again] == [2, 1, 1]
    status = q.destination_status(store, "claims-http")
    assert status.failing is None or status.failing.last_error == "http-503"


def test_an_expired_lease_is_taken_again_after_a_crash(store: Store) -> None:
    mid = accept(store, "hospital-a", 1)
    q.claim(store, "claims-http", now=NOW, limit=10, lease=timedelta(seconds=5))
    assert q.claim(store, "claims-http", now=NOW + timedelta(seconds=4), limit=10,
                   lease=LEASE) == []
    [[item]] = q.claim(store, "claims-http", now=NOW + timedelta(seconds=6), limit=10,
                       lease=LEASE)
    assert item.row.message_id == mid and item.row.attempts == 2


def test_dead_letter_keeps_reason_and_answer_and_requeue_puts_it_back(store: Store) -> None:
    mid = accept(store, "hospital-a", 1)
    later = accept(store, "hospital-a", 2)
    [[item, behind]] = q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE)
    q.mark_failed(store, item.row, error="http-422", answer=b"HTTP 422 nope\n{...}", now=NOW,
                  retry_at=None, audit=_audit("handoff.dead", mid))
    q.release(store, [behind.row], now=NOW)
    status = q.destination_status(store, "claims-http")
    assert status.counts["dead"] == 1 and [r.message_id for r in status.dead] == [mid]
    assert status.dead[0].last_error == "http-422"
    assert q.last_answer(store, status.dead[0].id) == b"HTTP 422 nope\n{...}"
    # A dead claim does not hold back the one behind it.
    [[nxt]] = q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE)
    assert nxt.row.message_id == later
    q.mark_delivered(store, [nxt.row], now=NOW, audits=[_audit("handoff.delivered", later)])

    head = store.audit_head()[0]
    back = q.requeue(store, q.Filter(destination="claims-http"), now=NOW + timedelta(hours=1),
                     audit=lambda r: _audit("handoff.requeue", r.message_id))
    assert [r.message_id for r in back] == [mid]
    assert store.audit_head()[0] == head + 1
    [[again]] = q.claim(store, "claims-http", now=NOW + timedelta(hours=1), limit=10,
                        lease=LEASE)
    assert again.row.message_id == mid and again.row.attempts == 1
    assert again.row.due_since == NOW + timedelta(hours=1)
    assert states(store, "claims-http") == {mid: "sending", later: "delivered"}


def test_delivered_claims_can_be_handed_over_again_on_request(store: Store) -> None:
    mid = accept(store, "hospital-a", 1)
    [[item]] = q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE)
    assert q.mark_delivered(store, [item.row], now=NOW,
                            audits=[_audit("handoff.delivered", mid)]) == 1
    assert q.requeue(store, q.Filter(message_id=mid), now=NOW,
                     audit=lambda r: _audit("handoff.requeue", r.message_id)) == []
    back = q.requeue(store, q.Filter(message_id=mid), now=NOW, states=[HandoffState.DELIVERED],
                     audit=lambda r: _audit("handoff.requeue", r.message_id))
    assert len(back) == 1
    assert states(store, "claims-http") == {mid: "queued"}


def test_claims_received_before_a_destination_existed_can_be_queued(store: Store) -> None:
    old = accept(store, "hospital-a", 1, hook=False)
    new = accept(store, "hospital-a", 2)
    route = Route("claims-http")
    n = q.queue_missing(store, route, q.Filter(), now=NOW, link_for=lambda s: "in",
                        audit=lambda s, m: _audit("handoff.queue", m))
    assert n == 1
    assert q.queue_missing(store, route, q.Filter(), now=NOW, link_for=lambda s: "in",
                           audit=lambda s, m: _audit("handoff.queue", m)) == 0
    [line] = q.claim(store, "claims-http", now=NOW, limit=10, lease=LEASE)
    assert [x.row.message_id for x in line] == [new, old]


def test_listing_filters_by_sender_state_and_time(store: Store) -> None:
    a1 = accept(store, "hospital-a", 1, now=NOW)
    a2 = accept(store, "hospital-a", 2, now=NOW + timedelta(hours=2))
    c1 = accept(store, "clinic-x", 3, now=NOW + timedelta(hours=1))

    def ids(f: q.Filter) -> list[str]:
        return [e.message_id for e in q.list_inbox(store, f)]

    assert ids(q.Filter()) == [a1, a2, c1]
    assert ids(q.Filter(sender="hospital-a")) == [a1, a2]
    assert ids(q.Filter(since=NOW + timedelta(minutes=30))) == [a2, c1]
    assert ids(q.Filter(until=NOW + timedelta(minutes=90))) == [a1, c1]
    assert ids(q.Filter(destination="claims-amqp")) == [a1, a2]
    later = NOW + timedelta(hours=3)
    [line_c, line_a] = q.claim(store, "claims-http", now=later, limit=1, lease=LEASE)
    assert [line_c[0].row.message_id, line_a[0].row.message_id] == [c1, a1]
    q.mark_delivered(store, [line_c[0].row], now=NOW, audits=[_audit("handoff.delivered", c1)])
    assert ids(q.Filter(state="delivered")) == [c1]
    assert ids(q.Filter(state="sending", destination="claims-http")) == [a1]
    assert ids(q.Filter(state="sending", destination="claims-amqp")) == []


def test_two_processes_never_take_one_line_at_once(pg_schema: PGSchema) -> None:
    """Two bridge processes sharing a PostgreSQL store claim concurrently: each row is
    taken once, and a process only ever holds a contiguous run of a line."""
    import threading

    one = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    two = PostgresStore(pg_schema.dsn, schema=pg_schema.schema)
    try:
        ids = [accept(one, "hospital-a", n) for n in range(1, 41)]
        taken: dict[str, list[list[str]]] = {"one": [], "two": []}
        barrier = threading.Barrier(2)

        def work(name: str, store: Store) -> None:
            barrier.wait()
            for _ in range(2000):
                if len([m for run in taken["one"] + taken["two"] for m in run]) >= len(ids):
                    return
                for line in q.claim(store, "claims-http", now=NOW, limit=3, lease=LEASE):
                    taken[name].append([x.row.message_id for x in line])
                    q.mark_delivered(store, [x.row for x in line], now=NOW,
                                     audits=[_audit("handoff.delivered", x.row.message_id)
                                             for x in line])

        threads = [threading.Thread(target=work, args=(n, s)) for n, s in
                   (("one", one), ("two", two))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        runs = taken["one"] + taken["two"]
        flat = [m for run in runs for m in run]
        dupes = sorted({m[-3:] for m in flat if flat.count(m) > 1})
        missing = sorted(m[-3:] for m in set(ids) - set(flat))
        assert (dupes, missing) == ([], [])
        for run in runs:
            start = ids.index(run[0])
            assert run == ids[start:start + len(run)]
    finally:
        one.close()
        two.close()
