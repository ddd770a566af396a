"""A collection given up to the policy (``apply_policy(..., owned=True)``, as a bridge's
claim path gives it the record it mapped) is worked on in place instead of copied; what
is disclosed must be exactly what the copying path discloses.

The golden outcomes (tests/test_policy_golden.py) cover every shipped profile, but most
of them make the copy anyway (a profile that pseudonymises ids, or may send a ward or
department), and their commercial-insurance stays are sent whole or refused whole. Here
the in-place work itself is exercised: secondary diagnoses of special-disease classes
that consent holds back while the claim still goes, deny provisions on a class, on
Procedure and on Condition, consents limited to some resource types, corrected claims;
on the commercial-insurance profile and on a regional profile that sends no department
(so that it too works in place). A collection the caller also vouches for as validated
(``complete=True``, as the claim path does: it maps the record) discloses the same.
A validated resource holds its required elements, none empty
(tests/test_records_fhir_empty.py), so one that pruning leaves as it was needs no walk."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from policy_golden import CLASSES, KEY, NOW, SENSITIVITY, _outcome

from bridge.link.node import mark_replacing
from bridge.mapping import map_record, patient_identifiers
from bridge.policy.consent import ConsentRegistry, build_consent, deny_provision
from bridge.policy.engine import DEPARTMENT_ELEMENTS, apply_policy
from bridge.policy.profile import LinkProfile, load_link_profile, load_profile
from bridge.resources import mappings_dir
from bridge.samples import inpatient_records

# ICD-10 codes of several special-disease classes (mappings/policy/sensitive-icd10.yaml).
SPECIAL = ["B20.900", "F32.900", "C34.900", "A53.900", "Q90.900", "K60.300", "F20.000"]
REPLACES = "urn:uuid:11111111-2222-4333-8444-555555555555"


def _records() -> list[dict[str, Any]]:
    """Stays, three in four with one or two special-disease secondary diagnoses added."""
    out = []
    for i, record in enumerate(inpatient_records(240, seed=12)):
        record = orjson.loads(orjson.dumps(record))
        diagnoses = record["groups"]["diagnoses"]
        for n in range(i % 4 if i % 4 < 3 else 0):
            diagnoses.append({"HDSD00.11.020": SPECIAL[(i + 3 * n) % len(SPECIAL)],
                              "HDSD00.11.021": "secondary", "HDSD00.11.022": "1"})
        out.append(record)
    return out


def _consent(i: int, system: str, value: str, recipient: str, purpose: str
             ) -> dict[str, Any] | None:
    variant = i % 7
    if variant == 6:
        return None
    restrictions = []
    if variant == 2:
        restrictions = [deny_provision(labels=[(SENSITIVITY, CLASSES[i % len(CLASSES)])])]
    elif variant == 3:
        restrictions = [deny_provision(resource_types=["Procedure"])]
    elif variant == 4:
        restrictions = [deny_provision(resource_types=["Condition"],
                                       labels=[(SENSITIVITY, CLASSES[i // 7 % len(CLASSES)])])]
    types = (["Patient", "Encounter", "Claim", "Coverage", "Organization"]
             if variant == 5 else None)
    return build_consent(
        consent_id=f"o-{i}", patient_system=system, patient_value=value, recipient=recipient,
        purposes=[purpose], start=NOW - timedelta(days=3000), end=NOW + timedelta(days=300),
        resource_types=types,
        sensitive_classes=CLASSES if variant in (0, 2, 3) else CLASSES[: i % 8],
        hospital_partner_id="hospital-a", restrictions=restrictions)


def _regional_without_department(tmp: Path) -> LinkProfile:
    """The shipped regional profile at its authorise level, less the Encounter's ward."""
    shipped = mappings_dir() / "links" / "regional-interoperability.yaml"
    lines = shipped.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() != "- location"]
    assert len(kept) == len(lines) - 1
    path = tmp / "regional-without-department.yaml"
    path.write_text("".join(kept), encoding="utf-8")
    return load_profile(path, level="authorise")


@pytest.mark.parametrize("which", ["commercial-insurance", "regional-without-department"])
def test_what_is_disclosed_in_place_is_what_the_copy_discloses(
    which: str, tmp_path: Path
) -> None:
    if which == "commercial-insurance":
        profile, recipient, purpose = load_link_profile(which), "insurer-b", "HPAYMT"
    else:
        profile, recipient, purpose = _regional_without_department(tmp_path), "region-d", "TREAT"
    rules = profile.rules("Encounter", True) or {}
    assert not any(d in rules for d in DEPARTMENT_ELEMENTS)  # so it works in place
    records = _records()
    registry = ConsentRegistry()
    for i, record in enumerate(records):
        system, value = patient_identifiers(map_record(record, now=NOW))[0]
        consent = _consent(i, system, value, recipient, purpose)
        if consent is not None:
            registry.put(consent, now=NOW, trusted=True)

    sent_with_held_back = 0
    for i, record in enumerate(records):
        for replaces in (None, REPLACES) if i % 3 == 0 else (None,):
            copied, given = map_record(record, now=NOW), map_record(record, now=NOW)
            if replaces is not None:
                mark_replacing(copied, replaces)
                mark_replacing(given, replaces)

            vouched = map_record(record, now=NOW)
            if replaces is not None:
                mark_replacing(vouched, replaces)

            def run(collection: dict[str, Any], owned: bool, complete: bool = False) -> Any:
                return apply_policy(collection, registry=registry, profile=profile,
                                    recipient=recipient, purpose=purpose, now=NOW, key=KEY,
                                    owned=owned, complete=complete)

            expected = _outcome(lambda copied=copied: run(copied, False))
            got = _outcome(lambda given=given: run(given, True))
            assert got == expected, f"record {i} (replaces {replaces}): the outcomes differ"
            # As the claim path gives it: mapped (so validated) and given up.
            got = _outcome(lambda vouched=vouched: run(vouched, True, complete=True))
            assert got == expected, f"record {i} (replaces {replaces}): complete differs"
            outcome = orjson.loads(expected)
            if "refused" not in outcome and outcome["held_back"]:
                sent_with_held_back += 1
    # The in-place removal of what is held back, and of the references to it, ran.
    assert sent_with_held_back >= 15, sent_with_held_back
