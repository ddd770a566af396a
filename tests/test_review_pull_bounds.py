"""Record pull bounds, from outside: page cursors expire, emergency overrides do not
override a patient's deny provisions.

The hospital's bridge runs with its real mutual-TLS listener and a clock the test
moves; requests come from aiohttp with the platform's certificate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pull_support import PLATFORM, PullSite, id_card, keep, person_records, pull_consent, write_site

from bridge.config import load_config
from bridge.link.node import Controller
from bridge.link.service import BridgeService

ETREAT = {"X-Purpose-Of-Use": "ETREAT", "X-Emergency-Actor": "dr-li",
          "X-Emergency-Reason": "unconscious"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[PullSite, Clock]]:
    h, p, _port = write_site(tmp_path)
    clock = Clock()
    service = BridgeService(Controller(load_config(h), clock=clock), poll_interval=0.05)
    await service.start()
    try:
        yield PullSite(tmp_path, h, p, service), clock
    finally:
        await service.stop()


async def get(site: PullSite, path: str, params: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    url = path if path.startswith("https://") else f"{site.base}/{path}"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.get(url, params=params, headers=headers or {}) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def patient_id(site: PullSite, record: dict[str, Any],
                     headers: dict[str, str] | None = None) -> str:
    system, value = id_card(record)
    status, found = await get(site, "Patient", {"identifier": f"{system}|{value}"}, headers)
    assert status == 200 and found.get("total") == 1, found
    return str(found["entry"][0]["resource"]["id"])


def next_url(page: dict[str, Any]) -> str:
    return next(lk["url"] for lk in page["link"] if lk["relation"] == "next")


async def test_a_page_cursor_expires(site: tuple[PullSite, Clock]) -> None:
    pull, clock = site
    records = person_records(2, seed=91)
    await keep(pull, records)
    await pull.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(pull, records[0])
    status, first = await get(pull, f"Patient/{pid}/$everything", {"_count": "2"})
    assert status == 200
    follow = next_url(first)
    # Within the hour the traversal goes on ...
    clock.now += timedelta(minutes=59)
    status, second = await get(pull, follow)
    assert status == 200, second
    # ... past its lifetime (an hour after the page that issued it) the cursor is
    # refused, saying so, and audited.
    clock.now += timedelta(minutes=61)
    status, outcome = await get(pull, next_url(second))
    assert status == 410, outcome
    issue = outcome["issue"][0]
    assert issue["details"]["coding"][0]["code"] == "cursor-expired"
    assert issue["expression"] == ["_cursor"]
    rejects = [e.record.detail for e in pull.controller.store.audit_entries()
               if e.record.action == "pull.reject"]
    assert rejects == ["cursor-expired@_cursor"]
    # A new traversal starts from the first page.
    status, again = await get(pull, f"Patient/{pid}/$everything", {"_count": "2"})
    assert status == 200 and again.get("entry")


def _deny_all(pull: PullSite, record: dict[str, Any], consent_id: str) -> dict[str, Any]:
    """The patient's standing refusal: nothing about them goes to the platform, for any
    purpose."""
    consent = pull_consent(record, consent_id=consent_id)
    provision = consent["provision"]
    provision["type"] = "deny"
    provision.pop("purpose", None)
    provision.pop("securityLabel", None)
    provision.pop("class", None)
    return consent


def _deny_types(consent: dict[str, Any], types: list[str]) -> dict[str, Any]:
    """A permit with a nested deny: never these resource types, for any purpose."""
    consent["provision"].setdefault("provision", []).append({
        "type": "deny",
        "class": [{"system": "http://hl7.org/fhir/resource-types", "code": t} for t in types],
    })
    return consent


async def test_an_emergency_override_does_not_override_a_deny(
    site: tuple[PullSite, Clock],
) -> None:
    pull, _clock = site
    records = person_records(1, seed=92)
    await keep(pull, records)
    # Without any consent the override releases what the link's profile allows.
    pid = await patient_id(pull, records[0], ETREAT)
    status, page = await get(pull, f"Patient/{pid}/$everything", {"_count": "200"}, ETREAT)
    assert status == 200
    released = {e["resource"]["resourceType"] for e in page.get("entry", [])}
    assert "Observation" in released and "Patient" in released

    # A consent that denies Observations for any purpose holds under an override.
    await pull.controller.put_consent(
        _deny_types(pull_consent(records[0], consent_id="obs-deny"), ["Observation"]))
    status, page = await get(pull, f"Patient/{pid}/$everything", {"_count": "200"}, ETREAT)
    assert status == 200
    withheld = {e["resource"]["resourceType"] for e in page.get("entry", [])}
    assert "Observation" not in withheld and "Patient" in withheld

    # A standing refusal of everything holds too: the override finds no patient.
    await pull.controller.put_consent(_deny_all(pull, records[0], "deny-all"))
    system, value = id_card(records[0])
    status, found = await get(pull, "Patient", {"identifier": f"{system}|{value}"}, ETREAT)
    assert status == 200 and not found.get("entry"), found
    status, page = await get(pull, f"Patient/{pid}/$everything", {"_count": "200"}, ETREAT)
    assert status == 200 and not page.get("entry"), page


