"""The ledger on SQLite: outbox, inbox, consents and the audit chain in one file.

Durability: WAL journal with ``synchronous=FULL``, so every commit that anyone is
told about (an enqueue the HIS is answered for, an inbox row a receipt is signed for,
a consent, an HL7 message that gets AA) is on disk before the method returns. The
outbox's own bookkeeping (claiming rows for sending, recording a receipt, a retry, a
rejection) commits with ``synchronous=NORMAL``: it is atomic and ordered like every
commit, and it reaches the disk with the next synced commit or checkpoint. A power
loss can undo such a step, and that is harmless by design: the claim is sent again
and the partner answers with its original receipt. WAL replays commits as a prefix,
so the audit chain stays whole either way.
Every method that changes state appends its audit entry in the same transaction
(``BEGIN IMMEDIATE`` ... ``COMMIT``): either both are written or neither is.

Threading: the store is synchronous. One connection is opened with
``check_same_thread=False`` and every method holds a ``threading.Lock`` for its whole
transaction, so the async layer may call it from a dedicated worker thread (or a
few; they serialise on the lock). ``BEGIN IMMEDIATE`` takes SQLite's write lock up
front, so two processes on one file serialise too, waiting up to ``busy_timeout``.

Payloads are stored as plain BLOBs. Encryption at rest (DESIGN §6) is not done here
yet; until it is, protect the file with the filesystem (owner-only permissions on
an encrypted volume).

Times are taken as aware datetimes and stored as fixed-width UTC ISO strings, which
sort in time order, so ``next_attempt <= now`` is a string comparison in SQL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import orjson

from bridge.errors import BridgeError, ConflictError, StoreError
from bridge.files import create_private
from bridge.ledger.audit import (
    AUDIT_COLUMNS,
    GENESIS_HASH,
    AuditEntry,
    AuditRecord,
    ChainReport,
    chain_entry,
    format_time,
    parse_time,
    read_chain,
    stored_entries,
    stored_entry,
    tree_entries,
    verify_chain,
)
from bridge.ledger.errors import TransitionError, UnknownMessage
from bridge.ledger.migrations import MIGRATIONS, SCHEMA_MIGRATIONS_DDL
from bridge.ledger.portable import Tx
from bridge.ledger.seal import PlainSealer, Sealer
from bridge.ledger.states import REQUEUEABLE, OutboxState, check_transition
from bridge.ledger.tree import cache_of, close_cache

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a starting process waits for another that holds the dispatch lock alone
#: (see :meth:`SQLiteStore.hold_dispatch`).
DISPATCH_LOCK_WAIT = 10.0

_SENDING = frozenset({OutboxState.SENDING})
_PENDING = frozenset({OutboxState.QUEUED, OutboxState.SENDING})

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);

CREATE TABLE outbox (
    message_id   TEXT PRIMARY KEY,
    link         TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    partner      TEXT NOT NULL,
    payload      BLOB NOT NULL,
    digest       TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt TEXT NOT NULL,
    lease_until  TEXT,
    last_error   TEXT,
    receipt      BLOB,
    created      TEXT NOT NULL,
    updated      TEXT NOT NULL,
    UNIQUE (link, seq)
);
CREATE INDEX outbox_due ON outbox (link, state, next_attempt);
CREATE INDEX outbox_lease ON outbox (link, state, lease_until);

CREATE TABLE inbox (
    id          INTEGER PRIMARY KEY,
    sender      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    payload     BLOB NOT NULL,
    receipt     BLOB NOT NULL,
    audit_seq   INTEGER NOT NULL,
    received    TEXT NOT NULL
);
CREATE UNIQUE INDEX inbox_identity ON inbox (sender, message_id);

CREATE TABLE consent (
    consent_id  TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    resource    BLOB NOT NULL,
    updated     TEXT NOT NULL
);
CREATE TABLE consent_patient (
    consent_id  TEXT NOT NULL REFERENCES consent (consent_id),
    patient_key TEXT NOT NULL,
    PRIMARY KEY (consent_id, patient_key)
);
CREATE INDEX consent_patient_key ON consent_patient (patient_key);
CREATE TABLE consent_history (
    id           INTEGER PRIMARY KEY,
    consent_id   TEXT NOT NULL,
    status       TEXT NOT NULL,
    resource     BLOB NOT NULL,
    patient_keys TEXT NOT NULL,
    changed      TEXT NOT NULL,
    audit_seq    INTEGER NOT NULL
);

-- seq is the rowid, so stored order and chain order are the same thing.
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    time       TEXT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    partner    TEXT,
    patient    TEXT,
    categories TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    detail     TEXT,
    digest     TEXT,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_patient ON audit (patient);
CREATE INDEX audit_subject ON audit (subject);
-- Guards against accidents, not attackers: anyone who can write the file can drop
-- these triggers. The hash chain and the partner's cosigned head catch that case.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
"""

@dataclass(frozen=True)
class OutboxRow:
    """One message waiting to be, being, or having been delivered."""

    message_id: str
    link: str
    seq: int
    partner: str
    payload: bytes
    digest: str
    state: OutboxState
    attempts: int
    next_attempt: datetime
    lease_until: datetime | None
    last_error: str | None
    receipt: bytes | None
    created: datetime
    updated: datetime
    #: The claim may have reached the partner without an answer (a send cut or timed
    #: out after the request went out, or a lease taken over from a crashed sender).
    #: Such a claim is never given up: only the partner's answer settles it.
    fate_unknown: bool = False
    #: What the partner last answered (``HTTP 503``, ``no answer: ...``); codes, no values.
    last_answer: str | None = None
    #: When the give-up clock started: the last requeue, or None for the enqueue.
    since: datetime | None = None

    @property
    def pending_since(self) -> datetime:
        """When the current delivery effort began (enqueue, or the last requeue)."""
        return self.since if self.since is not None else self.created


@dataclass(frozen=True)
class InboxRow:
    """One message received and stored, with the receipt that was answered for it."""

    sender: str
    message_id: str
    digest: str
    payload: bytes
    receipt: bytes
    audit_seq: int
    received: datetime


@dataclass(frozen=True)
class HL7InboxRow:
    """One HL7 v2 message received over MLLP and stored, with the ACK answered for it.

    ``sender`` is the sending system's key (MSH-3 and MSH-4), ``control_id`` its
    MSH-10; ``message`` the bytes exactly as framed; ``record`` the DE record mapped
    from it as JSON, or None when the message was stored without mapping.
    """

    sender: str
    control_id: str
    digest: str
    message: bytes
    record: bytes | None
    ack: bytes
    audit_seq: int
    received: datetime


@dataclass(frozen=True)
class ConsentRow:
    """The current version of a consent as last put."""

    consent_id: str
    status: str
    resource: bytes
    patient_keys: tuple[str, ...]
    updated: datetime


_OUTBOX_COLS = (
    "message_id, link, seq, partner, payload, digest, state, attempts, next_attempt,"
    " lease_until, last_error, receipt, created, updated"
)
#: What a row is read with: the columns written at enqueue and those added since.
_OUTBOX_READ = _OUTBOX_COLS + ", fate_unknown, last_answer, since"
#: Where an outbox row is read from: its payload is kept apart (migration
#: ``1503-outbox-payload-apart``), written once at enqueue. SQLite writes a whole row
#: again, overflow pages included, on every UPDATE: with the payload in the row, each
#: change of state (sending, acked) wrote the message again.
_OUTBOX_FROM = "outbox LEFT JOIN outbox_payload USING (message_id)"
#: The columns of the outbox table itself (the payload is not one of them).
_OUTBOX_OWN = _OUTBOX_COLS.replace(" payload,", "")
#: Where each column of :data:`_OUTBOX_READ` stands in a row read with it.
_OUTBOX_AT = {name.strip(): i for i, name in enumerate(_OUTBOX_READ.split(","))}
_INBOX_COLS = "sender, message_id, digest, payload, receipt, audit_seq, received"
_HL7_COLS = "sender, control_id, digest, message, record, ack, audit_seq, received"
_AUDIT_COLS = ", ".join(AUDIT_COLUMNS)


#: Opens a sealed column value: ``(stored bytes, context) -> plain bytes``.
Opener = Callable[[bytes, str], bytes]


def recorded_migrations(path: Path) -> list[str]:
    """The schema steps the store at ``path`` records, read without applying any and
    without the data key (``bridge store status``): the file is opened read-only, not
    while a restore is under way, and after what a killed one left is cleared away (a
    reader would read the file without a log set aside)."""
    with in_use(path):
        return _recorded_in(path)


def _recorded_in(path: Path) -> list[str]:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table'"
                            " AND name='schema_migrations'").fetchone() is None:
                return []
            return [str(n) for (n,) in conn.execute(
                "SELECT name FROM schema_migrations ORDER BY name")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read the schema steps: {sqlite_problem(exc)}",
                         location=str(path)) from exc


def _as_is(data: bytes, _context: str) -> bytes:
    return data


def _outbox_row(r: tuple[Any, ...], open_: Opener = _as_is) -> OutboxRow:
    if r[4] is None:
        # Written with its row in one transaction: only damage from outside parts them.
        raise StoreError("outbox row without its payload: the store is damaged",
                         location=f"outbox[{r[0]}].payload")
    return OutboxRow(
        message_id=r[0], link=r[1], seq=r[2], partner=r[3],
        payload=open_(bytes(r[4]), "outbox.payload"),
        digest=r[5], state=OutboxState(r[6]), attempts=r[7],
        next_attempt=parse_time(r[8]),
        lease_until=parse_time(r[9]) if r[9] is not None else None,
        last_error=r[10],
        receipt=open_(bytes(r[11]), "outbox.receipt") if r[11] is not None else None,
        created=parse_time(r[12]), updated=parse_time(r[13]),
        fate_unknown=bool(r[14]), last_answer=r[15],
        since=parse_time(r[16]) if r[16] is not None else None,
    )


def _inbox_row(r: tuple[Any, ...], open_: Opener = _as_is) -> InboxRow:
    return InboxRow(sender=r[0], message_id=r[1], digest=r[2],
                    payload=open_(bytes(r[3]), "inbox.payload"),
                    receipt=open_(bytes(r[4]), "inbox.receipt"), audit_seq=r[5],
                    received=parse_time(r[6]))


def _hl7_row(r: tuple[Any, ...], open_: Opener = _as_is) -> HL7InboxRow:
    return HL7InboxRow(sender=r[0], control_id=r[1], digest=r[2],
                       message=open_(bytes(r[3]), "hl7_inbox.message"),
                       record=open_(bytes(r[4]), "hl7_inbox.record") if r[4] is not None
                       else None, ack=bytes(r[5]),
                       audit_seq=r[6], received=parse_time(r[7]))


def _audit_entry(r: Sequence[Any]) -> AuditEntry:
    return stored_entry(r, read_time=parse_time, read_categories=orjson.loads)



def _switch_to_wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
    """Put the store in WAL mode and return the mode SQLite reports.

    A new file is in rollback-journal mode until the first process switches it; while
    that process writes, SQLite refuses another's switch at once with SQLITE_BUSY
    (without its busy handler, to avoid a deadlock), so the switch is retried here for
    as long as any other statement would wait."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            code = "_".join(str(getattr(exc, "sqlite_errorname", "")).split("_")[:2])
            if code not in ("SQLITE_BUSY", "SQLITE_LOCKED") or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


#: What an SQLite result code means to an operator (SQLite's own fixed texts say less).
_SQLITE_PROBLEMS = {
    "SQLITE_BUSY": "another process holds the store locked; try again when it is done",
    "SQLITE_LOCKED": "another process holds the store locked; try again when it is done",
    "SQLITE_CANTOPEN": "the file cannot be opened (missing folder, or not a file)",
    "SQLITE_NOTADB": "the file is not an SQLite database",
    "SQLITE_CORRUPT": "the database file is corrupt",
    "SQLITE_READONLY": "the store is read-only for this user",
    "SQLITE_PERM": "permission denied",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_IOERR": "the disk failed to read or write",
}


def sqlite_problem(exc: sqlite3.Error) -> str:
    """What went wrong, by SQLite's result code (never a value: codes only)."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    base = name.split("_", 2)
    primary = "_".join(base[:2]) if len(base) >= 2 else name
    problem = _SQLITE_PROBLEMS.get(primary)
    return f"{problem} ({name})" if problem else f"{type(exc).__name__} {name}".strip()

class SQLiteStore:
    """Outbox, inbox, consents and audit chain in one SQLite file (see module docstring)."""

    dialect = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0,
                 sealer: Sealer | None = None, restoring: bool = False) -> None:
        """Open (creating if needed) the store at ``path`` and bring its schema up.

        ``restoring``: opened by a restore that holds the store's locks alone (see
        :func:`nobody_serving`), to check and record what it put in place."""
        self.path = Path(path)
        self.sealer: Sealer = sealer or PlainSealer()
        #: Names this store in ``outbox.claimed_by`` of the claims it sends.
        self.worker_id = default_worker_id()
        self._lock = threading.Lock()
        self._dispatch_lock: int | None = None  # see hold_dispatch
        # Held while the store is open: a restore refuses to replace the file meanwhile
        # (see nobody_serving), and a store is not opened while one is under way. A
        # store dropped without close() lets go of it when it is collected.
        self._lock_files: list[int] = [] if restoring else [_hold_open(self.path)]
        self._let_go = weakref.finalize(self, _close_fds, self._lock_files)
        try:
            if not restoring:
                settle_aside(self.path)
            # The store holds health data: a new one is the owner's only. SQLite would
            # make the file with the process's umask (644 under the usual 022), and its
            # -wal and -shm files take the file's mode; a store already there keeps its own.
            with contextlib.suppress(OSError):  # there already; or SQLite says why not
                create_private(self.path)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so the module
            # never opens a transaction behind our back.
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                str(self.path), timeout=busy_timeout, isolation_level=None,
                check_same_thread=False,
            )
            conn = self._conn
            mode = _switch_to_wal(conn, busy_timeout)
            if str(mode).lower() != "wal":
                raise StoreError("store could not switch to WAL journal", location=str(self.path))
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn)
        except BaseException as exc:
            self._let_go()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open store: {sqlite_problem(exc)}",
                                 location=str(self.path)) from exc
            raise

    # --- plumbing -------------------------------------------------------------------

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if exists is None:
                for statement in _split_script(_SCHEMA):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            else:
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
                if version != SCHEMA_VERSION:
                    raise StoreError(
                        f"store schema version {version} is not {SCHEMA_VERSION}",
                        location=f"{self.path}:schema_version",
                    )
            moved = self._apply_migrations(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if moved and exists is not None:
            # Moving an existing store (1503 copies a table) went through the journal
            # whole: give the journal's space back now rather than at some later
            # checkpoint.
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # another process reading: its next checkpoint does it

    def _apply_migrations(self, conn: sqlite3.Connection) -> int:
        """Apply, in name order, every migration this store has not recorded; return how
        many ran."""
        conn.execute(SCHEMA_MIGRATIONS_DDL)
        applied = {name for (name,) in conn.execute("SELECT name FROM schema_migrations")}
        known = {m.name for m in MIGRATIONS}
        unknown = sorted(applied - known)
        if unknown:
            raise StoreError(
                f"store was upgraded by a newer bridge (migration {unknown[-1]});"
                " run that version or restore a backup",
                location=f"{self.path}:schema_migrations",
            )
        moved = 0
        for migration in MIGRATIONS:
            if migration.name in applied:
                continue
            done = migration.sqlite_done_if
            steps = ([] if done is not None and conn.execute(done).fetchone() is not None
                     else _split_script(migration.script("sqlite")))
            for statement in steps:
                try:
                    conn.execute(statement)
                except sqlite3.OperationalError as exc:
                    # SQLite has no ADD COLUMN IF NOT EXISTS: a column already there (a
                    # store whose migration record was lost) is the step already done.
                    if not str(exc).startswith("duplicate column name"):
                        raise
            conn.execute("INSERT INTO schema_migrations (name, applied) VALUES (?, datetime('now'))",
                         (migration.name,))
            moved += 1
        return moved

    def applied_migrations(self) -> list[str]:
        """Names of the migrations this store has applied, in order."""
        with self._read("applied_migrations") as conn:
            return [n for (n,) in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]

    @contextmanager
    def transaction(self, what: str, *, durable: bool = True) -> Iterator[Tx]:
        """A write transaction for code written once for both engines (see ``portable``)."""
        with self._tx(what, durable=durable) as conn:
            yield Tx(conn, dialect="sqlite", store=self, sealer=self.sealer)

    @contextmanager
    def read(self, what: str) -> Iterator[Tx]:
        """A read for code written once for both engines (see ``portable``).

        SQLite reads see one snapshot only inside a transaction; a read of several
        statements that must agree should use :meth:`transaction`.
        """
        with self._read(what) as conn:
            yield Tx(conn, dialect="sqlite", store=self, sealer=self.sealer)

    @contextmanager
    def _tx(self, what: str, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """Hold the lock and a write transaction; commit on success, roll back on any error.

        ``durable=False`` commits without waiting for the disk (see the module
        docstring for which steps may). SQLite errors become :class:`StoreError`
        naming the operation only.
        """
        with self._lock:
            conn = self._require_open()
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"store busy or failing in {what}: {sqlite_problem(exc)}",
                                 location=str(self.path)) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store failed in {what}: {sqlite_problem(exc)}",
                                     location=str(self.path)) from exc
                raise
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._require_open()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"store failed in {what} ({type(exc).__name__})",
                                 location=str(self.path)) from exc

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is closed", location=str(self.path))
        return self._conn

    def _append(self, conn: sqlite3.Connection, record: AuditRecord, *,
                proof: bool = True) -> AuditEntry:
        """Append ``record`` to the chain in ``conn``'s transaction. ``proof=False``: the
        caller needs no root nor inclusion proof (see :meth:`TreeCache.on_append`)."""
        head = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev_seq, prev_hash = (head[0], head[1]) if head is not None else (0, GENESIS_HASH)
        entry = chain_entry(prev_hash, prev_seq + 1, record)

        def fetch(after: int) -> list[AuditEntry]:
            # A damaged entry does not stop the appends after it (see tree_entries).
            return tree_entries(conn.execute(
                f"SELECT {_AUDIT_COLS} FROM audit WHERE seq>? ORDER BY seq", (after,)),
                _audit_entry)

        entry = cache_of(self).on_append(entry, fetch, proof=proof)
        j = record.to_json_dict()
        conn.execute(
            f"INSERT INTO audit ({_AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (entry.seq, j["time"], j["actor"], j["action"], j["subject"], j["partner"],
             j["patient"], orjson.dumps(j["categories"]).decode(), j["outcome"], j["detail"],
             j["digest"], entry.prev_hash, entry.hash, record.operator),
        )
        return entry

    def _opener(self, conn: sqlite3.Connection) -> Opener:
        """Opens sealed columns read on ``conn`` (see :mod:`bridge.ledger.seal`)."""
        if isinstance(self.sealer, PlainSealer):
            return _as_is
        tx = Tx(conn, dialect="sqlite", store=self, sealer=self.sealer)

        def open_(data: bytes, context: str) -> bytes:
            return tx.unseal(data, context=context) or b""

        return open_

    def _seal(self, data: bytes, context: str) -> bytes:
        """``data`` as stored in a health-data column."""
        return self.sealer.seal(data, context=context)

    def _blind(self, key: str) -> str:
        """A patient lookup key as stored: keyed by the sealer when it encrypts."""
        blind = getattr(self.sealer, "blind", None)
        return blind(key) if blind is not None else key

    def _get_outbox(self, conn: sqlite3.Connection, message_id: str) -> OutboxRow | None:
        r = conn.execute(f"SELECT {_OUTBOX_READ} FROM {_OUTBOX_FROM} WHERE message_id=?",
                         (message_id,)).fetchone()
        return _outbox_row(r, self._opener(conn)) if r is not None else None

    def _transition(
        self,
        what: str,
        message_id: str,
        to_state: OutboxState,
        *,
        now: datetime,
        audit: AuditRecord | None,
        sets: dict[str, Any],
        allowed_from: frozenset[OutboxState],
    ) -> OutboxRow:
        """Move one row to ``to_state``; audit in the same transaction.

        ``allowed_from`` narrows the table to the states this operation starts from
        (a retry and a requeue both end in ``queued`` but start from different states).
        """
        # The outcome of a send attempt may be replayed after a power loss (see the
        # module docstring); an operator's requeue is an instruction and is synced.
        with self._tx(what, durable=what == "requeue") as conn:
            return self._transition_in(conn, what, message_id, to_state, now=now, audit=audit,
                                       sets=sets, allowed_from=allowed_from)

    def _transition_in(
        self,
        conn: sqlite3.Connection,
        what: str,
        message_id: str,
        to_state: OutboxState,
        *,
        now: datetime,
        audit: AuditRecord | None,
        sets: dict[str, Any],
        allowed_from: frozenset[OutboxState],
    ) -> OutboxRow:
        stored = conn.execute(f"SELECT {_OUTBOX_READ} FROM {_OUTBOX_FROM} WHERE message_id=?",
                              (message_id,)).fetchone()
        if stored is None:
            raise UnknownMessage(f"{what}: no outbox row for this message id",
                                 location=f"outbox[{message_id}]")
        opener = self._opener(conn)
        row = _outbox_row(stored, opener)
        if row.state not in allowed_from:
            raise TransitionError(
                f"{what} is not allowed from state {row.state.value}",
                location=f"outbox[{message_id}].state",
            )
        check_transition(row.state, to_state)
        cols = {"state": to_state.value, "updated": format_time(now), **sets}
        if cols.get("receipt") is not None:
            cols["receipt"] = self._seal(cols["receipt"], "outbox.receipt")
        assignments = ", ".join(f"{c}=?" for c in cols)
        # A row being sent that another sender holds now (this one's lease ran out and
        # the other took it) is that sender's to settle.
        changed = conn.execute(
            f"UPDATE outbox SET {assignments} WHERE message_id=? AND (state<>'sending'"
            " OR claimed_by IS NULL OR claimed_by=?)",
            (*cols.values(), message_id, self.worker_id)).rowcount
        if not changed:
            raise TransitionError(f"{what}: another sender holds this claim now",
                                  location=f"outbox[{message_id}].claimed_by")
        if audit is not None:
            self._append(conn, audit, proof=False)
        # The row as it now stands is the row read above with these columns written
        # (nothing else writes it in this transaction): made here, not read again.
        after = list(stored)
        for column, value in cols.items():
            after[_OUTBOX_AT[column]] = value
        return _outbox_row(tuple(after), opener)

    # --- outbox ---------------------------------------------------------------------

    def enqueue(
        self,
        *,
        message_id: str,
        link: str,
        partner: str,
        payload: bytes,
        digest: str,
        audit: AuditRecord,
        now: datetime,
    ) -> OutboxRow:
        """Store a signed message for delivery on ``link``; it is due immediately.

        Assigns the next sequence number of the link (1, 2, 3, ...), after the highest
        one the partner was last seen to hold (``sync_outbound``). Enqueuing the same
        ``message_id`` again with the same ``digest`` returns the existing row and
        writes nothing (safe to retry after a crash); with a different digest, link or
        partner it raises
        :class:`bridge.errors.ConflictError`. ``digest`` is stored as given; it is the
        caller's digest of ``payload``.
        """
        with self._tx("enqueue") as conn:
            return self._enqueue_in(conn, message_id=message_id, link=link, partner=partner,
                                    payload=payload, digest=digest, audit=audit, now=now)

    def enqueue_many(self, requests: Sequence[Mapping[str, Any]]) -> list[OutboxRow | BridgeError]:
        """Several :meth:`enqueue` calls in one synced transaction (group commit).

        Each request holds the keyword arguments of :meth:`enqueue`. Every request is
        judged on its own, exactly as :meth:`enqueue` would judge it (a conflict undoes
        that request only, through a savepoint), and the answers come back in order:
        the row, or the error that request would have raised. One disk flush then
        covers the whole group, which is what lets many concurrent submitters share
        the cost of durability.
        """
        results: list[OutboxRow | BridgeError] = []
        with self._tx("enqueue_many") as conn:
            for i, request in enumerate(requests):
                conn.execute(f"SAVEPOINT enqueue_{i}")
                try:
                    results.append(self._enqueue_in(conn, **request))
                except BridgeError as exc:
                    conn.execute(f"ROLLBACK TO enqueue_{i}")
                    results.append(exc)
                conn.execute(f"RELEASE enqueue_{i}")
        return results

    def _enqueue_in(
        self,
        conn: sqlite3.Connection,
        *,
        message_id: str,
        link: str,
        partner: str,
        payload: bytes,
        digest: str,
        audit: AuditRecord,
        now: datetime,
    ) -> OutboxRow:
        existing = self._get_outbox(conn, message_id)
        if existing is not None:
            if (existing.digest, existing.link, existing.partner) != (digest, link, partner):
                raise ConflictError("message id already enqueued with different content",
                                    location=f"outbox[{message_id}]")
            return existing
        # After this store's highest number on the link and after the highest the
        # partner was last seen to hold (a store restored from a backup lacks the claims
        # numbered since): a number is never given again (PROTOCOL P-SYNC-7).
        seq = conn.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM outbox WHERE link=?), 0),"
            " COALESCE((SELECT partner_highest FROM sync_outbound WHERE link=?), 0)) + 1",
            (link, link)).fetchone()[0]
        t = format_time(now)
        values = (message_id, link, seq, partner, payload, digest, OutboxState.QUEUED.value, 0,
                  t, None, None, None, t, t)
        conn.execute(f"INSERT INTO outbox ({_OUTBOX_OWN}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (*values[:4], *values[5:]))
        conn.execute("INSERT INTO outbox_payload (message_id, payload) VALUES (?,?)",
                     (message_id, self._seal(payload, "outbox.payload")))
        self._append(conn, audit, proof=False)
        # The row as stored (the columns added since at their defaults: no fate unknown,
        # no answer, no requeue), made from what was written rather than read again.
        return _outbox_row((*values, 0, None, None))

    def claim_due(
        self,
        link: str,
        *,
        now: datetime,
        limit: int = 64,
        lease: timedelta = timedelta(seconds=30),
    ) -> list[OutboxRow]:
        """Atomically take up to ``limit`` due rows of ``link`` for sending, in seq order.

        Due means ``queued`` with ``next_attempt <= now``, or ``sending`` with an expired
        lease (its worker crashed or hung: crash recovery). Each claimed row becomes
        ``sending`` with ``lease_until = now + lease``. A claim of a ``queued`` row is an
        attempt (``attempts + 1``); taking over an expired lease is not (nothing failed,
        a sender stopped), but the crashed sender may have sent the claim, so the row's
        fate becomes unknown. The claim is not audited: it is an internal lease, and the
        outcome of the attempt is audited by the ``mark_*`` call that ends it.
        """
        t = format_time(now)
        until = format_time(now + lease)
        with self._tx("claim_due", durable=False) as conn:
            # Two indexed queries rather than one with OR: the OR form makes SQLite walk
            # every row of the link, acked ones included, which grows without bound.
            due = conn.execute(
                "SELECT seq, message_id, 0 FROM outbox WHERE link=? AND state='queued'"
                " AND next_attempt<=? ORDER BY seq LIMIT ?", (link, t, limit)).fetchall()
            due += conn.execute(
                "SELECT seq, message_id, 1 FROM outbox WHERE link=? AND state='sending'"
                " AND lease_until<=? ORDER BY seq LIMIT ?", (link, t, limit)).fetchall()
            chosen = sorted(due)[:limit]
            ids = [m for _seq, m, _reclaim in chosen]
            me = self.worker_id
            conn.executemany(
                "UPDATE outbox SET state='sending', attempts=attempts+1, lease_until=?,"
                " updated=?, claimed_by=? WHERE message_id=?",
                [(until, t, me, m) for _seq, m, reclaim in chosen if not reclaim])
            conn.executemany(
                "UPDATE outbox SET lease_until=?, updated=?, fate_unknown=1, claimed_by=?"
                " WHERE message_id=?", [(until, t, me, m) for _seq, m, reclaim in chosen if reclaim])
            rows = [self._get_outbox(conn, m) for m in ids]
            return [r for r in rows if r is not None]

    def mark_acked(self, message_id: str, *, receipt: bytes, now: datetime,
                   audit: AuditRecord) -> OutboxRow:
        """Record the partner's signed receipt: ``sending -> acked`` (final)."""
        return self._transition("mark_acked", message_id, OutboxState.ACKED,
                                allowed_from=_SENDING, now=now, audit=audit,
                                sets={"receipt": receipt, "lease_until": None})

    def mark_acked_many(self, requests: Sequence[Mapping[str, Any]]) -> list[OutboxRow | BridgeError]:
        """Several :meth:`mark_acked` calls in one transaction, answered in order (the
        row, or the error that request would have raised; a refused one changes
        nothing, through a savepoint). One round trip to the store for many receipts."""
        results: list[OutboxRow | BridgeError] = []
        with self._tx("mark_acked_many", durable=False) as conn:
            for i, request in enumerate(requests):
                conn.execute(f"SAVEPOINT acked_{i}")
                try:
                    results.append(self._transition_in(
                        conn, "mark_acked", request["message_id"], OutboxState.ACKED,
                        allowed_from=_SENDING, now=request["now"], audit=request["audit"],
                        sets={"receipt": request["receipt"], "lease_until": None}))
                except BridgeError as exc:
                    conn.execute(f"ROLLBACK TO acked_{i}")
                    results.append(exc)
                conn.execute(f"RELEASE acked_{i}")
        return results

    def mark_retry(self, message_id: str, *, next_attempt: datetime, error: str, now: datetime,
                   audit: AuditRecord | None, fate_unknown: bool = False,
                   answer: str | None = None) -> OutboxRow:
        """A transient failure: ``sending -> queued``, due again at ``next_attempt``.

        ``error`` is an error code (no values). ``audit`` may be None to keep routine
        retries out of the log; the final outcome is audited either way.
        ``fate_unknown`` records that this attempt may have reached the partner (it
        stays recorded until the claim is settled); ``answer`` is what the partner
        answered, if anything.
        """
        sets: dict[str, Any] = {"next_attempt": format_time(next_attempt),
                                "last_error": error, "lease_until": None}
        if fate_unknown:
            sets["fate_unknown"] = 1
        if answer is not None:
            sets["last_answer"] = answer
        return self._transition("mark_retry", message_id, OutboxState.QUEUED,
                                allowed_from=_SENDING, now=now, audit=audit, sets=sets)

    def mark_rejected(self, message_id: str, *, error: str, receipt: bytes | None, now: datetime,
                      audit: AuditRecord) -> OutboxRow:
        """The partner refused definitively: ``sending -> rejected``; never retried by itself."""
        return self._transition("mark_rejected", message_id, OutboxState.REJECTED,
                                allowed_from=_SENDING, now=now,
                                audit=audit, sets={"last_error": error, "receipt": receipt,
                                                   "lease_until": None})

    def mark_refused(self, message_id: str, *, error: str, now: datetime,
                     audit: AuditRecord) -> OutboxRow:
        """Our consent check said no at dispatch: ``queued|sending -> refused`` (final)."""
        return self._transition("mark_refused", message_id, OutboxState.REFUSED,
                                allowed_from=_PENDING, now=now,
                                audit=audit, sets={"last_error": error, "lease_until": None})

    def mark_dead(self, message_id: str, *, error: str, now: datetime,
                  audit: AuditRecord, answer: str | None = None) -> OutboxRow:
        """Given up: ``sending -> dead``; waits for an operator's requeue.

        ``error`` is the reason (a code), ``answer`` what the partner last answered.
        """
        sets: dict[str, Any] = {"last_error": error, "lease_until": None}
        if answer is not None:
            sets["last_answer"] = answer
        return self._transition("mark_dead", message_id, OutboxState.DEAD,
                                allowed_from=_SENDING, now=now, audit=audit, sets=sets)

    def requeue(self, message_id: str, *, now: datetime, audit: AuditRecord) -> OutboxRow:
        """Operator's resend of a ``dead`` or ``rejected`` message: back to ``queued``, due now.

        Keeps the same message id and sequence number, so the receiver deduplicates it
        if it did in fact hold it. Attempts restart from zero, and so does the give-up
        clock (``since``).
        """
        return self._transition("requeue", message_id, OutboxState.QUEUED, now=now, audit=audit,
                                allowed_from=REQUEUEABLE,
                                sets={"next_attempt": format_time(now), "attempts": 0,
                                      "lease_until": None, "since": format_time(now)})

    def get_outbox(self, message_id: str) -> OutboxRow | None:
        """The outbox row for ``message_id``, or None."""
        with self._read("get_outbox") as conn:
            return self._get_outbox(conn, message_id)

    def outbox_counts(self, link: str | None = None) -> dict[str, int]:
        """Number of rows per state (every state present, zeros included)."""
        counts = {s.value: 0 for s in OutboxState}
        with self._read("outbox_counts") as conn:
            if link is None:
                cur = conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")
            else:
                cur = conn.execute("SELECT state, count(*) FROM outbox WHERE link=? GROUP BY state",
                                   (link,))
            for state, n in cur:
                counts[state] = n
        return counts

    def list_outbox(self, link: str, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Rows of ``link`` in seq order, optionally only those in ``state``."""
        with self._read("list_outbox") as conn:
            if state is None:
                cur = conn.execute(f"SELECT {_OUTBOX_READ} FROM {_OUTBOX_FROM} WHERE link=?"
                                   " ORDER BY seq LIMIT ?", (link, limit))
            else:
                cur = conn.execute(f"SELECT {_OUTBOX_READ} FROM {_OUTBOX_FROM} WHERE link=? AND state=?"
                                   " ORDER BY seq LIMIT ?", (link, OutboxState(state).value, limit))
            return [_outbox_row(r, self._opener(conn)) for r in cur]

    def highest_contiguous_acked(self, link: str) -> int:
        """Largest n such that seqs 1..n of ``link`` are all acked (0 if seq 1 is not)."""
        with self._read("highest_contiguous_acked") as conn:
            r = conn.execute(
                "SELECT MIN(seq) FROM outbox WHERE link=? AND state!='acked'", (link,)).fetchone()
            if r[0] is not None:
                return int(r[0]) - 1
            r = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE link=?",
                             (link,)).fetchone()
            return int(r[0])

    # --- inbox ----------------------------------------------------------------------

    def inbox_lookup(self, sender: str, message_id: str) -> InboxRow | None:
        """The stored message ``(sender, message_id)``, or None."""
        with self._read("inbox_lookup") as conn:
            r = conn.execute(f"SELECT {_INBOX_COLS} FROM inbox WHERE sender=? AND message_id=?",
                             (sender, message_id)).fetchone()
            return _inbox_row(r, self._opener(conn)) if r is not None else None

    def inbox_count(self, sender: str | None = None) -> int:
        """How many messages the inbox holds (from ``sender``, or from everyone)."""
        with self._read("inbox_count") as conn:
            if sender is None:
                return int(conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])
            return int(
                conn.execute("SELECT COUNT(*) FROM inbox WHERE sender=?", (sender,)).fetchone()[0]
            )

    def inbox_accept(
        self,
        *,
        sender: str,
        message_id: str,
        digest: str,
        payload: bytes,
        audit: AuditRecord,
        make_receipt: Callable[[AuditEntry], bytes],
        now: datetime,
        within: Callable[[Tx, InboxRow], None] | None = None,
    ) -> tuple[InboxRow, bool]:
        """Store a received message once and issue its receipt, in one transaction.

        - New ``(sender, message_id)``: appends ``audit``, calls ``make_receipt`` with the
          new audit entry (so the signed receipt can name it), stores the message with
          that receipt, commits, and returns ``(row, True)``.
        - Already held with the same ``digest``: writes nothing and returns
          ``(existing, False)``; answer with ``existing.receipt``.
        - Already held with a different ``digest``: raises
          :class:`bridge.errors.ConflictError` and writes nothing (the caller audits the
          rejection with :meth:`append_audit` if it wishes).

        If ``make_receipt`` raises, the transaction is rolled back: no audit entry and no
        inbox row exist afterwards, and the exception propagates unchanged. It runs with
        the store's lock held, so it must be quick (a signature, not a network call).

        ``within``, when given, runs after the new row is inserted, in the same
        transaction (written against :class:`Tx`): what it writes commits with the row
        or, if it raises, nothing does (the hand-off queue is filled this way).
        """
        with self._tx("inbox_accept") as conn:
            return self._inbox_accept_in(
                conn, sender=sender, message_id=message_id, digest=digest, payload=payload,
                audit=audit, make_receipt=make_receipt, now=now, within=within)

    def inbox_accept_many(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[tuple[InboxRow, bool] | Exception]:
        """Several :meth:`inbox_accept` calls in one synced transaction (group commit).

        Each request holds the keyword arguments of :meth:`inbox_accept` and is judged
        on its own, exactly as :meth:`inbox_accept` would judge it: a conflict, or a
        ``make_receipt`` or ``within`` that raises, undoes that request only (its audit
        entry too, through a savepoint) and its answer is that exception. Answers come
        back in order. One disk flush covers the group; a failure of the store itself
        fails the whole group, and nothing of it is kept.
        """
        results: list[tuple[InboxRow, bool] | Exception] = []
        with self._tx("inbox_accept_many") as conn:
            for i, request in enumerate(requests):
                conn.execute(f"SAVEPOINT accept_{i}")
                try:
                    results.append(self._inbox_accept_in(conn, **request))
                except sqlite3.Error:
                    raise
                except Exception as exc:  # noqa: BLE001 - that request's own answer
                    conn.execute(f"ROLLBACK TO accept_{i}")
                    results.append(exc)
                conn.execute(f"RELEASE accept_{i}")
        return results

    def _inbox_accept_in(
        self,
        conn: sqlite3.Connection,
        *,
        sender: str,
        message_id: str,
        digest: str,
        payload: bytes,
        audit: AuditRecord,
        make_receipt: Callable[[AuditEntry], bytes],
        now: datetime,
        within: Callable[[Tx, InboxRow], None] | None = None,
    ) -> tuple[InboxRow, bool]:
        r = conn.execute(f"SELECT {_INBOX_COLS} FROM inbox WHERE sender=? AND message_id=?",
                         (sender, message_id)).fetchone()
        if r is not None:
            existing = _inbox_row(r, self._opener(conn))
            if existing.digest != digest:
                raise ConflictError("message id already received with different content",
                                    location=f"inbox[{sender}/{message_id}]")
            return existing, False
        entry = self._append(conn, audit)
        receipt = make_receipt(entry)
        conn.execute(
            f"INSERT INTO inbox ({_INBOX_COLS}) VALUES (?,?,?,?,?,?,?)",
            (sender, message_id, digest, self._seal(payload, "inbox.payload"),
             self._seal(receipt, "inbox.receipt"), entry.seq, format_time(now)),
        )
        row = InboxRow(sender=sender, message_id=message_id, digest=digest,
                       payload=bytes(payload), receipt=bytes(receipt), audit_seq=entry.seq,
                       received=parse_time(format_time(now)))
        if within is not None:
            within(Tx(conn, dialect="sqlite", store=self, sealer=self.sealer), row)
        return row, True

    # --- HL7 v2 inbox ---------------------------------------------------------------

    def hl7_lookup(self, sender: str, control_id: str) -> HL7InboxRow | None:
        """The stored HL7 message ``(sender, control_id)``, or None."""
        with self._read("hl7_lookup") as conn:
            r = conn.execute(f"SELECT {_HL7_COLS} FROM hl7_inbox WHERE sender=? AND control_id=?",
                             (sender, control_id)).fetchone()
            return _hl7_row(r, self._opener(conn)) if r is not None else None

    def hl7_count(self, sender: str | None = None) -> int:
        """How many HL7 messages are stored (from ``sender``, or from everyone)."""
        with self._read("hl7_count") as conn:
            if sender is None:
                return int(conn.execute("SELECT COUNT(*) FROM hl7_inbox").fetchone()[0])
            return int(conn.execute("SELECT COUNT(*) FROM hl7_inbox WHERE sender=?",
                                    (sender,)).fetchone()[0])

    def hl7_accept(
        self,
        *,
        sender: str,
        control_id: str,
        digest: str,
        message: bytes,
        record: bytes | None,
        audit: AuditRecord,
        make_ack: Callable[[AuditEntry], bytes],
        now: datetime,
    ) -> tuple[HL7InboxRow, bool]:
        """Store an HL7 message once with the ACK answered for it, in one transaction.

        The same contract as :meth:`inbox_accept`, keyed by ``(sender, control_id)``:

        - new: appends ``audit``, calls ``make_ack`` with the new entry, stores message,
          record and ACK, commits (``synchronous=FULL``: on disk when this returns) and
          returns ``(row, True)``; only then may the caller send the ACK;
        - held with the same ``digest``: writes nothing, returns ``(existing, False)``;
          answer with ``existing.ack``, byte for byte;
        - held with another ``digest``: raises :class:`bridge.errors.ConflictError`,
          writes nothing.

        If ``make_ack`` raises, nothing is written and the exception propagates.
        """
        with self._tx("hl7_accept") as conn:
            r = conn.execute(f"SELECT {_HL7_COLS} FROM hl7_inbox WHERE sender=? AND control_id=?",
                             (sender, control_id)).fetchone()
            if r is not None:
                existing = _hl7_row(r, self._opener(conn))
                if existing.digest != digest:
                    raise ConflictError("duplicate control id with different content",
                                        location="MSH-10")
                return existing, False
            entry = self._append(conn, audit)
            ack = make_ack(entry)
            conn.execute(
                f"INSERT INTO hl7_inbox ({_HL7_COLS}) VALUES (?,?,?,?,?,?,?,?)",
                (sender, control_id, digest, self._seal(message, "hl7_inbox.message"),
                 self._seal(record, "hl7_inbox.record") if record is not None else None, ack,
                 entry.seq, format_time(now)),
            )
            return HL7InboxRow(sender=sender, control_id=control_id, digest=digest,
                               message=bytes(message),
                               record=bytes(record) if record is not None else None,
                               ack=bytes(ack), audit_seq=entry.seq,
                               received=parse_time(format_time(now))), True

    # --- audit ----------------------------------------------------------------------

    def append_audit(self, record: AuditRecord, *, proof: bool = True) -> AuditEntry:
        """Append one entry on its own (refusals, TLS failures, anything without a row).

        ``proof=False``: the caller needs no root nor inclusion proof of the entry (see
        :meth:`bridge.ledger.tree.TreeCache.on_append`)."""
        with self._tx("append_audit") as conn:
            return self._append(conn, record, proof=proof)

    def audit_entries(self, *, since_seq: int = 0) -> list[AuditEntry]:
        """Entries with ``seq > since_seq`` in chain order."""
        with self._read("audit_entries") as conn:
            return stored_entries(conn.execute(
                f"SELECT {_AUDIT_COLS} FROM audit WHERE seq>? ORDER BY seq", (since_seq,)),
                _audit_entry)

    def audit_by_patient(self, patient: str) -> list[AuditEntry]:
        """Entries about one patient pseudonym (``patient_pseudonym(...)``), in chain order."""
        with self._read("audit_by_patient") as conn:
            return stored_entries(conn.execute(
                f"SELECT {_AUDIT_COLS} FROM audit WHERE patient=? ORDER BY seq", (patient,)),
                _audit_entry)

    def verify_audit(self) -> ChainReport:
        """Verify the whole chain from genesis (see :func:`bridge.ledger.audit.verify_chain`)."""
        entries, damaged = read_chain(self.audit_entries)
        return verify_chain(entries, damaged=damaged)

    def audit_guards(self) -> frozenset[str]:
        """The names of the append-only triggers the audit table has (see the schema)."""
        with self._read("audit_guards") as conn:
            return frozenset(str(r[0]) for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name='audit'"))

    def audit_head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry; ``(0, 64 zeros)`` for an empty log."""
        with self._read("audit_head") as conn:
            r = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            return (int(r[0]), str(r[1])) if r is not None else (0, GENESIS_HASH)

    # --- consents -------------------------------------------------------------------

    def put_consent(self, *, consent_id: str, patient_keys: list[str], status: str,
                    resource: bytes, now: datetime, audit: AuditRecord) -> ConsentRow:
        """Insert or replace a consent; the previous versions stay in ``consent_history``.

        ``patient_keys`` are the lookup keys the policy room uses for the patient
        (pseudonyms or identifier keys); ``resource`` is the FHIR Consent JSON as received.
        """
        t = format_time(now)
        keys = tuple(dict.fromkeys(patient_keys))
        with self._tx("put_consent") as conn:
            entry = self._append(conn, audit)
            conn.execute(
                "INSERT INTO consent (consent_id, status, resource, updated) VALUES (?,?,?,?)"
                " ON CONFLICT (consent_id) DO UPDATE SET status=excluded.status,"
                " resource=excluded.resource, updated=excluded.updated",
                (consent_id, status, self._seal(resource, "consent.resource"), t))
            conn.execute("DELETE FROM consent_patient WHERE consent_id=?", (consent_id,))
            conn.executemany("INSERT INTO consent_patient (consent_id, patient_key) VALUES (?,?)",
                             [(consent_id, self._blind(k)) for k in keys])
            conn.execute(
                "INSERT INTO consent_history (consent_id, status, resource, patient_keys, changed,"
                " audit_seq) VALUES (?,?,?,?,?,?)",
                (consent_id, status, self._seal(resource, "consent_history.resource"),
                 orjson.dumps([self._blind(k) for k in keys]).decode(), t, entry.seq))
            return ConsentRow(consent_id, status, bytes(resource), keys, parse_time(t))

    def _consent(self, conn: sqlite3.Connection, consent_id: str) -> ConsentRow | None:
        r = conn.execute("SELECT consent_id, status, resource, updated FROM consent"
                         " WHERE consent_id=?", (consent_id,)).fetchone()
        if r is None:
            return None
        keys = tuple(k for (k,) in conn.execute(
            "SELECT patient_key FROM consent_patient WHERE consent_id=? ORDER BY patient_key",
            (consent_id,)))
        return ConsentRow(r[0], r[1], self._opener(conn)(bytes(r[2]), "consent.resource"), keys,
                          parse_time(r[3]))

    def get_consent(self, consent_id: str) -> ConsentRow | None:
        """The current version of one consent, or None."""
        with self._read("get_consent") as conn:
            return self._consent(conn, consent_id)

    def list_consents(self) -> list[tuple[str, str, bytes]]:
        """``(consent_id, status, resource)`` of every current consent, by id."""
        with self._read("list_consents") as conn:
            open_ = self._opener(conn)
            return [(r[0], r[1], open_(bytes(r[2]), "consent.resource")) for r in conn.execute(
                "SELECT consent_id, status, resource FROM consent ORDER BY consent_id")]

    def consents_for_patient(self, patient_key: str) -> list[ConsentRow]:
        """Current consents that name ``patient_key``."""
        with self._read("consents_for_patient") as conn:
            ids = [i for (i,) in conn.execute(
                "SELECT consent_id FROM consent_patient WHERE patient_key=? ORDER BY consent_id",
                (self._blind(patient_key),))]
            rows = [self._consent(conn, i) for i in ids]
            return [r for r in rows if r is not None]

    def consent_changes(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Consent versions put after change number ``after``, oldest first.

        ``(change number, resource)``; replaying them in order gives the current state.
        A process keeps the last number it saw and asks again, so a consent put or
        revoked through another process sharing the store takes effect here too.
        """
        with self._read("consent_changes") as conn:
            open_ = self._opener(conn)
            return [(int(r[0]), open_(bytes(r[1]), "consent_history.resource")) for r in conn.execute(
                "SELECT id, resource FROM consent_history WHERE id>? ORDER BY id LIMIT ?",
                (after, limit))]

    def consent_history(self, consent_id: str) -> list[tuple[str, bytes, datetime, int]]:
        """Every version put of ``consent_id``: ``(status, resource, changed, audit_seq)``."""
        with self._read("consent_history") as conn:
            open_ = self._opener(conn)
            return [(r[0], open_(bytes(r[1]), "consent_history.resource"), parse_time(r[2]),
                     int(r[3])) for r in conn.execute(
                "SELECT status, resource, changed, audit_seq FROM consent_history"
                " WHERE consent_id=? ORDER BY id", (consent_id,))]

    # --- lifecycle ------------------------------------------------------------------

    def hold_dispatch(self, when_alone: Callable[[], T] | None = None) -> T | None:
        """Mark this process as one that sends from this store, until the store closes,
        and run ``when_alone`` first when no other process does; its answer, else None.

        The mark is a shared ``flock`` on a file beside the store (``<store>.dispatch``,
        beside the file a symbolic link leads to), which the operating system drops
        when a process ends in any way, ``kill -9`` included. Every sender takes it
        before it leases anything (:class:`~bridge.link.dispatcher.Dispatcher` and the
        hand-off workers start with it). With ``when_alone``, an exclusive lock is tried
        first: taken, it says that no other open process holds the mark, so whatever
        is ``sending`` was left by a process that is gone, and ``when_alone`` may send
        it again at once (:func:`bridge.ledger.delivery.release_orphaned`). The lock is
        then shared, so that a process started later, or this one started again while
        another still sends, leaves what is ``sending`` to its lease. Only the first
        call of a store does anything; later ones return None.

        Waits at most :data:`DISPATCH_LOCK_WAIT` seconds for another process starting
        at the same moment to finish taking up what was left, then raises
        :class:`StoreError` naming the lock file, as it does when the file cannot be
        opened."""
        with self._lock:
            if self._dispatch_lock is not None:
                return None
            fd, where = _dispatch_lock_file(self.path)
            self._dispatch_lock = fd
            self._lock_files.append(fd)  # closed with the others (see __init__)
        alone = False
        if when_alone is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass
            else:
                alone = True
        try:
            return when_alone() if alone and when_alone is not None else None
        finally:
            # From exclusive to shared, or shared now. Another process holds it
            # exclusively only while it takes up what was left.
            deadline = time.monotonic() + DISPATCH_LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        with self._lock:  # not marked: a later call tries again
                            self._lock_files.remove(fd)
                            os.close(fd)
                            self._dispatch_lock = None
                        raise StoreError(
                            "another process has held the dispatch lock alone for over "
                            f"{DISPATCH_LOCK_WAIT:.0f} seconds (stopped or hung while "
                            "taking up what was left?)", location=str(where)) from None
                    time.sleep(0.05)

    def close(self) -> None:
        """Close the connection; further calls raise :class:`StoreError`. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            # The lock files, and with them the locks.
            self._let_go()
            self._dispatch_lock = None
            close_cache(self)  # the audit tree's leaf file

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def nobody_serving(path: Path) -> Iterator[None]:
    """Hold the dispatch lock of the store at ``path`` alone for the duration (see
    :meth:`SQLiteStore.hold_dispatch`), and the lock every open store shares, for what
    must not run while a bridge process serves the store or has it open (putting a
    backup in its place). Raises :class:`StoreError` naming which; a process starting
    meanwhile waits, then fails, and a store opened meanwhile is refused."""
    fd, _where = _dispatch_lock_file(path)
    opened, _ = _lock_file(path, ".open")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError("a bridge process is serving this store: stop it first",
                             location=str(path)) from None
        try:
            fcntl.flock(opened, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StoreError("a bridge process has this store open: stop it first",
                             location=str(path)) from None
        yield
    finally:
        os.close(opened)
        os.close(fd)


def default_worker_id() -> str:
    """``host:pid:random``: unique per store instance (``outbox.claimed_by``; on
    PostgreSQL also readable in ``pg_stat_activity``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _close_fds(fds: list[int]) -> None:
    """Close the store's lock files (once: the list is emptied)."""
    while fds:
        os.close(fds.pop())


@contextmanager
def in_use(path: Path) -> Iterator[None]:
    """Hold the lock every open store of ``path`` shares, for the duration (for what
    reads the file without opening a store: a backup). Refused while a restore is under
    way (see :func:`nobody_serving`)."""
    fd = _hold_open(path)
    try:
        settle_aside(path)
        yield
    finally:
        os.close(fd)


_LOGS = ("-wal", "-shm")


def aside_path(path: Path) -> Path:
    """Where a restore keeps a link to the store at ``path`` for the moment its copy
    takes the store's place, with any log the store could not fold into its file beside
    it (named as SQLite names logs); see ``bridge.ledger.backup``."""
    real = path.resolve()
    return real.with_name(real.name + ".before-restore")


def settle_aside(path: Path) -> None:
    """Clear away what a restore of the store at ``path`` killed part way left (see
    ``bridge.ledger.backup``): its copy being checked beside the store, and the link to
    the store it keeps aside for the moment of the swap, with any log. Until the swap
    (one rename) the store is where it was: what was set aside goes back. After it, the
    copy in the store's place was checked and the restore recorded: what was set aside
    goes. Called before a store is opened or read, by processes that may run at once:
    one at a time, under a lock of its own, and at the cost of a few ``stat`` calls when
    there is nothing to do."""
    real = path.resolve()
    aside = aside_path(path)
    tmp = real.with_name(real.name + ".restoring")
    names = [Path(f"{base}{s}") for base in (aside, tmp) for s in ("", *_LOGS)]
    if not any(p.exists() for p in names):
        return
    fd, _where = _lock_file(path, ".settle")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for suffix in (*_LOGS, ""):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        if not aside.exists():
            for suffix in _LOGS:  # a log without its file is of no use
                Path(f"{aside}{suffix}").unlink(missing_ok=True)
            return
        if real.exists() and os.path.samefile(aside, real):
            # Killed before the swap: the store is in its place, and its log goes back.
            for suffix in _LOGS:
                if Path(f"{aside}{suffix}").exists():
                    if Path(f"{real}{suffix}").exists():
                        raise StoreError(
                            f"a restore killed part way left the store's log aside in"
                            f" {aside}{suffix}, and another beside the store: keep the"
                            " one that belongs to the store", location=str(path))
                    os.replace(f"{aside}{suffix}", f"{real}{suffix}")
            aside.unlink()
            log.warning("a restore killed before its copy took the store's place left"
                        " the store as it was; cleared away what it had set aside (%s)", real)
        else:
            # Killed after the swap: the restore is done.
            for suffix in (*_LOGS, ""):
                Path(f"{aside}{suffix}").unlink(missing_ok=True)
            log.warning("a restore killed after its copy took the store's place had"
                        " finished; cleared away the store it had set aside (%s)", real)
    finally:
        os.close(fd)


def _hold_open(path: Path) -> int:
    """The lock every open store of ``path`` shares, taken (see :func:`nobody_serving`)."""
    fd, _where = _lock_file(path, ".open")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError("a restore of this store is under way: start again when it is"
                         " done", location=str(path)) from None
    return fd


def _dispatch_lock_file(path: Path) -> tuple[int, Path]:
    """Open (creating it) the dispatch lock file of the store at ``path``: beside the
    file itself, where a symbolic link leads. The descriptor, and where it is."""
    return _lock_file(path, ".dispatch")


def _lock_file(path: Path, suffix: str) -> tuple[int, Path]:
    """Open (creating it) the lock file ``suffix`` of the store at ``path`` (see
    :func:`_dispatch_lock_file`)."""
    real = path.resolve()
    where = real.with_name(real.name + suffix)
    try:
        return os.open(where, os.O_RDWR | os.O_CREAT, 0o600), where
    except OSError as exc:
        what = {".dispatch": "dispatch lock", ".settle": "lock of what a restore left"}.get(
            suffix, "store's open lock")
        raise StoreError(f"cannot open the {what} ({exc.strerror})",
                         location=str(where)) from None


def _split_script(script: str) -> list[str]:
    """Split the schema into statements (triggers contain ``;`` inside BEGIN ... END).

    ``executescript`` would be simpler but commits any open transaction first, which
    would let two processes race to create the schema.
    """
    statements: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        if not line.strip() or line.strip().startswith("--"):
            continue
        buf.append(line)
        text = "\n".join(buf)
        if sqlite3.complete_statement(text):
            statements.append(text)
            buf = []
    return statements
