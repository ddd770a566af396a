"""Record pull as operators use it: ``bridge pull`` at the platform, both sides' audit
trails agreeing on every page, the emergency override reviewed through ``bridge
status``, and records reaching the pull source from MLLP, ``bridge push`` and import."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pull_support import (
    FROM_LINK,
    HOSPITAL,
    INSURER,
    PLATFORM,
    PullSite,
    id_card,
    keep,
    person_records,
    pull_consent,
    start_site,
)
from test_e2e_pull import verify_page

from bridge.ledger.audit import AuditRecord
from bridge.ledger.sqlite import SQLiteStore


@pytest.fixture
async def site(tmp_path: Path) -> Any:
    s = await start_site(tmp_path)
    try:
        yield s
    finally:
        await s.stop()


async def bridge_cli(*args: str) -> tuple[int, str, str]:
    """Run the ``bridge`` command in its own process without blocking the served loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def entries(store_path: Path, action: str) -> list[Any]:
    with SQLiteStore(store_path) as store:
        return [e.record for e in store.audit_entries() if e.record.action == action]


async def test_bridge_pull_verifies_keeps_and_both_sides_audit_each_page_alike(
    site: PullSite, tmp_path: Path
) -> None:
    records = person_records(3)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    # A claim for the same patient, so the disclosure listing holds a push and pulls.
    await site.controller.put_consent(pull_consent(records[0], consent_id="claim-1",
                                                   purposes=("HPAYMT",), recipient=INSURER))
    await site.hospital.submit(records[0], "claims-to-insurer-b")
    system, value = id_card(records[0])
    out = tmp_path / "pulled"
    code, stdout, stderr = await bridge_cli(
        "pull", "--config", str(site.platform_cfg), "--link", FROM_LINK,
        "--patient", f"{system}|{value}", "--count", "5", "--out", str(out), "--json")
    assert code == 0, stderr
    report = orjson.loads(stdout)
    assert report["pages"] >= 3 and report["resources"]["Encounter"] == 6

    hospital_pulls = {r.subject: r for r in entries(site.root / HOSPITAL / "bridge.sqlite",
                                                   "record.pull")}
    platform_got = {r.subject: r for r in entries(site.root / PLATFORM / "bridge.sqlite",
                                                 "record.pull.receive")}
    assert set(platform_got) == set(hospital_pulls) == set(report["page_ids"])
    for subject, theirs in platform_got.items():
        ours = hospital_pulls[subject]
        assert ours.digest == theirs.digest and ours.partner == PLATFORM
        assert theirs.partner == HOSPITAL and theirs.outcome == "success"
    with SQLiteStore(site.root / PLATFORM / "bridge.sqlite") as platform_store:
        from bridge.ledger.records import received_pages

        kept = received_pages(platform_store, partner=HOSPITAL)
    assert [p[0] for p in kept] == report["page_ids"]
    first = orjson.loads((out / "pages" / "page-00001.json").read_bytes())
    verify_page(site.root, first)
    assert len(list(out.glob("Encounter-*.json"))) == 6

    code, listing, _ = await bridge_cli("audit", "disclosures", "--config", str(site.hospital_cfg),
                                        "--patient", f"{system}|{value}")
    assert code == 0
    assert listing.count("\trecord.pull\t") == len(hospital_pulls)
    assert "\tclaim.enqueue\t" in listing
    assert value not in listing


async def test_a_page_not_signed_by_the_hospital_stops_the_pull(site: PullSite) -> None:
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    # The platform knows another key for the hospital: every page fails to verify.
    cfg = site.platform_cfg.read_text().replace(
        f'signing_certs = ["pki/{HOSPITAL}/sign.pem"]', f'signing_certs = ["pki/{INSURER}/sign.pem"]')
    site.platform_cfg.write_text(cfg)
    system, value = id_card(records[0])
    code, _, stderr = await bridge_cli("pull", "--config", str(site.platform_cfg), "--link",
                                       FROM_LINK, "--patient", f"{system}|{value}")
    assert code == 1 and "signature-invalid" in stderr
    refused = entries(site.root / PLATFORM / "bridge.sqlite", "record.pull.receive")
    assert [r.outcome for r in refused] == ["denied"]
    with SQLiteStore(site.root / PLATFORM / "bridge.sqlite") as store:
        from bridge.ledger.records import received_pages

        assert received_pages(store) == []


async def test_emergency_override_is_granted_audited_on_both_sides_and_reviewed(
    site: PullSite,
) -> None:
    records = person_records(2)
    await keep(site, records)  # no consent at all
    system, value = id_card(records[0])
    args = ["pull", "--config", str(site.platform_cfg), "--link", FROM_LINK,
            "--patient", f"{system}|{value}", "--json"]
    code, stdout, _ = await bridge_cli(*args)
    assert code == 0 and orjson.loads(stdout)["resources"] == {}
    code, stdout, _ = await bridge_cli(*args, "--emergency-actor", "dr-li",
                                       "--emergency-reason", "unconscious on arrival")
    assert code == 0
    report = orjson.loads(stdout)
    assert report["override"] and report["resources"]["Encounter"] == 4

    pulls = entries(site.root / HOSPITAL / "bridge.sqlite", "record.pull")
    overrides = [r for r in pulls if "override actor=dr-li" in (r.detail or "")]
    assert overrides and all(r.outcome == "success" for r in overrides)
    assert all("unconscious" not in (r.detail or "") for r in pulls)
    received = entries(site.root / PLATFORM / "bridge.sqlite", "record.pull.receive")
    assert [r for r in received if (r.detail or "").endswith("override")]

    code, status, _ = await bridge_cli("status", "--config", str(site.hospital_cfg))
    assert code == 1
    line = next(x for x in status.splitlines() if "override" in x and "review" in x)
    assert "dr-li" in line
    item = line.split("review ")[1].split(":")[0]
    code, listing, _ = await bridge_cli("records", "review", "--config", str(site.hospital_cfg))
    assert "unconscious on arrival" in listing
    code, out, err = await bridge_cli("records", "review", "--config", str(site.hospital_cfg),
                                      "--done", item)
    assert code == 0, (out, err, item)
    code, status, _ = await bridge_cli("status", "--config", str(site.hospital_cfg))
    assert code == 0 and "review" not in status, status


async def test_a_link_that_does_not_allow_overrides_refuses_them(tmp_path: Path) -> None:
    site = await start_site(tmp_path, override=False)
    try:
        records = person_records(1)
        await keep(site, records)
        system, value = id_card(records[0])
        code, _, stderr = await bridge_cli(
            "pull", "--config", str(site.platform_cfg), "--link", FROM_LINK,
            "--patient", f"{system}|{value}", "--emergency-actor", "dr-li",
            "--emergency-reason", "unconscious")
        assert code == 1 and "policy-denied at X-Purpose-Of-Use" in stderr
        rejects = entries(site.root / HOSPITAL / "bridge.sqlite", "pull.reject")
        assert rejects[-1].detail == "policy-denied@X-Purpose-Of-Use"
    finally:
        await site.stop()


async def test_records_from_mllp_push_and_import_are_pulled(site: PullSite, tmp_path: Path) -> None:
    stay, lab, second, second_lab = person_records(2)
    c = site.controller
    await c.put_consent(pull_consent(stay))
    # A DE record the HL7 listener stored with its ACK (the listener's own tests cover
    # how it gets there): indexed in the background and before each answer.
    record = orjson.dumps(stay, option=orjson.OPT_SORT_KEYS)
    c.store.hl7_accept(
        sender="HIS", control_id="MSG0001", digest="sha256:" + hashlib.sha256(record).hexdigest(),
        message=b"MSH|^~\\&|HIS", record=record,
        audit=AuditRecord(time=datetime.now(UTC), actor=HOSPITAL, action="hl7.accept",
                          subject="MSG0001"),
        make_ack=lambda entry: b"MSA|AA|MSG0001", now=datetime.now(UTC),
    )
    await c.put_consent(pull_consent(stay, consent_id="claim-1", purposes=("HPAYMT",),
                                     recipient=INSURER))
    await site.hospital.submit(second, "claims-to-insurer-b")  # bridge push keeps it too
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "lab-1.json").write_bytes(orjson.dumps(lab))
    (folder / "lab-2.json").write_bytes(orjson.dumps(second_lab))
    (folder / "broken.json").write_bytes(b'{"dataset": "WS445.10", "elements": {"HDSD00.11.048": 1')
    code, out, err = await bridge_cli("records", "import", "--config", str(site.hospital_cfg),
                                      str(folder))
    assert code == 2 and "2 records kept" in out and "broken.json" in err
    system, value = id_card(stay)
    from fhirpy import AsyncFHIRClient

    client = AsyncFHIRClient(site.base, aiohttp_config={"ssl": site.ssl()})
    (patient,) = await client.resources("Patient").search(identifier=f"{system}|{value}").fetch_all()
    encounters = await client.resources("Encounter").search(patient=patient["id"]).fetch_all()
    reports = await client.resources("DiagnosticReport").search(patient=patient["id"]).fetch_all()
    assert len(encounters) == 4 and len(reports) == 2


async def test_records_imported_in_any_order_are_pulled_as_one_patient(
    site: PullSite, tmp_path: Path
) -> None:
    # The second stay (ID card), then a lab report naming the first stay by inpatient
    # number only, then the first stay stating both: each imported by its own `bridge
    # records import` process while the hospital serves, then pulled over mutual TLS.
    # The lab report's person must join the patient found by the ID card.
    stay, lab, second, _ = person_records(2)
    await site.controller.put_consent(pull_consent(stay))
    for i, record in enumerate((second, lab, stay)):
        folder = tmp_path / f"export-{i}"
        folder.mkdir()
        (folder / "record.json").write_bytes(orjson.dumps(record))
        code, out, err = await bridge_cli("records", "import", "--config",
                                          str(site.hospital_cfg), str(folder))
        assert code == 0 and "1 records kept" in out, (out, err)
    system, value = id_card(stay)
    from fhirpy import AsyncFHIRClient

    client = AsyncFHIRClient(site.base, aiohttp_config={"ssl": site.ssl()})
    (patient,) = await client.resources("Patient").search(identifier=f"{system}|{value}").fetch_all()
    encounters = await client.resources("Encounter").search(patient=patient["id"]).fetch_all()
    reports = await client.resources("DiagnosticReport").search(patient=patient["id"]).fetch_all()
    assert (len(encounters), len(reports)) == (3, 1)


async def test_a_page_naming_a_member_twice_is_refused_and_not_kept(
    site: PullSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No signature covers Bundle.signature. A page written with `who` twice, the first
    # carrying a display, verifies under a parser that keeps the last; kept as it came,
    # its bytes would say, to a parser that keeps the first, what the hospital never
    # signed. The platform (`bridge pull`, its own process) must refuse such a page.
    from bridge.link import pull as source

    real_dumps = source.orjson.dumps

    def twice_named_who(value: Any, *args: Any, **kw: Any) -> bytes:
        body: bytes = real_dumps(value, *args, **kw)
        if isinstance(value, dict) and value.get("type") == "searchset":
            who = real_dumps(value["signature"]["who"])
            forged = real_dumps({**value["signature"]["who"], "display": "NOT SIGNED"})
            body = body.replace(b'"who":' + who, b'"who":' + forged + b',"who":' + who, 1)
        return body

    # The pull source writes its answers with orjson.dumps and nothing else of orjson.
    monkeypatch.setattr(source, "orjson", SimpleNamespace(dumps=twice_named_who))
    records = person_records(1)
    await keep(site, records)
    await site.controller.put_consent(pull_consent(records[0]))
    system, value = id_card(records[0])
    code, _, stderr = await bridge_cli("pull", "--config", str(site.platform_cfg), "--link",
                                       FROM_LINK, "--patient", f"{system}|{value}")
    assert code == 1 and "parse-error" in stderr and "Traceback" not in stderr
    refused = entries(site.root / PLATFORM / "bridge.sqlite", "record.pull.receive")
    assert [r.outcome for r in refused] == ["denied"]
    with SQLiteStore(site.root / PLATFORM / "bridge.sqlite") as store:
        from bridge.ledger.records import received_pages

        assert received_pages(store) == []
