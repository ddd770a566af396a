"""The hospital's whole path, every party outside the test process but the HIS and the
insurer's claim system:

HIS (HL7 v2 over MLLP on TLS, a plain socket) -> ``bridge serve`` of the hospital (intake,
visit assembly, ``[[routes]]``, consent, signing, outbox) -> mutual TLS -> ``bridge serve``
of the insurer (validation, inbox, receipts) -> the insurer's claim system, both over AMQP
(a RabbitMQ queue read with aio-pika) and over HTTP (a small aiohttp receiver).

What is checked is what each party relies on: the HIS gets AA for what was taken and
AE/AR with an ERR naming segment and field for what was not (and nothing of it is kept);
the claim system gets the HIS's data, element by element, in a message the hospital
signed, with the insurer's receipt beside it; both bridges hold the receipt and an
audit trail that verifies; a correction reaches the claim system as a new claim that
names the one it replaces.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from e2e_support import client_ssl, make_workdir
from handoff_support import (
    ClaimEndpoint,
    QueueConsumer,
    Serve,
    add_destinations,
    delete_queue,
    fast_hospital,
    receipt_extension,
    unique_queue,
    verify_signature,
    wait_for,
)
from hl7_feeds import Charge, InpatientVisit, standard_charges
from intake_support import CLAIMS_ROUTE, consent, err, mllp_exchange, msa

from bridge.config import load_config
from bridge.demo import HOSPITAL, free_port
from bridge.handoff import receipt_digest
from bridge.ledger import Store, open_store
from bridge.ledger import intake as intake_db

ID_CARD = "urn:oid:2.16.156.10011.1.3"
VISIT_NUMBER = "urn:oid:2.16.156.10011.1.12"
RECORD_NUMBER = "urn:oid:2.16.156.10011.1.13"
ORGANIZATION = "urn:oid:2.16.156.10011.1.5"


@pytest.fixture
async def queue_name() -> AsyncIterator[str]:
    name = unique_queue("test-his-path")
    yield name
    await delete_queue(name)


def store_of(config: Path) -> Store:
    """The store a running ``bridge serve`` writes, opened beside it (as the CLI does)."""
    return open_store(load_config(config).store)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def resources(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in message["entry"] if e["resource"]["resourceType"] == kind]


def as_sent_by_the_his(message: dict[str, Any]) -> dict[str, Any]:
    """What the claim says for each element of the front sheet the HIS's messages filled,
    keyed by the element (WS 445.10 id and name) so a difference names it."""
    [patient] = resources(message, "Patient")
    [claim] = resources(message, "Claim")
    [encounter] = resources(message, "Encounter")
    [organization] = resources(message, "Organization")
    ids = {i["system"]: i["value"] for i in patient["identifier"]}
    items = {i["productOrService"]["coding"][0]["code"]: i["net"]["value"]
             for i in claim["item"]}
    return {
        "HDSD00.11.110 姓名 (PID-5)": patient["name"][0]["text"],
        "HDSD00.11.048 患者身份证件号码 (PID-3 NNCHN)": ids.get(ID_CARD),
        "HDSD00.11.006 病案号 (PID-3 MR)": ids.get(RECORD_NUMBER),
        "HDSD00.11.140 住院号 (PID-3 IPN)": [i["value"] for i in claim["identifier"]
                                             if i["system"] == VISIT_NUMBER],
        "HDSD00.11.085 入院日期时间 (PV1-44)": encounter["period"]["start"],
        "HDSD00.11.019 出院日期时间 (PV1-45)": encounter["period"]["end"],
        "HDSD00.11.023 出院诊断-主要诊断疾病编码 (DG1-3, DG1-15 = 1)": sorted(
            c["code"]["coding"][0]["code"] for c in resources(message, "Condition")),
        "HDSD00.11.089 手术及操作编码 (PR1-3)": [
            p["code"]["coding"][0]["code"] for p in resources(message, "Procedure")],
        "HDSD00.11.119 医疗机构组织机构代码 (MSH-4.2)": [
            i["value"] for i in organization["identifier"] if i["system"] == ORGANIZATION],
        "HDSD00.11.147 综合医疗服务类-一般医疗服务费 (FT1-7 = 01)": items.get("HDSD00.11.147"),
        "HDSD00.11.142 住院总费用 (FT1-11, FT1-6 CG/CD)": claim["total"],
    }


def sent(visit: InpatientVisit, total: float) -> dict[str, Any]:
    """The same elements as the HIS wrote them in its HL7 messages (hl7_feeds)."""
    return {
        "HDSD00.11.110 姓名 (PID-5)": visit.family + visit.given,
        "HDSD00.11.048 患者身份证件号码 (PID-3 NNCHN)": visit.id_card,
        # The 病案号 is not in table 9: the commercial-insurance profile keeps it home.
        "HDSD00.11.006 病案号 (PID-3 MR)": None,
        "HDSD00.11.140 住院号 (PID-3 IPN)": [visit.visit],
        "HDSD00.11.085 入院日期时间 (PV1-44)": "2026-03-01T08:30:00+08:00",
        "HDSD00.11.019 出院日期时间 (PV1-45)": "2026-03-09T10:00:00+08:00",
        "HDSD00.11.023 出院诊断-主要诊断疾病编码 (DG1-3, DG1-15 = 1)": [
            "I10.x00", "I21.000", "I21.000"],
        "HDSD00.11.089 手术及操作编码 (PR1-3)": ["36.06"],
        "HDSD00.11.119 医疗机构组织机构代码 (MSH-4.2)": ["47011235-7"],
        "HDSD00.11.147 综合医疗服务类-一般医疗服务费 (FT1-7 = 01)": 300,
        "HDSD00.11.142 住院总费用 (FT1-11, FT1-6 CG/CD)": {"value": total, "currency": "CNY"},
    }


def actions(store: Store, since: int = 0) -> list[tuple[str, str]]:
    return [(e.record.action, e.record.subject) for e in store.audit_entries(since_seq=since)]


async def test_his_feeds_reach_the_insurers_claim_system_through_both_bridge_processes(
        tmp_path: Path, queue_name: str) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    fast_hospital(hospital_cfg)
    mllp_port = free_port()
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[mllp]\nhost = "127.0.0.1"\nport = {mllp_port}\ntls = true\n'
                 f"\n[intake]\n{CLAIMS_ROUTE}")
    endpoint = ClaimEndpoint(free_port())
    add_destinations(insurer_cfg, http_url=endpoint.url, amqp_url="amqp://127.0.0.1:5672/",
                     queue=queue_name)
    visit = InpatientVisit()
    consent_file = tmp_path / "consent.json"
    consent_file.write_text(json.dumps(consent(visit.id_card), ensure_ascii=False),
                            encoding="utf-8")
    added = cli("consent", "add", "--config", str(hospital_cfg), str(consent_file))
    assert added.returncode == 0, added.stderr

    await endpoint.start()
    consumer = QueueConsumer(queue_name)
    await consumer.start()
    insurer = Serve(insurer_cfg, tmp_path / "insurer.log")
    hospital = Serve(hospital_cfg, tmp_path / "hospital.log")
    await insurer.start()
    await hospital.start()
    his = client_ssl(tmp_path, HOSPITAL)  # the HIS presents the hospital's certificate
    try:
        # --- a stay: admission, charges (one a credit), discharge -------------------------
        stay = [visit.a01(), visit.dft("D1", standard_charges()),
                visit.dft("D2", [Charge("13", "-60.50", kind="CD")], ts="20260308120000"),
                visit.a03()]
        acks = await mllp_exchange(mllp_port, stay, his)
        assert [(msa(a)[1], msa(a)[2]) for a in acks] == [
            ("AA", "V1-A01"), ("AA", "D1"), ("AA", "D2"), ("AA", "V1-A03")]
        await wait_for(lambda: len(endpoint.got.ids) == 1 and len(consumer.got.ids) == 1,
                       60, "the claim at the claim system, over HTTP and over AMQP")
        [(sender, first_id)] = list(endpoint.got.first)
        assert sender == HOSPITAL
        over_http = endpoint.got.first[(HOSPITAL, first_id)]
        over_amqp = consumer.got.first[(HOSPITAL, first_id)]
        # One envelope whichever way it went, but for the destination it names.
        assert over_http.pop("destination") == "claims-http"
        assert over_amqp.pop("destination") == "claims-amqp"
        assert over_http == over_amqp
        message = over_http["message"]
        assert message["identifier"]["value"] == first_id
        verify_signature(message, tmp_path / "pki" / HOSPITAL / "sign.pem")
        expected = sent(visit, 21540.50 - 60.50)
        assert as_sent_by_the_his(message) == expected
        [claim] = resources(message, "Claim")
        assert "related" not in claim

        # --- receipts on both sides, and beside the claim ----------------------------------
        hospital_store, insurer_store = store_of(hospital_cfg), store_of(insurer_cfg)
        try:
            await wait_for(lambda: _acked(hospital_store, first_id), 30,
                           "the hospital's outbox to hold the insurer's receipt")
            outbox = hospital_store.get_outbox(first_id)
            assert outbox is not None and outbox.receipt is not None
            receipt = orjson.loads(outbox.receipt)
            assert receipt == over_http["receipt"]  # the receipt the hospital holds
            assert over_http["receiptDigest"] == receipt_digest(outbox.receipt)
            assert receipt_extension(receipt, "urn:ws-fhir-bridge:receipt-outcome") in (
                None, "accepted")
            shown = cli("inbox", "show", first_id, "--config", str(insurer_cfg), "--json")
            assert shown.returncode == 0, shown.stderr
            assert json.dumps(over_http["receipt"], sort_keys=True) in json.dumps(
                json.loads(shown.stdout), sort_keys=True)
            listed = cli("inbox", "list", "--config", str(insurer_cfg), "--json")
            assert listed.returncode == 0, listed.stderr
            states = _handoff_states(json.loads(listed.stdout), first_id)
            assert states == {"claims-amqp": "delivered", "claims-http": "delivered"}

            # --- audit entries on both sides ------------------------------------------------
            await wait_for(lambda: ("claim.ack", first_id) in actions(hospital_store), 30,
                           "the hospital's audit entry for the receipt")
            hospital_audit = actions(hospital_store)
            received = [s.rpartition("/")[2] for a, s in hospital_audit if a == "hl7.receive"]
            assert received == ["V1-A01", "D1", "D2", "V1-A03"]
            assert ("claim.enqueue", first_id) in hospital_audit
            insurer_audit = actions(insurer_store)
            assert ("message.receive", first_id) in insurer_audit
            [receive_entry] = [e for e in insurer_store.audit_entries()
                               if e.record.action == "message.receive"]
            assert over_http["auditSeq"] == receive_entry.seq
            await wait_for(lambda: sorted(a for a, s in actions(insurer_store)
                                          if s == first_id and a == "handoff.delivered")
                           == ["handoff.delivered"] * 2, 30, "hand-off audit entries")
            for config in (hospital_cfg, insurer_cfg):
                verified = cli("audit", "verify", "--config", str(config))
                assert verified.returncode == 0, verified.stdout + verified.stderr

            # --- a correction after discharge: a new claim naming the one it replaces -----
            update = visit.a08("U1", "20260310090000", family="李", discharged=True)
            visit.family = "李"  # the HIS's later messages carry the corrected name
            correction = [update, visit.dft("D9", [Charge("13", "-100.00", kind="CD")],
                                            ts="20260311080000")]
            acks = await mllp_exchange(mllp_port, correction, his)
            assert [msa(a)[1] for a in acks] == ["AA", "AA"]
            await wait_for(lambda: _latest_total(endpoint, first_id) == 21480.0 - 100
                           and consumer.got.ids == endpoint.got.ids,
                           60, "the corrected claim at the claim system")
            chain = _chain(endpoint, first_id)
            latest = endpoint.got.first[(HOSPITAL, chain[-1])]["message"]
            assert as_sent_by_the_his(latest) == sent(visit, 21480.0 - 100)
            [corrected] = resources(latest, "Claim")
            prior = corrected["related"][0]
            assert prior["relationship"]["coding"][0]["code"] == "prior"
            assert prior["claim"]["identifier"]["value"] == chain[-2]
            assert chain[0] == first_id and len(chain) == len(endpoint.got.ids)
            await wait_for(lambda: ("claim.correct", chain[-1]) in actions(hospital_store),
                           30, "the hospital's audit entry for the correction")
            assert endpoint.got.in_order_per_sender() and consumer.got.in_order_per_sender()

            # --- refused feed messages: AE/AR naming segment and field, nothing stored ----
            before = (hospital_store.hl7_count(), intake_db.list_visits(hospital_store),
                      insurer_store.inbox_count(), hospital_store.audit_head()[0])
            other = InpatientVisit(visit="ZY2026000202", mrn="BA0002204", prefix="V2",
                                   pid3_visit_code="XX")
            no_number = other.dft("BAD-1", [Charge("01", "1.00")]).replace(
                f"|{other.visit}|01|".encode(), b"||01|")
            not_production = other.a01("BAD-2").replace(b"|BAD-2|P|2.5|", b"|BAD-2|X|2.5|")
            acks = await mllp_exchange(mllp_port, [no_number, not_production], his)
            answers = [(msa(a)[1], msa(a)[2], err(a)[2], err(a)[3].split("^")[0])
                       for a in acks]
            assert answers == [("AE", "BAD-1", "PID^1^3^1^1", "101"),
                               ("AR", "BAD-2", "MSH^1^11^1", "202")]
            assert "HDSD00.11.140 住院号" in err(acks[0])[8]
            assert not any(other.id_card.encode() in a or other.mrn.encode() in a
                           for a in acks)  # the answers carry no patient data
            await asyncio.sleep(1.0)  # time enough for anything wrongly taken to travel
            assert (hospital_store.hl7_count(), intake_db.list_visits(hospital_store),
                    insurer_store.inbox_count()) == before[:3]
            assert len(endpoint.got.ids) == len(chain) and consumer.got.ids == endpoint.got.ids
            rejects = [s.rpartition("/")[2] for a, s in actions(hospital_store, before[3])
                       if a == "hl7.reject"]
            assert rejects == ["BAD-1", "BAD-2"]
        finally:
            hospital_store.close()
            insurer_store.close()
    finally:
        codes = (hospital.stop(), insurer.stop())
        await consumer.stop()
        await endpoint.stop()
    assert codes == (0, 0)
    for log in ("hospital.log", "insurer.log"):
        text = (tmp_path / log).read_text(encoding="utf-8")
        assert "Traceback" not in text
        for value in (visit.id_card, visit.mrn, "王建国", "李建国"):
            assert value not in text, f"{log} carries a health data value"


def _acked(store: Store, message_id: str) -> bool:
    row = store.get_outbox(message_id)
    return row is not None and row.state == "acked"


def _handoff_states(listed: Any, message_id: str) -> dict[str, str]:
    [row] = [r for r in listed if r["messageId"] == message_id]
    return {h["destination"]: h["state"] for h in row["handoffs"]}


def _chain(endpoint: ClaimEndpoint, first: str) -> list[str]:
    """Message identities from ``first`` along ``Claim.related`` (prior) to the latest."""
    messages = [e["message"] for e in endpoint.got.first.values()]
    chain = [first]
    while True:
        successors = [m["identifier"]["value"] for m in messages
                      for c in resources(m, "Claim") for r in c.get("related", [])
                      if r["claim"]["identifier"]["value"] == chain[-1]]
        if not successors:
            return chain
        assert len(successors) == 1, "two claims replace one"
        chain.append(successors[0])


def _latest_total(endpoint: ClaimEndpoint, first: str) -> float | None:
    if (HOSPITAL, first) not in endpoint.got.first:
        return None
    latest = endpoint.got.first[(HOSPITAL, _chain(endpoint, first)[-1])]["message"]
    [claim] = resources(latest, "Claim")
    return float(claim["total"]["value"])

