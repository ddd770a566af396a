"""The consent API over mutual TLS: the hospital's own systems and a partner that
collected the patient's electronic authorisation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import LINK_OUT, Pair, client_ssl, consent_for, start_pair

from bridge.errors import ConsentDenied
from bridge.samples import inpatient_records
from bridge.trust.jws import Signer, sign_detached_bytes


@pytest.fixture
async def pair(tmp_path: Path) -> Any:
    p = await start_pair(tmp_path)
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    return inpatient_records(1, seed=41)[0]


async def call(
    pair: Pair,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    who: str = "hospital-a",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    url = f"https://127.0.0.1:{pair.hospital.port}/fhir/{path}"
    hdrs = {"Content-Type": "application/fhir+json", **(headers or {})}
    ctx = client_ssl(pair.root, who)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.request(method, url, data=body, headers=hdrs) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


def audit_details(pair: Pair, action: str) -> list[str]:
    store = pair.hospital.controller.store
    return [e.record.detail or "" for e in store.audit_entries() if e.record.action == action]


async def test_own_systems_register_read_and_revoke(pair: Pair, record: dict[str, Any]) -> None:
    consent = consent_for(record, consent_id="his-1")
    status, stored = await call(pair, "POST", "Consent", orjson.dumps(consent))
    assert status == 201 and stored["id"] == "his-1"
    status, read = await call(pair, "GET", "Consent/his-1")
    assert status == 200 and read["status"] == "active"

    sub = await pair.hospital.submit(record, LINK_OUT)  # permitted now
    assert sub.created

    revoked = consent_for(record, consent_id="his-1", status="inactive")
    status, _ = await call(pair, "PUT", "Consent/his-1", orjson.dumps(revoked))
    assert status == 200
    other = dict(record, elements=dict(record["elements"], **{"HDSD00.11.139": "3"}))
    with pytest.raises(ConsentDenied):
        await pair.hospital.submit(other, LINK_OUT)
    assert audit_details(pair, "consent.put") == ["local:active", "local:inactive"]


async def test_contradictory_consent_is_refused_naming_the_element(
    pair: Pair, record: dict[str, Any]
) -> None:
    consent = consent_for(record, consent_id="bad-1")
    period = consent["provision"]["period"]
    period["start"], period["end"] = period["end"], period["start"]
    status, outcome = await call(pair, "POST", "Consent", orjson.dumps(consent))
    assert status == 422
    assert outcome["issue"][0]["expression"][0].startswith("Consent.provision.period")
    assert pair.hospital.controller.store.get_consent("bad-1") is None

    status, outcome = await call(pair, "PUT", "Consent/other-id", orjson.dumps(consent))
    assert status == 400 and outcome["issue"][0]["expression"] == ["Consent.id"]


def insurer_signer(pair: Pair) -> Signer:
    pki = pair.root / "pki" / "insurer-b"
    return Signer.from_files(pki / "sign.key", pki / "sign.pem")


async def test_partner_submitted_consent_is_verified_and_recorded(
    pair: Pair, record: dict[str, Any]
) -> None:
    consent = consent_for(record, consent_id="insurer-b.app-7")
    body = orjson.dumps(consent)
    signature = sign_detached_bytes(
        body,
        insurer_signer(pair),
        issuer="insurer-b",
        audience="hospital-a",
        message_id="Consent/insurer-b.app-7",
        now=datetime.now(UTC),
    )
    status, _ = await call(
        pair, "POST", "Consent", body, who="insurer-b", headers={"X-Signature": signature}
    )
    assert status == 201
    details = audit_details(pair, "consent.put")
    assert details and details[-1].startswith("partner:insurer-b jws:")
    assert (await pair.hospital.submit(record, LINK_OUT)).created

    # A partner cannot read consents back.
    status, _ = await call(pair, "GET", "Consent/insurer-b.app-7", who="insurer-b")
    assert status == 403


async def test_partner_consent_without_valid_signature_or_beyond_scope(
    pair: Pair, record: dict[str, Any]
) -> None:
    now = datetime.now(UTC)
    consent = consent_for(record, consent_id="insurer-b.app-8")
    body = orjson.dumps(consent)

    status, outcome = await call(pair, "POST", "Consent", body, who="insurer-b")
    assert (
        status == 403 and outcome["issue"][0]["details"]["coding"][0]["code"] == "signature-invalid"
    )

    signature = sign_detached_bytes(
        body,
        insurer_signer(pair),
        issuer="insurer-b",
        audience="hospital-a",
        message_id="Consent/insurer-b.app-8",
        now=now,
    )
    tampered = body.replace(b'"active"', b'"draft"', 1)
    status, _ = await call(
        pair, "POST", "Consent", tampered, who="insurer-b", headers={"X-Signature": signature}
    )
    assert status == 403

    # A consent naming someone else as recipient is beyond what the partner may submit.
    foreign = consent_for(record, consent_id="insurer-b.app-9", recipient="clinic-x")
    body = orjson.dumps(foreign)
    signature = sign_detached_bytes(
        body,
        insurer_signer(pair),
        issuer="insurer-b",
        audience="hospital-a",
        message_id="Consent/insurer-b.app-9",
        now=now,
    )
    status, outcome = await call(
        pair, "POST", "Consent", body, who="insurer-b", headers={"X-Signature": signature}
    )
    assert status == 403
    assert outcome["issue"][0]["expression"] == ["Consent.provision.actor"]

    store = pair.hospital.controller.store
    assert (
        store.get_consent("insurer-b.app-8") is None
        and store.get_consent("insurer-b.app-9") is None
    )
    rejects = [e for e in store.audit_entries() if e.record.action == "message.reject"]
    assert len(rejects) == 3 and all(e.record.partner == "insurer-b" for e in rejects)
    with pytest.raises(ConsentDenied):
        await pair.hospital.submit(record, LINK_OUT)


async def test_unregistered_certificate_cannot_write_consents(
    pair: Pair, record: dict[str, Any]
) -> None:
    status, outcome = await call(
        pair, "POST", "Consent", orjson.dumps(consent_for(record)), who="clinic-x"
    )
    assert status == 401
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "unknown-partner"


async def test_metadata_is_served_over_mutual_tls(pair: Pair) -> None:
    """A request sent together with the last handshake flight is answered, not dropped."""
    for _ in range(3):
        status, capability = await call(pair, "GET", "metadata")
        assert status == 200
        assert capability["resourceType"] == "CapabilityStatement"
        assert capability["fhirVersion"] == "4.0.1"


async def test_own_systems_can_be_pinned(tmp_path: Path, record: dict[str, Any]) -> None:
    """With local client pins configured, a certificate that merely names this controller
    (issued by any CA in the bundle) gets no access to the consent API."""
    from e2e_support import make_workdir

    from bridge.config import load_config
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService

    hospital_cfg, _ = make_workdir(tmp_path)
    text = hospital_cfg.read_text(encoding="utf-8").replace(
        "[server]\n", '[server]\nlocal_client_fingerprints = ["' + "ab" * 32 + '"]\n', 1
    )
    hospital_cfg.write_text(text, encoding="utf-8")
    service = BridgeService(Controller(load_config(hospital_cfg)))
    await service.start()
    try:
        pair = Pair(tmp_path, hospital_cfg, hospital_cfg, service, service)
        status, outcome = await call(pair, "POST", "Consent", orjson.dumps(consent_for(record)))
        assert status == 401
        assert outcome["issue"][0]["expression"] == ["TLS.client-certificate"]
        assert service.controller.store.get_consent("c-1") is None
    finally:
        await service.stop()


async def test_partner_cannot_reactivate_a_consent_revoked_at_the_hospital(
    pair: Pair, record: dict[str, Any]
) -> None:
    hospital = pair.hospital.controller
    await hospital.put_consent(consent_for(record, consent_id="his-6", status="inactive"))
    revived = orjson.dumps(consent_for(record, consent_id="his-6"))  # names insurer-b only
    signature = sign_detached_bytes(
        revived,
        insurer_signer(pair),
        issuer="insurer-b",
        audience="hospital-a",
        message_id="Consent/his-6",
        now=datetime.now(UTC),
    )
    status, outcome = await call(
        pair, "PUT", "Consent/his-6", revived, who="insurer-b", headers={"X-Signature": signature}
    )
    assert status == 403
    assert outcome["issue"][0]["expression"] == ["Consent.id"]
    assert hospital.consents.get("his-6").status == "inactive"
    with pytest.raises(ConsentDenied):
        await pair.hospital.submit(record, LINK_OUT)
