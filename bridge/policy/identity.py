"""One patient across identifiers, in memory: which patient pseudonyms name one person.

Pure data structure (a union-find over pseudonyms); the controller fills it from the
store's ``patient_link`` table (:mod:`bridge.ledger.identity`) and from each record it
maps, and the consent registry asks it so a consent recorded under one of a patient's
identifiers is found by any other (a claim that carries only the identity card finds
the consent recorded under the medical-record number).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from bridge.ledger.audit import PSEUDONYM_PREFIX

__all__ = ["ID_CARD_SYSTEM", "IdentityIndex", "id_card_pseudonyms"]

#: The resident ID card number (居民身份证号, GB 11643): one per person, for life.
ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"

_KEY_LENGTH = len(PSEUDONYM_PREFIX) + 32

# The index holds every pseudonym the hospital's records ever linked: one more per stay,
# for as long as the bridge runs. Each is held as its 16 bytes rather than its 35
# characters of text (49 bytes of object instead of 84).
Key = bytes | str


def _key(pseudonym: str) -> Key:
    """How the index holds ``pseudonym``: the 16 bytes of a controller's pseudonym
    (:func:`~bridge.ledger.audit.patient_pseudonym`), or the text itself for any other.
    Only the text that writes those bytes back exactly becomes them (``bytes.fromhex``
    also reads upper case and spaces), so two keys are equal exactly when the
    pseudonyms are."""
    if len(pseudonym) == _KEY_LENGTH and pseudonym.startswith(PSEUDONYM_PREFIX):
        hexdigits = pseudonym[len(PSEUDONYM_PREFIX):]
        try:
            raw = bytes.fromhex(hexdigits)
        except ValueError:
            return pseudonym
        if raw.hex() == hexdigits:
            return raw
    return pseudonym


class IdentityIndex:
    """Pseudonyms linked into persons. ``pseudonym(system, value)`` is the controller's
    keyed patient pseudonym, so the index never keeps identifiers in the clear (the
    controller's function remembers the last few it was asked about, see
    :func:`~bridge.ledger.audit.pseudonymizer`).

    Each person keeps two small sets that the questions asked on every claim need: the
    pseudonyms of its resident ID card numbers, and those under which a consent is
    registered (:meth:`mark`). A question about a person then costs what those sets
    hold, not what the person's whole history of stays does: a patient with hundreds of
    inpatient numbers is asked about as fast as one with a single stay.
    """

    def __init__(self, pseudonym: Callable[[str, str], str]) -> None:
        self.pseudonym = pseudonym
        self._parent: dict[Key, Key] = {}
        self._size: dict[Key, int] = {}  # per person (by its root): how many pseudonyms
        self._cards: dict[Key, set[Key]] = {}  # per person: its ID card pseudonyms
        self._marked: dict[Key, set[str]] = {}  # per person: pseudonyms holding consents
        self.cursor = 0  # the last store link taken in
        self.card_cursor = 0  # the last resident ID card pseudonym taken in

    def note_id_cards(self, pseudonyms: Iterable[str]) -> None:
        """These pseudonyms are of resident ID card numbers (one per person)."""
        for p in pseudonyms:
            k = _key(p)
            self._cards.setdefault(self._root(k), set()).add(k)

    def mark(self, pseudonym: str) -> None:
        """A consent is registered under this pseudonym (see :meth:`marked`)."""
        self._marked.setdefault(self._root(_key(pseudonym)), set()).add(pseudonym)

    def marked(self, pseudonyms: Iterable[str]) -> set[str]:
        """The marked pseudonyms of the persons these pseudonyms belong to."""
        out: set[str] = set()
        for root in {self._root(_key(p)) for p in pseudonyms}:
            out |= self._marked.get(root, set())
        return out

    def two_id_cards(self, pseudonyms: Iterable[str], id_cards: Iterable[str]) -> bool:
        """Do the persons of ``pseudonyms`` together with ``id_cards`` (pseudonyms known
        from a record to be of resident ID card numbers) hold two different ID card
        numbers, that is, two people?"""
        cards = {_key(c) for c in id_cards}
        for root in {self._root(_key(p)) for p in pseudonyms}:
            cards |= self._cards.get(root, set())
        return len(cards) > 1

    def one_person(self, pseudonyms: Sequence[str]) -> bool:
        """Are these pseudonyms all linked into one person already?"""
        if not pseudonyms:
            return True
        root = self._root(_key(pseudonyms[0]))
        return all(self._root(_key(p)) == root for p in pseudonyms[1:])

    def _root(self, p: Key) -> Key:
        """The root of ``p``'s person: the very object the index holds for it (a new
        key equal to it would be kept once more under every pseudonym linked to it)."""
        parent = self._parent.get(p, p)
        while parent != p:
            grand = self._parent.get(parent, parent)
            self._parent[p] = grand
            p, parent = parent, grand
        return parent

    def link(self, pseudonyms: Iterable[str]) -> bool:
        """Join these pseudonyms into one person; True when anything changed."""
        items = list(dict.fromkeys(map(_key, pseudonyms)))
        if len(items) < 2:
            return False
        changed = False
        root = self._root(items[0])
        for p in items[1:]:
            other = self._root(p)
            if other == root:
                continue
            changed = True
            a = self._size.pop(root, 1)
            b = self._size.pop(other, 1)
            # The larger group keeps its root (the paths to it stay short).
            if a < b:
                root, other = other, root
            self._parent[other] = root
            self._parent.setdefault(root, root)
            self._size[root] = a + b
            cards = self._cards.pop(other, None)
            if cards:
                self._cards.setdefault(root, set()).update(cards)
            marked = self._marked.pop(other, None)
            if marked:
                self._marked.setdefault(root, set()).update(marked)
        return changed

    def of_identifiers(self, identifiers: Sequence[tuple[str, str]]) -> list[str]:
        """The pseudonyms of these identifiers, in order."""
        return [self.pseudonym(s, v) for s, v in identifiers]


def id_card_pseudonyms(identifiers: Sequence[tuple[str, str]],
                       pseudonyms: Sequence[str]) -> list[str]:
    """Those of ``pseudonyms`` (of ``identifiers``, in order) that are of resident ID card
    numbers: what :meth:`IdentityIndex.two_id_cards` takes as a record's own."""
    return [p for (system, _), p in zip(identifiers, pseudonyms, strict=True)
            if system == ID_CARD_SYSTEM]
