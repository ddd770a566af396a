"""Fast validation by structure: once a shape is known, only the primitive values decide,
by the models' own validators, and every refusal is full validation's own.

Each case validates a valid resource first, so its shape is known, then a resource of the
very same shape (same keys, list lengths and Python classes) that full validation
refuses: the cache must refuse it with the same error and location.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.errors import ValidationError
from bridge.mapping import map_record
from bridge.messages import wrap_message
from bridge.records.fhir import ValidationCache, validate_resource
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _outcome(fn: Callable[..., None], resource: dict[str, Any]) -> tuple[str, ...] | None:
    try:
        fn(copy.deepcopy(resource))
    except ValidationError as exc:
        return ("refused", exc.location or "?", str(exc))
    except Exception as exc:  # noqa: BLE001 - the models raise bare errors on some inputs
        return ("raised", type(exc).__name__)
    return None


def _claim() -> dict[str, Any]:
    return next(e["resource"] for e in map_record(inpatient_records(1, seed=4)[0], now=NOW)["entry"]
                if e["resource"]["resourceType"] == "Claim")


def _patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1949-02-28",
            "name": [{"use": "official", "text": "李四"}],
            "identifier": [{"system": "urn:oid:2.16.156.10011.1.3", "value": "110101194902280027"}],
            "deceasedBoolean": False}


def _encounter() -> dict[str, Any]:
    return {"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "period": {"start": "2026-03-01T08:30:00+08:00", "end": "2026-03-09T10:00:00+08:00"}}


# (resource, path to a primitive, a value of the same Python class that the models refuse)
SAME_SHAPE_REFUSALS = [
    (_patient, ("birthDate",), "1949-02-30"),                    # no such day
    (_patient, ("birthDate",), "2026-13-01"),                    # no such month
    (_patient, ("birthDate",), "2026-03-01T08:00:00+08:00"),     # a dateTime is not a date
    (_patient, ("id",), "x" * 256),                              # id too long
    (_patient, ("id",), "a b"),                                  # id with a space
    (_patient, ("name", 0, "text"), ""),                         # empty string
    (_patient, ("name", 0, "use"), " official"),                 # code with leading space
    (_patient, ("name", 0, "use"), "a  b"),                      # code with a double space
    (_patient, ("identifier", 0, "value"), ""),
    (_patient, ("gender",), "M"),                                # outside the required value set
    (_encounter, ("period", "start"), "2026-03-01T08:00:00"),    # a time without a zone
    (_encounter, ("period", "end"), "2026-03-01T24:00:00+08:00"),
    (_encounter, ("status",), "done"),                           # outside the required value set
    (_claim, ("total", "value"), float("inf")),
    (_claim, ("total", "value"), float("nan")),
    (_claim, ("total", "value"), 1e400),                         # JSON's overflow is infinite
    (_claim, ("item", 0, "sequence"), 0),                        # positiveInt
    (_claim, ("item", 0, "sequence"), 2**31),                    # beyond a FHIR integer
    (_claim, ("item", 0, "net", "currency"), ""),
    (_claim, ("created",), "20260301T083000"),                   # WS 445 DT15 is not FHIR
]


@pytest.mark.parametrize(("make", "path", "value"), SAME_SHAPE_REFUSALS)
def test_a_known_shape_with_a_bad_primitive_is_refused_as_full_validation_refuses(
        make: Callable[[], dict[str, Any]], path: tuple[Any, ...], value: Any) -> None:
    good = make()
    cache = ValidationCache()
    cache.validate(copy.deepcopy(good))
    bad = copy.deepcopy(good)
    node: Any = bad
    for step in path[:-1]:
        node = node[step]
    assert type(node[path[-1]]) is type(value)
    node[path[-1]] = value
    full = _outcome(validate_resource, bad)
    assert full is not None and full[0] == "refused"
    assert _outcome(cache.validate, bad) == full
    # The refusal taught the cache nothing: the good one still passes, the bad one still fails.
    assert _outcome(cache.validate, good) is None
    assert _outcome(cache.validate, bad) == full


def test_fresh_records_of_known_shapes_are_accepted() -> None:
    cache = ValidationCache()
    for record in inpatient_records(40, seed=1):
        for e in map_record(record, now=NOW)["entry"]:
            cache.validate(e["resource"])
    for record in inpatient_records(40, seed=2):  # other names, ids, dates and amounts
        for i, e in enumerate(map_record(record, now=NOW)["entry"]):
            cache.validate(e["resource"], path=f"Bundle.entry[{i}].resource")


def test_a_nested_resource_type_must_name_the_element_type_even_in_a_known_shape() -> None:
    cache = ValidationCache()
    good = _patient()
    good["identifier"][0]["resourceType"] = "Identifier"
    cache.validate(good)
    bad = copy.deepcopy(good)
    bad["identifier"][0]["resourceType"] = "Coding"
    full = _outcome(validate_resource, bad)
    assert full is not None
    assert _outcome(cache.validate, bad) == full


def test_bundles_validate_whole_with_the_same_verdicts() -> None:
    cache = ValidationCache()
    collections = [map_record(r, now=NOW) for r in inpatient_records(6, seed=5)]
    message = wrap_message(collections[0], message_id="urn:uuid:00000000-0000-4000-8000-000000000001",
                           event="claim-submit", sender="hospital-a", receiver="insurer-b",
                           source_endpoint="https://hospital-a.example/fhir",
                           destination_endpoint="https://insurer-b.example/fhir", now=NOW)
    for bundle in [*collections, message]:
        cache.validate(bundle)
    unknown = copy.deepcopy(message)
    unknown["entry"][2]["resource"]["resourceType"] = "Bogus"
    bad_code = copy.deepcopy(collections[1])
    bad_code["entry"][1]["resource"]["gender"] = "F"
    bad_date = copy.deepcopy(collections[2])
    bad_date["entry"][1]["resource"]["birthDate"] = "1949-02-30"
    no_header_id = copy.deepcopy(message)
    no_header_id["entry"][0]["resource"]["id"] = ""
    for bundle, location in [
            (unknown, "Bundle.entry[2].resource.resourceType"),
            (bad_code, "Bundle.entry[1].resource.gender"),
            (bad_date, "Bundle.entry[1].resource.birthDate"),
            (no_header_id, "Bundle.entry[0].resource.id")]:
        full = _outcome(validate_resource, bundle)
        assert full is not None and full[1] == location
        assert _outcome(cache.validate, bundle) == full


def test_a_required_primitive_given_by_its_extension() -> None:
    """``_created`` with an extension stands in for a missing ``created``; without one the
    element is missing. The verdict comes from the extension's content."""
    cache = ValidationCache()
    with_extension = _claim()
    del with_extension["created"]
    with_extension["_created"] = {"extension": [{"url": "http://example.org/why",
                                                 "valueString": "not recorded"}]}
    assert _outcome(cache.validate, with_extension) is None is _outcome(validate_resource,
                                                                        with_extension)
    for ext in ({"id": "a"}, {"extension": []},
                {"extension": [{"url": "http://example.org/why", "valueString": ""}]}):
        bad = copy.deepcopy(with_extension)
        bad["_created"] = ext
        full = _outcome(validate_resource, bad)
        assert full is not None
        assert _outcome(cache.validate, bad) == full


def test_one_object_in_two_places() -> None:
    cache = ValidationCache()
    shared = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}
    fine = _encounter()
    fine["class"] = shared
    fine["type"] = [{"coding": [shared]}]
    cache.validate(fine)
    assert _outcome(cache.validate, fine) is None
    odd = _encounter()
    ref = {"reference": "urn:uuid:5e0e8b6e-2c6a-5b0e-9d0a-000000000000"}
    odd["subject"] = ref
    odd["class"] = ref  # a Reference where a Coding belongs
    full = _outcome(validate_resource, odd)
    assert full is not None
    assert _outcome(cache.validate, odd) == full


def test_refused_shapes_are_not_remembered_and_the_cache_is_bounded() -> None:
    cache = ValidationCache(max_entries=60)
    bad = _patient()
    bad["gender"] = 1
    with pytest.raises(ValidationError):
        cache.validate(bad)
    assert len(cache) == 0
    biggest = 0
    for record in inpatient_records(30, seed=9):
        for e in map_record(record, now=NOW)["entry"]:
            cache.validate(e["resource"])
            biggest = max(biggest, len(cache))
    assert 0 < biggest <= 60 + 250  # the bound plus one resource's elements
