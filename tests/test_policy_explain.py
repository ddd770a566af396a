"""``bridge consent explain`` says what a push sends: both come from one policy run, so
an element is explained as sent exactly when it is on the wire (property b); a claim
whose every diagnosis is held back is refused at enqueue, and the enqueue audit names
which provision held back which element path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from e2e_support import consent_for, make_workdir, special_as_secondary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import load_config
from bridge.errors import ConsentDenied
from bridge.link.node import Controller
from bridge.messages import collection_of
from bridge.policy.classify import CATEGORY_SYSTEM, default_sensitive_codes
from bridge.policy.consent import deny_provision
from bridge.policy.engine import _has
from bridge.samples import inpatient_records

LINK = "claims-to-insurer-b"
ICD10 = "urn:oid:2.16.156.10011.2.3.3.11"
CODES = default_sensitive_codes()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    root = tmp_path_factory.mktemp("explain")
    hospital_cfg, _ = make_workdir(root)
    controller = Controller(load_config(hospital_cfg))
    yield controller
    asyncio.run(controller.close())


def special(record: dict[str, Any]) -> bool:
    return any(CODES.classes_of(ICD10, v) for d in record["groups"].get("diagnoses", [])
               for k, v in d.items() if k in ("HDSD00.11.020", "HDSD00.11.023", "HDSD00.11.075"))


def only_special(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its ordinary diagnoses taken out."""
    out = json.loads(json.dumps(record))
    out["groups"]["diagnoses"] = [
        d for d in out["groups"]["diagnoses"]
        if any(CODES.classes_of(ICD10, v) for k, v in d.items()
               if k in ("HDSD00.11.020", "HDSD00.11.023", "HDSD00.11.075"))
    ]
    return out


def reset_consents(controller: Controller, resource: dict[str, Any] | None) -> None:
    from bridge.policy.consent import ConsentRegistry

    controller.consents = ConsentRegistry()
    controller.link_consents = {}
    if resource is not None:
        controller.consents.put(resource, now=datetime.now(UTC))


CONSENTS = ["none", "no-classes", "all-classes", "no-procedures", "no-health-status"]


def make_consent(kind: str, record: dict[str, Any]) -> dict[str, Any] | None:
    if kind == "none":
        return None
    if kind == "all-classes":
        return consent_for(record, consent_id="c-all")
    resource = consent_for(record, consent_id=f"c-{kind}", sensitive=())
    if kind == "no-procedures":
        resource["provision"]["provision"] = [deny_provision(resource_types=["Procedure"])]
    if kind == "no-health-status":
        resource["provision"]["provision"] = [
            deny_provision(labels=[(CATEGORY_SYSTEM, "health-status")])]
    return resource


def sent_rows(explanation: Any) -> dict[str, set[str]]:
    """Per input resource id, the element paths explained as sent or transformed."""
    out: dict[str, set[str]] = {}
    for row in explanation.elements:
        if row.outcome in ("sent", "transformed"):
            path = row.path.split(".", 1)[1]
            out.setdefault(row.resource_id, set()).add(path)
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.integers(0, 5_000), st.sampled_from(CONSENTS), st.booleans())
def test_explain_says_exactly_what_submit_sends(
    hospital: Controller, seed: int, kind: str, strip: bool
) -> None:
    """Property (b) over generated records and consents."""
    record = inpatient_records(1, seed=seed)[0]
    if strip and special(record):
        record = only_special(record)
    reset_consents(hospital, make_consent(kind, record))
    explanation = hospital.explain(record, LINK)
    try:
        signed, _ = hospital.prepare(record, LINK)
    except ConsentDenied as exc:
        assert not explanation.permitted
        assert explanation.refusal is not None and explanation.refusal.message == exc.message
        assert not sent_rows(explanation)
        return
    assert explanation.permitted
    wire = {e["resource"]["id"]: e["resource"] for e in collection_of(signed)["entry"]}
    explained = sent_rows(explanation)
    # Every resource on the wire is explained as sent, and nothing else is.
    assert set(explained) == set(wire)
    for rid, resource in wire.items():
        paths = explained[rid]
        for path in paths:
            assert _has(resource, path), (resource["resourceType"], path, "explained, not sent")
        for element in resource:
            if element in ("resourceType", "id", "meta"):
                continue
            base = element.removeprefix("_")
            assert any(p == base or p.startswith(base + ".") for p in paths), (
                resource["resourceType"], element, "sent, not explained")
    # What is explained as held back or removed is not on the wire.
    for row in explanation.elements:
        if row.outcome in ("held-back-by-consent", "removed-by-profile") and "[" not in \
                row.path.split(".", 1)[-1] and "." in row.path:
            resource = wire.get(row.resource_id)
            if resource is not None:
                assert not _has(resource, row.path.split(".", 1)[1]), row.path


def test_only_held_back_diagnoses_refuse_the_claim_and_explain_agrees(
    hospital: Controller,
) -> None:
    record = only_special(next(r for r in inpatient_records(300, seed=5) if special(r)))
    reset_consents(hospital, consent_for(record, consent_id="c-plain", sensitive=()))
    explanation = hospital.explain(record, LINK)
    assert not explanation.permitted
    text = "\n".join(explanation.lines())
    assert "Claim[0].diagnosis" not in text.replace("held-back-by-consent", "")
    assert "sent" not in {row.outcome for row in explanation.elements}
    with pytest.raises(ConsentDenied) as info:
        hospital.prepare(record, LINK)
    assert "every entry of Claim.diagnosis" in info.value.message


def test_enqueue_audit_names_provision_and_path_of_what_was_held_back(tmp_path: Path) -> None:
    # A special-disease diagnosis beside an ordinary principal one: the claim goes with
    # the rest (a held-back principal diagnosis refuses it, P-MSG-10).
    record = special_as_secondary(next(r for r in inpatient_records(300, seed=5) if special(r)))
    hospital_cfg, _ = make_workdir(tmp_path)

    async def run() -> list[Any]:
        controller = Controller(load_config(hospital_cfg))
        try:
            await controller.put_consent(consent_for(record, consent_id="c-plain", sensitive=()))
            submitted = await controller.submit(record, LINK)
            assert submitted.held_back
            return [e for e in controller.store.audit_entries()
                    if e.record.action == "claim.enqueue"]
        finally:
            await controller.close()

    (entry,) = asyncio.run(run())
    detail = entry.record.detail
    assert "held=" in detail
    held = detail.split("held=", 1)[1].split(";")
    assert any(h.startswith("Condition<-c-plain@") and h.endswith("(uncovered)")
               for h in held), held
    assert "Claim.diagnosis<-(refers to held-back)" in held
    # Paths and ids only: no code, name or value of the record.
    for value in record["elements"].values():
        if isinstance(value, str) and len(value) > 3:
            assert value not in detail
    for d in record["groups"]["diagnoses"]:
        for v in d.values():
            assert len(v) < 4 or v not in detail
    assert orjson.dumps(detail)
    assert timedelta(0) <= datetime.now(UTC) - entry.record.time < timedelta(minutes=5)
