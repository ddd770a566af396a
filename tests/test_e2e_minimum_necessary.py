"""Minimum necessary, exactly, counted the way a regulator counts it: on what arrived.

Two ``bridge serve`` processes (a hospital and a commercial insurer) over mutual TLS with
a development PKI; every record goes in through ``bridge push`` and every consent through
``bridge consent add``, each its own process. What the insurer received is read back with
``bridge inbox show`` at the insurer, and ``bridge consent explain`` and ``bridge audit
disclosures`` are run as an operator would run them. The records are WS 445.10 front
sheets built here, with the special-disease Z-code companions of
``mappings/policy/sensitive-icd10.yaml`` in every diagnosis position the front sheet has
(outpatient, main and other discharge diagnoses), a treatment of a special-disease class
(ICD-9-CM-3) with its surgeon, and the department that treats the disease.

What is checked (GB/T 39725-2020 §11.7 table 9, §11.1.2.3, §7 g; PROTOCOL P-MSG-8..10):
only table 9 identifiers and telephone numbers arrive; nothing arrives that the claim
does not refer to; special-disease data, its codes, names and department, do not leave
without consent naming the class and do leave with it; ``consent explain`` says of each
element what the insurer then received; a claim whose every diagnosis is held back is
refused at the hospital and nothing arrives; the disclosure history is found by each of
the patient's identifiers and records which provision held back which element, without
any value.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    ALL_CLASSES,
    cli,
    consent_for,
    make_workdir,
    serve,
    set_toml_keys,
    text_of,
)
from handoff_support import fast_hospital

from bridge.config import load_config
from bridge.demo import LINK_OUT
from bridge.samples import inpatient_records

ID_CARD = "urn:oid:2.16.156.10011.1.3"
ID_DOCUMENT = "urn:ws-fhir-bridge:id-document"
INPATIENT_NO = "urn:oid:2.16.156.10011.1.12"
RECORD_NO = "urn:oid:2.16.156.10011.1.13"
HEALTH_CARD = "urn:oid:2.16.156.10011.1.19"
SENSITIVITY = "urn:ws-fhir-bridge:sensitivity"
GRADE = "urn:ws-fhir-bridge:grade"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


# --- the records ------------------------------------------------------------------------


@dataclass
class Case:
    """One patient's stay, the consent they gave, and what must (not) reach the insurer."""

    name: str
    record: dict[str, Any]
    classes: tuple[str, ...]  # special-disease classes the consent names
    sensitive_codes: list[str] = field(default_factory=list)  # ICD-10 and ICD-9-CM-3
    sensitive_text: list[str] = field(default_factory=list)  # names and department
    common_codes: list[str] = field(default_factory=list)
    message_id: str | None = None
    push: subprocess.CompletedProcess[str] | None = None
    person: str = ""  # the case of the person's first stay, for a later stay

    def __post_init__(self) -> None:
        self.person = self.person or self.name

    @property
    def elements(self) -> dict[str, Any]:
        return self.record["elements"]

    @property
    def consent_id(self) -> str:
        return f"consent-{self.name}"


def dx(kind: str, code: str, name: str) -> dict[str, str]:
    """A diagnosis line of the front sheet: outpatient, main or other discharge diagnosis."""
    if kind == "outpatient":
        return {"HDSD00.11.075": code, "HDSD00.11.076": name}
    if kind == "main":
        return {"HDSD00.11.023": code, "HDSD00.11.024": name, "HDSD00.11.025": "1"}
    return {"HDSD00.11.020": code, "HDSD00.11.021": name, "HDSD00.11.022": "1"}


def operation(record: dict[str, Any], code: str, name: str, surgeon: str) -> dict[str, Any]:
    e = record["elements"]
    return {"HDSD00.11.089": code, "HDSD00.11.090": name,
            "HDSD00.11.091": e["HDSD00.11.085"][:8] + "T150000", "HDSD00.11.092": "2",
            "HDSD00.11.093": "1", "HDSD00.11.094": surgeon, "HDSD00.11.073": "1"}


BASE = inpatient_records(40, seed=919)


def front_sheet(i: int, *, department: str, diagnoses: list[dict[str, str]],
                operations: Sequence[tuple[str, str, str]] = (),
                health_card: str | None = None, passport: str | None = None) -> dict[str, Any]:
    record = copy.deepcopy(BASE[i])
    e = record["elements"]
    e["HDSD00.11.049"] = "01"
    e["HDSD00.11.036"] = "156"
    if passport is not None:
        e["HDSD00.11.049"] = "03"
        e["HDSD00.11.048"] = passport
        e["HDSD00.11.036"] = "840"
    if health_card is not None:
        e["HDSD00.11.053"] = health_card
    else:
        e.pop("HDSD00.11.053", None)
    for key in ("HDSD00.11.084", "HDSD00.11.018"):
        e[key] = department
    record["groups"] = {"diagnoses": diagnoses}
    if operations:
        record["groups"]["operations"] = [operation(record, *op) for op in operations]
    return record


def cases() -> list[Case]:
    out: list[Case] = []
    # Identifiers of every kind: identity card, inpatient, record and health-card numbers;
    # an ordinary operation with its surgeon.
    out.append(Case(
        "plain", front_sheet(0, department="普通外科", health_card="330100HK2026000001",
                             diagnoses=[dx("main", "K80.200", "胆囊结石"),
                                        dx("other", "I10.x00", "高血压")],
                             operations=[("51.23", "腹腔镜下胆囊切除术", "欧阳主刀")]),
        ALL_CLASSES, common_codes=["K80.200", "I10.x00", "51.23"]))
    out.append(Case(
        "passport", front_sheet(1, department="呼吸内科", passport="E73920461",
                                health_card="330100HK2026000002",
                                diagnoses=[dx("main", "J18.900", "肺炎")]),
        ALL_CLASSES, common_codes=["J18.900"]))
    # The same foreign patient back six weeks later: another inpatient number, the same
    # passport, record and health-card numbers.
    again = copy.deepcopy(out[-1].record)
    e = again["elements"]
    e["HDSD00.11.140"] += "B"
    for key in ("HDSD00.11.085", "HDSD00.11.019", "HDSD00.11.127"):
        moved = datetime.strptime(e[key][:8], "%Y%m%d") + timedelta(days=42)
        e[key] = moved.strftime("%Y%m%d") + e[key][8:]
    out.append(Case("passport-again", again, ALL_CLASSES, common_codes=["J18.900"],
                    person="passport"))
    # Malignancy told only by its companions: chemotherapy and radiotherapy sessions,
    # follow-up after treatment, personal history; a chemotherapy infusion (99.25).
    malignant = {
        "department": "肿瘤内科",
        "diagnoses": [dx("outpatient", "Z08.x00", "恶性肿瘤治疗后随诊检查"),
                      dx("main", "I10.x00", "高血压"),
                      dx("other", "Z51.100", "为肿瘤化学治疗疗程"),
                      dx("other", "Z51.000", "放射治疗疗程"),
                      dx("other", "Z85.300", "乳房恶性肿瘤个人史")],
        "operations": [("99.25", "注射或输注癌瘤化学治疗药物", "司马化疗")]}
    malignant_codes = ["Z08", "Z51.1", "Z51.0", "Z85.3", "99.25"]
    malignant_text = ["恶性肿瘤治疗后随诊检查", "为肿瘤化学治疗疗程", "放射治疗疗程",
                      "乳房恶性肿瘤个人史", "注射或输注癌瘤化学治疗药物", "司马化疗", "肿瘤内科"]
    # HIV told by its companions: asymptomatic infection status, laboratory evidence,
    # HIV complicating pregnancy, history of an infectious disease.
    infectious = {
        "department": "感染科",
        "diagnoses": [dx("outpatient", "R75.x00", "人类免疫缺陷病毒实验室证据"),
                      dx("main", "E11.900", "2型糖尿病"),
                      dx("other", "Z21.x00", "无症状人类免疫缺陷病毒感染状态"),
                      dx("other", "O98.700", "人类免疫缺陷病毒病并发于妊娠"),
                      dx("other", "Z86.110", "结核病个人史")]}
    infectious_codes = ["R75", "Z21", "O98.7", "Z86.1"]
    infectious_text = ["人类免疫缺陷病毒实验室证据", "无症状人类免疫缺陷病毒感染状态",
                       "人类免疫缺陷病毒病并发于妊娠", "结核病个人史", "感染科"]
    # A mental disorder with the companions that accompany F-codes: alcohol
    # rehabilitation, history of mental disorder; and psychotherapy (94.3).
    mental = {
        "department": "精神科",
        "diagnoses": [dx("main", "J44.100", "慢性阻塞性肺病伴有急性加重"),
                      dx("other", "F32.900", "抑郁发作"),
                      dx("other", "Z50.200", "酒精中毒者康复"),
                      dx("other", "Z86.500", "精神和行为障碍个人史")],
        "operations": [("94.31", "精神分析", "诸葛心理")]}
    mental_codes = ["F32", "Z50.2", "Z86.5", "94.31"]
    mental_text = ["抑郁发作", "酒精中毒者康复", "精神和行为障碍个人史", "精神分析", "诸葛心理",
                   "精神科"]
    n = 2
    for cls, shape, codes, text, common in (
            ("malignant", malignant, malignant_codes, malignant_text, ["I10.x00"]),
            ("infectious", infectious, infectious_codes, infectious_text, ["E11.900"]),
            ("mental", mental, mental_codes, mental_text, ["J44.100"])):
        for consented in (False, True):
            out.append(Case(
                f"{cls}-{'named' if consented else 'unnamed'}", front_sheet(n, **shape),  # type: ignore[arg-type]
                (cls,) if consented else tuple(c for c in ALL_CLASSES if c != cls),
                sensitive_codes=codes, sensitive_text=text,
                common_codes=common))
            n += 1
    # Every diagnosis is a companion of a malignancy: nothing may be sent (P-MSG-10).
    out.append(Case(
        "all-held", front_sheet(n, department="肿瘤内科",
                                diagnoses=[dx("outpatient", "Z08.x00", "恶性肿瘤治疗后随诊检查"),
                                           dx("main", "Z51.100", "为肿瘤化学治疗疗程")]),
        tuple(c for c in ALL_CLASSES if c != "malignant"),
        sensitive_codes=["Z08", "Z51.1"], sensitive_text=["为肿瘤化学治疗疗程"]))
    n += 1
    # The principal diagnosis is a companion of a malignancy, another one is ordinary:
    # nothing may be sent either (P-MSG-10), nor the ordinary one made principal.
    out.append(Case(
        "principal-held", front_sheet(n, department="肿瘤内科",
                                      diagnoses=[dx("main", "Z51.100", "为肿瘤化学治疗疗程"),
                                                 dx("other", "I10.x00", "高血压")]),
        tuple(c for c in ALL_CLASSES if c != "malignant"),
        sensitive_codes=["Z51.1"], sensitive_text=["为肿瘤化学治疗疗程"]))
    return out


# --- the processes ----------------------------------------------------------------------




@dataclass
class Site:
    root: Path
    hospital_cfg: Path
    insurer_cfg: Path
    cases: dict[str, Case]
    wire: dict[str, dict[str, Any]]  # message id -> the Bundle the insurer holds

    def message(self, case: str) -> dict[str, Any]:
        message_id = self.cases[case].message_id
        assert message_id is not None
        return self.wire[message_id]


def push_and_read(
    hospital_cfg: Path, insurer_cfg: Path, files: dict[str, Path]
) -> tuple[dict[str, subprocess.CompletedProcess[str]], dict[str, dict[str, Any]]]:
    """``bridge push`` each record file (by name); wait until every claim accepted has
    reached the insurer; return the pushes by name and, by message id, the Bundle the
    insurer holds (``bridge inbox show``)."""
    pushes = {name: cli("push", "--config", str(hospital_cfg), "--link", LINK_OUT, str(path))
              for name, path in files.items()}
    expected = {p.stdout.split()[0] for p in pushes.values() if p.returncode == 0}
    deadline = time.monotonic() + 60
    while {row["messageId"] for row in inbox(insurer_cfg)} != expected:
        assert time.monotonic() < deadline, "the claims did not all reach the insurer"
        time.sleep(0.3)
    wire = {}
    for message_id in expected:
        shown = cli("inbox", "show", message_id, "--config", str(insurer_cfg), "--json")
        assert shown.returncode == 0, shown.stderr
        wire[message_id] = json.loads(shown.stdout)["message"]
    return pushes, wire


def inbox(insurer_cfg: Path) -> list[dict[str, Any]]:
    listed = cli("inbox", "list", "--config", str(insurer_cfg), "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("minimum")
    hospital_cfg, insurer_cfg = make_workdir(root)
    fast_hospital(hospital_cfg)
    for cfg, who in ((hospital_cfg, "hospital"), (insurer_cfg, "insurer")):
        kek = root / f"{who}.kek"  # health data sealed at rest
        kek.write_bytes(secrets.token_bytes(32))
        set_toml_keys(cfg, "store", {"data_key_file": str(kek)})
    all_cases = cases()
    for case in all_cases:
        (root / f"{case.name}.json").write_text(json.dumps(case.record, ensure_ascii=False),
                                                encoding="utf-8")
        consent = consent_for(case.record, consent_id=case.consent_id, sensitive=case.classes)
        (root / f"{case.consent_id}.json").write_text(json.dumps(consent, ensure_ascii=False),
                                                      encoding="utf-8")
        added = cli("consent", "add", "--config", str(hospital_cfg),
                    str(root / f"{case.consent_id}.json"))
        assert added.returncode == 0, added.stderr
    insurer = serve(insurer_cfg, root / "insurer.log")
    hospital = serve(hospital_cfg, root / "hospital.log")
    try:
        pushes, wire = push_and_read(hospital_cfg, insurer_cfg,
                                     {c.name: root / f"{c.name}.json" for c in all_cases})
        for case in all_cases:
            case.push = pushes[case.name]
            if case.push.returncode == 0:
                case.message_id = case.push.stdout.split()[0]
        yield Site(root, hospital_cfg, insurer_cfg, {c.name: c for c in all_cases}, wire)
    finally:
        codes = []
        for proc in (hospital, insurer):
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(timeout=30))
    assert codes == [0, 0]
    for log in ("hospital.log", "insurer.log"):
        text = (root / log).read_text(encoding="utf-8")
        assert "Traceback" not in text, log
        for value in sample_values(all_cases):
            assert value not in text, (log, value)


# --- reading the wire -------------------------------------------------------------------


def resources(message: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in message["entry"]
            if kind is None or e["resource"]["resourceType"] == kind]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def codes_in(resource: dict[str, Any], element: str) -> list[str]:
    value = resource.get(element)
    return [c["code"] for c in (value or {}).get("coding", [])]


def references(node: Any) -> set[str]:
    return {v for k, v in walk(node) if k == "reference" and isinstance(v, str)}


def no_dots(code: str) -> str:
    return code.replace(".", "")


# --- 1. only table 9 identifiers and telephone numbers ----------------------------------


def test_only_table_9_identifiers_and_telephones_reach_the_insurer(site: Site) -> None:
    sent = [c for c in site.cases.values() if c.message_id]
    assert len(sent) == 9
    for case in sent:
        message = site.message(case.name)
        wire = text_of(message)
        e = case.elements
        # 病案号 and 健康卡号 are in no row of table 9: neither system nor value arrives.
        for system in (RECORD_NO, HEALTH_CARD):
            assert system not in wire, (case.name, system)
        assert e["HDSD00.11.006"] not in wire, case.name
        if "HDSD00.11.053" in e:
            assert e["HDSD00.11.053"] not in wire, case.name
        [patient] = resources(message, "Patient")
        document = ID_CARD if e["HDSD00.11.049"] == "01" else ID_DOCUMENT
        assert [(i["system"], i["value"]) for i in patient["identifier"]] == [
            (document, e["HDSD00.11.048"])], case.name
        for kind in ("Encounter", "Claim"):
            [resource] = resources(message, kind)
            assert [(i["system"], i["value"]) for i in resource["identifier"]] == [
                (INPATIENT_NO, e["HDSD00.11.140"])], (case.name, kind)
        # Telephone numbers only, wherever a telecom appears.
        telecoms = [t for k, v in walk(message) if k == "telecom" for t in v]
        assert telecoms and {t["system"] for t in telecoms} == {"phone"}, case.name
        # The address stops at the district: no street, house number or postcode.
        assert "line" not in patient["address"][0] and "postalCode" not in patient["address"][0]
        for key in ("HDSD00.11.100", "HDSD00.11.101", "HDSD00.11.106"):
            assert str(e[key]) not in wire, (case.name, key)


# --- 2. nothing arrives that nothing refers to ------------------------------------------


def unreached_from_focus(message_id: str, message: dict[str, Any]) -> set[str]:
    """The types of the resources of a message that its Claim, the header's focus, does
    not reach by references (the header aside); a dangling reference fails."""
    [header] = resources(message, "MessageHeader")
    by_url = {e["fullUrl"]: e["resource"] for e in message["entry"]}
    [focus] = [f["reference"] for f in header["focus"]]
    assert by_url[focus]["resourceType"] == "Claim"
    reached, todo = {focus}, [focus]
    while todo:
        for ref in references(by_url[todo.pop()]):
            assert ref in by_url, (message_id, "dangling reference", ref)
            if ref not in reached:
                reached.add(ref)
                todo.append(ref)
    return {by_url[u]["resourceType"] for u in by_url if u not in reached} - {"MessageHeader"}


def test_every_resource_on_the_wire_is_referred_to_from_the_focus(site: Site) -> None:
    for message_id, message in site.wire.items():
        unreached = unreached_from_focus(message_id, message)
        assert not unreached, (message_id, unreached)
        assert not resources(message, "Practitioner"), message_id


def test_the_surgeon_does_not_travel_with_or_without_the_operation(site: Site) -> None:
    plain = site.message("plain")
    [procedure] = resources(plain, "Procedure")
    assert codes_in(procedure, "code") == ["51.23"]
    assert "performer" not in procedure
    assert "欧阳主刀" not in text_of(plain)
    # The chemotherapy naming its surgeon is held back: neither arrives.
    held = site.message("malignant-unnamed")
    assert not resources(held, "Procedure") and not resources(held, "Practitioner")
    assert "司马化疗" not in text_of(held)
    [claim] = resources(held, "Claim")
    assert "procedure" not in claim


# --- 3. special-disease companions --------------------------------------------------------


@pytest.mark.parametrize("cls", ["malignant", "infectious", "mental"])
@pytest.mark.control("U3")
def test_companion_codes_stay_home_without_the_class_in_any_position(site: Site,
                                                                     cls: str) -> None:
    case = site.cases[f"{cls}-unnamed"]
    message = site.message(case.name)
    wire = text_of(message)
    for code in case.sensitive_codes:
        # Anywhere: Condition.code, Claim.diagnosis, procedure, Encounter, free text.
        assert code not in wire and no_dots(code) not in wire.replace(".", ""), code
    for text in case.sensitive_text:  # diagnosis and operation names, the department
        assert text not in wire, text
    assert SENSITIVITY not in wire
    conditions = {c["id"]: codes_in(c, "code") for c in resources(message, "Condition")}
    assert sorted(code for codes in conditions.values() for code in codes) == sorted(
        case.common_codes)
    [claim] = resources(message, "Claim")
    [encounter] = resources(message, "Encounter")
    on_wire = {f"urn:uuid:{i}" for i in conditions}
    claimed = [d["diagnosisReference"]["reference"] for d in claim["diagnosis"]]
    assert sorted(claimed) == sorted(on_wire)
    assert {d["condition"]["reference"] for d in encounter["diagnosis"]} == on_wire
    assert "location" not in encounter and "reasonCode" not in encounter
    # Nor does the numbering tell (P-MSG-10): what is left is numbered 1..n, the
    # principal diagnosis first, as in a claim from which nothing was held back.
    assert [d["sequence"] for d in claim["diagnosis"]] == list(
        range(1, len(claim["diagnosis"]) + 1))
    kinds = [c["code"] for d in claim["diagnosis"] for t in d["type"] for c in t["coding"]]
    assert kinds.count("principal") == 1 and kinds[0] == "principal", kinds
    assert [p["sequence"] for p in claim.get("procedure", [])] == list(
        range(1, len(claim.get("procedure", [])) + 1))
    # Nor do the labels tell: every resource has the grade and confidentiality of an
    # ordinary claim's (no grade 5, no very-restricted "V").
    ordinary = labels_by_type(site.message("plain"))
    for kind, labels in labels_by_type(message).items():
        assert labels == ordinary[kind], (kind, labels ^ ordinary[kind])


def labels_by_type(message: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for r in resources(message):
        out.setdefault(r["resourceType"], set()).update(
            (s["system"], s["code"]) for s in r.get("meta", {}).get("security", [])
            if s["system"] in (GRADE, CONFIDENTIALITY))
    return out


@pytest.mark.parametrize("cls", ["malignant", "infectious", "mental"])
def test_companion_codes_leave_when_the_consent_names_the_class(site: Site, cls: str) -> None:
    case = site.cases[f"{cls}-named"]
    message = site.message(case.name)
    labelled: dict[str, set[str]] = {}
    for kind in ("Condition", "Procedure"):
        for r in resources(message, kind):
            labels = {s["code"] for s in r.get("meta", {}).get("security", [])
                      if s["system"] == SENSITIVITY}
            for code in codes_in(r, "code"):
                labelled[code] = labels
    for code in case.sensitive_codes:
        [found] = [c for c in labelled if c.replace(".", "").startswith(no_dots(code))]
        assert cls in labelled[found], (code, labelled[found])
    [claim] = resources(message, "Claim")
    by_url = {e["fullUrl"]: e["resource"] for e in message["entry"]}
    claimed = {by_url[d["diagnosisReference"]["reference"]]["id"] for d in claim["diagnosis"]}
    assert claimed == {c["id"] for c in resources(message, "Condition")}
    if any(k == "procedure" for k in claim):
        assert {by_url[p["procedureReference"]["reference"]]["id"]
                for p in claim["procedure"]} == {p["id"] for p in resources(message, "Procedure")}
    # The department is never in table 9, consent or not.
    [encounter] = resources(message, "Encounter")
    assert "location" not in encounter and case.sensitive_text[-1] not in text_of(message)


# --- 4. consent explain agrees with the wire ----------------------------------------------

PATH = re.compile(r"^(?P<type>[A-Za-z]+)\[(?P<index>\d+)\](?:\.(?P<element>.+))?$")
SELECTOR = re.compile(r"^(?P<name>[A-Za-z]+)\[(?P<key>system|url)=(?P<value>[^\]]+)\]$")


def present(resource: dict[str, Any], element: str) -> bool:
    """Whether ``element`` (``a.b``, or ``identifier[system=X]``) has a value in ``resource``."""
    nodes: list[Any] = [resource]
    for step in element.split("."):
        selector = SELECTOR.match(step)
        name = selector["name"] if selector else step
        found: list[Any] = []
        for node in nodes:
            value = node.get(name) if isinstance(node, dict) else None
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            if selector:
                items = [i for i in items if isinstance(i, dict)
                         and i.get(selector["key"]) == selector["value"]]
            found.extend(items)
        nodes = found
    return bool(nodes)


def explain(site: Site, case: str) -> subprocess.CompletedProcess[str]:
    return cli("consent", "explain", "--config", str(site.hospital_cfg), "--link", LINK_OUT,
               "--json", str(site.root / f"{case}.json"))


def mapped(site: Site, case: str) -> dict[str, list[dict[str, Any]]]:
    out = cli("map", "--from", "ws445", str(site.root / f"{case}.json"))
    assert out.returncode == 0, out.stderr
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in json.loads(out.stdout)["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return by_type


@pytest.mark.parametrize("case", ["plain", "malignant-unnamed", "malignant-named",
                                  "infectious-unnamed", "mental-unnamed"])
def test_consent_explain_says_what_the_insurer_then_received(site: Site, case: str) -> None:
    said = explain(site, case)
    assert said.returncode == 0, said.stderr
    report = json.loads(said.stdout)
    assert report["permitted"] is True
    source = mapped(site, case)
    message = site.message(case)
    on_wire = {r["id"]: r for r in resources(message)}
    outcomes: dict[str, int] = {}
    for element in report["elements"]:
        path = PATH.match(element["path"])
        assert path, element["path"]
        resource_id = source[path["type"]][int(path["index"])]["id"]
        wire = on_wire.get(resource_id)
        outcome = element["outcome"]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "sent":
            assert wire is not None, element["path"]
            assert path["element"] is None or present(wire, path["element"]), element["path"]
        else:
            assert outcome in ("removed-by-profile", "held-back-by-consent"), outcome
            if path["element"] is None:
                assert wire is None, element["path"]
            else:
                assert wire is None or not present(wire, path["element"]), element["path"]
            if outcome == "held-back-by-consent" and element["consent"] is None:
                # Held back because what it refers to is (a Claim.procedure naming a
                # withheld Procedure): the explanation says so.
                assert "held back" in (element["detail"] or ""), element
            elif outcome == "held-back-by-consent":
                assert element["consent"] == site.cases[case].consent_id, element
                assert element["provision"].startswith("Consent.provision")
    # Every resource that arrived was said to be sent.
    said_sent = {source[m["type"]][int(m["index"])]["id"] for e in report["elements"]
                 if e["outcome"] == "sent" and (m := PATH.match(e["path"]))}
    assert set(on_wire) - said_sent <= {r["id"] for r in resources(message, "MessageHeader")}
    # And every element that arrived was said to be sent (primitive extensions such as
    # _gender ride with their element).
    said_elements: dict[str, set[str]] = {}
    for e in report["elements"]:
        m = PATH.match(e["path"])
        if e["outcome"] == "sent" and m and m["element"]:
            name = re.split(r"[.\[]", m["element"])[0]  # identifier[system=...], address.city
            said_elements.setdefault(source[m["type"]][int(m["index"])]["id"], set()).add(name)
    for resource_id, resource in on_wire.items():
        if resource["resourceType"] == "MessageHeader":
            continue
        arrived = {k.lstrip("_") for k in resource} - {"resourceType", "id", "meta"}
        assert arrived <= said_elements.get(resource_id, set()), (
            resource["resourceType"], arrived - said_elements.get(resource_id, set()))
    held = outcomes.get("held-back-by-consent", 0)
    assert (held > 0) == case.endswith("-unnamed"), outcomes


@pytest.mark.parametrize("name", ["all-held", "principal-held"])
def test_a_claim_whose_every_or_principal_diagnosis_is_held_back_is_refused(
        site: Site, name: str) -> None:
    case = site.cases[name]
    assert case.push is not None and case.message_id is None
    # PROTOCOL P-MSG-10: refused at enqueue with consent-denied, naming the consent and
    # the provision; never sent without diagnoses nor with a placeholder.
    assert case.push.returncode != 0
    refusal = case.push.stdout + case.push.stderr
    assert "consent-denied" in refusal and case.consent_id in refusal
    assert "Consent.provision" in refusal
    assert "Traceback" not in refusal
    for value in (case.elements["HDSD00.11.048"], case.elements["HDSD00.11.110"], "Z51"):
        assert value not in refusal
    if name == "principal-held":
        assert "principal diagnosis" in refusal
    said = explain(site, name)
    assert said.returncode == 1, said.stdout + said.stderr
    report = json.loads(said.stdout)
    assert report["permitted"] is False
    held = [e for e in report["elements"] if e["outcome"] == "held-back-by-consent"]
    assert held and all(e["consent"] == case.consent_id for e in held)
    # Nothing of this stay at the insurer, in any message.
    number = case.elements["HDSD00.11.140"]
    assert all(number not in text_of(m) for m in site.wire.values())
    assert len(inbox(site.insurer_cfg)) == len(site.wire)
    outbox = cli("outbox", "list", "--config", str(site.hospital_cfg), "--json")
    assert outbox.returncode == 0, outbox.stderr
    assert len(json.loads(outbox.stdout)) == len(site.wire)


# --- 5. the disclosure history by every identifier ----------------------------------------


def disclosures(site: Site, system: str, value: str, *fmt: str) -> subprocess.CompletedProcess[str]:
    return cli("audit", "disclosures", "--config", str(site.hospital_cfg),
               "--patient", f"{system}|{value}", *fmt)


def sample_values(site: Site | list[Case]) -> list[str]:
    """Values of the records a history, log or store must never show."""
    values: set[str] = set()
    for case in (site.cases.values() if isinstance(site, Site) else site):
        e = case.elements
        for key in ("HDSD00.11.048", "HDSD00.11.110", "HDSD00.11.140", "HDSD00.11.006",
                    "HDSD00.11.053", "HDSD00.11.026", "HDSD00.11.101", "HDSD00.11.014"):
            if key in e:
                values.add(str(e[key]))
        values.update(case.sensitive_text)
        values.update(c for c in case.sensitive_codes if not c[0].isdigit())
        values.update(case.common_codes)
    return sorted(values)


def shows(text: str, value: str) -> bool:
    """Whether ``text`` shows ``value``. A value written in digits (a procedure code such
    as 51.23) counts only standing on its own: not inside a longer number, nor inside one
    of the bridge's own clock times (08:44:51.234567 holds "51.23")."""
    if not (value[:1].isdigit() and value[-1:].isdigit()):
        return value in text
    return re.search(r"(?<!\d)(?<!\d:)" + re.escape(value) + r"(?!\d)", text) is not None


@pytest.mark.parametrize("case", ["plain", "passport"])
@pytest.mark.control("U7")
def test_the_history_is_found_by_each_of_the_patients_identifiers(site: Site,
                                                                  case: str) -> None:
    c = site.cases[case]
    e = c.elements
    stays = [o for o in site.cases.values() if o.person == case]
    document = ID_CARD if e["HDSD00.11.049"] == "01" else ID_DOCUMENT
    identifiers = [(document, e["HDSD00.11.048"]), (RECORD_NO, e["HDSD00.11.006"]),
                   (HEALTH_CARD, e["HDSD00.11.053"])]
    identifiers += [(INPATIENT_NO, o.elements["HDSD00.11.140"]) for o in stays]
    histories = []
    values = sample_values(site)
    for system, value in identifiers:
        out = disclosures(site, system, value, "--json")
        assert out.returncode == 0, out.stderr
        for v in values:
            assert not shows(out.stdout + out.stderr, v), (system, v)
        listed = json.loads(out.stdout)["entries"]
        histories.append([(x["seq"], x["action"], x["subject"]) for x in listed])
    assert all(h == histories[0] for h in histories), histories
    actions = {(a, s) for _, a, s in histories[0]}
    for stay in stays:  # every stay of the person, whichever identifier was asked
        assert ("claim.enqueue", stay.message_id) in actions
        assert ("claim.ack", stay.message_id) in actions
        assert ("consent.put", stay.consent_id) in actions
    # Nobody else's claim is in this patient's history.
    others = {o.message_id for o in site.cases.values() if o.message_id and o.person != case}
    assert not others & {s for _, _, s in histories[0]}
    # The same history as FHIR AuditEvents.
    fhir = disclosures(site, *identifiers[2], "--fhir")
    assert fhir.returncode == 0, fhir.stderr
    bundle = json.loads(fhir.stdout)
    events = [x["resource"] for x in bundle["entry"]]
    assert events and {ev["resourceType"] for ev in events} == {"AuditEvent"}
    assert len(events) == len(histories[0])
    named = {ent["what"]["identifier"]["value"] for ev in events for ent in ev["entity"]}
    assert {stay.message_id for stay in stays} <= named
    for v in values:
        assert not shows(fhir.stdout, v), v


def test_the_enqueue_audit_names_the_provision_and_path_held_back_without_values(
        site: Site) -> None:
    values = sample_values(site)
    for name in ("malignant-unnamed", "infectious-unnamed", "mental-unnamed"):
        case = site.cases[name]
        out = disclosures(site, ID_CARD, case.elements["HDSD00.11.048"], "--json")
        assert out.returncode == 0, out.stderr
        [enqueue] = [x for x in json.loads(out.stdout)["entries"]
                     if x["action"] == "claim.enqueue"]
        detail = enqueue["detail"]
        assert f"Condition<-{case.consent_id}@Consent.provision" in detail, detail
        if name != "infectious-unnamed":  # the two with a special-disease treatment
            assert f"Procedure<-{case.consent_id}@Consent.provision" in detail, detail
        for v in values:
            assert not shows(detail, v), v
    # The refused claim is audited too, with the provision and no value.
    refused = site.cases["all-held"]
    out = disclosures(site, ID_CARD, refused.elements["HDSD00.11.048"], "--json")
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)["entries"]
    assert not [x for x in entries if x["action"] == "claim.enqueue"], entries
    [denied] = [x for x in entries if x["action"] == "claim.refused"]
    assert denied["outcome"] != "success", denied
    assert refused.consent_id in denied["detail"] and "Consent.provision" in denied["detail"]
    for v in values:
        assert not shows(denied["detail"], v), v
    # The whole audit log, as exported, carries no value of any record.
    export = cli("audit", "export", "--fhir", "--config", str(site.hospital_cfg))
    assert export.returncode == 0, export.stderr
    assert export.stdout
    for v in values:
        assert not shows(export.stdout, v), v


def test_the_stores_hold_no_value_in_clear_after_the_exchanges(site: Site) -> None:
    # After pushes, refusals, explanations and history look-ups by every identifier
    # (the tests above), neither store file nor its write-ahead log shows a value.
    values = [v.encode() for v in sample_values(site) if len(v.encode()) >= 6]
    files = [f for cfg in (site.hospital_cfg, site.insurer_cfg)
             for f in load_config(cfg).store.path.parent.glob("bridge.sqlite*")]
    assert len(files) >= 2
    for f in files:
        data = f.read_bytes()
        for v in values:
            assert v not in data, (f.name, v.decode())
