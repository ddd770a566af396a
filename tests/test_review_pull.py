"""Record pull under attack, from outside: crafted search values, cursors carried across
partners and purposes, emergency overrides continued page by page, and special-disease
data inside documents.

The hospital's bridge runs with its real mutual-TLS listener; requests come from aiohttp
with the partners' certificates, and what the operator sees is read with the ``bridge``
command in its own process.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pull_support import (
    HOSPITAL,
    INSURER,
    PLATFORM,
    PullSite,
    id_card,
    keep,
    person_records,
    pull_consent,
    start_site,
    write_site,
)

from bridge.config import load_config
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.policy.engine import build_consent
from bridge.samples_documents import discharge_records

ETREAT = {"X-Purpose-Of-Use": "ETREAT", "X-Emergency-Actor": "dr-li",
          "X-Emergency-Reason": "unconscious"}


@pytest.fixture
async def site(tmp_path: Path) -> Any:
    s = await start_site(tmp_path)
    try:
        yield s
    finally:
        await s.stop()


async def get(site: PullSite, path: str, params: Any = None, *, who: str = PLATFORM,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    url = path if path.startswith("https://") else f"{site.base}/{path}"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(who))) as session,
        session.get(url, params=params, headers=headers or {}) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def bridge_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def patient_id(site: PullSite, record: dict[str, Any]) -> str:
    system, value = id_card(record)
    status, found = await get(site, "Patient", {"identifier": f"{system}|{value}"})
    assert status == 200 and found["total"] == 1, found
    return str(found["entry"][0]["resource"]["id"])


def next_url(page: dict[str, Any]) -> str | None:
    return next((lk["url"] for lk in page.get("link", []) if lk["relation"] == "next"), None)


def failures(site: PullSite) -> list[Any]:
    return [e.record for e in site.controller.store.audit_entries()
            if e.record.action == "request.failed"]


# --- crafted values never reach a 5xx -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "where"),
    [
        # A digit that is not an ASCII digit (superscript two, Arabic-Indic one).
        ("Encounter", {"patient": "{pid}", "_count": "\u00b2"}, "_count"),
        ("Encounter", {"patient": "{pid}", "_count": "\u0661"}, "_count"),
        ("Encounter", {"patient": "{pid}", "date": "\u0662\u0660\u0662\u0664"}, "date"),
        ("Patient/{pid}/$everything", {"_since": "2024-01-01T00:00:00+\u0660\u0668:00"},
         "_since"),
    ],
)
async def test_values_in_other_digits_are_400_naming_the_parameter(
    site: PullSite, path: str, params: dict[str, str], where: str
) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(site, records[0])
    status, body = await get(site, path.replace("{pid}", pid),
                             {k: v.replace("{pid}", pid) for k, v in params.items()})
    assert status == 400, body
    assert body["issue"][0]["expression"] == [where]
    assert failures(site) == []


@pytest.mark.parametrize(
    ("path", "params", "matches"),
    [
        # Dates at the edges of the calendar, in zones that take them past it in UTC:
        # valid FHIR, compared like any other date.
        ("Encounter", {"patient": "{pid}", "date": "0001"}, False),
        ("Encounter", {"patient": "{pid}", "date": "9999-12-31"}, False),
        ("Encounter", {"patient": "{pid}", "date": "ge0001-01-01T00:00:00+14:00"}, True),
        ("Encounter", {"patient": "{pid}", "date": "lt9999"}, True),
        ("Encounter", {"patient": "{pid}", "_lastUpdated": "le9999-12-31T23:59:59-12:00"}, True),
        ("Patient/{pid}/$everything", {"_since": "0001-01-01T00:00:00+14:00"}, True),
        ("Patient/{pid}/$everything", {"_since": "9999-12-31T23:59:59.999999-12:00"}, False),
    ],
)
async def test_dates_at_the_edges_of_the_calendar_are_answered(
    site: PullSite, path: str, params: dict[str, str], matches: bool
) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(site, records[0])
    status, body = await get(site, path.replace("{pid}", pid),
                             {k: v.replace("{pid}", pid) for k, v in params.items()})
    assert status == 200, body
    assert bool(body.get("entry")) is matches
    assert failures(site) == []


async def test_identifier_and_another_id_in_one_search_is_refused(site: PullSite) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(site, records[0])
    system, value = id_card(records[0])
    # FHIR ANDs the two: a search naming the patient twice, differently, is one about
    # two patients (P-PULL-4), never an answer about the first that ignores the second.
    status, body = await get(site, "Patient", {"identifier": f"{system}|{value}",
                                               "_id": "00000000-0000-5000-8000-000000000000"})
    assert status == 400 and body["issue"][0]["expression"] == ["_id"]
    status, body = await get(site, "Patient", {"identifier": f"{system}|{value}", "_id": pid})
    assert status == 400 and body["issue"][0]["expression"] == ["_id"]


async def test_a_patient_reference_on_another_server_is_refused(site: PullSite) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(site, records[0])
    status, body = await get(site, "Encounter", {"patient": f"https://elsewhere.example/fhir/Patient/{pid}"})
    assert status == 400 and body["issue"][0]["expression"] == ["patient"]
    status, body = await get(site, "Encounter", {"patient": f"{site.base}/Patient/{pid}"})
    assert status == 200 and body["entry"]


async def test_override_headers_that_are_not_percent_encoded_utf8_are_refused(
    site: PullSite,
) -> None:
    records = person_records(1)
    await keep(site, records)
    pid = await patient_id_without_consent(site, records[0])
    status, body = await get(site, f"Patient/{pid}/$everything",
                             headers={**ETREAT, "X-Emergency-Actor": "%ff%fe"})
    assert status == 400 and body["issue"][0]["expression"] == ["X-Emergency-Actor"]


async def patient_id_without_consent(site: PullSite, record: dict[str, Any]) -> str:
    system, value = id_card(record)
    status, found = await get(site, "Patient", {"identifier": f"{system}|{value}"},
                              headers=ETREAT)
    assert status == 200 and found["total"] == 1, found
    return str(found["entry"][0]["resource"]["id"])


# --- cursors and overrides ---------------------------------------------------------------------


async def test_a_traversal_begun_under_consent_cannot_continue_as_an_override(
    site: PullSite,
) -> None:
    records = person_records(3)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(site, records[0])
    status, first = await get(site, f"Patient/{pid}/$everything", {"_count": "2"},
                              headers={"X-Purpose-Of-Use": "TREAT"})
    url = next_url(first)
    assert status == 200 and url is not None
    status, body = await get(site, url, headers=ETREAT)
    assert status == 400 and body["issue"][0]["expression"] == ["_cursor"]
    # The same cursor, under the purpose it was issued for, still reads on.
    status, _ = await get(site, url, headers={"X-Purpose-Of-Use": "TREAT"})
    assert status == 200


async def test_every_override_page_is_reported_for_review(site: PullSite) -> None:
    records = person_records(3)
    await keep(site, records)  # no consent: only an override releases anything
    pid = await patient_id_without_consent(site, records[0])
    code, listing, _ = await bridge_cli("records", "review", "--config", str(site.hospital_cfg),
                                        "--json")
    before = orjson.loads(listing)
    status, first = await get(site, f"Patient/{pid}/$everything", {"_count": "2"},
                              headers={**ETREAT, "X-Emergency-Actor": "dr-wang"})
    url = next_url(first)
    assert status == 200 and url is not None
    # Another clinician reads on with the first one's cursor.
    status, second = await get(site, url, headers={**ETREAT, "X-Emergency-Actor": "dr-zhao"})
    assert status == 200 and second.get("entry")
    code, listing, _ = await bridge_cli("records", "review", "--config", str(site.hospital_cfg),
                                        "--json")
    assert code == 0
    actors = {item["actor"] for item in orjson.loads(listing)} - {
        item["actor"] for item in before}
    assert actors == {"dr-wang", "dr-zhao"}


async def test_a_cursor_issued_to_one_partner_is_refused_to_another(tmp_path: Path) -> None:
    h, _p, _port = write_site(tmp_path)
    # The insurer gets a pull link of its own for the same patient.
    h.write_text(h.read_text(encoding="utf-8") + f"""
[[links]]
id = "records-to-insurer"
partner = "{INSURER}"
direction = "pull"
profile = "regional-interoperability"
purpose = "TREAT"

[links.pull]
purposes = ["TREAT"]
level = "notify"
""", encoding="utf-8")
    service = BridgeService(Controller(load_config(h)), poll_interval=0.05)
    await service.start()
    site = PullSite(tmp_path, h, _p, service)
    try:
        records = person_records(3)
        await keep(site, records)
        await site.controller.put_consent(pull_consent(records[0]))
        await site.controller.put_consent(pull_consent(records[0], consent_id="pull-2",
                                                       recipient=INSURER))
        pid = await patient_id(site, records[0])
        status, first = await get(site, f"Patient/{pid}/$everything", {"_count": "2"})
        url = next_url(first)
        assert status == 200 and url is not None
        status, body = await get(site, url, who=INSURER)
        assert status == 400 and body["issue"][0]["expression"] == ["_cursor"]
    finally:
        await site.stop()


# --- special-disease data inside documents -----------------------------------------------------


def _psychiatric_discharge() -> dict[str, Any]:
    record = discharge_records(1, seed=1)[0]
    groups = dict(record["groups"])
    groups["diagnoses"] = [{"HDSD00.16.032": "F20.000"}, {"HDSD00.16.008": "F20.000"}]
    record = {**record, "groups": groups}
    record["elements"] = dict(record["elements"], **{
        "HDSD00.16.045": "诊断精神分裂症，予奥氮平治疗。",
    })
    return record


def _consent(record: dict[str, Any], classes: tuple[str, ...]) -> dict[str, Any]:
    now = datetime.now(UTC)
    return build_consent(
        consent_id="doc-1", patient_system="urn:oid:2.16.156.10011.1.19",
        patient_value=record["elements"]["HDSD00.16.021"], recipient=PLATFORM,
        purposes=["TREAT"], start=now - timedelta(days=1), end=now + timedelta(days=30),
        sensitive_classes=classes, hospital_partner_id=HOSPITAL,
    )


async def test_a_document_about_a_special_disease_stay_needs_the_class_consent(
    tmp_path: Path,
) -> None:
    site = await start_site(tmp_path, level="authorise")
    try:
        record = _psychiatric_discharge()
        await keep(site, [record])
        await site.controller.put_consent(_consent(record, ("infectious",)))
        status, found = await get(site, "Patient", {
            "identifier": f"urn:oid:2.16.156.10011.1.19|{record['elements']['HDSD00.16.021']}"})
        assert status == 200 and found["total"] == 1
        pid = found["entry"][0]["resource"]["id"]
        for path, params in [(f"Patient/{pid}/$everything", {}),
                             ("Composition", {"patient": pid})]:
            status, page = await get(site, path, params)
            assert status == 200
            released = [e["resource"] for e in page.get("entry", [])]
            text = orjson.dumps(released).decode()
            assert "Composition" not in {r["resourceType"] for r in released}, path
            assert "精神分裂症" not in text and "F20" not in text
        # With the class named, the summary travels, labelled as what it is.
        await site.controller.put_consent(_consent(record, ("mental",)))
        status, page = await get(site, "Composition", {"patient": pid})
        documents = [e["resource"] for e in page.get("entry", [])]
        assert status == 200 and len(documents) == 1
        labels = {(c["system"], c["code"]) for c in documents[0]["meta"]["security"]}
        assert ("urn:ws-fhir-bridge:sensitivity", "mental") in labels
    finally:
        await site.stop()


async def test_reads_get_404_alike_on_a_link_that_answers_403(tmp_path: Path) -> None:
    """P-PULL-9: searches get 403 on such a link; a read of a patient that is unknown or
    not permitted gets 404 either way, the same answer."""
    site = await start_site(tmp_path, no_consent="forbidden")
    try:
        records = person_records(1, seed=8)
        await keep(site, records)
        from bridge.ledger.records import find_person

        system, value = id_card(records[0])
        hidden = find_person(site.controller.store, [f"{system}|{value}"])
        s1, b1 = await get(site, f"Patient/{hidden}")
        s2, b2 = await get(site, "Patient/00000000-0000-5000-8000-000000000000")
        assert s1 == s2 == 404 and b1 == b2
    finally:
        await site.stop()


async def test_pages_reveal_nothing_of_other_patients_activity(site: PullSite) -> None:
    """What one patient's pages carry (versions, cursors) does not count the records the
    hospital keeps about anybody else."""
    mine, others = person_records(2, seed=21), person_records(3, seed=22)
    await keep(site, mine[:2])
    await site.controller.put_consent(pull_consent(mine[0]))
    pid = await patient_id(site, mine[0])
    status, before = await get(site, f"Patient/{pid}/$everything", {"_count": "2"})
    assert status == 200
    await keep(site, others)  # another patient's stays arrive meanwhile
    status, after = await get(site, f"Patient/{pid}/$everything", {"_count": "2"})
    assert status == 200
    # The same resources, the same versions, the same cursor length: nothing moved.
    assert [e["resource"]["meta"].get("versionId") for e in before["entry"]] == [
        e["resource"]["meta"].get("versionId") for e in after["entry"]]
    assert all(e["resource"]["meta"].get("versionId") in (None, "1", "2")
               for e in after["entry"]), [e["resource"]["meta"] for e in after["entry"]]
    cursor = next_url(after)
    assert cursor is not None
    token = cursor.split("_cursor=")[1]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    # An opaque cursor, not a readable one (four plaintext bytes in a row would be chance).
    assert b'"s":' not in raw and b'"a":' not in raw and b'"q":' not in raw


async def test_released_ids_do_not_give_away_withheld_identifiers(site: PullSite) -> None:
    """At the notify level a Patient carries no identifier; its id (and every reference
    to it) must not be one an outsider can compute from an identifier either (resource
    ids are uuid5 of the hospital's code and the record number in the mapping)."""
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await patient_id(site, records[0])
    status, page = await get(site, f"Patient/{pid}/$everything")
    assert status == 200
    released = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in page["entry"]}
    assert all("identifier" not in r["resource"] for r in page["entry"]
               if r["resource"]["resourceType"] == "Patient")
    # What someone holding the hospital's code and a record number can compute.
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ws-fhir-bridge:resource-id")
    el = records[0]["elements"]
    guesses = {
        ("Patient", str(uuid.uuid5(namespace, f"Patient|{el['HDSD00.11.119']}|{el['HDSD00.11.006']}"))),
        ("Encounter", str(uuid.uuid5(namespace, "|".join(
            ["Encounter", el["HDSD00.11.119"], el["HDSD00.11.140"], el["HDSD00.11.085"]])))),
    }
    assert not guesses & released
    text = orjson.dumps(page).decode()
    assert not any(g[1] in text for g in guesses)
