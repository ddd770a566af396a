"""A mapped collection owns every object in it: none appears twice in it, and none is
shared with another collection, mapped before or after. The claim path relies on this:
it gives the collection it mapped to the policy, which then works on it in place
(``apply_policy(..., owned=True)``) instead of copying what it sends. A mapping that
handed out one object twice (a constant Coding, a value from a cache) would let a
change made for one claim, such as a security label or a removed reference, reach
another place of the claim or a later claim."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.mapping import map_record
from bridge.mapping.hl7v2 import HL7Reader, SiteContext
from bridge.mapping.hl7v2.visit import assemble
from bridge.resources import MappingFiles
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
VENDORS = Path(__file__).parent / "vendors"


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


def _vendor_stays() -> tuple[list[dict[str, Any]], MappingFiles]:
    """The stays HIS vendors' HL7 feeds assemble (tests/vendors), and the site overlay."""
    reader = HL7Reader(MappingFiles((VENDORS / "site").resolve()),
                       SiteContext("47011235-7", "杭州市滨江区第一人民医院"))
    stays = []
    for folder in sorted(p for p in (VENDORS / "messages").iterdir() if p.is_dir()):
        parts = []
        for path in sorted(folder.glob("*.hl7")):
            taken = reader.intake(path.read_bytes())
            if taken.part is not None:
                parts.append(taken.part)
        record, _ = assemble(reader.visits[parts[0].kind], parts)
        stays.append(record)
    return stays, reader.files


@pytest.mark.parametrize("kind", [*sorted(KINDS), "vendor HL7 stays, site overlay"])
def test_no_object_of_a_mapped_collection_is_anywhere_else(kind: str) -> None:
    if kind in KINDS:
        records = KINDS[kind](30, seed=5)
        # Each record twice: a cache keyed by content would hand the second mapping what
        # it handed the first. Every collection stays alive, so no id is reused.
        collections = [map_record(r, now=NOW) for r in records + records]
    else:
        # A site's overlay of the value sets, and the shipped ones, for the same stays.
        stays, files = _vendor_stays()
        assert stays
        collections = ([map_record(r, now=NOW, files=files) for r in stays + stays]
                       + [map_record(r, now=NOW) for r in stays + stays])
    seen: dict[int, int] = {}
    for n, collection in enumerate(collections):
        for obj in _containers(collection, []):
            where = seen.setdefault(id(obj), n)
            assert where == n, (
                f"{kind}: an object of collection {n} is also in collection {where}")
    per_collection = [len(_containers(c, [])) for c in collections]
    assert sum(per_collection) == len(seen), f"{kind}: an object appears twice in a collection"
