"""Record pull end to end: a regional platform's unchanged FHIR client (fhirpy) against
the hospital's running bridge over mutual TLS.

Signatures on the pages are checked by a verifier written here from PROTOCOL §5 with
``cryptography`` and the standard ``json`` module, not with the bridge's own code.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from fhirpy import AsyncFHIRClient
from pull_support import (
    HOSPITAL,
    INSURER,
    PLATFORM,
    PULL_LINK,
    STRANGER,
    PullSite,
    id_card,
    keep,
    person_records,
    pull_consent,
    start_site,
)

from bridge.policy.profile import load_link_profile

# --- an independent verifier (PROTOCOL §5) ----------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_page(root: Path, bundle: dict[str, Any], *, audience: str = PLATFORM) -> dict[str, Any]:
    """Check a page's Bundle.signature as PROTOCOL §5 says; return the protected header."""
    sig = bundle["signature"]
    assert sig["sigFormat"] == "application/jose"
    assert sig["who"]["identifier"] == {"system": "urn:ws-fhir-bridge:partner", "value": HOSPITAL}
    header_b64, empty, sig_b64 = base64.b64decode(sig["data"]).decode().split(".")
    assert empty == ""
    header = json.loads(_unb64url(header_b64))
    unsigned = {k: v for k, v in bundle.items() if k != "signature"}
    payload = rfc8785.dumps(unsigned)  # PROTOCOL §5.1: RFC 8785 canonical JSON
    cert = x509.load_pem_x509_certificate((root / "pki" / HOSPITAL / "sign.pem").read_bytes())
    raw = _unb64url(sig_b64)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and header["alg"] == "ES256"
    key.verify(der, f"{header_b64}.{_b64url(payload)}".encode(), ec.ECDSA(hashes.SHA256()))
    assert header["iss"] == HOSPITAL and header["aud"] == audience
    assert header["msgid"] == bundle["identifier"]["value"]
    return dict(header)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def site(tmp_path: Path) -> Any:
    s = await start_site(tmp_path)
    try:
        yield s
    finally:
        await s.stop()


def fhir_client(site: PullSite, who: str = PLATFORM, **headers: str) -> AsyncFHIRClient:
    return AsyncFHIRClient(site.base, aiohttp_config={"ssl": site.ssl(who)},
                           extra_headers={"X-Purpose-Of-Use": "TREAT", **headers})


async def get(site: PullSite, path: str, params: Any = None, *, who: str | None = PLATFORM,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], Any]:
    url = path if path.startswith("https://") else f"{site.base}/{path}"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl(who))) as session,
        session.get(url, params=params, headers=headers or {}) as resp,
    ):
        return resp.status, orjson.loads(await resp.read()), resp.headers


async def everything_pages(site: PullSite, pid: str, count: int, between: Any = None,
                           **headers: str) -> list[dict[str, Any]]:
    """Every page of $everything, through fhirpy, calling ``between`` after each page."""
    client = fhir_client(site, **headers)
    pages = [await client.execute(f"Patient/{pid}/$everything", method="get",
                                  params={"_count": count})]
    while True:
        if between is not None:
            await between(len(pages))
        nxt = next((lk["url"] for lk in pages[-1].get("link", []) if lk["relation"] == "next"), None)
        if nxt is None:
            return [dict(p) for p in pages]
        pages.append(await client.execute(nxt, method="get"))


def keys_of(pages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["resource"]["resourceType"], e["resource"]["id"])
            for p in pages for e in p.get("entry", [])]


async def find_patient(site: PullSite, record: dict[str, Any]) -> str:
    system, value = id_card(record)
    found = await fhir_client(site).resources("Patient").search(
        identifier=f"{system}|{value}").fetch_all()
    assert len(found) == 1
    return str(found[0]["id"])


# --- search, read, $everything ---------------------------------------------------------------


async def test_fhirpy_searches_reads_and_pulls_everything_over_mutual_tls(site: PullSite) -> None:
    records = person_records(4)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await find_patient(site, records[0])

    patient = await fhir_client(site).reference("Patient", pid).to_resource()
    assert patient["id"] == pid and "identifier" not in patient  # notify level: no identifiers
    # A read is signed over its exact body in X-Signature (msgid = X-Correlation-Id).
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=site.ssl())) as session,
        session.get(f"{site.base}/Patient/{pid}") as resp,
    ):
        body = await resp.read()
        header_b64, empty, sig_b64 = resp.headers["X-Signature"].split(".")
        claims = json.loads(_unb64url(header_b64))
        cert = x509.load_pem_x509_certificate((site.root / "pki" / HOSPITAL / "sign.pem").read_bytes())
        raw = _unb64url(sig_b64)
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                        int.from_bytes(raw[32:], "big")),
                   f"{header_b64}.{_b64url(body)}".encode(), ec.ECDSA(hashes.SHA256()))
        assert empty == "" and claims["msgid"] == resp.headers["X-Correlation-Id"]
        assert claims["aud"] == PLATFORM and orjson.loads(body)["id"] == pid

    client = fhir_client(site)
    encounters = await client.resources("Encounter").search(patient=pid).fetch_all()
    assert len(encounters) == 8  # a front sheet and a lab report per stay
    recent = await client.resources("Encounter").search(patient=pid, date="ge2000-01-01").fetch_all()
    # Encounters without a period (those of lab reports) have no date to match.
    assert {e["id"] for e in recent} == {e["id"] for e in encounters if "period" in e}
    assert len(recent) == 4
    none = await client.resources("Encounter").search(patient=pid, date="lt1900").fetch_all()
    assert none == []
    reports = await client.resources("DiagnosticReport").search(patient=pid).fetch_all()
    assert len(reports) == 4
    with_enc = await client.execute("Observation", method="get", params={
        "patient": pid, "_include": "Observation:encounter", "_count": 50})
    modes = {e["search"]["mode"] for e in with_enc["entry"]}
    assert modes == {"match", "include"}
    assert all(e["resource"]["resourceType"] == "Encounter"
               for e in with_enc["entry"] if e["search"]["mode"] == "include")

    pages = await everything_pages(site, pid, count=7)
    assert len(pages) > 3
    keys = keys_of(pages)
    assert len(keys) == len(set(keys))
    assert ("Patient", pid) in keys
    assert {k[0] for k in keys} >= {"Patient", "Encounter", "Condition", "Observation",
                                    "DiagnosticReport", "Organization"}
    assert not {k[0] for k in keys} & {"Claim", "Coverage"}  # not in the regional profile
    for n, page in enumerate(pages):
        header = verify_page(site.root, page)
        assert ("total" in page) is (len(pages) == 1)
        assert len(page.get("entry", [])) == (7 if n < len(pages) - 1 else len(page.get("entry", [])))
        assert header["msgid"].startswith("urn:uuid:")


async def test_pages_stay_stable_while_records_arrive(site: PullSite) -> None:
    records = person_records(6)
    await keep(site, records[:8])
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await find_patient(site, records[0])
    before = keys_of(await everything_pages(site, pid, count=200))
    start = datetime.now(UTC)

    later = iter(records[8:])

    async def arrive(_n: int) -> None:
        # New stays arrive between pages, and the Patient gets a new version.
        for record in [next(later, None), next(later, None)]:
            if record is not None:
                await site.controller.keep_for_pull(record, source="test")

    during = keys_of(await everything_pages(site, pid, count=5, between=arrive))
    assert len(during) == len(set(during)), "a resource came twice"
    assert set(during) == set(before), "the traversal skipped or gained resources"
    after = keys_of(await everything_pages(site, pid, count=200))
    assert set(after) > set(before)
    # _since finds what changed after the first traversal began, and nothing older.
    since = start.isoformat(timespec="microseconds")
    changed = keys_of([await fhir_client(site).execute(
        f"Patient/{pid}/$everything", method="get", params={"_since": since, "_count": 200})])
    assert set(after) - set(before) <= set(changed) < set(after)
    assert ("Patient", pid) in changed  # re-versioned by the new stays


async def test_revoking_consent_between_pages_stops_the_next_page(site: PullSite) -> None:
    records = person_records(3)
    await keep(site, records)
    consent = pull_consent(records[0])
    await site.controller.put_consent(consent)
    pid = await find_patient(site, records[0])
    status, first, _ = await get(site, f"Patient/{pid}/$everything", {"_count": "4"})
    assert status == 200 and len(first["entry"]) == 4
    nxt = next(lk["url"] for lk in first["link"] if lk["relation"] == "next")
    await site.controller.put_consent({**consent, "status": "inactive"})
    status, second, _ = await get(site, nxt)
    assert status == 200
    assert "entry" not in second and not any(lk["relation"] == "next" for lk in second["link"])
    verify_page(site.root, second)
    denied = [e.record for e in site.controller.store.audit_entries()
              if e.record.action == "record.pull" and e.record.outcome == "denied"]
    assert denied and denied[-1].subject == second["identifier"]["value"]


@pytest.mark.control("T18")
async def test_unknown_and_unconsented_patients_get_the_same_answer(site: PullSite) -> None:
    consented, unconsented = person_records(1, seed=5), person_records(1, seed=6)
    await keep(site, consented + unconsented)
    await site.controller.put_consent(pull_consent(consented[0]))

    def shape(bundle: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in bundle.items()
                if k not in ("id", "identifier", "timestamp", "signature", "link")}

    answers = []
    for system, value in [id_card(unconsented[0]), ("urn:oid:2.16.156.10011.1.3", "11010519491231002X")]:
        status, body, _ = await get(site, "Patient", {"identifier": f"{system}|{value}"})
        assert status == 200
        answers.append(shape(body))
    assert answers[0] == answers[1] == {"resourceType": "Bundle", "type": "searchset", "total": 0}
    # Reads answer 404 alike; the id of an existing, unconsented patient reveals nothing.
    from bridge.ledger.records import find_person

    system, value = id_card(unconsented[0])
    hidden = find_person(site.controller.store, [f"{system}|{value}"])
    s1, b1, _ = await get(site, f"Patient/{hidden}")
    s2, b2, _ = await get(site, "Patient/00000000-0000-5000-8000-000000000000")
    assert s1 == s2 == 404 and b1 == b2
    s1, b1, _ = await get(site, "Encounter", {"patient": f"Patient/{hidden}"})
    s2, b2, _ = await get(site, "Encounter", {"patient": "Patient/nobody"})
    assert s1 == s2 == 200 and shape(b1) == shape(b2)


async def test_a_link_may_answer_403_instead_and_still_reveals_nothing(tmp_path: Path) -> None:
    site = await start_site(tmp_path, no_consent="forbidden")
    try:
        records = person_records(1, seed=8)
        await keep(site, records)
        system, value = id_card(records[0])
        a = await get(site, "Patient", {"identifier": f"{system}|{value}"})
        b = await get(site, "Patient", {"identifier": f"{system}|999"})
        assert a[0] == b[0] == 403 and a[1] == b[1]
        await site.controller.put_consent(pull_consent(records[0]))
        assert (await get(site, "Patient", {"identifier": f"{system}|{value}"}))[0] == 200
    finally:
        await site.stop()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "headers", "status", "where"),
    [
        ("Encounter", {"patient": "{pid}", "foo": "1"}, {}, 400, "query[1]"),
        ("Encounter", {"patient": "{pid}", "date": "ge2024-13-40"}, {}, 400, "date"),
        ("Encounter", {"patient": "{pid}", "_count": "100000"}, {}, 400, "_count"),
        ("Encounter", [("patient", "{pid}"), ("patient", "Patient/other")], {}, 400, "patient"),
        ("Encounter", {"patient": "Group/g1"}, {}, 400, "patient"),
        ("Encounter", {"date": "ge2024"}, {}, 400, "patient"),
        ("Condition", {"patient": "{pid}", "_revinclude": "Encounter:subject"}, {}, 400,
         "_revinclude"),
        ("Encounter", {"patient": "{pid}", "_cursor": "AAAA"}, {}, 400, "_cursor"),
        ("Patient/{pid}/$everything", {"_since": "yesterday"}, {}, 400, "_since"),
        ("Patient/{pid}/$everything", {"start": "2024"}, {}, 400, "start"),
        ("Claim", {"patient": "{pid}"}, {}, 404, None),
        ("Encounter", {"patient": "{pid}"}, {"X-Purpose-Of-Use": "HMARKT"}, 403,
         "X-Purpose-Of-Use"),
        ("Encounter", {"patient": "{pid}"}, {"X-Purpose-Of-Use": "ETREAT"}, 400,
         "X-Emergency-Actor"),
    ],
)
async def test_bad_requests_are_refused_naming_the_parameter_and_audited(
    site: PullSite, path: str, params: Any, headers: dict[str, str], status: int,
    where: str | None,
) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    pid = await find_patient(site, records[0])
    path = path.replace("{pid}", pid)
    if isinstance(params, dict):
        params = {k: v.replace("{pid}", pid) for k, v in params.items()}
    else:
        params = [(k, v.replace("{pid}", pid)) for k, v in params]
    got, body, _ = await get(site, path, params, headers=headers)
    assert got == status
    assert body["resourceType"] == "OperationOutcome"
    if where is not None:
        assert body["issue"][0]["expression"] == [where]
        rejects = [e.record for e in site.controller.store.audit_entries()
                   if e.record.action == "pull.reject"]
        assert rejects and rejects[-1].detail.endswith(f"@{where}")  # type: ignore[union-attr]
    text = orjson.dumps(body).decode()
    assert pid not in text and id_card(records[0])[1] not in text


@pytest.mark.control("T18")
@pytest.mark.parametrize("who", [INSURER, STRANGER, HOSPITAL])
async def test_a_certificate_without_a_pull_link_gets_401(site: PullSite, who: str) -> None:
    status, body, _ = await get(site, "Patient", {"identifier": "a|b"}, who=who)
    assert status == 401
    assert body["issue"][0]["details"]["coding"][0]["code"] == "unknown-partner"
    # Refused by the pull link check, or before it by the per-request certificate check.
    assert any(e.record.action in ("pull.reject", "message.reject")
               and e.record.outcome == "denied" and e.record.detail.startswith("unknown-partner")
               for e in site.controller.store.audit_entries())


async def test_no_client_certificate_never_reaches_http(site: PullSite) -> None:
    with pytest.raises(aiohttp.ClientError):
        await get(site, "Patient", {"identifier": "a|b"}, who=None)


async def test_the_default_level_does_not_offer_filters_on_what_it_withholds(tmp_path: Path) -> None:
    site = await start_site(tmp_path, level="default")
    try:
        records = person_records(1)
        await keep(site, records)
        await site.controller.put_consent(pull_consent(records[0]))
        pid = await find_patient(site, records[0])
        status, body, _ = await get(site, "Encounter", {"patient": pid, "date": "ge2000"})
        assert status == 400 and body["issue"][0]["expression"] == ["date"]
        status, body, _ = await get(site, "Condition", {"patient": pid})
        assert status == 400 and body["issue"][0]["expression"] == ["Condition"]
        status, meta, _ = await get(site, "metadata")
        types = {r["type"]: r for r in meta["rest"][0]["resource"]}
        assert set(types) == {"Patient", "Encounter", "Consent"}
        assert [p["name"] for p in types["Encounter"]["searchParam"] if p["name"] == "date"] == []
    finally:
        await site.stop()


async def test_capability_statement_is_generated_per_caller(site: PullSite) -> None:
    status, meta, _ = await get(site, "metadata")
    assert status == 200 and meta["fhirVersion"] == "4.0.1"
    assert meta["extension"][0]["valueString"] == "1.3"
    rest = meta["rest"][0]
    types = {r["type"]: r for r in rest["resource"]}
    profile = load_link_profile("regional-interoperability", level="notify")
    served = {"Patient", "Encounter", "Condition", "Observation", "DiagnosticReport",
              "MedicationRequest", "Procedure", "Composition"}
    assert set(types) == served | {"Consent"}
    assert all(profile.allows_type(t) for t in served)
    assert types["Patient"]["operation"][0]["name"] == "everything"
    assert {p["name"] for p in types["Condition"]["searchParam"]} >= {"patient", "onset-date"}
    assert types["Condition"]["searchInclude"] == ["Condition:encounter"]
    assert "operation" not in rest  # the platform has no claim link here
    status, insurer_meta, _ = await get(site, "metadata", who=INSURER)
    assert {r["type"] for r in insurer_meta["rest"][0]["resource"]} == {"Consent"}


# --- abuse bounds ----------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    site = await start_site(tmp_path, rate=0.5, burst=3)
    try:
        statuses = []
        for _ in range(5):
            status, body, headers = await get(site, "Patient", {"identifier": "a|b"})
            statuses.append(status)
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]
        assert int(headers["Retry-After"]) >= 1
        assert body["issue"][0]["details"]["coding"][0]["code"] == "rate-limited"
        throttled = [e.record for e in site.controller.store.audit_entries()
                     if e.record.action == "pull.throttled"]
        assert len(throttled) == 1 and throttled[0].partner == PLATFORM
    finally:
        await site.stop()


async def test_bulk_query_alarm_is_audited_and_reported_for_review(tmp_path: Path) -> None:
    site = await start_site(tmp_path, alarm=3)
    try:
        for n in range(6):
            status, _, _ = await get(site, "Patient", {"identifier": f"urn:x|{n}"})
            assert status == 200  # the alarm does not change answers
        alarms = [e.record for e in site.controller.store.audit_entries()
                  if e.record.action == "pull.alarm"]
        assert len(alarms) == 1 and alarms[0].detail == "bulk-query distinct=4"
        from bridge.ledger.records import review_items

        (item,) = review_items(site.controller.store)
        assert (item.kind, item.partner, item.link) == ("bulk-query", PLATFORM, PULL_LINK)
    finally:
        await site.stop()
