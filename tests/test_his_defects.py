"""Feeds written the way real HIS interfaces write them: each defect a site hits on day one.

Each test sends what an HIS sends, through ``bridge map --from hl7v2`` (the command a
hospital integration engineer runs first) or over MLLP with a real socket where the
defect shows there, and checks what the bridge answers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from hl7_feeds import Charge, InpatientVisit, OutpatientVisit

from bridge.cli import main

ORU_GZZS = (
    "MSH|^~\\&|LIS|GZZS|FHIRBRIDGE|BRIDGE|20260306073000||ORU^R01^ORU_R01|R-GZZS-1|P|2.5|||AL|NE|"
    "CHN|UNICODE UTF-8\r"
    "PID|1||330106198503124512^^^公安部^NNCHN~ZY2026000101^^^滨江一院^IPN||王^建国||19850312|M\r"
    "PV1|1|I|心内科一病区^0501^12||||D0012^周^文博|||检验科|||||||||ZY2026000101\r"
    "ORC|RE|SQ20260001|BG20260001\r"
    "OBR|1|SQ20260001|BG20260001|CBC^血常规^L|||20260306073000|||||||20260306075500||||||||"
    "202603061030|||F\r"
    "OBX|1|NM|WBC^白细胞计数^LN||7.85|10*9/L|3.5-9.5|N|||F\r"
).encode()


def bridge_map(tmp_path: Path, message: bytes, *extra: str,
               capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    path = tmp_path / "message.hl7"
    path.write_bytes(message)
    code = main(["map", "--from", "hl7v2", *extra, str(path)])
    out, err = capsys.readouterr()
    return code, (orjson.loads(out) if code == 0 and out.strip() else None), err


def _resource(bundle: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"]
                if e["resource"]["resourceType"] == type_)


def test_discharge_without_attending_doctor_is_a_document_authored_by_the_hospital(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, bundle, err = bridge_map(tmp_path, InpatientVisit().a03(attending=""), capsys=capsys)
    assert code == 0, err
    composition = bundle["entry"][0]["resource"]
    organization = _resource(bundle, "Organization")
    assert composition["author"] == [{"reference": f"urn:uuid:{organization['id']}"}]


@pytest.mark.parametrize("code", ["85.4300", "47.0100x001", "36.06", "36.0"])
def test_operation_codes_of_the_national_editions_are_accepted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], code: str) -> None:
    rc, bundle, err = bridge_map(tmp_path, InpatientVisit().a03(operation=code), capsys=capsys)
    assert rc == 0, err
    procedure = _resource(bundle, "Procedure")
    assert procedure["code"]["coding"][0]["code"] == code


@pytest.mark.parametrize("code", ["85.43000", "47.0100X001", "4701", "85.43x1"])
def test_operation_codes_of_no_edition_are_refused_naming_pr1_3(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], code: str) -> None:
    rc, _bundle, err = bridge_map(tmp_path, InpatientVisit().a03(operation=code), capsys=capsys)
    assert rc == 2
    assert "PR1[1]-3.1" in err and code not in err


def test_dft_reads_ft1_6_as_the_transaction_type_and_credits_are_subtracted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    visit = InpatientVisit()
    charges = [Charge("01", "300.00"), Charge("13", "1860.50"),
               Charge("13", "-60.50", kind="CD"), Charge("01", "100.00", kind="CD"),
               Charge("03", "-20.00", kind="AJ"), Charge("03", "290.00"),
               Charge("01", "999.00", kind="PY")]
    rc, record, err = bridge_map(tmp_path, visit.dft("DFT-1", charges), "--to", "ws445",
                                 capsys=capsys)
    assert rc == 0, err
    elements = record["elements"]
    assert elements["HDSD00.11.147"] == "200.00"  # 床位费 300 less a 100 credit
    assert elements["HDSD00.11.098"] == "1800.00"  # 西药费 less a credit sent negative
    assert elements["HDSD00.11.145"] == "270.00"  # 护理费 with a -20 adjustment
    assert elements["HDSD00.11.142"] == "2270.00"  # payments are not charges


def test_unknown_transaction_type_and_charge_item_are_refused_naming_ft1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    visit = InpatientVisit()
    rc, _, err = bridge_map(tmp_path, visit.dft("DFT-2", [Charge("01", "1.00", kind="ZZ")]),
                            "--to", "ws445", capsys=capsys)
    assert rc == 2 and "FT1[1]-6" in err
    rc, _, err = bridge_map(tmp_path, visit.dft("DFT-3", [Charge("F00001", "1.00")]),
                            "--to", "ws445", capsys=capsys)
    assert rc == 2 and "FT1[1]-7.1" in err and "F00001" not in err


def test_organisation_code_defaults_from_the_configuration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = bridge_map(tmp_path, ORU_GZZS, capsys=capsys)
    assert rc == 2 and "MSH[1]-4" in err  # no configuration: the code is missing at MSH-4.2
    config = tmp_path / "bridge.toml"
    config.write_text('[controller]\nid = "hospital-a"\nname = "示范医院"\n'
                      'organization_code = "47011235-7"\n'
                      '[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
                      '[signing]\ncert = "s.pem"\nkey = "s.key"\n', encoding="utf-8")
    rc, bundle, err = bridge_map(tmp_path, ORU_GZZS, "--config", str(config), capsys=capsys)
    assert rc == 0, err
    organization = _resource(bundle, "Organization")
    assert {"system": "urn:oid:2.16.156.10011.1.5", "value": "47011235-7"} in \
        organization["identifier"]


def test_site_identifier_type_codes_give_the_visit_number(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    visit = InpatientVisit(pid3_visit_code="IN")
    message = visit.a03().replace(f"|{visit.visit}|01|".encode(), b"||01|")  # no PV1-19
    rc, _, err = bridge_map(tmp_path, message, "--to", "ws445", capsys=capsys)
    assert rc == 2 and "PV1-19" in err and "HDSD00.16.052 住院号" in err
    site = tmp_path / "site" / "hl7v2" / "valuesets"
    site.mkdir(parents=True)
    shipped = (Path(__file__).parents[1] / "mappings" / "hl7v2" / "valuesets" /
               "hl70203-identifier-type.yaml").read_text(encoding="utf-8")
    extra = ('  - {code: "IN", display: "住院号 (site)", target: inpatient-number, '
             'equivalence: equivalent}\n')
    (site / "hl70203-identifier-type.yaml").write_text(shipped + extra, encoding="utf-8")
    rc, record, err = bridge_map(tmp_path, message, "--to", "ws445", "--site",
                                 str(tmp_path / "site"), capsys=capsys)
    assert rc == 0, err
    assert record["elements"]["HDSD00.16.052"] == visit.visit


# --- over MLLP ------------------------------------------------------------------------------


async def test_registration_is_accepted_and_held(tmp_path: Path) -> None:
    from test_mllp_listener import PLAIN, exchange, seg, start_bridge

    from bridge.link.mllp_framer import frame

    b = await start_bridge(tmp_path, PLAIN.replace("4096", "1048576"))
    try:
        [ack] = await exchange(b.port, [frame(OutpatientVisit().registration())], 1)
        assert seg(ack, "MSA")[1:3] == ["AA", "O1-A04"]
        assert b.store.hl7_count() == 1
    finally:
        await b.service.stop()


async def test_copies_of_one_message_racing_on_many_connections_are_each_audited(
        tmp_path: Path) -> None:
    from test_mllp_listener import PLAIN, exchange, seg, start_bridge

    from bridge.link.mllp_framer import frame

    b = await start_bridge(tmp_path, PLAIN.replace("4096", "1048576"))
    try:
        message = frame(InpatientVisit().a01("RACE-1"))
        acks = await asyncio.gather(*(exchange(b.port, [message], 1) for _ in range(40)))
        codes = [seg(a, "MSA")[1] for [a] in acks]
        assert codes == ["AA"] * 40
        assert len({a for [a] in acks}) == 1  # the same ACK, byte for byte
        assert b.store.hl7_count() == 1
        answered = [e for e in b.store.audit_entries()
                    if e.record.action in ("hl7.receive", "hl7.duplicate")
                    and e.record.subject.endswith("/RACE-1")]
        assert len(answered) == 40
        assert sum(e.record.action == "hl7.receive" for e in answered) == 1
    finally:
        await b.service.stop()


async def test_a_prescription_order_omp_o09_is_accepted_over_mllp(tmp_path: Path) -> None:
    # OMP^O09 had no mapping and was answered AR with 200; it is the prescriber's order
    # of the WS 445.3 prescription that RDE^O11 encodes, and is kept as that record.
    from test_mllp_listener import PLAIN, exchange, seg, start_bridge

    from bridge.link.mllp_framer import frame

    golden = Path(__file__).parent / "golden" / "hl7v2"
    message = (golden / "omp_o09-02.hl7").read_bytes()
    b = await start_bridge(tmp_path, PLAIN.replace("4096", "1048576"))
    try:
        [ack] = await exchange(b.port, [frame(message)], 1)
        assert seg(ack, "MSA")[1:3] == ["AA", "O0900002"]
        assert b.store.hl7_count() == 1
    finally:
        await b.service.stop()
