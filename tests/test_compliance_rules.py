"""Consent rules and the operator in the audit entry, in process: the registration
rules for marketing and expiry, the per-link cap of open-ended consents, and the hashed
form of an audit entry with and without an operator, on both stores."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pg_support import fresh_schema

from bridge.config import StoreConfig
from bridge.errors import MappingError
from bridge.ledger import open_store
from bridge.ledger.audit import AuditRecord, canonical_bytes, verify_chain
from bridge.policy.consent import ConsentRegistry, Item, Request, build_consent, parse_consent
from bridge.policy.consent_rules import LinkConsentView, check_registration

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
PATIENT = ("urn:oid:2.16.156.10011.1.3", "110101199001011234")


def _consent(purposes: list[str], *, end: bool = True, given: str | None = None) -> dict[str, Any]:
    resource = build_consent(consent_id="c1", patient_system=PATIENT[0],
                             patient_value=PATIENT[1], recipient="insurer-b",
                             purposes=purposes, start="2026-01-01", end="2026-12-31",
                             hospital_partner_id="hospital-a")
    if not end:
        del resource["provision"]["period"]["end"]
    if given is not None:
        resource["dateTime"] = given
    return resource


@pytest.mark.control("U6")
def test_marketing_stands_in_a_consent_of_its_own() -> None:
    with pytest.raises(MappingError) as bundled:
        check_registration(parse_consent(_consent(["HPAYMT", "HMARKT"])))
    assert bundled.value.location == "Consent.provision.purpose"
    check_registration(parse_consent(_consent(["HMARKT"])))
    check_registration(parse_consent(_consent(["HPAYMT", "TREAT"])))


@pytest.mark.control("U2")
def test_a_consent_without_an_expiry_is_refused_or_capped_per_link() -> None:
    open_ended = parse_consent(_consent(["HPAYMT"], end=False))
    with pytest.raises(MappingError) as refused:
        check_registration(open_ended, refusing_links=["claims-to-insurer-b"])
    assert refused.value.location == "Consent.provision.period.end"
    assert "claims-to-insurer-b" in refused.value.message

    registry = ConsentRegistry()
    registry.put(_consent(["HPAYMT"], end=False), now=NOW)
    capped = LinkConsentView(registry, without_end="cap", cap_days=365)
    refusing = LinkConsentView(registry, without_end="refuse", cap_days=365)
    item = Item("Claim")

    def verdict(view: ConsentRegistry, when: datetime) -> str:
        return view.evaluate([PATIENT], Request("insurer-b", "HPAYMT", when), item).outcome

    assert verdict(registry, NOW + timedelta(days=3000)) == "permit"  # the registry as given
    assert verdict(capped, NOW) == "permit"
    assert verdict(capped, datetime(2027, 1, 2, tzinfo=UTC)) == "none"  # a year after its start
    assert verdict(refusing, NOW) == "none"
    # Without a start, the consent's dateTime is where the year begins.
    no_start = _consent(["HPAYMT"], end=False, given="2025-01-01")
    del no_start["provision"]["period"]["start"]
    if not no_start["provision"]["period"]:
        del no_start["provision"]["period"]  # FHIR JSON has no empty object
    registry.put(no_start, now=NOW)
    assert verdict(capped, NOW) == "none"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreConfig]:
    if request.param == "sqlite":
        yield StoreConfig(kind="sqlite", path=tmp_path / "s.sqlite")
    else:
        for pg in fresh_schema():
            yield StoreConfig(kind="postgresql", dsn=pg.dsn, schema=pg.schema)


def _record(operator: str | None) -> AuditRecord:
    return AuditRecord(time=NOW, actor="hospital-a", action="consent.read", subject="consent:c1",
                       operator=operator)


@pytest.mark.control("T9", "T10")
def test_the_operator_is_hashed_when_present_and_absent_from_older_entries(
    store_config: StoreConfig,
) -> None:
    unset = orjson.loads(canonical_bytes("0" * 64, 1, _record(None)))
    assert "operator" not in unset and len(unset) == 13  # exactly the version 1 form
    assert orjson.loads(canonical_bytes("0" * 64, 1, _record("os:alice")))["operator"] == "os:alice"
    with open_store(store_config) as store:
        store.append_audit(_record(None))
        written = store.append_audit(_record("cert:vera"))
        entries = store.audit_entries()
        assert [e.record.operator for e in entries] == [None, "cert:vera"]
        assert entries[1].hash == written.hash and store.verify_audit().ok
        # Another operator named for the same entry no longer matches its hash.
        forged = dataclasses.replace(entries[1], record=dataclasses.replace(
            entries[1].record, operator="cert:kim"))
        report = verify_chain([entries[0], forged])
        assert not report.ok and report.first_bad_seq == 2
    with pytest.raises(ValueError, match="operator"):
        _record("alice; DROP TABLE")
