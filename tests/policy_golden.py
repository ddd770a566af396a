"""Outputs of the policy stage over generated records, reduced to digests, for the golden
comparison in ``test_policy_golden.py`` (not collected by pytest).

Every shipped link profile (each level of a profile with levels) runs ``apply_policy``
over the same generated WS 445.10 records, with consents that vary from record to
record (every special-disease class, none, a deny restriction on one class, no consent
at all), and ``explain`` over some of them; the research profile then releases 10,000
records through k-anonymity over persons. Each record's outcome is written as JSON
text with its keys in the order the code produced them (a changed order is a changed
output), and digested.

``python tests/policy_golden.py`` rewrites ``tests/golden/policy/digests.json``: a change
there is reviewed as a diff, never accepted blind.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from bridge.errors import BridgeError
from bridge.mapping import map_record, patient_identifiers
from bridge.policy.consent import ConsentRegistry, build_consent, deny_provision
from bridge.policy.engine import apply_policy, explain
from bridge.policy.profile import load_link_profile
from bridge.policy.research import ReleaseItem, age_at, anonymise, bundle_of
from bridge.policy.transforms import person_key
from bridge.samples import inpatient_records

GOLDEN = Path(__file__).parent / "golden" / "policy" / "digests.json"
NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
KEY = bytes(range(32))
CLASSES = ("sexual-reproductive", "infectious", "mental", "malignant", "genetic", "anal",
           "rare", "incurable")
SENSITIVITY = "urn:ws-fhir-bridge:sensitivity"
PROFILES = (
    ("commercial-insurance", "insurer-b", "HPAYMT"),
    ("regional-interoperability:default", "region-d", "TREAT"),
    ("regional-interoperability:notify", "region-d", "TREAT"),
    ("regional-interoperability:authorise", "region-d", "TREAT"),
    ("research-limited-data-set", "research-c", "HRESCH"),
)
RECORDS = 400
RELEASE = 10_000


def _consent(i: int, system: str, value: str, recipient: str, purpose: str) -> dict[str, Any] | None:
    """Record by record: every class, none, a restriction on one class, or no consent."""
    variant = i % 5
    if variant == 4:
        return None
    restrictions = ([deny_provision(labels=[(SENSITIVITY, CLASSES[i % len(CLASSES)])])]
                    if variant == 2 else [])
    return build_consent(
        consent_id=f"g-{i}", patient_system=system, patient_value=value, recipient=recipient,
        purposes=[purpose], start=NOW - timedelta(days=900), end=NOW + timedelta(days=300),
        sensitive_classes=CLASSES if variant in (0, 2) else (),
        hospital_partner_id="hospital-a", restrictions=restrictions,
    )


def _text(value: Any) -> bytes:
    return orjson.dumps(value, default=repr)


def _outcome(call: Any) -> bytes:
    try:
        result = call()
    except BridgeError as exc:
        return _text({"refused": [type(exc).__name__, exc.code, exc.message, exc.location,
                                  exc.detail]})
    return _text({
        "bundle": result.bundle,
        "removed": result.removed,
        "held_back": result.held_back,
        "transformed": result.transformed,
        "patient": result.patient_identifiers,
        "types": sorted(result.resource_types),
        "period": [d.isoformat() for d in result.data_period] if result.data_period else None,
        "record": result.record.to_dict() if result.record else None,
        "decision": [result.decision.consent_id, result.decision.provision_path,
                     result.decision.consent_ids, result.decision.decided_at.isoformat(),
                     sorted(map(repr, result.decision.by_type)),
                     sorted(map(repr, result.decision.allowed_labels)),
                     sorted(map(repr, result.decision.denied_labels))],
        "items": sorted(repr((i.resource_type, sorted(i.categories), sorted(i.labels)))
                        for i in result.items),
        "action": result.action,
    })


def _short(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:10]


def profile_cases(*, owned: bool = False) -> Iterator[tuple[str, list[str]]]:
    """Per profile, the digest of each record's outcome (and of some explanations).

    With ``owned`` each record is mapped again and given up to ``apply_policy``
    (``owned=True``, ``complete=True``), as a bridge's claim path gives it the record
    it mapped (and so validated): the policy works on that collection in place, knows
    its resources complete, and must disclose the same."""
    records = inpatient_records(RECORDS, seed=7)
    collections = [map_record(r, now=NOW) for r in records]
    for name, recipient, purpose in PROFILES:
        profile = load_link_profile(name)
        registry = ConsentRegistry()
        for i, c in enumerate(collections):
            system, value = patient_identifiers(c)[0]
            consent = _consent(i, system, value, recipient, purpose)
            if consent is not None:
                registry.put(consent, now=NOW, trusted=True)
        digests = []
        for i, c in enumerate(collections):
            before = orjson.dumps(c)
            given = map_record(records[i], now=NOW) if owned else c
            digests.append(_short(_outcome(
                lambda given=given, registry=registry, profile=profile, recipient=recipient,
                purpose=purpose: apply_policy(
                    given, registry=registry, profile=profile, recipient=recipient,
                    purpose=purpose, now=NOW, key=KEY, owned=owned, complete=owned))))
            if orjson.dumps(c) != before:
                raise AssertionError(f"apply_policy changed its input (record {i}, {name})")
            if i % 10 == 0:
                shown = explain(c, registry=registry, profile=profile, recipient=recipient,
                                purpose=purpose, now=NOW, key=KEY)
                digests.append(_short(_text([shown.permitted, shown.lines()])))
        yield name, digests


def research_release(n: int = RELEASE, *, text: bool = False) -> list[str]:
    """The research release of ``n`` records: each released bundle, then the report.
    With ``text`` the batch holds its bundles as JSON text, as a link's release does."""
    profile = load_link_profile("research-limited-data-set")
    assert profile.k_anonymity is not None
    collections = [map_record(r, now=NOW) for r in inpatient_records(n, seed=41)]
    registry = ConsentRegistry()
    for i, c in enumerate(collections):
        system, value = patient_identifiers(c)[0]
        registry.put(build_consent(
            consent_id=f"r-{i}", patient_system=system, patient_value=value,
            recipient="research-c", purposes=["HRESCH"], start=NOW - timedelta(days=900),
            end=NOW + timedelta(days=300),
            sensitive_classes=CLASSES if i % 3 else (), hospital_partner_id="hospital-a"),
            now=NOW, trusted=True)
    items = []
    refused = []
    for i, c in enumerate(collections):
        try:
            result = apply_policy(c, registry=registry, profile=profile,
                                  recipient="research-c", purpose="HRESCH", now=NOW, key=KEY)
        except BridgeError as exc:
            # Refused before release, as a link's release refuses it (a stay whose
            # diagnoses consent holds back): recorded, not released.
            refused.append(_short(_text([i, exc.code, exc.message, exc.location])))
            continue
        patient = next(e["resource"] for e in c["entry"]
                       if e["resource"]["resourceType"] == "Patient")
        encounter = next(e["resource"] for e in c["entry"]
                         if e["resource"]["resourceType"] == "Encounter")
        make = ReleaseItem.as_text if text else ReleaseItem
        items.append(make(i, result.bundle, person_key(patient_identifiers(c)),
                          age_at(patient.get("birthDate"), encounter["period"]["start"])))
    released, report = anonymise(items, k=profile.k_anonymity.k, quasi=profile.k_anonymity.quasi)
    if any(isinstance(item.bundle, bytes) != text for item in released):
        raise AssertionError("a released bundle is not held as it was given")
    out = [_short(_text([item.index, item.person, item.age, bundle_of(item)]))
           for item in released]
    out.append(_short(_text(report.to_dict())))
    return refused + out


def compute() -> dict[str, dict[str, Any]]:
    cases: dict[str, list[str]] = dict(profile_cases())
    cases["research-release"] = research_release()
    return {
        name: {"sha256": hashlib.sha256("".join(d).encode()).hexdigest(), "records": d}
        for name, d in cases.items()
    }


if __name__ == "__main__":
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(compute(), indent=0) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}", file=sys.stderr)
