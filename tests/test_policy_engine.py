"""apply_policy: classification, consent, minimum necessary and special diseases together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from policy_bundles import ICD10, NOW, RECIPIENT, claim_bundle, consent, rid

from bridge.errors import ConsentDenied, LoadError
from bridge.policy.classify import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    GRADE_SYSTEM,
    SENSITIVITY_SYSTEM,
    classify,
    load_sensitive_codes,
)
from bridge.policy.consent import ConsentRegistry
from bridge.policy.engine import apply_policy, recheck
from bridge.policy.profile import LinkProfile, load_link_profile
from bridge.records.fhir import validate_resource


@pytest.fixture(scope="module")
def insurer() -> LinkProfile:
    return load_link_profile("commercial-insurance")


def security(resource: dict[str, Any], system: str) -> list[str]:
    return [c["code"] for c in resource["meta"]["security"] if c["system"] == system]


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def run(registry: ConsentRegistry, profile: LinkProfile, bundle: dict[str, Any] | None = None,
        **kw: Any):
    return apply_policy(
        bundle or claim_bundle(),
        registry=registry,
        profile=profile,
        recipient=kw.pop("recipient", RECIPIENT),
        purpose=kw.pop("purpose", "HPAYMT"),
        now=kw.pop("now", NOW),
    )


@pytest.mark.parametrize(
    ("code", "classes"),
    [
        ("B20.000", {"infectious"}),
        ("A53.900", {"sexual-reproductive"}),
        ("F32.900", {"mental"}),
        ("C34.900x001", {"malignant"}),
        ("D05.1", {"malignant"}),
        ("Q90.9", {"genetic"}),
        ("K60.3", {"anal"}),
        ("I84.2", {"anal"}),
        ("G12.2", {"rare", "incurable"}),
        ("E83.0", {"genetic", "rare"}),
        ("J18.900", set()),
        ("E78.5", set()),
        ("G12", set()),
    ],
)
def test_special_disease_classes_by_icd10_range(code: str, classes: set[str]) -> None:
    assert load_sensitive_codes().classes_of(ICD10, code) == classes


def test_other_code_systems_are_not_matched_as_icd10() -> None:
    assert load_sensitive_codes().classes_of("urn:oid:2.16.156.10011.2.3.3.12", "C34") == set()


@pytest.mark.control("T1")
def test_classify_labels_category_confidentiality_and_class() -> None:
    bundle = claim_bundle()
    result = classify(bundle)
    out = result.bundle
    patient = resources(out, "Patient")[0]
    assert security(patient, CATEGORY_SYSTEM) == ["personal-attribute"]
    assert security(patient, CONFIDENTIALITY_SYSTEM) == ["R"]
    hiv, pneumonia = resources(out, "Condition")[1], resources(out, "Condition")[0]
    assert security(hiv, SENSITIVITY_SYSTEM) == ["infectious"]
    assert security(hiv, CONFIDENTIALITY_SYSTEM) == ["V"]
    assert security(pneumonia, SENSITIVITY_SYSTEM) == []
    # A claim's diagnoses and procedures are health status and medical application data.
    assert security(resources(out, "Claim")[0], CATEGORY_SYSTEM) == [
        "health-payment", "health-status", "medical-application"]
    # Its diagnoses point at Conditions instead of naming codes: grade 3, not 5.
    assert security(resources(out, "Claim")[0], GRADE_SYSTEM) == ["3"]
    assert security(patient, GRADE_SYSTEM) == ["4"]

    assert security(resources(out, "Organization")[0], CONFIDENTIALITY_SYSTEM) == ["N"]
    assert [label.grade for label in result.sensitive()] == [5]
    assert "meta" not in bundle["entry"][0]["resource"]  # the input is not changed
    validate_resource(out)


def test_sensitive_code_file_errors_name_file_line_key(tmp_path: Path) -> None:
    path = tmp_path / "codes.yaml"
    path.write_text(
        "systems: [urn:x]\nclasses:\n  mental:\n    ranges: [F00-F99, F99-F10]\n", encoding="utf-8"
    )
    with pytest.raises(LoadError) as info:
        load_sensitive_codes(path)
    assert info.value.location == f"{path}:4 classes.mental.ranges.1"


def test_no_consent_nothing_leaves(insurer: LinkProfile) -> None:
    with pytest.raises(ConsentDenied):
        run(ConsentRegistry(), insurer)


def test_special_disease_held_back_without_explicit_consent(insurer: LinkProfile) -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    result = run(registry, insurer)
    hiv_url = f"urn:uuid:{rid('condition-1')}"
    text = json.dumps(result.bundle, ensure_ascii=False)
    assert "B20.000" not in text and hiv_url not in text
    assert len(resources(result.bundle, "Condition")) == 3
    # The claim keeps its other diagnoses, numbered 1..n again (nothing marks the gap,
    # P-MSG-10); the one pointing at the held-back condition goes.
    claim = resources(result.bundle, "Claim")[0]
    assert [d["sequence"] for d in claim["diagnosis"]] == [1, 2, 3]
    assert hiv_url not in [d["diagnosisReference"]["reference"] for d in claim["diagnosis"]]
    assert {"Condition", "Claim.diagnosis", "Encounter.diagnosis"} <= set(result.held_back)
    assert "B20" not in json.dumps(result.held_back)
    validate_resource(result.bundle)


def test_special_disease_passes_with_explicit_consent(insurer: LinkProfile) -> None:
    registry = ConsentRegistry()
    registry.put(consent(sensitive_classes=("infectious",)), now=NOW)
    result = run(registry, insurer)
    assert result.held_back == []
    assert len(resources(result.bundle, "Condition")) == 4
    claim = resources(result.bundle, "Claim")[0]
    assert len(claim["diagnosis"]) == 4
    assert ("urn:ws-fhir-bridge:sensitivity", "infectious") in result.decision.allowed_labels


def test_consent_for_one_class_does_not_cover_another(insurer: LinkProfile) -> None:
    bundle = claim_bundle([("J18.900", "肺炎"), ("F20.000", "精神分裂症"), ("B20.000", "HIV")])
    registry = ConsentRegistry()
    registry.put(consent(sensitive_classes=("infectious",)), now=NOW)
    result = run(registry, insurer, bundle)
    codes = [c["code"]["coding"][0]["code"] for c in resources(result.bundle, "Condition")]
    assert codes == ["J18.900", "B20.000"]


def test_nested_deny_on_label_holds_back_even_with_v(insurer: LinkProfile) -> None:
    resource = consent(sensitive_classes=())
    resource["provision"]["securityLabel"] = [{"system": CONFIDENTIALITY_SYSTEM, "code": "V"}]
    resource["provision"]["provision"] = [
        {"type": "deny", "securityLabel": [{"system": SENSITIVITY_SYSTEM, "code": "infectious"}]}
    ]
    registry = ConsentRegistry()
    registry.put(resource, now=NOW)
    bundle = claim_bundle([("C34.900", "肺癌"), ("B20.000", "HIV")])
    result = run(registry, insurer, bundle)
    codes = [c["code"]["coding"][0]["code"] for c in resources(result.bundle, "Condition")]
    assert codes == ["C34.900"]


def test_inline_claim_diagnosis_code_is_held_back_too(insurer: LinkProfile) -> None:
    bundle = claim_bundle([("J18.900", "肺炎")])
    claim = resources(bundle, "Claim")[0]
    claim["diagnosis"].append(
        {"sequence": 2, "diagnosisCodeableConcept": {"coding": [{"system": ICD10, "code": "B20.000"}]}}
    )
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    result = run(registry, insurer, bundle)
    assert "B20.000" not in json.dumps(result.bundle)
    assert "Claim.diagnosis" in result.held_back


@pytest.mark.control("T2")
def test_profile_removals_are_reported_and_output_is_valid(insurer: LinkProfile) -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    result = run(registry, insurer)
    assert "Patient.address.line" in result.removed
    # Table 9 names neither the practitioners' contact details nor the surgeon.
    assert "Practitioner" in result.removed
    assert not resources(result.bundle, "Practitioner")
    assert result.data_period is not None
    validate_resource(result.bundle)
    for entry in result.bundle["entry"]:
        assert security(entry["resource"], CONFIDENTIALITY_SYSTEM)


@pytest.mark.control("U3")
def test_wrong_purpose_or_recipient_denies_whole_disclosure(insurer: LinkProfile) -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    with pytest.raises(ConsentDenied):
        run(registry, insurer, purpose="HMARKT")
    with pytest.raises(ConsentDenied):
        run(registry, insurer, recipient="insurer-c")


def test_revocation_between_policy_and_dispatch_is_caught_by_recheck(
    insurer: LinkProfile,
) -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    result = run(registry, insurer)
    assert recheck(result, registry=registry, now=NOW).consent_id == "consent-1"
    revoked = consent()
    revoked["status"] = "inactive"
    registry.put(revoked, now=NOW)
    with pytest.raises(ConsentDenied):
        recheck(result, registry=registry, now=NOW)


def test_collection_without_a_patient_is_refused(insurer: LinkProfile) -> None:
    bundle = claim_bundle()
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    with pytest.raises(ConsentDenied):
        run(registry, insurer, bundle)
