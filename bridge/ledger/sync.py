"""Sync tracking between the two sides, written once for both stores.

Receiving side
    Every claim that arrives with a stream and sequence number (PROTOCOL §8a) is
    recorded in ``sync_inbound`` in the transaction that stores it. The numbers of one
    sender's stream are consecutive at the sender, so a number missing below the
    highest one received is a claim that has not arrived (yet): :func:`inbound_streams`
    reports these gaps. :func:`held` answers which identities of a sender the inbox
    holds, with the audit entry each one's receipt names.

Sending side
    ``sync_outbound`` keeps, per outbound link, the partner's last signed summary (the
    highest sequence it holds without a gap) and what the last reconciliation found.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bridge.ledger.audit import format_time, parse_time

if TYPE_CHECKING:
    from bridge.ledger import Store
    from bridge.ledger.portable import Tx

_CHUNK = 500


def record_received(
    tx: Tx, *, sender: str, stream: str, seq: int, message_id: str, now: datetime
) -> None:
    """Remember that ``message_id`` arrived as ``seq`` of ``sender``'s ``stream``."""
    tx.execute(
        "INSERT INTO sync_inbound (sender, stream, seq, message_id, received) VALUES (?,?,?,?,?)"
        " ON CONFLICT (sender, stream, seq) DO NOTHING",
        (sender, stream, seq, message_id, format_time(now)),
    )


def note_received(
    store: Store, *, sender: str, stream: str, seq: int, message_id: str, now: datetime
) -> None:
    """:func:`record_received` in a transaction of its own (a claim already held)."""
    with store.transaction("sync_note_received", durable=False) as tx:
        record_received(tx, sender=sender, stream=stream, seq=seq, message_id=message_id, now=now)


@dataclass(frozen=True)
class InboundStream:
    """What one sender's stream has brought: how many, up to where, and what is missing."""

    sender: str
    stream: str
    received: int
    highest: int
    contiguous: int  # every seq 1..contiguous is here
    gaps: tuple[tuple[int, int], ...]  # missing ranges (first, last) below ``highest``

    @property
    def missing(self) -> int:
        return sum(b - a + 1 for a, b in self.gaps)

    def to_json(self) -> dict[str, Any]:
        return {
            "sender": self.sender,
            "stream": self.stream,
            "received": self.received,
            "highest": self.highest,
            "contiguous": self.contiguous,
            "missing": self.missing,
            "gaps": [list(g) for g in self.gaps],
        }


def _gaps(seqs: Iterable[int]) -> tuple[int, tuple[tuple[int, int], ...]]:
    expected, contiguous, gaps = 1, None, []
    for seq in seqs:
        if seq > expected:
            if contiguous is None:
                contiguous = expected - 1
            gaps.append((expected, seq - 1))
        expected = seq + 1
    return (expected - 1 if contiguous is None else contiguous), tuple(gaps)


def inbound_streams(store: Store, sender: str | None = None) -> list[InboundStream]:
    """Every stream received (from ``sender``, or from everyone), with its gaps."""
    with store.read("sync_inbound_streams") as tx:
        keys = tx.all(
            "SELECT sender, stream FROM sync_inbound"
            + (" WHERE sender=?" if sender is not None else "")
            + " GROUP BY sender, stream ORDER BY sender, stream",
            (sender,) if sender is not None else (),
        )
        out = []
        for s, stream in keys:
            seqs = [
                int(r[0])
                for r in tx.all(
                    "SELECT seq FROM sync_inbound WHERE sender=? AND stream=? ORDER BY seq",
                    (s, stream),
                )
            ]
            contiguous, gaps = _gaps(seqs)
            out.append(InboundStream(s, stream, len(seqs), seqs[-1], contiguous, gaps))
        return out


def stream_contiguous(store: Store, sender: str, stream: str) -> int:
    """Highest n such that seqs 1..n of ``sender``'s ``stream`` all arrived."""
    for s in inbound_streams(store, sender):
        if s.stream == stream:
            return s.contiguous
    return 0


@dataclass(frozen=True)
class Held:
    """A claim the receiver holds, and the audit entry it holds for it."""

    message_id: str
    audit_seq: int
    audit_hash: str | None  # None when that audit entry is no longer there


def held(store: Store, sender: str, identities: Sequence[str]) -> dict[str, Held]:
    """Which of ``identities`` (from ``sender``) the inbox holds."""
    found: dict[str, Held] = {}
    with store.read("sync_held") as tx:
        for i in range(0, len(identities), _CHUNK):
            chunk = list(identities[i : i + _CHUNK])
            marks = ", ".join("?" for _ in chunk)
            for mid, seq, hash_ in tx.all(
                "SELECT i.message_id, i.audit_seq, a.hash FROM inbox i"
                " LEFT JOIN audit a ON a.seq = i.audit_seq"
                f" WHERE i.sender=? AND i.message_id IN ({marks})",
                (sender, *chunk),
            ):
                found[mid] = Held(mid, int(seq), hash_)
    return found


@dataclass(frozen=True)
class OutboundSummary:
    """What the last reconciliation of a link found (see ``bridge sync status``)."""

    link: str
    confirmed_seq: int
    checked: datetime
    compared: int
    missing: int
    resent: int
    mismatched: int
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "confirmed_seq": self.confirmed_seq,
            "checked": format_time(self.checked),
            "compared": self.compared,
            "missing": self.missing,
            "resent": self.resent,
            "receipts_naming_absent_audit_entries": self.mismatched,
            "detail": self.detail,
        }


def save_outbound(store: Store, summary: OutboundSummary) -> None:
    with store.transaction("sync_save_outbound") as tx:
        tx.execute(
            "INSERT INTO sync_outbound (link, confirmed_seq, checked, compared, missing, resent,"
            " mismatched, detail) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (link) DO UPDATE SET"
            " confirmed_seq=excluded.confirmed_seq, checked=excluded.checked,"
            " compared=excluded.compared, missing=excluded.missing, resent=excluded.resent,"
            " mismatched=excluded.mismatched, detail=excluded.detail",
            (
                summary.link,
                summary.confirmed_seq,
                format_time(summary.checked),
                summary.compared,
                summary.missing,
                summary.resent,
                summary.mismatched,
                summary.detail,
            ),
        )


def outbound_summary(store: Store, link: str) -> OutboundSummary | None:
    with store.read("sync_outbound") as tx:
        r = tx.one(
            "SELECT link, confirmed_seq, checked, compared, missing, resent, mismatched, detail"
            " FROM sync_outbound WHERE link=?",
            (link,),
        )
    if r is None:
        return None
    return OutboundSummary(
        r[0], int(r[1]), parse_time(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), r[7]
    )


def outbound_progress(store: Store, link: str) -> dict[str, int]:
    """Highest sequence enqueued, sent at least once, acknowledged, and acknowledged
    without a gap, on ``link``."""
    with store.read("sync_outbound_progress") as tx:
        r = tx.one(
            "SELECT COALESCE(MAX(seq), 0),"
            " COALESCE(MAX(CASE WHEN attempts > 0 OR state <> 'queued' THEN seq END), 0),"
            " COALESCE(MAX(CASE WHEN state = 'acked' THEN seq END), 0),"
            " MIN(CASE WHEN state <> 'acked' THEN seq END)"
            " FROM outbox WHERE link=?",
            (link,),
        )
    enqueued, sent, acked, first_open = (int(r[0]), int(r[1]), int(r[2]), r[3])
    contiguous = enqueued if first_open is None else int(first_open) - 1
    return {"enqueued": enqueued, "sent": sent, "acked": acked, "acked_contiguous": contiguous}


def acked_claims(
    store: Store, link: str, *, after_seq: int = 0, limit: int = _CHUNK
) -> list[tuple[int, str, bytes]]:
    """``(seq, message_id, receipt)`` of acknowledged claims of ``link`` after ``after_seq``."""
    with store.read("sync_acked_claims") as tx:
        return [
            (int(r[0]), r[1], tx.unseal(r[2], context="outbox.receipt") or b"")
            for r in tx.all(
                "SELECT seq, message_id, receipt FROM outbox WHERE link=? AND state='acked'"
                " AND seq>? ORDER BY seq LIMIT ?",
                (link, after_seq, limit),
            )
        ]


__all__ = [
    "Held",
    "InboundStream",
    "OutboundSummary",
    "acked_claims",
    "held",
    "inbound_streams",
    "note_received",
    "outbound_progress",
    "outbound_summary",
    "record_received",
    "save_outbound",
    "stream_contiguous",
]
