"""The policy stage reads references and codes off the JSON text of a resource instead of
walking it. These checks hold the text readings to what a walk over the objects finds,
on values built to trip them: quotes and backslashes inside references, member names
that end in "reference" or "code", look-alike text inside other strings, and values
that are not plain JSON."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.policy.profile import (
    _CODE,
    _REFERENCE,
    _reference_values,
    _references,
)
from bridge.policy.profile import code_values as _code_values
from bridge.policy.transforms import (
    DeidContext,
    encoded_stand_ins,
    pseudonymise_ids,
    rewrite_references,
)

KEY = bytes(range(32))
TRICKY = ["a", 'q"uote', "back\\slash", "tail\\", '"reference":"x"', ',"code":"F20"',
          "urn:uuid:1", "Patient/p1", "中文", "\n", '\\"']

texts = st.one_of(st.sampled_from(TRICKY), st.text(max_size=8))
keys = st.one_of(st.sampled_from(["reference", "code", 'x"reference', 'a\\"code', "display",
                                  "system"]), st.text(max_size=6))
json_values = st.recursive(
    st.one_of(texts, st.integers(-5, 5), st.booleans(), st.none()),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=4)),
    max_leaves=20,
)


def walk_references(node: Any, out: list[str]) -> None:
    """Every string under a "reference" member, depth first in document order."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                out.append(v)
            walk_references(v, out)
    elif isinstance(node, list):
        for v in node:
            walk_references(v, out)


def walk_codes(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "code" and isinstance(v, str):
                out.add(v)
            walk_codes(v, out)
    elif isinstance(node, list):
        for v in node:
            walk_codes(v, out)


def plain_names(node: Any) -> bool:
    if isinstance(node, dict):
        return all('"' not in k and "\\" not in k and plain_names(v) for k, v in node.items())
    if isinstance(node, list):
        return all(plain_names(v) for v in node)
    return True


def decode(raw: bytes) -> str:
    return str(orjson.loads(b'"' + raw + b'"'))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_references_and_codes_read_off_the_text_are_those_of_the_objects(value: Any) -> None:
    text = orjson.dumps(value)
    assert _reference_values(text) == _REFERENCE.findall(text)
    assert _code_values(text) == set(_CODE.findall(text))
    if not plain_names(value):
        # A member name holding a quote is not FHIR; the text readings may then see
        # a "reference" member where there is none (never miss one).
        return
    found = _references(value)
    expected: list[str] = []
    walk_references(value, expected)
    assert found == expected
    codes: set[str] = set()
    walk_codes(value, codes)
    assert {decode(raw) for raw in _code_values(text)} == codes


def reference_walk(node: Any, mapping: dict[str, str]) -> None:
    """The rewrite as the specification says it: every "reference" member whose string
    value names a resource of the bundle gets the stand-in."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str) and node["reference"] in mapping:
            node["reference"] = mapping[node["reference"]]
        for v in node.values():
            reference_walk(v, mapping)
    elif isinstance(node, list):
        for v in node:
            reference_walk(v, mapping)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["p1", 'q"1', "b\\1", "中"]), json_values),
                min_size=1, max_size=4),
       st.lists(st.sampled_from(["urn:uuid:p1", 'urn:uuid:q"1', "urn:uuid:b\\1",
                                 "Patient/p1", 'Patient/q"1', "Patient/中", "other"]),
                max_size=4))
def test_ids_are_pseudonymised_as_a_walk_over_the_objects_would(
    resources: list[tuple[str, Any]], refs: list[str]
) -> None:
    entries = []
    for n, (rid, body) in enumerate(resources):
        resource = {"resourceType": "Patient", "id": f"{rid}{n}" if n else rid,
                    "link": [{"other": {"reference": r}} for r in refs], "extra": body}
        entries.append({"fullUrl": f"urn:uuid:{resource['id']}", "resource": resource})
    bundle = {"resourceType": "Bundle", "entry": entries}
    ctx = DeidContext(KEY, "person")
    expected = orjson.loads(orjson.dumps(bundle))
    mapping: dict[str, str] = {}
    for entry in expected["entry"]:
        old = entry["resource"]["id"]
        new = ctx.pseudonym_uuid(old)
        mapping[f"urn:uuid:{old}"] = f"urn:uuid:{new}"
        mapping[f"Patient/{old}"] = f"Patient/{new}"
        mapping.setdefault(entry["fullUrl"], f"urn:uuid:{new}")
        entry["fullUrl"] = mapping[entry["fullUrl"]]
        entry["resource"]["id"] = new
    for entry in expected["entry"]:
        reference_walk(entry["resource"], mapping)
    pseudonymise_ids(bundle, ctx)
    assert bundle == expected


def test_resources_that_are_not_plain_json_are_rewritten_in_place() -> None:
    when = datetime(2026, 3, 1, tzinfo=UTC)
    bundle = {"entry": [
        {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Patient", "id": "a",
                                                "meta": {"lastUpdated": when}}},
        {"fullUrl": "urn:uuid:b", "resource": {"resourceType": "Encounter", "id": "b",
                                                "subject": {"reference": "urn:uuid:a"}}},
    ]}
    encounter = bundle["entry"][1]["resource"]
    pseudonymise_ids(bundle, DeidContext(KEY, "person"))
    new = bundle["entry"][0]["resource"]["id"]
    assert str(uuid.UUID(new)) == new
    assert bundle["entry"][0]["resource"]["meta"]["lastUpdated"] is when
    assert bundle["entry"][1]["resource"] is encounter
    assert encounter["subject"]["reference"] == f"urn:uuid:{new}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.dictionaries(st.sampled_from(TRICKY + ["", "Patient/p2"]),
                                    st.sampled_from(TRICKY + ["urn:uuid:n"]), max_size=4))
def test_the_references_a_rewrite_reads_are_those_of_the_text_it_writes(
    value: Any, mapping: dict[str, str]
) -> None:
    text = orjson.dumps(value)
    found: list[bytes] = []
    rewritten = rewrite_references(text, encoded_stand_ins(mapping), found)
    if rewritten is None:
        return  # a reference written with escapes: the caller walks the objects
    assert found == _REFERENCE.findall(rewritten)


def _input_codes(collection: dict[str, Any]) -> set[bytes]:
    resources = [e.get("resource") for e in collection.get("entry") or ()]
    return _code_values(orjson.dumps(resources))


def test_minimizing_reads_every_code_of_the_input() -> None:
    """The codes minimizing reads (off the copy's text and what pruning left out) hold
    every code of the input's resources: the special-disease filter trusts them."""
    from bridge.mapping import map_record
    from bridge.policy.profile import load_link_profile
    from bridge.samples import inpatient_records

    now = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
    collections = [map_record(r, now=now) for r in inpatient_records(40, seed=5)]
    # Values pruning meets in odd places: a coding under an element no profile sends,
    # an extension sibling, a list item that is not an object.
    odd = collections[0]
    for entry in odd["entry"]:
        resource = entry["resource"]
        resource["unknownElement"] = {"coding": [{"system": "s", "code": "ODD1"}]}
        resource["_gender"] = {"extension": [{"url": "u", "valueCode": "x",
                                              "code": "ODD2"}]}
        for name, value in list(resource.items()):
            if isinstance(value, list):
                value.append([{"code": f"ODD3-{resource['resourceType']}-{name}"}])
    for name in ("commercial-insurance", "regional-interoperability:default",
                 "regional-interoperability:authorise", "research-limited-data-set"):
        profile = load_link_profile(name)
        for collection in collections:
            expected = _input_codes(collection)
            before = orjson.dumps(collection)
            result = profile.minimize(collection, key=KEY, read_codes=True)
            assert result.code_texts is not None
            assert expected <= result.code_texts, (name, expected - result.code_texts)
            assert orjson.dumps(collection) == before
    assert {b"ODD1", b"ODD2", b"ODD3-Claim-diagnosis"} <= _input_codes(odd)
