"""Visit assembly as pure code: the messages of one visit in, one record out.

Golden visits (``tests/golden/visits/<name>/``: the messages of one stay, as an HIS
sends them, beside ``<name>.expected.json``, the assembled record) are assembled from
their messages in any order and with any duplicates, and must give the same record.
Set REGEN_GOLDEN=1 to rewrite the expected records; review the diff.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hl7_feeds import Charge, InpatientVisit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import MappingError
from bridge.mapping import map_record
from bridge.mapping.hl7v2 import HL7Reader, parse_hl7
from bridge.mapping.hl7v2.visit import (
    VisitPart,
    VisitSummary,
    adopt_parts,
    assemble,
    check_filing,
    upgrade_part,
)

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden" / "visits"
VISITS = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
READER = HL7Reader()


def parts_of(name: str) -> list[VisitPart]:
    out = []
    for path in sorted((GOLDEN / name).glob("*.hl7")):
        taken = READER.intake(path.read_bytes())
        assert taken.part is not None, path.name
        out.append(taken.part)
    return out


def spec_of(parts: list[VisitPart]) -> Any:
    return READER.visits[parts[0].kind]


@pytest.mark.parametrize("name", VISITS)
def test_golden_visit(name: str) -> None:
    parts = parts_of(name)
    record, _ = assemble(spec_of(parts), parts)
    expected = GOLDEN / f"{name}.expected.json"
    if os.environ.get("REGEN_GOLDEN") == "1":
        expected.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n",
                            encoding="utf-8")
    assert record == json.loads(expected.read_text(encoding="utf-8"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_order_and_any_duplicates_give_the_same_record(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(VISITS))
    parts = parts_of(name)
    spec = spec_of(parts)
    expected, _ = assemble(spec, parts)
    shuffled = data.draw(st.permutations(parts))
    copies = data.draw(st.lists(st.sampled_from(parts), max_size=6))
    mixed = data.draw(st.permutations(list(shuffled) + copies))
    assert assemble(spec, list(mixed))[0] == expected


def test_credits_adjustments_and_payments_change_the_sums_as_hl7_defines() -> None:
    record = json.loads((GOLDEN / "inpatient-01.expected.json").read_text(encoding="utf-8"))
    elements = record["elements"]
    # 西药费: 1860.50 charged, 60.50 credited (sent negative); 抗菌药物 420 of which.
    assert elements["HDSD00.11.098"] == "2220.00" and elements["HDSD00.11.099"] == "420.00"
    # 床位费: 300 charged, -30 adjusted; the 5000 payment is not a charge.
    assert elements["HDSD00.11.147"] == "270.00"
    assert elements["HDSD00.11.142"] == "21450.00"


def test_the_latest_message_wins_and_the_first_discharge_diagnosis_is_principal() -> None:
    record = json.loads((GOLDEN / "inpatient-02.expected.json").read_text(encoding="utf-8"))
    diagnoses = record["groups"]["diagnoses"]
    # DG1-15 was not sent: the first discharge diagnosis is the main one, the admission
    # diagnosis (DG1-6 A) is kept as the outpatient/admission diagnosis.
    assert [sorted(d) for d in diagnoses] == [
        ["HDSD00.11.023", "HDSD00.11.024"], ["HDSD00.11.020", "HDSD00.11.021"],
        ["HDSD00.11.075", "HDSD00.11.076"]]
    assert record["elements"]["HDSD00.11.087"] == "14"  # stay days from the discharge
    assert record["groups"]["operations"][0]["HDSD00.11.089"] == "81.5100"


def test_assembled_records_map_to_fhir_and_pass_the_r4_validator(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    files = []
    for name in VISITS:
        parts = parts_of(name)
        record, _ = assemble(spec_of(parts), parts)
        bundle = map_record(record)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")
        files.append(str(path))
    run = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(run.stdout)
    errors = [(Path(r["file"]).name, m) for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == [] and run.returncode == 0


# --- filing ---------------------------------------------------------------------------------


def _filed(parts: list[VisitPart], days: int = 30) -> VisitSummary | None:
    summary = None
    for part in parts:
        summary = check_filing(READER.visits[part.kind], summary, part, correction_days=days)
    return summary


def test_messages_of_another_patient_are_refused_naming_pid_3() -> None:
    visit = InpatientVisit()
    summary = _filed([READER.intake(visit.a01()).part])  # type: ignore[list-item]
    other = InpatientVisit(mrn="BA9999999")
    part = READER.intake(other.dft("X-1", [Charge("01", "1.00")])).part
    assert part is not None
    with pytest.raises(MappingError) as info:
        check_filing(READER.visits["inpatient"], summary, part, correction_days=30)
    assert info.value.location == "PID[1]-3[3].1"
    assert "HDSD00.11.006 病案号" in info.value.message
    assert "BA9999999" not in str(info.value)


def test_a_discharge_before_the_admission_is_refused_naming_pv1_45() -> None:
    visit = InpatientVisit()
    summary = _filed([READER.intake(visit.a01()).part])  # type: ignore[list-item]
    early = InpatientVisit(admitted="20260201080000", discharged="20260205080000")
    part = READER.intake(early.a03()).part
    assert part is not None
    with pytest.raises(MappingError) as info:
        check_filing(READER.visits["inpatient"], summary, part, correction_days=30)
    assert info.value.location == "PV1[1]-45[1]" and "HDSD00.11.019" in info.value.message


def test_messages_after_the_correction_window_are_refused_naming_msh_7() -> None:
    visit = InpatientVisit()
    summary = _filed([READER.intake(visit.a03()).part])  # type: ignore[list-item]
    late = READER.intake(visit.dft("LATE-1", [Charge("01", "1.00")], ts="20260420080000")).part
    assert late is not None
    with pytest.raises(MappingError) as info:
        check_filing(READER.visits["inpatient"], summary, late, correction_days=30)
    assert info.value.location == "MSH[1]-7"
    within = READER.intake(visit.dft("LATE-2", [Charge("01", "1.00")], ts="20260401080000"))
    assert within.part is not None
    check_filing(READER.visits["inpatient"], summary, within.part, correction_days=30)


def test_a_message_without_a_visit_number_is_refused_naming_pv1_19() -> None:
    visit = InpatientVisit(pid3_visit_code="XX")
    message = visit.dft("NOVISIT-1", [Charge("01", "1.00")]).replace(
        f"|{visit.visit}|01|".encode(), b"||01|")
    with pytest.raises(MappingError) as info:
        READER.intake(parse_hl7(message))
    assert info.value.location == "PID[1]-3[1].1"
    assert "HDSD00.11.140 住院号" in info.value.message and "PV1-19" in info.value.message


def test_a_registration_is_held_and_the_message_with_the_visit_end_completes_it() -> None:
    parts = parts_of("outpatient-01")
    assert [p.completes for p in parts] == [False, True]
    record, _ = assemble(spec_of(parts), parts)
    assert record["dataset"] == "WS445.2"
    assert record["elements"]["HDSD00.03.023"] == "20260302T093500"


def _legacy(part: VisitPart) -> VisitPart:
    """``part`` as a version without transaction ids filed it: every FT1 in ``fees``."""
    fees: dict[str, Decimal] = {e: Decimal(v) for e, v in part.fees.items()}
    for charge in part.charges:
        for row in charge["rows"]:
            fees[row] = fees.get(row, Decimal(0)) + Decimal(charge["amount"])
    return replace(part, charges=[], fees={e: format(v, ".2f") for e, v in fees.items()})


def test_parts_filed_without_transactions_are_taken_over_from_their_messages() -> None:
    visit = InpatientVisit()
    d1 = visit.dft("D1", [Charge("01", "300.00"), Charge("02", "20.00")])
    d1r = visit.dft("D1R", [Charge("01", "300.00"), Charge("02", "20.00")], transactions="D1")
    changed = visit.dft("D2", [Charge("01", "360.00")], transactions="D1")
    taken = [READER.intake(m) for m in (visit.a01(), d1, d1r, changed)]
    spec = taken[0].visit
    assert spec is not None
    parts = [t.part for t in taken]
    assert all(p is not None for p in parts)
    filed = [_legacy(p) for p in parts if p is not None]
    messages = [t.message for t in taken]
    upgraded = [upgrade_part(spec, p, m) for p, m in zip(filed, messages, strict=True)]
    assert [u == p for u, p in zip(upgraded, parts, strict=True)] == [True] * 4
    # The message is gone, or maps to other sums than the part was filed with.
    assert upgrade_part(spec, filed[1], None) is None
    assert upgrade_part(spec, replace(filed[1], fees={"HDSD00.11.142": "1.00"}),
                        messages[1]) is None
    summary = VisitSummary(number=visit.visit)
    after, out = adopt_parts(summary, list(zip(filed, upgraded, strict=True)))
    # D1R repeats D1's transactions (counted once); D2 contradicts one of them, which
    # that version took: it stays as filed, its amount counted once per message.
    assert out == [parts[0], parts[1], parts[2], None]
    assert len(after.charges) == 2
    kept = [p if p is not None else f for p, f in zip(out, filed, strict=True)]
    record, _ = assemble(spec, kept)
    assert record["elements"]["HDSD00.11.142"] == "680.00"  # 320.00 once, 360.00 as filed
