"""Record pull, from outside: what a platform's request may make the hospital's bridge
say, write or do.

A real hospital bridge (mutual TLS on loopback, its own SQLite store) answers requests
made with aiohttp and the platform's certificate. Each test is a request an integrator's
client can send by mistake or on purpose:

- a parameter *name* that holds a value (a client that percent-encodes the ``=``, a read
  given a bare value) is never repeated in the answer or the audit trail (PROTOCOL
  P-PULL-19: refusals carry no value from the request);
- a date parameter repeated without bound is refused as the client's mistake, naming the
  parameter, instead of failing in the store and telling the partner where the store is;
- a HEAD request runs no pull (nor a consent read or a checkpoint): nothing is signed,
  audited as released, or filed for review that the platform never received;
- a read refuses a ``_format`` or ``_pretty`` it does not serve, as a search does
  (P-PULL-5: a parameter is never ignored);
- an id followed by a line break is not a FHIR id (400), where it was looked up as the id
  before it and ``$everything`` served that patient's record.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pull_support import PLATFORM, PullSite, id_card, keep, person_records, pull_consent, start_site
from yarl import URL

from bridge.errors import StoreError
from bridge.ledger.records import review_items

ETREAT = {"X-Purpose-Of-Use": "ETREAT", "X-Emergency-Actor": "dr-li",
          "X-Emergency-Reason": "unconscious"}


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[PullSite]:
    pull = await start_site(tmp_path)
    try:
        yield pull
    finally:
        await pull.stop()


async def request(site: PullSite, path: str, *, method: str = "GET",
                  headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """``path`` (with its query) sent exactly as written: no re-encoding by the client."""
    status, body, _headers = await answer(site, path, method=method, headers=headers)
    return status, body


async def answer(site: PullSite, path: str, *, method: str = "GET",
                 headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    url = URL(f"{site.base}/{path}", encoded=True)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(PLATFORM))) as s,
        s.request(method, url, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.read(), dict(resp.headers)


async def patient_id(site: PullSite, record: dict[str, Any]) -> str:
    system, value = id_card(record)
    status, body = await request(site, f"Patient?identifier={system}%7C{value}")
    found = orjson.loads(body)
    assert status == 200 and found.get("total") == 1, found
    return str(found["entry"][0]["resource"]["id"])


def audit_texts(site: PullSite) -> list[str]:
    return [orjson.dumps(e.record.to_json_dict()).decode()
            for e in site.controller.store.audit_entries()]


async def consented(site: PullSite) -> tuple[dict[str, Any], str]:
    records = person_records(1, seed=57)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    return records[0], await patient_id(site, records[0])


async def test_a_parameter_name_holding_an_identifier_is_not_repeated(site: PullSite) -> None:
    record, pid = await consented(site)
    system, value = id_card(record)
    before = len(audit_texts(site))
    for path in (
        # The client percent-encoded the "=": the whole pair arrives as a name.
        f"Patient?identifier%3D{system}%7C{value}",
        f"Observation?patient%3D{value}",
        # A read given a bare value.
        f"Patient/{pid}?{value}",
        # A modifier and a chain whose text is a value.
        f"Patient?identifier:{value}={system}%7C{value}",
        f"Observation?patient.{value}=x",
    ):
        status, body = await request(site, path)
        assert status == 400, (path, status)
        outcome = orjson.loads(body)
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["details"]["coding"][0]["code"] == "search-unsupported"
        assert value not in body.decode(), path
    refusals = audit_texts(site)[before:]
    assert len(refusals) == 5
    assert all("pull.reject" in text and value not in text for text in refusals), refusals


async def test_a_known_parameter_is_still_named(site: PullSite) -> None:
    _record, pid = await consented(site)
    for path, named in (
        ("Patient?identifier:exact=a%7Cb", "identifier"),
        (f"Observation?patient.identifier={pid}", "patient"),
        ("Patient?_revinclude=Observation:patient", "_revinclude"),
        ("Observation?_elements=code", "_elements"),
        (f"Patient/{pid}?_count=3", "_count"),
    ):
        status, body = await request(site, path)
        assert status == 400, (path, status)
        assert orjson.loads(body)["issue"][0]["expression"] == [named], (path, body)


@pytest.mark.parametrize("repeats", [9, 300])
async def test_a_date_repeated_without_bound_is_the_clients_mistake(
    site: PullSite, repeats: int
) -> None:
    _record, pid = await consented(site)
    for name, path in (("date", f"Encounter?patient={pid}"),
                       ("_lastUpdated", f"Observation?patient={pid}")):
        repeated = "&".join([f"{name}=ge2000"] * repeats)
        status, body = await request(site, f"{path}&{repeated}")
        outcome = orjson.loads(body)
        assert status == 400, outcome
        issue = outcome["issue"][0]
        assert issue["details"]["coding"][0]["code"] == "search-invalid"
        assert issue["expression"] == [name]
        assert str(site.root) not in body.decode()


async def test_parameters_that_repeat_harmlessly_are_served(site: PullSite) -> None:
    _record, pid = await consented(site)
    # Eight bounds of a date are served; a range is two.
    eight = "&".join(["date=ge2000", "date=le2100"] * 4)
    status, body = await request(site, f"Encounter?patient={pid}&{eight}")
    assert status == 200, body
    # $everything's _type is 0..* (each a list): nine repeats add types.
    types = "&".join(f"_type={t}" for t in (
        "Patient", "Encounter", "Condition", "Observation", "DiagnosticReport",
        "MedicationRequest", "Procedure", "Composition", "DocumentReference"))
    status, body = await request(site, f"Patient/{pid}/$everything?{types}")
    assert status == 200, body


def test_a_store_failure_never_tells_a_partner_where_the_store_is() -> None:
    outcome = StoreError("store failed in pull_page (OperationalError)",
                         location="/srv/hospital-a/bridge.sqlite").to_operation_outcome()
    assert "expression" not in outcome["issue"][0]
    assert "/srv" not in orjson.dumps(outcome).decode()


@pytest.mark.parametrize("headers", [{}, ETREAT], ids=["consent", "override"])
async def test_head_runs_no_pull(site: PullSite, headers: dict[str, str]) -> None:
    _record, pid = await consented(site)
    before = len(audit_texts(site))
    for path in (f"Patient/{pid}/$everything", f"Patient/{pid}", f"Observation?patient={pid}",
                 f"Patient?_id={pid}", "Consent/pull-1", "$audit-checkpoint"):
        status, body, answered = await answer(site, path, method="HEAD", headers=headers)
        assert status == 405, (path, status)
        assert body == b""
        allowed = set(answered.get("Allow", "").split(","))
        assert "GET" in allowed and "HEAD" not in allowed, answered
    after = audit_texts(site)[before:]
    assert not [t for t in after if "record.pull" in t], after
    assert review_items(site.controller.store, pending_only=False) == []


@pytest.mark.parametrize("query, named", [
    ("_format=xml", "_format"),
    ("_pretty=banana", "_pretty"),
    ("_format=json&_format=xml", "_format"),
])
async def test_a_read_refuses_a_format_it_does_not_serve(
    site: PullSite, query: str, named: str
) -> None:
    _record, pid = await consented(site)
    status, body = await request(site, f"Patient/{pid}?{query}")
    assert status == 400, body
    assert orjson.loads(body)["issue"][0]["expression"] == [named]
    status, body = await request(site, f"Patient/{pid}?_format=json&_pretty=true")
    assert status == 200 and orjson.loads(body)["resourceType"] == "Patient"


@pytest.mark.parametrize("path", ["Patient/{pid}%0A", "Patient/{pid}%0A/$everything",
                                  "Patient?_id=x%0A"])
async def test_an_id_with_a_line_break_after_it_is_not_a_fhir_id(site: PullSite, path: str) -> None:
    # A FHIR id is the whole text: one that ends in a line break is refused as the
    # client's mistake (400 naming the id), never looked up as if it were the id before it.
    _record, pid = await consented(site)
    status, body = await request(site, path.format(pid=pid))
    assert status == 400, body
    issue = orjson.loads(body)["issue"][0]
    assert issue["details"]["text"] == "not a FHIR id"
    assert issue["expression"][0] in ("Patient.id", "_id")
