"""Sync tracking between the two sides, written once for both stores.

Receiving side
    Every claim that arrives with a stream and sequence number (PROTOCOL §8a) is
    recorded in ``sync_inbound`` in the transaction that stores it. The numbers of one
    sender's stream are consecutive at the sender, so a number missing below the
    highest one received is a claim that has not arrived (yet): :func:`inbound_streams`
    reports these gaps. :func:`held` answers which identities of a sender the inbox
    holds, with the audit entry each one's receipt names.

    A claim that arrives as a number the stream already brought under another message
    identity (a sender restored from a backup numbered a new claim again) is a
    **collision**: the claim is stored on its identity as any other, and its number is
    kept beside the first (``sync_inbound.others``) rather than counted as the number
    already held, so
    :func:`inbound_streams` reports it (PROTOCOL P-SYNC-8).

Sending side
    ``sync_outbound`` keeps, per outbound link, the partner's last signed summary (the
    highest sequence it holds without a gap, and the highest it holds at all) and what
    the last reconciliation found. The partner's highest is the floor of the link's
    numbering: the stores number a new claim after both their own highest and it, so a
    sender restored from a backup never gives a number again that the partner holds
    (P-SYNC-7). :func:`reused_numbers` finds the numbers given again nonetheless (a
    claim enqueued while the reconciliation that learnt the partner's highest ran).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from bridge.ledger.audit import format_time, parse_time

if TYPE_CHECKING:
    from bridge.ledger import Store
    from bridge.ledger.portable import Tx

_CHUNK = 500


def record_received(
    tx: Tx, *, sender: str, stream: str, seq: int, message_id: str, now: datetime
) -> bool:
    """Remember that ``message_id`` arrived as ``seq`` of ``sender``'s ``stream``.

    Returns False when that number is already held under another message identity: the
    arrival is then kept as a collision of the number, not as the number itself.
    """
    row = tx.one(
        "SELECT message_id, others FROM sync_inbound WHERE sender=? AND stream=? AND seq=?",
        (sender, stream, seq),
    )
    if row is None:
        tx.execute(
            "INSERT INTO sync_inbound (sender, stream, seq, message_id, received)"
            " VALUES (?,?,?,?,?) ON CONFLICT (sender, stream, seq) DO NOTHING",
            (sender, stream, seq, message_id, format_time(now)),
        )
        return True
    if row[0] == message_id:
        return True  # the same claim again (a resend carries the same numbers)
    others = orjson.loads(row[1]) if row[1] else []
    if message_id not in others:
        tx.execute(
            "UPDATE sync_inbound SET others=? WHERE sender=? AND stream=? AND seq=?",
            (orjson.dumps([*others, message_id]).decode(), sender, stream, seq),
        )
    return False


def note_received(
    store: Store, *, sender: str, stream: str, seq: int, message_id: str, now: datetime
) -> bool:
    """:func:`record_received` in a transaction of its own (a claim already held)."""
    with store.transaction("sync_note_received", durable=False) as tx:
        return record_received(
            tx, sender=sender, stream=stream, seq=seq, message_id=message_id, now=now
        )


@dataclass(frozen=True)
class InboundStream:
    """What one sender's stream has brought: how many, up to where, and what is missing."""

    sender: str
    stream: str
    received: int  # claims that arrived with a number, each identity counted once
    highest: int
    contiguous: int  # every seq 1..contiguous is here
    gaps: tuple[tuple[int, int], ...]  # missing ranges (first, last) below ``highest``
    #: Numbers that arrived under more than one message identity (P-SYNC-8).
    collisions: tuple[int, ...] = ()

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
            "collisions": list(self.collisions),
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
            rows = tx.all(
                "SELECT seq, others FROM sync_inbound WHERE sender=? AND stream=? ORDER BY seq",
                (s, stream),
            )
            seqs = [int(r[0]) for r in rows]
            twice = [(int(r[0]), len(orjson.loads(r[1]))) for r in rows if r[1]]
            contiguous, gaps = _gaps(seqs)
            received = len(seqs) + sum(n for _seq, n in twice)
            out.append(
                InboundStream(
                    s, stream, received, seqs[-1], contiguous, gaps, tuple(q for q, _n in twice)
                )
            )
        return out


def inbound_stream(store: Store, sender: str, stream: str) -> InboundStream | None:
    """What ``sender``'s ``stream`` has brought, None when nothing yet."""
    return next((s for s in inbound_streams(store, sender) if s.stream == stream), None)


def stream_contiguous(store: Store, sender: str, stream: str) -> int:
    """Highest n such that seqs 1..n of ``sender``'s ``stream`` all arrived."""
    found = inbound_stream(store, sender, stream)
    return found.contiguous if found is not None else 0


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
    #: The highest number the partner holds on the link (its ``highest``, or
    #: ``confirmed_seq`` from a partner that does not say): new claims come after it.
    partner_highest: int = 0
    #: This side's highest number on the link when the summary was saved (written by
    #: :func:`save_outbound`); numbers above it up to ``partner_highest`` were not
    #: given by this store, and a claim given one since reuses it.
    own_highest: int = 0
    #: Numbers the partner holds under more than one message identity (P-SYNC-8).
    collisions: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "confirmed_seq": self.confirmed_seq,
            "partner_highest": self.partner_highest,
            "own_highest_then": self.own_highest,
            "collisions": ranges(self.collisions),
            "checked": format_time(self.checked),
            "compared": self.compared,
            "missing": self.missing,
            "resent": self.resent,
            "receipts_naming_absent_audit_entries": self.mismatched,
            "detail": self.detail,
        }


def ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Sorted numbers as ``[first, last]`` runs."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def spans(runs: Iterable[Sequence[int]]) -> str:
    """``[first, last]`` runs as text: ``5-6, 9``."""
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def save_outbound(store: Store, summary: OutboundSummary) -> OutboundSummary:
    """Keep the partner's summary of ``summary.link``; from now on the link's new claims
    are numbered after ``summary.partner_highest``. Returns the summary as saved (with
    this side's highest number on the link at that moment)."""
    with store.transaction("sync_save_outbound") as tx:
        # Read in the transaction that raises the floor: a number above it that the
        # outbox holds later was given after the partner was known to hold it.
        own = int(
            tx.one("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE link=?", (summary.link,))[0]
        )
        saved = OutboundSummary(
            summary.link,
            summary.confirmed_seq,
            summary.checked,
            summary.compared,
            summary.missing,
            summary.resent,
            summary.mismatched,
            summary.detail,
            max(summary.partner_highest, summary.confirmed_seq),
            own,
            tuple(sorted(set(summary.collisions))),
        )
        tx.execute(
            "INSERT INTO sync_outbound (link, confirmed_seq, checked, compared, missing, resent,"
            " mismatched, detail, partner_highest, own_highest, collisions)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (link) DO UPDATE SET"
            " confirmed_seq=excluded.confirmed_seq, checked=excluded.checked,"
            " compared=excluded.compared, missing=excluded.missing, resent=excluded.resent,"
            " mismatched=excluded.mismatched, detail=excluded.detail,"
            " partner_highest=excluded.partner_highest, own_highest=excluded.own_highest,"
            " collisions=excluded.collisions",
            (
                saved.link,
                saved.confirmed_seq,
                format_time(saved.checked),
                saved.compared,
                saved.missing,
                saved.resent,
                saved.mismatched,
                saved.detail,
                saved.partner_highest,
                saved.own_highest,
                orjson.dumps(ranges(saved.collisions)).decode() if saved.collisions else None,
            ),
        )
    return saved


def _expand(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    return tuple(n for a, b in orjson.loads(text) for n in range(int(a), int(b) + 1))


def outbound_summary(store: Store, link: str) -> OutboundSummary | None:
    with store.read("sync_outbound") as tx:
        r = tx.one(
            "SELECT link, confirmed_seq, checked, compared, missing, resent, mismatched, detail,"
            " partner_highest, own_highest, collisions FROM sync_outbound WHERE link=?",
            (link,),
        )
    if r is None:
        return None
    return OutboundSummary(
        r[0], int(r[1]), parse_time(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), r[7],
        int(r[8]), int(r[9]), _expand(r[10]),
    )


def reused_numbers(store: Store, summary: OutboundSummary) -> list[int]:
    """Numbers of the link given to claims after the partner was known to hold them:
    above this side's highest when the summary was saved, up to the partner's highest."""
    if summary.partner_highest <= summary.own_highest:
        return []
    with store.read("sync_reused_numbers") as tx:
        return [
            int(r[0])
            for r in tx.all(
                "SELECT seq FROM outbox WHERE link=? AND seq>? AND seq<=? ORDER BY seq",
                (summary.link, summary.own_highest, summary.partner_highest),
            )
        ]


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
    "inbound_stream",
    "inbound_streams",
    "note_received",
    "outbound_progress",
    "outbound_summary",
    "ranges",
    "record_received",
    "reused_numbers",
    "save_outbound",
    "spans",
    "stream_contiguous",
]
