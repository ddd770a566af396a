"""One patient across identifiers: what the hospital's records state belongs together is
linked, consents and disclosures are found by any of the patient's identifiers, and the
disclosure history comes as BALP-style FHIR R4 AuditEvents."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2e_support import make_workdir

from bridge.cli import main
from bridge.config import load_config
from bridge.link.node import Controller
from bridge.messages import collection_of
from bridge.policy.consent import build_consent
from bridge.samples import inpatient_records

ROOT = Path(__file__).resolve().parents[1]
LINK = "claims-to-insurer-b"
ID_CARD = "urn:oid:2.16.156.10011.1.3"
INPATIENT_NO = "urn:oid:2.16.156.10011.1.12"
RECORD_NO = "urn:oid:2.16.156.10011.1.13"
HEALTH_CARD = "urn:oid:2.16.156.10011.1.19"
ID_DOCUMENT = "urn:ws-fhir-bridge:id-document"


def records() -> tuple[dict[str, Any], dict[str, Any]]:
    """Two stays of one passport holder: the same medical-record number, two inpatient
    numbers, and a health card only on the first."""
    first = next(r for r in inpatient_records(400, seed=21)
                 if r["elements"]["HDSD00.11.049"] == "03" and r["elements"].get("HDSD00.11.053"))
    second = json.loads(json.dumps(first))
    e = second["elements"]
    e["HDSD00.11.140"] = e["HDSD00.11.140"] + "B"
    del e["HDSD00.11.053"]
    e["HDSD00.11.085"] = e["HDSD00.11.085"].replace(e["HDSD00.11.085"][:4], str(int(e["HDSD00.11.085"][:4]) + 1), 1)
    e["HDSD00.11.019"] = e["HDSD00.11.019"].replace(e["HDSD00.11.019"][:4], str(int(e["HDSD00.11.019"][:4]) + 1), 1)
    e["HDSD00.11.127"] = e["HDSD00.11.127"].replace(e["HDSD00.11.127"][:4], str(int(e["HDSD00.11.127"][:4]) + 1), 1)
    for op in second["groups"].get("operations", []):
        op["HDSD00.11.091"] = op["HDSD00.11.091"].replace(op["HDSD00.11.091"][:4], str(int(op["HDSD00.11.091"][:4]) + 1), 1)
    return first, second


def consent_under(system: str, value: str) -> dict[str, Any]:
    from datetime import UTC, date, datetime, timedelta

    today = datetime.now(UTC).date()
    return build_consent(
        consent_id="c-record-no", patient_system=system, patient_value=value,
        recipient="insurer-b", purposes=["HPAYMT"], start=date(2020, 1, 1),
        end=today + timedelta(days=365 * 3), hospital_partner_id="hospital-a",
        sensitive_classes=("malignant", "infectious", "mental", "sexual-reproductive",
                           "genetic", "anal", "rare", "incurable"),
    )


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both stays pushed; the consent recorded under the medical-record number only."""
    root = tmp_path_factory.mktemp("identity")
    hospital_cfg, _ = make_workdir(root)
    first, second = records()
    out: dict[str, Any] = {"cfg": hospital_cfg, "first": first, "second": second}

    async def run() -> None:
        controller = Controller(load_config(hospital_cfg))
        try:
            await controller.put_consent(consent_under(RECORD_NO, first["elements"]["HDSD00.11.006"]))
            out["submitted"] = [await controller.submit(r, LINK) for r in (first, second)]
            row = controller.store.get_outbox(out["submitted"][0].message_id)
            out["payload"] = json.loads(bytes(row.payload))
            # The dispatch recheck asks from the payload, which carries only the passport:
            # the consent recorded under the medical-record number still answers.
            controller.recheck_consent(out["payload"], controller.outbound_link(LINK))
        finally:
            await controller.close()

    asyncio.run(run())
    return out


def test_the_claim_carries_only_the_passport_yet_the_consent_is_found(pushed: dict[str, Any]) -> None:
    patient = next(e["resource"] for e in collection_of(pushed["payload"])["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    assert [i["system"] for i in patient["identifier"]] == [ID_DOCUMENT]
    assert all(s.created for s in pushed["submitted"])


def disclosures(cfg: Path, system: str, value: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["audit", "disclosures", "--config", str(cfg), "--patient", f"{system}|{value}",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_history_is_complete_by_any_identifier(
    pushed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = pushed["first"]["elements"], pushed["second"]["elements"]
    asked = [
        (ID_DOCUMENT, first["HDSD00.11.048"]),
        (INPATIENT_NO, first["HDSD00.11.140"]),
        (INPATIENT_NO, second["HDSD00.11.140"]),
        (RECORD_NO, first["HDSD00.11.006"]),
        (HEALTH_CARD, first["HDSD00.11.053"]),
    ]
    histories = [disclosures(pushed["cfg"], s, v, capsys) for s, v in asked]
    seqs = [sorted(e["seq"] for e in h["entries"]) for h in histories]
    assert all(s == seqs[0] for s in seqs), seqs
    actions = [e["action"] for e in histories[0]["entries"]]
    assert actions.count("claim.enqueue") == 2 and "consent.put" in actions
    subjects = {e["subject"] for e in histories[0]["entries"] if e["action"] == "claim.enqueue"}
    assert subjects == {s.message_id for s in pushed["submitted"]}
    # Someone else's identifier finds nothing of this patient.
    other = disclosures(pushed["cfg"], RECORD_NO, "999999999", capsys)
    assert other["entries"] == [] and other["linked"] == []


def test_the_store_links_pseudonyms_never_identifiers(pushed: dict[str, Any]) -> None:
    config = load_config(pushed["cfg"])
    with sqlite3.connect(config.store.path) as db:
        rows = db.execute("SELECT a, b FROM patient_link").fetchall()
    assert rows
    text = json.dumps(rows)
    for value in (pushed["first"]["elements"][k] for k in
                  ("HDSD00.11.048", "HDSD00.11.140", "HDSD00.11.006", "HDSD00.11.053")):
        assert value not in text
    assert all(a.startswith("pp:") and b.startswith("pp:") for a, b in rows)


def test_disclosures_as_balp_audit_events_are_valid_r4(
    pushed: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = pushed["first"]["elements"]["HDSD00.11.053"]
    assert main(["audit", "disclosures", "--config", str(pushed["cfg"]), "--patient",
                 f"{HEALTH_CARD}|{value}", "--fhir"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    events = [e["resource"] for e in bundle["entry"]]
    enqueues = [e for e in events if e["subtype"][0]["code"] == "claim.enqueue"]
    assert len(enqueues) == 2
    for event in enqueues:
        assert event["type"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
        assert event["type"]["code"] == "110106"  # Export
        roles = {a["type"]["coding"][0]["code"] for a in event["agent"]}
        assert roles == {"110153", "110152"}
        patient = [x for x in event["entity"] if x.get("role", {}).get("code") == "1"]
        assert patient and patient[0]["what"]["identifier"]["value"].startswith("pp:")
    assert value not in json.dumps(bundle)
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(bundle), encoding="utf-8")
    run = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), str(path)],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(run.stdout)
    errors = [m for r in report["results"] for m in r["messages"]
              if m["severity"] in ("error", "fatal")]
    assert errors == []


def test_a_patients_history_and_the_whole_export_describe_an_entry_alike(
    pushed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # One BALP builder: the events of a patient's disclosure history are the very
    # events the whole-log export writes for those entries.
    value = pushed["first"]["elements"]["HDSD00.11.053"]
    assert main(["audit", "disclosures", "--config", str(pushed["cfg"]), "--patient",
                 f"{HEALTH_CARD}|{value}", "--fhir"]) == 0
    history = [e["resource"] for e in json.loads(capsys.readouterr().out)["entry"]]
    assert main(["audit", "export", "--fhir", "--config", str(pushed["cfg"])]) == 0
    exported = {e["resource"]["id"]: e["resource"]
                for e in json.loads(capsys.readouterr().out)["entry"]}
    assert history and all(event == exported[event["id"]] for event in history)


def test_records_imported_for_pull_link_their_identifiers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record kept for record pull states its patient's identifiers together too."""
    from pull_support import write_site

    hospital, _, _ = write_site(tmp_path)
    first, _ = records()
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(first, ensure_ascii=False), encoding="utf-8")
    assert main(["records", "import", "--config", str(hospital), str(folder)]) == 0
    capsys.readouterr()
    e = first["elements"]
    by_card = disclosures(hospital, HEALTH_CARD, e["HDSD00.11.053"], capsys)
    by_record = disclosures(hospital, RECORD_NO, e["HDSD00.11.006"], capsys)
    by_document = disclosures(hospital, ID_DOCUMENT, e["HDSD00.11.048"], capsys)
    assert len(by_card["linked"]) == 3  # passport, inpatient and record numbers
    assert {by_card["patient"], *by_card["linked"]} == {by_record["patient"], *by_record["linked"]} \
        == {by_document["patient"], *by_document["linked"]}
