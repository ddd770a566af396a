"""One behavioural suite, run against both ledger stores: SQLite and PostgreSQL.

Whatever the bridge relies on from a store (lifecycle, idempotency, leases, exactly-once
inbox, the audit chain, consents) must hold identically on both; the PostgreSQL runs
use the real local server, one fresh schema per test.
"""

from __future__ import annotations

import hashlib
import inspect
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_support import PGSchema, fresh_schema

from bridge.config import StoreConfig
from bridge.errors import ConflictError, StoreError
from bridge.ledger import Store, open_store
from bridge.ledger.audit import AuditEntry, AuditEntryDamaged, AuditRecord, patient_pseudonym
from bridge.ledger.errors import TransitionError, UnknownMessage
from bridge.ledger.postgres import PostgresStore
from bridge.ledger.sqlite import SQLiteStore
from bridge.ledger.states import OutboxState

T0 = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
KEY = b"pseudonym-key-for-tests-32-bytes"
PATIENT = patient_pseudonym(KEY, "urn:oid:2.16.156.10011.1.3", "110101199001011234")
HL7 = b"MSH|^~\\&|HIS|HOSP-A|BRIDGE|HOSP-A|20260301083000||ADT^A01|M1|P|2.5\rPID|1\r"


def rec(action: str, subject: str, t: datetime = T0, **kw: Any) -> AuditRecord:
    return AuditRecord(time=t, actor="hospital-a", action=action, subject=subject,
                       partner="insurer-b", patient=PATIENT, categories=["health-payment"],
                       **kw)


def digest(payload: bytes) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def enqueue(store: Store, mid: str, payload: bytes = b"{}", link: str = "a-to-b",
            t: datetime = T0) -> None:
    store.enqueue(message_id=mid, link=link, partner="insurer-b", payload=payload,
                  digest=digest(payload), audit=rec("claim.enqueue", mid, t), now=t)


@dataclass
class Backend:
    """One kind of store, with what a test needs beyond the API: reopen and raw SQL."""

    kind: str
    config: StoreConfig
    raw: Callable[[], Any]  # a raw DB-API connection (autocommit) to the same data
    drop_audit_guards: tuple[str, ...]

    def open(self) -> Store:
        return open_store(self.config)

    def execute(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        conn = self.raw()
        try:
            for text, params in statements:
                conn.execute(self.param(text), params)
            if isinstance(conn, sqlite3.Connection):
                conn.commit()
        finally:
            conn.close()

    def param(self, text: str) -> str:
        return text.replace("?", "%s") if self.kind == "postgresql" else text

    def raw_error(self) -> type[Exception]:
        return psycopg.Error if self.kind == "postgresql" else sqlite3.DatabaseError


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"
        yield Backend(
            "sqlite", StoreConfig(path=path),
            raw=lambda: sqlite3.connect(path, isolation_level=None),
            drop_audit_guards=("DROP TRIGGER audit_no_update", "DROP TRIGGER audit_no_delete"),
        )
        return
    for pg in fresh_schema():
        schema: PGSchema = pg
        yield Backend(
            "postgresql", StoreConfig(kind="postgresql", dsn=schema.dsn, db_schema=schema.schema),
            raw=schema.connect,
            drop_audit_guards=("DROP TRIGGER audit_no_update ON audit",
                               "DROP TRIGGER audit_no_delete ON audit"),
        )


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    with backend.open() as s:
        yield s


# --- the API itself -----------------------------------------------------------------


def test_both_stores_offer_the_same_api() -> None:
    names = [n for n, v in vars(Store).items()
             if callable(v) and (not n.startswith("_") or n in ("__enter__", "__exit__"))]
    assert "hl7_accept" in names and "inbox_accept" in names
    for name in names:
        proto = inspect.signature(getattr(Store, name))
        for cls in (SQLiteStore, PostgresStore):
            got = inspect.signature(getattr(cls, name))
            assert list(got.parameters) == list(proto.parameters), (cls.__name__, name)
            for p in proto.parameters.values():
                assert got.parameters[p.name].kind == p.kind, (cls.__name__, name, p.name)
                assert got.parameters[p.name].default == p.default, (cls.__name__, name, p.name)


def test_open_store_gives_the_configured_kind(store: Store, backend: Backend) -> None:
    assert isinstance(store, Store)
    assert isinstance(store, PostgresStore if backend.kind == "postgresql" else SQLiteStore)


# --- outbox -------------------------------------------------------------------------


def test_full_lifecycle(store: Store) -> None:
    payload = b'{"resourceType":"Bundle"}'
    row = store.enqueue(message_id="m1", link="a-to-b", partner="insurer-b", payload=payload,
                        digest=digest(payload), audit=rec("claim.enqueue", "m1"), now=T0)
    assert (row.seq, row.state, row.attempts, row.next_attempt) == (1, OutboxState.QUEUED, 0, T0)
    assert row.payload == payload and row.created == T0 and row.lease_until is None

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
    assert row.updated == retry_at
    assert store.get_outbox("m1") == row
    assert store.get_outbox("nope") is None
    assert store.outbox_counts("a-to-b")["acked"] == 1
    assert store.highest_contiguous_acked("a-to-b") == 1

    actions = [e.record.action for e in store.audit_entries()]
    assert actions == ["claim.enqueue", "claim.ack"]
    assert store.verify_audit().ok
    assert [e.record.action for e in store.audit_by_patient(PATIENT)] == actions
    assert store.audit_by_patient("pp:someone-else") == []


def test_reject_dead_refuse_and_requeue(store: Store) -> None:
    for m in ("r", "d", "f", "q"):
        enqueue(store, m)
    store.claim_due("a-to-b", now=T0, limit=3)
    store.mark_rejected("r", error="fhir-invalid", receipt=b"nack", now=T0,
                        audit=rec("claim.send", "r", outcome="failure", detail="fhir-invalid"))
    store.mark_dead("d", error="transport-error", now=T0,
                    audit=rec("claim.send", "d", outcome="failure"))
    store.mark_refused("f", error="consent-denied", now=T0,
                       audit=rec("claim.refused", "f", outcome="denied"))
    store.mark_refused("q", error="consent-denied", now=T0,
                       audit=rec("claim.refused", "q", outcome="denied"))
    assert store.outbox_counts() == {"queued": 0, "sending": 0, "acked": 0, "rejected": 1,
                                     "dead": 1, "refused": 2}
    assert store.claim_due("a-to-b", now=T0 + timedelta(days=1)) == []

    later = T0 + timedelta(hours=1)
    for m in ("r", "d"):
        row = store.requeue(m, now=later, audit=rec("claim.requeue", m, later))
        assert row.state == "queued" and row.attempts == 0 and row.next_attempt == later
    with pytest.raises(TransitionError):
        store.requeue("f", now=later, audit=rec("claim.requeue", "f", later))
    assert [r.message_id for r in store.claim_due("a-to-b", now=later)] == ["r", "d"]
    assert [r.seq for r in store.list_outbox("a-to-b", state="refused")] == [3, 4]
    assert store.get_outbox("r").receipt == b"nack"  # type: ignore[union-attr]


def test_illegal_transitions_raise_and_write_nothing(store: Store) -> None:
    enqueue(store, "m1")
    head = store.audit_head()
    with pytest.raises(TransitionError):
        store.mark_acked("m1", receipt=b"r", now=T0, audit=rec("claim.ack", "m1"))
    with pytest.raises(TransitionError):
        store.mark_retry("m1", next_attempt=T0, error="x", now=T0, audit=rec("claim.send", "m1"))
    with pytest.raises(TransitionError):
        store.requeue("m1", now=T0, audit=rec("claim.requeue", "m1"))
    assert store.audit_head() == head
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


def test_enqueue_is_idempotent_and_detects_conflict(store: Store) -> None:
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
    # Neither refused attempt used up a sequence number.
    enqueue(store, "m2")
    enqueue(store, "c1", link="a-to-c")
    assert [r.seq for r in store.list_outbox("a-to-b")] == [1, 2]
    assert [r.seq for r in store.list_outbox("a-to-c")] == [1]


def test_enqueue_many_answers_each_request_as_enqueue_would(store: Store) -> None:
    enqueue(store, "m1", b"one")

    def req(mid: str, payload: bytes) -> dict[str, Any]:
        return {"message_id": mid, "link": "a-to-b", "partner": "insurer-b", "payload": payload,
                "digest": digest(payload), "audit": rec("claim.enqueue", mid), "now": T0}

    answers = store.enqueue_many(
        [req("m2", b"two"), req("m1", b"changed"), req("m3", b"three"), req("m1", b"one")]
    )
    assert [type(a).__name__ for a in answers] == [
        "OutboxRow", "ConflictError", "OutboxRow", "OutboxRow"
    ]
    assert [a.seq for a in answers if not isinstance(a, Exception)] == [2, 3, 1]
    # The refused request left nothing behind: no row change, no audit entry, no seq used.
    assert store.get_outbox("m1").payload == b"one"  # type: ignore[union-attr]
    assert [r.seq for r in store.list_outbox("a-to-b")] == [1, 2, 3]
    assert len(store.audit_entries()) == 3
    assert store.verify_audit().ok


def test_mark_acked_many_answers_each_request_as_mark_acked_would(store: Store) -> None:
    for mid in ("m1", "m2", "m3"):
        enqueue(store, mid)
    store.claim_due("a-to-b", now=T0, limit=2)  # m1 and m2 are being sent; m3 waits

    def req(mid: str) -> dict[str, Any]:
        return {"message_id": mid, "receipt": f"receipt {mid}".encode(), "now": T0,
                "audit": rec("claim.ack", mid)}

    answers = store.mark_acked_many([req("m1"), req("m3"), req("nope"), req("m2")])
    assert [type(a).__name__ for a in answers] == [
        "OutboxRow", "TransitionError", "UnknownMessage", "OutboxRow"]
    assert [(r.message_id, r.state, r.receipt) for r in answers if not isinstance(
        r, Exception)] == [("m1", OutboxState.ACKED, b"receipt m1"),
                           ("m2", OutboxState.ACKED, b"receipt m2")]
    assert store.get_outbox("m3").state == OutboxState.QUEUED  # type: ignore[union-attr]
    acks = [e.record.subject for e in store.audit_entries() if e.record.action == "claim.ack"]
    assert acks == ["m1", "m2"] and store.verify_audit().ok


def test_naive_times_are_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.enqueue(message_id="m1", link="a-to-b", partner="insurer-b", payload=b"x",
                      digest="d", audit=rec("claim.enqueue", "m1"),
                      now=datetime(2026, 3, 1))  # naive on purpose
    assert store.get_outbox("m1") is None


def test_highest_contiguous_acked_stops_at_first_gap(store: Store) -> None:
    for i in range(1, 5):
        enqueue(store, f"m{i}")
    store.claim_due("a-to-b", now=T0)
    for m in ("m1", "m2", "m4"):
        store.mark_acked(m, receipt=b"r", now=T0, audit=rec("claim.ack", m))
    assert store.highest_contiguous_acked("a-to-b") == 2
    store.mark_acked("m3", receipt=b"r", now=T0, audit=rec("claim.ack", "m3"))
    assert store.highest_contiguous_acked("a-to-b") == 4
    assert store.highest_contiguous_acked("a-to-c") == 0


def test_seq_is_per_link(store: Store) -> None:
    for i in range(3):
        enqueue(store, f"b{i}", link="a-to-b")
        enqueue(store, f"c{i}", link="a-to-c")
    assert [r.seq for r in store.list_outbox("a-to-b")] == [1, 2, 3]
    assert [r.message_id for r in store.list_outbox("a-to-c")] == ["c0", "c1", "c2"]
    assert [r.seq for r in store.list_outbox("a-to-c", limit=2)] == [1, 2]


def test_claim_due_order_limit_and_schedule(store: Store) -> None:
    for i in range(5):
        enqueue(store, f"m{i}", t=T0 + timedelta(seconds=i))
    assert [r.seq for r in store.claim_due("a-to-b", now=T0 + timedelta(seconds=2))] == [1, 2, 3]
    assert [r.seq for r in store.claim_due("a-to-b", now=T0 + timedelta(seconds=9), limit=1)] == [4]
    assert store.claim_due("a-to-c", now=T0 + timedelta(seconds=9)) == []
    assert store.outbox_counts("a-to-b") == {"queued": 1, "sending": 4, "acked": 0,
                                             "rejected": 0, "dead": 0, "refused": 0}


def test_expired_lease_recovers_crashed_sending_row(store: Store) -> None:
    enqueue(store, "m1")
    enqueue(store, "m2")
    store.claim_due("a-to-b", now=T0, lease=timedelta(seconds=30))
    assert store.claim_due("a-to-b", now=T0 + timedelta(seconds=29)) == []
    rows = store.claim_due("a-to-b", now=T0 + timedelta(seconds=30))
    # Taking over a crashed sender's lease is not an attempt (nothing failed), but the
    # crashed sender may have sent the claim: its fate is unknown from now on.
    assert [(r.message_id, r.state, r.attempts, r.fate_unknown) for r in rows] == [
        ("m1", "sending", 1, True), ("m2", "sending", 1, True)]


def test_crashes_do_not_spend_attempts_and_unknown_fate_is_kept_until_settled(
        store: Store) -> None:
    enqueue(store, "m1")
    t = T0
    for _crash in range(5):
        [row] = store.claim_due("a-to-b", now=t, lease=timedelta(seconds=30))
        t += timedelta(seconds=30)
    assert row.attempts == 1 and row.fate_unknown
    row = store.mark_retry("m1", next_attempt=t, error="transport-error", now=t, audit=None,
                           answer="HTTP 503")
    # A later answer that says nothing about the first send does not settle its fate.
    assert row.fate_unknown and row.last_answer == "HTTP 503" and row.attempts == 1
    [row] = store.claim_due("a-to-b", now=t)
    assert row.attempts == 2
    row = store.mark_dead("m1", error="gave-up", now=t, answer="no answer: refused",
                          audit=rec("claim.dead", "m1", t, outcome="failure"))
    assert (row.state, row.last_error, row.last_answer) == ("dead", "gave-up",
                                                             "no answer: refused")
    later = t + timedelta(hours=1)
    row = store.requeue("m1", now=later, audit=rec("claim.requeue", "m1", later))
    assert row.since == later and row.pending_since == later and row.created == T0
    assert store.get_outbox("m1") == row


def test_expired_leases_and_due_retries_are_claimed_together_in_seq_order(store: Store) -> None:
    for i in range(1, 5):
        enqueue(store, f"m{i}")
    store.claim_due("a-to-b", now=T0, limit=2, lease=timedelta(seconds=10))   # m1, m2
    store.claim_due("a-to-b", now=T0, limit=2, lease=timedelta(seconds=100))  # m3, m4
    store.mark_retry("m3", next_attempt=T0 + timedelta(seconds=5), error="x", now=T0, audit=None)
    rows = store.claim_due("a-to-b", now=T0 + timedelta(seconds=20), limit=2)
    assert [r.message_id for r in rows] == ["m1", "m2"]
    rows = store.claim_due("a-to-b", now=T0 + timedelta(seconds=20))
    assert [r.message_id for r in rows] == ["m3"]


# --- inbox --------------------------------------------------------------------------


def test_inbox_accept_once_and_duplicate_gets_original_receipt(store: Store) -> None:
    calls: list[AuditEntry] = []

    def make_receipt(entry: AuditEntry) -> bytes:
        calls.append(entry)
        return f"receipt for audit {entry.seq} {entry.hash}".encode()

    payload = b'{"resourceType":"Bundle","type":"message"}'
    args: dict[str, Any] = {"sender": "hospital-a", "message_id": "urn:uuid:1",
                            "digest": digest(payload), "payload": payload,
                            "make_receipt": make_receipt, "now": T0}
    row, fresh = store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"), **args)
    assert fresh and row.audit_seq == 1 and row.receipt.startswith(b"receipt for audit 1 ")
    assert calls[0].hash.encode() in row.receipt and row.payload == payload

    dup, fresh2 = store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"), **args)
    assert not fresh2 and dup == row and len(calls) == 1
    assert len(store.audit_entries()) == 1
    assert store.inbox_lookup("hospital-a", "urn:uuid:1") == row
    assert store.inbox_lookup("hospital-a", "urn:uuid:2") is None

    _, fresh3 = store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"),
                                   **{**args, "sender": "clinic-c"})
    assert fresh3
    assert store.inbox_count() == 2 and store.inbox_count("clinic-c") == 1

    with pytest.raises(ConflictError):
        store.inbox_accept(audit=rec("message.receive", "urn:uuid:1"),
                           **{**args, "digest": digest(b"other")})
    assert len(store.audit_entries()) == 2 and store.verify_audit().ok


def test_failing_receipt_leaves_nothing_written(store: Store) -> None:
    enqueue(store, "before")
    head = store.audit_head()

    def boom(entry: AuditEntry) -> bytes:
        raise RuntimeError("signing key unavailable")

    with pytest.raises(RuntimeError, match="signing key unavailable"):
        store.inbox_accept(sender="hospital-a", message_id="urn:uuid:9", digest="d",
                           payload=b"x", audit=rec("message.receive", "urn:uuid:9"),
                           make_receipt=boom, now=T0)
    assert store.audit_head() == head
    assert store.inbox_lookup("hospital-a", "urn:uuid:9") is None and store.inbox_count() == 0
    row, _ = store.inbox_accept(sender="hospital-a", message_id="urn:uuid:9", digest="d",
                                payload=b"x", audit=rec("message.receive", "urn:uuid:9"),
                                make_receipt=lambda e: b"ok", now=T0)
    assert row.audit_seq == head[0] + 1 and store.verify_audit().ok


def test_inbox_accept_many_answers_each_request_as_inbox_accept_would(store: Store) -> None:
    """One transaction for a group of received messages; each is judged on its own: a
    conflict, a failing receipt or a failing hand-off hook undoes that message only
    (its audit entry too), and the chain stays whole."""
    store.inbox_accept(sender="hospital-a", message_id="urn:uuid:1", digest="d1", payload=b"1",
                       audit=rec("message.receive", "urn:uuid:1"),
                       make_receipt=lambda e: f"r{e.seq}".encode(), now=T0)

    def boom(entry: AuditEntry) -> bytes:
        raise RuntimeError("signing key unavailable")

    def hook_fails(tx: Any, row: Any) -> None:
        tx.append_audit(rec("handoff.queue", row.message_id))
        raise ValueError("hand-off queue refused it")

    def req(mid: str, dig: str, **kw: Any) -> dict[str, Any]:
        return {"sender": "hospital-a", "message_id": mid, "digest": dig,
                "payload": dig.encode(), "audit": rec("message.receive", mid),
                "make_receipt": lambda e: f"r{e.seq}".encode(), "now": T0, **kw}

    answers = store.inbox_accept_many([
        req("urn:uuid:2", "d2"), req("urn:uuid:1", "changed"), req("urn:uuid:3", "d3",
                                                                   make_receipt=boom),
        req("urn:uuid:1", "d1"), req("urn:uuid:4", "d4", within=hook_fails),
        req("urn:uuid:5", "d5"),
    ])
    kinds = [type(a).__name__ for a in answers]
    assert kinds == ["tuple", "ConflictError", "RuntimeError", "tuple", "ValueError", "tuple"]
    new2, dup1, new5 = (a for a in answers if isinstance(a, tuple))
    assert new2[1] and not dup1[1] and new5[1]
    assert (new2[0].audit_seq, new2[0].receipt, new5[0].audit_seq, new5[0].receipt) == (
        2, b"r2", 3, b"r3")  # the undone ones used no audit entry
    assert store.inbox_count() == 3 and store.inbox_lookup("hospital-a", "urn:uuid:4") is None
    assert [e.record.subject for e in store.audit_entries()] == [
        "urn:uuid:1", "urn:uuid:2", "urn:uuid:5"]
    assert store.verify_audit().ok


def _hl7_accept(store: Store, message: bytes = HL7, record: bytes | None = b'{"dataset":"x"}',
                ack: bytes = b"MSH|ACK\rMSA|AA|M1\r") -> tuple[Any, bool]:
    return store.hl7_accept(sender="HIS|HOSP-A", control_id="M1",
                            digest=hashlib.sha256(message).hexdigest(), message=message,
                            record=record,
                            audit=AuditRecord(time=T0, actor="hospital-a", action="hl7.receive",
                                              subject="hl7:HIS|HOSP-A/M1"),
                            make_ack=lambda e: ack + str(e.seq).encode(), now=T0)


def test_hl7_accept_once_then_original_ack_and_conflict(store: Store) -> None:
    row, created = _hl7_accept(store)
    assert created and row.ack == b"MSH|ACK\rMSA|AA|M1\r1" and row.audit_seq == 1
    again, created2 = _hl7_accept(store, ack=b"something else")
    assert not created2 and again == row
    assert store.hl7_count() == 1 and store.hl7_count("HIS|HOSP-A") == 1
    assert store.hl7_count("HIS|HOSP-B") == 0
    assert store.hl7_lookup("HIS|HOSP-A", "M1") == row
    assert store.hl7_lookup("HIS|HOSP-B", "M1") is None
    with pytest.raises(ConflictError) as info:
        _hl7_accept(store, message=HL7 + b"PV1|1\r")
    assert info.value.location == "MSH-10"
    assert store.hl7_count() == 1 and [e.record.action for e in store.audit_entries()] == [
        "hl7.receive"]


def test_hl7_failing_ack_builder_leaves_nothing_and_null_record_survives_reopen(
        backend: Backend) -> None:
    with backend.open() as store:
        def boom(entry: AuditEntry) -> bytes:
            raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            store.hl7_accept(sender="s", control_id="c", digest="d", message=HL7, record=None,
                             audit=rec("hl7.receive", "c"), make_ack=boom, now=T0)
        assert store.hl7_count() == 0 and store.audit_entries() == []
        row, _ = _hl7_accept(store, record=None)
    with backend.open() as store:
        assert store.hl7_lookup("HIS|HOSP-A", "M1") == row
        assert row.record is None and row.message == HL7 and store.verify_audit().ok


# --- audit --------------------------------------------------------------------------


def test_append_audit_and_head(store: Store) -> None:
    assert store.audit_head() == (0, "0" * 64) and store.verify_audit().count == 0
    e1 = store.append_audit(rec("tls.refused", "peer:127.0.0.1", outcome="denied"))
    e2 = store.append_audit(AuditRecord(time=T0, actor="hospital-a", action="x", subject="y",
                                        categories=[]))
    assert (e1.seq, e2.seq, e2.prev_hash) == (1, 2, e1.hash)
    assert store.audit_head() == (2, e2.hash)
    assert store.audit_entries(since_seq=1) == [e2]
    assert store.audit_entries() == [e1, e2]
    report = store.verify_audit()
    assert report.ok and report.count == 2 and report.head_hash == e2.hash


def test_audit_log_refuses_update_and_delete_through_sql(store: Store, backend: Backend) -> None:
    enqueue(store, "m1")
    for statement in ("UPDATE audit SET outcome='denied' WHERE seq=1", "DELETE FROM audit"):
        with pytest.raises(backend.raw_error()):
            backend.execute((statement, ()))
    assert store.verify_audit().ok and store.audit_head()[0] == 1


@pytest.mark.parametrize("how", ["edit", "delete", "swap"])
def test_tampering_names_the_entry(backend: Backend, how: str) -> None:
    with backend.open() as s:
        for i in range(1, 7):
            enqueue(s, f"m{i}", t=T0 + timedelta(seconds=i))
        assert s.verify_audit().ok
    k = 4
    edits: list[tuple[str, tuple[Any, ...]]] = [(g, ()) for g in backend.drop_audit_guards]
    if how == "edit":
        edits.append(("UPDATE audit SET outcome='failure' WHERE seq=?", (k,)))
    elif how == "delete":
        edits.append(("DELETE FROM audit WHERE seq=?", (k,)))
    else:
        edits += [("UPDATE audit SET seq=-1 WHERE seq=?", (k,)),
                  ("UPDATE audit SET seq=? WHERE seq=?", (k, k + 1)),
                  ("UPDATE audit SET seq=? WHERE seq=-1", (k + 1,))]
    backend.execute(*edits)
    with backend.open() as s:
        report = s.verify_audit()
        assert not report.ok and report.count == k - 1 and report.first_bad_seq == k


#: Stored values the bridge never writes, one column each: a clear resident ID, an outcome
#: and an operator outside their rules, categories that are not a list; then, per store,
#: what only its column types can hold (a time that is not a time in SQLite's text
#: column, a time made NULL once PostgreSQL's NOT NULL is dropped, and so on).
_FOREIGN_VALUES = [
    ("patient", {"": ["UPDATE audit SET patient='330108197706081354' WHERE seq=?"]}),
    ("outcome", {"": ["UPDATE audit SET outcome='ok' WHERE seq=?"]}),
    ("operator", {"": ["UPDATE audit SET operator='' WHERE seq=?"]}),
    ("actor", {"": ["UPDATE audit SET actor='' WHERE seq=?"]}),
    ("categories", {"": ["UPDATE audit SET categories='5' WHERE seq=?"]}),
    ("time", {"sqlite": ["UPDATE audit SET time='yesterday' WHERE seq=?"],
              "postgresql": ["ALTER TABLE audit ALTER COLUMN time DROP NOT NULL",
                             "UPDATE audit SET time=NULL WHERE seq=?"]}),
    ("categories", {"sqlite": ["UPDATE audit SET categories='Claim' WHERE seq=?"],
                    "postgresql": ["""UPDATE audit SET categories='{"Claim": 1}' WHERE seq=?"""]}),
    ("detail", {"sqlite": ["UPDATE audit SET detail=X'00' WHERE seq=?"],
                "postgresql": [("ALTER TABLE audit ALTER COLUMN detail TYPE bytea"
                                " USING convert_to(detail, 'UTF8')"),
                               "UPDATE audit SET detail='\\x00' WHERE seq=?"]}),
]


@pytest.mark.parametrize(("column", "edits"), _FOREIGN_VALUES)
def test_a_value_the_bridge_never_writes_names_the_entry_and_column(
        backend: Backend, column: str, edits: dict[str, list[str]]) -> None:
    with backend.open() as s:
        for i in range(1, 7):
            enqueue(s, f"m{i}", t=T0 + timedelta(seconds=i))
    k = 4
    statements = edits.get(backend.kind) or edits[""]
    backend.execute(*[(g, ()) for g in backend.drop_audit_guards],
                    *[(sql, (k,) if "?" in sql else ()) for sql in statements])
    with backend.open() as s:
        report = s.verify_audit()
        assert (report.ok, report.count, report.first_bad_seq) == (False, k - 1, k)
        assert report.reason is not None and f"entry {k} {column} " in report.reason
        # A patient column edited away from the pseudonym is no longer found by it.
        reads = [s.audit_entries] + ([] if column == "patient"
                                     else [lambda: s.audit_by_patient(PATIENT)])
        for read in reads:
            with pytest.raises(AuditEntryDamaged) as caught:
                read()
            assert (caught.value.seq, caught.value.column) == (k, column)
            assert "330108197706081354" not in str(caught.value)
        assert [e.seq for e in s.audit_entries(since_seq=k)] == [5, 6]


def test_both_stores_build_the_identical_chain(tmp_path: Path) -> None:
    """The same operations give byte-identical audit entries, hashes and heads."""

    def script(store: Store) -> None:
        for i in range(3):
            enqueue(store, f"m{i}", t=T0 + timedelta(seconds=i))
        store.claim_due("a-to-b", now=T0 + timedelta(seconds=5))
        store.mark_acked("m0", receipt=b"r", now=T0, audit=rec("claim.ack", "m0"))
        store.mark_dead("m1", error="e", now=T0, audit=rec("claim.send", "m1", outcome="failure",
                                                           detail="transport-error"))
        store.inbox_accept(sender="clinic-c", message_id="urn:uuid:7", digest="d", payload=b"p",
                           audit=rec("message.receive", "urn:uuid:7"), make_receipt=lambda e:
                           e.hash.encode(), now=T0)
        store.put_consent(consent_id="c1", patient_keys=[PATIENT], status="active",
                          resource=b"{}", now=T0, audit=rec("consent.put", "c1"))
        store.append_audit(AuditRecord(time=T0 + timedelta(microseconds=1), actor="hospital-a",
                                       action="tls.refused", subject="peer:x", outcome="denied",
                                       categories=["a", "b"], detail="unknown-ca"))

    with SQLiteStore(tmp_path / "a.db") as lite:
        script(lite)
        lite_entries, lite_report = lite.audit_entries(), lite.verify_audit()
    for pg in fresh_schema():
        with PostgresStore(pg.dsn, schema=pg.schema) as post:
            script(post)
            assert post.audit_entries() == lite_entries
            assert post.verify_audit() == lite_report and lite_report.ok


# --- consents -----------------------------------------------------------------------


def test_consents_upsert_and_keep_history(store: Store) -> None:
    store.put_consent(consent_id="c1", patient_keys=[PATIENT, "id:b", PATIENT], status="active",
                      resource=b'{"status":"active"}', now=T0, audit=rec("consent.put", "c1"))
    t1 = T0 + timedelta(days=1)
    store.put_consent(consent_id="c1", patient_keys=[PATIENT], status="inactive",
                      resource=b'{"status":"inactive"}', now=t1,
                      audit=rec("consent.put", "c1", t1))
    store.put_consent(consent_id="c0", patient_keys=["id:b"], status="active", resource=b"{}",
                      now=t1, audit=rec("consent.put", "c0", t1))
    assert store.list_consents() == [("c0", "active", b"{}"),
                                     ("c1", "inactive", b'{"status":"inactive"}')]
    current = store.get_consent("c1")
    assert current is not None and current.updated == t1 and current.patient_keys == (PATIENT,)
    assert [c.consent_id for c in store.consents_for_patient(PATIENT)] == ["c1"]
    assert [c.consent_id for c in store.consents_for_patient("id:b")] == ["c0"]
    history = store.consent_history("c1")
    assert [(h[0], h[1], h[2], h[3]) for h in history] == [
        ("active", b'{"status":"active"}', T0, 1), ("inactive", b'{"status":"inactive"}', t1, 2)]
    assert store.get_consent("nope") is None and store.consent_history("nope") == []


# --- durability and lifecycle ---------------------------------------------------------


def test_committed_state_survives_reopen(backend: Backend) -> None:
    with backend.open() as s:
        enqueue(s, "m1", b"payload-1")
        s.claim_due("a-to-b", now=T0)
        s.mark_acked("m1", receipt=b"rcpt", now=T0, audit=rec("claim.ack", "m1"))
        s.put_consent(consent_id="c1", patient_keys=[PATIENT], status="active", resource=b"{}",
                      now=T0, audit=rec("consent.put", "c1"))
        head = s.audit_head()
    with backend.open() as s:
        row = s.get_outbox("m1")
        assert row is not None and (row.state, row.payload, row.receipt) == (
            "acked", b"payload-1", b"rcpt")
        assert s.audit_head() == head and s.verify_audit().count == 3
        assert s.get_consent("c1") is not None
        enqueue(s, "m2")
        assert s.get_outbox("m2").seq == 2  # type: ignore[union-attr]


def test_closed_store_raises(backend: Backend) -> None:
    s = backend.open()
    s.close()
    s.close()
    with pytest.raises(StoreError):
        s.get_outbox("m")
    with pytest.raises(StoreError):
        enqueue(s, "m")


def test_unknown_schema_version_is_refused(backend: Backend) -> None:
    with backend.open():
        pass
    backend.execute(("UPDATE schema_version SET version = 99", ()))
    with pytest.raises(StoreError) as info:
        backend.open()
    assert "schema_version" in (info.value.location or "")


# --- delivery and sync bookkeeping (written once for both engines) -------------------


def test_backlog_summaries_and_sync_bookkeeping_on_both_engines(store: Store) -> None:
    from bridge.ledger.delivery import list_claims, problem_claims, release_backlog
    from bridge.ledger.sync import (
        acked_claims,
        held,
        inbound_streams,
        outbound_progress,
        record_received,
    )

    for m in ("m1", "m2", "m3", "m4"):
        enqueue(store, m)
    store.claim_due("a-to-b", now=T0, limit=4)
    later = T0 + timedelta(hours=1)
    store.mark_acked("m1", receipt=b"r1", now=T0, audit=rec("claim.ack", "m1"))
    store.mark_retry("m2", next_attempt=later, error="transport-error", now=T0, audit=None,
                     answer="HTTP 503")
    store.mark_retry("m3", next_attempt=later, error="transport-error", now=T0, audit=None)
    store.mark_dead("m4", error="gave-up:transport-error", answer="no answer: refused", now=T0,
                    audit=rec("claim.dead", "m4"))

    assert release_backlog(store, "a-to-b", now=T0) == 2
    assert [r.message_id for r in store.claim_due("a-to-b", now=T0)] == ["m2", "m3"]
    claims = list_claims(store, link="a-to-b", states=("dead", "sending"))
    assert [(c.seq, c.state, c.last_error, c.last_answer) for c in claims] == [
        (2, "sending", "transport-error", "HTTP 503"),
        (3, "sending", "transport-error", None),
        (4, "dead", "gave-up:transport-error", "no answer: refused"),
    ]
    assert claims[0].pending_since == T0 and claims[0].age_seconds(later) == 3600
    stuck = problem_claims(store, now=T0 + timedelta(minutes=11))
    assert [c.message_id for c in stuck] == ["m2", "m3", "m4"]
    assert [c.message_id for c in problem_claims(store, now=T0)] == ["m4"]
    assert outbound_progress(store, "a-to-b") == {
        "enqueued": 4, "sent": 4, "acked": 1, "acked_contiguous": 1}
    assert acked_claims(store, "a-to-b") == [(1, "m1", b"r1")]

    def make_receipt(entry: AuditEntry) -> bytes:
        return f"receipt {entry.seq}".encode()

    for seq in (1, 2, 5):
        mid = f"urn:uuid:{seq}"

        def note(tx: Any, row: Any, seq: int = seq) -> None:
            record_received(tx, sender="hospital-a", stream="a-to-b", seq=seq,
                            message_id=row.message_id, now=T0)

        store.inbox_accept(sender="hospital-a", message_id=mid, digest=digest(mid.encode()),
                           payload=mid.encode(), audit=rec("message.receive", mid),
                           make_receipt=make_receipt, now=T0, within=note)
    [stream] = inbound_streams(store)
    assert (stream.received, stream.highest, stream.contiguous, stream.gaps) == (
        3, 5, 2, ((3, 4),))
    found = held(store, "hospital-a", ["urn:uuid:1", "urn:uuid:5", "urn:uuid:9"])
    assert sorted(found) == ["urn:uuid:1", "urn:uuid:5"]
    entry = next(e for e in store.audit_entries() if e.seq == found["urn:uuid:5"].audit_seq)
    assert entry.record.subject == "urn:uuid:5" and found["urn:uuid:5"].audit_hash == entry.hash
    assert held(store, "clinic-c", ["urn:uuid:1"]) == {}


def test_numbers_after_the_partners_highest_and_collisions_on_both_engines(
    store: Store,
) -> None:
    # PROTOCOL P-SYNC-7 and P-SYNC-8: a store that learns its partner holds numbers
    # beyond its own (it was restored from a backup) numbers new claims after them; a
    # receiver keeps a number that arrives under a second identity apart.
    from bridge.ledger.sync import (
        OutboundSummary,
        inbound_streams,
        outbound_summary,
        record_received,
        reused_numbers,
        save_outbound,
    )

    for m in ("m1", "m2", "m3", "m4"):
        enqueue(store, m)
    saved = save_outbound(store, OutboundSummary(
        "a-to-b", 6, T0, 4, 0, 0, 0, None, partner_highest=7, collisions=(6, 5)))
    assert (saved.partner_highest, saved.own_highest, saved.collisions) == (7, 4, (5, 6))
    assert outbound_summary(store, "a-to-b") == saved
    enqueue(store, "m8")
    enqueue(store, "other", link="a-to-c")
    assert [store.get_outbox(m).seq for m in ("m8", "other")] == [8, 1]
    assert reused_numbers(store, saved) == []
    # A partner that says only its contiguous number: that number is the floor.
    older = save_outbound(store, OutboundSummary("a-to-c", 3, T0, 0, 0, 0, 0, None))
    assert older.partner_highest == 3 and older.own_highest == 1
    enqueue(store, "next", link="a-to-c")
    assert store.get_outbox("next").seq == 4

    def arrive(mid: str, seq: int) -> bool:
        with store.transaction("test") as tx:
            return record_received(tx, sender="hospital-a", stream="a-to-b", seq=seq,
                                   message_id=mid, now=T0)

    assert [arrive(f"urn:uuid:{n}", n) for n in (1, 2, 3)] == [True, True, True]
    assert arrive("urn:uuid:2", 2)  # the same claim again
    assert not arrive("urn:uuid:other-2", 2)
    assert not arrive("urn:uuid:other-2", 2)  # its resend is not counted again
    assert not arrive("urn:uuid:third-2", 2)
    [stream] = inbound_streams(store)
    assert (stream.received, stream.highest, stream.contiguous, stream.collisions) == (
        5, 3, 3, (2,))
    assert stream.to_json()["collisions"] == [2]


def test_only_the_sender_holding_a_claim_now_settles_it(backend: Backend) -> None:
    # Two processes on one store: the first one's lease ran out and the other took the
    # claim. The first one's late answer is not recorded over it.
    with backend.open() as first, backend.open() as other:
        enqueue(first, "m1")
        [row] = first.claim_due("a-to-b", now=T0, lease=timedelta(seconds=1))
        later = T0 + timedelta(seconds=2)
        [again] = other.claim_due("a-to-b", now=later, lease=timedelta(minutes=2))
        assert (row.message_id, again.message_id, again.fate_unknown) == ("m1", "m1", True)
        with pytest.raises(TransitionError, match="another sender holds this claim"):
            first.mark_acked("m1", receipt=b"{}", now=later, audit=rec("claim.ack", "m1", later))
        with pytest.raises(TransitionError, match="another sender holds this claim"):
            first.mark_retry("m1", next_attempt=later, error="timeout", now=later,
                             audit=rec("claim.retry", "m1", later))
        assert first.get_outbox("m1").state == OutboxState.SENDING  # nothing recorded
        done = other.mark_acked("m1", receipt=b"{}", now=later, audit=rec("claim.ack", "m1", later))
        assert done.state == OutboxState.ACKED
