"""A partner's own word is not consent for disclosures to itself.

A platform with a pull link signs a consent naming itself as recipient and submits it
through the hospital's consent API: unless the pull link names the platform as a
source of consents for that purpose, the consent is refused, and a consent the
platform did get registered never authorises its pulls for any other purpose. All
over the hospital's real mutual-TLS listener, with the platform's real certificates
and signing key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pull_support import (
    HOSPITAL,
    PLATFORM,
    PULL_LINK,
    PullSite,
    id_card,
    keep,
    person_records,
    pull_consent,
    start_site,
)

from bridge.trust.jws import Signer, sign_detached_bytes


def _platform_signer(site: PullSite) -> Signer:
    pki = site.root / "pki" / PLATFORM
    return Signer.from_files(pki / "sign.key", pki / "sign.pem")


async def _submit(site: PullSite, consent: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps(consent)
    signature = sign_detached_bytes(
        body, _platform_signer(site), issuer=PLATFORM, audience=HOSPITAL,
        message_id=f"Consent/{consent['id']}", now=datetime.now(UTC),
    )
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.post(f"{site.base}/Consent", data=body,
               headers={"Content-Type": "application/fhir+json", "X-Signature": signature}) as r,
    ):
        return r.status, orjson.loads(await r.read())


async def _pull_patient(site: PullSite, record: dict[str, Any], purpose: str) -> dict[str, Any]:
    system, value = id_card(record)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.get(f"{site.base}/Patient", params={"identifier": f"{system}|{value}"},
              headers={"X-Purpose-Of-Use": purpose}) as r,
    ):
        assert r.status == 200, await r.text()
        return dict(orjson.loads(await r.read()))


def _expression(outcome: dict[str, Any]) -> str:
    return str(outcome["issue"][0]["expression"][0])


async def test_a_partner_cannot_authorise_its_own_pull(tmp_path: Path) -> None:
    site = await start_site(tmp_path)
    try:
        records = person_records(1, seed=71, labs=False)
        await keep(site, records)
        consent = pull_consent(records[0], consent_id=f"{PLATFORM}.self-1")
        status, outcome = await _submit(site, consent)
        assert status == 403, outcome
        assert _expression(outcome) == "Consent"
        assert site.controller.store.get_consent(f"{PLATFORM}.self-1") is None
        assert (await _pull_patient(site, records[0], "TREAT")).get("entry") is None
        rejects = [e.record for e in site.controller.store.audit_entries()
                   if e.record.action == "message.reject" and e.record.partner == PLATFORM]
        assert rejects and rejects[-1].detail == "policy-denied@Consent"
    finally:
        await site.stop()


async def test_a_consent_source_is_bound_to_the_purposes_its_link_names(tmp_path: Path) -> None:
    site = await start_site(tmp_path)
    await site.stop()
    text = site.hospital_cfg.read_text(encoding="utf-8")
    site.hospital_cfg.write_text(text.replace(
        'purpose = "TREAT"\n\n[links.pull]',
        'purpose = "TREAT"\npartner_consent_purposes = ["PUBHLTH"]\n\n[links.pull]', 1,
    ), encoding="utf-8")
    site = await start_site_from(site)
    try:
        records = person_records(1, seed=72, labs=False)
        await keep(site, records)
        # A consent for a purpose the link does not take from the platform, alone or
        # beside one it does, is refused naming the provision.
        treat = pull_consent(records[0], consent_id=f"{PLATFORM}.treat", purposes=("TREAT",))
        status, outcome = await _submit(site, treat)
        assert status == 403 and _expression(outcome) == "Consent.provision.purpose", outcome
        mixed = pull_consent(records[0], consent_id=f"{PLATFORM}.mixed",
                             purposes=("PUBHLTH", "TREAT"))
        status, outcome = await _submit(site, mixed)
        assert status == 403 and _expression(outcome) == "Consent.provision.purpose", outcome

        health = pull_consent(records[0], consent_id=f"{PLATFORM}.pubhlth",
                              purposes=("PUBHLTH",))
        status, stored = await _submit(site, health)
        assert status == 201, stored
        assert stored["meta"]["source"] == f"urn:ws-fhir-bridge:partner:{PLATFORM}"
        # It authorises what it says, for the purpose the link takes it for ...
        assert (await _pull_patient(site, records[0], "PUBHLTH"))["total"] == 1
        # ... and nothing else.
        assert (await _pull_patient(site, records[0], "TREAT")).get("entry") is None
    finally:
        await site.stop()


async def test_a_registered_partner_consent_stops_counting_when_the_link_stops_taking_them(
    tmp_path: Path,
) -> None:
    site = await start_site(tmp_path)
    await site.stop()
    cfg = site.hospital_cfg
    original = cfg.read_text(encoding="utf-8")
    cfg.write_text(original.replace(
        'purpose = "TREAT"\n\n[links.pull]',
        'purpose = "TREAT"\npartner_consent_purposes = ["TREAT"]\n\n[links.pull]', 1,
    ), encoding="utf-8")
    site = await start_site_from(site)
    records = person_records(1, seed=73, labs=False)
    try:
        await keep(site, records)
        status, _ = await _submit(site, pull_consent(records[0], consent_id=f"{PLATFORM}.t"))
        assert status == 201
        assert (await _pull_patient(site, records[0], "TREAT"))["total"] == 1
    finally:
        await site.stop()
    # The operator withdraws the platform's role as a consent source: the consent it
    # registered no longer authorises anything on the link.
    cfg.write_text(original, encoding="utf-8")
    site = await start_site_from(site)
    try:
        assert site.controller.config.link(PULL_LINK).partner_consent_purposes == []
        assert (await _pull_patient(site, records[0], "TREAT")).get("entry") is None
        # The hospital's own consent for the same patient still counts.
        await site.controller.put_consent(pull_consent(records[0], consent_id="his-pull"))
        assert (await _pull_patient(site, records[0], "TREAT"))["total"] == 1
    finally:
        await site.stop()


async def start_site_from(site: PullSite) -> PullSite:
    from bridge.config import load_config
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService

    service = BridgeService(Controller(load_config(site.hospital_cfg)), poll_interval=0.05)
    await service.start()
    return PullSite(site.root, site.hospital_cfg, site.platform_cfg, service)
