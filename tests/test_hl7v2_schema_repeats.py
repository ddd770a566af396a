"""Checking messages whose fields repeat from one message to the next.

An HIS sends the same names, codes and dates in every message of a stay, and the
definitions check of a field text already found faultless is not repeated. These tests
pin what that must never change: a text is judged again wherever its meaning differs.
"""

from __future__ import annotations

import pytest

from bridge.errors import MappingError
from bridge.mapping.hl7v2 import parse_hl7
from bridge.mapping.hl7v2.schema import validate

MSH = "MSH|^~\\&|HIS|H|BR|B|20260301083000||ADT^A01^ADT_A01|{cid}|P|2.5"


def _msg(cid: str, *segments: str) -> object:
    return parse_hl7("\r".join([MSH.format(cid=cid), *segments]) + "\r")


def test_a_text_accepted_in_one_field_is_refused_in_a_field_it_breaks() -> None:
    validate(_msg("1", "EVN|A01|20260301083000"), None)  # "A01": a fine event type code
    with pytest.raises(MappingError) as info:
        validate(_msg("2", "EVN|A01|A01"), None)  # the same text as a date/time
    assert info.value.location.startswith("EVN")
    assert "-2" in info.value.location
    assert "DTM" in info.value.message


def test_obx_value_is_judged_by_the_type_obx2_names_each_time() -> None:
    validate(_msg("3", "OBX|1|ST|8867-4^Heart rate^LN||seventy||||||F"), None)
    with pytest.raises(MappingError) as info:
        validate(_msg("4", "OBX|1|NM|8867-4^Heart rate^LN||seventy||||||F"), None)
    assert "OBX" in (info.value.location or "") and "-5" in (info.value.location or "")
    assert "NM" in info.value.message


def test_a_broken_field_is_refused_every_time_it_is_sent() -> None:
    for cid in ("5", "6"):
        with pytest.raises(MappingError) as info:
            validate(_msg(cid, "EVN|A01|2026130108"), None)  # month 13
        assert "DTM" in info.value.message


def test_a_faultless_field_stays_accepted_when_sent_again() -> None:
    for cid in ("7", "8"):
        validate(_msg(cid, "EVN|A01|20260301083000", "PID|1||330106198503124512^^^X^NNCHN||WANG^JIANGUO"),
                 None)
