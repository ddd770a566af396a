"""The hand-off queue: received claims waiting for the receiver's own systems.

One row per (destination, claim), created by :func:`queue_hook` inside the inbox
transaction that stores the claim and signs its receipt, so a claim acknowledged to
its sender is always queued and nothing is queued that was not stored. The claim and
the receipt stay in the inbox; a row holds the hand-off's state, its order among the
claims of one sender (``seq``), its retries and, for a failing destination, the last
error code and the destination's last answer (sealed: an endpoint may echo data).

Order: a worker takes, per sender, only a prefix of that sender's waiting rows in
``seq`` order, and stops at the first row that is not due or is leased by someone
else, so two hand-offs of one sender to one destination are never in flight out of
order, on one process or several sharing a PostgreSQL store. A dead row does not hold
back the rows behind it (one claim the destination cannot take does not stop a
hospital's whole stream); when it is requeued it is handed over late, and the
``sequence`` in the envelope lets a consumer see that.

Written once for both engines against :class:`bridge.ledger.portable.Tx`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from bridge.errors import NotFound
from bridge.handoff import HandoffState, Route, destinations_for
from bridge.ledger.audit import AuditRecord, format_time, parse_time

if TYPE_CHECKING:
    from bridge.ledger import Store
    from bridge.ledger.portable import Tx
    from bridge.ledger.sqlite import InboxRow

_ANSWER_CONTEXT = "handoff.last_answer"
_COLS = (
    "id, destination, sender, message_id, link, seq, state, attempts, due_since,"
    " next_attempt, lease_until, last_error, received, created, updated, delivered"
)


@dataclass(frozen=True)
class HandoffRow:
    """One claim's hand-off to one destination (no health data)."""

    id: int
    destination: str
    sender: str
    message_id: str
    link: str
    seq: int
    state: HandoffState
    attempts: int
    due_since: datetime
    next_attempt: datetime
    lease_until: datetime | None
    last_error: str | None
    received: datetime
    created: datetime
    updated: datetime
    delivered: datetime | None


def _row(r: Sequence[Any]) -> HandoffRow:
    return HandoffRow(
        id=int(r[0]), destination=r[1], sender=r[2], message_id=r[3], link=r[4],
        seq=int(r[5]), state=HandoffState(r[6]), attempts=int(r[7]),
        due_since=parse_time(r[8]), next_attempt=parse_time(r[9]),
        lease_until=parse_time(r[10]) if r[10] is not None else None,
        last_error=r[11], received=parse_time(r[12]), created=parse_time(r[13]),
        updated=parse_time(r[14]), delivered=parse_time(r[15]) if r[15] is not None else None,
    )


@dataclass(frozen=True)
class Claimed:
    """A hand-off taken for sending, with what is handed over (from the inbox)."""

    row: HandoffRow
    inbox: InboxRow | None  # None only if the inbox row vanished (never, by design)


# --- queueing, inside the inbox transaction ---------------------------------------------


def queue_hook(
    all_routes: Sequence[Route], *, sender: str, link: str, now: datetime
) -> Callable[[Tx, InboxRow], None] | None:
    """What :meth:`Store.inbox_accept` runs in its transaction for a new claim, or None
    when no destination takes claims from ``sender`` on ``link``."""
    targets = destinations_for(all_routes, sender, link)
    if not targets:
        return None

    def queue(tx: Tx, row: InboxRow) -> None:
        queue_in(tx, targets, row, link=link, now=now)

    return queue


def queue_in(
    tx: Tx, destinations: Sequence[str], row: InboxRow, *, link: str, now: datetime
) -> None:
    """Queue the stored claim ``row`` for each destination, next in its sender's line."""
    t = format_time(now)
    for destination in destinations:
        tx.execute(
            "INSERT INTO handoff (destination, sender, message_id, link, seq, state, attempts,"
            " due_since, next_attempt, received, created, updated)"
            " SELECT ?, ?, ?, ?, COALESCE(MAX(seq), 0) + 1, 'queued', 0, ?, ?, ?, ?, ?"
            " FROM handoff WHERE destination=? AND sender=?",
            (destination, row.sender, row.message_id, link, t, t, format_time(row.received),
             t, t, destination, row.sender),
        )


# --- the worker's side ------------------------------------------------------------------


def claim(
    store: Store, destination: str, *, now: datetime, limit: int, lease: timedelta
) -> list[list[Claimed]]:
    """Take due hand-offs of ``destination`` for sending: per sender, up to ``limit`` rows
    in ``seq`` order, stopping at the first that is not due. Returns one list per sender.

    Due is ``queued`` with ``next_attempt <= now``, or ``sending`` whose lease expired
    (its worker died). Each taken row becomes ``sending`` with ``attempts + 1``.
    """
    t = format_time(now)
    until = format_time(now + lease)
    lines: list[list[HandoffRow]] = []
    # PostgreSQL names the worker, whose leases end early when it is gone (see
    # bridge.ledger.postgres); on SQLite a lock file beside the store tells that.
    worker = store.worker_id if store.dialect == "postgresql" else None
    claimer = ", claimed_by=?" if worker is not None else ""
    with store.transaction("handoff_claim", durable=False) as tx:
        heads = tx.all(
            "SELECT sender, MIN(seq) FROM handoff WHERE destination=?"
            " AND state IN ('queued', 'sending') GROUP BY sender ORDER BY sender",
            (destination,),
        )
        for sender, head in heads:
            rows = [_row(r) for r in tx.all(
                f"SELECT {_COLS} FROM handoff WHERE destination=? AND sender=?"
                " AND state IN ('queued', 'sending') AND seq>=? ORDER BY seq LIMIT ?",
                (destination, sender, head, limit))]
            due: list[HandoffRow] = []
            for row in rows:
                if not _due(row, now):
                    break
                due.append(row)
            if not due:
                continue
            # The conditional update is the lock: a row a concurrent worker took first
            # is no longer due, is not returned, and the line stops before it.
            marks = ",".join("?" for _ in due)
            got = {int(r[0]) for r in tx.all(
                "UPDATE handoff SET state='sending', attempts=attempts+1, lease_until=?,"
                f" updated=?{claimer} WHERE id IN ({marks}) AND ((state='queued'"
                " AND next_attempt<=?) OR (state='sending' AND lease_until<=?)) RETURNING id",
                (until, t, *((worker,) if worker is not None else ()),
                 *(row.id for row in due), t, t))}
            taken: list[HandoffRow] = []
            for row in due:
                if row.id not in got:
                    break
                taken.append(row)
            beyond = [row.id for row in due[len(taken):] if row.id in got]
            if beyond:
                tx.execute(
                    "UPDATE handoff SET state='queued', attempts=attempts-1, lease_until=NULL"
                    f" WHERE id IN ({','.join('?' for _ in beyond)})", beyond)
            if taken:
                lines.append(taken)
        held = {
            (row.sender, row.message_id): row
            for taken in lines for row in _inbox_rows(tx, taken[0].sender,
                                                      [r.message_id for r in taken])
        }
    return [
        [
            Claimed(
                row=replace(row, state=HandoffState.SENDING, attempts=row.attempts + 1,
                            lease_until=parse_time(until)),
                inbox=held.get((row.sender, row.message_id)),
            )
            for row in taken
        ]
        for taken in lines
    ]


def _due(row: HandoffRow, now: datetime) -> bool:
    if row.state == HandoffState.QUEUED:
        return row.next_attempt <= now
    return row.lease_until is not None and row.lease_until <= now


def _inbox_rows(tx: Tx, sender: str, message_ids: list[str]) -> list[InboxRow]:
    """The stored claims of one sender, read in the claiming transaction (one query per
    line rather than a lookup per claim). The payload is sealed as the base stores
    write it (``bridge.ledger.sqlite`` and ``postgres``, context ``inbox.payload``)."""
    from bridge.ledger.sqlite import InboxRow

    marks = ",".join("?" for _ in message_ids)
    return [
        InboxRow(sender=r[0], message_id=r[1], digest=r[2],
                 payload=tx.unseal(r[3], context="inbox.payload") or b"",
                 receipt=tx.unseal(r[4], context="inbox.receipt") or b"", audit_seq=int(r[5]), received=_as_time(r[6]))
        for r in tx.all(
            "SELECT sender, message_id, digest, payload, receipt, audit_seq, received"
            f" FROM inbox WHERE sender=? AND message_id IN ({marks})",
            (sender, *message_ids))
    ]


def mark_delivered(
    store: Store, rows: Sequence[HandoffRow], *, now: datetime, audits: Sequence[AuditRecord]
) -> int:
    """``sending -> delivered`` for rows the destination took, each with its audit entry.

    Not synced to disk (a power loss can undo it; the claim is then handed over again
    and the destination recognises it). Returns how many rows were still ours.
    """
    if not rows:
        return 0
    t = format_time(now)
    leases: dict[str, list[int]] = {}
    for row in rows:  # rows claimed together share one lease: one statement per claim
        leases.setdefault(_lease(row), []).append(row.id)
    with store.transaction("handoff_delivered", durable=False) as tx:
        ours = {int(r[0]) for lease, ids in leases.items() for r in tx.all(
            "UPDATE handoff SET state='delivered', delivered=?, updated=?, lease_until=NULL,"
            f" last_error=NULL, last_answer=NULL WHERE id IN ({','.join('?' for _ in ids)})"
            " AND state='sending' AND lease_until=? RETURNING id", (t, t, *ids, lease))}
        for row, audit in zip(rows, audits, strict=True):
            if row.id in ours:
                tx.append_audit(audit)
    return len(ours)


def mark_failed(
    store: Store,
    row: HandoffRow,
    *,
    error: str,
    answer: bytes | None,
    now: datetime,
    retry_at: datetime | None,
    audit: AuditRecord | None,
) -> None:
    """One failed attempt: ``sending -> queued`` due at ``retry_at``, or ``-> dead`` when
    ``retry_at`` is None. ``error`` is a code; ``answer`` is what the destination said
    (sealed, shown only by ``bridge inbox show``)."""
    t = format_time(now)
    state = HandoffState.QUEUED if retry_at is not None else HandoffState.DEAD
    with store.transaction("handoff_failed", durable=retry_at is None) as tx:
        sealed = tx.seal(answer, context=_ANSWER_CONTEXT) if answer is not None else None
        cur = tx.execute(
            "UPDATE handoff SET state=?, next_attempt=?, last_error=?, last_answer=?,"
            " lease_until=NULL, updated=? WHERE id=? AND state='sending' AND lease_until=?",
            (state.value, format_time(retry_at) if retry_at is not None else t, error, sealed,
             t, row.id, _lease(row)),
        )
        if cur.rowcount == 1 and audit is not None:
            tx.append_audit(audit)


def _lease(row: HandoffRow) -> str:
    """The lease a worker holds on a row it claimed, as stored: the fencing token of
    every update it makes. A worker whose lease expired and was taken by another (its
    broker connection stalled past the lease) changes nothing of the other's claim."""
    return format_time(row.lease_until) if row.lease_until is not None else ""


def release(store: Store, rows: Sequence[HandoffRow], *, now: datetime) -> None:
    """Give back rows taken but not attempted (their line stopped before them)."""
    if not rows:
        return
    t = format_time(now)
    with store.transaction("handoff_release", durable=False) as tx:
        tx.executemany(
            "UPDATE handoff SET state='queued', attempts=attempts-1, lease_until=NULL,"
            " updated=? WHERE id=? AND state='sending' AND lease_until=?",
            [(t, row.id, _lease(row)) for row in rows],
        )


# --- operators ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """Which claims an operator command is about (None = any)."""

    sender: str | None = None
    message_id: str | None = None
    destination: str | None = None
    state: str | None = None  # hand-off state
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before


def _where(f: Filter, *, alias: str = "h") -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("sender", f.sender), ("message_id", f.message_id),
                          ("destination", f.destination), ("state", f.state)):
        if value is not None:
            clauses.append(f"{alias}.{column}=?")
            params.append(value)
    if f.since is not None:
        clauses.append(f"{alias}.received>=?")
        params.append(format_time(f.since))
    if f.until is not None:
        clauses.append(f"{alias}.received<?")
        params.append(format_time(f.until))
    return (" AND ".join(clauses) or "1=1"), params


def requeue(
    store: Store, f: Filter, *, now: datetime, audit: Callable[[HandoffRow], AuditRecord],
    states: Sequence[HandoffState] = (HandoffState.DEAD,),
) -> list[HandoffRow]:
    """Put the hand-offs ``f`` selects, in one of ``states``, back in their line, due now
    and with a fresh give-up duration; each is audited (the audit entry keeps the state
    and error it leaves). Returns the rows as they were before."""
    wanted = [s.value for s in states if s in (HandoffState.DEAD, HandoffState.DELIVERED)]
    if not wanted:
        return []
    where, params = _where(f, alias="handoff")
    t = format_time(now)
    marks = ",".join("?" for _ in wanted)
    with store.transaction("handoff_requeue") as tx:
        rows = [_row(r) for r in tx.all(
            f"SELECT {_COLS} FROM handoff WHERE {where} AND state IN ({marks})"
            f" ORDER BY destination, sender, seq{tx.for_update}", (*params, *wanted))]
        for row in rows:
            tx.execute(
                "UPDATE handoff SET state='queued', attempts=0, due_since=?, next_attempt=?,"
                " lease_until=NULL, last_error=NULL, last_answer=NULL, updated=? WHERE id=?",
                (t, t, t, row.id))
            tx.append_audit(audit(row))
    return rows


def queue_missing(
    store: Store, route: Route, f: Filter, *, now: datetime, link_for: Callable[[str], str],
    audit: Callable[[str, str], AuditRecord],
) -> int:
    """Queue for ``destination`` the stored claims it takes that it has no hand-off for
    (claims accepted before the destination was configured). ``link_for`` names the
    inbound link a sender's claims arrive on. Returns how many."""
    destination = route.destination
    clauses = [("NOT EXISTS (SELECT 1 FROM handoff h WHERE h.destination=?"
                " AND h.sender=i.sender AND h.message_id=i.message_id)")]
    params: list[Any] = [destination]
    if f.sender is not None:
        clauses.append("i.sender=?")
        params.append(f.sender)
    if f.message_id is not None:
        clauses.append("i.message_id=?")
        params.append(f.message_id)
    count = 0
    with store.transaction("handoff_queue_missing") as tx:
        found = tx.all(
            "SELECT i.sender, i.message_id, i.received FROM inbox i WHERE "
            + " AND ".join(clauses) + " ORDER BY i.id", params)
        for sender, message_id, received in found:
            when = _as_time(received)
            if (f.since is not None and when < f.since) or (f.until is not None and
                                                              when >= f.until):
                continue
            link = link_for(sender)
            if not route.takes(sender, link):
                continue
            _insert_missing(tx, destination, sender, message_id, link, when, now)
            tx.append_audit(audit(sender, message_id))
            count += 1
    return count


def _insert_missing(tx: Tx, destination: str, sender: str, message_id: str, link: str,
                    received: datetime, now: datetime) -> None:
    t = format_time(now)
    tx.execute(
        "INSERT INTO handoff (destination, sender, message_id, link, seq, state, attempts,"
        " due_since, next_attempt, received, created, updated)"
        " SELECT ?, ?, ?, ?, COALESCE(MAX(seq), 0) + 1, 'queued', 0, ?, ?, ?, ?, ?"
        " FROM handoff WHERE destination=? AND sender=?",
        (destination, sender, message_id, link, t, t, format_time(received), t, t,
         destination, sender),
    )


def _as_time(value: Any) -> datetime:
    """An inbox ``received`` value: TEXT on SQLite, TIMESTAMPTZ on PostgreSQL."""
    return value if isinstance(value, datetime) else parse_time(str(value))


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxEntry:
    """One stored claim as an operator lists it (no health data)."""

    sender: str
    message_id: str
    digest: str
    audit_seq: int
    received: datetime
    handoffs: tuple[HandoffRow, ...]


def list_inbox(store: Store, f: Filter, *, limit: int = 100) -> list[InboxEntry]:
    """Stored claims, oldest first, with their hand-offs; ``f.state`` and
    ``f.destination`` select claims having such a hand-off."""
    clauses: list[str] = []
    params: list[Any] = []
    if f.sender is not None:
        clauses.append("i.sender=?")
        params.append(f.sender)
    if f.message_id is not None:
        clauses.append("i.message_id=?")
        params.append(f.message_id)
    if f.state is not None or f.destination is not None:
        sub, sub_params = _where(Filter(destination=f.destination, state=f.state), alias="h")
        clauses.append("EXISTS (SELECT 1 FROM handoff h WHERE h.sender=i.sender"
                       f" AND h.message_id=i.message_id AND {sub})")
        params.extend(sub_params)
    with store.read("inbox_list") as tx:
        for column, value, op in (("received", f.since, ">="), ("received", f.until, "<")):
            if value is not None:
                clauses.append(f"i.{column}{op}?")
                params.append(format_time(value) if tx.dialect == "sqlite" else value)
        where = " AND ".join(clauses) or "1=1"
        found = tx.all(
            "SELECT i.sender, i.message_id, i.digest, i.audit_seq, i.received FROM inbox i"
            f" WHERE {where} ORDER BY i.id LIMIT ?", (*params, limit))
        entries: list[InboxEntry] = []
        for sender, message_id, digest, audit_seq, received in found:
            rows = tuple(_row(r) for r in tx.all(
                f"SELECT {_COLS} FROM handoff WHERE sender=? AND message_id=?"
                " ORDER BY destination", (sender, message_id)))
            entries.append(InboxEntry(sender, message_id, digest, int(audit_seq),
                                      _as_time(received), rows))
    return entries


def last_answer(store: Store, row_id: int) -> bytes | None:
    """What the destination last answered for a failing hand-off (may hold data)."""
    with store.read("handoff_answer") as tx:
        r = tx.one("SELECT last_answer FROM handoff WHERE id=?", (row_id,))
        if r is None:
            raise NotFound("no such hand-off", location=f"handoff[{row_id}]")
        return tx.unseal(r[0], context=_ANSWER_CONTEXT)


def destinations_held(store: Store) -> list[str]:
    """Every destination the queue holds waiting or dead hand-offs for, configured or
    not (a destination renamed or removed from the configuration leaves its rows)."""
    with store.read("handoff_destinations") as tx:
        return sorted(str(r[0]) for r in tx.all(
            "SELECT DISTINCT destination FROM handoff"
            " WHERE state IN ('queued', 'sending', 'dead')"))


@dataclass(frozen=True)
class DestinationStatus:
    """How one destination is doing, for ``bridge status``."""

    counts: dict[str, int]
    oldest_waiting: HandoffRow | None
    failing: HandoffRow | None  # the waiting row with the most attempts, if it has failed
    dead: tuple[HandoffRow, ...]


def destination_status(store: Store, destination: str, *, dead_limit: int = 5) -> DestinationStatus:
    """Counts per state, the oldest waiting hand-off, a failing one and a few dead ones."""
    counts = {s.value: 0 for s in HandoffState}
    with store.read("handoff_status") as tx:
        for state, n in tx.all(
            "SELECT state, COUNT(*) FROM handoff WHERE destination=? GROUP BY state",
            (destination,),
        ):
            counts[str(state)] = int(n)
        oldest = tx.one(
            f"SELECT {_COLS} FROM handoff WHERE destination=? AND state IN ('queued', 'sending')"
            " ORDER BY created, id LIMIT 1", (destination,))
        failing = tx.one(
            f"SELECT {_COLS} FROM handoff WHERE destination=? AND state IN ('queued', 'sending')"
            " AND last_error IS NOT NULL ORDER BY attempts DESC, id LIMIT 1", (destination,))
        dead = tx.all(
            f"SELECT {_COLS} FROM handoff WHERE destination=? AND state='dead'"
            " ORDER BY sender, seq LIMIT ?", (destination, dead_limit))
    return DestinationStatus(
        counts=counts,
        oldest_waiting=_row(oldest) if oldest is not None else None,
        failing=_row(failing) if failing is not None else None,
        dead=tuple(_row(r) for r in dead),
    )


__all__ = [
    "Claimed",
    "DestinationStatus",
    "Filter",
    "HandoffRow",
    "InboxEntry",
    "claim",
    "destination_status",
    "destinations_held",
    "last_answer",
    "list_inbox",
    "mark_delivered",
    "mark_failed",
    "queue_hook",
    "queue_in",
    "queue_missing",
    "release",
    "requeue",
]
