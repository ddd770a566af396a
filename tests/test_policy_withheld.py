"""What a claim with some diagnoses held back looks like to the insurer (PROTOCOL
P-MSG-10): nothing in it tells that something was withheld. The diagnoses and
procedures left are numbered 1..n again, items point at what is still there, and a
claim whose principal diagnosis consent holds back is refused at enqueue, naming the
consent and provision, as a claim with none left is."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from e2e_support import consent_for, make_workdir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import load_config
from bridge.errors import ConsentDenied
from bridge.link.node import Controller
from bridge.messages import collection_of
from bridge.policy.classify import default_sensitive_codes
from bridge.policy.consent import ConsentRegistry, deny_provision
from bridge.policy.engine import close_sequence_gaps
from bridge.samples import inpatient_records

LINK = "claims-to-insurer-b"
ICD10 = "urn:oid:2.16.156.10011.2.3.3.11"
CODES = default_sensitive_codes()
MAIN = "HDSD00.11.023"  # 出院诊断-主要诊断-疾病编码
OTHER = "HDSD00.11.020"  # 出院诊断-其他诊断-疾病编码


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    hospital_cfg, _ = make_workdir(tmp_path_factory.mktemp("withheld"))
    controller = Controller(load_config(hospital_cfg))
    yield controller
    asyncio.run(controller.close())


def use_consent(controller: Controller, resource: dict[str, Any] | None) -> None:
    controller.consents = ConsentRegistry()
    controller.link_consents = {}
    if resource is not None:
        controller.consents.put(resource, now=datetime.now(UTC))


def claim_of(signed: dict[str, Any]) -> dict[str, Any]:
    (claim,) = [e["resource"] for e in collection_of(signed)["entry"]
                if e["resource"]["resourceType"] == "Claim"]
    return claim


def principal(diagnosis: dict[str, Any]) -> bool:
    return any(c.get("code") == "principal" for t in diagnosis.get("type", [])
               for c in t.get("coding", []))


def with_diagnoses(seed: int, diagnoses: list[tuple[str, str]]) -> dict[str, Any]:
    """A front sheet whose diagnoses are ``(element, code)``: MAIN once, OTHER any times."""
    record = copy.deepcopy(inpatient_records(1, seed=seed)[0])
    record["groups"]["diagnoses"] = [
        {element: code, element.replace("023", "024").replace("020", "021"): "诊断"}
        for element, code in diagnoses]
    return record


def test_a_secondary_diagnosis_held_back_leaves_no_gap(hospital: Controller) -> None:
    record = with_diagnoses(11, [(MAIN, "K80.200"), (OTHER, "Z51.100"), (OTHER, "I10.x00"),
                                 (OTHER, "Z85.300"), (OTHER, "E11.900")])
    use_consent(hospital, consent_for(record, consent_id="c-plain", sensitive=()))
    signed, _ = hospital.prepare(record, LINK)
    diagnoses = claim_of(signed)["diagnosis"]
    assert [d["sequence"] for d in diagnoses] == [1, 2, 3]
    assert principal(diagnoses[0]) and not any(principal(d) for d in diagnoses[1:])


def test_a_held_back_principal_diagnosis_refuses_the_claim(hospital: Controller) -> None:
    record = with_diagnoses(12, [(MAIN, "Z51.100"), (OTHER, "I10.x00")])
    use_consent(hospital, consent_for(record, consent_id="c-plain", sensitive=()))
    explanation = hospital.explain(record, LINK)
    with pytest.raises(ConsentDenied) as info:
        hospital.prepare(record, LINK)
    assert "principal diagnosis" in info.value.message
    assert info.value.detail.get("consent_id") == "c-plain"
    assert "c-plain" in str(info.value)
    assert not explanation.permitted
    assert explanation.refusal is not None
    assert explanation.refusal.message == info.value.message
    # The class named: the same claim goes, principal first.
    use_consent(hospital, consent_for(record, consent_id="c-all"))
    signed, _ = hospital.prepare(record, LINK)
    diagnoses = claim_of(signed)["diagnosis"]
    assert [d["sequence"] for d in diagnoses] == [1, 2] and principal(diagnoses[0])


CONSENTS = ["none", "no-classes", "all-classes", "no-procedures"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(0, 20_000), st.sampled_from(CONSENTS))
def test_every_claim_sent_is_numbered_without_gaps(
    hospital: Controller, seed: int, kind: str,
) -> None:
    record = inpatient_records(1, seed=seed)[0]
    if kind == "none":
        consent = None
    elif kind == "all-classes":
        consent = consent_for(record, consent_id="c-all")
    else:
        consent = consent_for(record, consent_id=f"c-{kind}", sensitive=())
        if kind == "no-procedures":
            consent["provision"]["provision"] = [deny_provision(resource_types=["Procedure"])]
    use_consent(hospital, consent)
    had_principal = any(MAIN in d for d in record["groups"].get("diagnoses", []))
    try:
        signed, _ = hospital.prepare(record, LINK)
    except ConsentDenied:
        return
    claim = claim_of(signed)
    for element in ("diagnosis", "procedure"):
        numbers = [m["sequence"] for m in claim.get(element, [])]
        assert numbers == list(range(1, len(numbers) + 1)), (element, numbers)
    assert any(principal(d) for d in claim["diagnosis"]) == had_principal
    numbers = {d["sequence"] for d in claim["diagnosis"]}
    for item in claim.get("item", []):
        assert set(item.get("diagnosisSequence", [])) <= numbers


def test_items_follow_their_diagnoses_when_numbers_close() -> None:
    bundle = {"entry": [{"resource": {
        "resourceType": "Claim", "id": "c",
        "diagnosis": [{"sequence": 1}, {"sequence": 3}, {"sequence": 4}],
        "procedure": [{"sequence": 2}],
        "item": [{"sequence": 1, "diagnosisSequence": [3, 2], "procedureSequence": [1]},
                 {"sequence": 2, "diagnosisSequence": [2]},
                 {"sequence": 3, "diagnosisSequence": [4, 1], "procedureSequence": [2]}]}}]}
    close_sequence_gaps(bundle)
    claim = bundle["entry"][0]["resource"]
    assert [d["sequence"] for d in claim["diagnosis"]] == [1, 2, 3]
    assert [p["sequence"] for p in claim["procedure"]] == [1]
    assert claim["item"] == [
        {"sequence": 1, "diagnosisSequence": [2]},
        {"sequence": 2},
        {"sequence": 3, "diagnosisSequence": [3, 1], "procedureSequence": [1]}]
