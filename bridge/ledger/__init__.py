"""The ledger: outbox, inbox, consents and the hash-chained audit log.

``states`` and ``audit`` are pure; ``sqlite`` (the default, embedded) and ``postgres``
(several bridge processes sharing one database) are the durable stores behind them.
Both implement :class:`Store`; :func:`open_store` opens the one a configuration names.

The PostgreSQL module is imported only when a configuration asks for it, so a bridge
on SQLite never loads the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    from bridge.config import StoreConfig
    from bridge.errors import BridgeError
    from bridge.ledger.audit import AuditEntry, AuditRecord, ChainReport
    from bridge.ledger.portable import Tx
    from bridge.ledger.seal import Sealer
    from bridge.ledger.sqlite import ConsentRow, HL7InboxRow, InboxRow, OutboxRow

__all__ = ["Store", "open_store"]


@runtime_checkable
class Store(Protocol):
    """What the bridge needs from a ledger store; see :class:`bridge.ledger.sqlite.SQLiteStore`
    for the meaning of each method. Every method is synchronous, commits before it
    returns, and raises :class:`bridge.errors.StoreError` when the store fails.

    Tables added after the base schema are reached through :meth:`transaction` and
    :meth:`read` with SQL written once for both engines (:mod:`bridge.ledger.portable`)
    and created by :mod:`bridge.ledger.migrations`.
    """

    dialect: str
    sealer: Sealer
    #: Names this store instance in ``outbox.claimed_by`` (and, on PostgreSQL,
    #: ``handoff.claimed_by``) of what it is sending.
    worker_id: str

    # tables added by migrations
    def transaction(self, what: str, *, durable: bool = True) -> AbstractContextManager[Tx]: ...
    def read(self, what: str) -> AbstractContextManager[Tx]: ...
    def applied_migrations(self) -> list[str]: ...

    # outbox
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
    ) -> OutboxRow: ...
    def enqueue_many(
        self, requests: Sequence[Mapping[str, Any]]
    ) -> list[OutboxRow | BridgeError]: ...
    def claim_due(
        self, link: str, *, now: datetime, limit: int = 64, lease: timedelta = timedelta(seconds=30)
    ) -> list[OutboxRow]: ...
    def mark_acked(
        self, message_id: str, *, receipt: bytes, now: datetime, audit: AuditRecord
    ) -> OutboxRow: ...
    def mark_retry(
        self,
        message_id: str,
        *,
        next_attempt: datetime,
        error: str,
        now: datetime,
        audit: AuditRecord | None,
        fate_unknown: bool = False,
        answer: str | None = None,
    ) -> OutboxRow: ...
    def mark_rejected(
        self,
        message_id: str,
        *,
        error: str,
        receipt: bytes | None,
        now: datetime,
        audit: AuditRecord,
    ) -> OutboxRow: ...
    def mark_refused(
        self, message_id: str, *, error: str, now: datetime, audit: AuditRecord
    ) -> OutboxRow: ...
    def mark_dead(
        self,
        message_id: str,
        *,
        error: str,
        now: datetime,
        audit: AuditRecord,
        answer: str | None = None,
    ) -> OutboxRow: ...
    def requeue(self, message_id: str, *, now: datetime, audit: AuditRecord) -> OutboxRow: ...
    def get_outbox(self, message_id: str) -> OutboxRow | None: ...
    def outbox_counts(self, link: str | None = None) -> dict[str, int]: ...
    def list_outbox(
        self, link: str, state: str | None = None, limit: int = 100
    ) -> list[OutboxRow]: ...
    def highest_contiguous_acked(self, link: str) -> int: ...

    # inbox
    def inbox_lookup(self, sender: str, message_id: str) -> InboxRow | None: ...
    def inbox_count(self, sender: str | None = None) -> int: ...
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
    ) -> tuple[InboxRow, bool]: ...

    # HL7 v2 inbox
    def hl7_lookup(self, sender: str, control_id: str) -> HL7InboxRow | None: ...
    def hl7_count(self, sender: str | None = None) -> int: ...
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
    ) -> tuple[HL7InboxRow, bool]: ...

    # audit
    def append_audit(self, record: AuditRecord, *, proof: bool = True) -> AuditEntry: ...
    def audit_entries(self, *, since_seq: int = 0) -> list[AuditEntry]: ...
    def audit_by_patient(self, patient: str) -> list[AuditEntry]: ...
    def verify_audit(self) -> ChainReport: ...

    def audit_guards(self) -> frozenset[str]: ...
    def audit_head(self) -> tuple[int, str]: ...

    # consents
    def put_consent(
        self,
        *,
        consent_id: str,
        patient_keys: list[str],
        status: str,
        resource: bytes,
        now: datetime,
        audit: AuditRecord,
    ) -> ConsentRow: ...
    def get_consent(self, consent_id: str) -> ConsentRow | None: ...
    def list_consents(self) -> list[tuple[str, str, bytes]]: ...
    def consents_for_patient(self, patient_key: str) -> list[ConsentRow]: ...

    def consent_changes(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]: ...
    def consent_history(self, consent_id: str) -> list[tuple[str, bytes, datetime, int]]: ...

    # lifecycle
    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def recorded_migrations(config: StoreConfig) -> list[str]:
    """The schema steps the store ``config`` names has recorded, in order, read without
    applying any and without the data key (``bridge store status``)."""
    if config.kind == "postgresql":
        from bridge.ledger.postgres import recorded_migrations as in_schema

        assert config.dsn is not None  # StoreConfig refuses postgresql without a dsn
        return in_schema(config.dsn, config.db_schema)
    from bridge.ledger.sqlite import recorded_migrations as in_file

    return in_file(config.path)


def open_store(config: StoreConfig, *, sealer: Sealer | None = None,
               restoring: bool = False) -> Store:
    """Open the store ``config`` names: ``kind = "sqlite"`` (``path``) or
    ``kind = "postgresql"`` (``dsn``, ``schema``). Creates the file or schema if needed
    and applies pending migrations. ``sealer`` seals health data at rest. ``restoring``:
    for a restore holding the store's locks alone (see :mod:`bridge.ledger.backup`).
    """
    from bridge.errors import BridgeError
    from bridge.ledger.seal import AESGCMSealer, load_kek

    try:
        if sealer is None:
            where = f"{config.source}: store" if config.source is not None else "store"
            kek = load_kek(config.data_key_file, config.data_key_env, where=where)
            sealer = AESGCMSealer(kek) if kek is not None else None
        store: Store
        if config.kind == "postgresql":
            from bridge.ledger.postgres import PostgresStore

            assert config.dsn is not None  # StoreConfig refuses postgresql without a dsn
            store = PostgresStore(config.dsn, schema=config.db_schema, sealer=sealer,
                                  restoring=restoring)
        else:
            from bridge.ledger.sqlite import SQLiteStore

            config.path.parent.mkdir(parents=True, exist_ok=True)
            store = SQLiteStore(config.path, sealer=sealer, restoring=restoring)
        if isinstance(sealer, AESGCMSealer):
            try:
                with store.transaction("load data keys") as tx:
                    sealer.load(tx)
            except BaseException:
                store.close()
                raise
        return store
    except BridgeError as exc:
        # Name the configuration file beside the key, as configuration errors do.
        if config.source is not None and (exc.location or "").startswith("store."):
            exc.location = f"{config.source}: {exc.location}"
        raise
