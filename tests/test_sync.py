"""Sync tracking between two real bridges: sequences on the wire, gaps at the receiver,
the signed "what do you hold" answer, and reconciliation after the receiver lost claims
to a restore from backup."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import LINK_OUT, client_ssl, consent_for, make_workdir

from bridge.cli import main
from bridge.config import load_config
from bridge.demo import HOSPITAL
from bridge.ledger.backup import backup_store, restore_store
from bridge.ledger.sync import inbound_streams
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.link.sync import ask_held, reconcile
from bridge.samples import inpatient_records


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(10, seed=61)


def inbox_ids(store: Path) -> set[str]:
    con = sqlite3.connect(store)
    try:
        return {r[0] for r in con.execute("SELECT message_id FROM inbox")}
    finally:
        con.close()


async def start(config: Path) -> BridgeService:
    service = BridgeService(Controller(load_config(config)), poll_interval=0.05)
    await service.start()
    return service


async def submit(hospital: BridgeService, records: list[dict[str, Any]], first: int) -> list[str]:
    ids = []
    for i, record in enumerate(records):
        await hospital.controller.put_consent(consent_for(record, consent_id=f"s-{first + i}"))
        ids.append((await hospital.submit(record, LINK_OUT)).message_id)
    return ids


async def all_acked(hospital: BridgeService, ids: list[str], timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        rows = [await hospital.controller.db.get_outbox(m) for m in ids]
        if all(r is not None and r.state == "acked" for r in rows):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("claims not acknowledged")


async def test_reconcile_refills_what_a_restored_receiver_lost(
    tmp_path: Path, records: list, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    held = Path(insurer.controller.config.store.path)
    try:
        first = await submit(hospital, records[:4], 0)
        await all_acked(hospital, first)
        [stream] = await insurer.controller.db.call(inbound_streams, insurer.controller.store)
        assert (stream.sender, stream.stream, stream.received, stream.gaps) == (
            HOSPITAL,
            LINK_OUT,
            4,
            (),
        )

        # The insurer's backup, then six more claims it acknowledges, then the insurer
        # is restored from that backup: the six are acknowledged at the hospital and
        # gone at the insurer.
        await insurer.stop()
        backup_store(load_config(insurer_cfg), tmp_path / "backup")
        insurer = await start(insurer_cfg)
        later = await submit(hospital, records[4:], 4)
        await all_acked(hospital, later)
        await insurer.stop()
        restore_store(load_config(insurer_cfg), tmp_path / "backup")
        assert inbox_ids(held) == set(first)
        insurer = await start(insurer_cfg)

        # A claim sent now arrives as seq 11: the insurer sees seqs 5-10 missing.
        extra = await submit(hospital, [inpatient_records(11, seed=62)[10]], 10)
        await all_acked(hospital, extra)
        capsys.readouterr()
        assert main(["sync", "status", "--config", str(insurer_cfg)]) == 1
        out = capsys.readouterr().out
        assert f"← {HOSPITAL} stream {LINK_OUT}: received 5, up to seq 11" in out
        assert "MISSING 6 (seq 5-10)" in out

        report = await reconcile(hospital.dispatchers[LINK_OUT])
        # The insurer's signed summary holds 1-4 without a gap: 5-11 are compared.
        assert report.compared == 7
        assert sorted(report.missing) == [5, 6, 7, 8, 9, 10] and report.resent == 6
        # The hospital's receipts for those six name audit entries the insurer no longer
        # holds (they were restored away); they are reported.
        assert sorted(report.mismatched) == [5, 6, 7, 8, 9, 10]
        assert report.confirmed_seq == 11
        assert inbox_ids(held) == set(first + later + extra)

        # Nothing is processed twice: a second pass finds nothing to resend.
        assert (await reconcile(hospital.dispatchers[LINK_OUT])).compared == 0
        again = await reconcile(hospital.dispatchers[LINK_OUT], full=True)
        assert again.compared == 11
        assert again.missing == [] and again.resent == 0 and again.confirmed_seq == 11
        # The resent claims got new receipts at the insurer; the hospital keeps the
        # first ones as evidence, so they are still reported as naming other entries.
        assert sorted(again.mismatched) == [5, 6, 7, 8, 9, 10]

        assert main(["sync", "status", "--config", str(insurer_cfg), "--json"]) == 0
        [stream_json] = json.loads(capsys.readouterr().out)["inbound"]
        assert stream_json["missing"] == 0 and stream_json["contiguous"] == 11
        assert main(["sync", "status", "--config", str(hospital_cfg), "--json"]) == 1
        [out_json] = json.loads(capsys.readouterr().out)["outbound"]
        assert (out_json["enqueued"], out_json["acked"], out_json["acked_contiguous"]) == (
            11,
            11,
            11,
        )
        assert out_json["partner_summary"]["confirmed_seq"] == 11
        assert out_json["partner_summary"]["receipts_naming_absent_audit_entries"] == 6
    finally:
        await hospital.stop()
        await insurer.stop()


async def test_the_held_answer_is_signed_for_the_question_asked(
    tmp_path: Path, records: list
) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    try:
        ids = await submit(hospital, records[:2], 0)
        await all_acked(hospital, ids)
        stranger = f"urn:uuid:{uuid.uuid4()}"
        found, contiguous = await ask_held(hospital.dispatchers[LINK_OUT], 1, 3, [*ids, stranger])
        assert set(found) == set(ids) and contiguous == 2

        # Asked outside the protocol: a clear 400 naming the parameter.
        url = f"https://127.0.0.1:{insurer.port}/fhir/$sync-held"
        ctx = client_ssl(tmp_path, HOSPITAL)
        bad = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "stream", "valueString": LINK_OUT},
                {"name": "from", "valueInteger": 3},
                {"name": "to", "valueInteger": 1},
            ],
        }
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url,
                data=orjson.dumps(bad),
                ssl=ctx,
                headers={
                    "Content-Type": "application/fhir+json",
                    "X-Correlation-Id": f"urn:uuid:{uuid.uuid4()}",
                },
            ) as resp:
                assert resp.status == 400
                outcome = await resp.json(content_type=None)
                assert outcome["issue"][0]["expression"] == ["Parameters.from"]
            # A claim whose sequence header is malformed is refused naming the header.
            async with session.post(
                f"https://127.0.0.1:{insurer.port}/fhir/$process-message",
                data=b"{}",
                ssl=ctx,
                headers={
                    "Content-Type": "application/fhir+json",
                    "Bridge-Stream": LINK_OUT,
                    "Bridge-Sequence": "-4",
                },
            ) as resp:
                assert resp.status == 400
                outcome = await resp.json(content_type=None)
                assert outcome["issue"][0]["expression"] == ["Bridge-Sequence"]
    finally:
        await hospital.stop()
        await insurer.stop()


async def test_a_restored_sender_reconciles_its_links_after_the_restore(
    tmp_path: Path, records: list
) -> None:
    """``bridge store restore`` runs reconciliation for every outbound link: the claims
    the restored outbox no longer shows as acknowledged are compared with what the
    partner holds, and the restore is marked reconciled."""
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    insurer = await start(insurer_cfg)
    hospital = await start(hospital_cfg)
    try:
        ids = await submit(hospital, records[:3], 0)
        await all_acked(hospital, ids)
        await hospital.stop()
        backup_store(load_config(hospital_cfg), tmp_path / "backup")
        done = await asyncio.to_thread(
            restore_store, load_config(hospital_cfg), tmp_path / "backup"
        )
        [line] = done.hooks
        assert line.startswith(f"reconciliation: {LINK_OUT}: compared 3, resent 0")
        from bridge.ledger import open_store
        from bridge.ledger.compliance import pending_restores

        with open_store(load_config(hospital_cfg).store) as store:
            assert pending_restores(store) == []
            actions = [e.record.action for e in store.audit_entries()]
        assert actions[-3:] == ["store.restore", "sync.reconcile", "sync.reconciled"]
    finally:
        await insurer.stop()


async def test_a_peer_from_the_protocol_sends_with_and_without_sequence_headers(
    tmp_path: Path,
) -> None:
    """P-SYNC-1/2/3 from outside: the conformance peer (which shares no code with the
    bridge) sends a version 1.1 claim without headers, one with a stream and number, and
    one with half a pair."""
    from e2e_support import start_pair
    from peer_support import call, make_peer

    pair = await start_pair(tmp_path, start_dispatch=False)
    try:
        peer = make_peer(pair)
        plain = await call(peer.send, peer.signed_claim())
        assert plain.response.status == 200 and plain.receipt is not None
        numbered = await call(
            peer.send,
            peer.signed_claim(),
            headers={"Bridge-Stream": "peer-link", "Bridge-Sequence": "7"},
        )
        assert numbered.response.status == 200 and numbered.receipt is not None
        half = await call(peer.send, peer.signed_claim(), headers={"Bridge-Stream": "peer-link"})
        assert half.response.status == 400
        assert half.outcome is not None
        assert half.outcome.code == "sync-invalid"
        assert half.outcome.expression == ("Bridge-Sequence",)
        [stream] = await pair.insurer.controller.db.call(
            inbound_streams, pair.insurer.controller.store
        )
        assert (stream.stream, stream.highest, stream.gaps) == ("peer-link", 7, ((1, 6),))
    finally:
        await pair.stop()


def test_sequence_headers_are_read_strictly() -> None:
    from bridge.link.sync import SyncError, read_sequence

    assert read_sequence({}) is None
    assert read_sequence({"Bridge-Stream": "claims-to-b", "Bridge-Sequence": "12"}) == (
        "claims-to-b",
        12,
    )
    for stream, seq, where in [
        ("claims-to-b", "²", "Bridge-Sequence"),  # a digit, but not an ASCII one
        ("claims-to-b", "0", "Bridge-Sequence"),
        ("claims-to-b", str(2**62), "Bridge-Sequence"),
        ("Claims To B", "1", "Bridge-Stream"),
        (None, "1", "Bridge-Stream"),
    ]:
        headers = {"Bridge-Sequence": seq} | ({"Bridge-Stream": stream} if stream else {})
        with pytest.raises(SyncError) as info:
            read_sequence(headers)
        assert info.value.location == where
