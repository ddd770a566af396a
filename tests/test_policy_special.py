"""Special-disease data (GB/T 39725-2020 §11.1.2.3) leaves only with class consent: in
any coding position, as Z-code companions, as laboratory tests, and through the
department of the stay."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_bundles import ICD10, NOW, claim_bundle, consent, ref, rid

from bridge.policy.classify import default_sensitive_codes
from bridge.policy.consent import ConsentRegistry
from bridge.policy.engine import apply_policy
from bridge.policy.profile import load_link_profile

KEY = bytes(range(32))
LOINC = "http://loinc.org"

# Codes that name each class, written out here (not derived from the policy files):
# the diagnoses themselves and the Z-code companions that tell the same disease.
SPECIAL: dict[str, list[str]] = {
    "malignant": ["C50.900", "D05.100", "Z51.0", "Z51.1", "Z08.x00", "Z85.300", "Z80.3"],
    "infectious": ["B20.000", "Z21", "R75", "O98.7", "Z20.6", "Z86.11", "Z86.19", "B18.100",
                   "A15.000", "Z22.5"],
    "mental": ["F32.900", "F20.000", "Z86.5", "Z91.5", "X70", "Z50.2", "Z71.5"],
    "sexual-reproductive": ["A51.000", "O04.900", "Z30.2", "N97.900", "Z20.2"],
    "genetic": ["Q90.900", "E84.000", "Z15.0", "D66.x00"],
    "anal": ["K60.300", "K64.000", "I84.200"],
    "rare": ["G35.x00", "G70.000", "E75.200"],
    "incurable": ["G30.900", "N18.500", "Z99.2", "Z51.5"],
}
ORDINARY = ["J18.900", "I10.x00", "E11.900", "K35.800", "Z51.2", "Z86.2", "E78.000", "Z12.3"]
PROFILES = ["commercial-insurance", "regional-interoperability:authorise",
            "research-limited-data-set"]
DEPARTMENT = {"malignant": "肿瘤科", "infectious": "感染科", "mental": "精神科",
              "sexual-reproductive": "生殖医学科", "genetic": "遗传科", "anal": "肛肠科",
              "rare": "神经内科", "incurable": "安宁疗护科"}


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def codings(node: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
            out.append((node["system"], node["code"]))
        for v in node.values():
            out.extend(codings(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(codings(v))
    return out


@pytest.mark.parametrize(("cls", "code"), [(c, x) for c, xs in SPECIAL.items() for x in xs])
def test_each_special_code_falls_in_its_class(cls: str, code: str) -> None:
    assert cls in default_sensitive_codes().classes_of(ICD10, code)


@pytest.mark.parametrize("code", ORDINARY)
def test_ordinary_codes_are_not_special(code: str) -> None:
    assert default_sensitive_codes().classes_of(ICD10, code) == frozenset()


def placed(cls: str, code: str, positions: list[str]) -> dict[str, Any]:
    """A claim whose stay names ``code`` in each of ``positions``, and whose ward is the
    department of the class."""
    concept = {"coding": [{"system": ICD10, "code": code, "display": "特殊病种诊断"}],
               "text": "特殊病种诊断"}
    bundle = claim_bundle([(code, "特殊病种诊断") if "Condition.code" in positions
                           else ("J18.900", "肺炎"), ("I10.x00", "高血压")])
    encounter = resources(bundle, "Encounter")[0]
    claim = resources(bundle, "Claim")[0]
    procedure = resources(bundle, "Procedure")[0]
    encounter["location"] = [{"location": {
        "identifier": {"system": "urn:oid:2.16.156.10011.1.21", "value": "9F-2病区"},
        "display": DEPARTMENT[cls]}, "status": "completed"}]
    if "Claim.diagnosis" in positions:
        claim["diagnosis"].append({"sequence": 9, "diagnosisCodeableConcept": concept})
    if "Encounter.reasonCode" in positions:
        encounter["reasonCode"] = [concept, {"coding": [{"system": ICD10, "code": "J18.900"}]}]
    if "Procedure.reasonCode" in positions:
        procedure["reasonCode"] = [concept]
    return bundle


POSITIONS = ["Condition.code", "Claim.diagnosis", "Encounter.reasonCode", "Procedure.reasonCode"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PROFILES),
    st.sampled_from(sorted(SPECIAL)).flatmap(
        lambda c: st.tuples(st.just(c), st.sampled_from(SPECIAL[c]))),
    st.lists(st.sampled_from(POSITIONS), min_size=1, unique=True),
    st.booleans(),
)
def test_no_special_code_leaves_without_class_consent(
    name: str, drawn: tuple[str, str], positions: list[str], other_classes: bool
) -> None:
    """Property (c): whatever class, code and coding position, and whatever other classes
    the consent names, nothing of the class leaves — not the code, its text, nor the
    department of the stay."""
    cls, code = drawn
    profile = load_link_profile(name)
    others = tuple(c for c in SPECIAL if c != cls) if other_classes else ()
    registry = ConsentRegistry()
    registry.put(consent(recipient="x", purposes=("HPAYMT", "TREAT", "HRESCH"),
                         sensitive_classes=others), now=NOW)
    purpose = "HRESCH" if name.startswith("research") else "HPAYMT"
    result = apply_policy(placed(cls, code, positions), registry=registry, profile=profile,
                          recipient="x", purpose=purpose, now=NOW, key=KEY)
    wire = json.dumps(result.bundle, ensure_ascii=False)
    sent = {c.upper() for _, c in codings(result.bundle)}
    assert code.upper() not in sent, (name, code, positions)
    assert "特殊病种诊断" not in wire
    assert DEPARTMENT[cls] not in wire and "9F-2病区" not in wire
    assert cls not in wire  # no sensitivity label of the class either


def test_with_class_consent_the_diagnosis_and_department_travel() -> None:
    """The same claim with a consent naming the class: all of it goes (the property above
    is not met by sending nothing)."""
    profile = load_link_profile("regional-interoperability:authorise")
    registry = ConsentRegistry()
    registry.put(consent(recipient="x", purposes=("TREAT",), sensitive_classes=("malignant",)),
                 now=NOW)
    result = apply_policy(placed("malignant", "Z51.1", POSITIONS), registry=registry,
                          profile=profile, recipient="x", purpose="TREAT", now=NOW)
    wire = json.dumps(result.bundle, ensure_ascii=False)
    assert "Z51.1" in wire and "肿瘤科" in wire


def test_department_is_held_back_by_the_provision_that_held_the_diagnosis() -> None:
    profile = load_link_profile("regional-interoperability:authorise")
    registry = ConsentRegistry()
    registry.put(consent(recipient="x", purposes=("TREAT",)), now=NOW)
    result = apply_policy(placed("infectious", "Z21", ["Condition.code"]), registry=registry,
                          profile=profile, recipient="x", purpose="TREAT", now=NOW)
    assert "location" not in resources(result.bundle, "Encounter")[0]
    assert result.record is not None
    (fate,) = [h for h in result.record.held_back if h.path == "Encounter.location"]
    condition = next(h for h in result.record.held_back if h.path == "Condition")
    assert (fate.reason, fate.consent_id, fate.provision_path) == (
        condition.reason, condition.consent_id, condition.provision_path)
    # Nothing special held back: the department goes.
    plain = apply_policy(placed("infectious", "J18.900", ["Condition.code"]), registry=registry,
                         profile=profile, recipient="x", purpose="TREAT", now=NOW)
    assert "感染科" in json.dumps(plain.bundle, ensure_ascii=False)


@pytest.mark.parametrize(("code", "cls"), [("7917-8", "infectious"), ("25836-8", "infectious"),
                                           ("13955-0", "infectious"),
                                           ("20507-0", "sexual-reproductive")])
def test_hiv_and_other_special_laboratory_tests_need_the_class(code: str, cls: str) -> None:
    profile = load_link_profile("regional-interoperability:notify")
    bundle = claim_bundle([("J18.900", "肺炎")])
    for name, loinc in (("obs-special", code), ("obs-plain", "718-7")):  # 718-7: haemoglobin
        bundle["entry"].append({"fullUrl": f"urn:uuid:{rid(name)}", "resource": {
            "resourceType": "Observation", "id": rid(name), "status": "final",
            "code": {"coding": [{"system": LOINC, "code": loinc}]},
            "subject": ref("patient"), "encounter": ref("encounter"),
            "valueString": "阴性"}})
    registry = ConsentRegistry()
    registry.put(consent(recipient="x", purposes=("TREAT",)), now=NOW)
    result = apply_policy(bundle, registry=registry, profile=profile, recipient="x",
                          purpose="TREAT", now=NOW)
    sent = [o["code"]["coding"][0]["code"] for o in resources(result.bundle, "Observation")]
    assert sent == ["718-7"]
    assert cls in default_sensitive_codes().classes_of(LOINC, code)
