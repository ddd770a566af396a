"""A mapped collection owns every object in it: none appears twice in it, and none is
shared with another collection, mapped before or after. The claim path relies on this:
it gives the collection it mapped to the policy, which then works on it in place
(``apply_policy(..., owned=True)``) instead of copying what it sends. A mapping that
handed out one object twice (a constant Coding, a value from a cache) would let a
change made for one claim, such as a security label or a removed reference, reach
another place of the claim or a later claim."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.mapping import map_record
from bridge.samples import inpatient_records
from bridge.samples_documents import (
    admission_records,
    discharge_records,
    organization_records,
    referral_records,
    summary_records,
)
from bridge.samples_outpatient import lab_records, outpatient_records, prescription_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
KINDS = {
    "inpatient": inpatient_records,
    "outpatient": outpatient_records,
    "prescription": prescription_records,
    "lab": lab_records,
    "summary": summary_records,
    "admission": admission_records,
    "discharge": discharge_records,
    "referral": referral_records,
    "organization": organization_records,
}


def _containers(node: Any, out: list[Any]) -> list[Any]:
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            _containers(value, out)
    elif isinstance(node, list):
        out.append(node)
        for value in node:
            _containers(value, out)
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_object_of_a_mapped_collection_is_anywhere_else(kind: str) -> None:
    records = KINDS[kind](30, seed=5)
    # Each record twice: a cache keyed by content would hand the second mapping what it
    # handed the first. Every collection stays alive, so no id is reused.
    collections = [map_record(r, now=NOW) for r in records + records]
    seen: dict[int, int] = {}
    for n, collection in enumerate(collections):
        for obj in _containers(collection, []):
            where = seen.setdefault(id(obj), n)
            assert where == n, (
                f"{kind}: an object of collection {n} is also in collection {where}")
    per_collection = [len(_containers(c, [])) for c in collections]
    assert sum(per_collection) == len(seen), f"{kind}: an object appears twice in a collection"
