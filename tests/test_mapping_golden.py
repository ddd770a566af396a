"""Golden pairs: a WS 445.10 record beside the whole FHIR collection it must map to.

Set REGEN_GOLDEN=1 to rewrite the expected files from the current mapping; review the
change as a diff before committing it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.mapping import map_record, read_record
from bridge.samples import inpatient_records

GOLDEN = Path(__file__).parent / "golden" / "ws445"
NOW = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
CASES = [f"inpatient-{i:02d}" for i in range(1, 6)]


def _dump(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False) + "\n"


def _write_inputs() -> None:
    """Pick five distinct sample records covering the cases worth pinning down."""
    GOLDEN.mkdir(parents=True, exist_ok=True)
    records = inpatient_records(400, seed=7)
    sensitive = ("B20", "F32", "C34")
    wanted = [
        lambda r: len(r["groups"].get("operations", [])) == 2,   # two operations
        lambda r: any(d.get("HDSD00.11.023", "")[:3] in sensitive  # sensitive main diagnosis
                      for d in r["groups"]["diagnoses"]),
        lambda r: r["elements"]["HDSD00.11.049"] == "03",         # passport holder
        lambda r: r["elements"]["HDSD00.11.117"] == "07",         # self-paying
        lambda r: "operations" not in r["groups"],                # plain medical stay
    ]
    chosen: list[int] = []
    for test in wanted:
        chosen.append(next(i for i, r in enumerate(records) if i not in chosen and test(r)))
    for name, index in zip(CASES, chosen, strict=True):
        (GOLDEN / f"{name}.input.json").write_text(_dump(records[index]), encoding="utf-8")


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    regen = os.environ.get("REGEN_GOLDEN") == "1"
    source = GOLDEN / f"{name}.input.json"
    if regen and not source.exists():
        _write_inputs()
    record = read_record(source.read_bytes(), source=source.name)
    bundle = map_record(record, now=NOW)
    expected_path = GOLDEN / f"{name}.expected.json"
    if regen:
        expected_path.write_text(_dump(bundle), encoding="utf-8")
    expected = json.loads(expected_path.read_text(encoding="utf-8"))
    assert bundle == expected
