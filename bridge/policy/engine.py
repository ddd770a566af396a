"""The policy room's one entry point: what of this collection may go to that recipient.

``apply_policy`` runs classify → minimize → authorize → hold back:

1. classify: label each resource with its §6.1 category, confidentiality and
   special-disease classes (``meta.security``);
2. minimize: keep only what the link profile allows (§7 j, table 9 for insurers);
3. authorize: ``require_consent`` for the patient, recipient, purpose and the resource
   types that are still to be sent — no permitting consent, no disclosure;
4. hold back: Conditions of a special-disease class (grade 5) leave only when the
   permitting consent explicitly covers that class (its securityLabel lists the class
   code, or confidentiality V covering every class); otherwise they are removed with
   every reference to them. ``Claim.diagnosis`` entries that carry such a code inline
   are held back the same way.

The dispatcher asks the consent question again before sending (:func:`recheck`),
because a consent may be revoked while a message waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from bridge.errors import ConsentDenied
from bridge.policy.classify import (
    CONFIDENTIALITY_SYSTEM,
    SENSITIVITY_SYSTEM,
    SensitiveCodes,
    classify,
    default_sensitive_codes,
)
from bridge.policy.consent import (
    ConsentDecision,
    ConsentRegistry,
    build_consent,
)
from bridge.policy.profile import LinkProfile, omit_entries

__all__ = ["PolicyResult", "apply_policy", "recheck", "build_consent"]


@dataclass(frozen=True)
class PolicyResult:
    """What may be sent, why, and what was kept back.

    ``removed`` lists paths the link profile removed (and what went with them);
    ``held_back`` lists special-disease resources and elements the consent does not
    cover. Both hold FHIR paths only, never values. ``patient_identifiers``,
    ``resource_types`` and ``data_period`` are the consent question, kept so the
    dispatcher can ask it again.
    """

    bundle: dict[str, Any]
    decision: ConsentDecision
    removed: list[str]
    held_back: list[str]
    patient_identifiers: tuple[tuple[str, str], ...]
    resource_types: frozenset[str]
    data_period: tuple[date, date] | None


def patient_identifiers(collection: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(system, value) of every identifier of the collection's one Patient."""
    patients = [
        e["resource"]
        for e in collection.get("entry") or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == "Patient"
    ]
    if len(patients) != 1:
        raise ConsentDenied(
            "a disclosure must concern exactly one patient", location="Bundle.entry.resource"
        )
    found = tuple(
        (str(i["system"]), str(i["value"]))
        for i in patients[0].get("identifier") or []
        if isinstance(i, dict) and i.get("system") and i.get("value")
    )
    if not found:
        raise ConsentDenied(
            "the patient has no identifier to match a consent", location="Patient.identifier"
        )
    return found


def _day(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def data_period(collection: dict[str, Any]) -> tuple[date, date] | None:
    """The span of care the collection describes (Encounter.period, Claim.billablePeriod)."""
    days: list[date] = []
    for entry in collection.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        for element in ("period", "billablePeriod"):
            if resource.get("resourceType") in ("Encounter", "Claim"):
                period = resource.get(element) or {}
                days.extend(d for d in (_day(period.get("start")), _day(period.get("end"))) if d)
    if not days:
        return None
    return (min(days), max(days))


def _covered(classes: frozenset[str], decision: ConsentDecision) -> bool:
    denied = {code for system, code in decision.denied_labels if system == SENSITIVITY_SYSTEM}
    if classes & denied or (CONFIDENTIALITY_SYSTEM, "V") in decision.denied_labels:
        return False
    if (CONFIDENTIALITY_SYSTEM, "V") in decision.allowed_labels:
        return True
    allowed = {code for system, code in decision.allowed_labels if system == SENSITIVITY_SYSTEM}
    return classes <= allowed


def apply_policy(
    collection: dict[str, Any],
    *,
    registry: ConsentRegistry,
    profile: LinkProfile,
    recipient: str,
    purpose: str,
    now: datetime,
    codes: SensitiveCodes | None = None,
) -> PolicyResult:
    """Return the bundle that may be disclosed, or raise ConsentDenied.

    The input is not changed. See the module docstring for the steps.
    """
    codes = codes or default_sensitive_codes()
    identifiers = patient_identifiers(collection)
    period = data_period(collection)
    classified = classify(collection, codes=codes)
    minimized = profile.minimize(classified.bundle)
    bundle = minimized.bundle
    types = frozenset(
        str(e["resource"].get("resourceType")) for e in bundle.get("entry") or []
    )
    decision = registry.require_consent(
        patient_identifiers=list(identifiers),
        recipient=recipient,
        purpose=purpose,
        resource_types=set(types),
        data_period=period,
        now=now,
    )

    held_back: list[str] = []
    hold: set[int] = set()
    for index, entry in enumerate(bundle.get("entry") or []):
        resource = entry["resource"]
        if resource.get("resourceType") != "Condition":
            continue
        classes = codes.classes_of_concept(resource.get("code"))
        if classes and not _covered(classes, decision):
            hold.add(index)
    if hold:
        omitted = omit_entries(bundle, hold)
        bundle = omitted.bundle
        held_back.extend(omitted.removed)
    # A diagnosis written inline on the claim reveals the same as a Condition would.
    for entry in bundle.get("entry") or []:
        resource = entry["resource"]
        if resource.get("resourceType") != "Claim" or not resource.get("diagnosis"):
            continue
        kept = [
            d
            for d in resource["diagnosis"]
            if _covered(codes.classes_of_concept(d.get("diagnosisCodeableConcept")), decision)
        ]
        if len(kept) != len(resource["diagnosis"]):
            held_back.append("Claim.diagnosis")
            if kept:
                resource["diagnosis"] = kept
            else:
                del resource["diagnosis"]

    final_types = frozenset(
        str(e["resource"].get("resourceType")) for e in bundle.get("entry") or []
    )
    return PolicyResult(
        bundle=bundle,
        decision=decision,
        removed=minimized.removed,
        held_back=list(dict.fromkeys(held_back)),
        patient_identifiers=identifiers,
        resource_types=final_types,
        data_period=period,
    )


def recheck(
    result: PolicyResult, *, registry: ConsentRegistry, now: datetime
) -> ConsentDecision:
    """Ask the consent question of ``result`` again (at dispatch); raise ConsentDenied if
    the consent was revoked, expired or narrowed since."""
    return registry.require_consent(
        patient_identifiers=list(result.patient_identifiers),
        recipient=result.decision.recipient,
        purpose=result.decision.purpose,
        resource_types=set(result.resource_types),
        data_period=result.data_period,
        now=now,
    )
