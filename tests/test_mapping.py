"""WS 445.10 front sheet -> FHIR R4: every rule, every refusal, and the file loader."""

from __future__ import annotations

import copy
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import LoadError, MappingError, ParseError
from bridge.mapping import (
    load_mapping,
    map_record,
    mapping_for,
    patient_identifiers,
    read_record,
    unused_elements,
)
from bridge.mapping.valuesets import load_valueset, shipped_valuesets
from bridge.resources import mappings_dir
from bridge.samples import id_check_digit, inpatient_records

NOW = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
MAPPING_FILE = mappings_dir() / "ws445" / "inpatient-front-sheet.yaml"
CATALOG_FILE = mappings_dir() / "ws445" / "ws445.10-elements.csv"

# Fee rows and other elements the mapping uses that the generated samples leave empty.
_EXTRA_ELEMENTS = {
    "HDSD00.11.053": "330112345678901",
    "HDSD00.11.146": "120.00",
    "HDSD00.11.130": "300.00",
    "HDSD00.11.129": "900.00",
    "HDSD00.11.055": "450.00",
    "HDSD00.11.136": "80.00",
    "HDSD00.11.134": "60.00",
    "HDSD00.11.115": "700.00",
    "HDSD00.11.111": "500.00",
    "HDSD00.11.112": "90.00",
    "HDSD00.11.113": "110.00",
    "HDSD00.11.114": "70.00",
    "HDSD00.11.038": "40.00",
}


def _surgical() -> dict[str, Any]:
    return copy.deepcopy(next(r for r in inpatient_records(50, seed=4)
                              if len(r["groups"].get("operations", [])) == 2))


@pytest.fixture
def record() -> dict[str, Any]:
    """A surgical stay with every mapped element filled."""
    rec = _surgical()
    rec["elements"].update(_EXTRA_ELEMENTS)
    el = rec["elements"]
    first17 = "330106" + el["HDSD00.11.014"] + ("011" if el["HDSD00.11.109"] == "1" else "022")
    el.update({"HDSD00.11.049": "01", "HDSD00.11.048": first17 + id_check_digit(first17),
               "HDSD00.11.036": "156", "HDSD00.11.077": "01"})
    diagnoses = rec["groups"]["diagnoses"]
    main = next(d for d in diagnoses if "HDSD00.11.023" in d)
    rec["groups"]["diagnoses"] = [
        {"HDSD00.11.075": main["HDSD00.11.023"], "HDSD00.11.076": main["HDSD00.11.024"]},
        main,
        {"HDSD00.11.020": "I10.x00", "HDSD00.11.021": "高血压", "HDSD00.11.022": "1"},
    ]
    return rec


def _res(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def _one(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    (resource,) = _res(bundle, rtype)
    return resource


def _mapping_error(rec: dict[str, Any], secret: str | None = None) -> MappingError:
    with pytest.raises(MappingError) as info:
        map_record(rec, now=NOW)
    if secret is not None:
        assert secret not in str(info.value)
        assert secret not in repr(info.value.to_operation_outcome())
    return info.value


# --- every rule ---------------------------------------------------------------------


def test_every_mapped_element_changes_the_output(record: dict[str, Any]) -> None:
    """Each element the mapping claims to use is live: dropping it changes the Bundle
    (or, for required elements, is refused naming that element)."""
    spec = mapping_for("WS445.10")
    baseline = map_record(record, now=NOW)
    present: set[str] = set(record["elements"])
    for items in record["groups"].values():
        for item in items:
            present |= set(item)
    missing = spec.used_elements - present
    assert not missing, f"fixture does not exercise {sorted(missing)}"
    for eid in sorted(spec.used_elements):
        changed = copy.deepcopy(record)
        changed["elements"].pop(eid, None)
        for items in changed["groups"].values():
            for item in items:
                item.pop(eid, None)
        try:
            out = map_record(changed, now=NOW)
        except MappingError as exc:
            # Required elements are refused by name; a fee row whose part is still
            # present is named as the missing parent of that part.
            assert eid in str(exc)
            continue
        assert out != baseline, eid


def test_patient(record: dict[str, Any]) -> None:
    el = record["elements"]
    patient = _one(map_record(record, now=NOW), "Patient")
    assert patient["name"] == [{"use": "official", "text": el["HDSD00.11.110"]}]
    assert patient["gender"] == {"1": "male", "2": "female"}[el["HDSD00.11.109"]]
    original = patient["_gender"]["extension"][0]["valueCoding"]
    assert original["system"] == "urn:oid:2.16.156.10011.2.3.3.4"
    assert original["code"] == el["HDSD00.11.109"]
    b = el["HDSD00.11.014"]
    assert patient["birthDate"] == f"{b[:4]}-{b[4:6]}-{b[6:]}"
    assert patient["telecom"] == [{"system": "phone", "value": el["HDSD00.11.026"]}]
    (address,) = patient["address"]
    assert address["state"] == el["HDSD00.11.102"]
    assert address["city"] == el["HDSD00.11.103"]
    assert address["district"] == el["HDSD00.11.104"]
    assert address["line"] == [el["HDSD00.11.105"], el["HDSD00.11.100"], el["HDSD00.11.101"]]
    assert address["postalCode"] == el["HDSD00.11.106"]
    systems = [c["system"] for c in patient["maritalStatus"]["coding"]]
    assert systems[-1] == "urn:oid:2.16.156.10011.2.3.3.5"
    assert systems[0] in ("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                          "http://terminology.hl7.org/CodeSystem/v3-NullFlavor")
    ext = {e["url"].rsplit("/", 1)[1]: e["valueCoding"] for e in patient["extension"]}
    assert ext["ethnicity"]["code"] == el["HDSD00.11.077"]
    assert ext["occupation"]["code"] == el["HDSD00.11.125"]
    assert ext["nationality"] == {"system": "urn:oid:2.16.156.10011.2.3.3.1", "code": "156",
                                  "display": "中国"}
    org = _one(map_record(record, now=NOW), "Organization")
    assert patient["managingOrganization"] == {"reference": f"urn:uuid:{org['id']}"}


def test_patient_identifiers_follow_the_contract(record: dict[str, Any]) -> None:
    el = record["elements"]
    pairs = patient_identifiers(map_record(record, now=NOW))
    assert pairs == [
        ("urn:oid:2.16.156.10011.1.3", el["HDSD00.11.048"]),
        ("urn:oid:2.16.156.10011.1.12", el["HDSD00.11.140"]),
        ("urn:oid:2.16.156.10011.1.13", el["HDSD00.11.006"]),
        ("urn:oid:2.16.156.10011.1.19", el["HDSD00.11.053"]),
    ]


def test_other_identity_documents_keep_their_type(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.049"] = "3"  # one digit: padded to the N2 code 03
    record["elements"]["HDSD00.11.048"] = "E12345678"
    patient = _one(map_record(record, now=NOW), "Patient")
    doc = patient["identifier"][0]
    assert doc["system"] == "urn:ws-fhir-bridge:id-document"
    assert doc["value"] == "E12345678"
    assert doc["type"]["coding"][0]["code"] == "03"
    assert doc["type"]["coding"][0]["display"] == "护照"
    assert "urn:oid:2.16.156.10011.1.3" not in [i["system"] for i in patient["identifier"]]


def test_encounter(record: dict[str, Any]) -> None:
    el = record["elements"]
    bundle = map_record(record, now=NOW)
    enc = _one(bundle, "Encounter")
    assert enc["status"] == "finished"
    assert enc["class"]["code"] == "IMP"
    a = el["HDSD00.11.085"]
    assert enc["period"]["start"] == (
        f"{a[:4]}-{a[4:6]}-{a[6:8]}T{a[9:11]}:{a[11:13]}:{a[13:15]}+08:00")
    assert enc["period"]["end"].endswith("+08:00")
    assert enc["length"] == {"value": int(el["HDSD00.11.087"]), "unit": "d",
                             "system": "http://unitsofmeasure.org", "code": "d"}
    admit = enc["hospitalization"]["admitSource"]["coding"][0]
    assert admit["system"] == "urn:oid:2.16.156.10011.2.3.1.270"
    assert admit["code"] == el["HDSD00.11.086"]
    discharge = enc["hospitalization"]["dischargeDisposition"]["coding"][0]
    assert discharge["system"] == "urn:oid:2.16.156.10011.2.3.1.265"
    assert discharge["code"] == el["HDSD00.11.057"]
    admission, leaving = enc["location"]
    assert admission["location"]["display"] == el["HDSD00.11.084"]
    assert admission["location"]["identifier"]["value"] == el["HDSD00.11.083"]
    assert leaving["location"]["display"] == el["HDSD00.11.018"]
    assert leaving["location"]["identifier"]["value"] == el["HDSD00.11.017"]
    uses = [d["use"]["coding"][0]["code"] for d in enc["diagnosis"]]
    assert uses == ["AD", "DD", "DD"]
    assert [d.get("rank") for d in enc["diagnosis"]] == [None, 1, None]


def test_conditions_and_claim_diagnoses(record: dict[str, Any]) -> None:
    bundle = map_record(record, now=NOW)
    conditions = _res(bundle, "Condition")
    codes = [c["code"]["coding"][0] for c in conditions]
    assert all(c["system"] == "urn:oid:2.16.156.10011.2.3.3.11" for c in codes)
    assert codes[2] == {"system": "urn:oid:2.16.156.10011.2.3.3.11", "code": "I10.x00",
                        "display": "高血压"}
    claim = _one(bundle, "Claim")
    kinds = [d["type"][0]["coding"][0]["code"] for d in claim["diagnosis"]]
    assert kinds == ["admitting", "principal", "discharge"]
    assert [d["sequence"] for d in claim["diagnosis"]] == [1, 2, 3]
    assert [d["diagnosisReference"]["reference"] for d in claim["diagnosis"]] == [
        f"urn:uuid:{c['id']}" for c in conditions]
    assert "onAdmission" not in claim["diagnosis"][0]
    on_admission = claim["diagnosis"][2]["onAdmission"]["coding"][0]
    assert on_admission == {"system": "urn:oid:2.16.156.10011.2.3.1.253", "code": "1",
                            "display": "有"}


def test_procedures_and_surgeons(record: dict[str, Any]) -> None:
    bundle = map_record(record, now=NOW)
    ops = record["groups"]["operations"]
    procedures = _res(bundle, "Procedure")
    practitioners = {p["id"]: p for p in _res(bundle, "Practitioner")}
    assert len(procedures) == len(ops)
    for op, proc in zip(ops, procedures, strict=True):
        assert proc["status"] == "completed"
        assert proc["code"]["coding"] == [{"system": "urn:oid:2.16.156.10011.2.3.3.12",
                                           "code": op["HDSD00.11.089"],
                                           "display": op["HDSD00.11.090"]}]
        actor = proc["performer"][0]["actor"]["reference"].removeprefix("urn:uuid:")
        assert practitioners[actor]["name"] == [{"text": op["HDSD00.11.094"]}]
        ext = {e["url"].rsplit("/", 1)[1]: e["valueCoding"]["code"] for e in proc["extension"]}
        assert ext == {"operation-level": op["HDSD00.11.092"],
                       "incision-class": op["HDSD00.11.093"],
                       "anaesthesia-method": op["HDSD00.11.073"]}
    claim = _one(bundle, "Claim")
    assert [p["procedureReference"]["reference"] for p in claim["procedure"]] == [
        f"urn:uuid:{p['id']}" for p in procedures]


def test_same_surgeon_twice_is_one_practitioner(record: dict[str, Any]) -> None:
    ops = record["groups"]["operations"]
    ops[1]["HDSD00.11.094"] = ops[0]["HDSD00.11.094"]
    bundle = map_record(record, now=NOW)
    assert len(_res(bundle, "Practitioner")) == 1


def test_coverage_and_claim(record: dict[str, Any]) -> None:
    el = record["elements"]
    record["elements"]["HDSD00.11.117"] = "1"  # source systems drop the N2 padding
    bundle = map_record(record, now=NOW)
    coverage = _one(bundle, "Coverage")
    assert coverage["type"]["coding"] == [{"system": "urn:oid:2.16.156.10011.2.3.1.269",
                                           "code": "01", "display": "城镇职工基本医疗保险"}]
    assert coverage["payor"][0]["identifier"]["value"] == "01"
    assert coverage["costToBeneficiary"] == [
        {"valueMoney": {"value": float(el["HDSD00.11.143"]), "currency": "CNY"}}]
    claim = _one(bundle, "Claim")
    assert (claim["status"], claim["use"]) == ("active", "claim")
    assert claim["type"]["coding"][0]["code"] == "institutional"
    assert claim["created"] == "2026-03-01T00:00:00+00:00"
    assert claim["total"] == {"value": float(el["HDSD00.11.142"]), "currency": "CNY"}
    assert claim["insurance"] == [{"sequence": 1, "focal": True,
                                   "coverage": {"reference": f"urn:uuid:{coverage['id']}"}}]
    rows = {i["productOrService"]["coding"][0]["code"]: i for i in claim["item"]}
    assert rows["HDSD00.11.115"]["category"]["coding"][0] == {
        "system": "urn:ws-fhir-bridge:ws445:fee-class", "code": "8", "display": "血液和血液制品类"}
    details = [d["productOrService"]["coding"][0]["code"] for d in rows["HDSD00.11.131"]["detail"]]
    assert details == ["HDSD00.11.132", "HDSD00.11.133"]
    assert rows["HDSD00.11.129"]["detail"][0]["net"] == {"value": 300, "currency": "CNY"}
    assert "HDSD00.11.099" not in rows


def test_self_pay_means_the_patient_pays(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.117"] = "07"
    bundle = map_record(record, now=NOW)
    patient = _one(bundle, "Patient")
    assert _one(bundle, "Coverage")["payor"] == [{"reference": f"urn:uuid:{patient['id']}"}]


def test_zero_fee_rows_are_left_out(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.055"] = "0.00"
    claim = _one(map_record(record, now=NOW), "Claim")
    assert "HDSD00.11.055" not in [i["productOrService"]["coding"][0]["code"] for i in claim["item"]]


def test_without_a_clock_the_claim_date_is_the_discharge_time(record: dict[str, Any]) -> None:
    claim = _one(map_record(record), "Claim")
    assert claim["created"] == claim["billablePeriod"]["end"]


def test_naive_clock_is_refused(record: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        map_record(record, now=datetime(2026, 3, 1))


def test_numbers_are_accepted_for_numeric_elements(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.142"] = 12345.5
    record["elements"]["HDSD00.11.087"] = 7
    bundle = map_record(record, now=NOW)
    assert _one(bundle, "Claim")["total"]["value"] == 12345.5
    assert _one(bundle, "Encounter")["length"]["value"] == 7


# --- refusals: precise, and never the value ------------------------------------------


def test_unknown_element_is_refused_by_id(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.999"] = "秘密值"
    err = _mapping_error(record, "秘密值")
    assert err.location == "HDSD00.11.999"


def test_group_element_at_top_level_is_refused(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.023"] = "B20.900"
    err = _mapping_error(record, "B20.900")
    assert err.location == "HDSD00.11.023"


def test_element_in_the_wrong_group_is_refused(record: dict[str, Any]) -> None:
    record["groups"]["operations"][0]["HDSD00.11.023"] = "B20.900"
    err = _mapping_error(record, "B20.900")
    assert err.location == "HDSD00.11.023"


def test_unknown_group_is_refused(record: dict[str, Any]) -> None:
    record["groups"]["transfusions"] = []
    assert _mapping_error(record).location == "$.groups.transfusions"


def test_wrong_dataset_is_refused(record: dict[str, Any]) -> None:
    record["dataset"] = "WS445.99"
    assert _mapping_error(record).location == "$.dataset"


@pytest.mark.parametrize(
    ("eid", "bad"),
    [("HDSD00.11.109", "7"), ("HDSD00.11.050", "77"), ("HDSD00.11.117", "55"),
     ("HDSD00.11.049", "88"), ("HDSD00.11.086", "7"), ("HDSD00.11.057", "8"),
     ("HDSD00.11.077", "73"), ("HDSD00.11.036", "999")],
)
def test_code_not_in_value_set_names_the_element(record: dict[str, Any], eid: str, bad: str) -> None:
    record["elements"][eid] = bad
    err = _mapping_error(record, bad)
    assert err.location == eid


def test_invalid_icd10_in_a_group_names_item_and_element(record: dict[str, Any]) -> None:
    record["groups"]["diagnoses"][1]["HDSD00.11.023"] = "ZZZZ"
    err = _mapping_error(record, "ZZZZ")
    assert err.location == "$.groups.diagnoses[1] HDSD00.11.023"


def test_invalid_procedure_code_and_operation_codes(record: dict[str, Any]) -> None:
    bad = copy.deepcopy(record)
    bad["groups"]["operations"][0]["HDSD00.11.089"] = "9X.1"
    assert _mapping_error(bad, "9X.1").location == "$.groups.operations[0] HDSD00.11.089"
    bad = copy.deepcopy(record)
    bad["groups"]["operations"][1]["HDSD00.11.093"] = "7"
    assert _mapping_error(bad).location == "$.groups.operations[1] HDSD00.11.093"


@pytest.mark.parametrize("eid", ["HDSD00.11.110", "HDSD00.11.048", "HDSD00.11.085",
                                 "HDSD00.11.140", "HDSD00.11.119", "HDSD00.11.142"])
def test_missing_required_element_is_named(record: dict[str, Any], eid: str) -> None:
    del record["elements"][eid]
    assert eid in (_mapping_error(record).location or "")


def test_identity_number_without_its_type_is_refused(record: dict[str, Any]) -> None:
    del record["elements"]["HDSD00.11.049"]
    assert _mapping_error(record, record["elements"]["HDSD00.11.048"]).location == "HDSD00.11.049"


def test_empty_string_counts_as_missing(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.110"] = ""
    assert _mapping_error(record).location == "HDSD00.11.110"


def test_missing_operation_code_names_the_item(record: dict[str, Any]) -> None:
    del record["groups"]["operations"][1]["HDSD00.11.089"]
    assert _mapping_error(record).location == "$.groups.operations[1] HDSD00.11.089"


def test_diagnosis_item_needs_exactly_one_kind(record: dict[str, Any]) -> None:
    record["groups"]["diagnoses"][2]["HDSD00.11.023"] = "J18.900"
    assert _mapping_error(record, "J18.900").location == (
        "$.groups.diagnoses[2] HDSD00.11.023|HDSD00.11.020|HDSD00.11.075")
    record["groups"]["diagnoses"] = []
    assert _mapping_error(record).location == "$.groups.diagnoses"


@pytest.mark.parametrize(
    ("eid", "bad"),
    [("HDSD00.11.110", "欧阳" * 26),            # A..50
     ("HDSD00.11.140", "ZY2026000000000001X"),  # AN..18
     ("HDSD00.11.048", "3301061990010100111"),  # AN..18
     ("HDSD00.11.119", "470112356"),            # AN10 (exactly 10)
     ("HDSD00.11.106", "3100511"),              # N6
     ("HDSD00.11.087", "12345"),                # N..4
     ("HDSD00.11.142", "123456789.123"),        # N..10,2
     ("HDSD00.11.142", "12345678901.00"),       # N..10,2
     ("HDSD00.11.106", "31005A")],              # N6 digits only
)
def test_declared_format_is_enforced(record: dict[str, Any], eid: str, bad: str) -> None:
    record["elements"][eid] = bad
    assert _mapping_error(record, bad).location == eid


@pytest.mark.parametrize(
    ("eid", "bad"),
    [("HDSD00.11.014", "19900230"), ("HDSD00.11.014", "1990-01-01"),
     ("HDSD00.11.085", "20260231T100000"), ("HDSD00.11.085", "20260301T250000"),
     ("HDSD00.11.019", "20260301 100000"), ("HDSD00.11.085", "20260301")],
)
def test_impossible_or_malformed_dates_are_refused(record: dict[str, Any], eid: str, bad: str) -> None:
    record["elements"][eid] = bad
    assert _mapping_error(record, bad).location == eid


def test_discharge_before_admission_and_birth_after_admission_are_refused(
    record: dict[str, Any],
) -> None:
    bad = copy.deepcopy(record)
    bad["elements"]["HDSD00.11.019"] = "20200101T080000"
    assert _mapping_error(bad, "20200101").location == "HDSD00.11.019"
    bad = copy.deepcopy(record)
    bad["elements"]["HDSD00.11.014"] = "20991231"
    assert _mapping_error(bad, "20991231").location == "HDSD00.11.085"


def test_fee_part_without_its_row_is_refused(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.129"] = "0.00"
    assert _mapping_error(record).location == "HDSD00.11.130"


def test_boolean_elements_take_t_or_f(record: dict[str, Any]) -> None:
    record["elements"]["HDSD00.11.116"] = "Y"
    assert _mapping_error(record, "Y").location == "HDSD00.11.116"
    record["elements"]["HDSD00.11.116"] = True
    map_record(record, now=NOW)


def test_patient_identifiers_needs_a_patient() -> None:
    with pytest.raises(MappingError):
        patient_identifiers({"resourceType": "Bundle", "type": "collection", "entry": []})


# --- read_record ------------------------------------------------------------------------


def test_read_record_round_trip(record: dict[str, Any]) -> None:
    import json

    data = json.dumps(record, ensure_ascii=False).encode("utf-8")
    assert read_record(data) == record
    assert read_record(data.decode("utf-8")) == record


def test_read_record_malformed_json_names_line_and_column() -> None:
    text = '{\n  "dataset": "WS445.10",\n  "elements": {"HDSD00.11.110": "张三",}\n}'
    with pytest.raises(ParseError) as info:
        read_record(text, source="front.json")
    assert info.value.location is not None
    assert info.value.location.startswith("front.json:3:")
    assert "张三" not in str(info.value)


def test_read_record_not_utf8() -> None:
    with pytest.raises(ParseError):
        read_record("{\"dataset\": \"张三\"}".encode("gbk"))


@pytest.mark.parametrize(
    ("doc", "where"),
    [("[]", "$"),
     ('{"dataset": 1, "elements": {}}', "$.dataset"),
     ('{"dataset": "WS445.10", "elements": []}', "$.elements"),
     ('{"dataset": "WS445.10", "elements": {"HDSD00.11.110": ["张三"]}}',
      "$.elements.HDSD00.11.110"),
     ('{"dataset": "WS445.10", "elements": {}, "groups": {"diagnoses": {}}}', "$.groups.diagnoses"),
     ('{"dataset": "WS445.10", "elements": {}, "groups": {"diagnoses": [1]}}',
      "$.groups.diagnoses[0]"),
     ('{"dataset": "WS445.10", "elements": {}, "extra": 1}', "$.extra")],
)
def test_read_record_shape_errors_name_the_path(doc: str, where: str) -> None:
    with pytest.raises(ParseError) as info:
        read_record(doc, source="in.json")
    assert info.value.location == f"in.json {where}"
    assert "张三" not in str(info.value)


# --- mapping files ----------------------------------------------------------------------


def test_unused_elements_are_reported_with_reasons(record: dict[str, Any]) -> None:
    unused = dict(unused_elements(record))
    assert "HDSD00.11.141" in unused          # resident physician signature
    assert "HDSD00.11.074" in unused          # anaesthetist, inside the operations group
    assert "HDSD00.11.110" not in unused
    assert all(reason for reason in unused.values())
    bundle_text = str(map_record(record, now=NOW))
    assert record["elements"]["HDSD00.11.141"] not in bundle_text


def test_shipped_mapping_header_and_coverage() -> None:
    spec = mapping_for("WS445.10")
    assert spec.header["target"]["version"] == "4.0.1"
    assert spec.header["source"]["dataset"] == "WS445.10"
    coverage = spec.coverage()
    mapped = {eid for eid, _ in coverage["mapped"]}
    unmapped = {eid for eid, _ in coverage["unmapped"]}
    assert not mapped & unmapped
    assert len(mapped | unmapped) == len(spec.catalog.elements) == 148
    assert all(reason for _, reason in coverage["unmapped"])


def _broken(tmp_path: Path, old: str, new: str) -> tuple[Path, int]:
    """Copy the shipped mapping with one change; return the file and the changed line."""
    text = MAPPING_FILE.read_text(encoding="utf-8")
    assert text.count(old) >= 1, old
    index = text.index(old)
    line = text.count("\n", 0, index) + 1
    target = tmp_path / "broken.yaml"
    target.write_text(text[:index] + new + text[index + len(old):], encoding="utf-8")
    shutil.copy(CATALOG_FILE, tmp_path / CATALOG_FILE.name)
    return target, line


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [("Organization.name: {source: HDSD00.11.118, transform: string, required: true}",
      "Organization.name: {source: HDSD00.11.118, transform: strng, required: true}", "transform"),
     ("Organization.name: {source: HDSD00.11.118, transform: string, required: true}",
      "Organization.name: {source: HDSD00.11.118, transform: string, requird: true}", "requird"),
     ("Organization.name: {source: HDSD00.11.118, transform: string, required: true}",
      "Organization.name: {source: HDSD00.11.918, transform: string, required: true}", "source"),
     ("valueset: gbt2261-2-marital-status}", "valueset: no-such-set}", "valueset"),
     ("output: target_code, required: true}", "output: shout, required: true}", "output"),
     ("  HDSD00.11.003: \"ABO blood group", "  HDSD00.11.110: \"ABO blood group", "HDSD00.11.110"),
     ("when: {source: HDSD00.11.049, in: [\"01\"]}", "when: {source: HDSD00.11.049, is: [\"01\"]}",
      "is"),
     ("system: \"urn:oid:2.16.156.10011.1.5\"", "system: \"not a uri\"", "system"),
     ("id_from: [HDSD00.11.119]", "id_from: []", "id_from"),
     ("Encounter.hospitalization.admitSource:", "Encounter.hospitalisation.admitSource:",
      "Encounter.hospitalisation.admitSource"),
     ("          valueMoney: {source: HDSD00.11.143", "          valueMony: {source: HDSD00.11.143",
      "valueMony"),
     ("Patient.birthDate: {source", "Patient.birthDate.year: {source", "Patient.birthDate.year"),
     ("required: true}\n      Patient.telecom", "required: yes-please}\n      Patient.telecom",
      "required")],
)
def test_mapping_file_mistakes_name_file_line_and_key(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    path, line = _broken(tmp_path, old, new)
    with pytest.raises(LoadError) as info:
        load_mapping(path, shipped_valuesets())
    assert info.value.location == f"{path}:{line} {key}"


def test_element_neither_mapped_nor_listed_is_a_load_error(tmp_path: Path) -> None:
    path, _ = _broken(tmp_path, '  HDSD00.11.003: "ABO blood group: clinical detail not needed for a claim"\n', "")
    with pytest.raises(LoadError) as info:
        load_mapping(path, shipped_valuesets())
    assert "HDSD00.11.003" in str(info.value)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path, _line = _broken(tmp_path, "      Organization.name: {source", "      Organization.name: [{source")
    with pytest.raises(LoadError) as info:
        load_mapping(path, shipped_valuesets())
    assert info.value.location is not None
    assert info.value.location.startswith(f"{path}:")


def test_duplicate_key_is_a_load_error(tmp_path: Path) -> None:
    path, line = _broken(tmp_path, "      Organization.name:",
                         "      Organization.name: {value: x}\n      Organization.name:")
    with pytest.raises(LoadError) as info:
        load_mapping(path, shipped_valuesets())
    assert info.value.location == f"{path}:{line + 1} Organization.name"


def test_valueset_file_mistakes_name_line_and_key(tmp_path: Path) -> None:
    source = mappings_dir() / "valuesets" / "gbt2261-1-sex.yaml"
    text = source.read_text(encoding="utf-8")
    bad = tmp_path / "gbt2261-1-sex.yaml"
    bad.write_text(text.replace("equivalence: wider", "equivalence: roughly", 1), encoding="utf-8")
    line = text[: text.index("equivalence: wider")].count("\n") + 1
    with pytest.raises(LoadError) as info:
        load_valueset(bad)
    assert info.value.location == f"{bad}:{line} equivalence"
    bad.write_text(text.replace('code: "1"', 'code: "2"', 1), encoding="utf-8")
    with pytest.raises(LoadError) as info:
        load_valueset(bad)
    assert info.value.location is not None and info.value.location.endswith(" code")


def test_shipped_valuesets_are_consistent() -> None:
    valuesets = shipped_valuesets()
    for vs in valuesets.values():
        assert vs.system.startswith(("urn:oid:", "urn:ws-fhir-bridge:"))
    sex = valuesets["gbt2261-1-sex"]
    assert {c.code: c.target for c in sex.concepts.values()} == {
        "0": "unknown", "1": "male", "2": "female", "9": "unknown"}
    assert all(len(code) == 2 for code in valuesets["cv07-10-005-payment-method"].concepts)


# --- validation cache -----------------------------------------------------------------


def _patient(**changes: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {
        "resourceType": "Patient", "id": "0b9c2f8e-0000-5000-8000-000000000001",
        "identifier": [{"system": "urn:oid:2.16.156.10011.1.3", "value": "11010519491231002X"}],
        "name": [{"use": "official", "text": "张三"}], "gender": "male",
        "birthDate": "1949-12-31",
    }
    patient.update(changes)
    return patient


@pytest.mark.parametrize(
    "changes",
    [{"gender": "bogus"},                      # a code checked against its required binding
     {"birthDate": "1949-02-30"},              # same shape as a valid date, impossible day
     {"birthDate": "1949-12-31T10:00:00"},     # a dateTime where a date belongs
     {"name": [{"use": "official", "text": ""}]},
     {"id": "not an id with spaces"},
     {"identifier": [{"system": "urn:oid:2.16.156.10011.1.3", "value": ""}]}],
)
def test_validation_cache_never_passes_what_full_validation_refuses(changes: dict[str, Any]) -> None:
    from bridge.errors import ValidationError
    from bridge.mapping.engine import validate_cached

    validate_cached(_patient(), "Bundle.entry[1].resource")
    validate_cached(_patient(name=[{"use": "official", "text": "李四"}]), "Bundle.entry[1].resource")
    with pytest.raises(ValidationError):
        validate_cached(_patient(**changes), "Bundle.entry[1].resource")


def test_identical_resources_are_validated_once() -> None:
    from bridge.records.fhir import ValidationCache

    cache = ValidationCache()
    org = {"resourceType": "Organization", "identifier": [
        {"system": "urn:oid:2.16.156.10011.1.5", "value": "47011235-7"}], "name": "医院"}
    cache.validate(org)
    size = len(cache)
    cache.validate(copy.deepcopy(org))
    assert len(cache) == size


def test_mapping_room_is_free_of_io_libraries() -> None:
    import subprocess
    import sys

    code = ("import sys; import bridge.mapping, bridge.samples; "
            "from bridge.mapping import map_record; from bridge.samples import inpatient_records; "
            "map_record(inpatient_records(1)[0]); "
            "print(sorted(m for m in ('aiohttp', 'asyncio', 'ssl', 'sqlite3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"
