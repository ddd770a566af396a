"""The validation cache accepts exactly what full validation accepts.

Valid resources from mapped sample records are mutated at random (a leaf replaced by an
odd value, an element dropped, an unknown or a second choice element added, a list
emptied or given a null) and validated with a warm cache and without one: both must
agree, and a refusal must name the same location.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import ValidationError
from bridge.mapping import map_record
from bridge.records.fhir import ValidationCache, validate_resource
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)
_RESOURCES = [e["resource"] for r in inpatient_records(12, seed=8)
              for e in map_record(r, now=NOW)["entry"]]
_CACHE = ValidationCache()
for _r in _RESOURCES:
    _CACHE.validate(_r)

_ODD_LEAVES = st.one_of(
    st.sampled_from(["", " x", "bogus", "1949-02-30", "2026-03-01T08:00:00", "08:30:00",
                     "urn:oid:1.2", "a b", "CNY", "male", "2026-03-01T08:00:00+08:00",
                     "urn:uuid:5e0e8b6e-2c6a-5b0e-9d0a-000000000000", "x" * 70]),
    st.integers(min_value=-3, max_value=3), st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    # Fresh containers for every example: a shared object mutated by a later step would
    # make generation depend on earlier examples.
    st.builds(dict), st.builds(list), st.builds(lambda: {"text": "x"}),
    st.builds(lambda: [{"text": "x"}]), st.builds(lambda: {"system": "urn:x", "code": "c"}),
    st.builds(lambda: {"value": 1, "currency": "CNY"}),
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _mutants(draw: st.DrawFn) -> dict[str, Any]:
    resource = copy.deepcopy(draw(st.sampled_from(_RESOURCES)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = [p for p in _paths(resource) if p[0] not in ("resourceType",)]
        if not paths:  # everything but resourceType was dropped already
            break
        path = draw(st.sampled_from(paths))
        parent: Any = resource
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "drop", "extra", "choice", "null-item"]))
        if action == "replace":
            parent[last] = draw(_ODD_LEAVES)
        elif action == "drop":
            del parent[last]
        elif action == "extra" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["foo", "valueString", "performedPeriod", "_status",
                                         "onsetDateTime", "text"]))] = draw(_ODD_LEAVES)
        elif action == "choice" and isinstance(parent, dict):
            parent["performedString"] = "x"
            parent["diagnosisCodeableConcept"] = {"text": "x"}
        elif action == "null-item" and isinstance(parent, list):
            parent.append(None)
    return resource


def _outcome(fn: Any, resource: dict[str, Any]) -> str | None:
    try:
        fn(resource, path="R")
    except ValidationError as exc:
        return exc.location or "?"
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutants())
def test_cached_and_uncached_validation_agree(resource: dict[str, Any]) -> None:
    full = _outcome(validate_resource, copy.deepcopy(resource))
    cached = _outcome(_CACHE.validate, copy.deepcopy(resource))
    assert cached == full


def test_infinite_amount_is_refused_after_a_valid_one() -> None:
    """The former shape cache accepted this: same structure and leaf class as 1.5."""
    good = {"resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "x"},
            "payor": [{"reference": "y"}],
            "costToBeneficiary": [{"valueMoney": {"value": 1.5, "currency": "CNY"}}]}
    cache = ValidationCache()
    cache.validate(good)
    bad = copy.deepcopy(good)
    bad["costToBeneficiary"][0]["valueMoney"]["value"] = float("inf")
    with pytest.raises(ValidationError):
        cache.validate(bad)


def test_recurring_content_is_not_validated_again() -> None:
    cache = ValidationCache()
    bundles = [map_record(r, now=NOW) for r in inpatient_records(20, seed=31)]
    for b in bundles:
        for e in b["entry"]:
            cache.validate(e["resource"])
    size = len(cache)
    for b in bundles:
        for e in b["entry"]:
            cache.validate(e["resource"])
    assert len(cache) == size
