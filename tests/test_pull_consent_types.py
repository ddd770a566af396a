"""A consent that shares some resource types only (provision.class), pulled by a FHIR
client over mutual TLS: the types it names are served with the Patient, the others are
held back with every reference to them, and a claim under such a consent is still
refused whole (a claim is one unit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pull_support import HOSPITAL, PLATFORM, PullSite, id_card, keep, person_records
from test_e2e_pull import everything_pages, fhir_client, find_patient, keys_of, site

from bridge.errors import ConsentDenied
from bridge.mapping import map_record
from bridge.policy.consent import ConsentRegistry, build_consent
from bridge.policy.engine import apply_policy
from bridge.policy.profile import load_link_profile

__all__ = ["site"]  # the running hospital bridge, a fixture of test_e2e_pull


def _typed_consent(record: dict[str, Any], types: list[str], *, recipient: str = PLATFORM,
                   purposes: tuple[str, ...] = ("TREAT",)) -> dict[str, Any]:
    now = datetime.now(UTC)
    system, value = id_card(record)
    return build_consent(
        consent_id="types-1", patient_system=system, patient_value=value, recipient=recipient,
        purposes=list(purposes), start=now - timedelta(days=1), end=now + timedelta(days=30),
        resource_types=types, hospital_partner_id=HOSPITAL)


def _references(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str):
            out.add(ref)
        for value in node.values():
            out |= _references(value)
    elif isinstance(node, list):
        for value in node:
            out |= _references(value)
    return out


async def test_a_consent_sharing_laboratory_results_only_serves_them_and_the_patient(
        site: PullSite) -> None:
    records = person_records(2)
    await keep(site, records)
    await site.controller.put_consent(_typed_consent(records[0], ["Patient", "Observation"]))
    # The Patient is found (it refers to an Organization the consent does not share).
    pid = await find_patient(site, records[0])
    client = fhir_client(site)
    observations = await client.resources("Observation").search(patient=pid).fetch_all()
    assert observations, "the laboratory results the consent shares are served"
    for obs in observations:
        # Nothing served points at what was held back (the stay, the report, the lab).
        assert all(ref.startswith("Patient/") for ref in _references(obs)), _references(obs)
    assert await client.resources("Encounter").search(patient=pid).fetch_all() == []
    assert await client.resources("Condition").search(patient=pid).fetch_all() == []
    pages = await everything_pages(site, pid, count=50)
    assert {t for t, _ in keys_of(pages)} == {"Patient", "Observation"}
    assert sorted(i for t, i in keys_of(pages) if t == "Observation") == sorted(
        o["id"] for o in observations)


async def test_a_consent_naming_no_patient_type_serves_nothing(site: PullSite) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(_typed_consent(records[0], ["Observation"]))
    system, value = id_card(records[0])
    found = await fhir_client(site).resources("Patient").search(
        identifier=f"{system}|{value}").fetch_all()
    assert found == []


def test_a_claim_under_a_consent_leaving_out_one_of_its_types_is_refused_whole() -> None:
    record = person_records(1, labs=False)[0]
    now = datetime.now(UTC)
    registry = ConsentRegistry()
    registry.put(_typed_consent(record, ["Patient", "Claim", "Encounter", "Condition"],
                                recipient="insurer-b", purposes=("HPAYMT",)), now=now)
    with pytest.raises(ConsentDenied, match="not covered by the consent"):
        apply_policy(map_record(record, now=now), registry=registry,
                     profile=load_link_profile("commercial-insurance"), recipient="insurer-b",
                     purpose="HPAYMT", now=now)
