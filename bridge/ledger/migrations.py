"""Schema migrations for both stores: named steps applied once, in name order.

The tables of schema version 1 (outbox, inbox, consents, audit) are created by each
store's base schema. Everything added since is a :class:`Migration` listed in
:data:`MIGRATIONS`. When a store opens, it applies, inside one transaction and in name
order, every migration it has not recorded in its ``schema_migrations`` table, so a
store written by an older bridge is brought up to date at start, and several processes
starting together apply each step once (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory lock). A store that records a migration this bridge does not know was
written by a newer version and is refused, naming the step, rather than used by code
that does not understand its tables.

Writing a migration
    ``name`` sorts in the order the steps must run: four digits, a dash, a short
    description (``0700-visit-assembly``). The digits group steps by the part of the
    bridge that owns them, so two parts never pick the same name.

    ``ddl`` is one script for both engines. It may use these placeholders:

    ============  ======================================  =======================
    placeholder   SQLite                                  PostgreSQL
    ============  ======================================  =======================
    ``{blob}``    ``BLOB``                                ``BYTEA``
    ``{bigint}``  ``INTEGER``                             ``BIGINT``
    ``{autoid}``  ``INTEGER PRIMARY KEY``                 ``BIGINT GENERATED ALWAYS
                                                          AS IDENTITY PRIMARY KEY``
    ============  ======================================  =======================

    Times in tables added by migrations are ``TEXT`` holding
    :func:`bridge.ledger.audit.format_time` (fixed-width UTC ISO), on both engines, so
    SQL written once through :class:`bridge.ledger.portable.Tx` compares them the same
    way everywhere. ``sqlite`` or ``postgres`` replaces ``ddl`` for one engine when the
    two must differ (altering a table of the base schema whose column types differ).

    A migration is never edited once released: a change is a new migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]

_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {"blob": "BLOB", "bigint": "INTEGER", "autoid": "INTEGER PRIMARY KEY"},
    "postgresql": {
        "blob": "BYTEA",
        "bigint": "BIGINT",
        "autoid": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    },
}


@dataclass(frozen=True)
class Migration:
    """One schema step (see the module docstring)."""

    name: str
    ddl: str = ""
    sqlite: str | None = None
    postgres: str | None = None
    #: SQLite: a query that returns a row when the step is already in place (a store
    #: whose migration record was lost); the step is then recorded without running.
    #: For what IF NOT EXISTS cannot say, such as a column already dropped.
    sqlite_done_if: str | None = None

    def script(self, dialect: Dialect) -> str:
        """The DDL for ``dialect`` with the type placeholders filled in."""
        own = self.sqlite if dialect == "sqlite" else self.postgres
        text = own if own is not None else self.ddl
        return text.format(**_TYPES[dialect])


MIGRATIONS: tuple[Migration, ...] = (
    # The HL7 v2 inbox predates this mechanism; IF NOT EXISTS lets a store that already
    # has it record the step without change.
    Migration(
        name="0300-hl7-inbox",
        sqlite="""
CREATE TABLE IF NOT EXISTS hl7_inbox (
    id          INTEGER PRIMARY KEY,
    sender      TEXT NOT NULL,
    control_id  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    message     BLOB NOT NULL,
    record      BLOB,
    ack         BLOB NOT NULL,
    audit_seq   INTEGER NOT NULL,
    received    TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS hl7_inbox_identity ON hl7_inbox (sender, control_id);
""",
        postgres="""
CREATE TABLE IF NOT EXISTS hl7_inbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender      TEXT NOT NULL,
    control_id  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    message     BYTEA NOT NULL,
    record      BYTEA,
    ack         BYTEA NOT NULL,
    audit_seq   BIGINT NOT NULL,
    received    TIMESTAMPTZ NOT NULL,
    UNIQUE (sender, control_id)
);
""",
    ),
    # HL7 v2 intake: visits and their parts, records to route and their deliveries
    # (bridge/ledger/intake.py); warnings about fields no mapping reads.
    Migration(
        name="0700-intake",
        ddl="""
CREATE TABLE IF NOT EXISTS visit (
    id          {autoid},
    key_digest  TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    facility    TEXT NOT NULL,
    summary     {blob} NOT NULL,
    completed   INTEGER NOT NULL DEFAULT 0,
    parts       INTEGER NOT NULL DEFAULT 0,
    created     TEXT NOT NULL,
    updated     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS visit_part (
    visit_id     {bigint} NOT NULL,
    sender       TEXT NOT NULL,
    control_id   TEXT NOT NULL,
    message_type TEXT NOT NULL,
    part         {blob} NOT NULL,
    received     TEXT NOT NULL,
    PRIMARY KEY (visit_id, sender, control_id)
);
CREATE TABLE IF NOT EXISTS intake_record (
    id             {autoid},
    source         TEXT NOT NULL UNIQUE,
    kind           TEXT NOT NULL,
    message_type   TEXT NOT NULL,
    dataset        TEXT NOT NULL,
    facility       TEXT NOT NULL,
    state          TEXT NOT NULL,
    detail         TEXT,
    record         {blob},
    version        {bigint} NOT NULL DEFAULT 1,
    routed_version {bigint} NOT NULL DEFAULT 0,
    lease_until    TEXT,
    created        TEXT NOT NULL,
    updated        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS intake_record_state ON intake_record (state, id);
CREATE TABLE IF NOT EXISTS intake_delivery (
    record_id   {bigint} NOT NULL,
    link        TEXT NOT NULL,
    revision    INTEGER NOT NULL,
    message_id  TEXT NOT NULL,
    digest      TEXT NOT NULL,
    replaces    TEXT,
    state       TEXT NOT NULL,
    detail      TEXT,
    created     TEXT NOT NULL,
    PRIMARY KEY (record_id, link, revision)
);
CREATE TABLE IF NOT EXISTS hl7_warning (
    sender      TEXT NOT NULL,
    control_id  TEXT NOT NULL,
    warnings    TEXT NOT NULL,
    PRIMARY KEY (sender, control_id)
);
""",
    ),
    # Received claims waiting to be handed to the receiver's own systems, one row per
    # (destination, claim). The claim itself stays in the inbox; ``seq`` orders the
    # hand-offs of one sender to one destination in the order they were accepted.
    Migration(
        name="0750-handoff-queue",
        ddl="""
CREATE TABLE IF NOT EXISTS handoff (
    id           {autoid},
    destination  TEXT NOT NULL,
    sender       TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    link         TEXT NOT NULL,
    seq          {bigint} NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    due_since    TEXT NOT NULL,
    next_attempt TEXT NOT NULL,
    lease_until  TEXT,
    last_error   TEXT,
    last_answer  {blob},
    received     TEXT NOT NULL,
    created      TEXT NOT NULL,
    updated      TEXT NOT NULL,
    delivered    TEXT,
    UNIQUE (destination, sender, message_id),
    UNIQUE (destination, sender, seq)
);
CREATE INDEX IF NOT EXISTS handoff_line ON handoff (destination, state, sender, seq);
CREATE INDEX IF NOT EXISTS handoff_claim ON handoff (sender, message_id);
""",
    ),
    # Token buckets shared by every process of a store (bridge.ledger.ratelimit): a
    # partner's request rate is limited across processes, not per process.
    Migration(
        name="0860-rate-buckets",
        sqlite="""
CREATE TABLE IF NOT EXISTS rate_bucket (
    bucket  TEXT PRIMARY KEY,
    tokens  REAL NOT NULL,
    stamp   REAL NOT NULL
);
""",
        postgres="""
CREATE TABLE IF NOT EXISTS rate_bucket (
    bucket  TEXT PRIMARY KEY,
    tokens  DOUBLE PRECISION NOT NULL,
    stamp   DOUBLE PRECISION NOT NULL
);
""",
    ),
    # One patient across identifiers: pairs of patient pseudonyms the hospital's own
    # records state belong to one person (bridge.ledger.identity). Append-only, so every
    # process can follow the links by sequence number.
    Migration(
        name="0900-patient-links",
        ddl="""
CREATE TABLE IF NOT EXISTS patient_link (
    seq     {autoid},
    a       TEXT NOT NULL,
    b       TEXT NOT NULL,
    linked  TEXT NOT NULL,
    UNIQUE (a, b)
);
CREATE INDEX IF NOT EXISTS patient_link_b ON patient_link (b);
""",
    ),
    # Delivery outcomes: whether a claim may have reached the partner without an answer
    # (its fate is unknown, so it is never given up), what the partner last answered,
    # and when the give-up clock started (enqueue, or the last requeue).
    Migration(
        name="1000-delivery-outcome",
        sqlite="""
ALTER TABLE outbox ADD COLUMN fate_unknown INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN last_answer TEXT;
ALTER TABLE outbox ADD COLUMN since TEXT;
""",
        postgres="""
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS fate_unknown INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS last_answer TEXT;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS since TIMESTAMPTZ;
""",
    ),
    # Sync tracking: the sequence numbers each sender's streams carried into this inbox
    # (gaps show what never arrived), and per outbound link the partner's last signed
    # summary of what it holds (bridge.ledger.sync).
    Migration(
        name="1001-sync",
        ddl="""
CREATE TABLE IF NOT EXISTS sync_inbound (
    sender      TEXT NOT NULL,
    stream      TEXT NOT NULL,
    seq         {bigint} NOT NULL,
    message_id  TEXT NOT NULL,
    received    TEXT NOT NULL,
    PRIMARY KEY (sender, stream, seq)
);
CREATE TABLE IF NOT EXISTS sync_outbound (
    link           TEXT PRIMARY KEY,
    confirmed_seq  {bigint} NOT NULL,
    checked        TEXT NOT NULL,
    compared       {bigint} NOT NULL,
    missing        {bigint} NOT NULL,
    resent         {bigint} NOT NULL,
    mismatched     {bigint} NOT NULL,
    detail         TEXT
);
""",
    ),
    # Sync tracking, numbering: per number received, the other message identities that
    # arrived as that number after the first (a sender restored from a backup gave it
    # again), as a JSON list; per outbound link, the highest number the partner holds
    # (new claims are numbered after it), this side's highest when that was learnt, and
    # the numbers the partner holds twice, as JSON ranges (bridge.ledger.sync).
    Migration(
        name="1002-sync-numbering",
        sqlite="""
ALTER TABLE sync_inbound ADD COLUMN others TEXT;
ALTER TABLE sync_outbound ADD COLUMN partner_highest INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_outbound ADD COLUMN own_highest INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_outbound ADD COLUMN collisions TEXT;
""",
        postgres="""
ALTER TABLE sync_inbound ADD COLUMN IF NOT EXISTS others TEXT;
ALTER TABLE sync_outbound ADD COLUMN IF NOT EXISTS partner_highest BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sync_outbound ADD COLUMN IF NOT EXISTS own_highest BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sync_outbound ADD COLUMN IF NOT EXISTS collisions TEXT;
""",
    ),
    # The audit tree's checkpoints: issued, cosigned by partners, and partners' ones
    # witnessed or refused (bridge.ledger.tree).
    Migration(
        name="1100-audit-checkpoints",
        ddl="""
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    size     {bigint} PRIMARY KEY,
    root     TEXT NOT NULL,
    issued   TEXT NOT NULL,
    note     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_cosigned (
    id        {autoid},
    cosigner  TEXT NOT NULL,
    size      {bigint} NOT NULL,
    note      TEXT NOT NULL,
    received  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_cosigned_size ON audit_cosigned (cosigner, size);
CREATE TABLE IF NOT EXISTS audit_witness (
    partner   TEXT NOT NULL,
    size      {bigint} NOT NULL,
    root      TEXT NOT NULL,
    note      TEXT NOT NULL,
    cosigned  TEXT NOT NULL,
    PRIMARY KEY (partner, size)
);
CREATE TABLE IF NOT EXISTS audit_witness_fault (
    id        {autoid},
    partner   TEXT NOT NULL,
    note      TEXT NOT NULL,
    reason    TEXT NOT NULL,
    seen      TEXT NOT NULL
);
""",
    ),
    # Data keys of encryption at rest, wrapped under the key-encryption key
    # (bridge.ledger.seal).
    Migration(
        name="1101-data-keys",
        ddl="""
CREATE TABLE IF NOT EXISTS data_key (
    id       {bigint} PRIMARY KEY,
    wrapped  {blob} NOT NULL,
    kek      TEXT NOT NULL,
    created  TEXT NOT NULL
);
""",
    ),
    # With encryption at rest a person's lookup key is stored keyed (HMAC) and sealed
    # beside it; rows written before keep their key in clear and no sealed copy. The
    # table is created here when 1300 has not run yet (a new store), as 1300 makes it.
    Migration(
        name="1102-sealed-person-key",
        sqlite="""
CREATE TABLE IF NOT EXISTS pull_person_key (
    patient_key  TEXT PRIMARY KEY,
    person       TEXT NOT NULL
);
ALTER TABLE pull_person_key ADD COLUMN sealed_key BLOB;
""",
        postgres="""
CREATE TABLE IF NOT EXISTS pull_person_key (
    patient_key  TEXT PRIMARY KEY,
    person       TEXT NOT NULL
);
ALTER TABLE pull_person_key ADD COLUMN IF NOT EXISTS sealed_key BYTEA;
""",
    ),
    # Record pull: the records store, review items, pages received (bridge.ledger.records).
    # IF NOT EXISTS: a store whose migration record was lost gains the step without change.
    Migration(
        name="1300-pull-records",
        ddl="""
CREATE TABLE IF NOT EXISTS pull_head (
    id   INTEGER PRIMARY KEY,
    seq  {bigint} NOT NULL
);
INSERT INTO pull_head (id, seq) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS pull_record (
    id        {autoid},
    digest    TEXT NOT NULL UNIQUE,
    source    TEXT NOT NULL,
    dataset   TEXT NOT NULL,
    person    TEXT NOT NULL,
    record    {blob} NOT NULL,
    received  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pull_person_key (
    patient_key  TEXT PRIMARY KEY,
    person       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pull_person_key_person ON pull_person_key (person);
CREATE TABLE IF NOT EXISTS pull_resource (
    seq           {bigint} PRIMARY KEY,
    person        TEXT NOT NULL,
    rtype         TEXT NOT NULL,
    rid           TEXT NOT NULL,
    date_lo       TEXT,
    date_hi       TEXT,
    last_updated  TEXT NOT NULL,
    digest        TEXT NOT NULL,
    body          {blob} NOT NULL,
    record_id     {bigint} NOT NULL,
    superseded    {bigint}
);
CREATE INDEX IF NOT EXISTS pull_resource_person ON pull_resource (person, seq);
CREATE INDEX IF NOT EXISTS pull_resource_type ON pull_resource (person, rtype, seq);
CREATE INDEX IF NOT EXISTS pull_resource_current ON pull_resource (person, rtype, rid, superseded);
CREATE TABLE IF NOT EXISTS pull_cursor (
    name      TEXT PRIMARY KEY,
    position  {bigint} NOT NULL
);
CREATE TABLE IF NOT EXISTS pull_review (
    id         {autoid},
    time       TEXT NOT NULL,
    link       TEXT NOT NULL,
    partner    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    actor      TEXT,
    reason     {blob},
    audit_seq  {bigint} NOT NULL,
    reviewed   TEXT
);
CREATE TABLE IF NOT EXISTS pull_received (
    id         {autoid},
    link       TEXT NOT NULL,
    partner    TEXT NOT NULL,
    page_id    TEXT NOT NULL,
    digest     TEXT NOT NULL,
    body       {blob} NOT NULL,
    received   TEXT NOT NULL,
    audit_seq  {bigint} NOT NULL,
    UNIQUE (partner, page_id)
);
""",
    ),
    # Who acted: the operator (certificate or host user) behind an audit entry. NULL for
    # what the bridge does by itself, and for every entry written before this step.
    Migration(
        name="1500-audit-operator",
        sqlite="ALTER TABLE audit ADD COLUMN operator TEXT;",
        postgres="ALTER TABLE audit ADD COLUMN IF NOT EXISTS operator TEXT;",
    ),
    # Items sent abroad under each cross-border approval, and restores waiting for
    # reconciliation with the partners (bridge.ledger.compliance).
    Migration(
        name="1501-compliance",
        ddl="""
CREATE TABLE IF NOT EXISTS crossborder_count (
    approval  TEXT NOT NULL,
    partner   TEXT NOT NULL,
    items     {bigint} NOT NULL,
    PRIMARY KEY (approval, partner)
);
CREATE TABLE IF NOT EXISTS crossborder_item (
    approval   TEXT NOT NULL,
    partner    TEXT NOT NULL,
    link       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    time       TEXT NOT NULL,
    audit_seq  {bigint} NOT NULL,
    PRIMARY KEY (approval, partner, subject)
);
CREATE TABLE IF NOT EXISTS store_restore (
    id          {autoid},
    restored    TEXT NOT NULL,
    backup      TEXT NOT NULL,
    audit_seq   {bigint} NOT NULL,
    reconciled  TEXT
);
""",
    ),
    # The process that queued a claim, when it dispatches that link itself: others
    # leave the claim to it for a moment (bridge.ledger.postgres, OWNER_GRACE). One
    # SQLite file has one dispatching process, so SQLite records nothing.
    Migration(
        name="1502-outbox-owner",
        sqlite="",
        postgres="ALTER TABLE outbox ADD COLUMN IF NOT EXISTS enqueued_by TEXT;",
    ),
    # SQLite writes a whole row again on every UPDATE, overflow pages included: with the
    # payload in the outbox row, each change of state (sending, acked) wrote the message
    # again, about twice its size to the journal each time. Kept apart, it is written
    # once. PostgreSQL keeps large values out of the row already (TOAST): nothing to do.
    Migration(
        name="1503-outbox-payload-apart",
        sqlite="""
CREATE TABLE IF NOT EXISTS outbox_payload (
    message_id  TEXT PRIMARY KEY,
    payload     BLOB NOT NULL
);
INSERT INTO outbox_payload (message_id, payload) SELECT message_id, payload FROM outbox;
ALTER TABLE outbox DROP COLUMN payload;
""",
        postgres="",
        sqlite_done_if="SELECT 1 WHERE NOT EXISTS"
                       " (SELECT 1 FROM pragma_table_info('outbox') WHERE name = 'payload')",
    ),
    # PostgreSQL: the process handing a claim over, as outbox.claimed_by names the one
    # sending a claim, and the rows being sent, indexed by their worker, so that a
    # store's liveness look finds those of a process that is gone without reading the
    # whole table (bridge.ledger.postgres, PostgresStore._look). On SQLite a lock file
    # beside the store tells whether the processes that sent are gone: nothing here.
    Migration(
        name="1504-claimer-liveness",
        sqlite="",
        postgres="""
ALTER TABLE handoff ADD COLUMN IF NOT EXISTS claimed_by TEXT;
CREATE INDEX IF NOT EXISTS outbox_sending ON outbox (claimed_by) WHERE state = 'sending';
CREATE INDEX IF NOT EXISTS handoff_sending ON handoff (claimed_by) WHERE state = 'sending';
""",
    ),
    # SQLite: the process sending a claim, as PostgreSQL has recorded from the start, so
    # that only the sender holding a claim now records its outcome (two processes on one
    # file, one lease run out).
    Migration(
        name="1505-outbox-claimer-sqlite",
        sqlite="ALTER TABLE outbox ADD COLUMN claimed_by TEXT;",
        postgres="",
        sqlite_done_if="SELECT 1 FROM pragma_table_info('outbox') WHERE name = 'claimed_by'",
    ),
    # The patient pseudonyms that are of a resident ID card number (bridge.ledger.identity):
    # a person holds at most one, so a record naming another beside one of the person's
    # identifiers is refused rather than joining two people.
    Migration(
        name="1506-patient-id-card",
        ddl="""
CREATE TABLE IF NOT EXISTS patient_id_card (
    seq        {autoid},
    pseudonym  TEXT NOT NULL UNIQUE,
    noted      TEXT NOT NULL
);
""",
    ),
)


def check_names(migrations: tuple[Migration, ...] = MIGRATIONS) -> None:
    """Raise ValueError unless names are unique and listed in the order they sort."""
    names = [m.name for m in migrations]
    if len(set(names)) != len(names):
        raise ValueError("duplicate migration name")
    if names != sorted(names):
        raise ValueError("migrations must be listed in name order")


check_names()

SCHEMA_MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " name TEXT PRIMARY KEY, applied TEXT NOT NULL)"
)
