"""The consent question at dispatch (P-CON re-check): a message this process queued is
sent without asking again only when nothing the enqueue answer rested on has changed.
Whatever changed between enqueue and dispatch (a revocation, a narrowing, a new consent
with a deny provision, the end of a consent's period, a deny provision taking effect
later, an identifier linked to a patient with a restricting consent) still stops it."""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from e2e_support import consent_for, make_workdir, patient_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import load_config
from bridge.errors import ConsentDenied, PolicyError
from bridge.link.clearance import next_change
from bridge.link.node import Controller
from bridge.messages import collection_of
from bridge.policy.consent import ConsentRegistry, build_consent, deny_provision, parse_consent
from bridge.policy.engine import recheck_collection
from bridge.policy.identity import IdentityIndex
from bridge.samples import inpatient_records

LINK = "claims-to-insurer-b"
RECORD_NO = "urn:oid:2.16.156.10011.1.13"  # 病案号
T0 = datetime.now(UTC).replace(microsecond=0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Controller, Clock]]:
    hospital_cfg, _ = make_workdir(tmp_path_factory.mktemp("clearance"))
    clock = Clock()
    controller = Controller(load_config(hospital_cfg), clock=clock)
    yield controller, clock
    asyncio.run(controller.close())


def fresh(controller: Controller, clock: Clock, *consents: dict[str, Any]) -> None:
    """An empty registry (through the controller's own consent path) holding ``consents``,
    over an empty identity index: the sample records of seeds a hundred apart share their
    record numbers, and linked across tests they would be two people under one number."""
    clock.now = T0
    controller.identity = IdentityIndex(controller.identity.pseudonym)
    controller.consents = ConsentRegistry(controller.identity)
    controller.link_consents = {}
    for consent in consents:
        controller.consents.put(consent, now=T0)


def ordinary(seed: int) -> dict[str, Any]:
    """A record whose claim goes under a consent naming no special-disease class."""
    record = copy.deepcopy(inpatient_records(1, seed=seed)[0])
    for diagnosis in record["groups"].get("diagnoses", []):
        for key in list(diagnosis):
            if key.endswith((".023", ".020")):
                diagnosis[key] = "K80.200"
    return record


def consent(record: dict[str, Any], *, consent_id: str = "c-1", end: timedelta = timedelta(days=30),
            provisions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    system, value = patient_id(record)
    out = build_consent(
        consent_id=consent_id, patient_system=system, patient_value=value,
        recipient="insurer-b", purposes=["HPAYMT"], start=T0 - timedelta(days=1),
        end=T0 + end, sensitive_classes=(), hospital_partner_id="hospital-a")
    if provisions:
        out["provision"]["provision"] = provisions
    return out


def queued(controller: Controller, record: dict[str, Any]) -> dict[str, Any]:
    """Prepared and written as the outbox writes it (``enqueue_signed``)."""
    signed, _ = controller.prepare(record, LINK)
    controller.queued_as(signed, orjson.dumps(signed))
    return signed


def dispatch(controller: Controller, signed: dict[str, Any]) -> None:
    controller.recheck_consent(signed, controller.outbound_link(LINK))


def test_unchanged_consent_is_not_asked_twice_and_still_passes(hospital: Any) -> None:
    controller, clock = hospital
    record = ordinary(1)
    fresh(controller, clock, consent(record))
    signed = queued(controller, record)
    assert controller._clearances  # the enqueue answer was recorded
    clock.now = T0 + timedelta(minutes=5)
    dispatch(controller, signed)
    # Asked once: a second dispatch (a retry) asks in full, and still passes.
    assert signed["signature"]["data"] not in controller._clearances
    dispatch(controller, signed)


def test_revocation_between_enqueue_and_dispatch_stops_it(hospital: Any) -> None:
    controller, clock = hospital
    record = ordinary(2)
    fresh(controller, clock, consent(record))
    signed = queued(controller, record)
    revoked = consent(record)
    revoked["status"] = "inactive"
    controller.consents.put(revoked, now=T0)
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_a_new_consent_with_a_deny_provision_stops_it(hospital: Any) -> None:
    controller, clock = hospital
    record = ordinary(3)
    fresh(controller, clock, consent(record))
    signed = queued(controller, record)
    controller.consents.put(
        consent(record, consent_id="c-deny", provisions=[deny_provision(resource_types=["Claim"])]),
        now=T0)
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_the_end_of_the_consent_period_stops_it(hospital: Any) -> None:
    controller, clock = hospital
    record = ordinary(4)
    fresh(controller, clock, consent(record, end=timedelta(hours=1)))
    signed = queued(controller, record)
    clock.now = T0 + timedelta(hours=2)
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_a_deny_provision_taking_effect_later_stops_it(hospital: Any) -> None:
    controller, clock = hospital
    record = ordinary(5)
    later = (T0 + timedelta(hours=1)).isoformat(), (T0 + timedelta(days=9)).isoformat()
    fresh(controller, clock, consent(
        record, provisions=[deny_provision(resource_types=["Claim"], period=later)]))
    signed = queued(controller, record)
    clock.now = T0 + timedelta(minutes=30)
    dispatch(controller, signed)  # before the restriction: still sent
    fresh(controller, clock, consent(
        record, provisions=[deny_provision(resource_types=["Claim"], period=later)]))
    signed = queued(controller, record)
    clock.now = T0 + timedelta(hours=2)
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_an_identifier_linked_meanwhile_brings_its_consents_in(hospital: Any) -> None:
    """A consent filed under another of the patient's numbers, with a deny provision,
    counts from the moment the hospital's records link that number to the patient."""
    controller, clock = hospital
    record = ordinary(8)
    other = copy.deepcopy(record)
    other["elements"]["HDSD00.11.006"] = "MRN-LINKED-LATER"  # 病案号 of the same person
    fresh(controller, clock, consent(record), build_consent(
        consent_id="c-other-number", patient_system=RECORD_NO, patient_value="MRN-LINKED-LATER",
        recipient="insurer-b", purposes=["HPAYMT"], start=T0 - timedelta(days=1),
        end=T0 + timedelta(days=30), hospital_partner_id="hospital-a") | {
            "provision": consent(record, provisions=[
                deny_provision(resource_types=["Claim"])])["provision"]})
    signed = queued(controller, record)
    dispatch(controller, queued(controller, record))  # not linked yet: it goes
    _, group = controller._mapped_and_unlinked(other)
    assert group
    controller._linked(group)
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_a_clock_set_back_asks_again(hospital: Any) -> None:
    controller, clock = hospital
    record = ordinary(6)
    fresh(controller, clock, consent(record))
    clock.now = T0 + timedelta(days=2)
    signed = queued(controller, record)
    clock.now = T0 - timedelta(days=2)  # before the consent starts
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_next_change_is_the_first_start_or_end_after_the_decision() -> None:
    record = ordinary(7)
    starts = (T0 + timedelta(hours=3)).isoformat(), (T0 + timedelta(days=9)).isoformat()
    parsed = parse_consent(consent(record, end=timedelta(days=4), provisions=[
        deny_provision(resource_types=["Claim"], period=starts)]))
    assert next_change([parsed], T0) == T0 + timedelta(hours=3)
    assert next_change([parsed], T0 + timedelta(hours=4)) == T0 + timedelta(days=4)
    assert next_change([parsed], T0 + timedelta(days=5)) == T0 + timedelta(days=9)
    assert next_change([parsed], T0 + timedelta(days=10)) is None


KINDS = ["no-classes", "all-classes", "deny-procedures", "deny-later", "deny-now", "short",
         "ends-at-enqueue"]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(0, 20_000), st.sampled_from(KINDS),
       st.integers(0, 72).map(lambda h: timedelta(hours=h)))
def test_dispatch_answer_equals_a_full_recheck(
    hospital: Any, seed: int, kind: str, wait: timedelta,
) -> None:
    """Property: for generated records, consents and waits, the dispatch answer (with the
    enqueue clearance) equals the answer of the consent question asked in full from the
    payload; at the instant of enqueue the full question always passes."""
    controller, clock = hospital
    record = inpatient_records(1, seed=seed)[0]
    window = (T0 + timedelta(hours=24)).isoformat(), (T0 + timedelta(hours=48)).isoformat()
    provisions = {
        "deny-procedures": [deny_provision(resource_types=["Procedure"])],
        "deny-later": [deny_provision(resource_types=["Claim"], period=window)],
        "deny-now": [deny_provision(resource_types=["Encounter"])],
    }.get(kind)
    if kind == "all-classes":
        resource = consent_for(record, consent_id="c-all")
    else:
        end = {"short": timedelta(hours=12), "ends-at-enqueue": timedelta(0)}.get(
            kind, timedelta(days=30))
        resource = consent(record, provisions=provisions, end=end)
    fresh(controller, clock, resource)
    try:
        signed = queued(controller, record)
    except PolicyError:
        return

    def full(now: datetime) -> bool:
        try:
            recheck_collection(collection_of(signed), registry=controller.consents_for(
                controller.outbound_link(LINK)), profile=controller.profiles[LINK],
                recipient="insurer-b", purpose="HPAYMT", now=now)
        except ConsentDenied:
            return False
        return True

    assert full(T0)
    clock.now = T0 + wait
    expected = full(clock.now)
    try:
        dispatch(controller, signed)
        got = True
    except ConsentDenied:
        got = False
    assert got == expected


def test_a_consent_ending_at_the_instant_of_enqueue_stops_it_at_dispatch(hospital: Any) -> None:
    """A period's end is inclusive: a claim queued at the very instant its consent ends
    is permitted then, and refused by any dispatch after it."""
    controller, clock = hospital
    record = ordinary(9)
    fresh(controller, clock, consent(record, end=timedelta(0)))
    signed = queued(controller, record)
    clock.now = T0 + timedelta(minutes=1)
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_a_decision_made_before_a_revocation_is_asked_again_at_dispatch(hospital: Any) -> None:
    """A policy result decided before the consent was revoked, signed after (as a
    research release signs each record's result once the batch is generalised): the
    enqueue answer rested on the consent as it was, so dispatch asks in full."""
    controller, clock = hospital
    record = ordinary(10)
    fresh(controller, clock, consent(record))
    result = controller.policy(record, LINK)
    revoked = consent(record)
    revoked["status"] = "inactive"
    controller.consents.put(revoked, now=T0)
    signed, _ = controller.prepare(record, LINK, result=result)
    controller.queued_as(signed, orjson.dumps(signed))
    with pytest.raises(ConsentDenied):
        dispatch(controller, signed)


def test_a_stored_message_changed_under_its_signature_is_asked_in_full(hospital: Any) -> None:
    """The outbox row is what is sent (signed again when it has waited): a payload
    changed in the store under the signature value of a message this process queued,
    here to name a patient without any consent, is asked about as it is."""
    controller, clock = hospital
    record = ordinary(11)
    fresh(controller, clock, consent(record))
    signed = queued(controller, record)
    stored = copy.deepcopy(signed)
    for entry in stored["entry"]:
        resource = entry["resource"]
        if resource.get("resourceType") == "Patient":
            for ident in resource.get("identifier") or []:
                ident["value"] = f"{ident['value']}-someone-else"
    assert stored["signature"]["data"] == signed["signature"]["data"]
    with pytest.raises(ConsentDenied):
        dispatch(controller, stored)


def _exactly(a: Any, b: Any) -> bool:
    """Equal with the same types and member order throughout (``1 == 1.0`` and
    ``(1,) != [1]`` are not good enough: code reading a message sees types)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_exactly(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_exactly(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def awkward(seed: int) -> dict[str, Any]:
    """A record with text a JSON round trip could change if anything could: each
    free-text value (names, addresses) given characters beyond the Basic Multilingual
    Plane, a quote, a backslash, a line separator and a tab, where the mapping takes it."""
    from bridge.errors import BridgeError
    from bridge.mapping import map_record

    record = ordinary(seed)
    elements = record["elements"]
    for key, value in list(elements.items()):
        if not isinstance(value, str) or value.isascii():
            continue
        elements[key] = value[:1] + '\U0001f600"\\\u2028\t' + value[1:]
        try:
            map_record(record)
        except BridgeError:
            elements[key] = value
    assert elements != ordinary(seed)["elements"]
    return record


@pytest.mark.parametrize("seed", range(12))
def test_the_message_dispatched_from_memory_is_the_message_its_bytes_read_back(
        hospital: Any, seed: int) -> None:
    """Dispatch takes the message this process signed instead of reading the row's bytes
    again only while the row holds the very bytes it queued; that message is then exactly
    what reading them gives (types and member order too), so the two ways cannot differ.
    Bytes changed in the store are read as they are, and a second dispatch (a retry)
    reads the bytes."""
    controller, clock = hospital
    make = awkward if seed % 2 else ordinary
    record = make(100 + seed)
    fresh(controller, clock, consent(record))
    signed, submitted = controller.prepare(record, LINK)
    link = controller.outbound_link(LINK)
    asyncio.run(controller.enqueue_signed(link, signed, submitted))
    row = controller.store.get_outbox(submitted.message_id)
    assert row is not None
    form, raw_sha256 = controller.queued_message(row.message_id, row.payload)
    assert form is signed
    assert _exactly(form, orjson.loads(row.payload))
    assert raw_sha256 == hashlib.sha256(row.payload).digest()
    # Taken once: a retry reads the bytes.
    again, _ = controller.queued_message(row.message_id, row.payload)
    assert again is not signed and _exactly(again, form)
    # Bytes changed under the same message id are read as they are.
    asyncio.run(controller.enqueue_signed(link, signed, submitted))
    changed = row.payload.replace(b'"Claim"', b'"Claim" ', 1)
    other, other_sha = controller.queued_message(row.message_id, changed)
    assert other is not signed and other_sha == hashlib.sha256(changed).digest()
    assert _exactly(other, orjson.loads(changed))


def test_messages_kept_for_dispatch_are_bounded(hospital: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the latest messages queued are kept whole (each is tens of KiB); an older one
    is read from its bytes at dispatch, and is the same message."""
    from bridge.link import node

    monkeypatch.setattr(node, "_QUEUED_FORMS_MAX", 2)
    controller, clock = hospital
    link = controller.outbound_link(LINK)
    kept = []
    for seed in (201, 202, 203):
        record = ordinary(seed)
        fresh(controller, clock, consent(record))
        signed, submitted = controller.prepare(record, LINK)
        asyncio.run(controller.enqueue_signed(link, signed, submitted))
        kept.append((submitted.message_id, signed))
    assert len(controller._queued_forms) == 2
    for n, (message_id, signed) in enumerate(kept):
        row = controller.store.get_outbox(message_id)
        assert row is not None
        form, _ = controller.queued_message(message_id, row.payload)
        assert (form is signed) is (n > 0)
        assert _exactly(form, signed)
