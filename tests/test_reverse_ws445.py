"""FHIR -> DE record from the same mapping files: round trips, refusals, R4 validity."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.cli import main
from bridge.errors import MappingError, ParseError
from bridge.mapping import map_record, mapping_for, read_record, unmap_bundle
from bridge.mapping.engine import check_record
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "ws445"


def _mapped_values(record: dict[str, Any]) -> tuple[dict[str, Decimal | str], dict[str, Any]]:
    """Normalised values of the mapped elements; zero amounts count as absent (the
    mapping leaves zero fee rows out), numbers compare by value."""
    spec = mapping_for(record["dataset"])
    values, groups = check_record(spec, record)

    def norm(items: dict[str, str]) -> dict[str, Decimal | str]:
        out: dict[str, Decimal | str] = {}
        for k, v in items.items():
            if k not in spec.used_elements:
                continue
            fmt = spec.catalog.elements[k].format
            if fmt.startswith("N") and "," in fmt:
                if Decimal(v) == 0:
                    continue
                out[k] = Decimal(v)
            else:
                out[k] = v
        return out

    return norm(values), {n: [norm(i) for i in items] for n, items in groups.items()}


@pytest.mark.parametrize("record", inpatient_records(60, seed=17), ids=lambda r: r["elements"]["HDSD00.11.140"])
def test_record_fhir_record_is_the_identity_on_mapped_elements(record: dict[str, Any]) -> None:
    back = unmap_bundle(map_record(record, now=NOW))
    assert _mapped_values(back) == _mapped_values(record)
    # And the record read back maps to the same resources (the clock aside).
    assert map_record(back, now=NOW) == map_record(record, now=NOW)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10_000))
def test_any_sample_record_round_trips(seed: int) -> None:
    (record,) = inpatient_records(1, seed=seed)
    assert _mapped_values(unmap_bundle(map_record(record))) == _mapped_values(record)


def test_altered_bundle_is_refused_naming_the_resource() -> None:
    bundle = map_record(inpatient_records(1, seed=5)[0], now=NOW)
    altered = copy.deepcopy(bundle)
    patient = next(e for e in altered["entry"] if e["resource"]["resourceType"] == "Patient")
    # An element the mapping never writes cannot be carried back: refused, not dropped.
    patient["resource"]["birthDate"] = "1960-01-01"
    patient["resource"]["multipleBirthBoolean"] = False
    with pytest.raises(MappingError) as info:
        unmap_bundle(altered)
    assert "Bundle.entry[" in str(info.value)
    assert "1960" not in str(info.value)


def test_not_a_bundle_is_refused() -> None:
    with pytest.raises(MappingError):
        unmap_bundle({"resourceType": "Patient"})


def test_one_way_elements_are_listed() -> None:
    # Every mapped element of the front sheet can be read back.
    assert mapping_for("WS445.10").one_way() == []


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["dataset", "elements", "groups", "diagnoses",
                                       "HDSD00.11.014", "HDSD00.11.023", "x"]) | st.text(max_size=8),
                      children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_arbitrary_json_raises_only_documented_errors(doc: Any) -> None:
    text = json.dumps(doc)
    try:
        record = read_record(text)
        map_record(record)
    except (ParseError, MappingError):
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(mapping_for("WS445.10").catalog.elements)),
                       st.text(max_size=12) | st.integers() | st.booleans(), max_size=12))
def test_arbitrary_elements_raise_only_documented_errors(elements: dict[str, Any]) -> None:
    try:
        map_record({"dataset": "WS445.10", "elements": elements,
                    "groups": {"diagnoses": [{"HDSD00.11.023": "J18.900"}]}})
    except (ParseError, MappingError):
        pass


# --- independent R4 validation (npm package `fhir`, installed by `npm ci`) ---------------


def test_golden_outputs_validate_against_the_r4_core_definitions() -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    assert (ROOT / "node_modules" / "fhir" / "package.json").is_file(), \
        "run `npm ci` at the repository root: the npm package fhir is missing"
    files = sorted(str(p) for p in GOLDEN.glob("*.expected.json"))
    assert files
    out = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(out.stdout)
    errors = [(r["file"], m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []
    assert out.returncode == 0


def test_the_r4_validator_refuses_r4b_only_elements(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None
    bad = tmp_path / "bad.json"
    # Encounter.plannedStartDate exists in R5 only; gender "M" breaks a required binding.
    bad.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "gender": "M"}},
        {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Encounter", "status": "finished",
         "class": {"code": "IMP"}, "plannedStartDate": "2026-01-01"}}]}))
    out = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), str(bad)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1
    locations = {m["location"] for r in json.loads(out.stdout)["results"] for m in r["messages"]
                 if m["severity"] == "error"}
    assert {"Patient.gender", "Encounter.plannedStartDate"} <= locations


# --- command line -----------------------------------------------------------------------


def test_map_from_fhir_prints_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = inpatient_records(1, seed=9)[0]
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(map_record(record), ensure_ascii=False), encoding="utf-8")
    assert main(["map", "--from", "fhir", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert _mapped_values(printed) == _mapped_values(record)


def test_map_a_folder_summarises_and_names_refusals(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for i, record in enumerate(inpatient_records(3, seed=9)):
        (tmp_path / f"r{i}.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "bad.json").write_text(json.dumps(
        {"dataset": "WS445.10", "elements": {"HDSD00.11.014": "20250230"}}), encoding="utf-8")
    assert main(["map", "--from", "ws445", "--check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "4 files: 3 mapped, 1 refused" in err
    assert "HDSD00.11.014" in err and "20250230" not in err


def test_mappings_coverage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mappings", "coverage", "--json"]) == 0
    (front,) = [d for d in json.loads(capsys.readouterr().out) if d["dataset"] == "WS445.10"]
    assert front["elements"] == 148
    assert front["mapped"] + len(front["unmapped"]) == 148
    assert all(row["reason"] for row in front["unmapped"])
