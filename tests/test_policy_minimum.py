"""Minimum necessary to the element: identifiers chosen by system and telecom by kind,
every allowed path of the commercial-insurance profile citing its row of table 9, and
nothing on the wire that the focus of the message does not refer to."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_bundles import HOSPITAL, NOW, claim_bundle, consent, ref

from bridge.cli import main
from bridge.errors import ConsentDenied, LoadError
from bridge.mapping import map_record
from bridge.policy.classify import copy_json, default_sensitive_codes
from bridge.policy.consent import ConsentRegistry, build_consent
from bridge.policy.engine import apply_policy
from bridge.policy.profile import LinkProfile, load_link_profile, load_profile
from bridge.resources import mappings_dir
from bridge.samples import inpatient_records

KEY = bytes(range(32))
ID_CARD = "urn:oid:2.16.156.10011.1.3"
INPATIENT_NO = "urn:oid:2.16.156.10011.1.12"
RECORD_NO = "urn:oid:2.16.156.10011.1.13"
HEALTH_CARD = "urn:oid:2.16.156.10011.1.19"
ALL_CLASSES = tuple(sorted(default_sensitive_codes().titles))
PROFILES = [
    "commercial-insurance",
    "regional-interoperability:default",
    "regional-interoperability:notify",
    "regional-interoperability:authorise",
    "research-limited-data-set",
]


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def consent_for(collection: dict[str, Any], recipient: str, purposes: list[str],
                classes: tuple[str, ...] = ()) -> ConsentRegistry:
    patient = resources(collection, "Patient")[0]
    ident = patient["identifier"][0]
    registry = ConsentRegistry()
    registry.put(build_consent(
        consent_id="c-1", patient_system=ident["system"], patient_value=ident["value"],
        recipient=recipient, purposes=purposes, start=date(2020, 1, 1), end=date(2030, 1, 1),
        sensitive_classes=classes, hospital_partner_id=HOSPITAL,
    ), now=NOW)
    return registry


def with_all_identifiers() -> dict[str, Any]:
    """A front sheet whose patient has an ID card, inpatient, record and health-card number."""
    for record in inpatient_records(60, seed=3):
        if record["elements"].get("HDSD00.11.053") and record["groups"].get("operations"):
            return record
    raise AssertionError("the sample generator gave no record with a health card")


@pytest.fixture(scope="module")
def insurer() -> LinkProfile:
    return load_link_profile("commercial-insurance")


def test_only_table_9_identifiers_and_telephones_reach_the_insurer(insurer: LinkProfile) -> None:
    record = with_all_identifiers()
    collection = map_record(record, now=NOW)
    patient = resources(collection, "Patient")[0]
    assert {i["system"] for i in patient["identifier"]} >= {ID_CARD, INPATIENT_NO, RECORD_NO, HEALTH_CARD}
    patient["telecom"].append({"system": "email", "value": "someone@example.cn"})
    record_no = record["elements"]["HDSD00.11.006"]
    health_card = record["elements"]["HDSD00.11.053"]
    result = apply_policy(
        collection, registry=consent_for(collection, "insurer-b", ["HPAYMT"], ALL_CLASSES),
        profile=insurer, recipient="insurer-b", purpose="HPAYMT", now=NOW,
    )
    wire = json.dumps(result.bundle, ensure_ascii=False)
    # 病案号 and 健康卡号 are in no row of table 9: their values are nowhere on the wire.
    assert record_no not in wire and health_card not in wire
    assert "someone@example.cn" not in wire
    sent = resources(result.bundle, "Patient")[0]
    assert [i["system"] for i in sent["identifier"]] == [ID_CARD]
    assert [t["system"] for t in sent["telecom"]] == ["phone"]
    # The inpatient number travels where table 9 puts it: with the stay and the claim.
    assert resources(result.bundle, "Claim")[0]["identifier"][0]["system"] == INPATIENT_NO
    assert f"Patient.identifier[system={RECORD_NO}]" in result.removed
    assert "Patient.telecom[system=email]" in result.removed
    # The anaesthesia method (手术信息 — 麻醉方式) goes; operation level and incision do not.
    urls = {e["url"] for p in resources(result.bundle, "Procedure") for e in p.get("extension", [])}
    assert urls == {"urn:ws-fhir-bridge:StructureDefinition/anaesthesia-method"}


def test_the_surgeon_never_travels_unreferenced(insurer: LinkProfile) -> None:
    collection = map_record(with_all_identifiers(), now=NOW)
    assert resources(collection, "Practitioner")
    result = apply_policy(
        collection, registry=consent_for(collection, "insurer-b", ["HPAYMT"], ALL_CLASSES),
        profile=insurer, recipient="insurer-b", purpose="HPAYMT", now=NOW,
    )
    assert not resources(result.bundle, "Practitioner")
    assert "Practitioner" in result.removed


@pytest.mark.parametrize("owned", [False, True], ids=["copied", "given up"])
def test_a_held_back_operation_takes_its_surgeon_with_it(tmp_path: Path, owned: bool) -> None:
    """On a link that may carry surgeons, holding back the operation that names one
    (a special-disease treatment without class consent) removes the surgeon too; also
    when the policy works on the collection in place (``owned``, as the claim path
    gives it the collection it mapped), each time on a collection of its own."""
    text = (mappings_dir() / "links" / "commercial-insurance.yaml").read_text(encoding="utf-8")
    text = text.replace(
        '      - {path: extension, urls: ["urn:ws-fhir-bridge:StructureDefinition/anaesthesia-method"],',
        '      - {path: performer, row: "医疗应用数据 (3) 病案首页信息 — 主治医师"}\n'
        '      - {path: extension, urls: ["urn:ws-fhir-bridge:StructureDefinition/anaesthesia-method"],',
    ) + '  Practitioner:\n    elements:\n      - {path: name, row: "医疗应用数据 (3) 病案首页信息 — 主治医师"}\n'
    path = tmp_path / "with-surgeons.yaml"
    path.write_text(text, encoding="utf-8")
    profile = load_profile(path)
    bundle = claim_bundle([("J18.900", "肺炎")])
    procedure = resources(bundle, "Procedure")[0]
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    def given(bundle: dict[str, Any]) -> dict[str, Any]:
        return copy_json(bundle) if owned else bundle

    sent = apply_policy(given(bundle), registry=registry, profile=profile,
                        recipient="insurer-b", purpose="HPAYMT", now=NOW, owned=owned)
    assert [p["name"][0]["text"] for p in resources(sent.bundle, "Practitioner")] == ["王医生"]
    # The same operation coded as a special-disease treatment (chemotherapy, 99.25).
    procedure["code"]["coding"][0]["code"] = "99.25"
    held = apply_policy(given(bundle), registry=registry, profile=profile,
                        recipient="insurer-b", purpose="HPAYMT", now=NOW, owned=owned)
    assert not resources(held.bundle, "Procedure")
    assert not resources(held.bundle, "Practitioner")
    assert "王医生" not in json.dumps(held.bundle, ensure_ascii=False)


def test_every_allowed_path_cites_its_row_of_table_9(insurer: LinkProfile) -> None:
    rows = insurer.table()
    assert rows and insurer.cites
    for path, _selects, _transform, row in rows:
        assert row, f"{path} cites no row of table 9"
        category = row.split(" ")[0]
        assert category in {"个人属性数据", "健康状况数据", "医疗应用数据", "医疗支付数据",
                            "卫生资源数据", "FHIR"}, (path, row)


def test_profile_show_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "show", "commercial-insurance"]) == 0
    out = capsys.readouterr().out
    assert "Patient.identifier" in out and "证件号" in out
    assert RECORD_NO not in out and HEALTH_CARD not in out
    line = next(x for x in out.splitlines() if x.startswith("Claim.total"))
    assert "合计金额" in line
    assert main(["profile", "show", "--json", "commercial-insurance"]) == 0
    data = json.loads(capsys.readouterr().out)
    telecom = next(e for e in data["elements"] if e["path"] == "Patient.telecom")
    assert telecom["selects"] == "system in phone"


@pytest.mark.parametrize(
    ("element", "message"),
    [
        ("      - name\n", "cites its row"),
        ("      - {path: name, row: x, systems: [a]}\n", "systems selects entries of an Identifier"),
        ("      - {path: identifier, row: x, urls: [a]}\n", "urls selects entries of an Extension"),
        ("      - {path: name, row: x, colour: red}\n", "unknown key"),
    ],
)
def test_profile_selection_mistakes_name_file_and_line(
    tmp_path: Path, element: str, message: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "profile: p\ncites: 表9\nresources:\n  Organization:\n    elements:\n"
        "      - {path: identifier, systems: [urn:x], row: r}\n" + element,
        encoding="utf-8",
    )
    with pytest.raises(LoadError) as info:
        load_profile(path)
    assert message in info.value.message
    assert f"{path}:" in (info.value.location or "")


# --- property (a): on the wire, only what the profile allows, all of it referenced -------


def allowed_leaf(profile: LinkProfile, rtype: str, path: list[str]) -> bool:
    """Is this element path (segments, list indices dropped) inside the allow tree?"""
    if path[0] in ("resourceType", "id", "meta"):
        return True
    node: Any = profile.allowed[rtype]
    for seg in path:
        seg = seg.removeprefix("_")
        if node is None:
            return True
        if seg not in node:
            return False
        node = node[seg]
    return True


def walk_wire(profile: LinkProfile, rtype: str, node: Any, path: list[str],
              keys: dict[str, int], refs: set[int]) -> None:
    """Check every leaf of one resource against the allow tree and its selections, and
    collect the entries it references."""
    if isinstance(node, dict):
        assert node, (rtype, path, "empty object")
        if isinstance(node.get("reference"), str):
            assert node["reference"] in keys, (rtype, path, "dangling reference")
            refs.add(keys[node["reference"]])
        for k, v in node.items():
            walk_wire(profile, rtype, v, [*path, k], keys, refs)
    elif isinstance(node, list):
        full = f"{rtype}.{'.'.join(path)}"
        match = profile.matches.get(full)
        for item in node:
            if match is not None:
                assert match.admits(item), (full, "entry outside the selection")
            walk_wire(profile, rtype, item, path, keys, refs)
    else:
        assert allowed_leaf(profile, rtype, path), (rtype, ".".join(path))


def check_wire(profile: LinkProfile, bundle: dict[str, Any]) -> None:
    """An independent reading of the profile against a bundle as sent."""
    keys: dict[str, int] = {}
    for i, entry in enumerate(bundle["entry"]):
        r = entry["resource"]
        keys[entry["fullUrl"]] = i
        keys[f"{r['resourceType']}/{r['id']}"] = i
    edges: list[set[int]] = []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        rtype = resource["resourceType"]
        assert rtype in profile.allowed, rtype
        refs: set[int] = set()
        body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
        walk_wire(profile, rtype, body, [], keys, refs)
        edges.append(refs)
    if profile.focus:
        roots = [i for i, e in enumerate(bundle["entry"])
                 if e["resource"]["resourceType"] in profile.focus]
        assert roots, "no focus on the wire"
        seen = set(roots)
        stack = list(roots)
        while stack:
            for t in edges[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        unreached = [bundle["entry"][i]["resource"]["resourceType"]
                     for i in range(len(bundle["entry"])) if i not in seen]
        assert not unreached, f"not referenced from {profile.focus}: {unreached}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PROFILES), st.integers(0, 10_000), st.booleans(), st.data())
def test_every_element_on_the_wire_is_allowed_and_referenced(
    name: str, seed: int, class_consent: bool, data: st.DataObject
) -> None:
    profile = load_link_profile(name)
    record = inpatient_records(1, seed=seed)[0]
    collection = map_record(record, now=NOW)
    patient = resources(collection, "Patient")[0]
    # Contact points and identifiers of every kind the hospital may hold.
    extra = data.draw(st.lists(st.sampled_from([
        ("telecom", {"system": "email", "value": "a@b.cn"}),
        ("telecom", {"system": "fax", "value": "010-1"}),
        ("telecom", {"system": "phone", "use": "mobile", "value": "13900000001"}),
        ("identifier", {"system": HEALTH_CARD, "value": "H1"}),
        ("identifier", {"system": "urn:oid:2.16.156.10011.1.11", "value": "MZ1"}),
    ]), max_size=3))
    for element, value in extra:
        patient.setdefault(element, []).append(value)
    purpose = "HRESCH" if name.startswith("research") else "HPAYMT"
    registry = consent_for(collection, "x", [purpose, "TREAT"],
                           ALL_CLASSES if class_consent else ())
    try:
        result = apply_policy(collection, registry=registry, profile=profile, recipient="x",
                              purpose=purpose, now=NOW, key=KEY)
    except ConsentDenied as exc:
        # Refused whole (P-MSG-10): a claim whose principal diagnosis is special and not
        # consented, or, where the profile refuses a claim without them, whose every
        # diagnosis is.
        assert not class_consent
        assert "principal diagnosis" in exc.message or (
            "every entry of Claim.diagnosis" in exc.message and profile.refuse_without)
        return
    check_wire(profile, result.bundle)
    assert profile.check(result.bundle) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PROFILES), st.sampled_from(["J18.900", "B20.000", "C50.900", "Z51.1"]))
def test_hand_built_claims_on_the_wire_are_allowed_and_referenced(name: str, code: str) -> None:
    profile = load_link_profile(name)
    bundle = claim_bundle([(code, "诊断"), ("I10.x00", "高血压")])
    registry = ConsentRegistry()
    registry.put(consent(recipient="x", purposes=("HPAYMT", "TREAT")), now=NOW)
    result = apply_policy(bundle, registry=registry, profile=profile, recipient="x",
                          purpose="HPAYMT", now=NOW, key=KEY)
    check_wire(profile, result.bundle)


def test_unreferenced_resource_in_input_is_dropped(insurer: LinkProfile) -> None:
    bundle = claim_bundle()
    bundle["entry"].append({"fullUrl": "urn:uuid:stray", "resource": {
        "resourceType": "Organization", "id": "stray", "name": "无关机构"}})
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    result = apply_policy(bundle, registry=registry, profile=insurer, recipient="insurer-b",
                          purpose="HPAYMT", now=NOW)
    assert "无关机构" not in json.dumps(result.bundle, ensure_ascii=False)
    assert ref("hospital")["reference"] in {e["fullUrl"] for e in result.bundle["entry"]}
