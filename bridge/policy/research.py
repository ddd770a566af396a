"""Research release: k-anonymity over persons, with generalisation and suppression
(GB/T 39725-2020 §10.2 d and e, Appendix G table G.1 quasi identifiers).

A research link releases a batch, never one record at a time: each record first goes
through :func:`bridge.policy.engine.apply_policy` with the link's de-identification
profile (pseudonyms, year of birth, county-level address, per-person date shift), then
:func:`anonymise` makes the batch k-anonymous over **persons** (§10.2 e counts people,
not stays: one person with five stays is a class of one):

1. every person gets the values of the profile's quasi-identifiers
   (``k_anonymity.quasi``), generalised to a level of the ladder below;
2. the lowest level at which at most ``max_suppressed`` of the persons fall in classes
   of fewer than ``k`` persons is chosen (the top level when none is);
3. the persons of smaller classes are suppressed, every record of theirs with them, and
   the report says which records and why.

Generalisation ladder (Appendix G: 出生日期 and 住址 are quasi identifiers to generalise):

=====  ==============================  ==========================================
level  birth                           address
=====  ==============================  ==========================================
0      year of birth                   province, prefecture (city), county
1      five-year age band              province, prefecture
2      ten-year age band               province
=====  ==============================  ==========================================

An age of 89 or more is always top-coded as the band "89 and over" and the year of birth
is removed (at every level), since the year of birth of the very old identifies them.
An age band travels as the extension ``urn:ws-fhir-bridge:StructureDefinition/age-band``
(valueRange in years) on the Patient, in place of ``birthDate``.

Pure code over plain data: no keys, no store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson

from bridge.policy.transforms import path_values, resource_values

__all__ = [
    "AGE_BAND_URL",
    "LEVELS",
    "TOP_AGE",
    "ReleaseItem",
    "ReleaseReport",
    "age_at",
    "anonymise",
    "bundle_of",
    "held",
]

AGE_BAND_URL = "urn:ws-fhir-bridge:StructureDefinition/age-band"
TOP_AGE = 89
LEVELS = (
    ("year of birth", "county"),
    ("5-year age band", "prefecture"),
    ("10-year age band", "province"),
)
_ADDRESS_DROP = ({"postalCode", "line", "text"},
                 {"postalCode", "line", "text", "district"},
                 {"postalCode", "line", "text", "district", "city"})


@dataclass(frozen=True)
class ReleaseItem:
    """One record ready for release: its position in the batch, the bundle as the
    profile released it, the person it is about (a keyed pseudonym) and the person's
    age in years at the time of care (None when unknown).

    The bundle is a dict, or its JSON text (see :func:`held`): a batch of thousands of
    bundles held as objects is rescanned by the cyclic garbage collector over and over
    while the batch grows, and as text it is not. :func:`anonymise` gives back what it
    was given, text for text."""

    index: int
    bundle: dict[str, Any] | bytes
    person: str
    age: int | None
    # Of a bundle held as text: its one Patient's JSON text, as it stands within it
    # (see :meth:`as_text`). anonymise then reads the Patient alone.
    patient: bytes | None = None

    @classmethod
    def as_text(
        cls, index: int, bundle: dict[str, Any], person: str, age: int | None
    ) -> ReleaseItem:
        """An item holding ``bundle`` as JSON text (see :func:`held`), with the text of its
        one Patient when it has exactly one."""
        text = held(bundle)
        if not isinstance(text, bytes):
            return cls(index, text, person, age)
        return cls(index, text, person, age, _patient_text(bundle, text))


def held(bundle: dict[str, Any]) -> dict[str, Any] | bytes:
    """``bundle`` as a release batch holds it: its JSON text (the same bundle again when
    read back), or the bundle itself when it is not plain JSON."""
    try:
        return orjson.dumps(bundle)
    except (TypeError, orjson.JSONEncodeError):
        return bundle


def bundle_of(item: ReleaseItem) -> dict[str, Any]:
    """The item's bundle as a dict (read back from its text when held as text)."""
    return orjson.loads(item.bundle) if isinstance(item.bundle, bytes) else item.bundle


@dataclass
class ReleaseReport:
    """What a release did, in counts, levels and record positions (never values)."""

    k: int
    quasi: tuple[str, ...]
    records_in: int = 0
    persons_in: int = 0
    level: int = 0
    k_achieved: int = 0
    records_released: int = 0
    persons_released: int = 0
    top_coded: int = 0
    suppressed: list[tuple[int, str]] = field(default_factory=list)  # (record index, why)
    refused: list[tuple[int, str]] = field(default_factory=list)  # before anonymising
    # Released records whose message was queued already (an earlier release, or a record
    # repeated in the batch): sent once, not again. Set by a release that sends.
    already_queued: list[int] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)  # message identities queued now

    def to_dict(self) -> dict[str, Any]:
        return {
            "k_required": self.k,
            "k_achieved": self.k_achieved,
            "quasi_identifiers": list(self.quasi),
            "generalisation_level": self.level,
            "generalisation": {"birth": LEVELS[self.level][0], "address": LEVELS[self.level][1]},
            "records_in": self.records_in,
            "persons_in": self.persons_in,
            "records_released": self.records_released,
            "persons_released": self.persons_released,
            "ages_top_coded": self.top_coded,
            "records_refused": [{"record": i, "why": w} for i, w in self.refused],
            "records_suppressed": [{"record": i, "why": w} for i, w in self.suppressed],
            "records_already_queued": list(self.already_queued),
            "messages_queued": list(self.queued),
        }

    def lines(self) -> list[str]:
        out = [
            f"k required {self.k}, k achieved {self.k_achieved} (persons)",
            f"quasi-identifiers: {', '.join(self.quasi)}",
            (f"generalisation level {self.level}: {LEVELS[self.level][0]}, "
             f"address to {LEVELS[self.level][1]}; ages of {TOP_AGE} and over top-coded "
             f"({self.top_coded} records)"),
            (f"records: {self.records_in} in, {self.records_released} released, "
             f"{len(self.suppressed)} suppressed, {len(self.refused)} refused"),
            f"persons: {self.persons_in} in, {self.persons_released} released",
        ]
        out.extend(f"  record {i}: refused: {w}" for i, w in self.refused)
        out.extend(f"  record {i}: suppressed: {w}" for i, w in self.suppressed)
        if self.queued or self.already_queued:
            out.append(f"messages queued: {len(self.queued)}; released records already"
                       f" queued before (sent once): {len(self.already_queued)}")
        return out


def age_at(birth: str | None, when: str | None) -> int | None:
    """Whole years between two FHIR dates (``YYYY-MM-DD...``); None when unknown."""
    if not birth or not when or len(birth) < 4 or len(when) < 10:
        return None
    try:
        b = date.fromisoformat(birth[:10]) if len(birth) >= 10 else date(int(birth[:4]), 7, 1)
        w = date.fromisoformat(when[:10])
    except ValueError:
        return None
    return w.year - b.year - ((w.month, w.day) < (b.month, b.day))


def _band(age: int | None, level: int) -> str:
    if age is None:
        return "unknown"
    if age >= TOP_AGE:
        return f"{TOP_AGE}+"
    width = 5 if level == 1 else 10
    low = age // width * width
    return f"{low}-{min(low + width - 1, TOP_AGE - 1)}"


def _values(bundle: dict[str, Any], quasi: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The values of each quasi-identifier path in the bundle, before generalisation."""
    return tuple(path_values(bundle, path) for path in quasi)


# What generalising does to a quasi-identifier path's values: the birth date becomes an
# age band, an address part is dropped at the levels that drop it, anything else stays.
_BIRTH, _ADDRESS, _KEPT = range(3)


def _kinds(quasi: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """(kind, address leaf) of each quasi-identifier path, worked out once per batch."""
    out: list[tuple[int, str]] = []
    for path in quasi:
        leaf = path.rsplit(".", 1)[-1]
        if path == "Patient.birthDate":
            out.append((_BIRTH, leaf))
        elif path.startswith("Patient.address."):
            out.append((_ADDRESS, leaf))
        else:
            out.append((_KEPT, leaf))
    return tuple(out)


def _quasi(
    values: tuple[tuple[str, ...], ...], age: int | None, quasi: Sequence[str], level: int,
    kinds: tuple[tuple[int, str], ...] | None = None,
) -> tuple[Any, ...]:
    """A person's quasi-identifiers generalised to ``level``, from their values
    (``kinds``: :func:`_kinds` of ``quasi``, when the caller has it)."""
    out: list[Any] = []
    drop = _ADDRESS_DROP[level]
    for (kind, leaf), found in zip(kinds or _kinds(quasi), values, strict=True):
        if kind == _BIRTH:
            if level == 0 and (age is None or age < TOP_AGE):
                out.append(found)
            else:
                out.append(_band(age, max(level, 1)))
        elif kind == _ADDRESS and leaf in drop:
            out.append(())
        else:
            out.append(found)
    return tuple(out)


def _generalise(bundle: dict[str, Any], age: int | None, level: int) -> bool:
    """Rewrite the Patient of a released bundle to ``level`` in place; True when the age
    was top-coded."""
    top = age is not None and age >= TOP_AGE
    for entry in bundle.get("entry") or ():
        patient = entry.get("resource")
        if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
            continue
        if level > 0 or top:
            patient.pop("birthDate", None)
            patient.pop("_birthDate", None)
            band = _band(age, max(level, 1))
            if band != "unknown":
                low, _, high = band.replace("+", "-").partition("-")
                value: dict[str, Any] = {"low": {"value": int(low), "unit": "a",
                                                 "system": "http://unitsofmeasure.org",
                                                 "code": "a"}}
                if high:
                    value["high"] = {"value": int(high), "unit": "a",
                                     "system": "http://unitsofmeasure.org", "code": "a"}
                patient["extension"] = [
                    *(e for e in patient.get("extension") or () if e.get("url") != AGE_BAND_URL),
                    {"url": AGE_BAND_URL, "valueRange": value},
                ]
        drop = _ADDRESS_DROP[level]
        addresses = []
        for address in patient.get("address") or ():
            kept = {k: v for k, v in address.items() if k not in drop}
            if kept:
                addresses.append(kept)
        if addresses:
            patient["address"] = addresses
        else:
            patient.pop("address", None)
    return top


def _patient_text(bundle: dict[str, Any], text: bytes) -> bytes | None:
    """The JSON text of the bundle's one Patient within the bundle's ``text``, or None
    when there is not exactly one Patient or its text is not found exactly once. orjson
    writes a value the same way wherever it stands, so the Patient's own text is the
    part of the bundle's text that holds it."""
    found = [
        e["resource"] for e in bundle.get("entry") or ()
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Patient"
    ]
    if len(found) != 1:
        return None
    own = orjson.dumps(found[0])
    return own if text.count(own) == 1 else None


def _with_bundle(item: ReleaseItem, bundle: bytes) -> ReleaseItem:
    """``item`` with another bundle: what ``dataclasses.replace`` gives, made by the
    constructor (replace looks the fields up again for every item of a batch)."""
    return ReleaseItem(item.index, bundle, item.person, item.age, item.patient)


def anonymise(
    items: Sequence[ReleaseItem],
    *,
    k: int,
    quasi: Sequence[str],
    max_suppressed: float = 0.05,
    report: ReleaseReport | None = None,
) -> tuple[list[ReleaseItem], ReleaseReport]:
    """Make a batch k-anonymous over persons (see the module docstring).

    Returns the released items and the report: a bundle held as a dict is generalised in
    place, one held as text comes back as the generalised text.
    """
    if k < 2:
        raise ValueError("k is at least 2")
    report = report or ReleaseReport(k=k, quasi=tuple(quasi))
    report.records_in = len(items) + len(report.refused)
    # Each person's quasi-identifier values, read once from their first record; a level
    # only generalises them. Of a bundle held as text, the text of its one Patient is
    # kept: generalising rewrites that part of the text alone.
    values: dict[str, tuple[tuple[tuple[str, ...], ...], int | None]] = {}
    patients: dict[int, bytes] = {}
    # The Patients read for their person's values, by position: reading only, so the
    # release below generalises them instead of reading their text again.
    parsed: dict[int, dict[str, Any]] = {}
    patient_only = all(path.startswith("Patient.") for path in quasi)
    below = [path.split(".")[1:] for path in quasi]
    for position, item in enumerate(items):
        if isinstance(item.bundle, bytes):
            own = item.patient
            if own is not None and item.bundle.count(own) != 1:
                own = None
            if own is not None and patient_only:
                patients[position] = own
                if item.person not in values:
                    parsed[position] = patient = orjson.loads(own)
                    values[item.person] = (
                        tuple(resource_values(patient, segs) for segs in below), item.age)
                continue
            bundle = orjson.loads(item.bundle)
            found = own or _patient_text(bundle, item.bundle)
            if found is not None:
                patients[position] = found
        elif item.person in values:
            continue
        else:
            bundle = item.bundle
        if item.person not in values:
            values[item.person] = (_values(bundle, quasi), item.age)
    report.persons_in = len(values)
    kinds = _kinds(quasi)
    # The classes at the level chosen are those of the last level tried: the first that
    # suppresses few enough persons, or the top level when none does.
    for chosen in range(len(LEVELS)):
        classes = {p: _quasi(v, age, quasi, chosen, kinds) for p, (v, age) in values.items()}
        sizes = Counter(classes.values())
        small = sum(1 for c in classes.values() if sizes[c] < k)
        if not values or small <= max_suppressed * len(values):
            break
    report.level = chosen
    released: list[ReleaseItem] = []
    for position, item in enumerate(items):
        size = sizes[classes[item.person]]
        if size < k:
            report.suppressed.append((item.index, (
                f"its person is in a class of {size} person{'s' if size != 1 else ''} on the"
                f" quasi-identifiers at level {chosen} (fewer than {k})")))
            continue
        if position in patients:
            before = patients[position]
            patient = parsed.pop(position, None) or orjson.loads(before)
            top = _generalise({"entry": [{"resource": patient}]}, item.age, chosen)
            after = orjson.dumps(patient)
            if after != before:
                assert isinstance(item.bundle, bytes)
                item = _with_bundle(item, item.bundle.replace(before, after, 1))
        elif isinstance(item.bundle, bytes):
            bundle = orjson.loads(item.bundle)
            top = _generalise(bundle, item.age, chosen)
            item = _with_bundle(item, orjson.dumps(bundle))
        else:
            top = _generalise(item.bundle, item.age, chosen)
        if top:
            report.top_coded += 1
        released.append(item)
    kept = {i.person for i in released}
    report.records_released = len(released)
    report.persons_released = len(kept)
    report.k_achieved = min((sizes[classes[p]] for p in kept), default=0)
    return released, report
