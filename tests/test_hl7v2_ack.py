"""MSH read on its own and the one ACK builder of the HL7 v2 room (no sockets)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bridge.errors import ConflictError, MappingError, ParseError
from bridge.link.mllp_framer import frame
from bridge.mapping.hl7v2.ack import build_ack, error_location
from bridge.mapping.hl7v2.header import header_from_fields, read_msh

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)

ADT = (
    "MSH|^~\\&|HIS|HOSP-A^2.16.156.10011.1.5^ISO|BRIDGE|HOSP-A|20260301083000+0800||ADT^A01^ADT_A01|"
    "MSG00001|P|2.5||||||UNICODE UTF-8\r"
    "EVN|A01|20260301083000+0800\r"
    "PID|1||1234567^^^HOSP-A^MR||张^三||19800101|M\r"
    "PV1|1|I|W01^101^1\r"
).encode()
ORU = b"MSH|^~\\&|LIS|HOSP-A|BRIDGE|HOSP-A|20260301090000||ORU^R01|LAB-77|P|2.5\rOBX|1|NM|GLU||5.4\r"


# --- MSH ----------------------------------------------------------------------------------


def test_read_msh_fields() -> None:
    h = read_msh(ADT)
    assert h.sending_application == "HIS"
    assert h.sending_facility == "HOSP-A^2.16.156.10011.1.5^ISO"
    assert h.facility_id == "HOSP-A"
    assert h.message_type == "ADT^A01^ADT_A01" and h.trigger_event == "A01"
    assert h.control_id == "MSG00001" and h.version == "2.5" and h.charset == "UNICODE UTF-8"
    assert h.sender == "HIS|HOSP-A^2.16.156.10011.1.5^ISO"


def test_read_msh_decodes_gb18030_and_other_separators() -> None:
    msg = "MSH#^~\\&#HIS#第一医院#B#C#20260301##ADT^A01#X1#P#2.4######GB 18030-2000\r".encode("gb18030")
    h = read_msh(msg)
    assert h.sending_facility == "第一医院" and h.control_id == "X1" and h.codec == "gb18030"


def test_read_msh_accepts_lf_segment_ends() -> None:
    assert read_msh(ORU.replace(b"\r", b"\n")).control_id == "LAB-77"


@pytest.mark.parametrize(
    ("message", "location"),
    [
        (b"PID|1||x\r", "MSH"),
        (b"", "MSH"),
        (b"MSH|^~\\&|HIS|H|B|C|2026||ADT^A01||P|2.5\r", "MSH-10"),
        (b"MSH|^~\\&|HIS|H|B|C|2026|||X1|P|2.5\r", "MSH-9"),
        (b"MSH|^~\\&|HIS|H|B|C|2026||ADT^A01|X1|P|2.5||||||KLINGON\r", "MSH-18"),
        ("MSH|^~\\&|HIS|第一|B|C|2026||ADT^A01|X1|P|2.5\r".encode("gb18030"), "MSH-4"),
    ],
)
def test_read_msh_errors_name_the_field(message: bytes, location: str) -> None:
    with pytest.raises(ParseError) as info:
        read_msh(message)
    assert info.value.location == location


# --- ACK from MSH alone -------------------------------------------------------------------------


def segments(ack: bytes) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s]


def test_fallback_aa_ack_addresses_the_sender() -> None:
    ack = build_ack(read_msh(ADT), "AA", now=NOW)
    msh, msa = segments(ack)
    assert msh[2:6] == ["BRIDGE", "HOSP-A", "HIS", "HOSP-A^2.16.156.10011.1.5^ISO"]
    assert msh[6] == "20260301083000+0800"
    assert msh[8] == "ACK^A01^ACK" and msh[11] == "2.5" and msh[17] == "UNICODE UTF-8"
    assert msa == ["MSA", "AA", "MSG00001"]
    assert build_ack(read_msh(ADT), "AA", now=NOW) == ack  # deterministic


def test_fallback_error_ack_names_location_not_value() -> None:
    err = MappingError("birth date is not a valid date", location="PID-7")
    ack = build_ack(read_msh(ADT), "AE", error=err, now=NOW)
    _msh, msa, er = segments(ack)
    assert msa == ["MSA", "AE", "MSG00001"]
    assert er[2] == "PID^1^7^1" and er[3] == "102^Data type error^HL70357" and er[4] == "E"
    assert "PID-7" in er[8] and "19800101" not in ack.decode()


def test_fallback_ack_without_any_header() -> None:
    ack = build_ack(None, "AR", error=ParseError("no MSH", location="MSH"), now=NOW)
    msh, msa, er = segments(ack)
    assert msh[0] == "MSH" and msa == ["MSA", "AR", ""]
    assert er[3].startswith("100^")


def test_explicit_hl7_code_wins() -> None:
    err = MappingError("code not in table", location="PV1[1]-2", hl7_code="103")
    er = segments(build_ack(read_msh(ORU), "AE", error=err, now=NOW))[2]
    assert er[3] == "103^Table value not found^HL70357" and er[2] == "PV1^1^2^1"


def test_conflict_is_205_and_delimiters_in_text_are_escaped() -> None:
    err = ConflictError("duplicate control id with different content | again", location="MSH-10")
    ack = build_ack(read_msh(ORU), "AE", error=err, now=NOW)
    er = segments(ack)[2]
    assert er[3].startswith("205^") and "\\F\\" in er[8] and er[2] == "MSH^1^10^1"


def test_error_location_forms() -> None:
    assert error_location("PID-5.1") == "PID^1^5^1^1"
    assert error_location("OBX[2]-5") == "OBX^2^5^1"
    assert error_location("PID[1]-5[2].1") == "PID^1^5^2^1"
    assert error_location("MSH") == "MSH^1"
    assert error_location("HDSD00.11.023") == ""
    assert error_location(None) == ""


@pytest.mark.parametrize("number", [3, 4, 5, 6, 9, 10, 11, 12])
@pytest.mark.parametrize("byte", ["\x0b", "\x1c"])
@pytest.mark.parametrize("code", ["AA", "AE", "AR"])
def test_no_echoed_msh_field_makes_an_ack_unframeable(number: int, byte: str, code: str) -> None:
    fields = ["MSH", "|", "^~\\&", "HIS", "HOSP-A", "BRIDGE", "HOSP-A", "20260301", "",
              "ADT^A01^ADT_A01", "MSG-1", "P", "2.5", "", "", "", "", "", "UNICODE UTF-8"]
    # MSH-9 is echoed by its trigger event (MSH-9.2) only.
    fields[number] = fields[9].replace("A01", "A0" + byte + "1", 1) if number == 9 \
        else fields[number] + byte
    header = header_from_fields(fields, "UNICODE UTF-8")
    error = None if code == "AA" else ParseError("refused", location=f"MSH-{number}")
    ack = build_ack(header, code, error=error, now=NOW)
    assert frame(ack).count(b"\x1c") == 1 and b"\x0b" not in ack
    assert b"\\X%02X\\" % ord(byte) in ack


@pytest.mark.parametrize("delimiters", [("\x1c", "^~\\&"), ("|", "^~\\\x1c"), ("\x0b", "^~\\&")])
def test_framing_bytes_as_delimiters_never_reach_an_ack(delimiters: tuple[str, str]) -> None:
    sep, enc = delimiters
    raw = f"MSH{sep}{enc}{sep}HIS{sep}H{sep}{sep}{sep}2026{sep}{sep}ADT^A01{sep}ID-1{sep}P{sep}2.5"
    with pytest.raises(ParseError):
        read_msh(raw.encode())
    ack = build_ack(raw.encode(), "AR", error=ParseError("bad", location="MSH-1"), now=NOW)
    frame(ack)
    fields = ["MSH", sep, enc, "HIS", "H", "", "", "2026", "", "ADT^A01", "ID-1", "P", "2.5"]
    frame(build_ack(header_from_fields(fields, ""), "AA", now=NOW))


def test_an_unreadable_gbk_msh_never_echoes_a_shifted_field() -> None:
    # 東 is 96 7C in GBK; with a character set the bridge does not read, the bytes are
    # split without decoding and every field after 東 is uncertain: none is echoed.
    raw = "MSH|^~\\&|HIS|東莞^1^L|B|H|2026||ADT^A01|GBK-9|P|2.5||||||KOI8-R".encode("gbk")
    with pytest.raises(ParseError) as info:
        read_msh(raw)
    assert info.value.location == "MSH-18"
    ack = build_ack(raw, "AR", error=info.value, now=NOW)
    msa = segments(ack)[1]
    assert msa[:2] == ["MSA", "AR"] and msa[2] in ("", "GBK-9")
    assert "ADT" not in msa[2] and "2026" not in ack.decode().split("\r")[1]
