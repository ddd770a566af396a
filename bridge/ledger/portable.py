"""Dialect-neutral access to a store's transactions, for tables added by migrations.

The base tables (outbox, inbox, consents, audit) have hand-tuned code per engine in
:mod:`bridge.ledger.sqlite` and :mod:`bridge.ledger.postgres`. Everything added since
(visit assembly, hand-off queues, sync state, checkpoints, ...) is written once
against :class:`Tx` and runs unchanged on both engines::

    def hold_visit(store: Store, key: str, body: bytes, audit: AuditRecord) -> int:
        with store.transaction("hold_visit") as tx:
            entry = tx.append_audit(audit)
            tx.execute("INSERT INTO visit_message (visit, body, audit_seq) VALUES (?,?,?)",
                       (key, tx.seal(body, context="visit_message.body"), entry.seq))
            return entry.seq

Rules for SQL written against :class:`Tx`:

- placeholders are ``?``; no literal ``?`` or ``%`` elsewhere in the statement text;
- use what both engines accept: ``INSERT ... ON CONFLICT (...) DO UPDATE SET``,
  ``RETURNING``, ``COALESCE``; row locks are ``tx.for_update`` appended to a
  ``SELECT`` (empty on SQLite, whose write transaction already excludes writers);
- times are ``TEXT`` from :func:`bridge.ledger.audit.format_time`;
- health data (payloads, records, messages) is stored only through :meth:`Tx.seal`
  and read back through :meth:`Tx.unseal`, so encryption at rest covers it.

A transaction commits when the ``with`` block ends without an exception and rolls back
otherwise; engine errors become :class:`bridge.errors.StoreError` naming the
operation, never a value. ``durable=False`` lets SQLite skip waiting for the disk (for
bookkeeping whose loss is repaired by a resend); PostgreSQL always waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from bridge.ledger.migrations import Dialect

if TYPE_CHECKING:
    from bridge.ledger.audit import AuditEntry, AuditRecord
    from bridge.ledger.seal import Sealer


class Cursor(Protocol):
    """The part of a DB-API cursor a :class:`Tx` caller may use."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...


@lru_cache(maxsize=1024)
def _to_psycopg(statement: str) -> str:
    if "%" in statement:
        raise ValueError("SQL for Tx must not contain '%' (use a parameter)")
    return statement.replace("?", "%s")


class Tx:
    """One open transaction of a store (see the module docstring)."""

    def __init__(self, conn: Any, *, dialect: Dialect, store: Any, sealer: Sealer) -> None:
        self._conn = conn
        self.dialect: Dialect = dialect
        self._store = store
        self._sealer = sealer
        self.for_update = " FOR UPDATE" if dialect == "postgresql" else ""
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if dialect == "postgresql" else ""

    def _sql(self, statement: str) -> str:
        return _to_psycopg(statement) if self.dialect == "postgresql" else statement

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement with ``?`` placeholders."""
        return self._conn.execute(self._sql(statement), tuple(params))  # type: ignore[no-any-return]

    def executemany(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters."""
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        if self.dialect == "postgresql":
            with self._conn.cursor() as cur:
                cur.executemany(self._sql(statement), rows)
        else:
            self._conn.executemany(statement, rows)

    def one(self, statement: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a query, or None."""
        return self.execute(statement, params).fetchone()

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row of a query."""
        return list(self.execute(statement, params).fetchall())

    def append_audit(self, record: AuditRecord) -> AuditEntry:
        """Append an audit entry in this transaction (it commits or vanishes with it)."""
        return self._store._append(self._conn, record)  # type: ignore[no-any-return]

    def seal(self, data: bytes, *, context: str) -> bytes:
        """Health data as it is stored (encrypted at rest when a data key is configured).

        ``context`` names the table and column (``"visit_message.body"``); it is bound
        into the encryption so a sealed value cannot be moved to another column.
        """
        return self._sealer.seal(data, context=context)

    def blind(self, key: str) -> str:
        """A lookup key that names a person (``system|value``) as stored and searched.

        With encryption at rest it is a keyed hash (equal keys stay equal, so lookups
        work; the value cannot be read back: keep a sealed copy beside it if needed).
        """
        blind = getattr(self._sealer, "blind", None)
        return blind(key) if blind is not None else key

    def unseal(self, data: bytes | memoryview | None, *, context: str) -> bytes | None:
        """The plain bytes of a value stored with :meth:`seal` (None stays None)."""
        if data is None:
            return None
        from bridge.ledger.seal import UnknownDataKey

        try:
            return self._sealer.unseal(bytes(data), context=context)
        except UnknownDataKey:
            # Sealed under a data key added since this process loaded its keys.
            self._sealer.load(self, create=False)  # type: ignore[attr-defined]
            return self._sealer.unseal(bytes(data), context=context)
