"""A research link that works: the key from a file or environment variable, per-person
date shifts nothing else gives away, k-anonymity over persons with generalisation and
suppression on the link path, and the release report (property d)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e_support import make_workdir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.cli import main
from bridge.config import load_config
from bridge.errors import ConfigError, ProfileError
from bridge.link.node import Controller
from bridge.link.research import release
from bridge.mapping import map_record, patient_identifiers
from bridge.messages import collection_of
from bridge.policy.consent import build_consent
from bridge.policy.research import AGE_BAND_URL, ReleaseItem, anonymise
from bridge.samples import inpatient_records

LINK = "research-to-insurer-b"
KEY_HEX = "00112233445566778899aabbccddeeff" * 2
QUASI = ("Patient.gender", "Patient.birthDate", "Patient.address.state",
         "Patient.address.city", "Patient.address.district")


def with_research_link(cfg: Path, **keys: str) -> None:
    lines = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    with cfg.open("a", encoding="utf-8") as f:
        f.write('\n[[links]]\nid = "research-to-insurer-b"\npartner = "insurer-b"\n'
                'direction = "outbound"\nprofile = "research-limited-data-set"\n'
                f'purpose = "HRESCH"\n{lines}')


def shift_year(value: str, years: int) -> str:
    return str(int(value[:4]) + years) + value[4:]


def batch() -> list[dict[str, Any]]:
    """Generated front sheets, with second stays for some people (another inpatient
    number a year later) and one patient of 92."""
    records = inpatient_records(150, seed=31)
    for r in records[:30]:
        again = json.loads(json.dumps(r))
        e = again["elements"]
        e["HDSD00.11.140"] += "B"
        for k in ("HDSD00.11.085", "HDSD00.11.019", "HDSD00.11.127"):
            e[k] = shift_year(e[k], 1)
        for op in again["groups"].get("operations", []):
            op["HDSD00.11.091"] = shift_year(op["HDSD00.11.091"], 1)
        records.append(again)
    old = records[40]["elements"]
    old["HDSD00.11.014"] = str(int(old["HDSD00.11.085"][:4]) - 92) + old["HDSD00.11.014"][4:]
    old["HDSD00.11.079"] = 92
    return records


def research_consent(record: dict[str, Any], n: int) -> dict[str, Any]:
    system, value = patient_identifiers(map_record(record))[0]
    return build_consent(
        consent_id=f"r-{n}", patient_system=system, patient_value=value,
        recipient="insurer-b", purposes=["HRESCH"], start=date(2020, 1, 1),
        end=date.today() + timedelta(days=365 * 3), hospital_partner_id="hospital-a",
    )


def test_the_key_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hospital_cfg, _ = make_workdir(tmp_path)
    text = hospital_cfg.read_text(encoding="utf-8")
    with_research_link(hospital_cfg)
    with pytest.raises(ConfigError) as info:
        Controller(load_config(hospital_cfg))
    assert info.value.location == f"links.{LINK}"
    hospital_cfg.write_text(text, encoding="utf-8")
    with_research_link(hospital_cfg, deid_key_env="BRIDGE_TEST_DEID_KEY")
    with pytest.raises(ConfigError) as info:
        Controller(load_config(hospital_cfg))
    assert info.value.location == f"links.{LINK}.deid_key_env"
    monkeypatch.setenv("BRIDGE_TEST_DEID_KEY", KEY_HEX)
    controller = Controller(load_config(hospital_cfg))
    assert controller.deid_keys[LINK] == bytes.fromhex(KEY_HEX)
    asyncio.run(controller.close())
    hospital_cfg.write_text(text, encoding="utf-8")
    (tmp_path / "research.key").write_text("not hex\n", encoding="ascii")
    with_research_link(hospital_cfg, deid_key_file="research.key")
    with pytest.raises(ConfigError) as info:
        Controller(load_config(hospital_cfg))
    assert info.value.location == f"links.{LINK}.deid_key_file"
    assert "not hexadecimal" in info.value.message
    assert KEY_HEX not in hospital_cfg.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("research")
    hospital_cfg, _ = make_workdir(root)
    (root / "research.key").write_text(KEY_HEX + "\n", encoding="ascii")
    with_research_link(hospital_cfg, deid_key_file="research.key")
    records = batch()
    out: dict[str, Any] = {"records": records, "cfg": hospital_cfg}

    async def run() -> None:
        controller = Controller(load_config(hospital_cfg))
        try:
            for n, r in enumerate(records[:150]):
                await controller.put_consent(research_consent(r, n))
            out["dry"] = await release(controller, records, LINK, send=False)
            out["report"] = await release(controller, records, LINK, send=True)
            out["messages"] = []
            for entry in controller.store.audit_entries():
                if entry.record.action == "claim.enqueue":
                    row = controller.store.get_outbox(entry.record.subject)
                    payload = json.loads(bytes(row.payload))
                    # Dispatch asks the consent again from the payload (pseudonyms only).
                    controller.recheck_consent(payload, controller.outbound_link(LINK))
                    out["messages"].append(payload)
        finally:
            await controller.close()

    asyncio.run(run())
    return out


def test_one_record_alone_cannot_leave_on_a_research_link(released: dict[str, Any]) -> None:
    async def run() -> None:
        controller = Controller(load_config(released["cfg"]))
        try:
            with pytest.raises(ProfileError) as info:
                await controller.submit(inpatient_records(1, seed=977)[0], LINK)
            assert "research batches only" in info.value.message
        finally:
            await controller.close()

    asyncio.run(run())


def test_release_reports_k_achieved_and_suppressions(released: dict[str, Any]) -> None:
    report = released["report"]
    # The dry run says what the release then did; only the release queued messages.
    sent = report.to_dict()
    assert len(sent.pop("messages_queued")) == report.records_released
    assert sent.pop("records_already_queued") == []
    dry = released["dry"].to_dict()
    assert dry.pop("messages_queued") == [] and dry.pop("records_already_queued") == []
    assert sent == dry
    assert report.records_in == len(released["records"])
    assert report.k_achieved >= 5
    assert report.records_released == len(released["messages"]) > 0
    assert report.records_released + len(report.suppressed) + len(report.refused) \
        == report.records_in
    assert report.suppressed and all("fewer than 5" in why for _, why in report.suppressed)
    # The patient of 92 is released only as "89 and over", or not at all.
    assert report.top_coded <= 1


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in collection_of(bundle)["entry"]
            if e["resource"]["resourceType"] == rtype]


def test_released_set_is_k_anonymous_over_persons(released: dict[str, Any]) -> None:
    persons: dict[str, tuple[Any, ...]] = {}
    for message in released["messages"]:
        patient = resources(message, "Patient")[0]
        person = patient["identifier"][0]["value"]  # the identity document's pseudonym
        band = [e["valueRange"] for e in patient.get("extension", []) if e["url"] == AGE_BAND_URL]
        persons[person] = (patient.get("gender"), patient.get("birthDate"), json.dumps(band),
                           json.dumps(patient.get("address"), sort_keys=True))
    sizes = Counter(persons.values())
    assert min(sizes.values()) >= 5, sizes


def test_no_direct_identifier_of_appendix_g_is_released(released: dict[str, Any]) -> None:
    wire = json.dumps(released["messages"], ensure_ascii=False)
    for record in released["records"]:
        e = record["elements"]
        for key in ("HDSD00.11.110", "HDSD00.11.048", "HDSD00.11.026", "HDSD00.11.140",
                    "HDSD00.11.006", "HDSD00.11.053", "HDSD00.11.101", "HDSD00.11.141",
                    "HDSD00.11.138", "HDSD00.11.137"):
            if e.get(key):
                assert str(e[key]) not in wire, key
        for op in record["groups"].get("operations", []):
            assert op["HDSD00.11.094"] not in wire  # the surgeon


def _day(value: str) -> date:
    return date.fromisoformat(value[:10])


def test_one_shift_per_person_that_no_other_element_gives_away(released: dict[str, Any]) -> None:
    originals = {}
    for record in released["records"]:
        e = record["elements"]
        originals.setdefault(e["HDSD00.11.048"], []).append(e)
    shifts: dict[str, set[int]] = {}
    for message in released["messages"]:
        encounter = resources(message, "Encounter")[0]
        claim = resources(message, "Claim")[0]
        patient = resources(message, "Patient")[0]
        person = patient["identifier"][0]["value"]  # the identity document's pseudonym
        # Claim.created is the shifted end of the stay, not "when the message was made".
        assert claim["created"] == claim["billablePeriod"]["end"]
        timestamp = _day(collection_of(message).get("timestamp") or message["timestamp"])
        assert (timestamp - _day(claim["created"])).days != 0
        shifts.setdefault(person, set()).add(
            (_day(claim["billablePeriod"]["end"]) - _day(encounter["period"]["end"])).days)
    # Every date of one person's stays moved together.
    assert all(s == {0} for s in shifts.values())
    wire = json.dumps(released["messages"])
    for es in originals.values():
        for e in es:
            real = datetime.strptime(e["HDSD00.11.085"], "%Y%m%dT%H%M%S")
            assert real.strftime("%Y-%m-%dT%H:%M:%S") not in wire


def test_two_stays_of_one_person_shift_by_the_same_days(released: dict[str, Any]) -> None:
    by_person: dict[str, list[date]] = {}
    for message in released["messages"]:
        patient = resources(message, "Patient")[0]
        ids = [patient["identifier"][0]["value"]]
        by_person.setdefault(ids[0], []).append(
            _day(resources(message, "Encounter")[0]["period"]["start"]))
    pairs = [sorted(v) for v in by_person.values() if len(v) == 2]
    assert pairs, "some person with two stays is released"
    for first, second in pairs:
        # Both stays were made exactly one year apart in the batch: the released ones too.
        assert (second - first).days in (365, 366)


def test_ages_of_89_and_over_are_top_coded() -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {
        "resourceType": "Patient", "id": "p", "gender": "female", "birthDate": "1933",
        "address": [{"state": "浙江省", "city": "杭州市", "district": "西湖区"}]}}]}
    items = [ReleaseItem(i, json.loads(json.dumps(bundle)), f"p{i}", 92) for i in range(5)]
    out, report = anonymise(items, k=5, quasi=QUASI)
    assert len(out) == 5 and report.top_coded == 5
    patient = out[0].bundle["entry"][0]["resource"]
    assert "birthDate" not in patient
    (band,) = [e["valueRange"] for e in patient["extension"] if e["url"] == AGE_BAND_URL]
    assert band["low"]["value"] == 89 and "high" not in band


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["male", "female"]),
                          st.integers(18, 99), st.integers(0, 3), st.integers(1, 4)),
                min_size=1, max_size=60))
def test_k_counts_persons_not_records(people: list[tuple[int, str, int, int, int]]) -> None:
    """Property (d) on the anonymiser: whatever the batch, every released person shares
    the generalised quasi-identifiers with at least 4 other released persons, and a
    person's stays are released or suppressed together."""
    places = [("浙江省", "杭州市", "西湖区"), ("浙江省", "杭州市", "滨江区"),
              ("浙江省", "宁波市", "鄞州区"), ("江苏省", "南京市", "鼓楼区")]
    items = []
    index = 0
    for pid, gender, age, place, stays in people:
        state, city, district = places[place]
        for _ in range(stays):
            items.append(ReleaseItem(index, {"resourceType": "Bundle", "entry": [{"resource": {
                "resourceType": "Patient", "id": "x", "gender": gender,
                "birthDate": str(2026 - age),
                "address": [{"state": state, "city": city, "district": district}]}}]},
                f"person-{pid}", age))
            index += 1
    out, report = anonymise(items, k=5, quasi=QUASI)
    classes: dict[str, str] = {}
    for it in out:
        p = it.bundle["entry"][0]["resource"]
        classes[it.person] = json.dumps([p.get("gender"), p.get("birthDate"),
                                         p.get("extension"), p.get("address")], sort_keys=True)
    sizes = Counter(classes.values())
    assert all(n >= 5 for n in sizes.values())
    assert report.k_achieved == (min(sizes.values()) if sizes else 0)
    released_persons = {it.person for it in out}
    for it in items:
        assert (it.person in released_persons) == any(o.index == it.index for o in out)
        if it.person in released_persons and it.age >= 89:
            assert "birthDate" not in it.bundle["entry"][0]["resource"]


def test_cli_research_report(released: dict[str, Any], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    batch_file = tmp_path / "batch.json"
    batch_file.write_text(json.dumps(released["records"][:150], ensure_ascii=False),
                          encoding="utf-8")
    assert main(["research", "report", "--config", str(released["cfg"]), "--link", LINK,
                 str(batch_file)]) == 0
    out = capsys.readouterr().out
    assert "k required 5, k achieved" in out and "suppressed" in out
    assert "nothing sent" in out
