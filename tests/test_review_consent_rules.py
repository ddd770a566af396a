"""The consent rules behind partner-submitted consents and emergency overrides, asked
directly: which permits a partner's consent may hold, and which denies an override
must respect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bridge.errors import ConsentDenied
from bridge.policy.consent import (
    ConsentRegistry,
    EmergencyOverride,
    Item,
    Request,
    build_consent,
    override_deny,
    parse_consent,
)
from bridge.policy.consent_rules import counts_as_partner_consent, unbounded_permit

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ID_CARD = "urn:oid:2.16.156.10011.1.3"
OVERRIDE = EmergencyOverride(actor="dr-li", reason="unconscious")


def consent(consent_id: str, purposes: list[str], *, end: datetime | None = None,
            source: str | None = None, **extra: Any) -> dict[str, Any]:
    resource = build_consent(
        consent_id=consent_id, patient_system=ID_CARD, patient_value="110101199001010011",
        recipient="platform-r", purposes=purposes, start=NOW - timedelta(days=1),
        end=end or NOW + timedelta(days=30), hospital_partner_id="hospital-a", **extra)
    if source is not None:
        resource["meta"] = {"source": source}
    return resource


def with_child(resource: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    resource["provision"].setdefault("provision", []).append(child)
    return resource


def test_a_partner_consent_is_bounded_by_the_purposes_on_its_path() -> None:
    treat = parse_consent(consent("p.1", ["TREAT"]))
    assert unbounded_permit(treat.provision, {"TREAT"}) is None
    assert unbounded_permit(treat.provision, {"PUBHLTH"}) == "Consent.provision.purpose"
    # A nested permit inherits its parent's purposes: bounded by them.
    nested = parse_consent(with_child(consent("p.2", ["TREAT"]), {"type": "permit"}))
    assert unbounded_permit(nested.provision, {"TREAT"}) is None
    # A nested permit naming a purpose the parent does not can permit nothing more.
    widened = parse_consent(with_child(consent("p.3", ["TREAT"]), {
        "type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                                        "code": "PUBHLTH"}]}))
    assert unbounded_permit(widened.provision, {"TREAT"}) is None


def test_only_the_submitting_partner_counts_its_consent_and_only_where_bounded() -> None:
    source = "urn:ws-fhir-bridge:partner:platform-r"
    mine = parse_consent(consent("platform-r.1", ["TREAT"], source=source))
    assert mine.submitted_by == "platform-r"
    assert counts_as_partner_consent(mine, partner="platform-r", purposes=["TREAT"])
    assert not counts_as_partner_consent(mine, partner="platform-r", purposes=[])
    assert not counts_as_partner_consent(mine, partner="insurer-b", purposes=["TREAT"])
    local = parse_consent(consent("his-1", ["TREAT"]))
    assert local.submitted_by is None
    assert counts_as_partner_consent(local, partner="platform-r", purposes=[])


def test_an_override_respects_denies_at_any_depth_while_they_hold() -> None:
    registry = ConsentRegistry()
    registry.put(with_child(consent("c-1", ["TREAT"]), {
        "type": "deny",
        "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}]}),
        now=NOW)
    records = registry.for_patient([(ID_CARD, "110101199001010011")])
    req = Request("platform-r", "ETREAT", NOW)
    denied = override_deny(records, req, Item("Observation"))
    assert denied is not None and denied.provision_path == "Consent.provision.provision[0]"
    assert override_deny(records, req, Item("Encounter")) is None
    # Outside its consent's period a deny no longer holds.
    later = Request("platform-r", "ETREAT", NOW + timedelta(days=60))
    assert override_deny(records, later, Item("Observation")) is None

    with pytest.raises(ConsentDenied) as caught:
        registry.require_consent(
            patient_identifiers=[(ID_CARD, "110101199001010011")], recipient="platform-r",
            purpose="ETREAT", resource_types={"Observation", "Encounter"}, data_period=None,
            now=NOW, emergency=OVERRIDE)
    assert caught.value.location == "Consent.provision.provision[0]"
    decision = registry.require_consent(
        patient_identifiers=[(ID_CARD, "110101199001010011")], recipient="platform-r",
        purpose="ETREAT", resource_types={"Encounter"}, data_period=None, now=NOW,
        emergency=OVERRIDE)
    assert decision.override == OVERRIDE
