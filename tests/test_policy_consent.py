"""Consent registry: deny by default, and every way a consent can fail to permit."""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import UTC, date, datetime
from typing import Any

import pytest
from policy_bundles import NOW, PATIENT_ID, RECIPIENT, consent

from bridge.errors import ConsentDenied, MappingError
from bridge.policy.consent import ConsentRegistry, parse_consent

TYPES = {"Patient", "Encounter", "Condition", "Claim"}
PERIOD = (date(2026, 3, 1), date(2026, 3, 8))


def ask(registry: ConsentRegistry, **overrides: Any):
    args: dict[str, Any] = {
        "patient_identifiers": [PATIENT_ID],
        "recipient": RECIPIENT,
        "purpose": "HPAYMT",
        "resource_types": TYPES,
        "data_period": PERIOD,
        "now": NOW,
    }
    args.update(overrides)
    return registry.require_consent(**args)


def test_no_consent_means_no() -> None:
    with pytest.raises(ConsentDenied) as info:
        ask(ConsentRegistry())
    assert info.value.http_status == 403


def test_active_consent_permits_and_records_why() -> None:
    registry = ConsentRegistry()
    resource = consent()
    resource["meta"] = {"versionId": "3", "lastUpdated": "2026-02-01T00:00:00+08:00"}
    registry.put(resource, now=NOW)
    decision = ask(registry)
    assert decision.consent_id == "consent-1"
    assert decision.version == "3"
    assert decision.last_updated == "2026-02-01T00:00:00+08:00"
    assert decision.provision_path == "Consent.provision"
    assert decision.allowed_labels == frozenset()


def test_revocation_denies_the_next_question() -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    ask(registry)
    revoked = consent()
    revoked["status"] = "inactive"
    registry.put(revoked, now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry)
    assert info.value.location == "Consent.status"
    assert len(registry.list()) == 1


def test_expired_and_not_yet_valid_consents_deny() -> None:
    registry = ConsentRegistry()
    registry.put(consent(start=date(2025, 1, 1), end=date(2025, 12, 31)), now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry)
    assert info.value.location == "Consent.provision.period"
    # The last day of the period counts in China Standard Time.
    ask(registry, now=datetime(2025, 12, 31, 15, 59, tzinfo=UTC))
    with pytest.raises(ConsentDenied):
        ask(registry, now=datetime(2025, 12, 31, 16, 0, 1, tzinfo=UTC))


def test_wrong_recipient_denies() -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry, recipient="insurer-c")
    assert info.value.location == "Consent.provision.actor"


def test_wrong_purpose_denies() -> None:
    registry = ConsentRegistry()
    registry.put(consent(purposes=("HPAYMT",)), now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry, purpose="HRESCH")
    assert info.value.location == "Consent.provision.purpose"


def test_other_patients_consent_does_not_apply() -> None:
    registry = ConsentRegistry()
    registry.put(consent(patient=(PATIENT_ID[0], "110101198001010000")), now=NOW)
    with pytest.raises(ConsentDenied):
        ask(registry)


def test_resource_type_outside_class_denies() -> None:
    registry = ConsentRegistry()
    registry.put(consent(resource_types={"Patient", "Claim"}), now=NOW)
    ask(registry, resource_types={"Patient", "Claim"})
    with pytest.raises(ConsentDenied) as info:
        ask(registry, resource_types={"Patient", "Claim", "Condition"})
    assert info.value.location == "Consent.provision.class"


def _with_nested_deny_on_condition() -> dict[str, Any]:
    resource = consent()
    resource["provision"]["provision"] = [
        {"type": "permit", "purpose": [resource["provision"]["purpose"][0]]},
        {
            "type": "deny",
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}],
        },
    ]
    return resource


def test_nested_deny_on_condition_class_denies_and_names_the_provision() -> None:
    registry = ConsentRegistry()
    registry.put(_with_nested_deny_on_condition(), now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry)
    assert info.value.location == "Consent.provision.provision[1]"
    decision = ask(registry, resource_types={"Patient", "Claim"})
    assert decision.provision_path == "Consent.provision.provision[0]"


def test_nested_deny_limited_in_time_applies_only_then() -> None:
    resource = consent()
    resource["provision"]["provision"] = [
        {
            "type": "deny",
            "period": {"start": "2026-06-01", "end": "2026-06-30"},
        }
    ]
    registry = ConsentRegistry()
    registry.put(resource, now=NOW)
    ask(registry)
    with pytest.raises(ConsentDenied):
        ask(registry, now=datetime(2026, 6, 10, tzinfo=UTC))


def test_deny_root_with_nested_permit() -> None:
    resource = consent()
    permit = copy.deepcopy(resource["provision"])
    permit["class"] = [{"system": "http://hl7.org/fhir/resource-types", "code": "Claim"}]
    del permit["period"]
    resource["provision"] = {
        "type": "deny",
        "period": resource["provision"]["period"],
        "provision": [permit],
    }
    registry = ConsentRegistry()
    registry.put(resource, now=NOW)
    decision = ask(registry, resource_types={"Claim"})
    assert decision.provision_path == "Consent.provision.provision[0]"
    with pytest.raises(ConsentDenied):
        ask(registry, resource_types={"Claim", "Patient"})
    with pytest.raises(ConsentDenied):
        ask(registry, resource_types={"Claim"}, recipient="insurer-c")


def test_data_period_outside_consent_denies() -> None:
    resource = consent()
    resource["provision"]["dataPeriod"] = {"start": "2026-01-01", "end": "2026-02-28"}
    registry = ConsentRegistry()
    registry.put(resource, now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry)
    assert info.value.location == "Consent.provision.dataPeriod"
    ask(registry, data_period=(date(2026, 2, 1), date(2026, 2, 10)))


def test_security_label_permit_becomes_allowed_labels() -> None:
    registry = ConsentRegistry()
    registry.put(consent(sensitive_classes=("infectious",)), now=NOW)
    decision = ask(registry)
    assert decision.allowed_labels == {("urn:ws-fhir-bridge:sensitivity", "infectious")}


def test_explicit_deny_in_one_consent_wins_over_a_permit_in_another() -> None:
    registry = ConsentRegistry()
    registry.put(consent("consent-a"), now=NOW)
    ask(registry)
    registry.put({**_with_nested_deny_on_condition(), "id": "consent-b"}, now=NOW)
    with pytest.raises(ConsentDenied) as info:
        ask(registry)
    assert info.value.detail["consent_id"] == "consent-b"


def test_amend_moves_the_consent_to_another_patient() -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    registry.put(consent(patient=(PATIENT_ID[0], "110101198001010000")), now=NOW)
    with pytest.raises(ConsentDenied):
        ask(registry)
    ask(registry, patient_identifiers=[(PATIENT_ID[0], "110101198001010000")])


def test_lookup_is_indexed_by_patient_identifier() -> None:
    registry = ConsentRegistry()
    for i in range(20_000):
        other = consent(f"other-{i}", patient=(PATIENT_ID[0], f"11010119800101{i:04d}X"))
        registry.put(other, now=NOW)
    with pytest.raises(ConsentDenied):
        ask(registry)
    registry.put(consent("mine"), now=NOW)
    assert ask(registry).consent_id == "mine"
    # Only this patient's consents are candidates, whatever else is registered.
    assert [r.id for r in registry.for_patient([PATIENT_ID])] == ["mine"]
    assert len(registry) == 20_001


# --- malformed consents -------------------------------------------------------------


def _mutate(change) -> dict[str, Any]:
    resource = consent()
    change(resource)
    return resource


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda r: r["provision"].update(period={"start": "2026-12-31", "end": "2026-01-01"}),
         "Consent.provision.period"),
        (lambda r: r["provision"]["purpose"].append(
            {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "NOPE"}),
         "Consent.provision.purpose[2]"),
        (lambda r: r["provision"].pop("actor"), "Consent.provision.actor"),
        (lambda r: r["provision"].update(actor=[{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                 "code": "IRCP"}]},
            "reference": {"identifier": {"system": "urn:example:other", "value": "insurer-b"}}}]),
         "Consent.provision.actor[0].reference.identifier"),
        (lambda r: r["scope"]["coding"][0].update(code="research"), "Consent.scope"),
        (lambda r: r.update(category=[{"text": "no coding"}]), "Consent.category"),
        (lambda r: r.update(patient={"reference": "Patient/1"}), "Consent.patient.identifier"),
        (lambda r: r["provision"].pop("purpose"), "Consent.provision.purpose"),
        (lambda r: r["provision"].update(provision=[{"period": {"start": "2026-01-01"}}]),
         "Consent.provision.provision[0].type"),
        # An empty array is no FHIR JSON: refused where it is, before any consent rule.
        (lambda r: r["provision"].update(provision=[{"class": []}]),
         "Consent.provision.provision[0].class"),
        (lambda r: r.update(status="bogus"), "Consent.status"),
    ],
)
def test_malformed_consent_names_the_path_not_the_value(change, path: str) -> None:
    resource = _mutate(change)
    with pytest.raises(MappingError) as info:
        ConsentRegistry().put(resource, now=NOW)
    assert info.value.location == path
    assert info.value.http_status == 422
    text = str(info.value) + repr(info.value.to_operation_outcome())
    assert PATIENT_ID[1] not in text and "NOPE" not in text and "insurer-b" not in text


def test_parse_accepts_datetimes_with_zone_and_partial_dates() -> None:
    resource = consent()
    resource["provision"]["period"] = {"start": "2026-03", "end": "2026-03-10T16:00:00+08:00"}
    record = parse_consent(resource)
    start, end = record.provision.period  # type: ignore[misc]
    assert start == datetime(2026, 2, 28, 16, 0, tzinfo=UTC)
    assert end == datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
    assert record.patient == PATIENT_ID


def test_policy_modules_import_no_io() -> None:
    code = (
        "import sys, bridge.policy; "
        "bad = [m for m in ('asyncio', 'aiohttp', 'ssl', 'sqlite3', 'asyncpg') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_naive_now_is_refused() -> None:
    registry = ConsentRegistry()
    registry.put(consent(), now=NOW)
    with pytest.raises(ValueError):
        ask(registry, now=NOW.replace(tzinfo=None))
