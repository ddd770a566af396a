"""An audit entry edited in the store file to a value the bridge never writes (a clear
resident ID, an unknown outcome, an empty operator, a time that is not a time,
categories that are not JSON) is reported as tampering, naming the entry and the column
and never the value, by every command that reads the chain: none fails as an internal
error."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from e2e_support import cli

RESIDENT_ID = "330108197706081354"  # the sample consent's patient
PATIENT = f"urn:oid:2.16.156.10011.1.3|{RESIDENT_ID}"

EDITS = {
    "patient": f"'{RESIDENT_ID}'",
    "outcome": "'ok'",
    "operator": "''",
    "time": "'yesterday'",
    "categories": "'Claim'",
}


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital from ``bridge init`` with three audit entries (one consent, three times)."""
    folder = tmp_path_factory.mktemp("tampered") / "d"
    done = cli("init", "hospital", str(folder))
    assert done.returncode == 0, done.stderr
    for _ in range(3):
        done = cli("consent", "add", "--config", str(folder / "hospital.toml"),
                   str(folder / "hospital-a/samples/consent.json"))
        assert done.returncode == 0, done.stderr
    return folder


def tampered(initialised: Path, tmp_path: Path, column: str) -> Path:
    """A copy of the hospital's folder whose audit entry 2 has ``column`` edited."""
    folder = tmp_path / "d"
    shutil.copytree(initialised, folder)
    raw = sqlite3.connect(folder / "hospital-a/bridge.sqlite")
    raw.execute("DROP TRIGGER audit_no_update")
    raw.execute(f"UPDATE audit SET {column}={EDITS[column]} WHERE seq=2")
    raw.commit()
    raw.close()
    return folder


def assert_names_entry_2(out: str, column: str) -> None:
    assert "internal" not in out and "Traceback" not in out, out
    assert "audit chain BROKEN at entry 2" in out and f"entry 2 {column} " in out, out
    assert "yesterday" not in out and "'ok'" not in out, out
    assert out.count(RESIDENT_ID) == 0, out


@pytest.mark.parametrize("column", sorted(EDITS))
def test_audit_verify_names_the_edited_entry_and_column(
        initialised: Path, tmp_path: Path, column: str) -> None:
    folder = tampered(initialised, tmp_path, column)
    for where in (["--store", str(folder / "hospital-a/bridge.sqlite")],
                  ["--config", str(folder / "hospital.toml")]):
        done = cli("audit", "verify", *where)
        assert done.returncode == 1, done.stdout + done.stderr
        assert_names_entry_2(done.stdout + done.stderr, column)
        assert "(1 entries checked)" in done.stdout


@pytest.mark.parametrize("column", ["patient", "time"])
def test_every_command_reading_the_chain_reports_the_edit(
        initialised: Path, tmp_path: Path, column: str) -> None:
    folder = tampered(initialised, tmp_path, column)
    config = str(folder / "hospital.toml")
    status = cli("status", "--config", config, "--json")
    assert status.returncode == 1, status.stdout + status.stderr
    assert '"first_bad_seq": 2' in status.stdout.replace('":2', '": 2'), status.stdout
    text = cli("status", "--config", config)
    assert text.returncode == 1, text.stdout + text.stderr
    assert_names_entry_2(text.stdout + text.stderr, column)
    for args in (["audit", "export", "--fhir", "--config", config],
                 ["audit", "disclosures", "--config", config, "--patient", PATIENT],
                 ["audit", "checkpoint", "--config", config],
                 ["audit", "prove", "--config", config, "--seq", "3"]):
        done = cli(*args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert_names_entry_2(done.stdout + done.stderr, column)


async def test_a_damaged_entry_does_not_stop_the_receiver_taking_claims(tmp_path: Path) -> None:
    """One edited row in the insurer's log: its verification says so, and the insurer,
    started again on that store, still takes claims and answers them with receipts."""
    import asyncio

    from e2e_support import LINK_OUT, consent_for, make_workdir

    from bridge.config import load_config
    from bridge.link.node import Controller
    from bridge.link.service import BridgeService
    from bridge.samples import inpatient_records

    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    records = inpatient_records(2, seed=19)

    async def deliver(hospital: BridgeService, record: dict) -> str:
        await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{records.index(record)}"))
        mid = (await hospital.submit(record, LINK_OUT)).message_id
        for _ in range(400):
            row = await hospital.controller.db.get_outbox(mid)
            if row is not None and row.state in ("acked", "rejected", "dead"):
                return str(row.state)
            await asyncio.sleep(0.05)
        return str(row.state if row else None)

    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    await hospital.start()
    try:
        assert await deliver(hospital, records[0]) == "acked"
        await insurer.stop()
        raw = sqlite3.connect(tmp_path / "insurer-b" / "bridge.sqlite")
        raw.execute("DROP TRIGGER audit_no_update")
        raw.execute("""UPDATE audit SET categories='{"Claim":1}' WHERE seq=1""")
        raw.commit()
        raw.close()
        insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
        await insurer.start()
        assert await deliver(hospital, records[1]) == "acked"
    finally:
        await hospital.stop()
        await insurer.stop()
    done = cli("audit", "verify", "--config", str(insurer_cfg))
    assert done.returncode == 1 and "audit chain BROKEN at entry 1" in done.stdout, done.stdout
