"""Consent evaluation against a reference evaluator written from the specification.

The reference below is deliberately naive: it enumerates every maximal path of matching
provisions and applies the rules of the ``bridge.policy.consent`` docstring literally.
Random consents (status, periods, recipients, purposes, classes, data periods, labels,
nested permit/deny trees) and random requests must get the same verdict from both.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_bundles import HOSPITAL, NOW, claim_bundle

from bridge.errors import ConsentDenied
from bridge.policy.classify import CATEGORY_SYSTEM, CONFIDENTIALITY_SYSTEM, SENSITIVITY_SYSTEM
from bridge.policy.consent import (
    ACTION_SYSTEM,
    PARTICIPATION_SYSTEM,
    PARTNER_SYSTEM,
    PURPOSE_SYSTEM,
    RESOURCE_TYPES_SYSTEM,
    ConsentRecord,
    ConsentRegistry,
    Item,
    Provision,
    Request,
    build_consent,
)
from bridge.policy.engine import apply_policy, recheck
from bridge.policy.profile import load_link_profile

CST = timezone(timedelta(hours=8))
PATIENT = ("urn:oid:2.16.156.10011.1.3", "110101199003071234")
DAYS = ["2025-06-01", "2026-01-01", "2026-03-01", "2026-03-09", "2026-06-30", "2027-01-01"]
RECIPIENTS = ["insurer-b", "platform-r"]
PURPOSES = ["HPAYMT", "TREAT", "HRESCH"]
CLASSES = [
    (RESOURCE_TYPES_SYSTEM, "Claim"),
    (RESOURCE_TYPES_SYSTEM, "Condition"),
    (RESOURCE_TYPES_SYSTEM, "Patient"),
    (CATEGORY_SYSTEM, "health-status"),
    (CATEGORY_SYSTEM, "health-payment"),
]
LABELS = [
    (SENSITIVITY_SYSTEM, "infectious"),
    (SENSITIVITY_SYSTEM, "mental"),
    (CONFIDENTIALITY_SYSTEM, "V"),
    (CATEGORY_SYSTEM, "health-status"),
]


# --- the reference evaluator ----------------------------------------------------------


def day_start(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=CST).astimezone(UTC)


def day_end(text: str) -> datetime:
    return day_start(text) + timedelta(days=1) - timedelta(microseconds=1)


def ref_matches(node: dict[str, Any], kind: str, req: Request, item: Item) -> str | None:
    """Which condition of a raw provision dict fails (None: it matches)."""
    period = node.get("period")
    if period and not (day_start(period["start"]) <= req.now <= day_end(period["end"])):
        return "period"
    recipients = {a["reference"]["identifier"]["value"] for a in node.get("actor", [])}
    if recipients and req.recipient not in recipients:
        return "actor"
    purposes = {p["code"] for p in node.get("purpose", [])}
    if purposes and req.purpose not in purposes:
        return "purpose"
    actions = {c["code"] for a in node.get("action", []) for c in a["coding"]}
    if actions and req.action not in actions:
        return "action"
    dp = node.get("dataPeriod")
    if dp:
        lo, hi = day_start(dp["start"]), day_end(dp["end"])
        if req.data_period is None:
            if kind == "permit":
                return "dataPeriod"
        else:
            start, end = req.data_period
            inside = lo <= start and end <= hi
            overlap = lo <= end and start <= hi
            if (kind == "permit" and not inside) or (kind == "deny" and not overlap):
                return "dataPeriod"
    classes = {c["code"] for c in node.get("class", [])}
    if classes and item.resource_type not in classes and not (classes & item.categories):
        return "class"
    labels = {(c["system"], c["code"]) for c in node.get("securityLabel", [])}
    if kind == "deny" and labels and not (labels & item.labels):
        return "securityLabel"
    return None


def maximal_paths(node: dict[str, Any], path: str, req: Request, item: Item,
                  prefix: list[tuple[dict[str, Any], str]]) -> list[list[tuple[dict[str, Any], str]]]:
    here = [*prefix, (node, path)]
    kids = [
        (child, f"{path}.provision[{i}]")
        for i, child in enumerate(node.get("provision", []))
        if ref_matches(child, child["type"], req, item) is None
    ]
    if not kids:
        return [here]
    out = []
    for child, child_path in kids:
        out.extend(maximal_paths(child, child_path, req, item, here))
    return out


def ref_consent(resource: dict[str, Any], req: Request, item: Item) -> tuple[str, str, str]:
    cid = resource["id"]
    if resource["status"] != "active":
        return ("none", cid, "Consent.status")
    root = resource["provision"]
    kind = root.get("type", "permit")
    failed = ref_matches(root, kind, req, item)
    if failed:
        return ("none", cid, f"Consent.provision.{failed}")
    paths = maximal_paths(root, "Consent.provision", req, item, [])
    for p in paths:
        node, where = p[-1]
        if node.get("type", "permit") == "deny":
            return ("deny", cid, where)
    cover = {
        (c["system"], c["code"])
        for p in paths
        for node, _ in p
        if node.get("type", "permit") == "permit"
        for c in node.get("securityLabel", [])
    }
    sensitive = {code for system, code in item.labels if system == SENSITIVITY_SYSTEM}
    covered = (CONFIDENTIALITY_SYSTEM, "V") in cover or all(
        (SENSITIVITY_SYSTEM, c) in cover for c in sensitive
    )
    outcome = "permit" if covered else "uncovered"
    return (outcome, cid, paths[0][-1][1])


def ref_decide(resources: list[dict[str, Any]], req: Request, item: Item) -> tuple[str, str | None, str]:
    if not resources:
        return ("none", None, "Consent")
    ordered = sorted(resources, key=lambda r: r["id"])
    verdicts = [(r, ref_consent(r, req, item)) for r in ordered]
    for _, v in verdicts:
        if v[0] == "deny":
            return v
    for wanted in ("permit", "uncovered"):
        found = [(r, v) for r, v in verdicts if v[0] == wanted]
        if found:
            best = max(found, key=lambda rv: (rv[0].get("meta", {}).get("lastUpdated", ""), rv[0]["id"]))
            return best[1]
    return verdicts[0][1]


# --- random consents and requests -------------------------------------------------------


def periods() -> st.SearchStrategy[dict[str, str]]:
    return st.tuples(st.sampled_from(DAYS), st.sampled_from(DAYS)).map(
        lambda ab: {"start": min(ab), "end": max(ab)}
    )


def codings(system_codes: list[tuple[str, str]]) -> st.SearchStrategy[list[dict[str, str]]]:
    return st.lists(st.sampled_from(system_codes), max_size=2, unique=True).map(
        lambda xs: [{"system": s, "code": c} for s, c in xs]
    )


@st.composite
def provision(draw: st.DrawFn, depth: int, scoped: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["permit", "deny"]))
    node: dict[str, Any] = {"type": kind}
    # A permit names recipient and purpose unless an enclosing permit already does.
    need = kind == "permit" and not scoped
    recipients = draw(st.lists(st.sampled_from(RECIPIENTS), min_size=1 if need else 0,
                               max_size=2, unique=True))
    if recipients:
        node["actor"] = [
            {"role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": "IRCP"}]},
             "reference": {"identifier": {"system": PARTNER_SYSTEM, "value": r}}}
            for r in recipients
        ]
    purposes = draw(st.lists(st.sampled_from(PURPOSES), min_size=1 if need else 0,
                             max_size=2, unique=True))
    if purposes:
        node["purpose"] = [{"system": PURPOSE_SYSTEM, "code": p} for p in purposes]
    if draw(st.booleans()):
        node["period"] = draw(periods())
    if draw(st.integers(0, 3)) == 0:
        node["dataPeriod"] = draw(periods())
    if draw(st.integers(0, 4)) == 0:
        node["action"] = [{"coding": [{"system": ACTION_SYSTEM,
                                       "code": draw(st.sampled_from(["disclose", "access"]))}]}]
    classes = draw(codings(CLASSES))
    if classes:
        node["class"] = classes
    labels = draw(codings(LABELS))
    if labels:
        node["securityLabel"] = labels
    if depth > 0:
        children = draw(st.lists(provision(depth - 1, scoped or kind == "permit"), max_size=3))
        if children:
            node["provision"] = children
    return node


@st.composite
def consents(draw: st.DrawFn, cid: str) -> dict[str, Any]:
    resource = build_consent(
        consent_id=cid, patient_system=PATIENT[0], patient_value=PATIENT[1],
        recipient="insurer-b", purposes=["HPAYMT"], start="2026-01-01", end="2026-12-31",
        hospital_partner_id=HOSPITAL,
    )
    resource["status"] = draw(st.sampled_from(["active", "active", "active", "inactive", "draft"]))
    resource["provision"] = draw(provision(3, False))
    if draw(st.booleans()):
        resource["meta"] = {"lastUpdated": f"2026-0{draw(st.integers(1, 9))}-01T00:00:00+08:00"}
    return resource


@st.composite
def requests(draw: st.DrawFn) -> tuple[Request, Item]:
    now = day_start(draw(st.sampled_from(DAYS))) + timedelta(hours=draw(st.integers(0, 23)))
    span = draw(st.one_of(st.none(), periods()))
    data = (day_start(span["start"]), day_end(span["end"])) if span else None
    req = Request(
        recipient=draw(st.sampled_from(RECIPIENTS)),
        purpose=draw(st.sampled_from(PURPOSES)),
        now=now,
        data_period=data,
        action=draw(st.sampled_from(["disclose", "disclose", "access"])),
    )
    item = Item(
        resource_type=draw(st.sampled_from(["Claim", "Condition", "Patient", "Encounter"])),
        categories=frozenset(draw(st.lists(st.sampled_from(
            ["health-status", "health-payment", "personal-attribute"]), max_size=2))),
        labels=frozenset(draw(st.lists(st.sampled_from(LABELS), max_size=3))),
    )
    return req, item


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 3), min_size=0, max_size=3, unique=True).flatmap(
        lambda ids: st.tuples(*(consents(f"c{i}") for i in ids))
    ),
    requests(),
)
def test_decision_equals_reference_evaluator(resources: tuple[dict[str, Any], ...],
                                             request: tuple[Request, Item]) -> None:
    req, item = request
    registry = ConsentRegistry()
    for resource in resources:
        registry.put(resource, now=NOW, trusted=True)
    got = registry.evaluate([PATIENT], req, item)
    want = ref_decide(list(resources), req, item)
    assert (got.outcome, got.consent_id, got.provision_path) == want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).flatmap(
        lambda ids: st.tuples(*(consents(f"c{i}") for i in ids))
    ),
    requests(),
    st.sets(st.sampled_from(["Claim", "Condition", "Patient"]), min_size=1),
)
def test_require_consent_permits_exactly_when_every_type_is_permitted(
    resources: tuple[dict[str, Any], ...], request: tuple[Request, Item], types: set[str]
) -> None:
    req, _ = request
    registry = ConsentRegistry()
    for resource in resources:
        registry.put(resource, now=NOW, trusted=True)
    category = {"Claim": "health-payment", "Condition": "health-status", "Patient": "personal-attribute"}
    want = all(
        ref_decide(list(resources), req, Item(t, frozenset({category[t]})))[0] == "permit"
        for t in types
    )
    span = req.data_period
    days = None if span is None else (span[0].astimezone(CST).date(), span[1].astimezone(CST).date())
    try:
        registry.require_consent(
            patient_identifiers=[PATIENT], recipient=req.recipient, purpose=req.purpose,
            resource_types=types, data_period=days, now=req.now, action=req.action,
        )
        got = True
    except ConsentDenied:
        got = False
    assert got == want


# --- revocation stops queued messages ---------------------------------------------------


def patient_bundle(n: int) -> tuple[dict[str, Any], tuple[str, str]]:
    bundle = claim_bundle([("J18.900", "肺炎"), ("B20.000", "HIV")])
    ident = (PATIENT[0], f"11010119900307{n:04d}")
    patient = bundle["entry"][0]["resource"]
    patient["identifier"][0]["value"] = ident[1]
    return bundle, ident


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 6).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1),
                                                     st.booleans())))
def test_revoking_a_consent_stops_exactly_its_queued_messages(args: tuple[int, int, bool]) -> None:
    patients, victim, sensitive = args
    profile = load_link_profile("commercial-insurance")
    registry = ConsentRegistry()
    queue = []
    for n in range(patients):
        bundle, ident = patient_bundle(n)
        registry.put(
            build_consent(
                consent_id=f"consent-{n}", patient_system=ident[0], patient_value=ident[1],
                recipient="insurer-b", purposes=["HPAYMT"], start=date(2026, 1, 1),
                end=date(2026, 12, 31), hospital_partner_id=HOSPITAL,
                sensitive_classes=("infectious",) if sensitive else (),
            ),
            now=NOW,
        )
        queue.append(apply_policy(bundle, registry=registry, profile=profile,
                                  recipient="insurer-b", purpose="HPAYMT", now=NOW))
    revoked = registry.get(f"consent-{victim}")
    assert isinstance(revoked, ConsentRecord)
    resource = dict(revoked.resource, status="inactive")
    registry.put(resource, now=NOW)
    assert registry.patient_keys(f"consent-{victim}") == {f"{PATIENT[0]}|11010119900307{victim:04d}"}
    for n, result in enumerate(queue):
        if n == victim:
            with pytest.raises(ConsentDenied):
                recheck(result, registry=registry, now=NOW)
        else:
            assert recheck(result, registry=registry, now=NOW).consent_id == f"consent-{n}"


def test_narrowing_a_consent_stops_a_message_carrying_what_it_no_longer_covers() -> None:
    """A message with an HIV diagnosis went out under a consent naming the class; the
    consent is amended to drop the class; the queued message must stop."""
    profile = load_link_profile("commercial-insurance")
    bundle, ident = patient_bundle(1)
    registry = ConsentRegistry()
    args: dict[str, Any] = {
        "consent_id": "c", "patient_system": ident[0], "patient_value": ident[1], "recipient": "insurer-b",
        "purposes": ["HPAYMT"], "start": date(2026, 1, 1), "end": date(2026, 12, 31),
        "hospital_partner_id": HOSPITAL,
    }
    registry.put(build_consent(**args, sensitive_classes=("infectious",)), now=NOW)
    result = apply_policy(bundle, registry=registry, profile=profile, recipient="insurer-b",
                          purpose="HPAYMT", now=NOW)
    assert result.held_back == []
    registry.put(build_consent(**args), now=NOW)
    with pytest.raises(ConsentDenied):
        recheck(result, registry=registry, now=NOW)


def test_trusted_load_still_checks_the_rules() -> None:
    resource = build_consent(
        consent_id="c", patient_system=PATIENT[0], patient_value=PATIENT[1], recipient="x",
        purposes=["HPAYMT"], start="2026-12-31", end="2026-01-01", hospital_partner_id=HOSPITAL,
    )
    from bridge.errors import MappingError

    with pytest.raises(MappingError) as info:
        ConsentRegistry().put(resource, now=NOW, trusted=True)
    assert info.value.location == "Consent.provision.period"
    broken = dict(resource, provision={"type": "permit", "actor": "not-a-list"})
    with pytest.raises(MappingError):
        ConsentRegistry().put(broken, now=NOW, trusted=True)


def test_provision_shapes_the_evaluator_cannot_read_are_refused() -> None:
    from bridge.errors import MappingError

    resource = build_consent(
        consent_id="c", patient_system=PATIENT[0], patient_value=PATIENT[1], recipient="x",
        purposes=["HPAYMT"], start="2026-01-01", end="2026-12-31", hospital_partner_id=HOSPITAL,
    )
    resource["provision"]["data"] = [{"meaning": "instance", "reference": {"reference": "Claim/1"}}]
    with pytest.raises(MappingError) as info:
        ConsentRegistry().put(resource, now=NOW)
    assert info.value.location == "Consent.provision.data"


def test_provision_types_unchanged() -> None:
    # The parsed tree keeps document order, which the deciding path depends on.
    resource = build_consent(
        consent_id="c", patient_system=PATIENT[0], patient_value=PATIENT[1], recipient="x",
        purposes=["HPAYMT"], start="2026-01-01", end="2026-12-31", hospital_partner_id=HOSPITAL,
    )
    resource["provision"]["provision"] = [{"type": "deny"}, {"type": "permit"}]
    record = ConsentRegistry().put(resource, now=NOW)
    assert [c.type for c in record.provision.children] == ["deny", "permit"]
    assert isinstance(record.provision, Provision)
