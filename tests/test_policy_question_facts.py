"""The consent question's patient identifiers and data period, read in one pass over a
collection (what every disclosure asks), are what ``patient_identifiers`` and
``data_period`` give one by one, and refuse alike: for mapped stays and for collections
in any order, with odd entries, no Patient, two Patients, or a Patient without
identifiers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.errors import ConsentDenied
from bridge.mapping import map_record
from bridge.policy.engine import _question_facts, data_period, patient_identifiers
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


def _separately(collection: dict[str, Any]) -> Any:
    try:
        return patient_identifiers(collection), data_period(collection)
    except ConsentDenied as exc:
        return ("refused", str(exc), exc.location)


def _together(collection: dict[str, Any]) -> Any:
    try:
        return _question_facts(collection)
    except ConsentDenied as exc:
        return ("refused", str(exc), exc.location)


def test_mapped_stays() -> None:
    for record in inpatient_records(60, seed=21):
        collection = map_record(record, now=NOW)
        assert _together(collection) == _separately(collection)


_DAYS = st.sampled_from(["2025-01-02", "2025-03-04T10:00:00+08:00", "2024-12-31", "bad",
                         "2025-02-30", None, 7])
_PERIOD = st.fixed_dictionaries({}, optional={"start": _DAYS, "end": _DAYS})
_IDENT = st.fixed_dictionaries({}, optional={
    "system": st.sampled_from(["urn:oid:2.16.156.10011.1.3", "", None, 3]),
    "value": st.sampled_from(["110101199003074512", "", None, "BA01"])})
_RESOURCE = st.one_of(
    st.fixed_dictionaries({"resourceType": st.just("Patient")},
                          optional={"identifier": st.lists(st.one_of(_IDENT, st.just("x")),
                                                           max_size=3)}),
    st.fixed_dictionaries({"resourceType": st.sampled_from(["Encounter", "Claim"])},
                          optional={"period": st.one_of(_PERIOD, st.just("x")),
                                    "billablePeriod": _PERIOD}),
    st.fixed_dictionaries({"resourceType": st.sampled_from(["Condition", "Coverage"])}),
)
_ENTRY = st.one_of(st.fixed_dictionaries({"resource": _RESOURCE}), st.just({}),
                   st.just("not an entry"), st.just({"resource": "x"}))


@settings(max_examples=400, deadline=None)
@given(st.lists(_ENTRY, max_size=6))
def test_any_collection(entries: list[Any]) -> None:
    collection = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    assert _together(collection) == _separately(collection)
