"""The audit log as a hash chain: pure functions over plain records.

Each entry's hash covers its sequence number, the previous entry's hash and every
field of its record, serialised as canonical JSON (sorted keys, UTC times with
microseconds). Editing a field changes that entry's hash; deleting an entry leaves a
gap in the sequence or a ``prev_hash`` that no longer matches; reordering breaks the
sequence and the links. :func:`verify_chain` names the first entry where any of
this happens.

A chain alone is tamper-evident only against a head hash someone else holds: whoever
can rewrite the store can recompute every hash. The partner's cosigned checkpoints
of the head (``ChainReport.head_hash``) close that gap (DESIGN §6).

Records never hold a patient identifier in clear. :func:`patient_pseudonym` turns an
identifier into a keyed pseudonym, so the log can still answer "who received what
about patient X" by computing X's pseudonym with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from bridge.errors import BridgeError

GENESIS_HASH = "0" * 64
# Bumped if the hashed form ever changes, so old chains still verify by their own rules.
CHAIN_VERSION = 1
PSEUDONYM_PREFIX = "pp:"

Outcome = Literal["success", "failure", "denied"]
OUTCOMES: frozenset[str] = frozenset({"success", "failure", "denied"})
# Who acted: an operator certificate's name or a host user, never free text.
_OPERATOR = re.compile(r"^(cert|os):[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")

#: The operator acting in the current task (``cert:<name>``, ``os:<user>``), or None for
#: the bridge itself. A record made without an explicit ``operator`` takes it from here,
#: so every entry a command or an operations request causes names the person.
ACTING_OPERATOR: ContextVar[str | None] = ContextVar("acting_operator", default=None)


def _acting_operator() -> str | None:
    return ACTING_OPERATOR.get()


def format_time(value: datetime) -> str:
    """Aware datetime -> fixed-width UTC ISO string (sorts lexicographically in time order)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("time must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time`."""
    return datetime.fromisoformat(text).astimezone(UTC)


#: The fields :func:`field_problem` checks, in the order a record reports them.
_CHECKED_FIELDS = ("time", "actor", "action", "subject", "partner", "patient", "categories",
                   "outcome", "detail", "digest", "operator")


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` as the record field ``name``, or None.

    One set of rules for a record being made and for one read back from a store: a value
    these rules refuse was never written by the bridge, so a stored one that breaks them
    was changed outside it. The text names the rule, never the value.
    """
    if name == "time":
        if not isinstance(value, datetime):
            return "must be a time"
        if value.tzinfo is None or value.utcoffset() is None:
            return "must be timezone-aware"
        return None
    if name in ("actor", "action", "subject"):
        return None if isinstance(value, str) and value else "must be non-empty text"
    if name == "categories":
        ok = isinstance(value, tuple | list) and all(isinstance(c, str) for c in value)
        return None if ok else "must be a list of strings"
    if name == "outcome":
        return None if value in OUTCOMES else "must be success, failure or denied"
    if value is None:
        return None
    if not isinstance(value, str):
        return "must be text or empty"
    if name == "patient" and not value.startswith(PSEUDONYM_PREFIX):
        # Refuse anything that is not a pseudonym: the log is kept for years and
        # exported to partners, so a clear identifier must never reach it.
        return "must be a pseudonym from patient_pseudonym()"
    if name == "operator" and not _OPERATOR.match(value):
        return "must be cert:<name> or os:<user>"
    return None


@dataclass(frozen=True)
class AuditRecord:
    """What happened, as the caller states it. The chain fields are added on append.

    ``patient`` is a keyed pseudonym from :func:`patient_pseudonym` (``"pp:..."``) or
    None; an identifier in clear is refused. ``categories`` are the data categories
    disclosed or received (DESIGN §2 classify); a list is accepted and stored as a
    tuple, so records stay immutable and compare equal after a round trip.
    ``detail`` is an error code, never an error text that could carry values.
    ``operator`` names the person whose command or request caused the entry
    (``cert:<name>`` for an operator certificate, ``os:<user>`` for a command run on the
    host); None for what the bridge does by itself. It is left out of the hashed form
    when None, so entries written before operators were recorded keep their hashes.
    Left out, it is the operator acting in the current task (:data:`ACTING_OPERATOR`);
    code that rebuilds a stored record passes the stored value, None included.
    """

    time: datetime
    actor: str
    action: str
    subject: str
    partner: str | None = None
    patient: str | None = None
    categories: Sequence[str] = field(default_factory=tuple)
    outcome: Outcome = "success"
    detail: str | None = None
    digest: str | None = None
    operator: str | None = field(default_factory=_acting_operator)

    def __post_init__(self) -> None:
        if isinstance(self.categories, str):
            raise ValueError(  # noqa: TRY004 - a bad field value, as every check here
                "AuditRecord.categories must be a list of strings, not a string")
        object.__setattr__(self, "categories", tuple(self.categories))
        for name in _CHECKED_FIELDS:
            problem = field_problem(name, getattr(self, name))
            if problem is not None:
                raise ValueError(f"AuditRecord.{name} {problem}")

    def to_json_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (time as a UTC ISO string).

        ``operator`` is present only when set: the hashed form of an entry without one
        is exactly what it was before operators were recorded.
        """
        body: dict[str, Any] = {
            "time": format_time(self.time),
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "partner": self.partner,
            "patient": self.patient,
            "categories": list(self.categories),
            "outcome": self.outcome,
            "detail": self.detail,
            "digest": self.digest,
        }
        if self.operator is not None:
            body["operator"] = self.operator
        return body


@dataclass(frozen=True)
class AuditEntry:
    """A record as placed in the chain."""

    seq: int
    record: AuditRecord
    prev_hash: str
    hash: str
    #: Root of the tree of entries 1..seq, when the store computed it on append.
    root: bytes | None = field(default=None, compare=False, repr=False)
    #: Inclusion proof of this entry in that tree (RFC 9162 audit path), likewise.
    path: tuple[bytes, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class ChainReport:
    """Outcome of :func:`verify_chain`.

    ``count`` is the number of entries that verified before the first bad one (all of
    them when ``ok``); ``head_hash`` the hash of the last good entry (the anchor's hash
    when none verified). When not ``ok``, ``first_bad_seq`` is the sequence number
    where the chain breaks (for a deleted entry: the missing number) and ``reason``
    says how.
    """

    ok: bool
    count: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str | None = None


#: The audit table's columns, in the order a store selects them (:func:`stored_entry`).
AUDIT_COLUMNS = ("seq", "time", "actor", "action", "subject", "partner", "patient",
                 "categories", "outcome", "detail", "digest", "prev_hash", "hash", "operator")


class AuditEntryDamaged(BridgeError):
    """A stored audit entry holds a value the bridge never writes: it was changed outside
    the bridge (or the store is damaged).

    Names the entry and the column, never the value found there. ``before`` holds the
    entries read before it, so a verification can still say whether an earlier entry
    breaks the chain first (:func:`read_chain`, :func:`verify_chain`).
    """

    code = "audit-entry-damaged"
    exit_status = 1
    local_location = True

    def __init__(self, seq: int, column: str, before: Sequence[AuditEntry] = ()) -> None:
        self.seq, self.column, self.before = seq, column, tuple(before)
        self.reason = (f"entry {seq} {column} is not a value the bridge writes:"
                       " the entry was changed outside the bridge")
        super().__init__(f"audit chain BROKEN at entry {seq}: {self.reason}",
                         location=f"audit entry {seq}, column {column}")


def stored_entry(row: Sequence[Any], *, read_time: Callable[[Any], datetime],
                 read_categories: Callable[[Any], Any]) -> AuditEntry:
    """The entry a store row holds (columns in :data:`AUDIT_COLUMNS` order).

    ``read_time`` and ``read_categories`` turn the store's own representation of those
    two columns into a datetime and a list. Every column is checked by the rules a new
    record obeys (:func:`field_problem`); one that breaks them raises
    :class:`AuditEntryDamaged` naming it, whatever the store's driver raised.
    """
    values = dict(zip(AUDIT_COLUMNS, row, strict=True))
    if type(values["seq"]) is not int:
        # Numbered after the entry before it by stored_entries.
        raise AuditEntryDamaged(0, "seq")
    seq = values["seq"]
    fields: dict[str, Any] = {}
    for name in _CHECKED_FIELDS:
        raw = values[name]
        try:
            value = (read_time(raw) if name == "time"
                     else read_categories(raw) if name == "categories" else raw)
        except (ValueError, TypeError, OverflowError, AttributeError):
            raise AuditEntryDamaged(seq, name) from None
        if field_problem(name, value) is not None:
            raise AuditEntryDamaged(seq, name)
        fields[name] = value
    for name in ("prev_hash", "hash"):
        if not isinstance(values[name], str):
            raise AuditEntryDamaged(seq, name)
    return AuditEntry(seq=seq, record=AuditRecord(**fields), prev_hash=values["prev_hash"],
                      hash=values["hash"])


def stored_entries(rows: Iterable[Sequence[Any]],
                   read: Callable[[Sequence[Any]], AuditEntry]) -> list[AuditEntry]:
    """``read`` over ``rows``; a damaged row raises :class:`AuditEntryDamaged` carrying the
    entries before it."""
    entries: list[AuditEntry] = []
    for row in rows:
        try:
            entries.append(read(row))
        except AuditEntryDamaged as exc:
            seq = exc.seq or (entries[-1].seq + 1 if entries else 1)
            raise AuditEntryDamaged(seq, exc.column, before=entries) from None
    return entries


def tree_entries(rows: Iterable[Sequence[Any]],
                 read: Callable[[Sequence[Any]], AuditEntry]) -> list[AuditEntry]:
    """``read`` over ``rows`` for the Merkle tree of a process appending to the log: a
    damaged row stands as an entry whose content is :data:`DAMAGED` (so its leaf is not
    the one the row had when it was appended), instead of stopping every later append.
    The chain check reports the damage (:func:`verify_chain`), and a partner comparing
    this log with the checkpoints it cosigned sees it differ."""
    entries: list[AuditEntry] = []
    for row in rows:
        try:
            entries.append(read(row))
        except AuditEntryDamaged as exc:
            values = dict(zip(AUDIT_COLUMNS, row, strict=True))
            seq = exc.seq or (entries[-1].seq + 1 if entries else 1)
            prev_hash, stored = values["prev_hash"], values["hash"]
            entries.append(AuditEntry(
                seq=seq, record=DAMAGED,
                prev_hash=prev_hash if isinstance(prev_hash, str) else "",
                hash=stored if isinstance(stored, str) else ""))
    return entries


#: The content a damaged entry stands for in the Merkle tree (see :func:`tree_entries`).
DAMAGED = AuditRecord(time=datetime(1970, 1, 1, tzinfo=UTC), actor="-",
                      action="audit.entry-damaged", subject="-", operator=None)


def read_chain(read: Callable[[], Sequence[AuditEntry]]
               ) -> tuple[list[AuditEntry], AuditEntryDamaged | None]:
    """``(entries, None)`` from ``read()``, or the entries before a damaged one and the
    damage, for :func:`verify_chain` to report in chain order."""
    try:
        return list(read()), None
    except AuditEntryDamaged as exc:
        return list(exc.before), exc


def canonical_bytes(prev_hash: str, seq: int, record: AuditRecord) -> bytes:
    """The exact bytes an entry's hash is computed over."""
    body = record.to_json_dict()
    body["v"] = CHAIN_VERSION
    body["seq"] = seq
    body["prev_hash"] = prev_hash
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def leaf_of(entry: AuditEntry) -> bytes:
    """The entry's Merkle leaf hash, from its content (PROTOCOL §9.5).

    ``SHA-256(0x00 || SHA-256(E(n)))``: the leaf input is the entry hash recomputed
    from the entry, so a stored ``hash`` that no longer matches the content cannot
    stand in for it, and whoever holds only the hash (a receipt) derives the same leaf
    with :func:`leaf_from_hash`.
    """
    return leaf_from_hash(entry_hash(entry.prev_hash, entry.seq, entry.record))


def leaf_from_hash(hash_hex: str) -> bytes:
    """Merkle leaf hash of the entry whose §9.2 hash is ``hash_hex``."""
    return hashlib.sha256(b"\x00" + bytes.fromhex(hash_hex)).digest()


def entry_hash(prev_hash: str, seq: int, record: AuditRecord) -> str:
    """SHA-256 hex of the canonical JSON of ``record`` with ``seq`` and ``prev_hash``."""
    return hashlib.sha256(canonical_bytes(prev_hash, seq, record)).hexdigest()


def chain_entry(prev_hash: str, seq: int, record: AuditRecord) -> AuditEntry:
    """Build the entry that extends a chain whose head is ``(seq - 1, prev_hash)``."""
    return AuditEntry(seq=seq, record=record, prev_hash=prev_hash,
                      hash=entry_hash(prev_hash, seq, record))


def verify_chain(
    entries: Iterable[AuditEntry],
    *,
    anchor_seq: int = 0,
    anchor_hash: str = GENESIS_HASH,
    damaged: AuditEntryDamaged | None = None,
) -> ChainReport:
    """Check that ``entries`` (in stored order) form an unbroken chain after the anchor.

    The default anchor is the genesis (seq 0, 64 zeros), so the whole log is checked
    from entry 1. To check only a tail, pass the last entry already trusted (for
    example a cosigned checkpoint) as ``anchor_seq``/``anchor_hash``. ``damaged`` is the
    stored entry that could not be read after ``entries`` (:func:`read_chain`): unless
    the chain breaks earlier, it is where the chain breaks.
    """
    prev_seq, prev_hash = anchor_seq, anchor_hash
    count = 0
    for entry in entries:
        expected = prev_seq + 1
        if entry.seq != expected:
            reason = (
                f"entry {expected} missing (next entry is {entry.seq})"
                if entry.seq > expected
                else f"entry {entry.seq} out of order (expected {expected})"
            )
            return ChainReport(False, count, prev_hash, expected, reason)
        if entry.prev_hash != prev_hash:
            return ChainReport(False, count, prev_hash, entry.seq,
                               f"entry {entry.seq} does not link to entry {prev_seq}")
        if entry_hash(entry.prev_hash, entry.seq, entry.record) != entry.hash:
            return ChainReport(False, count, prev_hash, entry.seq,
                               f"entry {entry.seq} content does not match its hash")
        prev_seq, prev_hash = entry.seq, entry.hash
        count += 1
    if damaged is not None:
        expected = prev_seq + 1
        if damaged.seq != expected:
            return ChainReport(False, count, prev_hash, expected,
                               f"entry {expected} missing (next entry is {damaged.seq})")
        return ChainReport(False, count, prev_hash, damaged.seq, damaged.reason)
    return ChainReport(True, count, prev_hash)


def patient_pseudonym(key: bytes, system: str, value: str) -> str:
    """Keyed pseudonym of one patient identifier: ``"pp:" + first 32 hex of HMAC-SHA256``.

    The identifier system is part of the input, so the same number under two systems
    (an ID card and a medical record number) gives two pseudonyms. Without the key,
    the pseudonym cannot be computed from a guessed identifier. The key is the
    controller's own secret and must stay the same for as long as the log is kept.
    """
    return pseudonymizer(key)(system, value)


#: How many identifiers a :func:`pseudonymizer` remembers the pseudonyms of.
PSEUDONYM_MEMO = 256
#: The longest identifier (system and value together, in characters) it remembers:
#: identifiers are short, and a partner's message may hold anything up to its body limit.
PSEUDONYM_MEMO_TEXT = 256


def pseudonymizer(key: bytes) -> Callable[[str, str], str]:
    """:func:`patient_pseudonym` under one key, as a function of ``(system, value)``
    (it computes every patient pseudonym).

    One claim asks for the pseudonyms of its patient's identifiers several times (to
    link them, to find the patient's consents, for the audit entry), so the function
    remembers those of the last :data:`PSEUDONYM_MEMO` identifiers asked about, in
    process memory only, as the records being worked on are held there; an identifier
    longer than :data:`PSEUDONYM_MEMO_TEXT` is not remembered. The key is read once:
    the function keeps using it for as long as it lives. The HMAC is keyed once, not
    per call.
    """
    if len(key) < 16:
        raise ValueError("pseudonym key must be at least 16 bytes")
    keyed = hmac.new(key, digestmod=hashlib.sha256)
    memo: dict[tuple[str, str], str] = {}

    def pseudonym(system: str, value: str) -> str:
        if not system or not value:
            raise ValueError("pseudonym system and value must be non-empty")
        found = memo.get((system, value))
        if found is not None:
            return found
        mac = keyed.copy()
        # NUL cannot occur in a URI or an identifier, so the join is unambiguous.
        mac.update(system.encode() + b"\x00" + value.encode())
        made = PSEUDONYM_PREFIX + mac.hexdigest()[:32]
        if len(system) + len(value) <= PSEUDONYM_MEMO_TEXT:
            if len(memo) >= PSEUDONYM_MEMO:
                memo.clear()
            memo[(system, value)] = made
        return made

    return pseudonym
