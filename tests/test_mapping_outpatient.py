"""WS 445.2 门急诊病历 (and the other outpatient data sets as they ship) -> FHIR R4 and back.

Golden pairs (``tests/golden/ws445/<prefix>-NN``), R4 validity with the independent npm
validator, record -> FHIR -> record round trips over fixed and generated records, rule
checks over every sample, and refusals that name the element without its value.
Set REGEN_GOLDEN=1 to rewrite the expected files; review the change as a diff.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.cli import main
from bridge.errors import MappingError
from bridge.mapping import map_record, mapping_for, read_record, unmap_bundle, unused_elements
from bridge.mapping.engine import check_record
from bridge.samples_outpatient import lab_records, outpatient_records, prescription_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "ws445"

# Data set -> golden-file prefix and sample generator.
DATASETS: dict[str, tuple[str, Callable[..., list[dict[str, Any]]]]] = {
    "WS445.2": ("outpatient", outpatient_records),
    "WS445.3": ("prescription", prescription_records),
    "WS445.4": ("lab", lab_records),
}
CASES = sorted(p.name.removesuffix(".input.json") for prefix, _ in DATASETS.values()
               for p in GOLDEN.glob(f"{prefix}-*.input.json"))

# Keys whose strings are vocabulary, ids or references rather than data from the record.
_NOT_FROM_INPUT = frozenset(
    {"system", "code", "display", "url", "reference", "fullUrl", "id", "resourceType",
     "status", "use", "intent", "gender"}
)


def _dump(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def _samples(dataset: str, n: int, seed: int) -> list[dict[str, Any]]:
    return DATASETS[dataset][1](n, seed=seed)


def _mapped_values(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Normalised values of the mapped elements (decimals compare by value)."""
    spec = mapping_for(record["dataset"])
    values, groups = check_record(spec, record)

    def norm(items: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items.items():
            if k in spec.used_elements:
                fmt = spec.catalog.elements[k].format
                out[k] = Decimal(v) if fmt.startswith("N") and "," in fmt else v
        return out

    return norm(values), {n: [norm(i) for i in items] for n, items in groups.items() if items}


def _resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def _strings(node: Any, key: str = "") -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, k)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v, key)]
    return [node] if isinstance(node, str) and key not in _NOT_FROM_INPUT else []


def _constants(spec_file: str) -> set[str]:
    """Strings written as constants in the mapping file (``value:``)."""
    import yaml

    found: set[str] = set()

    def walk(node: Any, under_value: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, under_value or k == "value")
        elif isinstance(node, list):
            for v in node:
                walk(v, under_value)
        elif isinstance(node, str) and under_value:
            found.add(node)

    walk(yaml.safe_load(Path(spec_file).read_text(encoding="utf-8")), False)
    return found


# --- golden pairs -----------------------------------------------------------------------


def test_every_shipped_dataset_has_five_golden_records() -> None:
    for dataset, (prefix, _) in DATASETS.items():
        assert len([c for c in CASES if c.startswith(prefix + "-")]) >= 5, dataset


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    source = GOLDEN / f"{name}.input.json"
    record = read_record(source.read_bytes(), source=source.name)
    bundle = map_record(record, now=NOW)
    expected_path = GOLDEN / f"{name}.expected.json"
    if os.environ.get("REGEN_GOLDEN") == "1":
        expected_path.write_text(_dump(bundle), encoding="utf-8")
    assert bundle == json.loads(expected_path.read_text(encoding="utf-8"))


def test_golden_outputs_validate_against_the_r4_core_definitions() -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    assert (ROOT / "node_modules" / "fhir" / "package.json").is_file(), \
        "run `npm ci` at the repository root: the npm package fhir is missing"
    files = [str(GOLDEN / f"{c}.expected.json") for c in CASES]
    out = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(out.stdout)
    assert len(report["results"]) == len(CASES)
    errors = [(r["file"], m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []
    assert out.returncode == 0


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_golden_record_fhir_record_is_the_identity_on_mapped_elements(name: str) -> None:
    record = json.loads((GOLDEN / f"{name}.input.json").read_text(encoding="utf-8"))
    back = unmap_bundle(map_record(record, now=NOW), dataset=record["dataset"])
    assert _mapped_values(back) == _mapped_values(record)
    assert map_record(back, now=NOW) == map_record(record, now=NOW)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(DATASETS)), st.integers(min_value=0, max_value=100_000))
def test_any_sample_record_round_trips(dataset: str, seed: int) -> None:
    (record,) = _samples(dataset, 1, seed)
    back = unmap_bundle(map_record(record), dataset=dataset)
    assert _mapped_values(back) == _mapped_values(record)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_mapped_element_can_be_read_back(dataset: str) -> None:
    assert mapping_for(dataset).one_way() == []


# --- rule checks over samples -----------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_rule_checks_over_samples(dataset: str) -> None:
    spec = mapping_for(dataset)
    constants = _constants(spec.file)
    for record in _samples(dataset, 150, 5):
        bundle = map_record(record, now=NOW)
        ids = [e["resource"]["id"] for e in bundle["entry"]]
        assert len(ids) == len(set(ids))
        urls = {e["fullUrl"] for e in bundle["entry"]}
        assert set(_references(bundle)) <= urls
        assert all(len(e["resource"]) > 2 for e in bundle["entry"])
        inputs = {str(v) for v in record["elements"].values()}
        for items in record["groups"].values():
            for item in items:
                inputs |= {str(v) for v in item.values()}
        for text in _strings(bundle["entry"]):
            # Dates and times are reformatted; everything else comes from the record or
            # is a constant of the mapping file: nothing is invented.
            if text[:4].isdigit() and "-" in text:
                continue
            assert text in inputs or text in constants, text


# --- WS 445.2 specifics -----------------------------------------------------------------


def _outpatient() -> dict[str, Any]:
    return json.loads((GOLDEN / "outpatient-01.input.json").read_text(encoding="utf-8"))


def test_outpatient_visit_diagnoses_and_examination() -> None:
    bundle = map_record(_outpatient(), now=NOW)
    (encounter,) = _resources(bundle, "Encounter")
    assert encounter["class"]["code"] == "AMB"
    assert encounter["period"] == {"end": "2026-03-16T10:27:00+08:00"}
    conditions = _resources(bundle, "Condition")
    assert [c["code"]["coding"][0]["code"] for c in conditions] == ["J20.900", "BNF010", "ZBFR00"]
    assert {c["verificationStatus"]["coding"][0]["code"] for c in conditions} == {"provisional"}
    kinds = [[k["coding"][0]["code"] for k in c["category"]] for c in conditions]
    assert kinds == [["encounter-diagnosis"], ["encounter-diagnosis", "tcm-disease"],
                     ["encounter-diagnosis", "tcm-syndrome"]]
    assert [d["rank"] for d in encounter["diagnosis"]] == [1, 2, 3]
    (exam,) = _resources(bundle, "Observation")
    assert [c["code"] for c in exam["code"]["coding"]] == ["29545-1", "DE04.10.258.00"]
    assert exam["valueString"].startswith("T 36.5℃")
    (patient,) = _resources(bundle, "Patient")
    assert patient["identifier"] == [{"system": "urn:oid:2.16.156.10011.1.11",
                                      "value": "MZ2026717971"}]


def test_unused_elements_name_what_stays_at_the_hospital() -> None:
    unused = dict(unused_elements(_outpatient()))
    assert set(unused) == {"HDSD00.03.010", "HDSD00.03.026", "HDSD00.03.038"}
    assert all(unused.values())


def test_mappings_coverage_lists_the_outpatient_record(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "coverage", "--json"]) == 0
    rows = {d["dataset"]: d for d in json.loads(capsys.readouterr().out)}
    for dataset in DATASETS:
        row = rows[dataset]
        assert row["mapped"] + len(row["unmapped"]) == row["elements"]
        assert all(r["reason"] for r in row["unmapped"])
    assert rows["WS445.2"]["elements"] == 42


# --- refusals name the element, never the value ----------------------------------------


def _refused(record: dict[str, Any], value: str) -> MappingError:
    with pytest.raises(MappingError) as info:
        map_record(record)
    assert value not in str(info.value)
    return info.value


def test_unknown_code_is_refused_naming_the_element() -> None:
    record = _outpatient()
    record["elements"]["HDSD00.03.039"] = "5"
    assert "HDSD00.03.039" in str(_refused(record, "5"))
    record = _outpatient()
    record["groups"]["diagnoses"][0]["HDSD00.03.004"] = "肺炎J18"
    error = _refused(record, "肺炎J18")
    assert "$.groups.diagnoses[0] HDSD00.03.004" in str(error)


def test_impossible_date_is_refused_naming_the_element() -> None:
    record = _outpatient()
    record["elements"]["HDSD00.03.023"] = "20260230T090000"
    assert "HDSD00.03.023" in str(_refused(record, "20260230"))
    record = _outpatient()
    record["elements"]["HDSD00.03.003"] = "19741305"
    assert "HDSD00.03.003" in str(_refused(record, "19741305"))


def test_birth_after_the_visit_is_refused() -> None:
    record = _outpatient()
    record["elements"]["HDSD00.03.003"] = "20270101"
    assert "HDSD00.03.023" in str(_refused(record, "20270101"))


def test_over_length_value_is_refused_naming_the_element() -> None:
    record = _outpatient()
    long_text = "双肺呼吸音清" * 100
    record["elements"]["HDSD00.03.037"] = long_text
    assert "HDSD00.03.037" in str(_refused(record, long_text))
    record = _outpatient()
    record["elements"]["HDSD00.03.025"] = "MZ" + "9" * 20
    assert "HDSD00.03.025" in str(_refused(record, "MZ" + "9" * 20))


def test_required_element_missing_is_refused() -> None:
    record = _outpatient()
    del record["elements"]["HDSD00.03.017"]
    assert "HDSD00.03.017" in str(_refused(record, "苏超"))


def test_two_codes_in_one_diagnosis_are_refused() -> None:
    record = _outpatient()
    record["groups"]["diagnoses"][0]["HDSD00.03.006"] = "BNF010"
    assert "$.groups.diagnoses[0]" in str(_refused(record, "BNF010"))


def test_altered_bundle_is_refused_naming_the_resource() -> None:
    bundle = map_record(_outpatient(), now=NOW)
    altered = copy.deepcopy(bundle)
    (exam,) = _resources(altered, "Observation")
    exam["valueString"] = "篡改"
    exam["interpretation"] = [{"text": "异常"}]
    with pytest.raises(MappingError) as info:
        unmap_bundle(altered, dataset="WS445.2")
    assert "Bundle.entry[" in str(info.value)
    assert "篡改" not in str(info.value)
