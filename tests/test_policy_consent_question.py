"""ConsentQuestion answers exactly as decide() does, for every item, whatever was asked first.

The question works an answer out once per combination of the facts the rules read (the
classes provisions name, the labels deny provisions name, the special-disease classes)
and hands it to every item with the same facts. These tests ask it about items that
differ in everything else, over consents that name classes, deny labels, categories and
types, nest permits in denies, or no longer count, alone and together.
"""

from __future__ import annotations

import copy
import itertools
from datetime import UTC, date, datetime
from typing import Any

import pytest
from policy_bundles import NOW, consent

from bridge.policy.classify import (
    CATEGORY_SYSTEM,
    CONFIDENTIALITY_SYSTEM,
    GRADE_SYSTEM,
    SENSITIVITY_SYSTEM,
)
from bridge.policy.consent import (
    ConsentQuestion,
    ConsentRecord,
    ConsentRegistry,
    Item,
    decide,
    deny_provision,
    request,
)

RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"


def _plain() -> dict[str, Any]:
    return consent("a-plain")


def _covers_mental() -> dict[str, Any]:
    return consent("b-mental", sensitive_classes=("mental",))


def _covers_v() -> dict[str, Any]:
    resource = consent("c-v")
    resource["provision"]["securityLabel"] = [{"system": CONFIDENTIALITY_SYSTEM, "code": "V"}]
    return resource


def _types_only() -> dict[str, Any]:
    return consent("d-types", resource_types={"Patient", "Claim", "Condition"})


def _category_class() -> dict[str, Any]:
    resource = consent("e-category")
    resource["provision"]["class"] = [{"system": CATEGORY_SYSTEM, "code": "health-status"}]
    return resource


def _deny_label() -> dict[str, Any]:
    resource = consent("f-deny-label", sensitive_classes=("mental", "infectious"))
    resource["provision"]["provision"] = [
        deny_provision(labels=[(SENSITIVITY_SYSTEM, "infectious")])]
    return resource


def _deny_category() -> dict[str, Any]:
    resource = consent("g-deny-category")
    resource["provision"]["provision"] = [
        deny_provision(categories=["health-payment"], recipients=["insurer-b"])]
    return resource


def _deny_type_for_a_while() -> dict[str, Any]:
    resource = consent("h-deny-type")
    resource["provision"]["provision"] = [
        deny_provision(resource_types=["Procedure"], period=("2026-03-01", "2026-03-31"))]
    return resource


def _deny_root_nested_permit() -> dict[str, Any]:
    resource = consent("i-deny-root", sensitive_classes=("mental",))
    permit = copy.deepcopy(resource["provision"])
    permit["class"] = [{"system": RESOURCE_TYPES, "code": "Claim"},
                       {"system": CATEGORY_SYSTEM, "code": "health-status"}]
    del permit["period"]
    resource["provision"] = {"type": "deny", "period": resource["provision"]["period"],
                             "provision": [permit]}
    return resource


def _nested_permits() -> dict[str, Any]:
    resource = consent("j-nested")
    resource["provision"]["provision"] = [
        {"type": "permit", "class": [{"system": RESOURCE_TYPES, "code": "Condition"}],
         "securityLabel": [{"system": SENSITIVITY_SYSTEM, "code": "mental"}]},
        {"type": "permit", "class": [{"system": CATEGORY_SYSTEM, "code": "health-payment"}]},
        {"type": "deny", "class": [{"system": CATEGORY_SYSTEM, "code": "personal-attribute"}],
         "securityLabel": [{"system": GRADE_SYSTEM, "code": "4"}]},
    ]
    return resource


def _data_period() -> dict[str, Any]:
    resource = consent("k-data-period")
    resource["provision"]["dataPeriod"] = {"start": "2026-01-01", "end": "2026-02-28"}
    return resource


def _inactive() -> dict[str, Any]:
    resource = consent("l-inactive", sensitive_classes=("mental",))
    resource["status"] = "inactive"
    return resource


def _expired() -> dict[str, Any]:
    return consent("m-expired", start=date(2025, 1, 1), end=date(2025, 12, 31))


CONSENTS = [_plain, _covers_mental, _covers_v, _types_only, _category_class, _deny_label,
            _deny_category, _deny_type_for_a_while, _deny_root_nested_permit,
            _nested_permits, _data_period, _inactive, _expired]


def _records(makers: tuple[Any, ...]) -> list[ConsentRecord]:
    registry = ConsentRegistry()
    for make in makers:
        resource = make()
        resource["meta"] = {"lastUpdated": f"2026-02-0{len(registry) + 1}T00:00:00+08:00"}
        registry.put(resource, now=NOW)
    return registry.list()


def _label_sets() -> list[frozenset[tuple[str, str]]]:
    grade3 = {(CONFIDENTIALITY_SYSTEM, "R"), (GRADE_SYSTEM, "3")}
    grade4 = {(CONFIDENTIALITY_SYSTEM, "R"), (GRADE_SYSTEM, "4"),
              (CATEGORY_SYSTEM, "personal-attribute")}
    grade5 = {(CONFIDENTIALITY_SYSTEM, "V"), (GRADE_SYSTEM, "5")}
    return [
        frozenset(),
        frozenset(grade3),
        frozenset(grade4),
        frozenset(grade5 | {(SENSITIVITY_SYSTEM, "mental")}),
        frozenset(grade5 | {(SENSITIVITY_SYSTEM, "infectious")}),
        frozenset(grade5 | {(SENSITIVITY_SYSTEM, "mental"), (SENSITIVITY_SYSTEM, "infectious")}),
        frozenset(grade5 | {(SENSITIVITY_SYSTEM, "genetic"), (CATEGORY_SYSTEM, "health-status")}),
    ]


ITEMS = [
    Item(rtype, frozenset(categories), labels)
    for rtype in ("Patient", "Claim", "Condition", "Procedure", "Encounter")
    for categories in ((), ("health-status",), ("health-payment",),
                       ("health-status", "personal-attribute"))
    for labels in _label_sets()
]

REQUESTS = [
    request("insurer-b", "HPAYMT", NOW, (date(2026, 3, 1), date(2026, 3, 8))),
    request("insurer-b", "HPAYMT", NOW, (date(2026, 1, 5), date(2026, 1, 9))),
    request("insurer-b", "CLMATTCH", datetime(2026, 6, 1, tzinfo=UTC), None),
    request("insurer-c", "HPAYMT", NOW, None),
]

COMBINATIONS = (
    [(make,) for make in CONSENTS]
    + list(itertools.combinations([_plain, _covers_mental, _deny_label, _nested_permits,
                                   _deny_root_nested_permit, _inactive], 2))
    + [(_covers_v, _deny_category, _deny_type_for_a_while, _data_period),
       (_types_only, _category_class, _expired, _deny_label, _covers_mental)]
)


@pytest.mark.parametrize("makers", COMBINATIONS, ids=lambda ms: "+".join(m.__name__ for m in ms))
def test_the_question_answers_every_item_as_decide_does(makers: tuple[Any, ...]) -> None:
    records = _records(makers)
    for req in REQUESTS:
        expected = [decide(records, req, item) for item in ITEMS]
        # The answers must not depend on which item was asked first.
        forward = ConsentQuestion(records, req)
        assert [forward.verdict(item) for item in ITEMS] == expected
        backward = ConsentQuestion(records, req)
        assert [backward.verdict(item) for item in reversed(ITEMS)] == expected[::-1]


def test_the_question_tells_apart_what_the_rules_tell_apart() -> None:
    # A guard that the test above is not vacuous: the items get different answers.
    records = _records((_deny_label, _nested_permits))
    outcomes = {decide(records, REQUESTS[0], item).outcome for item in ITEMS}
    assert outcomes >= {"permit", "deny", "uncovered"}


def test_no_consent_gets_the_answer_decide_gives() -> None:
    question = ConsentQuestion([], REQUESTS[0])
    assert question.verdict(ITEMS[0]) == decide([], REQUESTS[0], ITEMS[0])
    assert question.verdict(ITEMS[0]).outcome == "none"
