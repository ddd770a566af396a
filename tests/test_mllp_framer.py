"""The MLLP framer, MSH reader and fallback ACK: bytes in, messages out, no sockets."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.errors import ConflictError, MappingError, ParseError
from bridge.link.mllp_framer import (
    FrameTooLarge,
    MLLPFramer,
    build_fallback_ack,
    error_location,
    frame,
    read_msh,
)

NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)

ADT = (
    "MSH|^~\\&|HIS|HOSP-A^2.16.156.10011.1.5^ISO|BRIDGE|HOSP-A|20260301083000+0800||ADT^A01^ADT_A01|"
    "MSG00001|P|2.5||||||UNICODE UTF-8\r"
    "EVN|A01|20260301083000+0800\r"
    "PID|1||1234567^^^HOSP-A^MR||张^三||19800101|M\r"
    "PV1|1|I|W01^101^1\r"
).encode()
ORU = b"MSH|^~\\&|LIS|HOSP-A|BRIDGE|HOSP-A|20260301090000||ORU^R01|LAB-77|P|2.5\rOBX|1|NM|GLU||5.4\r"


def test_whole_in_halves_and_one_byte_at_a_time_give_the_same_message() -> None:
    wire = frame(ADT)
    assert MLLPFramer().feed(wire) == [ADT]
    f = MLLPFramer()
    half = len(wire) // 2
    assert f.feed(wire[:half]) == []
    assert f.in_frame
    assert f.feed(wire[half:]) == [ADT]
    f = MLLPFramer()
    out: list[bytes] = []
    for i in range(len(wire)):
        out += f.feed(wire[i : i + 1])
    assert out == [ADT]
    assert not f.in_frame and f.discarded_bytes == 0


def test_split_between_fs_and_cr_is_not_a_message_yet() -> None:
    wire = frame(ADT)
    f = MLLPFramer()
    assert f.feed(wire[:-1]) == []  # FS arrived, CR not yet
    assert f.feed(wire[-1:]) == [ADT]


def test_several_messages_in_one_chunk_come_out_in_order() -> None:
    wire = frame(ADT) + frame(ORU) + frame(ADT)
    assert MLLPFramer().feed(wire) == [ADT, ORU, ADT]


def test_bytes_outside_frames_are_discarded_and_counted() -> None:
    f = MLLPFramer()
    noise = b"\r\nGET / HTTP/1.1\r\n"
    assert f.feed(noise + frame(ADT) + b"xx" + frame(ORU) + b"\x1c\r") == [ADT, ORU]
    assert f.discarded_bytes == len(noise) + 2 + 2


def test_a_new_start_block_abandons_the_partial_frame() -> None:
    f = MLLPFramer()
    assert f.feed(b"\x0bMSH|partial" + frame(ORU)) == [ORU]
    assert f.aborted_frames == 1


def test_fs_not_followed_by_cr_is_content() -> None:
    body = b"MSH|^~\\&|A|B\x1cC"
    assert MLLPFramer().feed(b"\x0b" + body + b"\x1c\r") == [body]
    f = MLLPFramer()
    assert f.feed(b"\x0bMSH|^~\\&|A|B\x1c") == []
    assert f.feed(b"C\x1c\r") == [body]


def test_empty_frames_are_not_messages() -> None:
    f = MLLPFramer()
    assert f.feed(b"\x0b\x1c\r" + frame(ORU)) == [ORU]
    assert f.empty_frames == 1


def test_oversized_frame_raises_then_resynchronises_on_the_next_start_block() -> None:
    f = MLLPFramer(max_message_bytes=len(ORU))
    big = frame(ORU + b"OBX|2|NM|GLU||5.5\r")
    with pytest.raises(FrameTooLarge) as info:
        f.feed(frame(ORU) + big + frame(ORU))
    err = info.value
    assert err.messages == [ORU]  # what completed before the oversized frame
    assert err.head.startswith(b"MSH|") and err.ack_code == "AR"
    assert f.feed(b"") == [ORU]  # what followed it
    assert f.oversized_frames == 1
    assert f.buffered == 0


def test_oversized_frame_is_detected_before_it_ends_and_memory_stays_bounded() -> None:
    f = MLLPFramer(max_message_bytes=100)
    events = f.events(b"\x0b" + b"A" * 60)
    assert events == []
    events = f.events(b"B" * 60)
    assert len(events) == 1 and isinstance(events[0], FrameTooLarge)
    assert f.buffered == 0
    # The rest of the oversized frame is noise until the next start block.
    assert f.events(b"C" * 500 + b"\x1c\r") == []
    assert f.events(frame(b"MSH|ok")) == [b"MSH|ok"]


def test_oversized_frame_byte_by_byte_gives_one_error() -> None:
    f = MLLPFramer(max_message_bytes=10)
    events = []
    for b in frame(ORU) + frame(b"MSH|small"):
        events += f.events(bytes([b]))
    assert [type(e) for e in events] == [FrameTooLarge, bytes]
    assert events[1] == b"MSH|small"


@given(st.lists(st.binary(min_size=1, max_size=200).filter(lambda b: b"\x0b" not in b and b"\x1c" not in b),
                min_size=1, max_size=5),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20))
def test_any_chunking_yields_the_same_messages(messages: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(frame(m) for m in messages)
    f = MLLPFramer()
    out: list[bytes] = []
    i = 0
    for size in cuts * (len(wire) // max(1, sum(cuts)) + 1):
        out += f.feed(wire[i : i + size])
        i += size
    out += f.feed(wire[i:])
    assert out == messages


def test_frame_refuses_content_that_would_break_framing() -> None:
    with pytest.raises(ValueError):
        frame(b"MSH|\x0b")
    with pytest.raises(ValueError):
        frame(b"MSH|\x1c\r")


def test_framer_module_is_free_of_io_imports() -> None:
    code = (
        "import sys, bridge.link.mllp_framer\n"
        "bad = {'asyncio', 'aiohttp', 'ssl', 'sqlite3'} & set(sys.modules)\n"
        "print(sorted(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


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


# --- fallback ACK -------------------------------------------------------------------------


def segments(ack: bytes) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s]


def test_fallback_aa_ack_addresses_the_sender() -> None:
    ack = build_fallback_ack(read_msh(ADT), "AA", now=NOW)
    msh, msa = segments(ack)
    assert msh[2:6] == ["BRIDGE", "HOSP-A", "HIS", "HOSP-A^2.16.156.10011.1.5^ISO"]
    assert msh[6] == "20260301083000+0800"
    assert msh[8] == "ACK^A01^ACK" and msh[11] == "2.5" and msh[17] == "UNICODE UTF-8"
    assert msa == ["MSA", "AA", "MSG00001"]
    assert build_fallback_ack(read_msh(ADT), "AA", now=NOW) == ack  # deterministic


def test_fallback_error_ack_names_location_not_value() -> None:
    err = MappingError("birth date is not a valid date", location="PID-7")
    ack = build_fallback_ack(read_msh(ADT), "AE", error=err, now=NOW)
    _msh, msa, er = segments(ack)
    assert msa == ["MSA", "AE", "MSG00001"]
    assert er[2] == "PID^1^7^1" and er[3] == "102^Data type error^HL70357" and er[4] == "E"
    assert "PID-7" in er[8] and "19800101" not in ack.decode()


def test_fallback_ack_without_any_header() -> None:
    ack = build_fallback_ack(None, "AR", error=ParseError("no MSH", location="MSH"), now=NOW)
    msh, msa, er = segments(ack)
    assert msh[0] == "MSH" and msa == ["MSA", "AR", ""]
    assert er[3].startswith("100^")


def test_explicit_hl7_code_wins() -> None:
    err = MappingError("code not in table", location="PV1[1]-2", hl7_code="103")
    er = segments(build_fallback_ack(read_msh(ORU), "AE", error=err, now=NOW))[2]
    assert er[3] == "103^Table value not found^HL70357" and er[2] == "PV1^1^2^1"


def test_conflict_is_205_and_delimiters_in_text_are_escaped() -> None:
    err = ConflictError("duplicate control id with different content | again", location="MSH-10")
    ack = build_fallback_ack(read_msh(ORU), "AE", error=err, now=NOW)
    er = segments(ack)[2]
    assert er[3].startswith("205^") and "\\F\\" in er[8] and er[2] == "MSH^1^10^1"


def test_error_location_forms() -> None:
    assert error_location("PID-5.1") == "PID^1^5^1^1"
    assert error_location("OBX[2]-5") == "OBX^2^5^1"
    assert error_location("PID[1]-5[2].1") == "PID^1^5^2^1"
    assert error_location("MSH") == "MSH^1"
    assert error_location("HDSD00.11.023") == ""
    assert error_location(None) == ""
