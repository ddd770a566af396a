"""End to end over real sockets: HIS -> MLLP over TLS -> hospital bridge (routing, visit
assembly) -> mutual TLS -> insurer bridge's inbox.

The HIS is a plain asyncio client presenting the hospital's own certificate; the two
bridges are real (in-process services, or a ``bridge serve`` subprocess killed with
SIGKILL); what arrives is read from the insurer's store.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hl7_feeds import Charge, InpatientVisit, OutpatientVisit, standard_charges
from intake_support import (
    CLAIMS_ROUTE,
    IntakePair,
    after_header,
    consent,
    err,
    eventually,
    mllp_exchange,
    msa,
    start_intake_pair,
)

from bridge.cli import main
from bridge.config import load_config
from bridge.demo import LINK_OUT, free_port
from bridge.ledger import intake as intake_db
from bridge.link.node import Controller
from bridge.link.service import BridgeService

ROOT = Path(__file__).parents[1]


def claims_at(pair: IntakePair) -> list[dict[str, Any]]:
    store = pair.insurer.controller.store
    with store.read("inbox") as tx:
        return [orjson.loads(bytes(p)) for (p,) in tx.all("SELECT payload FROM inbox")]


def claim_of(message: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in message["entry"]
                if e["resource"]["resourceType"] == "Claim")


def validate_r4(tmp_path: Path, bundles: list[dict[str, Any]]) -> list[Any]:
    node = shutil.which("node")
    assert node is not None, "node is required (Node.js 20) for the R4 validator"
    files = []
    for i, bundle in enumerate(bundles):
        path = tmp_path / f"claim-{i}.json"
        path.write_text(json.dumps(bundle, ensure_ascii=False), encoding="utf-8")
        files.append(str(path))
    run = subprocess.run([node, str(ROOT / "tools" / "validate-fhir-r4.js"), *files],
                         capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(run.stdout)
    return [(Path(r["file"]).name, m) for r in report["results"] for m in r["messages"]
            if m["severity"] in ("error", "fatal")]


async def test_a_stay_sent_over_mllp_arrives_at_the_insurer_as_one_claim(tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        credit = [Charge("13", "-60.50", kind="CD")]
        sequence = [visit.a01(), visit.dft("D1", standard_charges()),
                    visit.dft("D2", credit, ts="20260308120000"), visit.a03()]
        acks = await pair.send(sequence)
        assert [msa(a)[1] for a in acks] == ["AA"] * 4
        # The HIS resends what it did not see acknowledged: nothing changes.
        again = await pair.send([visit.a03(), visit.dft("D2", credit, ts="20260308120000")])
        assert again == [acks[3], acks[2]]
        await eventually(lambda: len(claims_at(pair)) == 1)
        await asyncio.sleep(0.5)
        [message] = claims_at(pair)
        claim = claim_of(message)
        assert claim["total"] == {"value": 21480.0, "currency": "CNY"}
        assert "related" not in claim
        assert validate_r4(tmp_path, [message]) == []
        [record] = [r for r in intake_db.list_records(pair.hospital.controller.store)
                    if r.kind == "visit"]
        assert record.state == "routed"
        [delivery] = intake_db.deliveries(pair.hospital.controller.store, record.id)
        assert delivery.message_id == message["identifier"]["value"]
    finally:
        await pair.stop()


def _front_sheet(pair: IntakePair) -> dict[str, Any]:
    store = pair.hospital.controller.store
    [record] = [r for r in intake_db.list_records(store) if r.kind == "visit"]
    return dict(orjson.loads(intake_db.record_of(store, record.id) or b"{}"))


async def test_a_dft_resent_under_a_new_control_id_is_counted_once(tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        charges = standard_charges()  # 21540.50 in FT1-2 D1-1 ... D1-8
        # The HIS's resend button: the same DFT under a new MSH-10, FT1-2 unchanged.
        resent = visit.dft("D1R", charges, transactions="D1")
        acks = await pair.send([visit.a01(), visit.dft("D1", charges), resent, visit.a03()])
        assert [msa(a)[1] for a in acks] == ["AA"] * 4
        await eventually(lambda: len(claims_at(pair)) == 1)
        await asyncio.sleep(0.5)
        [message] = claims_at(pair)
        assert claim_of(message)["total"] == {"value": 21540.5, "currency": "CNY"}
        assert _front_sheet(pair)["elements"]["HDSD00.11.142"] == "21540.50"  # 住院总费用
    finally:
        await pair.stop()


async def test_a_credit_under_the_charges_id_subtracts_and_a_changed_resend_is_refused(
        tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        # A credit reversing the bed fee (FT1-2 D1-1) under the charge's own id.
        credit = visit.dft("D2", [Charge("01", "300.00", kind="CD")], ts="20260306120000",
                           transactions="D1")
        # The bed fee's transaction again, saying another amount.
        changed = visit.dft("D3", [Charge("01", "360.00")], ts="20260307120000",
                            transactions="D1")
        # The same transaction twice in one message, once changed.
        twice = visit.dft("D4", [Charge("02", "1.00"), Charge("02", "2.00")],
                          ts="20260307130000").replace(b"|D4-2|", b"|D4-1|")
        acks = await pair.send([visit.a01(), visit.dft("D1", standard_charges()), credit,
                                changed, twice, visit.a03()])
        assert [msa(a)[1] for a in acks] == ["AA", "AA", "AA", "AE", "AE", "AA"]
        assert [(err(a)[2], err(a)[3].split("^")[0]) for a in acks[3:5]] == [
            ("FT1^1^2^1", "205"), ("FT1^2^2^1", "205")]
        # The amount is not echoed (the ACK's own MSH-7 time may hold any digits).
        assert all("FT1-2" in err(a)[8] and "360" not in after_header(a) for a in acks[3:5])
        await eventually(lambda: len(claims_at(pair)) == 1)
        await asyncio.sleep(0.5)
        [message] = claims_at(pair)
        assert claim_of(message)["total"] == {"value": 21240.5, "currency": "CNY"}
        assert _front_sheet(pair)["elements"]["HDSD00.11.147"] == "0.00"  # 一般医疗服务费, credited
        [row] = intake_db.list_visits(pair.hospital.controller.store)
        assert row.parts == 4  # the refused DFTs left nothing behind
    finally:
        await pair.stop()


def _errs(ack: bytes) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().split("\r") if s.startswith("ERR|")]


async def test_a_copy_of_a_counted_transaction_is_answered_with_a_warning_and_a_changed_one_refused(
        tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        # The bed fee (FT1-2 D1-1, 300.00) is credited 100.00 under its own id, then two
        # more credits are sent under the same id: 100.00 (a copy of the first, as the
        # HIS's resend would be) and 50.00 (another transaction needing its own FT1-2).
        credits = [visit.dft(cid, [Charge("01", amount, kind="CD")], ts=ts, transactions="D1")
                   for cid, amount, ts in (("D2", "100.00", "20260306120000"),
                                           ("D3", "100.00", "20260307120000"),
                                           ("D4", "50.00", "20260307130000"))]
        # Its own FT1-2: counted.
        own = visit.dft("D5", [Charge("01", "50.00", kind="CD")], ts="20260307140000")
        acks = await pair.send([visit.a01(), visit.dft("D1", standard_charges()), *credits,
                                own, visit.a03()])
        assert [msa(a)[1] for a in acks] == ["AA", "AA", "AA", "AA", "AE", "AA", "AA"]
        assert _errs(acks[2]) == [] and _errs(acks[5]) == []
        [warning] = _errs(acks[3])
        assert (warning[2], warning[3].split("^")[0], warning[4], warning[7]) == (
            "FT1^1^2^1", "205", "W", "transaction-counted")
        assert "already counted" in warning[8] and "its own FT1-2" in warning[8]
        assert (err(acks[4])[2], err(acks[4])[3].split("^")[0]) == ("FT1^1^2^1", "205")
        assert "each transaction needs its own FT1-2" in err(acks[4])[8]
        [stored] = intake_db.warnings_of(pair.hospital.controller.store,
                                         f"HIS|{visit.facility}", "D3")
        assert stored.startswith("FT1[1]-2 205 transaction-counted: ")
        await eventually(lambda: len(claims_at(pair)) == 1)
        await asyncio.sleep(0.5)
        [message] = claims_at(pair)
        assert claim_of(message)["total"] == {"value": 21390.5, "currency": "CNY"}
        assert _front_sheet(pair)["elements"]["HDSD00.11.147"] == "150.00"  # 一般医疗服务费
    finally:
        await pair.stop()


async def test_a_copy_repeated_within_one_dft_is_counted_once_with_a_warning(
        tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        twice = visit.dft("D2", [Charge("02", "1.00"), Charge("02", "1.00")],
                          ts="20260306120000").replace(b"|D2-2|", b"|D2-1|")
        acks = await pair.send([visit.a01(), twice])
        assert [msa(a)[1] for a in acks] == ["AA", "AA"]
        [warning] = _errs(acks[1])
        assert (warning[2], warning[4], warning[7]) == ("FT1^2^2^1", "W", "transaction-counted")
    finally:
        await pair.stop()


def _as_filed_before_transactions(pair: IntakePair) -> None:
    """Rewrite the store's visits as the version without transaction ids filed them:
    every FT1 summed in the part's ``fees``, no ``charges`` in parts or summaries."""
    store = pair.hospital.controller.store
    with store.transaction("legacy") as tx:
        for visit_id, sender, control_id, sealed in tx.all(
                "SELECT visit_id, sender, control_id, part FROM visit_part"):
            part = orjson.loads(tx.unseal(sealed, context="visit_part.part") or b"")
            fees = {e: Decimal(v) for e, v in part["fees"].items()}
            for charge in part.pop("charges"):
                for row in charge["rows"]:
                    fees[row] = fees.get(row, Decimal(0)) + Decimal(charge["amount"])
            part["fees"] = {e: format(v.quantize(Decimal("0.01")), "f")
                            for e, v in fees.items()}
            tx.execute("UPDATE visit_part SET part=? WHERE visit_id=? AND sender=? AND"
                       " control_id=?", (tx.seal(orjson.dumps(part), context="visit_part.part"),
                                         visit_id, sender, control_id))
        for visit_id, sealed in tx.all("SELECT id, summary FROM visit"):
            summary = orjson.loads(tx.unseal(sealed, context="visit.summary") or b"")
            del summary["charges"]
            tx.execute("UPDATE visit SET summary=? WHERE id=?",
                       (tx.seal(orjson.dumps(summary), context="visit.summary"), visit_id))


async def test_a_stay_filed_before_transaction_ids_counts_a_dft_resent_after_once(
        tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        acks = await pair.send([visit.a01(), visit.dft("D1", standard_charges())])
        assert [msa(a)[1] for a in acks] == ["AA", "AA"]
        _as_filed_before_transactions(pair)
        # The HIS's resend button after the upgrade: FT1-2 D1-1 ... D1-8 again, and a
        # changed copy of one of them.
        resent = visit.dft("D1R", standard_charges(), transactions="D1")
        changed = visit.dft("D3", [Charge("01", "360.00")], ts="20260307120000",
                            transactions="D1")
        acks = await pair.send([resent, changed, visit.a03()])
        assert [msa(a)[1] for a in acks] == ["AA", "AE", "AA"]
        assert (err(acks[1])[2], err(acks[1])[3].split("^")[0]) == ("FT1^1^2^1", "205")
        await eventually(lambda: len(claims_at(pair)) == 1)
        await asyncio.sleep(0.5)
        [message] = claims_at(pair)
        assert claim_of(message)["total"] == {"value": 21540.5, "currency": "CNY"}
        assert _front_sheet(pair)["elements"]["HDSD00.11.142"] == "21540.50"  # 住院总费用
        assert [w[7] for w in _errs(acks[0])] == ["transaction-counted"] * 8
    finally:
        await pair.stop()


async def test_a_correction_after_discharge_is_a_new_claim_naming_the_one_it_replaces(
        tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        await pair.send([visit.a01(), visit.dft("D1", standard_charges()), visit.a03()])
        await eventually(lambda: len(claims_at(pair)) == 1)
        first = claims_at(pair)[0]
        update = visit.a08("U1", "20260310090000", family="李", discharged=True)
        visit.family = "李"  # the HIS's later messages carry the corrected name
        acks = await pair.send([
            update, visit.dft("D9", [Charge("13", "-100.00", kind="CD")], ts="20260311080000")])
        assert [msa(a)[1] for a in acks] == ["AA", "AA"]
        await eventually(lambda: len(claims_at(pair)) >= 2)
        await asyncio.sleep(0.5)
        messages = claims_at(pair)
        by_id = {m["identifier"]["value"]: m for m in messages}
        chain = [first["identifier"]["value"]]
        while True:  # follow Claim.related from the first claim to the latest
            successors = [m for m in messages if any(
                r["claim"]["identifier"]["value"] == chain[-1]
                for r in claim_of(m).get("related", []))]
            if not successors:
                break
            assert len(successors) == 1
            chain.append(successors[0]["identifier"]["value"])
        assert len(chain) == len(messages) >= 2
        latest = claim_of(by_id[chain[-1]])
        assert latest["related"][0]["relationship"]["coding"][0]["code"] == "prior"
        assert latest["total"]["value"] == claim_of(first)["total"]["value"] - 100
        patient = next(e["resource"] for e in by_id[chain[-1]]["entry"]
                       if e["resource"]["resourceType"] == "Patient")
        assert patient["name"][0]["text"] == "李建国"
        assert validate_r4(tmp_path, messages) == []
    finally:
        await pair.stop()


async def test_bad_input_gets_precise_acks_is_audited_and_leaves_no_half_visit(
        tmp_path: Path) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        await pair.send([visit.a01(), visit.a03()])
        store = pair.hospital.controller.store
        [before] = intake_db.list_visits(store)
        no_number = InpatientVisit(pid3_visit_code="XX").dft("BAD-1", [Charge("01", "1.00")])
        no_number = no_number.replace(f"|{visit.visit}|01|".encode(), b"||01|")
        early = InpatientVisit(admitted="20260201080000", discharged="20260205080000")
        closed = visit.dft("BAD-3", [Charge("01", "1.00")], ts="20260601080000")
        other = InpatientVisit(mrn="BA7777777").dft("BAD-4", [Charge("01", "1.00")])
        changed = visit.a01().replace(b"I21.000^", b"I22.000^")  # same MSH-10, other content
        acks = await pair.send([no_number, early.a03("BAD-2"), closed, other, changed])
        answers = [(msa(a)[1], err(a)[2], err(a)[3].split("^")[0]) for a in acks]
        assert answers == [("AE", "PID^1^3^1^1", "101"), ("AE", "PV1^1^45^1", "102"),
                           ("AE", "MSH^1^7^1", "102"), ("AE", "PID^1^3^3^1", "204"),
                           ("AE", "MSH^1^10^1", "205")]
        texts = [err(a)[8] for a in acks]
        assert "HDSD00.11.140 住院号" in texts[0] and "HDSD00.11.019" in texts[1]
        assert "HDSD00.11.006 病案号" in texts[3]
        assert not any("BA7777777" in a.decode() or "20260201" in a.decode() for a in acks)
        rejects = [e.record for e in store.audit_entries() if e.record.action == "hl7.reject"]
        assert len(rejects) == 5
        [after] = intake_db.list_visits(store)
        assert after.parts == before.parts == 2
        assert store.hl7_count() == 2
    finally:
        await pair.stop()


async def test_a_registration_is_held_until_the_visit_ends(tmp_path: Path) -> None:
    routes = f'''
[[routes]]
dataset = ["WS445.2"]
links = ["{LINK_OUT}"]
'''
    pair = await start_intake_pair(tmp_path, routes=routes)
    try:
        visit = OutpatientVisit()
        [ack] = await pair.send([visit.registration()])
        assert msa(ack)[1] == "AA"
        store = pair.hospital.controller.store
        [record] = intake_db.list_records(store)
        assert record.state == "held" and record.dataset == "WS445.2"
        await pair.send([visit.end()])
        # Routed under the message that ended the visit; the link refuses it (no consent
        # names this patient's outpatient number), and the refusal is kept and said.
        await eventually(lambda: intake_db.list_records(store)[0].state == "refused")
        [record] = intake_db.list_records(store)
        assert record.message_type == "ADT^A08"
        assert record.detail == f"{LINK_OUT}: consent-denied"
    finally:
        await pair.stop()


async def test_records_no_rule_matches_are_kept_and_listed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = await start_intake_pair(tmp_path, routes="")
    try:
        visit = InpatientVisit()
        await pair.send([visit.a01(), visit.dft("D1", standard_charges()), visit.a03()])
        store = pair.hospital.controller.store
        await eventually(lambda: all(r.state == "unrouted" for r in intake_db.list_records(store)))
        config = str(pair.hospital.controller.config.source)
        assert main(["intake", "list", "--config", config, "--state", "unrouted", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert sorted(r["dataset"] for r in listed["records"]) == ["WS445.10", "WS445.12",
                                                                    "WS445.15"]
        assert listed["counts"] == {"unrouted": 3}
        assert main(["status", "--config", config]) == 0
        assert "intake: unrouted 3" in capsys.readouterr().out
        assert main(["intake", "visits", "--config", config, "--json"]) == 0
        [v] = json.loads(capsys.readouterr().out)
        assert v["number"] == visit.visit and v["parts"] == 3 and v["state"] == "unrouted"
        unrouted = [e for e in store.audit_entries() if e.record.action == "intake.unrouted"]
        assert len(unrouted) == 1
    finally:
        await pair.stop()


async def test_a_refused_visit_is_routed_again_by_an_operator_under_current_consents(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = await start_intake_pair(tmp_path)
    try:
        visit = InpatientVisit()
        acks = await pair.send([visit.a01(), visit.dft("D1", standard_charges()), visit.a03()])
        assert [msa(a)[1] for a in acks] == ["AA"] * 3
        store = pair.hospital.controller.store
        config = str(pair.hospital.controller.config.source)

        def record() -> intake_db.RecordRow:
            [row] = [r for r in intake_db.list_records(store) if r.kind == "visit"]
            return row

        def audited(action: str) -> list[str]:
            return [e.record.subject for e in store.audit_entries() if e.record.action == action]

        await eventually(lambda: record().state == "refused")
        source = record().source
        assert "consent-denied" in (record().detail or "")
        # Deny by default: a retry without a consent is refused again, and audited.
        assert main(["intake", "retry", "--config", config, source]) == 0
        assert source in capsys.readouterr().out
        await eventually(lambda: len(audited("intake.refused")) == 2)
        await eventually(lambda: record().state == "refused")
        # Recording the consent and the HIS resending the discharge (its stored AA comes
        # back) route nothing by themselves.
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        assert await pair.send([visit.a03()]) == [acks[2]]
        await asyncio.sleep(0.5)
        assert record().state == "refused" and claims_at(pair) == []
        assert main(["intake", "retry", "--config", config, "--all-refused", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["retried"] == [
            {"id": record().id, "source": source, "was": "refused"}]
        await eventually(lambda: len(claims_at(pair)) == 1)
        await eventually(lambda: record().state == "routed")
        assert audited("intake.retry") == [source, source]
        assert len(audited("intake.refused")) == 2
        # What cannot be retried is named, and nothing changes.
        assert main(["intake", "retry", "--config", config, source]) == 2
        assert "routed" in capsys.readouterr().err
        assert main(["intake", "retry", "--config", config, "visit:99999", source]) == 2
        assert "no such intake record" in capsys.readouterr().err
        # Digits that are no record number are looked up as a source, not a crash.
        for odd in ("¹", "99999999999999999999999"):
            assert main(["intake", "retry", "--config", config, odd]) == 2
            assert "no such intake record" in capsys.readouterr().err
        assert main(["intake", "retry", "--config", config]) == 2
        assert "--all-refused" in capsys.readouterr().err
        assert audited("intake.retry") == [source, source]
        await asyncio.sleep(0.3)
        assert len(claims_at(pair)) == 1
    finally:
        await pair.stop()


async def test_an_unrouted_record_is_routed_again_after_a_rule_is_added(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair = await start_intake_pair(tmp_path, routes="")
    visit = InpatientVisit()
    try:
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        await pair.send([visit.a01(), visit.dft("D1", standard_charges()), visit.a03()])
        store = pair.hospital.controller.store
        await eventually(lambda: {r.state for r in intake_db.list_records(store)} == {"unrouted"})
    finally:
        await pair.hospital.stop()
    config = Path(pair.hospital.controller.config.source)
    config.write_text(config.read_text(encoding="utf-8") + CLAIMS_ROUTE, encoding="utf-8")
    hospital = BridgeService(Controller(load_config(config)), poll_interval=0.05)
    await hospital.start()
    pair.hospital = hospital
    try:
        assert main(["intake", "retry", "--config", str(config), "--all-unrouted"]) == 0
        assert "3 record(s) put back" in capsys.readouterr().out
        await eventually(lambda: len(claims_at(pair)) == 1)
        store = hospital.controller.store
        await eventually(lambda: sorted(r.state for r in intake_db.list_records(store)) == [
            "routed", "unrouted", "unrouted"])  # only the visit's data set has a rule now
    finally:
        await pair.stop()


async def test_one_record_feeds_every_link_a_rule_names(tmp_path: Path) -> None:
    routes = f'''
[[links]]
id = "claims-copy"
partner = "insurer-b"
direction = "outbound"
profile = "commercial-insurance"
purpose = "HPAYMT"
{CLAIMS_ROUTE}
[[routes]]
id = "copy"
dataset = ["WS445.10"]
links = ["claims-copy", "{LINK_OUT}"]
'''
    pair = await start_intake_pair(tmp_path, routes=routes)
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        await pair.send([visit.a01(), visit.dft("D1", standard_charges()), visit.a03()])
        await eventually(lambda: len(claims_at(pair)) == 2)
        [record] = [r for r in intake_db.list_records(pair.hospital.controller.store)
                    if r.kind == "visit"]
        links = sorted(d.link for d in intake_db.deliveries(pair.hospital.controller.store,
                                                            record.id))
        assert links == ["claims-copy", LINK_OUT]
    finally:
        await pair.stop()


# --- a bridge process killed mid-visit --------------------------------------------------------


async def _serve(config: Path) -> subprocess.Popen[str]:
    proc = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=config.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout=60)
    assert line.startswith("ready "), (line, proc.stderr.read() if proc.poll() else "")
    return proc


@pytest.mark.battery
async def test_a_visit_survives_kill_9_of_the_hospital_bridge(tmp_path: Path) -> None:
    from e2e_support import client_ssl, make_workdir

    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    port = free_port()
    with hospital_cfg.open("a", encoding="utf-8") as fh:
        fh.write(f'\n[mllp]\nhost = "127.0.0.1"\nport = {port}\ntls = true\n{CLAIMS_ROUTE}')
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    visit = InpatientVisit()
    controller = Controller(load_config(hospital_cfg))
    await controller.put_consent(consent(visit.id_card))
    await controller.close()
    his = client_ssl(tmp_path, "hospital-a")
    proc = await _serve(hospital_cfg)
    try:
        acks = await mllp_exchange(port, [visit.a01(), visit.dft("D1", standard_charges())], his)
        assert [msa(a)[1] for a in acks] == ["AA", "AA"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc = await _serve(hospital_cfg)
        acks = await mllp_exchange(port, [visit.dft("D1", standard_charges()), visit.a03()], his)
        assert [msa(a)[1] for a in acks] == ["AA", "AA"]  # the repeat gets its first ACK
        proc.send_signal(signal.SIGKILL)  # perhaps before the claim was routed
        proc.wait(timeout=10)
        proc = await _serve(hospital_cfg)
        store = insurer.controller.store
        await eventually(lambda: store.inbox_count() >= 1, timeout=30)
        await asyncio.sleep(1.0)
        assert store.inbox_count() == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await insurer.stop()


async def test_a_visit_whose_claim_is_larger_than_the_link_sends_is_refused_once(
        tmp_path: Path) -> None:
    # The claim the stay maps to is over the link's max_message_bytes: the visit is
    # refused for that link with the reason, once, and the routing pass goes on; it is
    # not left pending to be tried again after every lease.
    pair = await start_intake_pair(tmp_path, link={"max_message_bytes": 16384})
    try:
        visit = InpatientVisit()
        await pair.hospital.controller.put_consent(consent(visit.id_card))
        extra = "".join(f"\rDG1|{n}||I10.x00^高血压^ICD10||20260309|F|||||||||{n}"
                        for n in range(4, 60))
        a03 = visit.a03().rstrip(b"\r") + extra.encode() + b"\r"
        acks = await pair.send([visit.a01(), visit.dft("D1", standard_charges()), a03])
        assert [msa(a)[1] for a in acks] == ["AA", "AA", "AA"]
        store = pair.hospital.controller.store

        def refused() -> bool:
            return any(r.kind == "visit" and r.state == "refused"
                       for r in intake_db.list_records(store))

        await eventually(refused)
        [record] = [r for r in intake_db.list_records(store) if r.kind == "visit"]
        assert record.detail is not None and "payload-too-large" in record.detail
        [delivery] = intake_db.deliveries(store, record.id)
        assert delivery.state == "refused" and delivery.message_id == ""
        assert claims_at(pair) == []
    finally:
        await pair.stop()
