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
