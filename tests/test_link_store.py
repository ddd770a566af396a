"""The async face of the ledger: one worker thread, and group commit for enqueues."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path

from bridge.errors import ConflictError
from bridge.ledger.audit import AuditRecord
from bridge.ledger.sqlite import SQLiteStore
from bridge.link.store import AsyncStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def request(mid: str, payload: bytes) -> dict[str, object]:
    return {
        "message_id": mid,
        "link": "a-to-b",
        "partner": "insurer-b",
        "payload": payload,
        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
        "audit": AuditRecord(time=T0, actor="hospital-a", action="claim.enqueue", subject=mid),
        "now": T0,
    }


async def test_concurrent_enqueues_share_transactions_and_keep_their_own_answers(
    tmp_path: Path,
) -> None:
    sync = SQLiteStore(tmp_path / "s.sqlite")
    groups: list[int] = []
    original = sync.enqueue_many

    def counting(requests):  # type: ignore[no-untyped-def]
        groups.append(len(requests))
        return original(requests)

    sync.enqueue_many = counting  # type: ignore[method-assign]
    db = AsyncStore(sync)
    try:
        await db.enqueue(**request("m0", b"zero"))
        calls = [db.enqueue(**request(f"m{i}", f"p{i}".encode())) for i in range(1, 41)]
        calls.append(db.enqueue(**request("m0", b"different")))  # conflicts with m0
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(answers[-1], ConflictError)
        rows = answers[:-1]
        assert all(not isinstance(r, BaseException) for r in rows)
        assert sorted(r.seq for r in rows) == list(range(2, 42))  # type: ignore[union-attr]
        assert sum(groups) == 42
        assert len(groups) < 42  # concurrent calls were committed together
        report = await db.verify_audit()
        assert report.ok and report.count == 41
    finally:
        db.close()


async def test_a_failing_group_fails_every_caller_in_it(tmp_path: Path) -> None:
    sync = SQLiteStore(tmp_path / "s.sqlite")
    db = AsyncStore(sync)
    sync.close()  # the store is gone: every caller hears about it, none hangs
    try:
        answers = await asyncio.gather(
            *(db.enqueue(**request(f"m{i}", b"x")) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(a, Exception) for a in answers)
    finally:
        db._executor.shutdown(wait=True)


async def test_concurrent_accepts_share_transactions_and_keep_their_own_answers(
    tmp_path: Path,
) -> None:
    sync = SQLiteStore(tmp_path / "s.sqlite")
    groups: list[int] = []
    original = sync.inbox_accept_many

    def counting(requests):  # type: ignore[no-untyped-def]
        groups.append(len(requests))
        return original(requests)

    sync.inbox_accept_many = counting  # type: ignore[method-assign]
    db = AsyncStore(sync)

    def accept(mid: str, digest: str) -> object:
        return db.inbox_accept(
            sender="hospital-a", message_id=mid, digest=digest, payload=digest.encode(),
            audit=AuditRecord(time=T0, actor="insurer-b", action="message.receive",
                              subject=mid),
            make_receipt=lambda e: f"receipt {e.seq}".encode(), now=T0)

    try:
        await accept("m0", "d0")
        calls = [accept(f"m{i}", f"d{i}") for i in range(1, 41)]
        calls.append(accept("m0", "other"))  # the identity again with other content
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(answers[-1], ConflictError)
        rows = [a for a in answers[:-1] if isinstance(a, tuple)]
        assert len(rows) == 40 and all(created for _, created in rows)
        assert sorted(row.audit_seq for row, _ in rows) == list(range(2, 42))
        assert all(row.receipt == f"receipt {row.audit_seq}".encode() for row, _ in rows)
        assert sum(groups) == 42 and len(groups) < 42  # committed together
        assert (await db.verify_audit()).ok and await db.inbox_count() == 41
    finally:
        db.close()


async def test_concurrent_acknowledgements_share_transactions(tmp_path: Path) -> None:
    sync = SQLiteStore(tmp_path / "s.sqlite")
    groups: list[int] = []
    original = sync.mark_acked_many

    def counting(requests):  # type: ignore[no-untyped-def]
        groups.append(len(requests))
        return original(requests)

    sync.mark_acked_many = counting  # type: ignore[method-assign]
    db = AsyncStore(sync)
    try:
        for i in range(30):
            await db.enqueue(**request(f"m{i}", f"p{i}".encode()))
        await db.claim_due("a-to-b", now=T0, limit=30)
        answers = await asyncio.gather(*(
            db.mark_acked(f"m{i}", receipt=b"r", now=T0,
                          audit=AuditRecord(time=T0, actor="hospital-a", action="claim.ack",
                                            subject=f"m{i}"))
            for i in range(30)))
        assert sorted(a.message_id for a in answers) == sorted(f"m{i}" for i in range(30))
        assert all(a.state.value == "acked" for a in answers)
        assert sum(groups) == 30 and len(groups) < 30
        assert (await db.verify_audit()).ok
    finally:
        db.close()
