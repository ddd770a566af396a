"""Labels and policy results are made without their dataclass constructors on the hot
path (bridge/policy/classify.py ``_resource_label``/``_item_label``,
bridge/policy/_values.py ``made``). Each must be exactly what the constructor makes:
every declared field set, nothing else, in the declared order, equal and hashing alike.
A field added to one of these classes and forgotten where it is made fails here."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from bridge.mapping import map_record, patient_identifiers
from bridge.policy.classify import ItemLabel, ResourceLabel, label_bundle
from bridge.policy.consent import ConsentRegistry, build_consent
from bridge.policy.engine import apply_policy
from bridge.policy.profile import load_link_profile
from bridge.samples import inpatient_records

NOW = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


def same_as_constructed(obj: Any) -> None:
    cls = type(obj)
    declared = [f.name for f in dataclasses.fields(cls)]
    assert list(vars(obj)) == declared, cls.__name__
    rebuilt = cls(**{name: getattr(obj, name) for name in declared})
    assert rebuilt == obj
    assert hash(rebuilt) == hash(obj)
    assert orjson.dumps(rebuilt, default=sorted) == orjson.dumps(obj, default=sorted)


@pytest.mark.parametrize("seed", range(12))
def test_labels_are_what_their_constructors_make(seed: int) -> None:
    bundle = map_record(inpatient_records(1, seed=seed)[0], now=NOW)
    labelled = label_bundle(bundle)
    labels = labelled.labels if hasattr(labelled, "labels") else labelled
    assert labels
    items = 0
    for label in labels:
        assert isinstance(label, ResourceLabel)
        same_as_constructed(label)
        for item in label.items:
            assert isinstance(item, ItemLabel)
            same_as_constructed(item)
            items += 1
    assert items  # the sample stays carry diagnoses, so item labels were made


@pytest.mark.parametrize("seed", range(6))
def test_policy_results_are_what_their_constructors_make(seed: int) -> None:
    record = inpatient_records(1, seed=seed)[0]
    collection = map_record(record, now=NOW)
    system, value = patient_identifiers(collection)[0]
    registry = ConsentRegistry()
    registry.put(build_consent(
        consent_id="c", patient_system=system, patient_value=value, recipient="insurer-b",
        purposes=["HPAYMT"], start=NOW - timedelta(days=900), end=NOW + timedelta(days=30),
        sensitive_classes=("sexual-reproductive", "infectious", "mental", "malignant",
                           "genetic", "anal", "rare", "incurable"),
        hospital_partner_id="hospital-a"), now=NOW)
    result = apply_policy(collection, registry=registry,
                          profile=load_link_profile("commercial-insurance"),
                          recipient="insurer-b", purpose="HPAYMT", now=NOW)
    for obj in (result, result.decision):
        declared = [f.name for f in dataclasses.fields(type(obj))]
        assert list(vars(obj)) == declared, type(obj).__name__
        assert type(obj)(**{n: getattr(obj, n) for n in declared}) == obj
