"""Store side of the compliance controls, written once for both engines (:class:`Tx`).

- :func:`count_cross_border`: one item sent abroad under an approval, counted against
  its cap in the same transaction as its audit entry; the cap is never passed, however
  many processes send at once (the approval's counter row is locked while counting).
- :func:`destroy_received`: received data whose agreement's retention has ended is
  destroyed (payloads emptied); identities, digests, receipts and audit entries stay,
  so every receipt and the audit log verify as before.
- :func:`record_restore` / :func:`pending_restores`: a store restored from a backup
  remembers it until reconciliation with the partners has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from bridge.ledger.audit import AuditEntry, AuditRecord, format_time

if TYPE_CHECKING:
    from bridge.ledger import Store
    from bridge.ledger.portable import Tx


@dataclass(frozen=True)
class Counted:
    """Where an item stands against its approval's cap."""

    allowed: bool
    items: int  # items counted under the approval, this one included when allowed
    cap: int
    new: bool  # False: the same subject was counted before (a resubmission)
    audit_seq: int | None


def count_cross_border(
    store: Store, *, approval: str, partner: str, link: str, subject: str, cap: int,
    audit: AuditRecord,
) -> Counted:
    """Count ``subject`` (a message or page identity) under ``approval`` if the cap
    allows, appending ``audit`` (with the count in its detail) in the same transaction.

    A subject counted before is not counted again. When the cap is reached nothing is
    written and ``allowed`` is False (the caller refuses and audits the refusal).
    """
    with store.transaction("count_cross_border") as tx:
        tx.execute("INSERT INTO crossborder_count (approval, partner, items) VALUES (?,?,0)"
                   " ON CONFLICT (approval, partner) DO NOTHING", (approval, partner))
        row = tx.one("SELECT items FROM crossborder_count WHERE approval=? AND partner=?"
                     + tx.for_update, (approval, partner))
        items = int(row[0])
        if tx.one("SELECT 1 FROM crossborder_item WHERE approval=? AND partner=? AND subject=?",
                  (approval, partner, subject)) is not None:
            return Counted(True, items, cap, False, None)
        if items >= cap:
            return Counted(False, items, cap, True, None)
        record = AuditRecord(
            time=audit.time, actor=audit.actor, action=audit.action, subject=audit.subject,
            partner=audit.partner, patient=audit.patient, categories=audit.categories,
            outcome=audit.outcome, detail=f"{audit.detail or ''} items={items + 1}/{cap}".strip(),
            digest=audit.digest, operator=audit.operator,
        )
        entry = tx.append_audit(record)
        tx.execute("UPDATE crossborder_count SET items=? WHERE approval=? AND partner=?",
                   (items + 1, approval, partner))
        tx.execute("INSERT INTO crossborder_item (approval, partner, link, subject, time,"
                   " audit_seq) VALUES (?,?,?,?,?,?)",
                   (approval, partner, link, subject, format_time(audit.time), entry.seq))
        return Counted(True, items + 1, cap, True, entry.seq)


def cross_border_counts(store: Store) -> dict[tuple[str, str], int]:
    """Items counted per ``(approval, partner)``."""
    with store.read("cross_border_counts") as tx:
        return {(str(r[0]), str(r[1])): int(r[2])
                for r in tx.all("SELECT approval, partner, items FROM crossborder_count")}


@dataclass(frozen=True)
class Destroyed:
    """What one destruction run removed on one link."""

    link: str
    agreement: str
    table: str
    cutoff: datetime
    items: int
    audit_seq: int | None


def _time(tx: Tx, value: datetime) -> Any:
    # The base tables keep times as TEXT on SQLite and TIMESTAMPTZ on PostgreSQL;
    # tables added by migrations keep TEXT on both.
    return format_time(value) if tx.dialect == "sqlite" else value


def destroy_received(
    store: Store, *, link: str, partner: str, direction: str, agreement: str,
    retention_days: int, now: datetime, audit: AuditRecord, dry_run: bool = False,
) -> Destroyed:
    """Empty the payloads received on ``link`` more than ``retention_days`` ago.

    Inbound links: the inbox rows from ``partner``. Pull-from links: the signed pages
    pulled from it. The row, its identity, digest and receipt stay; ``audit`` (one
    entry per link and run, with the count and cutoff added) is appended in the same
    transaction when anything was destroyed.
    """
    cutoff = now - timedelta(days=retention_days)
    with store.transaction(f"destroy {link}") as tx:
        if direction == "inbound":
            table, column = "inbox", "payload"
            where = "sender=? AND received<? AND length(payload)>0"
            params: tuple[Any, ...] = (partner, _time(tx, cutoff))
        else:
            table, column = "pull_received", "body"
            where = "link=? AND received<? AND length(body)>0"
            params = (link, format_time(cutoff))
        if dry_run:
            n = int(tx.one(f"SELECT COUNT(*) FROM {table} WHERE {where}", params)[0])
            return Destroyed(link, agreement, table, cutoff, n, None)
        n = tx.execute(f"UPDATE {table} SET {column}=? WHERE {where}", (b"", *params)).rowcount
        seq = None
        if n > 0:
            entry = tx.append_audit(AuditRecord(
                time=audit.time, actor=audit.actor, action=audit.action, subject=audit.subject,
                partner=audit.partner, outcome=audit.outcome, operator=audit.operator,
                detail=(f"agreement={agreement} {table}={n}"
                        f" received-before={format_time(cutoff)}"),
            ))
            seq = entry.seq
        return Destroyed(link, agreement, table, cutoff, n, seq)


def record_restore(store: Store, *, backup_taken: str, audit: AuditRecord) -> AuditEntry:
    """Note that this store was restored from a backup taken at ``backup_taken``."""
    with store.transaction("record_restore") as tx:
        entry = tx.append_audit(audit)
        tx.execute("INSERT INTO store_restore (restored, backup, audit_seq) VALUES (?,?,?)",
                   (format_time(audit.time), backup_taken, entry.seq))
        return entry


def pending_restores(store: Store) -> list[tuple[int, str, str]]:
    """Restores not yet followed by reconciliation: ``(id, restored, backup taken)``."""
    with store.read("pending_restores") as tx:
        return [(int(r[0]), str(r[1]), str(r[2])) for r in tx.all(
            "SELECT id, restored, backup FROM store_restore WHERE reconciled IS NULL ORDER BY id")]


def mark_reconciled(store: Store, restore_id: int, *, now: datetime,
                    audit: AuditRecord) -> AuditEntry:
    """Close a restore once reconciliation with every partner has run."""
    with store.transaction("mark_reconciled") as tx:
        entry = tx.append_audit(audit)
        tx.execute("UPDATE store_restore SET reconciled=? WHERE id=?",
                   (format_time(now), restore_id))
        return entry


__all__ = [
    "Counted",
    "Destroyed",
    "count_cross_border",
    "cross_border_counts",
    "destroy_received",
    "mark_reconciled",
    "pending_restores",
    "record_restore",
]
