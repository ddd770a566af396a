"""Review (stop30): apply_policy(complete=True) must disclose what complete=False does
for any validated collection.

FHIR JSON lets a required primitive be absent when its extension sibling is present
(``"_status": {"extension": [data-absent-reason]}``): validate_resource (and the cache)
accept such a Claim. The completeness walk (_sound/_has_required) reads only ``status``
and finds the Claim incomplete, so complete=False omits the Claim; complete=True skips
the walk for a resource pruning left intact and sends it. The disclosures differ.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from policy_golden import CLASSES, KEY, NOW, _outcome

from bridge.mapping import map_record, patient_identifiers
from bridge.policy.consent import ConsentRegistry, build_consent
from bridge.policy.engine import apply_policy
from bridge.policy.profile import load_link_profile
from bridge.records.fhir import ValidationCache, validate_resource
from bridge.samples import inpatient_records

ABSENT = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                         "valueCode": "unknown"}]}


@pytest.mark.parametrize("element", ["status", "use", "created"])
def test_extension_only_required_primitive_discloses_the_same(element: str) -> None:
    collection = map_record(inpatient_records(3, seed=3)[2], now=NOW)
    claim = next(e["resource"] for e in collection["entry"]
                 if e["resource"]["resourceType"] == "Claim")
    del claim[element]
    claim[f"_{element}"] = ABSENT
    # Validated input: both validation paths accept it.
    validate_resource(copy.deepcopy(collection))
    ValidationCache().validate(copy.deepcopy(collection))

    system, value = patient_identifiers(collection)[0]
    registry = ConsentRegistry()
    registry.put(build_consent(
        consent_id="c1", patient_system=system, patient_value=value, recipient="insurer-b",
        purposes=["HPAYMT"], start=NOW - timedelta(days=3000), end=NOW + timedelta(days=300),
        sensitive_classes=CLASSES, hospital_partner_id="hospital-a"), now=NOW, trusted=True)
    profile = load_link_profile("commercial-insurance")

    def run(complete: bool) -> Any:
        return _outcome(lambda: apply_policy(
            copy.deepcopy(collection), registry=registry, profile=profile,
            recipient="insurer-b", purpose="HPAYMT", now=NOW, key=KEY, owned=True,
            complete=complete))

    assert run(True) == run(False)
