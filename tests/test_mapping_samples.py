"""Rule checks over 200 sample records: what must hold for every mapped record."""

from __future__ import annotations

import copy
import json
import statistics
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from bridge.mapping import map_record, patient_identifiers
from bridge.samples import hospital_org_code, inpatient_records

NOW = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
RECORDS = inpatient_records(200, seed=3)

# Keys whose string values are codes, system URIs, displays from code tables, fixed
# FHIR vocabulary, ids and references: everything else must come from the input.
_NOT_FROM_INPUT = frozenset(
    {"system", "code", "display", "url", "reference", "fullUrl", "id", "resourceType",
     "status", "use", "type", "currency", "unit", "gender",
     "created"}
)


@pytest.fixture(scope="module")
def bundles() -> list[dict[str, Any]]:
    return [map_record(r, now=NOW) for r in RECORDS]


def _strings(node: Any, key: str = "") -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, k)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v, key)]
    if isinstance(node, str) and key not in _NOT_FROM_INPUT:
        return [node]
    return []


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def _input_strings(record: dict[str, Any]) -> set[str]:
    values = {str(v) for v in record["elements"].values()}
    for items in record["groups"].values():
        for item in items:
            values |= {str(v) for v in item.values()}
    return values


def _resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_ids_unique_and_fullurls_match(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        ids = [e["resource"]["id"] for e in bundle["entry"]]
        assert len(ids) == len(set(ids))
        for entry in bundle["entry"]:
            assert entry["fullUrl"] == f"urn:uuid:{entry['resource']['id']}"


def test_every_reference_resolves_inside_the_bundle(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        urls = {e["fullUrl"] for e in bundle["entry"]}
        refs = _references(bundle)
        assert refs
        assert set(refs) <= urls


def test_every_resource_is_referenced_or_is_the_claim(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        refs = set(_references(bundle))
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] != "Claim":
                assert entry["fullUrl"] in refs, entry["resource"]["resourceType"]


def test_nothing_invented_every_string_comes_from_the_input(bundles: list[dict[str, Any]]) -> None:
    for record, bundle in zip(RECORDS, bundles, strict=True):
        allowed = _input_strings(record)
        for text in _strings(bundle):
            # Dates and times are reformatted: compare their digits.
            digits = text.replace("-", "").replace(":", "").replace("T", "").removesuffix("+0800")
            assert text in allowed or any(digits == a.replace("T", "") for a in allowed), text


def test_no_empty_resources_or_elements(bundles: list[dict[str, Any]]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            assert node, "empty object"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            assert node, "empty list"
            for v in node:
                walk(v)
        elif isinstance(node, str):
            assert node.strip() == node and node

    for bundle in bundles:
        walk(bundle)


def test_claim_items_add_up_to_the_total(bundles: list[dict[str, Any]]) -> None:
    for bundle in bundles:
        (claim,) = _resources(bundle, "Claim")
        total = Decimal(str(claim["total"]["value"]))
        items = sum(Decimal(str(i["net"]["value"])) for i in claim["item"])
        assert items == total
        for item in claim["item"]:
            assert [i["sequence"] for i in claim["item"]] == list(range(1, len(claim["item"]) + 1))
            parts = sum(Decimal(str(d["net"]["value"])) for d in item.get("detail", []))
            assert parts <= Decimal(str(item["net"]["value"]))


def test_one_condition_per_diagnosis_one_procedure_per_operation(
    bundles: list[dict[str, Any]],
) -> None:
    for record, bundle in zip(RECORDS, bundles, strict=True):
        (claim,) = _resources(bundle, "Claim")
        assert len(_resources(bundle, "Condition")) == len(record["groups"]["diagnoses"])
        assert len(claim["diagnosis"]) == len(record["groups"]["diagnoses"])
        operations = record["groups"].get("operations", [])
        assert len(_resources(bundle, "Procedure")) == len(operations)
        assert len(claim.get("procedure", [])) == len(operations)
        principal = [d for d in claim["diagnosis"] if d["type"][0]["coding"][0]["code"] == "principal"]
        assert len(principal) == 1


def test_all_records_share_one_hospital_organization(bundles: list[dict[str, Any]]) -> None:
    orgs = {json.dumps(_resources(b, "Organization"), sort_keys=True) for b in bundles}
    assert len(orgs) == 1
    (org,) = _resources(bundles[0], "Organization")
    assert org["identifier"] == [{"system": "urn:oid:2.16.156.10011.1.5", "value": hospital_org_code()}]


def test_patient_identifiers_carry_id_card_inpatient_and_record_numbers(
    bundles: list[dict[str, Any]],
) -> None:
    for record, bundle in zip(RECORDS, bundles, strict=True):
        pairs = patient_identifiers(bundle)
        el = record["elements"]
        assert ("urn:oid:2.16.156.10011.1.12", el["HDSD00.11.140"]) in pairs
        assert ("urn:oid:2.16.156.10011.1.13", el["HDSD00.11.006"]) in pairs
        if el["HDSD00.11.049"] == "01":
            assert ("urn:oid:2.16.156.10011.1.3", el["HDSD00.11.048"]) in pairs
        if "HDSD00.11.053" in el:
            assert ("urn:oid:2.16.156.10011.1.19", el["HDSD00.11.053"]) in pairs


def test_same_input_gives_identical_output() -> None:
    for record in RECORDS[:50]:
        first = json.dumps(map_record(copy.deepcopy(record), now=NOW), ensure_ascii=False)
        second = json.dumps(map_record(copy.deepcopy(record), now=NOW), ensure_ascii=False)
        assert first == second


def test_mapping_does_not_modify_the_record() -> None:
    record = copy.deepcopy(RECORDS[0])
    map_record(record, now=NOW)
    assert record == RECORDS[0]


def test_different_stays_get_different_ids(bundles: list[dict[str, Any]]) -> None:
    claims = {_resources(b, "Claim")[0]["id"] for b in bundles}
    patients = {_resources(b, "Patient")[0]["id"] for b in bundles}
    assert len(claims) == len(bundles)
    assert len(patients) == len(bundles)


def test_median_mapping_time_per_record_is_reported() -> None:
    fresh = inpatient_records(200, seed=11)
    times = []
    for record in fresh:
        start = time.perf_counter()
        map_record(record, now=NOW)
        times.append(time.perf_counter() - start)
    median_ms = statistics.median(times) * 1000
    print(f"map_record median over 200 fresh records: {median_ms:.2f} ms")
    # Generous bound for a loaded CI machine; the figure is printed for the report.
    assert median_ms < 50
