"""A received claim holding an empty value is named, however the sender spaced its JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from bridge.mapping import map_record
from bridge.records.fhir import empty_value
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


def claim() -> dict[str, Any]:
    return map_record(inpatient_records(1, seed=5)[0], now=NOW)


def spellings(data: Any) -> list[bytes]:
    """The same JSON value as a sender might write it."""
    return [
        orjson.dumps(data),
        orjson.dumps(data, option=orjson.OPT_INDENT_2),
        json.dumps(data, ensure_ascii=False).encode(),  # ", " and ": "
        json.dumps(data, ensure_ascii=True, indent="\t").encode(),
        json.dumps(data, indent=1).encode().replace(b"\n", b"\r\n"),
    ]


EMPTY = {"a null": None, "an empty string": "", "an empty array": [],
         "an empty object": {}}


# null is a placeholder an array of primitives may hold: not an empty array item.
CASES = [(kind, where) for kind in EMPTY for where in ("member", "array item", "deep member")
         if not (kind == "a null" and where == "array item")]


@pytest.mark.parametrize(("kind", "where"), CASES)
def test_an_empty_value_is_named_in_every_spelling(kind: str, where: str) -> None:
    data = claim()
    patient = next(e["resource"] for e in data["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    index = data["entry"].index(next(e for e in data["entry"] if e["resource"] is patient))
    value = EMPTY[kind]
    if where == "member":
        patient["gender"] = value
        expected = f"Bundle.entry[{index}].resource.gender"
    elif where == "array item":
        patient["name"].append(value)
        expected = f"Bundle.entry[{index}].resource.name[{len(patient['name']) - 1}]"
    else:
        patient["name"][0]["family"] = value
        expected = f"Bundle.entry[{index}].resource.name[0].family"
    for body in spellings(data):
        # An empty array or object with whitespace inside, as a formatter may write it.
        body = body.replace(b"[]", b"[ \n ]").replace(b"{}", b"{\r\n}")
        assert empty_value(body, orjson.loads(body)) == expected, body[:60]


def test_a_claim_without_empty_values_passes_in_every_spelling() -> None:
    data = claim()
    # Text that looks like an empty value, inside strings, is not one.
    data["entry"][0]["resource"].setdefault("meta", {})["tag"] = [
        {"system": "urn:example:tags", "code": 'null [] {} "" [ ] { }'}]
    for body in spellings(data):
        assert empty_value(body, orjson.loads(body)) is None
