"""Review (stop30): a WS 445.16 referral whose 今后治疗方案 (HDSD00.01.565, AN..200) is
blank text (a space, an ideographic space, a tab) maps to ``ServiceRequest.note[0].text``
= "" (the element check normalises it to "" and ``present: true`` still holds). Since
9a55627 validation refuses the empty string, so map_record fails with "not valid FHIR R4:
an empty value ... (at Bundle.entry[7].resource.note[0].text)": the bridge's own mapping
writes an empty value. (Before, the record mapped and the note went out as "", which a
partner's receiver refuses.) A blank free-text element should be left out like an
absent one, or refused as the DE element, not as FHIR the bridge wrote.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest

from bridge.mapping import map_record
from bridge.samples_documents import referral_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize("blank", [" ", "\u3000", "\t"])
def test_blank_free_text_does_not_make_an_empty_fhir_value(blank: str) -> None:
    record = next(r for r in referral_records(2, seed=1)
                  if "HDSD00.01.565" in r["elements"])
    record = copy.deepcopy(record)
    record["elements"]["HDSD00.01.565"] = blank
    collection = map_record(record, now=NOW)
    for entry in collection["entry"]:
        for note in entry["resource"].get("note") or []:
            assert note.get("text")


def test_a_blank_required_element_is_named_as_missing() -> None:
    """Blank text where a required element belongs is refused as that data element
    missing (the HIS's own terms), not as an empty FHIR value the bridge wrote."""
    from bridge.errors import MappingError
    from bridge.samples import inpatient_records

    record = copy.deepcopy(inpatient_records(1, seed=3)[0])
    record["elements"]["HDSD00.11.118"] = " \u3000 "
    with pytest.raises(MappingError) as info:
        map_record(record, now=NOW)
    assert info.value.location == "HDSD00.11.118"
    assert "missing" in str(info.value)
