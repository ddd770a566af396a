"""Outbox bookkeeping written once for both stores: the backlog, summaries, requeues.

The outbox's own transitions (claim, acknowledge, retry, give up) are hand-tuned per
engine in :mod:`bridge.ledger.sqlite` and :mod:`bridge.ledger.postgres`; what an
operator or the circuit needs on top of them is here, through
:class:`bridge.ledger.portable.Tx`. The base ``outbox`` table keeps its times as TEXT
on SQLite and TIMESTAMPTZ on PostgreSQL, so times are passed and read through
:func:`_when` and :func:`_time`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bridge.ledger.audit import format_time, parse_time
from bridge.ledger.states import OutboxState

if TYPE_CHECKING:
    from bridge.ledger import Store
    from bridge.ledger.portable import Tx

#: States in which a claim is still on its way.
PENDING = (OutboxState.QUEUED.value, OutboxState.SENDING.value)


def _when(tx: Tx, value: datetime) -> Any:
    return format_time(value) if tx.dialect == "sqlite" else value


def _time(value: Any) -> datetime:
    return parse_time(value) if isinstance(value, str) else value


def release_backlog(store: Store, link: str, *, now: datetime) -> int:
    """Make every queued claim of ``link`` due now (the partner is back); how many moved."""
    with store.transaction("release_backlog", durable=False) as tx:
        t = _when(tx, now)
        cur = tx.execute(
            "UPDATE outbox SET next_attempt=? WHERE link=? AND state='queued' AND next_attempt>?",
            (t, link, t),
        )
        return max(cur.rowcount, 0)


def release_orphaned(store: Store, *, now: datetime) -> tuple[int, int]:
    """Make every claim and every hand-off left ``sending`` due now; how many of each.

    Only for a process that holds the store's dispatch lock (``hold_dispatch``), before
    it sends anything: then whatever is ``sending`` was left by a process that is gone
    (a crash, ``kill -9``), and waiting for its lease to run out would only delay it.
    Each is taken again as after its lease ran out: a claim with its fate unknown (it
    may have reached the partner, who deduplicates it), a hand-off as a new attempt.
    The process that claimed it is gone (``hold_dispatch`` says so); and once another
    claims it, a late answer from the first would not be recorded anyway (a claim names
    its sender in ``claimed_by``, a hand-off is settled under its lease)."""
    with store.transaction("release_orphaned", durable=False) as tx:
        t = _when(tx, now)
        claims = tx.execute(
            "UPDATE outbox SET lease_until=? WHERE state='sending' AND lease_until>?", (t, t))
        # The hand-off queue writes its times as text on every store.
        h = format_time(now)
        handoffs = tx.execute(
            "UPDATE handoff SET lease_until=? WHERE state='sending' AND lease_until>?", (h, h))
        return max(claims.rowcount, 0), max(handoffs.rowcount, 0)


@dataclass(frozen=True)
class ClaimSummary:
    """One outbox row as an operator sees it: no payload, no receipt, no health data."""

    message_id: str
    link: str
    seq: int
    partner: str
    state: str
    attempts: int
    fate_unknown: bool
    last_error: str | None
    last_answer: str | None
    created: datetime
    updated: datetime
    pending_since: datetime
    next_attempt: datetime

    def age_seconds(self, now: datetime) -> float:
        """Seconds since the current delivery effort began (enqueue or last requeue)."""
        return max((now - self.pending_since).total_seconds(), 0.0)

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "link": self.link,
            "seq": self.seq,
            "partner": self.partner,
            "state": self.state,
            "attempts": self.attempts,
            "fate_unknown": self.fate_unknown,
            "reason": self.last_error,
            "last_answer": self.last_answer,
            "created": format_time(self.created),
            "updated": format_time(self.updated),
            "pending_since": format_time(self.pending_since),
            "age_seconds": round(self.age_seconds(now), 1),
        }


_COLS = (
    "message_id, link, seq, partner, state, attempts, fate_unknown, last_error, last_answer,"
    " created, updated, since, next_attempt"
)


def _summary(r: Any) -> ClaimSummary:
    created = _time(r[9])
    return ClaimSummary(
        message_id=r[0],
        link=r[1],
        seq=int(r[2]),
        partner=r[3],
        state=r[4],
        attempts=int(r[5]),
        fate_unknown=bool(r[6]),
        last_error=r[7],
        last_answer=r[8],
        created=created,
        updated=_time(r[10]),
        pending_since=_time(r[11]) if r[11] is not None else created,
        next_attempt=_time(r[12]),
    )


def list_claims(
    store: Store,
    *,
    link: str | None = None,
    states: tuple[str, ...] | None = None,
    limit: int | None = None,
) -> list[ClaimSummary]:
    """Outbox rows (without payloads), by link and seq, filtered by link and states."""
    where: list[str] = []
    params: list[Any] = []
    if link is not None:
        where.append("link=?")
        params.append(link)
    if states:
        where.append("state IN (" + ", ".join("?" for _ in states) + ")")
        params.extend(OutboxState(s).value for s in states)
    sql = f"SELECT {_COLS} FROM outbox"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY link, seq"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    with store.read("list_claims") as tx:
        return [_summary(r) for r in tx.all(sql, params)]


def problem_claims(
    store: Store, *, now: datetime, stuck_after_seconds: float = 600.0
) -> list[ClaimSummary]:
    """Every dead claim, and every pending one that has failed and is older than
    ``stuck_after_seconds`` (each with its reason and last answer)."""
    claims = list_claims(store, states=(OutboxState.DEAD.value, *PENDING))
    return [
        c
        for c in claims
        if c.state == OutboxState.DEAD.value
        or (c.last_error is not None and c.age_seconds(now) >= stuck_after_seconds)
    ]


__all__ = ["ClaimSummary", "list_claims", "problem_claims", "release_backlog", "release_orphaned"]
