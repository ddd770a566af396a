"""What a store holds from before encryption at rest was turned on, and sealing it.

A store that served without ``store.data_key_file`` (or ``data_key_env``) holds its
health data plain, and its patient lookup keys (``system|value``) in clear. Turning
encryption on seals what is written from then on; what was written before stays as it
was, readable (:mod:`bridge.ledger.seal`), but plain on disk. Its lookup keys are worse
off: lookups then ask for the keyed form, so a person's records kept for pull before
the change are no longer found by the person's identifiers.

:func:`plain_values` counts both, per column, for ``bridge compliance report`` (T19 is
not met while any remain); :func:`seal_stored` (``bridge keys seal-stored``) seals every
plain value and replaces every lookup key in clear by its keyed form, in batches of
short transactions, while the bridge serves. A row the bridge rewrites meanwhile is
left to the bridge (it seals what it writes); running the command again finds nothing
left. One audit entry records what was sealed, in counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from bridge.errors import ConfigError
from bridge.ledger.audit import AuditRecord
from bridge.ledger.portable import Tx
from bridge.ledger.seal import MAGIC, AESGCMSealer

#: Every column that holds health data through ``Tx.seal`` (its context is
#: ``table.column``, where the column first stood; see :func:`_place`).
SEALED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("outbox", "payload"), ("outbox", "receipt"),
    ("inbox", "payload"), ("inbox", "receipt"),
    ("hl7_inbox", "message"), ("hl7_inbox", "record"),
    ("consent", "resource"), ("consent_history", "resource"),
    ("intake_record", "record"),
    ("visit", "summary"), ("visit_part", "part"),
    ("handoff", "last_answer"),
    ("pull_person_key", "sealed_key"), ("pull_resource", "body"), ("pull_record", "record"),
    ("pull_review", "reason"), ("pull_received", "body"),
)
#: Columns holding a patient lookup key (``system|value`` in clear, ``bk:...`` keyed).
LOOKUP_KEYS: tuple[tuple[str, str, str | None], ...] = (
    # (table, key column, the column that with the key is unique)
    ("consent_patient", "patient_key", "consent_id"),
    ("pull_person_key", "patient_key", None),
)
#: Columns that moved on one engine since they were named (migration
#: ``1503-outbox-payload-apart``): (dialect, context) -> (table, column).
_MOVED = {("sqlite", "outbox.payload"): ("outbox_payload", "payload")}
#: The keyed form's prefix (:meth:`AESGCMSealer.blind`).
KEYED = "bk:"
BATCH = 500


@dataclass
class SealReport:
    """Counts, per ``table.column``: values sealed, lookup keys replaced by their keyed
    form, and clear keys dropped because the keyed form was already there."""

    sealed: dict[str, int] = field(default_factory=dict)
    keyed: dict[str, int] = field(default_factory=dict)
    merged: int = 0

    @property
    def total(self) -> int:
        return sum(self.sealed.values()) + sum(self.keyed.values())


def _place(tx: Tx, table: str, column: str) -> tuple[str, str]:
    """Where the values sealed as ``table.column`` are stored on this engine."""
    return _MOVED.get((tx.dialect, f"{table}.{column}"), (table, column))


def _row_id(tx: Tx) -> str:
    return "ctid::text" if tx.dialect == "postgresql" else "rowid"


def _by_row(tx: Tx) -> str:
    return "ctid = ?::tid" if tx.dialect == "postgresql" else "rowid = ?"


def _plain(column: str) -> str:
    # ``substr`` reads the first bytes of a BLOB (SQLite) or a bytea (PostgreSQL).
    return f"{column} IS NOT NULL AND substr({column}, 1, {len(MAGIC)}) <> ?"


def _clear_key(column: str) -> str:
    return f"substr({column}, 1, {len(KEYED)}) <> '{KEYED}'"


def plain_values(store: Any) -> dict[str, int]:
    """``table.column`` -> how many values are plain (or lookup keys in clear); only the
    columns that hold any."""
    out: dict[str, int] = {}
    with store.read("count plain values") as tx:
        for named, named_column in SEALED_COLUMNS:
            table, column = _place(tx, named, named_column)
            n = int(tx.one(f"SELECT COUNT(*) FROM {table} WHERE {_plain(column)}",
                           (MAGIC,))[0])
            if n:
                out[f"{named}.{named_column}"] = n
        for table, column, _unique in LOOKUP_KEYS:
            n = int(tx.one(f"SELECT COUNT(*) FROM {table} WHERE {_clear_key(column)}")[0])
            if n:
                out[f"{table}.{column}"] = n
        n = sum(1 for (keys,) in tx.all("SELECT patient_keys FROM consent_history")
                if any(not k.startswith(KEYED) for k in _keys_of(keys)))
        if n:
            out["consent_history.patient_keys"] = n
    return out


def _keys_of(stored: Any) -> list[str]:
    """The keys of a ``consent_history.patient_keys`` value (JSON text on SQLite, a
    list read from JSONB on PostgreSQL)."""
    keys = stored if isinstance(stored, list) else orjson.loads(stored)
    return [str(k) for k in keys] if isinstance(keys, list) else []


def seal_stored(store: Any, *, actor: str, batch: int = BATCH) -> SealReport:
    """Seal every plain value and key every clear lookup key of ``store`` (which must seal:
    ConfigError otherwise); one audit entry (``store.seal``) records the counts."""
    sealer = store.sealer
    if not isinstance(sealer, AESGCMSealer):
        raise ConfigError("encryption at rest is not configured: name the key-encryption"
                          " key in store.data_key_file or store.data_key_env",
                          location="store")
    report = SealReport()
    for table, column in SEALED_COLUMNS:
        done = _seal_column(store, table, column, batch)
        if done:
            report.sealed[f"{table}.{column}"] = done
    for table, column, unique in LOOKUP_KEYS:
        done, merged = _key_column(store, sealer, table, column, unique, batch)
        report.merged += merged
        if done:
            report.keyed[f"{table}.{column}"] = done
    done = _key_history(store, sealer, batch)
    if done:
        report.keyed["consent_history.patient_keys"] = done
    with store.transaction("record sealing") as tx:
        tx.append_audit(AuditRecord(
            time=datetime.now(UTC), actor=actor, action="store.seal", subject="store",
            detail=f"sealed {sum(report.sealed.values())} keyed {sum(report.keyed.values())}"))
    return report


def _seal_column(store: Any, named: str, named_column: str, batch: int) -> int:
    context = f"{named}.{named_column}"
    total = 0
    skip: set[str] = set()
    while True:
        with store.transaction(f"seal {context}") as tx:
            table, column = _place(tx, named, named_column)
            rows = [r for r in tx.all(
                f"SELECT {_row_id(tx)}, {column} FROM {table} WHERE {_plain(column)}"
                f" LIMIT ?", (MAGIC, batch + len(skip))) if str(r[0]) not in skip]
            if not rows:
                return total
            for rid, value in rows[:batch]:
                plain = bytes(value)
                changed = tx.execute(
                    f"UPDATE {table} SET {column} = ? WHERE {_by_row(tx)} AND {column} = ?",
                    (tx.seal(plain, context=context), str(rid), plain)).rowcount
                if changed:
                    total += 1
                else:
                    skip.add(str(rid))  # rewritten meanwhile: the bridge sealed it


def _key_column(store: Any, sealer: AESGCMSealer, table: str, column: str,
                unique: str | None, batch: int) -> tuple[int, int]:
    keyed = merged = 0
    with_unique = f", {unique}" if unique else ""
    while True:
        with store.transaction(f"key {table}.{column}") as tx:
            rows = tx.all(f"SELECT {_row_id(tx)}, {column}{with_unique} FROM {table}"
                          f" WHERE {_clear_key(column)} LIMIT ?", (batch,))
            if not rows:
                return keyed, merged
            for row in rows:
                rid, key = str(row[0]), str(row[1])
                blind = sealer.blind(key)
                same = f" AND {unique} = ?" if unique else ""
                params: tuple[Any, ...] = (blind, row[2]) if unique else (blind,)
                if tx.one(f"SELECT 1 FROM {table} WHERE {column} = ?{same}", params):
                    # Written again since encryption was turned on: the keyed row stands.
                    tx.execute(f"DELETE FROM {table} WHERE {_by_row(tx)}", (rid,))
                    merged += 1
                else:
                    tx.execute(f"UPDATE {table} SET {column} = ? WHERE {_by_row(tx)}",
                               (blind, rid))
                    keyed += 1


def _key_history(store: Any, sealer: AESGCMSealer, batch: int) -> int:
    keyed = 0
    after = 0
    while True:
        with store.transaction("key consent_history.patient_keys") as tx:
            rows = tx.all("SELECT id, patient_keys FROM consent_history WHERE id > ?"
                          " ORDER BY id LIMIT ?", (after, batch))
            if not rows:
                return keyed
            for row_id, text in rows:
                after = int(row_id)
                keys = _keys_of(text)
                if all(k.startswith(KEYED) for k in keys):
                    continue
                new = [k if k.startswith(KEYED) else sealer.blind(k) for k in keys]
                tx.execute("UPDATE consent_history SET patient_keys = ? WHERE id = ?",
                           (_history_keys(tx, new), row_id))
                keyed += 1


def _history_keys(tx: Tx, keys: list[str]) -> Any:
    if tx.dialect == "postgresql":
        from psycopg.types.json import Jsonb

        return Jsonb(keys)
    return orjson.dumps(keys).decode()
