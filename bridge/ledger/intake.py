"""Intake tables: HL7 v2 messages accepted, visits and their parts, records and their routing.

Written once for SQLite and PostgreSQL against :class:`~bridge.ledger.portable.Tx`
(tables from migration ``0700-intake`` in :mod:`bridge.ledger.migrations`). Every column holding health data (messages,
records, visit parts, what filing knows of a visit) is sealed.

Tables
    ``hl7_inbox`` (base schema): one row per accepted message, with its own DE record
    (none for a message that is only a part of a visit) and the ACK answered for it.
    ``hl7_warning``: the warnings about fields no mapping reads, per message.
    ``visit``: one row per visit, keyed by a digest of kind, organisation and visit
    number; ``summary`` is what filing checks need (sealed).
    ``visit_part``: what each message contributed to its visit, once per (sender,
    control id). A part filed by a version that kept no charge transactions (its JSON
    has no ``charges``) is taken over the next time a message is filed with its visit:
    its transactions are re-derived from the message ``hl7_inbox`` keeps
    (:func:`~bridge.mapping.hl7v2.visit.upgrade_part`), so a transaction resent after
    the upgrade is counted once.
    ``intake_record``: what is to be routed: a message's own record
    (``hl7:<sender>/<control id>``) or a visit (``visit:<id>``). ``version`` grows when
    there is something new to route; ``routed_version`` is the version last routed.
    ``intake_delivery``: every submission of a record on a link, by revision; a
    corrected claim is a new revision naming the message it replaces.

Record states (``intake_record.state``)::

    held        a visit still open: its parts accumulate, nothing is routed
    pending     new content to route (the router takes it)
    routed      submitted on every link a rule names
    unrouted    no routing rule matches: kept, and listed by ``bridge intake list``
    refused     a link refused it (consent, profile, mapping): the reason is in ``detail``
    incomplete  a completed visit whose record cannot be built yet (what is missing,
                named at its HL7 field, is in ``detail``); new messages retry it

Nothing moves a ``refused`` or ``unrouted`` record by itself: an operator puts it back
to ``pending`` (:func:`retry`, ``bridge intake retry``), and it is routed again under
the consents and routing rules in effect then.

Invariants: a message is accepted once per (sender, control id) and every answer to it
is audited in the transaction that decides it; a part, its visit and the record to
route are written in the transaction that accepts the message, or not at all; a
record's ``routed_version`` only moves to the version its content was routed at.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from bridge.errors import BridgeError, ConflictError, NotFound, UsageError
from bridge.ledger.audit import format_time
from bridge.mapping.hl7v2.header import id_label, message_label
from bridge.mapping.hl7v2.message import parse_hl7
from bridge.mapping.hl7v2.visit import (
    VisitPart,
    VisitSpec,
    VisitSummary,
    adopt_parts,
    check_filing,
    upgrade_part,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from bridge.ledger import Store
    from bridge.ledger.audit import AuditEntry, AuditRecord
    from bridge.ledger.portable import Tx

log = logging.getLogger("bridge.intake")

STATES = ("held", "pending", "routed", "unrouted", "refused", "incomplete")


def visit_key(kind: str, facility: str, number: str) -> str:
    """The key of a visit: a digest, so the visit number itself is stored only sealed."""
    return hashlib.sha256(f"{kind}\x1f{facility}\x1f{number}".encode()).hexdigest()


def _lock_for_answer(tx: Tx) -> None:
    # PostgreSQL: take the audit chain's head lock first. Every accept appends an entry
    # anyway; holding the lock from the start makes the existence checks below see any
    # copy of this message another connection committed meanwhile.
    if tx.dialect == "postgresql":
        tx.execute("SELECT seq FROM audit_head FOR UPDATE")


# --- the HL7 inbox ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """An HL7 message already accepted: what is needed to answer a copy of it."""

    digest: str
    ack: bytes


def lookup(store: Store, sender: str, control_id: str) -> Stored | None:
    """The message ``(sender, control_id)`` if accepted before."""
    with store.read("hl7_lookup") as tx:
        row = tx.one("SELECT digest, ack FROM hl7_inbox WHERE sender=? AND control_id=?",
                     (sender, control_id))
    return Stored(str(row[0]), bytes(row[1])) if row is not None else None


def stored_record(store: Store, sender: str, control_id: str) -> dict[str, Any] | None:
    """The DE record stored with a message (None for a part of a visit or none)."""
    with store.read("hl7_record") as tx:
        row = tx.one("SELECT record FROM hl7_inbox WHERE sender=? AND control_id=?",
                     (sender, control_id))
        data = tx.unseal(row[0], context="hl7_inbox.record") if row is not None else None
    return orjson.loads(data) if data else None


@dataclass(frozen=True)
class Filing:
    """A message's part of a visit, to be filed with it."""

    spec: VisitSpec
    part: VisitPart
    correction_days: int


@dataclass(frozen=True)
class OwnRecord:
    """A message's own record, to be routed (``state`` pending, or unrouted when no rule
    can match it)."""

    message_type: str
    dataset: str
    facility: str
    record: bytes
    state: str


@dataclass(frozen=True)
class Accepted:
    ack: bytes
    created: bool  # False: a copy of a message accepted before (its original ACK)
    route: bool  # something became routable: wake the router


def accept(store: Store, *, sender: str, control_id: str, digest: str, message: bytes,
           record: bytes | None, warnings: list[str], audit: AuditRecord,
           duplicate_audit: AuditRecord, make_ack: Callable[[AuditEntry, list[str]], bytes],
           filing: Filing | None, own: OwnRecord | None, now: datetime) -> Accepted:
    """Accept one HL7 message, in one transaction, or write nothing.

    - a copy of an accepted message (same digest) gets the original ACK, and
      ``duplicate_audit`` is appended in the same transaction, so every answer is
      audited however many copies race on different connections;
    - the same control id with other content raises :class:`~bridge.errors.ConflictError`;
    - a part that cannot belong to its visit raises the filing's ``MappingError``
      (naming the HL7 field) and nothing is written;
    - otherwise: the audit entry, the message, its record, the ACK, the visit part (and
      visit) and the record to route are committed together, and only then may the
      caller send the AA. ``make_ack`` is given the audit entry and the message's
      warnings: ``warnings`` and those of filing (a charge transaction already counted).
    """
    with store.transaction("hl7_accept") as tx:
        _lock_for_answer(tx)
        return _accept_in(tx, sender=sender, control_id=control_id, digest=digest,
                          message=message, record=record, warnings=warnings, audit=audit,
                          duplicate_audit=duplicate_audit, make_ack=make_ack, filing=filing,
                          own=own, now=now)


def accept_many(store: Store, requests: list[dict[str, Any]]) -> list[Accepted | BaseException]:
    """:func:`accept` for several messages in one transaction (group commit).

    Each message is accepted inside a savepoint of its own: one that is refused (or
    whose ACK cannot be built) is rolled back alone and its exception is returned in its
    place; the others commit together, with one flush to disk for all of them.
    """
    out: list[Accepted | BaseException] = []
    with store.transaction("hl7_accept") as tx:
        _lock_for_answer(tx)
        for i, request in enumerate(requests):
            tx.execute(f"SAVEPOINT hl7_{i}")
            try:
                out.append(_accept_in(tx, **request))
            except Exception as exc:  # noqa: BLE001 - handed to that message's caller
                tx.execute(f"ROLLBACK TO SAVEPOINT hl7_{i}")
                out.append(exc)
            tx.execute(f"RELEASE SAVEPOINT hl7_{i}")
    return out


def _accept_in(tx: Tx, *, sender: str, control_id: str, digest: str, message: bytes,
               record: bytes | None, warnings: list[str], audit: AuditRecord,
               duplicate_audit: AuditRecord, make_ack: Callable[[AuditEntry, list[str]], bytes],
               filing: Filing | None, own: OwnRecord | None, now: datetime) -> Accepted:
    stamp = format_time(now)
    row = tx.one("SELECT digest, ack FROM hl7_inbox WHERE sender=? AND control_id=?",
                 (sender, control_id))
    if row is not None:
        if str(row[0]) != digest:
            raise ConflictError("duplicate control id with different content",
                                location="MSH-10")
        tx.append_audit(duplicate_audit)
        return Accepted(bytes(row[1]), created=False, route=False)
    route = False
    warnings = list(warnings)
    if filing is not None:
        route = _file(tx, filing, stamp, warnings)
    if own is not None:
        tx.execute(
            "INSERT INTO intake_record (source, kind, message_type, dataset, facility,"
            " state, record, version, routed_version, created, updated)"
            " VALUES (?,?,?,?,?,?,?,1,0,?,?)",
            (f"hl7:{sender}/{control_id}", "message", own.message_type, own.dataset,
             own.facility, own.state,
             tx.seal(own.record, context="intake_record.record"), stamp, stamp))
        route = route or own.state == "pending"
    entry = tx.append_audit(audit)
    ack = make_ack(entry, warnings)
    received: Any = stamp if tx.dialect == "sqlite" else now
    tx.execute(
        "INSERT INTO hl7_inbox (sender, control_id, digest, message, record, ack,"
        " audit_seq, received) VALUES (?,?,?,?,?,?,?,?)",
        (sender, control_id, digest, tx.seal(message, context="hl7_inbox.message"),
         tx.seal(record, context="hl7_inbox.record") if record is not None else None,
         ack, entry.seq, received))
    if warnings:
        tx.execute("INSERT INTO hl7_warning (sender, control_id, warnings) VALUES (?,?,?)",
                   (sender, control_id, "\n".join(warnings)))
    return Accepted(ack, created=True, route=route)


def _file(tx: Tx, filing: Filing, stamp: str, warnings: list[str]) -> bool:
    """File a part with its visit; True when the visit has something new to route.

    Filing's warnings (a transaction already counted) are appended to ``warnings``.
    """
    part = filing.part
    key = visit_key(part.kind, part.facility, part.number)
    row = tx.one(f"SELECT id, summary, completed FROM visit WHERE key_digest=?{tx.for_update}",
                 (key,))
    summary = None
    if row is not None:
        data = tx.unseal(row[1], context="visit.summary") or b"{}"
        summary = VisitSummary.from_json(data)
        if "charges" not in orjson.loads(data):
            summary = _adopt(tx, filing.spec, int(row[0]), summary)
    after = check_filing(filing.spec, summary, part, correction_days=filing.correction_days,
                         warnings=warnings)
    sealed = tx.seal(after.to_json(), context="visit.summary")
    if row is None:
        visit_id = tx.one(
            "INSERT INTO visit (key_digest, kind, facility, summary, completed, parts,"
            " created, updated) VALUES (?,?,?,?,?,1,?,?) RETURNING id",
            (key, part.kind, part.facility, sealed, int(after.completed), stamp, stamp))[0]
    else:
        visit_id = row[0]
        tx.execute("UPDATE visit SET summary=?, completed=?, parts=parts+1, updated=?"
                   " WHERE id=?", (sealed, int(after.completed), stamp, visit_id))
    tx.execute("INSERT INTO visit_part (visit_id, sender, control_id, message_type, part,"
               " received) VALUES (?,?,?,?,?,?)",
               (visit_id, part.sender, part.control_id, part.message_type,
                tx.seal(part.to_json(), context="visit_part.part"), stamp))
    source = f"visit:{visit_id}"
    # A visit record is routed under the type of the message that completed it (ADT^A03;
    # for an outpatient visit, whichever message carried the visit end).
    completing = part.message_type if part.completes else (
        min(filing.spec.completed_by) if filing.spec.completed_by else part.message_type)
    existing = tx.one(f"SELECT id FROM intake_record WHERE source=?{tx.for_update}", (source,))
    if existing is None:
        tx.execute(
            "INSERT INTO intake_record (source, kind, message_type, dataset, facility, state,"
            " version, routed_version, created, updated) VALUES (?,?,?,?,?,?,?,0,?,?)",
            (source, "visit", completing, filing.spec.dataset, part.facility,
             "pending" if after.completed else "held", 1 if after.completed else 0,
             stamp, stamp))
    elif after.completed:
        tx.execute(
            "UPDATE intake_record SET state='pending', version=version+1, updated=?,"
            " message_type=CASE WHEN ? = 1 THEN ? ELSE message_type END WHERE id=?",
            (stamp, int(part.completes), part.message_type, existing[0]))
    return after.completed


def _adopt(tx: Tx, spec: VisitSpec, visit_id: int, summary: VisitSummary) -> VisitSummary:
    """Take over a visit filed by a version that kept no charge transactions.

    Each of its parts without ``charges`` is re-derived from its stored message and
    rewritten (:func:`~bridge.mapping.hl7v2.visit.adopt_parts`); the summary returned
    knows every transaction. A part that cannot be re-derived stays as filed, counted
    once per message as before, and is logged (by visit and control id): a copy of
    one of its transactions sent now would be counted again.
    """
    rows = tx.all("SELECT p.sender, p.control_id, p.part, m.message, m.id FROM visit_part p"
                  " LEFT JOIN hl7_inbox m ON m.sender=p.sender AND m.control_id=p.control_id"
                  " WHERE p.visit_id=?", (visit_id,))
    # In the order they were filed: a transaction counts from the first part carrying it.
    rows = sorted(rows, key=lambda r: (r[4] is None, int(r[4] or 0), str(r[1])))
    parts: list[tuple[VisitPart, VisitPart | None]] = []
    legacy: list[tuple[str, str]] = []
    for sender, control_id, sealed, message, _ in rows:
        data = tx.unseal(sealed, context="visit_part.part") or b"{}"
        if "charges" in orjson.loads(data):
            continue  # filed already with its transactions
        filed = VisitPart.from_json(data)
        msg = None
        if message is not None:
            try:
                msg = parse_hl7(tx.unseal(message, context="hl7_inbox.message") or b"")
            except BridgeError:
                msg = None
        parts.append((filed, upgrade_part(spec, filed, msg)))
        legacy.append((str(sender), str(control_id)))
    after, upgraded = adopt_parts(summary, parts)
    for (sender, control_id), part in zip(legacy, upgraded, strict=True):
        if part is None:
            log.warning("visit %s: the part of %s was filed without its charge transactions"
                        " and cannot be re-derived from its message; its charges count as"
                        " filed, and a copy of them sent again would count twice",
                        visit_id, id_label(str(control_id)))
            continue
        tx.execute("UPDATE visit_part SET part=? WHERE visit_id=? AND sender=? AND"
                   " control_id=?", (tx.seal(part.to_json(), context="visit_part.part"),
                                     visit_id, sender, control_id))
    return after


# --- routing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordRow:
    id: int
    source: str
    kind: str
    message_type: str
    dataset: str
    facility: str
    state: str
    detail: str | None
    version: int
    routed_version: int
    created: str
    updated: str

    def label(self, key: bytes | None = None) -> str:
        """The record as the audit trail and logs name it: ``visit:12``, or
        ``hl7:MSH-3|MSH-4/MSH-10`` of its message with each field named by
        :func:`~bridge.mapping.hl7v2.header.id_label` under ``key``, the bridge's label
        key (``source`` is the sender's text)."""
        return source_label(self.source, key)


def source_label(source: str, key: bytes | None = None) -> str:
    """:meth:`RecordRow.label` of a record's ``source``."""
    if source.startswith("hl7:"):
        sender, _, control_id = source[4:].rpartition("/")
        return "hl7:" + message_label(sender, control_id, key)
    kind, _, number = source.partition(":")
    return source if kind == "visit" and number.isascii() and number.isdigit() else "*"


_RECORD_COLS = ("id, source, kind, message_type, dataset, facility, state, detail, version,"
                " routed_version, created, updated")


def _record_row(r: Any) -> RecordRow:
    return RecordRow(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]),
                     str(r[6]), r[7], int(r[8]), int(r[9]), str(r[10]), str(r[11]))


def claim_pending(store: Store, *, now: datetime, limit: int = 16,
                  lease: timedelta = timedelta(seconds=10)) -> list[RecordRow]:
    """Take up to ``limit`` records with something to route, leased to the caller."""
    stamp = format_time(now)
    with store.transaction("intake_claim", durable=False) as tx:
        rows = tx.all(
            f"SELECT {_RECORD_COLS} FROM intake_record WHERE state='pending'"
            " AND (lease_until IS NULL OR lease_until < ?) ORDER BY id LIMIT ?"
            f"{tx.skip_locked}", (stamp, limit))
        taken = [_record_row(r) for r in rows]
        if taken:
            until = format_time(now + lease)
            tx.executemany("UPDATE intake_record SET lease_until=? WHERE id=?",
                           [(until, r.id) for r in taken])
        return taken


def visit_parts(store: Store, visit_id: int) -> list[VisitPart]:
    """Every part of a visit (in no particular order: assembly orders them)."""
    with store.read("visit_parts") as tx:
        rows = tx.all("SELECT part FROM visit_part WHERE visit_id=?", (visit_id,))
        return [VisitPart.from_json(tx.unseal(r[0], context="visit_part.part") or b"")
                for r in rows]


def record_of(store: Store, record_id: int) -> bytes | None:
    """The sealed-at-rest record of an ``intake_record`` row, opened."""
    with store.read("intake_record") as tx:
        row = tx.one("SELECT record FROM intake_record WHERE id=?", (record_id,))
        return tx.unseal(row[0], context="intake_record.record") if row is not None else None


@dataclass(frozen=True)
class Delivery:
    record_id: int
    link: str
    revision: int
    message_id: str
    digest: str
    replaces: str | None
    state: str
    detail: str | None
    created: str


def deliveries(store: Store, record_id: int) -> list[Delivery]:
    """Every submission of a record, by link and revision."""
    with store.read("intake_deliveries") as tx:
        rows = tx.all("SELECT record_id, link, revision, message_id, digest, replaces, state,"
                      " detail, created FROM intake_delivery WHERE record_id=?"
                      " ORDER BY link, revision", (record_id,))
    return [Delivery(int(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4]), r[5], str(r[6]),
                     r[7], str(r[8])) for r in rows]


def latest_sent(store: Store, record_id: int, link: str) -> Delivery | None:
    """The latest revision of a record queued on a link (a refusal does not count)."""
    found = [d for d in deliveries(store, record_id) if d.link == link and d.state == "queued"]
    return found[-1] if found else None


def add_delivery(store: Store, *, record_id: int, link: str, message_id: str, digest: str,
                 replaces: str | None, state: str, detail: str | None, now: datetime,
                 audit: AuditRecord | None = None) -> int:
    """Record one submission; returns its revision."""
    with store.transaction("intake_delivery") as tx:
        row = tx.one("SELECT COALESCE(MAX(revision), 0) FROM intake_delivery"
                     " WHERE record_id=? AND link=?", (record_id, link))
        revision = int(row[0]) + 1
        tx.execute("INSERT INTO intake_delivery (record_id, link, revision, message_id, digest,"
                   " replaces, state, detail, created) VALUES (?,?,?,?,?,?,?,?,?)",
                   (record_id, link, revision, message_id, digest, replaces, state, detail,
                    format_time(now)))
        if audit is not None:
            tx.append_audit(audit)
        return revision


def finish(store: Store, row: RecordRow, *, state: str, detail: str | None,
           record: bytes | None, now: datetime, audit: AuditRecord | None = None) -> bool:
    """Close a routing pass at the version it was taken at; False when the record moved on
    meanwhile (it stays pending, and the next pass takes the newer content)."""
    stamp = format_time(now)
    with store.transaction("intake_finish") as tx:
        sealed = tx.seal(record, context="intake_record.record") if record is not None else None
        cur = tx.execute(
            "UPDATE intake_record SET state=?, detail=?, routed_version=version,"
            " record=COALESCE(?, record), lease_until=NULL, updated=?"
            " WHERE id=? AND version=?", (state, detail, sealed, stamp, row.id, row.version))
        moved = cur.rowcount == 0
        if moved:
            tx.execute("UPDATE intake_record SET lease_until=NULL WHERE id=?", (row.id,))
        if audit is not None:
            tx.append_audit(audit)
        return not moved


#: States an operator may put back to be routed again (:func:`retry`).
RETRYABLE = ("refused", "unrouted")


def retry(store: Store, *, records: list[str], states: tuple[str, ...] = (), now: datetime,
          audit: Callable[[RecordRow], AuditRecord]) -> list[RecordRow]:
    """Put records back to be routed again; returns them as they were.

    ``records`` names records by id or source (``visit:12``, ``hl7:SENDER/ID``); every
    record in one of ``states`` is added. Each must be in a :data:`RETRYABLE` state: an
    unknown one raises :class:`~bridge.errors.NotFound`, one in another state
    :class:`~bridge.errors.UsageError`, naming it, and nothing is changed. Each record
    becomes ``pending`` at a new version with its ``audit`` entry, all in one transaction;
    the router then takes it as it takes new content: consent and routing rules are
    checked again, and a link that refuses it leaves it ``refused`` again, audited.
    """
    for state in states:
        if state not in RETRYABLE:
            raise UsageError(f"only {' or '.join(RETRYABLE)} records are routed again",
                                 location=state)
    stamp = format_time(now)
    with store.transaction("intake_retry") as tx:
        taken: dict[int, RecordRow] = {}
        for name in records:
            # A record's number (ASCII digits that fit the column), else its source.
            numbered = name.isascii() and name.isdigit() and len(name) <= 18
            column = "id" if numbered else "source"
            found = tx.one(f"SELECT {_RECORD_COLS} FROM intake_record WHERE {column}=?"
                           f"{tx.for_update}", (int(name) if numbered else name,))
            if found is None:
                raise NotFound("no such intake record", location=name)
            row = _record_row(found)
            if row.state not in RETRYABLE:
                raise UsageError(f"the record is {row.state}; only "
                                     f"{' or '.join(RETRYABLE)} records are routed again",
                                     location=name)
            taken[row.id] = row
        for state in states:
            for found in tx.all(f"SELECT {_RECORD_COLS} FROM intake_record WHERE state=?"
                                f" ORDER BY id{tx.for_update}", (state,)):
                row = _record_row(found)
                taken.setdefault(row.id, row)
        for row in sorted(taken.values(), key=lambda r: r.id):
            tx.execute("UPDATE intake_record SET state='pending', detail=NULL,"
                       " version=version+1, lease_until=NULL, updated=? WHERE id=?",
                       (stamp, row.id))
            tx.append_audit(audit(row))
        return sorted(taken.values(), key=lambda r: r.id)


# --- listing -----------------------------------------------------------------------------------


def list_records(store: Store, *, state: str | None = None, limit: int = 100) -> list[RecordRow]:
    """Records by routing state, newest first."""
    with store.read("intake_list") as tx:
        if state is None:
            rows = tx.all(f"SELECT {_RECORD_COLS} FROM intake_record ORDER BY id DESC LIMIT ?",
                          (limit,))
        else:
            rows = tx.all(f"SELECT {_RECORD_COLS} FROM intake_record WHERE state=?"
                          " ORDER BY id DESC LIMIT ?", (state, limit))
    return [_record_row(r) for r in rows]


def record_counts(store: Store) -> dict[str, int]:
    with store.read("intake_counts") as tx:
        rows = tx.all("SELECT state, COUNT(*) FROM intake_record GROUP BY state")
    return {str(r[0]): int(r[1]) for r in rows}


@dataclass(frozen=True)
class VisitRow:
    id: int
    kind: str
    facility: str
    summary: VisitSummary
    completed: bool
    parts: int
    created: str
    updated: str


def list_visits(store: Store, *, limit: int = 100) -> list[VisitRow]:
    """Visits, newest first, with what filing knows of each (opened)."""
    with store.read("visit_list") as tx:
        rows = tx.all("SELECT id, kind, facility, summary, completed, parts, created, updated"
                      " FROM visit ORDER BY id DESC LIMIT ?", (limit,))
        return [VisitRow(int(r[0]), str(r[1]), str(r[2]),
                         VisitSummary.from_json(tx.unseal(r[3], context="visit.summary") or b""),
                         bool(r[4]), int(r[5]), str(r[6]), str(r[7])) for r in rows]


def warnings_of(store: Store, sender: str, control_id: str) -> list[str]:
    """The warnings recorded with an accepted message (fields no mapping reads)."""
    with store.read("hl7_warnings") as tx:
        row = tx.one("SELECT warnings FROM hl7_warning WHERE sender=? AND control_id=?",
                     (sender, control_id))
    return str(row[0]).split("\n") if row is not None and row[0] else []
