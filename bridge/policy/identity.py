"""One patient across identifiers, in memory: which patient pseudonyms name one person.

Pure data structure (a union-find over pseudonyms); the controller fills it from the
store's ``patient_link`` table (:mod:`bridge.ledger.identity`) and from each record it
maps, and the consent registry asks it so a consent recorded under one of a patient's
identifiers is found by any other (a claim that carries only the identity card finds
the consent recorded under the medical-record number).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

__all__ = ["ID_CARD_SYSTEM", "IdentityIndex"]

#: The resident ID card number (居民身份证号, GB 11643): one per person, for life.
ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"


class IdentityIndex:
    """Pseudonyms linked into persons. ``pseudonym(system, value)`` is the controller's
    keyed patient pseudonym, so identifiers are never kept here in the clear."""

    def __init__(self, pseudonym: Callable[[str, str], str]) -> None:
        self.pseudonym = pseudonym
        self._parent: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}
        self._cards: set[str] = set()  # pseudonyms of resident ID card numbers
        self.cursor = 0  # the last store link taken in
        self.card_cursor = 0  # the last resident ID card pseudonym taken in

    def note_id_cards(self, pseudonyms: Iterable[str]) -> None:
        """These pseudonyms are of resident ID card numbers (one per person)."""
        self._cards.update(pseudonyms)

    def two_id_cards(self, linked: Iterable[str], id_cards: Iterable[str]) -> bool:
        """Do ``linked`` (pseudonyms and every one linked to them) and ``id_cards`` (those
        of them known from the record to be of resident ID card numbers) hold two
        different ID card numbers, that is, two people?"""
        cards = set(id_cards)
        cards.update(p for p in linked if p in self._cards)
        return len(cards) > 1

    def _root(self, p: str) -> str:
        parent = self._parent.get(p, p)
        while parent != p:
            grand = self._parent.get(parent, parent)
            self._parent[p] = grand
            p, parent = parent, grand
        return p

    def link(self, pseudonyms: Iterable[str]) -> bool:
        """Join these pseudonyms into one person; True when anything changed."""
        items = list(dict.fromkeys(pseudonyms))
        if len(items) < 2:
            return False
        changed = False
        root = self._root(items[0])
        for p in items[1:]:
            other = self._root(p)
            if other == root:
                continue
            changed = True
            a = self._members.pop(root, {root})
            b = self._members.pop(other, {other})
            # The larger group keeps its root.
            if len(a) < len(b):
                root, other, a, b = other, root, b, a
            self._parent[other] = root
            self._parent.setdefault(root, root)
            self._members[root] = a | b
        return changed

    def of_identifiers(self, identifiers: Sequence[tuple[str, str]]) -> list[str]:
        """The pseudonyms of these identifiers, in order."""
        return [self.pseudonym(s, v) for s, v in identifiers]

    def linked(self, pseudonyms: Iterable[str]) -> frozenset[str]:
        """Every pseudonym of the persons these pseudonyms belong to."""
        out: set[str] = set()
        for p in pseudonyms:
            root = self._root(p)
            out |= self._members.get(root, {p})
        return frozenset(out)
