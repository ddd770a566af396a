"""A demo-like run with encryption at rest: the store files, WAL included, copied while
both bridges run, show no FHIR resource and no patient value."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import orjson
from e2e_support import LINK_OUT, consent_for, make_workdir, patient_id, set_toml_keys

from bridge.cli import main as cli_main
from bridge.config import load_config
from bridge.link.node import Controller
from bridge.link.service import BridgeService
from bridge.samples import inpatient_records


def values_of(record: Any) -> set[bytes]:
    """Every string of a record long enough to be recognisable (names, numbers, codes)."""
    out: set[bytes] = set()
    if isinstance(record, dict):
        for v in record.values():
            out |= values_of(v)
    elif isinstance(record, list):
        for v in record:
            out |= values_of(v)
    elif isinstance(record, str) and len(record.encode()) >= 8:
        out.add(record.encode())
    return out


async def test_store_files_copied_while_running_hold_no_health_data(tmp_path: Path) -> None:
    hospital_cfg, insurer_cfg = make_workdir(tmp_path)
    for cfg, who in ((hospital_cfg, "h"), (insurer_cfg, "i")):
        kek = tmp_path / f"{who}.kek"
        kek.write_bytes(secrets.token_bytes(32))
        set_toml_keys(cfg, "store", {"data_key_file": str(kek)})
    insurer = BridgeService(Controller(load_config(insurer_cfg)), poll_interval=0.05)
    await insurer.start()
    hospital = BridgeService(Controller(load_config(hospital_cfg)), poll_interval=0.05)
    await hospital.start()
    records = inpatient_records(6, seed=21)
    try:
        ids = []
        for i, record in enumerate(records):
            await hospital.controller.put_consent(consent_for(record, consent_id=f"c-{i}"))
            ids.append((await hospital.submit(record, LINK_OUT)).message_id)
        for mid in ids:
            for _ in range(400):
                row = await hospital.controller.db.get_outbox(mid)
                if row is not None and row.state == "acked":
                    break
                await asyncio.sleep(0.05)
            assert row is not None and row.state == "acked"
        files = [f for c in (hospital_cfg, insurer_cfg)
                 for f in load_config(c).store.path.parent.glob("bridge.sqlite*")]
        assert any(f.name.endswith("-wal") for f in files)
        copied = {f.name + str(f.parent): f.read_bytes() for f in files}
        # What the bridges read back is what was sent.
        row = await insurer.controller.db.inbox_lookup("hospital-a", ids[0])
        assert row is not None and orjson.loads(row.payload)["resourceType"] == "Bundle"
    finally:
        await hospital.stop()
        await insurer.stop()
    # (Resource type names do appear: the audit log lists the data categories disclosed.)
    needles = {b"resourceType"}
    for record in records:
        needles |= values_of(record)
        needles.add(patient_id(record)[1].encode())
    for name, data in copied.items():
        found = [n for n in needles if n in data]
        assert found == [], (name, found[:5])
    # The evidence still verifies with the data sealed.
    assert cli_main(["audit", "verify", "--config", str(insurer_cfg)]) == 0
