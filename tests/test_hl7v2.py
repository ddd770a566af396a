"""HL7 v2 ingest: framing, character sets, validation, refusals without values, ACKs."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import LoadError, MappingError, ParseError
from bridge.mapping.hl7v2 import build_ack, hl7_to_record, parse_hl7, read_hl7, read_msh
from bridge.mapping.hl7v2.spec import hl7_valuesets, load_message_mapping

GOLDEN = Path(__file__).parent / "golden" / "hl7v2"
NOW = datetime(2026, 3, 1, 0, 30, tzinfo=UTC)
ADT = (GOLDEN / "adt_a01-01.hl7").read_bytes()


def _segments(data: bytes = ADT) -> list[bytes]:
    return [s for s in data.split(b"\r") if s]


def _replace(segment: str, field: int, value: str, data: bytes = ADT) -> bytes:
    """``data`` with field ``field`` of the first ``segment`` set to ``value`` (UTF-8)."""
    out = []
    done = False
    for seg in _segments(data):
        text = seg.decode("utf-8")
        if not done and text.startswith(segment + "|"):
            fields = text.split("|")
            index = field - 1 if segment == "MSH" else field
            fields += [""] * (index + 1 - len(fields))
            fields[index] = value
            text = "|".join(fields)
            done = True
        out.append(text.encode("utf-8"))
    return b"\r".join(out) + b"\r"


def _refusal(data: bytes) -> MappingError | ParseError:
    with pytest.raises((MappingError, ParseError)) as info:
        read_hl7(data)
    return info.value


# --- framing and character sets -------------------------------------------------------


@pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"])
def test_segment_separators_give_the_same_record(sep: bytes) -> None:
    assert read_hl7(sep.join(_segments())) == read_hl7(ADT)


def test_message_in_mllp_frame_and_as_text() -> None:
    assert read_hl7(b"\x0b" + ADT + b"\x1c\r") == read_hl7(ADT)
    assert read_hl7(ADT.decode("utf-8")) == read_hl7(ADT)


def test_header_fields() -> None:
    msg = parse_hl7(ADT)
    assert (msg.message_type, msg.version, msg.control_id, msg.charset) == (
        "ADT^A01", "2.5", "A0100001", "UNICODE UTF-8")
    assert msg.sending_application == "HIS"
    assert msg.sending_facility == "杭州市滨江区第一人民医院"
    assert [s.name for s in msg.segments][:4] == ["MSH", "EVN", "PID", "PV1"]


def test_gbk_message_declared_gb18030_decodes() -> None:
    text = ADT.decode("utf-8").replace("UNICODE UTF-8", "GB 18030")
    record = read_hl7(text.encode("gbk"))
    assert record == read_hl7(ADT)
    assert parse_hl7(text.encode("gbk")).charset == "GB 18030"


def _trail_byte_char(codec: str, trail: str) -> str:
    """A CJK character whose two-byte ``codec`` form ends in the delimiter ``trail``."""
    return next(ch for ch in map(chr, range(0x4E00, 0x9FA6))
                if len(b := ch.encode(codec)) == 2 and b[1] == ord(trail))


@pytest.mark.parametrize("codec,charset", [("gbk", "GBK"), ("gb18030", "GB 18030-2000")])
@pytest.mark.parametrize("trail", ["|", "^", "~", "\\"])
def test_multibyte_characters_holding_a_delimiter_byte_are_read_whole(
        codec: str, charset: str, trail: str) -> None:
    ch = _trail_byte_char(codec, trail)
    text = ADT.decode("utf-8").replace("UNICODE UTF-8", charset)
    text = text.replace("杭州市滨江区第一人民医院", f"{ch}莞市人民醫院", 1).replace("王", ch, 1)
    data = text.encode(codec)
    assert ch.encode(codec)[1:] == trail.encode() and trail.encode() in data.split(b"\r")[0][9:]
    msg = parse_hl7(data)
    assert msg.charset == charset and msg.control_id == "A0100001"
    assert msg.sending_facility == f"{ch}莞市人民醫院"
    assert msg.get("PID-5.1") == ch
    header = read_msh(data)
    assert (header.charset, header.control_id, header.type_and_event, header.version) == (
        charset, "A0100001", "ADT^A01", "2.5")
    assert header.facility_id == f"{ch}莞市人民醫院"


def _with_pid5(value: str, charset: str = "UNICODE UTF-8", codec: str = "utf-8") -> bytes:
    text = ("MSH|^~\\&|HIS|H|B|H|20260301||ADT^A01|E-1|P|2.5||||||" + charset + "\r"
            "PID|1||123^^^H^MR||" + value + "||19800101|M\r")
    return text.encode(codec)


@pytest.mark.parametrize("sent,read", [
    ("\\F\\\\S\\\\T\\\\R\\\\E\\", "|^&~\\"),
    ("\\XE78E8B\\", "王"),
    ("\\Xe78e8b\\\\X4A\\", "王J"),
    ("\\H\\建\\N\\国", "建国"),
    ("a\\.br\\b\\.ce\\c", "a\nb\nc"),
    ("a\\.sp\\b\\.sp 3\\c", "a\nb\n\n\nc"),
    ("a\\.sk 2\\b\\.sk\\c", "a  b c"),
    ("\\.fi\\a\\.nf\\\\.in +4\\\\.ti -2\\b", "ab"),
])
def test_hl7_escapes_are_read(sent: str, read: str) -> None:
    assert parse_hl7(_with_pid5(sent)).get("PID-5.1") == read


@pytest.mark.parametrize("codec,charset", [("gbk", "GBK"), ("gb18030", "GB 18030-2000")])
def test_hex_escapes_are_bytes_in_the_message_character_set(codec: str, charset: str) -> None:
    hexed = "王".encode(codec).hex().upper()
    message = parse_hl7(_with_pid5(f"\\X{hexed}\\^建国", charset, codec))
    assert (message.get("PID-5.1"), message.get("PID-5.2")) == ("王", "建国")
    # A tab and line breaks are text.
    message = parse_hl7(_with_pid5("王\\X09\\建\\X0D0A\\国", charset, codec))
    assert message.get("PID-5.1") == "王\t建\r\n国"


@pytest.mark.parametrize("sent", [
    "\\Z42\\王",  # locally defined
    "\\C2842\\王",  # ISO 2022 single-byte character set switch
    "\\M244142\\王",  # ISO 2022 multi-byte character set switch
    "\\Q\\王",  # no such escape
    "\\\\王",  # empty escape
    "\\XE78E\\王",  # hex data that is not a whole character
    "\\XE7G\\王",  # not hex
    "\\XFF\\王",  # not UTF-8
    "王\\X00\\王",  # NUL: no text, and FHIR strings may not hold it
    "王\\X1C\\王",  # an MLLP framing byte
    "王\\X0B\\王",  # the other one
    "王\\X7F\\王",  # DEL
    "\\.sp 999\\王",  # far more line breaks than a text field can mean
    "王\\F",  # no closing escape character
])
def test_unreadable_escapes_are_refused_naming_the_field_not_the_value(sent: str) -> None:
    message = parse_hl7(_with_pid5(sent))
    with pytest.raises(MappingError) as info:
        message.get("PID-5.1")
    assert str(info.value.location).startswith("PID[1]-5[1].1")
    assert info.value.detail["hl7_code"] == "102"
    assert "王" not in str(info.value) and sent not in str(info.value)


def test_gbk_bytes_declared_utf8_name_msh18_and_field() -> None:
    data = ADT.decode("utf-8").encode("gbk")  # MSH-18 still says UNICODE UTF-8
    err = _refusal(data)
    assert isinstance(err, ParseError)
    assert "MSH-18" in str(err)
    # The first Chinese byte is in MSH-4 (the hospital's name).
    assert err.location == "MSH[1]-4"


def test_utf8_bytes_declared_gbk_are_refused_naming_the_field() -> None:
    text = ADT.decode("utf-8").replace("UNICODE UTF-8", "GBK")
    head, _, rest = text.partition("\r")
    # Keep MSH decodable in both so that the failure is in PID.
    head = head.replace("杭州市滨江区第一人民医院", "HZBJ1")
    data = (head + "\r").encode("utf-8") + rest.replace("王", "\U0001f600").encode("utf-8")
    err = _refusal(data)
    assert isinstance(err, ParseError) and "MSH-18" in str(err)
    assert err.location is not None and err.location.startswith("PID[1]-")


def test_unknown_charset_and_missing_msh() -> None:
    assert isinstance(_refusal(_replace("MSH", 18, "KOI8-R")), ParseError)
    err = _refusal(b"\r".join(_segments()[1:]))
    assert isinstance(err, ParseError) and err.location == "MSH"
    assert isinstance(_refusal(b"MSH"), ParseError)


# --- validation and mapping refusals --------------------------------------------------


def test_missing_pid_names_pid() -> None:
    data = b"\r".join(s for s in _segments() if not s.startswith(b"PID"))
    err = _refusal(data)
    assert isinstance(err, MappingError)
    assert err.location == "PID[1]" and err.detail["hl7_code"] == "100"


def test_required_field_missing() -> None:
    err = _refusal(_replace("PV1", 2, ""))
    assert err.location == "PV1[1]-2" and err.detail["hl7_code"] == "101"


def test_over_length_field_names_component() -> None:
    err = _refusal(_replace("PV1", 10, "心" * 21))  # IS: at most 20 characters
    assert err.location == "PV1[1]-10" and err.detail["hl7_code"] == "102"
    name = "^".join(["王" * 200, "建国"])
    err = _refusal(_replace("PID", 5, name))  # ST: at most 199
    assert err.location == "PID[1]-5[1].1.1"


def test_impossible_date_is_refused() -> None:
    err = _refusal(_replace("PID", 7, "20260230"))
    assert err.location == "PID[1]-7.1" and err.detail["hl7_code"] == "102"
    assert "20260230" not in str(err)


def test_unknown_sex_code() -> None:
    err = _refusal(_replace("PID", 8, "X"))
    assert err.location == "PID[1]-8" and err.detail["hl7_code"] == "103"
    assert "hl70001-sex" in str(err)


def test_unknown_diagnosis_code_names_the_repetition() -> None:
    data = ADT.replace(b"I10.x00^", b"NOTICD^")
    err = _refusal(data)
    assert err.location == "DG1[2]-3.1"


def test_target_format_is_enforced() -> None:
    # 病房号 (HDSD00.13.002) is AN..10: an 11-character room passes HL7 (IS 20) but not WS 445.
    data = _replace("PV1", 3, "心内科一病区^0501050105A^12")
    err = _refusal(data)
    assert err.location == "PV1[1]-3.2" and "HDSD00.13.002" in str(err)


@pytest.mark.parametrize("data,value", [
    (_replace("PID", 7, "20260230"), "20260230"),
    (_replace("PID", 8, "X"), None),
    (_replace("PV1", 10, "心" * 21), "心" * 21),
    (ADT.decode("utf-8").encode("gbk"), None),
    (_replace("PID", 5, "王" * 200 + "^建国"), "王" * 200),
])
def test_errors_never_carry_the_value(data: bytes, value: str | None) -> None:
    err = _refusal(data)
    text = str(err) + repr(err.to_operation_outcome())
    for secret in ("王建国", "330106198503124512", "13905710001", "文三路", value or "王建国"):
        assert secret not in text


def test_unsupported_type_and_version() -> None:
    err = _refusal(_replace("MSH", 9, "ADT^A40^ADT_A39"))
    assert err.detail["hl7_code"] == "200"
    err = _refusal(_replace("MSH", 12, "2.8"))
    assert err.detail["hl7_code"] == "203"


def test_a08_follows_the_patient_class() -> None:
    inpatient = read_hl7((GOLDEN / "adt_a08-01.hl7").read_bytes())
    outpatient = read_hl7((GOLDEN / "adt_a08-02.hl7").read_bytes())
    assert (inpatient["dataset"], outpatient["dataset"]) == ("WS445.12", "WS445.2")
    data = _replace("PV1", 2, "X", (GOLDEN / "adt_a08-01.hl7").read_bytes())
    assert _refusal(data).location == "PV1[1]-2"


def test_fee_rows_sum_per_category() -> None:
    record = read_hl7((GOLDEN / "dft_p03-01.hl7").read_bytes())["elements"]
    assert record["HDSD00.11.131"] == "9800.00"  # 麻醉 1200 + 手术 8600, both "of which"
    assert record["HDSD00.11.132"] == "1200.00" and record["HDSD00.11.133"] == "8600.00"
    assert record["HDSD00.11.099"] == "420.00" and record["HDSD00.11.098"] == "2280.50"
    assert record["HDSD00.11.142"] == "23020.50"


def test_parse_then_map_equals_read() -> None:
    assert hl7_to_record(parse_hl7(ADT)) == read_hl7(ADT)


# --- ACKs -----------------------------------------------------------------------------


def test_ack_accept_v25() -> None:
    ack = build_ack(parse_hl7(ADT), "AA", now=NOW).decode("utf-8").split("\r")
    assert ack[0].startswith("MSH|^~\\&|FHIRBRIDGE|BRIDGE|HIS|杭州市滨江区第一人民医院^47011235-7^L|"
                              "20260301083000+0800||ACK^A01^ACK|ACKA0100001|P|2.5|")
    assert ack[0].endswith("|UNICODE UTF-8")
    assert ack[1] == "MSA|AA|A0100001"


def test_ack_error_v25_has_err_location_and_code() -> None:
    data = _replace("PID", 8, "X")
    err = _refusal(data)
    ack = build_ack(data, "AE", error=err, now=NOW).decode("utf-8").split("\r")
    assert ack[1] == "MSA|AE|A0100001"
    fields = ack[2].split("|")
    assert fields[2] == "PID^1^8^1"
    assert fields[3] == "103^Table value not found^HL70357"
    assert "X" not in fields[8].split()


def test_ack_error_v24_uses_err1_and_gbk() -> None:
    data = (GOLDEN / "adt_a01-02.hl7").read_bytes().decode("utf-8")
    data = data.replace("UNICODE UTF-8", "GB 18030").replace("|F|||", "|Q|||", 1)
    raw = data.encode("gb18030")
    err = _refusal(raw)
    ack = build_ack(raw, "AE", error=err, now=NOW)
    text = ack.decode("gb18030").split("\r")
    assert "|2.4|" in text[0] and text[0].endswith("|GB 18030")
    assert text[2] == "ERR|PID^1^8^103&Table value not found&HL70357"
    with pytest.raises(UnicodeDecodeError):
        ack.decode("utf-8")  # the hospital name in MSH-5 is GB 18030, as received


def test_ack_for_unparseable_bytes() -> None:
    data = ADT.decode("utf-8").encode("gbk")
    err = _refusal(data)
    ack = build_ack(data, "AR", error=err, now=NOW).decode("utf-8", "replace").split("\r")
    assert ack[1] == "MSA|AR|A0100001"
    assert ack[2].split("|")[2] == "MSH^1^4^1"


def test_ack_requires_aware_clock() -> None:
    with pytest.raises(ValueError):
        build_ack(ADT, "AA", now=datetime(2026, 3, 1))


# --- mapping files --------------------------------------------------------------------


def test_mapping_file_errors_name_file_line_and_key(tmp_path: Path) -> None:
    good = (Path(__file__).parents[1] / "mappings/hl7v2/messages/ADT_A01.yaml").read_text(
        encoding="utf-8")
    cases = {
        "HDSD00.13.039: {path: [PID-5.1, PID-5.2]": "HDSD00.13.039: {path: [PID-5.1, PID-5.2], bogus: 1",
        "transform: ts_to_dt15}\n    - {path: EVN-2": "transform: ts_to_dt16}\n    - {path: EVN-2",
        "valueset: hl70001-sex": "valueset: no-such-set",
        "HDSD00.13.045: {path: PV1-10": "HDSD00.13.045: {path: PV1.10",
        "HDSD00.13.003:": "HDSD00.99.003:",
    }
    for old, new in cases.items():
        assert old in good
        path = tmp_path / "ADT_A01.yaml"
        path.write_text(good.replace(old, new), encoding="utf-8")
        with pytest.raises(LoadError) as info:
            load_message_mapping(path, hl7_valuesets())
        line = next(i for i, text in enumerate(good.replace(old, new).splitlines(), 1)
                    if new.split("\n")[0] in text)
        assert info.value.location is not None
        assert info.value.location.startswith(f"{path}:{line} "), (old, info.value.location)


def test_core_imports_no_asyncio() -> None:
    code = ("import sys, bridge.mapping.hl7v2 as m; m.read_hl7(open(sys.argv[1],'rb').read());"
            "print(sorted(k for k in ('asyncio','aiohttp','ssl') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(GOLDEN / "adt_a01-01.hl7")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# --- properties -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_bridge_errors(data: bytes) -> None:
    for candidate in (data, b"MSH|^~\\&|" + data):
        try:
            read_hl7(candidate)
        except (ParseError, MappingError):
            pass


_MESSAGES = [p.read_bytes() for p in sorted(GOLDEN.glob("*.hl7"))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_MESSAGES), st.lists(
    st.tuples(st.integers(0, 4000), st.integers(0, 8), st.binary(max_size=6)), max_size=4))
def test_mutated_messages_raise_only_bridge_errors(
        message: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    data = bytearray(message)
    for pos, cut, insert in edits:
        pos %= len(data) + 1
        data[pos:pos + cut] = insert
    try:
        record = read_hl7(bytes(data))
    except (ParseError, MappingError) as exc:
        assert exc.location is None or len(exc.location) < 80
        return
    assert set(record) == {"dataset", "elements", "groups"}


def test_ack_for_an_error_raised_outside_the_room() -> None:
    err = MappingError("value not accepted here", location="OBX-5.1")
    ack = build_ack(ADT, "AE", error=err, now=NOW).decode("utf-8").split("\r")
    assert ack[2].split("|")[2:4] == ["OBX^1^5^1^1", "102^Data type error^HL70357"]


# --- outpatient visit time ------------------------------------------------------------


def test_outpatient_visit_time_is_the_end_of_the_visit() -> None:
    """就诊日期时间 (WS 445.2) is when the visit ended: PV1-45, never the registration PV1-44."""
    data = (GOLDEN / "adt_a04-01.hl7").read_bytes()
    record = read_hl7(data)
    assert record["elements"]["HDSD00.03.023"] == "20260302T093500"
    later = _replace("PV1", 45, "20260302114000", data)
    assert read_hl7(later)["elements"]["HDSD00.03.023"] == "20260302T114000"


@pytest.mark.parametrize("name", ["adt_a04-01", "adt_a08-02"])
def test_registration_without_visit_end_is_refused_naming_pv1_45(name: str) -> None:
    data = _replace("PV1", 45, "", (GOLDEN / f"{name}.hl7").read_bytes())
    err = _refusal(data)
    assert isinstance(err, MappingError)
    assert err.location is not None and err.location.startswith("PV1[1]-45")
    assert err.detail["hl7_code"] == "101"
    assert "HDSD00.03.023" in str(err) and "finished visit" in str(err)
    assert "20260302090500" not in str(err)


# --- prescriptions: 处方编号 and route ---------------------------------------------------


RDE_TWO = (GOLDEN / "rde_o11-02.hl7").read_bytes()  # two orders, no ORC-4, both routes PO


def _set_nth(data: bytes, segment: str, nth: int, field: int, value: str) -> bytes:
    """``data`` with field ``field`` of the ``nth`` ``segment`` set to ``value``."""
    segs = _segments(data)
    index = [i for i, s in enumerate(segs) if s.startswith(segment.encode() + b"|")][nth - 1]
    fields = segs[index].decode("utf-8").split("|")
    fields += [""] * (field + 1 - len(fields))
    fields[field] = value
    segs[index] = "|".join(fields).encode("utf-8")
    return b"\r".join(segs) + b"\r"


def test_prescription_number_from_placer_group_else_first_placer_order() -> None:
    assert read_hl7(RDE_TWO)["elements"]["HDSD00.04.002"] == "202603020001"
    grouped = _set_nth(_set_nth(RDE_TWO, "ORC", 1, 4, "88001"), "ORC", 2, 4, "88001")
    assert read_hl7(grouped)["elements"]["HDSD00.04.002"] == "88001"
    golden = read_hl7((GOLDEN / "rde_o11-06.hl7").read_bytes())["elements"]
    assert golden["HDSD00.04.002"] == "2026032700416"


@pytest.mark.parametrize("second", ["88002", ""])
def test_orders_of_different_prescriptions_are_refused_naming_orc4(second: str) -> None:
    data = _set_nth(_set_nth(RDE_TWO, "ORC", 1, 4, "88001"), "ORC", 2, 4, second)
    err = _refusal(data)
    assert err.location == "ORC[2]-4.1" and err.detail["hl7_code"] == "102"
    assert "HDSD00.04.002" in str(err) and "88001" not in str(err)


def test_route_is_kept_when_every_drug_has_the_same() -> None:
    assert read_hl7(RDE_TWO)["elements"]["HDSD00.04.027"] == "1"
    # The same route written differently (with or without its text) is the same route.
    data = _set_nth(RDE_TWO, "RXR", 2, 1, "PO^口服^HL70162")
    assert read_hl7(data)["elements"]["HDSD00.04.027"] == "1"


def test_drugs_with_different_routes_are_refused_naming_rxr() -> None:
    err = _refusal(_set_nth(RDE_TWO, "RXR", 2, 1, "IV^^HL70162"))
    assert err.location == "RXR[2]-1.1" and err.detail["hl7_code"] == "102"
    assert "HDSD00.04.027" in str(err)


def test_drug_without_rxr_is_refused_naming_its_rxe() -> None:
    segs = _segments(RDE_TWO)
    last_rxr = max(i for i, s in enumerate(segs) if s.startswith(b"RXR|"))
    err = _refusal(b"\r".join(segs[:last_rxr] + segs[last_rxr + 1:]) + b"\r")
    assert err.location == "RXE[2]" and "HDSD00.04.027" in str(err)
    assert err.detail["hl7_code"] == "100"


OMP_TWO = (GOLDEN / "omp_o09-02.hl7").read_bytes()  # rde_o11-02 as the prescriber's order


def test_the_order_as_written_gives_the_record_of_the_order_as_encoded() -> None:
    # OMP^O09 (RXO per drug) and RDE^O11 (RXE per drug) of one prescription are one
    # WS 445.3 record, with the same rules for the prescription number and the route.
    assert read_hl7(OMP_TWO) == read_hl7(RDE_TWO)
    grouped = _set_nth(_set_nth(OMP_TWO, "ORC", 1, 4, "88001"), "ORC", 2, 4, "88001")
    assert read_hl7(grouped)["elements"]["HDSD00.04.002"] == "88001"
    err = _refusal(_set_nth(OMP_TWO, "RXR", 2, 1, "IV^^HL70162"))
    assert err.location == "RXR[2]-1.1" and err.detail["hl7_code"] == "102"
    segs = _segments(OMP_TWO)
    last_rxr = max(i for i, s in enumerate(segs) if s.startswith(b"RXR|"))
    err = _refusal(b"\r".join(segs[:last_rxr] + segs[last_rxr + 1:]) + b"\r")
    assert err.location == "RXO[2]" and "HDSD00.04.027" in str(err)


def test_an_order_without_the_drug_name_is_refused_naming_rxo_1_2() -> None:
    err = _refusal(_set_nth(OMP_TWO, "RXO", 2, 1, "X0002"))
    assert err.location is not None and err.location.startswith("RXO[2]-1")
    assert "HDSD00.04.023" in str(err)


def test_same_in_every_is_checked_when_loaded(tmp_path: Path) -> None:
    good = (Path(__file__).parents[1] / "mappings/hl7v2/messages/RDE_O11.yaml").read_text(
        encoding="utf-8")
    bad = {
        "    each: RXE\n": "    each: rxe\n",
        "    same_in_every: true\n    each": "    same_in_every: false\n    each",
        "HDSD00.04.023: {path: RXE-2.2, transform: string, required: true}":
            "HDSD00.04.023: {path: RXE-2.2, transform: string, same_in_every: true}",
    }
    for old, new in bad.items():
        assert old in good
        path = tmp_path / "RDE_O11.yaml"
        path.write_text(good.replace(old, new), encoding="utf-8")
        with pytest.raises(LoadError):
            load_message_mapping(path, hl7_valuesets())
