"""FHIR JSON's primitive forms, ids and invariant per-1, checked by both ways of validating.

FHIR's JSON gives every primitive one form: a boolean is a JSON boolean; integer,
positiveInt, unsignedInt and decimal are JSON numbers; every other primitive (date,
dateTime, instant, time, code, id, uri, string, ...) is a JSON string. The models behind
validation coerce (a number becomes a dateTime, ``"true"`` a boolean), so each case here
gives one element a value of another form and expects a refusal naming the element's
path, never the value; full validation and the validation cache (cold, warm, and fed
parsed JSON as the receiver feeds it) must agree. The same holds for an id beyond FHIR's
64 characters and for a Period that ends before it starts, compared at the precision both
ends share, as FHIRPath compares them.
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
from bridge.records.fhir import ValidationCache, element_specs, validate_resource
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)
MARK = 19900307


def _outcome(fn: Callable[..., None], resource: dict[str, Any]) -> tuple[str, ...] | None:
    try:
        fn(copy.deepcopy(resource))
    except ValidationError as exc:
        return ("refused", exc.location or "?", str(exc))
    return None


def _checks(original: dict[str, Any]) -> list[Callable[[dict[str, Any]], None]]:
    """Full validation, a cold cache, a cache that knows ``original``'s shape, and a
    warm cache fed parsed JSON (the receiver's way)."""
    warm = ValidationCache()
    warm.validate(copy.deepcopy(original))
    parsed = ValidationCache()
    parsed.validate(orjson.loads(orjson.dumps(original)), parsed=True)
    return [validate_resource, ValidationCache().validate, warm.validate,
            functools.partial(parsed.validate, parsed=True)]


def _agreed(original: dict[str, Any], changed: dict[str, Any]) -> tuple[str, ...] | None:
    outcomes = {_outcome(check, changed) for check in _checks(original)}
    assert len(outcomes) == 1, outcomes
    return outcomes.pop()


_MAPPED = map_record(inpatient_records(1, seed=4)[0], now=NOW)["entry"]


def _mapped(rtype: str) -> dict[str, Any]:
    return copy.deepcopy(next(e["resource"] for e in _MAPPED
                              if e["resource"]["resourceType"] == rtype))


# A value of the right JSON form for each primitive type (None: not tried).
RIGHT: dict[str, Any] = {
    "boolean": True, "integer": 1, "positiveInt": 1, "unsignedInt": 0, "decimal": 1.5,
    "date": "2026-03-01", "dateTime": "2026-03-01", "instant": "2026-03-01T08:00:00+08:00",
    "time": "08:00:00", "code": "x", "id": "x1", "uri": "urn:x", "url": "http://x.example",
    "canonical": "http://x.example/a", "oid": "urn:oid:1.2.3", "string": "x", "markdown": "x",
    "encodedBytes": "aGk=", "uuidVersion": "urn:uuid:8b6f7e5e-3b8a-4c7e-9a8e-0c2f3e4d5a6b",
}
# Elements whose own value set refuses RIGHT's sample: a value it takes.
RIGHT_FOR: dict[tuple[str, str], Any] = {
    ("Patient", "gender"): "female", ("Claim", "status"): "active",
    ("Claim", "use"): "claim", ("Encounter", "status"): "finished",
}
# Values of the wrong JSON form, by the form the type has.
WRONG: dict[str, list[Any]] = {
    "boolean": ["true", 1, 0.0],
    "number": ["1", True],
    "integer": ["1", 1.0, True],
    "string": [1.5, MARK, True],
}


def _form(primitive: str) -> str:
    if primitive == "boolean":
        return "boolean"
    if primitive in ("integer", "positiveInt", "unsignedInt"):
        return "integer"
    if primitive == "decimal":
        return "number"
    return "string"


def _primitive(rtype: str, element: str) -> str | None:
    spec = element_specs(rtype)[element]
    if spec.type_name is not None:
        return None
    if spec.primitive is None:
        return "boolean" if element != "fhir_comments" else None
    return spec.primitive


BASES = ["Patient", "Claim", "Encounter", "Organization", "Basic"]


def _element_cases() -> list[tuple[str, str, str]]:
    cases = []
    for rtype in BASES:
        for element in element_specs(rtype):
            primitive = _primitive(rtype, element)
            if primitive is not None and primitive in RIGHT:
                cases.append((rtype, element, primitive))
    return cases


ELEMENT_CASES = _element_cases()


# Every primitive type as an extension's value[x], in a Basic resource.
VALUE_CASES = [(element, primitive) for element, spec in element_specs("Extension").items()
               if element.startswith("value") and spec.type_name is None
               and (primitive := _primitive("Extension", element)) in RIGHT]


def test_the_cases_cover_every_form_and_the_common_primitive_types() -> None:
    covered = {primitive for _, primitive in VALUE_CASES}
    assert {"boolean", "integer", "positiveInt", "unsignedInt", "decimal", "date",
            "dateTime", "instant", "code", "id", "uri", "string", "markdown",
            "canonical"} <= covered, covered


@pytest.mark.parametrize(("rtype", "element", "primitive"), ELEMENT_CASES)
def test_every_primitive_element_takes_only_its_json_form(
        rtype: str, element: str, primitive: str) -> None:
    base = _mapped(rtype) if rtype in ("Patient", "Claim", "Encounter") else {
        "resourceType": rtype, "code": {"text": "x"}} if rtype == "Basic" else {
        "resourceType": rtype}
    many = element in _list_elements(rtype)
    sample = RIGHT_FOR.get((rtype, element), RIGHT[primitive])
    right = copy.deepcopy(base)
    right[element] = [sample] if many else sample
    # The sample must be one the element takes (else RIGHT_FOR needs the element).
    assert _outcome(validate_resource, right) is None, (rtype, element)
    for wrong in WRONG[_form(primitive)]:
        changed = copy.deepcopy(base)
        changed[element] = [wrong] if many else wrong
        outcome = _agreed(right, changed)
        where = f"{rtype}.{element}" + ("[0]" if many else "")
        assert outcome is not None and outcome[1] == where, (wrong, outcome)
        assert str(MARK) not in outcome[2]


@pytest.mark.parametrize(("element", "primitive"), VALUE_CASES)
def test_every_primitive_type_takes_only_its_json_form(element: str, primitive: str) -> None:
    def basic(value: Any) -> dict[str, Any]:
        return {"resourceType": "Basic", "code": {"text": "x"},
                "extension": [{"url": "urn:x", element: value}]}

    right = basic(RIGHT[primitive])
    assert _outcome(validate_resource, right) is None
    for wrong in WRONG[_form(primitive)]:
        outcome = _agreed(right, basic(wrong))
        assert outcome is not None and outcome[1] == f"Basic.extension[0].{element}", (
            wrong, outcome)
        assert str(MARK) not in outcome[2]


@functools.cache
def _list_elements(rtype: str) -> frozenset[str]:
    from fhir.resources.R4B import get_fhir_model_class
    model = get_fhir_model_class(rtype)
    return frozenset(
        (f.alias or name) for name, f in model.model_fields.items()
        if "List[" in str(f.annotation) or "list[" in str(f.annotation))


# (resource, path, value, expected location) inside datatypes and backbone elements.
NESTED = [
    ("Claim", ("created",), 1.5, "Claim.created"),
    ("Claim", ("billablePeriod", "start"), 1.5, "Claim.billablePeriod.start"),
    ("Claim", ("billablePeriod", "end"), MARK, "Claim.billablePeriod.end"),
    ("Claim", ("item", 0, "sequence"), "1", "Claim.item[0].sequence"),
    ("Claim", ("item", 0, "sequence"), 1.0, "Claim.item[0].sequence"),
    ("Claim", ("total", "value"), "12.5", "Claim.total.value"),
    ("Claim", ("total", "value"), True, "Claim.total.value"),
    ("Claim", ("insurance", 0, "focal"), "true", "Claim.insurance[0].focal"),
    ("Encounter", ("period", "start"), MARK, "Encounter.period.start"),
    ("Patient", ("birthDate",), MARK, "Patient.birthDate"),
    ("Patient", ("identifier", 0, "system"), 1, "Patient.identifier[0].system"),
]


def _put(node: Any, path: tuple[Any, ...], value: Any) -> None:
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@pytest.mark.parametrize(("rtype", "path", "value", "where"), NESTED)
def test_nested_primitives_take_only_their_json_form(
        rtype: str, path: tuple[Any, ...], value: Any, where: str) -> None:
    good = _mapped(rtype)
    if rtype == "Claim":
        good.setdefault("billablePeriod", {"start": "2026-03-01", "end": "2026-03-09"})
    assert _agreed(good, good) is None
    bad = copy.deepcopy(good)
    _put(bad, path, value)
    outcome = _agreed(good, bad)
    assert outcome is not None and outcome[:2] == ("refused", where), outcome
    assert str(value) not in outcome[2] or isinstance(value, bool)
    # In a message bundle the path names the entry.
    entries = [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-00000000000{i}", "resource": r}
               for i, r in enumerate([good, bad])]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    outcome = _agreed({**bundle, "entry": entries[:1] * 2}, bundle)
    assert outcome is not None
    assert outcome[1] == "Bundle.entry[1].resource" + where.removeprefix(rtype)


@pytest.mark.parametrize(("value", "refused"), [("a" * 64, False), ("a" * 65, True),
                                                ("A-z.0" * 13, True)])
def test_an_id_is_at_most_64_characters(value: str, refused: bool) -> None:
    good = _mapped("Patient")
    changed = copy.deepcopy(good)
    changed["id"] = value
    outcome = _agreed(good, changed)
    if not refused:
        assert outcome is None
        return
    assert outcome is not None and outcome[1] == "Patient.id", outcome
    assert value not in outcome[2]


PERIODS = [
    # (start, end, refused)
    ("2026-03-01", "2026-03-09", False),
    ("2026-03-01", "2026-03-01", False),
    ("2026-03-09", "2026-03-01", True),
    ("2026-03", "2026-02-28", True),            # months differ: comparable
    ("2026", "2025-12-31", True),
    ("2026", "2026-01-05", False),              # same year, one has no month: unknown
    ("2026-03-01", "2026-03", False),
    ("2026-03-01T10:00:00+08:00", "2026-03-01T09:00:00+08:00", True),
    ("2026-03-01T10:00:00+08:00", "2026-03-01T03:00:00Z", False),   # 02:00Z before 03:00Z
    ("2026-03-01T10:00:00+08:00", "2026-03-01T01:00:00Z", True),    # 02:00Z after 01:00Z
    ("2026-03-01T10:00:00.500+08:00", "2026-03-01T10:00:00.25+08:00", True),
    ("2026-03-01T10:00:00+08:00", "2026-03-01", False),
    ("2026-03-02T10:00:00+08:00", "2026-03-01", True),
    ("2026-03-01", None, False),
    (None, "2026-03-01", False),
]


@pytest.mark.parametrize(("start", "end", "refused"), PERIODS)
def test_a_period_does_not_end_before_it_starts(
        start: str | None, end: str | None, refused: bool) -> None:
    good = _mapped("Encounter")
    good["period"] = {"start": "2026-03-01", "end": "2026-03-09"}
    changed = copy.deepcopy(good)
    changed["period"] = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
    outcome = _agreed(good, changed)
    if not refused:
        assert outcome is None, outcome
    else:
        assert outcome is not None and outcome[1] == "Encounter.period", outcome
        assert "2026" not in outcome[2]


def test_every_period_is_checked_wherever_it_stands() -> None:
    claim = _mapped("Claim")
    claim["billablePeriod"] = {"start": "2026-03-01", "end": "2026-03-09"}
    claim["item"][0]["servicedPeriod"] = {"start": "2026-03-01", "end": "2026-03-02"}
    claim["item"][0].pop("servicedDate", None)
    assert _agreed(claim, claim) is None
    for path, where in ((("billablePeriod",), "Claim.billablePeriod"),
                        (("item", 0, "servicedPeriod"), "Claim.item[0].servicedPeriod"),
                        (("identifier", 0, "period"), "Claim.identifier[0].period")):
        bad = copy.deepcopy(claim)
        _put(bad, path, {"start": "2026-03-05", "end": "2026-03-04"})
        outcome = _agreed(claim, bad)
        assert outcome is not None and outcome[1] == where, (where, outcome)
