"""Values from outside are judged as the whole text, in ASCII digits.

A pattern anchored with ``$`` also matches before a final line break, and ``\\d`` also
takes the digits of other scripts (full-width ``１２``, which a Chinese input method
types, or Arabic-Indic ``١٢``). Neither is a number a WS 445 element, an HL7 v2 field or
a partner's header may carry: each is refused naming where it stood, as the same text
in ASCII digits is accepted.
"""

from __future__ import annotations

import pytest

from bridge.errors import BridgeError, MappingError
from bridge.link.sync import read_sequence
from bridge.mapping.hl7v2 import parse_hl7
from bridge.mapping.hl7v2.schema import validate
from bridge.records.catalog import ws445_catalog

MSH = "MSH|^~\\&|HIS|H|BR|B|20260301083000||ORU^R01^ORU_R01|{cid}|P|2.5"
FULL_WIDTH = "１２"
ARABIC_INDIC = "١٢"


def _hl7(cid: str, *segments: str) -> object:
    return parse_hl7("\r".join([MSH.format(cid=cid), *segments]) + "\r")


@pytest.mark.parametrize("digits", [FULL_WIDTH, ARABIC_INDIC])
def test_ws445_numbers_in_other_scripts_are_refused_naming_the_element(digits: str) -> None:
    catalog = ws445_catalog()
    age = catalog.get("HDSD00.11.079")  # 年龄(岁), N1..3
    total = catalog.get("HDSD00.11.142")  # 住院总费用, N..10,2
    assert age.check("12") == "12" and total.check("12.50") == "12.50"
    with pytest.raises(MappingError) as whole:
        age.check(digits)
    assert whole.value.location == "HDSD00.11.079" and "whole number" in whole.value.message
    with pytest.raises(MappingError) as decimal:
        total.check(f"{digits}.50")
    assert decimal.value.location == "HDSD00.11.142" and "decimal" in decimal.value.message


@pytest.mark.parametrize("digits", [FULL_WIDTH, ARABIC_INDIC])
def test_hl7_numbers_and_dates_in_other_scripts_are_refused_naming_the_field(digits: str) -> None:
    validate(_hl7("1", "OBX|1|NM|8867-4^Heart rate^LN||72||||||F"), None)
    with pytest.raises(MappingError) as nm:
        validate(_hl7("2", f"OBX|1|NM|8867-4^Heart rate^LN||{digits}||||||F"), None)
    assert "OBX" in (nm.value.location or "") and "-5" in (nm.value.location or "")
    assert "NM" in nm.value.message
    with pytest.raises(MappingError) as dtm:
        validate(_hl7("3", f"OBX|1|ST|8867-4^Heart rate^LN||x||||||F|||2026030108{digits}00"),
                 None)
    assert "-14" in (dtm.value.location or "") and "DTM" in dtm.value.message


def test_a_stream_name_ending_in_a_line_break_is_refused_naming_the_header() -> None:
    assert read_sequence({"Bridge-Stream": "claims-to-insurer-b", "Bridge-Sequence": "7"}) == (
        "claims-to-insurer-b", 7)
    with pytest.raises(BridgeError) as info:
        read_sequence({"Bridge-Stream": "claims-to-insurer-b\n", "Bridge-Sequence": "7"})
    assert info.value.location == "Bridge-Stream"
    assert "claims-to-insurer-b" not in str(info.value)
