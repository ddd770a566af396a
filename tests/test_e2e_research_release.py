"""A research release as an operator makes one, counted on what the research partner
received.

The hospital's research link is configured in its TOML file with the de-identification
key in a file beside it (or an environment variable), never in the configuration text.
``bridge research report`` and ``bridge research release`` run as their own processes
over a batch of WS 445.10 front sheets built here; the hospital's ``bridge serve`` sends
what was released over mutual TLS to a research partner's ``bridge serve`` (inbound link
with the research profile), and the test reads what arrived with ``bridge inbox show``
there. GB/T 39725-2020 §10.2 and Appendix G are checked on that: one date shift per
person, kept across their stays and not recoverable from the envelope; at least 5
persons share every released combination of quasi-identifiers; no direct identifier of
table G.1; no age of 89 or over; no department of a diagnosis consent held back; and the
report states k achieved and every suppression.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e_support import cli, consent_for, make_workdir, serve, text_of

from bridge.demo import HOSPITAL, free_port
from bridge.samples import inpatient_records

RESEARCHER = "clinic-x"
LINK = "research-to-clinic-x"
KEY_HEX = "5b1e0c9a7d3f42e8b6a1c0d9e8f7a6b5" * 2
KEY_ENV = "BRIDGE_E2E_RESEARCH_KEY"
AGE_BAND_URL = "urn:ws-fhir-bridge:StructureDefinition/age-band"
PLACE = ("浙江省", "杭州市", "西湖区")


# --- the batch ----------------------------------------------------------------------------


@dataclass
class Person:
    """One person of the batch: their stays (indexes into the batch) and consent."""

    key: str
    sex: str
    age: int
    place: tuple[str, str, str]
    consent: bool = True
    sensitive: tuple[str, str, str] | None = None  # (code, name, department)
    named: tuple[str, ...] = ()  # special-disease classes the research consent names
    only: bool = False  # the special disease is the stay's only diagnosis


def people() -> list[Person]:
    out = [Person(f"a{i}", "1", 62 + i % 3, PLACE) for i in range(6)]  # men in their sixties
    out += [Person(f"b{i}", "2", 41 + i % 3, PLACE) for i in range(6)]  # women in their forties
    out += [Person(f"c{i}", "1", 90 + i, PLACE) for i in range(5)]  # men of 90 and over
    out.append(Person("lone", "2", 24, ("北京市", "北京市", "海淀区")))  # alone: suppressed
    out.append(Person("no-consent", "1", 63, PLACE, consent=False))  # refused
    # A stay whose only diagnosis the consent holds back: refused, as any claim whose
    # every diagnosis is held back (PROTOCOL P-MSG-10); a stay without a diagnosis in the
    # extract would tell what consent withholds.
    out.append(Person("all-held", "1", 64, PLACE, only=True,
                      sensitive=("Z21.x00", "无症状人类免疫缺陷病毒感染状态", "感染科")))
    # Special diseases the research consent does not name, treated in the department
    # that tells them.
    out[0].sensitive = ("B20.900", "HIV病", "感染科")
    out[6].sensitive = ("F32.900", "抑郁发作", "精神科")
    # And one the consent names: it is released, department and all.
    out[3].sensitive, out[3].named = ("C34.900", "支气管或肺恶性肿瘤", "胸外科"), ("malignant",)
    return out


SECOND_STAYS = ("a1", "b2", "c0")  # a second stay exactly one year later


def batch() -> tuple[list[Person], list[dict[str, Any]], list[str]]:
    """The persons, their front sheets in batch order and, per record, whose it is."""
    persons = people()
    base = inpatient_records(len(persons), seed=4242)
    records, owners = [], []
    for n, (person, record) in enumerate(zip(persons, base, strict=True)):
        record = copy.deepcopy(record)
        e = record["elements"]
        e["HDSD00.11.049"], e["HDSD00.11.036"] = "01", "156"
        e["HDSD00.11.053"] = f"3301HK{4242000 + n:08d}"
        admitted = datetime.strptime(e["HDSD00.11.085"], "%Y%m%dT%H%M%S")
        e["HDSD00.11.109"] = person.sex
        e["HDSD00.11.014"] = f"{admitted.year - person.age}0101"  # the age at admission
        e["HDSD00.11.079"] = person.age
        e["HDSD00.11.102"], e["HDSD00.11.103"], e["HDSD00.11.104"] = person.place
        department = "呼吸内科"
        diagnoses = [{"HDSD00.11.023": "J18.900", "HDSD00.11.024": "肺炎", "HDSD00.11.025": "1"}]
        if person.sensitive and person.only:
            code, name, department = person.sensitive
            diagnoses = [{"HDSD00.11.023": code, "HDSD00.11.024": name, "HDSD00.11.025": "1"}]
        elif person.sensitive:
            code, name, department = person.sensitive
            diagnoses.append({"HDSD00.11.020": code, "HDSD00.11.021": name,
                              "HDSD00.11.022": "1"})
        for key in ("HDSD00.11.084", "HDSD00.11.018"):
            e[key] = department
        record["groups"] = {"diagnoses": diagnoses}
        records.append(record)
        owners.append(person.key)
    for key in SECOND_STAYS:
        first = records[owners.index(key)]
        again = copy.deepcopy(first)
        e = again["elements"]
        e["HDSD00.11.140"] += "B"
        for k in ("HDSD00.11.085", "HDSD00.11.019", "HDSD00.11.127"):
            e[k] = str(int(e[k][:4]) + 1) + e[k][4:]
        e["HDSD00.11.079"] += 1
        records.append(again)
        owners.append(key)
    return persons, records, owners


# --- the processes ------------------------------------------------------------------------




def research_partner(root: Path, port: int) -> Path:
    """A research platform's controller: one inbound link from the hospital."""
    cfg = root / "research.toml"
    cfg.write_text(f"""\
[controller]
id = "{RESEARCHER}"
name = "示范临床研究平台"

[server]
host = "127.0.0.1"
port = {port}

[tls]
ca = "pki/ca.pem"
cert = "pki/{RESEARCHER}/tls.pem"
key = "pki/{RESEARCHER}/tls.key"

[signing]
cert = "pki/{RESEARCHER}/sign.pem"
key = "pki/{RESEARCHER}/sign.key"

[store]
path = "{RESEARCHER}/bridge.sqlite"

[audit]
pseudonym_key_file = "{RESEARCHER}/audit-pseudonym.key"

[[partners]]
id = "{HOSPITAL}"
name = "示范市第一人民医院"
signing_certs = ["pki/{HOSPITAL}/sign.pem"]

[[links]]
id = "research-from-{HOSPITAL}"
partner = "{HOSPITAL}"
direction = "inbound"
profile = "research-limited-data-set"
purpose = "HRESCH"
""", encoding="utf-8")
    return cfg


def research_link(key_line: str, port: int) -> str:
    return f"""
[[partners]]
id = "{RESEARCHER}"
name = "示范临床研究平台"
base_url = "https://127.0.0.1:{port}/fhir"
signing_certs = ["pki/{RESEARCHER}/sign.pem"]

[[links]]
id = "{LINK}"
partner = "{RESEARCHER}"
direction = "outbound"
profile = "research-limited-data-set"
purpose = "HRESCH"
retry_base_seconds = 0.05
retry_cap_seconds = 0.3
request_timeout_seconds = 5
{key_line}
"""


@dataclass
class Released:
    root: Path
    hospital_cfg: Path
    env_cfg: Path
    persons: dict[str, Person]
    records: list[dict[str, Any]]
    owners: list[str]
    report: subprocess.CompletedProcess[str]
    report_json: dict[str, Any]
    release: subprocess.CompletedProcess[str]
    wire: list[dict[str, Any]]
    sent_at: datetime


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Released]:
    root = tmp_path_factory.mktemp("research")
    hospital_cfg, _ = make_workdir(root)
    port = free_port()
    partner_cfg = research_partner(root, port)
    base_text = hospital_cfg.read_text(encoding="utf-8")
    (root / "research.key").write_text(KEY_HEX + "\n", encoding="ascii")
    hospital_cfg.write_text(base_text + research_link('deid_key_file = "research.key"', port),
                            encoding="utf-8")
    env_cfg = root / "hospital-env.toml"
    env_cfg.write_text(base_text + research_link(f'deid_key_env = "{KEY_ENV}"', port),
                       encoding="utf-8")

    persons, records, owners = batch()
    (root / "batch.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    first_record = {key: records[owners.index(key)] for key in owners}

    def add(person: Person) -> None:
        consent = consent_for(first_record[person.key], consent_id=f"research-{person.key}",
                              recipient=RESEARCHER, purposes=("HRESCH",),
                              sensitive=person.named)
        path = root / f"consent-{person.key}.json"
        path.write_text(json.dumps(consent, ensure_ascii=False), encoding="utf-8")
        added = cli("consent", "add", "--config", str(hospital_cfg), str(path))
        assert added.returncode == 0, added.stderr

    for person in persons:
        if person.consent:
            add(person)

    researcher = serve(partner_cfg, root / "research.log")
    hospital = serve(hospital_cfg, root / "hospital.log")
    try:
        report = cli("research", "report", "--config", str(hospital_cfg), "--link", LINK,
                     str(root / "batch.json"))
        report_json = cli("research", "report", "--config", str(hospital_cfg), "--link", LINK,
                          "--json", str(root / "batch.json"))
        assert report_json.returncode == 0, report_json.stderr
        sent_at = datetime.now(UTC)
        release = cli("research", "release", "--config", str(hospital_cfg), "--link", LINK,
                      str(root / "batch.json"))
        assert release.returncode == 0, release.stderr
        expected = json.loads(report_json.stdout)["records_released"]
        deadline = time.monotonic() + 60
        while True:
            listed = cli("inbox", "list", "--config", str(partner_cfg), "--json")
            assert listed.returncode == 0, listed.stderr
            ids = [row["messageId"] for row in json.loads(listed.stdout)]
            if len(ids) >= expected:
                break
            assert time.monotonic() < deadline, f"{len(ids)} of {expected} arrived"
            time.sleep(0.3)
        wire = []
        for message_id in ids:
            shown = cli("inbox", "show", message_id, "--config", str(partner_cfg), "--json")
            assert shown.returncode == 0, shown.stderr
            wire.append(json.loads(shown.stdout)["message"])
        yield Released(root, hospital_cfg, env_cfg, {p.key: p for p in persons}, records,
                       owners, report, json.loads(report_json.stdout), release, wire, sent_at)
    finally:
        codes = []
        for proc in (hospital, researcher):
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=30))
    assert codes == [0, 0]
    for log in ("hospital.log", "research.log"):
        text = (root / log).read_text(encoding="utf-8")
        assert "Traceback" not in text, log
        assert KEY_HEX not in text, log
        for record in records:
            for key in ("HDSD00.11.110", "HDSD00.11.048", "HDSD00.11.140", "HDSD00.11.006"):
                assert str(record["elements"][key]) not in text, (log, key)


# --- reading what arrived -----------------------------------------------------------------


def resources(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == kind]


def one(message: dict[str, Any], kind: str) -> dict[str, Any]:
    [resource] = resources(message, kind)
    return resource


def day(value: str) -> date:
    return date.fromisoformat(value[:10])


def original_day(value: str) -> date:
    return datetime.strptime(value[:8], "%Y%m%d").date()


def source_of(released: Released, message: dict[str, Any]) -> int:
    """The batch position of a released stay, found by its total (nothing on the wire
    names the record). A person's second stay repeats the first one's total a year later:
    of two such stays, the one that starts earlier on the wire is the earlier one."""
    def total(m: dict[str, Any]) -> float:
        return float(one(m, "Claim")["total"]["value"])

    matches = [i for i, r in enumerate(released.records)
               if float(r["elements"]["HDSD00.11.142"]) == total(message)]
    assert 1 <= len(matches) <= 2, total(message)
    if len(matches) == 2:
        twins = sorted((day(one(m, "Encounter")["period"]["start"]), id(m))
                       for m in released.wire if total(m) == total(message))
        assert len(twins) == 2
        firsts = sorted(matches, key=lambda i: released.records[i]["elements"]["HDSD00.11.085"])
        return firsts[[t[1] for t in twins].index(id(message))]
    return matches[0]


DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def dates_in(message: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(path, value) of every full date in the message's resources but the header."""
    def walk(node: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for v in node:
                yield from walk(v, path)
        elif isinstance(node, str) and DATE.match(node):
            yield path, node

    for entry in message["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] != "MessageHeader":
            yield from walk(resource, resource["resourceType"])


def person_of(message: dict[str, Any]) -> str:
    """The person's pseudonym on the wire (the keyed stand-in of the identity card)."""
    return str(one(message, "Patient")["identifier"][0]["value"])


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.control("D8")
def test_the_key_is_read_from_a_file_or_the_environment_never_the_configuration(
        released: Released) -> None:
    for cfg in (released.hospital_cfg, released.env_cfg):
        assert KEY_HEX not in cfg.read_text(encoding="utf-8")
    # The same batch, the key from the environment: the same report.
    from_env = cli("research", "report", "--config", str(released.env_cfg), "--link", LINK,
                   "--json", str(released.root / "batch.json"), env={KEY_ENV: KEY_HEX})
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout) == released.report_json
    # Without it the link does not start, and says which setting is missing.
    without = cli("research", "report", "--config", str(released.env_cfg), "--link", LINK,
                  str(released.root / "batch.json"), env={KEY_ENV: ""})
    assert without.returncode == 2, without.stdout + without.stderr
    assert f"links.{LINK}.deid_key_env" in without.stderr
    assert "Traceback" not in without.stderr


@pytest.mark.control("D8")
def test_the_research_partner_receives_without_holding_the_key(released: Released) -> None:
    # The recipient validates and stores what it is sent; a de-identification key at the
    # recipient would let it recompute the pseudonyms from identity numbers.
    partner = (released.root / "research.toml").read_text(encoding="utf-8")
    assert "deid_key" not in partner and KEY_HEX not in partner
    assert released.wire


def test_the_report_states_k_achieved_and_every_suppression(released: Released) -> None:
    report = released.report_json
    assert report["k_required"] == 5 and report["k_achieved"] >= 5
    assert report["records_in"] == len(released.records)
    lone = released.owners.index("lone")
    refused = released.owners.index("no-consent")
    all_held = released.owners.index("all-held")
    assert [r["record"] for r in report["records_suppressed"]] == [lone]
    assert "fewer than 5" in report["records_suppressed"][0]["why"]
    assert [r["record"] for r in report["records_refused"]] == sorted([refused, all_held])
    assert all("consent-denied" in r["why"] for r in report["records_refused"])
    assert report["records_released"] == len(released.records) - 3 == len(released.wire)
    assert report["persons_released"] == len(released.persons) - 3
    assert report["ages_top_coded"] == 6  # five men of 90 and over, one with two stays
    for out in (released.report, released.release):
        assert out.returncode == 0, out.stderr
        assert f"k required 5, k achieved {report['k_achieved']} (persons)" in out.stdout
        assert f"record {lone}: suppressed: " in out.stdout and "(fewer than 5)" in out.stdout
        assert f"record {refused}: refused: consent-denied" in out.stdout
    assert "nothing sent" in released.report.stdout
    assert "nothing sent" not in released.release.stdout


@pytest.mark.control("D6")
def test_at_least_five_persons_share_every_released_combination(released: Released) -> None:
    classes: dict[str, tuple[str, ...]] = {}
    for message in released.wire:
        patient = one(message, "Patient")
        band = [e["valueRange"] for e in patient.get("extension", [])
                if e["url"] == AGE_BAND_URL]
        quasi = (patient.get("gender"), patient.get("birthDate"), json.dumps(band),
                 json.dumps(patient.get("address"), sort_keys=True, ensure_ascii=False))
        assert classes.setdefault(person_of(message), quasi) == quasi
    sizes = Counter(classes.values())
    assert len(classes) == len(released.persons) - 3
    assert min(sizes.values()) >= 5, sizes
    assert min(sizes.values()) == released.report_json["k_achieved"]


@pytest.mark.control("D4")
def test_one_date_shift_per_person_across_stays_not_recoverable(released: Released) -> None:
    shifts: dict[str, set[int]] = {}
    by_owner: dict[str, set[str]] = {}
    for message in released.wire:
        index = source_of(released, message)
        e = released.records[index]["elements"]
        encounter, claim = one(message, "Encounter"), one(message, "Claim")
        person = person_of(message)
        by_owner.setdefault(released.owners[index], set()).add(person)
        shift = (day(encounter["period"]["start"]) - original_day(e["HDSD00.11.085"])).days
        assert shift != 0
        # Every date of the stay moved by the same days.
        for value, source in ((encounter["period"]["end"], e["HDSD00.11.019"]),
                              (claim["billablePeriod"]["start"], e["HDSD00.11.085"]),
                              (claim["billablePeriod"]["end"], e["HDSD00.11.019"])):
            assert (day(value) - original_day(source)).days == shift
        shifts.setdefault(person, set()).add(shift)
        # Claim.created is the shifted end of the stay, not the shifted time of sending:
        # Bundle.timestamp (real) against Claim.created tells nothing about the shift.
        assert claim["created"] == claim["billablePeriod"]["end"]
        stamp = day(message["timestamp"])
        assert abs((stamp - released.sent_at.date()).days) <= 1
        wire = json.dumps(message)
        for near in range(-1, 2):
            shifted_now = released.sent_at.date() + timedelta(days=shift + near)
            assert shifted_now.isoformat() not in wire, "a shifted 'now' gives the shift away"
        for key in ("HDSD00.11.085", "HDSD00.11.019", "HDSD00.11.127"):
            assert original_day(e[key]).isoformat() not in wire, key
        # Every date in the resources is a date of the stay moved by the person's shift.
        stay = {original_day(e[k]) for k in ("HDSD00.11.085", "HDSD00.11.019", "HDSD00.11.127")}
        for where, value in dates_in(message):
            assert day(value) - timedelta(days=shift) in stay, where
            # To the day: a time of day to the second would pick out the stay in the
            # original records, however far its day moved.
            assert "T" not in value, where
    # One pseudonym per person, and one shift per person whatever the stay.
    assert all(len(p) == 1 for p in by_owner.values()), by_owner
    assert all(len(s) == 1 for s in shifts.values()), shifts
    for key in SECOND_STAYS:
        [person] = by_owner[key]
        starts = sorted(day(one(m, "Encounter")["period"]["start"]) for m in released.wire
                        if person_of(m) == person)
        assert len(starts) == 2 and (starts[1] - starts[0]).days in (365, 366)
    assert len(set().union(*shifts.values())) > 1, "every person shifted alike"


@pytest.mark.control("D3", "D5")
def test_no_direct_identifier_of_appendix_g_is_released(released: Released) -> None:
    wire = "\n".join(text_of(m) for m in released.wire)
    for record in released.records:
        e = record["elements"]
        for key in ("HDSD00.11.110",  # name
                    "HDSD00.11.048",  # identity card
                    "HDSD00.11.026",  # telephone
                    "HDSD00.11.140",  # inpatient number
                    "HDSD00.11.006",  # medical-record number
                    "HDSD00.11.053",  # health card
                    "HDSD00.11.101", "HDSD00.11.100", "HDSD00.11.106",  # street, postcode
                    "HDSD00.11.141", "HDSD00.11.138", "HDSD00.11.137", "HDSD00.11.005"):
            if e.get(key):
                assert str(e[key]) not in wire, key
    for system in ("urn:oid:2.16.156.10011.1.3", "urn:oid:2.16.156.10011.1.12",
                   "urn:oid:2.16.156.10011.1.13", "urn:oid:2.16.156.10011.1.19"):
        assert system not in wire
    for message in released.wire:
        patient = one(message, "Patient")
        assert set(patient) <= {"resourceType", "id", "meta", "identifier", "gender", "_gender",
                                "birthDate", "address", "maritalStatus", "extension"}, patient
        for address in patient.get("address", []):
            assert set(address) <= {"use", "type", "state", "city", "district", "country"}
        assert not resources(message, "Practitioner")
        assert "telecom" not in json.dumps(message)


@pytest.mark.control("D4")
def test_no_age_of_89_or_over_is_revealed(released: Released) -> None:
    for message in released.wire:
        index = source_of(released, message)
        person = released.persons[released.owners[index]]
        patient = one(message, "Patient")
        bands = [e["valueRange"] for e in patient.get("extension", [])
                 if e["url"] == AGE_BAND_URL]
        admitted = day(one(message, "Encounter")["period"]["start"])
        if "birthDate" in patient:
            assert admitted.year - int(patient["birthDate"][:4]) <= 89
        for band in bands:
            assert band["low"]["value"] <= 89
            if "high" in band:
                assert band["high"]["value"] < 89
        if person.age >= 89:
            assert "birthDate" not in patient
            assert [b["low"]["value"] for b in bands] == [89] and "high" not in bands[0]


def test_departments_of_held_back_diagnoses_are_not_released(released: Released) -> None:
    wire = "\n".join(text_of(m) for m in released.wire)
    for person in released.persons.values():
        if person.sensitive and not person.named:
            code, name, department = person.sensitive
            for value in (code, code[:3], name, department):
                assert value not in wire, value
    # The other stays keep their department: the research profile releases it.
    assert "呼吸内科" in wire
    for message in released.wire:
        owner = released.persons[released.owners[source_of(released, message)]]
        encounter = one(message, "Encounter")
        codes = sorted(c["code"] for r in resources(message, "Condition")
                       for c in r["code"]["coding"])
        departments = [loc["location"].get("display") for loc in encounter.get("location", [])]
        if owner.sensitive and owner.named:
            code, name, department = owner.sensitive
            assert codes == sorted(["J18.900", code]), codes
            assert departments and set(departments) == {department}, departments
            [labelled] = [r for r in resources(message, "Condition")
                          if r["code"]["coding"][0]["code"] == code]
            assert "malignant" in {s["code"] for s in labelled["meta"]["security"]}
        elif owner.sensitive:
            assert codes == ["J18.900"], codes
            assert "location" not in encounter
        else:
            assert codes == ["J18.900"], codes
            assert departments and set(departments) == {"呼吸内科"}, departments


def test_every_released_resource_is_referred_to_from_the_claim(released: Released) -> None:
    for message in released.wire:
        [header] = resources(message, "MessageHeader")
        by_url = {e["fullUrl"]: e["resource"] for e in message["entry"]}
        [focus] = [f["reference"] for f in header["focus"]]
        reached, todo = {focus}, [focus]
        while todo:
            node = json.dumps(by_url[todo.pop()])
            for ref in re.findall(r'"reference": "([^"]+)"', node):
                assert ref in by_url, ref
                if ref not in reached:
                    reached.add(ref)
                    todo.append(ref)
        assert {by_url[u]["resourceType"] for u in set(by_url) - reached} == {"MessageHeader"}
