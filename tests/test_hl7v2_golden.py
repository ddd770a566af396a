"""Golden pairs: HL7 v2 messages as Chinese HIS send them beside the whole DE record.

Set REGEN_GOLDEN=1 to rewrite the expected files from the current mappings; review the
change as a diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bridge.mapping.hl7v2 import read_hl7
from bridge.mapping.hl7v2.spec import shipped_mappings

GOLDEN = Path(__file__).parent / "golden" / "hl7v2"
CASES = sorted(p.stem for p in GOLDEN.glob("*.hl7"))


def test_every_message_type_has_three_cases() -> None:
    kinds: dict[str, int] = {}
    for name in CASES:
        kinds[name.split("-")[0]] = kinds.get(name.split("-")[0], 0) + 1
    assert set(kinds) == {"adt_a01", "adt_a03", "adt_a04", "adt_a08", "oru_r01", "rde_o11",
                          "omp_o09", "dft_p03"}
    assert min(kinds.values()) >= 3


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    record = read_hl7((GOLDEN / f"{name}.hl7").read_bytes())
    expected_path = GOLDEN / f"{name}.expected.json"
    if os.environ.get("REGEN_GOLDEN") == "1":
        expected_path.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n",
                                 encoding="utf-8")
    assert record == json.loads(expected_path.read_text(encoding="utf-8"))


def _computed_elements() -> set[str]:
    """Elements whose values come from a code table, a constant, a sum or a computation."""
    out: set[str] = set()
    for spec in shipped_mappings().values():
        rule_sets = list(spec.elements) + [e for g in spec.groups for e in g.elements]
        for er in rule_sets:
            if any(r.transform in ("code", "age_years", "stay_days", "ts_to_dt15", "decimal")
                   or r.value is not None for r in er.rules):
                out.add(er.element)
        if spec.sums is not None:
            out |= set(spec.filled()["elements"][-len(spec.sums.valueset.concepts) - 1:])
            out |= {c.target for c in spec.sums.valueset.concepts.values() if c.target}
            if spec.sums.total:
                out.add(spec.sums.total)
    return out


@pytest.mark.parametrize("name", CASES)
def test_nothing_invented(name: str) -> None:
    """Every value read from the message appears in it (components joined for names)."""
    raw = (GOLDEN / f"{name}.hl7").read_bytes()
    text = raw.decode("gb18030" if b"GB 18030" in raw[:300] else "utf-8")
    joined = text.replace("^", "").replace("&", "").replace("|", "")
    record = read_hl7(raw)
    computed = _computed_elements()
    values = list(record["elements"].items())
    values += [kv for items in record["groups"].values() for item in items for kv in item.items()]
    for key, value in values:
        if key not in computed:
            assert value in joined, key
