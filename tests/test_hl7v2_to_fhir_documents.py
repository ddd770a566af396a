"""End to end: HIS ADT^A01 / ADT^A03 -> WS 445.12 / 445.15 DE record -> FHIR R4 document,
validated by the model and by the independent R4 validator, and read back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bridge.mapping import map_record, mapping_for, unmap_bundle
from bridge.mapping.engine import check_record
from bridge.mapping.hl7v2 import read_hl7

ROOT = Path(__file__).resolve().parent.parent
HL7 = Path(__file__).parent / "golden" / "hl7v2"
MESSAGES = sorted(p.name for p in HL7.glob("adt_a0[13]-*.hl7"))


def _document(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    record = read_hl7((HL7 / name).read_bytes())
    return record, map_record(record)


@pytest.mark.parametrize("name", MESSAGES)
def test_admit_and_discharge_messages_become_documents(name: str) -> None:
    record, bundle = _document(name)
    expected = {"adt_a01": ("WS445.12", "C0034"), "adt_a03": ("WS445.15", "C0053")}[name[:7]]
    assert record["dataset"] == expected[0]
    assert bundle["type"] == "document"
    composition = bundle["entry"][0]["resource"]
    assert expected[1] in [c["code"] for c in composition["type"]["coding"]]
    assert composition["author"]
    conditions = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition"]
    assert len(conditions) == len(record["groups"]["diagnoses"])
    entries = {e["reference"] for s in composition["section"] for e in s.get("entry", [])}
    assert {e["fullUrl"] for e in conditions} <= entries
    # The mapped elements come back from the document.
    spec = mapping_for(record["dataset"])
    values, groups = check_record(spec, record)
    back_values, back_groups = check_record(spec, unmap_bundle(bundle))
    assert back_values == {k: v for k, v in values.items() if k in spec.used_elements}
    assert back_groups == groups


def test_admission_and_discharge_of_the_same_stay_share_the_encounter() -> None:
    _, admit = _document("adt_a01-01.hl7")
    _, discharge = _document("adt_a03-01.hl7")
    ids = [{e["resource"]["id"] for e in b["entry"] if e["resource"]["resourceType"] == "Encounter"}
           for b in (admit, discharge)]
    assert ids[0] == ids[1]


def test_hl7_documents_pass_the_independent_r4_validator(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    assert (ROOT / "node_modules" / "fhir" / "package.json").is_file(), "run `npm ci`"
    files = []
    for name in MESSAGES:
        out = tmp_path / f"{name}.json"
        out.write_text(json.dumps(_document(name)[1], ensure_ascii=False), encoding="utf-8")
        files.append(str(out))
    run = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(run.stdout)
    errors = [(r["file"], m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []
    assert run.returncode == 0
