"""The sample records look like a Chinese hospital's front sheets and are reproducible."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime
from decimal import Decimal

from bridge.records.catalog import ws445_catalog
from bridge.samples import hospital_name, hospital_org_code, id_check_digit, inpatient_records

RECORDS = inpatient_records(300, seed=1)
_TOP_FEES = ["HDSD00.11.038", "HDSD00.11.039", "HDSD00.11.040", "HDSD00.11.055", "HDSD00.11.081",
             "HDSD00.11.098", "HDSD00.11.111", "HDSD00.11.112", "HDSD00.11.113", "HDSD00.11.114",
             "HDSD00.11.115", "HDSD00.11.121", "HDSD00.11.122", "HDSD00.11.123", "HDSD00.11.124",
             "HDSD00.11.129", "HDSD00.11.131", "HDSD00.11.134", "HDSD00.11.135", "HDSD00.11.136",
             "HDSD00.11.145", "HDSD00.11.146", "HDSD00.11.147", "HDSD00.11.148"]


def test_same_seed_same_records_other_seed_other_records() -> None:
    assert inpatient_records(20, seed=1) == RECORDS[:20]
    assert inpatient_records(20, seed=2) != RECORDS[:20]


def test_every_value_fits_the_declared_format() -> None:
    catalog = ws445_catalog()
    for record in RECORDS:
        for eid, value in record["elements"].items():
            catalog.get(eid).check(value)
        for items in record["groups"].values():
            for item in items:
                for eid, value in item.items():
                    catalog.get(eid).check(value)


def test_resident_id_numbers_have_valid_check_digits_and_match_birth_and_sex() -> None:
    # Published example from GB 11643: 11010519491231002X.
    assert id_check_digit("11010519491231002") == "X"
    for record in RECORDS:
        el = record["elements"]
        if el["HDSD00.11.049"] != "01":
            continue
        number = el["HDSD00.11.048"]
        assert len(number) == 18
        assert id_check_digit(number[:17]) == number[17]
        assert number[6:14] == el["HDSD00.11.014"]
        assert int(number[16]) % 2 == (1 if el["HDSD00.11.109"] == "1" else 0)


def test_fees_add_up_and_parts_stay_within_their_rows() -> None:
    for record in RECORDS:
        el = record["elements"]
        total = Decimal(el["HDSD00.11.142"])
        assert sum(Decimal(el.get(k, "0")) for k in _TOP_FEES) == total
        assert Decimal(el["HDSD00.11.099"]) <= Decimal(el["HDSD00.11.098"])
        parts = Decimal(el.get("HDSD00.11.132", "0")) + Decimal(el.get("HDSD00.11.133", "0"))
        assert parts <= Decimal(el["HDSD00.11.131"])
        if "HDSD00.11.143" in el:
            assert Decimal(el["HDSD00.11.143"]) <= total


def test_diagnoses_operations_and_sensitive_share() -> None:
    sensitive = 0
    for record in RECORDS:
        diagnoses = record["groups"]["diagnoses"]
        assert 1 <= len(diagnoses) <= 4
        assert sum("HDSD00.11.023" in d for d in diagnoses) == 1
        assert len(record["groups"].get("operations", [])) <= 2
        codes = {d.get("HDSD00.11.023") for d in diagnoses}
        if any(c and c[:3] in ("B20", "F32", "C34") for c in codes):
            sensitive += 1
    assert 0.05 <= sensitive / len(RECORDS) <= 0.16


def test_stays_are_consistent() -> None:
    for record in RECORDS:
        el = record["elements"]
        admitted = datetime.strptime(el["HDSD00.11.085"], "%Y%m%dT%H%M%S")
        discharged = datetime.strptime(el["HDSD00.11.019"], "%Y%m%dT%H%M%S")
        assert admitted < discharged
        assert int(el["HDSD00.11.087"]) == max((discharged.date() - admitted.date()).days, 1)
        assert datetime.strptime(el["HDSD00.11.014"], "%Y%m%d").date() < date(2026, 12, 31)
        for op in record["groups"].get("operations", []):
            when = datetime.strptime(op["HDSD00.11.091"], "%Y%m%dT%H%M%S")
            assert admitted <= when <= discharged


def test_one_hospital() -> None:
    names = Counter(r["elements"]["HDSD00.11.118"] for r in RECORDS)
    codes = Counter(r["elements"]["HDSD00.11.119"] for r in RECORDS)
    assert names == {hospital_name(): len(RECORDS)}
    assert codes == {hospital_org_code(): len(RECORDS)}
