"""Golden pairs: each HL7 v2 golden message beside the whole FHIR R4 Bundle it becomes.

``tests/golden/hl7v2/<name>.hl7`` is read with the HL7 v2 room's ``read_hl7`` and its DE
record mapped with ``map_record``; the Bundle must equal ``<name>.expected.fhir.json``
as a whole document, nothing masked. ``map_record`` is called without ``now``: the data
sets these messages map to (WS 445.2, .3, .4, .12, .15) have no element taken from the
clock, so the Bundle depends on the message alone.

DFT^P03 messages carry only the fee part of a 住院病案首页 (WS 445.10); the mapping
refuses such a record because a front sheet needs its diagnoses, so they have no FHIR
golden. A test below pins that down, so that the day the mapping accepts them the
missing goldens are noticed.

Set REGEN_GOLDEN=1 to rewrite the expected Bundles from the current mappings; review
the change as a diff before committing it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import MappingError
from bridge.mapping import map_record
from bridge.mapping.hl7v2 import read_hl7

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "hl7v2"
SUFFIX = ".expected.fhir.json"
MESSAGES = sorted(p.stem for p in GOLDEN.glob("*.hl7"))
# Message types whose DE record is not a whole data set record and does not map to FHIR.
FEE_ONLY = ("dft_p03",)
CASES = [name for name in MESSAGES if name.split("-")[0] not in FEE_ONLY]


def _dump(data: object) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def _bundle(name: str) -> dict[str, Any]:
    return map_record(read_hl7((GOLDEN / f"{name}.hl7").read_bytes()))


@pytest.mark.parametrize("name", CASES)
def test_golden_fhir(name: str) -> None:
    bundle = _bundle(name)
    expected_path = GOLDEN / f"{name}{SUFFIX}"
    if os.environ.get("REGEN_GOLDEN") == "1":
        expected_path.write_text(_dump(bundle), encoding="utf-8")
    assert bundle == json.loads(expected_path.read_text(encoding="utf-8"))


def test_every_mappable_message_has_a_fhir_golden_and_fee_only_ones_are_refused() -> None:
    goldens = sorted(p.name.removesuffix(SUFFIX) for p in GOLDEN.glob(f"*{SUFFIX}"))
    assert goldens == CASES
    per_type: dict[str, int] = {}
    for name in CASES:
        per_type[name.split("-")[0]] = per_type.get(name.split("-")[0], 0) + 1
    assert min(per_type.values()) >= 5, per_type
    refused = [name for name in MESSAGES if name not in CASES]
    assert refused
    for name in refused:
        record = read_hl7((GOLDEN / f"{name}.hl7").read_bytes())
        with pytest.raises(MappingError) as info:
            map_record(record)
        assert info.value.location == "$.groups.diagnoses", name


def test_fhir_goldens_pass_the_independent_r4_validator() -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    assert (ROOT / "node_modules" / "fhir" / "package.json").is_file(), (
        "run `npm ci` at the repository root")
    files = [str(GOLDEN / f"{name}{SUFFIX}") for name in CASES]
    run = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(run.stdout)
    assert sorted(r["file"] for r in report["results"]) == sorted(files)
    errors = [(Path(r["file"]).name, m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []
    assert run.returncode == 0
