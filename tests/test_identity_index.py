"""One patient across identifiers: consents and ID card numbers follow every link,
whichever side of a merge they were noted on, and an index put in place learns them."""

from __future__ import annotations

import copy
import gc
import hashlib
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from bridge.errors import ConsentDenied
from bridge.ledger.audit import patient_pseudonym
from bridge.policy.consent import ConsentRegistry, build_consent
from bridge.policy.identity import ID_CARD_SYSTEM, IdentityIndex

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
MRN = "urn:oid:2.16.156.10011.1.13"
STAY = "urn:oid:2.16.156.10011.1.12"


KEY = b"identity-index-test-key-32-bytes"


def pseudonym(system: str, value: str) -> str:
    """A controller's pseudonym ("pp:" and 32 hex digits), as the bridge makes it."""
    return patient_pseudonym(KEY, system, value)


def text_pseudonym(system: str, value: str) -> str:
    """Any other text (the index takes pseudonyms of any form)."""
    return "p:" + hashlib.sha256(f"{system}|{value}".encode()).hexdigest()[:24]


def consent(cid: str, system: str, value: str) -> dict:
    return build_consent(
        consent_id=cid, patient_system=system, patient_value=value, recipient="insurer-b",
        purposes=["HPAYMT"], start=NOW - timedelta(days=30), end=NOW + timedelta(days=30),
        hospital_partner_id="hospital-a")


def link(index: IdentityIndex, *identifiers: tuple[str, str]) -> None:
    index.link(index.of_identifiers(list(identifiers)))


def ids(records: list) -> set[str]:
    return {r.id for r in records}


@pytest.mark.parametrize("make", [pseudonym, text_pseudonym])
@pytest.mark.parametrize("consent_first", [True, False])
def test_a_consent_is_found_by_every_stay_of_a_patient_with_many(
        consent_first: bool, make: Callable[[str, str], str]) -> None:
    index = IdentityIndex(make)
    registry = ConsentRegistry(index)
    if consent_first:
        registry.put(consent("c-1", MRN, "M1"), now=NOW)
    # Many stays joined one by one, then a second group of stays (its own, larger,
    # history) joined to the first through one more record: the group holding the
    # consent is the smaller one in that last merge.
    for n in range(5):
        link(index, (MRN, "M1"), (STAY, f"ZY-a{n}"))
    for n in range(12):
        link(index, (STAY, "ZY-b0"), (STAY, f"ZY-b{n + 1}"))
    link(index, (STAY, "ZY-b7"), (STAY, "ZY-a3"))
    if not consent_first:
        registry.put(consent("c-1", MRN, "M1"), now=NOW)
    for stay in ("ZY-a0", "ZY-a4", "ZY-b0", "ZY-b12"):
        assert ids(registry.for_patient([(STAY, stay)])) == {"c-1"}, stay
    # Someone never linked to the patient finds nothing.
    assert registry.for_patient([(STAY, "ZY-other")]) == []
    assert index.one_person(index.of_identifiers([(MRN, "M1"), (STAY, "ZY-b12")]))
    assert not index.one_person(index.of_identifiers([(MRN, "M1"), (STAY, "ZY-other")]))


def test_two_id_card_numbers_are_seen_across_a_merge_either_way() -> None:
    index = IdentityIndex(pseudonym)
    registry = ConsentRegistry(index)
    link(index, (ID_CARD_SYSTEM, "110101199001011234"), (MRN, "M1"))
    index.note_id_cards(index.of_identifiers([(ID_CARD_SYSTEM, "110101199001011234")]))
    for n in range(6):  # the other person's group is the larger one
        link(index, (ID_CARD_SYSTEM, "110101198002023456"), (STAY, f"ZY-{n}"))
    index.note_id_cards(index.of_identifiers([(ID_CARD_SYSTEM, "110101198002023456")]))
    one, other = index.of_identifiers([(MRN, "M1")]), index.of_identifiers([(STAY, "ZY-3")])
    assert not index.two_id_cards(one, [])
    assert not index.two_id_cards(other, [])
    assert index.two_id_cards(one + other, [])
    # Once a bad record has joined them, nobody's consent covers either.
    link(index, (MRN, "M1"), (STAY, "ZY-0"))
    assert index.two_id_cards(other, [])
    registry.put(consent("c-1", MRN, "M1"), now=NOW)
    with pytest.raises(ConsentDenied):
        registry.for_patient([(STAY, "ZY-5")])


def test_an_index_put_in_place_learns_the_consents_registered_meanwhile() -> None:
    real = IdentityIndex(pseudonym)
    registry = ConsentRegistry(real)
    registry.put(consent("c-1", MRN, "M1"), now=NOW)
    # A dry run works on a copy; a consent arrives meanwhile and lands in the copy.
    registry.identity = copy.deepcopy(real)
    registry.put(consent("c-2", MRN, "M2"), now=NOW)
    registry.identity = real
    link(real, (MRN, "M2"), (STAY, "ZY-9"))
    link(real, (MRN, "M1"), (STAY, "ZY-1"))
    assert ids(registry.for_patient([(STAY, "ZY-9")])) == {"c-2"}
    assert ids(registry.for_patient([(STAY, "ZY-1")])) == {"c-1"}


def test_a_registry_given_an_index_later_finds_its_consents_through_it() -> None:
    registry = ConsentRegistry()
    registry.put(consent("c-1", ID_CARD_SYSTEM, "110101199001011234"), now=NOW)
    index = IdentityIndex(pseudonym)
    link(index, (ID_CARD_SYSTEM, "110101199001011234"), (MRN, "M1"))
    registry.identity = index
    assert ids(registry.for_patient([(MRN, "M1")])) == {"c-1"}
    # The consent's ID card number is known as one: a second one is another person.
    with pytest.raises(ConsentDenied):
        registry.for_patient([(MRN, "M1"), (ID_CARD_SYSTEM, "110101198002023456")])


def test_an_id_card_named_by_a_consent_during_a_dry_run_is_known_after_it() -> None:
    real = IdentityIndex(pseudonym)
    registry = ConsentRegistry(real)
    registry.identity = copy.deepcopy(real)
    registry.put(consent("c-1", ID_CARD_SYSTEM, "110101199001011234"), now=NOW)
    registry.identity = real
    link(real, (ID_CARD_SYSTEM, "110101199001011234"), (MRN, "M1"))
    with pytest.raises(ConsentDenied):
        registry.for_patient([(MRN, "M1"), (ID_CARD_SYSTEM, "110101198002023456")])


def test_pseudonyms_that_differ_only_in_spelling_are_two_people() -> None:
    """The index holds a controller's pseudonym as its 16 bytes: a text that reads as
    the same bytes (upper-case hex, spaces) is another pseudonym, not the same one."""
    index = IdentityIndex(pseudonym)
    a = pseudonym(MRN, "A1")
    b = pseudonym(STAY, "ZY1")
    index.link([a, b])
    upper = "pp:" + a[3:].upper()
    spaced = "pp:" + a[3:5] + " " + a[6:]
    assert upper != a and index.one_person([a, b])
    assert not index.one_person([upper, b]) and not index.one_person([spaced, b])
    index.mark(a)
    assert index.marked([b]) == {a}
    assert index.marked([upper]) == set() and index.marked([spaced]) == set()
    # A card noted under another spelling is another card: two people.
    index.note_id_cards([a])
    assert not index.two_id_cards([b], [a])
    assert index.two_id_cards([b], [upper])


def test_a_stay_costs_the_index_less_than_its_pseudonym_as_text() -> None:
    """Every stay adds one pseudonym for as long as the bridge runs (a hospital has
    hundreds of thousands a year). The index holds each as 16 bytes, and the person's
    root once, however many claims computed it again."""
    index = IdentityIndex(pseudonym)
    first = pseudonym(STAY, "ZY-first")
    index.link([pseudonym(ID_CARD_SYSTEM, "110101199003070012"), first])
    gc.collect()
    tracemalloc.start()
    n = 40_000
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            # Each claim computes the patient's pseudonyms afresh, as a bridge does.
            index.link([pseudonym(ID_CARD_SYSTEM, "110101199003070012"),
                        pseudonym(STAY, f"ZY{i:08d}")])
        gc.collect()
        per_stay = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    # A pseudonym's text is a 35-character str (84 bytes), and a str-keyed dict entry
    # 16 bytes more: held as text, a stay would cost at least 100 bytes.
    assert per_stay < 100, per_stay
    assert index.one_person([first, pseudonym(STAY, "ZY00039999"),
                             pseudonym(ID_CARD_SYSTEM, "110101199003070012")])
