"""FHIR JSON has no empty values: validation refuses "", [], {} and a null member
wherever they are, naming the path and never the value; the validation cache and the
cache for received JSON refuse exactly what full validation refuses.

Every resource that passes is therefore complete in the sense the policy relies on: each
required element it holds is present and not empty (the models refuse a missing one).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from bridge.errors import ValidationError
from bridge.mapping import map_record
from bridge.records.fhir import ValidationCache, validate_resource
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
_COLLECTION = map_record(inpatient_records(3, seed=3)[2], now=NOW)


def _resource(rtype: str) -> dict[str, Any]:
    return copy.deepcopy(next(e["resource"] for e in _COLLECTION["entry"]
                              if e["resource"]["resourceType"] == rtype))


def _put(resource: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = resource
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


CASES = [
    ("Claim", ("insurance",), [], "Claim.insurance"),
    ("Claim", ("type",), {}, "Claim.type"),
    ("Claim", ("patient",), None, "Claim.patient"),
    ("Claim", ("item", 0, "productOrService"), {}, "Claim.item[0].productOrService"),
    ("Claim", ("diagnosis", 0, "type"), [], "Claim.diagnosis[0].type"),
    ("Claim", ("type", "coding", 0, "system"), "", "Claim.type.coding[0].system"),
    ("Claim", ("meta",), {}, "Claim.meta"),
    ("Claim", ("extension",), [], "Claim.extension"),
    ("Claim", ("item", 0, "net"), {}, "Claim.item[0].net"),
    ("Patient", ("name", 0, "given"), [""], "Patient.name[0].given[0]"),
    ("Patient", ("identifier", 0, "system"), "", "Patient.identifier[0].system"),
    ("Encounter", ("period",), {}, "Encounter.period"),
]


def _outcome(validate: Callable[..., None], resource: dict[str, Any]) -> tuple[str, str] | None:
    try:
        validate(resource)
    except ValidationError as exc:
        return str(exc), exc.location or ""
    return None


@pytest.mark.parametrize(("rtype", "path", "value", "where"), CASES,
                         ids=[c[3] for c in CASES])
def test_an_empty_value_is_refused_where_it_is(rtype: str, path: tuple[Any, ...], value: Any,
                                               where: str) -> None:
    cache, received = ValidationCache(), ValidationCache()
    # The caches know the resource's valid shape first: the empty value is then refused
    # among known parts, and on first sight too.
    valid = _resource(rtype)
    cache.validate(copy.deepcopy(valid))
    received.validate(orjson.loads(orjson.dumps(valid)), parsed=True)
    resource = _resource(rtype)
    _put(resource, path, value)
    full = _outcome(validate_resource, resource)
    assert full is not None and full[1] == where
    if value != [""]:  # an empty given name is refused by the models' own pattern first
        assert "empty value" in full[0]
    assert _outcome(cache.validate, copy.deepcopy(resource)) == full
    assert _outcome(ValidationCache().validate, copy.deepcopy(resource)) == full
    parsed = functools.partial(received.validate, parsed=True)
    assert _outcome(parsed, orjson.loads(orjson.dumps(resource))) == full


def test_null_in_an_array_of_primitives_is_a_place_for_an_extension() -> None:
    """The one null FHIR JSON has: an array of primitives whose item has only an
    extension, given in the sibling array."""
    patient = _resource("Patient")
    patient["name"][0]["given"] = ["A", None]
    patient["name"][0]["_given"] = [None, {"extension": [
        {"url": "http://example.org/initial", "valueString": "B"}]}]
    assert _outcome(validate_resource, copy.deepcopy(patient)) is None
    assert _outcome(ValidationCache().validate, copy.deepcopy(patient)) is None


def test_every_mapped_resource_passes() -> None:
    """The shipped mappings never write an empty value (the samples, every resource)."""
    for record in inpatient_records(40, seed=11):
        for entry in map_record(record, now=NOW)["entry"]:
            validate_resource(entry["resource"])
