"""Minimizing copies the pruned bundle resource by resource, pseudonymising ids and reading
each copy's references from the text it was copied from. These checks hold that copy to
the two steps it stands for (a deep copy, then :func:`pseudonymise_ids`) and its
references to what reading the copy again finds, on values built to trip the text
readings: quotes and backslashes in ids and references, look-alike text, values that
are not plain JSON."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policy_json_text import json_values

from bridge.policy.classify import copy_json
from bridge.policy.profile import _copy_minimized, _references
from bridge.policy.transforms import DeidContext, pseudonymise_ids

KEY = bytes(range(32))
IDS = ["p1", 'q"1', "b\\1", "中", "e1"]
REFS = ["urn:uuid:p1", 'urn:uuid:q"1', "urn:uuid:b\\1", "Patient/p1", 'Patient/q"1',
        "Encounter/e1", "Patient/中", "other", "urn:uuid:e1"]


def bundles() -> st.SearchStrategy[dict[str, Any]]:
    resource = st.tuples(st.sampled_from(IDS), st.sampled_from(["Patient", "Encounter"]),
                         st.lists(st.sampled_from(REFS), max_size=3), json_values,
                         st.booleans(), st.booleans())

    def build(parts: list[tuple[str, str, list[str], Any, bool, bool]]) -> dict[str, Any]:
        entries = []
        for n, (rid, rtype, refs, body, full, dated) in enumerate(parts):
            res: dict[str, Any] = {"resourceType": rtype, "id": f"{rid}{n}" if n else rid,
                                   "link": [{"other": {"reference": r}} for r in refs],
                                   "extra": body}
            if dated:
                res["meta"] = {"lastUpdated": datetime(2026, 3, 1, tzinfo=UTC)}
            entry: dict[str, Any] = {"resource": res}
            if full:
                entry = {"fullUrl": f"urn:uuid:{res['id']}", "resource": res}
            entries.append(entry)
        return {"resourceType": "Bundle", "type": "collection", "entry": entries}

    return st.lists(resource, min_size=1, max_size=4).map(build)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bundles(), st.booleans())
def test_the_copy_is_a_copy_then_pseudonymised_ids(bundle: dict[str, Any], ids: bool) -> None:
    before = orjson.dumps(bundle, default=str)
    ctx = DeidContext(KEY, "person") if ids else None
    expected = copy_json(bundle)
    if ctx is not None:
        pseudonymise_ids(expected, ctx)
    copied = _copy_minimized(bundle, ctx)
    assert orjson.dumps(bundle, default=str) == before  # the input is not changed
    if copied is None:
        return  # not plain JSON or an escaped reference: the caller copies and walks
    out, refs = copied
    assert orjson.dumps(out) == orjson.dumps(expected)
    for entry, original in zip(out["entry"], bundle["entry"], strict=True):
        resource = entry["resource"]
        assert resource is not original["resource"]
        assert refs[id(resource)] == (resource, _references(resource))


def test_plain_bundles_take_the_one_pass_copy() -> None:
    """The copy is not merely always declined: plain bundles, with or without ids to
    pseudonymise, are copied in one pass."""
    bundle = {"resourceType": "Bundle", "entry": [
        {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Patient", "id": "a"}},
        {"fullUrl": "urn:uuid:b", "resource": {"resourceType": "Encounter", "id": "b",
                                                "subject": {"reference": "urn:uuid:a"}}},
    ]}
    for ctx in (None, DeidContext(KEY, "person")):
        copied = _copy_minimized(bundle, ctx)
        assert copied is not None
        out, refs = copied
        encounter = out["entry"][1]["resource"]
        assert refs[id(encounter)][1] == [encounter["subject"]["reference"]]
