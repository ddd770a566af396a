"""The ledger on PostgreSQL: the same store as :mod:`bridge.ledger.sqlite`, shared by processes.

:class:`PostgresStore` has the public API and the semantics of
:class:`~bridge.ledger.sqlite.SQLiteStore` method for method (the contract tests run one
suite against both). It exists for the case SQLite cannot serve: several bridge
processes, on one host or several, working from one database. Each controller keeps
its tables in its own schema (``schema=``, default ``bridge``), so controllers may
share a database without seeing each other's rows.

Transactions and durability
    The connection runs in autocommit mode and every method wraps its work in one
    explicit transaction, committed before the method returns. The session sets
    ``synchronous_commit = on`` itself (whatever the server default), so a commit is
    flushed to the server's WAL before the caller is told: it may acknowledge
    afterwards. Reads run in a transaction too, so a multi-statement read sees one
    consistent state. Isolation is PostgreSQL's default, READ COMMITTED; the choices
    below are what makes that enough.

Claims across processes: ``FOR UPDATE SKIP LOCKED``
    :meth:`PostgresStore.claim_due` selects due rows with ``FOR UPDATE SKIP LOCKED``
    and turns them to ``sending`` in the same statement. A row another worker is
    claiming is skipped rather than waited for, and a row another worker has just
    claimed and committed fails the re-check of the ``WHERE`` clause that PostgreSQL
    applies to the newest row version, so two dispatchers never take the same row
    while its lease runs. The worker that claimed a row is recorded in
    ``outbox.claimed_by`` (``worker_id``), and so is the worker handing a claim over
    in ``handoff.claimed_by``; the lease decides who may claim next, exactly as in
    SQLite, unless the worker that holds it is gone.

A process that is gone: its session's advisory lock
    Each store keeps a second connection of its own, on which it holds a shared
    session-level advisory lock named after its schema and ``worker_id``; the server
    drops it when that session ends, as it does when the process dies in any way
    (``kill -9`` included: the kernel closes the socket). A thread of the store looks
    on that connection every :data:`GONE_CHECK_SECONDS` for rows ``sending`` under a
    lease that has not run out whose worker holds no such lock, and connects again at
    once (taking its lock again) when the session broke, whatever the rest of the
    process is doing. A worker missing at every look for :data:`GONE_AFTER_SECONDS` is
    gone: its leases end, and the next claim round of any process takes its claims
    (with their fate unknown, as after a lease ran out) and hand-offs. The wait lets a
    process whose session ended (a server restart ends every one) connect again first.
    The count starts again after a look that failed (the server unreachable), after
    looks further apart than :data:`LOOKS_STALE_SECONDS`, and after a look that took
    that long itself; a worker first found missing by a look counts as missing from
    the end of that look, so a look held up by a lock counts none of its wait. Rows
    another process is taking up at that moment are skipped, never waited for; the
    liveness connection connects within :data:`LIVENESS_CONNECT_SECONDS`, and a thread
    that cannot hold the lock or look says so at WARNING and keeps trying.

Gapless sequence numbers: a counter row per link
    A PostgreSQL ``SEQUENCE`` is not transactional (a rolled-back insert leaves a hole)
    and ``max(seq) + 1`` races between processes. ``enqueue`` instead increments
    ``outbox_link.last_seq`` with ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` in
    the transaction that inserts the row. The update locks the link's counter row
    until commit, so concurrent enqueues on one link take turns, and a rollback
    returns the number: sequence numbers are unique and gapless per link. The counter
    starts again above the highest number the partner was last seen to hold
    (``sync_outbound.partner_highest``), which a store restored from a backup learns
    from the partner: the numbers the partner holds are not given again.

One audit chain: a head row locked for update
    ``audit_head`` holds one row, the ``(seq, hash)`` of the last entry. Every append
    reads it with ``SELECT ... FOR UPDATE``, inserts the next entry and moves the head,
    all in the caller's transaction. The row lock serialises appends from every
    process until commit (a waiter re-reads the committed head), so entries form a
    single chain without forks or duplicate numbers, and a rolled-back append leaves
    no gap. The head row also remembers the chain's length independently of the
    ``audit`` table: if the last entries are deleted, the next append still links to
    the deleted head and verification reports the gap.

Exactly-once inbox: unique identity, re-checked under the chain lock
    ``inbox (sender, message_id)`` and ``hl7_inbox (sender, control_id)`` are unique.
    ``inbox_accept`` looks for the message, then takes the chain lock (every accept
    appends an audit entry, so accepts are serialised by it) and looks again: a
    duplicate committed by another process meanwhile is found there, before any
    receipt is signed. The insert itself is ``ON CONFLICT DO NOTHING``; should it ever
    find the identity taken, the whole transaction is rolled back and the existing
    row is returned (or the conflict raised), so two concurrent deliveries of one
    message store one row and both callers get the same receipt.

Lock order
    Every transaction takes its row locks (a link counter, an outbox row, an inbox
    identity) before the chain head and nothing after it, except ``put_consent``,
    whose later locks are only ever contended by other holders of the head. There is
    therefore no lock cycle and no deadlock between the store's own transactions.

Append-only audit
    ``BEFORE UPDATE``, ``BEFORE DELETE`` and ``BEFORE TRUNCATE`` triggers on ``audit``
    raise, as the SQLite triggers do. They guard against accidents, not attackers
    (an owner can drop them); the hash chain and the partner's cosigned head catch
    the rest.

Schema creation
    The first open of a schema creates it under a transaction-scoped advisory lock
    named after the schema, so several processes starting together create it once.
    ``schema_version`` is checked as in SQLite.

Threading and connections
    One synchronous connection per store for its work, guarded by a
    ``threading.Lock`` held for a whole transaction (the async layer calls the store
    from one worker thread per process), and a second one, the liveness thread's
    (above). A broken connection (server restart, network cut) makes the current
    call fail with :class:`~bridge.errors.StoreError` (transient); the next call
    connects again. Several processes each open their own store on the same DSN.

Errors never carry values: PostgreSQL's messages can quote key values, so a
:class:`~bridge.errors.StoreError` names only the operation, the error class and the
schema; the DSN (which may hold a password) is never included.

psycopg itself imports ``asyncio`` (for its async connection classes); this module
uses none of it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bridge.errors import BridgeError, ConfigError, ConflictError, StoreError
from bridge.ledger.audit import (
    AUDIT_COLUMNS,
    GENESIS_HASH,
    AuditEntry,
    AuditRecord,
    ChainReport,
    chain_entry,
    format_time,
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
from bridge.ledger.sqlite import (
    ConsentRow,
    HL7InboxRow,
    InboxRow,
    Opener,
    OutboxRow,
    _as_is,
    default_worker_id,
)
from bridge.ledger.states import REQUEUEABLE, OutboxState, check_transition
from bridge.ledger.tree import cache_of, close_cache

__all__ = ["SCHEMA_VERSION", "PostgresStore", "aside_schema", "connect", "nobody_using",
           "refuse_if_set_aside", "schema_oid"]

log = logging.getLogger(__name__)

_SENDING = frozenset({OutboxState.SENDING})
_PENDING = frozenset({OutboxState.QUEUED, OutboxState.SENDING})

SCHEMA_VERSION = 1

# A schema name is an SQL identifier chosen by the operator; keep it to a plain,
# unquoted-safe form so it reads the same in psql and in the configuration.
SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"

# How many times a transaction that lost a race on a unique identity is run again.
# The second run always sees the winner's committed row, so one retry suffices; the
# margin covers a winner that is itself rolled back.
_RACE_RETRIES = 5

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);

CREATE TABLE outbox (
    message_id   TEXT PRIMARY KEY,
    link         TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    partner      TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    digest       TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt TIMESTAMPTZ NOT NULL,
    lease_until  TIMESTAMPTZ,
    last_error   TEXT,
    receipt      BYTEA,
    created      TIMESTAMPTZ NOT NULL,
    updated      TIMESTAMPTZ NOT NULL,
    claimed_by   TEXT,
    UNIQUE (link, seq)
);
-- Only pending rows are ever claimed; a partial index keeps claim_due independent of
-- how many acknowledged rows the link has accumulated.
CREATE INDEX outbox_pending ON outbox (link, seq) WHERE state IN ('queued', 'sending');
CREATE INDEX outbox_state ON outbox (link, state);

-- The last sequence number handed out per link (see the module docstring).
CREATE TABLE outbox_link (
    link     TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

CREATE TABLE inbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender      TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    receipt     BYTEA NOT NULL,
    audit_seq   BIGINT NOT NULL,
    received    TIMESTAMPTZ NOT NULL,
    UNIQUE (sender, message_id)
);

CREATE TABLE consent (
    consent_id  TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    resource    BYTEA NOT NULL,
    updated     TIMESTAMPTZ NOT NULL
);
CREATE TABLE consent_patient (
    consent_id  TEXT NOT NULL REFERENCES consent (consent_id),
    patient_key TEXT NOT NULL,
    PRIMARY KEY (consent_id, patient_key)
);
CREATE INDEX consent_patient_key ON consent_patient (patient_key);
CREATE TABLE consent_history (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consent_id   TEXT NOT NULL,
    status       TEXT NOT NULL,
    resource     BYTEA NOT NULL,
    patient_keys JSONB NOT NULL,
    changed      TIMESTAMPTZ NOT NULL,
    audit_seq    BIGINT NOT NULL
);
CREATE INDEX consent_history_id ON consent_history (consent_id, id);

CREATE TABLE audit (
    seq        BIGINT PRIMARY KEY,
    time       TIMESTAMPTZ NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    partner    TEXT,
    patient    TEXT,
    categories JSONB NOT NULL,
    outcome    TEXT NOT NULL,
    detail     TEXT,
    digest     TEXT,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX audit_patient ON audit (patient);
CREATE INDEX audit_subject ON audit (subject);

-- The chain head: exactly one row, locked by every append (see the module docstring).
CREATE TABLE audit_head (
    id   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash) VALUES (TRUE, 0, '{genesis}');

-- Guards against accidents, not attackers: the owner can drop these triggers. The
-- hash chain and the partner's cosigned head catch that case.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only';
END;
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
""".replace("{genesis}", GENESIS_HASH)

_OUTBOX_COLS = (
    "message_id, link, seq, partner, payload, digest, state, attempts, next_attempt,"
    " lease_until, last_error, receipt, created, updated"
)
_OUTBOX_READ = _OUTBOX_COLS + ", fate_unknown, last_answer, since"
_INBOX_COLS = "sender, message_id, digest, payload, receipt, audit_seq, received"
_HL7_COLS = "sender, control_id, digest, message, record, ack, audit_seq, received"
_AUDIT_COLS = ", ".join(AUDIT_COLUMNS)


class _Raced(Exception):
    """A concurrent transaction took a unique identity first; roll back and run again."""


# A network partition must fail a store call within about a minute, not stall the ledger
# thread until the kernel gives up on the connection (hours): idle connections are probed
# and unacknowledged writes are bounded. A key the operator sets in the DSN wins.
_NETWORK_DEFAULTS = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                     "keepalives_count": "3", "tcp_user_timeout": "60000"}


def _with_network_defaults(dsn: str) -> str:
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return dsn  # connect() itself reports the malformed DSN
    extra = {k: v for k, v in _NETWORK_DEFAULTS.items() if k not in given}
    return psycopg.conninfo.make_conninfo(dsn, **extra)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _opt_bytes(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def _outbox_row(r: tuple[Any, ...], open_: Opener = _as_is) -> OutboxRow:
    return OutboxRow(
        message_id=r[0], link=r[1], seq=int(r[2]), partner=r[3],
        payload=open_(bytes(r[4]), "outbox.payload"),
        digest=r[5], state=OutboxState(r[6]), attempts=int(r[7]), next_attempt=_utc(r[8]),
        lease_until=_utc(r[9]) if r[9] is not None else None, last_error=r[10],
        receipt=open_(bytes(r[11]), "outbox.receipt") if r[11] is not None else None,
        created=_utc(r[12]), updated=_utc(r[13]),
        fate_unknown=bool(r[14]), last_answer=r[15],
        since=_utc(r[16]) if r[16] is not None else None,
    )


def _inbox_row(r: tuple[Any, ...], open_: Opener = _as_is) -> InboxRow:
    return InboxRow(sender=r[0], message_id=r[1], digest=r[2],
                    payload=open_(bytes(r[3]), "inbox.payload"),
                    receipt=open_(bytes(r[4]), "inbox.receipt"), audit_seq=int(r[5]),
                    received=_utc(r[6]))


def _hl7_row(r: tuple[Any, ...], open_: Opener = _as_is) -> HL7InboxRow:
    return HL7InboxRow(sender=r[0], control_id=r[1], digest=r[2],
                       message=open_(bytes(r[3]), "hl7_inbox.message"),
                       record=open_(bytes(r[4]), "hl7_inbox.record") if r[4] is not None
                       else None, ack=bytes(r[5]), audit_seq=int(r[6]),
                       received=_utc(r[7]))


def _as_list(value: Any) -> Any:
    # jsonb comes back decoded; stored_entry checks it is a list of strings.
    return value


def _audit_entry(r: Sequence[Any]) -> AuditEntry:
    return stored_entry(r, read_time=_utc, read_categories=_as_list)


def _require_aware(value: datetime, name: str) -> datetime:
    # SQLite's store formats times with audit.format_time, which refuses naive values;
    # refuse them here too rather than let the server guess a zone.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value


def _dsn_problem(exc: psycopg.Error) -> str:
    """What libpq disliked in a DSN, without echoing the DSN (it may hold a password)."""
    found = re.search(r'invalid (?:connection option|URI query parameter) "([A-Za-z_]+)"', str(exc))
    if found:
        return f"unknown option {found.group(1)}"
    return "expected key=value pairs or a postgresql:// URI"


def _connect_problem(exc: psycopg.Error) -> str:
    """libpq's reason for a failed connection, on one line (host, port, database and role
    names; libpq never repeats a password)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    reason = lines[0]
    for prefix in ("connection failed: ", "connection is bad: "):
        reason = reason.removeprefix(prefix)
    return re.sub(r"\s+", " ", reason.replace("FATAL:", "")).strip()


def recorded_migrations(dsn: str, schema: str, *, connect_timeout: float = 10.0) -> list[str]:
    """The schema steps ``schema`` records, read without applying any and without the
    data key (``bridge store status``); empty when the schema has none yet."""
    try:
        with psycopg.connect(_with_network_defaults(dsn), autocommit=True,
                             connect_timeout=max(1, round(connect_timeout))) as conn:
            table = conn.execute("SELECT to_regclass(%s)",
                                 (f'"{schema}".schema_migrations',)).fetchone()
            if table is None or table[0] is None:
                return []
            return [str(n) for (n,) in conn.execute(sql.SQL(
                "SELECT name FROM {}.schema_migrations ORDER BY name").format(
                    sql.Identifier(schema)))]
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"not a usable PostgreSQL connection string: {_dsn_problem(exc)}",
                          location="store.dsn") from None
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the schema steps: {_connect_problem(exc)}",
                         location=f"postgresql schema {schema}") from None


#: How long a due claim is left to the process that queued it (see the module docstring).
OWNER_GRACE = timedelta(seconds=2)
#: How long after it fell due another process's claim waits for spare capacity; after
#: that it is claimed in its turn like an own claim.
OWNER_HOLD = timedelta(seconds=30)

# A claim round of claim_due: the due rows matching ``{which}``, in seq order, turned to
# ``sending`` in the same statement. Rows another worker is claiming are skipped.
_CLAIM = (
    "WITH due AS ("
    "  SELECT message_id FROM outbox"
    "   WHERE link=%(link)s AND state IN ('queued', 'sending') AND ({which})"
    "   ORDER BY seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE outbox AS o SET state='sending',"
    "   attempts=o.attempts + CASE WHEN o.state='queued' THEN 1 ELSE 0 END,"
    "   fate_unknown=CASE WHEN o.state='sending' THEN 1 ELSE o.fate_unknown END,"
    "   lease_until=%(until)s, updated=%(now)s, claimed_by=%(worker)s"
    "  FROM due WHERE o.message_id=due.message_id"
    " RETURNING " + ", ".join("o." + c.strip() for c in _OUTBOX_READ.split(","))
)
# Own claims (or no one's), claims overdue by OWNER_HOLD, and expired leases.
_CLAIM_FIRST = _CLAIM.replace("{which}", (
    "(state='queued' AND next_attempt<=%(now)s"
    "  AND (enqueued_by IS NULL OR enqueued_by=%(worker)s OR next_attempt<=%(held_due)s))"
    " OR (state='sending' AND lease_until<=%(now)s)"))
# Then, with what is left of the limit: other processes' claims past OWNER_GRACE.
_CLAIM_SPARE = _CLAIM.replace("{which}", (
    "state='queued' AND next_attempt<=%(owner_due)s AND enqueued_by<>%(worker)s"))


#: How often a store looks for the leases of processes that are gone.
GONE_CHECK_SECONDS = 1.0
#: How long a worker's lock must have been missing, at every look, before its leases end.
GONE_AFTER_SECONDS = 5.0
#: Looks further apart than this do not count as one watch: the count starts again.
LOOKS_STALE_SECONDS = 3.0
#: How long the liveness connection may take to connect (well within the wait above).
LIVENESS_CONNECT_SECONDS = 2

# The advisory locks held in this database, as the bigint each was taken with
# (pg_locks splits it into its high and low 32 bits).
_LIVE = (
    "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks"
    " WHERE locktype='advisory' AND objsubid=1 AND granted"
    " AND database=(SELECT oid FROM pg_database WHERE datname=current_database())"
)
# Per table, the workers holding a lease that has not run out and no lock. The partial
# indexes of migration 1504 hold the rows being sent only.
_MISSING = " UNION ALL ".join(
    f"SELECT DISTINCT '{table}', claimed_by FROM {table} WHERE state='sending'"
    " AND claimed_by IS NOT NULL AND claimed_by<>? AND lease_until>?"
    f" AND hashtextextended(? || claimed_by, 0) NOT IN ({_LIVE})"
    for table in ("outbox", "handoff"))


def aside_schema(schema: str) -> str:
    """The name under which a restore keeps ``schema`` as it was until the copy
    restored in its place is checked and the restore recorded (see
    ``bridge.ledger.backup``). It holds hyphens, which no configured schema may: it is
    never another store's. Within PostgreSQL's 63 bytes whatever the schema's."""
    if len(schema) <= 47:
        return f"{schema}-before-restore"
    return f"{schema[:38]}-{hashlib.sha256(schema.encode()).hexdigest()[:8]}-before-restore"


#: The comment a restore puts on the schema it set aside once the restore is recorded.
RESTORE_DONE = "ws-fhir-bridge: restore done"


def schema_oid(conn: psycopg.Connection[Any], schema: str) -> int | None:
    """The oid of ``schema``, None when there is none: a schema made anew (a restore)
    has another."""
    row = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = %s",
                       (schema,)).fetchone()
    return int(row[0]) if row is not None else None


def refuse_if_set_aside(conn: psycopg.Connection[Any], schema: str) -> None:
    """Refuse ``schema`` while a restore has it set aside (see :func:`aside_schema`):
    killed part way, what is in its place was not checked, or is missing (and opened, a
    new empty schema would take its place); done, it could not drop the old store."""
    aside = aside_schema(schema)
    row = conn.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace"
                       " WHERE nspname = %s", (aside,)).fetchone()
    if row is None:
        return
    where = f"postgresql schema {schema}"
    if row[0] == RESTORE_DONE:
        raise StoreError(f'a restore of this store is done and recorded, and schema "{aside}"'
                         f" still holds the store as it was before it: drop it"
                         f' (DROP SCHEMA "{aside}" CASCADE)', location=where)
    raise StoreError(
        f'a restore was killed part way, and schema "{aside}" holds the store as it was'
        f" before it (empty when there was none): to keep that, drop schema {schema}"
        f' (if any) and rename "{aside}" to {schema}; to restore again, drop "{aside}"'
        " first", location=where)


def _store_lock_name(schema: str) -> str:
    """The advisory lock every open store of ``schema`` shares (see :func:`nobody_using`)."""
    return f"ws-fhir-bridge store {schema}"


_RESTORING = "a restore of this store is under way: start again when it is done"


def _store_lock_taken(conn: psycopg.Connection[Any], schema: str) -> bool:
    """Take the store's shared lock on ``conn``'s session; False when a restore holds it."""
    row = conn.execute("SELECT pg_try_advisory_lock_shared(hashtextextended(%s, 0))",
                       (_store_lock_name(schema),)).fetchone()
    return row is not None and bool(row[0])


def connect(dsn: str, *, timeout: float | None = None,
             name: str | None = None) -> psycopg.Connection[Any]:
    """A new session in autocommit mode (``name``: its ``application_name``). A DSN
    libpq cannot read is a :class:`ConfigError`, a failed connection a
    :class:`StoreError` with libpq's reason; neither repeats the DSN."""
    options: dict[str, Any] = {}
    if timeout is not None:
        options["connect_timeout"] = max(1, round(timeout))
    if name is not None:
        options["application_name"] = name[:63]
    try:
        return psycopg.connect(_with_network_defaults(dsn), autocommit=True, **options)
    except psycopg.ProgrammingError as exc:
        # libpq could not read the DSN: a configuration mistake, not an outage.
        raise ConfigError(f"not a usable PostgreSQL connection string: {_dsn_problem(exc)}",
                          location="store.dsn") from None
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {_connect_problem(exc)}",
                         location="store.dsn") from None


@contextmanager
def nobody_using(dsn: str, schema: str) -> Iterator[None]:
    """Hold the lock every open store of ``schema`` shares, alone, for the duration (for
    what must not run while a bridge process uses the store: putting a backup in its
    place). Raises :class:`StoreError` when a process has the store open; a store opened
    meanwhile is refused."""
    conn = connect(dsn)
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                           (_store_lock_name(schema),)).fetchone()
        if row is None or not row[0]:
            raise StoreError("a bridge process has this store open: stop it first",
                             location=f"postgresql schema {schema}")
        yield
    finally:
        _let_go(conn)  # a store opened right after is not refused


def _keep_alive(store_ref: weakref.ref[PostgresStore], stop: threading.Event,
                conn: psycopg.Connection[Any] | None) -> None:
    """The liveness thread of a store (see the module docstring): hold the worker's
    lock, connecting again at once when the session broke, and look for workers that
    are gone, until the store is closed or collected. Nothing ends it early: a thread
    that stopped would drop the lock of a process that still runs."""
    last: float | None = None  # when the last look ended, None after a failure
    failing = False
    while not stop.is_set():
        store = store_ref()
        if store is None:
            break
        try:
            if conn is None or conn.closed or conn.broken:
                conn = store._liveness_connection()
            # What was seen before a failure, or too long ago, is no watch: the count
            # of every worker missing starts again.
            if last is None or time.monotonic() - last > LOOKS_STALE_SECONDS:
                store._missing = {}
            last = store._look(conn)
            if failing:
                log.warning("worker lock held again, looks resumed (%s)", store.location)
                failing = False
        except Exception as exc:  # noqa: BLE001 - logged; the thread must go on
            if not failing:
                # Our own errors name no values; a driver's may quote some: its class only.
                why = str(exc) if isinstance(exc, StoreError) else type(exc).__name__
                log.warning("cannot hold the worker lock or look for workers that are gone"
                            " (%s); trying again (%s)", why, store.location)
                failing = True
            if conn is not None and (conn.broken or conn.closed):
                conn.close()
                conn = None
            last = None
        del store
        stop.wait(GONE_CHECK_SECONDS if not failing else min(GONE_CHECK_SECONDS, 0.2))
    if conn is not None and not conn.closed:
        conn.close()  # without a round trip (see PostgresStore._drop_connection)


def _let_go(conn: psycopg.Connection[Any]) -> None:
    """Close ``conn``, its session's locks let go first: the server ends a session a
    moment after its client closes it, and a store opened at once must not find the
    lock of a restore that is done. For the restore's own session, which has just
    answered; a store's sessions close without a round trip."""
    try:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock_all()")
    except psycopg.Error:
        pass
    try:
        conn.close()
    except psycopg.Error:
        pass


class PostgresStore:
    """Outbox, inbox, consents and audit chain in one PostgreSQL schema (see module docstring).

    ``dsn`` is a libpq connection string or URI; a password is better kept out of it
    (``PGPASSWORD``, ``~/.pgpass`` or a client certificate). ``schema`` is created on
    first open. ``worker_id`` names this process in ``outbox.claimed_by`` and in the
    server's ``application_name``; by default ``host:pid:random``.
    """

    dialect = "postgresql"

    def __init__(self, dsn: str, *, schema: str = "bridge", worker_id: str | None = None,
                 connect_timeout: float = 10.0, sealer: Sealer | None = None,
                 restoring: bool = False) -> None:
        """Connect and bring the schema up (creating it if needed). ``restoring``: opened
        by a restore that holds the store's lock alone (see :func:`nobody_using`)."""
        self._restoring = restoring
        self.sealer: Sealer = sealer or PlainSealer()
        if not re.match(SCHEMA_PATTERN, schema):
            raise StoreError("schema name must match " + SCHEMA_PATTERN,
                             location="store.schema")
        self.dsn = dsn
        self.schema = schema
        self.worker_id = worker_id or default_worker_id()
        #: Links whose dispatcher runs in this process (see :meth:`dispatch_here`).
        self._dispatching: set[str] = set()
        self.location = f"postgresql schema {schema}"
        self._connect_timeout = connect_timeout
        # Workers seen holding leases without their lock, and since when (monotonic):
        # the liveness thread's own.
        self._missing: dict[tuple[str, str], float] = {}
        self._alive_stop = threading.Event()
        self._alive_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._conn: psycopg.Connection[Any] | None = None
        # The schema's oid once it is opened: every later session checks it (_session).
        self._schema_oid: int | None = None
        # The locks first: held before anything is claimed, and before the schema is
        # created or migrated (a restore under way refuses the store before that).
        alive = self._liveness_connection()
        with self._lock:
            try:
                if restoring:
                    self._require_schema(self._connection())
                else:
                    refuse_if_set_aside(self._connection(), self.schema)
                self._migrate(self._connection())
                self._schema_oid = schema_oid(self._connection(), self.schema)
            except BaseException as exc:
                self._closed = True
                self._drop_connection()
                alive.close()
                if isinstance(exc, psycopg.Error):
                    raise StoreError(f"cannot prepare store schema ({type(exc).__name__})",
                                     location=self.location) from exc
                raise
        # The thread holds the store weakly: a store dropped without close() is
        # collected as before, and its thread then closes the lock's connection.
        self._alive_thread = threading.Thread(
            target=_keep_alive, args=(weakref.ref(self), self._alive_stop, alive),
            name="bridge-store-alive", daemon=True)
        self._alive_thread.start()

    # --- plumbing -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, connecting (again) if there is none or it broke."""
        if self._closed:
            raise StoreError("store is closed", location=self.location)
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop_connection()
        # Durability must not depend on the server's default: a commit returns only once
        # it is flushed, so the caller may acknowledge after it.
        self._conn = self._session(
            self._connect_timeout, ("SET TIME ZONE 'UTC'", ()),
            ("SET synchronous_commit TO on", ()), failing="cannot set up the session")
        return self._conn

    def _require_schema(self, conn: psycopg.Connection[Any]) -> None:
        """A restore's store is the schema the restore put in place: none there is a
        copy of something else, never a reason to make a new, empty one."""
        if schema_oid(conn, self.schema) is None:
            raise StoreError("the restored copy holds no schema of this name",
                             location=self.location)

    def _lock_prefix(self) -> str:
        """What a worker id is prefixed with to name its lock (see the module docstring)."""
        return f"ws-fhir-bridge worker {self.schema} "

    def _liveness_connection(self) -> psycopg.Connection[Any]:
        """A connection holding this worker's lock (see the module docstring)."""
        return self._session(
            min(LIVENESS_CONNECT_SECONDS, self._connect_timeout),
            ("SELECT pg_advisory_lock_shared(hashtextextended(%s, 0))",
             (self._lock_prefix() + self.worker_id,)),
            failing="cannot take the worker's lock")

    def _session(self, timeout: float, *statements: tuple[str, tuple[Any, ...]],
                 failing: str) -> psycopg.Connection[Any]:
        """A new session of this store on its schema, set up by ``statements``, holding
        the store's lock (every session that writes holds it: a restore holding it
        alone is never written to, see :func:`nobody_using`; the restore's own store
        aside). ``failing`` says what went wrong when a statement fails."""
        conn = connect(self.dsn, timeout=timeout, name=f"ws-fhir-bridge {self.worker_id}")
        try:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            for statement, params in statements:
                conn.execute(statement, params)
            refused = not self._restoring and not _store_lock_taken(conn, self.schema)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"{failing} ({type(exc).__name__})",
                             location=self.location) from None
        if refused:
            conn.close()
            raise StoreError(_RESTORING, location=self.location)
        if self._schema_oid is not None:
            # A session of a store already open: the schema must be the one it opened.
            # A restore run while this process was cut off from the server (its
            # sessions ended, so their locks went) put another in its place, or set it
            # aside; this process's state is of the store before it.
            try:
                oid = schema_oid(conn, self.schema)
                if not self._restoring:
                    refuse_if_set_aside(conn, self.schema)
            except BaseException:
                conn.close()
                raise
            if oid != self._schema_oid:
                conn.close()
                raise StoreError("the store was restored or replaced while this process was"
                                 " cut off from the server: start it again",
                                 location=self.location)
        return conn

    def _look(self, conn: psycopg.Connection[Any]) -> float:
        """One look for workers that are gone, ending the leases of those missing for
        :data:`GONE_AFTER_SECONDS` (see the module docstring); when it ended.

        A worker is counted missing from the end of the look that first found it so
        to the start of this one: a look held up (a lock, a slow server) says nothing
        of the time it waited. A look that took longer than :data:`LOOKS_STALE_SECONDS`
        ends nothing and starts the count again."""
        started = time.monotonic()
        now = datetime.now(UTC)
        # The hand-off queue writes its times as text on every store.
        text = format_time(now)
        prefix = self._lock_prefix()
        with conn.transaction():
            tx = Tx(conn, dialect="postgresql", store=self, sealer=self.sealer)
            missing = {(str(table), str(worker)) for table, worker in tx.all(
                _MISSING, (self.worker_id, now, prefix, self.worker_id, text, prefix))}
            seen = time.monotonic()
            if seen - started > LOOKS_STALE_SECONDS:
                self._missing = {}
                return seen
            before = self._missing
            self._missing = {key: before.get(key, seen) for key in missing}
            # In one order in every process; rows another process is ending at this
            # moment are skipped rather than waited for.
            for table, worker in sorted(self._missing):
                if started - self._missing[(table, worker)] < GONE_AFTER_SECONDS:
                    continue
                until: Any = now if table == "outbox" else text
                key_column = "message_id" if table == "outbox" else "id"
                ended = tx.execute(
                    f"UPDATE {table} SET lease_until=? WHERE {key_column} IN ("
                    f"SELECT {key_column} FROM {table} WHERE state='sending' AND claimed_by=?"
                    " AND lease_until>? FOR UPDATE SKIP LOCKED)", (until, worker, until)).rowcount
                if ended:
                    log.warning("took up %d %s left sending by worker %s, which is gone",
                                ended, "claims" if table == "outbox" else "hand-offs", worker)
        return time.monotonic()

    def _drop_connection(self) -> None:
        # Closed without a round trip: a stop must not wait on a server that does not
        # answer. The server lets the session's locks go as it ends the session.
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # Processes starting together would race to create the schema; the advisory
            # lock (released at commit) lets the first create it and the others find it.
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                         (f"ws-fhir-bridge schema {self.schema}",))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(self.schema)))
            exists = conn.execute("SELECT to_regclass('schema_version')").fetchone()
            if exists is None or exists[0] is None:
                conn.execute(_SCHEMA)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)",
                             (SCHEMA_VERSION,))
            else:
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()
                if version is None or version[0] != SCHEMA_VERSION:
                    raise StoreError(
                        f"store schema version {version[0] if version else None}"
                        f" is not {SCHEMA_VERSION}",
                        location=f"{self.location}: schema_version",
                    )
            self._apply_migrations(conn)

    def _apply_migrations(self, conn: psycopg.Connection[Any]) -> None:
        """Apply, in name order, every migration this schema has not recorded (the caller
        holds the schema's advisory lock)."""
        conn.execute(SCHEMA_MIGRATIONS_DDL)
        applied = {str(n) for (n,) in conn.execute("SELECT name FROM schema_migrations")}
        unknown = sorted(applied - {m.name for m in MIGRATIONS})
        if unknown:
            raise StoreError(
                f"store was upgraded by a newer bridge (migration {unknown[-1]});"
                " run that version or restore a backup",
                location=f"{self.location}: schema_migrations",
            )
        for migration in MIGRATIONS:
            if migration.name in applied:
                continue
            conn.execute(migration.script("postgresql"))
            conn.execute("INSERT INTO schema_migrations (name, applied) VALUES (%s, now()::text)",
                         (migration.name,))

    def applied_migrations(self) -> list[str]:
        """Names of the migrations this schema has applied, in order."""
        with self._read("applied_migrations") as conn:
            return [str(n) for (n,) in conn.execute(
                "SELECT name FROM schema_migrations ORDER BY name")]

    @contextmanager
    def transaction(self, what: str, *, durable: bool = True) -> Iterator[Tx]:
        """A write transaction for code written once for both engines (see ``portable``).

        ``durable`` is accepted for symmetry with SQLite; every commit here is flushed.
        """
        with self._tx(what) as conn:
            yield Tx(conn, dialect="postgresql", store=self, sealer=self.sealer)

    @contextmanager
    def read(self, what: str) -> Iterator[Tx]:
        """A read transaction for code written once for both engines (see ``portable``)."""
        with self._read(what) as conn:
            yield Tx(conn, dialect="postgresql", store=self, sealer=self.sealer)

    @contextmanager
    def _tx(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """Hold the lock and one transaction; commit on success, roll back on any error.

        psycopg errors become :class:`StoreError` naming the operation only; any other
        exception (a failing ``make_receipt``, a conflict) propagates unchanged after the
        rollback.
        """
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                if conn.broken:
                    self._drop_connection()
                raise StoreError(f"store failed in {what} ({type(exc).__name__})",
                                 location=self.location) from exc

    # Reads take the same path: one transaction, so a read made of several statements
    # sees one state, and nothing stays "idle in transaction" afterwards.
    _read = _tx

    def _append(self, conn: psycopg.Connection[Any], record: AuditRecord, *,
                proof: bool = True) -> AuditEntry:
        """Append ``record`` to the chain in ``conn``'s transaction. ``proof=False``: the
        caller needs no root nor inclusion proof (see :meth:`TreeCache.on_append`)."""
        head = conn.execute("SELECT seq, hash FROM audit_head FOR UPDATE").fetchone()
        if head is None:
            raise StoreError("audit chain head row is missing", location=f"{self.location}: "
                             "audit_head")
        entry = chain_entry(str(head[1]), int(head[0]) + 1, record)

        def fetch(after: int) -> list[AuditEntry]:
            # A damaged entry does not stop the appends after it (see tree_entries).
            return tree_entries(conn.execute(
                f"SELECT {_AUDIT_COLS} FROM audit WHERE seq>%s ORDER BY seq", (after,)),
                _audit_entry)

        entry = cache_of(self).on_append(entry, fetch, proof=proof)
        j = record.to_json_dict()
        # One statement moves the head and inserts the entry: the head lock is held for
        # one round trip fewer, and every process's appends wait on that lock.
        conn.execute(
            "WITH head AS (UPDATE audit_head SET seq=%s, hash=%s)"
            f" INSERT INTO audit ({_AUDIT_COLS}) VALUES"
            " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (entry.seq, entry.hash,
             entry.seq, record.time, j["actor"], j["action"], j["subject"], j["partner"],
             j["patient"], Jsonb(j["categories"]), j["outcome"], j["detail"], j["digest"],
             entry.prev_hash, entry.hash, record.operator),
        )
        return entry

    def _lock_chain(self, conn: psycopg.Connection[Any]) -> None:
        """Take the chain head lock now (it is held until commit; ``_append`` re-reads it)."""
        conn.execute("SELECT seq FROM audit_head FOR UPDATE")

    def _opener(self, conn: psycopg.Connection[Any]) -> Opener:
        """Opens sealed columns read on ``conn`` (see :mod:`bridge.ledger.seal`)."""
        if isinstance(self.sealer, PlainSealer):
            return _as_is
        tx = Tx(conn, dialect="postgresql", store=self, sealer=self.sealer)

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

    def _get_outbox(self, conn: psycopg.Connection[Any], message_id: str, *,
                    for_update: bool = False) -> OutboxRow | None:
        lock = " FOR UPDATE" if for_update else ""
        r = conn.execute(f"SELECT {_OUTBOX_READ} FROM outbox WHERE message_id=%s{lock}",
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

        The row is locked first (``FOR UPDATE``), so the state checked is the state
        changed even when another process works on the same row. A row being sent
        that another worker holds now (this one's lease ran out, or ended because this
        worker seemed gone, and the other took it) is that worker's to settle:
        :class:`TransitionError`, as for a row already settled.
        """
        _require_aware(now, "now")
        with self._tx(what) as conn:
            row = self._get_outbox(conn, message_id, for_update=True)
            if row is None:
                raise UnknownMessage(f"{what}: no outbox row for this message id",
                                     location=f"outbox[{message_id}]")
            if row.state not in allowed_from:
                raise TransitionError(
                    f"{what} is not allowed from state {row.state.value}",
                    location=f"outbox[{message_id}].state",
                )
            check_transition(row.state, to_state)
            cols = {"state": to_state.value, "updated": now, **sets}
            if cols.get("receipt") is not None:
                cols["receipt"] = self._seal(cols["receipt"], "outbox.receipt")
            assignments = sql.SQL(", ").join(
                sql.SQL("{}=%s").format(sql.Identifier(c)) for c in cols)
            r = conn.execute(
                sql.SQL("UPDATE outbox SET {} WHERE message_id=%s AND (state<>'sending'"
                        " OR claimed_by IS NULL OR claimed_by=%s) RETURNING {}").format(
                    assignments, sql.SQL(_OUTBOX_READ)),
                (*cols.values(), message_id, self.worker_id)).fetchone()
            if r is None:
                raise TransitionError(f"{what}: another sender holds this claim now",
                                      location=f"outbox[{message_id}].claimed_by")
            if audit is not None:
                self._append(conn, audit, proof=False)
            return _outbox_row(r, self._opener(conn))

    # --- outbox ---------------------------------------------------------------------

    def dispatch_here(self, link: str) -> None:
        """This process runs ``link``'s dispatcher: the claims it queues on that link go
        to it first (see the module docstring)."""
        self._dispatching.add(link)

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

        Assigns the next sequence number of the link (1, 2, 3, ...), gapless and unique
        across processes, after the highest one the partner was last seen to hold
        (``sync_outbound``; PROTOCOL P-SYNC-7). Enqueuing the same ``message_id`` again with the same
        ``digest`` returns the existing row and writes nothing (safe to retry after a
        crash); with a different digest, link or partner it raises
        :class:`bridge.errors.ConflictError`. ``digest`` is stored as given.
        """
        _require_aware(now, "now")
        # The first attempt assumes the id is new (the usual case) and inserts at once;
        # if the id is taken, the transaction is rolled back (returning the sequence
        # number) and the next attempt answers from the existing row.
        for attempt in range(_RACE_RETRIES):
            try:
                with self._tx("enqueue") as conn:
                    if attempt > 0:
                        existing = self._get_outbox(conn, message_id)
                        if existing is not None:
                            if (existing.digest, existing.link, existing.partner) != (
                                    digest, link, partner):
                                raise ConflictError(
                                    "message id already enqueued with different content",
                                    location=f"outbox[{message_id}]")
                            return existing
                    # The counter row of the link is locked by the upsert until commit.
                    r = conn.execute(
                        "WITH floor AS (SELECT COALESCE((SELECT partner_highest"
                        "  FROM sync_outbound WHERE link = %(link)s), 0) AS seq),"
                        " counter AS ("
                        "  INSERT INTO outbox_link (link, last_seq)"
                        "  SELECT %(link)s, floor.seq + 1 FROM floor"
                        "  ON CONFLICT (link) DO UPDATE SET last_seq ="
                        "  GREATEST(outbox_link.last_seq, (SELECT seq FROM floor)) + 1"
                        "  RETURNING last_seq)"
                        f" INSERT INTO outbox ({_OUTBOX_COLS}, enqueued_by)"
                        " SELECT %(mid)s, %(link)s, counter.last_seq, %(partner)s, %(payload)s,"
                        "  %(digest)s, 'queued', 0, %(now)s, NULL, NULL, NULL, %(now)s, %(now)s,"
                        "  %(owner)s FROM counter"
                        f" ON CONFLICT (message_id) DO NOTHING RETURNING {_OUTBOX_READ}",
                        {"mid": message_id, "link": link, "partner": partner,
                         "payload": self._seal(payload, "outbox.payload"), "digest": digest,
                         "now": now,
                         "owner": self.worker_id if link in self._dispatching else None},
                    ).fetchone()
                    if r is None:
                        raise _Raced
                    self._append(conn, audit, proof=False)
                    return _outbox_row(r, self._opener(conn))
            except _Raced:
                continue
        raise StoreError("enqueue kept racing with concurrent writers",
                         location=f"outbox[{message_id}]")

    def enqueue_many(self, requests: Sequence[Mapping[str, Any]]) -> list[OutboxRow | BridgeError]:
        """Several :meth:`enqueue` calls, answered in order (the row or the error).

        On PostgreSQL each enqueue keeps its own transaction: its race handling with
        other processes needs a rollback per attempt, and a commit here costs little
        next to SQLite's flush, so there is no group commit to gain.
        """
        results: list[OutboxRow | BridgeError] = []
        for request in requests:
            try:
                results.append(self.enqueue(**request))
            except BridgeError as exc:
                results.append(exc)
        return results

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
        ``sending`` with ``lease_until = now + lease``; a claim of a ``queued`` row is an
        attempt (``attempts + 1``), taking over an expired lease is not but makes the
        row's fate unknown (see :class:`SQLiteStore`). Rows that
        another process is claiming at this moment are skipped, never waited for nor
        taken twice. The claim is not audited (see :class:`SQLiteStore`).

        A claim another dispatching process queued is taken after :data:`OWNER_GRACE`
        only with what the round has left once this process's own due claims are
        taken, and after :data:`OWNER_HOLD` in its turn (see the module docstring).
        """
        _require_aware(now, "now")
        until = now + lease
        params = {"link": link, "now": now, "limit": limit, "until": until,
                  "worker": self.worker_id, "owner_due": now - OWNER_GRACE,
                  "held_due": now - OWNER_HOLD}
        with self._tx("claim_due") as conn:
            # Own claims first; others' overdue claims only with what is left (see the
            # module docstring). Rows claimed by the first statement are ``sending`` by
            # the second, so none is taken twice.
            rows = conn.execute(_CLAIM_FIRST, params).fetchall()
            if len(rows) < limit:
                rows += conn.execute(_CLAIM_SPARE, {**params, "limit": limit - len(rows)}).fetchall()
            return sorted((_outbox_row(r, self._opener(conn)) for r in rows), key=lambda row: row.seq)

    def mark_acked(self, message_id: str, *, receipt: bytes, now: datetime,
                   audit: AuditRecord) -> OutboxRow:
        """Record the partner's signed receipt: ``sending -> acked`` (final)."""
        return self._transition("mark_acked", message_id, OutboxState.ACKED,
                                allowed_from=_SENDING, now=now, audit=audit,
                                sets={"receipt": receipt, "lease_until": None})

    def mark_acked_many(self, requests: Sequence[Mapping[str, Any]]) -> list[OutboxRow | BridgeError]:
        """Several :meth:`mark_acked` calls, answered in order (the row or the error);
        each keeps its own transaction, as enqueues do on PostgreSQL."""
        results: list[OutboxRow | BridgeError] = []
        for request in requests:
            try:
                results.append(self.mark_acked(**request))
            except BridgeError as exc:
                results.append(exc)
        return results

    def mark_retry(self, message_id: str, *, next_attempt: datetime, error: str, now: datetime,
                   audit: AuditRecord | None, fate_unknown: bool = False,
                   answer: str | None = None) -> OutboxRow:
        """A transient failure: ``sending -> queued``, due again at ``next_attempt``.

        ``error`` is an error code (no values). ``audit`` may be None to keep routine
        retries out of the log. ``fate_unknown`` and ``answer`` as in :class:`SQLiteStore`.
        """
        _require_aware(next_attempt, "next_attempt")
        sets: dict[str, Any] = {"next_attempt": next_attempt, "last_error": error,
                                "lease_until": None}
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
                                allowed_from=_SENDING, now=now, audit=audit,
                                sets={"last_error": error, "receipt": receipt,
                                      "lease_until": None})

    def mark_refused(self, message_id: str, *, error: str, now: datetime,
                     audit: AuditRecord) -> OutboxRow:
        """Our consent check said no at dispatch: ``queued|sending -> refused`` (final)."""
        return self._transition("mark_refused", message_id, OutboxState.REFUSED,
                                allowed_from=_PENDING, now=now, audit=audit,
                                sets={"last_error": error, "lease_until": None})

    def mark_dead(self, message_id: str, *, error: str, now: datetime,
                  audit: AuditRecord, answer: str | None = None) -> OutboxRow:
        """Given up: ``sending -> dead``; waits for an operator's requeue."""
        sets: dict[str, Any] = {"last_error": error, "lease_until": None}
        if answer is not None:
            sets["last_answer"] = answer
        return self._transition("mark_dead", message_id, OutboxState.DEAD,
                                allowed_from=_SENDING, now=now, audit=audit, sets=sets)

    def requeue(self, message_id: str, *, now: datetime, audit: AuditRecord) -> OutboxRow:
        """Operator's resend of a ``dead`` or ``rejected`` message: back to ``queued``, due now.

        Keeps the same message id and sequence number; attempts restart from zero.
        """
        return self._transition("requeue", message_id, OutboxState.QUEUED, now=now,
                                audit=audit, allowed_from=REQUEUEABLE,
                                sets={"next_attempt": now, "attempts": 0, "lease_until": None,
                                      "since": now})

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
                cur = conn.execute("SELECT state, count(*) FROM outbox WHERE link=%s"
                                   " GROUP BY state", (link,))
            for state, n in cur:
                counts[state] = int(n)
        return counts

    def list_outbox(self, link: str, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
        """Rows of ``link`` in seq order, optionally only those in ``state``."""
        with self._read("list_outbox") as conn:
            if state is None:
                cur = conn.execute(f"SELECT {_OUTBOX_READ} FROM outbox WHERE link=%s"
                                   " ORDER BY seq LIMIT %s", (link, limit))
            else:
                cur = conn.execute(f"SELECT {_OUTBOX_READ} FROM outbox WHERE link=%s"
                                   " AND state=%s ORDER BY seq LIMIT %s",
                                   (link, OutboxState(state).value, limit))
            return [_outbox_row(r, self._opener(conn)) for r in cur]

    def highest_contiguous_acked(self, link: str) -> int:
        """Largest n such that seqs 1..n of ``link`` are all acked (0 if seq 1 is not)."""
        with self._read("highest_contiguous_acked") as conn:
            r = conn.execute("SELECT min(seq) FROM outbox WHERE link=%s AND state<>'acked'",
                             (link,)).fetchone()
            if r is not None and r[0] is not None:
                return int(r[0]) - 1
            r = conn.execute("SELECT coalesce(max(seq), 0) FROM outbox WHERE link=%s",
                             (link,)).fetchone()
            return int(r[0]) if r is not None else 0

    # --- inbox ----------------------------------------------------------------------

    def inbox_lookup(self, sender: str, message_id: str) -> InboxRow | None:
        """The stored message ``(sender, message_id)``, or None."""
        with self._read("inbox_lookup") as conn:
            return self._inbox(conn, sender, message_id)

    def _inbox(self, conn: psycopg.Connection[Any], sender: str, message_id: str) -> InboxRow | None:
        r = conn.execute(f"SELECT {_INBOX_COLS} FROM inbox WHERE sender=%s AND message_id=%s",
                         (sender, message_id)).fetchone()
        return _inbox_row(r, self._opener(conn)) if r is not None else None

    def inbox_count(self, sender: str | None = None) -> int:
        """How many messages the inbox holds (from ``sender``, or from everyone)."""
        with self._read("inbox_count") as conn:
            if sender is None:
                r = conn.execute("SELECT count(*) FROM inbox").fetchone()
            else:
                r = conn.execute("SELECT count(*) FROM inbox WHERE sender=%s",
                                 (sender,)).fetchone()
            return int(r[0]) if r is not None else 0

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
          new audit entry, stores the message with that receipt, commits, and returns
          ``(row, True)``.
        - Already held with the same ``digest`` (by this or any other process): writes
          nothing and returns ``(existing, False)``; answer with ``existing.receipt``.
        - Already held with a different ``digest``: raises
          :class:`bridge.errors.ConflictError` and writes nothing.

        If ``make_receipt`` raises, the transaction is rolled back: no audit entry and no
        inbox row exist afterwards, and the exception propagates unchanged. It runs while
        the audit chain is locked for every process, so it must be quick.

        ``within``, when given, runs after the new row is inserted, in the same
        transaction (written against :class:`Tx`): what it writes commits with the row
        or, if it raises, nothing does (the hand-off queue is filled this way).
        """
        _require_aware(now, "now")

        def answer(existing: InboxRow) -> tuple[InboxRow, bool]:
            if existing.digest != digest:
                raise ConflictError("message id already received with different content",
                                    location=f"inbox[{sender}/{message_id}]")
            return existing, False

        for _ in range(_RACE_RETRIES):
            try:
                with self._tx("inbox_accept") as conn:
                    existing = self._inbox(conn, sender, message_id)
                    if existing is not None:
                        return answer(existing)
                    # Accepts are serialised by the chain lock; look again under it so a
                    # duplicate committed meanwhile is answered before anything is signed.
                    self._lock_chain(conn)
                    existing = self._inbox(conn, sender, message_id)
                    if existing is not None:
                        return answer(existing)
                    entry = self._append(conn, audit)
                    receipt = make_receipt(entry)
                    r = conn.execute(
                        f"INSERT INTO inbox ({_INBOX_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s)"
                        f" ON CONFLICT (sender, message_id) DO NOTHING RETURNING {_INBOX_COLS}",
                        (sender, message_id, digest, self._seal(payload, "inbox.payload"),
                         self._seal(receipt, "inbox.receipt"), entry.seq, now),
                    ).fetchone()
                    if r is None:
                        raise _Raced
                    row = _inbox_row(r, self._opener(conn))
                    if within is not None:
                        within(Tx(conn, dialect="postgresql", store=self, sealer=self.sealer),
                               row)
                    return row, True
            except _Raced:
                continue
        raise StoreError("inbox_accept kept racing with concurrent writers",
                         location=f"inbox[{sender}/{message_id}]")

    def inbox_accept_many(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[tuple[InboxRow, bool] | Exception]:
        """Several :meth:`inbox_accept` calls, answered in order (the answer or the
        exception that request would have raised).

        On PostgreSQL each accept keeps its own transaction, as enqueues do: the chain
        lock and the race handling with other processes are per message, and a commit
        costs little next to SQLite's flush.
        """
        results: list[tuple[InboxRow, bool] | Exception] = []
        for request in requests:
            try:
                results.append(self.inbox_accept(**request))
            except Exception as exc:  # noqa: BLE001 - that request's own answer
                results.append(exc)
        return results

    # --- HL7 v2 inbox ---------------------------------------------------------------

    def _hl7(self, conn: psycopg.Connection[Any], sender: str, control_id: str) -> HL7InboxRow | None:
        r = conn.execute(f"SELECT {_HL7_COLS} FROM hl7_inbox WHERE sender=%s AND control_id=%s",
                         (sender, control_id)).fetchone()
        return _hl7_row(r, self._opener(conn)) if r is not None else None

    def hl7_lookup(self, sender: str, control_id: str) -> HL7InboxRow | None:
        """The stored HL7 message ``(sender, control_id)``, or None."""
        with self._read("hl7_lookup") as conn:
            return self._hl7(conn, sender, control_id)

    def hl7_count(self, sender: str | None = None) -> int:
        """How many HL7 messages are stored (from ``sender``, or from everyone)."""
        with self._read("hl7_count") as conn:
            if sender is None:
                r = conn.execute("SELECT count(*) FROM hl7_inbox").fetchone()
            else:
                r = conn.execute("SELECT count(*) FROM hl7_inbox WHERE sender=%s",
                                 (sender,)).fetchone()
            return int(r[0]) if r is not None else 0

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
        new → ``(row, True)`` after commit (only then may the caller send the ACK);
        held with the same ``digest`` → ``(existing, False)``, answer with
        ``existing.ack`` byte for byte; held with another digest →
        :class:`bridge.errors.ConflictError` (location ``MSH-10``), nothing written. If
        ``make_ack`` raises, nothing is written and the exception propagates.
        """
        _require_aware(now, "now")

        def answer(existing: HL7InboxRow) -> tuple[HL7InboxRow, bool]:
            if existing.digest != digest:
                raise ConflictError("duplicate control id with different content",
                                    location="MSH-10")
            return existing, False

        for _ in range(_RACE_RETRIES):
            try:
                with self._tx("hl7_accept") as conn:
                    existing = self._hl7(conn, sender, control_id)
                    if existing is not None:
                        return answer(existing)
                    self._lock_chain(conn)
                    existing = self._hl7(conn, sender, control_id)
                    if existing is not None:
                        return answer(existing)
                    entry = self._append(conn, audit)
                    ack = make_ack(entry)
                    r = conn.execute(
                        f"INSERT INTO hl7_inbox ({_HL7_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"
                        f" ON CONFLICT (sender, control_id) DO NOTHING RETURNING {_HL7_COLS}",
                        (sender, control_id, digest, self._seal(message, "hl7_inbox.message"),
                         self._seal(record, "hl7_inbox.record") if record is not None else None,
                         ack, entry.seq, now),
                    ).fetchone()
                    if r is None:
                        raise _Raced
                    return _hl7_row(r, self._opener(conn)), True
            except _Raced:
                continue
        raise StoreError("hl7_accept kept racing with concurrent writers", location="MSH-10")

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
                f"SELECT {_AUDIT_COLS} FROM audit WHERE seq>%s ORDER BY seq", (since_seq,)),
                _audit_entry)

    def audit_by_patient(self, patient: str) -> list[AuditEntry]:
        """Entries about one patient pseudonym (``patient_pseudonym(...)``), in chain order."""
        with self._read("audit_by_patient") as conn:
            return stored_entries(conn.execute(
                f"SELECT {_AUDIT_COLS} FROM audit WHERE patient=%s ORDER BY seq", (patient,)),
                _audit_entry)

    def verify_audit(self) -> ChainReport:
        """Verify the whole chain from genesis (see :func:`bridge.ledger.audit.verify_chain`)."""
        entries, damaged = read_chain(self.audit_entries)
        return verify_chain(entries, damaged=damaged)

    def audit_guards(self) -> frozenset[str]:
        """The names of the append-only triggers the audit table has (see the schema)."""
        with self._read("audit_guards") as conn:
            return frozenset(str(r[0]) for r in conn.execute(
                "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = 'audit' AND NOT t.tgisinternal",
                (self.schema,)).fetchall())

    def audit_head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last entry; ``(0, 64 zeros)`` for an empty log."""
        with self._read("audit_head") as conn:
            r = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            return (int(r[0]), str(r[1])) if r is not None else (0, GENESIS_HASH)

    # --- consents -------------------------------------------------------------------

    def put_consent(self, *, consent_id: str, patient_keys: list[str], status: str,
                    resource: bytes, now: datetime, audit: AuditRecord) -> ConsentRow:
        """Insert or replace a consent; the previous versions stay in ``consent_history``.

        ``patient_keys`` are the lookup keys the policy room uses for the patient;
        ``resource`` is the FHIR Consent JSON as received.
        """
        _require_aware(now, "now")
        keys = tuple(dict.fromkeys(patient_keys))
        with self._tx("put_consent") as conn:
            entry = self._append(conn, audit)
            conn.execute(
                "INSERT INTO consent (consent_id, status, resource, updated)"
                " VALUES (%s,%s,%s,%s) ON CONFLICT (consent_id) DO UPDATE SET"
                " status=excluded.status, resource=excluded.resource, updated=excluded.updated",
                (consent_id, status, self._seal(resource, "consent.resource"), now))
            conn.execute("DELETE FROM consent_patient WHERE consent_id=%s", (consent_id,))
            if keys:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO consent_patient (consent_id, patient_key) VALUES (%s,%s)",
                        [(consent_id, self._blind(k)) for k in keys])
            conn.execute(
                "INSERT INTO consent_history (consent_id, status, resource, patient_keys,"
                " changed, audit_seq) VALUES (%s,%s,%s,%s,%s,%s)",
                (consent_id, status, self._seal(resource, "consent_history.resource"),
                 Jsonb([self._blind(k) for k in keys]), now, entry.seq))
            return ConsentRow(consent_id, status, bytes(resource), keys, _utc(now))

    def _consent(self, conn: psycopg.Connection[Any], consent_id: str) -> ConsentRow | None:
        r = conn.execute("SELECT consent_id, status, resource, updated FROM consent"
                         " WHERE consent_id=%s", (consent_id,)).fetchone()
        if r is None:
            return None
        keys = tuple(str(k) for (k,) in conn.execute(
            "SELECT patient_key FROM consent_patient WHERE consent_id=%s"
            " ORDER BY patient_key COLLATE \"C\"", (consent_id,)))
        return ConsentRow(r[0], r[1], self._opener(conn)(bytes(r[2]), "consent.resource"), keys,
                          _utc(r[3]))

    def get_consent(self, consent_id: str) -> ConsentRow | None:
        """The current version of one consent, or None."""
        with self._read("get_consent") as conn:
            return self._consent(conn, consent_id)

    def list_consents(self) -> list[tuple[str, str, bytes]]:
        """``(consent_id, status, resource)`` of every current consent, by id."""
        with self._read("list_consents") as conn:
            open_ = self._opener(conn)
            return [(r[0], r[1], open_(bytes(r[2]), "consent.resource")) for r in conn.execute(
                "SELECT consent_id, status, resource FROM consent"
                " ORDER BY consent_id COLLATE \"C\"")]

    def consents_for_patient(self, patient_key: str) -> list[ConsentRow]:
        """Current consents that name ``patient_key``."""
        with self._read("consents_for_patient") as conn:
            ids = [str(i) for (i,) in conn.execute(
                "SELECT consent_id FROM consent_patient WHERE patient_key=%s"
                " ORDER BY consent_id COLLATE \"C\"", (self._blind(patient_key),))]
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
                "SELECT id, resource FROM consent_history WHERE id>%s ORDER BY id LIMIT %s",
                (after, limit))]

    def consent_history(self, consent_id: str) -> list[tuple[str, bytes, datetime, int]]:
        """Every version put of ``consent_id``: ``(status, resource, changed, audit_seq)``."""
        with self._read("consent_history") as conn:
            open_ = self._opener(conn)
            return [(r[0], open_(bytes(r[1]), "consent_history.resource"), _utc(r[2]),
                     int(r[3])) for r in conn.execute(
                "SELECT status, resource, changed, audit_seq FROM consent_history"
                " WHERE consent_id=%s ORDER BY id", (consent_id,))]

    # --- lifecycle ------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; further calls raise :class:`StoreError`. Idempotent."""
        with self._lock:
            self._closed = True
            self._drop_connection()
            close_cache(self)  # the audit tree's leaf file
        self._alive_stop.set()
        thread = self._alive_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)  # it closes its connection, and the lock goes with it

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

