"""Two bridges check each other's audit logs over mutual TLS: checkpoints are exchanged,
cosigned only when they extend the last one, and a partner whose store was put back to an
older copy is caught, naming the checkpoint."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from e2e_support import LINK_OUT, Pair, cli, consent_for, start_pair

from bridge.cli import main as cli_main
from bridge.config import load_config
from bridge.ledger import tree
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.link.witness import audit_evidence
from bridge.ops.metrics import ScrapeContext
from bridge.samples import inpatient_records
from bridge.trust.receipts import verify_receipt

FINAL = {"acked", "rejected", "dead", "refused"}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return inpatient_records(12, seed=5)


async def deliver(pair: Pair, records: list[dict[str, Any]], tag: str) -> list[str]:
    ids = []
    for i, record in enumerate(records):
        await pair.hospital.controller.put_consent(consent_for(record, consent_id=f"{tag}-{i}"))
        ids.append((await pair.hospital.submit(record, LINK_OUT)).message_id)
    deadline = asyncio.get_running_loop().time() + 20
    for mid in ids:
        while True:
            row = await pair.hospital.controller.db.get_outbox(mid)
            if row is not None and row.state in FINAL:
                assert row.state == "acked"
                break
            assert asyncio.get_running_loop().time() < deadline, "not delivered in time"
            await asyncio.sleep(0.05)
    return ids


async def restart_insurer(pair: Pair) -> None:
    await pair.insurer.stop()
    pair.insurer = BridgeService(Controller(load_config(pair.insurer_cfg)), poll_interval=0.05)
    await pair.insurer.start()


async def test_checkpoints_are_cosigned_and_a_restored_older_store_is_caught(
        tmp_path: Path, records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    pair = await start_pair(tmp_path)
    try:
        # The insurer learns the hospital's address, so each can fetch the other's checkpoints.
        text = pair.insurer_cfg.read_text(encoding="utf-8")
        url = f"https://127.0.0.1:{pair.hospital.port}/fhir"
        pair.insurer_cfg.write_text(text.replace('id = "hospital-a"\n',
                                                 f'id = "hospital-a"\nbase_url = "{url}"\n', 1),
                                    encoding="utf-8")
        await restart_insurer(pair)
        ids = await deliver(pair, records[:3], "a")
        # The receipt proves the insurer's entry is in a checkpoint the insurer signed.
        row = await pair.hospital.controller.db.get_outbox(ids[-1])
        receipt = verify_receipt(orjson.loads(row.receipt), pair.hospital.controller.keyring,
                                 expected_issuer="insurer-b", expected_audience="hospital-a",
                                 request_message_id=ids[-1], request_digest=None,
                                 now=pair.hospital.controller.clock(), check_time=False)
        assert receipt.checkpoint is not None and receipt.checkpoint.size == receipt.audit_seq

        first = await pair.hospital.witness.run_once()
        assert [(r.partner, r.cosigned, r.fault) for r in first] == [("insurer-b", True, None)]
        back = await pair.insurer.witness.run_once()
        assert [(r.partner, r.cosigned) for r in back] == [("hospital-a", True)]
        # Each side keeps the other's cosignature on its own checkpoint.
        hs = pair.hospital.controller.store
        ins = pair.insurer.controller.store
        assert [c for c, _, _ in tree.cosigned_checkpoints(ins)] == ["hospital-a"]
        assert [c for c, _, _ in tree.cosigned_checkpoints(hs)] == ["insurer-b"]

        # A copy of the insurer's store, taken now ...
        await pair.insurer.stop()
        db = Path(pair.insurer.controller.config.store.path)
        old = tmp_path / "insurer-old.sqlite"
        shutil.copy(db, old)
        pair.insurer = BridgeService(Controller(load_config(pair.insurer_cfg)),
                                     poll_interval=0.05)
        await pair.insurer.start()
        # ... more claims, cosigned as the log grows ...
        later = await deliver(pair, records[3:6], "b")
        grown = await pair.hospital.witness.run_once()
        assert grown[0].cosigned and grown[0].fault is None
        witnessed = tree.last_witnessed(hs, "insurer-b")
        assert witnessed is not None
        # ... then the copy is put back in place of the store.
        await pair.insurer.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copy(old, db)
        pair.insurer = BridgeService(Controller(load_config(pair.insurer_cfg)),
                                     poll_interval=0.05)
        await pair.insurer.start()
        caught = await pair.hospital.witness.run_once()
        fault = caught[0].fault or ""
        assert not caught[0].cosigned
        assert f"insurer-b@{witnessed[0]}" in fault, fault
        assert tree.last_witnessed(hs, "insurer-b") == witnessed  # nothing new cosigned
        # The insurer's own verify passes (its copy is self-consistent): only the partner
        # can tell, and it recorded what it saw.
        entries = await pair.hospital.controller.db.audit_entries()
        alarm = [e for e in entries if e.record.action == "audit.partner-inconsistent"]
        assert len(alarm) == 1 and alarm[0].record.partner == "insurer-b"
        assert alarm[0].record.detail and alarm[0].record.detail.startswith("checkpoint-invalid@")
        # The operations metrics show it.
        metrics = {m.name: {tuple(x.labels.values()): x.value for x in m.samples}
                   for m in audit_evidence(ScrapeContext(
                       config=pair.hospital.controller.config, store=hs,
                       now=pair.hospital.controller.clock()))}
        assert metrics["bridge_audit_partner_inconsistent"][("insurer-b",)] == 1
        assert metrics["bridge_audit_partner_cosigned_size"][("insurer-b",)] == witnessed[0]
    finally:
        await pair.stop()
    # The hospital's own chain verifies, but the partner's log failing its check is audit
    # evidence gone wrong: verify and status say so and exit 1, as the operator's cron
    # or monitoring reads them.
    verify = cli("audit", "verify", "--config", str(pair.hospital_cfg))
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "1 cosignatures match" in verify.stdout
    assert "PARTNER LOG INCONSISTENT insurer-b: 1 of its checkpoints refused" in verify.stdout
    status = cli("status", "--config", str(pair.hospital_cfg), "--json")
    assert status.returncode == 1, status.stdout + status.stderr
    [row] = orjson.loads(status.stdout)["witness"]
    assert row["partner"] == "insurer-b" and row["refused_checkpoints"] == 1
    assert row["last_refusal"] and "insurer-b" in row["last_refusal"]
    text = cli("status", "--config", str(pair.hospital_cfg))
    assert text.returncode == 1 and "PARTNER LOG INCONSISTENT insurer-b" in text.stdout
    # The insurer found nothing wrong with the hospital's log.
    assert cli("audit", "verify", "--config", str(pair.insurer_cfg)).returncode == 0

    # BALP-style export: the hospital's Export of each claim pairs with the insurer's
    # Import by the message identity (the export validates against R4 as it is written).
    events = {}
    for who, cfg in (("hospital", pair.hospital_cfg), ("insurer", pair.insurer_cfg)):
        assert cli_main(["audit", "export", "--fhir", "--config", str(cfg)]) == 0
        bundle = orjson.loads(capsys.readouterr().out)
        events[who] = {
            (ev["type"]["code"], ent["what"]["identifier"]["value"])
            for ev in (e["resource"] for e in bundle["entry"])
            for ent in ev["entity"] if ent["type"]["code"] == "2"}
    exported = {mid for code, mid in events["hospital"] if code == "110106"}
    imported = {mid for code, mid in events["insurer"] if code == "110107"}
    assert set(ids) <= exported and set(ids) <= imported
    # The claims received after the copy was taken are gone from the restored insurer's
    # log; the hospital's Export events still name them.
    assert set(later) <= exported and not set(later) & imported


async def test_a_partner_log_emptied_after_a_cosigned_checkpoint_is_caught(
        tmp_path: Path, records: list[dict[str, Any]]) -> None:
    """A new partner's empty log is nothing to check yet (PROTOCOL P-AUD-11); the same
    answer from a partner whose checkpoints this side has cosigned means its log was
    wiped or replaced by an empty one, and is recorded as a fault."""
    pair = await start_pair(tmp_path)
    try:
        fresh = await pair.hospital.witness.run_once()
        assert [(r.cosigned, r.fault) for r in fresh] == [(False, None)]
        await deliver(pair, records[:2], "e")
        first = await pair.hospital.witness.run_once()
        assert first[0].cosigned and first[0].fault is None
        hs = pair.hospital.controller.store
        witnessed = tree.last_witnessed(hs, "insurer-b")
        assert witnessed is not None and witnessed[0] > 0
        await pair.insurer.stop()
        db = Path(pair.insurer.controller.config.store.path)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        pair.insurer = BridgeService(Controller(load_config(pair.insurer_cfg)),
                                     poll_interval=0.05)
        await pair.insurer.start()
        caught = await pair.hospital.witness.run_once()
        assert not caught[0].cosigned
        assert caught[0].fault and "empty" in caught[0].fault, caught
        entries = await pair.hospital.controller.db.audit_entries()
        alarm = [e for e in entries if e.record.action == "audit.partner-inconsistent"]
        assert len(alarm) == 1 and alarm[0].record.partner == "insurer-b"
        assert alarm[0].record.detail == "checkpoint-invalid@checkpoint size"
        assert tree.last_witnessed(hs, "insurer-b") == witnessed
    finally:
        await pair.stop()
