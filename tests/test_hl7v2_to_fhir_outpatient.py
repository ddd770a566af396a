"""End to end from the HIS: HL7 v2 message -> DE record (HL7 v2 room) -> FHIR R4 -> DE record.

The golden HL7 v2 messages of the outpatient data sets are read with the HL7 v2 room's
own reader, mapped with the WS 445 mapping of their data set, validated with the
independent R4 validator, and read back from FHIR to the same mapped elements.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bridge.mapping import map_record, mapping_for, unmap_bundle
from bridge.mapping.engine import check_record
from bridge.mapping.hl7v2 import read_hl7

ROOT = Path(__file__).resolve().parent.parent
HL7 = Path(__file__).parent / "golden" / "hl7v2"
# Message type -> the WS 445 data set its DE record belongs to.
MESSAGES = {"adt_a04": "WS445.2", "oru_r01": "WS445.4", "rde_o11": "WS445.3"}
CASES = sorted(p.name.removesuffix(".hl7") for kind in MESSAGES for p in HL7.glob(f"{kind}-*.hl7"))


def _record(name: str) -> dict[str, Any]:
    return read_hl7((HL7 / f"{name}.hl7").read_bytes())


_DECIMAL = re.compile(r"^-?\d+\.\d+$")


def _same_number(value: Any) -> Any:
    """Numbers compare by value: the HIS pads "0.50", FHIR carries 0.5."""
    if isinstance(value, str) and _DECIMAL.match(value):
        return format(Decimal(value).normalize(), "f")
    return value


def _mapped(record: dict[str, Any]) -> tuple[dict[str, str], dict[str, list[dict[str, str]]]]:
    spec = mapping_for(record["dataset"])
    values, groups = check_record(spec, record)
    return ({k: _same_number(v) for k, v in values.items() if k in spec.used_elements},
            {n: [{k: _same_number(v) for k, v in i.items() if k in spec.used_elements}
                 for i in items]
             for n, items in groups.items() if items})


def test_every_message_type_has_golden_messages() -> None:
    for kind in MESSAGES:
        assert any(c.startswith(kind + "-") for c in CASES), kind


@pytest.mark.parametrize("name", CASES)
def test_hl7_message_maps_to_fhir_and_back(name: str) -> None:
    record = _record(name)
    assert record["dataset"] == MESSAGES[name.split("-")[0]]
    # The HL7 v2 room's own expectation of the record is what this test starts from.
    assert record == json.loads((HL7 / f"{name}.expected.json").read_text(encoding="utf-8"))
    bundle = map_record(record)
    assert bundle["entry"]
    back = unmap_bundle(bundle, dataset=record["dataset"])
    assert _mapped(back) == _mapped(record)


def test_hl7_derived_bundles_validate_against_the_r4_core_definitions(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    files = []
    for name in CASES:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(map_record(_record(name)), ensure_ascii=False), encoding="utf-8")
        files.append(str(path))
    out = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(out.stdout)
    errors = [(r["file"], m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []
    assert len(report["results"]) == len(CASES)
