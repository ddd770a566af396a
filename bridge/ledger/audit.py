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
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

GENESIS_HASH = "0" * 64
# Bumped if the hashed form ever changes, so old chains still verify by their own rules.
CHAIN_VERSION = 1
PSEUDONYM_PREFIX = "pp:"

Outcome = Literal["success", "failure", "denied"]
OUTCOMES: frozenset[str] = frozenset({"success", "failure", "denied"})
# Who acted: an operator certificate's name or a host user, never free text.
_OPERATOR = re.compile(r"^(cert|os):[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

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
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("AuditRecord.time must be timezone-aware")
        if not self.actor or not self.action or not self.subject:
            raise ValueError("AuditRecord.actor, action and subject must be non-empty")
        if self.outcome not in OUTCOMES:
            raise ValueError("AuditRecord.outcome must be success, failure or denied")
        if self.patient is not None and not self.patient.startswith(PSEUDONYM_PREFIX):
            # Refuse anything that is not a pseudonym: the log is kept for years and
            # exported to partners, so a clear identifier must never reach it.
            raise ValueError("AuditRecord.patient must be a pseudonym from patient_pseudonym()")
        cats = self.categories
        if isinstance(cats, str):
            raise ValueError(  # noqa: TRY004 - a bad field value, as every check here
                "AuditRecord.categories must be a list of strings, not a string")
        object.__setattr__(self, "categories", tuple(cats))
        if self.operator is not None and not _OPERATOR.match(self.operator):
            raise ValueError("AuditRecord.operator must be cert:<name> or os:<user>")

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
) -> ChainReport:
    """Check that ``entries`` (in stored order) form an unbroken chain after the anchor.

    The default anchor is the genesis (seq 0, 64 zeros), so the whole log is checked
    from entry 1. To check only a tail, pass the last entry already trusted (for
    example a cosigned checkpoint) as ``anchor_seq``/``anchor_hash``.
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
    return ChainReport(True, count, prev_hash)


def patient_pseudonym(key: bytes, system: str, value: str) -> str:
    """Keyed pseudonym of one patient identifier: ``"pp:" + first 32 hex of HMAC-SHA256``.

    The identifier system is part of the input, so the same number under two systems
    (an ID card and a medical record number) gives two pseudonyms. Without the key,
    the pseudonym cannot be computed from a guessed identifier. The key is the
    controller's own secret and must stay the same for as long as the log is kept.
    """
    if len(key) < 16:
        raise ValueError("pseudonym key must be at least 16 bytes")
    if not system or not value:
        raise ValueError("pseudonym system and value must be non-empty")
    # NUL cannot occur in a URI or an identifier, so the join is unambiguous.
    mac = hmac.new(key, system.encode() + b"\x00" + value.encode(), hashlib.sha256)
    return PSEUDONYM_PREFIX + mac.hexdigest()[:32]
