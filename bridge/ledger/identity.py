"""One patient across identifiers, as the store keeps it.

A hospital's record names its patient by several identifiers at once (identity card or
passport, inpatient number, medical-record number, health card). Each pair of them is a
statement by the hospital's own records that both name one person; the store keeps
those statements as pairs of patient pseudonyms (never the identifiers themselves) in
``patient_link``, append-only. Disclosures and consents are audited under one
pseudonym each; following the links answers "everything about this person" by any of
the person's identifiers.

The pseudonyms that are of a resident ID card number are noted apart, in
``patient_id_card``: a person holds one such number for life (GB 11643), so two of
them can never name one person, and a record stating one beside an identifier of a
person who holds another is refused (:class:`bridge.policy.identity.IdentityIndex`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from bridge.ledger.audit import format_time

__all__ = ["id_cards_since", "link_pseudonyms", "link_pseudonyms_many", "linked_pseudonyms",
           "links_since"]


def link_pseudonyms(store: Any, group: Sequence[str], *, now: datetime) -> int:
    """Record that the pseudonyms of ``group`` name one person; return the new links."""
    return link_pseudonyms_many(store, [(group, now)])[0]


def link_pseudonyms_many(store: Any, groups: Sequence[tuple[Sequence[str], datetime]],
                         *, id_cards: Sequence[str] = ()) -> list[int]:
    """:func:`link_pseudonyms` for several ``(group, now)`` in one transaction (a bridge
    taking in several records at once links them in one trip); the new links of each.
    ``id_cards``: pseudonyms of the groups that are of a resident ID card number."""
    if all(len(set(group)) < 2 for group, _now in groups):
        return [0] * len(groups)
    added: list[int] = []
    # Not synced on its own (like the outbox's bookkeeping): whatever follows from a link
    # that anyone is told about (an enqueue, a refusal's audit entry, a release) commits
    # durably after it, and a synced commit carries every earlier one to the disk. A link
    # lost to a power cut was acted on by nobody, and the record that states it makes it
    # again when it comes back.
    with store.transaction("patient_link", durable=False) as tx:
        for group, now in groups:
            members = sorted(set(group))
            added.append(0)
            for other in members[1:]:
                if tx.one("SELECT 1 FROM patient_link WHERE a=? AND b=?",
                          (members[0], other)) is None:
                    tx.execute("INSERT INTO patient_link (a, b, linked) VALUES (?, ?, ?)"
                               " ON CONFLICT DO NOTHING", (members[0], other, format_time(now)))
                    added[-1] += 1
        stamp = format_time(groups[0][1])
        for card in sorted(set(id_cards)):
            tx.execute("INSERT INTO patient_id_card (pseudonym, noted) VALUES (?, ?)"
                       " ON CONFLICT DO NOTHING", (card, stamp))
    return added


def id_cards_since(store: Any, after: int, *, limit: int = 100_000) -> list[tuple[int, str]]:
    """``(seq, pseudonym)`` of the resident ID card pseudonyms noted after ``after``."""
    with store.read("patient_id_card") as tx:
        return [(int(r[0]), str(r[1])) for r in tx.all(
            "SELECT seq, pseudonym FROM patient_id_card WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit))]


def links_since(store: Any, after: int, *, limit: int = 100_000) -> list[tuple[int, str, str]]:
    """``(seq, a, b)`` of the links recorded after sequence number ``after``."""
    with store.read("patient_link") as tx:
        return [(int(r[0]), str(r[1]), str(r[2])) for r in tx.all(
            "SELECT seq, a, b FROM patient_link WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit))]


def linked_pseudonyms(store: Any, start: Iterable[str]) -> list[str]:
    """Every pseudonym linked to any of ``start``, directly or through others."""
    seen = set(start)
    frontier = list(seen)
    with store.read("patient_link") as tx:
        while frontier:
            nxt: list[str] = []
            for p in frontier:
                for (other,) in tx.all(
                    "SELECT b FROM patient_link WHERE a=? UNION SELECT a FROM patient_link"
                    " WHERE b=?", (p, p)):
                    if other not in seen:
                        seen.add(str(other))
                        nxt.append(str(other))
            frontier = nxt
    return sorted(seen)
